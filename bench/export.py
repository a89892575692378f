"""GGUF quantization benchmark: for each llama.cpp type, file size, llama.cpp bits-per-byte on held-out
text against lmforge's fp32 model on the same tokens, and llama.cpp greedy decode tokens/s.

Two models: a trained one (runs/quickstart/final if present, else a width-256 llama trained here for
a few hundred steps on Python standard-library sources, so that the k-quants' 256-blocks apply) for
bits-per-byte, and the SmolLM2-135M shape (its real config.json, random weights) for size and speed.

    .venv/bin/python bench/export.py [--steps 300] [--types f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--smoke]
    .venv/bin/python bench/export.py --runtimes [--size small] [--prompt 64] [--new 32]   # ONNX vs llama.cpp
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.config import ModelConfig, preset
from lmforge.export import export
from lmforge.export.gguf import export_gguf
from lmforge.export.llama_cpp import LlamaCpp
from lmforge.lm import LM
from lmforge.model import build
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.utils import dir_size, human_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SEQ = 128  # scoring window (non-overlapping), tokens


def stdlib_texts(n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    """Python standard-library sources: the first n_train files (sorted) train, the next n_val score."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[: n_train + n_val]]
    return texts[:n_train], texts[n_train:]


def train_small(d: Path, steps: int, train: list[str]) -> Path:
    """A width-256 llama (k-quant friendly) trained on `train` for `steps` AdamW steps."""
    tok = train_tokenizer(train, 4096)
    ids = torch.tensor([i for t in train for i in tok.encode(t, bos=True, eos=True)])
    cfg = preset(
        "llama", "debug", vocab_size=4096, d_model=256, d_ff=768, n_layers=4, n_heads=4, n_kv_heads=2,
        max_seq_len=SEQ, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, len(ids) - SEQ - 1, (16,), generator=g)
        x = torch.stack([ids[s : s + SEQ + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for pg in opt.param_groups:
            pg["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  train step {step}: loss {loss.item():.3f}", flush=True)
    save_model(model.eval(), d, tokenizer=tok)
    return d


def windows(tok: Tokenizer, texts: list[str], max_windows: int) -> list[list[int]]:
    ids = [i for t in texts for i in tok.encode(t, bos=True)]
    return [ids[s : s + SEQ] for s in range(0, len(ids) - SEQ, SEQ)][:max_windows]


def nll_bits(logits: np.ndarray, w: list[int]) -> float:
    """Bits to code tokens w[1:] from logits of positions 0..n-2, (n, V)."""
    x = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return float((lse - x[np.arange(len(w) - 1), w[1:]]).sum() / math.log(2))


def bits_per_byte_lmforge(model, tok, wins) -> float:
    nb = tok.token_bytes()
    bits = nbytes = 0.0
    with torch.no_grad():
        for w in wins:
            bits += nll_bits(model(torch.tensor([w]))[0].numpy(), w)
            nbytes += float(nb[w[1:]].sum())
    return bits / nbytes


def bits_per_byte_llama(path: Path, tok, wins, threads: int) -> float:
    nb = tok.token_bytes()
    bits = nbytes = 0.0
    with LlamaCpp(path, n_ctx=SEQ, n_threads=threads) as llm:
        for w in wins:
            llm.reset()
            bits += nll_bits(llm.eval(w), w)
            nbytes += float(nb[w[1:]].sum())
    return bits / nbytes


def decode_speed(path: Path, threads: int, n: int, rounds: int) -> float:
    """llama.cpp greedy decode tokens/s (16-token prompt, then one llama_decode per token); median."""
    with LlamaCpp(path, n_ctx=16 + n, n_threads=threads) as llm:
        prompt = list(range(1, 17))
        llm.greedy(prompt, 4)  # warm-up
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            llm.greedy(prompt, n)
            times.append(time.perf_counter() - t)
    return n / sorted(times)[len(times) // 2]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn):
    w, c = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w, cpu_seconds() - c


def runtimes(a, d: Path) -> None:
    """The earlier comparison: export time and size per format, and greedy decode speed in onnxruntime
    and llama.cpp against lmforge generate on the same random weights (the "Export" section of
    docs/benchmarks.md)."""
    import lmforge
    from lmforge.evaluate.bench import compare, machine
    from lmforge.export.llama_cpp import LlamaCppUnavailable
    from lmforge.export.onnx_runner import OnnxLM

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps", type=int, default=300, help="training steps of the small model (no quickstart)"
    )
    ap.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0", help="GGUF types, comma-separated")
    ap.add_argument("--windows", type=int, default=24, help=f"validation windows of {SEQ} tokens scored")
    ap.add_argument("--new", type=int, default=32, help="tokens decoded per speed run")
    ap.add_argument("--rounds", type=int, default=3, help="speed runs per type (median)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads (1: ggml's spinning threads crawl on a shared, loaded machine)",
    )
    ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2-135M-shape rows")
    ap.add_argument(
        "--smoke", action="store_true", help="a quick check that both parts (and --runtimes) run: no figures"
    )
    ap.add_argument(
        "--runtimes",
        action="store_true",
        help="instead: export time/size per format and greedy decode speed in onnxruntime and llama.cpp "
        "against lmforge generate (random weights of the llama preset --size)",
    )
    ap.add_argument("--size", default="small", help="--runtimes: preset size of the llama model")
    ap.add_argument("--prompt", type=int, default=64, help="--runtimes: prompt tokens")
    ap.add_argument("--iters", type=int, default=5, help="--runtimes: timed runs per runtime (median)")
    a = ap.parse_args()
    if a.runtimes or a.smoke:  # --smoke checks both parts run
        if a.smoke:
            a.size, a.prompt, a.new, a.iters = "debug", 8, 4, 1
        with tempfile.TemporaryDirectory(prefix="lmforge-bench-export-") as tmp:
            runtimes(a, Path(tmp))
        if a.runtimes:
            return
    if a.smoke:
        a.steps, a.types, a.windows, a.new, a.rounds, a.no_smollm = 5, "f16,q4_k_m", 2, 4, 1, True
    types = a.types.split(",")
    train, val = stdlib_texts(60, 20)
    print(f"Date {time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
          f"llama.cpp threads {a.threads}; torch {torch.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-gguf-") as tmp:
        d = Path(tmp)
        qs = Path("runs/quickstart/final")
        ckpt = qs if (qs / "config.json").is_file() else train_small(d / "small", a.steps, train)
        model = load_model(ckpt, dtype=torch.float32).eval()
        tok = Tokenizer.load(ckpt)
        wins = windows(tok, val, a.windows)
        ref = bits_per_byte_lmforge(model, tok, wins)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\nTrained model: {ckpt if ckpt == qs else 'llama width 256, 4 layers, trained here'} "
              f"({n_params / 1e6:.1f}M parameters, {a.steps} steps); {len(wins)} windows of {SEQ} tokens "
              f"of held-out stdlib sources; lmforge fp32: {ref:.4f} bits/byte\n")  # fmt: skip
        print("| type | file size | llama.cpp bits/byte | vs lmforge fp32 | decode tok/s |")
        print("|---|---|---|---|---|")
        for t in ["f32", *types]:
            out = export(ckpt, "gguf", d / f"small-{t}.gguf", dtype=t)
            bpb = bits_per_byte_llama(out, tok, wins, a.threads)
            speed = decode_speed(out, a.threads, a.new, a.rounds)
            size = out.stat().st_size / 2**20
            print(
                f"| {t} | {size:.1f} MiB | {bpb:.4f} | {100 * (bpb - ref) / ref:+.2f}% | {speed:.0f} |",
                flush=True,
            )
            out.unlink()
        if a.no_smollm:
            return
        from hub_models import HUB

        import lmforge.hf as hf

        cfg: ModelConfig = hf.config_from_hf(dict(HUB["smollm2-135m"]))
        torch.manual_seed(0)
        big = build(cfg).eval()
        btok = train_tokenizer(train[:20], 4096)  # the vocabulary is padded to SmolLM's 49152 rows
        print(f"\nSmolLM2-135M shape (hub config.json, random weights, {big.num_params() / 1e6:.0f}M "
              "parameters; widths 576/1536 are not multiples of 256, so the k-quants fall back to 32-blocks "
              "for those tensors, as llama.cpp's own SmolLM files do)\n")  # fmt: skip
        print("| type | file size | decode tok/s |")
        print("|---|---|---|")
        lm = LM(big, btok, None)
        for t in ["f32", *types]:
            out = export_gguf(lm, d / f"smollm-{t}.gguf", dtype=t, name="smollm-shape")
            speed = decode_speed(out, a.threads, a.new, a.rounds)
            print(f"| {t} | {out.stat().st_size / 2**20:.1f} MiB | {speed:.1f} |", flush=True)
            out.unlink()


if __name__ == "__main__":
    main()
