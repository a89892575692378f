"""Inference: sampling, the prefill/decode engine, streaming and speculative decoding.

    from lmforge.infer import generate, stream, SamplingParams, Engine, Sequence, Grammar

`generate`/`stream` are what `LM.generate`/`LM.stream` call; `Engine` is the step-wise batch the
server drives (admit requests with `add`, advance them with `step`); see docs/generation.md.
"""

from lmforge.infer.engine import Engine
from lmforge.infer.generate import Completion, TextStream, generate, stream
from lmforge.infer.grammar import Grammar
from lmforge.infer.kv_budget import plan_kv_cache
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sequence import Sequence, TokenLogprob
from lmforge.infer.speculative import SpeculativeDecoder

__all__ = [
    "Completion",
    "Engine",
    "Grammar",
    "SamplingParams",
    "Sequence",
    "SpeculativeDecoder",
    "TextStream",
    "TokenLogprob",
    "generate",
    "plan_kv_cache",
    "stream",
]
