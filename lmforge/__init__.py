"""lmforge: build language models end to end — tokenizer, data, training, inference, compression,
evaluation, export and serving — in one small PyTorch codebase."""

__version__ = "0.1.0"


def load(path, device: str = "auto", dtype=None, base=None, merge: bool = True, kernels: bool = True):
    """Load a model directory; returns an LM (.model, .tokenizer, .config; callable on ids; .generate,
    .save). See lmforge.lm.load for the arguments."""
    # Imported here so that `import lmforge` (and `lmforge --help`) does not import torch.
    from lmforge.lm import load as _load

    return _load(path, device=device, dtype=dtype, base=base, merge=merge, kernels=kernels)


__all__ = ["load", "__version__"]
