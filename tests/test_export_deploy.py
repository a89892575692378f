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
# constructs it uses: range with $i/$m variables, if/else, eq/ne/and/or/not/index/len/slice, $ for the
# root, {{- trimming}); its rendering must equal the model's own Jinja chat template and, where
# llama.cpp knows the format, its built-in rendering of the same conversation.
OLLAMA_INSTRUCTIONS = {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>",
           "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>",
           "<|system|>", "<|end|>", "<|endoftext|>", "<s>", "</s>"]  # fmt: skip


def go_render(template: str, messages: list[dict]) -> str:
    """Execute the Go-template subset Ollama templates use here, with .Messages = messages: text, {{- -}}
    trimming, range (with `$i, $m :=`), if/else, and the builtins eq, ne, and, or, not, index, len,
    slice; `.Field`, `$.Field`, `$var`, `(pipeline).Field`, string and integer literals."""
    parts = re.split(r"(\{\{-?\s.*?\s-?\}\}|\{\{[^\s-].*?\}\})", template)
    for i, p in enumerate(parts):  # {{- and -}} trim the whitespace next to them
        if p.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if p.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()
    tokens = [p if not p.startswith("{{") else ("act", p[2:-2].strip("- ").strip()) for p in parts]

    def tree(i: int):  # -> (nodes, index of the closing action, that action)
        nodes = []
        while i < len(tokens):
            t = tokens[i]
            if isinstance(t, str):
                nodes.append(t)
                i += 1
                continue
            act = t[1]
            if act == "end" or act.startswith("else"):
                return nodes, i, act
            if act.startswith(("if ", "range ")):
                body, i, stop = tree(i + 1)
                other = []
                assert stop in ("else", "end"), stop  # (`else if` is not used by these templates)
                if stop == "else":
                    other, i, stop = tree(i + 1)
                assert stop == "end", act
                nodes.append((act.split()[0], act.split(None, 1)[1], body, other))
                i += 1
            else:
                nodes.append(("out", act))
                i += 1
        return nodes, i, ""

    def lex(expr: str) -> list[str]:
        toks = re.findall(
            r'"(?:[^"\\]|\\.)*"|\(|\)|\$?[A-Za-z_]*(?:\.[A-Za-z_]+)+|\$[A-Za-z_]*|[A-Za-z_]+|-?\d+', expr
        )
        assert "".join(toks) == expr.replace(" ", ""), expr
        return toks

    funcs = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "not": lambda a: not a,
        "and": lambda *a: next((x for x in a if not x), a[-1]),
        "or": lambda *a: next((x for x in a if x), a[-1]),
        "index": lambda a, i: a[i],
        "len": len,
        "slice": lambda a, i: a[i:],
    }

    def pipeline(toks: list[str], pos: int, env):  # a command: operands until ")" or the end
        args = []
        while pos < len(toks) and toks[pos] != ")":
            t = toks[pos]
            if t == "(":
                v, pos = pipeline(toks, pos + 1, env)
                pos += 1  # the ")"
                while pos < len(toks) and toks[pos].startswith("."):  # (x).Field
                    for name in toks[pos].split(".")[1:]:
                        v = v[name]
                    pos += 1
                args.append(v)
                continue
            if t.startswith('"'):
                args.append(json.loads(t))
            elif re.fullmatch(r"-?\d+", t):
                args.append(int(t))
            elif t.startswith("$") or t.startswith("."):
                head, *names = t.split(".")
                v = env["dot"] if head == "" else env[head]
                for name in names:
                    v = v[name]
                args.append(v)
            else:
                args.append(funcs[t])
            pos += 1
        if callable(args[0]):
            return args[0](*args[1:]), pos
        assert len(args) == 1, toks
        return args[0], pos

    def value(expr: str, env):
        return pipeline(lex(expr), 0, env)[0]

    def run(nodes, env) -> str:
        out = ""
        for n in nodes:
            if isinstance(n, str):
                out += n
            elif n[0] == "out":
                out += str(value(n[1], env))
            elif n[0] == "if":
                out += run(n[2] if value(n[1], env) else n[3], env)
            else:  # range [$i, $m :=] pipeline
                names, _, expr = n[1].rpartition(":=")
                names = [x.strip() for x in names.split(",") if x.strip()]
                items = value(expr, env)
                for i, m in enumerate(items):
                    sub = {**env, "dot": m}
                    if len(names) == 2:
                        sub[names[0]], sub[names[1]] = i, m
                    elif names:
                        sub[names[0]] = m
                    out += run(n[2], sub)
                if not items:
                    out += run(n[3], env)
        return out

    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return run(tree(0)[0], {"dot": root, "$": root})


def _template_tokenizer(name: str, template: str | None = None):
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
    return Tokenizer(t.to_str(), config, template or (TEMPLATES / f"{name}.jinja").read_text())


CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
# hub template -> (the format the Modelfile uses, llama.cpp renders it the same way: True, False or
# MULTI_SYS_DIFFERS, same unless a system prompt meets several user turns: llama.cpp's mistral-v3 puts
# it into the first user turn, Mistral's template into the last)
MULTI_SYS_DIFFERS = "multi-turn system differs"
HUB_FORMATS = {
    "qwen3-0.6b": ("chatml", True),
    "qwen2.5-0.5b-instruct": ("chatml", False),  # its default system prompt: llama.cpp's chatml has none
    "smollm2-135m-instruct": ("chatml", False),
    "gemma-2-2b-it": ("gemma", True),
    "phi-3.5-mini-instruct": ("phi3", True),
    "phi-4-mini-instruct": ("lmforge", False),
    "olmo-2-1b-instruct": ("olmo2", False),
    "llama-3.1-8b-instruct": ("llama3-dated", False),  # llama.cpp's llama3 writes no date header
    "llama-3.2-1b-instruct": ("llama3-dated", False),
    "mistral-7b-instruct-v0.3": ("mistral-inst", MULTI_SYS_DIFFERS),
    "gemma-3-1b-it": ("gemma3", True),
}
CONVERSATIONS = {
    "system+multi": CONVERSATION,
    "multi": CONVERSATION[1:],
    "system+one": [CONVERSATION[0], CONVERSATION[-1]],
    "one": CONVERSATION[-1:],
}


@pytest.mark.parametrize("convo", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(HUB_FORMATS))
def test_ollama_template_renders_like_the_chat_template(name, convo):
    from lmforge.export.ollama import chat_format, go_template

    tok = _template_tokenizer(name)
    fmt, llama_cpp_same = HUB_FORMATS[name]
    assert chat_format(tok)[0] == fmt
    tpl = go_template(tok)
    messages = CONVERSATIONS[convo]
    if name == "gemma-2-2b-it" and messages[0]["role"] == "system":
        pytest.skip("Gemma 2's template refuses a system turn")
    jinja = tok.apply_chat_template(messages, add_generation_prompt=True)
    if "bos_token" in tok.chat_template and tok.bos_id is not None:
        jinja = jinja.removeprefix(tok.id_to_token(tok.bos_id))  # llama.cpp / Ollama add BOS themselves
    assert go_render(tpl, messages) == jinja
    if llama_cpp_same is True or (llama_cpp_same == MULTI_SYS_DIFFERS and convo != "system+multi"):
        from lmforge.export.llama_cpp import LlamaCppUnavailable, chat_template_apply

        try:
            assert chat_template_apply(tok.chat_template, messages) == jinja
        except LlamaCppUnavailable as e:
            pytest.skip(str(e))


def test_ollama_llama3_date_header():
    """Llama 3.1 writes a fixed date (kept literally, no note); Llama 3.2 today's date via strftime_now,
    which Ollama cannot write in that format: the TEMPLATE has the export date and a comment says so."""
    from datetime import datetime

    from lmforge.export.ollama import modelfile

    fixed = modelfile("model.gguf", _template_tokenizer("llama-3.1-8b-instruct"), 512)
    assert "Today Date: 26 Jul 2024\n\n" in fixed and "export date" not in fixed
    today = datetime.now().strftime("%d %b %Y")
    dated = modelfile("model.gguf", _template_tokenizer("llama-3.2-1b-instruct"), 512)
    assert f"Today Date: {today}\n\n" in dated
    notes = [ln for ln in dated.splitlines() if ln.startswith("#") and "export date" in ln]
    assert notes and today in notes[0]
    assert re.findall(r'^PARAMETER stop "(.*)"$', dated, re.M) == ["<|eot_id|>"]
    mistral = modelfile("model.gguf", _template_tokenizer("mistral-7b-instruct-v0.3"), 512)
    assert "</s>{{ end }}" in mistral and 'PARAMETER stop "</s>"' in mistral  # EOS closes a turn and stops


def test_ollama_template_untranslatable_falls_back():
    from lmforge.export.ollama import chat_format, modelfile

    tok = _template_tokenizer(
        "gemma-3-1b-it", "{% for m in messages %}### {{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
    )
    assert chat_format(tok) is None
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
