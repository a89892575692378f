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
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, the checkpoint's on GPU)")


# --------------------------------------------------------------------------------------------- info
def _cmd_info(sub) -> None:
    p = _parser(sub, "info", "describe a checkpoint: family, parameters, size, dtype, context, config",
                ["lmforge info runs/quickstart/final", "lmforge info ./my-hf-llama --json"])
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
    p = _parser(sub, "quickstart", "build a first model end to end on the embedded python-docs corpus",
                ["lmforge quickstart", "lmforge quickstart --fresh"])
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    _add_device_args(p)
    p.set_defaults(func=_run_quickstart)


def _run_quickstart(a) -> None:
    from lmforge.quickstart import quickstart

    quickstart(out=a.out, fresh=a.fresh, device=a.device, dtype=a.dtype)


# The order here is the order of `lmforge --help`.
COMMANDS = [_cmd_quickstart, _cmd_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description=textwrap.dedent(
            """\
            lmforge: build language models end to end on your own hardware.
            tokenizer -> data -> pretrain -> finetune -> generate -> compress -> evaluate -> export -> serve"""
        ),
        epilog=_examples("lmforge quickstart", "lmforge info runs/quickstart/final", "lmforge <command> --help"),
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
