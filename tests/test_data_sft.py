"""SFT: the loss mask covers assistant content + end marker only, checked token by token; rows pack and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data.sft import (
    IGNORE,
    SFTLoader,
    alpaca_to_messages,
    explain_mask,
    load_conversations,
    render_with_mask,
)
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course. 🎉"},
    {"role": "user", "content": "And 日本?"},
    {"role": "assistant", "content": "Japan."},
]


@pytest.fixture(scope="module")
def tok():
    text = [json.dumps(CHAT), "The quick brown fox, 2+2=4. Japan 日本 🎉 Be brief, of course."] * 20
    return train_tokenizer(text, 300)


def expected_mask(tok, ids):
    """The rule, stated on tokens: from after <|assistant|> through the next <|end|>, inclusive."""
    a, end = tok.token_to_id("<|assistant|>"), tok.token_to_id("<|end|>")
    mask, inside = [], False
    for i in ids:
        if inside:
            mask.append(1)
            inside = i != end
        else:
            mask.append(0)
            inside = i == a
    return mask


def test_mask_token_by_token(tok):
    ids, mask = render_with_mask(tok, CHAT)
    assert ids == tok.encode_chat(CHAT)
    assert mask == expected_mask(tok, ids)
    # Reading the masked tokens back gives exactly the assistant turns and their end markers.
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4, of course. 🎉<|end|>Japan.<|end|>"
    assert explain_mask(tok, CHAT) == (
        "<|bos|><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>[[4, of course. 🎉<|end|>]]"
        "<|user|>And 日本?<|end|><|assistant|>[[Japan.<|end|>]]"
    )


def test_alpaca_and_file_loading(tmp_path, tok):
    assert alpaca_to_messages({"instruction": "Add.", "input": "2 and 2", "output": "4"}) == [
        {"role": "user", "content": "Add.\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    p = tmp_path / "sft.jsonl"
    p.write_text(
        "\n".join(
            [
                json.dumps({"messages": CHAT}),
                json.dumps({"instruction": "Say hi", "output": "hi", "system": "Be nice."}),
                "{not json",
                json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
                json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
            ]
        )
    )
    convs = load_conversations(p)
    assert convs[0] == CHAT
    assert convs[1] == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ]
    assert len(convs) == 2
    with pytest.raises(UserError, match="sft.jsonl:3: malformed JSON"):
        load_conversations(p, strict=True)
    q = tmp_path / "other.jsonl"
    q.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(UserError, match="neither 'messages'.*nor 'instruction'.*fields: completion, prompt"):
        load_conversations(q)


def test_rows_targets_and_padding(tok):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    convs = [CHAT, short, short]
    loader = SFTLoader(convs, tok, batch_size=1, seq_len=128, shuffle=False)
    x, y = next(loader)
    assert x.shape == y.shape == (1, 128) and x.dtype == y.dtype == torch.int64
    # The row is the conversations back to back, then padding.
    parts = [render_with_mask(tok, c) for c in convs]
    ids = sum((p[0] for p in parts), [])
    mask = sum((p[1] for p in parts), [])
    n = len(ids)
    assert x[0, :n].tolist() == ids[:128] and (x[0, n:] == tok.pad_id).all()
    # Targets: the next token where it is an assistant token, else -100 (padding included).
    expect = [ids[j + 1] if mask[j + 1] else IGNORE for j in range(n - 1)] + [IGNORE] * (128 - n + 1)
    assert y[0].tolist() == expect
    assert (y[0] != IGNORE).sum() == sum(mask)


def test_packing_truncation_and_one_per_row(tok):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    n_short = len(tok.encode_chat(short))
    loader = SFTLoader([short] * 6, tok, batch_size=1, seq_len=3 * n_short - 1, shuffle=False)
    assert loader.batches_per_epoch == 2  # three conversations per row of 3 * n_short tokens
    unpacked = SFTLoader([short] * 6, tok, batch_size=1, seq_len=3 * n_short - 1, shuffle=False, pack=False)
    assert unpacked.batches_per_epoch == 6
    cut = SFTLoader([CHAT] * 2, tok, batch_size=2, seq_len=10)
    assert cut.truncated == 2
    x, _ = next(cut)
    assert x[0].tolist() == tok.encode_chat(CHAT)[:10]


def test_sft_resume_and_ranks(tok):
    convs = [
        [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": "Answer " * (i % 5 + 1)},
        ]
        for i in range(40)
    ]
    ref = SFTLoader(convs, tok, batch_size=2, seq_len=48, seed=2)
    batches = [next(ref) for _ in range(3 * ref.batches_per_epoch)]
    for step in (1, ref.batches_per_epoch, ref.batches_per_epoch + 1):
        a = SFTLoader(convs, tok, batch_size=2, seq_len=48, seed=2)
        for _ in range(step):
            next(a)
        b = SFTLoader(convs, tok, batch_size=2, seq_len=48, seed=2)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for k in range(4):
            x, y = next(b)
            assert torch.equal(x, batches[step + k][0]) and torch.equal(y, batches[step + k][1])
    r0 = SFTLoader(convs, tok, batch_size=1, seq_len=48, seed=2, rank=0, world_size=2)
    r1 = SFTLoader(convs, tok, batch_size=1, seq_len=48, seed=2, rank=1, world_size=2)
    for k in range(ref.batches_per_epoch + 1):
        assert torch.equal(torch.cat([next(r0)[0], next(r1)[0]]), batches[k][0])
    # Each epoch reshuffles the conversations.
    e0 = torch.cat([b[0] for b in batches[: ref.batches_per_epoch]])
    assert not torch.equal(
        e0, torch.cat([b[0] for b in batches[ref.batches_per_epoch : 2 * ref.batches_per_epoch]])
    )
    assert np.isin(tok.token_to_id("<|assistant|>"), e0.numpy())


def test_tool_call_conversations_from_jsonl(tmp_path):
    """Records with `tools` and assistant `tool_calls` / `tool` results (OpenAI shape) load whole, and the
    mask covers the tool call the assistant writes, not the tool's result (a real Qwen3 template)."""
    from test_tokenizer_hub import CALL, TOOLS_CHAT, WEATHER, hub_dir, masked_text

    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(hub_dir("qwen3-0.6b", str(tmp_path)))
    p = tmp_path / "tools.jsonl"
    bad = [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}]  # null content, no call
    p.write_text(
        "\n".join(json.dumps(r) for r in [{"messages": TOOLS_CHAT, "tools": [WEATHER]}, {"messages": bad}])
    )
    convs = load_conversations(p)
    assert len(convs) == 1 and convs[0] == TOOLS_CHAT and convs[0].tools == [WEATHER]
    assert convs[0][1]["tool_calls"] == [CALL] and convs[0][2]["tool_call_id"] == "call00001"
    ids, mask = render_with_mask(tok, convs[0])
    assert ids == tok.encode_chat(TOOLS_CHAT, tools=[WEATHER])
    text = tok.apply_chat_template(TOOLS_CHAT, tools=[WEATHER])
    assert "<tools>" in text and '{"temperature": 21}' in text
    assert masked_text(tok, text, mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is 21 degrees in Paris.<|im_end|>",
    ]
    # The loader's targets are exactly the masked tokens, shifted by one.
    x, y = next(SFTLoader(convs, tok, batch_size=1, seq_len=len(ids) - 1, shuffle=False))
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)]
