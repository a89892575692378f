"""lmforge's CPU decode kernels (rows.cpp): `linear_rows(x, w, scale, bias)` for the few rows of a
decode step, with fp32, bf16 or int8 weights, and `decode_attention(q, k, v, mask, scale)` for its few
queries, reading only the visible keys. Why they exist and what they reach: rows.cpp's comments.

It is compiled on first use with the host's C++ compiler for the host's CPU (`-O3 -march=native -fopenmp`,
through torch.utils.cpp_extension; ~15 s, once per CPU model: the build is cached under
~/.cache/torch_extensions with the CPU in its name) and registered as the operators
`torch.ops.lmforge.linear_rows`, `decode_attention` and `decode_layer` (a whole decoder block's
decode step: decode.py's DecodeBlock), which torch.compile calls like any other. Without a compiler,
or with LMFORGE_KERNELS=0, `available()` is False and decoding uses PyTorch's own kernels (slower;
nothing else changes). The kernels split their rows across torch's threads (OpenMP).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

SRC = Path(__file__).with_name("rows.cpp")
# Rows of x up to which the kernel beats PyTorch's paths, per weight dtype (measured one-threaded on the
# decode shapes of a SmolLM-135M; more rows are compute-bound, where PyTorch's blocked kernels win).
MAX_ROWS = {torch.float32: 4, torch.bfloat16: 2, torch.int8: 4}


LOADED = False  # set by available(): the operator is registered (layers check this, never building)


@functools.cache
def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    if os.environ.get("LMFORGE_KERNELS", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ninja  # the build tool cpp_extension drives; the pip package ships the binary

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import load

        if not _built():
            print("lmforge: building the CPU decode kernel (once, ~15 s)", file=sys.stderr)
        load(
            name=_NAME,
            sources=[str(SRC)],
            # at::parallel_for is OpenMP inlined from the headers: without -fopenmp it is a plain loop
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=_openmp_ldflags(),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, an unsupported platform
        warnings.warn(
            f"lmforge's CPU decode kernel did not build ({type(e).__name__}: {_why(e)}); decoding "
            "uses PyTorch's kernels, which are slower. Install g++ (and `pip install ninja`) to get it, "
            "or set LMFORGE_KERNELS=0 to stop trying.",
            stacklevel=2,
        )
        return False
    torch.library.register_fake("lmforge::linear_rows")(_shape)
    torch.library.register_fake("lmforge::decode_attention")(_attention_shape)
    torch.library.register_fake("lmforge::decode_layer")(lambda x, *a: torch.empty_like(x))
    global LOADED
    LOADED = True
    return True


def _openmp_ldflags() -> list[str]:
    """Link the OpenMP runtime torch itself loads (the pip wheels ship libgomp in torch/lib), so that
    the kernel's threads are torch's pool, sized by torch.set_num_threads; else the compiler's."""
    gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if gomp.exists():
        return [f"-L{gomp.parent}", "-l:libgomp.so.1", f"-Wl,-rpath,{gomp.parent}"]
    return ["-fopenmp"]


def _why(e: Exception) -> str:
    """The compiler's first error line, if any (cpp_extension's message starts with the command)."""
    lines = str(e).splitlines()
    return next(
        (ln.strip() for ln in lines if "error" in ln.lower() and ".cpp" in ln),
        lines[-1][:300] if lines else "",
    )


def _cpu_id() -> str:
    """A short hash of this CPU's model and instruction-set flags: -march=native code must not be
    loaded on another CPU (a home directory shared across machines shares the build cache)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    keep = [ln for ln in info if ln.startswith(("model name", "flags", "Features", "CPU part"))][:3]
    return hashlib.sha1("\n".join(keep).encode()).hexdigest()[:10]


# the build's name, hence its cache directory, is per CPU (and per build flags: "2" = with OpenMP)
_NAME = f"lmforge_rows2_{_cpu_id()}"


def _built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory(_NAME, verbose=False)).glob("*.so"))


def _shape(x, w, scale=None, bias=None):
    return x.new_empty(x.shape[0], w.shape[0])


def _attention_shape(q, k, v, mask, scale):
    B, H, T, hd = q.shape
    return q.new_empty(B, T, H, hd)


def linear_rows(x: torch.Tensor, w: torch.Tensor, scale=None, bias=None) -> torch.Tensor:
    """x (M, K) @ (w (N, K) * scale (N)[:, None])^T + bias -> (M, N) in x's dtype; fp32 accumulation."""
    return torch.ops.lmforge.linear_rows(x, w, scale, bias)


def decode_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, where mask) v for a few queries, reading only the visible keys.
    q (B, H, T, hd); k, v (B, KV, S, hd); mask (B, 1, T, S) bool or None -> (B, T, H, hd) in q's dtype."""
    return torch.ops.lmforge.decode_attention(q, k, v, mask, scale)
