"""`generate` and `stream`: prompts in, text (or token ids) out, in the shape they came in.

    lm = lmforge.load("runs/quickstart/final")
    generate(lm.model, lm.tokenizer, "def add(a, b):", max_new_tokens=32, temperature=0)   # -> str
    generate(model, tok, ["a", "b"], temperature=0.8, seed=0)           # -> [str, str]
    generate(model, None, [1, 2, 3], max_new_tokens=8)                  # token ids in -> generated ids out
    for piece in stream(model, tok, "Once upon a time", stop=["\\n\\n"]):
        print(piece, end="", flush=True)

`lm.generate(...)` / `lm.stream(...)` are the same with the LM's model and tokenizer. The model and its
draft are Transformers the caller loaded (lmforge.load turns paths into them); nothing here reads a path.

A batch of prompts decodes together (left-padded, see engine.py) and gives what each prompt gives
alone. A prompt whose length plus max_new_tokens exceeds the model's context is an error naming both
numbers, unless truncate="left" asks to drop its oldest tokens (a leading BOS is kept).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sequence import Sequence
from lmforge.infer.speculative import SpeculativeDecoder
from lmforge.utils import UserError

_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass
class Completion:
    """One generated sample with its details (`generate(..., details=True)`)."""

    text: str | None  # None when the model has no tokenizer
    token_ids: list[int]  # generated ids (a final stop token included)
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    stats: dict  # timings and counts of the whole call; acceptance_rate with a draft model
    logprobs: list | None = None  # TokenLogprob per generated token (with logprobs=N)
    prompt_logprobs: list | None = None  # TokenLogprob | None per prompt token (with prompt_logprobs=N)


def make_params(params: SamplingParams | None = None, **kwargs) -> SamplingParams:
    """SamplingParams from an object and/or keyword arguments (unknown names are a UserError)."""
    unknown = sorted(set(kwargs) - _FIELDS)
    if unknown:
        raise UserError(
            f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}"
        )
    if params is None:
        return SamplingParams(**kwargs)
    return dataclasses.replace(params, **kwargs) if kwargs else params


def encode_prompts(prompt, tokenizer) -> tuple[list[list[int]], bool, bool]:
    """Normalise a prompt argument to (list of id lists, single prompt?, text mode?)."""
    if torch.is_tensor(prompt):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        prompts, single, text = [prompt], True, True
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts, single, text = list(prompt), False, True
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)], True, False
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
        return [list(p) for p in prompt], False, False
    else:
        raise UserError(
            "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
        )
    if tokenizer is None:
        raise UserError("this model has no tokenizer (no tokenizer.json in its directory): pass token ids")
    # encode_prompt: the tokenizer's one BOS rule, shared with serve
    return [tokenizer.encode_prompt(p) for p in prompts], single, text


def fit_context(
    ids: list[int], max_new_tokens: int, context: int, truncate: str | None, bos_id=None
) -> list[int]:
    """The prompt, or an error when prompt + max_new_tokens exceeds the context (unless truncate="left")."""
    if truncate not in (None, "none", "left"):
        raise UserError(f"truncate={truncate!r}: choose 'left' (drop the oldest prompt tokens) or None")
    n = len(ids)
    if n + max_new_tokens <= context:
        return ids
    if truncate != "left":
        raise UserError(
            f"prompt of {n} tokens + max_new_tokens={max_new_tokens} = {n + max_new_tokens} tokens "
            f"exceeds the model's context of {context} tokens; shorten the prompt, lower "
            "max_new_tokens, or pass truncate='left' (--truncate left) to drop the oldest tokens"
        )
    keep = context - max_new_tokens
    head = [ids[0]] if bos_id is not None and ids and ids[0] == bos_id else []
    if keep - len(head) < 1:
        raise UserError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context "
            f"of {context} tokens; lower max_new_tokens"
        )
    return head + ids[n - (keep - len(head)) :]


def _run(
    model,
    tok,
    prompt,
    params,
    *,
    draft=None,
    draft_tokens=4,
    truncate=None,
    compile=None,
    kv_cache_memory=None,
):
    """Shared by generate and stream: yields each Sequence whenever it gets new tokens, then the list."""
    prompts, single, text = encode_prompts(prompt, tok)
    ctx = model.config.max_seq_len
    bos = tok.bos_id if tok is not None else model.config.bos_token_id
    prompts = [fit_context(p, params.max_new_tokens, ctx, truncate, bos) for p in prompts]
    seqs = [Sequence(p, params, id=(i, j)) for i, p in enumerate(prompts) for j in range(params.num_samples)]
    device = model.tok_emb.weight.device
    # One generator per call, shared by all rows: a seed reproduces the whole call.
    gen = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
    if draft is not None:
        spec = SpeculativeDecoder(model, draft, tok, draft_tokens)
        for s in seqs:
            yield from spec.run(s, gen)
        stats = dict(spec.stats, acceptance_rate=spec.acceptance_rate)
    else:
        engine = Engine(
            model,
            tok,
            max_batch=len(seqs),
            max_len=max(map(len, prompts)) + params.max_new_tokens,
            compile=compile,
            kv_cache_memory=kv_cache_memory,
        )
        yield from engine.add(seqs, gen)
        while engine.active:
            yield from engine.step()
        stats = dict(engine.stats)
    stats["decode_tok_s"] = stats["decode_tokens"] / max(stats["decode_s"], 1e-9)
    stats["prefill_tok_s"] = stats["prefill_tokens"] / max(stats["prefill_s"], 1e-9)
    yield (seqs, single, text, stats)


def generate(
    model,
    tokenizer,
    prompt,
    params: SamplingParams | None = None,
    *,
    draft=None,
    draft_tokens: int = 4,
    truncate: str | None = None,
    details: bool = False,
    compile: bool | None = None,
    kv_cache_memory=None,
    **kwargs,
):
    """Generate from `prompt` (a string, a list of strings, token ids, or a list of id lists) with
    `model` (a Transformer) and `tokenizer` (None: prompts must be token ids).

    kwargs are SamplingParams fields: max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, logit_bias ({token id: bias}), seed,
    num_samples, stop, stop_token_ids, ignore_eos, logprobs / prompt_logprobs (see Completion),
    grammar (lmforge.infer.grammar.Grammar: JSON schema, regex, choice).
    draft: a smaller Transformer (same vocabulary) for speculative decoding.
    truncate: "left" to drop the oldest prompt tokens when prompt + max_new_tokens exceeds the context.
    details: return Completion objects (ids, finish reason, timings, logprobs) instead of text.
    kv_cache_memory: the KV cache's budget (bytes, "2GiB", a fraction of free memory); a batch whose
        cache does not fit is a UserError naming both numbers (default: all the available memory).

    Returns text for text prompts, generated ids for id prompts; a list for a list of prompts; with
    num_samples > 1, each prompt gives a list of samples.
    """
    params = make_params(params, **kwargs)
    *_, (seqs, single, text, stats) = _run(
        model,
        tokenizer,
        prompt,
        params,
        draft=draft,
        draft_tokens=draft_tokens,
        truncate=truncate,
        compile=compile,
        kv_cache_memory=kv_cache_memory,
    )
    if details:
        outs = [
            Completion(
                s.text if tokenizer is not None else None,
                s.token_ids,
                s.finish_reason,
                len(s.prompt_ids),
                stats,
                s.logprobs if params.logprobs is not None else None,
                s.prompt_logprobs if params.prompt_logprobs is not None else None,
            )
            for s in seqs
        ]
    else:
        outs = [s.text if text else s.token_ids for s in seqs]
    n = params.num_samples
    grouped = [outs[i : i + n] if n > 1 else outs[i] for i in range(0, len(outs), n)]
    return grouped[0] if single else grouped


class TextStream:
    """What `stream` returns: iterate it for the pieces; afterwards `.finish_reason`, `.token_ids` and
    `.stats` (timings; acceptance_rate with a draft model) describe the generation."""

    def __init__(self, model, tokenizer, prompt, params: SamplingParams, **run_kw):
        self.sequence: Sequence | None = None
        self.stats: dict = {}
        self._it = self._pieces(model, tokenizer, prompt, params, run_kw)

    @property
    def token_ids(self) -> list[int]:
        return self.sequence.token_ids if self.sequence is not None else []

    @property
    def finish_reason(self) -> str | None:
        return self.sequence.finish_reason if self.sequence is not None else None

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def _pieces(self, model, tokenizer, prompt, params, run_kw):
        has_text, sent = tokenizer is not None, 0
        for item in _run(model, tokenizer, prompt, params, **run_kw):
            if not isinstance(item, Sequence):
                self.stats = item[-1]
                break
            self.sequence = item
            if has_text:
                piece = item.pop_text()
                if piece:
                    yield piece
            else:
                yield from item.token_ids[sent:]
                sent = len(item.token_ids)


def stream(
    model,
    tokenizer,
    prompt,
    params: SamplingParams | None = None,
    *,
    draft=None,
    draft_tokens: int = 4,
    truncate: str | None = None,
    compile: bool | None = None,
    kv_cache_memory=None,
    **kwargs,
) -> TextStream:
    """Yield the generation of one prompt as it is decoded: text pieces (never a broken character, and
    never text that a stop string would cut), or token ids when the model has no tokenizer.
    `"".join(stream(...)) == generate(...)` for the same arguments and seed. Options as in generate."""
    params = make_params(params, **kwargs)
    if params.num_samples != 1:
        raise UserError("stream() generates one sample; use generate(..., num_samples=n) for several")
    prompts, _, _ = encode_prompts(prompt, tokenizer)
    if len(prompts) != 1:
        raise UserError("stream() takes one prompt; use generate() for a batch")
    return TextStream(
        model,
        tokenizer,
        prompt,
        params,
        draft=draft,
        draft_tokens=draft_tokens,
        truncate=truncate,
        compile=compile,
        kv_cache_memory=kv_cache_memory,
    )
