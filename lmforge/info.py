"""What `lmforge info` prints: a checkpoint's description, or the families lmforge reads."""

from __future__ import annotations

import json

from lmforge.checkpoint import describe
from lmforge.config import FAMILIES, HF_MODEL_TYPE, switches


def print_info(checkpoint: str | None = None, *, as_json: bool = False) -> dict:
    """Print what a checkpoint is (family, parameters, size, dtype, context, config), or without one
    every family with its Hugging Face model_type and the switches it turns on; return it.

    Args:
        checkpoint: an lmforge or Hugging Face model directory (omit it to list the families)
        as_json: print the description as JSON
    """
    if checkpoint is None:
        rows = {f: {"model_type": HF_MODEL_TYPE[f], "switches": switches(f)} for f in FAMILIES}
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            for f, r in rows.items():
                print(f"{f:>8} [{r['model_type']}]: {r['switches']}")
        return rows
    d = describe(checkpoint)
    if as_json:
        print(json.dumps(d, indent=2))
        return d
    for k, v in d.items():
        if k != "config":
            print(f"{k:>22}: {v}")
    print("config:")
    for k, v in d["config"].items():
        print(f"{k:>22}: {v}")
    return d
