"""Shared benchmark helpers: timing, hardware limits measured in the same run, machine description.

They live in the package (lmforge.evaluate.bench, used by `lmforge bench`); this module keeps the
names the scripts in bench/ import.
"""

from __future__ import annotations

import time

from lmforge.evaluate.bench import compare, machine, matmul_peak_flops, memory_bandwidth, timeit

__all__ = [
    "compare",
    "compiled_engine",
    "generation_speeds",
    "machine",
    "matmul_peak_flops",
    "memory_bandwidth",
    "timeit",
]


def generation_speeds(fns: dict, prompt_len: int, rows: int, n: int, rounds: int) -> dict:
    """{name: (prefill tok/s, decode tok/s, decode tok per CPU-second)}: fns[name](k) is a function that
    generates k tokens after a prompt of prompt_len tokens, for `rows` rows.
    Contestants alternate; each keeps its best of `rounds` (the run least disturbed by other load).
    CPU seconds (all threads of this process) depend much less on other load than wall-clock time."""
    for f in fns.values():
        f(2)()  # warm-up
    best = {k: [float("inf")] * 4 for k in fns}  # wall 1 token, wall n tokens, cpu 1, cpu n
    for _ in range(rounds):
        for k, f in fns.items():
            for i, m in enumerate((1, n)):
                t0, c0 = time.perf_counter(), time.process_time()
                f(m)()
                best[k][i] = min(best[k][i], time.perf_counter() - t0)
                best[k][2 + i] = min(best[k][2 + i], time.process_time() - c0)
    return {
        k: (rows * prompt_len / t1, rows * (n - 1) / max(tn - t1, 1e-9), rows * (n - 1) / max(cn - c1, 1e-9))
        for k, (t1, tn, c1, cn) in best.items()
    }


def compiled_engine(lm, prompt: list[int], n: int):
    """fns(k) (as generation_speeds takes them) for one Engine with compile=True, batch 1, reused so
    that its decode step compiles once (on the first call)."""
    from lmforge.infer import Engine, SamplingParams, Sequence

    engine = Engine(lm.model, max_batch=1, max_len=len(prompt) + n, compile=True)

    def run(k):
        def go():
            engine.add(
                [Sequence(list(prompt), SamplingParams(max_new_tokens=k, temperature=0, ignore_eos=True))]
            )
            while engine.active:
                engine.step()

        return go

    return run
