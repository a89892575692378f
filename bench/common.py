"""Shared benchmark helpers: timing, hardware limits measured in the same run, machine description.

They live in the package (lmforge.evaluate.bench, used by `lmforge bench`); this module keeps the
names the scripts in bench/ import.
"""

from __future__ import annotations

from lmforge.evaluate.bench import compare, machine, matmul_peak_flops, memory_bandwidth, timeit

__all__ = ["compare", "machine", "matmul_peak_flops", "memory_bandwidth", "timeit"]
