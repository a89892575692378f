"""Training: one loop for pretraining and fine-tuning (full, frozen embeddings, LoRA), on one process
or many (DDP, FSDP2), with exact resume, evaluation, logging and a time-budget planner.

    from lmforge.train import load_config, train
    summary = train(load_config("configs/tiny-cpu.yaml", {"train.max_steps": 200}))

Files: config.py (RunConfig, YAML/CLI, --resume), optim.py (AdamW groups, schedules), trainer.py
(train, the Trainer), state.py (trainer state: the Checkpointer), lora.py (adapters, merging),
distributed.py (torchrun, DDP/FSDP2), data.py (loaders), validate.py (loss, bits per byte, samples),
metrics.py (logs, plots, MFU), budget.py (--time-budget).
"""

import importlib

# Imported on first use, so that `lmforge --help` (which reads train.config) does not import torch.
_EXPORTS = {
    "RunConfig": "config",
    "load_config": "config",
    "train": "trainer",
    "Trainer": "trainer",
    "TrainingDiverged": "trainer",
    "apply_lora": "lora",
    "load_adapter": "lora",
    "load_lora_model": "lora",
    "merge_lora": "lora",
    "merge_lora_dir": "lora",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmforge.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.train' has no attribute {name!r}")
