"""Supervised fine-tuning data: chat JSONL -> rendered token rows with an assistant-only loss mask.

Input: JSON lines (or a JSON array) of either
- OpenAI chat format: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- Alpaca format: {"instruction": "...", "input": "..." (optional), "output": "...", "system": optional}
  which becomes [system?], user = instruction (+ blank line + input), assistant = output.

A record may carry `tools` (OpenAI function schemas) next to `messages`; messages may be assistant
turns with `tool_calls` (OpenAI shape; `content` may be null) and `tool` results with `tool_call_id`.

Each conversation is rendered once with the tokenizer's chat template and tokenized as a whole (the
ids are exactly `tokenizer.encode_chat(messages, tools=tools)`). The loss mask covers what the model
writes in each assistant turn: the text from the end of the generation prompt to the turn's end
marker, inclusive (its content, any reasoning block and tool calls the template renders there, and the
end-of-turn token such as <|im_end|>, <|eot_id|>, <end_of_turn> or </s>); never role headers, system,
user or tool text. The spans are found in the one full rendering, so templates that render a message
differently once later messages follow (Qwen3 drops earlier <think> blocks) work too:
- a template with `{% generation %}` blocks (transformers' assistant-mask tag) gives the spans itself;
- otherwise, a turn starts where the rendering of the conversation before it plus the generation
  prompt stops agreeing with the full rendering (past the previous message), and ends at the first
  end-of-turn token after the assistant's content.
Character spans map onto tokens through the tokenizer's offsets.

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
ROLES = ("system", "user", "assistant", "tool")


def alpaca_to_messages(rec: dict) -> list[dict]:
    prompt = rec["instruction"]
    if rec.get("input"):
        prompt = f"{prompt}\n\n{rec['input']}"
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    return msgs + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": rec.get("output", "")},
    ]


class Conversation(list):
    """A list of messages that also carries the record's `tools` (None when it has none)."""

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools


def _check_messages(msgs, where: str) -> str | None:
    """Why `msgs` is not a usable conversation, or None."""
    if not isinstance(msgs, list) or not msgs:
        return "'messages' is not a non-empty list"
    for m in msgs:
        ok = isinstance(m, dict) and m.get("role") in ROLES
        calls = ok and m["role"] == "assistant" and isinstance(m.get("tool_calls"), list) and m["tool_calls"]
        if not ok or not (isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            return (
                "a message is not {'role': system|user|assistant|tool, 'content': str} (or an assistant "
                f"message with 'tool_calls'): {str(m)[:80]}"
            )
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
        tools = rec.get("tools") if isinstance(rec.get("tools"), list) and rec.get("tools") else None
        convs.append(Conversation([dict(m) for m in msgs], tools))
    if not convs:
        raise UserError(f"{p}: no usable conversations ({'; '.join(stats.summary()[:3]) or 'empty file'}).")
    return convs


def render_with_mask(
    tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None, **template_kwargs
) -> tuple[list[int], list[int]]:
    """(ids, mask): ids = encode_chat(messages, tools=tools); mask[i] = 1 where token i is written by
    an assistant turn (from the end of its generation prompt through its end marker)."""
    tools = tools if tools is not None else getattr(messages, "tools", None)
    text, spans = tokenizer._render(messages, False, tools, None, template_kwargs, track=True)
    if not spans:
        spans = _assistant_spans(tokenizer, list(messages), text, tools, template_kwargs)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [int(any(a <= o[0] < b for a, b in spans)) for o in offsets]
    return ids, mask


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _find_content(text: str, content, start: int) -> tuple[int, int] | None:
    """(start, end) of a message's content in the rendering at or after `start`; templates may trim
    it or (Qwen3) split off a reasoning block, so the stripped text and the part after </think> count."""
    if not isinstance(content, str) or not content.strip():
        return None
    for c in (content, content.strip(), content.split("</think>")[-1].strip()):
        k = text.find(c, start) if c else -1
        if k >= 0:
            return k, k + len(c)
    return None


def _assistant_spans(tokenizer, messages, text, tools, kwargs) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text`, the full rendering of `messages`."""
    markers = tokenizer.end_markers()
    spans, done = [], 0  # done: where the previous assistant turn ends in `text`
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        # Where the message before this turn ends (searched from the previous turn on: a template may
        # move text, like Mistral's system message into the last user turn).
        prev = _find_content(text, messages[i - 1].get("content"), done) if i else None
        cursor = prev[1] if prev else done
        try:
            head = tokenizer._render(messages[:i], True, tools, None, kwargs)[0] if i else ""
        except UserError:  # a template that refuses the shorter conversation: start after the last message
            head = text[:cursor]
        start = _common_prefix(text, head)
        if start < cursor:  # the prompt renders earlier text differently (Mistral's tools block moved)
            found = _find_content(head, messages[i - 1].get("content"), 0) if i else None
            tail = head[found[1] :] if found else ""
            start = cursor + _common_prefix(text[cursor:], tail)
        found = _find_content(text, m.get("content"), start)
        after = found[1] if found else start
        ends = [(k, len(t)) for t in markers if (k := text.find(t, after)) >= 0]
        if ends:
            k, n = min(ends)
            end = k + n
        elif found:
            end = found[1]
        else:
            raise UserError(
                f"cannot find assistant message {i} in the rendered conversation (the chat template "
                "drops it, or it ends with no end-of-turn token); check the template and the message."
            )
        spans.append((start, end))
        done = end
    return spans


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
            if not any(mask):
                raise UserError("a conversation renders with no assistant tokens: check the chat template")
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
