"""ONNX export: the full forward pass, and optionally a decoder step with a KV cache.

`export_onnx(ckpt, out)` writes a directory:

    model.onnx             input_ids (B, T) int64, attention_mask (B, T) int64 -> logits (B, T, V) fp32
    model_with_past.onnx   (with_cache=True) input_ids (B, T), attention_mask (B, P + T),
                           past_key_values.{i}.key / .value (B, KV, P, hd)
                           -> logits (B, T, V), present.{i}.key / .value (B, KV, P + T, hd)
    lmforge_onnx.json      what the runner needs: file names, shapes, special ids, the check results
    config.json, tokenizer files (copied, so the directory stands alone)

The cache tensors are named as optimum / onnxruntime-genai name them. The cache model grows its past
by concatenation (no static buffer), so one graph serves the prefill (P = 0) and every decode step;
positions come from the attention mask (left padding works), and sliding windows are applied by the
mask, not by dropping keys. Mixtral's experts run densely in ONNX (every expert on every token,
weighted by the router's renormalised top-k, zero elsewhere): same numbers, E/k times the MLP FLOPs,
because the eager dispatch loops over data-dependent token counts that a static graph cannot hold.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). The TorchScript exporter
cannot export `aten::rms_norm` at any opset torch offers for it, so it is not used (docs/export.md).
Everything is written to a temporary directory, loaded in onnxruntime and compared with PyTorch
before it replaces `out`: a failed export or check leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lmforge import kernels
from lmforge.export.targets import check_out_path
from lmforge.kernels.decode import DecodeAttention, DecodeLinear
from lmforge.utils import UserError, atomic_dir

MANIFEST = "lmforge_onnx.json"
MIN_OPSET = 17
DEFAULT_OPSET = 18
# onnx protobufs are limited to 2 GiB; above this the weights go to an external `.data` file.
_INLINE_LIMIT = 1 << 30
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------- graphs
def _dense_moe_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward without data-dependent shapes: every expert on every token, weighted by the
    renormalised top-k router probabilities (0 for experts a token is not routed to)."""
    B, T, d = x.shape
    xf = x.reshape(-1, d)  # (N, d)
    probs = self.router(xf).softmax(dim=-1, dtype=torch.float32)  # (N, E)
    weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
    dense = torch.zeros_like(probs, dtype=x.dtype).scatter(1, experts, weights)  # (N, E)
    h = torch.einsum("nd,efd->nef", xf, self.w_in)  # (N, E, 2 ff)
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("nef,edf->ned", self.act(gate) * up, self.w_out)  # (N, E, d)
    return (y * dense[..., None]).sum(1).view(B, T, d)


@contextlib.contextmanager
def traceable(model: nn.Module):
    """Swap the parts of `model` a static graph cannot hold for equivalent ones (MoE: dense experts;
    plain modules for lmforge's CPU decode kernels, installed by lmforge.load), in eval mode; the
    model is restored afterwards (kernels reinstalled)."""
    from lmforge.model import MoE

    swapped = [m for m in model.modules() if isinstance(m, MoE)]
    had_kernels = any(isinstance(m, (DecodeLinear, DecodeAttention)) for m in model.modules())
    kernels.uninstall(model)
    training = model.training
    model.eval()  # no dropout in the graph
    for m in swapped:
        m.forward = types.MethodType(_dense_moe_forward, m)
    try:
        yield model
    finally:
        for m in swapped:
            del m.forward
        if had_kernels:
            kernels.install(model)
        model.train(training)


class _ConcatCache:
    """Stands in for cache.KVCache inside Transformer.forward: past K/V come in as tensors, the
    new ones are appended by concatenation and collected as `present`.

    attention_mask (B, P + T) covers past and new tokens; positions are counts of real tokens."""

    def __init__(self, cfg, past: list[torch.Tensor], attention_mask: torch.Tensor):
        self.cfg, self.past, self.present = cfg, past, []
        self.valid = attention_mask.bool()

    def prepare(self, T: int, valid=None):
        v = self.valid  # (B, S) with S = P + T; the model passes the same mask, ignore it
        S = v.shape[1]
        count = v.long().cumsum(1) - 1  # (B, S) position of each real key
        k_pos = count.masked_fill(~v, -1)
        q_pos = count[:, S - T :].clamp(min=0)  # (B, T)
        self._pos = q_pos, k_pos
        return q_pos, self.window_mask(self.cfg.cache_window), False

    def window_mask(self, window):
        """The mask (B, 1, T, P + T) for layers attending over `window` tokens (None: all)."""
        q_pos, k_pos = self._pos
        S, T = k_pos.shape[1], q_pos.shape[1]
        qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
        mask = (kp >= 0) & (kp <= qp)
        if window is not None:
            mask = mask & ((qp - kp) < window)
        # A query always sees itself, so that a padding query never has an all-masked row (NaN).
        ar = torch.arange(S, device=k_pos.device)
        eye = ar[None, :] == (ar[S - T :])[:, None]  # (T, S)
        return mask | eye

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k = torch.cat([self.past[2 * layer], k], dim=2)  # (B, KV, P + T, hd)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class FullForward(nn.Module):
    """input_ids (B, T), attention_mask (B, T) -> logits (B, T, V)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask=attention_mask)


class DecoderWithPast(nn.Module):
    """input_ids (B, T), attention_mask (B, P + T), past (2 L tensors (B, KV, P, hd): k0, v0, k1, ...)
    -> logits (B, T, V), present (2 L tensors (B, KV, P + T, hd))."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, past):
        cache = _ConcatCache(self.model.config, list(past), attention_mask)
        logits = self.model(input_ids, attention_mask=attention_mask, cache=cache)
        return (logits, *cache.present)


def _longrope_original(cfg) -> int | None:
    """The pretraining length of a LongRoPE (Phi-3) model, past which it switches RoPE factors."""
    sc = cfg.rope_scaling or {}
    return sc.get("original_max_position_embeddings") if sc.get("rope_type") == "longrope" else None


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the cache model."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and notices about torchvision; keep the output to our own."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    with open(os.devnull, "w") as null, warnings.catch_warnings(), contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(level)


def _export(module, args, f: Path, input_names, output_names, dynamic_shapes, opset, external):
    with _quiet():
        torch.onnx.export(
            module,
            args,
            str(f),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=external,
            verbose=False,
        )


def _name_input_dim(path: Path, name: str, axis: int, new: str) -> None:
    """Rename the symbolic size of input `name` along `axis` to `new`, throughout the graph."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    old = next(i for i in m.graph.input if i.name == name).type.tensor_type.shape.dim[axis].dim_param
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = new
    onnx.save(m, str(path))


def _example(cfg, B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        mask[1, : T // 3] = 0  # row 1 left-padded
    return ids, mask


# ---------------------------------------------------------------------------------------------- check
def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _max_err(got, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |got - ref| over real (unpadded) positions, relative to max(1, max |ref|)."""
    diff = (torch.from_numpy(got) - ref).abs().amax(-1)  # (B, T)
    diff = diff.masked_fill(mask == 0, 0)
    return float(diff.max()) / max(1.0, float(ref.abs().max()))


@torch.no_grad()
def check_onnx(directory: str | os.PathLike, model, atol: float = 1e-4) -> dict[str, float]:
    """Run the exported graphs in onnxruntime on random inputs (batch 2, row 1 left-padded; prompt
    then one decode step for the cache model) and compare logits with PyTorch. Returns the errors
    (relative to the largest logit); raises UserError above `atol`."""
    d = Path(directory)
    cfg = model.config
    T = min(9, cfg.max_seq_len - 1)
    ids, mask = _example(cfg, 2, T, seed=1)
    training = model.training
    ref = model.eval()(ids, attention_mask=mask)  # the eager model (MoE dispatch as trained)
    model.train(training)
    errors = {}
    out = _session(d / "model.onnx").run(
        ["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    errors["model.onnx"] = _max_err(out[0], ref, mask)
    if (d / "model_with_past.onnx").exists():
        sess = _session(d / "model_with_past.onnx")
        ins, outs = io_names(cfg.n_layers)
        empty = torch.zeros(2, cfg.n_kv_heads, 0, cfg.head_dim).numpy()
        feed = {"input_ids": ids[:, :-1].numpy(), "attention_mask": mask[:, :-1].numpy()}
        feed |= {n: empty for n in ins[2:]}
        first_ref, step_ref = ref[:, :-1], ref[:, -1:]
        if _longrope_original(cfg) is not None:
            # LongRoPE picks its factors from the longest position of each call, so the prompt alone
            # and the last step (whose cached keys keep the prompt's factors; the runner recomputes the
            # sequence once it passes the pretraining length) are compared with PyTorch's same calls
            dwp = DecoderWithPast(model.eval())
            first_ref, *present = dwp(
                ids[:, :-1], mask[:, :-1], [torch.from_numpy(empty)] * (2 * cfg.n_layers)
            )
            step_ref = dwp(ids[:, -1:], mask, present)[0]
            model.train(training)
        res = sess.run(outs, feed)
        err = _max_err(res[0], first_ref, mask[:, :-1])
        feed = {"input_ids": ids[:, -1:].numpy(), "attention_mask": mask.numpy()}
        feed |= dict(zip(ins[2:], res[1:]))
        res = sess.run(outs, feed)
        errors["model_with_past.onnx"] = max(err, _max_err(res[0], step_ref, mask[:, -1:]))
    bad = {k: v for k, v in errors.items() if not v <= atol}
    if bad:
        raise UserError(
            "ONNX check failed: onnxruntime and PyTorch logits differ by "
            + ", ".join(f"{k}: {v:.2e}" for k, v in bad.items())
            + f" (relative to the largest logit; tolerance {atol:g}); nothing was written"
        )
    return errors


# ---------------------------------------------------------------------------------------------- export
def _load(checkpoint):
    """(fp32 CPU model, checkpoint directory or None) from a path, an LM or a Transformer."""
    from lmforge.checkpoint import load_model

    if hasattr(checkpoint, "model"):  # an LM
        model = checkpoint.model
        src = Path(checkpoint.path) if getattr(checkpoint, "path", None) else None
    elif isinstance(checkpoint, nn.Module):
        model, src = checkpoint, None
    else:
        src = Path(checkpoint)
        model = load_model(src, device="cpu", dtype=torch.float32)
    if model.tok_emb.weight.dtype != torch.float32 or model.tok_emb.weight.device.type != "cpu":
        model = _fp32_copy(model)
    return model, src


def _fp32_copy(model):
    import copy

    m = copy.deepcopy(model).to("cpu", torch.float32)
    m._init_rope()  # RoPE tables in fp32 from the config, as a fresh load would have them
    return m


def _write_graphs(model, d: Path, with_cache: bool, opset: int) -> dict[str, str]:
    """Export model.onnx (and model_with_past.onnx) into `d`; returns {role: file name}."""
    cfg = model.config
    external = sum(p.numel() * 4 for p in model.parameters()) > _INLINE_LIMIT
    B, T = torch.export.Dim("batch"), torch.export.Dim("sequence", max=cfg.max_seq_len)
    ids, mask = _example(cfg, 2, min(8, cfg.max_seq_len))
    _export(
        FullForward(model),
        (ids, mask),
        d / "model.onnx",
        ["input_ids", "attention_mask"],
        ["logits"],
        {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: T}},
        opset,
        external,
    )
    if not with_cache:
        return {"model": "model.onnx"}
    ins, outs = io_names(cfg.n_layers)
    P = min(5, cfg.max_seq_len - 3)
    ids, mask = _example(cfg, 2, P + 2)
    past = tuple(torch.randn(2, cfg.n_kv_heads, P, cfg.head_dim) for _ in range(2 * cfg.n_layers))
    # The mask's length is past + sequence, which torch.export cannot state as a Dim of two Dims:
    # leave it free and name it afterwards.
    past_len = torch.export.Dim("past_sequence", max=cfg.max_seq_len)
    _export(
        DecoderWithPast(model),
        (ids[:, P:], mask, past),
        d / "model_with_past.onnx",
        ins,
        outs,
        {
            "input_ids": {0: B, 1: T},
            "attention_mask": {0: B, 1: torch.export.Dim.DYNAMIC},
            "past": tuple({0: B, 2: past_len} for _ in past),
        },
        opset,
        external,
    )
    _name_input_dim(d / "model_with_past.onnx", "attention_mask", 1, "past_sequence + sequence")
    return {"model": "model.onnx", "with_past": "model_with_past.onnx"}


def export_onnx(
    checkpoint,
    out: str | os.PathLike,
    *,
    with_cache: bool = False,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export a checkpoint (directory, LM or Transformer) to an ONNX directory `out` (see the module
    docstring). fp32 only. Returns `out`. Raises UserError for bad input or a failed check."""
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: ONNX export needs opset {MIN_OPSET} or newer")
    out = Path(out)
    check_out_path(out, kind="directory")
    model, src = _load(checkpoint)
    cfg = model.config
    try:
        with atomic_dir(out) as tmp:
            with traceable(model):
                files = _write_graphs(model, tmp, with_cache, opset)
            errors = check_onnx(tmp, model, atol) if check else {}
            if src is not None:
                for name in _COPIED:
                    if (src / name).exists():
                        shutil.copy2(src / name, tmp / name)
            manifest = {
                "format": "lmforge-onnx",
                "version": 1,
                "opset": opset,
                "files": files,
                "family": cfg.family,
                "n_layers": cfg.n_layers,
                "n_kv_heads": cfg.n_kv_heads,
                "head_dim": cfg.head_dim,
                "vocab_size": cfg.vocab_size,
                "max_seq_len": cfg.max_seq_len,
                "sliding_window": cfg.sliding_window,
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_id,
                "pad_token_id": cfg.pad_token_id,
                "check": {"max_relative_logit_error": errors, "tolerance": atol} if check else None,
                "moe_dense": bool(cfg.n_experts),
                "longrope_original": _longrope_original(cfg),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"{out}: cannot write the ONNX export ({e.strerror or e})") from e
    return out
