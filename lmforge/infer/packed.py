"""Faster CPU decode matmuls: Linear weights laid out for multiplying a few rows at a time.

A decode step multiplies a handful of rows (the batch) by every weight matrix, so its speed is how
fast the weights stream from memory. PyTorch's default CPU path for `F.linear(x, w)` with so few rows
stays well below the machine's bandwidth (bench/decode.py measures both), while
- fp32: the same weight stored transposed in memory, i.e. (in, out) contiguous, turns the product
  into `x @ w_t` with a row-major right-hand side, which MKL streams much faster. `prepare` swaps the
  storage in place: the same Parameter objects with the same values (tied weights stay tied), no
  extra memory, and every other use (prefill, training, saving) works unchanged;
- bf16: the weight reordered once into oneDNN's blocked layout (what torch.compile's CPU "freezing"
  does, without its minutes of compilation) is much faster than the plain bf16 path. `prepare` gives
  each nn.Linear such a copy (one extra copy of the Linear weights) and routes calls with at most
  `max_rows` input rows and no autograd to it; the copy is rebuilt when the weight changes in place.

`restore(model)` undoes both. On other devices and dtypes `prepare` does nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"]


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if x.numel() > self._lmf_max_rows * x.shape[-1] or torch.is_grad_enabled() or x.dtype != w.dtype:
        return F.linear(x, w, self.bias)
    if self._lmf_version != (w._version, w.data_ptr()):  # first call, or the weight was updated in place
        self._lmf_packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self._lmf_max_rows)
        self._lmf_version = (w._version, w.data_ptr())
    return torch.ops.mkldnn._linear_pointwise(x, self._lmf_packed, self.bias, "none", [], "")


def prepare(model: nn.Module, max_rows: int = 64) -> str:
    """Lay out the model's CPU Linear weights for fast decoding; returns what was done ("" if nothing)."""
    done = ""
    for m in _linears(model):
        w = m.weight
        if w.dtype == torch.float32 and w.is_contiguous() and w.dim() == 2:
            w.data = w.data.t().contiguous().t()  # same (out, in) tensor, stored (in, out)
            done = "fp32 weights stored transposed"
        elif w.dtype == torch.bfloat16 and _mkldnn_bf16():
            if "forward" in m.__dict__:  # prepared before (another engine): serve the larger batch too
                m._lmf_max_rows = max(m._lmf_max_rows, max_rows)
            else:
                m._lmf_max_rows, m._lmf_version, m._lmf_packed = max_rows, None, None
                m.forward = _packed_forward.__get__(m)
            done = "bf16 weights packed for oneDNN"
        elif w.dtype == torch.float32 and not w.is_contiguous():
            done = "fp32 weights stored transposed"
    return done


def restore(model: nn.Module) -> None:
    """Undo `prepare`: row-major weights, plain nn.Linear calls, packed copies freed."""
    for m in _linears(model):
        if not m.weight.is_contiguous():
            m.weight.data = m.weight.data.contiguous()
        if "forward" in m.__dict__:
            del m.forward
        for a in ("_lmf_max_rows", "_lmf_version", "_lmf_packed"):
            m.__dict__.pop(a, None)
