"""`lmforge report`: variants of a model side by side, so the trade-off is seen at a glance.

    r = compare_checkpoints(["runs/q/final", "runs/q/int8", "runs/q/pruned"], "python-docs", "runs/q/report")

For each checkpoint (fp32, bf16, quantized, pruned, distilled, ...): size on disk, parameters, bits
per byte and perplexity on the same data (same documents, same token budget), decode speed at batch 1
and peak memory. Written to `report.md` (a table, the plots, the machine and date), `report.json`,
and two plots: quality against size and quality against speed (bits per byte: lower is better).
Bits per byte is the column to compare across tokenizers; perplexity is per token and is not.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from lmforge.utils import UserError, atomic_write_text, human_bytes, human_count

PLOT_SIZE = (8, 5)  # inches; saved at PLOT_DPI, so every plot is 800 x 500 pixels
PLOT_DPI = 100


def format_table(columns: list[str], rows: list[list], markdown: bool = False) -> str:
    """Columns aligned in plain text, or a GitHub markdown table."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def labels_for(paths: list) -> list[str]:
    """Shortest unique trailing parts of the paths: runs/a/final, runs/b/final -> a/final, b/final."""
    parts = [Path(os.path.expanduser(str(p))).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _new_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)


def scatter_plot(path, xs, ys, labels, xlabel: str, ylabel: str, title: str, log_x: bool = False) -> Path:
    """One labelled point per model; saved as a PNG of exactly PLOT_SIZE x PLOT_DPI pixels."""
    plt, fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(xs, ys, s=60, c=range(len(xs)), cmap="viridis", zorder=3)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, zorder=0)
    ax.margins(0.15)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=PLOT_DPI)  # no bbox_inches="tight": the pixel size stays fixed
    plt.close(fig)
    return path


def compare_checkpoints(
    checkpoints: list,
    data,
    out,
    *,
    names: list[str] | None = None,
    split: str = "val",
    max_tokens: int | None = 50_000,
    seq_len: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.02,
    new_tokens: int = 32,
    prompt_len: int = 64,
    device: str = "auto",
    dtype=None,
    progress: bool = False,
) -> dict:
    """Evaluate and benchmark each checkpoint; write report.md, report.json and the plots to `out`."""
    from lmforge.evaluate.bench import bench_lm, machine
    from lmforge.evaluate.perplexity import evaluate_lm
    from lmforge.lm import load
    from lmforge.utils import dir_size

    if not checkpoints:
        raise UserError("give at least one checkpoint")
    names = names or labels_for(checkpoints)
    if len(names) != len(checkpoints):
        raise UserError(f"--names has {len(names)} names for {len(checkpoints)} checkpoints")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, path in zip(names, checkpoints):
        if progress:
            print(f"[{name}] {path}", file=sys.stderr, flush=True)
        lm = load(path, device=device, dtype=dtype)
        hf = json.loads((Path(path) / "config.json").read_text())
        cfg_dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "?")
        ev = evaluate_lm(
            lm,
            data,
            split=split,
            max_tokens=max_tokens,
            seq_len=seq_len,
            text_field=text_field,
            val_fraction=val_fraction,
            progress=progress,
        )
        b = bench_lm(lm, batch_sizes=(1,), prompt_len=prompt_len, new_tokens=new_tokens, bandwidth_mb=64)[
            "batches"
        ][0]
        rows.append(
            {
                "name": name,
                "checkpoint": str(path),
                "stored_dtype": cfg_dtype,
                "quantization": lm.config.extra.get("quantization_config", {}).get("quant_method")
                if isinstance(lm.config.extra.get("quantization_config"), dict)
                else None,
                "size_on_disk_bytes": dir_size(path),
                "params": lm.model.num_params(),
                "bits_per_byte": ev["bits_per_byte"],
                "perplexity": ev["perplexity"],
                "loss": ev["loss"],
                "accuracy": ev["accuracy"],
                "tokens": ev["tokens"],
                "tokenizer_hash": lm.tokenizer.hash,
                "decode_tok_s": b["decode_tok_s"],
                "ttft_ms": b["ttft_ms"],
                "peak_memory_bytes": b["peak_memory_bytes"],
                "roofline_pct": b["roofline_pct"],
            }
        )
        del lm
        gc.collect()
    plots = write_plots(rows, out)
    result = {
        "data": str(data),
        "split": split,
        "max_tokens": max_tokens,
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "models": rows,
        "plots": [p.name for p in plots],
    }
    atomic_write_text(out / "report.json", json.dumps(result, indent=2))
    atomic_write_text(out / "report.md", render_markdown(result))
    return result


def write_plots(rows: list[dict], out) -> list[Path]:
    out = Path(out)
    names = [r["name"] for r in rows]
    bpb = [r["bits_per_byte"] for r in rows]
    sizes = [r["size_on_disk_bytes"] / 2**20 for r in rows]
    speeds = [r["decode_tok_s"] for r in rows]
    spread = lambda v: min(v) > 0 and max(v) / min(v) > 10  # noqa: E731
    return [
        scatter_plot(
            out / "quality_vs_size.png",
            sizes,
            bpb,
            names,
            "size on disk (MiB)",
            "bits per byte (lower is better)",
            "Quality against size",
            log_x=spread(sizes),
        ),
        scatter_plot(
            out / "quality_vs_speed.png",
            speeds,
            bpb,
            names,
            "decode tokens/s at batch 1 (higher is better)",
            "bits per byte (lower is better)",
            "Quality against speed",
            log_x=spread(speeds),
        ),
    ]


def render_markdown(result: dict) -> str:
    rows = result["models"]
    cols = [
        "model",
        "dtype",
        "size",
        "params",
        "bits/byte",
        "perplexity",
        "decode tok/s",
        "TTFT ms",
        "peak memory",
    ]
    table = []
    best = min(r["bits_per_byte"] for r in rows)
    for r in rows:
        dt = r["stored_dtype"] + (f" ({r['quantization']})" if r["quantization"] else "")
        bpb = f"{r['bits_per_byte']:.4f}" + (" ★" if r["bits_per_byte"] == best and len(rows) > 1 else "")
        table.append(
            [
                r["name"],
                dt,
                human_bytes(r["size_on_disk_bytes"]),
                human_count(r["params"]),
                bpb,
                f"{r['perplexity']:.3f}" if math.isfinite(r["perplexity"]) else "-",
                f"{r['decode_tok_s']:.1f}",
                f"{r['ttft_ms']:.1f}",
                human_bytes(r["peak_memory_bytes"]),
            ]
        )
    notes = []
    if len({r["tokenizer_hash"] for r in rows}) > 1:
        notes.append("The models use different tokenizers: compare bits per byte, not perplexity.")
    lines = [
        "# Model variants",
        "",
        f"Data: `{result['data']}` ({result['split']} split, up to {result['max_tokens'] or 'all'} tokens per model). "
        f"Speed: batch 1, greedy decode. Machine: {result['machine']}; {result['date']}.",
        "",
        format_table(cols, table, markdown=True),
        "",
        *notes,
        "Bits per byte is tokenizer-independent (★ = best); peak memory is the process's peak RSS on CPU or "
        "CUDA's max allocated memory on GPU while decoding.",
        "",
        "![quality against size](quality_vs_size.png)",
        "",
        "![quality against speed](quality_vs_speed.png)",
        "",
    ]
    return "\n".join(lines)
