"""Shared benchmark helpers: timing, hardware limits measured in the same run, machine description."""

from __future__ import annotations

import platform
import subprocess
import time

import torch


def timeit(fn, warmup: int = 1, iters: int = 3, min_time: float = 0.0) -> float:
    """Median seconds per call of fn() after warm-up (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < iters or time.perf_counter() < t_end:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def compare(fns: dict, warmup: int = 1, iters: int = 3) -> dict:
    """Median seconds per call of each fn, timed in alternation (A, B, A, B, ...) so that load from
    other processes on a shared machine affects every contestant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            times[k].append(timeit(fn, warmup=0, iters=1))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def matmul_peak_flops(dtype=torch.float32, n: int = 2048, device="cpu") -> float:
    """Achieved FLOP/s of a large square matmul: the practical compute ceiling of this device and dtype."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sec = timeit(lambda: a @ b, warmup=2, iters=5)
    return 2 * n**3 / sec


def memory_bandwidth(device="cpu", mb: int = 512) -> float:
    """Achieved bytes/s reading a large buffer (a sum touches every byte once): the decode ceiling."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
    sec = timeit(lambda: x.sum(), warmup=2, iters=7)
    return x.numel() * 4 / sec


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except Exception:
        pass
    return f"{name}, {torch.get_num_threads()} threads"
