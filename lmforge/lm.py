"""`lmforge.load(path)`: a model, its tokenizer and its config behind one small object.

lm = lmforge.load("runs/quickstart/final")
logits = lm([[1, 2, 3]])            # (B, T, V) float tensor
text = lm.generate("def add(a, b):", max_new_tokens=32)
lm.save("copy")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.utils import resolve_device, resolve_dtype


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
        from lmforge.infer import generate

        return generate(self, prompt, **kwargs)

    def stream(self, prompt, **kwargs):
        """Yield text as it is generated; see lmforge.infer.stream."""
        from lmforge.infer import stream

        return stream(self, prompt, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return f"LM({c.family}, {self.model.num_params():,} params, {self.dtype}, {self.device}, path={self.path})"


def load(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    base: str | os.PathLike | None = None,
    merge: bool = True,
) -> LM:
    """Load an lmforge or Hugging Face model directory (and its tokenizer, when it has one).

    A LoRA adapter directory (lmforge's or peft's: adapter_config.json) loads its base model (`base`,
    else the one the adapter names) with the adapter merged in, or kept as LoRA layers with merge=False;
    the tokenizer is the adapter's when it has one, else the base's.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev) if dtype is not None else (torch.float32 if dev.type == "cpu" else None)
    tok_dirs = [Path(path)]
    from lmforge.train.lora import _base_of, is_adapter, load_lora_model

    if is_adapter(path):
        base = _base_of(path, base)
        model = load_lora_model(path, base=base, device=dev, dtype=dt, merge=merge).eval()
        tok_dirs.append(Path(base))
    else:
        model = load_model(path, device=dev, dtype=dt).eval()
    tokenizer = None
    for d in tok_dirs:
        if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():  # SentencePiece: converted
            from lmforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(d)
            break
    return LM(model, tokenizer, path)
