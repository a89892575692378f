"""Generation speed: lmforge's engine vs transformers' `generate` and llama.cpp on the same weights.

A SmolLM-135M-shaped Llama (random weights, a small trained tokenizer so that it exports to GGUF) is
saved once; every precision is one group of contestants on the same weights, in the same process:

    precision  lmforge (eager; also compiled with --compile)   transformers   llama.cpp (GGUF)
    fp32       fp32                                            fp32           f32
    bf16       bf16                                            bf16           bf16
    int8       weight-only int8 (lmforge quantize)             bf16           q8_0
    int4       weight-only int4, group 64                      bf16           -

For each: batch-1 prefill tokens/s (a 128-token prompt) and decode tokens/s (greedy, no early stop),
each contestant timed as generate(N tokens) - generate(1 token) so that all pay their own setup, the
contestants alternating so that other load on the machine hits them alike; per wall-clock second and
per CPU-second of this process (which other load disturbs much less). Decode streams every weight once
per step, so the roofline is memory bandwidth (a large tensor sum on huge pages, measured in this
run; the 4 KiB-page figure is printed too) / the bytes of weights each contestant reads per step; the
table shows the share of it each one reaches. Then
lmforge alone as the context grows (128 -> 2048 tokens), and lmforge and llama.cpp (its batched
decoding: one sequence per row in one cache, as llama-batched-bench) as the batch grows (1 -> 32 rows).

    python bench/decode.py                   # fp32, bf16, int8 (~10 minutes on 2 cores)
    python bench/decode.py --quick           # fewer tokens and shorter sweeps
    python bench/decode.py --compile         # also lmforge with torch.compile (minutes to compile)
    python bench/decode.py --threads 1       # one thread per contestant (a machine shared with others)
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
from common import compiled_engine, generation_speeds, machine, memory_bandwidth  # noqa: E402

import lmforge  # noqa: E402
from lmforge import kernels  # noqa: E402
from lmforge.checkpoint import save_model  # noqa: E402
from lmforge.compress.quantize import quantize  # noqa: E402
from lmforge.config import preset  # noqa: E402
from lmforge.export import export  # noqa: E402
from lmforge.infer import generate  # noqa: E402
from lmforge.model import build  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

# precision -> (how lmforge gets it, transformers' dtype, llama.cpp's GGUF type or None)
PRECISIONS = {
    "fp32": (dict(dtype="fp32"), torch.float32, "f32"),
    "bf16": (dict(dtype="bf16"), torch.bfloat16, "bf16"),
    "int8": (dict(method="int8"), torch.bfloat16, "q8_0"),
    "int4": (dict(method="int4", group_size=64), torch.bfloat16, None),
}


def _ids(n: int, rows: int = 1, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, n), generator=torch.Generator().manual_seed(n + rows))


def _ours(lm, ids: torch.Tensor, n: int):
    return lambda: generate(
        lm.model, lm.tokenizer, ids.tolist(), max_new_tokens=n, temperature=0, ignore_eos=True
    )


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


def _llama_cpp(llm, ids: torch.Tensor, n: int):
    prompt = ids[0].tolist()
    return lambda: llm.greedy(prompt, n)


def _weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads: saved tensors, each storage once (tied ones too)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(seen.values())


def _load(path: Path, **kw):
    """lmforge.load with the decode kernels installed (what lmforge.load does by default; explicit here
    because they are what this benchmark measures)."""
    lm = lmforge.load(path, device="cpu", **kw)
    kernels.install(lm.model)
    return lm


def _variant(src: Path, name: str, d: Path) -> tuple[Path, dict]:
    """(checkpoint directory, lmforge.load kwargs) of precision `name` made from the fp32 checkpoint."""
    how = PRECISIONS[name][0]
    if "method" not in how:
        return src, {"dtype": how["dtype"]}
    out = d / name
    if not out.exists():
        quantize(src, out, how["method"], how.get("group_size", 64), eval_data=None, log=lambda *a: None)
    return out, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and shorter sweeps")
    ap.add_argument(
        "--dtypes", default="fp32,bf16,int8", help=f"comma-separated precisions of {list(PRECISIONS)}"
    )
    ap.add_argument(
        "--new-tokens", type=int, default=None, help="tokens decoded per measurement (default 64)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, best kept (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time lmforge's torch.compile'd decode step (minutes more, to compile)",
    )
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even if installed")
    ap.add_argument(
        "--no-sweeps", action="store_true", help="skip the context and batch sweeps (lmforge alone)"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that the script runs (debug-size model, fp32, 4 tokens, one round): no figures",
    )
    args = ap.parse_args()
    if args.smoke:
        args.quick, args.dtypes, args.new_tokens, args.rounds = True, "fp32", 4, 1
    bad = [d for d in args.dtypes.split(",") if d not in PRECISIONS]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from {list(PRECISIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    n = args.new_tokens or (32 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 3)
    P = 128  # prompt tokens

    from transformers import LlamaForCausalLM

    llama_cpp = None
    if not args.no_llama_cpp:
        try:
            from lmforge.export.llama_cpp import LlamaCpp, LlamaCppUnavailable

            llama_cpp = LlamaCpp
        except ImportError as e:  # the module itself is missing in an older checkout
            print(f"(llama.cpp: {e})")
    text = [f"line {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} lazy dogs.\n" for i in range(400)]
    tok = train_tokenizer(text, 1024)  # any tokenizer: GGUF files carry one; the weights are random
    torch.manual_seed(0)
    size = "debug" if args.smoke else "smollm-135m"
    over = dict(vocab_size=49152, max_seq_len=2048) if args.smoke else {}
    cfg = preset(size=size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **over)
    tmp = tempfile.TemporaryDirectory(prefix="lmforge-bench-decode-")
    d = Path(tmp.name)
    save_model(build(cfg), d / "fp32", tokenizer=tok)
    load0 = os.getloadavg()[0]
    bw = memory_bandwidth()  # on huge pages, where lmforge's decode weights are
    bw_small = memory_bandwidth(huge=False)  # PyTorch's ordinary allocation (4 KiB pages)
    print(f"machine: {machine()}, torch {torch.__version__}, load average {load0:.1f}")
    print(f"model: {size} shape, {cfg.n_params() / 1e6:.1f}M parameters, random weights")
    print(
        f"memory bandwidth (sum of a 512 MB tensor, {threads} threads): {bw / 1e9:.1f} GB/s on huge pages "
        f"(the roofline below), {bw_small / 1e9:.1f} GB/s on 4 KiB pages"
    )
    print(f"batch 1, {P}-token prompt, {n} new tokens (greedy, no early stop), best of {rounds}\n")
    print(
        "| precision | runtime | weights MB | prefill tok/s | decode tok/s | decode tok/CPU-s "
        "| x transformers (CPU-s) | % roofline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    prompt = _ids(P, vocab=cfg.vocab_size)
    compile_s = {}
    for name in args.dtypes.split(","):
        _, hf_dtype, gguf_type = PRECISIONS[name]
        path, kw = _variant(d / "fp32", name, d)
        lm = _load(path, **kw)
        hf = LlamaForCausalLM.from_pretrained(d / "fp32", dtype=hf_dtype).eval()
        hf_name = f"transformers {'bf16' if hf_dtype == torch.bfloat16 else 'fp32'}"
        fns = {
            "lmforge": lambda k, lm=lm: _ours(lm, prompt, k),
            hf_name: lambda k, hf=hf: _theirs(hf, prompt, k),
        }
        sizes = {"lmforge": _weight_bytes(lm.model), hf_name: _weight_bytes(hf)}
        if args.compile:
            t0 = time.perf_counter()
            run = compiled_engine(_load(path, **kw), prompt[0].tolist(), n)
            run(2)()  # compiles the decode step
            compile_s[name] = time.perf_counter() - t0
            fns["lmforge compiled"], sizes["lmforge compiled"] = run, sizes["lmforge"]
        llm = sweep_gguf = None
        if llama_cpp is not None and gguf_type is not None:
            try:
                gguf = export(d / "fp32", "gguf", d / f"model-{gguf_type}.gguf", dtype=gguf_type)
                sweep_gguf = (gguf, gguf_type)
                llm = llama_cpp(gguf, n_ctx=P + n + 8, n_threads=threads)
                key = f"llama.cpp {gguf_type}"
                fns[key] = lambda k, llm=llm: _llama_cpp(llm, prompt, k)
                sizes[key] = gguf.stat().st_size
            except (LlamaCppUnavailable, RuntimeError) as e:
                print(f"(llama.cpp {gguf_type}: {e})")
        s = generation_speeds(fns, P, 1, n, rounds)
        ref = s[hf_name][2]
        for who, (pre, dec, dec_cpu) in s.items():
            roof = bw / sizes[who]
            print(
                f"| {name} | {who} | {sizes[who] / 1e6:.0f} | {pre:.0f} | {dec:.1f} | {dec_cpu:.1f} "
                f"| {dec_cpu / ref:.2f}x | {dec / roof:.0%} |",
                flush=True,
            )
        if llm is not None:
            llm.close()
        del hf, fns
    for name, secs in compile_s.items():
        print(f"lmforge compiled ({name}): the decode step compiled in {secs:.0f} s (cached on disk after)")
    if args.no_sweeps:
        return

    # decode speed as the context grows (lmforge) and as the batch grows (lmforge, and llama.cpp's
    # batched decoding of as many sequences in one cache), at the last precision loaded
    contexts = [128, 1024, 2048] if args.quick else [128, 512, 1024, 2048]
    batches = [1, 8, 32] if args.quick else [1, 4, 8, 16, 32]
    for what, values in (("context", contexts), ("batch", batches)):
        rows: dict[str, list] = {}
        for v in values:
            prompt_len, b = (v - n, 1) if what == "context" else (P, v)
            ids = _ids(prompt_len, b, cfg.vocab_size)
            fns = {"lmforge": lambda k, ids=ids, lm=lm: _ours(lm, ids, k)}
            llm = None
            if what == "batch" and sweep_gguf is not None:
                llm = llama_cpp(sweep_gguf[0], n_ctx=P + n + 8, n_threads=threads, n_seq=b)
                prompts = ids.tolist()
                fns[f"llama.cpp {sweep_gguf[1]}"] = lambda k, llm=llm, p=prompts: (
                    lambda: llm.greedy_batch(p, k)
                )
            for who, (_, dec, dec_cpu) in generation_speeds(fns, prompt_len, b, n, 1).items():
                rows.setdefault(who, []).append((dec, dec_cpu))
            if llm is not None:
                llm.close()
        where = f"prompt = context - {n} tokens, batch 1" if what == "context" else f"{P}-token prompts"
        print(f"\n{name} decode by {what} ({where}; tokens of all rows together):")
        print(f"| {what} | " + " | ".join(map(str, values)) + " |\n|---|" + "---|" * len(values))
        for who, r in rows.items():
            print(f"| {who} tok/s | " + " | ".join(f"{d:.1f}" for d, _ in r) + " |")
            print(f"| {who} tok/CPU-s | " + " | ".join(f"{c:.1f}" for _, c in r) + " |")
        if len(rows) == 2:
            (_, ours), (_, theirs) = rows.items()
            print(
                "| lmforge / llama.cpp | "
                + " | ".join(f"{a[0] / b[0]:.2f}x" for a, b in zip(ours, theirs))
                + " |"
            )
        sys.stdout.flush()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other processes slow every figure)")


if __name__ == "__main__":
    main()
