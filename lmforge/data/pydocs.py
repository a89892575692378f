"""The embedded corpus `python-docs`: the English documentation that ships with every CPython.

It is the `pydoc_data.topics` help topics (the language reference as `help()` shows it) plus the
docstrings of the standard library's modules, classes and functions, built on the user's machine
in a couple of seconds with no network, then cached (`$LMFORGE_CACHE/python-docs/<python>/`,
default `~/.cache/lmforge`). About 2.5 MB of text in ~2,000 documents (one per topic, module and
class) for CPython 3.11; the figure is printed when it is built.

Importing modules is how one gets their docstrings, and imports can hang, print, open windows or
crash, so the walk runs in a separate interpreter (`_pydocs_worker.py`, `python -I -S`: standard
library only) under a timeout; a module that kills or stalls it is skipped and the build restarts.
The walk is sorted, so the corpus is the same on every run of the same Python.
The validation split (2% of documents) is fixed by each document's content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.document import Document, doc_digest, is_validation
from lmforge.utils import UserError, atomic_dir

BUILDER_VERSION = 1  # bump when the extraction changes, so old caches are not reused
VAL_FRACTION = 0.02
WORKER = Path(__file__).with_name("_pydocs_worker.py")


def cache_root() -> Path:
    """`$LMFORGE_CACHE`, else `$XDG_CACHE_HOME/lmforge`, else `~/.cache/lmforge`."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmforge"


def corpus_dir(name: str, builder_version: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where an embedded corpus built by this Python (and this builder version) is cached."""
    tag = f"{platform.python_implementation().lower()}-{platform.python_version()}-v{builder_version}"
    return Path(cache_dir or cache_root() / name) / tag


def is_built(directory: Path) -> bool:
    return (directory / "meta.json").is_file() and (directory / "documents.jsonl").is_file()


def python_docs_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return corpus_dir("python-docs", BUILDER_VERSION, cache_dir)


def build_python_docs(
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    timeout: float = 120,
    verbose: bool = True,
) -> Path:
    """Build the corpus (or reuse the cached one) and return its directory.

    The directory holds `documents.jsonl` ({"id", "text"} per line) and `meta.json` (sizes, split,
    Python version, modules skipped, a content hash).
    """
    out = python_docs_dir(cache_dir)
    if is_built(out) and not force:
        return out
    t0 = time.perf_counter()
    skip: list[str] = []
    # The worker must not open windows or read a terminal, whatever the environment.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYTHONSTARTUP")}
    env["PYTHONWARNINGS"] = "ignore"
    with tempfile.TemporaryDirectory(prefix="lmforge-pydocs-") as tmp:
        raw = Path(tmp) / "raw.jsonl"
        for _ in range(8):
            try:
                subprocess.run(
                    [sys.executable, "-I", "-S", str(WORKER), str(raw), *skip],
                    cwd=tmp,  # anything a module writes to the working directory lands in tmp
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                pass
            records, culprit, done = _read_raw(raw)
            if done:
                break
            if culprit is None or culprit in skip:
                raise UserError(
                    "building python-docs failed before any module was read; check that "
                    f"`{sys.executable} -I -S -c 'import pydoc_data.topics'` works."
                )
            skip.append(culprit)  # the module being imported when the worker died or stalled
        else:
            raise UserError(f"building python-docs kept failing (skipped {', '.join(skip)}).")
        meta = write_corpus(
            out,
            records,
            {"corpus": "python-docs", "builder_version": BUILDER_VERSION, "skipped_modules": skip},
            t0,
        )
    if verbose:
        print(
            f"built python-docs: {len(records)} documents, {meta['bytes'] / 1e6:.2f} MB "
            f"(validation {meta['val_documents']} documents) in {meta['build_seconds']:.1f}s -> {out}",
            file=sys.stderr,
        )
    return out


def write_corpus(out: Path, records: list[dict], meta: dict, t0: float) -> dict:
    """Write `documents.jsonl` ({"id", "text"} per line, in order) and `meta.json` (sizes, the split,
    the Python, a content hash, plus `meta`) into `out` atomically; return the meta."""
    with atomic_dir(out) as d:
        digest = hashlib.sha256()
        n_bytes = n_val = val_bytes = 0
        with open(d / "documents.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                line = json.dumps(rec, ensure_ascii=False) + "\n"
                f.write(line)
                digest.update(line.encode("utf-8"))
                size = len(rec["text"].encode("utf-8"))
                n_bytes += size
                if is_validation(doc_digest(rec["text"]), VAL_FRACTION):
                    n_val += 1
                    val_bytes += size
        meta = {
            **meta,
            "python": sys.version,
            "documents": len(records),
            "bytes": n_bytes,
            "val_fraction": VAL_FRACTION,
            "val_documents": n_val,
            "val_bytes": val_bytes,
            "sha256": digest.hexdigest(),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (d / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def read_corpus(directory: Path, split: str | None, name: str) -> Iterator[Document]:
    """The documents of a built corpus in their fixed order; `split` = "train" or "val" keeps one side."""
    if split not in (None, "train", "val"):
        raise UserError(f"{name} split must be train or val, not {split!r}.")
    with open(directory / "documents.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if split is not None and is_validation(doc_digest(rec["text"]), VAL_FRACTION) != (split == "val"):
                continue
            yield Document(rec["text"], rec["id"])


def _read_raw(raw: Path) -> tuple[list[dict], str | None, bool]:
    """Documents written so far, the module last begun, and whether the walk finished."""
    records, culprit, done = [], None, False
    if not raw.is_file():
        return records, culprit, done
    with open(raw, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                break
            if "begin" in rec:
                culprit = rec["begin"]
            elif "done" in rec:
                done = True
            else:
                records.append(rec)
    return records, culprit, done


def python_docs_meta(cache_dir: str | os.PathLike | None = None) -> dict:
    return json.loads((build_python_docs(cache_dir) / "meta.json").read_text())


def iter_python_docs(
    split: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Iterator[Document]:
    """The corpus's documents in their fixed order; `split` = "train" or "val" keeps one side."""
    return read_corpus(build_python_docs(cache_dir), split, "python-docs")
