"""Hub tokenizers: prompt ids, chat templates, stop ids and SFT masks against transformers.

Each model's tokenizer is built here (a tiny vocabulary trained on a few KB of text) in its own style,
with the real hub files' fields: tests/data/tokenizers/<model>.json holds each repo's tokenizer_config.json
fields (special tokens, add_bos_token, tokenizer_class) and the eos ids of its config.json and
generation_config.json (as token names, resolved against the tiny vocabulary); tests/data/templates holds
each repo's chat template. Styles:
- "gpt2": byte-level BPE, GPT-2 regex, ByteLevel post-processor (GPT-2, SmolLM2, Phi-4-mini, OLMo 2)
- "qwen": byte-level BPE behind Qwen's split regex, NFC (Qwen2.5, Qwen3)
- "llama3": byte-level BPE behind Llama-3's split regex, BOS by TemplateProcessing (Llama-3.x)
- "llama2": SentencePiece-style BPE: Metaspace (prepend "first"), byte fallback, <s> by TemplateProcessing
  when add_bos_token (Mistral, Phi-3.5)
- "gemma": SentencePiece-style BPE: spaces normalized to "▁", no prefix space, byte fallback, <bos>
and a tokenizer.model-only directory made by sentencepiece's own trainer (byte fallback on).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from lmforge.data.sft import render_with_mask
from lmforge.tokenizer import Tokenizer
from lmforge.utils import UserError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

DATA = Path(__file__).parent / "data"
MODELS = sorted(p.stem for p in (DATA / "tokenizers").glob("*.json"))
CHAT_MODELS = [m for m in MODELS if json.loads((DATA / "tokenizers" / f"{m}.json").read_text())["template"]]

CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the weather in Paris today? "
    "It is sunny and 21 degrees. def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "Ünïcödé tëxt wïth àccents, naïve café résumé. 日本語のテキスト 中文文本 한국어 텍스트 "
    "Emoji 🎉🚀 and numbers 12345 67890. You are a helpful assistant. Hello! How can I help you? "
    "Tabs\tand\nnewlines\r\n   multiple    spaces. get_weather city Paris tool call result "
) * 12

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "def f(x):\n\treturn x ** 2  # square\n",
    "日本語 and emoji 🎉👍🏽 ok",
    "numbers 1234567 and 3.14159",
    "\n\n\n   \t",
    "unseen ẞ ŉ ǅ characters ⚙",
]

RE_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
RE_QWEN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
RE_LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def spec(name: str) -> dict:
    return json.loads((DATA / "tokenizers" / f"{name}.json").read_text())


def _byte_fallback_vocab(tk_json: str, n_special: int) -> str:
    """Put the 256 <0xNN> byte tokens right after the special tokens, as SentencePiece vocabularies do."""
    d = json.loads(tk_json)
    vocab = sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1])
    head = [t for t, _ in vocab[:n_special]]
    rest = [t for t, _ in vocab[n_special:]]
    order = head + [f"<0x{b:02X}>" for b in range(256)] + [t for t in rest if not t.startswith("<0x")]
    d["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for t in d["added_tokens"]:
        t["id"] = d["model"]["vocab"][t["content"]]
    return json.dumps(d, ensure_ascii=False)


def build_tokenizer_json(s: dict) -> str:
    """A tiny tokenizer.json in the model's style, trained on CORPUS."""
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers import Tokenizer as TK

    style, specials = s["style"], s["specials"]
    if style in ("gpt2", "qwen", "llama3"):
        tk = TK(models.BPE())
        split = {"gpt2": RE_GPT2, "qwen": RE_QWEN, "llama3": RE_LLAMA3}[style]
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if style == "qwen":
            tk.normalizer = normalizers.NFC()
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tk.train_from_iterator([CORPUS], trainer)
        byte_level = processors.ByteLevel(trim_offsets=False)
        if style == "llama3":
            bos = s["bos"]
            tk.post_processor = processors.Sequence(
                [
                    byte_level,
                    processors.TemplateProcessing(
                        single=f"{bos}:0 $A:0",
                        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                        special_tokens=[(bos, tk.token_to_id(bos))],
                    ),
                ]
            )
        else:
            tk.post_processor = byte_level
        text = tk.to_str()
    else:  # SentencePiece-style BPE with byte fallback
        unk = "<unk>"
        tk = TK(models.BPE(unk_token=unk, fuse_unk=True, byte_fallback=True))
        # Trained on "▁"-separated words either way; the Gemma style then encodes with a normalizer.
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials)
        tk.train_from_iterator([CORPUS], trainer)
        tk = TK.from_str(_byte_fallback_vocab(tk.to_str(), len(specials)))
        if style == "llama2":
            tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            tail = [decoders.Strip(content=" ", left=1)]
        else:  # gemma
            tk.pre_tokenizer = None
            tk.normalizer = normalizers.Replace(" ", "▁")
            tail = []
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *tail]
        )
        bos = s["tokenizer_config"]["bos_token"]
        add_bos = s["tokenizer_config"].get("add_bos_token", True)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0" if add_bos else "$A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1" if add_bos else "$A:0 $B:1",
            special_tokens=[(bos, tk.token_to_id(bos))] if add_bos else [],
        )
        text = tk.to_str()
    if s.get("added"):
        tk = TK.from_str(text)
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in s["added"]])
        text = tk.to_str()
    return text


def _ids(tk_json: str, value):
    from tokenizers import Tokenizer as TK

    tk = TK.from_str(tk_json)
    if isinstance(value, list):
        return [tk.token_to_id(v) for v in value]
    return tk.token_to_id(value) if isinstance(value, str) else value


@cache
def hub_dir(name: str, root: str) -> Path:
    """A local directory laid out as the hub repo: tokenizer.json, tokenizer_config.json, config.json,
    generation_config.json, and chat_template.jinja (where transformers >= 4.47 writes the template)."""
    s = spec(name)
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    tk_json = build_tokenizer_json(s)
    (d / "tokenizer.json").write_text(tk_json)
    cfg = dict(s["tokenizer_config"])
    if s["template"]:
        tpl = (DATA / "templates" / f"{s['template']}.jinja").read_text()
        if name.startswith("qwen"):  # older repos keep the template in tokenizer_config.json
            cfg["chat_template"] = tpl
        else:
            (d / "chat_template.jinja").write_text(tpl)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("config", "generation_config"):
        fields = {k: _ids(tk_json, v) if k.endswith("_token_id") else v for k, v in s[f].items()}
        (d / f"{f}.json").write_text(json.dumps(fields))
    return d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hub"))


def load_both(name, root):
    d = hub_dir(name, root)
    return Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(str(d))


# ----------------------------------------------------------------------------------------- BOS / ids
@pytest.mark.parametrize("name", MODELS)
def test_prompt_ids_equal_transformers(name, root):
    tok, hf = load_both(name, root)
    s = spec(name)
    assert tok.bos_id == hf.bos_token_id and tok.eos_id == hf.eos_token_id
    for t in TEXTS + [CORPUS[:300], "a <|im_end|> and </s> inside text"]:
        want = hf(t)["input_ids"]
        assert tok.encode(t) == want, (name, t)
        assert tok.encode_prompt(t) == want
        assert tok.decode(tok.encode(t, bos=False)) == hf.decode(hf.encode(t, add_special_tokens=False))
    assert tok.encode_batch(TEXTS) == hf(TEXTS)["input_ids"]
    first = tok.encode("Hello world")[0]
    if s["bos"] is None:  # GPT-2, SmolLM2, Qwen, Phi: no BOS (Qwen's bos_token is null: none by name)
        assert first != tok.token_to_id(s["tokenizer_config"].get("bos_token") or "<|endoftext|>")
        assert not tok.add_bos
    else:
        assert first == tok.token_to_id(s["bos"]) == tok.bos_id and tok.add_bos
    # Explicit flags still override the rule.
    plain = tok.encode("Hello world", bos=False)
    assert plain == hf.encode("Hello world", add_special_tokens=False)
    if tok.bos_id is not None:
        assert tok.encode("Hello world", bos=True) == [tok.bos_id, *plain]


def test_qwen_has_no_bos(root):
    tok = Tokenizer.load(hub_dir("qwen2.5-0.5b-instruct", root))
    assert tok.bos_id is None  # bos_token: null, though <|endoftext|> exists
    with pytest.raises(UserError, match="no BOS"):
        tok.encode("hi", bos=True)


def test_saved_hub_tokenizer_loads_the_same_in_transformers(root, tmp_path):
    """Saving a loaded hub tokenizer keeps its rule: transformers reads the same ids back."""
    for name in ("mistral-7b-instruct-v0.3", "qwen3-0.6b", "gpt2"):
        tok = Tokenizer.load(hub_dir(name, root))
        tok.save(tmp_path / name)
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        again = Tokenizer.load(tmp_path / name)
        for t in TEXTS:
            assert again.encode(t) == tok.encode(t) == hf(t)["input_ids"]
        # The template's end-of-turn tokens travel with the tokenizer; config.json's eos ids with the model.
        assert set(again.stop_ids()) <= set(tok.stop_ids()) and again.eos_id in again.stop_ids()
        assert again.chat_template == tok.chat_template


# ----------------------------------------------------------------------------------------- stop ids
@pytest.mark.parametrize("name", MODELS)
def test_stop_ids(name, root):
    tok = Tokenizer.load(hub_dir(name, root))
    want = sorted(tok.token_to_id(t) for t in spec(name)["stop"])
    assert tok.stop_ids() == want == tok.stop_ids


@pytest.mark.parametrize(
    "name", ["llama-3.2-1b-instruct", "gemma-2-2b-it", "qwen3-0.6b", "phi-3.5-mini-instruct"]
)
def test_generation_stops_at_every_stop_id(name, root):
    """A tiny model pushed by a huge logit bias onto each stop id ends right there, through the engine's
    default stop set (the tokenizer's stop_ids), and `lmforge chat` prints an empty reply."""
    import io

    import torch

    from lmforge.config import ModelConfig
    from lmforge.infer.chat import chat
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.lm import LM
    from lmforge.model import Transformer

    tok = Tokenizer.load(hub_dir(name, root))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=256)
    lm = LM(Transformer(cfg).eval(), tok)
    prompt = tok.encode_chat([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    for sid in tok.stop_ids():
        out = generate(
            lm.model,
            lm.tokenizer,
            prompt,
            details=True,
            max_new_tokens=8,
            temperature=0,
            logit_bias={sid: 100},
        )
        assert out.finish_reason == "stop" and out.token_ids == [sid], (name, sid)
        # Without the stop set (ignore_eos), the same model runs to max_new_tokens.
        out = generate(
            lm.model,
            lm.tokenizer,
            prompt,
            details=True,
            max_new_tokens=4,
            temperature=0,
            logit_bias={sid: 100},
            ignore_eos=True,
        )
        assert out.finish_reason == "length" and out.token_ids == [sid] * 4
    sid = tok.stop_ids()[-1]
    buf = io.StringIO()
    chat(
        lm.model,
        lm.tokenizer,
        SamplingParams(max_new_tokens=8, temperature=0, logit_bias={sid: 100}),
        input=io.StringIO("Hello\n"),
        output=buf,
        err=io.StringIO(),
    )
    assert buf.getvalue() == "\n"


# ----------------------------------------------------------------------------------------- chat templates
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {
    "id": "call00001",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
BASIC = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! What is 2+2?"},
    {"role": "assistant", "content": " It is 4. "},
    {"role": "user", "content": "And in Paris, 日本?"},
    {"role": "assistant", "content": "Sunny 🎉"},
]
TOOLS_CHAT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]
TOOL_TEMPLATES = {
    "llama-3.2-1b-instruct",
    "llama-3.1-8b-instruct",
    "qwen2.5-0.5b-instruct",
    "qwen3-0.6b",
    "mistral-7b-instruct-v0.3",
}


def conversations(name):
    """(messages, kwargs) cases for a template: what each real template accepts."""
    basic = BASIC[1:] if name.startswith("gemma-2") else BASIC  # gemma-2 refuses a system message
    cases = [(basic, {}), (basic[:-1], {"add_generation_prompt": True})]
    if name in TOOL_TEMPLATES:
        cases += [
            (TOOLS_CHAT, {"tools": [WEATHER]}),
            (TOOLS_CHAT[:1], {"tools": [WEATHER], "add_generation_prompt": True}),
        ]
    if name == "qwen3-0.6b":
        cases += [(basic[:-1], {"add_generation_prompt": True, "enable_thinking": False})]
        think = [*basic[:-1], {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
        cases += [
            (think, {}),
            ([*think, {"role": "user", "content": "more?"}], {"add_generation_prompt": True}),
        ]
        cases += [([*basic[:2], {"role": "assistant", "content": "4", "reasoning_content": "easy"}], {})]
    if name == "llama-3.1-8b-instruct":
        cases += [(TOOLS_CHAT[:2], {"builtin_tools": ["get_weather"], "date_string": "02 Dec 2026"})]
    return cases


@pytest.mark.parametrize("name", CHAT_MODELS)
def test_chat_template_equals_transformers(name, root):
    tok, hf = load_both(name, root)
    for messages, kw in conversations(name):
        kw = dict(kw)
        gen = kw.pop("add_generation_prompt", False)
        text = tok.apply_chat_template(messages, gen, **kw)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw), (
            name,
            kw,
        )
        out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, **kw)
        assert tok.encode_chat(messages, gen, **kw) == (out["input_ids"] if hasattr(out, "keys") else out)
    if name == "qwen3-0.6b":
        off = tok.apply_chat_template(BASIC[:2], True, enable_thinking=False)
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert tok.apply_chat_template(BASIC[:2], True).endswith("<|im_start|>assistant\n")


def test_template_errors_are_user_errors(root):
    tok = Tokenizer.load(hub_dir("gemma-2-2b-it", root))
    with pytest.raises(UserError, match="System role not supported"):
        tok.apply_chat_template(BASIC)


def test_template_file_locations(root, tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; chat_template.json is read too."""
    d = hub_dir("smollm2-135m-instruct", root)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_text((d / f).read_text())
    tpl = (d / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": tpl}))
    assert Tokenizer.load(tmp_path).chat_template == tpl
    (tmp_path / "chat_template.jinja").write_text("{{ 'X' }}")
    assert Tokenizer.load(tmp_path).apply_chat_template(BASIC) == "X"


# ----------------------------------------------------------------------------------------- SFT masks
def expected_turns(name, messages):
    """What each assistant turn writes, by the template's own rule, read off its source by hand."""
    out = []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        c = m.get("content") or ""
        if m.get("tool_calls"):
            args = json.dumps(m["tool_calls"][0]["function"]["arguments"])
            if name.startswith("qwen"):
                out.append(
                    f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call><|im_end|>'
                )
            elif name.startswith("llama"):
                out.append(f'{{"name": "get_weather", "parameters": {args}}}<|eot_id|>')
            elif name.startswith("mistral"):
                call = f'{{"name": "get_weather", "arguments": {args}, "id": "call00001"}}'
                out.append(f"[TOOL_CALLS] [{call}]</s>")
            continue
        if name.startswith("llama"):
            out.append(c.strip() + "<|eot_id|>")
        elif name.startswith("gemma"):
            out.append(c.strip() + "<end_of_turn>")
        elif name.startswith("mistral"):
            out.append(" " + c.strip() + "</s>")
        elif name.startswith("qwen3") and i == last:
            out.append("<think>\n\n</think>\n\n" + c + "<|im_end|>")
        elif name.startswith(("qwen", "smollm2")):
            out.append(c + "<|im_end|>")
        elif name.startswith("phi"):
            out.append(c + "<|end|>")
        elif name.startswith("olmo"):
            out.append(c + "<|endoftext|>")
    return out


def masked_text(tok, text, mask):
    ids, offsets = tok.encode_with_offsets(text)
    keep = [False] * len(text)
    for m, (a, b) in zip(mask, offsets):
        for k in range(a, b):
            keep[k] = keep[k] or bool(m)
    pieces, cur = [], ""
    for ch, k in zip(text, keep):
        if k:
            cur += ch
        elif cur:
            pieces.append(cur)
            cur = ""
    return pieces + ([cur] if cur else [])


@pytest.mark.parametrize("name", CHAT_MODELS)
def test_sft_mask_is_assistant_content_and_end_marker(name, root):
    tok = Tokenizer.load(hub_dir(name, root))
    chats = [(BASIC[1:] if name.startswith("gemma-2") else BASIC, None)]
    if name.startswith(("qwen", "llama-3.2", "mistral")):
        chats.append((TOOLS_CHAT, [WEATHER]))
    if name.startswith("mistral"):  # tools go before the last user message: earlier turns render differently
        chats.append((BASIC, [WEATHER]))
    for messages, tools in chats:
        ids, mask = render_with_mask(tok, messages, tools=tools)
        text = tok.apply_chat_template(messages, tools=tools)
        assert ids == tok.encode_chat(messages, tools=tools)
        got = masked_text(tok, text, mask)
        assert "".join(got) == "".join(expected_turns(name, messages)), (name, got)
        assert len(got) <= len(expected_turns(name, messages))  # no user/system text between turns


@pytest.mark.parametrize("template", ["qwen3-0.6b", "qwen3-0.6b-first-release"])
def test_sft_mask_qwen3_not_incremental(root, tmp_path, template):
    """Qwen3 drops the reasoning of earlier turns: the mask still finds every turn in one rendering.
    Both versions of the hub template: today's, and the first release's (the copy llama.cpp keeps in
    models/templates/Qwen-Qwen3-0.6B.jinja), which reads message.content without type checks."""
    d = hub_dir("qwen3-0.6b", root)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (DATA / "templates" / f"{template}.jinja").read_text()
    (tmp_path / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
    ]
    ids, mask = render_with_mask(tok, msgs)
    text = tok.apply_chat_template(msgs)
    assert text == hf.apply_chat_template(msgs, tokenize=False)
    assert "add them" not in text  # the earlier turn's reasoning is gone from the rendering
    assert masked_text(tok, text, mask) == ["4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]


def test_sft_mask_generation_tag(root, tmp_path):
    """A template with {% generation %} blocks gives the spans itself (as transformers' assistant masks)."""
    d = hub_dir("smollm2-135m-instruct", root)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_text((d / f).read_text())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    )
    tok = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids, mask = render_with_mask(tok, BASIC)
    out = hf.apply_chat_template(BASIC, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"] and mask == out["assistant_masks"]
    assert tok.apply_chat_template(BASIC) == hf.apply_chat_template(BASIC, tokenize=False)


# ----------------------------------------------------------------------------------------- SentencePiece
def _spm_dir(tmp_path) -> tuple[Path, object]:
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path / "spm"
    d.mkdir()
    (tmp_path / "corpus.txt").write_text(CORPUS.replace("\r", ""))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(d / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
        # As Llama-2 / Mistral's models: no whitespace folding, no NFKC.
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )
    (d / "tokenizer.vocab").unlink()
    s = spec("mistral-7b-instruct-v0.3")["tokenizer_config"]  # a Llama-2 / Mistral style config
    cfg = {
        k: s[k] for k in ("add_bos_token", "add_eos_token", "bos_token", "eos_token", "unk_token", "legacy")
    }
    cfg["tokenizer_class"] = "LlamaTokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return d, spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def test_sentencepiece_only_directory(tmp_path):
    d, sp = _spm_dir(tmp_path)
    tok = Tokenizer.load(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.stop_ids() == [2]
    for t in TEXTS[:5] + ["Hello world. unseen ẞ ⚙ 🎉"]:
        ids = tok.encode(t)
        assert ids == hf(t)["input_ids"], t
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        if not t[:1].isspace():  # (transformers' converter folds a leading space into the dummy prefix)
            assert ids == [1, *sp.encode(t)], t  # sentencepiece itself agrees (byte fallback included)
            assert tok.decode(ids, skip_special=True) == sp.decode(sp.encode(t)) == t


def test_sentencepiece_missing_names_the_extra(tmp_path, monkeypatch):
    import builtins

    d, _ = _spm_dir(tmp_path)
    real = builtins.__import__

    def no_spm(name, *a, **k):
        if name == "sentencepiece":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_spm)
    with pytest.raises(UserError, match=r"lmforge\[sentencepiece\].*save_pretrained"):
        Tokenizer.load(d)


def test_chat_passes_template_kwargs(root):
    from lmforge.infer.chat import fit_conversation
    from lmforge.options import key_values

    assert key_values(["enable_thinking=false", "name=Bob", "n=3"], "--template-kwarg") == {
        "enable_thinking": False,
        "name": "Bob",
        "n": 3,
    }
    with pytest.raises(UserError, match="KEY=VALUE"):
        key_values(["oops"], "--template-kwarg")
    tok = Tokenizer.load(hub_dir("qwen3-0.6b", root))
    ids, kept, dropped = fit_conversation(tok, BASIC[:2], 8, 4096, [WEATHER], enable_thinking=False)
    assert ids == tok.encode_chat(BASIC[:2], True, tools=[WEATHER], enable_thinking=False)
    assert tok.decode(ids).endswith("<think>\n\n</think>\n\n") and (kept, dropped) == (BASIC[:2], 0)
