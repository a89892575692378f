"""Shared fixture of the compression tests: a small model trained on the test corpus (train_data.py).

It is the teacher of the distillation test and the model the quantization and pruning tests compress,
so that quality changes are measured on weights that learned something. `debug_model` is the untrained
model of the unit tests.
"""

from __future__ import annotations

import pytest
from train_data import corpus, make_config, single_threaded  # noqa: F401

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


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):  # noqa: F811
    """final/ of a llama (d_model 128, 2 layers) trained for 150 steps: ~4.4 nats/token on validation."""
    from lmforge.train import train

    root = tmp_path_factory.mktemp("compress")
    with single_threaded():
        train(make_config(corpus, root, "teacher", **TEACHER))
    return root / "teacher" / "final"


def debug_model(family: str, seed: int = 0, **over):
    """A randomly initialised debug-size model of `family` in eval mode; `over` changes its config."""
    import torch

    from lmforge.config import preset
    from lmforge.model import build

    torch.manual_seed(seed)
    m = build(preset(family, "debug", **over))
    m.init_weights(seed)
    return m.eval()
