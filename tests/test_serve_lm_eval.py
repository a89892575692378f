"""lm-evaluation-harness over HTTP: the real `lm_eval` CLI with `--model local-completions` against a
running server scores a multiple-choice task and a loglikelihood_rolling task (echo + logprobs, max_tokens
1) with the same numbers as the in-process adapter (`--model lmforge`); `--model local-chat-completions`
runs a generate_until task. Tasks and data are written here; the tokenizer is the model directory's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serve_helpers import ROOT, Server, serve_ckpt  # noqa: F401
from train_data import cli_env

pytestmark = pytest.mark.timeout(600)

MC = [
    {"question": "The quick brown", "choices": [" fox", " dog", " batch"], "answer": 0},
    {
        "question": "Continuous batching admits new",
        "choices": [" requests", " tokens", " ASCII"],
        "answer": 0,
    },
    {"question": "def add(a, b):", "choices": [" return", " class", " the"], "answer": 0},
    {"question": "Tokens stream to the", "choices": [" client", " server", " fox"], "answer": 1},
]
DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "A serving system answers many requests at once, token by token."},
    {"text": "Héllo wörld, ünïcödé ☃ and plain ASCII text side by side."},
]
GEN = [
    {"question": "The quick brown fox", "answer": " jumps"},
    {"question": "def add(a, b):", "answer": "\n"},
]


def _tasks(d):
    for name, rows in (("mc", MC), ("docs", DOCS), ("gen", GEN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (d / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs: {{data_files: {{test: {d / 'mc.jsonl'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list: [{metric: acc}, {metric: acc_norm}]\n"
    )
    (d / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs: {{data_files: {{test: {d / 'docs.jsonl'}}}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]\n"
    )
    (d / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs: {{data_files: {{test: {d / 'gen.jsonl'}}}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 8, do_sample: false}\n"
        "metric_list: [{metric: exact_match}]\n"
    )


def _lm_eval(args: list[str], out, tmp_path, module: str = "lm_eval") -> dict:
    env = {**cli_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_ALLOW_CODE_EVAL": "0"}  # fmt: skip
    cmd = [sys.executable, "-m", module, *args, "--output_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(files[-1].read_text())["results"]


def test_lm_eval_over_http_equals_the_in_process_adapter(serve_ckpt, tmp_path):  # noqa: F811
    ckpt = serve_ckpt[0]
    _tasks(tmp_path)
    tasks = ["--tasks", "tiny_mc,tiny_ppl", "--include_path", str(tmp_path), "--batch_size", "1"]
    local = _lm_eval(["--model", "lmforge", "--model_args", f"pretrained={ckpt}", "--device", "cpu", *tasks],
                     tmp_path / "local", tmp_path, module="lmforge.evaluate.lm_eval_adapter")  # fmt: skip
    with Server(ckpt, "--max-batch", "4", "--model-name", "tiny", log_dir=tmp_path) as s:
        args = (f"model=tiny,base_url={s.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={ckpt},"
                "num_concurrent=1,max_retries=1,max_length=256")  # fmt: skip
        # lm-eval's API models add no BOS unless told; the adapter follows the tokenizer's rule (BOS here)
        # for contexts, and scores documents after the prefix token (BOS) without a second one.
        http = _lm_eval(["--model", "local-completions", "--model_args", args + ",add_bos_token=True",
                         "--tasks", "tiny_mc", *tasks[2:]], tmp_path / "http", tmp_path)  # fmt: skip
        http |= _lm_eval(["--model", "local-completions", "--model_args", args, "--tasks", "tiny_ppl", *tasks[2:]],
                         tmp_path / "http-ppl", tmp_path)  # fmt: skip
        chat_args = f"model=tiny,base_url={s.url}/v1/chat/completions,num_concurrent=1,max_retries=1"
        gen = _lm_eval(["--model", "local-chat-completions", "--model_args", chat_args, "--apply_chat_template",
                        "--tasks", "tiny_gen", "--include_path", str(tmp_path)], tmp_path / "gen", tmp_path)  # fmt: skip
    for task, metrics in (("tiny_mc", ("acc,none", "acc_norm,none")),
                          ("tiny_ppl", ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"))):  # fmt: skip
        for m in metrics:
            a, b = local[task][m], http[task][m]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (task, m, a, b)
    assert local["tiny_ppl"]["word_perplexity,none"] > 1
    assert 0 <= gen["tiny_gen"]["exact_match,none"] <= 1
