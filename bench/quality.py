"""Quality in a time budget: the quickstart's recipe against its previous one and a plain transformers
LlamaForCausalLM.

What `lmforge quickstart` is worth is the model it gets in its few minutes, so this trains, in this
process and one after another, for the same wall-clock budget that the quickstart's pretrain stage had:

- lmforge: `train()` with the quickstart's own plan (its run's config.yaml: model, optimizer, batch,
  learning rate, warmup-stable-decay schedule, bf16 autocast where `--dtype auto` picks it, the length
  fitted to the deadline as it goes, evaluations and saves inside the budget);
- lmforge, the previous plan: what the planner chose before it knew the data and before its recipe
  (the depth the compute rule alone gives, depth 1 on a CPU, AdamW with one learning rate decaying to a
  tenth, an untied head, eager), planned by today's `plan()` with those changes undone, on the same data;
- transformers, lmforge's recipe: `LlamaForCausalLM` with the quickstart's plan's shape and the same
  initial weights (lmforge's init, saved and loaded by transformers; the plan is a Qwen3, i.e. Llama
  with QK-norm, so the Llama gets every weight but the QK-norm gains), the same token batches in the
  same order (lmforge's loader over the quickstart's shards), `torch.optim.AdamW` with the parameter
  groups of transformers' Trainer (no weight decay on biases and norms) plus lmforge's embedding group
  (no decay, 3x the learning rate), and the same batch, learning rate, betas, weight decay,
  warmup-stable-decay schedule to zero, gradient clipping and autocast, in the loop a user writes
  (forward, cross-entropy, backward, clip, step);
- transformers, the same model: as the last, but the class of the plan's own family
  (`Qwen3ForCausalLM`) with exactly lmforge's initial weights, so only the optimizer and the loop differ
  (when the plan is a Llama this row is the last one and is not run twice);
- transformers, its defaults: `LlamaForCausalLM` as above, but the optimizer and schedule of
  `TrainingArguments`' defaults (lr 5e-5, linear decay to 0, no warmup, no weight decay, betas
  0.9/0.999).

The transformers loops fit their length to the budget the way a user would: they time their first
steps and then plan the steps that fit; they stop at the deadline in any case. Their final evaluation
and save come after the budget (lmforge's are inside it). Then every model is saved as a Hugging Face
directory with the quickstart's tokenizer and scored by the same code (`lmforge.evaluate.evaluate_lm`:
every validation document, bits per byte from the tokenizer's byte lengths) on each embedded corpus's
validation split (python-docs' is the yardstick; the prepared split for another source). The
quickstart's own model is scored too, as it came out of the quickstart (trained earlier, under whatever
load there was).

So "lmforge vs its previous plan" is the planner and the recipe, "lmforge vs transformers' same model"
the optimizer (Muon, the embedding's learning rate) and the implementation's speed (more steps in the
same time), "vs LlamaForCausalLM" that and QK-norm, and "transformers, lmforge's recipe vs its
defaults" the learning rate and schedule.

    python bench/quality.py [RUN] [--threads 1] [--budget SECONDS] [--quick]

RUN is a quickstart run directory (default runs/quickstart); without one it runs the quickstart's
stages first (export skipped). --quick (or --smoke, as the other benchmarks call it) trains for a few
seconds on a small slice of python-docs (a 512-token vocabulary, a depth-2 model over 64-token windows)
in a temporary directory: a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.config import HF_ARCHITECTURE  # noqa: E402
from lmforge.train.config import RunConfig, load_config  # noqa: E402


# ----------------------------------------------------------------------------------------------- runs
def quickstart_run(run: Path, minutes: float | None) -> None:
    """Make sure `run` holds a quickstart's tokenizer, data and pretrain stages."""
    stages = run / "stages.json"
    done = json.loads(stages.read_text()) if stages.exists() else {}
    if "pretrain" in done and (run / "final" / "model.safetensors").exists():
        return
    from lmforge.quickstart import quickstart

    print(f"{run} has no finished quickstart: running its stages first (export skipped)")
    quickstart(str(run), export=False, **({"minutes": minutes} if minutes else {}))


def quick_run(root: Path) -> tuple[RunConfig, Path, Path]:
    """A few-second setup: 512-token BPE and shards from 300 python-docs documents, a depth-2 plan of
    the quickstart's family and recipe (Qwen3, tied embeddings; the Llama rows then drop QK-norm)."""
    from lmforge.data.prepare import prepare
    from lmforge.data.tokenize_corpus import train_tokenizer_on
    from lmforge.train.budget import shape

    tok_dir, data_dir = root / "tokenizer", root / "data"
    train_tokenizer_on("python-docs", 512, tok_dir, max_docs=300, verbose=False)
    prepare("python-docs", tok_dir, data_dir, max_docs=300, workers=1, progress=False, verbose=False)
    over = {f"model.{k}": v for k, v in shape("qwen3", 2, 512, 64).items() if k != "vocab_size"}
    cfg = load_config(
        None,
        {
            "name": "pretrain",
            "out_dir": str(root),
            "dtype": "auto",
            "model.family": "qwen3",
            "model.tie_embeddings": True,
            "data.path": str(data_dir),
            "data.tokenizer": str(tok_dir),
            "data.seq_len": 64,
            "train.batch_size": 8,
            "train.tokens": 10**7,  # the fit to max_time ends it
            "train.lr": 3e-3,
            "train.warmup_steps": 2,
            "train.schedule": "wsd",
            "train.optimizer": "muon",  # as a --time-budget plan's auto
            "train.muon_lr_scale": 2.0,
            "train.embedding_lr_scale": 3.0,
            "train.max_time": 3.0,
            "train.fit_time": True,
            "eval.every": 0,
            "eval.batches": 2,
            "eval.samples": 0,
            "ckpt.every": 0,
            **over,
        },
    )
    return cfg, data_dir, tok_dir


# ------------------------------------------------------------------------------------------- training
def lmforge_row(cfg: RunConfig, out: Path, name: str = "lmforge") -> dict:
    """lmforge's loop on a plan, in this process."""
    from lmforge.train import train

    c = copy.deepcopy(cfg)  # the run moves its own plan (train.tokens) as it goes
    c.name, c.out_dir, c.resume = name, str(out), "none"
    c.log.progress = False
    c0 = time.process_time()
    s = train(c)
    return {
        "path": Path(s["final"]),
        "steps": s["step"],
        "tokens": s["tokens"],
        "seconds": s["wall_time"],
        "cpu": time.process_time() - c0,
    }


def previous_plan(cfg: RunConfig) -> RunConfig:
    """The plan the quickstart made before it weighed the data and trained with Muon: today's `plan()`
    with the epoch rule off, batches for 1000 steps, an untied head and AdamW, from the quickstart's
    unplanned settings."""
    from lmforge.train import budget
    from lmforge.train.data import make_data
    from lmforge.train.distributed import Dist
    from lmforge.train.trainer import compute_dtype

    c = copy.deepcopy(cfg)
    c.time_budget = f"{cfg.train.max_time:.0f}s"
    c.model.overrides = {}
    c.model.family = "llama"  # the quickstart's family before QK-norm
    c.train = dataclasses.replace(
        RunConfig().train,
        batch_size=cfg.train.batch_size,
        optimizer="adamw",
        compile=False,  # eager, as it was
        max_time=None,
        fit_time=False,
    )
    c.eval.batches = RunConfig().eval.batches
    names = "MAX_EPOCHS", "MIN_STEPS", "TIE_EMBEDDINGS", "EMBEDDING_LR_SCALE", "MUON_LR_SCALE", "MIN_LR_RATIO"
    saved = [getattr(budget, k) for k in names]
    # no epoch rule, batches for 1000 steps, an untied head, one learning rate decaying to a tenth
    for k, v in zip(names, (float("inf"), 1000, False, 1.0, 1.0, 0.1)):
        setattr(budget, k, v)
    try:
        planned, lines = budget.plan(
            c, make_data(c), Dist(), compute_dtype(c.dtype, torch.device("cpu")), time.time()
        )
    finally:
        for k, v in zip(names, saved):
            setattr(budget, k, v)
    print("previous plan:", *(x.strip() for x in lines[:4]), sep="\n  ")
    planned.train = dataclasses.replace(planned.train, max_time=cfg.train.max_time, fit_time=True)
    return planned


def as_llama(init_dir: Path, out: Path) -> Path:
    """The initial weights as a Llama: the same tensors without what Llama has no place for (Qwen3's
    QK-norm gains); the directory itself when it is a Llama already."""
    from lmforge.checkpoint import load_model, save_model
    from lmforge.model import build

    model = load_model(init_dir, dtype=torch.float32)
    c = model.config
    if c.family == "llama":
        return init_dir
    llama = build(c.replace(family="llama", qk_norm=None))
    missing, _ = llama.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing if "rope" not in k], missing  # every Llama weight comes from the init
    save_model(llama, out)
    return out


def hf_row(
    cfg: RunConfig, recipe: str, budget: float, init_dir: Path, tok_dir: Path, out: Path, arch: str = "llama"
) -> dict:
    """An ordinary PyTorch loop around a transformers model, for `budget` seconds of wall clock: arch
    "llama" is LlamaForCausalLM, "same" the class of the plan's own family (its config.json).

    recipe "lmforge": the plan's AdamW settings (its embedding's rate included) and warmup-stable-decay
    schedule; "defaults": those of
    transformers' TrainingArguments (linear decay)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments

    from lmforge.data.loader import TokenLoader
    from lmforge.train.optim import lr_at
    from lmforge.train.trainer import compute_dtype

    t_start, c0 = time.perf_counter(), time.process_time()
    deadline = t_start + budget
    torch.manual_seed(cfg.seed)
    cls = LlamaForCausalLM if arch == "llama" else AutoModelForCausalLM
    model = cls.from_pretrained(init_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    t = cfg.train
    B, T = t.batch_size, cfg.data.seq_len
    accum = (t.global_batch_tokens or B * T) // (B * T)
    if recipe == "lmforge":
        hp = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
        clip = t.grad_clip
    else:
        d = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}  # linear decay, no warmup
        hp = dict(
            lr=d["learning_rate"],
            betas=(d["adam_beta1"], d["adam_beta2"]),
            eps=d["adam_epsilon"],
            weight_decay=d["weight_decay"],
        )
        clip = d["max_grad_norm"]
    peak = hp["lr"]
    # the parameter groups of Trainer.create_optimizer: no weight decay on biases and norms; lmforge's
    # recipe adds its embedding group (no decay, train.embedding_lr_scale times the rate; a tied head
    # is the same tensor)
    decay = set(Trainer.get_decay_parameter_names(None, model))  # (it does not use `self`)
    emb = model.get_input_embeddings().weight if recipe == "lmforge" else None
    named = [(n, p) for n, p in model.named_parameters() if p is not emb]
    wd = hp.pop("weight_decay")
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": wd},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    if emb is not None:
        groups.append({"params": [emb], "weight_decay": 0.0, "lr_scale": t.embedding_lr_scale})
    opt = torch.optim.AdamW(groups, fused=True, **hp)
    loader = TokenLoader(cfg.data.path, "train", B, T, seed=cfg.seed)
    bf16 = compute_dtype(cfg.dtype, torch.device("cpu")) == torch.bfloat16
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def lr(step: int, total: int) -> float:
        if recipe == "lmforge":
            return lr_at(step, total, t)
        return peak * max(0.0, (total - step) / total)  # transformers' linear schedule without warmup

    probe = 6  # steps timed before the length is planned (the first one warms up)
    total = t.tokens // (t.global_batch_tokens or B * T) if t.tokens else 1000  # until then
    step, t_probe = 0, None
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr(step, total) * g.get("lr_scale", 1.0)
        for _ in range(accum):
            x, y = next(loader)
            with ctx():
                logits = model(input_ids=x).logits  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        now = time.perf_counter()
        if step == 1:
            t_probe = now
        elif step == probe:  # plan the steps that fit in what is left
            per_step = (now - t_probe) / (probe - 1)
            total = probe + max(0, int((deadline - now) / per_step) - 1)
        elif t_probe is not None and step > probe and now + (now - t_probe) / (step - 1) > deadline:
            break  # the next step would end after the deadline
    seconds, cpu = time.perf_counter() - t_start, time.process_time() - c0
    path = out / f"transformers-{arch}-{recipe}"
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, path / f)
    return {"path": path, "steps": step, "tokens": step * accum * B * T, "seconds": seconds, "cpu": cpu}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/quickstart", help="a quickstart run directory")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every contestant (default 1: on a machine shared with other jobs, one "
        "thread is steadier; 0 = torch's choice)",
    )
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds per contestant (default: the quickstart's)"
    )
    ap.add_argument("--minutes", type=float, default=None, help="quickstart budget if it has to be run")
    ap.add_argument(
        "--quick",
        "--smoke",
        dest="quick",
        action="store_true",
        help="a few seconds on a small corpus in a temporary directory (RUN is not used): a smoke test",
    )
    ap.add_argument("--seed", type=int, default=None, help="seed of the weights and data order")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lmforge
    from lmforge.checkpoint import save_model
    from lmforge.evaluate import evaluate_lm
    from lmforge.model import build
    from lmforge.utils import human_count

    tmp = tempfile.TemporaryDirectory(prefix="lmforge-quality-")
    work = Path(tmp.name)
    run = None
    if args.quick:
        cfg, data_dir, tok_dir = quick_run(work)
        budget = args.budget or cfg.train.max_time
        max_tokens = 4000
    else:
        run = Path(args.run)
        quickstart_run(run, args.minutes)
        cfg = load_config(run / "pretrain" / "config.yaml")
        data_dir, tok_dir = Path(cfg.data.path), run / "tokenizer"
        stage_s = json.loads((run / "stages.json").read_text())["pretrain"]["seconds"]
        budget = args.budget or cfg.train.max_time or stage_s  # (a --steps quickstart had no budget)
        max_tokens = None
    if args.seed is not None:
        cfg.seed = args.seed
    cfg.train = dataclasses.replace(cfg.train, max_time=budget, fit_time=True)
    cfg.time_budget = None
    if args.quick:  # too short to plan: the same model with the previous optimizer
        prev = copy.deepcopy(cfg)
        prev.train = dataclasses.replace(cfg.train, optimizer="adamw")
    else:
        prev = previous_plan(cfg)
    prev_depth = prev.model.overrides.get("n_layers")

    load0 = os.getloadavg()[0]
    print(f"machine: {machine()}, torch {torch.__version__}, load average at start {load0:.1f}")
    print(
        f"budget {budget:.0f}s per contestant; data {data_dir}; model {cfg.model.family} "
        f"{ {k: v for k, v in cfg.model.overrides.items() if k in ('d_model', 'n_layers', 'n_heads')} }, "
        f"batch {cfg.train.global_batch_tokens or cfg.train.batch_size * cfg.data.seq_len} tokens, lr {cfg.train.lr:g}, {cfg.train.schedule}, "
        f"dtype {cfg.dtype}"
    )

    # the initial weights lmforge's run starts from, as a transformers directory
    from lmforge.train.data import make_data
    from lmforge.train.trainer import model_config

    mc = model_config(cfg, make_data(cfg))
    init = build(mc)
    init.init_weights(cfg.seed)
    init_dir = work / "init"
    save_model(init, init_dir)
    del init
    llama_dir = as_llama(init_dir, work / "init-llama")
    same = HF_ARCHITECTURE[mc.family]

    # one-time costs that would land in the first contestant's budget: the first AdamW imports
    # torch._dynamo (seconds), the first transformers model imports its modelling code
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    import transformers.models.llama.modeling_llama  # noqa: F401

    rows = []
    if run is not None:
        pre = json.loads((run / "stages.json").read_text())["pretrain"]
        rows.append(
            (
                "lmforge quickstart (its own run)",
                {
                    "path": run / "final",
                    "steps": pre["steps"],
                    "tokens": pre["tokens"],
                    "seconds": pre["seconds"],
                    "cpu": None,
                },
            )
        )
    contestants = [
        ("lmforge, the quickstart's plan", lambda: lmforge_row(cfg, work)),
        (
            f"lmforge, the previous plan (AdamW, depth {prev_depth})",
            lambda: lmforge_row(prev, work, "previous"),
        ),
        (
            "transformers LlamaForCausalLM, lmforge's recipe"
            + (f" (the plan's {same} without what Llama lacks)" if llama_dir != init_dir else ""),
            lambda: hf_row(cfg, "lmforge", budget, llama_dir, tok_dir, work),
        ),
        (
            "transformers LlamaForCausalLM, TrainingArguments defaults",
            lambda: hf_row(cfg, "defaults", budget, llama_dir, tok_dir, work),
        ),
    ]
    if llama_dir != init_dir:  # the plan's own architecture in transformers too: the optimizer alone
        contestants.insert(
            3,
            (
                f"transformers {same} (the same model), lmforge's recipe",
                lambda: hf_row(cfg, "lmforge", budget, init_dir, tok_dir, work, arch="same"),
            ),
        )
    for name, fn in contestants:
        load = os.getloadavg()[0]
        r = fn()
        r["load"] = (load, os.getloadavg()[0])
        print(
            f"{name}: {r['steps']} steps, {human_count(r['tokens'])} tokens in {r['seconds']:.1f}s "
            f"({r['cpu']:.1f} CPU s); load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}",
            flush=True,
        )
        rows.append((name, r))

    # each embedded corpus on its own validation split (python-docs' is the yardstick); else the prepared one
    from lmforge.data.embedded import PARTS

    source = json.loads((data_dir / "meta.json").read_text()).get("source")
    splits = {k: k for k in PARTS.get(source, ())} or {"val": str(data_dir)}
    print()
    print(
        "| model | params | steps | tokens trained | training seconds | tokens/s | tokens per CPU-s | "
        + " | ".join(f"{k} val bits/byte" for k in splits)
        + " |"
    )
    print("|---|---|---|---|---|---|---|" + "---|" * len(splits))
    for name, r in rows:
        lm = lmforge.load(r["path"], device="cpu")
        bpb = [
            evaluate_lm(lm.model, lm.tokenizer, src, max_tokens=max_tokens)["bits_per_byte"]
            for src in splits.values()
        ]
        n = lm.model.num_params()
        per_cpu = f"{r['tokens'] / r['cpu']:,.0f}" if r["cpu"] else "-"
        print(
            f"| {name} | {human_count(n)} | {r['steps']} | {human_count(r['tokens'])} | {r['seconds']:.0f} | "
            f"{r['tokens'] / max(r['seconds'], 1e-9):,.0f} | {per_cpu} | "
            + " | ".join(f"{x:.4f}" for x in bpb)
            + " |",
            flush=True,
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
