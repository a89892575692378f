"""Quantization: size, bits per byte and decode speed of fp32, bf16, int8 and int4 variants, and the
kernel each quantized layer runs on.

Part 1, on a trained checkpoint: the variants are written with `lmforge.compress.quantize`, evaluated
on the validation split of --eval-data (same documents, same token budget) and decoded at batch 1
through the inference engine (greedy; each variant timed as generate(N) - generate(1), contestants
alternating, best of --rounds, so other load on the machine hits all alike); with --compile also
through each variant's compiled decode step (Engine(compile=True), as `--compile on` runs it).
Part 2, the kernels at this model's decode shapes (batch 1): fp32 and bf16 F.linear, the int8/int4
kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) and dequantizing on the fly.
Speed at a larger shape against transformers and llama.cpp: bench/decode.py (--dtypes int8,int4).

    python bench/quantize.py runs/tiny/final
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, compiled_engine, generation_speeds, machine  # noqa: E402

import lmforge  # noqa: E402
from lmforge.compress.qlinear import QuantLinear  # noqa: E402
from lmforge.compress.quantize import quantize  # noqa: E402
from lmforge.evaluate import evaluate_lm  # noqa: E402
from lmforge.evaluate.table import format_table  # noqa: E402
from lmforge.infer import generate  # noqa: E402
from lmforge.utils import dir_size, human_bytes  # noqa: E402


def ours(lm, prompt: list[int]):
    return lambda k: (
        lambda: generate(lm.model, lm.tokenizer, [prompt], max_new_tokens=k, temperature=0, ignore_eos=True)
    )


def variants(
    ckpt: Path, out: Path, calibration: str, samples: int = 128
) -> dict[str, tuple[Path, str | None]]:
    """name -> (checkpoint directory, dtype to load it in); GPTQ/AWQ on `samples` windows of 256 tokens."""
    lmforge.load(ckpt, device="cpu", dtype="bf16").save(out / "bf16")  # a bf16 copy of every weight
    v = {"fp32": (ckpt, "fp32"), "bf16": (out / "bf16", "bf16")}
    jobs = {
        "int8": dict(method="int8"),
        "int8 (float emb/head)": dict(method="int8", keep_float=("embeddings", "lm_head")),
        "int4 g64": dict(method="int4", group_size=64),
        "int8 GPTQ": dict(method="int8", calibration_data=calibration, algorithm="gptq"),
        "int8 AWQ": dict(method="int8", calibration_data=calibration, algorithm="awq"),
        "int4 g64 GPTQ": dict(method="int4", group_size=64, calibration_data=calibration),
        "int4 g64 AWQ": dict(method="int4", group_size=64, calibration_data=calibration, algorithm="awq"),
        "int4 g128": dict(method="int4", group_size=128),
    }
    for name, kw in jobs.items():
        d = out / name.replace(" ", "-").replace("(", "").replace(")", "").replace("/", "-")
        t0 = time.perf_counter()
        if "calibration_data" in kw:
            kw["calibration_samples"] = samples
        quantize(ckpt, d, eval_data=None, log=lambda *a: None, device="cpu", force=True, **kw)  # ours
        print(f"  {name}: written in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        v[name] = (d, None)
    return v


def part1(args, out: Path) -> list[dict]:
    ckpt = Path(args.checkpoint)
    v = variants(ckpt, out, args.calibration_data, 4 if args.smoke else 128)
    lms = {k: lmforge.load(p, device="cpu", dtype=dt) for k, (p, dt) in v.items()}
    rows = []
    for k, lm in lms.items():
        t0 = time.perf_counter()
        ev = evaluate_lm(lm.model, lm.tokenizer, args.eval_data, max_tokens=args.eval_tokens)
        size = (v[k][0] / "model.safetensors").stat().st_size
        rows.append(
            {
                "variant": k,
                "model_bytes": size,
                "dir_bytes": dir_size(v[k][0]),
                "bpb": ev["bits_per_byte"],
                "eval_s": time.perf_counter() - t0,
            }
        )
        print(f"  {k}: {ev['bits_per_byte']:.4f} bits/byte", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, lms["fp32"].config.vocab_size, (16,), generator=g).tolist()
    fns = {k: ours(lm, prompt) for k, lm in lms.items()}
    speed = {k: v[1] for k, v in generation_speeds(fns, len(prompt), 1, args.new_tokens, args.rounds).items()}
    if args.compile:  # the compiled decode step of each variant (compiles once each, first)
        fns = {k: compiled_engine(lm, prompt, args.new_tokens) for k, lm in lms.items()}
        got = generation_speeds(fns, len(prompt), 1, args.new_tokens, args.rounds)
        speed.update({f"{k} compiled": v[1] for k, v in got.items()})
    fp = rows[0]
    for r in rows:
        r["decode_tok_s"] = speed[r["variant"]]
        r["compiled_tok_s"] = speed.get(f"{r['variant']} compiled")
        r["size_ratio"] = r["model_bytes"] / fp["model_bytes"]
        r["bpb_change_pct"] = 100 * (r["bpb"] / fp["bpb"] - 1)
    return rows


def part2(ckpt: str, rounds: int) -> list[dict]:
    """Per decode shape of the model: microseconds per call at batch 1."""
    cfg = lmforge.load(ckpt, device="cpu").config
    d, ff = cfg.d_model, cfg.d_ff
    shapes = {
        "wqkv": (d, cfg.q_dim + 2 * cfg.kv_dim),
        "wo": (cfg.q_dim, d),
        "w_in": (d, 2 * ff if cfg.mlp == "glu" else ff),
        "w_out": (ff, d),
        "lm_head": (d, cfg.vocab_size),
    }
    out = []
    g = torch.Generator().manual_seed(0)
    for name, (K, N) in shapes.items():
        w = torch.randn(N, K, generator=g) * 0.02
        x = torch.randn(1, K, generator=g)
        wb, xb = w.bfloat16(), x.bfloat16()
        q8 = QuantLinear.from_float(w, bits=8)
        q4 = QuantLinear.from_float(w, bits=4, group_size=64)
        d8 = QuantLinear.from_float(w, bits=8)
        d8.kernel = "dequant"
        d4 = QuantLinear.from_float(w, bits=4, group_size=64)
        d4.kernel = "dequant"
        calls = max(20, int(2e6 // (N * K)))

        def rep(f, calls=calls):
            return lambda: [f() for _ in range(calls)]

        with torch.inference_mode():
            t = compare(
                {
                    "fp32": rep(lambda w=w, x=x: F.linear(x, w)),
                    "bf16": rep(lambda wb=wb, xb=xb: F.linear(xb, wb)),
                    f"int8 ({q8.kernel})": rep(lambda q8=q8, x=x: q8(x)),
                    "int8 dequant": rep(lambda d8=d8, x=x: d8(x)),
                    f"int4 ({q4.kernel})": rep(lambda q4=q4, x=x: q4(x)),
                    "int4 dequant": rep(lambda d4=d4, x=x: d4(x)),
                },
                warmup=1,
                iters=rounds,
            )
        out.append({"layer": name, "K": K, "N": N, **{k: v / calls * 1e6 for k, v in t.items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a trained float checkpoint directory with its tokenizer")
    ap.add_argument("--eval-data", default="python-docs", help="source for bits per byte (validation split)")
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="tokens scored per variant")
    ap.add_argument("--calibration-data", default="python-docs", help="GPTQ/AWQ calibration source")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per timing")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (best kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time each variant's torch.compile'd decode step (a minute or more to compile each)",
    )
    ap.add_argument("--out", default=None, help="directory for the variants and results.json (default: temp)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that the script runs (500 tokens, 4-token decodes, one round): no figures",
    )
    args = ap.parse_args()
    if args.smoke:
        args.eval_tokens, args.new_tokens, args.rounds = 500, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="lmforge-bench-quantize-"))
    print(f"machine: {machine()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")
    res: dict = {"machine": machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    print(
        f"\n## Variants of {args.checkpoint} (bits per byte: {args.eval_data} validation split, "
        f"first {args.eval_tokens:,} tokens; decode: batch 1, {args.new_tokens} greedy tokens)\n"
    )
    rows = part1(args, out)
    res["variants"] = rows
    compiled = ["compiled tok/s", "x fp32"] if args.compile else []
    print(
        format_table(
            [
                "variant",
                "model.safetensors",
                "x fp32",
                "bits/byte",
                "change",
                "decode tok/s",
                "x fp32",
                *compiled,
            ],
            [
                [
                    r["variant"],
                    human_bytes(r["model_bytes"]),
                    f"{r['size_ratio']:.3f}",
                    f"{r['bpb']:.4f}",
                    f"{r['bpb_change_pct']:+.2f}%",
                    f"{r['decode_tok_s']:.1f}",
                    f"{r['decode_tok_s'] / rows[0]['decode_tok_s']:.2f}",
                    *(
                        [
                            f"{r['compiled_tok_s']:.1f}",
                            f"{r['compiled_tok_s'] / rows[0]['compiled_tok_s']:.2f}",
                        ]
                        if args.compile
                        else []
                    ),
                ]
                for r in rows
            ],
            markdown=True,
        )
    )

    print("\n## Kernels at this model's decode shapes (batch 1, microseconds per call)\n")
    kern = part2(args.checkpoint, args.rounds)
    res["kernels"] = kern
    cols = [k for k in kern[0] if k not in ("layer", "K", "N")]
    print(
        format_table(
            ["layer (K -> N)", *cols],
            [[f"{r['layer']} ({r['K']} -> {r['N']})", *[f"{r[c]:.0f}" for c in cols]] for r in kern],
            markdown=True,
        )
    )

    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(f"\nresults: {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
