"""Grammar-constrained decoding: JSON (any object, or a JSON schema), regular expressions, a choice of
strings, Lark grammars, through llguidance (the `structured` extra).

    g = Grammar.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    lm.generate("...", grammar=g)                  # or SamplingParams(grammar=g) for the engine

A Grammar is only the compiled description (llguidance's grammar text), checked when it is built so
that a bad schema or regex is a UserError before any request runs. Each constrained sequence gets its
own `Matcher` (the parser state) from `grammar.matcher(tokenizer, vocab_size)`; every engine step asks
it for the tokens that may come next (a bitmask over the vocabulary: `allowed_mask`), and feeds it the
token that was sampled. Constrained and free rows share the step: free rows get an all-True mask row.

Why llguidance: a mask costs ~0.1-0.25 ms per token on a shared 2-core CPU with 8k-32k-token BPE
vocabularies (a small share of any real model's decode step), outlines-core is ~3x slower, xgrammar
~2-3x faster but pulls in torch/triton/transformers pins; llguidance is one dependency-free wheel that
covers JSON schema, regex, Lark and choices (bench/grammar_mask.py, docs/benchmarks.md).

Ending: a sequence ends when its grammar is complete and nothing else may follow (`Matcher.stopped`),
or when it samples a stop token, which the mask allows exactly when the grammar could end here.
JSON schemas are compiled with compact separators (no free whitespace), so a model cannot spend its
token budget on blanks.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch

from lmforge.utils import UserError

INSTALL = "pip install 'lmforge[structured]'"


def _llg():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise UserError(f"grammar-constrained decoding needs the llguidance package: {INSTALL}") from None
    return llguidance


class Grammar:
    """A constraint on the generated text; build one with the class methods below."""

    def __init__(self, kind: str, source, text: str):
        self.kind, self.source, self.text = kind, source, text  # text: llguidance's grammar definition
        msg = _llg().LLMatcher.validate_grammar(text)
        if msg and not msg.startswith("WARNING"):
            first = msg.strip().splitlines()[0] if msg.strip() else msg
            raise UserError(f"invalid {kind} for constrained decoding: {first}")

    def __repr__(self) -> str:
        src = json.dumps(self.source) if not isinstance(self.source, str) else self.source
        return f"Grammar.{self.kind}({src[:60]}{'...' if len(src) > 60 else ''})"

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"}, strict=False)

    @classmethod
    def json_schema(cls, schema, strict: bool = True) -> Grammar:
        """JSON valid for `schema` (a dict, its JSON text, or a pydantic model class).
        strict: a schema keyword llguidance does not support is an error (False: it is ignored)."""
        llg = _llg()
        if hasattr(schema, "model_json_schema"):  # a pydantic model class
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise UserError(f"json_schema: not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise UserError(f"json_schema must be a JSON object (a dict), not {type(schema).__name__}")
        opts = {"whitespace_flexible": False, "lenient": not strict}
        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema, defaults=opts)
        except (ValueError, TypeError) as e:
            raise UserError(f"invalid json_schema: {e}") from None
        return cls("json_schema", schema, text)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text that matches `pattern` (Rust regex syntax, anchored at both ends)."""
        if not isinstance(pattern, str):
            raise UserError("regex: the pattern must be a string")
        return cls("regex", pattern, _llg().LLMatcher.grammar_from_regex(pattern))

    @classmethod
    def choice(cls, options) -> Grammar:
        """Exactly one of the strings in `options`."""
        if (
            not isinstance(options, (list, tuple))
            or not options
            or not all(isinstance(o, str) for o in options)
        ):
            raise UserError("choice: give a non-empty list of strings")
        lark = "start: " + " | ".join(json.dumps(o) for o in options)
        return cls("choice", list(options), _llg().LLMatcher.grammar_from_lark(lark))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (its `start` rule is the whole output)."""
        if not isinstance(text, str):
            raise UserError("lark: the grammar must be a string")
        return cls("lark", text, _llg().LLMatcher.grammar_from_lark(text))

    def matcher(self, tokenizer, vocab_size: int) -> Matcher:
        """A fresh parser state for one sequence over the model's vocabulary (ids past the tokenizer's
        own vocabulary are never allowed)."""
        llg = _llg()
        m = llg.LLMatcher(llg_tokenizer(tokenizer, vocab_size), self.text, log_level=0)
        if m.is_error():
            raise UserError(f"{self!r} cannot be used with this tokenizer: {m.get_error()}")
        return Matcher(m, vocab_size)


# ------------------------------------------------------------------------------------ tokenizer bridge
_TOKENIZERS: dict = {}
_LOCK = threading.Lock()


def _json_text(tokenizer) -> str:
    """tokenizer.json text of an lmforge Tokenizer, a `tokenizers.Tokenizer` or a fast HF tokenizer."""
    for get in (
        lambda t: t._json,
        lambda t: t._tk.to_str(),
        lambda t: t.backend_tokenizer.to_str(),
        lambda t: t.to_str(),
    ):
        try:
            text = get(tokenizer)
        except AttributeError:
            continue
        if isinstance(text, str):
            return text
    raise UserError(
        f"constrained decoding needs a tokenizer with a tokenizer.json, not {type(tokenizer).__name__}"
    )


def llg_tokenizer(tokenizer, vocab_size: int):
    """llguidance's tokenizer for ours, built once per (tokenizer content, vocabulary size)."""
    text = _json_text(tokenizer)
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        stops = getattr(tokenizer, "stop_ids", None) or []
        stops = stops() if callable(stops) else stops
        eos = min(stops) if stops else None
    key = (getattr(tokenizer, "hash", None) or hash(text), vocab_size, eos)
    with _LOCK:
        lt = _TOKENIZERS.get(key)
        if lt is None:
            lt = _llg().LLTokenizer(text, n_vocab=vocab_size, eos_token=eos)
            _TOKENIZERS[key] = lt
    return lt


# --------------------------------------------------------------------------------------- parser state
class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, m, vocab_size: int):
        self._m, self.V = m, vocab_size

    @property
    def accepting(self) -> bool:
        """The output so far is complete (a stop token may come next)."""
        return self._m.is_accepting()

    @property
    def stopped(self) -> bool:
        """Complete, and nothing may follow: the sequence ends here."""
        return self._m.is_stopped() or self._m.is_error()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a (n, ceil(V / 32)) int32 CPU bitmask."""
        _llg().torch.fill_next_token_bitmask(self._m, bitmask, row)

    def consume(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar did not allow it."""
        return self._m.consume_token(int(token))


def allowed_mask(rows: list[tuple[int, Matcher, frozenset]], n: int, V: int, device) -> torch.Tensor:
    """(n, V) bool: True where row j may take token t. rows: (j, matcher, stop ids) of the constrained
    rows; every other row allows everything. A row's stop ids are allowed when its grammar is complete
    (llguidance forbids them otherwise: they are not text any grammar matches). Unpacked with numpy:
    a few microseconds, where torch's small ops cost tens each."""
    k = len(rows)
    bm = torch.full((k, (V + 31) // 32), -1, dtype=torch.int32)
    for i, (_, m, _) in enumerate(rows):
        m.fill(bm, i)
    # Token 32 w + b is bit b of int32 word w: little-endian bytes, bits unpacked least significant first.
    bits = np.unpackbits(bm.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V].view(np.bool_)
    for i, (_, m, stops) in enumerate(rows):
        if stops and m.accepting:
            bits[i, [t for t in stops if 0 <= t < V]] = True
    if k < n:
        full = np.ones((n, V), dtype=np.bool_)
        full[[j for j, _, _ in rows]] = bits
        bits = full
    return torch.from_numpy(np.ascontiguousarray(bits)).to(device, non_blocking=True)
