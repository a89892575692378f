"""Validation during training: loss, bits per byte, and a few sampled continuations.

Bits per byte = total nats / (ln 2 * UTF-8 bytes of the target tokens), counting only tokens that stand
for bytes (special tokens have 0 bytes and are left out of both sums, as nanochat does). Unlike loss
per token, it does not change when the tokenizer does, so runs with different vocabularies compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from lmforge.train import distributed as D


@torch.no_grad()
def evaluate(model, batches: Iterable, d: D.Dist, autocast, token_bytes: torch.Tensor | None = None) -> dict:
    """Mean loss (nats/token) and bits per byte over `batches` of (x, y), summed over all ranks."""
    was_training = model.training
    model.eval()
    dev = d.device
    # [nats, tokens, nats over tokens with bytes, bytes]; float64 so that sums do not lose digits
    acc = torch.zeros(4, dtype=torch.float64, device=dev)
    for x, y in batches:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast():
            logits = model(x)  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        valid = y.flatten() != -100
        acc[0] += nll[valid].double().sum()
        acc[1] += valid.sum()
        if token_bytes is not None:
            nb = token_bytes[y.flatten().clamp(min=0)] * valid  # (B*T,) bytes of each target token
            acc[2] += (nll * (nb > 0)).double().sum()
            acc[3] += nb.sum()
    D.all_reduce(acc, d)
    model.train(was_training)
    nats, tokens, nats_b, n_bytes = acc.tolist()
    out = {"val_loss": nats / max(tokens, 1), "val_tokens": int(tokens)}
    if token_bytes is not None and n_bytes > 0:
        out["val_bpb"] = nats_b / (math.log(2) * n_bytes)
    return out


@torch.no_grad()
def sample(
    model,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    generator: torch.Generator | None = None,
    stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """Continue `prompt` (token ids) with a KV cache; returns the new ids. Runs in the weights' dtype.

    Deliberately small: the inference engine (lmforge.infer) does batching, streaming and speculation.
    Every rank of an FSDP run calls this with the same prompt and generator seed, so they stay in step.
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    room = model.config.max_seq_len - len(prompt)
    n_new = max(0, min(max_new_tokens, room))
    if n_new == 0:
        return []
    cache = model.new_cache(1, len(prompt) + n_new)
    ids = torch.tensor([prompt], dtype=torch.long, device=dev)
    out: list[int] = []
    for _ in range(n_new):
        logits = model(ids, cache=cache, logits_to_keep=1)[0, -1].float()  # (V,)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
        if nxt in stop_ids:
            break
        ids = torch.tensor([[nxt]], dtype=torch.long, device=dev)
    model.train(was_training)
    return out
