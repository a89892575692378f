"""Training configuration: dataclasses that read the same from YAML recipes and from the command line.

    lmforge pretrain --config configs/tiny-cpu.yaml --train.lr 3e-4 --model.size tiny
    # is the same as a YAML file with   train: {lr: 3e-4}   model: {size: tiny}

Precedence: dataclass defaults < the run's saved config.yaml (when resuming) < --config YAML < options.
Every field's docstring is its --help text (read from the source with `ast`, as litgpt does), so the
help cannot drift from the code. `model:` takes family/size/init_from plus any ModelConfig field
(`--model.d_model 128`), which overrides the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lmforge.config import ModelConfig
from lmforge.options import add_field, coerce, field_docs, hints
from lmforge.utils import UserError


@dataclass
class ModelSection:
    """Which model to train. Any ModelConfig field (d_model, n_layers, dropout, ...) may be set here too."""

    family: str = "llama"
    """architecture family of a new model: gpt, gpt2, llama, mistral, mixtral or gemma"""
    size: str = "tiny"
    """preset size of a new model: debug, tiny, small, 125m, 350m, 1b (see lmforge.config.SIZES)"""
    init_from: str | None = None
    """start from this lmforge or Hugging Face checkpoint directory (fine-tuning); family/size are then ignored"""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields that override the preset (written flat under model: in YAML)"""


@dataclass
class DataSection:
    """What to train on."""

    path: str | None = None
    """pretraining: a token-shard directory from `lmforge data prepare`; fine-tuning: a chat/instruction .jsonl"""
    seq_len: int = 256
    """tokens per training sequence"""
    tokenizer: str | None = None
    """tokenizer directory (default: the one in the data directory, else the init_from checkpoint's)"""
    doc_aligned: bool = False
    """pretraining: start every sequence at a document boundary instead of packing documents back to back"""
    val_path: str | None = None
    """fine-tuning: a separate validation .jsonl (default: a held-out slice of data.path)"""


@dataclass
class TrainSection:
    """Optimisation."""

    batch_size: int = 16
    """sequences per forward pass on one process (the micro-batch)"""
    global_batch_tokens: int | None = None
    """tokens per optimizer step over all processes; gradient accumulation makes up the difference (default: one micro-batch per process)"""
    max_steps: int | None = None
    """optimizer steps to train for (give this or train.tokens)"""
    tokens: int | None = None
    """tokens to train on (e.g. 20M); converted to steps with the global batch"""
    lr: float = 1e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """the schedule decays to lr * min_lr_ratio"""
    schedule: str = "cosine"
    """learning-rate schedule after warmup: cosine, wsd (warmup-stable-decay) or constant"""
    warmup_steps: int = 100
    """linear warmup from 0 to lr over this many steps (capped at a tenth of the run)"""
    decay_fraction: float = 0.2
    """wsd: fraction of the steps spent in the final linear decay"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on norms, biases, embeddings or LoRA's B)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    eps: float = 1e-8
    """AdamW epsilon"""
    optimizer: str = "auto"
    """auto (muon for a new model sized by --time-budget, where it measured best; adamw otherwise), adamw, or muon: torch.optim.Muon (orthogonalised momentum) for the blocks' 2-D weight matrices and AdamW for the rest (embeddings, output head, norms, biases, LoRA's A and B); lr, weight decay and schedule carry over (match_rms_adamw). Not with --parallel fsdp"""
    muon_momentum: float = 0.95
    """muon: momentum of the Muon matrices (Nesterov)"""
    muon_lr_scale: float = 1.0
    """muon: the Muon matrices' learning rate as a multiple of train.lr (schedule included)"""
    embedding_lr_scale: float = 1.0
    """the token (and position) embeddings' learning rate as a multiple of train.lr (schedule included)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = no clipping)"""
    freeze_embeddings: bool = False
    """keep token/position embeddings (and a tied output layer) fixed"""
    skip_nonfinite: bool = False
    """skip an optimizer step whose loss or gradient is NaN/inf instead of stopping the run"""
    compile: bool | None = None
    """torch.compile the model: faster steps after a compile at the start (on a 2-core CPU ~30 s, then
    1.9x the tokens/s of the quickstart's model; on a CPU it needs a C++ compiler). Default: a
    --time-budget plan of COMPILE_MIN_SECONDS (2 minutes) or more compiles, other runs do not"""
    activation_checkpointing: bool = False
    """recompute each block's activations in the backward pass: less memory, ~30% more compute"""
    max_time: float | None = None
    """stop in time to finish (final evaluation, checkpoint, final/) within this many seconds of wall-clock time"""
    fit_time: bool = False
    """with max_time: re-estimate from the measured speed how many steps fit, and end the run there (while the schedule is at its peak lr: use wsd); --time-budget sets it"""
    keep_zeros: bool = False
    """keep weights that are exactly zero in the starting model at zero (recovery fine-tuning of a pruned model)"""


@dataclass
class EvalSection:
    """Validation during training."""

    every: int = 250
    """evaluate every this many steps (0 = only at the end)"""
    batches: int = 20
    """validation batches per evaluation (the same batches every time)"""
    samples: int = 2
    """continuations to sample and log at each evaluation (0 = none)"""
    prompts: list[str] = field(default_factory=list)
    """prompts for the samples (default: the first tokens of validation sequences)"""
    max_new_tokens: int = 48
    """tokens per sampled continuation"""
    temperature: float = 0.8
    """sampling temperature (0 = greedy)"""
    top_k: int = 50
    """sample among the top k tokens (0 = all)"""


@dataclass
class CheckpointSection:
    """When to write checkpoints (runs/<name>/checkpoints/step_NNNNNN/)."""

    every: int = 1000
    """write a checkpoint every this many steps (0 = only at the end and on SIGINT/SIGTERM)"""
    keep: int = 3
    """keep the last this many checkpoints"""


@dataclass
class LoRASection:
    """Low-rank adapters (fine-tuning with a frozen base model)."""

    rank: int = 0
    """LoRA rank (0 = no LoRA: train the weights themselves)"""
    alpha: float = 16.0
    """LoRA scaling: the update is B A * alpha / rank"""
    dropout: float = 0.0
    """dropout on the LoRA branch's input"""
    targets: list[str] = field(default_factory=lambda: ["wqkv", "wo"])
    """modules to adapt: any of wqkv, wo, w_in, w_out (fused names), or all"""


@dataclass
class LogSection:
    """Progress bar, metrics.jsonl, TensorBoard and plots."""

    every: int = 10
    """log train loss every this many steps"""
    progress: bool = True
    """show a progress bar"""
    tensorboard: bool = True
    """also write TensorBoard events (when the tensorboard package is installed)"""
    peak_flops: float | None = None
    """peak FLOP/s of one device for MFU (default: a table for known GPUs, a measured matmul peak on CPU)"""


@dataclass
class RunConfig:
    """Everything a training run needs; saved resolved as runs/<name>/config.yaml."""

    name: str | None = None
    """run name: the run lives in <out_dir>/<name>/ (default: <task>-<family>-<size>)"""
    out_dir: str = "runs"
    """parent directory of run directories"""
    task: str = "pretrain"
    """pretrain (next-token loss on every token) or sft (loss on assistant tokens only)"""
    seed: int = 1337
    """seed for weights, data order, dropout and sampling"""
    device: str = "auto"
    """cuda, mps, cpu or auto"""
    dtype: str = "auto"
    """compute precision: bf16 (autocast, fp32 master weights) or fp32; auto = bf16 where the hardware has it"""
    parallel: str = "auto"
    """under torchrun: ddp or fsdp (FSDP2 fully_shard); auto = ddp with several processes"""
    dist_timeout: float = 300.0
    """under torchrun: seconds a rank waits for the others; a rank without a heartbeat for this long is named and the job ends"""
    resume: str = "none"
    """none (or no, false: a fresh run), auto (continue from the run's latest checkpoint, if any) or a checkpoint directory"""
    force: bool = False
    """start a fresh run in a run directory that holds an earlier run, replacing its checkpoints, final/ and logs"""
    time_budget: str | None = None
    """e.g. 10m or 2h: measure throughput, then pick model size, tokens and batch to fit this time"""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    ckpt: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoRASection = field(default_factory=LoRASection)
    log: LogSection = field(default_factory=LogSection)

    # ------------------------------------------------------------------ dict / YAML
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {k: v for k, v in d["model"].items() if k != "overrides"} | d["model"]["overrides"]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _build(cls, d or {}, "")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name if self.name else Path(self.out_dir)


@dataclass(frozen=True)
class Resume:
    """--resume as one value, parsed once: a fresh run, the run's latest checkpoint, or a directory.

    Resume.parse("no") == Resume("fresh");  Resume.parse("runs/x/checkpoints/step_000100").path
    """

    mode: Literal["fresh", "auto", "path"]
    path: Path | None = None  # mode "path": a checkpoint directory, or a run directory (its latest)

    @classmethod
    def parse(cls, value) -> Resume:
        text = "" if value is None else str(value).strip()  # YAML reads `resume: no` as False
        if text.lower() in ("", "none", "null", "no", "false"):
            return cls("fresh")
        if text.lower() == "auto":
            return cls("auto")
        return cls("path", Path(text))


_SECTION_CLS = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "eval": EvalSection,
    "ckpt": CheckpointSection,
    "lora": LoRASection,
    "log": LogSection,
}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"family", "extra"}


# ---------------------------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: finite, within [lo, hi] (an end is open with lo_open/hi_open).

    Range(0, lo_open=True) is "> 0", Range(1) is ">= 1", Range(0, 1, hi_open=True) is "in [0, 1)"."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self, integer: bool) -> str:
        what = "a whole number" if integer else "a finite number"
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo}"
        return f"{what} {'<' if self.hi_open else '<='} {hi}" if self.hi is not None else what


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)
FRACTION, OPEN_FRACTION = Range(0, 1), Range(0, 1, hi_open=True)

# What each option may be, checked when a RunConfig is built (from YAML, the command line or a dict),
# so that a nonsense value fails in one line before any work instead of deep inside torch (lr -1), as a
# ZeroDivisionError (max_steps -5), or silently (tokens -10 trains one step, ckpt.every -1 saves every
# step). Options not listed take any value of their type; None (an optional one left unset) is fine.
RULES: dict[str, Range | tuple[str, ...]] = {
    "task": ("pretrain", "sft"),
    "parallel": ("auto", "none", "ddp", "fsdp"),
    "dist_timeout": POSITIVE,
    "data.seq_len": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.global_batch_tokens": AT_LEAST_1,
    "train.max_steps": AT_LEAST_1,
    "train.tokens": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.min_lr_ratio": FRACTION,
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.warmup_steps": NON_NEGATIVE,
    "train.decay_fraction": FRACTION,
    "train.weight_decay": NON_NEGATIVE,
    "train.beta1": OPEN_FRACTION,
    "train.beta2": OPEN_FRACTION,
    "train.eps": POSITIVE,
    "train.optimizer": ("auto", "adamw", "muon"),
    "train.muon_momentum": OPEN_FRACTION,
    "train.muon_lr_scale": POSITIVE,
    "train.embedding_lr_scale": POSITIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.max_time": POSITIVE,
    "eval.every": NON_NEGATIVE,
    "eval.batches": AT_LEAST_1,
    "eval.samples": NON_NEGATIVE,
    "eval.max_new_tokens": NON_NEGATIVE,
    "eval.temperature": NON_NEGATIVE,
    "eval.top_k": NON_NEGATIVE,
    "ckpt.every": NON_NEGATIVE,
    "ckpt.keep": AT_LEAST_1,  # 0 would delete every checkpoint, the one just written included
    "lora.rank": NON_NEGATIVE,
    "lora.alpha": POSITIVE,
    "lora.dropout": OPEN_FRACTION,
    "log.every": AT_LEAST_1,
    "log.peak_flops": POSITIVE,
}


def check_value(key: str, value) -> None:
    """Raise a one-line UserError when `value` is not what RULES allows for option `key`."""
    rule = RULES.get(key)
    if rule is None or value is None:
        return
    if isinstance(rule, tuple):
        if value not in rule:
            raise UserError(f"--{key} {value!r}: choose one of {', '.join(rule)}")
        return
    if isinstance(value, bool) or not rule.ok(float(value)):
        shown = _num(value) if isinstance(value, (int, float)) else repr(value)
        raise UserError(f"--{key} {shown}: out of range; expected {rule.describe(isinstance(value, int))}")


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    tps, kwargs = hints(cls), {}
    if cls is ModelSection:  # flat ModelConfig fields go to overrides
        d = dict(d)
        over = dict(d.pop("overrides", None) or {})
        for k in list(d):
            if k in _MODEL_FIELDS:
                over[k] = d.pop(k)
        mhints = hints(ModelConfig)
        kwargs["overrides"] = {k: coerce(v, mhints[k], f"model.{k}") for k, v in over.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        known = sorted(names - {"overrides"}) + (sorted(_MODEL_FIELDS) if cls is ModelSection else [])
        raise UserError(
            f"unknown option(s) {', '.join(prefix + u for u in unknown)} in {where}; "
            f"known: {', '.join(known)}"
        )
    for k, v in d.items():
        if k in _SECTION_CLS and cls is RunConfig:
            kwargs[k] = _build(_SECTION_CLS[k], v or {}, f"{k}.")
        elif k != "overrides":
            kwargs[k] = coerce(v, tps[k], prefix + k)
            check_value(prefix + k, kwargs[k])
    return cls(**kwargs)


def merge(base: dict, over: dict) -> dict:
    """Recursive dict update (sections merge, values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: a config file is a mapping of sections (model:, data:, train:, ...)")
    return d


def dotted_to_nested(flat: dict[str, object]) -> dict:
    """{"train.lr": "3e-4"} -> {"train": {"lr": "3e-4"}}."""
    out: dict = {}
    for key, v in flat.items():
        parts = key.split(".")
        cur = out
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    return out


def load_config(
    config: str | Path | None = None, overrides: dict | None = None, base: dict | None = None, **top
) -> RunConfig:
    """RunConfig from defaults < base < the YAML file < overrides ({"train.lr": 3e-4} or nested) < top-level kwargs."""
    d = dict(base or {})
    if config:
        d = merge(d, read_yaml(config))
    over = overrides or {}
    if any("." in k for k in over):
        over = dotted_to_nested(over)
    d = merge(d, over)
    d = merge(d, {k: v for k, v in top.items() if v is not None})
    return RunConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------- argparse
def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add --config and one --section.field option per field (help = the field's docstring).

    Options default to SUPPRESS so that only what the user typed overrides the YAML file.
    """
    parser.add_argument(
        "--config", metavar="YAML", help="a YAML recipe (see configs/); options below override it"
    )
    top = parser.add_argument_group("run")
    rdocs, rdefaults = field_docs(RunConfig), RunConfig()
    for f in dataclasses.fields(RunConfig):
        if f.name in _SECTION_CLS or f.name in skip:
            continue
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        add_field(
            top, flags, f.name, hints(RunConfig)[f.name], rdocs.get(f.name, ""), getattr(rdefaults, f.name)
        )
    for sec, cls in _SECTION_CLS.items():
        g = parser.add_argument_group(sec, cls.__doc__)
        docs, defaults = field_docs(cls), cls()
        for f in dataclasses.fields(cls):
            if f.name == "overrides":
                continue
            add_field(
                g,
                [f"--{sec}.{f.name}"],
                f"{sec}.{f.name}",
                hints(cls)[f.name],
                docs.get(f.name, ""),
                getattr(defaults, f.name),
            )
        if cls is ModelSection:
            mdocs = field_docs(ModelConfig)
            for f in dataclasses.fields(ModelConfig):
                if f.name in _MODEL_FIELDS:
                    add_field(
                        g,
                        [f"--model.{f.name}"],
                        f"model.{f.name}",
                        hints(ModelConfig)[f.name],
                        mdocs.get(f.name, "") + " (overrides the preset)",
                        None,
                        show_default=False,
                    )


def overrides_from_args(ns: argparse.Namespace) -> dict:
    """The --section.field options the user actually gave, as a flat {"section.field": value} dict."""
    names = {f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTION_CLS}
    return {k: v for k, v in vars(ns).items() if ("." in k and k.split(".")[0] in _SECTION_CLS) or k in names}


def default_name(cfg: RunConfig) -> str:
    if cfg.model.init_from:  # runs/tiny/final or runs/tiny/checkpoints/step_000100 -> the run's name
        p = Path(cfg.model.init_from).resolve()
        if p.name == "final":
            p = p.parent
        elif p.name.startswith("step_") and p.parent.name == "checkpoints":
            p = p.parent.parent
        return f"{cfg.task}-{p.name}"
    return f"{cfg.task}-{cfg.model.family}-{cfg.model.size}"


def config_for_run(config: str | Path | None, overrides: dict, task: str) -> RunConfig:
    """The command line's RunConfig. When resuming, the run's saved config.yaml is the base, so that
    `lmforge pretrain --name X --resume auto` continues run X without repeating its options."""
    cfg = load_config(config, overrides, task=task)
    cfg.name = cfg.name or default_name(cfg)
    saved = cfg.run_dir / "config.yaml"
    if Resume.parse(cfg.resume).mode != "fresh" and saved.is_file():
        base = read_yaml(saved)
        base.pop("resume", None)  # how the saved run started is not how this one does
        base.pop("force", None)
        cfg = load_config(config, overrides, base=base, task=task)
        cfg.name = cfg.name or default_name(cfg)
    return cfg
