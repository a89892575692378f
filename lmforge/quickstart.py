"""`lmforge quickstart`: a first language model end to end on the embedded corpora (python-docs and
python-stdlib: CPython's own documentation and standard-library source, built locally).

Every stage writes into the run directory and records what it did in `stages.json`; a re-run reuses
a finished stage (its output is there) unless `--fresh` is given.

    1 tokenizer  <out>/tokenizer/      byte-level BPE trained on the corpus (train split)
    2 data       <out>/data/           token shards with a validation split
    3 pretrain   <out>/final/          a Qwen3-style model (Llama with QK-norm) sized for the time budget
                                       (lmforge pretrain --time-budget)
    4 evaluate                         bits-per-byte and perplexity on each validation split; three samples
    5 quantize   <out>/int8/           weight-only int8, evaluated too
    6 export     <out>/export/         ONNX (checked in onnxruntime) and GGUF (llama.cpp)
    7 report     <out>/report.md       the report card: config, loss curve, metrics, samples, timings
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lmforge.data.embedded import PARTS as EMBEDDED_PARTS
from lmforge.utils import atomic_write_text, dir_size, human_bytes, human_count

PROMPTS = ["def ", "The os module", "class "]
OPTIMIZERS = {"muon": "Muon for the blocks' matrices and AdamW for the rest", "adamw": "AdamW"}


class Stages:
    """stages.json: one record per finished stage ({"seconds": ..., **results})."""

    def __init__(self, out: Path, fresh: bool):
        self.file = out / "stages.json"
        self.done: dict = {} if fresh or not self.file.exists() else json.loads(self.file.read_text())

    def run(self, name: str, outputs: list[Path], fn, *, title: str):
        rec = self.done.get(name)
        if rec is not None and all(p.exists() for p in outputs):
            print(
                f"[{name}] reusing {', '.join(str(p) for p in outputs) or 'previous result'} "
                f"({rec['seconds']:.1f}s when it ran; --fresh to redo)"
            )
            return rec
        print(f"\n[{name}] {title}")
        t0 = time.perf_counter()
        result = fn() or {}
        rec = {"seconds": time.perf_counter() - t0, **result}
        self.done[name] = rec
        atomic_write_text(self.file, json.dumps(self.done, indent=2) + "\n")
        print(f"[{name}] done in {rec['seconds']:.1f}s")
        return rec


def quickstart(
    out: str = "runs/quickstart",
    *,
    fresh: bool = False,
    minutes: float = 5.0,
    vocab_size: int = 4096,
    data: str = "embedded",
    device: str = "auto",
    dtype: str | None = None,
    seq_len: int = 256,
    export: bool = True,
    steps: int | None = None,
) -> Path:
    """Run the whole pipeline; returns the path of the report card. `steps` trains the smallest preset
    (debug) for that many steps instead of sizing a model for `minutes`: the pipeline in seconds.

    Args:
        out: run directory
        fresh: redo every stage instead of reusing finished ones
        minutes: pretraining time budget (the whole quickstart takes about half a minute more); the model
            size, token count and CPU threads are chosen to fit it
        vocab_size: tokenizer vocabulary size
        data: corpus: embedded (python-docs + python-stdlib, offline), python-docs, c4 (streamed, needs
            internet) or any source spec
        seq_len: training sequence length
        export: write the ONNX and GGUF exports
        steps: train the smallest (debug) model for this many steps instead of filling --minutes: the
            whole pipeline in seconds, to check a setup
    """
    from lmforge.data.prepare import prepare
    from lmforge.data.tokenize_corpus import train_tokenizer_on

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    st = Stages(out, fresh)
    tok_dir, data_dir, final = out / "tokenizer", out / "data", out / "final"
    int8_dir, export_dir = out / "int8", out / "export"

    retrained = []  # a new tokenizer makes the quickstart's earlier token shards another preparation

    def tokenizer_stage():
        tok, rep = train_tokenizer_on(data, vocab_size, tok_dir)
        retrained.append(True)
        return {"vocab_size": tok.vocab_size, "bytes_per_token": rep.get("bytes_per_token")}

    st.run(
        "tokenizer",
        [tok_dir / "tokenizer.json"],
        tokenizer_stage,
        title=f"training a {vocab_size}-token BPE tokenizer on {data}",
    )

    def data_stage():
        meta = prepare(data, tok_dir, data_dir, force=fresh or bool(retrained))
        return {k: meta.get(k) for k in ("mb_per_s", "peak_rss_mb")} | {
            "data": data,
            "train_tokens": meta["splits"]["train"]["tokens"],
            "val_tokens": meta["splits"]["val"]["tokens"],
        }

    st.run("data", [data_dir / "meta.json"], data_stage, title=f"tokenizing {data} into token shards")

    def pretrain_stage():
        import torch

        from lmforge.train import load_config, train

        cfg = load_config(
            None,
            {
                "name": "pretrain",
                "out_dir": str(out),
                "device": device,
                "dtype": dtype or "auto",
                # batch 8 x seq_len: a few minutes on a CPU are short of steps more than of tokens
                **(
                    {"time_budget": f"{minutes * 60:.0f}s", "train.batch_size": 8}
                    if steps is None
                    else {"model.size": "debug", "train.max_steps": steps, "eval.batches": 2}
                ),
                # Qwen3: Llama with each head's queries and keys RMS-normed (QK-norm), which trains a
                # budget's model better (docs/training.md); every exporter and llama.cpp read it
                "model.family": "qwen3",
                "data.path": str(data_dir),
                "data.tokenizer": str(tok_dir),
                "data.seq_len": seq_len,
                "eval.samples": 1,
                "eval.prompts": PROMPTS[:1],
                "ckpt.every": 0,
                "force": True,  # a stage not finished is redone whole, in the quickstart's own run dir
            },
        )
        summary = train(cfg)
        _replace_dir(out / "pretrain" / "final", final)
        if summary["threads"] != torch.get_num_threads():
            # the training found fewer threads faster (other jobs hold the cores): so will the rest be
            print(f"  the next stages use {summary['threads']} thread(s), as the training ended with")
            torch.set_num_threads(summary["threads"])
        from lmforge.checkpoint import read_config

        planned = load_config(out / "pretrain" / "config.yaml")
        return {
            "optimizer": planned.train.optimizer,
            "steps": summary["step"],
            "tokens": summary["tokens"],
            "params": read_config(final).n_params(),
            "val_loss": summary["val_loss"],
            "val_bpb": summary["val_bpb"],
            "tokens_per_s": summary["tok_per_s"],
            "mfu": summary["mfu"],
            "budget_s": minutes * 60 if steps is None else None,
            "train_s": summary["train_time"],  # the training steps alone (no planning, evaluation, saving)
        }

    st.run(
        "pretrain",
        [final / "model.safetensors"],
        pretrain_stage,
        title=f"pretraining a Qwen3 for about {minutes:g} minutes (sized by lmforge pretrain --time-budget)"
        if steps is None
        else f"pretraining the debug-size Qwen3 for {steps} steps",
    )

    def evaluate_stage(path, name):
        import lmforge
        from lmforge.evaluate import evaluate_lm

        lm = lmforge.load(path, device=device)
        # each embedded corpus on its own validation split (python-docs' is the yardstick that stays the
        # same across versions); any other source on the prepared validation split
        splits = {name: name for name in EMBEDDED_PARTS.get(data, ())} or {"val": str(data_dir)}
        per = {name: evaluate_lm(lm.model, lm.tokenizer, src, split="val") for name, src in splits.items()}
        res = next(iter(per.values()))
        samples = [
            lm.generate(p, max_new_tokens=48, temperature=0.8, top_k=50, seed=i)
            for i, p in enumerate(PROMPTS)
        ]
        for p, s in zip(PROMPTS, samples):
            print(f"  {name} sample: {p!r} -> {p + s!r}")
        for split, r in per.items():
            print(
                f"  {name} on {split}: bits-per-byte {r['bits_per_byte']:.4f}, perplexity {r['perplexity']:.2f}"
            )
        return {
            "bits_per_byte": res["bits_per_byte"],
            "perplexity": res["perplexity"],
            "loss": res["loss"],
            "splits": {k: {m: r[m] for m in ("bits_per_byte", "perplexity", "loss")} for k, r in per.items()},
            "size_bytes": dir_size(path),
            "samples": samples,
        }

    st.run(
        "evaluate",
        [final],
        lambda: evaluate_stage(final, "fp32"),
        title="evaluating on the validation split and sampling three continuations",
    )

    def quantize_stage():
        from lmforge.compress.quantize import quantize

        quantize(final, int8_dir, "int8", eval_data=None, device=device)
        return evaluate_stage(int8_dir, "int8")

    st.run(
        "quantize", [int8_dir / "config.json"], quantize_stage, title="quantizing to int8 and evaluating it"
    )

    if export:

        def export_stage():
            from lmforge.export import export as do_export

            onnx = do_export(final, "onnx", out=export_dir / "model.onnx")
            gguf = do_export(final, "gguf", out=export_dir / "model-f16.gguf", dtype="f16")
            return {
                "onnx": str(onnx),
                "gguf": str(gguf),
                "onnx_bytes": dir_size(onnx),
                "gguf_bytes": dir_size(gguf),
            }

        st.run(
            "export",
            [export_dir / "model.onnx", export_dir / "model-f16.gguf"],
            export_stage,
            title="exporting to ONNX (checked in onnxruntime) and GGUF",
        )

    report = out / "report.md"
    write_report(out, st.done, report)
    total = time.perf_counter() - t_all
    print(f"\nquickstart finished in {total:.0f}s; report card: {report}")
    return report


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def write_report(out: Path, done: dict, path: Path) -> None:
    """The report card: what was built, how good it is, how long each stage took, what to try next."""
    pre, ev, q = done.get("pretrain", {}), done.get("evaluate", {}), done.get("quantize", {})
    corpus = done.get("data", {}).get("data", "the corpus")
    epochs = (pre.get("tokens") or 0) / max(1, done.get("data", {}).get("train_tokens") or 0)
    lines = ["# lmforge quickstart: report card", ""]
    cfg_file = out / "final" / "config.json"
    if cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        lines += [
            "## The model",
            "",
            f"A {c['model_type']} model with {human_count(pre.get('params') or 0)} parameters: "
            f"d_model {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads "
            f"({c['num_key_value_heads']} KV heads), vocabulary {c['vocab_size']}, context "
            f"{c['max_position_embeddings']}. Trained for {pre.get('steps')} steps on "
            f"{human_count(pre.get('tokens') or 0)} tokens of {corpus} "
            f"({epochs:.1f} epochs of its training split; {pre.get('tokens_per_s') or 0:,.0f} tokens/s) with "
            + OPTIMIZERS.get(pre.get("optimizer"), "AdamW")
            + ". "
            "Full training config: "
            f"`{out / 'pretrain' / 'config.yaml'}`.",
            "",
        ]
    if (out / "pretrain" / "loss.png").exists():
        lines += ["![loss curve](pretrain/loss.png)", ""]
    splits = list(ev.get("splits") or {"val": ev}) if ev else []
    lines += [
        "## Metrics (validation splits: bits per byte / perplexity)",
        "",
        "| variant | size on disk | " + " | ".join(splits) + " |",
        "|---|---|" + "---|" * len(splits),
    ]
    for name, rec in (("fp32", ev), ("int8", q)):
        if rec:
            per = rec.get("splits") or {"val": rec}
            cells = [
                f"{per[k]['bits_per_byte']:.4f} / {per[k]['perplexity']:.2f}" for k in splits if k in per
            ]
            lines.append(f"| {name} | {human_bytes(rec['size_bytes'])} | " + " | ".join(cells) + " |")
    if "python-docs" in splits:
        lines += ["", "python-docs' validation split is the yardstick: the same documents in every version."]
    ex = done.get("export")
    if ex:
        lines += [
            "",
            f"Exports: `{ex['onnx']}` ({human_bytes(ex['onnx_bytes'])}), `{ex['gguf']}` "
            f"({human_bytes(ex['gguf_bytes'])}).",
        ]
    if ev.get("samples"):
        lines += ["", "## Samples (temperature 0.8, top-k 50)", ""]
        for p, s in zip(PROMPTS, ev["samples"]):
            lines += ["```", p + s, "```"]
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} |" for k, v in done.items()]
    lines += [
        f"| **total** | {sum(v['seconds'] for v in done.values()):.1f} |",
        "",
        "## Next",
        "",
        "```bash",
        f"lmforge chat {out / 'final'}",
        f"lmforge generate {out / 'final'} --prompt 'def ' --max-new-tokens 64",
        f"lmforge serve {out / 'final'} --port 8000      # then open http://127.0.0.1:8000/",
        f"lmforge evaluate {out / 'int8'} --data {out / 'data'}",
        f"docker run --rm -p 8000:8000 -v {(out / 'final').resolve()}:/models/model:ro lmforge:cpu"
        "   # image: docs/docker.md",
        "```",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
    os.utime(path)
