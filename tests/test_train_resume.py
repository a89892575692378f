"""Exact resume: a run stopped and resumed logs the same losses, bit for bit, as one that never stopped.

In process (resume from a periodic checkpoint), and through the real CLI: SIGTERM on a pretraining run,
SIGINT on a LoRA fine-tuning run with LoRA dropout (so the restored RNG matters), then `--resume auto`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from train_data import base_model, cli_env, losses, make_config, run_dict, write_yaml

from lmforge.train import train
from lmforge.train.state import list_checkpoints, read_checkpoint


def test_resume_from_checkpoint_is_exact(corpus, tmp_path, one_thread):  # noqa: F811
    # bf16 autocast as a user gets it on this CPU; dropout on, so the restored RNG matters too
    over = {"dtype": "bf16", "model.dropout": 0.1, "train.max_steps": 8, "ckpt.every": 4}
    a = train(make_config(corpus, tmp_path, "a", **over))
    assert a["step"] == 8
    ck = [p.name for p in list_checkpoints(tmp_path / "a")]
    assert ck == ["step_000004", "step_000008"]
    b = train(make_config(corpus, tmp_path, "b", resume=str(tmp_path / "a/checkpoints/step_000004"), **over))
    assert b["step"] == 8
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in lb] == [5, 6, 7, 8]
    assert lb == la[4:]  # exact equality, not approximate

    state, optim, _ = read_checkpoint(tmp_path / "a/checkpoints/step_000004")
    assert state["step"] == 4 and state["tokens"] == 4 * 8 * 64
    assert state["loader"]["position"] == 4 * 8
    assert set(next(iter(optim["state"].values()))) == {"step", "exp_avg", "exp_avg_sq"}


def _wait_for_step(proc, metrics, step: int, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        if metrics.exists():
            recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if any(r.get("step", 0) >= step and "loss" in r for r in recs):
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run to log")


def _run_cli(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _stop_and_resume(cmd: str, cfg_path, run_dir, sig, stop_after: int):
    """Start the CLI, send `sig` after `stop_after` logged steps, check the checkpoint, resume to the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", cmd, "--config", str(cfg_path)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_step(proc, run_dir / "metrics.jsonl", stop_after)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + sig, out
    ck = list_checkpoints(run_dir)
    assert ck, out
    stopped_at = read_checkpoint(ck[-1])[0]["step"]
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}" in out
    r = _run_cli([cmd, "--config", str(cfg_path), "--resume", "auto"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {ck[-1]} at step {stopped_at}" in r.stdout
    return stopped_at


def test_cli_sigterm_then_resume_auto_is_exact(corpus, tmp_path, one_thread):  # noqa: F811
    over = {"train.max_steps": 24, "ckpt.every": 0, "model.max_seq_len": 64}
    d = run_dict(corpus, tmp_path, "cli", **over)
    cfg_path = write_yaml(tmp_path / "run.yaml", d)
    stopped = _stop_and_resume("pretrain", cfg_path, tmp_path / "cli", signal.SIGTERM, 2)
    assert 2 <= stopped < 24
    ref = train(make_config(corpus, tmp_path, "ref", **over))
    assert ref["step"] == 24
    assert losses(tmp_path / "cli") == losses(tmp_path / "ref")
    assert (tmp_path / "cli/final/model.safetensors").exists()
    assert (tmp_path / "cli/final/tokenizer.json").exists()


def test_cli_lora_sigint_then_resume_is_exact(corpus, tmp_path, one_thread):  # noqa: F811
    base = base_model(corpus, tmp_path / "base")
    over = {
        "task": "sft",
        "model.init_from": str(base),
        "data.path": str(corpus["chat"]),
        "lora.rank": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.1,
        "lora.targets": ["all"],
        "train.max_steps": 24,
        "train.lr": 1e-2,
        "ckpt.every": 0,
        "dtype": "fp32",
    }
    d = run_dict(corpus, tmp_path, "lora", **over)
    del d["model"]["max_seq_len"], d["data"]["tokenizer"]  # both come from the base checkpoint
    cfg_path = write_yaml(tmp_path / "lora.yaml", d)
    stopped = _stop_and_resume("finetune", cfg_path, tmp_path / "lora", signal.SIGINT, 2)
    assert 2 <= stopped < 24
    # a LoRA checkpoint is the adapter, not the model
    ck = list_checkpoints(tmp_path / "lora")[-1]
    assert (ck / "adapter_model.safetensors").exists() and not (ck / "model.safetensors").exists()
    ref_cfg = make_config(corpus, tmp_path, "lora_ref", **over)
    ref_cfg.model.overrides.pop("max_seq_len")
    ref_cfg.data.tokenizer = None
    train(ref_cfg)
    assert losses(tmp_path / "lora") == losses(tmp_path / "lora_ref")
    cfg = json.loads((tmp_path / "lora/final/adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(base.resolve())  # PEFT format


def test_fresh_run_refuses_to_overwrite_checkpoints(corpus, tmp_path, one_thread):  # noqa: F811
    train(make_config(corpus, tmp_path, "x", **{"train.max_steps": 2, "ckpt.every": 0}))
    from lmforge.utils import UserError

    with pytest.raises(UserError, match="--resume auto"):
        train(make_config(corpus, tmp_path, "x", **{"train.max_steps": 2}))
    # --resume auto on a finished run continues nothing and rewrites nothing
    s = train(make_config(corpus, tmp_path, "x", resume="auto", **{"train.max_steps": 2}))
    assert s["step"] == 2
