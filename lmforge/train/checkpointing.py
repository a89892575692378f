"""Training checkpoints: runs/<name>/checkpoints/step_NNNNNN/, written atomically, the last K kept.

A checkpoint directory is a loadable model plus everything needed to continue bit for bit:

    config.json, model.safetensors, ...   the HF model directory (LoRA runs: the adapter files instead)
    optimizer.safetensors                 AdamW moments and step counts, keyed "<param name>/<key>"
    trainer_state.json                    step, tokens, param groups, python/numpy RNG, data loader position
    rng.safetensors                       torch CPU/CUDA generator states of every rank (+ any loader tensors)

No pickle anywhere: nested states are split into JSON and named tensors (`pack` / `unpack`). The
directory is assembled in a temporary sibling and renamed into place (utils.atomic_dir), so a crash or
a failed write leaves the previous checkpoints whole. The learning-rate schedule is a function of the
step, so the step is the whole scheduler state.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.train import distributed as D
from lmforge.train import lora as L
from lmforge.utils import UserError, atomic_dir

STATE = "trainer_state.json"
OPTIM = "optimizer.safetensors"
RNG = "rng.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------- pack
def pack(obj, tensors: dict[str, torch.Tensor], prefix: str = ""):
    """A JSON-able copy of a nested state; tensors and arrays move to `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj.copy())
        return {"__ndarray__": prefix, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors, f"{prefix}/{k}" if prefix else k) for k, v in obj.items()}
        return {"__items__": [[k, pack(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint (JSON + tensors only)")


def unpack(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng(d: D.Dist) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensors) of the RNG states. Torch generators are gathered from every rank."""
    tensors = {f"torch_cpu/{r}": s for r, s in enumerate(D.all_gather_bytes(torch.get_rng_state(), d))}
    if torch.cuda.is_available() and d.device.type == "cuda":
        states = D.all_gather_bytes(torch.cuda.get_rng_state(d.device), d)
        tensors.update((f"torch_cuda/{r}", s) for r, s in enumerate(states))
    np_state = np.random.get_state()
    js = {
        "python": pack(random.getstate(), {}),
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *[v.item() if hasattr(v, "item") else v for v in np_state[2:]],
        ],
        "world": d.world,
    }
    return js, tensors


def restore_rng(js: dict, tensors: dict[str, torch.Tensor], d: D.Dist, seed: int, step: int) -> str | None:
    """Restore this rank's generators; returns a warning when the saved world size differs."""
    random.setstate(unpack(js["python"], {}))
    np_state = js["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if js.get("world", 1) == d.world:
        torch.set_rng_state(tensors[f"torch_cpu/{d.rank}"])
        if f"torch_cuda/{d.rank}" in tensors and d.device.type == "cuda":
            torch.cuda.set_rng_state(tensors[f"torch_cuda/{d.rank}"], d.device)
        return None
    torch.manual_seed(seed + 1_000_003 * step + d.rank)
    return (
        f"checkpoint written by {js.get('world')} process(es), resumed with {d.world}: weights, optimizer and "
        "data position continue exactly; dropout/sampling random streams are reseeded"
    )


# ---------------------------------------------------------------------------------------------- paths
def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary .step_* siblings are ignored)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for p in list_checkpoints(run_dir)[: -keep if keep > 0 else None]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- save / load
class _Snapshot:
    """What checkpoint.save_model needs from a model: its config and a (gathered) state dict."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def save_weights(
    path: Path,
    model_state: dict,
    model_config,
    tokenizer=None,
    lora_config: dict | None = None,
    base: str | None = None,
) -> None:
    """The model part of a checkpoint: an HF model directory, or only the adapter for LoRA runs."""
    from lmforge.checkpoint import save_model

    if lora_config:
        lora = {k: v for k, v in model_state.items() if ".lora_" in k}
        L.save_into(path, lora, lora_config, base, model_config, tokenizer)
    else:
        save_model(
            _Snapshot(model_config, {k: v for k, v in model_state.items() if ".lora_" not in k}),
            path,
            tokenizer=tokenizer,
        )


def save_checkpoint(
    path: Path,
    *,
    model,
    optimizer,
    trainer_state: dict,
    d: D.Dist,
    model_config,
    tokenizer=None,
    lora_config: dict | None = None,
    base: str | None = None,
) -> Path | None:
    """Gather on rank 0 and write `path` atomically. Every rank must call this (gathers are collective)."""
    model_state = D.full_model_state(model, d)
    optim_state = D.full_optimizer_state(model, optimizer, d)
    rng_js, rng_tensors = capture_rng(d)
    if d.main:
        with atomic_dir(path) as tmp:
            save_weights(tmp, model_state, model_config, tokenizer, lora_config, base)
            o_tensors: dict[str, torch.Tensor] = {}
            o_js = pack(optim_state, o_tensors)
            save_file(o_tensors, str(tmp / OPTIM), metadata={"format": "lmforge-optimizer"})
            extra: dict[str, torch.Tensor] = {}
            state = pack(trainer_state, extra, "state")
            save_file({**rng_tensors, **extra}, str(tmp / RNG), metadata={"format": "lmforge-rng"})
            doc = {"format": "lmforge-trainer-state", "version": 1, **state, "optimizer": o_js, "rng": rng_js}
            (tmp / STATE).write_text(json.dumps(doc, indent=1) + "\n")
    D.barrier(d)
    return path if d.main else None


def read_checkpoint(path: Path) -> tuple[dict, dict, tuple[dict, dict]]:
    """(trainer state, optimizer state, (rng json, rng tensors)) of a checkpoint directory."""
    path = Path(path)
    f = path / STATE
    if not f.is_file():
        raise UserError(
            f"{path}: not a training checkpoint (no {STATE}); to start from a model, "
            "use --model.init_from instead of --resume"
        )
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(
            f"{f}: not valid JSON ({e}); the checkpoint is damaged, resume from an older one"
        ) from None
    rng_tensors = _read_tensors(path / RNG)
    optim = unpack(doc.pop("optimizer"), _read_tensors(path / OPTIM))
    rng_js = doc.pop("rng")
    state = unpack({k: v for k, v in doc.items() if k not in ("format", "version")}, rng_tensors)
    return state, optim, (rng_js, rng_tensors)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """--resume none | auto | <dir>  ->  the checkpoint to start from, or None for a fresh run."""
    if resume in (None, "", "none", "no", "false"):
        if list_checkpoints(run_dir):
            raise UserError(
                f"{run_dir} already has checkpoints; continue it with --resume auto, "
                "or choose another --name (or delete the directory) to start over"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if not p.is_dir():
        raise UserError(
            f"--resume {resume}: no such checkpoint directory (use auto, none or a step_NNNNNN dir)"
        )
    if not (p / STATE).is_file():
        last = latest_checkpoint(p)  # a run directory was given: take its latest checkpoint
        if last is None:
            raise UserError(f"--resume {resume}: no {STATE} there and no checkpoints/step_* inside")
        return last
    return p
