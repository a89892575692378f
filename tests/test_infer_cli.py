"""`lmforge generate` and `lmforge chat` as subprocesses (piped stdin), against the Python API; the CUDA path."""

import os
import subprocess
import sys

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams, Sequence, generate
from lmforge.lm import load
from lmforge.model import build
from lmforge.tokenizer import train_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny llama checkpoint (context 128) with a BPE tokenizer that has the chat template."""
    docs = [
        "Hello world! How are you today? I am fine, thank you.",
        "The quick brown fox. Héllo wörld ☃",
    ] * 20
    tok = train_tokenizer(docs, 400)
    torch.manual_seed(0)
    cfg = preset(
        "llama",
        "debug",
        vocab_size=tok.vocab_size,
        max_seq_len=128,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    path = tmp_path_factory.mktemp("ckpt") / "m"
    save_model(build(cfg).eval(), path, tokenizer=tok)
    return path


def _cli(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def test_generate_prints_what_the_api_returns(ckpt):
    lm = load(ckpt, device="cpu")
    r = _cli("generate", ckpt, "--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "20", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == lm.generate("Hello", temperature=0, max_new_tokens=20) + "\n"
    assert "decode" in r.stderr and "tok/s" in r.stderr


def test_generate_batch_and_samples_in_process(ckpt, capsys):
    lm = load(ckpt, device="cpu")
    args = [
        "generate",
        str(ckpt),
        "--prompt",
        "Hello",
        "--prompt",
        "The",
        "--num-samples",
        "2",
        "--seed",
        "0",
        "--max-new-tokens",
        "8",
        "--top-k",
        "20",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    samples = generate(
        lm.model, lm.tokenizer, ["Hello", "The"], num_samples=2, seed=0, max_new_tokens=8, top_k=20
    )
    expected = "".join(
        f"--- prompt {i + 1}, sample {j + 1} ---\n{samples[i][j]}\n" for i in range(2) for j in range(2)
    )
    assert capsys.readouterr().out == expected


def test_generate_errors_name_the_problem(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", "Hello", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", str(ckpt), "--prompt", "Hello world " * 20, "--max-new-tokens", "100"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens=100" in err and "context of 128" in err
    args = [
        "generate",
        str(ckpt),
        "--prompt",
        "Hello world " * 20,
        "--max-new-tokens",
        "100",
        "--temperature",
        "0",
    ]
    assert main([*args, "--truncate", "left"]) == 0


def test_chat_streams_replies_resets_and_quits(ckpt):
    lm = load(ckpt, device="cpu")
    tok = lm.tokenizer
    r = _cli(
        "chat",
        ckpt,
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        input="Hello\n/reset\nHow are you?\n/quit\nnever read\n",
    )
    assert r.returncode == 0, r.stderr
    want = []
    for msg in ("Hello", "How are you?"):  # /reset: the second conversation starts afresh
        ids = tok.encode_chat([{"role": "user", "content": msg}], add_generation_prompt=True)
        want.append(
            generate(lm.model, lm.tokenizer, ids, temperature=0, max_new_tokens=12, details=True).text
        )
    assert r.stdout == "".join(w + "\n" for w in want)
    assert "conversation reset" in r.stderr


def test_chat_drops_the_oldest_turns_to_fit_the_context(ckpt):
    r = _cli(
        "chat",
        ckpt,
        "--temperature",
        "0",
        "--max-new-tokens",
        "60",
        input="Hello world, how are you?\nThe quick brown fox?\nI am fine, thank you.\n",
    )
    assert r.returncode == 0, r.stderr
    assert "dropped the" in r.stderr and "context of 128 tokens" in r.stderr
    assert r.stdout.count("\n") >= 3


@pytest.mark.gpu
def test_cuda_graph_decode_step_equals_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = build(preset("mistral", "debug", vocab_size=300), device="cuda").eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=90, temperature=0, ignore_eos=True)  # window 64: the ring wraps
    out = {}
    for compile in (False, True):
        engine = Engine(model, max_batch=2, max_len=100, compile=compile)
        seqs = engine.add([Sequence(p, params) for p in prompts])
        while engine.active:
            engine.step()
        out[compile] = [s.token_ids for s in seqs]
    assert out[True] == out[False]
