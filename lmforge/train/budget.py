"""`--time-budget 10m`: the best model this machine can train in a given wall-clock time.

1. Measure: two real training steps (forward, backward, AdamW) of the smallest model at the run's batch
   and sequence length give this machine's achieved FLOP/s; other sizes are extrapolated with the FLOP
   model (6N + attention per token). Larger models achieve more (on a GPU many times more), so the
   chosen depth is measured too, and the next ones up while they could still fit.
2. Choose: models come from one dial, depth (d_model = 64 * depth, 64-wide heads, the family's MLP
   ratio, as in nanochat). With C = achieved FLOP/s * training seconds, the compute-optimal model has
   about 20 tokens per parameter (Chinchilla: C = 6 N D, D = 20 N). We take the largest depth the budget
   can still feed 20 tokens per parameter (parameters counted as those in matmuls: embeddings excluded,
   the output layer included, since that is what costs time). A budget of minutes on a CPU cannot give
   even the smallest depth that many; it then trains the smallest one on all the tokens the time allows,
   which beat the next depth on fewer tokens in the same time when we measured it (docs/training.md).
3. Weigh the data: repeated tokens lose their worth as the epochs grow (Muennighoff et al. 2023,
   "Scaling Data-Constrained Language Models": almost the worth of new ones up to ~4 epochs at their
   scale, then quickly less). When the chosen depth would see the training split more than MAX_EPOCHS
   (1.5) times, the model grows instead, one depth at a time (each one measured), until its plan stays
   within MAX_EPOCHS, but never to more parameters in matmuls than unique tokens. 1.5, not 4: at the
   quickstart's budget (5 minutes, 3M unique tokens, Muon) depth 1 at 4.3 epochs reached 1.73 bits per
   byte, depth 2 at 2.7 epochs 1.57, depth 3 at 1.5 epochs 1.54 and depth 4 at 1.0 epoch 1.66
   (docs/training.md); the planner's first measurements in a fresh process can be ~30% slow, and 1.5
   still lands on depth 3 then.
4. Fit: a warmup-stable-decay schedule keeps the learning rate at its peak until the last fifth of the
   steps, so the run may still move its end while it goes: the loop re-measures its own pace after every
   step and ends the run at the deadline (`Pace`, train.fit_time), whatever the first estimate was.
A budget of COMPILE_MIN_SECONDS (2 minutes) or more also compiles the model (torch.compile) unless
--train.compile says otherwise: the compile costs seconds of the budget (~30 on a 2-core CPU) and the
steps then run faster (1.9x at the quickstart's size), which the fit of step 4 turns into tokens.
On a CPU the run also picks its thread count: all cores, or one when other jobs hold the cores and
one thread trains faster (`Threads`, re-checked as the run goes).
The rest follows: a global batch sized for 600 steps or more (short runs are short of steps more
than of tokens per step; on a CPU up to 4K tokens of it in one micro-batch, and a compiled run's
tokens counted at CPU_COMPILE_SPEEDUP times the eager pace measured), a learning rate scaled with
width (6e-4 at d_model 768, as GPT-3 small), tied embeddings at 3x that rate (TIE_EMBEDDINGS,
EMBEDDING_LR_SCALE), Muon's matrices at 2x (MUON_LR_SCALE), a decay to zero (MIN_LR_RATIO), each
measured alone at the quickstart's budget;
evaluation a handful of times on a bounded number of validation tokens (a few percent of the training
compute in all), a hard stop at the deadline.
"""

from __future__ import annotations

import copy
import math
import re
import time

import torch

from lmforge.config import FAMILIES, preset
from lmforge.train import distributed as D
from lmforge.train.config import RunConfig, TrainSection
from lmforge.utils import UserError, human_count

DEPTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32)
TOKENS_PER_PARAM = 20
OVERHEAD = 0.05  # of the budget, for evaluation, checkpoints, the final save and start-up
MIN_STEPS = 600  # the global batch grows only while the run keeps at least this many steps (at the
# quickstart's budget 4K-token steps beat 2K at depth 3 with Muon, 1.537 vs 1.571 bits per byte)
EVALS = 5  # evaluations during the run (and one at the start and one at the end)
EVAL_SHARE = 0.03  # at most this share of the training compute goes to evaluation
LR_768, LR_MAX = 6e-4, 3e-3  # the peak learning rate: 6e-4 at d_model 768 (GPT-3 small), scaled 1/width
MAX_EPOCHS = 1.5  # a plan repeating its data more often than this grows the model instead (step 3)
MAX_PARAMS_PER_TOKEN = 1.0  # but never to more parameters in matmuls than unique tokens
TIE_EMBEDDINGS = True  # the output head is the token embedding (measured: 1.480 vs 1.551 bits per byte
# at the quickstart's budget; the embedding rows then learn from every position's output gradient)
MIN_LR_RATIO = 0.0  # the decay ends at zero (1.453 vs 1.480 ending at a tenth of the peak)
EMBEDDING_LR_SCALE = 3.0  # the (tied) embedding's learning rate, times train.lr (1.457 vs 1.480; 10x: 1.519)
MUON_LR_SCALE = 2.0  # Muon's matrices at twice train.lr (1.461 vs 1.480; with the rest: 1.433 vs 1.444)
CPU_COMPILE_SPEEDUP = 2.0  # a compiled CPU run's tokens/s over the eager steps the planner measures, for
# the plan's tokens and batch (the pace fit corrects the rest): the quickstart's model measured 8.4-10K
# tokens/s eager at 8 x 256 and trained 22-27K compiled at 16 x 256; with eager's tokens the batch rule
# (MIN_STEPS) gave it 2K-token steps at 12K tokens/s, and 1.464 bits per byte instead of ~1.36
CPU_MICRO_TOKENS = 4096  # on a CPU a global batch up to this many tokens per process runs as one
# micro-batch, not accumulated: at the quickstart's size one 16 x 256 micro-batch trained 1.1x the
# tokens/s of two of 8 x 256 (larger matmuls, half the per-call overhead), for a few MB more activations
COMPILE_MIN_SECONDS = 120  # a budget this long or longer compiles the model (train.compile) when it can:
# at the quickstart's budget the compile took ~30 s and the steps then ran 1.9x faster (1.373 bits per
# byte on python-docs against 1.461 eager, 5.36M tokens against 3.74M in the same 5 minutes)


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
    seconds: float = 1.0,
    max_steps: int = 4,
    give_up: float | None = None,
    optimizer: str = "adamw",
) -> float:
    """Training tokens/s of one process: real steps (forward, backward, the run's optimizer) on random
    tokens; one warm-up step, then at least two timed ones (more while they take under `seconds` in all).
    If the warm-up step alone takes over `give_up` seconds, its own rate is returned (a clear loser)."""
    from lmforge.model import build
    from lmforge.train.optim import build_optimizer

    gen = torch.Generator().manual_seed(0)
    model = build(mc, device=device)
    model.init_weights(0)
    opt = build_optimizer(model, TrainSection(lr=1e-4, optimizer=optimizer), device)
    x = torch.randint(0, mc.vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    if give_up is not None and time.perf_counter() - t0 > give_up:
        return batch_size * seq_len / (time.perf_counter() - t0)
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
    if cfg.train.optimizer == "auto":  # Muon trains a budget's model better (docs/training.md); not FSDP2's
        cfg.train.optimizer = "adamw" if d.parallel == "fsdp" else "muon"
    B, T, W = cfg.train.batch_size, cfg.data.seq_len, d.world
    vocab = data.vocab_size or preset(cfg.model.family, "tiny").vocab_size
    fam = cfg.model.family
    # tied embeddings (TIE_EMBEDDINGS, or a family that ties them), unless the user said otherwise
    tied = TIE_EMBEDDINGS or FAMILIES[fam].get("tie_embeddings", False)
    tie = {"tie_embeddings": cfg.model.overrides.get("tie_embeddings", tied)}

    def config(depth):
        return preset(fam, "tiny", **shape(fam, depth, vocab, T), **tie)

    def measured(depth, **kw) -> float:  # tokens/s of all processes
        kw.setdefault("optimizer", cfg.train.optimizer)
        return _shared(measure_fn(config(depth), B, T, d.device, dtype, **kw), d) * W

    # 1. measure the smallest model: the cheapest to time, and the one a short budget ends up with.
    # On a CPU also with one thread: when other jobs hold the cores, one thread can be several times
    # faster than all (see Threads); the faster count starts the run.
    t_measure = time.time()
    probe = DEPTHS[0]
    n_threads = torch.get_num_threads()
    threads_line = None
    if d.device.type == "cpu" and W == 1 and n_threads > 1:
        torch.set_num_threads(1)
        one = measured(probe)
        torch.set_num_threads(n_threads)
        every = measured(probe, give_up=2 * B * T / one)  # a warm-up step that slow has lost already
        if one > every:  # a second chance: a process's first steps with a new thread count can be slow
            # (measured: 18.8K tokens/s in a quickstart right after its install, 52K in a later process)
            every = max(every, measured(probe, give_up=2 * B * T / one))
        if 0.85 * one > every:  # one thread only when clearly faster (Threads' margin); a tie goes to all
            # of them, which an idle machine runs faster once warm (the quickstart: 31.6K vs 31.5K here,
            # then 0.13 s a step with two threads against 0.21 s with one)
            torch.set_num_threads(1)
        threads_line = (
            f"  threads: {torch.get_num_threads()} ({human_count(one)} tokens/s with 1, "
            f"{human_count(every)} with {n_threads}; the run re-checks as it goes)"
        )
        tps_probe = one if torch.get_num_threads() == 1 else every
    else:
        tps_probe = measured(probe)
    flops = tps_probe * config(probe).flops_per_token(T)  # achieved model FLOP/s, all processes
    left = budget - (time.time() - t_start)
    train_s = left * (1 - OVERHEAD)
    if train_s <= 10:
        raise UserError(
            f"--time-budget {cfg.time_budget}: after start-up and measuring ({budget - left:.0f}s) "
            f"too little time is left to train; give at least {int(budget - left + 30)}s"
        )

    # 2. the largest depth the budget can feed 20 tokens per parameter. Larger models achieve more FLOP/s
    # (on a GPU many times more than the probe), so the choice is measured, and so is the next depth up
    # while it could fit at up to 4x the FLOP/s measured so far; measuring stops at a tenth of the budget.
    def fits(k: int, flops: float) -> bool:
        return flops * train_s / config(k).flops_per_token(T) >= TOKENS_PER_PARAM * matmul_params(config(k))

    achieved = {probe: flops}  # depth -> measured FLOP/s
    depth = max([k for k in DEPTHS if fits(k, flops)], default=probe)
    while time.time() - t_measure < budget / 10:
        if depth not in achieved:
            achieved[depth] = measured(depth) * config(depth).flops_per_token(T)
            if not fits(depth, achieved[depth]):  # slower than the FLOP model said: one down
                depth = max([k for k in achieved if k < depth and fits(k, achieved[k])], default=probe)
                break
        up = DEPTHS.index(depth) + 1
        if up == len(DEPTHS) or not fits(DEPTHS[up], 4 * max(achieved.values())):
            break
        depth = DEPTHS[up]
    if depth not in achieved:  # ran out of measuring time: the last measured pace, by the FLOP model
        depth = max([k for k in achieved if fits(k, achieved[k])], default=probe)
    compute_depth = depth

    # 3. the data: repeated tokens lose their worth as epochs grow (Muennighoff et al. 2023). A plan that
    # would see its unique tokens more than MAX_EPOCHS times grows the model instead, one depth at a time,
    # until the measured pace of one brings the epochs within MAX_EPOCHS (measuring stops at a fifth of
    # the budget).
    unique = data.n_train_tokens
    if cfg.train.compile is None:  # not said: compile when the budget pays for it and it can
        cfg.train.compile = budget >= COMPILE_MIN_SECONDS and can_compile(d.device)
    # the steps were measured eager; a compiled CPU run trains faster, and its tokens and batch (step 4)
    # are those of the steps it will take. The epochs here stay eager ones, as MAX_EPOCHS was measured:
    # compiled, the quickstart's depth 3 sees its data 2.4 times and still beat depth 4 (docs/training.md)
    speedup = CPU_COMPILE_SPEEDUP if cfg.train.compile and d.device.type == "cpu" else 1.0

    def epochs(k: int) -> float:
        return achieved[k] / config(k).flops_per_token(T) * train_s / unique

    while unique and epochs(depth) > MAX_EPOCHS and time.time() - t_measure < budget / 5:
        up = DEPTHS.index(depth) + 1
        if up == len(DEPTHS) or matmul_params(config(DEPTHS[up])) > MAX_PARAMS_PER_TOKEN * unique:
            break
        depth = DEPTHS[up]
        if depth not in achieved:
            achieved[depth] = measured(depth) * config(depth).flops_per_token(T)
    mc, n, flops = config(depth), matmul_params(config(depth)), achieved[depth]
    tps = flops / mc.flops_per_token(T)
    t_measure = time.time() - t_measure
    left = budget - (time.time() - t_start)
    train_s = left * (1 - OVERHEAD)
    tokens = int(tps * speedup * train_s)
    # 4. batch, steps, learning rate, schedule, evaluation
    micro = B * T * W
    gbt = micro
    while gbt * 2 <= min(tokens / MIN_STEPS, 1 << 19):  # enough steps, at most 0.5M tokens a step
        gbt *= 2
    steps = max(1, tokens // gbt)
    tokens = steps * gbt
    if d.device.type == "cpu" and micro < gbt <= CPU_MICRO_TOKENS * W:
        cfg.train.batch_size = gbt // (T * W)  # the step as one micro-batch: see CPU_MICRO_TOKENS
        micro = gbt
    eval_tokens = EVAL_SHARE * 3 * tokens / (EVALS + 2)  # a forward pass costs a third of a training step
    eval_batches = max(1, min(cfg.eval.batches, int(eval_tokens // micro)))

    over = shape(fam, depth, vocab, T) | tie
    if data.tokenizer is not None:
        over.pop("vocab_size")  # the run takes it from the tokenizer, as any run does
    cfg.model.size = "tiny"
    cfg.model.overrides = {**cfg.model.overrides, **over}
    cfg.train.tokens, cfg.train.max_steps, cfg.train.global_batch_tokens = tokens, None, gbt
    cfg.train.lr = float(f"{min(LR_MAX, max(1e-4, LR_768 * 768 / mc.d_model)):.2g}")
    cfg.train.embedding_lr_scale = EMBEDDING_LR_SCALE
    cfg.train.muon_lr_scale = MUON_LR_SCALE  # only read when the optimizer is Muon
    cfg.train.min_lr_ratio = MIN_LR_RATIO
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, steps // 20))
    cfg.train.schedule = "wsd"  # the end of the run may move until the decay starts (train.fit_time)
    cfg.train.max_time = (
        budget  # counted from the start of train(); the loop keeps time for its final eval and save
    )
    cfg.train.fit_time = True
    cfg.eval.every = max(1, steps // EVALS)
    cfg.eval.batches = eval_batches
    cfg.ckpt.every = max(1, steps // 5) if budget >= 1800 else 0
    cfg.time_budget = None  # applied: the saved config.yaml resumes this exact plan

    c = flops * train_s
    n_opt = math.sqrt(c / (6 * TOKENS_PER_PARAM))
    lines = [
        f"time budget {cfg_budget_text(budget)}: measured {human_count(tps_probe)} tokens/s training the "
        f"{human_count(matmul_params(config(probe)))}-param depth-{probe} model = {achieved[probe] / 1e9:.3g} GFLOP/s "
        f"achieved ({str(dtype).replace('torch.', '')}, batch {B} x {T}{f' x {W} processes' if W > 1 else ''}; "
        f"{t_measure:.1f}s of measuring)",
        f"  ~{train_s:.0f}s of training = {c:.3g} FLOPs; compute-optimal (C = 6ND, D = 20N): "
        f"N ~ {human_count(n_opt)} params on {human_count(TOKENS_PER_PARAM * n_opt)} tokens",
        f"  chosen: {fam} depth {depth} (d_model {mc.d_model}, {mc.n_layers} layers, {mc.n_heads} heads) = "
        f"{human_count(n)} params in matmuls ({human_count(mc.n_params())} total)"
        + (f", measured {human_count(tps)} tokens/s" if depth != probe else "")
        + (f" (measured: depths {', '.join(map(str, sorted(achieved)))})" if len(achieved) > 1 else ""),
    ]
    if threads_line:
        lines.insert(1, threads_line)
    if depth != compute_depth:
        lines.append(
            f"  (depth {compute_depth} would see the {human_count(unique)}-token training split "
            f"{epochs(compute_depth):.1f} times; repeats beyond ~{MAX_EPOCHS} epochs are worth less, so the "
            f"model grows instead: depth {depth} sees it {epochs(depth):.1f} times"
            + (", at the eager pace measured)" if speedup != 1 else ")")
        )
    elif TOKENS_PER_PARAM * n > tokens and depth == DEPTHS[0]:
        lines.append(
            "  (the budget cannot give even the smallest depth 20 tokens per parameter; it trains that one "
            "on all the tokens the time allows, which beats a larger one on fewer)"
        )
    lines += [
        f"  plan: {human_count(tokens)} tokens ({tokens / n:.2g} per param"
        + (f"; compiled, ~{speedup:g}x the eager pace measured" if speedup != 1 else "")
        + f") in {steps} steps of "
        f"{human_count(gbt)} tokens, lr {cfg.train.lr:g}"
        + (f" (embeddings x{EMBEDDING_LR_SCALE:g})" if EMBEDDING_LR_SCALE != 1 else "")
        + f", {cfg.train.optimizer}"
        + (f" (matrices x{MUON_LR_SCALE:g})" if cfg.train.optimizer == "muon" and MUON_LR_SCALE != 1 else "")
        + f", {'tied' if tie['tie_embeddings'] else 'untied'} embeddings, "
        f"warmup-stable-decay (the last "
        f"{cfg.train.decay_fraction:.0%} decay to {MIN_LR_RATIO:g} x lr), evaluation every {cfg.eval.every} steps on at most "
        f"{human_count(eval_batches * micro)} tokens",
        "  the run re-measures its pace as it goes and moves its end to the deadline until the decay starts"
        + (
            " (it compiles the model first: torch.compile, --train.compile false to skip)"
            if cfg.train.compile
            else ""
        ),
    ]
    if data.n_train_tokens and tokens > data.n_train_tokens:
        lines.append(
            f"  note: that is {tokens / data.n_train_tokens:.1f} epochs of the "
            f"{human_count(data.n_train_tokens)}-token training split; more data would help more"
        )
    return cfg, lines


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here: on a CPU its inductor backend writes C++ and needs a
    working compiler (a laptop may have none; inductor's own check runs it); CUDA kernels come from
    Triton."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or whatever an odd toolchain raises
        return False
    return True


def cfg_budget_text(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Pace:
    """The run's length fitted to its deadline while it runs (--time-budget sets train.fit_time).

    A machine's speed drifts (other jobs, thermal limits, a plan measured on a few steps), so the loop
    re-estimates after every step how many steps still fit before `train.max_time`, from the pace of the
    last minute (at least 20 steps; evaluation and checkpoint time left out), and moves the end of the
    run accordingly.
    It may do so only while the learning rate is at its peak: the wsd schedule keeps it there for the
    first (1 - decay_fraction) of the steps, so the end moves freely until the decay starts; from then
    on the plan is fixed (the loop's deadline check still stops it in time).
    """

    def __init__(self, max_time: float, t_start: float, window: float = 60.0, min_steps: int = 20):
        self.deadline = t_start + max_time  # time.time() clock, as the loop's max_time check
        self.marks: list[tuple[int, float]] = []  # (step, perf_counter - excluded seconds)
        self.excluded = 0.0
        self.window, self.min_steps = window, min_steps  # the pace of the last minute, or 20 steps
        self.frozen = False

    def exclude(self, seconds: float) -> None:
        """Seconds that were not training steps (evaluation, checkpoints)."""
        self.excluded += seconds

    def seconds_per_step(self) -> float | None:
        if len(self.marks) < 3:
            return None
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / max(1, s1 - s0)

    def update(self, step: int, total: int, t, eval_every: int, cost: dict) -> int:
        """The total step count that ends the run at the deadline (`total` once the decay has started).

        `t`: the TrainSection (its schedule); `cost`: seconds of one evaluation and one save, as the loop
        measured them: the evaluations still to come (every `eval_every` steps) and the end of the run
        (a last evaluation, a checkpoint and final/) need their time too."""
        from lmforge.train.optim import decay_start

        self.marks.append((step, time.perf_counter() - self.excluded))
        while len(self.marks) > self.min_steps and self.marks[-1][1] - self.marks[1][1] > self.window:
            self.marks.pop(0)
        spp = self.seconds_per_step()
        if self.frozen or decay_start(total, t) <= step:
            self.frozen = True
            return total
        if spp is None:
            return total
        reserve = cost["eval"] + 2 * cost["save"] + 2 * spp  # the end of the run, two steps of slack
        left = self.deadline - time.time() - reserve
        per_step = spp + (cost["eval"] / eval_every if eval_every else 0.0)  # evaluations still to come
        new = step + max(1, int(left / per_step))
        while decay_start(new, t) <= step and new < total:  # too late for so short a run: decay from now
            new += 1
        return new


class Threads:
    """CPU threads for the next training step, re-chosen while a --time-budget run goes.

    On a machine shared with other jobs one thread can train several times faster than all of them:
    an OpenMP team waits for its slowest thread at every barrier, and a thread whose core another job
    holds makes the whole step wait (on the 2-core machine of docs/benchmarks.md, at load 6: 2.2K
    tokens/s with one thread, 0.5K with two). On an idle machine all threads win. So every `period`
    steps the loop trains a few steps with the other count and keeps whichever was faster; a trial that
    loses doubles the period, so an idle machine pays for few of them.

    A compiled model (`on_slowdown`) recompiles for a new thread count (torch.compile guards on it: 21 s
    for the quickstart's model on the 2-core machine, a 14th of its budget), so there a trial waits
    until the steps have slowed down: the median of the last five over SLOWDOWN times the fastest
    median so far, a sign that another job took cores.
    """

    SLOWDOWN = 1.5

    def __init__(self, n: int, period: int = 25, trial: int = 2, on_slowdown: bool = False):
        self.current, self.other = torch.get_num_threads(), (1 if torch.get_num_threads() > 1 else n)
        self.period, self.base_period, self.trial = period, period, trial
        self.next_trial, self.trial_left = period, 0
        self.times: dict[int, list[float]] = {}
        self.on_slowdown, self.best = on_slowdown, float("inf")  # the fastest 5-step median so far

    def _median(self, k: int) -> float:
        t = sorted(self.times.get(k, [float("inf")]))
        return t[len(t) // 2]

    def before_step(self, step: int) -> None:
        if self.trial_left or step < self.next_trial or self.other == self.current:
            return
        if self.on_slowdown and self._median(self.current) <= self.SLOWDOWN * self.best:
            return
        self.trial_left = self.trial
        torch.set_num_threads(self.other)

    def after_step(self, step: int, seconds: float) -> str | None:
        """Record the step's time; returns a line to log when the count changes."""
        k = torch.get_num_threads()
        self.times.setdefault(k, []).append(seconds)
        self.times[k] = self.times[k][-5:]
        if not self.trial_left:
            if len(self.times[k]) == 5:
                self.best = min(self.best, self._median(k))
            return None
        self.trial_left -= 1
        if self.trial_left:
            return None
        t_trial = min(self.times[self.other][-self.trial :])
        t_base = self._median(self.current)
        msg = None
        if t_trial < 0.85 * t_base:
            msg = (
                f"threads: {self.other} instead of {self.current} ({t_trial:.2f}s a step instead of "
                f"{t_base:.2f}s)"
            )
            self.current, self.other = self.other, self.current
            self.period = self.base_period
        else:
            self.period = min(8 * self.base_period, 2 * self.period)
        torch.set_num_threads(self.current)
        self.next_trial = step + self.period
        return msg
