"""Training throughput: lmforge's training step vs transformers' LlamaForCausalLM, fp32 and bf16.

One training step = forward with loss, backward, gradient clipping, fused AdamW step, zero_grad: what
`lmforge pretrain` does per micro-batch. Both models have the same config and the same weights (ours
saved and loaded by transformers), see the same batch and use the same optimizer settings; steps are
timed in alternation so that load from other processes hits both alike. The matmul peak of this
machine is measured in the same run, so MFU (model FLOPs per token from ModelConfig.flops_per_token)
is against what the hardware really does here.

Every rate is given twice: per wall-clock second, and per CPU-second of this process
(time.process_time, divided by the thread count). On a machine shared with other jobs the wall clock
charges a step for the time it waited for a core; CPU time does not.

    python bench/train.py [--size tiny --vocab 32000 --batch 8 --seq 256 --iters 5 --threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.checkpoint import save_model  # noqa: E402
from lmforge.config import preset  # noqa: E402
from lmforge.model import build  # noqa: E402


def timed(fns: dict, iters: int) -> dict:
    """{name: (median wall s, median CPU s)} per call, calls alternating between the contestants."""
    for fn in fns.values():
        fn()  # warm-up
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    threads = torch.get_num_threads()

    def med(v):
        return sorted(v)[len(v) // 2]

    return {k: (med(wall[k]), med(cpu[k]) / threads) for k in fns}


def matmul_peak(dtype, n: int = 2048) -> tuple[float, float]:
    """(FLOP per wall second, per CPU second) of a square matmul: this machine's practical ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    w, c = timed({"mm": lambda: a @ b}, 5)["mm"]
    return 2 * n**3 / w, 2 * n**3 / c


def train_step(model, call, ctx, opt):
    """One optimizer step; `call(model)` returns the loss."""

    def step():
        with ctx():
            loss = call(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", default="tiny", help="lmforge.config preset size of the llama (debug, tiny, small, ...)"
    )
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per contestant and precision (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that the script runs (debug size, batch 1 x 32, one step): no figures",
    )
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.seq, args.iters = "debug", 1, 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    extra = {"vocab_size": args.vocab} if args.vocab else {}
    cfg = preset("llama", args.size, max_seq_len=max(args.seq, 256), **extra)
    ours = build(cfg)
    ours.init_weights(0)
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    ours.train(), hf.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]
    ntok = args.batch * args.seq
    fpt = cfg.flops_per_token(args.seq, training=True)
    print(f"machine: {machine()}, torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}")
    print(
        f"model: llama {args.size} ({cfg.n_params() / 1e6:.2f}M params, d_model {cfg.d_model}, "
        f"{cfg.n_layers} layers, vocab {cfg.vocab_size}), batch {args.batch} x {args.seq} tokens, "
        f"{fpt / 1e6:.1f} MFLOP/token"
    )
    with torch.no_grad():
        a, b = ours(x, y).item(), hf(x, labels=ids[:, :-1]).loss.item()
    print(f"initial loss: lmforge {a:.5f}, transformers {b:.5f} (transformers scores T-1 positions)")

    rows, results = [], {}
    for name in ("fp32", "bf16"):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        peak_w, peak_c = matmul_peak(dtype, n=512 if args.smoke else 2048)
        ctx = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == torch.bfloat16 else nullcontext
        )
        steps = {}
        for who, model, call in (
            ("lmforge", ours, lambda m: m(x, y)),
            ("transformers", hf, lambda m: m(x, labels=ids[:, :-1]).loss),
        ):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
            steps[who] = train_step(model, call, ctx, opt)
        for who, (w, c) in timed(steps, args.iters).items():
            results[(who, name)] = (ntok / w, ntok / c)
            rows.append(
                (who, name, ntok / w, ntok / w * fpt / peak_w, ntok / c, ntok / c * fpt / peak_c, peak_c)
            )
    # peak memory of one bf16 step: RSS high-water mark above the RSS before it (Linux resets VmHWM)
    import gc

    from lmforge.evaluate.bench import _reset_peak, peak_memory

    mem = {}
    cpu = torch.device("cpu")
    for who, model, call in (
        ("lmforge", ours, lambda m: m(x, y)),
        ("transformers", hf, lambda m: m(x, labels=ids[:, :-1]).loss),
    ):
        gc.collect()
        _reset_peak(cpu)
        before = peak_memory(cpu)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = call(model)
        loss.backward()
        model.zero_grad(set_to_none=True)
        del loss
        mem[who] = peak_memory(cpu)[0] - before
    print()
    print(
        "| model | precision | tokens/s (wall) | MFU (wall) | tokens per CPU-s | MFU (CPU time) "
        "| matmul peak per CPU-s |"
    )
    print("|---|---|---|---|---|---|---|")
    for who, name, tw, mw, tc, mc, pc in rows:
        print(
            f"| {who} | {name} | {tw:,.0f} | {100 * mw:.0f}% | {tc:,.0f} | {100 * mc:.0f}% | {pc / 1e9:.0f} GFLOP/s |"
        )
    print()
    print(
        "peak memory of a bf16 forward+backward above the resting process: "
        + ", ".join(f"{who} {v / 2**20:,.0f} MB" for who, v in mem.items())
    )
    for i, clock in enumerate(("wall clock", "CPU time")):
        same = [results[("lmforge", n)][i] / results[("transformers", n)][i] for n in ("fp32", "bf16")]
        cross = results[("lmforge", "bf16")][i] / results[("transformers", "fp32")][i]
        print(
            f"{clock}: lmforge / transformers: fp32 {same[0]:.2f}x, bf16 {same[1]:.2f}x (goal >= 1.2x); "
            f"lmforge bf16 / transformers fp32 {cross:.2f}x (goal >= 3x)"
        )


if __name__ == "__main__":
    main()
