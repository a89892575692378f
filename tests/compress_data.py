"""Helpers of the compression tests: the recipe of the small trained model and the untrained one.

TEACHER trains the `trained` fixture (tests/conftest.py: a llama trained on the test corpus), the
teacher of the distillation test and the model the quantization and pruning tests compress, so that
quality changes are measured on weights that learned something. `debug_model` is the untrained model
of the unit tests.
"""

from __future__ import annotations

TEACHER = {
    "model.d_model": 128,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.d_ff": 384,
    "train.batch_size": 16,
    "train.max_steps": 150,
    "train.lr": 6e-3,
    "train.warmup_steps": 10,
    "ckpt.every": 0,
    "log.every": 50,
    "eval.every": 0,
    "eval.batches": 8,
}


def debug_model(family: str, seed: int = 0, **over):
    """A randomly initialised debug-size model of `family` in eval mode; `over` changes its config."""
    import torch

    from lmforge.config import preset
    from lmforge.model import build

    torch.manual_seed(seed)
    m = build(preset(family, "debug", **over))
    m.init_weights(seed)
    return m.eval()
