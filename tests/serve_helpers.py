"""Shared by the serving tests: a tiny checkpoint (+ a LoRA adapter of it), the model loaded in-process,
a real server subprocess, and the checks of the API's error shape.

The checkpoint is a debug-size llama with a 512-token BPE trained here, written once per test session
under pytest's session temp directory; `Server` runs `python -m lmforge serve` on a free 127.0.0.1 port
and waits for /health.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from train_data import cli_env, lmforge_cmd

ROOT = Path(__file__).resolve().parents[1]
TEXT = [
    "The quick brown fox jumps over the lazy dog. A serving system answers many requests at once.",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "Continuous batching admits new requests into the running batch at every decoding step.",
    "Héllo wörld, ünïcödé ☃ 日本語のテキスト 🙂 and plain ASCII text side by side.",
    "Tokens stream to the client as Server-Sent Events; the last event is data: [DONE].",
] * 40


def build_checkpoint(out: Path, max_seq_len: int = 256) -> tuple[Path, Path]:
    """(checkpoint dir, LoRA adapter dir); built once, reused when present."""
    ckpt, adapter = out / "model", out / "lora"
    if (adapter / "adapter_config.json").is_file():
        return ckpt, adapter
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.lora import apply_lora, lora_state_dict, save_adapter

    tok = train_tokenizer(TEXT, 512)
    cfg = preset(
        "llama",
        "debug",
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(0)
    model = build(cfg).eval()
    save_model(model, ckpt, tokenizer=tok)
    apply_lora(model, rank=4, alpha=8.0, targets=("wqkv", "wo", "w_out"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # a visible change, so the adapter's output differs from the base's
    save_adapter(
        adapter, lora_state_dict(model), model.lora_config, base=str(ckpt), model_config=cfg, tokenizer=tok
    )
    return ckpt, adapter


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    return build_checkpoint(tmp_path_factory.getbasetemp() / "serve_ckpt")


@pytest.fixture(scope="session")
def serve_ckpt_short(tmp_path_factory) -> tuple[Path, Path]:
    """The same kind of model with a 64-token context: bounded work per request (fuzzing)."""
    return build_checkpoint(tmp_path_factory.getbasetemp() / "serve_ckpt_64", max_seq_len=64)


@pytest.fixture(scope="module")
def lm(serve_ckpt):
    """The serve_ckpt model loaded in-process on CPU (one thread): what the server should answer."""
    import torch

    import lmforge

    torch.set_num_threads(1)
    return lmforge.load(serve_ckpt[0], device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lmforge serve CKPT --port <free>` on 127.0.0.1; a context manager. `url`, `log()`."""

    def __init__(self, ckpt: Path, *args: str, log_dir: Path, env: dict | None = None, startup_s: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        cmd = lmforge_cmd("serve", ckpt, "--host", "127.0.0.1", "--port", self.port, "--device", "cpu")
        cmd += ["--log-level", "warning", *args]
        # One thread: tiny models are faster so, and the tests share two cores with the server.
        full_env = cli_env()
        full_env.pop("LMFORGE_API_KEY", None)  # only the key a test asks for
        full_env.update(env or {})
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        self._wait(startup_s)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def adapter_server(serve_ckpt: tuple[Path, Path], key: str, *args: str, log_dir: Path) -> Server:
    """A Server of serve_ckpt's model with its LoRA adapter as model "ft", 4 rows, requiring `key`."""
    ckpt, adapter = serve_ckpt
    return Server(
        ckpt, "--api-key", key, "--lora", f"ft={adapter}", "--max-batch", "4", *args, log_dir=log_dir
    )


def assert_error(r: httpx.Response, status: int, param: str | None = "unset", in_message: tuple = ()) -> dict:
    """The response is `status` with an OpenAI-shaped error body (naming `param` unless "unset", with each
    of `in_message` in its message); returns the error object."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "unset":
        assert err["param"] == param, err
    for s in in_message:
        assert s in err["message"], err
    return err


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total
