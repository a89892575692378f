"""Small shared helpers: user-facing errors, atomic writes, device and dtype selection.

torch is imported inside the functions that need it, so that importing UserError stays cheap
(`lmforge --help` and spawned data workers never pay for torch).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class UserError(ValueError):
    """A problem with what the user asked for. The CLI prints its message without a traceback."""


# ---------------------------------------------------------------------------------------------
# Atomic writes: write to a temporary sibling, fsync, rename. A crash leaves the old file whole.


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems do not allow opening directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the user's usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` whole.

    A failure anywhere inside leaves `path` as it was (or absent) and removes the temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Devices and dtypes.

DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def resolve_device(device=None):
    """`auto` (or None) picks CUDA, then Apple MPS, then CPU. An explicit device that is absent is an error."""
    import torch

    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {device}: CUDA is not available on this machine. Use --device cpu or auto."
        )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(
            f"--device {device}: Apple MPS is not available on this machine. Use --device cpu or auto."
        )
    return dev


def parse_dtype(dtype):
    """fp32/bf16/fp16 (or their long names, or a torch.dtype) -> torch.dtype; anything else is a UserError."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype {dtype!r} is not known; choose one of fp32, bf16, fp16.")
    return getattr(torch, DTYPE_NAMES[dtype])


def resolve_dtype(dtype, device):
    """Like parse_dtype (None or auto -> fp32), refusing combinations the device cannot run."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32
    dt = parse_dtype(dtype)
    if device.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bf16: this GPU does not support bfloat16. Use --dtype fp16 or fp32.")
    if device.type == "cpu" and dt == torch.float16:
        raise UserError(
            "--dtype fp16 is not supported on CPU (PyTorch's CPU fp16 kernels are slow or missing). "
            "Use --dtype bf16 or fp32."
        )
    return dt


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def dir_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
