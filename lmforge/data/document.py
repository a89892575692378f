"""A document and its content hash: what every source yields, and how duplicates and the split are decided.

Both `sources` (files, folders, the hub) and `pydocs` (the built-in Python documentation) yield
`Document`s; `prepare` and `evaluate` key duplicate removal and the train/val split on `doc_digest`,
so a document lands in the same split whichever path reads it.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple


class Document(NamedTuple):
    text: str
    id: str


def doc_digest(text: str | bytes) -> bytes:
    """16-byte content hash of a document: bytes 0-7 key exact-duplicate removal, 8-15 the split."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.blake2b(data, digest_size=16).digest()


def is_validation(digest: bytes, val_fraction: float) -> bool:
    """The split depends on content only, so it is the same on every run and every machine."""
    return int.from_bytes(digest[8:16], "little") < val_fraction * 2.0**64
