"""Distillation: the loss, the tokenizer checks, and a distilled student that beats the same student
trained on the data alone at equal steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from compress_data import debug_model
from train_data import make_config, run_lmforge, single_threaded

from lmforge.compress.distill import distill, distillation_loss
from lmforge.utils import UserError

STUDENT = {
    "model.d_model": 32,
    "model.n_layers": 1,
    "model.n_heads": 2,
    "model.n_kv_heads": 1,
    "model.d_ff": 64,
    "train.batch_size": 16,
    "train.max_steps": 30,
    "train.lr": 1e-2,
    "train.warmup_steps": 5,
    "ckpt.every": 0,
    "eval.every": 0,
    "eval.batches": 8,
}


def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, 0] = -100
    T, a = 2.0, 0.7
    valid = (y != -100).flatten()
    ps = F.log_softmax(s.flatten(0, 1)[valid] / T, -1)
    pt = F.softmax(t.flatten(0, 1)[valid] / T, -1)
    kl = (pt * (pt.log() - ps)).sum(-1).mean()
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(distillation_loss(s, t, y, T, a), a * T * T * kl + (1 - a) * ce, atol=1e-6)
    assert torch.allclose(distillation_loss(s, t, y, T, 0.0), ce)
    assert float(distillation_loss(s, s, y, T, 1.0)) == pytest.approx(0.0, abs=1e-6)  # KL(p || p) = 0


def test_distilled_student_beats_the_same_student_on_data_alone(trained, corpus, tmp_path):  # noqa: F811
    from lmforge.train import train

    with single_threaded():
        plain = train(make_config(corpus, tmp_path, "plain", **STUDENT))
    # the same student, seed, data order and steps, distilled through the CLI (the training loop)
    args = ["distill", "--teacher", trained, "--student", "llama:debug", "--data", corpus["data"]]
    args += ["--alpha", 0.9, "--temperature", 1, "--no-eval", "--name", "kd", "--out_dir", tmp_path]
    args += ["--seed", 0, "--device", "cpu", "--dtype", "fp32", "--eval.samples", 0]
    args += ["--model.max_seq_len", 64, "--data.seq_len", 64, "--log.progress", "false"]
    args += ["--log.tensorboard", "false"]
    r = run_lmforge(*args, *(f"--{k}={v}" for k, v in STUDENT.items()))
    assert r.returncode == 0, r.stderr + r.stdout
    recs = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    kd = [x["val_loss"] for x in recs if "val_loss" in x][-1]
    assert (tmp_path / "kd" / "final" / "model.safetensors").is_file()
    print(f"plain {plain['val_loss']:.4f}, distilled {kd:.4f}")
    assert math.isfinite(kd) and kd < plain["val_loss"] - 0.1, (kd, plain["val_loss"])  # ~4.68 vs ~5.00


def test_distill_refuses_a_different_tokenizer(trained, corpus, tmp_path):  # noqa: F811
    from lmforge.checkpoint import save_model
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train_tokenizer

    save_model(debug_model("llama", vocab_size=1000), tmp_path / "other")
    with pytest.raises(UserError, match="do not share the tokenizer"):
        distill(trained, str(tmp_path / "other"), corpus["data"], overrides={"out_dir": str(tmp_path)})
    texts = ["def f(x):\n    return x * 2\n" * 20, "class A:\n    pass\n" * 30]
    tok = train_tokenizer(texts, 300)
    tok.save(tmp_path / "tok")
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    prepare(
        str(tmp_path / "txt"), tmp_path / "tok", tmp_path / "data", workers=1, progress=False, verbose=False
    )
    with pytest.raises(UserError, match="teacher's tokenizer"):
        distill(trained, "debug", tmp_path / "data", overrides={"out_dir": str(tmp_path)})
