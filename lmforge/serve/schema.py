"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

The request models follow OpenAI's field names and defaults (plus the sampling extensions vLLM also
accepts: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids), so the official clients work
unchanged. Unknown fields are ignored, as OpenAI does; known fields this server cannot honour
(logprobs, tools, penalties other than repetition_penalty, ...) are a 400 naming the field rather than
being silently dropped (`unsupported()`).

Range checks that do not depend on the model live here (they show up in /openapi.json); the ones
that do (context length, n against --max-batch, token ids against the vocabulary) are in app.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.infer.sampling import MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY

# JSON allows huge integers; these bounds keep them within what the engine (torch.Generator, token
# counts) can take, and make the schema say so.
_MAX_INT = 2**63 - 1
PosInt = Annotated[int, Field(ge=1, le=_MAX_INT)]
Prob = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=_MAX_INT)]
StopString = Annotated[str, Field(max_length=1000)]
Stop = StopString | Annotated[list[StopString], Field(max_length=16)] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    """send a last chunk with the token usage of the whole request (its `choices` is empty)"""


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(
        None, max_length=256, description="a model id from /v1/models (default: the base model)"
    )
    # The sampler's own bounds (SamplingParams.validate): finite values in its float32 per-row tensors.
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy (default 1)"
    )
    top_p: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling (default 1 = off)"
    )
    top_k: int | None = Field(
        None, ge=-1, le=_MAX_INT, description="sample among the k most likely tokens (-1 or 0 = off)"
    )
    min_p: Prob | None = Field(
        None, description="drop tokens less likely than min_p times the top one (0 = off)"
    )
    repetition_penalty: float | None = Field(
        None,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        allow_inf_nan=False,
        description="CTRL penalty on tokens already seen (1 = off)",
    )
    stop: Stop = Field(None, description="up to 16 strings that end generation (not included in the text)")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="same seed and parameters give the same output"
    )
    n: int = Field(1, ge=1, le=256, description="samples per prompt (at most the server's --max-batch)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="text, a list of texts, token ids, or a list of token-id lists")
    max_tokens: PosInt | None = Field(
        16, description="most tokens to generate per choice (null: up to the context)"
    )
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PosInt | None = Field(None, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: PosInt | None = Field(
        None, description="most tokens to generate (default: up to the context)"
    )
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class TokenizePrompt(_Body):
    model: str | None = Field(None, max_length=256)
    prompt: str
    add_special_tokens: bool = Field(True, description="prepend BOS, as completions do")


class TokenizeChat(_Body):
    model: str | None = Field(None, max_length=256)
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = Field(
        True, description="end with the assistant marker, as chat completions do"
    )


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=256)
    tokens: list[TokenId]


def unsupported(req: _Sampling) -> tuple[str, str] | None:
    """(param, message) for the first field set to something this server cannot do, else None."""
    checks: list[tuple[str, bool, str]] = [
        ("presence_penalty", bool(req.presence_penalty), "use repetition_penalty"),
        ("frequency_penalty", bool(req.frequency_penalty), "use repetition_penalty"),
        ("logit_bias", bool(req.logit_bias), "not supported"),
    ]
    if isinstance(req, CompletionRequest):
        checks += [
            ("logprobs", req.logprobs is not None, "not supported"),
            ("suffix", bool(req.suffix), "not supported"),
            ("best_of", req.best_of not in (None, req.n), "only best_of = n is supported"),
        ]
    if isinstance(req, ChatCompletionRequest):
        fmt = (req.response_format or {}).get("type", "text")
        checks += [
            ("logprobs", bool(req.logprobs), "not supported"),
            ("top_logprobs", bool(req.top_logprobs), "not supported"),
            ("tools", bool(req.tools), "tool calling is not supported"),
            ("response_format", fmt != "text", "only {'type': 'text'} is supported"),
        ]
    for param, bad, why in checks:
        if bad:
            return param, f"{param}: {why}"
    return None


# ----------------------------------------------------------------------------------- responses (docs)
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"]
    models: list[str]
    running: int
    waiting: int
