"""The before/after table every compression command ends with: size on disk, bits per byte on held-out
text, decode speed at batch 1.

    r = compare_models("runs/tiny/final", "runs/tiny-int8", eval_data="python-docs", eval_tokens=20_000)
    print(format_summary(r))

Decode speed is timed in alternation (before, after, before, after, ...) and the median kept, so that
other work on a shared machine slows both alike. For many variants at once use `lmforge report`.
"""

from __future__ import annotations

import gc
import time

import torch

from lmforge.utils import dir_size, human_bytes


def decode_tok_s(
    lms: dict, new_tokens: int = 32, prompt_len: int = 16, rounds: int = 3, seed: int = 0
) -> dict:
    """Greedy decode tokens/s at batch 1 through the inference engine, each model timed in turn."""
    from lmforge.infer import Engine, SamplingParams, Sequence

    gen = torch.Generator().manual_seed(seed)
    times: dict = {k: [] for k in lms}
    engines = {}
    for k, lm in lms.items():
        model = lm.model if hasattr(lm, "model") else lm
        n = max(1, min(prompt_len, model.config.max_seq_len - new_tokens - 1))
        prompt = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
        engines[k] = (Engine(model, None, max_batch=1, max_len=n + new_tokens), prompt)

    def run(k, n_new):
        engine, prompt = engines[k]
        engine.stats = {s: type(v)() for s, v in engine.stats.items()}
        engine.add(
            [Sequence(list(prompt), SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True))]
        )
        while engine.active:
            engine.step()
        return engine.stats["decode_tokens"] / max(engine.stats["decode_s"], 1e-9)

    with torch.inference_mode():
        for k in lms:
            run(k, 4)  # warm-up
        for _ in range(rounds):
            for k in lms:
                times[k].append(run(k, new_tokens))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def compare_models(
    before,
    after,
    *,
    eval_data: str | None = "python-docs",
    eval_tokens: int = 20_000,
    new_tokens: int = 32,
    device: str = "auto",
    extra: dict | None = None,
) -> dict:
    """Size, bits per byte (validation split of eval_data, first eval_tokens tokens) and decode speed of
    two checkpoint directories. eval_data=None skips the evaluation and the timing (size only)."""
    import lmforge

    r = {
        "before": str(before),
        "after": str(after),
        "eval_data": eval_data,
        "eval_tokens": eval_tokens,
        "size_before": dir_size(before),
        "size_after": dir_size(after),
        **(extra or {}),
    }
    if eval_data is None:
        return r
    from lmforge.evaluate.perplexity import evaluate_lm

    t0 = time.perf_counter()
    lms = {"before": lmforge.load(before, device=device), "after": lmforge.load(after, device=device)}
    for k, lm in lms.items():
        ev = evaluate_lm(lm.model, lm.tokenizer, eval_data, max_tokens=eval_tokens)
        r[f"bpb_{k}"], r[f"loss_{k}"] = ev["bits_per_byte"], ev["loss"]
        r[f"params_{k}"] = lm.model.num_params()
    speed = decode_tok_s(lms, new_tokens=new_tokens)
    r["decode_tok_s_before"], r["decode_tok_s_after"] = speed["before"], speed["after"]
    r["seconds"] = round(time.perf_counter() - t0, 1)
    del lms
    gc.collect()
    return r


def format_summary(r: dict, labels: tuple[str, str] = ("before", "after")) -> str:
    from lmforge.evaluate.table import format_table
    from lmforge.utils import human_count

    def change(a, b, fmt="{:+.1f}%"):
        return fmt.format(100 * (b / a - 1)) if a else "-"

    rows = [
        [
            "size on disk",
            human_bytes(r["size_before"]),
            human_bytes(r["size_after"]),
            f"x{r['size_after'] / r['size_before']:.3f}",
        ]
    ]
    if "bpb_before" in r:
        rows += [
            [
                "parameters",
                human_count(r["params_before"]),
                human_count(r["params_after"]),
                change(r["params_before"], r["params_after"]),
            ],
            [
                "bits per byte",
                f"{r['bpb_before']:.4f}",
                f"{r['bpb_after']:.4f}",
                change(r["bpb_before"], r["bpb_after"], "{:+.2f}%"),
            ],
            [
                "decode tok/s (batch 1)",
                f"{r['decode_tok_s_before']:.1f}",
                f"{r['decode_tok_s_after']:.1f}",
                f"x{r['decode_tok_s_after'] / max(r['decode_tok_s_before'], 1e-9):.2f}",
            ],
        ]
    for label, (a, b) in (r.get("more_rows") or {}).items():
        rows.append([label, a, b, ""])
    head = f"{r['before']} -> {r['after']}"
    if "bpb_before" in r:
        head += f" (bits per byte: {r['eval_data']} validation split, first {r['eval_tokens']:,} tokens)"
    return head + "\n" + format_table(["", *labels, "change"], rows)
