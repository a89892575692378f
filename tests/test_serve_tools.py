"""Tool calls: the parsers of the three formats (Hermes/Qwen, Llama 3.x, Mistral) on hand-written model
output, the format each real template teaches, and the whole loop against a real server with the official
openai client on a tiny model with Qwen2.5's real chat template: a forced call (tool_choice named /
required, through the grammar) -> message.tool_calls (streamed too) -> a `tool` message -> an answer; and
`lmforge finetune` on tool-call conversations teaching a model to call the tool by itself (auto)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from serve_helpers import TEXT, Server
from train_data import run_lmforge

from lmforge.serve import tools as T

pytestmark = pytest.mark.timeout(900)
DATA = Path(__file__).parent / "data"
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Oslo", "Vienna", "Lisbon", "Prague"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                       "required": ["zone"], "additionalProperties": False},
    },
}  # fmt: skip


# ------------------------------------------------------------------------------------------- parsers
def test_formats_follow_the_real_templates():
    want = {
        "qwen2.5-0.5b-instruct": "hermes",
        "qwen3-0.6b": "hermes",
        "llama-3.1-8b-instruct": "llama3",
        "llama-3.2-1b-instruct": "llama3",
        "mistral-7b-instruct-v0.3": "mistral",
        "gemma-2-2b-it": None,  # its template renders no tools
    }
    for name, fmt in want.items():
        assert T.detect((DATA / "templates" / f"{name}.jinja").read_text()) == fmt, name


def test_parsers_on_forced_output():
    args = {"city": "Paris", "unit": "C"}
    hermes = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
    )
    hermes += '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    content, calls = T.parse("hermes", hermes)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", args),
        ("get_time", {"zone": "CET"}),
    ]
    # Llama 3.x: bare JSON with "parameters" (after <|python_tag|> or not), ';' between parallel calls
    for text in ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'):  # fmt: skip
        content, calls = T.parse("llama3", text)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", args)
        ]
    _, calls = T.parse("llama3", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [c.name for c in calls] == ["a", "b"]
    # Mistral: a JSON list after [TOOL_CALLS] (which a decoder that skips special tokens drops)
    for text in ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]',
                 '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]'):  # fmt: skip
        content, calls = T.parse("mistral", text)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
    # not a call: the text stays content
    for fmt, text in [("hermes", "plain answer"), ("llama3", "{not json"), ("mistral", "[1, 2]"),
                      ("hermes", "<tool_call>\n{broken\n</tool_call>")]:  # fmt: skip
        assert T.parse(fmt, text) == (text, [])
    # streaming: content passes through as it comes, a marker split across pushes is held back
    p = T.StreamParser("hermes")
    out = [
        p.push(x)
        for x in ["Sure", ". <tool", "_call>\n", '{"name": "get_time", ', '"arguments": {"zone": "UTC"}}']
    ]
    assert "".join(out) == "Sure. " and out[1] == ". "
    rest, calls = p.finish()
    assert rest == "" and [(c.name, c.arguments) for c in calls] == [("get_time", '{"zone": "UTC"}')]
    p = T.StreamParser("hermes")
    assert p.push("no <tool") == "no " and p.push("s here") == "<tools here" and p.finish() == ("", [])
    p = T.StreamParser("llama3")
    assert p.push('{"name": "a", ') == "" and p.push('"parameters": {}}') == ""
    assert [c.name for c in p.finish()[1]] == ["a"]


def test_forced_call_schemas_validate():
    from lmforge.infer.grammar import Grammar

    class Tool:  # the protocol's Tool shape
        def __init__(self, d):
            self.function = type("F", (), d["function"] | {"parameters": d["function"].get("parameters")})

    tools = [Tool(WEATHER), Tool(TIME)]
    for fmt in T.FORMATS:
        prefix, schema = T.forced(fmt, tools, "get_weather")
        Grammar.json_schema(schema, strict=True)  # compiles
        text = {"hermes": '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}',
                "llama3": '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}',
                "mistral": '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}]'}[fmt]  # fmt: skip
        _, calls = T.parse(fmt, prefix + text)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Oslo", "unit": "F"})
        ]
        _, any_schema = T.forced(fmt, tools)
        Grammar.json_schema(any_schema, strict=True)


# ------------------------------------------------------------------------------------------- end to end
def _conversation(i: int) -> dict:
    city, unit = CITIES[i % len(CITIES)], "CF"[i % 2]
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": unit})}}  # fmt: skip
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": f"sunny, 20 {unit}"},
            {"role": "assistant", "content": f"It is sunny in {city}."},
        ],
    }


@pytest.fixture(scope="module")
def tool_ckpt(tmp_path_factory) -> Path:
    """A debug llama with a BPE trained here and Qwen2.5-0.5B-Instruct's real chat template (Hermes tool
    calls, <|im_start|>/<|im_end|> as special tokens), fine-tuned with `lmforge finetune` on tool-call
    conversations for a few steps."""
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tool_model")
    records = [_conversation(i) for i in range(64)]
    template = (DATA / "templates/qwen2.5-0.5b-instruct.jinja").read_text()
    # the template's and the tool's text in the corpus: their renderings take few tokens
    corpus = TEXT + [json.dumps(r) for r in records] + [template, json.dumps(WEATHER)] * 20
    tok = train_tokenizer(corpus, 1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    base = root / "base"
    tok.save(base)
    cfg_path = base / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=template, eos_token="<|im_end|>",
               bos_token=None)  # fmt: skip
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.load(base)
    mc = preset("llama", "debug", vocab_size=tok.vocab_size, bos_token_id=None, eos_token_id=tok.eos_id,
                max_seq_len=768)  # fmt: skip
    torch.manual_seed(0)
    save_model(build(mc).eval(), base, tokenizer=tok)
    data = root / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = run_lmforge("finetune", "--model.init_from", base, "--data.path", data, "--data.seq_len", "512",
                    "--train.max_steps", "120", "--train.batch_size", "8", "--train.lr", "3e-3",
                    "--train.warmup_steps", "10", "--eval.every", "0", "--eval.batches", "1", "--eval.samples", "0", "--ckpt.every", "0",
                    "--out_dir", root / "runs", "--name", "tools", timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = next((root / "runs").glob("**/final"))
    return final


@pytest.fixture(scope="module")
def client(tool_ckpt, tmp_path_factory):
    with Server(
        tool_ckpt, "--max-batch", "4", "--model-name", "tools", log_dir=tmp_path_factory.mktemp("t")
    ) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_forced_tool_calls_round_trip(client):
    msgs = [{"role": "user", "content": "Weather in Rome, please?"}]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        for seed in range(3):
            r = client.chat.completions.create(model="tools", messages=msgs, tools=[WEATHER, TIME], tool_choice=choice,
                                               seed=seed, max_tokens=80)  # fmt: skip
            ch = r.choices[0]
            assert ch.finish_reason == "tool_calls", ch
            call = ch.message.tool_calls[0]
            args = json.loads(call.function.arguments)
            if choice != "required":
                assert call.function.name == "get_weather"
            if call.function.name == "get_weather":
                assert args["city"] in CITIES and args["unit"] in ("C", "F") and set(args) == {"city", "unit"}
            assert call.id and call.type == "function"
    # streamed: the same call as deltas
    kw = dict(model="tools", messages=msgs, tools=[WEATHER], tool_choice="required", seed=1, max_tokens=80)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                name += d.function.name or "" if d.function else ""
                arguments += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert (name, arguments, finish) == (whole.function.name, whole.function.arguments, "tool_calls")
    # the call goes back with the tool's result: a final answer
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [whole.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": whole.id, "content": "sunny, 20 C"},
    ]
    final = client.chat.completions.create(model="tools", messages=history, tools=[WEATHER], max_tokens=30,
                                           temperature=0)  # fmt: skip
    assert final.choices[0].message.role == "assistant" and final.choices[0].finish_reason in (
        "stop",
        "length",
    )
    # tool_choice "none" renders no tools and parses nothing
    r = client.chat.completions.create(model="tools", messages=msgs, tools=[WEATHER], tool_choice="none",
                                       max_tokens=20, temperature=0)  # fmt: skip
    assert r.choices[0].message.tool_calls is None


def test_finetuned_model_calls_its_tool_by_itself(client):
    """auto: the fine-tuned model writes the call (a few steps teach it the format, not yet which city to
    copy), the server parses it, the tool result comes back, and the model answers in text."""
    msgs = [{"role": "user", "content": "What is the weather in Berlin?"}]
    r = client.chat.completions.create(
        model="tools", messages=msgs, tools=[WEATHER], temperature=0, max_tokens=60
    )
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch.message
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in CITIES
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 20 C"},
    ]
    final = client.chat.completions.create(model="tools", messages=history, tools=[WEATHER], temperature=0,
                                           max_tokens=30)  # fmt: skip
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.startswith("It is sunny in ")  # what it was taught to say
