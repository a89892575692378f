"""The `quantization_config` lmforge writes for its own int8/int4 format, and the options it checks.

Its own module so that compress/formats.py (read by checkpoint loading) and compress/quantize.py
(which writes checkpoints) both use it without importing each other.
"""

from __future__ import annotations

from lmforge.compress.qlinear import FORMAT, TARGETS
from lmforge.kernels.quant import GROUP_SIZES
from lmforge.utils import UserError

METHODS = {"int8": 8, "int4": 4}
PARTS = ("embeddings", "lm_head")  # what --keep-float may name
LMFORGE_ONLY = (
    "lmforge's own format (lmforge.load reads it); for transformers and vLLM quantize with "
    "--format gptq, awq or compressed-tensors"
)


def scheme(
    method: str,
    group_size: int | None = 64,
    keep_float: tuple[str, ...] = (),
    algorithm: str = "rtn",
    symmetric: bool = False,
) -> dict:
    """The `quantization_config` written to config.json. It has no `quant_method` on purpose: transformers
    skips (and then initialises at random) the layers of a quant_method it does not know, but stops with
    an error when there is none. symmetric: int4 on the grid w = (q - 8) * scale (zero 0), the one the
    GPTQ / AWQ / compressed-tensors formats hold exactly (formats.py)."""
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose int8 or int4")
    bad = sorted(set(keep_float) - set(PARTS))
    if bad:
        raise UserError(f"--keep-float {','.join(bad)}: parts that may stay in float are {', '.join(PARTS)}")
    bits = METHODS[method]
    if bits == 4 and group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    modules = list(TARGETS) + ([] if "lm_head" in keep_float else ["lm_head"])
    return {
        "method": method,
        "format": FORMAT,
        "note": LMFORGE_ONLY,
        "bits": bits,
        "group_size": group_size if bits == 4 else None,
        "symmetric": bits == 8 or symmetric,
        "zero_point": None if bits == 8 else "w = (q - 8) * scale + zero, q in 0..15",
        "modules": modules,
        "embedding": None if "embeddings" in keep_float else "int8",
        "algorithm": algorithm,
        "not_quantized": [],
    }
