"""What `lmforge evaluate`, `bench`, `report` and `inspect` print (and write with --out)."""

from __future__ import annotations

import json
import sys
from typing import Literal

from lmforge.evaluate.bench import bench_lm, format_bench
from lmforge.evaluate.inspect import inspect_prompt
from lmforge.evaluate.perplexity import evaluate_lm, format_metrics
from lmforge.evaluate.robustness import format_robustness, parse_perturbations, robustness_report
from lmforge.evaluate.tasks import evaluate_task, format_task, load_task
from lmforge.utils import UserError, atomic_write_text


def print_evaluation(
    model,
    tokenizer,
    *,
    data: str | None = None,
    split: str = "val",
    max_tokens: int | None = None,
    max_docs: int | None = None,
    seq_len: int | None = None,
    stride: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.02,
    task: list[str] = (),
    max_examples: int | None = None,
    delimiter: str = " ",
    max_new_tokens: int = 32,
    stop: list[str] | None = None,
    robustness: bool = False,
    perturbations: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    out: str | None = None,
    predictions: bool = False,
    progress: bool = True,
) -> dict:
    """Score the model on data and/or tasks, print each result and return them all.

    Args:
        data: a `data prepare` directory, or a source: python-docs, python-stdlib, embedded, c4,
            hf:owner/name[:config][@split], a file/folder/glob of .txt .md .json .jsonl .parquet
        split: val (held-out documents, by content hash as in `data prepare`; default), train or all
        max_tokens: stop after scoring this many tokens (default: all)
        max_docs: read at most this many documents of the split
        seq_len: window length in tokens (default: the model's context)
        stride: tokens each later window moves (default: --seq-len, no overlap); smaller gives every
            scored token more context and costs more
        val_fraction: share of documents in the held-out split, as given to `data prepare`
        task: a JSONL task file: {context, choices, label} or {prompt, answer} per line; repeatable
        max_examples: use at most this many examples per task
        delimiter: text between a multiple-choice context and each choice (default: a space, as lm-eval)
        max_new_tokens: generation tasks: most tokens to generate
        stop: generation tasks: stop string, repeatable (default: a newline)
        robustness: also score each task under perturbed inputs and show the drop from the clean score
        perturbations: comma-separated kind[:rate] among typos, upper, lower, random_case, whitespace
            (default: typos 2/5/10%, upper, lower, random_case 50%, whitespace 20%)
        seed: seed of the perturbations
        batch_size: rows per forward pass (default: automatic)
        out: write all results to this JSON file
        predictions: include per-example task predictions in --out
        progress: show progress bars
    """
    if data is None and not task:
        raise UserError("nothing to evaluate: give --data SOURCE and/or --task FILE.jsonl")
    results: dict = {"checkpoint": getattr(model, "name_or_path", None)}
    if data is not None:
        r = evaluate_lm(
            model,
            tokenizer,
            data,
            split=split,
            max_tokens=max_tokens,
            max_docs=max_docs,
            seq_len=seq_len,
            stride=stride,
            batch_size=batch_size,
            text_field=text_field,
            val_fraction=val_fraction,
            progress=progress,
        )
        print(format_metrics(r))
        results["data"] = r
    if task:
        kw = dict(
            batch_size=batch_size or 16,
            delimiter=delimiter,
            max_new_tokens=max_new_tokens,
            stop=tuple(stop) if stop else ("\n",),
        )
        chosen = parse_perturbations(perturbations) if robustness else None
        results["tasks"], results["robustness"] = {}, {}
        for path in task:
            t = load_task(path, max_examples)
            r = evaluate_task(model, tokenizer, t, keep_predictions=predictions, progress=progress, **kw)
            print()
            print(format_task(r))
            results["tasks"][t.name] = r
            if robustness:
                rr = robustness_report(
                    model, tokenizer, t, perturbations=chosen, seed=seed, progress=progress, **kw
                )
                print()
                print(format_robustness(rr))
                results["robustness"][t.name] = rr
        if not robustness:
            del results["robustness"]
    if out:
        atomic_write_text(out, json.dumps(results, indent=2, ensure_ascii=False))
        print(f"\nresults written to {out}", file=sys.stderr)
    return results


def print_bench(
    model,
    tokenizer,
    *,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 128,
    new_tokens: int = 64,
    mfu: Literal["on", "off", "auto"] = "auto",
    quick: bool = False,
    as_json: bool = False,
    out: str | None = None,
) -> dict:
    """Benchmark the model, print a table (or JSON) and return the result.

    Args:
        batch_sizes: comma-separated batch sizes
        prompt_len: prompt tokens per row
        new_tokens: tokens generated per row
        mfu: measure the matmul peak and report prefill MFU (default auto: on GPU only)
        quick: tiny sizes (batch 1 and 2, 16 + 8 tokens): a smoke test
        as_json: print the result as JSON instead of a table
        out: also write the result to this JSON file
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--batch-sizes: give at least one batch size >= 1")
    r = bench_lm(
        model,
        tokenizer,
        batch_sizes=tuple(batch_sizes),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        quick=quick,
        mfu={"on": True, "off": False}.get(mfu),
        verbose=not as_json,
    )
    print(json.dumps(r, indent=2) if as_json else format_bench(r))
    if out:
        atomic_write_text(out, json.dumps(r, indent=2))
    return r


def print_inspection(
    model,
    tokenizer,
    *,
    prompt: str,
    out: str,
    layers: tuple[int, ...] | None = None,
    top_k: int = 10,
) -> dict:
    """Write the inspect pictures for a prompt and print a one-line summary.

    Args:
        prompt: the text to look at ('-' reads standard input)
        out: directory for the PNGs and inspect.json
        layers: comma-separated layers to draw attention for (default: all)
        top_k: next-token candidates to show
    """
    text = sys.stdin.read() if prompt == "-" else prompt
    r = inspect_prompt(model, tokenizer, text, out, top_k=top_k, layers=list(layers) if layers else None)
    print(
        f"{len(r['ids'])} tokens, mean loss {r['mean_loss_bits'] or float('nan'):.2f} bits/token; next: "
        + ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in r["next_tokens"][:5])
    )
    print(f"written to {out}: " + ", ".join(r["files"]) + ", inspect.json")
    return r
