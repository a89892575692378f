"""The trainer's view of data: a resumable train iterator, fresh validation batches, the tokenizer.

Pretraining reads token shards (`lmforge data prepare`) with data.loader.TokenLoader; fine-tuning reads
chat/instruction JSONL with data.sft.SFTLoader (loss on assistant tokens only). Both shard a global
batch over ranks (rank r takes rows [r*B, (r+1)*B) of each global batch of B*W rows), so W processes
with accumulation A see the rows one process sees with accumulation W*A, and the loader position is
the same number on every rank: rank 0 saves it, any world size resumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.train.config import RunConfig
from lmforge.utils import UserError


@dataclass
class Data:
    """What the loop needs: `train` yields (x, y) forever and has state_dict/load_state_dict;
    `val()` returns a fresh iterator over the same validation batches every time (None: no validation)."""

    train: Iterator
    val: Callable[[], Iterator] | None = None
    tokenizer: object | None = None
    vocab_size: int | None = None
    n_train_tokens: int | None = None
    notes: list[str] = field(default_factory=list)


def find_tokenizer(cfg: RunConfig):
    """data.tokenizer, else a tokenizer.json in the data directory, else the init_from checkpoint's."""
    from lmforge.tokenizer import Tokenizer

    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)  # a UserError says what is missing
    for where in (cfg.data.path, cfg.model.init_from):
        if where and Path(where).is_dir() and (Path(where) / "tokenizer.json").is_file():
            return Tokenizer.load(where)
    return None


def _rewinding(loader, n: int) -> Callable[[], Iterator]:
    """A function returning the loader's first n batches (fewer if an epoch is shorter), every time."""
    start = loader.state_dict()
    n = min(n, max(1, loader.batches_per_epoch))

    def batches():
        loader.load_state_dict(start)
        for _ in range(n):
            yield next(loader)

    return batches


def make_data(cfg: RunConfig, rank: int = 0, world: int = 1) -> Data:
    if not cfg.data.path:
        raise UserError(
            "no training data: pass --data.path (a `lmforge data prepare` directory for pretraining, "
            "a chat .jsonl for fine-tuning)"
        )
    tok = find_tokenizer(cfg)
    B, T, seed = cfg.train.batch_size, cfg.data.seq_len, cfg.seed
    per_rank = max(1, cfg.eval.batches // world)  # eval.batches micro-batches in total over all ranks
    if cfg.task == "sft":
        return _sft_data(cfg, tok, B, T, seed, rank, world, per_rank)
    from lmforge.data.loader import TokenLoader

    train = TokenLoader(
        cfg.data.path,
        "train",
        B,
        T,
        seed=seed,
        rank=rank,
        world_size=world,
        doc_aligned=cfg.data.doc_aligned,
        tokenizer=tok,
    )
    notes = []
    if tok is None:
        notes.append(
            "no tokenizer (pass --data.tokenizer DIR): no bits-per-byte, no decoded samples, "
            "and final/ will have no tokenizer files"
        )
    val = None
    split = train.meta["splits"].get("val", {})
    if split.get("tokens", 0) > (T + 1) * B * world:
        val = _rewinding(
            TokenLoader(
                cfg.data.path,
                "val",
                B,
                T,
                seed=seed,
                rank=rank,
                world_size=world,
                doc_aligned=cfg.data.doc_aligned,
                shuffle=False,
                tokenizer=tok,
            ),
            per_rank,
        )
    else:
        notes.append(f"{cfg.data.path} has no validation split of at least one batch: no validation loss")
    return Data(train, val, tok, train.vocab_size, train.n_tokens, notes)


def _sft_data(cfg, tok, B, T, seed, rank, world, per_rank) -> Data:
    from lmforge.data.sft import SFTLoader, load_conversations

    if tok is None:
        raise UserError(
            "fine-tuning needs a tokenizer with a chat template: the --model.init_from checkpoint "
            "has no tokenizer.json, so pass --data.tokenizer DIR"
        )
    convs = load_conversations(cfg.data.path)
    notes = []
    if cfg.data.val_path:
        val_convs = load_conversations(cfg.data.val_path)
    else:  # hold out a fixed 5% (at most 200, at least 1) chosen by the seed, never trained on
        n_val = min(200, max(1, len(convs) // 20)) if len(convs) >= 20 else 0
        order = np.random.default_rng(seed).permutation(len(convs))
        held = set(order[:n_val].tolist())
        val_convs = [c for i, c in enumerate(convs) if i in held]
        convs = [c for i, c in enumerate(convs) if i not in held]
        if n_val:
            notes.append(
                f"validation: {n_val} conversations held out of {cfg.data.path} (or pass --data.val_path)"
            )
        else:
            notes.append("fewer than 20 conversations: no validation split (pass --data.val_path)")
    train = SFTLoader(convs, tok, B, T, seed=seed, rank=rank, world_size=world)
    if train.truncated:
        notes.append(f"{train.truncated} conversation(s) longer than seq_len+1={T + 1} tokens were cut")
    val = None
    if val_convs:
        rows = SFTLoader(val_convs, tok, 1, T, shuffle=False)._epoch_len(0)  # packed rows of the val set
        if rows >= world:
            vb = max(1, min(B, rows // world))
            val = _rewinding(
                SFTLoader(val_convs, tok, vb, T, seed=seed, rank=rank, world_size=world, shuffle=False),
                per_rank,
            )
    return Data(train, val, tok, tok.vocab_size, None, notes)
