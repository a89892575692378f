"""How fragile is a model? The same task under controlled, seeded perturbations of its inputs.

    r = robustness_report(model, tok, "arc_easy.jsonl", seed=0)
    print(format_robustness(r))      # acc per perturbation, and the drop from the clean input

Each perturbation rewrites the context (multiple choice) or the prompt (generation) of every example;
the choices and answers stay as they are. The random generator of example i under perturbation p is
seeded from (seed, p, i), so a report is reproducible and the clean row equals `evaluate_task`.

Perturbations (name: what happens, `rate` its strength):
- typos:       each non-space character, with probability rate, is deleted, doubled, replaced by a
               random letter, or swapped with the next one (keyboard noise)
- upper/lower: the whole text in upper or lower case
- random_case: each letter's case flipped with probability rate
- whitespace:  each whitespace character, with probability rate, replaced by two spaces, a tab or a
               newline
"""

from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass

from lmforge.evaluate.table import format_table
from lmforge.evaluate.tasks import MULTIPLE_CHOICE, Task, evaluate_task, load_task
from lmforge.utils import UserError


def typos(text: str, rate: float, rng: random.Random) -> str:
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        c = chars[i]
        if c.isspace() or rng.random() >= rate:
            out.append(c)
            i += 1
            continue
        op = rng.randrange(4)
        if op == 0:  # delete
            pass
        elif op == 1:  # double
            out += [c, c]
        elif op == 2:  # substitute
            out.append(rng.choice(string.ascii_lowercase))
        elif i + 1 < len(chars) and not chars[i + 1].isspace():  # swap with the next character
            out += [chars[i + 1], c]
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)


def random_case(text: str, rate: float, rng: random.Random) -> str:
    return "".join(c.swapcase() if c.isalpha() and rng.random() < rate else c for c in text)


def whitespace(text: str, rate: float, rng: random.Random) -> str:
    return "".join(rng.choice(("  ", "\t", "\n")) if c.isspace() and rng.random() < rate else c for c in text)


KINDS = {
    "clean": lambda text, rate, rng: text,
    "typos": typos,
    "upper": lambda text, rate, rng: text.upper(),
    "lower": lambda text, rate, rng: text.lower(),
    "random_case": random_case,
    "whitespace": whitespace,
}


@dataclass(frozen=True)
class Perturbation:
    kind: str
    rate: float = 0.0

    @property
    def name(self) -> str:
        return (
            f"{self.kind} {self.rate:.0%}"
            if self.kind in ("typos", "random_case", "whitespace")
            else self.kind
        )

    def __call__(self, text: str, index: int, seed: int = 0) -> str:
        rng = random.Random(zlib.crc32(f"{seed}:{self.kind}:{self.rate}:{index}".encode()))
        return KINDS[self.kind](text, self.rate, rng)


DEFAULT = (
    Perturbation("clean"),
    Perturbation("typos", 0.02),
    Perturbation("typos", 0.05),
    Perturbation("typos", 0.10),
    Perturbation("upper"),
    Perturbation("lower"),
    Perturbation("random_case", 0.5),
    Perturbation("whitespace", 0.2),
)


def parse_perturbations(spec: str | None) -> tuple[Perturbation, ...]:
    """'typos:0.05,upper,whitespace:0.3' -> Perturbations (clean is always first)."""
    if not spec:
        return DEFAULT
    out = [Perturbation("clean")]
    for part in spec.split(","):
        kind, _, rate = part.strip().partition(":")
        if kind not in KINDS:
            raise UserError(f"unknown perturbation {kind!r}; choose from {', '.join(KINDS)}")
        try:
            r = float(rate) if rate else (0.05 if kind == "typos" else 0.5 if kind == "random_case" else 0.2)
        except ValueError as e:
            raise UserError(f"perturbation {part!r}: the rate must be a number, e.g. typos:0.05") from e
        if not 0 <= r <= 1:
            raise UserError(f"perturbation {part!r}: the rate must be between 0 and 1")
        if kind != "clean":
            out.append(Perturbation(kind, r))
    return tuple(out)


def robustness_report(
    model, tokenizer, task, *, perturbations=DEFAULT, seed: int = 0, progress: bool = False, **kwargs
) -> dict:
    """The task's metrics under each perturbation, with the change from the clean input.

    kwargs go to evaluate_task (batch_size, max_examples, delimiter, max_new_tokens, stop, ...)."""
    if not isinstance(task, Task):
        task = load_task(task, kwargs.get("max_examples"))
    metrics = ("acc", "acc_norm") if task.kind == MULTIPLE_CHOICE else ("exact_match",)
    rows = []
    for p in perturbations:
        r = evaluate_task(
            model,
            tokenizer,
            task,
            transform=lambda text, i, p=p: p(text, i, seed),
            progress=progress,
            **kwargs,
        )
        rows.append({"perturbation": p.name, "kind": p.kind, "rate": p.rate, **{m: r[m] for m in metrics}})
    clean = next((r for r in rows if r["kind"] == "clean"), rows[0])
    for r in rows:
        for m in metrics:
            r[f"delta_{m}"] = r[m] - clean[m]
    example = (
        perturbations[-1](task.examples[0]["context" if task.kind == MULTIPLE_CHOICE else "prompt"], 0, seed)
        if perturbations
        else None
    )
    return {
        "task": task.name,
        "kind": task.kind,
        "n": len(task.examples),
        "seed": seed,
        "metrics": list(metrics),
        "rows": rows,
        "example": example,
    }


def format_robustness(r: dict) -> str:
    cols = ["perturbation"]
    for m in r["metrics"]:
        cols += [m, f"Δ {m}"]
    rows = []
    for row in r["rows"]:
        cells = [row["perturbation"]]
        for m in r["metrics"]:
            cells += [f"{row[m]:.4f}", f"{row[f'delta_{m}']:+.4f}" if row["kind"] != "clean" else ""]
        rows.append(cells)
    return f"robustness of {r['task']} ({r['n']} examples, seed {r['seed']})\n" + format_table(cols, rows)
