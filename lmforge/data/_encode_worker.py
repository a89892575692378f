"""Worker half of `data prepare`: tokenizes one chunk of documents into flat token arrays.

It imports only numpy and `tokenizers` (not torch, not the rest of lmforge), so that spawned worker
processes start in a fraction of a second and stay small. The same functions run in-process when
`workers=1`, which is what makes parallel output byte-identical to serial output.
"""

from __future__ import annotations

import os
from itertools import chain

import numpy as np

_STATE: dict = {}


def init(json_text: str, bos_id: int | None, eos_id: int | None, single_thread: bool) -> None:
    if single_thread:
        # One process per core already; Rust's thread pool on top would oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tk = Tokenizer.from_str(json_text)
    # Documents are plain text: "<|user|>" written in a web page must not become a role marker.
    tk.encode_special_tokens = True
    _STATE["tk"] = tk
    _STATE["pre"] = [bos_id] if bos_id is not None else []
    # A tokenizer whose BOS is its EOS (GPT-2's <|endoftext|>) gets it once between documents.
    _STATE["post"] = [eos_id] if eos_id is not None and eos_id != bos_id else []


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM, unlike ru_maxrss, is not inherited from
    the parent that spawned us, so it is the worker's own figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            2**20 if sys.platform == "darwin" else 1024
        )
    except ImportError:  # Windows
        return 0.0


def encode_chunk(
    texts_by_split: tuple[list[str], ...], dtype: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Per split: (flat tokens, per-document lengths), each document as [BOS] ids [EOS]; and peak RSS."""
    tk, pre, post = _STATE["tk"], _STATE["pre"], _STATE["post"]
    encode = getattr(tk, "encode_batch_fast", tk.encode_batch)  # _fast skips computing offsets
    out = []
    for texts in texts_by_split:
        ids = [e.ids for e in encode(texts, add_special_tokens=False)] if texts else []
        lens = np.fromiter((len(x) + len(pre) + len(post) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(
            chain.from_iterable(chain(pre, x, post) for x in ids), dtype=dtype, count=int(lens.sum())
        )
        out.append((flat, lens))
    return out, peak_rss_mb()
