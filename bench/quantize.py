"""Quantization: size, bits per byte and decode speed of fp32, bf16, int8 and int4 variants, and the
kernel each quantized layer runs on.

Part 1, on a trained checkpoint: the variants are written with `lmforge.compress.quantize`, evaluated
on the validation split of --eval-data (same documents, same token budget) and decoded at batch 1
through the inference engine (greedy; each variant timed as generate(N) - generate(1), contestants
alternating, best of --rounds, so other load on the machine hits all alike).
Part 2, the kernels at this model's decode shapes (batch 1): fp32 and bf16 F.linear, the int8/int4
kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) and dequantizing on the fly.
Part 3 (--smollm), decode speed on a SmolLM-135M-shaped Llama (random weights) against transformers'
bf16 `generate` on the same weights, the anchor of bench/decode.py.

    python bench/quantize.py runs/tiny/final                 # parts 1 and 2
    python bench/quantize.py runs/tiny/final --smollm        # and part 3 (a few minutes more)
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
from common import compare, machine  # noqa: E402

import lmforge  # noqa: E402
from lmforge.compress.qlinear import QuantLinear  # noqa: E402
from lmforge.compress.quantize import quantize  # noqa: E402
from lmforge.evaluate import evaluate_lm  # noqa: E402
from lmforge.evaluate.report import format_table  # noqa: E402
from lmforge.infer import generate  # noqa: E402
from lmforge.utils import dir_size, human_bytes  # noqa: E402


def decode_speeds(fns: dict, n: int, rounds: int) -> dict:
    """{name: decode tok/s}: fns[name](k) generates k tokens; (t(n) - t(1)) / (n - 1), best of rounds."""
    for f in fns.values():
        f(2)
    best = {k: [float("inf"), float("inf")] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for i, m in enumerate((1, n)):
                t0 = time.perf_counter()
                f(m)
                best[k][i] = min(best[k][i], time.perf_counter() - t0)
    return {k: (n - 1) / max(tn - t1, 1e-9) for k, (t1, tn) in best.items()}


def ours(lm, prompt: list[int]):
    return lambda k: generate(lm, [prompt], max_new_tokens=k, temperature=0, ignore_eos=True)


def variants(ckpt: Path, out: Path, calibration: str) -> dict[str, tuple[Path, str | None]]:
    """name -> (checkpoint directory, dtype to load it in)."""
    lmforge.load(ckpt, device="cpu", dtype="bf16").save(out / "bf16")  # a bf16 copy of every weight
    v = {"fp32": (ckpt, "fp32"), "bf16": (out / "bf16", "bf16")}
    jobs = {
        "int8": dict(method="int8"),
        "int8 (float emb/head)": dict(method="int8", keep_float=("embeddings", "lm_head")),
        "int4 g64": dict(method="int4", group_size=64),
        "int4 g64 GPTQ": dict(method="int4", group_size=64, calibration_data=calibration),
        "int4 g128": dict(method="int4", group_size=128),
    }
    for name, kw in jobs.items():
        d = out / name.replace(" ", "-").replace("(", "").replace(")", "").replace("/", "-")
        t0 = time.perf_counter()
        quantize(ckpt, d, eval_data=None, log=lambda *a: None, device="cpu", **kw)
        print(f"  {name}: written in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        v[name] = (d, None)
    return v


def part1(args, out: Path) -> list[dict]:
    ckpt = Path(args.checkpoint)
    v = variants(ckpt, out, args.calibration_data)
    lms = {k: lmforge.load(p, device="cpu", dtype=dt) for k, (p, dt) in v.items()}
    rows = []
    for k, lm in lms.items():
        t0 = time.perf_counter()
        ev = evaluate_lm(lm, args.eval_data, max_tokens=args.eval_tokens)
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
    speed = decode_speeds({k: ours(lm, prompt) for k, lm in lms.items()}, args.new_tokens, args.rounds)
    fp = rows[0]
    for r in rows:
        r["decode_tok_s"] = speed[r["variant"]]
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


def part3(args) -> dict:
    """SmolLM-135M shape, random weights: lmforge fp32 / bf16 / int8 / int4 vs transformers bf16."""
    from transformers import AutoModelForCausalLM

    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build

    torch.manual_seed(0)
    cfg = preset(size="debug") if args.smoke else preset(size="smollm-135m")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(build(cfg), tmp / "fp32")
        quantize(tmp / "fp32", tmp / "int8", "int8", eval_data=None, log=lambda *a: None, device="cpu")
        quantize(tmp / "fp32", tmp / "int4", "int4", 64, eval_data=None, log=lambda *a: None, device="cpu")
        sizes = {k: dir_size(tmp / k) for k in ("fp32", "int8", "int4")}
        lms = {
            "lmforge fp32": lmforge.load(tmp / "fp32", device="cpu"),
            "lmforge bf16": lmforge.load(tmp / "fp32", device="cpu", dtype="bf16"),
            "lmforge int8": lmforge.load(tmp / "int8", device="cpu"),
            "lmforge int4 g64": lmforge.load(tmp / "int4", device="cpu"),
        }
        hf = AutoModelForCausalLM.from_pretrained(tmp / "fp32", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))

    def theirs(k):
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    fns = {k: ours(lm, ids[0].tolist()) for k, lm in lms.items()} | {"transformers bf16": theirs}
    speed = decode_speeds(fns, args.smollm_tokens, args.rounds)
    return {"sizes": sizes, "decode_tok_s": speed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a trained float checkpoint directory with its tokenizer")
    ap.add_argument("--eval-data", default="python-docs", help="source for bits per byte (validation split)")
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="tokens scored per variant")
    ap.add_argument("--calibration-data", default="python-docs", help="GPTQ calibration source")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per timing")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (best kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--smollm", action="store_true", help="also part 3: SmolLM-135M shape vs transformers bf16"
    )
    ap.add_argument("--smollm-tokens", type=int, default=24, help="part 3: tokens decoded per timing")
    ap.add_argument("--out", default=None, help="directory for the variants and results.json (default: temp)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that the script runs (500 tokens, 4-token decodes, one round, a debug-size "
        "model for part 3): no figures",
    )
    args = ap.parse_args()
    if args.smoke:
        args.eval_tokens, args.new_tokens, args.smollm_tokens, args.rounds = 500, 4, 4, 1
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
    print(
        format_table(
            ["variant", "model.safetensors", "x fp32", "bits/byte", "change", "decode tok/s", "x fp32"],
            [
                [
                    r["variant"],
                    human_bytes(r["model_bytes"]),
                    f"{r['size_ratio']:.3f}",
                    f"{r['bpb']:.4f}",
                    f"{r['bpb_change_pct']:+.2f}%",
                    f"{r['decode_tok_s']:.1f}",
                    f"{r['decode_tok_s'] / rows[0]['decode_tok_s']:.2f}",
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

    if args.smollm:
        print(
            f"\n## SmolLM-135M shape, random weights: decode tok/s at batch 1 ({args.smollm_tokens} tokens)\n"
        )
        s = part3(args)
        res["smollm"] = s
        anchor = s["decode_tok_s"]["transformers bf16"]
        print(
            format_table(
                ["", "decode tok/s", "x transformers bf16"],
                [[k, f"{v:.1f}", f"{v / anchor:.2f}"] for k, v in s["decode_tok_s"].items()],
                markdown=True,
            )
        )
        print("\nsizes: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in s["sizes"].items()))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(f"\nresults: {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
