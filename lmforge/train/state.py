"""Trainer state: runs/<name>/checkpoints/step_NNNNNN/, written atomically, the last K kept.

(lmforge/checkpoint.py reads and writes Hugging Face model directories; this module is the training run's
state around one.) A checkpoint directory is a loadable model plus everything needed to continue bit
for bit:

    config.json, model.safetensors, ...   the HF model directory (LoRA runs: the adapter files instead)
    optimizer.safetensors                 AdamW moments and steps (Muon: momentum), keyed "<param name>/<key>"
    trainer_state.json                    step, tokens, param groups, python/numpy RNG, data loader position
    rng.safetensors                       torch CPU/CUDA generator states of every rank (+ any loader tensors)

`Checkpointer` is the one place that knows about resuming: it resolves --resume, `load()` restores
model (or adapter) weights, optimizer, data position, step and RNG into a freshly set-up trainer, and
`save()` / `save_final()` write them. No pickle anywhere: nested states are split into JSON and named
tensors (`pack` / `unpack`). The directory is assembled in a temporary sibling and renamed into place
(utils.atomic_dir), so a crash or a failed write leaves the previous checkpoints whole. The
learning-rate schedule is a function of the step, so the step is the whole scheduler state.

Resuming is refused or falls back rather than guessing: a fresh run does not replace an earlier run's
outputs without --force; `--resume auto` passes over a damaged latest checkpoint (missing or cut files)
to the previous one, with a warning; a LoRA checkpoint records its base model's `fingerprint` and does
not continue on another base.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge import outputs
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
# What a run directory holds; a fresh run does not replace them without --force.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "tensorboard", "loss.png", "report.md")
# Files that make a directory another kind of output (a model, an adapter, a tokenizer, a data
# preparation): not a run directory. Other files and folders may share one (distill's and prune's data/).
OTHER_KINDS = ("config.json", "adapter_config.json", "tokenizer.json", "meta.json")


class DamagedCheckpoint(UserError):
    """A checkpoint whose files are missing, truncated or corrupt (--resume auto falls back past it)."""


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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors file; a missing or cut file is a DamagedCheckpoint."""
    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DamagedCheckpoint(f"{path}: truncated or corrupt ({_one_line(e)})") from None


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"{f}: not valid JSON ({e})") from None
    rng_tensors = _read_tensors(path / RNG)
    optim_tensors = _read_tensors(path / OPTIM)
    try:
        optim = unpack(doc.pop("optimizer"), optim_tensors)
        rng_js = doc.pop("rng")
        state = unpack({k: v for k, v in doc.items() if k not in ("format", "version")}, rng_tensors)
        state["step"], state["tokens"], state["loader"]  # noqa: B018 (what every resume reads)
    except (KeyError, TypeError, AttributeError) as e:
        # a tensor the JSON names is not in its file (files from different writes), or a key is gone
        raise DamagedCheckpoint(f"{path}: {STATE} and the tensor files disagree (no {e})") from None
    return state, optim, (rng_js, rng_tensors)


def earlier_outputs(run_dir: Path) -> tuple[list[str], list[str]]:
    """(an earlier run's outputs, another kind of output's files) in `run_dir`: what a fresh run there would
    replace or mix with. A config.yaml alone (a run that failed while it set up) and empty logs count for
    nothing."""
    run_dir, ours, other = Path(run_dir), [], []
    if not run_dir.is_dir():
        return ours, other
    for p in sorted(run_dir.iterdir()):
        if p.name == "checkpoints":
            ours += [f"checkpoints/{c.name}" for c in list_checkpoints(run_dir)][-1:]
        elif p.name in RUN_OUTPUTS and p.name != "config.yaml":
            if p.is_dir() or p.stat().st_size:
                ours.append(p.name + ("/" if p.is_dir() else ""))
        elif p.name in OTHER_KINDS:
            other.append(p.name)
    return ours, other


def clear_outputs(run_dir: Path) -> None:
    """Remove an earlier run's outputs from `run_dir` (--force on a fresh run); other files stay."""
    for name in RUN_OUTPUTS:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def check_writable(run_dir: Path) -> None:
    """Refuse at once (before any work) a run directory that is a file, or that cannot be written."""
    if Path(run_dir).is_file():
        raise UserError(f"--out_dir/--name {run_dir}: is a file, not a directory")
    outputs.check_writable(Path(run_dir), "--out_dir")


def write_error(e: OSError, run_dir: Path) -> UserError | None:
    """A disk-full or read-only OSError while a run writes its logs -> one line (None: another error)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"cannot write to {run_dir}: {os.strerror(e.errno).lower()}; free space (or choose another "
            "--out_dir) and continue with --resume auto"
        )
    if e.errno == errno.EROFS:
        return UserError(f"cannot write to {run_dir}: read-only file system; choose another --out_dir")
    return None


def resolve_resume(resume: Resume, run_dir: Path, force: bool = False) -> Path | None:
    """The checkpoint a run starts from, or None for a fresh run, which must not overwrite an earlier run's
    outputs (checkpoints, final/, metrics.jsonl) nor write into a directory of other files: unless `force`."""
    if resume.mode == "auto" and (last := latest_checkpoint(run_dir)) is not None:
        return last
    if resume.mode in ("fresh", "auto") and not force:
        ours, other = earlier_outputs(run_dir)
        shown = ", ".join((ours or other)[:4]) + (" ..." if len(ours or other) > 4 else "")
        if list_checkpoints(run_dir):
            raise UserError(
                f"{run_dir} already has checkpoints ({shown}); continue it with --resume auto, "
                "or choose another --name (or pass --force to start over, replacing them)"
            )
        if ours:
            none = " and no checkpoint to resume from" if resume.mode == "auto" else ""
            raise UserError(
                f"{run_dir} holds an earlier run ({shown}){none}; choose another --name, "
                "or pass --force to start over, replacing it"
            )
        if other:
            raise UserError(
                f"{run_dir} is not a training run's directory (it holds {shown}); choose another --name, "
                "or pass --force to write the run there anyway"
            )
    if resume.mode in ("fresh", "auto"):
        return None
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

    def __init__(
        self,
        run_dir: Path,
        resume: Resume,
        d: D.Dist,
        keep: int = 3,
        base: str | None = None,
        force: bool = False,
    ):
        self.run_dir, self.d, self.keep, self.base = Path(run_dir), d, keep, base
        self.resume, self.force = resume, force
        check_writable(self.run_dir)
        self.resume_from = resolve_resume(resume, self.run_dir, force)
        # the newest complete checkpoint (what a diverged run names, what the end of a run compares with)
        self.last = latest_checkpoint(self.run_dir) if self.resume_from is not None else None
        # --resume auto (or a run directory) may fall back past a damaged latest checkpoint to older ones
        run = self.run_dir if resume.mode == "auto" else resume.path
        self.can_fall_back = run is not None and (Path(run) / "checkpoints").is_dir()
        older = list_checkpoints(run) if self.can_fall_back else []
        self.fallbacks = [p for p in reversed(older) if p != self.resume_from]
        self.damaged: list[Path] = []  # set aside (renamed *.damaged) at the next save
        self._base_fp: str | None = None
        D.barrier(d)  # every rank has checked the run directory before any writes into it

    # ------------------------------------------------------------------ load
    def load(self, model, optimizer, data, *, seed: int, say=print) -> dict | None:
        """Restore the checkpoint into the trainer's objects and return its trainer state (step, tokens,
        train_time, ...); on a fresh run, seed each rank's random streams and return None.

        Call it last before the first step: nothing in between may draw from the random streams."""
        d = self.d
        if self.resume_from is None:
            if self.resume.mode == "auto":
                say(f"--resume auto: no checkpoint in {self.run_dir / 'checkpoints'}; starting a fresh run")
            if self.force and d.main:
                clear_outputs(self.run_dir)  # --force: the earlier run's outputs go, now that setup worked
            D.barrier(d)
            seed_all(seed + d.rank)  # one stream per rank (rank 0's is a single process's)
            return None
        bare = D.unwrap(model)
        path, (state, optim_state, (rng_js, rng_tensors), tensors) = self._read_usable(bare, say)
        self._check_base(bare, state, path)
        D.load_model_state(bare, tensors, d)
        D.load_optimizer_state(model, optimizer, optim_state, d)
        data.train.load_state_dict(state["loader"])
        say(f"resumed from {path} at step {state['step']} ({human_count(state['tokens'])} tokens)")
        warn = restore_rng(rng_js, rng_tensors, d, seed, state["step"])
        if warn:
            say(f"note: {warn}")
        return state

    def _read_usable(self, bare, say) -> tuple[Path, tuple]:
        """(path, everything read) of the newest checkpoint that reads whole: resume_from, else (--resume
        auto) the older ones in turn, each skipped with a warning naming its damage."""
        tried = []
        for path in [self.resume_from, *self.fallbacks]:
            try:
                state, optim, (rng_js, rng_tensors) = read_checkpoint(path)
                if rng_js.get("world", 1) == self.d.world and f"torch_cpu/{self.d.rank}" not in rng_tensors:
                    raise DamagedCheckpoint(f"{path / RNG}: no generator state of rank {self.d.rank}")
                tensors = self._model_tensors(bare, path)
            except DamagedCheckpoint as e:
                if not self.can_fall_back:  # a checkpoint the user named: no other to try
                    raise UserError(f"--resume {path}: damaged checkpoint: {e}") from None
                tried.append(str(e))
                self.damaged.append(path)
                nxt = self.fallbacks[len(tried) - 1] if len(tried) <= len(self.fallbacks) else None
                if nxt is not None:
                    say(f"warning: damaged checkpoint {e}; falling back to the previous one, {nxt}")
                continue
            if tried:
                self.last = path  # the damaged newer ones are set aside at the next save
            return path, (state, optim, (rng_js, rng_tensors), tensors)
        raise UserError(
            f"no usable checkpoint in {self.resume_from.parent}: {'; '.join(tried)}; "
            "delete the damaged checkpoints to start over, or choose another --name"
        )

    def _model_tensors(self, bare, path: Path) -> dict[str, torch.Tensor]:
        """The checkpoint's trainable tensors under the bare model's names: the adapter's factors for a
        LoRA run, else every weight (checked against the model's shape first). Files that do not read
        are a DamagedCheckpoint; a model of another shape is the user's error."""
        if getattr(bare, "lora_config", None) is None:
            try:
                saved = read_config(path)
            except UserError as e:
                raise DamagedCheckpoint(str(e)) from None
            _check_same_shape(saved, bare.config, path)
            try:
                return load_model(path, device="cpu", dtype=torch.float32).state_dict()
            except (UserError, SafetensorError, OSError) as e:
                raise DamagedCheckpoint(_one_line(e)) from None
        from lmforge.train.peft_format import read_adapter

        try:
            adapter = read_adapter(path, bare.config)
        except (UserError, SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
            raise DamagedCheckpoint(f"{path}: adapter unreadable ({_one_line(e)})") from None
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
        if (fp := self._base_fingerprint(D.unwrap(model))) is not None:
            state["base"] = {"path": str(self.base), "fingerprint": fp}
        if d.main:
            self._set_aside_damaged()
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

    def _set_aside_damaged(self) -> None:
        """Rename the damaged checkpoints this run fell back past to step_N.damaged: kept for a look, but
        no longer what --resume auto picks or what --ckpt.keep counts (it would keep them over good ones)."""
        for p in self.damaged:
            if p.is_dir():
                to, n = p.with_name(f"{p.name}.damaged"), 1
                while to.exists():  # damaged twice (a run that fell back, then was damaged again)
                    to, n = p.with_name(f"{p.name}.damaged{n}"), n + 1
                os.replace(p, to)
        self.damaged = []

    # ------------------------------------------------------------------ LoRA base
    def _base_fingerprint(self, bare) -> str | None:
        """A LoRA run's base model fingerprint (computed once); None for other runs."""
        if getattr(bare, "lora_config", None) is None or not self.base:
            return None
        if self._base_fp is None:
            self._base_fp = fingerprint(self.base)
        return self._base_fp

    def _check_base(self, bare, state: dict, path: Path) -> None:
        """Refuse to continue a LoRA adapter on a base model other than the one it was trained on."""
        saved = state.get("base")
        now = self._base_fingerprint(bare)
        if not saved or now is None or saved.get("fingerprint") == now:
            return  # (checkpoints from before fingerprints were recorded are trusted)
        raise UserError(
            f"{path}: this LoRA adapter was trained on the base model {saved.get('path')} "
            f"(fingerprint {str(saved.get('fingerprint'))[:12]}), but {self.base} is now a different model "
            f"(fingerprint {now[:12]}); resume with the original base, or start a new run with another --name"
        )

    def save_final(self, model, tokenizer, path: Path) -> Path:
        """The trained model as a loadable directory (HF model, or PEFT adapter): collective too."""
        full = D.full_model_state(model, self.d)
        if self.d.main:
            with atomic_dir(path) as tmp:
                self._write_weights(tmp, full, D.unwrap(model), tokenizer)
        D.barrier(self.d)
        return path


# ---------------------------------------------------------------------------------------------- fingerprint
_WHOLE = 32 << 20  # files up to this size are hashed whole; larger ones by header + evenly spread samples
_SAMPLES, _SAMPLE = 256, 64 << 10


def fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of a model directory's config.json and weight files: each file's name and size, a
    safetensors file's header (every tensor's name, dtype, shape and offsets), and its content (whole up
    to 32 MiB, else 256 samples of 64 KiB: 16 MiB read). Size and mtime alone would miss a base retrained
    in place (same shapes, same size) and flag a mere copy; this reads a bounded amount of any model."""
    d = Path(model_dir)
    h = hashlib.sha256()
    names = sorted(
        p.name for p in d.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    for name in names:
        f = d / name
        size = f.stat().st_size
        h.update(f"{name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE:
                h.update(fh.read())
                continue
            if f.suffix == ".safetensors":  # the header: 8 bytes of length, then JSON
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, size - 8)))
            for i in range(_SAMPLES):
                fh.seek((size - _SAMPLE) * i // (_SAMPLES - 1))
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global random streams."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
