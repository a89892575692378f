"""The embedded corpus `python-stdlib`: the source code of the standard library every CPython ships.

One document per module file (`Lib/**/*.py`, the text as it is), read from the running interpreter's
own `Lib` folder in a second or two with no network, then cached like python-docs
(`$LMFORGE_CACHE/python-stdlib/<python>/`). 8.9 MB in 584 files for CPython 3.11.7, nearly four times
python-docs, so a quickstart's model sees new text instead of the same docs again and again.
The code is the Python Software Foundation's, under the PSF License Agreement (the interpreter's
`LICENSE.txt`, recorded in `meta.json`); what a user trains on it stays theirs to judge.

Left out, so that the corpus is code written by people and python-docs' validation split stays held out:
- the test suites (`test/`, `tests/`, `idle_test/`), `site-packages/` (not the standard library), build
  leftovers (`lib-dynload/`, `config-*/`, `_sysconfigdata_*.py`), the codec tables of `encodings/`
  (generated hex tables, not code);
- `pydoc_data/`: its `topics.py` is python-docs' help topics verbatim;
- every file that shares a line (32 characters or more, stripped) with a document of python-docs'
  validation split: the standard library's docstrings *are* python-docs' module and class documents,
  so training on `inspect.py` would be training on the yardstick (22 files for CPython 3.11.7).
The walk is sorted and the split (2% of files) is fixed by each file's content hash, as for every source.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.document import Document
from lmforge.data.pydocs import (
    corpus_dir,
    is_built,
    iter_python_docs,
    python_docs_meta,
    read_corpus,
    write_corpus,
)
from lmforge.utils import UserError

BUILDER_VERSION = 1  # bump when the selection changes, so old caches are not reused
SKIP_DIRS = {
    "site-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload", "pydoc_data", "encodings",
}  # fmt: skip
MIN_SHARED_LINE = 32  # a line this long that a validation document also has is no coincidence


def stdlib_root() -> Path:
    """The interpreter's `Lib` folder (where `os.py` lives)."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_stdlib_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return corpus_dir("python-stdlib", BUILDER_VERSION, cache_dir)


def _source_files(root: Path) -> list[Path]:
    files = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("_sysconfigdata"):
            continue
        files.append(f)
    return files


def _held_out_lines() -> set[str]:
    """The long lines of python-docs' validation documents: text the stdlib must not train on."""
    return {
        s
        for doc in iter_python_docs("val")
        for line in doc.text.splitlines()
        if len(s := line.strip()) >= MIN_SHARED_LINE
    }


def build_python_stdlib(
    cache_dir: str | os.PathLike | None = None, *, force: bool = False, verbose: bool = True
) -> Path:
    """Build the corpus (or reuse the cached one) and return its directory (`documents.jsonl`, `meta.json`)."""
    out = python_stdlib_dir(cache_dir)
    if is_built(out) and not force:
        return out
    t0 = time.perf_counter()
    root = stdlib_root()
    files = _source_files(root)
    if not files:
        raise UserError(
            f"python-stdlib: no standard-library sources under {root} (this Python ships without them); "
            "use --data python-docs instead."
        )
    held_out = _held_out_lines()
    records, unreadable, overlapping = [], [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            unreadable.append(rel)  # a few legacy modules are Latin-1
            continue
        if any(line.strip() in held_out for line in text.splitlines()):
            overlapping.append(rel)
            continue
        if text.strip():
            records.append({"id": f"Lib/{rel}", "text": text})
    licence = root / "LICENSE.txt"
    meta = write_corpus(
        out,
        records,
        {
            "corpus": "python-stdlib",
            "builder_version": BUILDER_VERSION,
            "licence": "PSF License Agreement" + (f" ({licence})" if licence.is_file() else ""),
            "left_out_unreadable": unreadable,
            "left_out_sharing_python_docs_validation_text": overlapping,
            "python_docs_sha256": python_docs_meta()["sha256"],
        },
        t0,
    )
    if verbose:
        print(
            f"built python-stdlib: {len(records)} files, {meta['bytes'] / 1e6:.2f} MB (validation "
            f"{meta['val_documents']} files; {len(overlapping)} left out for sharing text with python-docs' "
            f"validation split) in {meta['build_seconds']:.1f}s -> {out}",
            file=sys.stderr,
        )
    return out


def python_stdlib_meta(cache_dir: str | os.PathLike | None = None) -> dict:
    return json.loads((build_python_stdlib(cache_dir) / "meta.json").read_text())


def iter_python_stdlib(
    split: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Iterator[Document]:
    """The corpus's files in their fixed order; `split` = "train" or "val" keeps one side."""
    return read_corpus(build_python_stdlib(cache_dir), split, "python-stdlib")
