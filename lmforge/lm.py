"""`lmforge.load(path)`: a model, its tokenizer and its config behind one small object.

lm = lmforge.load("runs/quickstart/final")
logits = lm([[1, 2, 3]])            # (B, T, V) float tensor
text = lm.generate("def add(a, b):", max_new_tokens=32)
lm.save("copy")

This is where paths become objects: everything else (infer, evaluate, ...) takes (model, tokenizer).
A loaded model remembers its directory as `model.name_or_path` (as transformers' models do), which
reports use to name it and to measure its size on disk.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge import kernels as _kernels
from lmforge.checkpoint import load_model, save_model
from lmforge.infer.generate import generate as _generate
from lmforge.infer.generate import stream as _stream
from lmforge.tokenizer import Tokenizer
from lmforge.train.lora import _base_of, is_adapter, load_lora_model
from lmforge.utils import UserError, resolve_device, resolve_dtype


class LM:
    def __init__(self, model, tokenizer=None, path: str | os.PathLike | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_emb.weight.dtype

    @torch.no_grad()
    def __call__(self, ids, attention_mask=None) -> torch.Tensor:
        """Token ids (list, list of lists, or a (B, T) tensor) -> logits (B, T, V)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        return self.model(ids, attention_mask=attention_mask)

    def save(self, directory: str | os.PathLike) -> Path:
        return save_model(self.model, directory, tokenizer=self.tokenizer)

    def generate(self, prompt, **kwargs):
        """Generate from a prompt (text or ids); see lmforge.infer.generate for the options."""
        return _generate(self.model, self.tokenizer, prompt, **kwargs)

    def stream(self, prompt, **kwargs):
        """Yield text as it is generated; see lmforge.infer.stream."""
        return _stream(self.model, self.tokenizer, prompt, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return f"LM({c.family}, {self.model.num_params():,} params, {self.dtype}, {self.device}, path={self.path})"


def load(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    base: str | os.PathLike | None = None,
    merge: bool = True,
    kernels: bool = True,
) -> LM:
    """Load an lmforge or Hugging Face model directory (and its tokenizer, when it has one).

    A LoRA adapter directory (lmforge's or peft's: adapter_config.json) loads its base model (`base`,
    else the one the adapter names) with the adapter merged in, or kept as LoRA layers with merge=False;
    the tokenizer is the adapter's when it has one, else the base's. kernels: install the fastest
    inference kernels this machine has (lmforge.kernels.install; kernels=False keeps the plain modules,
    for training or export).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev) if dtype is not None else (torch.float32 if dev.type == "cpu" else None)
    tok_dirs = [Path(path)]
    if is_adapter(path):
        base = _base_of(path, base)
        model = load_lora_model(path, base=base, device=dev, dtype=dt, merge=merge).eval()
        tok_dirs.append(Path(base))
    else:
        model = load_model(path, device=dev, dtype=dt).eval()
    model.name_or_path = str(path)
    if kernels:
        _kernels.install(model)
    tokenizer = None
    for d in tok_dirs:
        if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():  # SentencePiece: converted
            tokenizer = Tokenizer.load(d)
            break
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:  # else an IndexError later
        raise UserError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} token ids but the model only "
            f"{model.config.vocab_size} token embeddings; pair the model with the tokenizer it was trained with"
        )
    return LM(model, tokenizer, path)


def load_each(paths, **load_kw) -> Iterator[tuple]:
    """(model, tokenizer) of each path in turn, loaded with `load(path, **load_kw)`; the previous
    model is released before the next loads, so only one is in memory at a time."""
    for p in paths:
        lm = load(p, **load_kw)
        pair = (lm.model, lm.tokenizer)
        del lm
        yield pair
        del pair
        gc.collect()
