"""Outputs are never silently overwritten, and crashed writes clean up (issue #23, items 1 and 4).

- lmforge/outputs.py's one rule: a command refuses an --out that holds another kind of output, or one
  of its own inputs, with one line and exit code 2, and the earlier output stays byte-identical;
- lmforge/utils.py's atomic writes: a temporary left by a killed process (kill -9, a real child) is
  removed at the next write to the same path, a live writer's is kept; disk full and read-only
  targets are one-line UserErrors with no temporary left.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_data import base_model, cli_env, run_lmforge

from lmforge.outputs import check_output, output_kind
from lmforge.utils import UserError, atomic_dir, atomic_file, atomic_path, atomic_write_text


def tree_hash(path: Path) -> str:
    """Every file's relative name and bytes under `path` (or the file itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def outputs(corpus, tmp_path_factory):
    """A model (random debug llama with the test tokenizer), a LoRA adapter on it, a data preparation."""
    import torch

    from lmforge.checkpoint import load_model
    from lmforge.train.lora import apply_lora, lora_state_dict, save_adapter

    root = tmp_path_factory.mktemp("outputs")
    model_dir = base_model(corpus, root / "base")
    model = load_model(model_dir)
    apply_lora(model, rank=2, alpha=4.0, targets=["all"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    adapter = save_adapter(
        root / "adapter",
        lora_state_dict(model),
        model.lora_config,
        base=str(model_dir),
        model_config=model.config,
    )
    return {"model": model_dir, "adapter": adapter, "data": corpus["data"], "tokenizer": corpus["tokenizer"]}


# ------------------------------------------------------------------------------------ the output rule
def test_output_kinds(outputs, tmp_path):
    assert output_kind(outputs["model"]) == "model"
    assert output_kind(outputs["adapter"]) == "adapter"
    assert output_kind(outputs["data"]) == "data"
    assert output_kind(outputs["tokenizer"]) == "tokenizer"
    assert output_kind(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/.DS_Store").write_text("")
    assert output_kind(tmp_path / "empty") is None  # dotfiles do not make it someone's output
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    assert output_kind(tmp_path / "notes") == "other"
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert output_kind(tmp_path / "m.gguf") == "gguf"
    assert output_kind(tmp_path / "notes/todo.txt") == "file"


def test_check_output_rules(outputs, tmp_path):
    model = outputs["model"]
    assert check_output(tmp_path / "new", "model") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "model")
    with pytest.raises(UserError, match=r"^--out .*notes: holds files that are not a model .* --force"):
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes/todo.txt").write_text("mine")
        check_output(tmp_path / "notes", "model")
    check_output(tmp_path / "notes", "model", force=True)
    with pytest.raises(UserError, match="already holds a model directory .* --force"):
        check_output(model, "model")
    check_output(model, "model", same_kind_ok=True)
    with pytest.raises(
        UserError, match=r"^--name \S+: holds a model directory .*, not a run directory.* --resume"
    ):
        check_output(model, "run", flag="--resume", option="--name")
    with pytest.raises(UserError, match=r"holds a LoRA adapter \(adapter_config.json\), not a model") as e:
        check_output(outputs["adapter"], "model")
    assert "\n" not in str(e.value)
    # its own inputs: never, whatever force says; also an --out inside or around an input
    for out in (model, model / "sub", model.parent):
        with pytest.raises(UserError, match="the input .* never writes into what it reads"):
            check_output(out, "model", force=True, inputs=("python-docs", None, model))
    with pytest.raises(UserError, match="is a directory; give a file path"):
        check_output(model, "gguf", force=True)
    with pytest.raises(UserError, match="is a file; give a directory"):
        check_output(model / "config.json", "model", force=True)


def test_merge_lora_into_its_base_is_refused_by_the_cli(outputs):
    """The reported case: merging A into A's own base replaced it (and a second merge doubled A)."""
    base, adapter = outputs["model"], outputs["adapter"]
    before = tree_hash(base), tree_hash(adapter)
    r = run_lmforge("merge-lora", adapter, "--out", base, "--force", timeout=120)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr)
    assert f"--out {base} is the input {base}" in line and "never writes into what it reads" in line
    assert (tree_hash(base), tree_hash(adapter)) == before


def test_merge_lora_into_another_model_needs_force(outputs, tmp_path):
    from lmforge.train.lora import merge_lora_command

    other = tmp_path / "other"
    other.mkdir()
    for f in outputs["model"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    before = tree_hash(other)
    with pytest.raises(UserError, match=f"--out {other}: already holds a model directory.*--force"):
        merge_lora_command(str(outputs["adapter"]), out=str(other))
    assert tree_hash(other) == before
    with pytest.raises(UserError, match="is inside the input"):
        merge_lora_command(str(outputs["adapter"]), out=str(outputs["adapter"] / "merged"), force=True)
    merged = merge_lora_command(str(outputs["adapter"]), out=str(tmp_path / "merged"))
    first = tree_hash(merged)
    with pytest.raises(UserError, match="already holds a model directory"):  # a rerun says so
        merge_lora_command(str(outputs["adapter"]), out=str(merged))
    merge_lora_command(str(outputs["adapter"]), out=str(merged), force=True)
    assert tree_hash(merged) == first and siblings(merged) == []  # the same merge, replaced whole


def test_tokenizer_train_into_a_model_or_a_preparation_is_refused(outputs, corpus, tmp_path):
    from lmforge.data.tokenize_corpus import train_tokenizer_on

    text = str(corpus["root"] / "text")
    for out, holds in ((outputs["model"], "a model directory"), (outputs["data"], "a data preparation")):
        before = tree_hash(out)
        with pytest.raises(UserError, match=f"--out {out}: holds {holds}.*not a tokenizer.*--force"):
            train_tokenizer_on(text, 300, out, verbose=False)
        assert tree_hash(out) == before
    one_file = sorted((corpus["root"] / "text").glob("*.txt"))[0]
    with pytest.raises(UserError, match="contains the input"):  # the tokenizer would land among its data
        train_tokenizer_on(str(one_file), 300, one_file.parent)
    # retraining into a tokenizer folder replaces it: the documented rerun of docs/data.md
    tok = tmp_path / "tok"
    train_tokenizer_on(text, 300, tok, max_chars=50_000, verbose=False)
    train_tokenizer_on(text, 300, tok, max_chars=50_000, verbose=False)
    assert output_kind(tok) == "tokenizer"


def test_tokenizer_train_cli_refuses_a_preparation(outputs):
    before = tree_hash(outputs["data"])
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "tokenizer", "train", "--data", "python-docs"]
        + ["--vocab-size", "300", "--out", str(outputs["data"])],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert r.returncode == 2
    assert "holds a data preparation (meta.json), not a tokenizer" in one_line_error(r.stderr)
    assert tree_hash(outputs["data"]) == before


def test_quantize_and_export_refuse_another_kind(outputs, tmp_path):
    from lmforge.compress.quantize import quantize
    from lmforge.export import export

    model, data = outputs["model"], outputs["data"]
    before = tree_hash(data)
    with pytest.raises(UserError, match=f"--out {data}: holds a data preparation.*not a model"):
        quantize(model, data, eval_data=None)
    with pytest.raises(UserError, match="is the input"):
        quantize(model, model, eval_data=None, force=True)
    with pytest.raises(UserError, match=f"--out {data}: holds a data preparation.*not an ONNX export"):
        export(model, "onnx", data)
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(UserError, match="holds a file, not a GGUF file.*--force"):
        export(model, "gguf", notes)
    assert tree_hash(data) == before and notes.read_text() == "my notes"
    # an earlier export of the same format is replaced (docs/export.md exports twice into my-model/)
    gguf = export(model, "gguf", tmp_path / "m.gguf", dtype="f32")
    assert output_kind(export(model, "gguf", gguf, dtype="f16")) == "gguf"
    assert siblings(gguf) == []


# ------------------------------------------------------------------------- stale temporaries (kill -9)
HOLDER = """
import sys, time
from lmforge.utils import atomic_dir, atomic_file
kind, path = sys.argv[1], sys.argv[2]
with (atomic_dir(path) if kind == "dir" else atomic_file(path)) as t:
    print("ready", flush=True)
    time.sleep(120)
"""


def _holder(kind: str, path: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), kind, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_writers_temporary_is_removed_at_the_next_write(tmp_path, kind):
    target = tmp_path / "out"
    dead = _holder(kind, target)
    dead.kill()  # SIGKILL: nothing of Python's cleanup runs
    dead.wait()
    left = siblings(target)
    assert len(left) == 1 and f"-{dead.pid}." in left[0] and left[0].endswith(".tmp")
    live = _holder(kind, target)
    try:
        kept = [n for n in siblings(target) if f"-{live.pid}." in n]
        if kind == "dir":
            with atomic_dir(target) as d:
                (d / "f").write_text("v1")
            with atomic_dir(target) as d:  # replaces: the previous one is swapped out under the marker
                (d / "f").write_text("v2")
            assert (target / "f").read_text() == "v2"
        else:
            atomic_write_text(target, "v1")
            assert target.read_text() == "v1"
        assert siblings(target) == kept  # the dead one is gone, the live writer's is untouched
    finally:
        live.kill()
        live.wait()
    atomic_write_text(tmp_path / "other", "x")  # a write to another path leaves out's temporaries alone
    assert siblings(target) == kept
    with atomic_file(target) if kind == "file" else atomic_dir(target):
        pass
    assert siblings(target) == []


def test_temporaries_from_another_host_go_by_age(tmp_path):
    target = tmp_path / "ckpt"
    old = tmp_path / ".ckpt.otherhost-12.abcd1234.tmp"
    recent = tmp_path / ".ckpt.otherhost-13.efgh5678.tmp"
    legacy = tmp_path / ".ckpt.k3j2_x9z.tmp"  # named before the marker existed
    for p in (old, recent, legacy):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 10)
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    os.utime(legacy, (day_ago, day_ago))
    unrelated = tmp_path / ".ckpt2.otherhost-12.abcd1234.tmp"
    unrelated.mkdir()
    os.utime(unrelated, (day_ago, day_ago))
    with atomic_dir(target) as d:
        (d / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", recent.name, unrelated.name])


# ------------------------------------------------------------------------------- disk full, read-only
def test_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    with pytest.raises(UserError) as e, atomic_file(target, "w") as f:
        f.write("new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    msg = str(e.value)
    assert msg == f"cannot write {target}: No space left on device: free space, or write it elsewhere"
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert target.read_text() == "old" and siblings(target) == []

    # safetensors reports the OS error inside its own exception (the 24-line traceback of the issue)
    import safetensors.torch
    import torch

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    from lmforge import checkpoint

    monkeypatch.setattr(checkpoint, "save_file", full)
    from lmforge.config import preset
    from lmforge.model import build

    model = build(preset("llama", "debug", vocab_size=300))
    with pytest.raises(UserError, match=r"^cannot write .*ckpt: No space left on device: free space"):
        checkpoint.save_model(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and siblings(tmp_path / "ckpt") == []
    assert torch.is_tensor(next(model.parameters()))

    # GGUF (a path-taking writer): the same
    with pytest.raises(UserError, match="No space left on device"), atomic_path(tmp_path / "m.gguf") as p:
        p.write_bytes(b"GGUF")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
    assert siblings(tmp_path / "m.gguf") == []


def test_read_only_target_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), k.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", erofs)
    with pytest.raises(UserError, match=r"^cannot write .*run: Read-only file system: write it elsewhere"):
        with atomic_dir(tmp_path / "run"):
            raise AssertionError("not reached")
    monkeypatch.undo()
    # a permission error about something else (an input being read) is not reported as a write error
    with pytest.raises(PermissionError), atomic_dir(tmp_path / "x"):
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")
    assert siblings(tmp_path / "x") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 directory anyway")
def test_read_only_directory_cli(outputs, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = run_lmforge("tokenizer", "train", "--data", "python-docs", "--vocab-size", "300", "--max-docs", "50",
                        "--out", ro / "tok", timeout=120)  # fmt: skip
        assert r.returncode == 2
        assert f"{ro} is not writable by this user; choose another --out" in one_line_error(r.stderr)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_distill_never_writes_its_run_over_the_teacher(outputs):
    from lmforge.compress.distill import distill

    teacher = outputs["model"]
    before = tree_hash(teacher)
    with pytest.raises(UserError, match=f"--name {teacher.parent}.* contains the input {teacher}"):
        distill(
            teacher,
            "debug",
            None,
            overrides={"out_dir": str(teacher.parent.parent), "name": teacher.parent.name},
        )
    assert tree_hash(teacher) == before


def _in_own_mount_namespace(tmpfs: Path, options: str, *cmd) -> subprocess.CompletedProcess:
    """Run `cmd` with a tmpfs mounted at `tmpfs` (mount options `options`) in a private user and mount
    namespace: a real full or read-only file system that vanishes with the process."""
    script = f'mount -t tmpfs -o {options} tmpfs "$1" && shift && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(tmpfs), *map(str, cmd)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=180,
    )


def _can_mount(tmp_path: Path) -> bool:
    try:
        return _in_own_mount_namespace(tmp_path, "size=4k", "true").returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def test_real_full_and_read_only_file_systems(outputs, corpus, tmp_path):
    """The reported tracebacks, on real file systems: safetensors' error on a full disk (merge-lora) and
    EROFS (tokenizer train) are one line, exit code 2, and nothing is left on the file system."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if not _can_mount(fs):
        pytest.skip("no user/mount namespaces here (unshare -rm) to make a small tmpfs")
    merge = [sys.executable, "-m", "lmforge", "merge-lora", outputs["adapter"], "--out", fs / "merged"]
    r = _in_own_mount_namespace(fs, "size=64k", "sh", "-c", '"$@"; s=$?; ls -A "$0"; exit $s', fs, *merge)
    assert r.returncode == 2, r.stderr
    assert one_line_error(r.stderr) == (
        f"lmforge merge-lora: error: cannot write {fs / 'merged'}: No space left on device: "
        "free space, or write it elsewhere"
    )
    assert r.stdout == ""  # `ls -A` of the full tmpfs: no temporary left behind
    text = sorted((corpus["root"] / "text").glob("*.txt"))[0]
    tok = [sys.executable, "-m", "lmforge", "tokenizer", "train", "--data", text, "--vocab-size", 300]
    r = _in_own_mount_namespace(fs, "ro", *tok, "--out", fs / "tok")
    assert r.returncode == 2, r.stderr
    assert f"cannot write --out {fs / 'tok'}: {fs} is on a read-only file system; choose another --out" in (
        one_line_error(r.stderr)
    )
