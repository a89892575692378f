"""Data parallelism under real torchrun (2 gloo processes on CPU) matches one process.

2 processes with micro-batch B and no accumulation see the rows one process sees with accumulation 2,
so the losses agree to float rounding (1e-5), for DDP and for FSDP2. A checkpoint written by the
2-process FSDP run resumes in a single process and continues on the same curve. Muon
(--train.optimizer muon) under DDP matches one process too.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_data import cli_env, losses, make_config, run_dict, write_yaml

from lmforge.train import train
from lmforge.train.state import list_checkpoints, read_checkpoint

STEPS = 6
OVER = {
    "train.batch_size": 4,
    "train.global_batch_tokens": 4 * 64 * 2,
    "train.max_steps": STEPS,
    "ckpt.every": 3,
    "dtype": "fp32",
    "eval.every": 3,
    "eval.batches": 2,
}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):  # noqa: F811
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref")
    try:
        s = train(make_config(corpus, out, "one", **OVER))
    finally:
        torch.set_num_threads(n)
    assert s["step"] == STEPS
    return out / "one", s


def _torchrun(cfg_path, parallel: str):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lmforge",
        "pretrain",
        "--config",
        str(cfg_path),
        "--parallel",
        parallel,
    ]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_accumulation(corpus, tmp_path, reference, parallel, one_thread):  # noqa: F811
    ref_dir, ref = reference
    cfg = write_yaml(tmp_path / "run.yaml", run_dict(corpus, tmp_path, parallel, **OVER))
    r = _torchrun(cfg, parallel)
    assert "x 2 proc x 1 accum" in r.stdout and parallel in r.stdout
    got, want = losses(tmp_path / parallel), losses(ref_dir)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)
    # checkpoints are written once, with full tensors, and carry the global loader position
    ck = list_checkpoints(tmp_path / parallel)
    assert [p.name for p in ck] == ["step_000003", "step_000006"]
    state, optim, _ = read_checkpoint(ck[0])
    assert (
        state["world_size"] == 2 and state["loader"]["position"] == 3 * 2 * 4
    )  # rows: steps x ranks x batch
    ref_optim = read_checkpoint(list_checkpoints(ref_dir)[0])[1]
    for name, st in ref_optim["state"].items():
        assert optim["state"][name]["exp_avg"].shape == st["exp_avg"].shape  # unsharded
    if parallel == "fsdp":  # the 2-process checkpoint resumes in 1 process on the same curve
        s = train(make_config(corpus, tmp_path, "resumed", resume=str(ck[0]), **OVER))
        assert s["step"] == STEPS
        for (sa, a), (sb, b) in zip(losses(tmp_path / "resumed"), want[3:]):
            assert sa == sb and a == pytest.approx(b, abs=1e-5)
        assert s["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-4)


def test_ddp_muon_matches_one_process(corpus, tmp_path, one_thread):  # noqa: F811
    """--train.optimizer muon under DDP: every rank orthogonalises the same all-reduced gradient (whole
    matrices), so 2 processes follow 1 process with accumulation 2, as AdamW does. (FSDP2 refuses muon
    at setup: tests/test_muon.py.)"""
    over = OVER | {"train.optimizer": "muon", "ckpt.every": 0, "eval.every": 0}
    train(make_config(corpus, tmp_path, "one", **over))
    cfg = write_yaml(tmp_path / "run.yaml", run_dict(corpus, tmp_path, "ddp", **over))
    r = _torchrun(cfg, "ddp")
    assert "x 2 proc x 1 accum" in r.stdout
    got, want = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)
