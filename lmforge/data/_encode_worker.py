"""Worker half of `data prepare`: tokenizes one chunk of documents into flat token arrays.

It imports only numpy and `tokenizers` (not torch, not the rest of lmforge), so that spawned worker
processes start in a fraction of a second and stay small. The same functions run in-process when
`workers=1`, which is what makes parallel output byte-identical to serial output.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from itertools import chain

import numpy as np

_STATE: dict = {}
# Characters of documents encoded in one call: the tokenizer's per-token bookkeeping (~130 bytes per
# byte of text) lives only until the ids are copied out, so a worker's memory follows this (or the
# longest document), not the size of the chunk it was sent.
BATCH_CHARS = 256 << 10


def init(
    json_text: str, bos_id: int | None, eos_id: int | None, single_thread: bool, spawned: bool = True
) -> None:
    """`single_thread`: encode on this thread only (a worker process per core, or `--workers 1`, which
    means one core). A spawned worker sets the switch for good; in the caller's own process it is set
    around each chunk only, so the caller's environment is left as it was."""
    if single_thread and spawned:
        # One process per core already; Rust's thread pool on top would oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE["sequential"] = single_thread and not spawned
    from tokenizers import Tokenizer

    tk = Tokenizer.from_str(json_text)
    # Documents are plain text: "<|user|>" written in a web page must not become a role marker.
    tk.encode_special_tokens = True
    _STATE["tk"] = tk
    _STATE["pre"] = [bos_id] if bos_id is not None else []
    # A tokenizer whose BOS is its EOS (GPT-2's <|endoftext|>) gets it once between documents.
    _STATE["post"] = [eos_id] if eos_id is not None and eos_id != bos_id else []


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (10^6 bytes). /proc's VmHWM, unlike ru_maxrss, is not
    inherited from the parent that spawned us, so it is the worker's own figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # the kernel's "kB" are KiB
    except OSError:
        pass
    try:
        import resource
        import sys

        return (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * (1 if sys.platform == "darwin" else 1024)
            / 1e6
        )
    except ImportError:  # Windows
        return 0.0


@contextmanager
def _sequential():
    """tokenizers reads TOKENIZERS_PARALLELISM at every batch call: false keeps it on this thread."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _batches(texts: list[str]):
    """Consecutive runs of `texts` of about BATCH_CHARS (a longer document is a run of its own)."""
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= BATCH_CHARS:
            yield texts[start : i + 1]
            start, size = i + 1, 0
    if start < len(texts):
        yield texts[start:]


def encode_chunk(
    texts_by_split: tuple[list[str], ...], dtype: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Per split: (flat tokens, per-document lengths), each document as [BOS] ids [EOS]; and peak RSS."""
    tk, pre, post = _STATE["tk"], _STATE["pre"], _STATE["post"]
    encode = getattr(tk, "encode_batch_fast", tk.encode_batch)  # _fast skips computing offsets
    out = []
    with _sequential() if _STATE.get("sequential") else nullcontext():
        for texts in texts_by_split:
            flats, lens = [], []
            for batch in _batches(texts):
                ids = [e.ids for e in encode(batch, add_special_tokens=False)]
                n = np.fromiter((len(x) + len(pre) + len(post) for x in ids), dtype=np.int64, count=len(ids))
                flats.append(
                    np.fromiter(
                        chain.from_iterable(chain(pre, x, post) for x in ids), dtype=dtype, count=int(n.sum())
                    )
                )
                lens.append(n)
                del ids
            flat = np.concatenate(flats) if flats else np.zeros(0, dtype=dtype)
            out.append((flat, np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64)))
    return out, peak_rss_mb()
