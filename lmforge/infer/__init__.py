"""Inference: sampling, the prefill/decode engine, streaming and speculative decoding.

    from lmforge.infer import generate, stream, SamplingParams, Engine, Sequence

`generate`/`stream` are what `LM.generate`/`LM.stream` call; `Engine` is the step-wise batch the
server drives (admit requests with `add`, advance them with `step`); see docs/generation.md.
"""

from lmforge.infer.engine import Engine
from lmforge.infer.generate import Completion, TextStream, generate, stream
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sequence import Sequence
from lmforge.infer.speculative import SpeculativeDecoder

__all__ = [
    "Completion",
    "Engine",
    "SamplingParams",
    "Sequence",
    "SpeculativeDecoder",
    "TextStream",
    "generate",
    "stream",
]
