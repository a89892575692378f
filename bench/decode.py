"""Generation speed: lmforge's engine vs transformers' `generate` on the same weights, same process.

A SmolLM-135M-shaped Llama (random weights) is saved once and loaded by both. For fp32 and bf16:
batch-1 prefill tokens/s (a 128-token prompt) and decode tokens/s (greedy, no early stop), each side
timed as generate(N tokens) - generate(1 token) so that both pay their own setup, alternating the two
contestants so that other load on the machine hits both alike. Decode streams every weight once per
step, so the roofline is memory bandwidth (a large tensor sum, measured in this run) / weight bytes;
the table shows the share of it each side reaches. Then lmforge alone as the context grows
(128 -> 2048 tokens) and as the batch grows (1 -> 32 rows).

    python bench/decode.py            # full run (~5 minutes on 2 cores)
    python bench/decode.py --quick    # smaller sweeps, fewer tokens (~2 minutes)
    python bench/decode.py --compile  # also lmforge with torch.compile (compiling takes minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, memory_bandwidth  # noqa: E402

import lmforge  # noqa: E402
from lmforge.checkpoint import save_model  # noqa: E402
from lmforge.config import preset  # noqa: E402
from lmforge.infer import Engine, SamplingParams, Sequence, generate  # noqa: E402
from lmforge.model import build  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ids(n: int, rows: int = 1, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, n), generator=torch.Generator().manual_seed(n + rows))


def _ours(lm, ids: torch.Tensor, n: int):
    return lambda: generate(lm, ids.tolist(), max_new_tokens=n, temperature=0, ignore_eos=True)


def _theirs(hf, ids: torch.Tensor, n: int):
    def run():
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    return run


def _speeds(fns: dict, prompt_len: int, rows: int, n: int, rounds: int) -> dict:
    """{name: (prefill tok/s, decode tok/s, decode tok per CPU-second)}: fns[name](k) generates k tokens.
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


def _compiled(lm, ids: torch.Tensor, n: int, rounds: int):
    """(compile seconds, decode tok/s, decode tok/CPU-s) of one Engine with compile=True, reused so that
    its decode step compiles once."""
    engine = Engine(lm.model, max_batch=1, max_len=ids.shape[1] + n, compile=True)

    def run(k):
        def go():
            engine.add(
                [Sequence(ids[0].tolist(), SamplingParams(max_new_tokens=k, temperature=0, ignore_eos=True))]
            )
            while engine.active:
                engine.step()

        return go

    t0 = time.perf_counter()
    run(2)()  # compiles the decode step
    secs = time.perf_counter() - t0
    _, d, c = _speeds({"compiled": run}, ids.shape[1], 1, n, rounds)["compiled"]
    return secs, d, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and shorter sweeps (~2 minutes)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32 and/or bf16")
    ap.add_argument(
        "--new-tokens", type=int, default=None, help="tokens decoded per measurement (default 64)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, best kept (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time lmforge's torch.compile'd decode step (minutes more)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that the script runs (debug-size model, fp32, 4 tokens, one round): no figures",
    )
    args = ap.parse_args()
    if args.smoke:
        args.quick, args.dtypes, args.new_tokens, args.rounds = True, "fp32", 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens or (32 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 3)

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = (
        preset(size="debug", vocab_size=49152, max_seq_len=2048) if args.smoke else preset(size="smollm-135m")
    )
    tmp = tempfile.TemporaryDirectory()
    save_model(build(cfg), tmp.name)
    load0 = os.getloadavg()[0]
    bw = memory_bandwidth()
    print(f"machine: {machine()}, torch {torch.__version__}, load average {load0:.1f}")
    print(f"model: SmolLM-135M shape, {cfg.n_params() / 1e6:.1f}M parameters, random weights")
    print(
        f"memory bandwidth (sum of a 512 MB tensor, {torch.get_num_threads()} threads): {bw / 1e9:.1f} GB/s\n"
    )

    prompt = _ids(128)
    print(
        "| dtype | prefill tok/s lmforge | transformers | ratio | decode tok/s lmforge | transformers | ratio "
        "| decode tok/CPU-s lmforge | transformers | ratio | roofline tok/s | lmforge % | transformers % |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    compiled = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        lm = lmforge.load(tmp.name, device="cpu", dtype=dtype)
        hf = LlamaForCausalLM.from_pretrained(tmp.name, dtype=dtype).eval()
        fns = {"ours": lambda k, lm=lm: _ours(lm, prompt, k), "hf": lambda k, hf=hf: _theirs(hf, prompt, k)}
        s = _speeds(fns, 128, 1, n, rounds)
        weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        roof = bw / weight_bytes
        (po, do, co), (ph, dh, ch) = s["ours"], s["hf"]
        print(
            f"| {name} | {po:.0f} | {ph:.0f} | {po / ph:.2f}x | {do:.1f} | {dh:.1f} | {do / dh:.2f}x "
            f"| {co:.1f} | {ch:.1f} | {co / ch:.2f}x | {roof:.0f} | {do / roof:.0%} | {dh / roof:.0%} |",
            flush=True,
        )
        del hf, fns
        if args.compile:
            compiled.append((name, *_compiled(lm, prompt, n, rounds)))
    for name, secs, d, c in compiled:
        print(
            f"lmforge {name} with torch.compile (freezing, C++ wrapper): compiled in {secs:.0f} s, then "
            f"decode {d:.1f} tok/s, {c:.1f} tok/CPU-s"
        )

    # lmforge alone: decode speed as the context and the batch grow (last dtype loaded).
    contexts = [128, 1024, 2048] if args.quick else [128, 512, 1024, 2048]
    batches = [1, 8, 32] if args.quick else [1, 4, 8, 16, 32]
    for what, values in (("context", contexts), ("batch", batches)):
        rows = []
        for v in values:
            prompt_len, b = (v - n, 1) if what == "context" else (128, v)
            ids = _ids(prompt_len, b)
            fns = {"ours": lambda k, ids=ids, lm=lm: _ours(lm, ids, k)}
            rows.append(_speeds(fns, prompt_len, b, n, 1)["ours"][1:])
        where = f"prompt = context - {n} tokens, batch 1" if what == "context" else "128-token prompts"
        print(f"\nlmforge {name} decode by {what} ({where}; all rows together):")
        print(f"| {what} | " + " | ".join(map(str, values)) + " |\n|---|" + "---|" * len(values))
        print("| tok/s | " + " | ".join(f"{d:.1f}" for d, _ in rows) + " |")
        print("| tok/CPU-s | " + " | ".join(f"{c:.1f}" for _, c in rows) + " |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other processes slow every figure)")


if __name__ == "__main__":
    main()
