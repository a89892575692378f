"""Small shared helpers: user-facing errors, atomic writes, device and dtype selection.

torch is imported inside the functions that need it, so that importing UserError stays cheap
(`lmforge --help` and spawned data workers never pay for torch).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path


class UserError(ValueError):
    """A problem with what the user asked for. The CLI prints its message without a traceback."""


# ---------------------------------------------------------------------------------------------
# Atomic writes: write to a temporary sibling, fsync, rename. A crash leaves the old file whole.
#
# Temporaries are named `.NAME.<host>-<pid>.<random>.tmp` (and `.NAME.<host>-<pid>.<random>.old` for the
# previous directory while it is swapped out), so the next write to NAME can tell a leftover of a killed
# process (dead pid on this host; from another host, older than STALE_SECONDS) from a live writer's.

STALE_SECONDS = 24 * 3600  # a temporary from another host (shared filesystem) is stale after a day
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")


def _marker() -> str:
    return f"{_host()}-{os.getpid()}"


def temp_prefix(path: str | os.PathLike) -> str:
    """`.NAME.<host>-<pid>.`: the prefix of a temporary for `path` (add a random part and `.tmp`) that the
    next write to `path` removes if this process dies; for helpers that make their own (TemporaryDirectory)."""
    return f".{Path(path).name}.{_marker()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(entry: os.DirEntry, host: str | None, pid: int | None) -> bool:
    if host == _host() and pid is not None:
        return not _pid_alive(pid)
    try:  # another host, or a name from before the marker: only its age tells
        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    return age > STALE_SECONDS


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` that a dead (killed) writer left; return what was removed."""
    path = Path(path)
    name = re.escape(path.name)
    marked = re.compile(rf"^\.{name}\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(tmp|old)$")
    legacy = re.compile(rf"^\.{name}\.([A-Za-z0-9_]+\.tmp|old-\d+)$")  # names lmforge used before
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for e in entries:
        m = marked.match(e.name)
        if m:
            host, pid = m["host"], int(m["pid"])
        elif legacy.match(e.name):
            host = pid = None
        else:
            continue
        if not _stale(e, host, pid):
            continue
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
    return removed


def _write_error(path: Path, exc: BaseException) -> UserError | None:
    """Disk full / read-only while writing `path` -> a one-line UserError; None for anything else.

    safetensors reports I/O failures as its own error with the OS error's text inside, hence the text test."""
    if isinstance(exc, UserError):
        return None
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        text = str(exc)
        for c in (*_NO_SPACE, errno.EROFS):  # not EACCES: "Permission denied" may be about an input
            if f"code: {c}," in text or os.strerror(c) in text:
                code = c
                break
        else:
            return None
    elif code in _NOT_WRITABLE and exc.filename is not None:
        # a permission error about some other file (an input being read) is not a write error of ours
        f = Path(os.fsdecode(exc.filename)).absolute()
        if f != path.absolute() and path.absolute().parent not in (f, *f.parents):
            return None
    if code in _NO_SPACE:
        return UserError(f"cannot write {path}: {os.strerror(code)}: free space, or write it elsewhere")
    if code in _NOT_WRITABLE:
        return UserError(f"cannot write {path}: {os.strerror(code)}: write it elsewhere, or make it writable")
    return None


def _prepare_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = _write_error(path, e)
        if err is None:
            raise
        raise err from e
    remove_stale_temporaries(path)


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
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it over `path`.

    Disk full or a read-only target becomes a one-line UserError (the OSError is its __cause__)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, mode) as f:  # a new file: the user's usual permissions
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Like atomic_file for writers that want a file name, not an open file (GGUFWriter, llama.cpp's
    quantizer): yield a temporary sibling path; on success fsync it and rename it over `path`."""
    path = Path(path)
    _prepare_parent(path)
    tmp = path.with_name(f"{temp_prefix(path)}{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        err = _write_error(path, e) if isinstance(e, Exception) else None
        if err is None:
            raise
        raise err from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` whole.

    A failure anywhere inside leaves `path` as it was (or absent) and removes the temporary; disk full
    or a read-only target becomes a one-line UserError (the original error is its __cause__).
    """
    path = Path(path)
    _prepare_parent(path)
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = Path(str(tmp)[: -len(".tmp")] + ".old")  # same marker: a kill here leaves it removable
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if old is not None and old.exists() and not path.exists():  # failed between the two renames
            with contextlib.suppress(OSError):
                os.replace(old, path)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        # a write inside the temporary (atomic_file in tmp/) already said so, naming the temporary: name
        # `path`, which is what the user asked for
        cause = e.__cause__ if isinstance(e, UserError) and isinstance(e.__cause__, OSError) else e
        err = _write_error(path, cause) if isinstance(cause, Exception) else None
        if err is None:
            raise
        raise err from cause


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
    """Bytes in powers of 1024, labelled so (KiB, MiB, ...): 1.0 MiB is 1,048,576 bytes, not 1e6."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


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
