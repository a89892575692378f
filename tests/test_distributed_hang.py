"""A rank that stops or dies ends a torchrun job at once, in one line per rank, and the job resumes.

Real torchrun, 2 gloo processes on CPU, real signals: SIGSTOP of rank 1 (it can no longer do anything,
as a frozen machine) ends the job within --dist_timeout with a line naming it, and `--resume auto` then
repeats the steps after the checkpoint exactly; kill -9 of rank 1 leaves the surviving rank one line
and no traceback. Each rank's output is read from torchrun's per-rank logs (--log-dir, --redirects).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_data import cli_env, losses, run_dict, write_yaml

from lmforge.train.state import list_checkpoints

TIMEOUT = 15  # --dist_timeout of these runs, seconds
OVER = {
    "train.batch_size": 4,
    "train.global_batch_tokens": 4 * 64 * 2,
    "train.max_steps": 100,  # long enough to be caught mid-run on a fast machine
    "ckpt.every": 5,
    "dist_timeout": TIMEOUT,
}
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find the ranks")


def _torchrun(cfg_path, logs: Path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        "-m",
        "lmforge",
        "pretrain",
        "--config",
        str(cfg_path),
    ]
    cmd += ["--parallel", "ddp", *extra]
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank_pid(launcher: int, rank: int, timeout: float = 60) -> int:
    """The pid of worker `rank` among the children of the torchrun process."""
    end = time.time() + timeout
    while time.time() < end:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (d / "environ").read_bytes().split(b"\0") if ppid == launcher else []
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under torchrun {launcher}")


def _wait_for_step(proc, run_dir: Path, step: int, timeout: float = 120) -> None:
    end, metrics = time.time() + timeout, run_dir / "metrics.jsonl"
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        if metrics.exists():
            if any(
                json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines() if x.strip()
            ):
                return
        time.sleep(0.05)
    raise AssertionError("the run did not get there in time")


def _stderr(logs: Path, rank: int) -> str:
    files = sorted(logs.rglob(f"attempt_0/{rank}/stderr.log"))
    assert files, list(logs.rglob("*"))
    return files[-1].read_text()


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "error:" in ln]


def _cleanup(proc, pids) -> None:
    for pid in pids:  # a stopped rank that is still there: let it go, then end it
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_stopped_rank_ends_the_job_then_resume_is_exact_and_a_killed_rank_leaves_one_line(corpus, tmp_path):  # noqa: F811
    cfg = write_yaml(tmp_path / "run.yaml", run_dict(corpus, tmp_path, "hang", **OVER))
    run_dir = tmp_path / "hang"
    proc, pids = _torchrun(cfg, tmp_path / "logs"), []
    try:
        pids.append(_rank_pid(proc.pid, 1))
        _wait_for_step(proc, run_dir, 7)
        os.kill(pids[0], signal.SIGSTOP)
        t0 = time.time()
        proc.communicate(timeout=TIMEOUT + 40)
        took = time.time() - t0
    finally:
        _cleanup(proc, pids)
    assert proc.returncode != 0
    assert took < TIMEOUT + 12, took  # the timeout, a heartbeat interval and the teardown
    ck = list_checkpoints(run_dir)
    assert ck
    err = _stderr(tmp_path / "logs", 0)
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("lmforge pretrain: error: rank 1 stopped making progress after step"), lines
    assert f"the job resumes from {ck[-1]} when restarted with --resume auto" in lines[0]

    # --resume auto repeats the steps after the checkpoint bit for bit; then kill -9 of rank 1
    before = losses(run_dir)
    stopped_at, start = before[-1][0], int(ck[-1].name.split("_")[1])
    assert start < stopped_at < OVER["train.max_steps"]
    proc, pids = _torchrun(cfg, tmp_path / "logs2", "--resume", "auto"), []
    try:
        pids.append(_rank_pid(proc.pid, 1))
        _wait_for_step(proc, run_dir, stopped_at + 1)
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.time()
        proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        _cleanup(proc, pids)
    assert losses(run_dir)[:stopped_at] == before
    assert proc.returncode != 0 and took < 10, took
    err = _stderr(tmp_path / "logs2", 0)
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("lmforge pretrain: error: rank 1 ended unexpectedly after step"), lines


def test_clip_grad_norm_is_the_same_whatever_the_summation_order():
    """The fp64 norm behind FSDP2's bf16 agreement: a gradient cut into shards (another summation order)
    gives the very same fp32 norm and clipped values; and it is torch's clip_grad_norm_ to rounding."""
    import torch

    from lmforge.train import distributed as D
    from lmforge.utils import UserError

    g = torch.Generator().manual_seed(0)
    whole = [torch.nn.Parameter(torch.zeros(n, 64)) for n in (513, 70, 1)]
    for p in whole:
        p.grad = torch.randn(p.shape, generator=g) * 3
    cut = []
    for p in whole:  # each gradient as two row shards
        for shard in p.grad.clone().tensor_split(2):
            cut.append(torch.nn.Parameter(torch.zeros_like(shard)))
            cut[-1].grad = shard
    ref = [p.grad.clone() for p in whole]
    d = D.Dist()
    n_whole, n_cut = D.clip_grad_norm(whole, 1.0, d), D.clip_grad_norm(cut, 1.0, d)
    assert n_whole.dtype == torch.float32 and n_whole.item() == n_cut.item()
    for i, p in enumerate(whole):
        assert torch.equal(p.grad, torch.cat([cut[2 * i].grad, cut[2 * i + 1].grad]))
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in whole])).item() == pytest.approx(
        1.0, rel=1e-5
    )
    for p, r in zip(whole, ref):
        p.grad = r.clone()
    want = torch.nn.utils.clip_grad_norm_(whole, 1.0)
    assert n_whole.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(UserError, match="--dist_timeout"):
        D.setup("auto", "cpu", timeout=-1)
