"""Run logging: a tqdm progress bar, metrics.jsonl, TensorBoard (when installed), loss.png, MFU, a summary.

Only rank 0 logs. metrics.jsonl has one JSON object per log step ({"step", "loss", "lr", "tok_per_s",
"mfu", ...}) or per evaluation ({"step", "val_loss", "val_bpb"}). A resumed run first drops the records
of steps after its checkpoint (a killed run may have logged past it), so the file always reads as one
uninterrupted run.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs from ModelConfig.flops_per_token (6N plus
attention, as in PaLM; activation recomputation does not count). The peak comes from a table for
common GPUs, or is measured with a large matmul on CPU and unknown devices.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from lmforge.utils import atomic_file, atomic_write_text, human_count

# Dense bf16 tensor-core peaks (FLOP/s) of one device; fp32 runs use TF32 at half that.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10": 125e12,
    "A6000": 155e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
    "B200": 2250e12,
    "GH200": 989e12,
}


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of a square matmul in `dtype`, the best of a few timed rounds."""
    g = torch.Generator().manual_seed(0)  # not the global generator: a resumed run must not see this
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    for _ in range(2):
        a @ b  # warm up
    while True:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
        if time.perf_counter() > t_end:
            return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return (peak if dtype != torch.float32 else peak / 2), f"{name} datasheet"
    n = 2048 if device.type == "cuda" else 1024
    return measure_matmul_flops(device, dtype, n), f"measured {n}x{n} matmul"


def format_duration(s: float) -> str:
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Metrics:
    """Everything a run writes about itself besides checkpoints. A no-op object on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool,
        progress: bool = True,
        tensorboard: bool = True,
        title: str = "",
    ):
        self.enabled, self.run_dir, self.total, self.title = enabled, Path(run_dir), total_steps, title
        self.records: list[dict] = []
        self.bar = self.tb = self.file = None
        self.notes: list[str] = []
        self.lines = False  # progress as plain lines (stderr is not a terminal: a log file, CI)
        self.t0 = time.perf_counter()
        self._since = (self.t0, start_step)  # (time, step) the eta's pace is measured from
        self.last_plot = self.t0
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if path.exists():  # keep only what happened up to the checkpoint we resume from
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("step", 0) <= start_step and start_step > 0:
                    self.records.append(rec)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.notes.append(
                    "TensorBoard not installed (pip install tensorboard): logging to metrics.jsonl"
                )
        if progress and not sys.stderr.isatty():
            self.lines = True
        elif progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=title or "train",
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        rec = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in rec.items()}
        self.records.append(rec)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(("val/" if k.startswith("val_") else "train/") + k, v, rec["step"])
        if "loss" in rec and (self.bar is not None or self.lines):
            parts = [
                f"loss {rec['loss']:.4f}",
                f"lr {rec['lr']:.2e}",
                f"{human_count(rec['tok_per_s'])} tok/s",
            ]
            if rec.get("mfu") is not None:
                parts.append(f"mfu {100 * rec['mfu']:.1f}%")
            if self.bar is not None:
                self.bar.set_postfix_str(" | ".join(parts), refresh=False)
            else:
                # the pace since the previous line: a compile or a slow start does not linger in it
                now, (t_prev, s_prev) = time.perf_counter(), self._since
                eta = (self.total - rec["step"]) * (now - t_prev) / max(rec["step"] - s_prev, 1)
                self._since = (now, rec["step"])
                print(
                    f"step {rec['step']}/{self.total} | "
                    + " | ".join(parts)
                    + f" | eta {format_duration(eta)}",
                    file=sys.stderr,
                    flush=True,
                )

    def set_total(self, total_steps: int) -> None:
        """The run's length changed (--time-budget fits it to the time left)."""
        self.total = total_steps
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        """Print without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def plot(self, every: float = 0.0) -> Path | None:
        """loss.png: train loss (raw and smoothed) and validation loss against steps. With `every`, only
        if the last plot is older than that many seconds (a plot costs ~0.3 s, the first one ~1.5 s)."""
        if not self.enabled:
            return None
        if every and time.perf_counter() - self.last_plot < every:
            return None
        self.last_plot = time.perf_counter()
        train = [
            (r["step"], r["loss"])
            for r in self.records
            if "loss" in r and r["loss"] is not None and math.isfinite(r["loss"])
        ]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        if not train and not val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, lw=1, label="train")
            ema, sm = ys[0], []
            for y in ys:
                ema = 0.9 * ema + 0.1 * y
                sm.append(ema)
            ax.plot(xs, sm, color="tab:blue", lw=1.5, label="train (smoothed)")
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.run_dir / "loss.png"
        with atomic_file(out) as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.file is not None:
            self.file.close()
            self.file = None


def summary_lines(s: dict) -> list[str]:
    """The run summary printed at the end (and returned by train())."""
    lines = [
        f"run            {s['run_dir']}",
        f"model          {s['model']}",
        f"steps          {s['step']} ({human_count(s['tokens'])} tokens) in {format_duration(s['train_time'])}",
    ]
    if s.get("tok_per_s"):
        mfu = f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") else ""
        lines.append(f"throughput     {human_count(s['tok_per_s'])} tokens/s{mfu}")
    if s.get("loss") is not None:
        lines.append(f"train loss     {s['loss']:.4f}")
    if s.get("val_loss") is not None:
        bpb = f", {s['val_bpb']:.4f} bits/byte" if s.get("val_bpb") is not None else ""
        lines.append(f"val loss       {s['val_loss']:.4f}{bpb}")
    if s.get("final"):
        lines.append(f"final          {s['final']}")
    return lines


def write_report(run_dir: Path, summary: dict, config_yaml: str, samples: list[str]) -> Path:
    """runs/<name>/report.md: the summary, the loss plot, the last samples and the resolved config."""
    lines = [f"# Training run `{Path(run_dir).name}`", "", "```", *summary_lines(summary), "```", ""]
    if (Path(run_dir) / "loss.png").exists():
        lines += ["![loss](loss.png)", ""]
    if samples:
        lines += [
            f"## Samples at step {summary['step']}",
            "",
            "```",
            *[s.strip() for s in samples],
            "```",
            "",
        ]
    lines += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    out = Path(run_dir) / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
