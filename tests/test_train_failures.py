"""Failures: NaN/inf losses, failed checkpoint writes, out-of-memory, and the time budget's deadline."""

from __future__ import annotations

import math

import pytest
import torch
from train_data import losses, make_config

from lmforge.model import Transformer
from lmforge.train import TrainingDiverged, train
from lmforge.train.state import list_checkpoints, read_checkpoint
from lmforge.utils import UserError


def _poison(monkeypatch, at_call: int, exc: Exception | None = None):
    """Make the `at_call`-th training forward return NaN (or raise `exc`)."""
    orig, calls = Transformer.forward, [0]

    def forward(self, idx, targets=None, **kw):
        out = orig(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls[0] += 1
            if calls[0] == at_call:
                if exc is not None:
                    raise exc
                out = out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward)


def test_nan_stops_naming_the_step_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch, one_thread):  # noqa: F811
    _poison(monkeypatch, 5)
    cfg = make_config(corpus, tmp_path, "nan", **{"ckpt.every": 2, "train.max_steps": 8})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan at step 5.*step_000004"):
        train(cfg)
    run = tmp_path / "nan"
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004"]
    assert not (run / "final").exists()
    assert read_checkpoint(run / "checkpoints/step_000004")[0]["step"] == 4
    monkeypatch.undo()  # the poisoned step was never applied: the run continues from step 4
    s = train(make_config(corpus, tmp_path, "nan", resume="auto", **{"ckpt.every": 2, "train.max_steps": 8}))
    assert s["step"] == 8 and math.isfinite(s["loss"])


def test_skip_nonfinite_skips_the_step(corpus, tmp_path, monkeypatch, one_thread):  # noqa: F811
    _poison(monkeypatch, 3)
    s = train(make_config(corpus, tmp_path, "skip", **{"train.skip_nonfinite": True, "train.max_steps": 6}))
    assert s["step"] == 6 and math.isfinite(s["loss"])
    ls = dict(losses(tmp_path / "skip"))
    assert math.isnan(ls[3]) and all(math.isfinite(v) for k, v in ls.items() if k != 3)


def test_failed_checkpoint_write_leaves_the_previous_one_whole(corpus, tmp_path, monkeypatch, one_thread):  # noqa: F811
    from lmforge.train import state as trainer_state

    real, n = trainer_state.save_file, [0]

    def flaky(tensors, path, **kw):
        if path.endswith("optimizer.safetensors"):
            n[0] += 1
            if n[0] == 2:
                raise OSError(28, "No space left on device")
        return real(tensors, path, **kw)

    monkeypatch.setattr(trainer_state, "save_file", flaky)
    with pytest.raises(UserError, match="No space left"):  # one line (utils.atomic_dir)
        train(make_config(corpus, tmp_path, "disk", **{"ckpt.every": 2, "train.max_steps": 6}))
    ck = tmp_path / "disk/checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [
        "step_000002"
    ]  # no half-written step_000004, no temp dirs
    state, optim, _ = read_checkpoint(ck / "step_000002")
    assert state["step"] == 2 and optim["state"]


def test_out_of_memory_says_what_reduces_memory(corpus, tmp_path, monkeypatch, one_thread):  # noqa: F811
    _poison(monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(UserError) as e:
        train(make_config(corpus, tmp_path, "oom", **{"train.max_steps": 4}))
    msg = str(e.value)
    assert "out of GPU memory at step 1" in msg
    for option in (
        "--train.batch_size",
        "--train.activation_checkpointing",
        "--parallel fsdp",
        "--lora.rank",
    ):
        assert option in msg


def test_activation_checkpointing_gives_the_same_losses(corpus, tmp_path, one_thread):  # noqa: F811
    train(make_config(corpus, tmp_path, "plain", **{"train.max_steps": 3, "model.dropout": 0.1}))
    train(
        make_config(
            corpus,
            tmp_path,
            "ac",
            **{"train.max_steps": 3, "model.dropout": 0.1, "train.activation_checkpointing": True},
        )
    )
    assert losses(tmp_path / "ac") == losses(tmp_path / "plain")


def test_time_budget_run_finishes_in_time(corpus, tmp_path, one_thread, capsys):  # noqa: F811
    cfg = make_config(
        corpus, tmp_path, "budget", time_budget="24s", **{"train.max_steps": None, "train.batch_size": 2}
    )
    s = train(cfg)
    out = capsys.readouterr().out
    assert "time budget 0m24s" in out and "chosen: llama depth" in out
    assert s["wall_time"] < 24 * 1.25, s["wall_time"]
    assert (tmp_path / "budget/final/model.safetensors").exists()
    from lmforge.train.config import read_yaml

    saved = read_yaml(tmp_path / "budget/config.yaml")
    assert saved["time_budget"] is None and saved["train"]["tokens"] > 0 and saved["model"]["n_layers"] >= 1
    assert saved["train"]["compile"] is False  # too short a budget to pay for a compile
    # a CPU step of up to 4K tokens is one micro-batch: here the 2 rows given grow to the step's, and the
    # loader was rebuilt for them (train_step checks every micro-batch's rows)
    gbt, rows, T = (
        saved["train"]["global_batch_tokens"],
        saved["train"]["batch_size"],
        saved["data"]["seq_len"],
    )
    assert gbt <= 4096 and rows > 2 and rows * T == gbt
    # the plan as it ended: its length fitted to the deadline, which --resume auto continues
    assert (
        saved["train"]["fit_time"]
        and saved["train"]["tokens"] == s["total_steps"] * saved["train"]["global_batch_tokens"]
    )
