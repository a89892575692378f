"""Training's user errors: one line, exit status 2, nothing written (issue #23, items 1 and 3).

Options are validated before any work; `--resume auto` says what it does; a damaged latest checkpoint
falls back to the previous one (a warning names the damage); a run directory holding an earlier run is
not replaced without --force; a LoRA run does not resume onto a changed base; a full or read-only disk
and a tokenizer larger than the model's vocabulary are one-line errors. Each failing case also checks
that every earlier output is byte-identical afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from train_data import base_model, losses, make_config, run_dict, run_lmforge, write_yaml

from lmforge.train import train
from lmforge.train.config import config_for_run
from lmforge.train.state import fingerprint, list_checkpoints
from lmforge.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hash): 'byte-identical afterwards'."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in this process (lmforge.cli.main: the CLI's own error handling, no start-up cost)."""
    from lmforge.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def one_line_error(r: subprocess.CompletedProcess, command: str, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmforge {command}: error: "), r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run4(corpus, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (and final/); tests copy it."""
    root = tmp_path_factory.mktemp("errors")
    train(make_config(corpus, root, "r", **{"train.max_steps": 4, "ckpt.every": 2}))
    return root / "r"


def copy_run(run4: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "r"
    shutil.copytree(run4, dst)
    return dst


# ---------------------------------------------------------------------------------------------- options
BAD = [
    ("train.lr", "-1", "> 0"),
    ("train.lr", "nan", "> 0"),
    ("train.lr", "0", "> 0"),
    ("train.warmup_steps", "-3", ">= 0"),
    ("train.tokens", "-10", ">= 1"),
    ("train.max_steps", "-5", ">= 1"),
    ("train.max_steps", "0", ">= 1"),
    ("ckpt.every", "-1", ">= 0"),
    ("ckpt.keep", "0", ">= 1"),
    ("train.beta2", "1.5", "[0, 1)"),
    ("train.min_lr_ratio", "2", "[0, 1]"),
    ("train.batch_size", "0", ">= 1"),
    ("eval.temperature", "-1", ">= 0"),
    ("lora.dropout", "1", "[0, 1)"),
    ("train.schedule", "linear", "cosine, wsd, constant"),
]


@pytest.mark.parametrize(("key", "value", "valid"), BAD)
def test_bad_option_values_name_the_option_value_and_range(tmp_path, key, value, valid):
    with pytest.raises(UserError) as e:
        config_for_run(None, {"out_dir": str(tmp_path), key: value}, "pretrain")
    msg = str(e.value)
    assert "\n" not in msg and f"--{key} " in msg and valid in msg, msg
    shown = msg.split(f"--{key} ", 1)[1].split(":")[0]
    assert shown.strip("'") == value or float(shown) == float(value) or math.isnan(float(value)), msg
    # the same value from a YAML recipe fails the same way
    sec, name = key.split(".")
    cfg = write_yaml(tmp_path / "c.yaml", {sec: {name: value}})
    with pytest.raises(UserError, match=f"--{key} "):
        config_for_run(cfg, {"out_dir": str(tmp_path)}, "pretrain")


def test_good_edge_values_are_accepted(tmp_path):
    cfg = config_for_run(
        None,
        {
            "out_dir": str(tmp_path),
            "train.warmup_steps": 0,
            "train.grad_clip": 0,
            "ckpt.every": 0,
            "eval.every": 0,
            "train.min_lr_ratio": 1,
            "train.tokens": "20M",
        },
        "pretrain",
    )
    assert cfg.train.tokens == 20_000_000 and cfg.ckpt.every == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [("train.lr", "nan"), ("train.max_steps", "-5")],  # the others: in process, above
)
def test_cli_rejects_bad_options_before_any_work(corpus, tmp_path, key, value):
    r = run_lmforge(
        "pretrain",
        "--out_dir", tmp_path / "runs", "--name", "x", "--device", "cpu",
        "--data.path", corpus["data"], "--model.size", "debug", "--train.max_steps", 2,
        f"--{key}", value, timeout=120,
    )  # fmt: skip
    one_line_error(r, "pretrain", f"--{key} ", "expected")
    assert not (tmp_path / "runs").exists() and r.stdout == ""


# ---------------------------------------------------------------------------------------------- resume
def test_resume_auto_says_it_starts_fresh(corpus, tmp_path, capsys):
    train(make_config(corpus, tmp_path, "f", resume="auto", **{"train.max_steps": 2, "ckpt.every": 0}))
    out = capsys.readouterr().out
    assert f"--resume auto: no checkpoint in {tmp_path / 'f' / 'checkpoints'}; starting a fresh run" in out


def test_cli_resume_no_refuses_a_run_with_checkpoints(corpus, run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path)
    before = digest(run)
    cfg = write_yaml(tmp_path / "c.yaml", run_dict(corpus, tmp_path, "r"))
    for value in ("no", "false", "none"):
        r = cli(capsys, "pretrain", "--config", cfg, "--resume", value)
        one_line_error(r, "pretrain", "already has checkpoints", "--resume auto", "--force")
    assert digest(run) == before


# a damaged file of the latest checkpoint -> what the warning names
DAMAGE = {
    "truncated optimizer": ("optimizer.safetensors", "truncate"),
    "missing optimizer": ("optimizer.safetensors", "delete"),
    "missing rng": ("rng.safetensors", "delete"),
    "truncated rng": ("rng.safetensors", "truncate"),
    "truncated weights": ("model.safetensors", "truncate"),
    "cut trainer state": ("trainer_state.json", "truncate"),
}


def damage(ckpt: Path, name: str, how: str) -> None:
    f = ckpt / name
    if how == "delete":
        f.unlink()
    else:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(corpus, run4, tmp_path, capsys):
    over = {"train.max_steps": 4, "ckpt.every": 2}  # run4's: it is the run that never stopped
    for i, (kind, (name, how)) in enumerate(DAMAGE.items()):
        root = tmp_path / f"d{i}"
        run = copy_run(run4, root)
        damage(run / "checkpoints/step_000004", name, how)
        capsys.readouterr()
        s = train(make_config(corpus, root, "r", resume="auto", **over))
        out = capsys.readouterr().out
        warning = next(line for line in out.splitlines() if line.startswith("warning: damaged checkpoint"))
        assert str(run / "checkpoints/step_000004") in warning and name in warning, (kind, warning)
        assert "falling back to the previous one" in warning and "step_000002" in warning
        assert f"resumed from {run / 'checkpoints/step_000002'} at step 2" in out
        # the run continued exactly from step 2; the damaged checkpoint is set aside, then written anew
        assert s["step"] == 4 and losses(run) == losses(run4), kind
        assert (run / "checkpoints/step_000004.damaged").is_dir()
        assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004"]


def test_no_usable_checkpoint_is_one_line_and_writes_nothing(corpus, run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path)
    damage(run / "checkpoints/step_000004", "optimizer.safetensors", "truncate")
    damage(run / "checkpoints/step_000002", "rng.safetensors", "delete")
    before = digest(run)
    cfg = write_yaml(tmp_path / "c.yaml", run_dict(corpus, tmp_path, "r", **{"train.max_steps": 6}))
    r = cli(capsys, "pretrain", "--config", cfg, "--resume", "auto")
    one_line_error(r, "pretrain", "no usable checkpoint", "optimizer.safetensors", "rng.safetensors")
    # a checkpoint named explicitly does not fall back
    r = cli(capsys, "pretrain", "--config", cfg, "--resume", run / "checkpoints/step_000004")
    one_line_error(r, "pretrain", "damaged checkpoint", "optimizer.safetensors")
    assert digest(run) == before


# ---------------------------------------------------------------------------------------------- run dirs
def test_finished_run_without_checkpoints_is_not_replaced(corpus, run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path)
    shutil.rmtree(run / "checkpoints")  # final/ and metrics.jsonl stay
    before = digest(run)
    cfg = write_yaml(tmp_path / "c.yaml", run_dict(corpus, tmp_path, "r", **{"train.max_steps": 2}))
    r = run_lmforge("pretrain", "--config", cfg, timeout=180)
    one_line_error(r, "pretrain", str(run), "final/", "--force", "--name")
    r = cli(capsys, "pretrain", "--config", cfg, "--resume", "auto")
    one_line_error(r, "pretrain", "no checkpoint to resume from", "--force")
    assert digest(run) == before
    # another kind of output is not a run directory either
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text("{}")  # a model's, say
    with pytest.raises(UserError, match=r"not a training run's directory \(it holds config.json\).*--force"):
        train(make_config(corpus, tmp_path, "other", **{"train.max_steps": 1}))
    # --force starts over: the earlier outputs are replaced, not mixed with the new run's
    s = train(make_config(corpus, tmp_path, "r", force=True, **{"train.max_steps": 2, "ckpt.every": 0}))
    assert s["step"] == 2 and [p.name for p in list_checkpoints(run)] == ["step_000002"]
    assert [rec[0] for rec in losses(run)] == [1, 2]
    after = digest(run)
    assert after["final/model.safetensors"] != before["final/model.safetensors"]


def test_lora_run_refuses_to_resume_onto_a_changed_base(corpus, tmp_path, capsys):
    base = base_model(corpus, tmp_path / "base")
    over = {
        "task": "sft",
        "model.init_from": str(base),
        "data.path": str(corpus["chat"]),
        "lora.rank": 4,
        "train.max_steps": 2,
        "ckpt.every": 2,
    }
    d = run_dict(corpus, tmp_path, "lora", **over)
    del d["model"]["max_seq_len"], d["data"]["tokenizer"]  # both come from the base checkpoint
    cfg_path = write_yaml(tmp_path / "lora.yaml", d)
    cfg = make_config(corpus, tmp_path, "lora", **over)
    cfg.model.overrides.pop("max_seq_len")
    cfg.data.tokenizer = None
    train(cfg)
    fp = fingerprint(base)
    # a copy of the same base elsewhere has the same fingerprint; a retrained one (same shapes and size) not
    shutil.copytree(base, tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == fp
    shutil.rmtree(base)
    base_model(corpus, base, seed=1)
    assert fingerprint(base) != fp
    before = digest(tmp_path / "lora")
    r = cli(capsys, "finetune", "--config", cfg_path, "--resume", "auto", "--train.max_steps", 4)
    one_line_error(r, "finetune", "trained on the base model", str(base), "different model")
    assert digest(tmp_path / "lora") == before


# ---------------------------------------------------------------------------------------------- disks
@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (root with mount rights only; else the test skips)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"lmforge-{uuid.uuid4().hex[:6]}", str(path)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_while_writing_a_checkpoint(corpus, tmp_path):
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        cfg = write_yaml(tmp_path / "c.yaml", run_dict(corpus, disk, "full", **{"train.max_steps": 1}))
        # fill the disk to about 48 KiB from the top: logs fit, a checkpoint (~1 MB) does not
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
        os.truncate(filler, filler.stat().st_size - 48 * 1024)
        r = run_lmforge("pretrain", "--config", cfg, timeout=180)
        one_line_error(r, "pretrain", "no space left on device")
        left = [p.name for p in (disk / "full").rglob(".*")]
        assert left == [] and list_checkpoints(disk / "full") == [], left


def test_disk_full_in_the_logs_is_one_line(corpus, tmp_path, monkeypatch):
    from lmforge.train import metrics

    def full(self, rec):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x/metrics.jsonl"))

    monkeypatch.setattr(metrics.Metrics, "log", full)
    with pytest.raises(UserError, match="no space left on device.*--resume auto") as e:
        train(make_config(corpus, tmp_path, "x", **{"train.max_steps": 2}))
    assert "\n" not in str(e.value)


def test_read_only_output_directory_fails_at_start(corpus, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        cfg = write_yaml(tmp_path / "c.yaml", run_dict(corpus, ro, "x", **{"train.max_steps": 2}))
        r = run_lmforge("pretrain", "--config", cfg, timeout=180)
        one_line_error(r, "pretrain", "read-only file system", "--out_dir")
        assert "params" not in r.stdout  # failed before setting up the model


# ---------------------------------------------------------------------------------------------- vocab
def small_vocab_model(corpus, path: Path, vocab: int = 300) -> Path:
    """A model with fewer embeddings than the test tokenizer's 512 ids, saved with that tokenizer."""
    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(corpus["tokenizer"])
    model = build(preset("llama", "debug", vocab_size=vocab, max_seq_len=64))
    model.init_weights(0)
    save_model(model, path, tokenizer=tok)
    return path


def test_tokenizer_larger_than_the_vocabulary(corpus, tmp_path, capsys):
    from lmforge.tokenizer import Tokenizer

    n = Tokenizer.load(corpus["tokenizer"]).vocab_size
    model = small_vocab_model(corpus, tmp_path / "m")
    before = digest(model)
    r = cli(capsys, "generate", model, "--prompt", "def f", "--max-new-tokens", 4, "--device", "cpu")
    one_line_error(r, "generate", f"{n} token ids", "300 token embeddings")
    over = {"task": "sft", "model.init_from": str(model), "data.path": str(corpus["chat"]), "lora.rank": 2}
    cfg = make_config(corpus, tmp_path, "ft", **over)
    cfg.model.overrides.pop("max_seq_len")  # the checkpoint's
    with pytest.raises(UserError, match=f"300 token embeddings but the tokenizer has {n} token ids"):
        train(cfg)
    assert digest(model) == before and not (tmp_path / "ft").exists()
