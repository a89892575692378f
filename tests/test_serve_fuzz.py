"""Schema fuzzing: schemathesis generates valid and invalid requests from /openapi.json against a real
server; no input may get a 5xx. Bounded: 30 examples per operation and phase, a 64-token context."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import adapter_server, serve_ckpt_short  # noqa: F401

KEY = "sk-fuzz"


def _st() -> list[str] | None:
    exe = Path(sys.executable).with_name("st")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("st") or shutil.which("schemathesis")
    return [found] if found else None


def test_schema_fuzzing_finds_no_server_error(serve_ckpt_short, tmp_path):  # noqa: F811
    st = _st()
    if st is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    with adapter_server(serve_ckpt_short, KEY, "--max-queue", "64", log_dir=tmp_path) as server:
        cmd = [
            *st,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "30",
            "--phases",
            "coverage,fuzzing",
            "--workers",
            "1",
            "--seed",
            "0",
            "--request-timeout",
            "30",
            "--no-shrink",
            "--header",
            f"Authorization: Bearer {KEY}",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        out = r.stdout + r.stderr
        assert r.returncode == 0, (
            f"schemathesis found failures:\n{out[-6000:]}\n--- server log ---\n{server.log()}"
        )
        assert "passed" in out and server.proc.poll() is None
        assert " 500 " not in server.log()
