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


def _actions(p):
    """The sub-parsers of a command with actions (`lmforge data prepare`); the bare command shows its help."""
    p.set_defaults(func=lambda a: p.print_help())
    return p.add_subparsers(dest="action", metavar="<action>")


# Options that several commands take, each defined once.
def _add_checkpoint(p, note: str = "") -> None:
    p.add_argument("checkpoint", help=f"an lmforge or Hugging Face model directory{note}")


def _add_device_args(p) -> None:
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (CUDA, then MPS, then CPU)")
    p.add_argument(
        "--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, the checkpoint's on GPU)"
    )


def _add_tokenizer(p) -> None:
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (or the file itself)")


def _add_text_field(p) -> None:
    p.add_argument(
        "--text-field", default="text", help="JSON/Parquet field that holds the text (default: text)"
    )


# --------------------------------------------------------------------------------------------- info
def _cmd_info(sub) -> None:
    p = _parser(
        sub,
        "info",
        "describe a checkpoint: family, architecture switches, parameters, size, dtype, context, config; "
        "without a checkpoint, the families lmforge reads and what each switches on",
        ["lmforge info runs/quickstart/final", "lmforge info ./my-hf-llama --json", "lmforge info"],
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="an lmforge or Hugging Face model directory (omit it to list the families)",
    )
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_run_info)


def _run_info(a) -> None:
    import json

    from lmforge.checkpoint import describe

    if a.checkpoint is None:
        from lmforge.config import FAMILIES, HF_MODEL_TYPE, switches

        rows = {f: {"model_type": HF_MODEL_TYPE[f], "switches": switches(f)} for f in FAMILIES}
        if a.json:
            print(json.dumps(rows, indent=2))
            return
        for f, r in rows.items():
            print(f"{f:>8} [{r['model_type']}]: {r['switches']}")
        return
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
        ["lmforge quickstart", "lmforge quickstart --fresh", "lmforge quickstart --steps 20 --no-export"],
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help="pretraining time budget (the whole quickstart takes about half a minute more); the model "
        "size, token count and CPU threads are chosen to fit it",
    )
    p.add_argument(
        "--data",
        default="python-docs",
        help="corpus: python-docs (embedded, offline), c4 (streamed, needs internet) or any source spec",
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX and GGUF exports")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train the smallest (debug) model for this many steps instead of filling --minutes: "
        "the whole pipeline in seconds, to check a setup",
    )
    _add_device_args(p)
    p.set_defaults(func=_run_quickstart)


def _run_quickstart(a) -> None:
    from lmforge.quickstart import quickstart

    quickstart(
        out=a.out,
        fresh=a.fresh,
        minutes=a.minutes,
        data=a.data,
        vocab_size=a.vocab_size,
        seq_len=a.seq_len,
        export=not a.no_export,
        steps=a.steps,
        device=a.device,
        dtype=a.dtype,
    )


# ------------------------------------------------------------------------------------- tokenizer
def _cmd_tokenizer(sub) -> None:
    p = _parser(
        sub,
        "tokenizer",
        "train a byte-level BPE tokenizer, or inspect one",
        [
            "lmforge tokenizer train --data python-docs --vocab-size 8192 --out runs/tok",
            "lmforge tokenizer encode --tokenizer runs/tok 'Hello, world!'",
        ],
    )
    ss = _actions(p)
    t = _parser(
        ss,
        "train",
        "train a byte-level BPE tokenizer (GPT-4 split regex, chat special tokens)",
        [
            "lmforge tokenizer train --data python-docs --vocab-size 8192 --out runs/tok",
            "lmforge tokenizer train --data 'corpus/*.jsonl' --text-field body --vocab-size 32768 --out tok32k",
            "lmforge tokenizer train --data c4 --max-docs 200000 --vocab-size 32768 --out tok-c4",
        ],
        description="Train a byte-level BPE tokenizer with the Hugging Face tokenizers library and write "
        "tokenizer.json + tokenizer_config.json (loadable by transformers.AutoTokenizer). "
        "The validation split of the documents is held out and used to report compression.",
    )
    _add_source_args(t)
    t.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="vocabulary size including 256 byte tokens and the special tokens (e.g. 8192)",
    )
    t.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json")
    t.add_argument(
        "--max-chars", type=int, default=None, help="stop reading after this many characters of text"
    )
    t.add_argument(
        "--max-length", type=int, default=2048, help="model_max_length written to tokenizer_config.json"
    )
    t.set_defaults(func=_run_tokenizer_train)
    e = _parser(
        ss,
        "encode",
        "show how a tokenizer splits a text (ids, tokens, bytes per token)",
        ["lmforge tokenizer encode --tokenizer runs/tok 'def f(x): return x'"],
    )
    e.add_argument("text", help="text to encode")
    _add_tokenizer(e)
    e.set_defaults(func=_run_tokenizer_encode)


def _add_source_args(p) -> None:
    p.add_argument(
        "--data",
        default="python-docs",
        help="python-docs (built in), c4, hf:owner/name[:config][@split], or a file/folder/glob of "
        ".txt .md .json .jsonl .parquet (.gz/.zst too) (default: python-docs)",
    )
    _add_text_field(p)
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="share of documents (by content hash) in the validation split (default: 0.02)",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first malformed JSON line instead of skipping it"
    )


def _run_tokenizer_train(a) -> None:
    from lmforge.data.tokenize_corpus import train_tokenizer_on

    train_tokenizer_on(
        a.data,
        a.vocab_size,
        a.out,
        text_field=a.text_field,
        max_docs=a.max_docs,
        max_chars=a.max_chars,
        val_fraction=a.val_fraction,
        model_max_length=a.max_length,
        strict=a.strict,
    )


def _run_tokenizer_encode(a) -> None:
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(a.tokenizer)
    ids = tok.encode(a.text)
    print(f"{len(ids)} tokens, {len(a.text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token")
    print("ids:   ", ids)
    print("tokens:", [tok.decode([i]) for i in ids])


# ------------------------------------------------------------------------------------------ data
def _cmd_data(sub) -> None:
    p = _parser(
        sub,
        "data",
        "prepare token shards from text sources, or describe them",
        [
            "lmforge data prepare --data python-docs --tokenizer runs/tok --out runs/data",
            "lmforge data info runs/data",
        ],
    )
    ss = _actions(p)
    d = _parser(
        ss,
        "prepare",
        "tokenize documents into uint16/uint32 shards with a train/validation split",
        [
            "lmforge data prepare --data python-docs --tokenizer runs/tok --out runs/data",
            "lmforge data prepare --data ~/c4/en/ --tokenizer runs/tok --out data/c4 --workers 8",
            "lmforge data prepare --data c4 --max-docs 1000000 --tokenizer runs/tok --out data/c4-1m",
            "lmforge data prepare --data 'books/*.txt' --tokenizer runs/tok --out data/books",
        ],
        description="Stream documents, drop exact duplicates, split train/validation by content hash, "
        "tokenize in parallel (BOS + text + EOS per document) and write memmap shards plus "
        "meta.json. A finished preparation of the same input and tokenizer is reused; a "
        "failed run leaves the previous one untouched.",
    )
    _add_source_args(d)
    _add_tokenizer(d)
    d.add_argument("--out", required=True, help="directory for the shards and meta.json")
    d.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores; 1 = in-process)"
    )
    d.add_argument(
        "--shard-tokens", type=int, default=1 << 27, help="tokens per shard file (default: 134217728)"
    )
    d.add_argument("--force", action="store_true", help="redo the preparation even if a finished one matches")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    d.set_defaults(func=_run_data_prepare)
    i = _parser(
        ss,
        "info",
        "describe a prepared shard directory, or count the documents of a source",
        ["lmforge data info runs/data", "lmforge data info python-docs", "lmforge data info 'notes/*.md'"],
    )
    i.add_argument("path", help="a `data prepare` output directory, or a --data source spec")
    _add_text_field(i)
    i.set_defaults(func=_run_data_info)


def _run_data_prepare(a) -> None:
    from lmforge.data.prepare import prepare

    prepare(
        a.data,
        a.tokenizer,
        a.out,
        workers=a.workers,
        val_fraction=a.val_fraction,
        text_field=a.text_field,
        strict=a.strict,
        max_docs=a.max_docs,
        shard_tokens=a.shard_tokens,
        force=a.force,
        progress=not a.no_progress,
    )


def _run_data_info(a) -> None:
    from lmforge.data.info import describe

    print(describe(a.path, text_field=a.text_field))


# The order here is the order of `lmforge --help`.
# ------------------------------------------------------------------------------------- training
_TRAIN_HELP = """\
Options read the same on the command line and in a YAML recipe (--config): `--train.lr 3e-4` is
`train: {lr: 3e-4}`. Precedence: defaults < the run's saved config.yaml (with --resume) < --config < options.
Under torchrun, `--parallel ddp|fsdp` trains on every process (NCCL on GPU, gloo on CPU)."""


def _train_parser(sub, name: str, help: str, examples: list[str]):
    from lmforge.train.config import add_config_arguments

    p = _parser(sub, name, help, examples, description=f"{help}\n\n{_TRAIN_HELP}")
    add_config_arguments(p, skip=("task",))
    p.usage = f"lmforge {name} [--config YAML] [--section.option VALUE ...]"
    return p


def _cmd_pretrain(sub) -> None:
    p = _train_parser(
        sub,
        "pretrain",
        "train a language model from scratch on token shards",
        [
            "lmforge pretrain --config configs/tiny-cpu.yaml",
            "lmforge pretrain --data.path data/pydocs --data.tokenizer runs/tok --model.size tiny --train.max_steps 2000",
            "lmforge pretrain --config configs/tiny-cpu.yaml --time-budget 10m",
            "lmforge pretrain --name tiny --resume auto          # continue after a stop or crash",
            "torchrun --nproc-per-node 8 -m lmforge pretrain --config configs/gpu-125m.yaml --parallel fsdp",
        ],
    )
    p.set_defaults(func=lambda a: _run_train(a, "pretrain"))


def _cmd_finetune(sub) -> None:
    p = _train_parser(
        sub,
        "finetune",
        "supervised fine-tuning on chat data (loss on assistant tokens only)",
        [
            "lmforge finetune --model.init_from runs/tiny/final --data.path chat.jsonl --train.max_steps 300",
            "lmforge finetune --config configs/sft-lora.yaml --model.init_from ./my-hf-llama --lora.rank 16",
            "lmforge finetune --model.init_from runs/tiny/final --data.path chat.jsonl --train.freeze_embeddings",
            "lmforge merge-lora runs/sft-final/final --out runs/sft-merged",
        ],
    )
    p.set_defaults(func=lambda a: _run_train(a, "sft"))


def _run_train(a, task: str) -> None:
    from lmforge.train import train
    from lmforge.train.config import config_for_run, overrides_from_args

    cfg = config_for_run(a.config, overrides_from_args(a), task)
    _exit_if_stopped(train(cfg))


def _exit_if_stopped(summary: dict) -> None:
    if summary.get("stopped") in ("SIGINT", "SIGTERM"):  # checkpoint written; the usual exit status
        sys.exit(130 if summary["stopped"] == "SIGINT" else 143)


def _cmd_merge_lora(sub) -> None:
    p = _parser(
        sub,
        "merge-lora",
        "fold a LoRA adapter into its base model: a plain Hugging Face directory",
        [
            "lmforge merge-lora runs/sft-lora/final --out runs/sft-merged",
            "lmforge merge-lora runs/sft-lora/checkpoints/step_000300 --base ./my-hf-llama --out merged --dtype bf16",
        ],
    )
    p.add_argument(
        "adapter",
        help="a LoRA adapter directory: a LoRA run's final/ or checkpoints/step_NNNNNN/, or any PEFT LoRA "
        "adapter (adapter_config.json + adapter_model.safetensors)",
    )
    p.add_argument("--out", required=True, help="where to write the merged model directory")
    p.add_argument(
        "--base",
        default=None,
        help="the base checkpoint (default: base_model_name_or_path of the adapter's adapter_config.json, "
        "when that is a local directory)",
    )
    p.add_argument(
        "--dtype", default=None, help="fp32, bf16 or fp16 for the merged weights (default: the base's)"
    )
    p.set_defaults(func=_run_merge_lora)


def _run_merge_lora(a) -> None:
    from lmforge.train.lora import merge_lora_dir
    from lmforge.utils import parse_dtype

    dtype = parse_dtype(a.dtype) if a.dtype is not None else None  # a storage dtype: any of the three
    out = merge_lora_dir(a.adapter, a.out, base=a.base, dtype=dtype)
    print(f"merged {a.adapter} into {out}")


# ------------------------------------------------------------------------------------ generation
def _add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default: 1.0)"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="sample only from the k most likely tokens (default: off)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample from the smallest set of tokens whose probability reaches p (default: 1 = off)",
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens less likely than min-p times the most likely one (default: 0 = off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="CTRL penalty on tokens already seen, > 1 discourages repeats (default: 1 = off)",
    )
    p.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtract this from the logit of every token already generated, in [-2, 2] (OpenAI's; default: 0)",
    )
    p.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="subtract this once per time a token was generated, in [-2, 2] (OpenAI's; default: 0)",
    )
    p.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS in [-100, 100] to token ID's logit (-100 bans it, 100 forces it); repeatable",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (not included in the output); repeatable",
    )
    p.add_argument(
        "--draft",
        default=None,
        metavar="CKPT",
        help="a smaller checkpoint with the same tokenizer for speculative decoding",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens the draft proposes per round (default: 4)"
    )
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="compile the decode step with torch.compile (auto: on CUDA, with CUDA graphs; on: also on CPU, "
        "where fused C++ kernels decode 1.3-1.7x faster after a one-time compile of 1-2 minutes, cached on disk)",
    )
    _add_device_args(p)


def _sampling_params(a, **extra):
    from lmforge.infer import SamplingParams

    return SamplingParams(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        logit_bias=_logit_bias(a.logit_bias),
        seed=a.seed,
        stop=tuple(a.stop),
        **extra,
    )


def _logit_bias(items: list[str]) -> dict[int, float]:
    """--logit-bias ID=BIAS pairs -> {id: bias}."""
    from lmforge.utils import UserError

    out = {}
    for item in items:
        tid, eq, bias = item.partition("=")
        try:
            out[int(tid)] = float(bias)
        except ValueError:
            raise UserError(f"--logit-bias {item!r}: write TOKEN_ID=BIAS, e.g. 50256=-100") from None
        if not eq:
            raise UserError(f"--logit-bias {item!r}: write TOKEN_ID=BIAS, e.g. 50256=-100")
    return out


def _load_for_generation(a):
    import lmforge

    lm = lmforge.load(a.checkpoint, device=a.device, dtype=a.dtype)
    draft = lmforge.load(a.draft, device=str(lm.device), dtype=lm.dtype) if a.draft else None
    return lm, draft, {"on": True, "off": False}.get(a.compile)


def _cmd_generate(sub) -> None:
    p = _parser(
        sub,
        "generate",
        "generate text from a checkpoint (streamed for a single prompt)",
        [
            "lmforge generate runs/quickstart/final --prompt 'def fibonacci(n):' --temperature 0",
            "lmforge generate ckpt --prompt 'Once upon a time' --num-samples 3 --top-p 0.9 --seed 0",
            "lmforge generate ckpt --prompt 'a' --prompt 'b' --max-new-tokens 64 --stop '\\n\\n'",
            "lmforge generate ckpt --prompt 'x = ' --draft small-ckpt --temperature 0",
            "cat long.txt | lmforge generate ckpt --prompt - --truncate left",
        ],
    )
    _add_checkpoint(p, " with a tokenizer")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="text to continue ('-' reads standard input); repeat for a batch decoded together",
    )
    p.add_argument("--num-samples", type=int, default=1, help="independent samples per prompt (default: 1)")
    p.add_argument(
        "--truncate",
        choices=["left"],
        default=None,
        help="drop the oldest prompt tokens when prompt + max-new-tokens exceeds the context "
        "(default: that is an error)",
    )
    p.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        metavar="SIZE",
        help="most memory for the KV cache: bytes, 2GiB, 512MB, or a fraction of free memory such as 0.3 "
        "(default: what is available); prompts x (prompt + new tokens) that do not fit are an error",
    )
    _add_sampling_args(p)
    p.set_defaults(func=_run_generate)


def _run_generate(a) -> None:
    from lmforge.infer import generate, stream

    prompts = [sys.stdin.read() if pr == "-" else pr for pr in a.prompt]
    params = _sampling_params(a, num_samples=a.num_samples)  # checked before the (slower) model load
    lm, draft, compile = _load_for_generation(a)
    kw = dict(params=params, draft=draft, draft_tokens=a.draft_tokens, truncate=a.truncate, compile=compile)
    if a.kv_cache_memory is not None:
        kw["kv_cache_memory"] = a.kv_cache_memory
    if len(prompts) == 1 and a.num_samples == 1:
        s = stream(lm, prompts[0], **kw)
        for piece in s:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        stats = s.stats
    else:
        outs = generate(lm, prompts, details=True, **kw)
        for i, per_prompt in enumerate(outs):
            for j, c in enumerate(per_prompt if a.num_samples > 1 else [per_prompt]):
                print(f"--- prompt {i + 1}" + (f", sample {j + 1}" if a.num_samples > 1 else "") + " ---")
                print(c.text)
        stats = outs[0][0].stats if a.num_samples > 1 else outs[0].stats
    if a.stats:
        line = (
            f"prefill {stats['prefill_tokens']} tokens at {stats['prefill_tok_s']:.1f} tok/s, "
            f"decode {stats['decode_tokens']} tokens at {stats['decode_tok_s']:.1f} tok/s"
        )
        if "acceptance_rate" in stats:
            line += f", draft acceptance {stats['acceptance_rate']:.1%}"
        print(line, file=sys.stderr)


def _cmd_chat(sub) -> None:
    p = _parser(
        sub,
        "chat",
        "chat with a checkpoint in the terminal (chat template, streamed replies)",
        [
            "lmforge chat runs/sft/final",
            "lmforge chat ckpt --system 'You answer briefly.' --temperature 0.7 --top-p 0.9",
            "printf 'hello\\n/reset\\nhi\\n' | lmforge chat ckpt --temperature 0",
        ],
        description="Chat with a checkpoint. Type a message and press enter; /reset starts a new "
        "conversation, /quit (or Ctrl-D) leaves. The oldest turns are dropped, with a note, "
        "when the conversation outgrows the model's context.",
    )
    p.add_argument("checkpoint", help="a model directory whose tokenizer has a chat template")
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    p.add_argument(
        "--template-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument for the chat template, VALUE read as JSON when it parses "
        "(e.g. enable_thinking=false for Qwen3); repeat for more",
    )
    _add_sampling_args(p)
    p.set_defaults(func=_run_chat)


def _run_chat(a) -> None:
    from lmforge.infer.chat import chat

    params = _sampling_params(a)  # checked before the (slower) model load
    lm, draft, _ = _load_for_generation(a)
    chat(lm, params, system=a.system, draft=draft, template_kwargs=_template_kwargs(a.template_kwarg))


def _template_kwargs(items: list[str]) -> dict:
    """KEY=VALUE pairs -> {KEY: VALUE parsed as JSON, or the string as given}."""
    import json

    from lmforge.utils import UserError

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--template-kwarg {item!r}: write KEY=VALUE, e.g. enable_thinking=false")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


# -------------------------------------------------------------------------------------- evaluate
def _cmd_evaluate(sub) -> None:
    p = _parser(
        sub,
        "evaluate",
        "loss, perplexity, bits per byte and accuracy on data; task accuracy; robustness",
        [
            "lmforge evaluate runs/quickstart/final --data python-docs --max-tokens 50000",
            "lmforge evaluate ckpt --data runs/data                 # a `data prepare` dir: its val split",
            "lmforge evaluate ckpt --data notes.txt --split all --out results.json",
            "lmforge evaluate ckpt --task hellaswag_val.jsonl --task arithmetic.jsonl",
            "lmforge evaluate ckpt --task arc_easy.jsonl --robustness --seed 0",
        ],
        description="Evaluate a checkpoint. --data: loss, perplexity, bits per byte (tokenizer-"
        "independent) and next-token accuracy over every document of the held-out split, "
        "in windows no longer than the model's context (nothing is truncated). --task: "
        "multiple choice by log-likelihood (acc, acc_norm) or generation with exact match, "
        "from JSONL files; --robustness repeats each task under seeded perturbations of "
        "the inputs (typos, case, whitespace). See docs/evaluation.md.",
    )
    _add_checkpoint(p, " with a tokenizer")
    p.add_argument(
        "--data",
        default=None,
        help="a `data prepare` directory, or a source: python-docs, c4, hf:owner/name[:config][@split], "
        "a file/folder/glob of .txt .md .json .jsonl .parquet",
    )
    p.add_argument(
        "--split",
        default="val",
        help="val (held-out documents, by content hash as in `data prepare`; default), train or all",
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help="stop after scoring this many tokens (default: all)"
    )
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents of the split")
    p.add_argument(
        "--seq-len", type=int, default=None, help="window length in tokens (default: the model's context)"
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens each later window moves (default: --seq-len, no overlap); smaller gives every "
        "scored token more context and costs more",
    )
    _add_text_field(p)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="share of documents in the held-out split, as given to `data prepare` (default: 0.02)",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        help="a JSONL task file: {context, choices, label} or {prompt, answer} per line; repeatable",
    )
    p.add_argument("--max-examples", type=int, default=None, help="use at most this many examples per task")
    p.add_argument(
        "--delimiter",
        default=" ",
        help="text between a multiple-choice context and each choice (default: a space, as lm-eval)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="generation tasks: most tokens to generate (default: 32)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        help="generation tasks: stop string, repeatable (default: a newline)",
    )
    p.add_argument(
        "--robustness",
        action="store_true",
        help="also score each task under perturbed inputs and show the drop from the clean score",
    )
    p.add_argument(
        "--perturbations",
        default=None,
        help="comma-separated kind[:rate] among typos, upper, lower, random_case, whitespace "
        "(default: typos 2/5/10%%, upper, lower, random_case 50%%, whitespace 20%%)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default: 0)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: automatic)")
    p.add_argument("--out", default=None, help="write all results to this JSON file")
    p.add_argument("--predictions", action="store_true", help="include per-example task predictions in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    _add_device_args(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(a) -> None:
    import json

    import lmforge
    from lmforge.utils import UserError, atomic_write_text

    if a.data is None and not a.task:
        raise UserError("nothing to evaluate: give --data SOURCE and/or --task FILE.jsonl")
    lm = lmforge.load(a.checkpoint, device=a.device, dtype=a.dtype)
    results: dict = {"checkpoint": a.checkpoint}
    if a.data is not None:
        from lmforge.evaluate.perplexity import evaluate_lm, format_metrics

        r = evaluate_lm(
            lm,
            a.data,
            split=a.split,
            max_tokens=a.max_tokens,
            max_docs=a.max_docs,
            seq_len=a.seq_len,
            stride=a.stride,
            batch_size=a.batch_size,
            text_field=a.text_field,
            val_fraction=a.val_fraction,
            progress=not a.no_progress,
        )
        print(format_metrics(r))
        results["data"] = r
    if a.task:
        from lmforge.evaluate.robustness import format_robustness, parse_perturbations, robustness_report
        from lmforge.evaluate.tasks import evaluate_task, format_task, load_task

        kw = dict(
            batch_size=a.batch_size or 16,
            delimiter=a.delimiter,
            max_new_tokens=a.max_new_tokens,
            stop=tuple(a.stop) if a.stop else ("\n",),
        )
        perturbations = parse_perturbations(a.perturbations) if a.robustness else None
        results["tasks"], results["robustness"] = {}, {}
        for path in a.task:
            task = load_task(path, a.max_examples)
            r = evaluate_task(lm, task, keep_predictions=a.predictions, progress=not a.no_progress, **kw)
            print()
            print(format_task(r))
            results["tasks"][task.name] = r
            if a.robustness:
                rr = robustness_report(
                    lm, task, perturbations=perturbations, seed=a.seed, progress=not a.no_progress, **kw
                )
                print()
                print(format_robustness(rr))
                results["robustness"][task.name] = rr
        if not a.robustness:
            del results["robustness"]
    if a.out:
        atomic_write_text(a.out, json.dumps(results, indent=2, ensure_ascii=False))
        print(f"\nresults written to {a.out}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ bench
def _cmd_bench(sub) -> None:
    p = _parser(
        sub,
        "bench",
        "speed of a checkpoint: prefill/decode tokens/s, time to first token, memory, roofline",
        [
            "lmforge bench runs/quickstart/final",
            "lmforge bench ckpt --batch-sizes 1,8,32 --prompt-len 512 --new-tokens 128 --json",
            "lmforge bench ckpt --dtype bf16 --out bench.json",
            "lmforge bench ckpt --quick",
        ],
        description="Benchmark a checkpoint through the inference engine at several batch sizes: "
        "prefill and decode tokens/s, time to first token, peak memory, size on disk, and "
        "the share of the memory-bandwidth roofline decode reaches (bandwidth measured in "
        "the same run; a decode step reads the weights plus the KV cache). On GPU also the "
        "prefill MFU against the measured matmul peak.",
    )
    _add_checkpoint(p)
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default: 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default: 64)")
    p.add_argument(
        "--mfu",
        choices=["on", "off", "auto"],
        default="auto",
        help="measure the matmul peak and report prefill MFU (default auto: on GPU only)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes (batch 1 and 2, 16 + 8 tokens): a smoke test"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--out", default=None, help="also write the result to this JSON file")
    _add_device_args(p)
    p.set_defaults(func=_run_bench)


def _run_bench(a) -> None:
    import json

    from lmforge.evaluate.bench import bench_lm, format_bench
    from lmforge.utils import UserError, atomic_write_text

    try:
        sizes = tuple(int(b) for b in a.batch_sizes.split(",") if b.strip())
    except ValueError as e:
        raise UserError(
            f"--batch-sizes {a.batch_sizes!r}: expected comma-separated integers, e.g. 1,8,32"
        ) from e
    if not sizes or min(sizes) < 1:
        raise UserError("--batch-sizes: give at least one batch size >= 1")
    r = bench_lm(
        a.checkpoint,
        batch_sizes=sizes,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        quick=a.quick,
        device=a.device,
        dtype=a.dtype,
        mfu={"on": True, "off": False}.get(a.mfu),
        verbose=not a.json,
    )
    print(json.dumps(r, indent=2) if a.json else format_bench(r))
    if a.out:
        atomic_write_text(a.out, json.dumps(r, indent=2))


# ----------------------------------------------------------------------------------------- report
def _cmd_report(sub) -> None:
    p = _parser(
        sub,
        "report",
        "compare variants of a model (fp32, bf16, quantized, pruned, ...) in a table and plots",
        [
            "lmforge report runs/q/final runs/q/bf16 runs/q/int8 --data python-docs --out runs/q/report",
            "lmforge report a b --names teacher,student --data runs/data --max-tokens 20000 --out cmp",
        ],
        description="Evaluate and benchmark each checkpoint on the same data (same documents, same token "
        "budget) and write report.md (size, parameters, bits per byte, perplexity, decode "
        "speed, memory), report.json and two plots: quality against size and quality "
        "against speed.",
    )
    p.add_argument("checkpoints", nargs="+", help="model directories to compare")
    p.add_argument(
        "--data",
        default="python-docs",
        help="a `data prepare` directory or a source spec, as for evaluate (default: python-docs)",
    )
    p.add_argument("--split", default="val", help="val (default), train or all")
    p.add_argument("--max-tokens", type=int, default=50_000, help="tokens scored per model (default: 50000)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: each model's context)")
    _add_text_field(p)
    p.add_argument(
        "--val-fraction", type=float, default=0.02, help="share of documents held out (default: 0.02)"
    )
    p.add_argument(
        "--names", default=None, help="comma-separated labels (default: the shortest unique path ends)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=32, help="tokens decoded for the speed column (default: 32)"
    )
    p.add_argument("--out", required=True, help="directory for report.md, report.json and the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    _add_device_args(p)
    p.set_defaults(func=_run_report)


def _run_report(a) -> None:
    from pathlib import Path

    from lmforge.evaluate.report import compare_checkpoints

    r = compare_checkpoints(
        a.checkpoints,
        a.data,
        a.out,
        names=a.names.split(",") if a.names else None,
        split=a.split,
        max_tokens=a.max_tokens,
        seq_len=a.seq_len,
        text_field=a.text_field,
        val_fraction=a.val_fraction,
        new_tokens=a.new_tokens,
        device=a.device,
        dtype=a.dtype,
        progress=not a.no_progress,
    )
    print((Path(a.out) / "report.md").read_text())
    print(f"written: {a.out}/report.md, report.json, " + ", ".join(r["plots"]), file=sys.stderr)


# ---------------------------------------------------------------------------------------- inspect
def _cmd_inspect(sub) -> None:
    p = _parser(
        sub,
        "inspect",
        "see what a model does with a prompt: per-token loss, attention maps, next tokens, RoPE",
        [
            "lmforge inspect runs/quickstart/final --prompt 'def add(a, b):' --out runs/inspect",
            "lmforge inspect ckpt --prompt 'The capital of France is' --layers 0,5 --top-k 20 --out pics",
        ],
        description="Run a prompt through the model and write pictures: token_loss.png (which tokens "
        "surprised the model), attention_layer_NN.png (attention probabilities of every head), "
        "next_token.png (top next-token candidates), rope.png (RoPE frequency tables), plus "
        "inspect.json with the numbers.",
    )
    _add_checkpoint(p, " with a tokenizer")
    p.add_argument("--prompt", required=True, help="the text to look at ('-' reads standard input)")
    p.add_argument("--out", required=True, help="directory for the PNGs and inspect.json")
    p.add_argument(
        "--layers", default=None, help="comma-separated layers to draw attention for (default: all)"
    )
    p.add_argument("--top-k", type=int, default=10, help="next-token candidates to show (default: 10)")
    _add_device_args(p)
    p.set_defaults(func=_run_inspect)


def _run_inspect(a) -> None:
    from lmforge.evaluate.inspect import inspect_prompt
    from lmforge.utils import UserError

    try:
        layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    except ValueError as e:
        raise UserError(f"--layers {a.layers!r}: expected comma-separated layer numbers, e.g. 0,3") from e
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    r = inspect_prompt(
        a.checkpoint, prompt, a.out, top_k=a.top_k, layers=layers, device=a.device, dtype=a.dtype
    )
    print(
        f"{len(r['ids'])} tokens, mean loss {r['mean_loss_bits'] or float('nan'):.2f} bits/token; next: "
        + ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in r["next_tokens"][:5])
    )
    print(f"written to {a.out}: " + ", ".join(r["files"]) + ", inspect.json")


# ------------------------------------------------------------------------------------- compress
def _add_eval_args(p) -> None:
    p.add_argument(
        "--eval-data",
        default="python-docs",
        help="source (or `data prepare` directory) whose validation split gives bits per byte before and "
        "after (default: python-docs)",
    )
    p.add_argument(
        "--eval-tokens", type=int, default=20_000, help="tokens scored for bits per byte (default: 20000)"
    )
    p.add_argument(
        "--no-eval", action="store_true", help="skip the before/after evaluation and speed test (size only)"
    )


def _eval_kwargs(a) -> dict:
    return {"eval_data": None if a.no_eval else a.eval_data, "eval_tokens": a.eval_tokens}


def _add_compress_args(p, result: str, work: str) -> None:
    """--out, --device and the before/after evaluation, as quantize and prune take them."""
    p.add_argument("--out", required=True, help=f"directory for the {result} checkpoint")
    p.add_argument("--device", default="auto", help=f"cuda, cpu or auto (where {work} and the checks run)")
    _add_eval_args(p)


def _cmd_quantize(sub) -> None:
    p = _parser(
        sub,
        "quantize",
        "weight-only int8 / int4 quantization: a smaller checkpoint that loads and runs everywhere",
        [
            "lmforge quantize runs/tiny/final --method int8 --out runs/tiny-int8",
            "lmforge quantize runs/tiny/final --method int4 --group-size 64 --out runs/tiny-int4",
            "lmforge quantize runs/tiny/final --method int4 --calibration-data python-docs --out runs/tiny-gptq",
            "lmforge quantize ckpt --method int8 --keep-float embeddings,lm_head --out ckpt-int8-linear",
            "lmforge report runs/tiny/final runs/tiny-int8 runs/tiny-int4 --out runs/q-report",
        ],
        description="Quantize the linear layers of every block (and the output projection, when it is not "
        "tied) to int8 (per output channel, symmetric) or int4 (groups of --group-size inputs, a scale and a "
        "zero per group, two codes per byte), and the embedding table to int8 rows. Round to nearest, or "
        "GPTQ with --calibration-data. The result is a checkpoint directory (config.json records "
        "quantization_config) that generate, chat, evaluate, bench, report and serve load directly; on CPU "
        "and CUDA it runs on PyTorch's int8/int4 matmul kernels. Ends with size, bits per byte and decode "
        "speed before and after. See docs/compression.md.",
    )
    _add_checkpoint(p, " (float weights)")
    p.add_argument("--method", required=True, choices=["int8", "int4"], help="int8 or int4 weights")
    p.add_argument(
        "--group-size",
        type=int,
        default=64,
        choices=[32, 64, 128, 256],
        help="int4: inputs per (scale, zero) group; smaller is more accurate and larger (default: 64)",
    )
    p.add_argument(
        "--calibration-data",
        default=None,
        help="a source (e.g. python-docs) or `data prepare` directory: refine the rounding with GPTQ on "
        "its training split (default: none, round to nearest)",
    )
    p.add_argument(
        "--calibration-samples", type=int, default=128, help="GPTQ: sequences to calibrate on (default: 128)"
    )
    p.add_argument(
        "--calibration-seq-len", type=int, default=256, help="GPTQ: tokens per sequence (default: 256)"
    )
    p.add_argument(
        "--keep-float",
        default="",
        help="comma-separated parts to leave in float: embeddings (the token table, and a tied output "
        "projection), lm_head (an untied output projection) (default: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for picking calibration sequences (default: 0)")
    _add_compress_args(p, "quantized", "quantizing")
    p.set_defaults(func=_run_quantize)


def _run_quantize(a) -> None:
    from lmforge.compress.quantize import quantize

    quantize(
        a.checkpoint,
        a.out,
        a.method,
        a.group_size,
        keep_float=tuple(x.strip() for x in a.keep_float.split(",") if x.strip()),
        calibration_data=a.calibration_data,
        calibration_samples=a.calibration_samples,
        calibration_seq_len=a.calibration_seq_len,
        seed=a.seed,
        **_eval_kwargs(a),
        device=a.device,
    )


def _cmd_prune(sub) -> None:
    p = _parser(
        sub,
        "prune",
        "remove weights (unstructured, 2:4) or whole heads / FFN channels, optionally recover by fine-tuning",
        [
            "lmforge prune runs/tiny/final --method magnitude --sparsity 0.5 --out runs/tiny-50",
            "lmforge prune runs/tiny/final --method wanda --structure 2:4 --out runs/tiny-24",
            "lmforge prune runs/tiny/final --method wanda --structure ffn --sparsity 0.25 --out runs/tiny-ffn",
            "lmforge prune runs/tiny/final --structure heads --sparsity 0.25 --recover-steps 200 "
            "--data runs/data --out runs/tiny-heads",
        ],
        description="Unstructured and 2:4 pruning zero weights of the block linear layers (masks; the "
        "checkpoint stays dense, with zeros). Structured pruning removes whole KV groups of attention heads "
        "or FFN channels and writes a physically smaller Hugging Face model (n_heads, n_kv_heads or d_ff "
        "changed in config.json). Importance is |W| (magnitude) or |W| x ||X|| over calibration "
        "activations (wanda). --recover-steps fine-tunes the result through the training loop, keeping "
        "pruned weights at zero. Ends with size, bits per byte and decode speed before and after.",
    )
    _add_checkpoint(p)
    p.add_argument(
        "--method",
        default="magnitude",
        choices=["magnitude", "wanda"],
        help="importance score: |W| (magnitude) or |W| x input-activation norm (wanda) (default: magnitude)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="fraction to remove: of each row's weights (unstructured), of the KV head groups (heads), "
        "of the FFN channels (ffn); ignored for 2:4, which is always 50%% (default: 0.5)",
    )
    p.add_argument(
        "--structure",
        default="unstructured",
        choices=["unstructured", "2:4", "heads", "ffn"],
        help="what is removed (default: unstructured)",
    )
    p.add_argument(
        "--calibration-data",
        default="python-docs",
        help="wanda: source or `data prepare` directory for the activations (training split) "
        "(default: python-docs)",
    )
    p.add_argument(
        "--calibration-samples", type=int, default=128, help="wanda: sequences to calibrate on (default: 128)"
    )
    p.add_argument(
        "--recover-steps", type=int, default=0, help="fine-tune this many steps after pruning (default: 0)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="recovery data: a `data prepare` directory, or a source (prepared with the model's tokenizer)",
    )
    p.add_argument(
        "--recover-lr",
        type=float,
        default=1e-4,
        help="recovery peak learning rate; about the end of pretraining's schedule (default: 1e-4)",
    )
    p.add_argument(
        "--recover-batch-size", type=int, default=8, help="recovery sequences per step (default: 8)"
    )
    p.add_argument(
        "--recover-seq-len", type=int, default=256, help="recovery tokens per sequence (default: 256)"
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="run directory of the recovery (metrics, checkpoints) (default: <out>-recovery next to --out)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for calibration and recovery (default: 0)")
    _add_compress_args(p, "pruned", "pruning")
    p.set_defaults(func=_run_prune)


def _run_prune(a) -> None:
    from lmforge.compress.prune import prune

    prune(
        a.checkpoint,
        a.out,
        method=a.method,
        sparsity=a.sparsity,
        structure=a.structure,
        calibration_data=a.calibration_data,
        calibration_samples=a.calibration_samples,
        recover_steps=a.recover_steps,
        data=a.data,
        recover_lr=a.recover_lr,
        recover_batch_size=a.recover_batch_size,
        recover_seq_len=a.recover_seq_len,
        run_dir=a.run_dir,
        seed=a.seed,
        **_eval_kwargs(a),
        device=a.device,
    )


def _cmd_distill(sub) -> None:
    from lmforge.train.config import add_config_arguments

    help = "train a student model on a teacher's predictions (knowledge distillation)"
    p = _parser(
        sub,
        "distill",
        help,
        [
            "lmforge distill --teacher runs/tiny/final --student debug --data python-docs --train.max_steps 500",
            "lmforge distill --teacher runs/tiny/final --student llama:debug --data runs/data --alpha 0.9 -T 4",
            "lmforge distill --teacher big/final --student small/final --data runs/data --config configs/tiny-cpu.yaml",
            "lmforge distill --teacher runs/tiny/final --student debug --data runs/data --resume auto",
        ],
        description=f"{help}. The student learns from alpha * T^2 * KL(teacher_T || student_T) + "
        "(1 - alpha) * cross-entropy on the data, where _T means softmax(logits / T), through the training "
        "loop: every training option below works (checkpoints, --resume, logging, torchrun). Teacher and "
        "student must share the tokenizer. Ends with size, bits per byte and decode speed of teacher and "
        f"student.\n\n{_TRAIN_HELP}",
    )
    p.usage = "lmforge distill --teacher CKPT --student PRESET|CKPT --data DATA [--section.option VALUE ...]"
    d = p.add_argument_group("distillation")
    d.add_argument("--teacher", required=True, help="the teacher checkpoint directory (with its tokenizer)")
    d.add_argument(
        "--student",
        required=True,
        help="a checkpoint directory to start from, or a preset size (debug, tiny, small, ...) optionally "
        "with a family (llama:debug); a preset takes the teacher's family and vocabulary",
    )
    d.add_argument(
        "--data",
        default=None,
        help="a `data prepare` directory tokenized with the teacher's tokenizer, or a source such as "
        "python-docs (prepared into the run directory) (default: --data.path)",
    )
    d.add_argument(
        "-T", "--temperature", type=float, default=2.0, help="softmax temperature of both models (default: 2)"
    )
    d.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="weight of the distillation term; 1 - alpha goes to the next-token loss (default: 0.5)",
    )
    _add_eval_args(d)
    add_config_arguments(p, skip=("task",))
    p.set_defaults(func=_run_distill)


def _run_distill(a) -> None:
    from lmforge.compress.distill import distill
    from lmforge.train.config import overrides_from_args

    summary = distill(
        a.teacher,
        a.student,
        a.data,
        temperature=a.temperature,
        alpha=a.alpha,
        config=a.config,
        overrides=overrides_from_args(a),
        **_eval_kwargs(a),
    )
    _exit_if_stopped(summary)


# ---------------------------------------------------------------------------------------- export
def _cmd_export(sub) -> None:
    p = _parser(
        sub,
        "export",
        "export a checkpoint to ONNX (onnxruntime), GGUF (llama.cpp) or Ollama",
        [
            "lmforge export runs/quickstart/final --format onnx --with-cache",
            "lmforge export runs/quickstart/final --format gguf --dtype q8_0 --out model-q8.gguf",
            "lmforge export runs/quickstart/final --format ollama --out my-model",
            "ollama create my-model -f my-model/Modelfile",
        ],
        description="Export a checkpoint directory. onnx writes a directory with model.onnx (input_ids + "
        "attention_mask -> logits) and, with --with-cache, model_with_past.onnx (a KV-cache decoder step), "
        "checked against PyTorch in onnxruntime before it is kept. gguf writes one llama.cpp file (every "
        "family but original GPT) with the tokenizer and chat template, or a LoRA adapter GGUF when "
        "CHECKPOINT is an adapter directory. ollama writes a directory with the GGUF file(s) and a "
        "Modelfile. Output is written atomically. See docs/export.md.",
    )
    _add_checkpoint(p)
    p.add_argument("--format", required=True, choices=["onnx", "gguf", "ollama"], help="what to write")
    p.add_argument(
        "--out",
        default=None,
        help="output path (default: next to the checkpoint: <ckpt>-onnx/, <ckpt>-<dtype>.gguf, <ckpt>-ollama/)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=[
            "f32",
            "f16",
            "bf16",
            "q8_0",
            "q4_0",
            "q4_1",
            "q5_0",
            "q5_1",
            "q2_k",
            "q3_k_m",
            "q4_k_s",
            "q4_k_m",
            "q5_k_s",
            "q5_k_m",
            "q6_k",
        ],
        help="GGUF/Ollama weight type (default f16; norms and biases stay f32): f32, f16, bf16, q8_0, or "
        "llama.cpp's own quantizer types q4_0 ... q6_k (q4_k_m is Ollama's default; k-quants want widths "
        "that are multiples of 256, else llama.cpp falls back to 32-blocks); ONNX is always f32",
    )
    p.add_argument(
        "--with-cache",
        action="store_true",
        help="ONNX: also export model_with_past.onnx, a decoder step with past_key_values.N.key/value "
        "inputs and present.N.key/value outputs",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (>= 17, default 18)")
    p.add_argument(
        "--base",
        default=None,
        help="LoRA adapter exports (CHECKPOINT is an adapter directory, PEFT or lmforge): the base model "
        "directory (default: the one the adapter names); gguf writes a llama.cpp LoRA adapter (f32 unless "
        "--dtype f16/bf16), ollama the base GGUF + adapter GGUF + a Modelfile with ADAPTER",
    )
    p.add_argument(
        "--no-check", action="store_true", help="ONNX: skip comparing onnxruntime's logits with PyTorch's"
    )
    p.set_defaults(func=_run_export)


def _run_export(a) -> None:
    from lmforge.export import export
    from lmforge.train.lora import is_adapter
    from lmforge.utils import UserError, dir_size, human_bytes

    if is_adapter(a.checkpoint):  # a LoRA adapter: llama.cpp's adapter GGUF (gguf_lora.py)
        _run_export_lora(a)
        return
    if a.base is not None:
        raise UserError(f"--base is for LoRA adapter exports; {a.checkpoint} is not an adapter directory")
    out = export(
        a.checkpoint,
        a.format,
        a.out,
        dtype=a.dtype,
        with_cache=a.with_cache,
        opset=a.opset,
        check=not a.no_check,
    )
    print(f"wrote {out} ({human_bytes(dir_size(out))})")
    if a.format == "onnx" and not a.no_check:
        import json

        from lmforge.export.onnx import MANIFEST

        errors = json.loads((out / MANIFEST).read_text())["check"]["max_relative_logit_error"]
        print(
            "checked in onnxruntime: " + ", ".join(f"{k} max logit error {v:.1e}" for k, v in errors.items())
        )
    elif a.format == "ollama":
        print(f"next: ollama create {out.name} -f {out / 'Modelfile'}")


def _run_export_lora(a) -> None:
    from lmforge.export import default_out
    from lmforge.export.gguf_lora import export_lora_gguf, export_ollama_lora
    from lmforge.utils import UserError, dir_size, human_bytes

    if a.format == "onnx":
        raise UserError(
            f"{a.checkpoint} is a LoRA adapter; merge it first (lmforge merge-lora {a.checkpoint} --out "
            "merged) and export the merged model to ONNX"
        )
    if a.format == "gguf":
        dtype = a.dtype or "f32"
        out = export_lora_gguf(a.checkpoint, a.out or default_out(a.checkpoint, "gguf", dtype), dtype, a.base)
        print(f"wrote {out} ({human_bytes(dir_size(out))}); use: llama-cli -m BASE.gguf --lora {out}")
    else:
        out = a.out or default_out(a.checkpoint, "ollama")
        out = export_ollama_lora(a.checkpoint, out, a.dtype or "f16", a.base)
        print(f"wrote {out} ({human_bytes(dir_size(out))})")
        print(f"next: ollama create {out.name} -f {out / 'Modelfile'}")


# ------------------------------------------------------------------------------------------ serve
def _cmd_serve(sub) -> None:
    p = _parser(
        sub,
        "serve",
        "serve a checkpoint over an OpenAI-compatible HTTP API with a web chat page",
        [
            "lmforge serve runs/quickstart/final",
            'lmforge serve runs/sft/final --port 8080 --api-key "$(cat key.txt)" --max-batch 16',
            "lmforge serve base/ --lora reverse=runs/sft-lora/final --lora poet=runs/poet-lora/final",
            "lmforge serve ckpt --host 0.0.0.0 --cors-origins https://example.com --model-name tiny",
            "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
            '-d \'{"messages": [{"role": "user", "content": "hi"}]}\'',
        ],
        description="Serve a checkpoint with FastAPI + uvicorn: /v1/models, /v1/completions and "
        "/v1/chat/completions (streaming as Server-Sent Events, as OpenAI clients expect), /tokenize, "
        "/detokenize, /health, /metrics (Prometheus) and a web chat page at /. Requests are decoded "
        "together by continuous batching. SIGINT/SIGTERM stops taking requests and lets the running ones "
        "finish. See docs/serving.md.",
    )
    _add_checkpoint(p, " with a tokenizer")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health and the page "
        "(default: the LMFORGE_API_KEY environment variable; unset = no key)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="rows decoded together per model: the most concurrent sequences (default: 8)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a free row; more are refused with 429 (default: 256)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="KV-cache slots per row: the most tokens (prompt + output) one request may hold "
        "(default: what --kv-cache-memory allows, up to the model's context)",
    )
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        metavar="SIZE",
        help="memory for the KV cache of each model: a size (2GiB, 512MB) or a fraction of the free "
        "memory (0.5) (default: a budget that fits the machine; startup prints what was allocated)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not reuse the KV cache of prompt prefixes seen recently (shared system prompts, earlier "
        "turns of a conversation); default: reuse them",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default: 5)",
    )
    p.add_argument(
        "--timeout-header",
        type=float,
        default=10.0,
        help="seconds a client has to send a request's headers once connected (default: 10)",
    )
    p.add_argument(
        "--timeout-body",
        type=float,
        default=30.0,
        help="seconds a client may pause while sending a request body before a 408 (default: 30)",
    )
    p.add_argument(
        "--cors-origins",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from this origin (comma-separated or repeated; '*' for any)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve a LoRA adapter of this checkpoint as model NAME (repeatable; each "
        "costs a merged copy of the weights and its own KV cache)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="model id of the checkpoint in the API (default: the directory's name)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let running requests finish on shutdown (default: 30)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default: info)",
    )
    _add_device_args(p)
    p.set_defaults(func=_run_serve)


def _run_serve(a) -> None:
    import os

    from lmforge.serve import serve
    from lmforge.utils import UserError

    loras = []
    for spec in a.lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora {spec!r}: expected NAME=DIR, e.g. --lora reverse=runs/sft-lora/final")
        loras.append((name, path))
    if not 0 < a.port < 65536:
        raise UserError(f"--port {a.port}: must be in 1..65535")
    origins = [o.strip() for spec in a.cors_origins for o in spec.split(",") if o.strip()]
    serve(
        a.checkpoint,
        host=a.host,
        port=a.port,
        api_key=a.api_key or os.environ.get("LMFORGE_API_KEY") or None,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        cors_origins=origins,
        loras=loras,
        device=a.device,
        dtype=a.dtype,
        model_name=a.model_name,
        drain_timeout=a.drain_timeout,
        log_level=a.log_level,
        max_len=a.max_len,
        kv_cache_memory=a.kv_cache_memory,
        prefix_cache=not a.no_prefix_cache,
        keep_alive_timeout=a.timeout_keep_alive,
        header_timeout=a.timeout_header,
        body_timeout=a.timeout_body,
    )


COMMANDS = [
    _cmd_quickstart,
    _cmd_tokenizer,
    _cmd_data,
    _cmd_pretrain,
    _cmd_finetune,
    _cmd_merge_lora,
    _cmd_generate,
    _cmd_chat,
    _cmd_evaluate,
    _cmd_bench,
    _cmd_report,
    _cmd_inspect,
    _cmd_quantize,
    _cmd_prune,
    _cmd_distill,
    _cmd_export,
    _cmd_serve,
    _cmd_info,
]


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
