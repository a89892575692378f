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


# ---------------------------------------------------------------------------------------------- Ollama
# The Modelfile, checked against what Ollama's docs require: FROM first (a path relative to the
# Modelfile), instructions from its set, TEMPLATE in triple quotes as a Go template over .Messages
# (.Role, .Content; the system prompt is a message), PARAMETER stop "<token>" per end-of-turn token,
# PARAMETER num_ctx. No Ollama here, so the Go template is executed by the small evaluator below (the
# constructs it uses: range, if/else, eq/ne/or/not/index, {{- trimming}); its rendering must equal
# the model's own Jinja chat template and llama.cpp's built-in rendering of the same conversation.
OLLAMA_INSTRUCTIONS = {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>",
           "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>",
           "<|system|>", "<|end|>", "<|endoftext|>", "<s>", "</s>"]  # fmt: skip


def go_render(template: str, messages: list[dict]) -> str:
    """Execute the Go-template subset Ollama templates use here, with .Messages = messages."""
    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    for i, p in enumerate(parts):  # {{- and -}} trim the whitespace next to them
        if p.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if p.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()
    tokens = [p if not p.startswith("{{") else ("act", p.strip("{}- ").strip()) for p in parts]

    def cond(expr: str, dot) -> bool:
        expr = expr.strip()
        if expr.startswith("or "):  # or (A) (B): split the two top-level parenthesised arguments
            args, depth, cur = [], 0, ""
            for ch in expr[3:]:
                depth += (ch == "(") - (ch == ")")
                cur += ch
                if depth == 0 and cur.strip():
                    args.append(cur.strip()[1:-1])
                    cur = ""
            return cond(args[0], dot) or cond(args[1], dot)
        if expr.startswith("not "):
            return not value(expr[4:], dot)
        op, a, b = re.match(r'(eq|ne) (\(index \.Messages 0\)\.Role|\.Role) "(.*)"', expr).groups()
        left = messages[0]["role"] if a.startswith("(index") else dot["role"]
        return (left == b) == (op == "eq")

    def value(expr: str, dot):
        return {
            ".Role": lambda: dot["role"],
            ".Content": lambda: dot["content"],
            ".Messages": lambda: messages,
        }[expr.strip()]()

    def block(i: int, dot) -> tuple[str, int, str]:
        out = ""
        while i < len(tokens):
            t = tokens[i]
            if isinstance(t, str):
                out, i = out + t, i + 1
                continue
            act = t[1]
            if act in ("end", "else"):
                return out, i, act
            if act.startswith("range "):
                start, text = i + 1, ""
                for m in value(act[6:], dot):
                    body, i, _ = block(start, m)
                    text += body
                if not messages:
                    _, i, _ = block(start, dot)
                out, i = out + text, i + 1
            elif act.startswith("if "):
                yes, i, stop = block(i + 1, dot)
                no = ""
                if stop == "else":
                    no, i, _ = block(i + 1, dot)
                out, i = out + (yes if cond(act[3:], dot) else no), i + 1
            else:
                out, i = out + str(value(act, dot)), i + 1
        return out, i, ""

    return block(0, None)[0]


def _template_tokenizer(name: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, trainers
    from tokenizers import pre_tokenizers as pt

    from lmforge.tokenizer import Tokenizer

    t = HFTokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pt.ByteLevel(), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=MARKERS, initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False
    )
    t.train_from_iterator(["hello world, a tiny corpus"] * 10, trainer)
    meta = json.loads((TEMPLATES.parent / "tokenizers" / f"{name}.json").read_text())
    config = {k: v for k, v in meta.get("tokenizer_config", {}).items() if k != "chat_template"}
    return Tokenizer(t.to_str(), config, (TEMPLATES / f"{name}.jinja").read_text())


CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
# hub template -> (the format the Modelfile uses, llama.cpp renders it the same way)
HUB_FORMATS = {
    "qwen3-0.6b": ("chatml", True),
    "qwen2.5-0.5b-instruct": ("chatml", False),  # its default system prompt: llama.cpp's chatml has none
    "smollm2-135m-instruct": ("chatml", False),
    "gemma-2-2b-it": ("gemma", True),
    "phi-3.5-mini-instruct": ("phi3", True),
    "phi-4-mini-instruct": ("lmforge", False),
    "olmo-2-1b-instruct": ("olmo2", False),
}


@pytest.mark.parametrize("name", sorted(HUB_FORMATS))
def test_ollama_template_renders_like_the_chat_template(name):
    from lmforge.export.ollama import chat_format, go_template

    tok = _template_tokenizer(name)
    fmt, llama_cpp_same = HUB_FORMATS[name]
    assert chat_format(tok)[0] == fmt
    tpl = go_template(tok)
    convo = CONVERSATION if name != "gemma-2-2b-it" else CONVERSATION[1:]  # Gemma 2 refuses a system turn
    jinja = tok.apply_chat_template(convo, add_generation_prompt=True)
    if "bos_token" in tok.chat_template and tok.bos_id is not None:
        jinja = jinja.removeprefix(tok.id_to_token(tok.bos_id))  # llama.cpp / Ollama add BOS themselves
    assert go_render(tpl, convo) == jinja
    if llama_cpp_same:
        from lmforge.export.llama_cpp import LlamaCppUnavailable, chat_template_apply

        try:
            assert chat_template_apply(tok.chat_template, convo) == jinja
        except LlamaCppUnavailable as e:
            pytest.skip(str(e))


@pytest.mark.parametrize("name", ["llama-3.2-1b-instruct", "mistral-7b-instruct-v0.3", "gemma-3-1b-it"])
def test_ollama_template_untranslatable_falls_back(name):
    from lmforge.export.ollama import chat_format, modelfile

    tok = _template_tokenizer(name)
    assert chat_format(tok) is None  # (Llama 3.2 writes today's date; Gemma 3 folds the system turn)
    with pytest.warns(UserWarning, match="not one lmforge can translate"):
        text = modelfile("model.gguf", tok, 512)
    assert 'TEMPLATE """{{ .Prompt }}"""' in text


def test_ollama_modelfile_content(tmp_path):
    """A whole export: the Modelfile's instructions are Ollama's, FROM names the GGUF next to it, the
    template is the model's (ChatML), stop parameters are its end-of-turn tokens, and llama.cpp stops at
    those tokens too."""
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.export import export
    from lmforge.export.gguf import read_gguf
    from lmforge.model import build

    tok = _template_tokenizer("qwen3-0.6b")
    torch.manual_seed(0)
    eos = tok.token_to_id("<|im_end|>")
    cfg = preset("llama", "debug", vocab_size=tok.vocab_size, eos_token_id=eos)
    save_model(build(cfg), tmp_path / "ckpt", tokenizer=tok)
    out = export(tmp_path / "ckpt", "ollama", tmp_path / "oll", dtype="q8_0")
    text = (out / "Modelfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "FROM ./model.gguf" and (out / "model.gguf").is_file()
    tpl = re.search(r'TEMPLATE """(.*?)"""', text, re.S)[1]
    heads = [ln.split()[0] for ln in lines if not ln.startswith(("{{", "<", " ")) and ln.split()[0].isupper()]
    assert set(heads) <= OLLAMA_INSTRUCTIONS, heads
    assert go_render(tpl, CONVERSATION) == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert "<|im_end|>" in stops and set(stops) == {tok.id_to_token(i) for i in tok.stop_ids()}
    assert re.search(r"^PARAMETER num_ctx 64$", text, re.M) or re.search(
        r"^PARAMETER num_ctx \d+$", text, re.M
    )
    meta = read_gguf(out / "model.gguf")["metadata"]
    assert meta["tokenizer.chat_template"] == tok.chat_template
    try:
        from lmforge.export.llama_cpp import LlamaCpp

        llm = LlamaCpp(out / "model.gguf", n_ctx=64, n_threads=1)
    except ImportError:
        return
    assert all(llm.is_eog(tok.token_to_id(s)) for s in stops)  # llama.cpp stops where Ollama is told to
    llm.close()
