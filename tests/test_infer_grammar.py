"""Grammar-constrained decoding: a tiny random model's outputs always parse and validate."""

import json
import re
import sys

import pytest
import torch

from lmforge.config import preset
from lmforge.infer import Engine, Grammar, SamplingParams, Sequence, generate
from lmforge.lm import LM
from lmforge.model import build
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import UserError

pytest.importorskip("llguidance")
pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]  # one_thread: conftest.py

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "owner": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "ok"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "owner"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 4},
                "minItems": 1,
                "maxItems": 3,
            },
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "maxItems": 4,
            },
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        },
        "required": ["color", "size", "maybe"],
        "additionalProperties": False,
    },
}


def _pydantic_schema():
    """The shape `client.chat.completions.parse(response_format=Model)` sends (pydantic, strict)."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Step(BaseModel):
        n: int = Field(ge=0, le=20)
        ok: bool

    class Answer(BaseModel):
        kind: Literal["a", "b"]
        word: str = Field(max_length=5)
        steps: list[Step] = Field(max_length=2)

    schema = Answer.model_json_schema()
    for d in [schema, *schema.get("$defs", {}).values()]:  # what openai's to_strict_json_schema adds
        d["additionalProperties"] = False
        d["required"] = list(d["properties"])
    return Answer, schema


@pytest.fixture(scope="module")
def lm():
    docs = [
        '{"name": "abc", "tags": ["x", "y"], "n": 12, "ok": true, "color": "red"} 0123456789 ab-cd\n'
    ] * 10
    docs += ["The quick brown fox jumps over the lazy dog. null false [1, 2, 3] {}\n"] * 10
    tok = train_tokenizer(docs, 330)
    torch.manual_seed(0)
    cfg = preset("llama", "debug", vocab_size=tok.vocab_size + 7, eos_token_id=tok.eos_id)  # padded vocab
    return LM(build(cfg).eval(), tok)


def _validate(obj, schema):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(obj, schema)


def _run(lm, seqs):
    eng = Engine(lm.model, lm.tokenizer, max_batch=len(seqs))
    eng.add(seqs)
    while eng.active:
        eng.step()
    return seqs


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema_outputs_validate_batched_with_free_rows(lm, name):
    schema = SCHEMAS[name]
    g = Grammar.json_schema(schema)
    free = [
        Sequence(
            lm.tokenizer.encode("The quick"),
            SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
        )
    ]
    cons = [
        Sequence(
            lm.tokenizer.encode("{"), SamplingParams(max_new_tokens=200, temperature=1.0, seed=s, grammar=g)
        )
        for s in range(4)
    ]
    _run(lm, [free[0], *cons])
    for s in cons:
        assert s.finish_reason == "stop", s.text
        _validate(json.loads(s.text), schema)
    # the free row is what it is alone: masks never leak across rows
    assert (
        free[0].token_ids
        == generate(
            lm.model,
            lm.tokenizer,
            "The quick",
            max_new_tokens=30,
            temperature=0,
            ignore_eos=True,
            details=True,
        ).token_ids
    )


def test_pydantic_schema_twenty_seeds(lm):
    Answer, schema = _pydantic_schema()
    g = Grammar.json_schema(schema, strict=True)
    seqs = [
        Sequence(
            lm.tokenizer.encode("x"), SamplingParams(max_new_tokens=200, temperature=1.0, seed=s, grammar=g)
        )
        for s in range(20)
    ]
    seqs.append(
        Sequence(lm.tokenizer.encode("y"), SamplingParams(max_new_tokens=20, temperature=1.0, seed=0))
    )
    _run(lm, seqs)
    for s in seqs[:20]:
        assert s.finish_reason == "stop"
        obj = json.loads(s.text)
        _validate(obj, schema)
        Answer.model_validate(obj)
    assert len({s.text for s in seqs[:20]}) > 1  # the seeds do sample


def test_json_object_regex_choice(lm):
    outs = generate(
        lm.model,
        lm.tokenizer,
        ["a", "b", "c"],
        max_new_tokens=60,
        temperature=1.0,
        seed=3,
        grammar=Grammar.regex(r"[0-9]{3}-[a-d]{2}"),
    )
    assert all(re.fullmatch(r"[0-9]{3}-[a-d]{2}", o) for o in outs), outs
    opts = ["red", "green", "blue fox"]
    outs = [
        generate(
            lm.model,
            lm.tokenizer,
            "x",
            max_new_tokens=20,
            temperature=1.0,
            seed=s,
            grammar=Grammar.choice(opts),
        )
        for s in range(4)
    ]
    assert all(o in opts for o in outs), outs
    c = generate(
        lm.model,
        lm.tokenizer,
        "{",
        max_new_tokens=200,
        temperature=0,
        grammar=Grammar.json_object(),
        details=True,
    )
    if c.finish_reason == "stop":  # any object: a random model may run past the budget inside a string
        assert isinstance(json.loads(c.text), dict)
    else:
        assert c.text.startswith("{")


def test_bad_grammars_and_missing_library(lm, monkeypatch):
    with pytest.raises(UserError, match="regex"):
        Grammar.regex("[")
    with pytest.raises(UserError, match="json_schema"):
        Grammar.json_schema({"type": "foo"})
    with pytest.raises(UserError, match="tokenizer"):
        Engine(lm.model, None).add([Sequence([1, 2], SamplingParams(grammar=Grammar.json_object()))])
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(UserError, match=r"pip install 'lmforge\[structured\]'"):
        Grammar.json_object()
