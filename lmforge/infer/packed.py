"""Faster CPU decode matmuls: Linear layers set up for multiplying a few rows at a time.

A decode step multiplies a handful of rows (the batch) by every weight matrix, so its speed is how
fast the weights stream from memory. PyTorch's default CPU path for `F.linear(x, w)` with so few rows
stays well below the machine's bandwidth (bench/decode.py measures both). `prepare(model)`:
- puts the weights in huge pages (hugepages.py), then
- with lmforge's own kernel (rows.py, built on first use): routes each fp32/bf16 nn.Linear call
  with few rows and no autograd to `linear_rows`, which streams the row-major weight as it is
  (no copy; every other use, prefill, training and saving, unchanged), and the attention of decode
  steps (a few queries, no autograd) to `decode_attention`, which reads only the visible cache slots;
- without it, PyTorch's faster layouts:
  - fp32: the same weight stored transposed in memory, i.e. (in, out) contiguous, turns the product
    into `x @ w_t` with a row-major right-hand side, which MKL streams much faster. `prepare` swaps
    the storage in place: the same Parameter objects with the same values (tied weights stay tied),
    no extra memory, and every other use works unchanged;
  - bf16: the weight reordered once into oneDNN's blocked layout (what torch.compile's CPU
    "freezing" does, without its minutes of compilation) is much faster than the plain bf16 path.
    Each nn.Linear gets such a copy (one extra copy of the Linear weights) and calls with at most
    `max_rows` input rows and no autograd go to it; the copy is rebuilt when the weight changes.

`restore(model)` undoes the routing and layouts (the weights stay in huge pages). On other devices
and dtypes `prepare` does nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.infer import hugepages, rows
from lmforge.model import Attention


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"]


def _decode_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    n = x.numel() // x.shape[-1]  # rows of x
    if torch.is_grad_enabled() or x.dtype != w.dtype:
        return F.linear(x, w, self.bias)
    if rows.LOADED and n <= rows.MAX_ROWS[w.dtype]:
        y = rows.linear_rows(x.reshape(n, x.shape[-1]), w, None, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    if w.dtype == torch.bfloat16 and n <= self._lmf_max_rows and _mkldnn_bf16():
        if self._lmf_version != (w._version, w.data_ptr()):  # first call, or the weight was updated
            self._lmf_packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self._lmf_max_rows)
            self._lmf_version = (w._version, w.data_ptr())
        return torch.ops.mkldnn._linear_pointwise(x, self._lmf_packed, self.bias, "none", [], "")
    return F.linear(x, w, self.bias)


def prepare(model: nn.Module, max_rows: int = 64) -> str:
    """Set the model's CPU Linear layers up for fast decoding; returns what was done ("" if nothing)."""
    done = []
    linears = [m for m in _linears(model) if m.weight.dtype in (torch.float32, torch.bfloat16)]
    cpu = any(p.device.type == "cpu" for p in model.parameters())
    kernel = cpu and rows.available()  # builds it: the layers (and qlinear's int8 ones) check rows.LOADED
    for m in linears:
        w = m.weight
        if kernel and not w.is_contiguous():  # stored transposed by an earlier prepare without the kernel
            w.data = w.data.contiguous()
        elif not kernel and w.dtype == torch.float32 and w.is_contiguous() and w.dim() == 2:
            w.data = w.data.t().contiguous().t()  # same (out, in) tensor, stored (in, out)
        if "forward" in m.__dict__:  # prepared before (another engine): serve the larger batch too
            m._lmf_max_rows = max(m._lmf_max_rows, max_rows)
        else:
            m._lmf_max_rows, m._lmf_version, m._lmf_packed = max_rows, None, None
            m.forward = _decode_forward.__get__(m)
    if linears:
        done.append("Linear layers on lmforge's decode kernel" if kernel else "PyTorch's decode layouts")
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    # The kernel computes softmax(q k^T * scale) under a mask; soft-capped scores (Gemma 2) are beyond
    # it, so those layers keep the model's own attention (model.few_query_attention).
    capped = [m for m in attention if m.softcap is not None]
    if kernel and len(capped) < len(attention):
        for m in attention:
            if m.softcap is None:
                m.decode_kernel = rows.decode_attention
        done.append("attention on lmforge's decode kernel")
    if kernel and capped:
        done.append("soft-capped attention on PyTorch (the kernel cannot express soft-capping)")
    if cpu and hugepages.place(model):
        done.append("weights in huge pages")
    return ", ".join(done)


def restore(model: nn.Module) -> None:
    """Undo `prepare`: row-major weights, plain nn.Linear calls and attention, packed copies freed."""
    for m in _linears(model):
        if not m.weight.is_contiguous():
            m.weight.data = m.weight.data.contiguous()
        if "forward" in m.__dict__:
            del m.forward
        for a in ("_lmf_max_rows", "_lmf_version", "_lmf_packed"):
            m.__dict__.pop(a, None)
    for m in model.modules():
        if isinstance(m, Attention):
            m.__dict__.pop("decode_kernel", None)
