"""`lmforge data prepare`: documents -> token shards (`uint16`/`uint32` memmaps) + `meta.json`.

The pipeline streams: the main process reads documents, hashes them (exact duplicates are dropped,
the train/validation split is fixed by the same hash), and groups them into ~1 MB chunks; worker
processes tokenize chunks (BOS + text + EOS per document; special-token strings inside a
document, "<|user|>" say, are encoded as plain text, not as the special token); the main process writes the results in
submission order, so the output is byte-identical whatever `workers` is. At most a few chunks are in
flight, so memory does not grow with the corpus; the one thing that does is the duplicate index,
8 bytes per distinct document (80 MB per 10 M documents).

Output directory:
    meta.json             tokenizer hash, dtype, counts, duplicates, split, shards, input fingerprint
    train_00000.bin ...   little-endian token ids, documents back to back
    train_00000.idx ...   little-endian int64 start offset of each document in the .bin
    val_00000.bin/.idx    the validation split, same layout
    tokenizer.json, tokenizer_config.json   the tokenizer that made the shards (found by pretrain/evaluate)

A shard holds at most `shard_tokens` tokens (a longer document gets a shard of its own) and never
splits a document. The whole directory is written next to `out` and renamed into place at the end,
so a failed or interrupted run leaves a previous preparation untouched (and the next run removes the
temporary a killed one left). Running again with the same input, options and tokenizer finds the
fingerprint in `meta.json` and reuses the result; a different preparation, or anything else, already
in `out` is replaced only with `force` (lmforge.outputs.check_output, the rule every command follows).

Memory is bounded for every input: sources stream (a big text file becomes documents of at most
sources.TEXT_BLOCK, a JSON array is parsed item by item), chunks are ~CHUNK_BYTES, and a worker
encodes ~BATCH_CHARS at a time. One big file keeps every worker busy, since documents, not files,
are what is handed out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from itertools import chain
from pathlib import Path

import numpy as np

from lmforge.data import _encode_worker, embedded
from lmforge.data.document import doc_digest, is_validation
from lmforge.data.sources import SourceStats, check_source, is_hub, iter_documents, resolve_files
from lmforge.outputs import check_output
from lmforge.tokenizer import Tokenizer
from lmforge.utils import UserError, atomic_dir, human_count, remove_stale_temporaries

FORMAT = "lmforge-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 M tokens: 256 MB of uint16 per shard
CHUNK_BYTES = 1 << 20  # text per task sent to a worker


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits, else uint32; always little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ------------------------------------------------------------------------------------ dedup
class SeenHashes:
    """Set of 64-bit document hashes in sorted numpy runs: 8 bytes per entry instead of ~70 for a set.

    Runs are merged like a binary counter, so there are O(log n) of them and a lookup is a few
    binary searches.
    """

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Mark `keys` seen; return a mask of those that are new (first occurrence within `keys` too)."""
        _, first = np.unique(keys, return_index=True)
        new = np.zeros(len(keys), dtype=bool)
        new[first] = True
        for run in self.runs:
            pos = np.searchsorted(run, keys).clip(max=len(run) - 1)
            new &= run[pos] != keys
        fresh = np.sort(keys[new])
        if len(fresh):
            self.runs.append(fresh)
            while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
                b, a = self.runs.pop(), self.runs.pop()
                self.runs.append(np.sort(np.concatenate([a, b]), kind="mergesort"))
        return new


# ------------------------------------------------------------------------------------ writing
class ShardWriter:
    """Appends whole documents to `<split>_NNNNN.bin` / `.idx`, starting a new shard when one is full."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.dir, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._bin = self._idx = None
        self._tokens = self._docs = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}"
        self.shards.append({"file": f"{name}.bin", "index": f"{name}.idx", "tokens": 0, "documents": 0})
        self._bin = open(self.dir / f"{name}.bin", "wb")
        self._idx = open(self.dir / f"{name}.idx", "wb")
        self._tokens = self._docs = 0

    def _close(self) -> None:
        if self._bin is not None:
            self._bin.close()
            self._idx.close()
            self.shards[-1].update(tokens=self._tokens, documents=self._docs)
            self._bin = self._idx = None

    def add(self, flat: np.ndarray, lens: np.ndarray) -> None:
        pos, d = 0, 0
        while d < len(lens):
            if self._bin is None:
                self._open()
            cum = np.cumsum(lens[d:])
            k = int(np.searchsorted(cum, self.shard_tokens - self._tokens, side="right"))
            if k == 0 and self._tokens == 0:
                k = 1  # a document longer than a shard gets a shard of its own
            if k == 0:
                self._close()
                continue
            n = int(cum[k - 1])
            starts = self._tokens + np.concatenate([[0], cum[: k - 1]])
            self._bin.write(flat[pos : pos + n].astype(self.dtype, copy=False).tobytes())
            self._idx.write(starts.astype("<i8").tobytes())
            self._tokens += n
            self._docs += k
            pos, d = pos + n, d + k
            if self._tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> dict:
        self._close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


# ------------------------------------------------------------------------------------ fingerprint
def input_fingerprint(data: str, options: dict) -> str:
    """What the result depends on: the files (path, size, mtime) or corpus identity, and the options."""
    if embedded.is_embedded(data):
        source = embedded.identity(data)
    elif is_hub(data):
        source = {"hub": data}  # a hub dataset is identified by its name only
    else:
        source = {
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in resolve_files(data)]
        }
    blob = json.dumps({"source": source, "options": options, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_meta(directory: str | os.PathLike) -> dict | None:
    p = Path(directory) / "meta.json"
    if not p.is_file():
        return None
    meta = json.loads(p.read_text())
    return meta if meta.get("format") == FORMAT else None


def _complete(directory: Path, meta: dict) -> bool:
    size = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        for s in split["shards"]:
            f = directory / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * size:
                return False
    return True


# ------------------------------------------------------------------------------------ prepare
def prepare(
    data: str,
    tokenizer: str | os.PathLike | Tokenizer,
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    val_fraction: float = 0.02,
    text_field: str = "text",
    strict: bool = False,
    max_docs: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    progress: bool = True,
    verbose: bool = True,
    dtype: str | None = None,
) -> dict:
    """Tokenize `data` into shards under `out`; return `meta.json` plus this run's figures.

    `workers` processes tokenize in parallel (default: all cores; 1 = in this process).
    The result has "reused": True when a finished preparation of the same input was found.

    Args:
        data: python-docs, python-stdlib or embedded (built in), c4, hf:owner/name[:config][@split], or a
            file/folder/glob of .txt .md .json .jsonl .parquet (.gz/.zst too)
        out: directory for the shards and meta.json
        workers: tokenizer processes, at least 1 (default: all cores; 1 = in this process, on one core)
        val_fraction: share of documents (by content hash) in the validation split
        strict: stop at the first malformed JSON line instead of skipping it
        max_docs: read at most this many documents
        shard_tokens: tokens per shard file
        force: redo the preparation even if a finished one matches, or replace what --out holds
        progress: show a progress bar
    """
    say = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise UserError(
            f"--workers {workers}: must be at least 1 (leave it out to use all {os.cpu_count() or 1} cores)."
        )
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must be at least 0 and below 1 (0.02 is typical).")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens}: must be positive.")
    out = Path(out)
    dt = np.dtype(dtype).newbyteorder("<") if dtype else token_dtype(tok.vocab_size)
    if np.iinfo(dt).max < tok.vocab_size - 1:
        raise UserError(f"dtype {dt} cannot hold ids up to {tok.vocab_size - 1}; use uint32.")
    options = {
        "tokenizer_hash": tok.hash,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "max_docs": max_docs,
        "shard_tokens": shard_tokens,
        "dtype": dt.str,
    }
    check_source(data)  # a bad path or an unreachable hub fails here, before anything is started
    fingerprint = input_fingerprint(data, options)
    inputs = [None if embedded.is_embedded(data) or is_hub(data) else data]
    inputs.append(None if isinstance(tokenizer, Tokenizer) else tokenizer)
    # Anything but a preparation needs --force; a preparation is ours to reuse or replace (below).
    check_output(out, "data", force=force, inputs=inputs, same_kind_ok=True)
    old = read_meta(out)
    same = old is not None and old.get("fingerprint") == fingerprint
    if same and not force and _complete(out, old):
        remove_stale_temporaries(out)  # what a killed run left; the write path does it in atomic_dir
        say(
            f"reusing the finished preparation in {out} (same input, options and tokenizer; --force redoes it)"
        )
        return {**old, "reused": True}
    if old is not None and not same and not force:
        raise UserError(
            f"--out {out}: holds another data preparation (of {old.get('source')}, tokenizer "
            f"{old.get('tokenizer_hash')}); choose a new folder, or pass --force to replace it"
        )
    if old is not None:
        why = "is incomplete" if same and not force else "is replaced (--force)"
        say(f"the preparation in {out} {why}; it is rewritten only when this run finishes")

    workers = workers if workers is not None else (os.cpu_count() or 1)
    if is_hub(data) and max_docs is None:
        say(f"note: streaming all of {data} (no --max-docs); Ctrl-C stops without touching {out}")
    stats = SourceStats()
    t0 = time.perf_counter()
    n_bytes = {s: 0 for s in SPLITS}
    duplicates = 0
    with atomic_dir(out) as tmp:
        writers = {s: ShardWriter(tmp, s, dt, shard_tokens) for s in SPLITS}
        seen = SeenHashes()
        bar = _progress_bar(progress)

        def chunks():
            """Deduplicated, split chunks of about CHUNK_BYTES of text: (train texts, val texts), bytes."""
            nonlocal duplicates
            texts, keys, val, sizes, size = [], [], [], [], 0
            docs = iter_documents(data, text_field=text_field, strict=strict, stats=stats, max_docs=max_docs)
            for doc in chain(docs, [None]):
                if doc is not None:
                    raw = doc.text.encode("utf-8")
                    digest = doc_digest(raw)
                    texts.append(doc.text)
                    keys.append(int.from_bytes(digest[:8], "little"))
                    val.append(is_validation(digest, val_fraction))
                    sizes.append(len(raw))
                    size += len(raw)
                    if size < CHUNK_BYTES:
                        continue
                if not texts:
                    break
                new = seen.add_new(np.array(keys, dtype=np.uint64))
                duplicates += int((~new).sum())
                split = ([], [])
                for text, keep, v, nb in zip(texts, new, val, sizes):
                    if keep:
                        split[1 if v else 0].append(text)
                        n_bytes[SPLITS[1 if v else 0]] += nb
                yield split, size
                texts, keys, val, sizes, size = [], [], [], [], 0

        worker_rss = [0.0]

        def write(result, size):
            result, rss = result
            worker_rss[0] = max(worker_rss[0], rss)
            for s, (flat, lens) in zip(SPLITS, result):
                writers[s].add(flat, lens)
            bar.update(size)

        init_args = (tok._json, tok.bos_id, tok.eos_id)
        if workers == 1:
            _encode_worker.init(*init_args, single_thread=True, spawned=False)
            for split, size in chunks():
                write(_encode_worker.encode_chunk(split, dt.str), size)
        else:
            ctx = mp.get_context("spawn")  # fork after the Rust thread pool started is unsafe
            with ctx.Pool(workers, initializer=_encode_worker.init, initargs=(*init_args, True)) as pool:
                pending: deque = deque()
                for split, size in chunks():
                    pending.append((pool.apply_async(_encode_worker.encode_chunk, (split, dt.str)), size))
                    if len(pending) >= 2 * workers:  # bounded: never read far ahead of the writer
                        r, s = pending.popleft()
                        write(r.get(), s)
                while pending:
                    r, s = pending.popleft()
                    write(r.get(), s)
                pool.close()
                pool.join()
        bar.close()
        seconds = time.perf_counter() - t0
        splits = {s: {**writers[s].finish(), "bytes": n_bytes[s]} for s in SPLITS}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "source": data,
            "tokenizer_hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "dtype": dt.str,
            "text_field": text_field,
            "val_fraction": val_fraction,
            "max_docs": max_docs,
            "documents_read": stats.documents,
            "duplicates_removed": duplicates,
            "invalid_utf8": stats.invalid_utf8,
            "malformed_lines": stats.malformed,
            "empty_files": len(stats.empty_files),
            "splits": splits,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tok.save(tmp)  # the shards carry their tokenizer: training and evaluation find it here
    total = sum(n_bytes.values())  # bytes of UTF-8 text; MB below are 10^6 bytes, as everywhere here
    n_tok = sum(s["tokens"] for s in splits.values())
    run = {
        "reused": False,
        "seconds": round(seconds, 3),
        "mb_per_s": round(total / 1e6 / max(seconds, 1e-9), 3),
        "tokens_per_s": round(n_tok / max(seconds, 1e-9)),
        "workers": workers,
        "peak_rss_mb": round(_encode_worker.peak_rss_mb(), 1),
        "peak_worker_rss_mb": round(worker_rss[0], 1) if workers > 1 else None,
    }
    for line in stats.summary():
        say(line)
    say(
        f"prepared {human_count(meta['documents_read'])} documents ({duplicates} duplicates removed): "
        f"train {human_count(splits['train']['tokens'])} tokens in {len(splits['train']['shards'])} shard(s), "
        f"val {human_count(splits['val']['tokens'])} tokens; {total / 1e6:.2f} MB of text in {seconds:.1f}s "
        f"= {run['mb_per_s']:.2f} MB/s with {workers} worker(s); peak RSS {run['peak_rss_mb']:.0f} MB"
        + (f" (each worker {run['peak_worker_rss_mb']:.0f} MB)" if workers > 1 else "")
        + f" -> {out}"
    )
    if val_fraction > 0 and splits["val"]["documents"] == 0:
        say(
            f"warning: the validation split is empty; raise --val-fraction (now {val_fraction}) or add documents"
        )
    return {**meta, **run}


def _progress_bar(enabled: bool):
    from tqdm import tqdm

    return tqdm(
        unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing", disable=not enabled, leave=False
    )
