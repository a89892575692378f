"""`lmforge tokenizer train`: train a tokenizer on any source spec and report its compression.

It lives in `data/` because it reads sources; `lmforge.tokenizer` itself imports nothing of lmforge's
data side. The documents of the validation split (fixed by content hash, as in `data prepare`)
are held out of training and used to measure compression (bytes per token), so the figure is not
flattered by text the tokenizer was fitted to.
"""

from __future__ import annotations

import os
import sys
import time

from lmforge.data.document import doc_digest, is_validation
from lmforge.data.sources import SourceStats, check_source, iter_documents
from lmforge.outputs import check_output
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, compression, train_tokenizer
from lmforge.utils import UserError, human_bytes

HELD_OUT_BYTES = 2 << 20  # enough text for a stable bytes-per-token figure


def train_tokenizer_on(
    data: str,
    vocab_size: int,
    out: str | os.PathLike | None = None,
    *,
    text_field: str = "text",
    max_docs: int | None = None,
    max_chars: int | None = None,
    val_fraction: float = 0.02,
    special_tokens: list[str] | None = None,
    model_max_length: int = 2048,
    strict: bool = False,
    force: bool = False,
    verbose: bool = True,
) -> tuple[Tokenizer, dict]:
    """Train on the train split of `data`, save to `out` (if given); return (tokenizer, report).

    Args:
        data: python-docs, python-stdlib or embedded (built in), c4, hf:owner/name[:config][@split], or a
            file/folder/glob of .txt .md .json .jsonl .parquet (.gz/.zst too)
        vocab_size: vocabulary size including 256 byte tokens and the special tokens (e.g. 8192)
        out: directory to write tokenizer.json and tokenizer_config.json
        max_docs: read at most this many documents
        max_chars: stop reading after this many characters of text
        val_fraction: share of documents (by content hash) in the validation split
        model_max_length: model_max_length written to tokenizer_config.json
        strict: stop at the first malformed JSON line instead of skipping it
        force: write into an --out that holds something other than a tokenizer (a model's tokenizer is
            replaced; a tokenizer is always replaced)
    """
    say = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)
    if out is not None:  # retraining into a tokenizer folder replaces it (a documented re-run); nothing else
        check_output(out, "tokenizer", force=force, inputs=(data,), same_kind_ok=True)
    specials = SPECIAL_TOKENS if special_tokens is None else special_tokens
    if vocab_size < 256 + len(specials):  # fail before reading any data
        train_tokenizer([], vocab_size, special_tokens=specials)
    check_source(data)
    stats = SourceStats()
    held_out: list[str] = []
    fallback: list[str] = []  # training text to measure on when the split gives no held-out text
    held = fall = 0
    n_chars = n_bytes = n_docs = 0

    def train_docs():
        nonlocal held, fall, n_chars, n_bytes, n_docs
        for doc in iter_documents(data, text_field=text_field, strict=strict, stats=stats, max_docs=max_docs):
            raw = doc.text.encode("utf-8")
            if is_validation(doc_digest(raw), val_fraction):
                if held < HELD_OUT_BYTES:
                    held_out.append(doc.text)
                    held += len(raw)
                continue
            if fall < HELD_OUT_BYTES:
                fallback.append(doc.text)
                fall += len(raw)
            n_chars += len(doc.text)
            n_bytes += len(raw)
            n_docs += 1
            yield doc.text
            if max_chars is not None and n_chars >= max_chars:
                return

    t0 = time.perf_counter()
    tok = train_tokenizer(
        train_docs(),
        vocab_size,
        special_tokens=specials,
        model_max_length=model_max_length,
        show_progress=verbose,
    )
    seconds = time.perf_counter() - t0
    if n_bytes == 0:
        raise UserError(f"--data {data}: every document fell in the held-out split; use --val-fraction 0.")
    comp = compression(tok, held_out or fallback)
    report = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": vocab_size,
        "train_documents": n_docs,
        "train_bytes": n_bytes,
        "seconds": round(seconds, 2),
        "bytes_per_token": round(comp["bytes_per_token"], 3),
        "measured_on": "held-out documents" if held_out else "training documents (no held-out split)",
        "measured_bytes": comp["bytes"],
        "hash": tok.hash,
    }
    if out is not None:
        tok.save(out)
    for line in stats.summary():
        say(line)
    if tok.vocab_size < vocab_size:
        say(
            f"note: the corpus only supports {tok.vocab_size} tokens (asked for {vocab_size}): "
            "every pair that occurs was merged. Use more text for a larger vocabulary."
        )
    say(
        f"trained a {tok.vocab_size}-token byte-level BPE on {human_bytes(n_bytes)} in {seconds:.1f}s; "
        f"compression {report['bytes_per_token']:.2f} bytes/token on {human_bytes(comp['bytes'])} of "
        f"{report['measured_on']}" + (f" -> {out}" if out is not None else "")
    )
    return tok, report
