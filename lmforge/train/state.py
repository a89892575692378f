"""Trainer state: runs/<name>/checkpoints/step_NNNNNN/, written atomically, the last K kept.

(lmforge/checkpoint.py reads and writes Hugging Face model directories; this module is the training run's
state around one.) A checkpoint directory is a loadable model plus everything needed to continue bit
for bit:

    config.json, model.safetensors, ...   the HF model directory (LoRA runs: the adapter files instead)
    optimizer.safetensors                 AdamW moments and step counts, keyed "<param name>/<key>"
    trainer_state.json                    step, tokens, param groups, python/numpy RNG, data loader position
    rng.safetensors                       torch CPU/CUDA generator states of every rank (+ any loader tensors)

`Checkpointer` is the one place that knows about resuming: it resolves --resume, `load()` restores
model (or adapter) weights, optimizer, data position, step and RNG into a freshly set-up trainer, and
`save()` / `save_final()` write them. No pickle anywhere: nested states are split into JSON and named
tensors (`pack` / `unpack`). The directory is assembled in a temporary sibling and renamed into place
(utils.atomic_dir), so a crash or a failed write leaves the previous checkpoints whole. The
learning-rate schedule is a function of the step, so the step is the whole scheduler state.
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

from lmforge.checkpoint import load_model, read_config, save_state_dict
from lmforge.config import ModelConfig
from lmforge.train import distributed as D
from lmforge.train import lora as L
from lmforge.train.config import Resume
from lmforge.utils import UserError, atomic_dir, human_count

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


# ---------------------------------------------------------------------------------------------- reading
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


def resolve_resume(resume: Resume, run_dir: Path) -> Path | None:
    """The checkpoint a run starts from, or None for a fresh run (which must not overwrite one)."""
    if resume.mode == "fresh":
        if list_checkpoints(run_dir):
            raise UserError(
                f"{run_dir} already has checkpoints; continue it with --resume auto, "
                "or choose another --name (or delete the directory) to start over"
            )
        return None
    if resume.mode == "auto":
        return latest_checkpoint(run_dir)
    p = resume.path
    if not p.is_dir():
        raise UserError(f"--resume {p}: no such checkpoint directory (use auto, none or a step_NNNNNN dir)")
    if not (p / STATE).is_file():
        last = latest_checkpoint(p)  # a run directory was given: take its latest checkpoint
        if last is None:
            raise UserError(f"--resume {p}: no {STATE} there and no checkpoints/step_* inside")
        return last
    return p


def _check_same_shape(saved: ModelConfig, wanted: ModelConfig, where) -> None:
    keys = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "n_experts")
    diff = [k for k in keys if getattr(saved, k) != getattr(wanted, k)]
    if diff:
        raise UserError(
            f"{where}: the checkpoint's model differs from this run's configuration in "
            + ", ".join(f"{k} ({getattr(saved, k)} vs {getattr(wanted, k)})" for k in diff)
            + "; resume with the run's original options"
        )


# ---------------------------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """A run's checkpoints. `Checkpointer(run_dir, Resume.parse(cfg.resume), d, keep=3, base=init_from)`
    resolves --resume at once (so that a bad value fails before any work); then

        state = ckpt.load(model, optimizer, data, seed=cfg.seed, say=print)  # None: a fresh run
        ckpt.save(step, model, optimizer, data, trainer_state)   # collective: every rank calls it
        ckpt.save_final(model, tokenizer, run_dir / "final")

    The model, optimizer and data are the trainer's, set up exactly as for a fresh run (wrapped for
    DDP/FSDP, compiled); `load()` overwrites their state. A LoRA run (the model has `lora_config`)
    checkpoints only its adapter, in PEFT format, on top of the `base` it was fine-tuned from.
    """

    def __init__(self, run_dir: Path, resume: Resume, d: D.Dist, keep: int = 3, base: str | None = None):
        self.run_dir, self.d, self.keep, self.base = Path(run_dir), d, keep, base
        self.resume_from = resolve_resume(resume, self.run_dir)
        # the newest complete checkpoint (what a diverged run names, what the end of a run compares with)
        self.last = latest_checkpoint(self.run_dir) if self.resume_from is not None else None

    # ------------------------------------------------------------------ load
    def load(self, model, optimizer, data, *, seed: int, say=print) -> dict | None:
        """Restore the checkpoint into the trainer's objects and return its trainer state (step, tokens,
        train_time, ...); on a fresh run, seed each rank's random streams and return None.

        Call it last before the first step: nothing in between may draw from the random streams."""
        d = self.d
        if self.resume_from is None:
            seed_all(seed + d.rank)  # one stream per rank (rank 0's is a single process's)
            return None
        path = self.resume_from
        state, optim_state, (rng_js, rng_tensors) = read_checkpoint(path)
        D.load_model_state(D.unwrap(model), self._model_tensors(D.unwrap(model), path), d)
        D.load_optimizer_state(model, optimizer, optim_state, d)
        data.train.load_state_dict(state["loader"])
        say(f"resumed from {path} at step {state['step']} ({human_count(state['tokens'])} tokens)")
        warn = restore_rng(rng_js, rng_tensors, d, seed, state["step"])
        if warn:
            say(f"note: {warn}")
        return state

    def _model_tensors(self, bare, path: Path) -> dict[str, torch.Tensor]:
        """The checkpoint's trainable tensors under the bare model's names: the adapter's factors for a
        LoRA run, else every weight (checked against the model's shape first)."""
        if getattr(bare, "lora_config", None) is None:
            _check_same_shape(read_config(path), bare.config, path)
            return load_model(path, device="cpu", dtype=torch.float32).state_dict()
        from lmforge.train.peft_format import read_adapter

        adapter = read_adapter(path, bare.config)
        got = {
            f"{n}.lora_{ab}": t for n, (A, B, _) in adapter.modules.items() for ab, t in (("A", A), ("B", B))
        }
        want = {n: tuple(p.shape) for n, p in bare.named_parameters() if ".lora_" in n}
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        other = sorted(n for n in set(got) & set(want) if tuple(got[n].shape) != want[n])
        if missing or unexpected or other:
            raise UserError(
                f"{path}: adapter tensors do not match the model's LoRA layers (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, other shapes {other[:3]}); resume with the run's --lora options"
            )
        return got

    # ------------------------------------------------------------------ save
    def _write_weights(self, directory: Path, full: dict[str, torch.Tensor], bare, tokenizer) -> None:
        """The model part of a checkpoint (or of final/): an HF model directory, or only the adapter
        for LoRA runs. Written first into `directory` (save_state_dict replaces it whole)."""
        lora_config = getattr(bare, "lora_config", None)
        if lora_config:
            lora = {k: v for k, v in full.items() if ".lora_" in k}
            L.save_into(directory, lora, lora_config, self.base, bare.config, tokenizer)
        else:
            weights = {k: v for k, v in full.items() if ".lora_" not in k}
            save_state_dict(weights, bare.config, directory, tokenizer=tokenizer)

    def save(self, step: int, model, optimizer, data, trainer_state: dict) -> Path:
        """Gather on rank 0 and write checkpoints/step_NNNNNN atomically, then keep the newest `keep`.
        Every rank must call this (gathers are collective)."""
        d, path = self.d, step_dir(self.run_dir, step)
        model_state = D.full_model_state(model, d)
        optim_state = D.full_optimizer_state(model, optimizer, d)
        rng_js, rng_tensors = capture_rng(d)
        state = {"step": step, **trainer_state, "loader": data.train.state_dict()}
        if d.main:
            with atomic_dir(path) as tmp:
                self._write_weights(tmp, model_state, D.unwrap(model), data.tokenizer)
                o_tensors: dict[str, torch.Tensor] = {}
                o_js = pack(optim_state, o_tensors)
                save_file(o_tensors, str(tmp / OPTIM), metadata={"format": "lmforge-optimizer"})
                extra: dict[str, torch.Tensor] = {}
                packed = pack(state, extra, "state")
                save_file({**rng_tensors, **extra}, str(tmp / RNG), metadata={"format": "lmforge-rng"})
                doc = {
                    "format": "lmforge-trainer-state",
                    "version": 1,
                    **packed,
                    "optimizer": o_js,
                    "rng": rng_js,
                }
                (tmp / STATE).write_text(json.dumps(doc, indent=1) + "\n")
            prune(self.run_dir, self.keep)
        D.barrier(d)
        self.last = path
        return path

    def save_final(self, model, tokenizer, path: Path) -> Path:
        """The trained model as a loadable directory (HF model, or PEFT adapter): collective too."""
        full = D.full_model_state(model, self.d)
        if self.d.main:
            with atomic_dir(path) as tmp:
                self._write_weights(tmp, full, D.unwrap(model), tokenizer)
        D.barrier(self.d)
        return path


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global random streams."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
