"""Optimizers (AdamW, or Muon for the hidden matrices and AdamW for the rest) and learning-rate schedules.

Weight decay pulls weights towards zero; that is a useful prior for the matrices of linear layers but
not for norm gains (their natural value is 1), biases, or embedding rows (rare tokens would be decayed
towards zero between their occurrences). LoRA's A and B are matrices and are decayed like any other.

--train.optimizer muon: torch.optim.Muon updates the 2-D weights of the blocks' linear layers (attention
and MLP projections, an MoE router) with the orthogonalised momentum (Newton-Schulz: U V^T of its SVD,
roughly), which only makes sense for a matrix that maps hidden states to hidden states. Everything else
keeps AdamW with its usual groups: embeddings (a row per token, not a linear map), the output head (its
own AdamW-tuned scale; tied to the embedding or not), norms, biases, MoE's stacked 3-D experts, and
LoRA's A and B (factors of the weight's update, not the weight: orthogonalising each factor's update
does not orthogonalise B A, and LoRA learning rates are tuned for AdamW). `adjust_lr_fn="match_rms_adamw"`
(Moonshot, "Muon is Scalable for LLM Training") scales each matrix's update by 0.2 * sqrt(max(A, B)),
which gives it AdamW's typical update RMS (~0.2 lr), so --train.lr, --train.weight_decay and the
schedule carry over from AdamW unchanged. The two torch optimizers are stepped as one (`Optimizers`).

Groups may run at a multiple of the schedule's rate (`lr_scale`, applied by set_lr): the Muon matrices
(--train.muon_lr_scale) and the embeddings (--train.embedding_lr_scale; a tied head is the embedding).
A --time-budget plan sets them (budget.py).

The schedule is a pure function of the step (`lr_at`), so "scheduler state" is just the step number:
a resumed run computes exactly the same learning rates.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from lmforge.train.config import TrainSection
from lmforge.utils import UserError

_IN_BLOCK = re.compile(r"(^|\.)blocks\.\d+\.")  # "blocks.3.attn.wo.weight" (DDP: "module.blocks.3...")


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Muon's share: a 2-D weight of a linear layer inside a block (not LoRA's A/B, see the docstring).

    Fused projections are one matrix here: q, k and v (`wqkv`), and gate and up (`w_in` of GLU MLPs),
    are orthogonalised together as one (out, in) matrix, not per part, as the model stores them."""
    return p.ndim == 2 and bool(_IN_BLOCK.search(name)) and "lora_" not in name


def param_groups(model: nn.Module, t: TrainSection, skip: frozenset[int] = frozenset()) -> list[dict]:
    """AdamW groups over the trainable parameters: 2-D+ weights of linear layers decay, norms, biases and
    embeddings not; the embeddings have their own learning-rate scale (`lr_scale`, which set_lr
    applies). `skip`: ids of parameters another optimizer (Muon) updates."""
    groups = {
        k: {"params": [], "weight_decay": wd, "lr": t.lr * s, "lr_scale": s}
        for k, wd, s in (
            ("decay", t.weight_decay, 1.0),
            ("no_decay", 0.0, 1.0),
            ("embedding", 0.0, t.embedding_lr_scale),
        )
    }
    seen = set(skip)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # a tied lm_head is the same tensor as tok_emb and is listed once, as tok_emb
        if "tok_emb." in name or "pos_emb." in name:
            groups["embedding"]["params"].append(p)
        elif p.ndim < 2 or "norm" in name:
            groups["no_decay"]["params"].append(p)
        else:
            groups["decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable hidden matrices (`is_hidden_matrix`), each once, in the model's order."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen and is_hidden_matrix(name, p):
            seen.add(id(p))
            out.append(p)
    return out


class Optimizers:
    """Several torch optimizers over disjoint parameters, used as one: step, zero_grad, and param_groups
    (all of theirs, so that `set_lr` sets every group's rate). The checkpoint helpers
    (distributed.full_optimizer_state / load_optimizer_state) save and load `.optimizers` together,
    keyed by parameter name."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"Optimizers({', '.join(type(o).__name__ for o in self.optimizers)})"


def build_optimizer(model: nn.Module, t: TrainSection, device: torch.device, sharded: bool = False):
    """The optimizer over `model`'s trainable parameters, as --train.optimizer says:

    adamw: AdamW, fused kernels where torch has them (CUDA, CPU), for FSDP2's sharded (DTensor)
      parameters too, so that a shard is updated exactly as one process updates the whole tensor
      (foreach rounds differently in the last bit, which bf16 amplifies);
    muon: Optimizers(Muon over the hidden matrices, that AdamW over the rest); just the AdamW when no
      hidden matrix trains (LoRA). Not with FSDP2 (`sharded`): see below.
    """
    kind = "adamw" if t.optimizer == "auto" else t.optimizer  # --time-budget turns auto into muon first
    if kind not in ("adamw", "muon"):
        raise UserError(f"--train.optimizer {t.optimizer!r}: choose one of auto, adamw, muon")
    hidden = muon_params(model) if kind == "muon" else []
    if hidden and sharded:
        # torch.optim.Muon on FSDP2's DTensor shards runs and does the whole matrix's math (DTensor ops:
        # the norm and every Newton-Schulz matmul are collectives), but its bf16 partial sums round
        # otherwise than one process: measured on 2 gloo ranks, the loss drifts from 1 process by 2e-5
        # in 6 steps (DDP: equal). An inexact, collective-bound update is not offered silently.
        raise UserError(
            "--train.optimizer muon does not run on FSDP2's sharded weights (Newton-Schulz needs each "
            "whole matrix; torch.optim.Muon on DTensor shards is not exact): use --parallel ddp, or "
            "--train.optimizer adamw with --parallel fsdp"
        )
    groups = param_groups(model, t, skip=frozenset(id(p) for p in hidden))
    if not groups and not hidden:
        raise ValueError(
            "no trainable parameters: everything is frozen (check train.freeze_embeddings / lora)"
        )
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    if device.type in ("cuda", "cpu"):
        kw["fused"] = True
    else:
        kw["foreach"] = True
    adamw = torch.optim.AdamW(groups, **kw) if groups else None
    if not hidden:
        return adamw
    muon = torch.optim.Muon(
        hidden,
        lr=t.lr * t.muon_lr_scale,
        weight_decay=t.weight_decay,  # decoupled, lr * wd as AdamW's
        momentum=t.muon_momentum,
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",  # update RMS ~0.2 lr, as AdamW's: train.lr carries over
    )
    for g in muon.param_groups:
        g["lr_scale"] = t.muon_lr_scale  # set_lr applies it
    return Optimizers(muon, *([adamw] if adamw is not None else []))


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
    """The schedule's rate, times each group's `lr_scale` (the embeddings, Muon's matrices)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
