"""The training loop shared by `lmforge pretrain` and `lmforge finetune`.

    summary = train(load_config("configs/tiny-cpu.yaml"))

One step: for each of `accum` micro-batches, forward under autocast, backward of the loss scaled so
that gradients are a token-weighted mean over the whole global batch; then clip, check for NaN/inf,
AdamW step with the scheduled learning rate. Around it: evaluation (loss, bits per byte, samples),
checkpoints (periodic, final, on SIGINT/SIGTERM), logging (progress bar, metrics.jsonl, TensorBoard,
loss.png) and the final model in runs/<name>/final/.

Exact resume: a checkpoint holds weights, AdamW state, step, every RNG and the loader position; the
learning rate is a function of the step. On CPU with dropout 0 a resumed run reproduces the losses of
an uninterrupted one bit for bit (tests/test_train_resume.py).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig, preset
from lmforge.train import checkpointing as C
from lmforge.train import distributed as D
from lmforge.train import lora as L
from lmforge.train.config import RunConfig, default_name
from lmforge.train.data import Data, make_data
from lmforge.train.metrics import Metrics, format_duration, peak_flops, summary_lines, write_report
from lmforge.train.optim import build_optimizer, decay_start, lr_at, set_lr
from lmforge.train.validate import evaluate, sample
from lmforge.utils import UserError, atomic_write_text, human_count

# Model fields a fine-tuning run may change on a checkpoint it starts from (the rest are its shape).
_INIT_OVERRIDABLE = {"dropout", "router_aux_loss_coef", "init_std"}


class TrainingDiverged(UserError):
    """A non-finite loss or gradient stopped the run."""


# ---------------------------------------------------------------------------------------------- setup
def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware does bf16 matmuls fast (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if name in ("fp32", "float32"):
        return torch.float32
    if name in ("bf16", "bfloat16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--dtype bf16: this GPU has no bfloat16; use --dtype fp32")
        return torch.bfloat16
    if name in ("fp16", "float16"):
        raise UserError("--dtype fp16 would need loss scaling; train in bf16 (autocast) or fp32")
    if name != "auto":
        raise UserError(f"--dtype {name}: choose auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        fast = (
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        )
        return torch.bfloat16 if fast else torch.float32
    return torch.float32


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_config(cfg: RunConfig, data: Data) -> ModelConfig:
    """The ModelConfig of a new model: the preset, the tokenizer's vocabulary and ids, the overrides."""
    from lmforge.checkpoint import read_config

    over = dict(cfg.model.overrides)
    if cfg.model.init_from:
        mc = read_config(cfg.model.init_from)
        bad = sorted(set(over) - _INIT_OVERRIDABLE)
        if bad:
            raise UserError(
                f"--model.{bad[0]} cannot change a checkpoint's shape (init_from "
                f"{cfg.model.init_from}); only {', '.join(sorted(_INIT_OVERRIDABLE))} may be overridden"
            )
        return mc.replace(**over)
    tok = data.tokenizer
    if "vocab_size" not in over and data.vocab_size:
        over["vocab_size"] = data.vocab_size
    if tok is not None:
        for key, val in (
            ("bos_token_id", tok.bos_id),
            ("eos_token_id", tok.eos_id),
            ("pad_token_id", tok.pad_id),
        ):
            over.setdefault(key, val)
    try:
        mc = preset(cfg.model.family, cfg.model.size, **over)
    except ValueError as e:
        raise UserError(str(e)) from None
    if data.vocab_size and mc.vocab_size < data.vocab_size:
        raise UserError(
            f"--model.vocab_size {mc.vocab_size} is smaller than the data's vocabulary "
            f"({data.vocab_size} token ids)"
        )
    return mc


def _checkpoint_blocks(model) -> None:
    """Activation checkpointing: each block's forward recomputed in backward (instance attribute, so
    parameter names and the HF layout are unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _set_overridable(model, mc: ModelConfig) -> None:
    """Apply dropout (and the other non-shape overrides) to a loaded model. Attention reads its rate from
    the shared config object and nn.Dropout keeps its own p, so both are updated in place."""
    for k in _INIT_OVERRIDABLE:
        setattr(model.config, k, getattr(mc, k))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = mc.dropout


def _freeze_embeddings(model) -> None:
    model.tok_emb.weight.requires_grad_(False)  # a tied lm_head is the same tensor
    if model.pos_emb is not None:
        model.pos_emb.weight.requires_grad_(False)


def _oom_message(cfg: RunConfig, step: int) -> str:
    return (
        f"out of GPU memory at step {step} (micro-batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens). "
        "Options that reduce memory: --train.batch_size smaller (the global batch stays the same: "
        "gradient accumulation grows); --train.activation_checkpointing; --dtype bf16; --parallel fsdp under "
        "torchrun to shard weights and optimizer state; --data.seq_len shorter; --lora.rank 16 to train "
        "adapters only; --train.freeze_embeddings; a smaller --model.size."
    )


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, writes a checkpoint and exits. A second
    SIGINT interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------- train
def train(cfg: RunConfig, data: Data | None = None, loss_fn=None) -> dict:
    """Run (or resume) the training described by `cfg`; returns the run summary.

    `data` replaces the loaders built from cfg.data (tests, custom pipelines): a Data whose `train`
    yields (x, y) int64 (B, T) batches forever and has state_dict()/load_state_dict().
    `loss_fn(model, x, y)` replaces the next-token loss `model(x, y)` (a mean over the targets), e.g.
    distillation (lmforge.compress.distill); validation still reports the next-token loss.
    """
    d = D.setup(cfg.parallel, cfg.device)
    ok = False
    threads = torch.get_num_threads()  # --time-budget may change it as it goes; the caller's comes back
    try:
        with torch.enable_grad():  # whatever the caller's grad mode (a notebook, a test module) is
            out = _train(cfg, d, data, loss_fn)
        ok = True
        return out
    finally:
        torch.set_num_threads(threads)
        if ok:
            D.cleanup(d)
        elif d.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: RunConfig, d: D.Dist, data: Data | None, loss_fn=None) -> dict:
    t_start = time.time()
    cfg.name = cfg.name or default_name(cfg)
    run_dir = cfg.run_dir
    say = print if d.main else (lambda *a, **k: None)
    resume_from = C.resolve_resume(cfg.resume, run_dir)
    dev = d.device
    dtype = compute_dtype(cfg.dtype, dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_all(cfg.seed)  # the same on every rank while the model is built (FSDP keeps each rank's slice)
    if cfg.task not in ("pretrain", "sft"):
        raise UserError(f"task={cfg.task!r}: choose pretrain or sft")
    if cfg.task == "sft" and not cfg.model.init_from and not resume_from:
        say("note: fine-tuning a randomly initialised model (no --model.init_from)")

    data = data or make_data(cfg, d.rank, d.world)
    for note in data.notes:
        say(f"note: {note}")

    n_threads = torch.get_num_threads()
    if cfg.time_budget and resume_from is None:
        from lmforge.train.budget import plan

        cfg, explanation = plan(cfg, data, d, dtype, t_start)
        for line in explanation:
            say(line)
        if data.val is not None:  # the plan bounds the validation batches
            data = dataclasses.replace(data, val=_first(data.val, max(1, cfg.eval.batches // d.world)))

    # ------------------------------------------------------------------ model
    from lmforge.checkpoint import load_model
    from lmforge.model import build

    lora_cfg = None
    if cfg.lora.rank:
        lora_cfg = {
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "targets": L._resolve_targets(cfg.lora.targets),
        }
    mc = model_config(cfg, data)
    if resume_from is not None and not lora_cfg:
        model = load_model(resume_from, device=dev, dtype=torch.float32)
        _check_same_shape(model.config, mc, resume_from)
        _set_overridable(model, mc)
    elif cfg.model.init_from:
        model = load_model(cfg.model.init_from, device=dev, dtype=torch.float32)
        _set_overridable(model, mc)
    else:
        model = build(mc, device=dev, dtype=torch.float32)
        model.init_weights(cfg.seed)  # same weights on every rank (FSDP shards what each rank built)
    if lora_cfg:
        L.apply_lora(model, **lora_cfg)
        if resume_from is not None:
            L.load_adapter_weights(model, resume_from)
    if cfg.train.freeze_embeddings:
        _freeze_embeddings(model)
    if cfg.train.activation_checkpointing:
        _checkpoint_blocks(model)
    mc = model.config
    bare = model
    n_params, n_train = bare.num_params(), bare.num_params(trainable_only=True)
    model = D.wrap(model, d)
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.train, dev, sharded=d.parallel == "fsdp")
    # --train.keep_zeros: masks of the matrices' zeros (a pruned model's), re-applied after every step
    zero_masks = [(p, p == 0) for p in model.parameters() if p.dim() >= 2] if cfg.train.keep_zeros else []

    # ------------------------------------------------------------------ batch arithmetic
    B, T, W = cfg.train.batch_size, cfg.data.seq_len, d.world
    if T > mc.max_seq_len:
        raise UserError(
            f"--data.seq_len {T} is longer than the model's context ({mc.max_seq_len}); "
            f"pass --model.max_seq_len {T} (new models) or a shorter --data.seq_len"
        )
    micro_tokens = B * T * W
    gbt = cfg.train.global_batch_tokens or micro_tokens
    if gbt % micro_tokens:
        raise UserError(
            f"--train.global_batch_tokens {gbt} is not a multiple of batch_size x seq_len x processes "
            f"= {B} x {T} x {W} = {micro_tokens}; use e.g. {max(1, round(gbt / micro_tokens)) * micro_tokens}"
        )
    accum = gbt // micro_tokens
    if cfg.train.max_steps:
        total_steps = cfg.train.max_steps
    elif cfg.train.tokens:
        total_steps = max(1, math.ceil(cfg.train.tokens / gbt))
    else:
        raise UserError(
            "how long to train: pass --train.max_steps N, --train.tokens N (e.g. 20M) or --time-budget 10m"
        )

    # ------------------------------------------------------------------ resume
    step, tokens_seen, train_time, rng_state = 0, 0, 0.0, None
    if resume_from is not None:
        state, optim_state, rng_state = C.read_checkpoint(resume_from)
        D.load_optimizer_state(model, optimizer, optim_state, d)
        data.train.load_state_dict(state["loader"])
        step, tokens_seen, train_time = state["step"], state["tokens"], state.get("train_time", 0.0)
        say(f"resumed from {resume_from} at step {step} ({human_count(tokens_seen)} tokens)")
        if state.get("global_batch_tokens") not in (None, gbt):
            say(f"note: the global batch changed from {state['global_batch_tokens']} to {gbt} tokens")

    def write_config() -> None:
        atomic_write_text(
            run_dir / "config.yaml",
            f"# lmforge {cfg.task} run, resolved configuration (defaults, --config file and options)\n"
            + cfg.to_yaml(),
        )

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config()

    # ------------------------------------------------------------------ logging
    flops_tok = mc.flops_per_token(T, training=True)
    if cfg.log.peak_flops:
        peak, peak_src = cfg.log.peak_flops, "--log.peak_flops"
    else:
        peak, peak_src = peak_flops(dev, dtype) if d.main else (0.0, "")
    metrics = Metrics(
        run_dir,
        total_steps=total_steps,
        start_step=step,
        enabled=d.main,
        progress=cfg.log.progress,
        tensorboard=cfg.log.tensorboard,
        title=cfg.name,
    )
    for note in metrics.notes:
        say(f"note: {note}")
    pace = threads = None  # --time-budget: length and CPU threads follow the measured speed (budget.py)
    if cfg.train.fit_time and cfg.train.max_time:
        from lmforge.train.budget import Pace, Threads

        pace = Pace(cfg.train.max_time, t_start)
        if dev.type == "cpu" and not d.active and max(n_threads, torch.get_num_threads()) > 1:
            threads = Threads(n_threads)
    n_evals = total_steps // cfg.eval.every if cfg.eval.every else 0
    say(
        f"{cfg.task} {cfg.name}: {mc.family} {human_count(n_params)} params"
        + (f" ({human_count(n_train)} trainable)" if n_train != n_params else "")
        + f", {total_steps} steps x {human_count(gbt)} tokens (batch {B} x {T} x {W} proc x {accum} accum), "
        f"{str(dtype).replace('torch.', '')} on {dev}"
        + (f", {d.parallel}" if d.active else "")
        + (f"; peak {peak / 1e12:.3g} TFLOP/s ({peak_src})" if peak else "")
    )

    token_bytes = None
    if data.tokenizer is not None:
        token_bytes = torch.as_tensor(np.asarray(data.tokenizer.token_bytes()), dtype=torch.long, device=dev)
    autocast = functools.partial(
        torch.autocast, device_type=dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16
    )
    base_path = cfg.model.init_from

    # Seconds the end of a run costs (last evaluation, a checkpoint and final/), so that --train.max_time
    # (and --time-budget) stops early enough to fit them.
    cost = {"eval": 0.0, "save": 0.5, "eval_step": -1}
    last_samples: list[str] = []

    def run_eval(at_step: int) -> dict:
        t = time.perf_counter()
        res = {}
        if data.val is not None:
            res = evaluate(D.unwrap(model), data.val(), d, autocast, token_bytes)
            metrics.log({"step": at_step, **res})
            bpb = f", {res['val_bpb']:.4f} bits/byte" if "val_bpb" in res else ""
            metrics.write(f"step {at_step}: val loss {res['val_loss']:.4f}{bpb}")
        last_samples[:] = _samples(D.unwrap(model), cfg, data, at_step)
        for text in last_samples:
            metrics.write(text)
        metrics.plot(every=60)  # at the end of the run in any case
        cost["eval"], cost["eval_step"] = time.perf_counter() - t, at_step
        if pace is not None:
            pace.exclude(cost["eval"])
        return res

    def save(at_step: int) -> Path:
        t = time.perf_counter()
        path = C.step_dir(run_dir, at_step)
        state = {
            "step": at_step,
            "tokens": tokens_seen,
            "train_time": train_time,
            "loader": data.train.state_dict(),
            "global_batch_tokens": gbt,
            "world_size": W,
            "parallel": d.parallel,
            "task": cfg.task,
            "lr_schedule": {
                "schedule": cfg.train.schedule,
                "total_steps": total_steps,
                "lr": lr_at(min(at_step, total_steps - 1), total_steps, cfg.train),
            },
        }
        C.save_checkpoint(
            path,
            model=model,
            optimizer=optimizer,
            trainer_state=state,
            d=d,
            model_config=mc,
            tokenizer=data.tokenizer,
            lora_config=lora_cfg,
            base=base_path,
        )
        if d.main:
            C.prune(run_dir, cfg.ckpt.keep)
            if pace is not None:  # the plan as it stands, for --resume
                write_config()
        cost["save"] = time.perf_counter() - t
        if pace is not None:
            pace.exclude(cost["save"])
        return path

    # ------------------------------------------------------------------ the loop
    model.train()
    last_val: dict = {}
    last_loss = None
    last_ckpt = C.latest_checkpoint(run_dir) if resume_from is not None else None
    win_t, win_tokens = time.perf_counter(), 0
    run_tokens, run_time, start_step = 0, 0.0, step
    stopped = None
    count_targets = cfg.task == "sft"
    if step == 0 and cfg.eval.every and data.val is not None:
        last_val = run_eval(0)
    # Random streams last, so that nothing between here and the first step draws from them:
    # restored exactly on resume, else one stream per rank (rank 0's is a single process's).
    if rng_state is not None:
        warn = C.restore_rng(*rng_state, d, cfg.seed, step)
        if warn:
            say(f"note: {warn}")
    else:
        seed_all(cfg.seed + d.rank)
    with _Stop() as stop:
        while step < total_steps:
            if threads is not None:
                threads.before_step(step)
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.train)
            set_lr(optimizer, lr)
            batches = [next(data.train) for _ in range(accum)]  # (x, y) int64 (B, T) on CPU
            if count_targets:  # token-weighted mean over the global batch, whatever the padding
                n_local = sum(int((y != -100).sum()) for _, y in batches)
                n_global = int(
                    D.all_reduce(torch.tensor([n_local], dtype=torch.float64, device=dev), d).item()
                )
            else:
                n_global = B * T * accum * W
            loss_sum = torch.zeros((), device=dev)
            try:
                for i, (x, y) in enumerate(batches):
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    n = B * T if not count_targets else int((y != -100).sum())
                    with D.grad_sync(model, d, sync=i == accum - 1), autocast():
                        if n:
                            # gradients are averaged over ranks, so each rank's share is scaled by W
                            loss = loss_fn(model, x, y) if loss_fn else model(x, y)
                            loss = loss * (n * W / max(n_global, 1))
                        else:  # no target in this micro-batch: zero loss that still touches every weight
                            loss = model(x).sum() * 0.0
                    loss.backward()
                    loss_sum += loss.detach()
            except torch.OutOfMemoryError:
                raise UserError(_oom_message(cfg, step)) from None
            loss_t = D.all_reduce(loss_sum.float().reshape(1), d) / W
            # stop together: any rank's signal or the time limit stops every rank after this step
            end_cost = cost["eval"] + 2 * cost["save"] + (time.perf_counter() - t0)  # + one more step
            max_time_hit = bool(cfg.train.max_time and time.time() - t_start + end_cost >= cfg.train.max_time)
            sig, time_up = (stop.signal or 0), int(max_time_hit)
            if d.active:
                flags = torch.tensor([sig, time_up], dtype=torch.float32, device=dev)
                sig, time_up = (int(v) for v in D.all_reduce(flags, d, op="max").tolist())
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip or float("inf")
            )
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            loss_v = float(loss_t)
            gnorm = float(grad_norm)
            skipped = False
            if not (math.isfinite(loss_v) and math.isfinite(gnorm)):
                what = f"loss {loss_v}" if not math.isfinite(loss_v) else f"gradient norm {gnorm}"
                if not cfg.train.skip_nonfinite:
                    metrics.close()
                    keep = (
                        f"the last good checkpoint is {last_ckpt} (continue with --resume auto)"
                        if last_ckpt
                        else "no checkpoint was written before it"
                    )
                    raise TrainingDiverged(
                        f"non-finite {what} at step {step + 1}; stopped without saving, {keep}. Try a lower "
                        f"--train.lr (now {cfg.train.lr:g}), a longer --train.warmup_steps, --train.grad_clip 1, "
                        "or --train.skip_nonfinite to skip such steps."
                    )
                metrics.write(f"step {step + 1}: non-finite {what}, optimizer step skipped")
                optimizer.zero_grad(set_to_none=True)
                skipped = True
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for p, zero in zero_masks:
                        p.masked_fill_(zero, 0.0)
            step += 1
            tokens_seen += gbt
            dt = time.perf_counter() - t0
            train_time += dt
            if threads is not None and (msg := threads.after_step(step, dt)):
                metrics.write(msg)
            if step > start_step + 1:  # the first step of a process warms up (allocations, compilation)
                run_time += dt
                run_tokens += gbt
            win_tokens += gbt
            last_loss = loss_v
            metrics.advance()

            if step % max(1, cfg.log.every) == 0 or step == total_steps or skipped:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                tok_s = win_tokens / max(now - win_t, 1e-9)
                rec = {
                    "step": step,
                    "loss": loss_v,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "tokens": tokens_seen,
                    "tok_per_s": tok_s,
                    "mfu": (tok_s * flops_tok / (peak * W)) if peak else None,
                    "time": round(train_time, 3),
                }
                if skipped:
                    rec["skipped"] = True
                if threads is not None:
                    rec["threads"] = torch.get_num_threads()
                metrics.log(rec)
                win_t, win_tokens = now, 0

            stop_now = sig or time_up
            if pace is not None and not stop_now and not pace.frozen:
                new_total = pace.update(step, total_steps, cfg.train, cfg.eval.every, cost)
                if d.active:  # the ranks' paces differ a little: all take the shortest plan
                    neg = torch.tensor([-new_total], dtype=torch.float64, device=dev)
                    new_total = -int(D.all_reduce(neg, d, op="max").item())
                if new_total != total_steps:
                    total_steps = new_total
                    cfg.train.tokens = total_steps * gbt
                    metrics.set_total(total_steps)
                    if n_evals:
                        cfg.eval.every = max(1, total_steps // n_evals)
                pace.frozen = pace.frozen or decay_start(total_steps, cfg.train) <= step + 1
                if pace.frozen:
                    spp = pace.seconds_per_step() or 0.0
                    metrics.write(
                        f"time budget: {human_count(gbt / max(spp, 1e-9))} tokens/s over the last minute; "
                        f"the run ends at step {total_steps} ({human_count(total_steps * gbt)} tokens), "
                        f"the learning rate decays from step {decay_start(total_steps, cfg.train)}"
                    )
                    if d.main:
                        write_config()
            due = (
                step - max(cost["eval_step"], 0) >= cfg.eval.every  # the period may change as the run goes
                if pace is not None
                else step % max(1, cfg.eval.every) == 0
            )
            if cfg.eval.every and due and step < total_steps:
                t_pause = time.perf_counter()
                last_val = run_eval(step)
                win_t += time.perf_counter() - t_pause  # evaluation time is not training throughput
            if (cfg.ckpt.every and step % cfg.ckpt.every == 0 and step < total_steps) or stop_now:
                t_pause = time.perf_counter()
                last_ckpt = save(step)
                win_t += time.perf_counter() - t_pause
            if stop_now:
                stopped = (
                    {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(int(sig), "max_time")
                    if sig
                    else "max_time"
                )
                break

    # ------------------------------------------------------------------ the end
    finished = step >= total_steps
    if finished or stopped == "max_time":
        if cost["eval_step"] != step:  # (a time stop may come right after an evaluation)
            last_val = run_eval(step) or last_val
        if last_ckpt is None or last_ckpt.name != C.step_dir(run_dir, step).name:
            last_ckpt = save(step)
    final = None
    if finished or stopped == "max_time":
        final = run_dir / "final"
        full = D.full_model_state(model, d)
        if d.main:
            from lmforge.utils import atomic_dir

            if lora_cfg:
                L.save_adapter(
                    final,
                    {k: v for k, v in full.items() if ".lora_" in k},
                    lora_cfg,
                    base_path,
                    mc,
                    data.tokenizer,
                )
            else:
                with atomic_dir(final) as tmp:
                    C.save_weights(tmp, full, mc, data.tokenizer)
        D.barrier(d)
    metrics.plot()
    metrics.close()
    tok_s = run_tokens / max(run_time, 1e-9) if run_time else None
    summary = {
        "run_dir": str(run_dir),
        "model": f"{mc.family}, {human_count(n_params)} params"
        + (f", LoRA rank {cfg.lora.rank} ({human_count(n_train)} trainable)" if lora_cfg else ""),
        "step": step,
        "total_steps": total_steps,
        "tokens": tokens_seen,
        "train_time": train_time,
        "tok_per_s": tok_s,
        "mfu": (tok_s * flops_tok / (peak * W)) if (peak and tok_s) else None,
        "loss": last_loss,
        "val_loss": last_val.get("val_loss"),
        "val_bpb": last_val.get("val_bpb"),
        "final": str(final) if final else None,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "stopped": stopped,
        "wall_time": time.time() - t_start,
        "threads": torch.get_num_threads(),  # at the end (--time-budget picks the faster count as it goes)
    }
    if d.main:
        write_report(run_dir, summary, cfg.to_yaml(), last_samples)
        print("\n".join(summary_lines(summary)))
        if stopped and stopped != "max_time":
            print(
                f"stopped by {stopped} at step {step}; checkpoint {last_ckpt}. Continue with: --resume auto "
                f"--name {cfg.name}"
            )
        print(f"done in {format_duration(summary['wall_time'])}")
    return summary


def _first(val, n: int):
    """A validation-batch function that yields only the first n batches of `val`'s."""
    return lambda: itertools.islice(val(), n)


def _check_same_shape(saved: ModelConfig, wanted: ModelConfig, where) -> None:
    keys = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "n_experts")
    diff = [k for k in keys if getattr(saved, k) != getattr(wanted, k)]
    if diff:
        raise UserError(
            f"{where}: the checkpoint's model differs from this run's configuration in "
            + ", ".join(f"{k} ({getattr(saved, k)} vs {getattr(wanted, k)})" for k in diff)
            + "; resume with the run's original options"
        )


def _samples(model, cfg: RunConfig, data: Data, step: int) -> list[str]:
    """A few sampled continuations for the log; the prompt comes from the config or the validation set."""
    n = cfg.eval.samples
    if n <= 0 or (data.tokenizer is None and not cfg.eval.prompts):
        return []
    tok = data.tokenizer
    prompts: list[list[int]] = []
    if cfg.eval.prompts and tok is not None:
        prompts = [tok.encode_prompt(p) for p in cfg.eval.prompts[:n]]
    elif data.val is not None:
        x, y = next(iter(data.val()))
        for row in x[:n].tolist():
            prompts.append(row[:8])
    if not prompts:
        return []
    gen = torch.Generator().manual_seed(cfg.seed + step)
    stops = tuple(tok.stop_ids) if tok is not None else ()
    out = []
    for p in prompts:  # in the weights' dtype (fp32), without autocast: a few tokens, not worth it
        new = sample(model, p, cfg.eval.max_new_tokens, cfg.eval.temperature, cfg.eval.top_k, gen, stops)
        if tok is not None:
            out.append(f"  sample: {tok.decode(p)!r} -> {tok.decode(new)!r}")
        else:
            out.append(f"  sample: {p} -> {new}")
    return out
