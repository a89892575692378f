"""How big a KV cache to allocate: rows x slots per row, within a memory budget that fits the machine.

    max_batch, max_len, nbytes = plan_kv_cache(cfg, max_batch=8)                  # default budget
    plan_kv_cache(cfg, 8, max_len=4096, memory="2GiB")                            # explicit
    plan_kv_cache(cfg, 8, memory=0.3)                                             # 30% of free memory

The cache is static (cache.py): every row gets max_len slots up front. A long-context model (Llama
3.2: 131072 tokens) would need max_batch x 131072 slots for its full context, 64 GiB in fp32 at 8 rows,
so max_len is not the context by default but what the budget allows (at most the context):

- budget (`memory`): bytes (int, or a float > 1), a size string ("2GiB", "512MB"), or a fraction in
  (0, 1] of the memory available now (free GPU memory on CUDA, MemAvailable on CPU).
- max_len None: the most slots per row that fit the budget (at most the context), rounded down to a
  multiple of 16. Default budget: DEFAULT_FRACTION of the available memory, at most DEFAULT_CAP on CPU
  (a GPU's free memory is there for the cache).
- max_len given: that many slots (capped at the context); if they do not fit the budget, a UserError
  names both numbers. Without a budget, an explicit max_len is refused only when it exceeds all the
  memory available (the caller sized it: `generate` asks for prompt + max_new_tokens).

Sliding-window models whose every layer slides keep a ring of `window` slots once max_len exceeds the
window, which the count follows (models mixing sliding and full layers keep every slot).
"""

from __future__ import annotations

import os
import re

import torch

from lmforge.utils import UserError, human_bytes

DEFAULT_FRACTION = {"cpu": 0.25, "cuda": 0.5}  # of the memory available when the engine is built
DEFAULT_CAP = 2 << 30  # CPU default at most 2 GiB: a server shares the machine with its weights and more
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


def available_memory(device=None) -> int:
    """Bytes of memory available for new tensors on `device` now."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown platform: assume a modest machine


def parse_memory(value, device=None) -> int:
    """A budget in bytes from bytes (int), "2GiB" / "512MB" / "1.5G", or a fraction (0, 1] of the
    available memory (0.3 or "0.3" or "30%")."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not value > 0:  # NaN too
            raise UserError(f"kv_cache_memory={value}: give a fraction in (0, 1] or a number of bytes")
        n = int(value * available_memory(device)) if value <= 1 else int(value)
    elif isinstance(value, str):
        s = value.strip().lower().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|[a-z]*)", s)
        if m and m.group(2) == "%":
            return parse_memory(float(m.group(1)) / 100, device)
        if m and m.group(2) == "" and float(m.group(1)) <= 1:
            return parse_memory(float(m.group(1)), device)
        if not m or m.group(2) not in _UNITS:
            raise UserError(
                f"kv_cache_memory={value!r}: give a size such as 2GiB or 512MB, or a fraction of the "
                "available memory such as 0.3 or 30%"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    else:
        raise UserError(f"kv_cache_memory={value!r}: give bytes, a size such as 2GiB, or a fraction")
    if n <= 0:
        raise UserError(f"kv_cache_memory={value!r}: must be more than 0 bytes")
    return n


def default_budget(device=None) -> int:
    device = torch.device(device or "cpu")
    kind = "cuda" if device.type == "cuda" else "cpu"
    n = int(DEFAULT_FRACTION[kind] * available_memory(device))
    return min(n, DEFAULT_CAP) if kind == "cpu" else n


def kv_cache_bytes(cfg, batch: int, max_len: int, dtype=torch.float32) -> int:
    """Bytes of K and V (plus the slot positions) a KVCache of batch x max_len holds for `cfg`."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_slot = 2 * cfg.kv_dim * elem  # K and V of one token in one layer
    # A ring of `window` slots only when every layer slides over the same window (cache.py); models that
    # mix sliding and full layers keep every slot.
    window = getattr(cfg, "cache_window", cfg.sliding_window)
    size = min(window, max_len) if window else max_len
    return batch * size * (cfg.n_layers * per_slot + 16)  # key_pos and ids: one int64 each per slot


def plan_kv_cache(
    cfg, max_batch: int, max_len: int | None = None, memory=None, dtype=torch.float32, device=None
) -> tuple[int, int, int]:
    """(max_batch, max_len, bytes) of the KV cache to allocate; see the module docstring."""
    if max_batch < 1:
        raise UserError(f"max_batch={max_batch}: must be >= 1")
    ctx = cfg.max_seq_len
    if memory is not None:
        budget = parse_memory(memory, device)
    else:
        budget = default_budget(device) if max_len is None else available_memory(device)
    if max_len is not None:
        if max_len < 1:
            raise UserError(f"max_len={max_len}: must be >= 1")
        L = min(max_len, ctx)
        need = kv_cache_bytes(cfg, max_batch, L, dtype)
        if need > budget:
            fit = _most_slots(cfg, max_batch, budget, dtype, ctx)
            raise UserError(
                f"a KV cache of {max_batch} rows x {L} tokens needs {human_bytes(need)}, more than the "
                f"budget of {human_bytes(budget)} (kv_cache_memory); {max_batch} rows fit {fit} tokens each: "
                "lower max_len or max_batch, or raise kv_cache_memory"
            )
        return max_batch, L, need
    L = _most_slots(cfg, max_batch, budget, dtype, ctx)
    if L < min(16, ctx):
        raise UserError(
            f"a KV cache of {max_batch} rows fits only {L} tokens per row in the budget of "
            f"{human_bytes(budget)} (kv_cache_memory); raise kv_cache_memory or lower max_batch"
        )
    if L < ctx:
        L = L // 16 * 16
    return max_batch, L, kv_cache_bytes(cfg, max_batch, L, dtype)


def _most_slots(cfg, batch: int, budget: int, dtype, ctx: int) -> int:
    """The largest max_len <= ctx whose cache fits the budget (bytes grow with max_len: bisect)."""
    if kv_cache_bytes(cfg, batch, ctx, dtype) <= budget:
        return ctx
    lo, hi = 0, ctx  # fits(lo) (0 slots cost nothing), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kv_cache_bytes(cfg, batch, mid, dtype) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
