"""Distributed setup for `torchrun`: process group, DDP / FSDP2 wrapping, reductions, full state dicts.

    torchrun --nproc-per-node 2 -m lmforge pretrain --parallel ddp  ...   # NCCL on GPU, gloo on CPU

Data parallelism is defined on one global stream of micro-batches: every process reads the same
stream and keeps every world-th micro-batch (`RankSlice`). So W processes with accumulation A see
exactly the batches one process sees with accumulation W*A, the loader's position is the same on every
rank (rank 0 saves it for all), and a checkpoint resumes with any number of processes as long as the
global batch divides evenly. Reading W micro-batches to keep one costs a memmap copy, not compute.

Checkpoints hold full (unsharded) tensors gathered on rank 0 with torch.distributed.checkpoint's
state-dict helpers, so DDP, FSDP and single-process runs read each other's checkpoints.

No rank waits for the others longer than `timeout` (--dist_timeout, 5 minutes by default): a rank that
stops is named by the others' watchdog (lmforge/train/watchdog.py) after `timeout` seconds, and the
process group's own timeout, a little longer, ends a collective that every live rank is stuck in.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.utils import UserError, resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp
    device: torch.device = torch.device("cpu")
    timeout: float = 300.0  # seconds a rank waits for the others (watchdog; collectives a little longer)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(parallel: str, device: str, timeout: float = 300.0) -> Dist:
    """Read torchrun's environment, pick the device and start the process group when there are several processes."""
    if not (isinstance(timeout, (int, float)) and timeout > 0 and timeout < float("inf")):
        raise UserError(f"--dist_timeout {timeout}: expected a number of seconds > 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if parallel not in ("auto", "none", "ddp", "fsdp"):
        raise UserError(f"--parallel {parallel}: choose auto, none, ddp or fsdp")
    if world == 1:
        if parallel in ("ddp", "fsdp"):
            print(
                f"--parallel {parallel}: a single process; run under `torchrun --nproc-per-node N` to use it"
            )
        return Dist(device=resolve_device(device))
    if parallel == "none":
        raise UserError(
            "--parallel none with several processes would train W independent copies; use ddp or fsdp"
        )
    parallel = "ddp" if parallel == "auto" else parallel
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type == "mps":
        raise UserError("distributed training on Apple MPS is not supported; use --device cpu")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=collective_timeout(timeout)),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Dist(rank, world, local_rank, parallel, dev, float(timeout))


def collective_timeout(timeout: float) -> float:
    """The process group's timeout: longer than the watchdog's by a margin, so that a rank that stopped is
    named (watchdog) before the collective waiting for it gives up with a backend error."""
    return timeout + max(10.0, 0.1 * timeout)


def cleanup(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DDP, or FSDP2 (each block sharded, then the root), or the model itself for one process."""
    if not d.active:
        return model
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)  # root: embeddings, final norm, lm_head
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare Transformer under torch.compile / DDP wrappers (FSDP2 shards in place: no wrapper)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def grad_sync(model: nn.Module, d: Dist, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not d.active or sync:
        if d.parallel == "fsdp":
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if d.parallel == "fsdp":
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm(params, max_norm: float, d: Dist) -> torch.Tensor:
    """Clip the gradients of `params` to a global L2 norm of `max_norm` (inf: no clipping); returns the
    norm before clipping (fp32, a 0-dim tensor, the same on every rank).

    The sum of squares is accumulated in fp64: FSDP2 shards each gradient, so its norm is summed in
    another order than one process sums it, and an fp32 sum would differ in the last bits. In bf16
    such a bit in the clipping factor flips the bf16 rounding of some weights a few steps later, and
    the losses drift apart by 1e-4 (issue 23). In fp64 the order does not reach the fp32 result.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=d.device)
    sharded = d.active and any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    norms = torch._foreach_norm(local, 2, dtype=torch.float64)
    own = [  # a replicated gradient (all ranks hold it whole) is counted once, by rank 0
        n
        for g, n in zip(grads, norms)
        if not sharded or not isinstance(g, DTensor) or any(pl.is_shard() for pl in g.placements) or d.main
    ]
    sq = torch.stack(own).square().sum() if own else torch.zeros((), dtype=torch.float64, device=d.device)
    if sharded:
        dist.all_reduce(sq)
    total = sq.sqrt().float()
    coef = max_norm / (total + 1e-6)
    if math.isfinite(max_norm) and bool(coef < 1):
        torch._foreach_mul_(local, coef)
    return total


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    if d.active:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op])
    return t


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_gather_bytes(t: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Gather a same-sized uint8 tensor (an RNG state) from every rank."""
    if not d.active:
        return [t]
    t = t.to(d.device) if d.device.type == "cuda" else t
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Full, unsharded model tensors on CPU under the bare model's names (rank 0; empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_sd_options(full_state_dict=True, cpu_offload=True))


def _torch_optimizers(optimizer):
    """A torch optimizer, or the tuple of them behind an optim.Optimizers (Muon + AdamW): torch's
    state-dict helpers take either, and merge several into one state keyed by parameter name."""
    return tuple(optimizer.optimizers) if hasattr(optimizer, "optimizers") else optimizer


def full_optimizer_state(model: nn.Module, optimizer, d: Dist) -> dict:
    """Optimizer state keyed by parameter name, full tensors on CPU (rank 0; empty on other ranks).
    AdamW: step, exp_avg, exp_avg_sq per parameter; Muon's matrices: momentum_buffer."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, _torch_optimizers(optimizer), options=_sd_options(full_state_dict=True, cpu_offload=True)
    )


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], d: Dist) -> None:
    """Load full, name-keyed tensors (every rank has read them) into a possibly sharded model, in place.
    Parameters the state leaves out keep their values (a LoRA checkpoint holds the adapter only)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_sd_options(full_state_dict=True, strict=False))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, d: Dist) -> None:
    """Load a full, name-keyed optimizer state (every rank has read it) into a possibly sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _check_same_optimizer(optimizer, state)
    set_optimizer_state_dict(
        model, _torch_optimizers(optimizer), state, options=_sd_options(full_state_dict=True)
    )


def _check_same_optimizer(optimizer, state: dict) -> None:
    """A checkpoint of one --train.optimizer does not resume with the other (torch's loader would stop
    with a KeyError): one line naming both. Muon's param groups are the ones with `ns_coefficients`."""
    optims = _torch_optimizers(optimizer)
    ours = any(isinstance(o, torch.optim.Muon) for o in (optims if isinstance(optims, tuple) else [optims]))
    theirs = any("ns_coefficients" in g for g in state.get("param_groups", []))
    if ours != theirs:
        kind = {True: "muon", False: "adamw"}
        raise UserError(
            f"the checkpoint was trained with --train.optimizer {kind[theirs]}, this run uses {kind[ours]}: "
            f"resume with --train.optimizer {kind[theirs]}, or start a new run from its weights with "
            "--model.init_from CHECKPOINT_DIR"
        )
    # the groups (decay, no decay, embeddings at their own rate) are matched by position: a checkpoint
    # of an lmforge that grouped the parameters differently would mix their settings up
    n_ours = len(optimizer.param_groups)  # (an optim.Optimizers lists those of both)
    n_theirs = len(state.get("param_groups", []))
    if n_theirs != n_ours:
        raise UserError(
            f"the checkpoint's optimizer has {n_theirs} parameter groups and this run's {n_ours} (it was "
            "written by another lmforge version, or with other frozen parameters): start a new run from "
            "its weights with --model.init_from CHECKPOINT_DIR"
        )
