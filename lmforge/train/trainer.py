"""The Trainer behind `lmforge pretrain` and `lmforge finetune` (torchtitan's train.py is the model).

    summary = train(load_config("configs/tiny-cpu.yaml"))

`Trainer(cfg, d)` sets a run up: data, model (new, `init_from`, LoRA; DDP/FSDP2, compiled), optimizer,
batch arithmetic, then restores a checkpoint into it when resuming (state.Checkpointer: the only place
that knows about resuming) and starts the logs. `train()` repeats `train_step()` to the end, with the
hooks between steps: logging, the --time-budget pace, evaluation, checkpoints (periodic, on
SIGINT/SIGTERM), and at the end the last evaluation and checkpoint, final/ and the report.

One step: for each of `accum` micro-batches, forward under autocast, backward of the loss scaled so
that gradients are a token-weighted mean over the whole global batch; then clip, check for NaN/inf,
AdamW step with the scheduled learning rate.

Exact resume: a checkpoint holds weights, AdamW state, step, every RNG and the loader position; the
learning rate is a function of the step. On CPU with dropout 0 a resumed run reproduces the losses of
an uninterrupted one bit for bit (tests/test_train_resume.py).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.checkpoint import load_model, read_config
from lmforge.config import ModelConfig, preset
from lmforge.model import build
from lmforge.train import distributed as D
from lmforge.train import lora as L
from lmforge.train.config import Resume, RunConfig, default_name
from lmforge.train.data import Data, make_data
from lmforge.train.metrics import Metrics, format_duration, peak_flops, summary_lines, write_report
from lmforge.train.optim import Optimizers, build_optimizer, decay_start, lr_at, set_lr
from lmforge.train.state import Checkpointer, seed_all, step_dir, write_error
from lmforge.train.validate import evaluate, sample
from lmforge.train.watchdog import Watchdog
from lmforge.utils import UserError, atomic_write_text, human_count

# Model fields a fine-tuning run may change on a checkpoint it starts from (the rest are its shape).
_INIT_OVERRIDABLE = {"dropout", "router_aux_loss_coef", "init_std"}


class TrainingDiverged(UserError):
    """A non-finite loss or gradient stopped the run."""


# ---------------------------------------------------------------------------------------------- entry
def train(cfg: RunConfig, data: Data | None = None, loss_fn=None) -> dict:
    """Run (or resume) the training described by `cfg`; returns the run summary.

    `data` replaces the loaders built from cfg.data (tests, custom pipelines): a Data whose `train`
    yields (x, y) int64 (B, T) batches forever and has state_dict()/load_state_dict().
    `loss_fn(model, x, y)` replaces the next-token loss `model(x, y)` (a mean over the targets), e.g.
    distillation (lmforge.compress.distill); validation still reports the next-token loss.
    """
    d = D.setup(cfg.parallel, cfg.device, cfg.dist_timeout)
    ok = False
    threads = torch.get_num_threads()  # --time-budget may change it as it goes; the caller's comes back
    try:
        # enable_grad: whatever the caller's grad mode (a notebook, a test module) is; Watchdog: a peer
        # rank that stops or dies ends this one with one line naming it (no-op for one process)
        with torch.enable_grad(), Watchdog(d, cfg.run_dir) as wd:
            out = wd.watch(Trainer(cfg, d, data, loss_fn)).train()
        ok = True
        return out
    except OSError as e:  # disk full / read-only while writing logs: one line (checkpoints: atomic_dir's)
        if (err := write_error(e, cfg.run_dir)) is None:
            raise
        raise err from e
    finally:
        torch.set_num_threads(threads)
        if ok:
            D.cleanup(d)
        elif d.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Trainer:
    """One training run. Attributes a hook may read: cfg, d, data, model (wrapped), bare (the
    Transformer), optimizer, checkpointer, metrics, step, tokens_seen, train_time, total_steps."""

    def __init__(self, cfg: RunConfig, d: D.Dist, data: Data | None = None, loss_fn=None):
        self.t_start = time.time()
        cfg.name = cfg.name or default_name(cfg)
        self.cfg, self.d, self.loss_fn = cfg, d, loss_fn
        self.run_dir = cfg.run_dir
        self.say = print if d.main else (lambda *a, **k: None)
        self.checkpointer = Checkpointer(
            self.run_dir,
            Resume.parse(cfg.resume),
            d,
            keep=cfg.ckpt.keep,
            base=cfg.model.init_from,
            force=cfg.force,
        )
        resuming = self.checkpointer.resume_from is not None
        self.device = d.device
        self.dtype = compute_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_all(cfg.seed)  # the same on every rank while the model is built (FSDP keeps each rank's slice)
        if cfg.task not in ("pretrain", "sft"):
            raise UserError(f"task={cfg.task!r}: choose pretrain or sft")
        if cfg.task == "sft" and not cfg.model.init_from and not resuming:
            self.say("note: fine-tuning a randomly initialised model (no --model.init_from)")
        self._setup_data(data, plan=bool(cfg.time_budget) and not resuming)
        self._setup_model()
        self._setup_batches()
        # Last before the first step, so that nothing in between draws from the random streams:
        # restored exactly on resume, else one stream per rank.
        state = self.checkpointer.load(
            self.model, self.optimizer, self.data, seed=self.cfg.seed, say=self.say
        )
        self.step, self.tokens_seen, self.train_time = 0, 0, 0.0
        if state is not None:
            self.step, self.tokens_seen = state["step"], state["tokens"]
            self.train_time = state.get("train_time", 0.0)
            if state.get("global_batch_tokens") not in (None, self.gbt):
                self.say(
                    f"note: the global batch changed from {state['global_batch_tokens']} to {self.gbt} tokens"
                )
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        self._setup_logging()

    # ------------------------------------------------------------------ setup
    def _setup_data(self, data: Data | None, plan: bool) -> None:
        d = self.d
        self.data = data or make_data(self.cfg, d.rank, d.world)
        for note in self.data.notes:
            self.say(f"note: {note}")
        self.n_threads = torch.get_num_threads()
        if plan:  # --time-budget: measure, then choose the model, tokens and batch (budget.py)
            from lmforge.train.budget import plan

            rows = self.cfg.train.batch_size
            self.cfg, explanation = plan(self.cfg, self.data, d, self.dtype, self.t_start)
            for line in explanation:
                self.say(line)
            if self.cfg.train.batch_size != rows:  # the plan made the step one micro-batch
                if data is None:
                    self.data = make_data(self.cfg, d.rank, d.world)  # whose loader yields those rows
                else:  # the caller's loader yields `rows`: accumulate them instead
                    self.cfg.train.batch_size = rows
            if self.data.val is not None:  # the plan bounds the validation batches
                n = max(1, self.cfg.eval.batches // d.world)
                self.data = dataclasses.replace(self.data, val=_first(self.data.val, n))

    def _setup_model(self) -> None:
        """The model as a fresh run starts it (a resumed run's weights come from Checkpointer.load)."""
        cfg, dev = self.cfg, self.device
        mc = model_config(cfg, self.data)
        if cfg.model.init_from:
            model = load_model(cfg.model.init_from, device=dev, dtype=torch.float32)
            _set_overridable(model, mc)
            if model.config.extra.get("quantization_config") and not cfg.lora.rank:
                raise UserError(
                    f"{cfg.model.init_from} is quantized: its int8/int4 weights do not train; fine-tune "
                    "it with LoRA (--lora.rank 16), or fine-tune the float model it came from"
                )
        else:
            model = build(mc, device=dev, dtype=torch.float32)
            model.init_weights(cfg.seed)  # same weights on every rank (FSDP shards what each rank built)
        if cfg.lora.rank:
            L.apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
            if self.dtype == torch.bfloat16 and self.d.parallel != "fsdp":  # FSDP2 shards one dtype
                L.freeze_base_dtype(model, torch.bfloat16)  # the same bf16 matmuls, cast once
        if cfg.train.freeze_embeddings:
            _freeze_embeddings(model)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        self.bare, self.mc = model, model.config
        self.n_params, self.n_train = model.num_params(), model.num_params(trainable_only=True)
        model = D.wrap(model, self.d)
        if cfg.train.compile:
            model = torch.compile(model)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.train, dev, sharded=self.d.parallel == "fsdp")
        if cfg.train.optimizer == "muon" and not isinstance(self.optimizer, Optimizers):
            self.say(
                "note: --train.optimizer muon: no hidden matrix trains here (LoRA's A and B go to AdamW), "
                "so every trainable parameter uses AdamW"
            )
        # --train.keep_zeros: masks of the matrices' zeros (a pruned model's), re-applied after every step
        self.zero_masks = (
            [(p, p == 0) for p in model.parameters() if p.dim() >= 2] if cfg.train.keep_zeros else []
        )

    def _setup_batches(self) -> None:
        cfg = self.cfg
        B, T, W = cfg.train.batch_size, cfg.data.seq_len, self.d.world
        if T > self.mc.max_seq_len:
            raise UserError(
                f"--data.seq_len {T} is longer than the model's context ({self.mc.max_seq_len}); "
                f"pass --model.max_seq_len {T} (new models) or a shorter --data.seq_len"
            )
        micro_tokens = B * T * W
        gbt = cfg.train.global_batch_tokens or micro_tokens
        if gbt % micro_tokens:
            raise UserError(
                f"--train.global_batch_tokens {gbt} is not a multiple of batch_size x seq_len x processes "
                f"= {B} x {T} x {W} = {micro_tokens}; use e.g. {max(1, round(gbt / micro_tokens)) * micro_tokens}"
            )
        self.gbt, self.accum = gbt, gbt // micro_tokens
        if cfg.train.max_steps:
            self.total_steps = cfg.train.max_steps
        elif cfg.train.tokens:
            self.total_steps = max(1, math.ceil(cfg.train.tokens / gbt))
        else:
            raise UserError(
                "how long to train: pass --train.max_steps N, --train.tokens N (e.g. 20M) or --time-budget 10m"
            )

    def _setup_logging(self) -> None:
        cfg, d, dev, mc = self.cfg, self.d, self.device, self.mc
        self.flops_tok = mc.flops_per_token(cfg.data.seq_len, training=True)
        if cfg.log.peak_flops:
            self.peak, peak_src = cfg.log.peak_flops, "--log.peak_flops"
        else:
            self.peak, peak_src = peak_flops(dev, self.dtype) if d.main else (0.0, "")
        self.metrics = Metrics(
            self.run_dir,
            total_steps=self.total_steps,
            start_step=self.step,
            enabled=d.main,
            progress=cfg.log.progress,
            tensorboard=cfg.log.tensorboard,
            title=cfg.name,
        )
        for note in self.metrics.notes:
            self.say(f"note: {note}")
        self.pace = self.threads = None  # --time-budget: length and CPU threads follow the measured speed
        if cfg.train.fit_time and cfg.train.max_time:
            from lmforge.train.budget import Pace, Threads

            self.pace = Pace(cfg.train.max_time, self.t_start)
            if dev.type == "cpu" and not d.active and max(self.n_threads, torch.get_num_threads()) > 1:
                self.threads = Threads(self.n_threads, on_slowdown=bool(cfg.train.compile))
        self.n_evals = self.total_steps // cfg.eval.every if cfg.eval.every else 0
        B, T, W = cfg.train.batch_size, cfg.data.seq_len, d.world
        self.say(
            f"{cfg.task} {cfg.name}: {mc.family} {human_count(self.n_params)} params"
            + (f" ({human_count(self.n_train)} trainable)" if self.n_train != self.n_params else "")
            + f", {self.total_steps} steps x {human_count(self.gbt)} tokens "
            f"(batch {B} x {T} x {W} proc x {self.accum} accum), "
            f"{str(self.dtype).replace('torch.', '')} on {dev}"
            + (f", {d.parallel}" if d.active else "")
            + (f"; peak {self.peak / 1e12:.3g} TFLOP/s ({peak_src})" if self.peak else "")
        )
        tok = self.data.tokenizer
        self.token_bytes = (
            torch.as_tensor(np.asarray(tok.token_bytes()), dtype=torch.long, device=dev) if tok else None
        )
        self.autocast = functools.partial(
            torch.autocast, device_type=dev.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16
        )
        # Seconds the end of a run costs (last evaluation, a checkpoint and final/), so that
        # --train.max_time (and --time-budget) stops early enough to fit them.
        self.cost = {"eval": 0.0, "save": 0.5, "eval_step": -1}
        self.last_samples: list[str] = []

    def _write_config(self) -> None:
        atomic_write_text(
            self.run_dir / "config.yaml",
            f"# lmforge {self.cfg.task} run, resolved configuration (defaults, --config file and options)\n"
            + self.cfg.to_yaml(),
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to the end (or a signal, or train.max_time); returns the run summary."""
        cfg = self.cfg
        self.model.train()
        self.last_val: dict = {}
        self.last_loss = None
        self.win_t, self.win_tokens = time.perf_counter(), 0
        self.run_tokens, self.run_time, self.start_step = 0, 0.0, self.step
        stopped = None
        if self.step == 0 and cfg.eval.every and self.data.val is not None:
            self.last_val = self.evaluate(0)
        with _Stop() as stop:
            while self.step < self.total_steps:
                if self.threads is not None:
                    self.threads.before_step(self.step)
                t0 = time.perf_counter()
                loss, gnorm, lr, skipped = self.train_step()
                sig, time_up = self._should_stop(stop, t0)
                self._after_step(t0, loss, gnorm, lr, skipped)
                stop_now = sig or time_up
                if self.pace is not None and not stop_now and not self.pace.frozen:
                    self._fit_to_deadline()
                if self._eval_due():
                    t_pause = time.perf_counter()
                    self.last_val = self.evaluate(self.step)
                    self.win_t += time.perf_counter() - t_pause  # evaluation time is not throughput
                every = cfg.ckpt.every
                if (every and self.step % every == 0 and self.step < self.total_steps) or stop_now:
                    t_pause = time.perf_counter()
                    self.save(self.step)
                    self.win_t += time.perf_counter() - t_pause
                if stop_now:
                    stopped = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(int(sig), "max_time")
                    break
        return self._finish(stopped)

    def train_step(self) -> tuple[float, float, float, bool]:
        """One optimizer step over `accum` micro-batches; (loss, gradient norm, lr, skipped)."""
        cfg, d, dev, step = self.cfg, self.d, self.device, self.step
        B, T, W, accum = cfg.train.batch_size, cfg.data.seq_len, d.world, self.accum
        lr = lr_at(step, self.total_steps, cfg.train)
        set_lr(self.optimizer, lr)
        batches = [next(self.data.train) for _ in range(accum)]  # (x, y) int64 (B, T) on CPU
        count_targets = cfg.task == "sft"
        if count_targets:  # token-weighted mean over the global batch, whatever the padding
            n_local = sum(int((y != -100).sum()) for _, y in batches)
            n_global = int(D.all_reduce(torch.tensor([n_local], dtype=torch.float64, device=dev), d).item())
        else:
            n_global = B * T * accum * W
        model, loss_fn = self.model, self.loss_fn
        loss_sum = torch.zeros((), device=dev)
        try:
            for i, (x, y) in enumerate(batches):
                if x.shape[0] != B:  # the loss scale and the token counts assume B rows
                    raise RuntimeError(f"the loader gave {x.shape[0]} rows, train.batch_size is {B}")
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                n = B * T if not count_targets else int((y != -100).sum())
                with D.grad_sync(model, d, sync=i == accum - 1), self.autocast():
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
        grad_norm = D.clip_grad_norm(  # fp64 sums: FSDP2 gives the norm one process gives
            [p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip or float("inf"), d
        )
        loss_v, gnorm = float(loss_t), float(grad_norm)
        if not (math.isfinite(loss_v) and math.isfinite(gnorm)):
            what = f"loss {loss_v}" if not math.isfinite(loss_v) else f"gradient norm {gnorm}"
            if not cfg.train.skip_nonfinite:
                self.metrics.close()
                last = self.checkpointer.last
                keep = (
                    f"the last good checkpoint is {last} (continue with --resume auto)"
                    if last
                    else "no checkpoint was written before it"
                )
                raise TrainingDiverged(
                    f"non-finite {what} at step {step + 1}; stopped without saving, {keep}. Try a lower "
                    f"--train.lr (now {cfg.train.lr:g}), a longer --train.warmup_steps, --train.grad_clip 1, "
                    "or --train.skip_nonfinite to skip such steps."
                )
            self.metrics.write(f"step {step + 1}: non-finite {what}, optimizer step skipped")
            self.optimizer.zero_grad(set_to_none=True)
            return loss_v, gnorm, lr, True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, zero in self.zero_masks:
                p.masked_fill_(zero, 0.0)
        return loss_v, gnorm, lr, False

    def _should_stop(self, stop: _Stop, t0: float) -> tuple[int, int]:
        """(signal number or 0, 1 when train.max_time is up), the same on every rank: any rank's signal
        or the time limit stops every rank after this step."""
        cfg, d = self.cfg, self.d
        end_cost = self.cost["eval"] + 2 * self.cost["save"] + (time.perf_counter() - t0)  # + one more step
        max_time_hit = bool(
            cfg.train.max_time and time.time() - self.t_start + end_cost >= cfg.train.max_time
        )
        sig, time_up = (stop.signal or 0), int(max_time_hit)
        if d.active:
            flags = torch.tensor([sig, time_up], dtype=torch.float32, device=self.device)
            sig, time_up = (int(v) for v in D.all_reduce(flags, d, op="max").tolist())
        return sig, time_up

    def _after_step(self, t0: float, loss: float, gnorm: float, lr: float, skipped: bool) -> None:
        """Count the step and log it (every log.every steps, the last one, a skipped one)."""
        cfg, gbt = self.cfg, self.gbt
        self.step += 1
        self.tokens_seen += gbt
        dt = time.perf_counter() - t0
        self.train_time += dt
        if self.threads is not None and (msg := self.threads.after_step(self.step, dt)):
            self.metrics.write(msg)
        if self.step > self.start_step + 1:  # the first step of a process warms up (allocations, compiling)
            self.run_time += dt
            self.run_tokens += gbt
        self.win_tokens += gbt
        self.last_loss = loss
        self.metrics.advance()
        if self.step % max(1, cfg.log.every) == 0 or self.step == self.total_steps or skipped:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            tok_s = self.win_tokens / max(now - self.win_t, 1e-9)
            rec = {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "grad_norm": gnorm,
                "tokens": self.tokens_seen,
                "tok_per_s": tok_s,
                "mfu": self._mfu(tok_s),
                "time": round(self.train_time, 3),
            }
            if skipped:
                rec["skipped"] = True
            if self.threads is not None:
                rec["threads"] = torch.get_num_threads()
            self.metrics.log(rec)
            self.win_t, self.win_tokens = now, 0

    def _mfu(self, tok_s: float | None) -> float | None:
        """Model FLOPs utilisation of `tok_s` training tokens/s against the peak of all devices."""
        return (tok_s * self.flops_tok / (self.peak * self.d.world)) if (self.peak and tok_s) else None

    def _fit_to_deadline(self) -> None:
        """--time-budget: move the end of the run to what fits before the deadline (budget.Pace)."""
        cfg, d, pace, step = self.cfg, self.d, self.pace, self.step
        new_total = pace.update(step, self.total_steps, cfg.train, cfg.eval.every, self.cost)
        if d.active:  # the ranks' paces differ a little: all take the shortest plan
            neg = torch.tensor([-new_total], dtype=torch.float64, device=self.device)
            new_total = -int(D.all_reduce(neg, d, op="max").item())
        if new_total != self.total_steps:
            self.total_steps = new_total
            cfg.train.tokens = new_total * self.gbt
            self.metrics.set_total(new_total)
            if self.n_evals:
                cfg.eval.every = max(1, new_total // self.n_evals)
        pace.frozen = pace.frozen or decay_start(self.total_steps, cfg.train) <= step + 1
        if pace.frozen:
            spp = pace.seconds_per_step() or 0.0
            self.metrics.write(
                f"time budget: {human_count(self.gbt / max(spp, 1e-9))} tokens/s over the last minute; "
                f"the run ends at step {self.total_steps} ({human_count(self.total_steps * self.gbt)} tokens), "
                f"the learning rate decays from step {decay_start(self.total_steps, cfg.train)}"
            )
            if d.main:
                self._write_config()

    def _eval_due(self) -> bool:
        every, step = self.cfg.eval.every, self.step
        if not every or step >= self.total_steps:
            return False
        if self.pace is not None:  # the period may change as the run goes
            return step - max(self.cost["eval_step"], 0) >= every
        return step % every == 0

    # ------------------------------------------------------------------ hooks
    def evaluate(self, at_step: int) -> dict:
        """Validation loss / bits per byte and a few samples, logged; {} without validation data."""
        t = time.perf_counter()
        res = {}
        data, metrics, bare = self.data, self.metrics, D.unwrap(self.model)
        if data.val is not None:
            res = evaluate(bare, data.val(), self.d, self.autocast, self.token_bytes)
            metrics.log({"step": at_step, **res})
            bpb = f", {res['val_bpb']:.4f} bits/byte" if "val_bpb" in res else ""
            metrics.write(f"step {at_step}: val loss {res['val_loss']:.4f}{bpb}")
        self.last_samples[:] = _samples(bare, self.cfg, data, at_step)
        for text in self.last_samples:
            metrics.write(text)
        metrics.plot(every=60)  # at the end of the run in any case
        self.cost["eval"], self.cost["eval_step"] = time.perf_counter() - t, at_step
        if self.pace is not None:
            self.pace.exclude(self.cost["eval"])
        return res

    def save(self, at_step: int) -> Path:
        """A checkpoint of the run as it stands (collective: every rank calls it)."""
        t = time.perf_counter()
        cfg = self.cfg
        state = {
            "tokens": self.tokens_seen,
            "train_time": self.train_time,
            "global_batch_tokens": self.gbt,
            "world_size": self.d.world,
            "parallel": self.d.parallel,
            "task": cfg.task,
            "lr_schedule": {
                "schedule": cfg.train.schedule,
                "total_steps": self.total_steps,
                "lr": lr_at(min(at_step, self.total_steps - 1), self.total_steps, cfg.train),
            },
        }
        path = self.checkpointer.save(at_step, self.model, self.optimizer, self.data, state)
        if self.d.main and self.pace is not None:  # the plan as it stands, for --resume
            self._write_config()
        self.cost["save"] = time.perf_counter() - t
        if self.pace is not None:
            self.pace.exclude(self.cost["save"])
        return path

    def _finish(self, stopped: str | None) -> dict:
        """The end of a run: last evaluation and checkpoint, final/, plots, the summary and report."""
        cfg, d, step = self.cfg, self.d, self.step
        final = None
        if step >= self.total_steps or stopped == "max_time":
            if self.cost["eval_step"] != step:  # (a time stop may come right after an evaluation)
                self.last_val = self.evaluate(step) or self.last_val
            last = self.checkpointer.last
            if last is None or last.name != step_dir(self.run_dir, step).name:
                self.save(step)
            final = self.checkpointer.save_final(self.model, self.data.tokenizer, self.run_dir / "final")
        self.metrics.plot()
        self.metrics.close()
        tok_s = self.run_tokens / max(self.run_time, 1e-9) if self.run_time else None
        last = self.checkpointer.last
        summary = {
            "run_dir": str(self.run_dir),
            "model": f"{self.mc.family}, {human_count(self.n_params)} params"
            + (
                f", LoRA rank {cfg.lora.rank} ({human_count(self.n_train)} trainable)"
                if cfg.lora.rank
                else ""
            ),
            "step": step,
            "total_steps": self.total_steps,
            "tokens": self.tokens_seen,
            "train_time": self.train_time,
            "tok_per_s": tok_s,
            "mfu": self._mfu(tok_s),
            "loss": self.last_loss,
            "val_loss": self.last_val.get("val_loss"),
            "val_bpb": self.last_val.get("val_bpb"),
            "final": str(final) if final else None,
            "checkpoint": str(last) if last else None,
            "stopped": stopped,
            "wall_time": time.time() - self.t_start,
            "threads": torch.get_num_threads(),  # at the end (--time-budget picks the faster count as it goes)
        }
        if d.main:
            write_report(self.run_dir, summary, cfg.to_yaml(), self.last_samples)
            print("\n".join(summary_lines(summary)))
            if stopped and stopped != "max_time":
                print(
                    f"stopped by {stopped} at step {step}; checkpoint {last}. Continue with: --resume auto "
                    f"--name {cfg.name}"
                )
            print(f"done in {format_duration(summary['wall_time'])}")
        return summary


# ---------------------------------------------------------------------------------------------- helpers
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


def model_config(cfg: RunConfig, data: Data) -> ModelConfig:
    """The ModelConfig of a new model: the preset, the tokenizer's vocabulary and ids, the overrides."""
    over = dict(cfg.model.overrides)
    if cfg.model.init_from:
        mc = read_config(cfg.model.init_from)
        bad = sorted(set(over) - _INIT_OVERRIDABLE)
        if bad:
            raise UserError(
                f"--model.{bad[0]} cannot change a checkpoint's shape (init_from "
                f"{cfg.model.init_from}); only {', '.join(sorted(_INIT_OVERRIDABLE))} may be overridden"
            )
        if data.vocab_size and mc.vocab_size < data.vocab_size:
            raise UserError(
                f"--model.init_from {cfg.model.init_from}: the model has {mc.vocab_size} token embeddings but "
                f"the tokenizer has {data.vocab_size} token ids; use the tokenizer the model was trained with"
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
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
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


def _first(val, n: int):
    """A validation-batch function that yields only the first n batches of `val`'s."""
    return lambda: itertools.islice(val(), n)


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
