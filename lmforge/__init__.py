"""lmforge: build language models end to end — tokenizer, data, training, inference, compression,
evaluation, export and serving — in one small PyTorch codebase."""

__version__ = "0.1.0"


def load(path, device: str = "auto", dtype=None):
    """Load a checkpoint directory; returns an LM (callable on ids; .generate, .tokenizer, .config, .save)."""
    from lmforge.lm import load as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["load", "__version__"]
