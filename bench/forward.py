"""Forward and forward+backward tokens/s of lmforge's decoder vs transformers' LlamaForCausalLM.

Same SmolLM-135M-shaped Llama (random weights), same inputs, same process; the matmul peak of
this machine is measured in the same run, so MFU is against what the hardware really does.

    python bench/forward.py [--batch 2 --seq 256 --dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, machine, matmul_peak_flops  # noqa: E402

from lmforge.checkpoint import save_model  # noqa: E402
from lmforge.config import preset  # noqa: E402
from lmforge.model import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="sequences per batch")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32 and/or bf16 (autocast)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    ap.add_argument(
        "--size", default="smollm-135m", help="model shape: smollm-135m or a preset size (debug, tiny, ...)"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that the script runs (debug size, batch 1 x 32, one iteration): no figures",
    )
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.seq, args.iters = "debug", 1, 32, 1

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = preset(size=args.size)
    ours = build(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    ntok = args.batch * args.seq
    print(f"machine: {machine()}  torch {torch.__version__}")
    print(
        f"model: llama {args.size} shape ({cfg.n_params() / 1e6:.1f}M params), batch {args.batch} x {args.seq} tokens"
    )
    with torch.no_grad():
        ours.eval(), hf.eval()
        err = (ours(ids) - hf(ids).logits).abs().max().item()
    print(f"max |logits difference| vs transformers: {err:.2e}")

    rows = []
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        peak = matmul_peak_flops(dtype, n=512 if args.smoke else 2048)
        ctx = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == torch.bfloat16 else nullcontext
        )
        for mode in ("forward", "forward+backward"):
            steps = {}
            for who, model, call in (
                ("lmforge", ours, lambda m: m(ids, ids)),
                ("transformers", hf, lambda m: m(ids, labels=ids).loss),
            ):

                def step(model=model, call=call, mode=mode, ctx=ctx):
                    model.train(mode != "forward")
                    if mode == "forward":
                        with torch.no_grad(), ctx():
                            call(model)
                    else:
                        with ctx():
                            loss = call(model)
                        loss.backward()
                        model.zero_grad(set_to_none=True)

                steps[who] = step
            res = {who: ntok / sec for who, sec in compare(steps, warmup=1, iters=args.iters).items()}
            flops = cfg.flops_per_token(args.seq, training=mode != "forward")
            rows.append(
                (
                    name,
                    mode,
                    res["lmforge"],
                    res["transformers"],
                    res["lmforge"] / res["transformers"],
                    res["lmforge"] * flops / peak,
                    peak,
                )
            )
    print("\n| dtype | pass | lmforge tok/s | transformers tok/s | ratio | lmforge MFU | matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for name, mode, a, b, r, mfu, peak in rows:
        print(f"| {name} | {mode} | {a:,.0f} | {b:,.0f} | {r:.2f}x | {mfu:.0%} | {peak / 1e9:.0f} GFLOP/s |")


if __name__ == "__main__":
    main()
