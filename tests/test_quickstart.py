"""`lmforge quickstart` as a new user runs it (on tiny settings): it prints the path of its report card,
the card holds real numbers, and the commands under its "Next" heading work as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import time

import httpx
import pytest
from serve_helpers import free_port
from train_data import cli_env, lmforge_cmd, run_lmforge


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    args = ("--out", out, "--steps", "4", "--vocab-size", "512", "--seq-len", "64", "--no-export")
    r = run_lmforge("quickstart", *args, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    card = out / "report.md"
    assert str(card) in r.stdout  # it says where the report card is
    return out, card.read_text()


def _table(text: str, heading: str) -> dict[str, list[str]]:
    """The rows of the markdown table under `heading`, by their first cell."""
    body = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("|")
    ]
    return {r[0]: r[1:] for r in rows[2:]}


def test_report_card_holds_real_numbers(quickstart):
    out, text = quickstart
    metrics = _table(text, "## Metrics")
    assert set(metrics) == {"fp32", "int8"}
    header = text.split("## Metrics", 1)[1].split("| variant | size on disk |", 1)[1].split("\n", 1)[0]
    assert [c.strip() for c in header.strip(" |").split("|")] == ["python-docs", "python-stdlib"]
    bpb = {}
    for name, (size, *cells) in metrics.items():
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB)", size) and len(cells) == 2
        for cell in cells:  # "bits per byte / perplexity" on each corpus's validation split
            b, ppl = map(float, cell.split(" / "))
            assert 0.5 < b < 12 and 1 < ppl < 512  # a real evaluation of a 512-token model
        bpb[name] = [float(c.split(" / ")[0]) for c in cells]
    assert bpb["fp32"][0] != bpb["fp32"][1]  # two different splits
    for a, b in zip(bpb["int8"], bpb["fp32"]):
        assert abs(a - b) < 0.05 * b
    assert "of embedded (" in text and "epochs of its training split" in text
    timings = _table(text, "## Timings")
    assert {"tokenizer", "data", "pretrain", "evaluate", "quantize"} <= set(timings)
    assert all(float(v[0]) >= 0 for v in timings.values())
    assert (out / "pretrain" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count("```") >= 2 * 3 + 2  # three samples and the commands


def _next_commands(text: str) -> list[list[str]]:
    block = text.split("## Next", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.strip().splitlines()]


def test_next_commands_work_as_written(quickstart, tmp_path):
    out, text = quickstart
    cmds = {c[1] if c[0] == "lmforge" else c[0]: c for c in _next_commands(text)}
    assert set(cmds) == {"chat", "generate", "serve", "evaluate", "docker"}

    r = subprocess.run(
        lmforge_cmd(*cmds["chat"][1:]),
        input="def add(a, b):\n/quit\n",
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr

    r = run_lmforge(*cmds["generate"][1:])
    assert r.returncode == 0 and r.stdout.strip(), r.stdout + r.stderr  # the continuation (64 tokens)

    r = run_lmforge(*cmds["evaluate"][1:])
    assert r.returncode == 0 and re.search(r"bits per byte\s+\d", r.stdout), r.stdout + r.stderr

    # serve, on a free port instead of 8000: the chat page and a completion over HTTP
    serve = cmds["serve"][1:]
    port = free_port()
    serve[serve.index("--port") + 1] = str(port)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(lmforge_cmd(*serve), stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server not healthy in 120 s"
            time.sleep(0.3)
        assert "<html" in httpx.get(url + "/", timeout=10).text.lower()
        body = {
            "model": httpx.get(url + "/v1/models").json()["data"][0]["id"],
            "prompt": "def ",
            "max_tokens": 8,
        }
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    # docker cannot run here (no engine): its model mount is the trained model directory
    mount = cmds["docker"][cmds["docker"].index("-v") + 1]
    assert mount.rsplit(":", 2)[0] == str((out / "final").resolve())
    assert (out / "final" / "config.json").is_file()
