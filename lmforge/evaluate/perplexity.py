"""Loss, perplexity, bits per byte and next-token accuracy of a model on any text source.

    lm = lmforge.load("runs/quickstart/final")
    r = evaluate_lm(lm.model, lm.tokenizer, "python-docs", max_tokens=100_000)   # held-out split by default
    r["bits_per_byte"], r["perplexity"], r["accuracy"]

Notable features
- any source: a `data prepare` directory (its `val` split), or any source spec (`python-docs`, files,
  folders, globs, `hf:...`), tokenized on the fly with the checkpoint's tokenizer exactly as
  `data prepare` would (BOS + text + EOS per document, duplicates dropped, the same split by content
  hash), so both give the same numbers for the same documents
- every document is scored on its own, in windows no longer than the model's context: the first
  window scores its first seq_len targets, each later window moves `stride` tokens and scores only
  the targets no earlier window scored, with the window's full length as context. Every target is
  scored exactly once and nothing is truncated; a smaller stride gives more context, costs more
- bits per byte = summed nats / (ln 2 x UTF-8 bytes of the target tokens), bytes from
  `tokenizer.token_bytes()`. Special tokens (EOS) stand for no bytes and are left out of both sums, as
  in training's validation and nanochat, so the figure does not change when the tokenizer does.
  Loss, perplexity and accuracy are per token and count every target, EOS included.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmforge.data.document import doc_digest, is_validation
from lmforge.data.prepare import read_meta
from lmforge.data.sources import iter_documents
from lmforge.evaluate.table import format_table
from lmforge.utils import UserError

SPLITS = ("val", "train", "all")
SCORE_CHUNK = 1024  # positions whose fp32 log-probabilities are computed at once
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "held-out": "val", "heldout": "val", "test": "val"}


# --------------------------------------------------------------------------------------------- windows


def windows(n: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows over a document of n tokens: (begin, end, prev) means input ids[begin:end], targets
    ids[begin+1 : end+1], of which those at positions > prev are scored (position t = ids[t]).

    Every position 1..n-1 is scored exactly once; inputs are at most seq_len tokens long.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise UserError(f"stride {stride}: must be between 1 and the window length {seq_len}")
    out, prev = [], 0
    while prev < n - 1:
        end = min(n - 1, seq_len if prev == 0 else prev + stride)
        out.append((max(0, end - seq_len), end, prev))
        prev = end
    return out


def _rows(ids, seq_len: int, stride: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input ids, targets with -100 where not scored) for each window of one document."""
    ids = np.asarray(ids, dtype=np.int64)
    out = []
    for b, e, prev in windows(len(ids), seq_len, stride):
        y = ids[b + 1 : e + 1].copy()
        y[: prev - b] = -100
        out.append((ids[b:e], y))
    return out


@torch.inference_mode()
def forward_scores(model, rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int = 0):
    """Score rows of (inputs (T,), targets (T,) with -100 = not scored) in one right-padded batch.

    Right padding needs no attention mask: causal attention never lets a real token see the padding
    that follows it. Returns per-row float32 arrays (nats of each target, 0 where not scored) and
    bool arrays (the target was the argmax), both on the CPU.
    """
    dev = model.tok_emb.weight.device
    T = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (xi, yi) in enumerate(rows):
        x[i, : len(xi)] = torch.from_numpy(np.asarray(xi, dtype=np.int64))
        y[i, : len(yi)] = torch.from_numpy(np.asarray(yi, dtype=np.int64))
    logits = model(x.to(dev))  # (B, T, V)
    y = y.to(dev)
    b_idx, t_idx = (y != -100).nonzero(as_tuple=True)  # only scored positions are worked on
    tgt = y[b_idx, t_idx]
    nll = torch.zeros(len(rows), T, dtype=torch.float32, device=dev)
    hit = torch.zeros(len(rows), T, dtype=torch.bool, device=dev)
    for s in range(0, len(tgt), SCORE_CHUNK):  # fp32 copies of at most SCORE_CHUNK rows of V logits
        sl = slice(s, s + SCORE_CHUNK)
        lg = logits[b_idx[sl], t_idx[sl]].float()  # (C, V)
        nll[b_idx[sl], t_idx[sl]] = lg.logsumexp(-1) - lg.gather(-1, tgt[sl, None])[:, 0]
        hit[b_idx[sl], t_idx[sl]] = lg.argmax(-1) == tgt[sl]
    nll, hit = nll.cpu().numpy(), hit.cpu().numpy()
    lengths = [len(xi) for xi, _ in rows]
    return [nll[i, :n] for i, n in enumerate(lengths)], [hit[i, :n] for i, n in enumerate(lengths)]


def sequence_nll(model, ids, seq_len: int | None = None, stride: int | None = None) -> np.ndarray:
    """Nats of every token of `ids` after the first (n - 1 values, in order), in sliding windows."""
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    rows = _rows(ids, seq_len, stride)
    out = np.zeros(max(len(ids) - 1, 0), dtype=np.float64)
    if rows:
        nll, _ = forward_scores(model, rows)
        for (b, e, prev), n in zip(windows(len(ids), seq_len, stride), nll):
            out[prev:e] = n[prev - b :]  # positions prev+1..e are targets prev..e-1
    return out


# --------------------------------------------------------------------------------------------- documents


def normalize_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise UserError(f"--split {split}: choose val (the held-out documents, default), train or all")
    return s


def is_prepared(path) -> bool:
    return (Path(os.path.expanduser(str(path))) / "meta.json").is_file()


def _prepared_documents(path, tokenizer, split: str, max_docs: int | None) -> Iterator[np.ndarray]:
    d = Path(os.path.expanduser(str(path)))
    meta = read_meta(d)
    if meta is None:
        raise UserError(f"{d}/meta.json is not an lmforge token-shard directory's")
    if meta["tokenizer_hash"] != tokenizer.hash:
        raise UserError(
            f"{d} was tokenized with tokenizer {meta['tokenizer_hash']}, but this checkpoint's tokenizer is "
            f"{tokenizer.hash}. Evaluate on the source itself (--data {meta.get('source', 'SPEC')}), which "
            "tokenizes it with the checkpoint's tokenizer, or prepare it again with that tokenizer."
        )
    names = ["val", "train"] if split == "all" else [split]
    dtype = np.dtype(meta["dtype"])
    n = 0
    for name in names:
        info = meta["splits"].get(name)
        if info is None or info["tokens"] == 0:
            if split != "all":
                raise UserError(
                    f"split '{name}' of {d} is empty (val_fraction {meta.get('val_fraction')}); use --split train or all, "
                    "or prepare the data with a larger --val-fraction"
                )
            continue
        for s in info["shards"]:
            if s["tokens"] == 0:
                continue
            toks = np.memmap(d / s["file"], dtype=dtype, mode="r")
            starts = np.fromfile(d / s["index"], dtype="<i8")
            ends = np.append(starts[1:], len(toks))
            for a, b in zip(starts, ends):
                if max_docs is not None and n >= max_docs:
                    return
                n += 1
                yield np.asarray(toks[a:b], dtype=np.int64)


def _source_documents(
    spec: str, tokenizer, split: str, text_field: str, val_fraction: float, max_docs: int | None
) -> Iterator[list[int]]:
    seen: set[bytes] = set()
    bos, eos = None, tokenizer.eos_id is not None  # BOS by the tokenizer's own rule, text, EOS
    batch: list[str] = []
    n = 0
    any_doc = False
    for doc in iter_documents(spec, text_field=text_field):
        any_doc = True
        digest = doc_digest(doc.text)
        if digest[:8] in seen:  # exact duplicates are dropped, as data prepare does
            continue
        seen.add(digest[:8])
        if split != "all" and is_validation(digest, val_fraction) != (split == "val"):
            continue
        if max_docs is not None and n >= max_docs:
            break
        n += 1
        batch.append(doc.text)
        if len(batch) >= 64:
            yield from tokenizer.encode_batch(batch, bos=bos, eos=eos)
            batch = []
    if batch:
        yield from tokenizer.encode_batch(batch, bos=bos, eos=eos)
    if n == 0 and any_doc:
        raise UserError(
            f"--data {spec}: no document falls in the '{split}' split (documents go to the held-out split "
            f"by content hash with probability --val-fraction {val_fraction}). Evaluate on every document "
            "with --split all (fine when the source is held-out text of your own), or raise --val-fraction."
        )


def token_documents(
    data,
    tokenizer,
    *,
    split: str = "val",
    text_field: str = "text",
    val_fraction: float = 0.02,
    max_docs: int | None = None,
) -> Iterator:
    """Token ids of each document of `data` (a prepared directory or a source spec), in `split`."""
    split = normalize_split(split)
    if is_prepared(data):
        return _prepared_documents(data, tokenizer, split, max_docs)
    return _source_documents(str(data), tokenizer, split, text_field, val_fraction, max_docs)


# --------------------------------------------------------------------------------------------- evaluate


@dataclass
class Totals:
    """Running sums; float64 so that millions of tokens lose no digits."""

    nats: float = 0.0
    tokens: int = 0
    correct: int = 0
    text_nats: float = 0.0  # over targets that stand for bytes
    text_tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, nll: np.ndarray, hit: np.ndarray, y: np.ndarray, token_bytes: np.ndarray) -> None:
        keep = y != -100
        nb = token_bytes[np.where(keep, y, 0)] * keep
        self.nats += float(nll[keep].astype(np.float64).sum())
        self.tokens += int(keep.sum())
        self.correct += int(hit[keep].sum())
        self.text_nats += float(nll[nb > 0].astype(np.float64).sum())
        self.text_tokens += int((nb > 0).sum())
        self.bytes += int(nb.sum())

    def metrics(self) -> dict:
        loss = self.nats / self.tokens if self.tokens else float("nan")
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if self.tokens else float("nan"),
            "bits_per_byte": self.text_nats / (math.log(2) * self.bytes) if self.bytes else float("nan"),
            "accuracy": self.correct / self.tokens if self.tokens else float("nan"),
            "tokens": self.tokens,
            "text_tokens": self.text_tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


def auto_batch_size(seq_len: int, vocab_size: int, budget_bytes: float = 256e6) -> int:
    """Rows per forward pass so that the (B, T, V) logits stay well within budget_bytes."""
    return int(max(1, min(32, budget_bytes // (2 * 4 * seq_len * vocab_size))))


def score_documents(
    model,
    documents: Iterable,
    token_bytes: np.ndarray,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    pad_id: int = 0,
    progress: bool = False,
    total: int | None = None,
) -> Totals:
    """Sum nats, hits and bytes over `documents` (token id sequences), window by window."""
    cfg = model.config
    seq_len = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    if seq_len < 1:
        raise UserError(f"--seq-len {seq_len}: must be at least 1")
    batch_size = batch_size or auto_batch_size(seq_len, cfg.vocab_size)
    token_bytes = np.asarray(token_bytes, dtype=np.int64)
    if len(token_bytes) < cfg.vocab_size:  # the model's vocabulary may be padded past the tokenizer's
        token_bytes = np.pad(token_bytes, (0, cfg.vocab_size - len(token_bytes)))
    tot = Totals()
    bar = tqdm(
        total=max_tokens or total,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
        desc="evaluate",
    )
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        # Longest first, so that each batch holds windows of similar length (little padding).
        pending.sort(key=lambda r: -len(r[0]))
        for i in range(0, len(pending), batch_size):
            chunk = pending[i : i + batch_size]
            nll, hit = forward_scores(model, chunk, pad_id)
            for (_, y), n_, h_ in zip(chunk, nll, hit):
                tot.add(n_, h_, y, token_bytes)
                bar.update(int((y != -100).sum()))
        pending.clear()

    scheduled = 0
    for ids in documents:
        ids = np.asarray(ids, dtype=np.int64)
        if max_tokens is not None:
            if scheduled >= max_tokens:
                break
            ids = ids[: max_tokens - scheduled + 1]
        if len(ids) < 2:
            continue
        if ids.max(initial=0) >= cfg.vocab_size:
            raise UserError(
                f"token id {int(ids.max())} is outside the model's vocabulary of {cfg.vocab_size}"
            )
        tot.documents += 1
        scheduled += len(ids) - 1
        pending.extend(_rows(ids, seq_len, stride))
        if len(pending) >= 8 * batch_size:
            flush()
    flush()
    bar.close()
    return tot


def evaluate_lm(
    model,
    tokenizer,
    data,
    *,
    split: str = "val",
    max_tokens: int | None = None,
    max_docs: int | None = None,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.02,
    progress: bool = False,
) -> dict:
    """Loss, perplexity, bits per byte and next-token accuracy of `model` (its `tokenizer` counts the
    bytes) on `data` (a `data prepare` directory or a source spec); see the module docstring.

    split: val (held-out documents, default), train or all. max_tokens: stop after scoring this many
    targets. seq_len: window length (default the model's context). stride: tokens each later window
    moves (default seq_len: windows do not overlap).
    """
    tok = tokenizer
    if tok is None:
        raise UserError(
            "this checkpoint has no tokenizer (tokenizer.json): bits per byte needs one to count bytes. "
            "Copy the tokenizer files into the checkpoint directory."
        )
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    if stride is not None and not 1 <= stride <= seq_len:
        raise UserError(f"--stride {stride}: must be between 1 and the window length {seq_len}")
    split = normalize_split(split)
    docs = token_documents(
        data, tok, split=split, text_field=text_field, val_fraction=val_fraction, max_docs=max_docs
    )
    total = None
    if is_prepared(data):
        meta = read_meta(Path(os.path.expanduser(str(data))))
        names = ["val", "train"] if split == "all" else [split]
        # targets = tokens - documents
        total = sum(
            meta["splits"][s]["tokens"] - meta["splits"][s]["documents"] for s in names if s in meta["splits"]
        )
    t0 = time.perf_counter()
    tot = score_documents(
        model,
        docs,
        tok.token_bytes(),
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens,
        pad_id=tok.pad_id if tok.pad_id is not None else 0,
        progress=progress,
        total=total,
    )
    seconds = time.perf_counter() - t0
    if tot.tokens == 0:
        raise UserError(f"--data {data}: no tokens to score (every document is shorter than 2 tokens)")
    return {
        "checkpoint": getattr(model, "name_or_path", None),  # set by lmforge.load
        "data": str(data),
        "split": split,
        **tot.metrics(),
        "seq_len": seq_len,
        "stride": stride or seq_len,
        "max_tokens": max_tokens,
        "dtype": str(model.tok_emb.weight.dtype).replace("torch.", ""),
        "device": str(model.tok_emb.weight.device),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tot.tokens / max(seconds, 1e-9), 1),
    }


def format_metrics(r: dict) -> str:
    """A short readable table of an evaluate_lm result."""
    rows = [
        ["loss (nats/token)", f"{r['loss']:.4f}"],
        ["perplexity", f"{r['perplexity']:.3f}"],
        ["bits per byte", f"{r['bits_per_byte']:.4f}"],
        ["next-token accuracy", f"{100 * r['accuracy']:.2f}%"],
        ["documents", f"{r['documents']:,}"],
        ["tokens scored", f"{r['tokens']:,}"],
        ["bytes", f"{r['bytes']:,}"],
        ["window / stride", f"{r['seq_len']} / {r['stride']}"],
        ["speed", f"{r['tokens_per_s']:,.0f} tokens/s ({r['seconds']:.1f}s)"],
    ]
    head = f"{r['checkpoint'] or 'model'} on {r['data']} ({r['split']} split)"
    return head + "\n" + format_table(["metric", "value"], rows)
