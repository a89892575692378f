"""`lmforge bench`: how fast a checkpoint runs, against the limits of the machine it runs on.

    lm = lmforge.load("runs/quickstart/final")
    r = bench_lm(lm.model, lm.tokenizer)             # batch 1, 8 and 32
    r["batches"][0]["decode_tok_s"], r["batches"][0]["roofline_pct"]

Notable features
- measured through the inference engine (lmforge.infer.Engine), so the numbers are what `generate`
  and the server get: prefill and decode tokens/s, time to first token, at several batch sizes
- the ceilings are measured in the same run: memory bandwidth (a sum over a large buffer) and the
  matmul peak in the model's dtype, so "% of roofline" and MFU are against what this machine does
- decode roofline: a decode step reads every weight once plus the KV cache of every row, so it cannot
  beat (weight bytes + KV bytes) / bandwidth; the input embedding table is not read whole (one row per
  token) and is left out unless it is tied to the output projection
- peak memory per batch size: CUDA's max_memory_allocated, or on CPU the process's resident-set
  high-water mark (VmHWM, reset before each measurement where Linux allows it)

The timing helpers (timeit, compare, matmul_peak_flops, memory_bandwidth, machine) are shared with the
benchmark scripts in bench/.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmforge.evaluate.table import format_table
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sequence import Sequence
from lmforge.kernels import hugepages
from lmforge.utils import UserError, dir_size, human_bytes, human_count

# --------------------------------------------------------------------------------------------- timing


def _sync(device=None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timeit(fn, warmup: int = 1, iters: int = 3, min_time: float = 0.0) -> float:
    """Median seconds per call of fn() after warm-up (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < iters or time.perf_counter() < t_end:
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
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


def memory_bandwidth(device="cpu", mb: int = 512, huge: bool = True) -> float:
    """Achieved bytes/s reading a large buffer (a sum touches every byte once): the decode ceiling.
    On CPU the buffer is on huge pages where the OS has them, as lmforge's decode weights are
    (lmforge/kernels/hugepages.py); huge=False measures PyTorch's ordinary allocation."""
    n = mb * 2**20 // 4
    if torch.device(device).type == "cpu" and huge and hugepages.available():
        x = hugepages.arena(n * 4).view(torch.float32).fill_(1.0)
    else:
        x = torch.ones(n, dtype=torch.float32, device=device)
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


# --------------------------------------------------------------------------------------------- memory


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max_memory_allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak_rss"
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return ru * (1 if sys.platform == "darwin" else 1024), "peak_rss_lifetime"


def decode_weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter and persistent buffer once (a tensor
    shared by two names counted once), less the input embedding and position tables, of which a step reads one
    row each (unless the embedding is tied to the output projection, which reads all of it)."""
    seen: dict[int, int] = {}
    head: set[int] = set()
    skip: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False))
    named += [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if "rope_" not in n]
    for name, t in named:
        if t.device.type == "meta":
            continue
        # Keyed by the tensor's own data, not its storage: lmforge.kernels places every weight in one
        # huge-page arena (one storage), and a tied head is the same tensor as the embedding.
        key = t.data_ptr()
        seen[key] = t.numel() * t.element_size()
        if name.startswith("lm_head."):
            head.add(key)
        if name.startswith(("tok_emb.", "pos_emb.")):
            skip.add(key)
    return sum(n for k, n in seen.items() if k not in skip or k in head)


# --------------------------------------------------------------------------------------------- bench


def bench_lm(
    model,
    tokenizer=None,
    *,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 128,
    new_tokens: int = 64,
    quick: bool = False,
    seed: int = 0,
    mfu: bool | None = None,
    bandwidth_mb: int | None = None,
    verbose: bool = False,
) -> dict:
    """Prefill/decode speed, time to first token, peak memory and % of roofline of `model` (random
    token ids: the tokenizer, taken so that every evaluate function reads (model, tokenizer), is not
    used). quick: tiny sizes, for tests. mfu: also measure the matmul peak and report the
    prefill MFU (default: on GPU only, where it is meaningful and cheap). bandwidth_mb: size of the
    buffer the bandwidth is measured on (default 256 MB on CPU, 1 GB on GPU)."""
    cfg = model.config
    dev = model.tok_emb.weight.device
    wdtype = model.tok_emb.weight.dtype
    if quick:
        batch_sizes, prompt_len, new_tokens = tuple(b for b in batch_sizes if b <= 2) or (1,), 16, 8
    if new_tokens < 2:
        raise UserError("--new-tokens must be at least 2 (the first token comes from the prefill)")
    prompt_len = max(1, min(prompt_len, cfg.max_seq_len - new_tokens))
    if mfu is None:
        mfu = dev.type == "cuda"
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)

    say(f"measuring memory bandwidth on {dev.type} ...")
    mb = bandwidth_mb or (32 if quick else (1024 if dev.type == "cuda" else 256))
    bandwidth = memory_bandwidth(dev, mb=mb)
    peak_flops = None
    if mfu:
        say(f"measuring the matmul peak in {str(wdtype).replace('torch.', '')} ...")
        peak_flops = matmul_peak_flops(
            wdtype, n=256 if quick else (8192 if dev.type == "cuda" else 2048), device=dev
        )

    w_bytes = decode_weight_bytes(model)
    kv_elem = torch.empty((), dtype=wdtype).element_size()
    kv_per_tok = cfg.kv_cache_bytes_per_token(kv_elem)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for B in batch_sizes:
        say(f"batch {B}: prompt {prompt_len} tokens, {new_tokens} new tokens ...")
        prompts = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=gen).tolist()
        engine = Engine(model, None, max_batch=B, max_len=prompt_len + new_tokens)
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

        def run(n_new, engine=engine, prompts=prompts):
            p = SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True)
            engine.add([Sequence(list(ids), p) for ids in prompts])
            while engine.active:
                engine.step()

        run(min(4, new_tokens))  # warm-up (and compilation on CUDA)
        _sync(dev)
        _reset_peak(dev)
        engine.stats = {k: type(v)() for k, v in engine.stats.items()}
        t0 = time.perf_counter()
        engine.add([Sequence(list(ids), params) for ids in prompts])
        _sync(dev)
        ttft = time.perf_counter() - t0
        while engine.active:
            engine.step()
        _sync(dev)
        st = engine.stats
        mem, mem_kind = peak_memory(dev)
        decode_tok_s = st["decode_tokens"] / max(st["decode_s"], 1e-9)
        prefill_tok_s = st["prefill_tokens"] / max(st["prefill_s"], 1e-9)
        # Average keys per row over the decode steps (a sliding window caps them).
        avg_len = prompt_len + new_tokens / 2
        if cfg.sliding_window:
            avg_len = min(avg_len, cfg.sliding_window)
        step_bytes = w_bytes + B * avg_len * kv_per_tok
        roofline_tok_s = B * bandwidth / step_bytes
        row = {
            "batch_size": B,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "ttft_ms": round(ttft * 1e3, 3),
            "prefill_tok_s": round(prefill_tok_s, 2),
            "decode_tok_s": round(decode_tok_s, 2),
            "decode_ms_per_step": round(st["decode_s"] / max(st["decode_steps"], 1) * 1e3, 3),
            "decode_bytes_per_step": int(step_bytes),
            "roofline_tok_s": round(roofline_tok_s, 2),
            "roofline_pct": round(100 * decode_tok_s / roofline_tok_s, 2),
            "peak_memory_bytes": int(mem),
            "peak_memory_kind": mem_kind,
        }
        if peak_flops:
            flops_tok = cfg.flops_per_token(prompt_len, training=False)
            row["prefill_mfu_pct"] = round(100 * prefill_tok_s * flops_tok / peak_flops, 3)
        rows.append(row)
        del engine
    path = getattr(model, "name_or_path", None)  # set by lmforge.load
    return {
        "checkpoint": str(path) if path is not None else None,
        "family": cfg.family,
        "params": model.num_params(),
        "dtype": str(wdtype).replace("torch.", ""),
        "device": str(dev),
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "size_on_disk_bytes": dir_size(path) if path is not None and Path(path).exists() else None,
        "weight_bytes_per_step": int(w_bytes),
        "kv_bytes_per_token": int(kv_per_tok),
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 3),
        "matmul_peak_tflops": round(peak_flops / 1e12, 4) if peak_flops else None,
        "quick": quick,
        "batches": rows,
    }


def format_bench(r: dict) -> str:
    """The bench result as a readable table (plus its header lines)."""
    size = human_bytes(r["size_on_disk_bytes"]) if r["size_on_disk_bytes"] is not None else "-"
    head = (
        f"{r['checkpoint'] or 'model'}: {r['family']}, {human_count(r['params'])} params, {r['dtype']} on "
        f"{r['device']} ({r['machine']}); {size} on disk\n"
        f"memory bandwidth {r['memory_bandwidth_gb_s']:.1f} GB/s"
        + (f", matmul peak {r['matmul_peak_tflops']:.3f} TFLOP/s" if r["matmul_peak_tflops"] else "")
        + f"; decode reads {human_bytes(r['weight_bytes_per_step'])} of weights per step"
    )
    cols = [
        "batch",
        "TTFT ms",
        "prefill tok/s",
        "decode tok/s",
        "ms/step",
        "roofline tok/s",
        "% roofline",
        "peak mem",
    ]
    if any("prefill_mfu_pct" in b for b in r["batches"]):
        cols.append("prefill MFU %")
    rows = []
    for b in r["batches"]:
        row = [
            b["batch_size"],
            f"{b['ttft_ms']:.1f}",
            f"{b['prefill_tok_s']:.0f}",
            f"{b['decode_tok_s']:.1f}",
            f"{b['decode_ms_per_step']:.2f}",
            f"{b['roofline_tok_s']:.0f}",
            f"{b['roofline_pct']:.1f}",
            human_bytes(b["peak_memory_bytes"]),
        ]
        if "prefill_mfu_pct" in b:
            row.append(f"{b['prefill_mfu_pct']:.1f}")
        rows.append(row)
    return head + "\n" + format_table(cols, rows)
