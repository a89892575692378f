"""One request being generated: its tokens, its text, and when it stops.

A Sequence is fed one token at a time (`append`) and decides, in plain Python, whether that token
ends it: a stop token id (EOS, end-of-turn, the caller's ids), a stop string (the text is cut just
before it), or the token budget. The text grows through the tokenizer's stream decoder, so it is never
broken UTF-8, and `pop_text()` hands out only text that can no longer turn into a stop string: a
suffix that is a prefix of a stop string is held back until the next token decides. Therefore the
concatenation of everything streamed equals the final `text`.

With `SamplingParams.logprobs` set, the engine adds one `TokenLogprob` per generated token to
`logprobs` (the stop token included, as it is in `token_ids`); with `prompt_logprobs`, one per prompt
token to `prompt_logprobs` (None for the first, which nothing predicts).

Stop strings are searched only in the tail that the new text could have completed (new characters
plus the longest stop string), so the check costs O(stop length) per token, not O(text length).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lmforge.infer.sampling import SamplingParams

_ids = itertools.count()


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (log-softmax of the raw logits, before temperature,
    penalties, bias and grammar masks) and the `top` most likely tokens there, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    """A prompt (token ids) and its generation state. `finish_reason` is None while it runs, then
    "stop" (stop token or string) or "length" (max_new_tokens reached)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: Any = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    # Set by the engine: EOS ids (unless ignore_eos) and params.stop_token_ids.
    stop_ids: frozenset = frozenset()
    decoder: Any = None  # tokenizer.stream_decoder(), or None when generating ids only
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # one per prompt token
    matcher: Any = None  # the grammar's state (grammar.Matcher) while a constrained sequence runs
    cached_tokens: int = 0  # prompt tokens whose K/V came from the engine's prefix cache
    _sent: int = 0  # characters of `text` already handed out by pop_text()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> bool:
        """Add a generated token; returns True when the sequence has just finished."""
        self.token_ids.append(token)
        if token in self.stop_ids:  # the stop token itself never becomes text
            self.finish_reason = "stop"
            self._flush()
        else:
            if self.decoder is not None:
                self._add_text(self.decoder.push(token))
            if self.finish_reason is None and len(self.token_ids) >= self.params.max_new_tokens:
                self.finish_reason = "length"
                self._flush()
        if self.finish_reason is not None:
            self.decoder = None  # after a stop string, whatever the decoder holds lies past the cut
        return self.finish_reason is not None

    def finish(self, reason: str = "stop") -> None:
        """End the sequence now (e.g. its grammar is complete): flush the decoder, set finish_reason."""
        if self.finish_reason is None:
            self._flush()
            if self.finish_reason is None:
                self.finish_reason = reason
        self.decoder = None

    def _flush(self) -> None:
        if self.decoder is not None:
            self._add_text(self.decoder.flush())  # may still complete a stop string

    def _add_text(self, new: str) -> None:
        if not new:
            return
        self.text += new
        if self.params.stop and self._cut_at_stop(len(new)):
            self.finish_reason = "stop"

    def _cut_at_stop(self, n_new: int) -> bool:
        """Cut `text` before the first stop string in its last n_new + longest-stop characters."""
        if not self.params.stop:
            return False
        longest = max(len(s) for s in self.params.stop)
        start = max(0, len(self.text) - n_new - longest + 1)
        tail = self.text[start:]
        hits = [i for i in (tail.find(s) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: start + min(hits)]
        self.finish_reason = "stop"
        return True

    def pop_text(self) -> str:
        """Text finished since the last call (a possible start of a stop string is held back)."""
        end = len(self.text)
        if self.finish_reason is None and self.params.stop:
            end -= _held_back(self.text, self.params.stop)
        end = max(end, self._sent)
        out = self.text[self._sent : end]
        self._sent = end
        return out


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
