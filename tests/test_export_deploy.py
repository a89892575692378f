"""deploy/: the Dockerfile serves `lmforge serve /models/model` with options the CLI accepts; the
Compose and Kubernetes files parse and probe /health. (No Docker engine here: files are checked, the
image is not built.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lmforge.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVE_ARGV = ["lmforge", "serve", "/models/model", "--host", "0.0.0.0", "--port", "8000"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def final_stage(instr):
    starts = [i for i, (w, _) in enumerate(instr) if w == "FROM"]
    return instr[starts[-1] :], len(starts)


def container_argv() -> list[str]:
    instr, _ = final_stage(dockerfile_instructions((DEPLOY / "Dockerfile").read_text()))
    entry = [exec_form(a) for w, a in instr if w == "ENTRYPOINT"]
    cmd = [exec_form(a) for w, a in instr if w == "CMD"]
    return (entry[-1] if entry else []) + (cmd[-1] if cmd else [])


def test_dockerfile_structure():
    instr = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    stage, n_stages = final_stage(instr)
    assert n_stages >= 2, "multi-stage: a builder and a runtime stage"
    args = {a.split("=")[0] for w, a in instr if w == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX", "TORCH_VERSION"} <= args
    assert any(w == "FROM" and "${BASE_IMAGE}" in a for w, a in stage)
    assert any(w == "COPY" and a.startswith("--from=builder") for w, a in stage)
    users = [a for w, a in stage if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime stage runs as a non-root user"
    assert any(w == "EXPOSE" and "8000" in a.split() for w, a in stage)
    health = [a for w, a in stage if w == "HEALTHCHECK"]
    assert health and "/health" in health[-1] and "8000" in health[-1]
    assert any(w == "RUN" and "--index-url" in a and "TORCH_INDEX" in a for w, a in instr)


def test_dockerfile_command_is_lmforge_serve():
    argv = container_argv()
    assert argv == SERVE_ARGV
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    k8s = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    deployment = next(d for d in k8s if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert compose["services"]["lmforge"]["command"] == argv
    assert container["command"] == argv


def test_serve_accepts_the_container_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if "serve" not in sub.choices:
        pytest.skip(
            "`lmforge serve` is not registered in the CLI yet; the Dockerfile's CMD is checked once it is"
        )
    help_text = sub.choices["serve"].format_help()
    argv = container_argv()
    for opt in (a for a in argv[2:] if a.startswith("--")):
        assert opt in help_text, f"{opt} is not an option of `lmforge serve`"
    ns = parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown option or a missing argument
    assert ns.command == "serve" and "/models/model" in vars(ns).values()
    assert str(ns.port) == "8000" and ns.host == "0.0.0.0"


def test_compose_file():
    svc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["lmforge"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and svc["build"]["context"] == ".."
    assert any(str(p).endswith(":8000") for p in svc["ports"])
    vols = svc["volumes"]
    assert any(v["target"] == "/models/model" and v["read_only"] for v in vols)
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and any("/health" in t for t in test)


def test_kubernetes_manifest():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", 8000), probe
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    vols = {v["name"]: v for v in pod["volumes"]}
    claim = vols["models"]["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    svc = kinds["Service"]["spec"]
    assert svc["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert svc["ports"][0]["port"] == 8000 and svc["ports"][0]["targetPort"] in ("http", 8000)


def test_container_command_serves_and_passes_its_healthcheck(tmp_path):
    """Run the image's command (model path and port adapted to this machine) as a real server, then the
    Dockerfile's own HEALTHCHECK command against it: it must exit 0 once the model is loaded."""
    import socket
    import subprocess
    import sys
    import time

    import torch

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if "serve" not in sub.choices:
        pytest.skip("`lmforge serve` is not registered in the CLI yet")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world, hello docker. "] * 50, 300)
    torch.manual_seed(0)
    save_model(build(preset("llama", "debug", vocab_size=tok.vocab_size)), tmp_path / "model", tokenizer=tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    argv = container_argv()
    argv = [sys.executable, "-m", "lmforge", *argv[1:]]
    argv[argv.index("/models/model")] = str(tmp_path / "model")
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = port
    instr, _ = final_stage(dockerfile_instructions((DEPLOY / "Dockerfile").read_text()))
    health = next(a for w, a in instr if w == "HEALTHCHECK")
    check = exec_form(health[health.index("CMD") + 3 :].strip())
    check = [
        sys.executable if c == "python3" else c.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for c in check
    ]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            if subprocess.run(check, capture_output=True, timeout=10).returncode == 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the HEALTHCHECK command never succeeded within 90 s")
    finally:
        server.terminate()
        server.wait(timeout=30)
