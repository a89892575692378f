"""Export benchmark: export time and size per format, and greedy decode speed of the exported model
in onnxruntime (KV-cache graph and full recompute) and llama.cpp (lmforge.export.llama_cpp, when
llama-cpp-py-sync is installed) against lmforge's own PyTorch generate on the same random weights,
timed in alternation.

    .venv/bin/python bench/export.py [--size small] [--prompt 64] [--new 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

import lmforge
from lmforge.checkpoint import save_model
from lmforge.config import preset
from lmforge.export import export
from lmforge.export.llama_cpp import LlamaCpp, LlamaCppUnavailable
from lmforge.export.onnx_runner import OnnxLM
from lmforge.model import build
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import dir_size, human_bytes

try:
    from common import compare, machine
except ImportError:  # run from the repository root as a module
    from bench.common import compare, machine


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn):
    w, c = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w, cpu_seconds() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="preset size of the llama model (default: small)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="generated tokens")
    ap.add_argument("--iters", type=int, default=5, help="timed runs per runtime (median reported)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check that the script runs (debug size, 8 + 4 tokens, one timed run): no figures",
    )
    a = ap.parse_args()
    if a.smoke:
        a.size, a.prompt, a.new, a.iters = "debug", 8, 4, 1
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-export-") as tmp:
        run(a, Path(tmp))


def run(a, d: Path) -> None:
    text = [f"line {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} lazy dogs.\n" for i in range(400)]
    tok = train_tokenizer(text, 1024)
    torch.manual_seed(0)
    cfg = preset("llama", a.size, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_model(build(cfg), d / "ckpt", tokenizer=tok)
    n_params = build(cfg, meta=True).num_params()
    print(
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. torch {torch.__version__}. "
        f"Load average at start: {os.getloadavg()[0]:.1f}."
    )
    print(f"Model: llama preset {a.size!r}, {n_params / 1e6:.1f}M parameters, fp32 weights.\n")
    rows = []
    for fmt, kw, name in (
        ("onnx", {"with_cache": True}, "onnx --with-cache (2 graphs + check)"),
        ("gguf", {"dtype": "f32"}, "gguf f32"),
        ("gguf", {"dtype": "f16"}, "gguf f16"),
        ("gguf", {"dtype": "q8_0"}, "gguf q8_0"),
    ):
        out = d / f"{fmt}-{kw.get('dtype', 'x')}"
        _, wall, cpu = timed(lambda: export(d / "ckpt", fmt, out, **kw))  # noqa: B023
        rows.append((name, f"{wall:.1f} s", f"{cpu:.1f} s", human_bytes(dir_size(out))))
    print("| export | wall clock | CPU time | size |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")

    lm = lmforge.load(d / "ckpt", device="cpu")
    prompt = torch.randint(
        0, cfg.vocab_size, (a.prompt,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    ort_cache, ort_full = OnnxLM(d / "onnx-x"), OnnxLM(d / "onnx-x", use_cache=False)
    fns = {
        "lmforge generate (PyTorch, KV cache)": lambda: lm.generate(
            prompt, max_new_tokens=a.new, temperature=0, ignore_eos=True
        ),
        "onnxruntime, model_with_past.onnx": lambda: ort_cache.generate(prompt, a.new),
        "onnxruntime, model.onnx (full recompute)": lambda: ort_full.generate(prompt, a.new),
    }
    try:
        for dt in ("f32", "q8_0"):
            llm = LlamaCpp(d / f"gguf-{dt}", n_ctx=a.prompt + a.new, n_threads=torch.get_num_threads())
            # greedy: the prompt in one batch, then one llama_decode per token (argmax in numpy)
            fns[f"llama.cpp (llama-cpp-py-sync), {dt}"] = lambda llm=llm: llm.greedy(prompt, a.new)
    except LlamaCppUnavailable as e:
        print(f"\n(no llama.cpp row: {e})")
    same = {k: f() for k, f in fns.items()}
    ref = same["lmforge generate (PyTorch, KV cache)"]
    times = compare(fns, warmup=1, iters=a.iters)
    print(
        f"\nGreedy generation, prompt {a.prompt} + {a.new} new tokens, batch 1, "
        f"{torch.get_num_threads()} threads; median of {a.iters} runs, timed in alternation.\n"
    )
    cpu = {k: timed(f)[2] for k, f in fns.items()}  # CPU seconds of one more call (all threads)
    print("| runtime | seconds per call | tokens/s (new) | CPU s per call | same tokens as lmforge |")
    print("|---|---|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {t:.3f} | {a.new / t:.0f} | {cpu[k]:.2f} | {'yes' if same[k] == ref else 'no'} |")


if __name__ == "__main__":
    main()
