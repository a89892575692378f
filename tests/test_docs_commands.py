"""Every command that README.md and docs/*.md show runs here, on tiny settings, so the docs cannot rot.

tests/doc_commands.py finds the commands (shell code blocks, `$ ` prompts in output examples,
continuation lines, the `.venv/bin/python bench/...` behind each benchmark figure). Each is a test
named by its file, line and text, run in the order a reader meets them (README.md, then the pages in
the order README.md links them) in one workspace built once: a tokenizer and python-docs token shards
made by docs/data.md's own commands, a small checkpoint trained a few steps and copied to every path
the docs name (runs/quickstart/final, ckpt, runs/tiny/final, ...), a LoRA adapter, chat, text and
task files.

How a command runs:
- `lmforge ...`, `python -m lmforge[.module] ...` and `.venv/bin/python bench/X.py ...`: in this
  process (lmforge.cli.main, runpy), which saves seconds of imports per command; `cat F | ...` feeds F
  to standard input, `VAR=value` prefixes set the environment;
- `make quickstart`: the Makefile's recipe for it (`lmforge quickstart $(ARGS)`), ARGS from TINY;
- `torchrun ...`: a subprocess;
- `lmforge serve ...`: a subprocess on a free port, probed (/health, /v1/models, a completion), then
  stopped with SIGTERM, which must end it cleanly;
- `curl ...` (docs/docker.md): against `lmforge serve` started as deploy/Dockerfile's CMD starts it.
The slow commands that depend only on the workspace (BACKGROUND: time budgets, quickstart, torchrun,
ONNX export, servers, ...) start as subprocesses, two at a time, as soon as the workspace is ready;
their tests come after the others and check what they did. A command shown twice runs once.

TINY adds options the command already accepts (or replaces the values of ones it shows) so that it
finishes in seconds; EXPECT names what it must write or print. NOT_RUNNABLE lists what cannot run on
this machine, with the reason. A command in none of these that this file does not know how to run
fails, and so does a table entry that matches no command: a command added to the docs cannot go
untested, and the tables cannot go stale. Nothing uses the network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from doc_commands import ROOT, DocCommand, all_commands, doc_files, expand, split

# ------------------------------------------------------------------------------------------ tables
# Commands that cannot run on this machine: prefix of the command as written -> why.
NOT_RUNNABLE: dict[str, str] = {
    "make test": "it is the test suite itself, which runs this file",
    "docker ": "needs a Docker engine (CI has none); tests/test_export_deploy.py checks deploy/ and the "
    "curl lines below run against the image's command",
    "MODEL_DIR=$PWD/runs/quickstart/final docker compose": "needs Docker Compose",
    "kubectl ": "needs a Kubernetes cluster; tests/test_export_deploy.py checks deploy/kubernetes.yaml",
    "scp ": "copies to another machine",
    "ssh ": "runs on another machine",
    "llama-cli ": "llama.cpp's programs are not installed; tests/test_export_gguf.py runs the GGUF through "
    "llama.cpp's library",
    "llama-server ": "llama.cpp's programs are not installed",
    "ollama ": "Ollama is not installed; the Modelfile is written by the export line above",
    "python -m lmforge.evaluate.lm_eval_adapter --model lmforge --model_args pretrained=runs/quickstart/final,"
    "dtype=bf16 --tasks hellaswag,arc_easy": "lm-eval downloads hellaswag and arc_easy from the Hugging Face "
    "hub and the tests run offline; the offline task (my_mc) below runs",
}

# A run of a few tiny steps: the debug-size model, 2 sequences of 64 tokens, one validation batch.
_RUN = "--train.max_steps 2 --train.batch_size 2 --data.seq_len 64 --eval.batches 1 --eval.samples 0"
_NEW = f"--model.size debug --train.global_batch_tokens 128 {_RUN}"  # a new model, 1 process
_BUDGET = "--time-budget 35s --train.batch_size 2 --data.seq_len 32 --eval.batches 1 --eval.samples 0"
_TORCHRUN = "--nproc-per-node 2 --model.size debug --train.global_batch_tokens 256 --train.compile false "
_TORCHRUN += f"--data.path runs/data --data.tokenizer runs/tok {_RUN}"  # 2 CPU processes, gloo
# Compress commands end with a before/after table (bits per byte, decode speed: ~6 CPU-seconds): the
# output example of docs/compression.md shows it on 500 tokens, the others skip it (--no-eval).
_EVAL = "--no-eval"
# Tiny settings: command prefix (as run: quotes removed, ~ and $VARs expanded, `cat F |` dropped) ->
# options added, or whose value replaces the value the command shows. The longest matching prefix wins.
TINY: dict[str, str] = {
    "make quickstart": "ARGS='--out runs/make-quickstart --steps 2 --vocab-size 512 --seq-len 64 --no-export'",
    "lmforge tokenizer train --data python-docs": "--max-docs 400",
    "lmforge data prepare --data python-docs": "--max-docs 400 --workers 1",
    "lmforge data prepare --data": "--workers 1",
    "lmforge pretrain --config configs/tiny-cpu.yaml --time-budget": _BUDGET,
    "lmforge pretrain --data.path runs/data --data.tokenizer runs/tok --time-budget": _BUDGET,
    "lmforge pretrain --config": _NEW,
    # the workspace already holds a checkpoint at runs/tiny-cpu/final (for the pages that use it): the
    # page's first run of the recipe replaces it, as a user's second run there would with --force
    "lmforge pretrain --config configs/tiny-cpu.yaml": f"{_NEW} --force",
    "lmforge pretrain --name tiny-cpu --resume auto": "--train.max_steps 3",
    "torchrun --nproc-per-node 8 -m lmforge pretrain": _TORCHRUN,
    "lmforge finetune": _RUN,
    "lmforge generate": "--max-new-tokens 4",
    "lmforge chat": "--max-new-tokens 4",
    "lmforge evaluate runs/quickstart/final --data python-docs": "--max-tokens 2000",
    "lmforge evaluate ckpt --data": "--max-tokens 2000",
    "lmforge bench ckpt": "--new-tokens 8",
    "lmforge bench ckpt --batch-sizes 1,4 --prompt-len 512": "--prompt-len 64 --new-tokens 8",  # context 256
    "lmforge inspect ckpt": "--layers 0,1",  # the model has 2 layers
    "lmforge report": "--max-tokens 200 --new-tokens 4",
    "lmforge quantize": f"{_EVAL} --calibration-samples 4 --calibration-seq-len 64",
    "lmforge quantize runs/tiny/final --method int8 --out runs/tiny-int8": "--eval-tokens 500",
    "lmforge prune": f"{_EVAL} --calibration-samples 4",
    "lmforge prune runs/tiny/final --structure heads": f"{_EVAL} --calibration-samples 4 --recover-steps 2 "
    "--recover-batch-size 2 --recover-seq-len 64",
    "lmforge distill": f"{_EVAL} {_RUN} --train.global_batch_tokens 128",
    "lmforge distill --teacher runs/tiny/final --student debug --data python-docs --resume auto": f"{_EVAL} "
    "--train.max_steps 3",
    ".venv/bin/python bench/forward.py": "--smoke",
    ".venv/bin/python bench/data.py": "--smoke",
    ".venv/bin/python bench/export.py": "--smoke",
    ".venv/bin/python bench/decode.py": "--smoke",
    ".venv/bin/python bench/quantize.py": "--smoke --out runs/bench-quantize",
    ".venv/bin/python bench/train.py": "--smoke",
    ".venv/bin/python bench/quality.py": "--smoke",
    ".venv/bin/python bench/finetune.py": "--smoke",
    ".venv/bin/python bench/serve_load.py --clients 1,16,32": "--checkpoint runs/quickstart/final --clients 1,2 "
    "--rounds 1 --max-tokens 4 --log runs/serve-load-1.log",
    ".venv/bin/python bench/serve_load.py --clients 1 --rounds 8": "--checkpoint runs/quickstart/final --rounds 1 "
    "--max-tokens 4 --log runs/serve-load-2.log",
    ".venv/bin/python bench/serve_load.py --features": "--rounds 1 --max-tokens 8",
}

# What a command must leave behind: paths (relative to the workspace) or, with "re:", a regular
# expression its output must match. The longest matching prefix (as in TINY) wins.
EXPECT: dict[str, tuple[str, ...]] = {
    "make quickstart": ("runs/make-quickstart/report.md", "runs/make-quickstart/int8/config.json"),
    "lmforge tokenizer train": ("runs/tok/tokenizer.json", "runs/tok/tokenizer_config.json"),
    "lmforge data prepare --data python-docs": ("runs/data/meta.json",),
    "lmforge data prepare --data": ("data/c4/meta.json",),
    "lmforge data info": (r"re:(?i)tokens",),
    "lmforge pretrain --config configs/tiny-cpu.yaml": ("runs/tiny-cpu/final/model.safetensors",),
    "lmforge pretrain --config configs/tiny-cpu.yaml --time-budget": (
        r"re:time budget",
        "runs/tiny-budget/final",
    ),
    "lmforge pretrain --data.path": (r"re:time budget", "runs/pretrain-llama-tiny/final/model.safetensors"),
    "lmforge pretrain --name tiny-cpu --resume auto": ("runs/tiny-cpu/checkpoints/step_000003",),
    "torchrun": ("runs/gpu-125m/final/model.safetensors",),
    "torchrun --nproc-per-node 8 -m lmforge pretrain --config configs/gpu-1b.yaml": ("runs/gpu-1b/final",),
    "lmforge finetune --model.init_from ./my-hf-llama": (
        "runs/sft-my-hf-llama/final/adapter_model.safetensors",
    ),
    "lmforge finetune --model.init_from runs/tiny-cpu/final": ("runs/sft-tiny-cpu/final/model.safetensors",),
    "lmforge merge-lora": ("merged/model.safetensors", "merged/tokenizer.json"),
    "lmforge merge-lora runs/qlora/final": ("runs/tiny-qlora-merged/model.safetensors",),  # QLoRA
    "lmforge generate ckpt --prompt a --prompt b": (r"re:--- prompt 2 ---", r"re:decode \d+ tokens"),
    "lmforge generate ckpt --prompt x": (r"re:draft acceptance",),
    "lmforge generate ckpt --prompt Once": (r"re:sample 3",),
    "lmforge evaluate runs/quickstart/final": (r"re:bits per byte\s+\d",),
    "lmforge evaluate ckpt --data notes.txt": ("results.json",),
    "lmforge evaluate ckpt --task hellaswag": ("results.json", r"re:acc"),
    "lmforge evaluate ckpt --task arc_easy.jsonl --robustness": (r"re:typos",),
    "HF_DATASETS_OFFLINE=1 python -m lmforge.evaluate.lm_eval_adapter": (r"re:my_mc",),
    "lmforge bench ckpt --batch-sizes": ("bench.json",),
    "lmforge bench": (r"re:decode tok/s",),
    "lmforge report runs/q/final": ("runs/q/report/report.md", "runs/q/report/quality_vs_size.png"),
    "lmforge report runs/tiny/final runs/tiny-int8": ("runs/compare/report.md",),
    "lmforge report runs/tiny/final int8": ("report/report.md",),
    "lmforge inspect runs/quickstart/final": ("runs/inspect/inspect.json", "runs/inspect/token_loss.png"),
    "lmforge inspect ckpt": ("pics/inspect.json", "pics/attention_layer_01.png"),
    "lmforge quantize runs/tiny/final --method int8 --out runs/tiny-int8": (
        "runs/tiny-int8/config.json",
        r"re:bits per byte +\d",
    ),
    "lmforge quantize runs/tiny/final --method int4 --group-size": ("runs/tiny-int4/config.json",),
    "lmforge quantize runs/tiny/final --method int4 --calibration": ("runs/tiny-gptq/config.json",),
    "lmforge quantize runs/tiny/final --method int8 --keep-float": ("runs/tiny-int8-linear/config.json",),
    "lmforge quantize runs/tiny/final --method int4 --format gptq": ("runs/tiny-int4-gptq/config.json",),
    "lmforge quantize runs/tiny/final --method int8 --format compressed": ("runs/tiny-int8-ct/config.json",),
    "lmforge prune runs/tiny/final --method magnitude": ("runs/tiny-50/model.safetensors",),
    "lmforge prune runs/tiny/final --method wanda --structure 2:4": ("runs/tiny-24/model.safetensors",),
    "lmforge prune runs/tiny/final --method wanda --structure ffn": ("runs/tiny-ffn/model.safetensors",),
    "lmforge prune runs/tiny/final --structure heads": ("runs/tiny-heads/model.safetensors",),
    "lmforge distill --teacher runs/tiny/final --student debug": (
        "runs/distill-debug/final/model.safetensors",
    ),
    "lmforge distill --teacher runs/tiny/final --student llama:debug": ("runs/distill-llama-debug/final",),
    "lmforge distill --teacher runs/big/final": ("runs/distill-small/final/model.safetensors",),
    "lmforge export runs/quickstart/final --format onnx": (
        "runs/quickstart/final-onnx/model_with_past.onnx",
    ),
    "lmforge export runs/quickstart/final --format gguf --dtype q8_0": ("runs/quickstart/final-q8_0.gguf",),
    "lmforge export runs/quickstart/final --format gguf --dtype f16": ("model.gguf",),
    "lmforge export runs/quickstart/final --format ollama": ("my-model/Modelfile", "my-model/model.gguf"),
    "curl http://127.0.0.1:8000/health": (r're:"status":\s*"ok"',),
    "curl http://127.0.0.1:8000/v1/completions": (r're:"choices"',),
    ".venv/bin/python bench/forward.py": (r"re:\| fp32 \| forward",),
    ".venv/bin/python bench/data.py": (r"re:\| prepare python-docs",),
    ".venv/bin/python bench/data.py --size-mb": (r"re:\| \.json, [\d.]+ MB file, \d+ documents \| 2 \|",),
    ".venv/bin/python bench/export.py": (r"re:\| onnxruntime, model_with_past.onnx",),
    ".venv/bin/python bench/serve_load.py": (r"re:\| 1 \|",),
    ".venv/bin/python bench/serve_load.py --features": (r"re:\| TTFT, \d+-token shared system prompt",),
    ".venv/bin/python bench/train.py": (r"re:\| lmforge \| fp32",),
    ".venv/bin/python bench/quality.py": (
        r"re:\| transformers LlamaForCausalLM, lmforge's recipe[^|]* \| \d",
        r"re:\| transformers Qwen3ForCausalLM \(the same model\), lmforge's recipe \| \d",
    ),
    ".venv/bin/python bench/decode.py": (r"re:\| fp32 \|",),
    ".venv/bin/python bench/quantize.py": (r"re:\| int4 g64",),
}

# Slow commands that only read what the workspace holds when it is ready and write their own outputs:
# they start then, in the background (subprocesses, two at a time), and their tests come last and wait
# for them. A server counts as started once /health answers; its test probes it and stops it.
BACKGROUND = (
    "lmforge pretrain --config configs/tiny-cpu.yaml --time-budget",  # a time budget lasts what it says
    "lmforge pretrain --data.path runs/data --data.tokenizer runs/tok --time-budget",
    "make quickstart",
    "torchrun",
    "lmforge export runs/quickstart/final --format onnx",  # torch.export: tens of CPU-seconds
    ".venv/bin/python bench/export.py",
    "HF_DATASETS_OFFLINE=1 python -m lmforge.evaluate.lm_eval_adapter",  # importing lm-eval is slow
    "lmforge serve",
    ".venv/bin/python bench/serve_load.py",
)

# Where the docs expect a checkpoint (all the same small model, hard-linked) and the files they name.
CHECKPOINTS = [
    "runs/quickstart/final", "runs/tiny/final", "runs/tiny-cpu/final", "ckpt", "small-ckpt", "my-hf-llama",
    "runs/sft/final", "base", "runs/big/final", "runs/small/final", "smol", "runs/q/final", "runs/q/bf16",
    "runs/q/int8", "runs/q/pruned", "int8", "int4", "wanda24", "ffn25", "student-kd/final",
    "student-plain/final", "models/model",
]  # fmt: skip
ENV = {"KEY": "sk-docs-test"}  # $KEY in docs/serving.md; HOME and PWD are the workspace's
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # for every command, in process or not

COMMANDS = all_commands()
RUNNERS = {"lmforge", "python", "python3", ".venv/bin/python", "torchrun", "make", "curl"}


# --------------------------------------------------------------------------------------- the workspace
@dataclass
class Workspace:
    root: Path
    env: dict  # what $VARS and ~ expand to
    jobs: dict = field(default_factory=dict)  # command key -> Future of a background Job or Server
    passed: dict = field(default_factory=dict)  # command as run (tuple of words) -> where it passed
    procs: list = field(
        default_factory=list
    )  # subprocesses (Job, Server) to end at the end, whatever happened


def _longest(table, key: str):
    hits = [k for k in table if key.startswith(k)]
    return (table[max(hits, key=len)] if isinstance(table, dict) else max(hits, key=len)) if hits else None


def _norm(text: str) -> str:
    """A command as written, one line, without its trailing comment."""
    for m in re.finditer(r"\s#", text):
        try:
            split(text[: m.start()])
        except ValueError:
            continue  # the # is inside quotes
        text = text[: m.start()]
        break
    return " ".join(text.split())


def _chat(path: Path, n: int = 200) -> None:
    words = "red green blue cat dog sun moon tree river stone cloud fire".split()
    with open(path, "w") as f:
        for i in range(n):
            ws = [words[(i * 7 + k * 3) % len(words)] for k in range(2 + i % 3)]
            msgs = [
                {"role": "user", "content": "reverse: " + " ".join(ws)},
                {"role": "assistant", "content": " ".join(reversed(ws))},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")


def _write_files(root: Path) -> None:
    """The files the docs' commands name: chat data, text, task files, a C4 shard, an lm-eval task."""
    _chat(root / "chat.jsonl")
    para = "The os module provides a portable way of using operating system dependent functionality. "
    (root / "notes.txt").write_text("\n\n".join(para * (i + 1) for i in range(6)))
    (root / "long.txt").write_text(" ".join(f"word{i % 50} and more text" for i in range(1500)))
    mc = [
        {"ctx": "The capital of France is", "endings": [" Paris.", " Rome.", " a fish."], "label": 0},
        {"ctx": "def add(a, b):", "endings": [" return a + b", " import os"], "label": 0},
        {"ctx": "Water is", "endings": [" wet.", " made of cheese."], "label": 0},
    ]
    (root / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    arc = [
        {"question": q, "choices": {"text": c, "label": ["A", "B", "C"][: len(c)]}, "answerKey": "A"}
        for q, c in [
            ("Which module handles paths?", ["os.path", "math", "random"]),
            ("What does len return?", ["the length", "a list"]),
        ]
    ]
    (root / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    arith = [{"prompt": "2 + 2 =", "answer": " 4"}, {"prompt": "3 + 4 =", "answer": [" 7", "7"]}]
    (root / "arithmetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arith))
    c4 = root / "home/c4/en"
    c4.mkdir(parents=True)
    with gzip.open(c4 / "c4-train.00000-of-01024.json.gz", "wt") as f:
        for i in range(20):
            doc = {"text": f"{para} Page {i}.", "url": f"https://example.com/{i}", "timestamp": "2019-04-25"}
            f.write(json.dumps(doc) + "\n")
    # docs/evaluation.md's lm-eval task: the YAML shown on the page, its data file in the workspace
    (root / "data").mkdir()
    my_mc = [{"context": r["ctx"], "choices": r["endings"], "label": r["label"]} for r in mc]
    (root / "data/my_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in my_mc))
    page = (ROOT / "docs/evaluation.md").read_text()
    yaml_text = re.search(r"```yaml\n# tasks/my_mc.yaml\n(.*?)```", page, re.S).group(1)
    (root / "tasks").mkdir()
    (root / "tasks/my_mc.yaml").write_text(
        yaml_text.replace("/data/my_mc.jsonl", str(root / "data/my_mc.jsonl"))
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory, request):
    """The workspace, and the background commands of this session started in it."""
    root = tmp_path_factory.mktemp("docs")
    w = Workspace(root, {**ENV, "HOME": str(root / "home"), "PWD": str(root)})
    (root / "configs").symlink_to(ROOT / "configs")
    _write_files(root)
    env, pool = pytest.MonkeyPatch(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="docs-background")
    for k, v in OFFLINE.items():
        env.setenv(k, v)
    try:
        with env.context() as cwd:
            cwd.chdir(root)
            for text in (  # docs/data.md's commands with their TINY options: running them again reuses
                "lmforge tokenizer train --data python-docs --vocab-size 8192 --out runs/tok",
                "lmforge data prepare --data python-docs --tokenizer runs/tok --out runs/data",
            ):
                assert run_command(parse(text, w), w).rc == 0, text
            model = ["pretrain", "--config", "configs/debug-cpu.yaml", "--name", "docs-model", *_RUN.split()]
            assert _in_process(lambda: _main(model), {}) == 0
            for d in CHECKPOINTS:
                (root / d).parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(root / "runs/docs-model/final", root / d, copy_function=os.link)
            lora = ["finetune", "--model.init_from", "runs/tiny/final", "--data.path", "chat.jsonl"]
            lora += ["--name", "sft-lora", "--lora.rank", "4", *_RUN.split()]
            assert _in_process(lambda: _main(lora), {}) == 0
        selected = {it.callspec.params.get("cmd") for it in request.session.items if hasattr(it, "callspec")}
        runs = [c for c in COMMANDS if not _skip_reason(c) and c in selected]
        starts = [(BACKGROUND.index(_longest(BACKGROUND, parse(c.text, w).key)), parse(c.text, w)) for c in runs
                  if _background(c, w)]  # fmt: skip
        if any(parse(c.text, w).words[0] == "curl" for c in runs):  # the image's server, after the budgets:
            starts.append((BACKGROUND.index("make quickstart") - 0.5, None))  # curl's tests do not come last
        for _, p in sorted(starts, key=lambda s: s[0]):  # BACKGROUND's order: time budgets first
            if p is None:
                w.jobs["image server"] = pool.submit(ImageServer, w)
            elif p.key not in w.jobs:
                w.jobs[p.key] = pool.submit(_start_job, p, w)
        yield w
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in w.procs:
            proc.kill()
        env.undo()


# ----------------------------------------------------------------------------------------- running
@dataclass
class Result:
    rc: int
    output: str = ""  # what subprocesses printed (in-process output is captured by capfd)


@dataclass
class Parsed:
    env: dict  # VAR=value prefixes
    stdin: str | None  # the file of `cat FILE | command`
    key: str  # the command as run, before TINY: what TINY, EXPECT and BACKGROUND are looked up by
    words: list[str]  # the command as run, with TINY


def _apply_tiny(words: list[str], key: str) -> list[str]:
    """The command with TINY's options: a value replaces the one the command shows, others are added."""
    extra = _longest(TINY, key)
    if not extra:
        return words
    words, add = list(words), split(extra)
    i = 0
    while i < len(add):
        opt = add[i]
        has_value = i + 1 < len(add) and not add[i + 1].startswith("--")
        if opt.startswith("-") and opt in words and has_value and words.index(opt) + 1 < len(words):
            words[words.index(opt) + 1] = add[i + 1]
        else:
            words += add[i : i + 1 + has_value]
        i += 1 + has_value
    return words


def parse(text: str, w: Workspace) -> Parsed:
    words = [expand(x, w.env) for x in split(text)]
    stdin = None
    if "|" in words:
        i = words.index("|")
        assert words[0] == "cat" and i == 2, f"only `cat FILE | command` pipes are supported: {text}"
        stdin, words = words[1], words[i + 1 :]
    env = {}
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if words[0] in ("python", "python3", ".venv/bin/python") and words[1:3] == ["-m", "lmforge"]:
        words = ["lmforge", *words[3:]]  # `python -m lmforge` is `lmforge`
    key = " ".join([*(f"{k}={v}" for k, v in env.items()), *words])
    return Parsed(env, stdin, key, _apply_tiny(words, key))


def _main(argv: list[str]):
    from lmforge.cli import main

    return main(argv)


def _exit_code(fn) -> int:
    try:
        rc = fn()
    except SystemExit as e:
        rc = e.code
    if rc is None or isinstance(rc, int):
        return rc or 0
    print(rc, file=sys.stderr)  # sys.exit("message")
    return 1


def _in_process(fn, env: dict, stdin: str | None = None, argv: list[str] | None = None) -> int:
    """Run fn() as if it were its own process: environment, argv, sys.path, stdin, torch threads and
    signal handlers are put back afterwards."""
    import torch

    saved = (dict(os.environ), sys.argv[:], sys.path[:], sys.stdin, torch.get_num_threads())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.update(env)
    if argv is not None:
        sys.argv = argv
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        return _exit_code(fn)
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.argv, sys.path[:], sys.stdin = saved[1], saved[2], saved[3]
        torch.set_num_threads(saved[4])
        for s, h in handlers.items():
            signal.signal(s, h)


def _make_recipe(words: list[str]) -> list[str]:
    """`make TARGET VAR=value`: the target's recipe from the Makefile, as argv (its prerequisite, the
    installed .venv, is this environment)."""
    target, variables = words[1], dict(x.split("=", 1) for x in words[2:] if "=" in x)
    recipe = re.search(rf"^{target}:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    recipe = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), recipe.replace("$(BIN)/", ""))
    assert split(recipe)[0] == "lmforge", f"make {target}: the recipe `{recipe}` is not an lmforge command"
    return split(recipe)


def _subprocess_argv(words: list[str]) -> list[str]:
    """The argv of a command as its own process (the shell's `lmforge`, `python`, `torchrun`: this venv's)."""
    py, prog = sys.executable, words[0]
    if prog == "make":
        return _subprocess_argv(_make_recipe(words))
    if prog == "lmforge":
        return [py, "-m", "lmforge", *words[1:]]
    if prog == "torchrun":
        return [str(Path(py).parent / "torchrun"), *words[1:]]
    if prog in ("python", "python3", ".venv/bin/python"):
        return [py, *words[1:]] if words[1] == "-m" else [py, str(ROOT / words[1]), *words[2:]]
    raise AssertionError(f"no way to run `{prog}` in a subprocess")


def run_command(p: Parsed, w: Workspace) -> Result:
    """Run a command in the foreground (in this process where it can) and return its exit status."""
    words, env = p.words, p.env
    stdin = (w.root / p.stdin).read_text() if p.stdin else None
    prog = words[0]
    if prog == "make":
        argv = _make_recipe(words)
        return Result(_in_process(lambda: _main(argv[1:]), env))
    if prog == "lmforge":
        if words[1] == "chat" and stdin is None:
            stdin = "Hello!\n/reset\nHi\n/quit\n"
        return Result(_in_process(lambda: _main(words[1:]), env, stdin))
    if prog in ("python", "python3", ".venv/bin/python"):
        if words[1] == "-m":  # a module of the package, e.g. lmforge.evaluate.lm_eval_adapter

            def run_module():
                runpy.run_module(words[2], run_name="__main__", alter_sys=True)

            return Result(_in_process(run_module, env, stdin, argv=[words[2], *words[3:]]))
        script = ROOT / words[1]  # bench/X.py: the repository's, run in the workspace
        assert script.is_file(), f"{words[1]}: no such script in the repository"

        def run_script():
            sys.path.insert(0, str(script.parent))
            runpy.run_path(str(script), run_name="__main__")

        return Result(_in_process(run_script, env, stdin, argv=[str(script), *words[2:]]))
    if prog == "curl":
        if not shutil.which("curl"):
            pytest.skip("curl is not installed")
        server = w.jobs["image server"].result(timeout=300)
        words = [re.sub(r"^http://(127\.0\.0\.1|localhost):8000", server.url, x) for x in words]
        # --fail-with-body: an HTTP error is a failed command (plain curl exits 0 on a 4xx/5xx answer)
        argv = ["curl", "--silent", "--show-error", "--fail-with-body", *words[1:]]
        r = subprocess.run(argv, cwd=w.root, capture_output=True, text=True, timeout=120)
        return Result(r.returncode, r.stdout + r.stderr)
    raise AssertionError(
        f"no way to run `{prog}`: teach tests/test_docs_commands.py to run it, or add the command to "
        "NOT_RUNNABLE with the reason it cannot run"
    )


_JOB_IDS = itertools.count()


class Job:
    """A command in a subprocess, its output in a log file; wait() -> Result."""

    def __init__(self, p: Parsed, w: Workspace):
        self.log = w.root / f"job-{next(_JOB_IDS):02d}.log"
        e = {**os.environ, **p.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(_subprocess_argv(p.words), cwd=w.root, env=e, stdout=log, stderr=log)
        w.procs.append(self)

    def wait(self, timeout: float = 600) -> Result:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        return Result(rc, self.log.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmforge serve ARGS` as a subprocess on a free 127.0.0.1 port; returns once /health answers."""

    def __init__(self, args: list[str], env: dict, w: Workspace):
        import httpx

        self.args = args = list(args)
        for opt, value in (("--port", str(_free_port())), ("--host", "127.0.0.1")):
            if opt in args:
                args[args.index(opt) + 1] = value
            else:
                args += [opt, value]
        self.url = f"http://127.0.0.1:{args[args.index('--port') + 1]}"
        key = args[args.index("--api-key") + 1] if "--api-key" in args else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.log = w.root / f"serve-{args[args.index('--port') + 1]}.log"
        e = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmforge", "serve", *args], cwd=w.root, env=e, stdout=log, stderr=log
            )
        w.procs.append(self)
        deadline = time.time() + 300
        while True:
            assert self.proc.poll() is None, f"lmforge serve exited:\n{self.output()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            assert time.time() < deadline, f"lmforge serve: no /health in 300 s:\n{self.output()}"
            time.sleep(0.3)

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> int:
        """SIGTERM; 0 when the server shut down cleanly (uvicorn re-raises the signal after a graceful
        shutdown, so the process ends with -SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9
        clean = rc == -signal.SIGTERM and "Application shutdown complete" in self.log.read_text()
        return 0 if clean else rc

    def check(self) -> Result:
        """/v1/models lists the base and every --lora model, each answers a completion; then stop."""
        import httpx

        try:
            models = httpx.get(self.url + "/v1/models", headers=self.headers, timeout=30)
            assert models.status_code == 200, models.text
            ids = [m["id"] for m in models.json()["data"]]
            for spec in (self.args[i + 1] for i, a in enumerate(self.args) if a == "--lora"):
                assert spec.split("=")[0] in ids, ids
            for model in ids:
                body = {"model": model, "prompt": "def add(a, b):", "max_tokens": 4}
                r = httpx.post(self.url + "/v1/completions", json=body, headers=self.headers, timeout=60)
                assert r.status_code == 200, r.text
        finally:
            rc = self.stop()
        return Result(rc, self.output())

    def kill(self) -> None:
        self.stop()


class ImageServer(Server):
    """The server of the Docker image: deploy/Dockerfile's CMD, the image's model directory
    (/models/model) being models/model in the workspace."""

    def __init__(self, w: Workspace):
        cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "deploy/Dockerfile").read_text(), re.M).group(1)
        argv = json.loads(cmd)
        assert argv[:2] == ["lmforge", "serve"], argv
        super().__init__([str(w.root) + a if a.startswith("/models/") else a for a in argv[2:]], {}, w)


def _background(cmd: DocCommand, w: Workspace) -> bool:
    return not _skip_reason(cmd) and _longest(BACKGROUND, parse(cmd.text, w).key) is not None


def _start_job(p: Parsed, w: Workspace):
    """In a pool thread: start a background command; a server counts as started once it is healthy."""
    if p.words[:2] == ["lmforge", "serve"]:
        return Server(p.words[2:], p.env, w)
    job = Job(p, w)
    job.wait()  # hold the pool's slot while it runs
    return job


# -------------------------------------------------------------------------------------------- tests
def _skip_reason(cmd: DocCommand) -> str | None:
    return _longest(NOT_RUNNABLE, _norm(cmd.text))


def _order(cmds: list[DocCommand]) -> list[DocCommand]:
    """Doc order, background commands last: they run meanwhile and are checked at the end."""
    w = Workspace(ROOT, {**ENV, "HOME": "/home", "PWD": "."})
    return sorted(cmds, key=lambda c: _background(c, w))


@pytest.mark.parametrize("cmd", _order(COMMANDS), ids=lambda c: c.id.replace("\n", " "))
def test_doc_command(cmd: DocCommand, ws: Workspace, capfd, monkeypatch):
    reason = _skip_reason(cmd)
    if reason:
        pytest.skip(f"not runnable here: {reason}")
    monkeypatch.chdir(ws.root)
    p = parse(cmd.text, ws)
    where = f"{cmd.file}:{cmd.line}: `{cmd.text}` (run as {p.words})"
    t0 = time.perf_counter()
    again = ws.passed.get(tuple(p.words))  # the same command shown again: run once, its files checked again
    if p.key in ws.jobs:  # started in the background when the workspace was ready
        job = ws.jobs[p.key].result(timeout=900)
        res = job.check() if isinstance(job, Server) else job.wait()
    elif again:
        res = Result(0, f"the same command as {again}, which passed")
    else:
        res = run_command(p, ws)
    out, err = capfd.readouterr()
    output = out + err + res.output
    secs = time.perf_counter() - t0
    assert res.rc == 0, f"{where} exited with {res.rc} after {secs:.0f}s:\n{output[-6000:]}"
    for check in _longest(EXPECT, p.key) or ():
        if check.startswith("re:") and not again:
            assert re.search(check[3:], output), (
                f"{where}: output does not match {check[3:]!r}:\n{output[-3000:]}"
            )
        elif not check.startswith("re:"):
            assert (ws.root / check).exists(), f"{where}: did not write {check}"
    ws.passed.setdefault(tuple(p.words), f"{cmd.file}:{cmd.line}")


def test_tables_name_real_commands():
    """Every entry of NOT_RUNNABLE, TINY, EXPECT and BACKGROUND applies to a command the docs show (a
    stale entry fails), and every command is either runnable or explained."""
    shown = [_norm(c.text) for c in COMMANDS]
    for key in NOT_RUNNABLE:
        assert any(s.startswith(key) for s in shown), f"NOT_RUNNABLE entry matches no command: {key!r}"
    w = Workspace(ROOT, {**ENV, "HOME": "/home", "PWD": "."})
    run = [parse(c.text, w).key for c in COMMANDS if not _skip_reason(c)]
    for name, table in (("TINY", TINY), ("EXPECT", EXPECT), ("BACKGROUND", BACKGROUND)):
        for key in table:
            assert any(r.startswith(key) for r in run), f"{name} entry matches no command that runs: {key!r}"
    for c in COMMANDS:
        if not _skip_reason(c):
            assert parse(c.text, w).words[0] in RUNNERS, f"{c.id}: no way to run it and not in NOT_RUNNABLE"


def test_docs_cover_every_stage():
    """One page per stage, each linked from README.md, and the architecture page with the system
    diagram and the six families in one table."""
    pages = [p.name for p in doc_files()[1:]]
    for stage in ("data", "training", "finetuning", "generation", "evaluation", "compression", "export", "serving",
                  "docker", "architecture", "benchmarks"):  # fmt: skip
        assert f"{stage}.md" in pages, f"docs/{stage}.md is missing"
    readme = (ROOT / "README.md").read_text()
    for p in pages:
        assert f"(docs/{p})" in readme, f"README.md does not link docs/{p}"
    arch = (ROOT / "docs/architecture.md").read_text()
    assert "text sources ──► tokenizer" in arch and "serve (OpenAI API" in arch
    header = next(line for line in arch.splitlines() if line.startswith("| switch |"))
    for fam in ("gpt", "gpt2", "llama", "mistral", "mixtral", "gemma"):
        assert f"| {fam} `[" in header, f"the families table has no {fam} column"


def test_what_counts_as_a_command():
    """The extraction rules on a page written for the purpose; an unknown program fails."""
    from doc_commands import extract_text

    page = """
```bash
lmforge generate ckpt --prompt "a" \\
    --stop $'\\n\\n'   # a comment
# a comment line
cat long.txt | lmforge generate ckpt --prompt -
HF_HUB_OFFLINE=1 python -m lmforge info ckpt
pip install something-new
```

```
$ lmforge info ckpt
family: llama
kubectl run x --overrides='{"a":
  1}'
```

```
runs/data/
  meta.json   lmforge data prepare writes it
text sources ──► lmforge tokenizer train ──► shards
```

```python
lmforge.load("x")
```

Command: `.venv/bin/python bench/train.py --iters 2`, then `lmforge info x` (prose).
"""
    got = [(c.line, c.text) for c in extract_text(page, "page.md")]
    assert got == [
        (3, "lmforge generate ckpt --prompt \"a\" --stop $'\\n\\n'   # a comment"),
        (6, "cat long.txt | lmforge generate ckpt --prompt -"),
        (7, "HF_HUB_OFFLINE=1 python -m lmforge info ckpt"),
        (8, "pip install something-new"),
        (12, "lmforge info ckpt"),
        (28, ".venv/bin/python bench/train.py --iters 2"),
    ], got
    w = Workspace(ROOT, {**ENV, "HOME": "/home", "PWD": "."})
    assert parse(got[0][1], w).words == [
        "lmforge",
        "generate",
        "ckpt",
        "--prompt",
        "a",
        "--stop",
        "\n\n",
    ] + split(TINY["lmforge generate"])
    p = parse(got[1][1], w)
    assert (p.stdin, p.words[:3]) == ("long.txt", ["lmforge", "generate", "ckpt"])
    p = parse(got[2][1], w)
    assert (p.env, p.words) == ({"HF_HUB_OFFLINE": "1"}, ["lmforge", "info", "ckpt"])
    unknown = DocCommand("page.md", 8, got[3][1])
    assert _skip_reason(unknown) is None
    with pytest.raises(AssertionError, match="no way to run `pip`"):
        run_command(parse(unknown.text, w), w)
