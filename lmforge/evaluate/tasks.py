"""Tasks from local JSONL files: multiple choice by log-likelihood, and generation with exact match.

    r = evaluate_task(model, tok, "hellaswag_val.jsonl")     # {"acc": ..., "acc_norm": ..., "n": ...}
    r = evaluate_task(model, tok, "arithmetic.jsonl")        # {"exact_match": ..., "n": ...}

Formats (one JSON object per line; the kind is recognised from the fields):
- multiple choice: {"context": str, "choices": [str, ...], "label": int}. The label may also be the
  text of the right choice or its letter (A, B, ...). The raw formats of HellaSwag ({"ctx",
  "endings", "label"}), ARC ({"question", "choices": {"text", "label"}, "answerKey"}) and PIQA
  ({"goal", "sol1", "sol2", "label"}) are read too, with lm-eval's prompts for ARC and PIQA.
- generation: {"prompt": str, "answer": str or [str, ...]}.

Scoring follows lm-evaluation-harness, so numbers compare:
- a choice's score is log p(delimiter + choice | context), the delimiter a space by default; context and
  continuation are encoded together and split where the context's own encoding ends (so a merge across
  the boundary does not change the context's tokens), and trailing spaces of the context move into
  the continuation. BOS comes first when the tokenizer has one (documents were trained that way).
- acc: the highest score is the label. acc_norm: the highest score per UTF-8 byte of the choice
  (lm-eval divides by characters, the same for ASCII text).
- generation: greedy, stopped at a newline by default; exact match after stripping whitespace.
"""

from __future__ import annotations

import json
import math
import os
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.evaluate.perplexity import forward_scores
from lmforge.evaluate.table import format_table
from lmforge.infer.generate import generate
from lmforge.utils import UserError

MULTIPLE_CHOICE, GENERATION = "multiple_choice", "generation"


@dataclass
class Task:
    name: str
    kind: str  # MULTIPLE_CHOICE or GENERATION
    examples: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- reading


def _label_index(label, choices: list[str], letters: list[str] | None, where: str) -> int:
    if isinstance(label, bool):
        raise UserError(f"{where}: label {label!r} is not an index")
    if isinstance(label, int):
        idx = label
    elif isinstance(label, str) and label.strip().lstrip("-").isdigit():
        idx = int(label)
    elif isinstance(label, str) and letters and label in letters:
        idx = letters.index(label)
    elif isinstance(label, str) and label in choices:
        idx = choices.index(label)
    elif isinstance(label, str) and len(label) == 1 and label.upper() in string.ascii_uppercase:
        idx = string.ascii_uppercase.index(label.upper())
    else:
        raise UserError(f"{where}: label {label!r} is neither an index, a letter nor one of the choices")
    if not 0 <= idx < len(choices):
        raise UserError(f"{where}: label {label!r} is out of range for {len(choices)} choices")
    return idx


def normalize_example(rec: dict, where: str = "example") -> tuple[str, dict]:
    """(kind, example) in the canonical form: {"context", "choices", "label"} or {"prompt", "answers"}."""
    letters = None
    if "endings" in rec and "ctx" in rec:  # HellaSwag
        context, choices, label = rec["ctx"], rec["endings"], rec.get("label")
    elif "sol1" in rec and "goal" in rec:  # PIQA
        context, choices, label = (
            f"Question: {rec['goal']}\nAnswer:",
            [rec["sol1"], rec["sol2"]],
            rec.get("label"),
        )
    elif isinstance(rec.get("choices"), dict) and "question" in rec:  # ARC
        context = f"Question: {rec['question']}\nAnswer:"
        choices, letters = rec["choices"]["text"], [str(x) for x in rec["choices"]["label"]]
        label = rec.get("answerKey", rec.get("label"))
    elif "choices" in rec:
        context = next((rec[k] for k in ("context", "query", "question", "prompt") if k in rec), None)
        if context is None:
            raise UserError(f"{where}: a multiple-choice record needs a 'context' field")
        choices = rec["choices"]
        label = next((rec[k] for k in ("label", "gold", "answer") if k in rec), None)
    elif any(k in rec for k in ("answer", "answers", "target")):
        prompt = next((rec[k] for k in ("prompt", "question", "input", "context") if k in rec), None)
        if not isinstance(prompt, str):
            raise UserError(f"{where}: a generation record needs a 'prompt' string")
        answers = next(rec[k] for k in ("answer", "answers", "target") if k in rec)
        answers = [answers] if isinstance(answers, (str, int, float)) else list(answers)
        if not answers:
            raise UserError(f"{where}: 'answer' is empty")
        return GENERATION, {"prompt": prompt, "answers": [str(a) for a in answers]}
    else:
        keys = ", ".join(sorted(rec)[:10])
        raise UserError(
            f'{where}: not a task record (fields: {keys}). Use {{"context", "choices", "label"}} for '
            'multiple choice or {"prompt", "answer"} for generation.'
        )
    if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where}: needs a context string and a list of at least 2 choices")
    if label is None:
        raise UserError(f"{where}: no 'label' (index of the right choice)")
    choices = [str(c) for c in choices]
    return MULTIPLE_CHOICE, {
        "context": context,
        "choices": choices,
        "label": _label_index(label, choices, letters, where),
    }


def load_task(path: str | os.PathLike, max_examples: int | None = None) -> Task:
    """Read a task from a JSONL file (or a JSON array); every record must be of the same kind."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise UserError(f"--task {path}: no such file (expected a .jsonl file of task records)")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = [(i, r) for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e})") from e
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: malformed JSON line ({e})") from e
    kinds, examples = set(), []
    for i, rec in records:
        if max_examples is not None and len(examples) >= max_examples:
            break
        if not isinstance(rec, dict):
            raise UserError(f"{p}:{i}: expected a JSON object")
        kind, ex = normalize_example(rec, f"{p}:{i}")
        kinds.add(kind)
        examples.append(ex)
    if not examples:
        raise UserError(f"{p}: no task records")
    if len(kinds) > 1:
        raise UserError(f"{p}: mixes multiple-choice and generation records; put them in separate files")
    return Task(p.stem, kinds.pop(), examples)


# --------------------------------------------------------------------------------------------- scoring


def prefix_id(tokenizer) -> int | None:
    """The token a document starts with: BOS, or EOS (as lm-eval) when there is no BOS."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode(tokenizer, text: str) -> list[int]:
    """Text -> ids with the tokenizer's own BOS rule (as transformers' tokenizer(text))."""
    return tokenizer.encode_prompt(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal models make them (see module docstring)."""
    if context == "":
        cont = tokenizer.encode(continuation, bos=False, eos=False)
        pre = prefix_id(tokenizer)
        if pre is None:  # no BOS/EOS: the first token of the continuation becomes the context
            return cont[:1], cont[1:]
        return [pre], cont
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def score_continuations(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy?) for each (context ids, continuation ids).

    A pair longer than the context window keeps its last max_seq_len + 1 tokens (the oldest context
    goes, as in lm-eval). Batched longest first with right padding.
    """
    L = model.config.max_seq_len
    rows = []
    for ctx, cont in pairs:
        if not cont:
            raise UserError("empty continuation: nothing to score")
        if len(cont) > L:
            raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's context of {L}")
        whole = (list(ctx) + list(cont))[-(L + 1) :]
        x = np.asarray(whole[:-1], dtype=np.int64)
        y = np.asarray(whole[1:], dtype=np.int64)
        y[: len(y) - len(cont)] = -100
        rows.append((x, y))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        nll, hit = forward_scores(model, [rows[i] for i in idx])
        for i, n, h in zip(idx, nll, hit):
            keep = rows[i][1] != -100
            out[i] = (-float(n[keep].astype(np.float64).sum()), bool(h[keep].all()))
    return out


def loglikelihoods(
    model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy?) of each (context, continuation) text pair under `model`."""
    tok = _need_tokenizer(tokenizer)
    return score_continuations(model, [encode_pair(tok, c, x) for c, x in pairs], batch_size)


def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    stop: tuple[str, ...] | list[str] = ("\n",),
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` through the inference engine, cut before the first stop
    string; prompts too long for the context lose their oldest tokens (BOS kept)."""
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        res = generate(
            model,
            tokenizer,
            chunk,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop=tuple(stop),
            truncate="left",
            seed=seed,
        )
        out.extend(res)
    return out


def _need_tokenizer(tokenizer):
    if tokenizer is None:
        raise UserError("this checkpoint has no tokenizer (tokenizer.json); tasks need one")
    return tokenizer


def _stderr(values: list[float]) -> float:
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def evaluate_task(
    model,
    tokenizer,
    task,
    *,
    batch_size: int = 16,
    max_examples: int | None = None,
    delimiter: str = " ",
    max_new_tokens: int = 32,
    stop: tuple[str, ...] | list[str] = ("\n",),
    transform: Callable[[str, int], str] | None = None,
    keep_predictions: bool = False,
    progress: bool = False,
) -> dict:
    """Score `model` (with its `tokenizer`) on `task` (a Task or a JSONL path).

    Multiple choice: acc and acc_norm (with their standard errors). Generation: exact_match.
    transform(text, example index) rewrites each context/prompt first (the robustness report uses
    it); the choices and answers are left as they are.
    """
    tok = _need_tokenizer(tokenizer)
    if not isinstance(task, Task):
        task = load_task(task, max_examples)
    examples = task.examples[:max_examples] if max_examples is not None else task.examples
    fix = transform or (lambda text, i: text)
    result: dict = {"task": task.name, "kind": task.kind, "n": len(examples)}
    if task.kind == MULTIPLE_CHOICE:
        pairs, owner = [], []
        for i, ex in enumerate(examples):
            ctx = fix(ex["context"], i)
            for j, c in enumerate(ex["choices"]):
                pairs.append(encode_pair(tok, ctx, delimiter + c))
                owner.append((i, j))
        scores: list[tuple[float, bool]] = []
        bar = tqdm(
            total=len(pairs), desc=f"{task.name}", unit="choice", disable=not progress, file=sys.stderr
        )
        step = max(batch_size * 8, 1)
        for s in range(0, len(pairs), step):
            scores.extend(score_continuations(model, pairs[s : s + step], batch_size))
            bar.update(len(pairs[s : s + step]))
        bar.close()
        acc, acc_norm, preds = [], [], []
        k = 0
        for ex in examples:
            ll = np.array([scores[k + j][0] for j in range(len(ex["choices"]))])
            k += len(ex["choices"])
            nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in ex["choices"]])
            pred, pred_norm = int(ll.argmax()), int((ll / nbytes).argmax())
            acc.append(float(pred == ex["label"]))
            acc_norm.append(float(pred_norm == ex["label"]))
            preds.append(
                {"label": ex["label"], "pred": pred, "pred_norm": pred_norm, "loglikelihoods": ll.tolist()}
            )
        result.update(
            acc=float(np.mean(acc)),
            acc_stderr=_stderr(acc),
            acc_norm=float(np.mean(acc_norm)),
            acc_norm_stderr=_stderr(acc_norm),
        )
    else:
        prompts = [fix(ex["prompt"], i) for i, ex in enumerate(examples)]
        outs: list[str] = []
        bar = tqdm(total=len(prompts), desc=f"{task.name}", unit="ex", disable=not progress, file=sys.stderr)
        for s in range(0, len(prompts), batch_size):
            outs.extend(
                generate_greedy(
                    model,
                    tok,
                    prompts[s : s + batch_size],
                    max_new_tokens=max_new_tokens,
                    stop=stop,
                    batch_size=batch_size,
                )
            )
            bar.update(len(prompts[s : s + batch_size]))
        bar.close()
        em = [float(o.strip() in {a.strip() for a in ex["answers"]}) for o, ex in zip(outs, examples)]
        preds = [
            {"prompt": p, "output": o, "answers": ex["answers"]} for p, o, ex in zip(prompts, outs, examples)
        ]
        result.update(exact_match=float(np.mean(em)), exact_match_stderr=_stderr(em))
    if keep_predictions:
        result["predictions"] = preds
    return result


def format_task(r: dict) -> str:
    if r["kind"] == MULTIPLE_CHOICE:
        rows = [
            ["acc", f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"],
            ["acc_norm", f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"],
        ]
    else:
        rows = [["exact_match", f"{r['exact_match']:.4f} ± {r['exact_match_stderr']:.4f}"]]
    return f"{r['task']} ({r['kind'].replace('_', ' ')}, {r['n']} examples)\n" + format_table(
        ["metric", "value"], rows
    )
