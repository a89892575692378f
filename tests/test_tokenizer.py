"""Tokenizer: exact round trips, parity with transformers, byte lengths, streaming decode, chat."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, compression, train_tokenizer
from lmforge.utils import UserError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Ünïcödé tëxt wïth àccents, naïve café résumé. ",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji 🎉🚀👍🏽 and flags 🇫🇷 mixed with numbers 12345 67890.",
    "Tabs\tand\nnewlines\r\nand   multiple    spaces   .",
] * 40

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi in Japanese: 日本"},
    {"role": "assistant", "content": "こんにちは 🎉"},
    {"role": "user", "content": "And in French?"},
    {"role": "assistant", "content": "Salut, ça va ?"},
]

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "def f(x):\n\treturn x ** 2  # square\n",
    "日本語 and emoji 🎉👍🏽 ok",
    "numbers 1234567 and 3.14159",
    "a <|user|> marker inside text",
    "\n\n\n   \t",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 480)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def test_training_layout(tok):
    # Special tokens first, then the 256 bytes, then merges; the corpus supports 480 (488 at most).
    assert tok.vocab_size == 480
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.stop_ids == [tok.eos_id, tok.token_to_id("<|end|>")]
    assert tok.chat_template == CHAT_TEMPLATE
    # Merges learned something: common words are single tokens.
    assert len(tok.encode(" quick", bos=False)) == 1


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="too small.*263"):
        train_tokenizer(CORPUS, 262)


unicode_text = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FFFF, exclude_categories=["Cs"])),
    st.text(alphabet="🎉👍🏽🇫🇷日本語한국é\u0301\x00\x01\x7f\t\n\r \u00a0\u2028\u200b"),
    st.sampled_from([" ", "\n", "\t", "\r\n", "   ", "\u3000", "\x0b\x0c"]),
)


@settings(max_examples=300, deadline=None)
@given(unicode_text)
def test_roundtrip_arbitrary_unicode(tok, s):
    ids = tok.encode(s, bos=False)
    assert tok.decode(ids) == s
    assert tok.encode(s) == [tok.bos_id, *ids] == tok.encode_prompt(s)  # lmforge's rule: BOS + text
    assert tok.decode(tok.encode(s, bos=True, eos=True)) == "<|bos|>" + s + "<|eos|>"
    if not any(t in s for t in SPECIAL_TOKENS):  # special-token text is parsed as the token itself
        assert tok.decode(tok.encode(s, bos=True, eos=True), skip_special=True) == s


def test_bos_eos_flags(tok):
    ids = tok.encode("hi", bos=False)
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.encode("hi") == tok.encode_prompt("hi") == [tok.bos_id, *ids]  # the default follows the rule
    assert tok.add_bos and not tok.add_eos
    yo = tok.encode("yo", bos=False)
    assert tok.encode_batch(["hi", "yo"], bos=True) == [[tok.bos_id, *ids], [tok.bos_id, *yo]]
    assert tok.encode_batch(["hi", "yo"]) == [tok.encode("hi"), tok.encode("yo")]
    assert tok.encode_batch(["hi"], bos=False) == [ids]
    # Special-token text is parsed as the special token (as transformers does), unless special=False.
    assert tok.token_to_id("<|user|>") in tok.encode(TEXTS[5])
    plain = tok.encode(TEXTS[5], bos=False, special=False)
    assert not set(plain) & set(tok.special_tokens.values()) and tok.decode(plain) == TEXTS[5]
    assert tok.encode_batch([TEXTS[5]], bos=False, special=False) == [plain]
    assert tok.token_to_id("<|user|>") in tok.encode(TEXTS[5])  # the switch does not stick


def test_save_load_hash_and_ids(tok, tok_dir):
    again = Tokenizer.load(tok_dir)
    assert again.hash == tok.hash and len(tok.hash) == 16
    assert Tokenizer.load(tok_dir / "tokenizer.json").hash == tok.hash
    for t in TEXTS:
        assert again.encode(t) == tok.encode(t)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["model_max_length"] == 2048
    # Saving a loaded tokenizer keeps tokenizer.json byte for byte, so the hash tags stay valid.
    again.save(tok_dir / "copy")
    assert (tok_dir / "copy" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer.load(tmp_path)


def _hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_transformers_parity_plain_text(tok, tok_dir):
    hf = _hf(tok_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for t in TEXTS + CORPUS[:6]:
        assert hf(t)["input_ids"] == tok.encode(t), t  # the same BOS rule: BOS + text
        assert hf(t)["input_ids"][0] == tok.bos_id
        assert hf.encode(t, add_special_tokens=False) == tok.encode(t, bos=False)
        assert hf.decode(tok.encode(t)) == tok.decode(tok.encode(t))
    assert hf(TEXTS)["input_ids"] == tok.encode_batch(TEXTS)


def test_transformers_parity_chat(tok, tok_dir):
    hf = _hf(tok_dir)
    for gen in (False, True):
        msgs = CHAT[:-1] if gen else CHAT
        text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == text
        out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        hf_ids = out["input_ids"] if hasattr(out, "keys") else out
        ids = tok.encode_chat(msgs, add_generation_prompt=gen)
        assert hf_ids == ids
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # exactly one BOS
    assert text == (
        "<|bos|><|system|>You are terse.<|end|><|user|>Say hi in Japanese: 日本<|end|>"
        "<|assistant|>こんにちは 🎉<|end|><|user|>And in French?<|end|><|assistant|>"
    )


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(UserError, match="unknown chat role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_token_bytes_sum_to_utf8_length(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    assert all(tb[tok.token_to_id(t)] == 0 for t in SPECIAL_TOKENS)
    assert tb[tok.token_to_id("<|bos|>") + len(SPECIAL_TOKENS)] == 1  # the first byte token
    for t in TEXTS[:5] + CORPUS[:6]:
        ids = tok.encode(t, bos=True, eos=True)
        assert tb[ids].sum() == len(t.encode("utf-8")), t


def test_stream_decoder_never_breaks_characters(tok):
    text = "日本語のテキスト 🎉👍🏽🇫🇷 and ça va, 한국어!"
    ids = tok.encode(text, bos=False)
    # The byte-level vocabulary splits some characters across tokens: the case that matters.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text
    # Cut in the middle of a character: flush gives what decode gives (a replacement character).
    cut = next(k for k in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:k]))
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids[:cut]) + dec.flush() == tok.decode(ids[:cut])
    # Special tokens pass through (or are skipped) the same way as in decode.
    ids = tok.encode_chat(CHAT)
    for skip in (False, True):
        dec = tok.stream_decoder(skip_special=skip)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids, skip_special=skip)


def test_foreign_tokenizers(tmp_path):
    """Any HF tokenizer.json loads: GPT-2 style (one <|endoftext|>) and SentencePiece style (Metaspace)."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer

    gpt2 = ByteLevelBPETokenizer()
    gpt2.train_from_iterator(CORPUS, vocab_size=400, special_tokens=["<|endoftext|>"])
    gpt2.save(str(tmp_path / "gpt2.json"))
    tok = Tokenizer.load(tmp_path / "gpt2.json")
    assert tok.bos_id == tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.pad_id is None and tok.chat_template is None
    with pytest.raises(UserError, match="no chat template"):
        tok.apply_chat_template(CHAT)
    t = "Hello 日本 🎉"
    assert tok.decode(tok.encode(t)) == t
    assert tok.token_bytes()[tok.encode(t)].sum() == len(t.encode("utf-8"))

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=400)
    sp.save(str(tmp_path / "sp.json"))
    tok = Tokenizer.load(tmp_path / "sp.json")
    t = "The quick brown fox jumps"
    ids = tok.encode(t)
    dec = tok.stream_decoder()
    # The decoder strips the first word's space; the stream decoder must not strip later ones.
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids) == t


def test_compression_report(tok):
    c = compression(tok, CORPUS[:6])
    assert c["bytes"] == sum(len(t.encode()) for t in CORPUS[:6])
    assert c["tokens"] == sum(len(tok.encode(t, bos=False)) for t in CORPUS[:6])
    assert c["bytes_per_token"] > 2  # a trained vocabulary beats one token per byte by far


def test_cli_tokenizer_train(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "corpus").mkdir()
    for i, t in enumerate(CORPUS[:6]):
        (tmp_path / "corpus" / f"{i}.txt").write_text(t * 10)
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(tmp_path / "corpus"),
                "--vocab-size",
                "300",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "bytes/token" in capsys.readouterr().err
    assert Tokenizer.load(out).vocab_size == 300
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(tmp_path / "corpus"),
                "--vocab-size",
                "10",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "too small" in capsys.readouterr().err
