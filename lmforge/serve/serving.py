"""What the completions and chat handlers share: the served models, tokenizing off the event loop,
the context check, submitting to the scheduler, collecting or streaming the events, usage and logprobs.

A handler (completions.py, chat.py) turns its request into prompts (token ids) and SamplingParams,
then calls `run()`: non-streaming, it gets one `SeqOut` per sequence (text, finish reason, token count,
logprobs); streaming, it hands `stream()` a function that turns one sequence's new events into the
endpoint's chunk. Everything here runs on the asyncio loop and only waits: the model work happens in
the scheduler's thread (scheduler.py).

Tokenizing never stalls the loop: texts over _LONG_TEXT characters are encoded with the Rust
tokenizer's `encode_batch`, which releases the GIL, in a worker thread (`encode`, which holds it,
would freeze every stream for seconds on a multi-megabyte prompt). Before that, a text that cannot
fit the context whatever it tokenizes to (more characters than context x the longest token) is
refused at once.

Logprobs are the engine's (the model's log-softmax of the raw logits, before temperature, penalties,
logit_bias and grammar masks, as vLLM reports them by default); this module only names their tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from lmforge import kernels
from lmforge.infer.engine import Engine
from lmforge.serve import schema as S
from lmforge.serve.errors import APIError
from lmforge.serve.metrics import Metrics
from lmforge.serve.scheduler import Failure, NotAccepting, QueueFull, Request, Scheduler
from lmforge.utils import UserError

_LONG_TEXT = 20_000  # characters; longer texts are tokenized off the event loop


# ------------------------------------------------------------------------------------------- models
@dataclass
class ServedModel:
    """One model id: its weights behind an Engine (a LoRA adapter is a merged copy of the base)."""

    id: str
    engine: Engine
    tokenizer: object
    root: str
    parent: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int:
        """Tokens one request may hold (prompt + output): the engine's slots per row."""
        return self.engine.max_len

    @property
    def model_context(self) -> int:
        return self.engine.model.config.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def card(self) -> S.ModelCard:
        return S.ModelCard(
            id=self.id, created=self.created, root=self.root, parent=self.parent, max_model_len=self.context
        )


def _engine(model, tokenizer, max_batch: int, max_len: int | None, memory, prefix_cache: bool) -> Engine:
    """An engine for the server (idle rows at the end skipped) on `model` with its decode kernels
    installed, whose KV cache fits `memory` (kv_budget.plan_kv_cache; default: the machine)."""
    return Engine(
        kernels.install(model),
        tokenizer,
        max_batch=max_batch,
        max_len=max_len,
        kv_cache_memory=memory,
        prefix_cache=prefix_cache,
        skip_idle_tail=True,
    )


def cache_bytes(engine: Engine) -> int:
    c = engine.cache
    return sum(t.numel() * t.element_size() for t in [*c.k, *c.v])


def load_models(
    checkpoint,
    *,
    device: str = "auto",
    dtype=None,
    max_batch: int = 8,
    model_name: str | None = None,
    loras: list[tuple[str, str]] = (),
    max_len: int | None = None,
    kv_cache_memory=None,
    prefix_cache: bool = True,
) -> list[ServedModel]:
    """The base checkpoint plus one merged copy per LoRA adapter, each with an Engine of max_batch rows.

    max_len: KV slots per row (prompt + output of one request), default what kv_cache_memory allows up
    to the model's context; kv_cache_memory: bytes, '2GiB', or a fraction of free memory (default: a
    budget that fits the machine, see lmforge.infer.kv_budget); prefix_cache: reuse the K/V of prompt
    prefixes seen recently (a shared system prompt, the earlier turns of a conversation).
    Memory: every adapter costs a full copy of the weights plus its own KV cache.
    """
    import lmforge
    from lmforge.train.lora import is_adapter, load_lora_model

    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be >= 1")
    if max_len is not None and max_len < 2:
        raise UserError(f"--max-len {max_len}: must be >= 2 (a prompt token and a generated one)")
    memory = kv_cache_memory
    if memory is not None:
        from lmforge.infer.kv_budget import parse_memory

        try:
            parse_memory(memory)  # a typo fails before the (slow) model loading
        except UserError as e:
            raise UserError(f"--kv-cache-memory {memory!r}: {str(e).split(': ', 1)[-1]}") from None
    lm = lmforge.load(checkpoint, device=device, dtype=dtype)
    if lm.tokenizer is None:
        raise UserError(f"{checkpoint}: no tokenizer.json; serving needs the model's tokenizer")
    base_id = model_name or Path(checkpoint).resolve().name
    models = [
        ServedModel(
            base_id,
            _engine(lm.model, lm.tokenizer, max_batch, max_len, memory, prefix_cache),
            lm.tokenizer,
            str(checkpoint),
        )
    ]
    for name, adapter in loras:
        if not name or name in {m.id for m in models}:
            raise UserError(f"--lora {name}={adapter}: the model id {name!r} is empty or already taken")
        if not is_adapter(adapter):
            raise UserError(f"--lora {name}={adapter}: not a LoRA adapter directory (no adapter_config.json)")
        model = load_lora_model(adapter, base=checkpoint, device=lm.device, dtype=lm.dtype, merge=True).eval()
        models.append(
            ServedModel(
                name,
                _engine(model, lm.tokenizer, max_batch, max_len, memory, prefix_cache),
                lm.tokenizer,
                str(adapter),
                parent=base_id,
            )
        )
    return models


class State:
    """What the routes share (app.state.lmforge)."""

    def __init__(self, models: list[ServedModel], scheduler: Scheduler, metrics: Metrics):
        self.models = {m.id: m for m in models}
        self.default = models[0].id
        self.scheduler, self.metrics = scheduler, metrics
        self.max_batch = min(len(m.engine.rows) for m in models)

    def model(self, name: str | None) -> ServedModel:
        if name is None or name == "":
            return self.models[self.default]
        if name not in self.models:
            raise APIError(
                404,
                f"model {name!r} not found; available: {', '.join(self.models)}",
                "not_found_error",
                "model",
                "model_not_found",
            )
        return self.models[name]


def state_of(http: HTTPRequest) -> State:
    return http.app.state.lmforge


# ------------------------------------------------------------------------------------------- tokenizing
@lru_cache(maxsize=16)
def _longest_token_chars(tok) -> int:
    """Most characters one token can stand for (a byte is at least a character; special tokens by name)."""
    longest = int(tok.token_bytes().max()) if tok.vocab_size else 1
    for name in getattr(tok, "special_tokens", {}) or {}:
        longest = max(longest, len(str(name)))
    return max(longest, 1)


def check_chars(m: ServedModel, n_chars: int, param: str) -> None:
    """Refuse, without tokenizing, a text too long for the context whatever its tokens."""
    most = _longest_token_chars(m.tokenizer)
    if n_chars > m.context * most:
        raise APIError(
            400,
            f"{param} of {n_chars} characters is at least {-(-n_chars // most)} tokens (no token is longer "
            f"than {most} characters), more than the {m.context} tokens a request may hold; shorten it",
            param=param,
            code="context_length_exceeded",
        )


async def encode_prompt(tok, text: str, add_special_tokens: bool = True) -> list[int]:
    """A completion prompt's ids, as lm.generate encodes it (the tokenizer's BOS rule)."""
    if len(text) <= _LONG_TEXT:
        if not add_special_tokens:
            return tok.encode(text, bos=False, eos=False)
        return list(tok.encode_prompt(text))
    prefix = list(tok.encode_prompt("")) if add_special_tokens else []  # BOS, if the rule adds one
    ids = (await asyncio.to_thread(tok.encode_batch, [text], bos=False, eos=False))[0]
    return prefix + ids


async def encode_text(tok, text: str) -> list[int]:
    """Ids of text that carries its own special tokens (a rendered chat template)."""
    if len(text) <= _LONG_TEXT:
        return tok.encode(text, bos=False, eos=False)
    return (await asyncio.to_thread(tok.encode_batch, [text], bos=False, eos=False))[0]


def check_ids(m: ServedModel, ids: list[int], param: str) -> None:
    bad = [i for i in ids if i >= m.vocab_size]
    if bad:
        raise APIError(
            400,
            f"{param}: token id {bad[0]} is outside the vocabulary (0..{m.vocab_size - 1})",
            param=param,
            code="invalid_value",
        )


def check_fits(
    m: ServedModel, prompts: list[list[int]], max_tokens: int | None, what: str, max_param: str
) -> int:
    """max_tokens, or the room the longest prompt leaves; 400 with both numbers when it does not fit."""
    longest = max(len(p) for p in prompts)
    ctx = m.context
    where = (
        f"the model's context of {ctx} tokens"
        if ctx >= m.model_context
        else f"the server's KV cache of {ctx} tokens per request (--max-len / --kv-cache-memory; the "
        f"model's context is {m.model_context})"
    )
    if longest >= ctx:
        raise APIError(
            400,
            f"{what} of {longest} tokens does not fit {where} "
            "(it must leave room for at least one generated token); shorten it",
            param=what,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return ctx - longest
    if longest + max_tokens > ctx:
        raise APIError(
            400,
            f"{what} of {longest} tokens + {max_param}={max_tokens} = {longest + max_tokens} "
            f"tokens exceeds {where}; shorten the {what} or lower {max_param} (at most {ctx - longest})",
            param=max_param,
            code="context_length_exceeded",
        )
    return max_tokens


def user_error(e: UserError, default_param: str | None = None) -> APIError:
    """A UserError "name=value: why" (SamplingParams) or "name: why" as a 400 naming the field."""
    msg = str(e)
    head = msg.split(":", 1)[0].split("=", 1)[0].strip()
    name = {"max_new_tokens": "max_tokens", "num_samples": "n"}.get(head, head)
    param = name if name.replace("_", "").isalnum() and " " not in name else default_param
    return APIError(400, msg, param=param, code="invalid_value")


# ------------------------------------------------------------------------------------------- running
def submit(state: State, m: ServedModel, prompts: list[list[int]], params: list, arrival: float) -> Request:
    """Queue one request of len(params) sequences (prompts repeated n times beforehand)."""
    if len(prompts) > state.max_batch:
        raise APIError(
            400,
            f"n x prompts = {len(prompts)} sequences exceeds the server's --max-batch {state.max_batch}",
            param="n",
            code="invalid_value",
        )
    req = Request(m.id, prompts, params, loop=asyncio.get_running_loop(), created=arrival)
    try:
        state.scheduler.submit(req)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", None, "queue_full") from None
    except NotAccepting as e:
        raise APIError(503, str(e), "service_unavailable", None, "unavailable") from None
    return req


def sampling_params(body: S._Sampling, m: ServedModel, n_prompts: int, max_tokens: int, **kw) -> list:
    """One SamplingParams per sequence: prompt p's sample j is sequence p * n + j, with seed + j."""
    try:
        return [
            body.to_sampling_params(max_tokens, j, vocab_size=m.vocab_size, **kw)
            for _ in range(n_prompts)
            for j in range(body.n)
        ]
    except UserError as e:
        raise user_error(e) from None


@dataclass
class SeqOut:
    """Everything one sequence produced (non-streaming)."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token (if asked)
    prompt_logprobs: list | None = None  # TokenLogprob | None per prompt token (echo + logprobs)


def failure_error(ev: Failure) -> APIError:
    if ev.internal:
        return APIError(500, ev.message, "server_error", None, "internal_error")
    return APIError(503, ev.message, "service_unavailable", None, "unavailable")


async def _watch_disconnect(http: HTTPRequest, req: Request) -> None:
    """Cancel `req` when the client of a non-streaming request goes away."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            req.cancel()
            return


async def collect(http: HTTPRequest, req: Request) -> list[SeqOut]:
    outs = [SeqOut() for _ in req.prompts]
    watcher = asyncio.create_task(_watch_disconnect(http, req))
    try:
        async for events in req:
            for ev in events:
                if isinstance(ev, Failure):
                    raise failure_error(ev)
                o = outs[ev.index]
                o.text += ev.text
                o.tokens = ev.tokens
                o.finish_reason = ev.finish_reason or o.finish_reason
                o.logprobs += ev.logprobs
                if ev.prompt_logprobs is not None:
                    o.prompt_logprobs = ev.prompt_logprobs
    finally:
        watcher.cancel()
        req.cancel()
    if req.cancelled and not all(o.finish_reason for o in outs):
        raise APIError(503, "the request was cancelled", "service_unavailable", None, "cancelled")
    return outs


def usage(prompts: list[list[int]], tokens: list[int]) -> S.Usage:
    """prompts: each distinct prompt once (n samples of a prompt count its tokens once, as OpenAI)."""
    p = sum(len(x) for x in prompts)
    c = sum(tokens)
    return S.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def header(kind: str, m: ServedModel) -> dict:
    prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": m.id}


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# Line separators that JSON leaves raw but that str.splitlines() (httpx's iter_lines, many SSE clients)
# splits on: escaped, so that one event stays one line.
_SPLITLINES = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(obj) -> str:
    return f"data: {_json(obj).translate(_SPLITLINES)}\n\n"


async def stream(
    req: Request, header: dict, prompts: list[list[int]], include_usage: bool, first, on_events, last=None
):
    """SSE body. first() -> chunks to send before any token (role / echo); on_events(index, events) ->
    chunk choices for one sequence's new events (a list of dicts); last(index) -> final choices of a
    sequence (flushing held-back text, tool calls). Then the usage chunk and [DONE]."""
    k = len(req.prompts)
    tokens = [0] * k
    with_usage = {"usage": None} if include_usage else {}

    def chunk(choices) -> str:
        return sse({**header, "choices": choices, **with_usage})

    try:
        opening = first()
        if opening:
            yield "".join(chunk([c]) for c in opening)
        async for events in req:
            by_seq: dict[int, list] = {}
            for ev in events:
                if isinstance(ev, Failure):
                    err_type = "server_error" if ev.internal else "service_unavailable"
                    yield sse(
                        {"error": {"message": ev.message, "type": err_type, "param": None, "code": None}}
                    )
                    return
                tokens[ev.index] = ev.tokens
                by_seq.setdefault(ev.index, []).append(ev)
            parts = [chunk([c]) for i, evs in by_seq.items() for c in on_events(i, evs)]
            if parts:
                yield "".join(parts)
        if req.cancelled:
            return
        if include_usage:
            yield sse({**header, "choices": [], "usage": usage(prompts, tokens).model_dump()})
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()  # a no-op when it finished; frees the rows when the client went away


class SSEResponse(StreamingResponse):
    """A text/event-stream response that cancels its request however the response ends (even when the
    client goes away before the body generator ever ran, so its `finally` never does)."""

    def __init__(self, gen, req: Request):
        super().__init__(
            gen,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._req = req

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._req.cancel()


# ------------------------------------------------------------------------------------------- logprobs
class TokenNames:
    """Text and UTF-8 bytes of single tokens, as logprobs name them (cached per token id)."""

    def __init__(self, tok, as_ids: bool = False):
        self.tok, self.as_ids = tok, as_ids

    def text(self, i: int) -> str:
        return f"token_id:{i}" if self.as_ids else _piece(self.tok, i)[0]

    def bytes(self, i: int) -> list[int]:
        return list(_piece(self.tok, i)[1])


@lru_cache(maxsize=1 << 16)
def _piece(tok, i: int) -> tuple[str, bytes]:
    """(text, raw bytes) of token i: byte-level pieces map back to their bytes (a partial character
    decodes to U+FFFD in the text but keeps its byte), SentencePiece '▁' is a space, <0xNN> one byte."""
    name = tok.id_to_token(i) or ""
    text = tok.decode([i])
    from lmforge.tokenizer import _byte_decoder

    dec = _byte_decoder()
    if name.startswith("<0x") and name.endswith(">") and len(name) == 6:
        raw = bytes([int(name[3:5], 16)])
    elif name and all(c in dec for c in name) and text != name:
        raw = bytes(dec[c] for c in name)
    else:
        raw = text.encode("utf-8", "replace")
    return text, raw


def chat_logprobs(names: TokenNames, entries: list, top_n: int) -> list[S.TokenLogprobEntry]:
    out = []
    for e in entries:
        tid, lp, top = e[0], e[1], e[2]
        out.append(
            S.TokenLogprobEntry(
                token=names.text(tid),
                logprob=_finite(lp),
                bytes=names.bytes(tid),
                top_logprobs=[
                    S.TopLogprob(token=names.text(t), logprob=_finite(v), bytes=names.bytes(t))
                    for t, v in list(top)[:top_n]
                ],
            )
        )
    return out


def _finite(x: float) -> float:
    """JSON has no -inf: a token of probability 0 (masked by nothing the logprobs see) gets -9999."""
    x = float(x)
    return x if x > -9999.0 else -9999.0


class CompletionLogprobBuilder:
    """The legacy completions shape, built incrementally (streaming) with running text offsets."""

    def __init__(self, names: TokenNames, top_n: int, offset: int = 0):
        self.names, self.top_n, self.offset = names, top_n, offset

    def build(self, entries: list, prompt_ids: list[int] | None = None) -> S.CompletionLogprobs:
        """entries: TokenLogprob | None per token; prompt_ids: the ids of prompt entries (echo), whose
        entries may be None (the first token has no logprob)."""
        out = S.CompletionLogprobs()
        ids = prompt_ids if prompt_ids is not None else [e[0] for e in entries]
        for tid, e in zip(ids, entries):
            text = self.names.text(tid)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            top = {self.names.text(t): _finite(v) for t, v in list(e[2])[: self.top_n]}
            top.setdefault(text, _finite(e[1]))
            out.token_logprobs.append(_finite(e[1]))
            out.top_logprobs.append(top)
        return out
