"""The corpora built into lmforge, by the names `--data` takes; offline, built locally in seconds.

    python-docs    CPython's own documentation (help topics and docstrings), ~2.4 MB: pydocs.py
    python-stdlib  CPython's standard-library source code, ~12 MB: pystdlib.py
    embedded       both, python-docs first: the quickstart's default

Every consumer splits documents by content hash (`document.is_validation`), so python-docs' validation
split is the same documents whether it is read alone or inside `embedded`: the fixed yardstick.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

from lmforge.data.document import Document

PARTS = {"python-docs": ("python-docs",), "python-stdlib": ("python-stdlib",)}
PARTS["embedded"] = PARTS["python-docs"] + PARTS["python-stdlib"]
NAMES = tuple(PARTS)


def is_embedded(spec: str) -> bool:
    return spec in PARTS


def _one(name: str, split: str | None) -> Iterator[Document]:
    if name == "python-docs":
        from lmforge.data.pydocs import iter_python_docs

        return iter_python_docs(split)
    from lmforge.data.pystdlib import iter_python_stdlib

    return iter_python_stdlib(split)


def iter_embedded(spec: str, split: str | None = None) -> Iterator[Document]:
    """The documents of an embedded corpus (built on first use), in their fixed order."""
    return chain.from_iterable(_one(name, split) for name in PARTS[spec])


def identity(spec: str) -> dict[str, str]:
    """{corpus: content sha256} of each part: what a preparation of `spec` depends on."""
    from lmforge.data.pydocs import python_docs_meta
    from lmforge.data.pystdlib import python_stdlib_meta

    meta = {"python-docs": python_docs_meta, "python-stdlib": python_stdlib_meta}
    return {name: meta[name]()["sha256"] for name in PARTS[spec]}
