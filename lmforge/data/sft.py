"""Supervised fine-tuning data: chat JSONL -> rendered token rows with an assistant-only loss mask.

Input: JSON lines (or a JSON array) of either
- OpenAI chat format: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- Alpaca format: {"instruction": "...", "input": "..." (optional), "output": "...", "system": optional}
  which becomes [system?], user = instruction (+ blank line + input), assistant = output.

Each conversation is rendered with the tokenizer's chat template and tokenized as a whole (the ids
are exactly `tokenizer.encode_chat(messages)`). The loss mask covers each assistant message's
content and its end marker, not the role marker, not system/user text: the mask is found by
rendering prefixes of the conversation (up to the generation prompt before an assistant message, and
up to the end of it) and mapping those character spans onto tokens through their offsets, so it
holds for any template that renders conversations incrementally.

Rows: conversations are packed greedily, in a per-epoch shuffled order, into rows of seq_len + 1
tokens, the rest padded. x = row[:-1]; y = row[1:] with -100 wherever the target is not an assistant
token (padding, prompts, the next conversation's BOS): the `ignore_index` of `F.cross_entropy`.
Packed conversations share a row and attend to each other; pass `pack=False` for one per row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lmforge.data.loader import EpochCursor
from lmforge.data.sources import SourceStats, iter_json_records
from lmforge.tokenizer import Tokenizer
from lmforge.utils import UserError

IGNORE = -100
ROLES = ("system", "user", "assistant")


def alpaca_to_messages(rec: dict) -> list[dict]:
    prompt = rec["instruction"]
    if rec.get("input"):
        prompt = f"{prompt}\n\n{rec['input']}"
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    return msgs + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": rec.get("output", "")},
    ]


def _check_messages(msgs, where: str) -> str | None:
    """Why `msgs` is not a usable conversation, or None."""
    if not isinstance(msgs, list) or not msgs:
        return "'messages' is not a non-empty list"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"a message is not {{'role': system|user|assistant, 'content': str}}: {str(m)[:80]}"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message (nothing to learn from)"
    return None


def load_conversations(
    path: str | os.PathLike, *, strict: bool = False, stats: SourceStats | None = None
) -> list[list[dict]]:
    """Read conversations from a .jsonl/.json file (optionally .gz/.zst); bad records are counted."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"SFT data {p} does not exist (expected a .jsonl file of chat or Alpaca records).")
    stats = stats if stats is not None else SourceStats()
    convs = []
    for lineno, rec in iter_json_records(p, stats, strict):
        where = f"{p}:{lineno}"
        if "messages" in rec:
            msgs = rec["messages"]
        elif "instruction" in rec:
            msgs = alpaca_to_messages(rec)
        else:
            if not convs and not stats.malformed:
                raise UserError(
                    f"{where}: neither 'messages' (chat format) nor 'instruction'/'output' (Alpaca format) "
                    f"in the record (fields: {', '.join(sorted(rec))[:120]}). Convert the data to one of them."
                )
            stats.missing_field += 1
            stats.note(f"{where}: no messages/instruction, skipped")
            continue
        why = _check_messages(msgs, where)
        if why:
            if strict:
                raise UserError(f"{where}: {why}. Fix it, or drop --strict to skip it.")
            stats.malformed += 1
            stats.note(f"{where}: {why}, skipped")
            continue
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not convs:
        raise UserError(f"{p}: no usable conversations ({'; '.join(stats.summary()[:3]) or 'empty file'}).")
    return convs


def render_with_mask(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask): ids = encode_chat(messages); mask[i] = 1 where token i is assistant content/end marker."""
    text = tokenizer.apply_chat_template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        end = tokenizer.apply_chat_template(messages[: i + 1])
        if not (text.startswith(end) and end.startswith(start)):
            raise UserError(
                "the chat template does not render conversations incrementally (a prefix of the "
                "conversation is not a prefix of its rendering), so the assistant tokens cannot be found."
            )
        spans.append((len(start), len(end)))
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [int(any(a <= o[0] < b for a, b in spans)) for o in offsets]
    return ids, mask


def explain_mask(tokenizer: Tokenizer, messages: list[dict]) -> str:
    """The rendered conversation with the loss-carrying tokens bracketed [[like this]] (for eyeballing)."""
    ids, mask = render_with_mask(tokenizer, messages)
    out, run, inside = [], [], False
    for i, m in [*zip(ids, mask), (None, None)]:
        if m != inside or i is None:  # decode runs, not single tokens: a character may span tokens
            out.append(tokenizer.decode(run) + ("]]" if inside else ""))
            out.append("[[" if m else "")
            run, inside = [], bool(m)
        run.append(i)
    return "".join(out)


class SFTLoader(EpochCursor):
    """Infinite iterator of (x, y) int64 tensors (B, T); y is -100 except at assistant targets.

    `data` is a path to JSONL or a list of conversations (lists of {"role", "content"} dicts).
    Same contract as `TokenLoader`: per-epoch shuffle by seed, rank r of world_size takes rows
    [r*B, (r+1)*B) of each global batch, and `state_dict()`/`load_state_dict()` resume exactly.
    """

    def __init__(
        self,
        data,
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pack: bool = True,
        strict: bool = False,
    ):
        super().__init__(batch_size, rank, world_size, seed, shuffle)
        self.stats = SourceStats()
        convs = data if isinstance(data, list) else load_conversations(data, strict=strict, stats=self.stats)
        self.tokenizer, self.seq_len, self.pack = tokenizer, seq_len, pack
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = 0
        for msgs in convs:
            ids, mask = render_with_mask(tokenizer, msgs)
            if len(ids) > seq_len + 1:
                self.truncated += 1  # cut at the row length; the rest of the conversation is not seen
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            self.examples.append((np.asarray(ids, np.int64), np.asarray(mask, bool)))
        self.n_examples = len(self.examples)
        self._rows_epoch, self._rows = -1, None
        if self._epoch_len(0) < batch_size * world_size:
            raise UserError(self._too_small(batch_size * world_size))

    def _too_small(self, gb: int) -> str:
        return (
            f"{self.n_examples} conversations make {self._epoch_len(self.epoch)} rows of {self.seq_len + 1} "
            f"tokens, fewer than one global batch of {gb} (batch_size x world_size); use a smaller batch."
        )

    def rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows as lists of example indices: its shuffled order, packed greedily."""
        if self._rows_epoch != epoch:
            rows, cur, used = [], [], 0
            for i in self.epoch_order(epoch, self.n_examples):
                n = len(self.examples[i][0])
                if cur and (not self.pack or used + n > self.seq_len + 1):
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(int(i))
                used += n
            if cur:
                rows.append(cur)
            self._rows, self._rows_epoch = rows, epoch
        return self._rows

    def _epoch_len(self, epoch: int) -> int:
        return len(self.rows(epoch))

    @property
    def batches_per_epoch(self) -> int:
        return self._epoch_len(self.epoch) // (self.batch_size * self.world_size)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = self._take()
        rows = self.rows(epoch)
        T1 = self.seq_len + 1
        tok = np.full((len(pos), T1), self.pad_id, dtype=np.int64)
        loss = np.zeros((len(pos), T1), dtype=bool)
        for r, p in enumerate(pos):
            at = 0
            for i in rows[p]:
                ids, mask = self.examples[i]
                tok[r, at : at + len(ids)] = ids
                loss[r, at : at + len(ids)] = mask
                at += len(ids)
        y = np.where(loss[:, 1:], tok[:, 1:], IGNORE)
        return torch.from_numpy(np.ascontiguousarray(tok[:, :-1])), torch.from_numpy(y)

    def state_dict(self) -> dict:
        return {
            **self._cursor_state(),
            "seq_len": self.seq_len,
            "pack": self.pack,
            "n_examples": self.n_examples,
        }

    def load_state_dict(self, d: dict) -> None:
        self._load_cursor(d, {"seq_len": self.seq_len, "pack": self.pack, "n_examples": self.n_examples})
