"""The evaluation commands as a user runs them: `lmforge evaluate / bench / report / inspect` and
lm-eval-harness with `--model lmforge` on local tasks, each as a subprocess, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_evaluate_metrics import MC, TEXT, make_checkpoint


def run(
    args: list[str], tmp_path, module: str = "lmforge.cli", timeout: int = 180, code: str | None = None
) -> subprocess.CompletedProcess:
    """`python -m module args` (or `python -c code args`) offline, one thread; asserts exit status 0."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # tiny models on a shared machine
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    r = subprocess.run(
        [sys.executable, *(["-c", code] if code else ["-m", module]), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert r.returncode == 0, f"{args}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evcli")
    a = make_checkpoint(d / "a" / "final", seed=0)
    b = make_checkpoint(d / "b" / "final", seed=1)
    (d / "doc.txt").write_text(TEXT * 3, encoding="utf-8")
    (d / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MC[:3]))
    gen = [{"prompt": "The quick brown fox", "answer": "jumps"}, {"prompt": "def add(a, b):", "answer": "x"}]
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    docs = [{"text": TEXT}, {"text": "def add(a, b):\n    return a + b\n"}]
    (d / "ppl.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in docs))
    return d, a, b


def test_evaluate_command(files, tmp_path):
    import lmforge
    from lmforge.evaluate import evaluate_lm, evaluate_task

    d, a, _ = files
    out = tmp_path / "results.json"
    r = run(
        [
            "evaluate",
            str(a),
            "--data",
            str(d / "doc.txt"),
            "--split",
            "all",
            "--seq-len",
            "32",
            "--task",
            str(d / "mc.jsonl"),
            "--task",
            str(d / "gen.jsonl"),
            "--max-new-tokens",
            "4",
            "--robustness",
            "--perturbations",
            "typos:0.1,upper",
            "--out",
            str(out),
            "--no-progress",
        ],
        tmp_path,
    )
    assert "bits per byte" in r.stdout and "robustness of mc" in r.stdout and "exact_match" in r.stdout
    res = json.loads(out.read_text())
    lm = lmforge.load(a, device="cpu")
    ref = evaluate_lm(lm.model, lm.tokenizer, str(d / "doc.txt"), split="all", seq_len=32)
    assert res["data"]["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-6)
    assert res["data"]["tokens"] == ref["tokens"]
    assert res["tasks"]["mc"]["acc"] == evaluate_task(lm.model, lm.tokenizer, str(d / "mc.jsonl"))["acc"]
    rows = res["robustness"]["mc"]["rows"]
    assert [x["perturbation"] for x in rows] == ["clean", "typos 10%", "upper"]


def test_bench_quick_json(files, tmp_path):
    _, a, _ = files
    out = tmp_path / "bench.json"
    r = run(["bench", str(a), "--quick", "--json", "--out", str(out)], tmp_path)
    res = json.loads(r.stdout)
    assert res == json.loads(out.read_text())
    b = res["batches"][0]
    assert b["batch_size"] == 1 and b["decode_tok_s"] > 0 and b["prefill_tok_s"] > 0 and b["ttft_ms"] > 0
    assert 0 < b["roofline_pct"] and b["peak_memory_bytes"] > 0
    assert res["size_on_disk_bytes"] > res["weight_bytes_per_step"] > 0 and res["memory_bandwidth_gb_s"] > 0


def test_report_writes_table_and_plots(files, tmp_path):
    import matplotlib.image as mpimg

    from lmforge.evaluate.report import PLOT_DPI, PLOT_SIZE

    d, a, b = files
    out = tmp_path / "report"
    run(
        [
            "report",
            str(a),
            str(b),
            "--data",
            str(d / "doc.txt"),
            "--split",
            "all",
            "--max-tokens",
            "100",
            "--new-tokens",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ],
        tmp_path,
    )
    md = (out / "report.md").read_text()
    assert "| a/final |" in md and "| b/final |" in md and "quality_vs_size.png" in md
    res = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in res["models"]] == ["a/final", "b/final"]
    assert all(m["tokens"] == 100 and m["bits_per_byte"] > 0 for m in res["models"])
    for name in ("quality_vs_size.png", "quality_vs_speed.png"):
        img = mpimg.imread(out / name)
        assert img.shape[:2] == (PLOT_SIZE[1] * PLOT_DPI, PLOT_SIZE[0] * PLOT_DPI)


def test_inspect_writes_pictures(files, tmp_path):
    import matplotlib.image as mpimg

    _, a, _ = files
    out = tmp_path / "inspect"
    run(
        [
            "inspect",
            str(a),
            "--prompt",
            "The quick brown fox jumps over the $lazy$ dog.",
            "--top-k",
            "5",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    res = json.loads((out / "inspect.json").read_text())
    expected = [
        "token_loss.png",
        "attention_layer_00.png",
        "attention_layer_01.png",
        "next_token.png",
        "rope.png",
    ]
    assert res["files"] == expected
    for name in expected:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert (
        len(res["next_tokens"]) == 5
        and res["loss_bits"][0] is None
        and len(res["loss_bits"]) == len(res["ids"])
    )


def test_lm_eval_harness_runs_offline_on_local_tasks(files, tmp_path):
    """`python -m lmforge.evaluate.lm_eval_adapter --model lmforge ...` = lm-eval's CLI with our model."""
    pytest.importorskip("lm_eval")
    import lmforge
    from lmforge.evaluate import evaluate_lm, evaluate_task

    d, a, _ = files
    tasks = tmp_path / "tasks"
    tasks.mkdir()

    def task_yaml(name: str, data, body: str) -> None:
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (tasks / f"{name}.yaml").write_text(head + textwrap.dedent(body))

    task_yaml(
        "lmforge_mc",
        d / "mc.jsonl",
        """\
        output_type: multiple_choice
        doc_to_text: "{{context}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{label}}"
        metric_list: [{metric: acc}, {metric: acc_norm}]
        """,
    )
    task_yaml(
        "lmforge_gen",
        d / "gen.jsonl",
        """\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        generation_kwargs: {until: ["\\n"], max_gen_toks: 4, do_sample: false}
        metric_list: [{metric: exact_match}]
        """,
    )
    task_yaml(
        "lmforge_ppl",
        d / "ppl.jsonl",
        """\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list: [{metric: bits_per_byte}]
        """,
    )
    out = tmp_path / "lmeval"
    # lm-eval's command line indexes its ~14,000 built-in task YAMLs before anything else (about 20 s
    # here, and no flag turns it off); these tasks all come from --include_path, so the index is built
    # from that alone. The rest is the real `python -m lmforge.evaluate.lm_eval_adapter` (the docs'
    # command, with the index, runs in tests/test_docs_commands.py).
    no_builtin_tasks = (
        "import lm_eval.tasks.manager as m; init = m.TaskManager.__init__; "
        "m.TaskManager.__init__ = lambda self, *a, include_defaults=True, **k: "
        "init(self, *a, include_defaults=False, **k); "
        "import sys; from lmforge.evaluate.lm_eval_adapter import main; main(sys.argv[1:])"
    )
    run(
        [
            "--model",
            "lmforge",
            "--model_args",
            f"pretrained={a}",
            "--tasks",
            "lmforge_mc,lmforge_gen,lmforge_ppl",
            "--include_path",
            str(tasks),
            "--batch_size",
            "4",
            "--output_path",
            str(out),
        ],
        tmp_path,
        code=no_builtin_tasks,
        timeout=300,
    )
    (result_file,) = out.rglob("results_*.json")
    res = json.loads(result_file.read_text())["results"]
    lm = lmforge.load(a, device="cpu")
    mc = evaluate_task(lm.model, lm.tokenizer, str(d / "mc.jsonl"))
    assert res["lmforge_mc"]["acc,none"] == mc["acc"] and res["lmforge_mc"]["acc_norm,none"] == mc["acc_norm"]
    gen = evaluate_task(lm.model, lm.tokenizer, str(d / "gen.jsonl"), max_new_tokens=4)
    assert res["lmforge_gen"]["exact_match,none"] == gen["exact_match"]
    # lm-eval's bits per byte (rolling log-likelihood over the text) equals lmforge's on the same documents
    ppl = evaluate_lm(lm.model, lm.tokenizer, str(d / "ppl.jsonl"), split="all")
    assert res["lmforge_ppl"]["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-6)
