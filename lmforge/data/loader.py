"""Pretraining batches from token shards: packed windows -> (x, y) int64 tensors of shape (B, T).

Notable features:
- Packed: the split's shards are one token stream; window i is tokens[i*T : i*T + T + 1] (consecutive
  windows share one boundary token, so every token but the first is a target exactly once per epoch).
- Document-aligned (`doc_aligned=True`): every row starts at BOS. Rows start at each document's
  start, and long documents get continuation rows every T tokens whose first input is replaced by
  BOS (that token is the previous row's last target, so no target is lost). A row reads T + 1
  tokens forward, into the next documents if its own is short.
- Shuffled per epoch by `seed` (window order is a permutation seeded by (seed, epoch)); infinite.
- Data parallel: global batch g is windows order[g*B*W : (g+1)*B*W]; rank r takes rows
  [r*B, (r+1)*B). So the union of the ranks' rows is exactly the batch one rank with batch size
  B*W would get, and the ranks are disjoint.
- Resumable: `state_dict()` is (epoch, position in the epoch's order) plus what must match on
  restore (seed, seq_len, data); the batch after `load_state_dict` is the batch that would have come.
  World size and per-rank batch may change across a restore; the position carries over.

Bits per byte: `tokenizer.token_bytes()[y]` gives the UTF-8 bytes behind each target.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lmforge.data.prepare import read_meta
from lmforge.utils import UserError


def _check_tokenizer(meta: dict, where: Path, tokenizer) -> None:
    """`tokenizer` is a Tokenizer or its hash; shards made with another tokenizer are meaningless."""
    expected = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "hash", None)
    if expected is not None and meta["tokenizer_hash"] != expected:
        raise UserError(
            f"{where} was tokenized with tokenizer {meta['tokenizer_hash']}, but this run uses tokenizer "
            f"{expected}. Prepare the data again with this tokenizer: "
            f"lmforge data prepare --data {meta.get('source', 'SPEC')} --tokenizer DIR --out NEW_DIR"
        )


class EpochCursor:
    """Position bookkeeping shared by the loaders: which rows of which epoch come next."""

    def __init__(self, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: must be at least 1.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} / world size {world_size}: need 0 <= rank < world_size.")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch = 0
        self.position = 0  # items of this epoch's order already consumed (by all ranks together)

    def epoch_order(self, epoch: int, n: int) -> np.ndarray:
        # int32 while it fits: the order of 1 B windows (1 T tokens at T=1024) is then 4 GB, not 8.
        order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def _epoch_len(self, epoch: int) -> int:
        raise NotImplementedError

    def _take(self) -> tuple[int, np.ndarray]:
        """(epoch, positions in that epoch's order) of this rank's next rows; advance the cursor."""
        gb = self.batch_size * self.world_size
        if self.position + gb > self._epoch_len(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
            if gb > self._epoch_len(self.epoch):
                raise UserError(self._too_small(gb))
        pos = self.position + self.rank * self.batch_size + np.arange(self.batch_size)
        self.position += gb
        return self.epoch, pos

    def _too_small(self, gb: int) -> str:
        return f"the data has fewer rows than one global batch ({gb}); use a smaller batch or seq_len."

    def _cursor_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle}

    def _load_cursor(self, d: dict, must_match: dict) -> None:
        for k, v in {"seed": self.seed, "shuffle": self.shuffle, **must_match}.items():
            if k in d and d[k] != v:
                raise UserError(
                    f"cannot resume the data loader: its saved {k} is {d[k]!r} but this loader has {v!r}. "
                    "Resume with the same data and settings, or start a new run."
                )
        self.epoch, self.position = int(d["epoch"]), int(d["position"])

    def __iter__(self):
        return self


class TokenLoader(EpochCursor):
    """Infinite iterator of (x, y) int64 tensors (B, T) over one split of a `data prepare` directory."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        doc_aligned: bool = False,
        shuffle: bool = True,
        tokenizer=None,
    ):
        super().__init__(batch_size, rank, world_size, seed, shuffle)
        self.dir = Path(data_dir)
        meta = read_meta(self.dir)
        if meta is None:
            raise UserError(
                f"{self.dir} is not a token-shard directory (no meta.json). "
                f"Make one with: lmforge data prepare --data SPEC --tokenizer DIR --out {self.dir}"
            )
        if split not in meta["splits"]:
            raise UserError(f"split {split!r} is not in {self.dir}; it has {', '.join(meta['splits'])}.")
        _check_tokenizer(meta, self.dir, tokenizer)
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len}: must be at least 1.")
        self.meta, self.split, self.seq_len, self.doc_aligned = meta, split, seq_len, doc_aligned
        info = meta["splits"][split]
        dtype = np.dtype(meta["dtype"])
        shards = [s for s in info["shards"] if s["tokens"] > 0]
        # Memory maps: nothing is read until a batch needs it, whatever the corpus size.
        self._shards = [np.memmap(self.dir / s["file"], dtype=dtype, mode="r") for s in shards]
        self._offsets = np.cumsum([0] + [s["tokens"] for s in shards]).astype(np.int64)
        n = int(self._offsets[-1])
        T = seq_len
        if doc_aligned:
            self._starts = self._doc_aligned_starts(shards, n, T)
            self.n_windows = len(self._starts)
        else:
            self._starts = None
            self.n_windows = max(0, (n - 1) // T)
        if self.n_windows < batch_size * world_size:
            raise UserError(self._too_small(batch_size * world_size))
        self._order_epoch, self._order = -1, None

    def _doc_aligned_starts(self, shards: list[dict], n: int, T: int) -> np.ndarray:
        doc = np.concatenate(
            [np.fromfile(self.dir / s["index"], dtype="<i8") + off for s, off in zip(shards, self._offsets)]
            or [np.zeros(0, np.int64)]
        )
        ends = np.append(doc[1:], n)
        # A document of L tokens has targets at its positions 1..L-1: ceil((L-1)/T) rows cover them.
        k = np.maximum(1, -(-(ends - doc - 1) // T))
        group_start = np.repeat(np.cumsum(k) - k, k)
        starts = np.repeat(doc, k) + (np.arange(k.sum()) - group_start) * T
        return starts[starts + T + 1 <= n]

    def _too_small(self, gb: int) -> str:
        info = self.meta["splits"][self.split]
        return (
            f"split '{self.split}' of {self.dir} has {info['tokens']} tokens = {self.n_windows} rows of "
            f"seq_len+1 = {self.seq_len + 1}, fewer than one global batch of {gb} rows "
            f"(batch_size x world_size). Use a smaller batch or seq_len, or more data."
        )

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer_hash(self) -> str:
        return self.meta["tokenizer_hash"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def n_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the split's text (tokens / bytes gives the average for a bits-per-byte estimate)."""
        return int(self.meta["splits"][self.split]["bytes"])

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // (self.batch_size * self.world_size)

    def _epoch_len(self, epoch: int) -> int:
        return self.n_windows

    # ------------------------------------------------------------------ reading
    def _read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] of the split's stream, across shard boundaries if need be."""
        out = np.empty(length, dtype=np.int64)
        got = 0
        sh = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while got < length:
            lo = start + got - self._offsets[sh]
            piece = self._shards[sh][lo : lo + length - got]
            out[got : got + len(piece)] = piece
            got += len(piece)
            sh += 1
        return out

    def window_starts(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch, self.n_windows), epoch
        w = self._order[positions].astype(np.int64)  # int64 before multiplying by seq_len
        return self._starts[w] if self._starts is not None else w * self.seq_len

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = self._take()
        starts = self.window_starts(epoch, pos)
        rows = np.stack([self._read(int(s), self.seq_len + 1) for s in starts])  # (B, T+1)
        if self.doc_aligned and self.meta.get("bos_id") is not None:
            rows[:, 0] = self.meta["bos_id"]
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T), (B, T)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            **self._cursor_state(),
            "split": self.split,
            "seq_len": self.seq_len,
            "doc_aligned": self.doc_aligned,
            "n_windows": self.n_windows,
            "tokenizer_hash": self.tokenizer_hash,
        }

    def load_state_dict(self, d: dict) -> None:
        self._load_cursor(
            d,
            {
                "split": self.split,
                "seq_len": self.seq_len,
                "doc_aligned": self.doc_aligned,
                "n_windows": self.n_windows,
                "tokenizer_hash": self.tokenizer_hash,
            },
        )
