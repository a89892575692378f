"""The matmuls of weight-only int8/int4 layers (compress/qlinear.py holds the layers and their format).

Measured on the decode shapes (bench/quantize.py): on CPU, lmforge's own row kernel for the few rows of
a decode step (rows.py, fp32 activations; once `rows.available()` has built it, which
`lmforge.kernels.install` does), else `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`
with bf16 activations (fp32 accumulation); `_weight_int8pack_mm` / `_weight_int4pack_mm` (bf16) on CUDA;
elsewhere, or for shapes a kernel refuses, the layer is dequantized on the fly ("dequant").

Weights: int8 q (N, K) with scales (N,); int4 codes 0..15 (N, K) standing for (q - 8) * scale + zero,
one bf16 (scale, zero) per group of G inputs (N, K/G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.kernels import rows

GROUP_SIZES = (32, 64, 128, 256)  # int4 groups the kernels take
_BF16 = torch.bfloat16


def choose_kernel(bits: int, device: torch.device, N: int, K: int, G: int | None) -> str:
    """The kernel a layer of this shape runs on (measured fastest at batch 1, see bench/quantize.py);
    'dequant' = dequantize the layer on the fly (no kernel for this device or shape)."""
    dev = torch.device(device).type
    if bits == 8:
        if dev == "cpu" and K % 16 == 0:  # the CPU kernel needs K % 16 == 0 (it crashes otherwise)
            return "int8pack_cpu"
        if dev == "cuda" and _cuda_probe("int8"):
            return "int8pack_cuda"
    else:
        if dev == "cpu" and N % 16 == 0 and G in GROUP_SIZES:
            return "int4pack_cpu"
        if dev == "cuda" and N % 8 == 0 and K % 128 == 0 and G in GROUP_SIZES and _cuda_probe("int4"):
            return "int4pack_cuda"
    return "dequant"


_PROBED: dict[str, bool] = {}


def _cuda_probe(kind: str) -> bool:
    """Whether this CUDA build and GPU run the kernel (and get the right answer), checked once."""
    if kind not in _PROBED:
        _PROBED[kind] = False
        try:
            g = torch.Generator().manual_seed(0)
            N, K, G = 64, 1024, 128
            x = torch.randn(2, K, generator=g).to("cuda", _BF16)
            scales = (torch.rand(N, K // G, generator=g) / 50 + 1e-3).to(_BF16)
            if kind == "int8":
                q = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8)
                w = q.float() * scales[:, 0].float()[:, None]
                y = int8_matmul(x, q.cuda(), scales[:, 0].cuda(), "int8pack_cuda")
            else:
                q = torch.randint(0, 16, (N, K), generator=g).to(torch.uint8)
                zeros = (torch.randn(N, K // G, generator=g) / 50).to(_BF16)
                w = (q.float().view(N, K // G, G) - 8) * scales.float()[..., None] + zeros.float()[..., None]
                packed = int4_pack(q.cuda(), scales.cuda(), zeros.cuda(), "int4pack_cuda")
                y = int4_matmul(x, packed, G, "int4pack_cuda")
                w = w.view(N, K)
            ref = F.linear(x.float(), w.cuda())
            ok = bool(torch.allclose(y.float(), ref, atol=0.5, rtol=0.05))
        except Exception:  # no kernel in this build, or not for this GPU
            ok = False
        _PROBED[kind] = ok
    return _PROBED[kind]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, kernel: str) -> torch.Tensor:
    """x (M, K) @ (q (N, K) * scales (N,))^T -> (M, N) in x's dtype."""
    if (
        kernel == "int8pack_cpu"
        and rows.LOADED
        and x.shape[0] <= rows.MAX_ROWS[torch.int8]
        and not x.requires_grad
    ):
        return rows.linear_rows(x, q, scales)  # a decode step: lmforge's kernel, fp32 activations
    if kernel in ("int8pack_cpu", "int8pack_cuda"):  # bf16 activations: the CPU fp32 path is ~10x slower
        return torch.ops.aten._weight_int8pack_mm(x.to(_BF16), q, scales.to(_BF16)).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scales.to(x.dtype)


def int4_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, kernel: str):
    """The int4 kernel's own copy of the weights: codes (N, K) uint8 0..15, scales and zeros (N, K/G)
    -> (packed weights, (K/G, N, 2) scales-and-zeros); not saved, rebuilt after a move or a load."""
    if kernel == "int4pack_cpu":
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    else:  # CUDA: (N, K/2) uint8 with the even column in the high nibble
        w = torch.ops.aten._convert_weight_to_int4pack((codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous(), 8)
    sz = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    return w, sz


def int4_matmul(x: torch.Tensor, packed, group_size: int, kernel: str) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, W the int4 weights of `packed` (int4_pack's output)."""
    w, sz = packed
    if kernel == "int4pack_cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(_BF16), w, group_size, sz).to(x.dtype)
    return torch.ops.aten._weight_int4pack_mm(x.to(_BF16), w, group_size, sz).to(x.dtype)
