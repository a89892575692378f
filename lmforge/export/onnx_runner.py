"""Greedy generation with onnxruntime over an `lmforge export --format onnx` directory.

    from lmforge.export.onnx_runner import generate
    new_ids = generate("runs/quickstart/final-onnx", [1, 42, 7], max_new_tokens=16)

With `model_with_past.onnx` (exported with --with-cache) the prompt is run once and every further
token is one step over the cached keys and values; otherwise each token recomputes the whole prefix
with `model.onnx`. Needs only numpy and onnxruntime (no torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmforge.utils import UserError

MANIFEST = "lmforge_onnx.json"


class OnnxLM:
    """The exported graphs of one directory, loaded once; `generate` runs them greedily."""

    def __init__(self, path: str | os.PathLike, use_cache: bool | None = None, providers=None):
        import onnxruntime as ort

        p = Path(path)
        if p.is_file():  # a .onnx file inside the directory
            p = p.parent
        f = p / MANIFEST
        if not f.is_file():
            raise UserError(
                f"{p}: not an lmforge ONNX export (no {MANIFEST}); run `lmforge export --format onnx`"
            )
        self.meta = json.loads(f.read_text())
        files = self.meta["files"]
        if use_cache and "with_past" not in files:
            raise UserError(f"{p}: exported without --with-cache; there is no model_with_past.onnx")
        self.use_cache = "with_past" in files if use_cache is None else use_cache
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        name = files["with_past"] if self.use_cache else files["model"]
        self.session = ort.InferenceSession(
            str(p / name), opts, providers=providers or ["CPUExecutionProvider"]
        )
        n = self.meta["n_layers"]
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]

    def generate(
        self, ids, max_new_tokens: int, stop_ids: list[int] | None = None
    ) -> list[int] | list[list[int]]:
        """Greedy continuation of `ids` (a list of ints, or a list of such lists: left-padded into one
        batch). Returns the new token ids (per row), ending early at a token in `stop_ids`."""
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        single = len(ids) == 0 or not isinstance(ids[0], list | tuple | np.ndarray)
        rows = [list(ids)] if single else [list(r) for r in ids]
        if any(len(r) == 0 for r in rows):
            raise UserError("generate: every prompt needs at least one token")
        ctx = self.meta["max_seq_len"]
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > ctx:
            raise UserError(
                f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {ctx}"
            )
        pad = self.meta.get("pad_token_id") or 0
        B = len(rows)
        tokens = np.array([[pad] * (longest - len(r)) + r for r in rows], dtype=np.int64)
        mask = np.array([[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
        stops = set(stop_ids or [])
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        step_ids, past = tokens, None
        if self.use_cache:
            kv, hd = self.meta["n_kv_heads"], self.meta["head_dim"]
            empty = np.zeros((B, kv, 0, hd), dtype=np.float32)
            past = dict.fromkeys(self.past_names, empty)
        orig = self.meta.get("longrope_original")
        for _ in range(max_new_tokens):
            P = tokens.shape[1] - step_ids.shape[1]
            if self.use_cache and orig and 0 < P <= orig < tokens.shape[1]:
                # LongRoPE (Phi-3), as transformers and lmforge generate: the step that takes the
                # sequence past the pretraining length recomputes it all with the long factors
                step_ids, past = tokens, dict.fromkeys(self.past_names, empty)
            if self.use_cache:
                res = self.session.run(
                    ["logits", *self.present_names],
                    {"input_ids": step_ids, "attention_mask": mask, **past},
                )
                past = dict(zip(self.past_names, res[1:]))
            else:
                res = self.session.run(["logits"], {"input_ids": tokens, "attention_mask": mask})
            nxt = res[0][:, -1].argmax(-1).astype(np.int64)  # (B,)
            nxt = np.where(done, pad, nxt)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
                    done[b] = int(nxt[b]) in stops
            if done.all():
                break
            step_ids = nxt[:, None]
            tokens = np.concatenate([tokens, step_ids], 1)
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], 1)
        return out[0] if single else out


def generate(
    path: str | os.PathLike,
    ids,
    max_new_tokens: int = 32,
    stop_ids: list[int] | None = None,
    use_cache: bool | None = None,
) -> list[int] | list[list[int]]:
    """Greedy generation with onnxruntime; see OnnxLM.generate. use_cache=None: the cache model
    when it was exported, else full recompute."""
    return OnnxLM(path, use_cache=use_cache).generate(ids, max_new_tokens, stop_ids)
