"""Compression: weight-only quantization (int8, int4), pruning (unstructured, 2:4, heads, FFN channels)
and knowledge distillation. Every result is a checkpoint directory that `lmforge.load` reads.

    from lmforge.compress import quantize, prune, distill
    quantize("runs/tiny/final", "runs/tiny-int8", method="int8")
    prune("runs/tiny/final", "runs/tiny-24", method="wanda", structure="2:4")
    distill(teacher="runs/tiny/final", student="debug", data="runs/data", overrides={"train.max_steps": 500})

Files: qlinear.py (quantized layers, kernels, file format), quantize.py (RTN, GPTQ), prune.py,
distill.py, calibrate.py (calibration data and per-layer input statistics), summary.py (the
before/after table every command prints).
"""

import importlib

_EXPORTS = {
    "quantize": "quantize",
    "quantize_model": "quantize",
    "prune": "prune",
    "prune_model": "prune",
    "distill": "distill",
    "distillation_loss": "distill",
    "compare_models": "summary",
    "QuantLinear": "qlinear",
    "QuantEmbedding": "qlinear",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmforge.compress.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.compress' has no attribute {name!r}")
