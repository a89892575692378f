"""The OpenAI protocol as pydantic models: requests that turn themselves into SamplingParams, and the
typed responses the handlers return (so /openapi.json documents exactly what the server sends).

The request models follow OpenAI's field names and defaults plus the extensions vLLM also accepts
(top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, guided_json / guided_regex /
guided_choice / guided_grammar, return_tokens_as_token_ids), so the official clients and the tools built
on vLLM work unchanged. Unknown fields are ignored, as OpenAI does; known fields this server cannot
honour (suffix, best_of != n) are a 400 naming the field rather than being silently dropped.

Range checks that do not depend on the model live here (they show up in /openapi.json); the ones
that do (context length, n against --max-batch, token ids against the vocabulary) are in serving.py.
Every text that reaches the tokenizer is a `Text`: a lone surrogate ("\\ud800", which JSON allows but
UTF-8 cannot encode) is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from lmforge.infer.sampling import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)
from lmforge.utils import UserError

# JSON allows huge integers; these bounds keep them within what the engine (torch.Generator, token
# counts) can take, and make the schema say so.
_MAX_INT = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # as OpenAI (chat) and vLLM (both endpoints)


def _valid_text(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate {s[e.start]!r} at character {e.start} "
            "(send UTF-8 text; a surrogate must come in a pair)"
        ) from None
    return s


Text = Annotated[str, AfterValidator(_valid_text)]
PosInt = Annotated[int, Field(ge=1, le=_MAX_INT)]
Prob = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=_MAX_INT)]
StopString = Annotated[Text, Field(max_length=1000)]
Stop = StopString | Annotated[list[StopString], Field(max_length=16)] | None
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    """send a last chunk with the token usage of the whole request (its `choices` is empty)"""


class JSONSchemaFormat(_Body):
    name: str = Field("response", max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object: {name, schema, strict}")
        return self


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
    presence_penalty: Penalty | None = Field(
        None, description="subtracted from the logit of every token generated so far (OpenAI's formula)"
    )
    frequency_penalty: Penalty | None = Field(
        None, description="subtracted once per earlier occurrence of a token in the output"
    )
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None
    ) = Field(None, description='{"token id": bias in [-100, 100]} added to the logits')
    stop: Stop = Field(None, description="up to 16 strings that end generation (not included in the text)")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="same seed and parameters give the same output"
    )
    n: int = Field(1, ge=1, le=256, description="samples per prompt (at most the server's --max-batch)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        None, description="json_object, or json_schema {name, schema, strict}: grammar-constrained output"
    )
    guided_json: dict[str, Any] | Text | None = Field(None, description="vLLM: output matches this schema")
    guided_regex: Annotated[Text, Field(max_length=10000)] | None = Field(
        None, description="vLLM: output matches this regular expression"
    )
    guided_choice: Annotated[list[Text], Field(min_length=1, max_length=1000)] | None = Field(
        None, description="vLLM: output is exactly one of these strings"
    )
    guided_grammar: Annotated[Text, Field(max_length=100000)] | None = Field(
        None, description="vLLM: output matches this Lark grammar"
    )
    return_tokens_as_token_ids: bool = Field(
        False, description='vLLM: logprobs name tokens "token_id:N" instead of their text'
    )

    # ---------------------------------------------------------------- -> SamplingParams
    def grammar(self):
        """The Grammar of response_format / guided_* (None: unconstrained); 400 for a bad one."""
        given = [
            name
            for name, on in [
                ("response_format", self.response_format is not None and self.response_format.type != "text"),
                ("guided_json", self.guided_json is not None),
                ("guided_regex", self.guided_regex is not None),
                ("guided_choice", self.guided_choice is not None),
                ("guided_grammar", self.guided_grammar is not None),
            ]
            if on
        ]
        if not given:
            return None
        if len(given) > 1:
            raise UserError(f"{given[1]}: give one of {' / '.join(given)}, not several")
        from lmforge.infer.grammar import Grammar

        what = given[0]
        try:
            if what == "response_format":
                fmt = self.response_format
                if fmt.type == "json_object":
                    return Grammar.json_object()
                schema = fmt.json_schema.schema_ or {"type": "object"}
                return Grammar.json_schema(schema, strict=bool(fmt.json_schema.strict))
            if what == "guided_json":
                schema = self.guided_json
                if isinstance(schema, str):
                    schema = json.loads(schema)
                return Grammar.json_schema(schema)
            if what == "guided_regex":
                return Grammar.regex(self.guided_regex)
            if what == "guided_choice":
                return Grammar.choice(list(self.guided_choice))
            return Grammar.lark(self.guided_grammar)
        except Exception as e:  # the grammar library's own errors: a bad schema, regex or grammar
            raise UserError(f"{what}: {e}") from None

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float]:
        out = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                i = int(k)
            except ValueError:
                raise UserError(f"logit_bias: key {k!r} is not a token id") from None
            if not 0 <= i < vocab_size:
                raise UserError(f"logit_bias: token id {i} is outside the vocabulary (0..{vocab_size - 1})")
            out[i] = float(v)
        return out

    def to_sampling_params(
        self,
        max_tokens: int,
        index: int = 0,
        *,
        vocab_size: int,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        grammar=None,
    ) -> SamplingParams:
        """SamplingParams of sequence `index` (sample i of a seeded request uses seed + i, so n samples
        differ). `grammar`: overrides the request's own (tool calls). UserError "name=value: why"."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        kw = dict(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # greedy: SamplingParams
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=None if self.seed is None else (self.seed + index) % 2**64,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )
        extra = {
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": self.logit_bias_ids(vocab_size),
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "grammar": grammar if grammar is not None else self.grammar(),
        }
        fields = SamplingParams.__dataclass_fields__
        for name, value in extra.items():
            if name in fields:
                kw[name] = value
            elif value not in (None, 0.0, {}):  # the engine does not have it (yet)
                raise UserError(f"{name}: not supported by this engine")
        return SamplingParams(**kw)


class CompletionRequest(_Sampling):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="text, a list of texts, token ids, or a list of token-id lists")
    max_tokens: Annotated[int, Field(ge=0, le=_MAX_INT)] | None = Field(
        16, description="most tokens to generate per choice (null: up to the context; 0: with echo only)"
    )
    echo: bool = Field(False, description="return the prompt before the completion (with logprobs: scored)")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probabilities of each token and its N most likely"
    )
    best_of: int | None = None
    suffix: Text | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class FunctionCall(_Body):
    name: str = Field(max_length=256)
    arguments: Text = Field("{}", description="the arguments as a JSON text")


class ToolCall(_Body):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as HF chat templates read it: developer is system, tool-call arguments a dict."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name:
            out["name"] = self.name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError:
                    args = c.function.arguments
                fn = {"name": c.function.name, "arguments": args}
                calls.append({"id": c.id, "type": "function", "function": fn, **fn})
            out["tool_calls"] = calls
        return out


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str = Field(max_length=64)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PosInt | None = Field(None, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: PosInt | None = Field(
        None, description="most tokens to generate (default: up to the context)"
    )
    logprobs: bool | None = Field(None, description="return the log-probability of each output token")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the N most likely tokens at each step"
    )
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="functions the model may call (rendered by the model's chat template)"
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (default with tools), required, or {type: function, function: {name}}"
    )
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra variables for the chat template (e.g. enable_thinking)"
    )

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, v, info):
        tools = info.data.get("tools")
        if v is not None and v != "none" and not tools:
            raise ValueError("tool_choice needs tools: give the functions in 'tools'")
        if isinstance(v, NamedToolChoice):
            names = [t.function.name for t in tools]
            if v.function.name not in names:
                raise ValueError(f"tool_choice names {v.function.name!r}, not one of {names}")
        return v


class TokenizePrompt(_Body):
    model: str | None = Field(None, max_length=256)
    prompt: Text
    add_special_tokens: bool = Field(True, description="prepend BOS, as completions do")


class TokenizeChat(_Body):
    model: str | None = Field(None, max_length=256)
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = Field(
        True, description="end with the assistant marker, as chat completions do"
    )
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=256)
    tokens: list[TokenId]


def unsupported(req: _Sampling) -> tuple[str, str] | None:
    """(param, message) for the first field set to something this server cannot do, else None."""
    if isinstance(req, CompletionRequest):
        if req.suffix:
            return "suffix", "suffix: not supported"
        if req.best_of not in (None, req.n):
            return "best_of", "best_of: only best_of = n is supported"
    return None


# ----------------------------------------------------------------------------------- responses
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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token; a prompt's first token has no logprob (None)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
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
