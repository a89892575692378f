"""Model weights in transparent huge pages: decode reads every weight once per step, so its speed is
how fast one core streams memory, and on 4 KiB pages the address translation costs about half of it.

Measured on the 2-core Zen 4 VM of docs/benchmarks.md: a plain sum over 85 MB of weights streams
13 GB/s on 4 KiB pages and 26 GB/s on 2 MiB pages (bench/decode.py prints both for its run). Linux
gives a process huge pages only where it asks for them (`/sys/kernel/mm/transparent_hugepage/enabled`
is `madvise` on most distributions), and PyTorch asks only when `THP_MEM_ALLOC_ENABLE=1` was set
before torch allocated anything. So `place(model)` copies the model's CPU parameters and buffers into
one private anonymous mapping advised MADV_HUGEPAGE and points each at its copy: the same Parameter
objects with the same values, strides and sharing (tied weights stay tied), only the memory moves.
Elsewhere (not Linux, or THP disabled) it does nothing.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import torch
import torch.nn as nn

HUGE = 2 << 20  # bytes in a huge page (x86-64 and arm64 with 4 KiB base pages)
_ALIGN = 64  # each tensor on a cache-line boundary


def available() -> bool:
    """Linux with THP not switched off."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def _dense(t: torch.Tensor) -> bool:
    """Whether t covers exactly numel() elements of its storage, in some order (contiguous, or a
    transposed contiguous matrix), so that a copy with the same strides fits in numel() elements."""
    if t.is_contiguous():
        return True
    return t.dim() == 2 and t.t().is_contiguous()


def arena(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes on 2 MiB pages (where the kernel grants them), starting on a page
    boundary; it keeps its private anonymous mapping alive as long as a view of it lives."""
    mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so the page faults map 2 MiB pages
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    off = (-buf.data_ptr()) % HUGE
    return buf[off : off + nbytes]


def place(model: nn.Module, min_bytes: int = 1 << 16) -> int:
    """Move the model's CPU tensors of at least `min_bytes` into huge pages; returns bytes moved
    (0 where huge pages are not available, or nothing is left to move)."""
    if not available():
        return 0
    todo: dict[int, list[torch.Tensor]] = {}  # data_ptr -> tensors (Parameters/buffers) sharing it
    for t in [*model.parameters(), *model.buffers()]:
        if (
            t.device.type != "cpu"
            or t.nbytes < min_bytes
            or not _dense(t)
            or getattr(t, "_lmf_huge", None) == t.data_ptr()
        ):
            continue
        group = todo.setdefault(t.data_ptr(), [])
        if all(t is not u for u in group):
            group.append(t)
    if not todo:
        return 0
    sizes = {p: -(-g[0].nbytes // _ALIGN) * _ALIGN for p, g in todo.items()}
    buf, off = arena(sum(sizes.values())), 0
    for p, group in todo.items():
        t = group[0]
        flat = buf[off : off + t.nbytes].view(t.dtype)
        new = flat.as_strided(t.shape, t.stride(), flat.storage_offset())
        new.copy_(t.detach())
        for u in group:
            u.data = new
            u._lmf_huge = new.data_ptr()  # placed (until the tensor's data is replaced)
        off += sizes[p]
    return len(buf)
