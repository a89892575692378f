"""`--time-budget 10m`: the best model this machine can train in a given wall-clock time.

1. Measure: a few real training steps (forward, backward, AdamW) of a probe model at the run's batch
   and sequence length give this machine's achieved FLOP/s.
2. Choose: models come from one dial, depth (d_model = 64 * depth, 64-wide heads, the family's MLP
   ratio, as in nanochat). With C = achieved FLOP/s * training seconds, the compute-optimal model has
   about 20 tokens per parameter (Chinchilla: C = 6 N D, D = 20 N). We take the largest depth the budget
   can still feed 20 tokens per parameter (parameters counted as those in matmuls: embeddings excluded,
   the output layer included, since that is what costs time).
3. Check: the chosen model is measured too, and the token count set from its own throughput.
The rest follows: steps from a global batch sized for a few hundred steps, a learning rate scaled with
width (6e-4 at d_model 768, as GPT-3 small), evaluation about ten times, a hard stop at the deadline.
"""

from __future__ import annotations

import copy
import math
import re
import time

import torch

from lmforge.config import FAMILIES, preset
from lmforge.train import distributed as D
from lmforge.train.config import RunConfig
from lmforge.utils import UserError, human_count

DEPTHS = (2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32)
TOKENS_PER_PARAM = 20
OVERHEAD = 0.10  # of the budget, for evaluation, checkpoints, the final save and start-up


def parse_duration(text: str) -> float:
    """'10m', '1h30m', '90s', '2h', '600' (seconds) -> seconds."""
    s = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise UserError(f"--time-budget {text!r}: write it like 90s, 10m, 1h30m or 2h")
    return sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)


def shape(family: str, depth: int, vocab_size: int, seq_len: int) -> dict:
    """ModelConfig overrides of the model at `depth` (on top of the family's `tiny` preset)."""
    base = preset(family, "tiny")
    d = 64 * depth
    heads = max(1, d // 64)
    gqa = FAMILIES[family]["pos_emb"] == "rope" and heads % 2 == 0  # GQA 2:1 where the family has it
    kv = heads // 2 if gqa else heads
    ratio = base.d_ff / base.d_model
    over = dict(
        d_model=d,
        n_layers=depth,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=64,
        d_ff=int(math.ceil(ratio * d / 64) * 64),
        vocab_size=vocab_size,
        max_seq_len=seq_len,
    )
    if family == "gemma":
        over["n_kv_heads"] = 1
    if family == "mistral":
        over["sliding_window"] = None if seq_len <= 4096 else 4096
    return over


def matmul_params(mc) -> int:
    return mc.n_params(embeddings=False) + mc.vocab_size * mc.d_model


def measure(
    mc,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    seconds: float = 3.0,
    max_steps: int = 6,
) -> float:
    """Training tokens/s of one process: real steps (forward, backward, AdamW) on random tokens."""
    from lmforge.model import build

    gen = torch.Generator().manual_seed(0)
    model = build(mc, device=device)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    x = torch.randint(0, mc.vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while n < max_steps and (n < 2 or time.perf_counter() - t0 < seconds):
        step()
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * batch_size * seq_len / (time.perf_counter() - t0)


def _shared(v: float, d: D.Dist) -> float:
    """The mean over ranks, so that every rank makes the same plan."""
    t = D.all_reduce(torch.tensor([v], dtype=torch.float64, device=d.device), d)
    return float(t) / d.world


def plan(cfg: RunConfig, data, d: D.Dist, dtype: torch.dtype, t_start: float, measure_fn=measure):
    """Return (a copy of cfg sized for its time budget, lines explaining the choice)."""
    if cfg.model.init_from:
        raise UserError(
            "--time-budget sizes a new model; it cannot be combined with --model.init_from "
            "(give --train.max_time to cap a fine-tuning run instead)"
        )
    budget = parse_duration(cfg.time_budget)
    cfg = copy.deepcopy(cfg)
    B, T, W = cfg.train.batch_size, cfg.data.seq_len, d.world
    vocab = data.vocab_size or preset(cfg.model.family, "tiny").vocab_size
    fam = cfg.model.family

    def config(depth):
        return preset(fam, "tiny", **shape(fam, depth, vocab, T))

    probe = 4
    tps_probe = _shared(measure_fn(config(probe), B, T, d.device, dtype), d) * W
    flops = tps_probe * config(probe).flops_per_token(T)  # achieved model FLOP/s, all processes
    left = budget - (time.time() - t_start)
    train_s = left * (1 - OVERHEAD) - 5.0  # the chosen model is measured too
    if train_s <= 10:
        raise UserError(
            f"--time-budget {cfg.time_budget}: after start-up and measuring ({budget - left:.0f}s) "
            f"too little time is left to train; give at least {int(budget - left + 30)}s"
        )
    rows = []
    for depth in DEPTHS:
        mc = config(depth)
        n = matmul_params(mc)
        rows.append((depth, mc, n, flops * train_s / mc.flops_per_token(T)))
    fits = [r for r in rows if r[3] >= TOKENS_PER_PARAM * r[2]]
    depth, mc, n, _ = fits[-1] if fits else rows[0]
    tps = tps_probe if depth == probe else _shared(measure_fn(mc, B, T, d.device, dtype), d) * W
    left = budget - (time.time() - t_start)
    train_s = left * (1 - OVERHEAD)
    tokens = int(tps * train_s)
    if tokens < TOKENS_PER_PARAM * n / 2 and depth > DEPTHS[0]:  # measured slower than estimated: one smaller
        depth, mc, n, _ = rows[DEPTHS.index(depth) - 1]
        tokens = int(
            tokens * config(DEPTHS[DEPTHS.index(depth) + 1]).flops_per_token(T) / mc.flops_per_token(T)
        )
        tps = tokens / train_s
    micro = B * T * W
    gbt = micro
    while gbt * 2 <= min(tokens / 300, 1 << 19):  # a few hundred steps at least, at most 0.5M tokens a step
        gbt *= 2
    steps = max(1, tokens // gbt)
    tokens = steps * gbt

    over = shape(fam, depth, vocab, T)
    if data.tokenizer is not None:
        over.pop("vocab_size")  # the run takes it from the tokenizer, as any run does
    cfg.model.size = "tiny"
    cfg.model.overrides = {**cfg.model.overrides, **over}
    cfg.train.tokens, cfg.train.max_steps, cfg.train.global_batch_tokens = tokens, None, gbt
    cfg.train.lr = float(f"{min(3e-3, max(1e-4, 6e-4 * 768 / mc.d_model)):.2g}")
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, steps // 20))
    cfg.train.max_time = (
        budget  # counted from the start of train(); the loop keeps time for its final eval and save
    )
    cfg.eval.every = max(1, steps // 10)
    cfg.ckpt.every = max(1, steps // 5) if budget >= 1800 else 0
    cfg.time_budget = None  # applied: the saved config.yaml resumes this exact plan

    c = flops * train_s
    n_opt = math.sqrt(c / (6 * TOKENS_PER_PARAM))
    lines = [
        f"time budget {cfg_budget_text(budget)}: measured {human_count(tps_probe)} tokens/s training a "
        f"{human_count(matmul_params(config(probe)))}-param probe = {flops / 1e9:.3g} GFLOP/s achieved "
        f"({str(dtype).replace('torch.', '')}, batch {B} x {T}{f' x {W} processes' if W > 1 else ''})",
        f"  ~{train_s:.0f}s of training = {c:.3g} FLOPs; compute-optimal (C = 6ND, D = 20N): "
        f"N ~ {human_count(n_opt)} params on {human_count(TOKENS_PER_PARAM * n_opt)} tokens",
        f"  chosen: {fam} depth {depth} (d_model {mc.d_model}, {mc.n_layers} layers, {mc.n_heads} heads) = "
        f"{human_count(n)} params in matmuls ({human_count(mc.n_params())} total)",
        f"  measured {human_count(tps)} tokens/s for it -> {human_count(tokens)} tokens "
        f"({tokens / n:.2g} per param) in {steps} steps of {human_count(gbt)} tokens, lr {cfg.train.lr:g}",
    ]
    if not fits:
        lines.append(
            "  the budget cannot give even the smallest model 20 tokens per parameter: it trains "
            "that one on all the tokens the time allows"
        )
    if data.n_train_tokens and tokens > data.n_train_tokens:
        lines.append(
            f"  note: that is {tokens / data.n_train_tokens:.1f} epochs of the "
            f"{human_count(data.n_train_tokens)}-token training split; more data would help more"
        )
    return cfg, lines


def cfg_budget_text(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
