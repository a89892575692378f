"""The `lmforge` command line: argument parsing only; every command calls a function of the package.

Each command is a `_cmd_<name>(sub)` function that adds its sub-parser (with help text and examples)
and binds `func` to a small runner that imports the library lazily, so `lmforge --help` stays fast.
User errors (`UserError`, `FileNotFoundError`, `ValueError` from config validation) are printed
without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _parser(sub, name: str, help: str, examples: list[str], description: str | None = None):
    return sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=_examples(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_device_args(p) -> None:
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (CUDA, then MPS, then CPU)")
    p.add_argument(
        "--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, the checkpoint's on GPU)"
    )


# --------------------------------------------------------------------------------------------- info
def _cmd_info(sub) -> None:
    p = _parser(
        sub,
        "info",
        "describe a checkpoint: family, parameters, size, dtype, context, config",
        ["lmforge info runs/quickstart/final", "lmforge info ./my-hf-llama --json"],
    )
    p.add_argument("checkpoint", help="an lmforge or Hugging Face model directory")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_run_info)


def _run_info(a) -> None:
    import json

    from lmforge.checkpoint import describe

    d = describe(a.checkpoint)
    if a.json:
        print(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if k != "config":
            print(f"{k:>22}: {v}")
    print("config:")
    for k, v in d["config"].items():
        print(f"{k:>22}: {v}")


# ------------------------------------------------------------------------------------ quickstart
def _cmd_quickstart(sub) -> None:
    p = _parser(
        sub,
        "quickstart",
        "build a first model end to end on the embedded python-docs corpus",
        ["lmforge quickstart", "lmforge quickstart --fresh"],
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    _add_device_args(p)
    p.set_defaults(func=_run_quickstart)


def _run_quickstart(a) -> None:
    from lmforge.quickstart import quickstart

    quickstart(out=a.out, fresh=a.fresh, device=a.device, dtype=a.dtype)


# ------------------------------------------------------------------------------------- tokenizer
def _cmd_tokenizer(sub) -> None:
    p = _parser(sub, "tokenizer", "train a byte-level BPE tokenizer, or inspect one",
                ["lmforge tokenizer train --data python-docs --vocab-size 8192 --out runs/tok",
                 "lmforge tokenizer encode --tokenizer runs/tok 'Hello, world!'"])
    ss = p.add_subparsers(dest="action", metavar="<action>")
    t = _parser(ss, "train", "train a byte-level BPE tokenizer (GPT-4 split regex, chat special tokens)",
                ["lmforge tokenizer train --data python-docs --vocab-size 8192 --out runs/tok",
                 "lmforge tokenizer train --data 'corpus/*.jsonl' --text-field body --vocab-size 32768 --out tok32k",
                 "lmforge tokenizer train --data c4 --max-docs 200000 --vocab-size 32768 --out tok-c4"],
                description="Train a byte-level BPE tokenizer with the Hugging Face tokenizers library and write "
                            "tokenizer.json + tokenizer_config.json (loadable by transformers.AutoTokenizer). "
                            "The validation split of the documents is held out and used to report compression.")
    _add_source_args(t)
    t.add_argument("--vocab-size", type=int, required=True,
                   help="vocabulary size including 256 byte tokens and the special tokens (e.g. 8192)")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json")
    t.add_argument("--max-chars", type=int, default=None, help="stop reading after this many characters of text")
    t.add_argument("--max-length", type=int, default=2048, help="model_max_length written to tokenizer_config.json")
    t.set_defaults(func=_run_tokenizer_train)
    e = _parser(ss, "encode", "show how a tokenizer splits a text (ids, tokens, bytes per token)",
                ["lmforge tokenizer encode --tokenizer runs/tok 'def f(x): return x'"])
    e.add_argument("text", help="text to encode")
    e.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (or the file itself)")
    e.set_defaults(func=_run_tokenizer_encode)
    p.set_defaults(func=lambda a: p.print_help())


def _add_source_args(p) -> None:
    p.add_argument("--data", default="python-docs",
                   help="python-docs (built in), c4, hf:owner/name[:config][@split], or a file/folder/glob of "
                        ".txt .md .json .jsonl .parquet (.gz/.zst too) (default: python-docs)")
    p.add_argument("--text-field", default="text", help="JSON/Parquet field that holds the text (default: text)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="share of documents (by content hash) in the validation split (default: 0.02)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed JSON line instead of skipping it")


def _run_tokenizer_train(a) -> None:
    from lmforge.data.tokenize_corpus import train_tokenizer_on

    train_tokenizer_on(a.data, a.vocab_size, a.out, text_field=a.text_field, max_docs=a.max_docs,
                       max_chars=a.max_chars, val_fraction=a.val_fraction, model_max_length=a.max_length,
                       strict=a.strict)


def _run_tokenizer_encode(a) -> None:
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(a.tokenizer)
    ids = tok.encode(a.text)
    print(f"{len(ids)} tokens, {len(a.text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token")
    print("ids:   ", ids)
    print("tokens:", [tok.decode([i]) for i in ids])


# ------------------------------------------------------------------------------------------ data
def _cmd_data(sub) -> None:
    p = _parser(sub, "data", "prepare token shards from text sources, or describe them",
                ["lmforge data prepare --data python-docs --tokenizer runs/tok --out runs/data",
                 "lmforge data info runs/data"])
    ss = p.add_subparsers(dest="action", metavar="<action>")
    d = _parser(ss, "prepare", "tokenize documents into uint16/uint32 shards with a train/validation split",
                ["lmforge data prepare --data python-docs --tokenizer runs/tok --out runs/data",
                 "lmforge data prepare --data ~/c4/en/ --tokenizer runs/tok --out data/c4 --workers 8",
                 "lmforge data prepare --data c4 --max-docs 1000000 --tokenizer runs/tok --out data/c4-1m",
                 "lmforge data prepare --data 'books/*.txt' --tokenizer runs/tok --out data/books"],
                description="Stream documents, drop exact duplicates, split train/validation by content hash, "
                            "tokenize in parallel (BOS + text + EOS per document) and write memmap shards plus "
                            "meta.json. A finished preparation of the same input and tokenizer is reused; a "
                            "failed run leaves the previous one untouched.")
    _add_source_args(d)
    d.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (or the file itself)")
    d.add_argument("--out", required=True, help="directory for the shards and meta.json")
    d.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores; 1 = in-process)")
    d.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file (default: 134217728)")
    d.add_argument("--force", action="store_true", help="redo the preparation even if a finished one matches")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    d.set_defaults(func=_run_data_prepare)
    i = _parser(ss, "info", "describe a prepared shard directory, or count the documents of a source",
                ["lmforge data info runs/data", "lmforge data info python-docs", "lmforge data info 'notes/*.md'"])
    i.add_argument("path", help="a `data prepare` output directory, or a --data source spec")
    i.add_argument("--text-field", default="text", help="JSON/Parquet field that holds the text (default: text)")
    i.set_defaults(func=_run_data_info)
    p.set_defaults(func=lambda a: p.print_help())


def _run_data_prepare(a) -> None:
    from lmforge.data.prepare import prepare

    prepare(a.data, a.tokenizer, a.out, workers=a.workers, val_fraction=a.val_fraction, text_field=a.text_field,
            strict=a.strict, max_docs=a.max_docs, shard_tokens=a.shard_tokens, force=a.force,
            progress=not a.no_progress)


def _run_data_info(a) -> None:
    from lmforge.data.info import describe

    print(describe(a.path, text_field=a.text_field))


# The order here is the order of `lmforge --help`.
COMMANDS = [_cmd_quickstart, _cmd_tokenizer, _cmd_data, _cmd_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description=textwrap.dedent(
            """\
            lmforge: build language models end to end on your own hardware.
            tokenizer -> data -> pretrain -> finetune -> generate -> compress -> evaluate -> export -> serve"""
        ),
        epilog=_examples(
            "lmforge quickstart", "lmforge info runs/quickstart/final", "lmforge <command> --help"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from lmforge.utils import UserError

    try:
        args.func(args)
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
