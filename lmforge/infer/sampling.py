"""Sampling: the parameters of one request, and the logits processors that turn logits into tokens.

Order of the processors: logit bias (OpenAI's: added to the logits), the grammar mask (tokens a
constrained row may not take become -inf), repetition penalty (CTRL: divide positive logits, multiply
negative ones, over every token already in the prompt or the output), presence and frequency penalties
(OpenAI's formula over the generated tokens only: logit[t] -= count[t] * frequency_penalty +
(count[t] > 0) * presence_penalty), then temperature, top-k, top-p, min-p. The repetition penalty and
the filters follow transformers' `generate` exactly (tests compare them with its LogitsProcessors).
A temperature below 1e-5 is greedy (`SamplingParams.greedy`, the one place for that rule): the argmax
of the processed logits. Logprobs (`SamplingParams.logprobs`) are not the sampler's business: the
engine takes them from the raw logits, before any of this (vLLM's default).

Every parameter is a per-row tensor (B,), so one batch can mix requests with different settings (the
server's continuous batching); a filter that no row uses costs nothing. Sampling draws from the
filtered distribution with the exponential-race trick (argmax p / E, E ~ Exp(1), as gpt-fast does):
no CPU-GPU sync, and a torch.Generator per request makes a seed reproduce its output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmforge.utils import UserError

if TYPE_CHECKING:
    from lmforge.infer.grammar import Grammar

# Bounds that the server's request schema (serve/schema.py) shares: they keep every value finite in the
# sampler's float32 per-row tensors, and nothing useful lies beyond them.
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_PENALTY = 2.0  # presence/frequency penalties: OpenAI's range [-2, 2]
MAX_LOGIT_BIAS = 100.0  # logit_bias values: OpenAI's range [-100, 100]
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit, vLLM's default max_logprobs)
# Below this temperature, logits / T overflows float32: that is greedy decoding in all but name. The one
# place for the rule (the server and `lmforge generate` both go through SamplingParams.greedy).
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to sample one request. Defaults: plain sampling at temperature 1 (as transformers and the
    OpenAI API do); temperature 0 is greedy."""

    max_new_tokens: int = 128
    """most tokens to generate (the stop token counts)"""
    temperature: float = 1.0
    """divide logits by this; 0 (anything below 1e-5) means greedy (argmax)"""
    top_k: int | None = None
    """keep only the k most likely tokens (None: off)"""
    top_p: float = 1.0
    """keep the smallest set of tokens whose probability reaches top_p (1: off)"""
    min_p: float = 0.0
    """drop tokens less likely than min_p times the most likely one (0: off)"""
    repetition_penalty: float = 1.0
    """CTRL penalty on tokens already in the prompt or output (1: off, >1 discourages repeats)"""
    presence_penalty: float = 0.0
    """subtracted from the logit of every token generated at least once, in [-2, 2] (OpenAI's; 0: off)"""
    frequency_penalty: float = 0.0
    """subtracted from a token's logit once per time it was generated, in [-2, 2] (OpenAI's; 0: off)"""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """token id -> value in [-100, 100] added to its logit before sampling (OpenAI's logit_bias; -100 bans
    a token, 100 forces it); on the command line ID=BIAS, repeatable"""
    seed: int | None = None
    """seed of this request's random generator (None: torch's global generator)"""
    num_samples: int = 1
    """independent samples per prompt"""
    stop: tuple[str, ...] = ()
    """strings that end generation; the text is cut before them (repeatable: --stop A --stop B)"""
    stop_token_ids: tuple[int, ...] = ()
    """token ids that end generation (besides EOS)"""
    ignore_eos: bool = False
    """keep generating past EOS (benchmarks)"""
    logprobs: int | None = None
    """record each generated token's logprob and its top-N alternatives (None: off; 0: the token only)"""
    prompt_logprobs: int | None = None
    """the same for every prompt token after the first (echo / scoring a text); None: off"""
    grammar: Grammar | None = None
    """constrain the output (lmforge.infer.grammar.Grammar: JSON schema, regex, choice); None: free"""
    extra: dict = field(default_factory=dict)
    """room for the caller's own fields (the server keeps request ids here)"""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(int(i) for i in self.stop_token_ids)
        self.logit_bias = _bias_dict(self.logit_bias)
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise UserError(f"{name}={getattr(self, name)!r}: {why}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails every comparison
            bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}] (0 means greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            bad("top_k", "must be an integer >= 1 (or None for no top-k filtering)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 means no top-p filtering)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 means no min-p filtering)")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bad(
                "repetition_penalty",
                f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 means no penalty)",
            )
        if not is_int(self.num_samples) or self.num_samples < 1:
            bad("num_samples", "must be an integer >= 1")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                bad(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 means no penalty)")
        for t, b in self.logit_bias.items():
            if t < 0:
                raise UserError(f"logit_bias: token id {t} is negative")
            if not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                raise UserError(
                    f"logit_bias[{t}]={b!r}: must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
                )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be an integer in [0, {MAX_LOGPROBS}] (or None for none)")
        if self.grammar is not None and not hasattr(self.grammar, "matcher"):
            bad("grammar", "must be an lmforge.infer.grammar.Grammar (Grammar.json_schema(...), ...)")

    @property
    def greedy(self) -> bool:
        """Temperature below 1e-5 means greedy decoding (argmax)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_counts(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _bias_dict(bias) -> dict[int, float]:
    """logit_bias as {int token id: float}; JSON gives string keys ("50256": -100), which are accepted."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise UserError(f"logit_bias={bias!r}: must be a mapping of token id to bias")
    out = {}
    for k, v in bias.items():
        try:
            t = int(k)
            if isinstance(k, float) or isinstance(k, bool) or isinstance(v, bool):
                raise ValueError
            out[t] = float(v)
        except (TypeError, ValueError):
            raise UserError(f"logit_bias: {k!r}: {v!r} is not token id (integer): bias (number)") from None
        if not math.isfinite(out[t]):
            raise UserError(f"logit_bias[{t}]={v!r}: must be a finite number in [-100, 100]")
    return out


# ---------------------------------------------------------------------------------------------- processors
# Each takes float32 logits (B, V) and a per-row parameter (B,) and returns new logits; -inf = removed.


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL penalty on tokens marked in `seen` (B, V) bool: positive logits / p, negative * p."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: counts (B, V) of each generated token; presence, frequency (B,)."""
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def top_k_filter(logits: torch.Tensor, k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep logits >= the k-th largest of their row (ties kept, as in HF). k (B,) long, 0 = off;
    k_max: max(k) when the caller knows it (saves a device sync)."""
    k_max = min(k_max or int(k.max()), logits.shape[-1])
    kth = logits.topk(k_max, dim=-1).values  # (B, k_max), descending
    idx = (k.clamp(1, k_max) - 1)[:, None]
    thresh = kth.gather(1, idx).masked_fill((k == 0)[:, None], -math.inf)
    return logits.masked_fill(logits < thresh, -math.inf)


def top_p_filter(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering as HF: drop the least likely tokens whose cumulative probability stays within
    1 - p, so the token that crosses the threshold is kept (and always the most likely one)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)[:, None]
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's (the top token stays)."""
    probs = logits.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    drop = probs < min_p[:, None] * top
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, -math.inf)


class Sampler:
    """Per-row sampling state for a batch of B rows: parameters as (B,) tensors, generators, which
    tokens each row has seen (repetition penalty), how often it generated each (presence/frequency
    penalties) and its logit bias.

    `set_row(i, params, prompt_ids)` configures a row (a new request joining the batch);
    `__call__(logits)` returns the next token of every row; `observe(tokens)` records them.
    The (B, V) tensors (seen, counts, bias) are allocated when the first row needs them.
    """

    def __init__(self, batch_size: int, vocab_size: int, device):
        B, self.V, self.device = batch_size, vocab_size, device
        self.temperature = torch.ones(B, device=device)
        self.top_k = torch.zeros(B, dtype=torch.long, device=device)
        self.top_p = torch.ones(B, device=device)
        self.min_p = torch.zeros(B, device=device)
        self.penalty = torch.ones(B, device=device)
        self.presence = torch.zeros(B, device=device)
        self.frequency = torch.zeros(B, device=device)
        self.params: list[SamplingParams | None] = [None] * B
        self.generators: list[torch.Generator | None] = [None] * B
        self.seen: torch.Tensor | None = None  # (B, V) bool, allocated when a row uses the penalty
        self.counts: torch.Tensor | None = None  # (B, V) float: generated-token counts
        self.bias: torch.Tensor | None = None  # (B, V) float: logit bias
        self._refresh()

    def _table(self, name: str, dtype) -> torch.Tensor:
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(len(self.params), self.V, dtype=dtype, device=self.device))
        return getattr(self, name)

    def set_row(
        self, i: int, params: SamplingParams, prompt_ids=(), generator: torch.Generator | None = None
    ):
        """Configure row i for a request (generator: share one across rows, else one from params.seed)."""
        self.params[i] = params
        self.temperature[i] = params.temperature if not params.greedy else 1.0
        self.top_k[i] = params.top_k or 0
        self.top_p[i] = params.top_p
        self.min_p[i] = params.min_p
        self.penalty[i] = params.repetition_penalty
        self.presence[i] = params.presence_penalty
        self.frequency[i] = params.frequency_penalty
        if generator is None and params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        self.generators[i] = generator
        if params.repetition_penalty != 1.0:
            self._table("seen", torch.bool)
        if self.seen is not None:
            self.seen[i] = False
            ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)
            self.seen[i, ids[(ids >= 0) & (ids < self.V)]] = True
        if params.uses_counts:
            self._table("counts", torch.float32)
        if self.counts is not None:
            self.counts[i] = 0  # counts are over the generated tokens only (OpenAI's definition)
        if params.logit_bias:
            self._table("bias", torch.float32)
        if self.bias is not None:
            self.bias[i] = 0
            if params.logit_bias:
                ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
                ok = ids < self.V  # the engine refuses ids past the vocabulary; be safe anyway
                vals = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
                self.bias[i, ids[ok].to(self.device)] = vals[ok].to(self.device)
        self._refresh()

    def clear_row(self, i: int) -> None:
        self.params[i], self.generators[i] = None, None
        self._refresh()

    def _refresh(self) -> None:
        # Python flags, so that filters no row uses are skipped without looking at tensors.
        live = [p for p in self.params if p is not None]
        sampled = [p for p in live if not p.greedy]
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in live)
        self.any_counts = any(p.uses_counts for p in live)
        self.any_bias = any(p.logit_bias for p in live)
        self.any_temp = any(p.temperature != 1.0 for p in sampled)
        self.k_max = max((p.top_k or 0 for p in sampled), default=0)
        self.any_top_p = any(p.top_p < 1.0 for p in sampled)
        self.any_min_p = any(p.min_p > 0.0 for p in sampled)
        self.greedy = torch.tensor([p is None or p.greedy for p in self.params], device=self.device)
        self.all_greedy, self.any_greedy = not sampled, len(sampled) < len(self.params)

    def observe(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Record the tokens just generated, (B,) or one per row of `rows`: seen (repetition penalty)
        and counted (presence/frequency penalties)."""
        if self.seen is not None:
            if rows is None:
                self.seen.scatter_(1, tokens[:, None], True)
            else:
                self.seen[rows, tokens] = True
        if self.counts is not None:
            if rows is None:
                rows = torch.arange(tokens.shape[0], device=self.device)
            self.counts.index_put_(
                (rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True
            )

    def process(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ):
        """Float32 logits (n, V) after bias, grammar mask, penalties, temperature and filters: what
        sampling draws from. rows: which batch rows the n logits belong to (default all B); seen (n, V)
        overrides the rows' seen-token masks (speculative decoding); allowed (n, V) bool: the tokens a
        grammar permits (None: all). Greedy rows take the argmax of the result, which the temperature
        and the filters do not change."""

        def per_row(t):
            return t if rows is None else t[rows]

        x = logits.float()
        if self.any_bias and self.bias is not None:
            x = x + per_row(self.bias)
        if allowed is not None:
            x = x.masked_fill(~allowed, -math.inf)
        if seen is None and self.seen is not None:
            seen = per_row(self.seen)
        if self.any_penalty and seen is not None:
            x = repetition_penalty(x, seen, per_row(self.penalty))
        if self.any_counts and self.counts is not None:
            x = presence_frequency_penalty(
                x, per_row(self.counts), per_row(self.presence), per_row(self.frequency)
            )
        if self.any_temp:
            x = x / per_row(self.temperature)[:, None]
        if self.k_max:
            x = top_k_filter(x, per_row(self.top_k), self.k_max)
        if self.any_top_p:
            x = top_p_filter(x, per_row(self.top_p))
        if self.any_min_p:
            x = min_p_filter(x, per_row(self.min_p))
        return x

    def draw(self, probs: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """One token per row of probs (n, V), drawn with the rows' generators (exponential race)."""
        gens = self.generators if rows is None else [self.generators[i] for i in rows]
        if all(g is gens[0] for g in gens):  # one generator (or torch's global one) for all rows
            q = torch.empty_like(probs).exponential_(generator=gens[0])
        else:
            q = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in gens])
        return (probs / q).argmax(dim=-1)

    def __call__(
        self, logits: torch.Tensor, rows: list[int] | None = None, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next token of each row: logits (B, V), or (len(rows), V) for a subset of the rows; allowed
        (same shape, bool): the grammar masks of constrained rows (True everywhere for the others)."""
        idx = None if rows is None else torch.tensor(rows, device=self.device)
        x = self.process(logits, idx, allowed=allowed)
        if self.all_greedy:
            return x.argmax(dim=-1)
        tok = self.draw(x.softmax(dim=-1), rows)
        if self.any_greedy:
            greedy = self.greedy if idx is None else self.greedy[idx]
            tok = torch.where(greedy, x.argmax(dim=-1), tok)
        return tok
