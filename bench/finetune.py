"""Fine-tuning step speed and memory: lmforge's LoRA vs transformers + peft, and full fine-tuning vs
transformers, on the same SmolLM-135M-shaped model, weights, data and rank.

One step = forward with loss, backward, AdamW step, zero_grad (what `lmforge finetune` does per
micro-batch). LoRA: rank 16 (alpha 32) on every projection (lmforge: wqkv, wo, w_in, w_out; peft:
q/k/v/o/gate/up/down_proj, the same update), base frozen. The weights are lmforge's, saved and loaded
by transformers. Steps alternate between the contestants in rounds, so load from other processes hits
both alike; each keeps its best round. Rates are tokens per wall second and per CPU-second of this process
(time.process_time / threads: what a step costs when the machine is shared).

Memory is measured in a fresh subprocess per contestant: the peak resident size over two steps (VmHWM,
reset once the model is loaded) minus the resident size with the model loaded, i.e. what training
adds to the weights (gradients, AdamW state, activations, temporaries).

    python bench/finetune.py [--batch 4 --seq 256 --rank 16 --iters 3 --threads 2,1 --dtypes fp32,bf16
                             --only lora --smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.checkpoint import load_model, save_model  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.model import build  # noqa: E402
from lmforge.train.lora import apply_lora, freeze_base_dtype  # noqa: E402

# SmolLM-135M (HuggingFaceTB/SmolLM-135M config.json): llama, 30 layers of 576, 9 heads / 3 KV heads
SMOLLM = dict(
    family="llama",
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    max_seq_len=2048,
    rope_theta=10000.0,
    tie_embeddings=True,
    norm_eps=1e-5,
)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(d: Path, layers: int = 30) -> Path:
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        model = build(ModelConfig(**(SMOLLM | {"n_layers": layers})))
        model.init_weights(0)
        save_model(model, d)
    return d


def contestant(name: str, base: Path, rank: int, dtype: str = "fp32"):
    """(model, step function taking (ids, targets)) for one contestant.

    dtype bf16: each library's own bf16 recipe. Both train under bf16 autocast; full fine-tuning keeps
    fp32 weights (the optimizer's master copy) in both. LoRA: lmforge as `lmforge finetune --dtype bf16`
    runs it (fp32 model, frozen linear weights cast to bf16 once: lora.freeze_base_dtype); transformers
    + peft as their docs do it: the model loaded in bf16 (`dtype=torch.bfloat16`, embeddings and norms
    too), peft's adapters in fp32 (autocast_adapter_dtype)."""
    lora = name.endswith("lora")
    bf16 = dtype == "bf16"
    if name.startswith("lmforge"):
        model = load_model(base, dtype=torch.float32).train()
        if lora:
            apply_lora(model, rank=rank, alpha=2.0 * rank, targets=["all"])
            if bf16:
                freeze_base_dtype(model, torch.bfloat16)

        def loss_of(ids, tgt):
            return model(ids, tgt)

    else:
        import transformers as T

        load_dtype = torch.bfloat16 if bf16 and lora else torch.float32
        model = T.AutoModelForCausalLM.from_pretrained(base, dtype=load_dtype).train()
        if lora:
            import peft

            model = peft.get_peft_model(
                model,
                peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=HF_TARGETS, lora_dropout=0.0),
            )

        def loss_of(ids, tgt):
            # transformers shifts labels itself: labels = ids predicts ids[1:], as our (ids, tgt) pair
            return model(input_ids=ids, labels=ids).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)

    def step(ids, tgt):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(ids, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step, sum(p.numel() for p in params)


def batch(b: int, t: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, vocab, (b, t + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), seq[:, :-1].contiguous()


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(names: list[str], base: Path, a) -> dict:
    """{name: (tok/s wall, tok/s CPU, trainable params, MB)} with the contestants alternating per round."""
    ids, tgt, _ = batch(a.batch, a.seq, SMOLLM["vocab_size"])
    runs = {}
    for n in names:
        model, step, n_train = contestant(n, base, a.rank, a.dtype)
        step(ids, tgt)  # warm-up (allocations, optimizer state)
        runs[n] = (model, step, n_train)
    wall: dict = {n: [] for n in names}
    cpu: dict = {n: [] for n in names}
    for _ in range(a.iters):
        for n in names:
            w, c = time.perf_counter(), time.process_time()
            runs[n][1](ids, tgt)
            wall[n].append(time.perf_counter() - w)
            cpu[n].append((time.process_time() - c) / torch.get_num_threads())
    tokens = a.batch * a.seq

    # the best round of each: on a shared machine the least disturbed step is the closest to the truth
    out = {n: (tokens / min(wall[n]), tokens / min(cpu[n]), runs[n][2]) for n in names}
    del runs
    return out


def memory_child(name: str, base: Path, a) -> None:
    """In a fresh process: peak resident MB of two steps above the resident size with the model loaded."""
    ids, tgt, _ = batch(a.batch, a.seq, SMOLLM["vocab_size"])
    _model, step, _ = contestant(name, base, a.rank, a.dtype)
    loaded = _status("VmRSS")
    _reset_peak()
    for _ in range(2):
        step(ids, tgt)
    print(json.dumps({"loaded_mb": loaded, "train_mb": _status("VmHWM") - loaded}))


def memory(name: str, base: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--memory-of", name, "--base", str(base), "--batch", str(a.batch)]
    cmd += ["--seq", str(a.seq), "--rank", str(a.rank), "--threads", "1", "--dtypes", a.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16; alpha = 2 rank)")
    ap.add_argument(
        "--layers", type=int, default=30, help="blocks (default 30, SmolLM-135M's; fewer: quick looks)"
    )
    ap.add_argument("--iters", type=int, default=3, help="timed steps per contestant (default 3)")
    ap.add_argument(
        "--threads", default=None, help="thread counts to run, comma-separated (default: all cores, then 1)"
    )
    ap.add_argument(
        "--only", choices=["lora", "full"], default=None, help="run only LoRA or full fine-tuning"
    )
    ap.add_argument(
        "--dtypes",
        default="fp32,bf16",
        help="precisions to run, comma-separated: fp32 and/or bf16 (autocast; default both)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--smoke", action="store_true", help="a seconds-long check that it runs (2 layers, tiny batch)"
    )
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    dtypes = [t.strip() for t in a.dtypes.split(",")]
    if any(t not in ("fp32", "bf16") for t in dtypes):
        ap.error(f"--dtypes {a.dtypes}: choose from fp32, bf16")
    a.dtype = dtypes[0]
    if a.memory_of:
        torch.set_num_threads(1)
        memory_child(a.memory_of, Path(a.base), a)
        return
    if a.smoke:
        a.layers, a.batch, a.seq, a.iters, a.threads, a.no_memory = 2, 2, 32, 1, "1", True
    threads = (
        [int(t) for t in a.threads.split(",")]
        if a.threads
        else sorted({os.cpu_count() or 1, 1}, reverse=True)
    )
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp) / "smollm-135m", a.layers)
        print(machine())
        print(
            f"SmolLM-135M shape ({a.layers} layers), batch {a.batch} x {a.seq}, LoRA rank {a.rank} on every projection"
        )
        pairs = []
        if a.only in (None, "lora"):
            pairs.append(("LoRA", ["lmforge-lora", "peft-lora"]))
        if a.only in (None, "full"):
            pairs.append(("full", ["lmforge-full", "transformers-full"]))
        for a.dtype in dtypes:
            mem: dict = {}
            for th in threads:
                torch.set_num_threads(th)
                for kind, names in pairs:
                    r = timed(names, base, a)
                    if not a.no_memory and names[0] not in mem:  # the same at any thread count: once
                        mem.update((n, memory(n, base, a)) for n in names)
                    report(f"{kind} fine-tuning, {a.dtype}, {th} thread(s)", names, r, mem)


def report(title: str, names: list[str], r: dict, mem: dict) -> None:
    print(f"\n{title}:")
    for n in names:
        wall, cpu, n_train = r[n]
        m = f", training peak +{mem[n]['train_mb']:,.0f} MB over loaded" if n in mem else ""
        print(f"  {n:18s} {wall:7.1f} tok/s wall, {cpu:7.1f} tok/CPU-s, {n_train:,} trainable{m}")
    ours, theirs = names
    print(
        f"  ratio {ours} / {theirs}: {r[ours][0] / r[theirs][0]:.2f}x wall, "
        f"{r[ours][1] / r[theirs][1]:.2f}x CPU"
        + (f"; training memory {mem[ours]['train_mb'] / mem[theirs]['train_mb']:.2f}x" if mem else "")
    )


if __name__ == "__main__":
    main()
