"""AdamW with decay / no-decay parameter groups, and learning-rate schedules.

Weight decay pulls weights towards zero; that is a useful prior for the matrices of linear layers but
not for norm gains (their natural value is 1), biases, or embedding rows (rare tokens would be decayed
towards zero between their occurrences). LoRA's A and B are matrices and are decayed like any other.

The schedule is a pure function of the step (`lr_at`), so "scheduler state" is just the step number:
a resumed run computes exactly the same learning rates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.train.config import TrainSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: 2-D+ weights of linear layers decay, the rest not."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # a tied lm_head is the same tensor as tok_emb and is listed once, as tok_emb
        embedding = "tok_emb." in name or "pos_emb." in name
        if p.ndim < 2 or "norm" in name or embedding:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, t: TrainSection, device: torch.device, sharded: bool = False):
    """AdamW over `model`'s trainable parameters: fused kernels where torch has them (CUDA, CPU), for
    FSDP2's sharded (DTensor) parameters too, so that a shard is updated exactly as one process updates
    the whole tensor (foreach rounds differently in the last bit, which bf16 amplifies)."""
    groups = param_groups(model, t.weight_decay)
    if not groups:
        raise ValueError(
            "no trainable parameters: everything is frozen (check train.freeze_embeddings / lora)"
        )
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    if device.type in ("cuda", "cpu"):
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(groups, **kw)


def warmup_steps(t: TrainSection, total: int) -> int:
    return min(t.warmup_steps, max(total // 10, 0))


def lr_at(step: int, total: int, t: TrainSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    linear warmup from lr/warmup to lr, then
      cosine:   half a cosine down to min_lr at the last step
      wsd:      constant, then a linear decay to min_lr over the last decay_fraction of the steps
      constant: lr
    """
    lr, lo = t.lr, t.lr * t.min_lr_ratio
    w = warmup_steps(t, total)
    if step < w:
        return lr * (step + 1) / w
    if t.schedule == "constant":
        return lr
    if t.schedule == "cosine":
        progress = (step - w) / max(1, total - 1 - w)
        return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * min(1.0, progress)))
    if t.schedule == "wsd":
        n_decay = max(1, int(round(t.decay_fraction * total)))
        start = total - n_decay
        if step < start:
            return lr
        return lr + (lo - lr) * min(1.0, (step - start + 1) / n_decay)
    raise ValueError(f"train.schedule={t.schedule!r}: choose cosine, wsd or constant")


def decay_start(total: int, t: TrainSection) -> int:
    """The first step whose learning rate is below the peak: until then the schedule does not depend on
    `total`, so a run may still change its length (--time-budget fits it to the time left)."""
    w = warmup_steps(t, total)
    if t.schedule == "constant":
        return total
    if t.schedule == "wsd":
        return max(w, total - max(1, int(round(t.decay_fraction * total))))
    return w + 1  # cosine: the step after warmup is already below the peak


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
