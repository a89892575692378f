"""Atomic writes: all or nothing, with the user's usual permissions."""

import os

import pytest

from lmforge.utils import atomic_dir, atomic_file, atomic_write_text


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    f = tmp_path / "a.txt"
    atomic_write_text(f, "old")
    with pytest.raises(RuntimeError), atomic_file(f, "w") as fh:
        fh.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert f.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    atomic_write_text(f, "new")
    assert f.read_text() == "new"


def test_atomic_outputs_get_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.md", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_atomic_dir_failure_keeps_previous(tmp_path):
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("v1")
    with pytest.raises(OSError), atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("v2")
        raise OSError("disk full")
    assert (tmp_path / "d" / "f").read_text() == "v1"
    assert os.listdir(tmp_path) == ["d"]
