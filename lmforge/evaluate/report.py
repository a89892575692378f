"""`lmforge report`: variants of a model side by side, so the trade-off is seen at a glance.

    paths = ["runs/q/final", "runs/q/int8", "runs/q/pruned"]
    r = compare_checkpoints(load_each(paths), "python-docs", "runs/q/report", names=labels_for(paths))

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
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from lmforge.evaluate.bench import bench_lm, machine
from lmforge.evaluate.perplexity import evaluate_lm
from lmforge.evaluate.table import format_table
from lmforge.utils import UserError, atomic_write_text, dir_size, human_bytes, human_count

PLOT_SIZE = (8, 5)  # inches; saved at PLOT_DPI, so every plot is 800 x 500 pixels
PLOT_DPI = 100


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
    models: Iterable,
    data: str,
    out: str,
    *,
    names: tuple[str, ...] | None = None,
    split: str = "val",
    max_tokens: int | None = 50_000,
    seq_len: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.02,
    new_tokens: int = 32,
    prompt_len: int = 64,
    progress: bool = False,
    echo: bool = False,
) -> dict:
    """Evaluate and benchmark each (model, tokenizer) of `models`; write report.md, report.json and the
    plots to `out`. `models` is consumed one pair at a time, so a lazy iterable
    (lmforge.lm.load_each(paths)) keeps one model in memory.

    Args:
        data: a `data prepare` directory or a source spec, as for evaluate
        out: directory for report.md, report.json and the PNG plots
        names: comma-separated labels (default: the shortest unique path ends)
        split: val (default), train or all
        max_tokens: tokens scored per model
        seq_len: window length (default: each model's context)
        val_fraction: share of documents held out
        new_tokens: tokens decoded for the speed column
        prompt_len: prompt tokens for the speed column
        progress: show progress bars
        echo: print report.md, and the files written to standard error
    """
    out = Path(out)
    rows = []
    for i, (model, tokenizer) in enumerate(models):
        path = getattr(model, "name_or_path", None)  # set by lmforge.load
        name = names[i] if names is not None and i < len(names) else str(path or f"model {i + 1}")
        # (without names, rows are labelled by labels_for their paths below, once all are known)
        if progress:
            print(f"[{name}] {path or ''}", file=sys.stderr, flush=True)
        if tokenizer is None:
            raise UserError(f"{path or name}: no tokenizer (tokenizer.json); bits per byte needs one")
        out.mkdir(parents=True, exist_ok=True)
        ev = evaluate_lm(
            model,
            tokenizer,
            data,
            split=split,
            max_tokens=max_tokens,
            seq_len=seq_len,
            text_field=text_field,
            val_fraction=val_fraction,
            progress=progress,
        )
        b = bench_lm(model, batch_sizes=(1,), prompt_len=prompt_len, new_tokens=new_tokens, bandwidth_mb=64)
        b = b["batches"][0]
        quant = model.config.extra.get("quantization_config")
        rows.append(
            {
                "name": name,
                "checkpoint": path,
                "stored_dtype": _stored_dtype(path, model),
                "quantization": quant.get("method", quant.get("quant_method"))
                if isinstance(quant, dict)
                else None,
                "size_on_disk_bytes": dir_size(path) if path is not None else _tensor_bytes(model),
                "params": model.num_params(),
                "bits_per_byte": ev["bits_per_byte"],
                "perplexity": ev["perplexity"],
                "loss": ev["loss"],
                "accuracy": ev["accuracy"],
                "tokens": ev["tokens"],
                "tokenizer_hash": tokenizer.hash,
                "decode_tok_s": b["decode_tok_s"],
                "ttft_ms": b["ttft_ms"],
                "peak_memory_bytes": b["peak_memory_bytes"],
                "roofline_pct": b["roofline_pct"],
            }
        )
        del model, tokenizer
        gc.collect()
    if not rows:
        raise UserError("give at least one checkpoint")
    if names is not None and len(names) != len(rows):
        raise UserError(f"--names has {len(names)} names for {len(rows)} checkpoints")
    paths = [r["checkpoint"] for r in rows]
    if names is None and all(p is not None for p in paths):
        for r, label in zip(rows, labels_for(paths)):  # known once every model has been read
            r["name"] = label
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
    if echo:
        print((out / "report.md").read_text())
        print(f"written: {out}/report.md, report.json, " + ", ".join(result["plots"]), file=sys.stderr)
    return result


def _stored_dtype(path, model) -> str:
    """The dtype config.json says the weights are stored in, else the dtype they are loaded in."""
    cfg = Path(path) / "config.json" if path is not None else None
    if cfg is not None and cfg.is_file():
        hf = json.loads(cfg.read_text())
        return str(hf.get("torch_dtype") or hf.get("dtype") or "?")
    return str(model.tok_emb.weight.dtype).replace("torch.", "")


def _tensor_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (the size of a model that was not loaded from disk)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


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
