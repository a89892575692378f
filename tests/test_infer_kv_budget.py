"""KV cache sizing: a long-context model starts with a bounded cache; what does not fit is a UserError."""

import pytest
import torch

from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams, Sequence, generate
from lmforge.infer.kv_budget import DEFAULT_CAP, kv_cache_bytes, parse_memory, plan_kv_cache
from lmforge.model import build
from lmforge.utils import UserError

pytestmark = pytest.mark.timeout(120)
LONG = 131072  # Llama 3.2's context


@pytest.fixture(scope="module")
def long_model():
    torch.manual_seed(0)
    return build(preset("llama", "debug", vocab_size=300, max_seq_len=LONG)).eval()


def test_bytes_match_the_allocated_cache():
    for family in ("llama", "mistral"):  # mistral debug: window 64, a ring once max_len exceeds it
        cfg = preset(family, "debug", vocab_size=300)
        for L in (32, 200):
            c = build(cfg).new_cache(3, L)
            assert kv_cache_bytes(cfg, 3, L) == c.nbytes + c.key_pos.numel() * 16  # key_pos + ids (int64)


def test_long_context_engine_starts_bounded(long_model):
    cfg = long_model.config
    full = kv_cache_bytes(cfg, 8, LONG)
    eng = Engine(long_model, None, max_batch=8, kv_cache_memory="4MiB")
    assert eng.max_len < LONG and eng.max_len % 16 == 0
    assert eng.kv_bytes <= 4 << 20 < full and eng.cache.nbytes <= eng.kv_bytes
    eng = Engine(long_model, None, max_batch=8)  # the default budget: a share of the machine, capped
    assert eng.cache.nbytes <= eng.kv_bytes <= DEFAULT_CAP
    out = generate(long_model, None, [1, 2, 3], max_new_tokens=4, temperature=0, kv_cache_memory="1MiB")
    assert len(out) == 4


def test_what_does_not_fit_names_both_numbers(long_model):
    cfg = long_model.config
    with pytest.raises(UserError, match=r"8 rows x 131072 tokens needs .* budget of 1\.0 MiB"):
        plan_kv_cache(cfg, 8, max_len=LONG, memory="1MiB")
    with pytest.raises(UserError, match="kv_cache_memory"):
        plan_kv_cache(cfg, 8, memory=1000)  # not even 16 slots per row
    eng = Engine(long_model, None, max_batch=2, kv_cache_memory="256KiB")
    with pytest.raises(UserError, match=f"does not fit the engine's {eng.max_len} slots"):
        eng.add([Sequence([1] * eng.max_len, SamplingParams(max_new_tokens=1))])


def test_plan_and_parse():
    cfg = preset("llama", "debug", vocab_size=300, max_seq_len=LONG)
    b, L, n = plan_kv_cache(cfg, 4, memory="2MiB")
    assert b == 4 and n <= 2 << 20 and kv_cache_bytes(cfg, 4, L + 16) > 2 << 20
    assert plan_kv_cache(cfg, 2, max_len=100, memory=10**9) == (2, 100, kv_cache_bytes(cfg, 2, 100))
    assert plan_kv_cache(cfg, 1, max_len=10**9, memory=10**12)[1] == LONG  # capped at the context
    assert (
        parse_memory("2GiB") == 2 << 30
        and parse_memory("512MB") == 512 * 10**6
        and parse_memory(4096) == 4096
    )
    assert parse_memory("25%") > 0 and parse_memory(0.5) > 0  # fractions of what is free now
    assert parse_memory(1.5e9) == 1_500_000_000
    for bad in ("lots", "-1GiB", 0, float("nan")):
        with pytest.raises(UserError):
            parse_memory(bad)
