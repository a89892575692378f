"""Helpers of the training tests: a small real corpus, chat data, run configs, the CLI in a subprocess.

The corpus is Python's own standard library source (offline, identical on every run with the pinned
interpreter), tokenized with a 512-token BPE, prepared with `lmforge.data.prepare`: the `corpus`
fixture (tests/conftest.py) builds it once per session from the writers here.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path

CORPUS_BYTES = 1_200_000
VOCAB = 512


def write_corpus(out: Path, max_bytes: int = CORPUS_BYTES) -> Path:
    """Stdlib modules as .txt documents (sorted by name, so always the same set)."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) > 60_000:
            continue
        (out / f"{f.stem}.txt").write_text(text, encoding="utf-8")
        total += len(text.encode())
        if total >= max_bytes:
            break
    return out


def write_chat(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Synthetic instruction data with a learnable rule: the assistant repeats the user's words reversed."""
    rng = random.Random(seed)
    words = "red green blue cat dog sun moon tree river stone cloud fire water bird fish".split()
    with open(path, "w") as fh:
        for _ in range(n):
            ws = rng.sample(words, rng.randint(2, 4))
            msgs = [
                {"role": "user", "content": "reverse: " + " ".join(ws)},
                {"role": "assistant", "content": " ".join(reversed(ws))},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- runs
def run_dict(corpus, out_dir, name, **over) -> dict:
    """A small, fast pretraining run as a nested config dict; `over` takes dotted keys ("train.lr")."""
    from lmforge.train.config import dotted_to_nested, merge

    d = {
        "name": name,
        "out_dir": str(out_dir),
        "seed": 0,
        "device": "cpu",
        "dtype": "fp32",
        "model": {"family": "llama", "size": "debug", "max_seq_len": 64},
        "data": {"path": str(corpus["data"]), "tokenizer": str(corpus["tokenizer"]), "seq_len": 64},
        "train": {"batch_size": 8, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2},
        "eval": {"every": 0, "batches": 2, "samples": 0},
        "ckpt": {"every": 4, "keep": 5},
        "log": {"every": 1, "progress": False, "tensorboard": False, "peak_flops": 1e11},  # no peak measuring
    }
    return merge(d, dotted_to_nested(over))


def make_config(corpus, out_dir, name, **over):
    from lmforge.train.config import RunConfig

    return RunConfig.from_dict(run_dict(corpus, out_dir, name, **over))


def write_yaml(path: Path, d: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(d))
    return path


def losses(run_dir) -> list[tuple[int, float]]:
    """(step, train loss) of every logged step in a run's metrics.jsonl."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append((rec["step"], rec["loss"]))
    return out


def cli_env() -> dict:
    """Environment for lmforge subprocesses: one thread, as the in-process runs use (see one_thread)."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def lmforge_cmd(*args) -> list[str]:
    """`python -m lmforge ARGS`; paths and numbers may be passed as they are."""
    return [sys.executable, "-m", "lmforge", *map(str, args)]


def run_lmforge(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in a subprocess with cli_env(), its output captured as text."""
    return subprocess.run(lmforge_cmd(*args), capture_output=True, text=True, env=cli_env(), timeout=timeout)


@contextmanager
def single_threaded():
    """torch on one thread inside the block: the same matmul blocking as the subprocesses (exact
    comparisons), and far faster than two threads when other jobs share the 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def base_model(corpus, path: Path, family: str = "llama", seed: int = 0) -> Path:
    """A random debug model with the test tokenizer, saved as an HF directory (a fine-tuning base)."""
    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build
    from lmforge.tokenizer import Tokenizer

    if (path / "config.json").exists():
        return path
    tok = Tokenizer.load(corpus["tokenizer"])
    cfg = preset(
        family,
        "debug",
        vocab_size=tok.vocab_size,
        max_seq_len=64,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    model = build(cfg)
    model.init_weights(seed)
    save_model(model, path, tokenizer=tok)
    return path
