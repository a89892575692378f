"""The one rule for every command that writes: nothing of the user's is replaced by surprise.

Every writing command calls `check_output` first, before any work. An existing `--out` is refused with
one line that names it, what it holds, and the flag that allows replacing it, when it holds something of
another kind (or files lmforge does not recognise), or a finished output of the command's own kind that
the command does not regenerate by design. A command never writes into (or over, or around) one of its
own inputs: no flag allows that, since the write would destroy what it is reading (a LoRA merge into its
own base applies the update twice on the next merge).

Kinds are recognised by the files that define them, the same tests the readers use (checkpoint.py's
config.json + safetensors, data/prepare.py's meta.json format, a run's config.yaml). This module
imports only the standard library and lmforge.utils, so data/, train/ and export/ can all use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from lmforge.utils import UserError

DATA_FORMAT = "lmforge-tokens"  # data/prepare.py's FORMAT (not imported: prepare.py imports this module)
FILE_KINDS = ("gguf", "file")
DESCRIPTIONS = {
    "model": "a model directory (config.json + weights)",
    "adapter": "a LoRA adapter (adapter_config.json)",
    "tokenizer": "a tokenizer (tokenizer.json)",
    "data": "a data preparation (meta.json)",
    "run": "a run directory (config.yaml)",
    "onnx": "an ONNX export",
    "ollama": "an Ollama export (Modelfile)",
    "gguf": "a GGUF file",
    "file": "a file",
    "other": "files lmforge did not write",
}
KINDS = tuple(k for k in DESCRIPTIONS if k != "other")


def _visible(d: Path) -> list[Path]:
    # Dotfiles (.DS_Store, our own temporaries) do not make a directory someone's output.
    return [p for p in d.iterdir() if not p.name.startswith(".")]


def _is_data(d: Path) -> bool:
    try:
        return json.loads((d / "meta.json").read_text()).get("format") == DATA_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def output_kind(path: str | os.PathLike) -> str | None:
    """What `path` holds: one of KINDS, "other" (files of no known kind), or None (absent or empty)."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            return "gguf" if f.read(4) == b"GGUF" else "file"
    if not p.is_dir():
        return None if not p.exists() else "other"
    names = {c.name for c in _visible(p)}
    if not names:
        return None
    if "adapter_config.json" in names:
        return "adapter"
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return "model"
    if "meta.json" in names and _is_data(p):
        return "data"
    if "config.yaml" in names and names & {"metrics.jsonl", "checkpoints", "final"}:
        return "run"
    if "Modelfile" in names:
        return "ollama"
    if any(n.endswith(".onnx") for n in names):
        return "onnx"
    if "tokenizer.json" in names and "config.json" not in names:
        return "tokenizer"
    return "other"


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def check_writable(p: Path, option: str) -> None:
    """A read-only file system or a folder this user cannot write fails now, not after the work; the
    nearest existing folder tells, so that nothing is created to find out."""
    d = p.absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        d = d.parent
    if os.access(d, os.W_OK | os.X_OK):
        return
    ro = hasattr(os, "ST_RDONLY") and os.statvfs(d).f_flag & os.ST_RDONLY
    why = "on a read-only file system" if ro else "not writable by this user"
    raise UserError(f"cannot write {option} {p}: {d} is {why}; choose another {option}")


def check_not_input(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str = "--out"
) -> None:
    """UserError when `out` is, contains, or lies inside one of `inputs` (the part of check_output that
    no flag allows; for commands whose output's kind is checked elsewhere, such as a run directory)."""
    rp = Path(out).resolve()
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        rel = _relation(rp, Path(inp).resolve())
        if rel is not None:
            raise UserError(
                f"{option} {out} {rel} the input {inp}; a command never writes into what it reads: "
                f"choose another {option}"
            )


def check_output(
    out: str | os.PathLike,
    kind: str,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    same_kind_ok: bool = False,
    flag: str = "--force",
    option: str = "--out",
) -> Path:
    """Refuse (UserError, one line) to write `kind` at `out` where that would lose something; return Path(out).

    inputs: paths the command reads (None and non-existent entries, such as a source name, are skipped);
        `out` may not be, contain, or lie inside any of them, whatever `force` says.
    same_kind_ok: an existing output of `kind` is fine (the command regenerates it, or has its own reuse
        or resume logic); otherwise it too needs `force`.
    flag, option: how the message names the flag that allows the replacement and the path's option.
    """
    if kind not in KINDS:
        raise ValueError(f"check_output: unknown kind {kind!r}; one of {', '.join(KINDS)}")
    p = Path(out)
    where = f"{option} {p}"
    check_not_input(p, inputs, option)
    check_writable(p, option)
    have = output_kind(p)
    if have is None:
        return p
    want_file = kind in FILE_KINDS
    if p.is_dir() and want_file:
        raise UserError(f"{where}: is a directory; give a file path")
    if not p.is_dir() and not want_file:
        raise UserError(f"{where}: is a file; give a directory")
    if force or (have == kind and same_kind_ok):
        return p
    place = "file" if want_file else "or empty folder"
    if have == kind:
        raise UserError(
            f"{where}: already holds {DESCRIPTIONS[have]}; choose a new {place}, or pass {flag} to replace it"
        )
    holds = f"{DESCRIPTIONS[have]}, not" if have != "other" else "files that are not"
    raise UserError(
        f"{where}: holds {holds} {DESCRIPTIONS[kind]}; choose a new {place}, or pass {flag} to replace it"
    )
