"""A tiny pretraining run learns: validation loss falls well below the unigram baseline.

The unigram baseline is the entropy of the validation tokens' own frequency distribution: the best
loss a model that ignores context can reach (and it is computed on the validation set itself, so it is
a generous bar). The run also writes everything a run directory promises (DESIGN.md section 3).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from train_data import make_config

from lmforge.train import train


def unigram_entropy(data_dir) -> float:
    meta = json.loads((data_dir / "meta.json").read_text())
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for shard in meta["splits"]["val"]["shards"]:
        counts += np.bincount(
            np.fromfile(data_dir / shard["file"], dtype=meta["dtype"]), minlength=meta["vocab_size"]
        )
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_pretraining_beats_unigram_baseline(corpus, tmp_path, one_thread):  # noqa: F811
    h = unigram_entropy(corpus["data"])
    cfg = make_config(
        corpus,
        tmp_path,
        "learn",
        **{
            "dtype": "auto",
            "model.d_model": 128,
            "model.n_heads": 4,
            "model.d_ff": 384,
            "train.batch_size": 16,
            "train.max_steps": 160,
            "train.lr": 6e-3,
            "train.warmup_steps": 10,
            "eval.every": 80,
            "eval.batches": 8,
            "eval.samples": 1,
            "eval.max_new_tokens": 16,
            "ckpt.every": 80,
            "log.every": 10,
            "log.progress": True,
        },
    )
    s = train(cfg)
    print(f"unigram entropy {h:.3f} nats; val loss {s['val_loss']:.3f}; {s['val_bpb']:.3f} bits/byte")
    assert s["val_loss"] < h - 0.6, (s["val_loss"], h)  # ~5.2 nats -> ~4.4 in 160 steps
    assert 0 < s["val_bpb"] < s["val_loss"] / math.log(2)  # more than one byte per token on average

    run = tmp_path / "learn"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "report.md",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "checkpoints/step_000080/trainer_state.json",
        "checkpoints/step_000160/optimizer.safetensors",
    ):
        assert (run / f).exists(), f
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 80, 160]
    assert evals[0]["val_loss"] > evals[-1]["val_loss"]
    logs = [r for r in recs if "loss" in r]
    assert all(k in logs[-1] for k in ("lr", "tok_per_s", "mfu", "grad_norm", "tokens"))
    # the saved config rebuilds the same run
    from lmforge.train.config import RunConfig, read_yaml

    assert RunConfig.from_dict(read_yaml(run / "config.yaml")) == cfg
    report = (run / "report.md").read_text()
    assert "val loss" in report and "![loss](loss.png)" in report and "sample:" in report


def test_tensorboard_events_when_installed(corpus, tmp_path, one_thread):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        make_config(
            corpus, tmp_path, "tb", **{"train.max_steps": 3, "eval.every": 3, "log.tensorboard": True}
        )
    )
    ev = EventAccumulator(str(tmp_path / "tb/tensorboard"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tok_per_s", "val/val_loss", "val/val_bpb"} <= set(tags)
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_and_resume(corpus, tmp_path):  # noqa: F811
    over = {"device": "cuda", "dtype": "bf16", "train.max_steps": 6, "ckpt.every": 3, "eval.every": 3}
    s = train(make_config(corpus, tmp_path, "gpu", **over))
    assert s["step"] == 6 and math.isfinite(s["loss"]) and s["mfu"] is not None
    r = train(
        make_config(corpus, tmp_path, "gpu2", resume=str(tmp_path / "gpu/checkpoints/step_000003"), **over)
    )
    assert r["step"] == 6 and abs(r["loss"] - s["loss"]) < 1e-2  # CUDA kernels need not be bit-exact
