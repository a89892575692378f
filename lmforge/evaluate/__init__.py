"""Evaluation: perplexity and bits per byte, tasks, robustness, speed, reports and pictures.

    from lmforge.evaluate import evaluate_lm, evaluate_task, bench_lm
    lm = lmforge.load("runs/quickstart/final")
    evaluate_lm(lm.model, lm.tokenizer, "python-docs", max_tokens=50_000)["bits_per_byte"]

Every function takes a loaded (model, tokenizer); lmforge.load turns a directory into them.

Modules: perplexity (loss, perplexity, bits per byte, accuracy), tasks (multiple choice and
generation from JSONL), robustness (the same under perturbed inputs), bench (speed against the
machine's roofline), report (variants side by side, tables and plots), table (text and markdown
tables), inspect (a prompt as pictures),
lm_eval_adapter (lm-evaluation-harness `--model lmforge`; imports lm_eval, so it is not imported here).
"""

from lmforge.evaluate.bench import bench_lm
from lmforge.evaluate.inspect import attention_probs, inspect_prompt
from lmforge.evaluate.perplexity import evaluate_lm, score_documents, sequence_nll
from lmforge.evaluate.report import compare_checkpoints
from lmforge.evaluate.robustness import robustness_report
from lmforge.evaluate.tasks import evaluate_task, load_task, loglikelihoods

__all__ = [
    "attention_probs",
    "bench_lm",
    "compare_checkpoints",
    "evaluate_lm",
    "evaluate_task",
    "inspect_prompt",
    "load_task",
    "loglikelihoods",
    "robustness_report",
    "score_documents",
    "sequence_nll",
]
