"""Per-token cost of grammar masks on CPU: llguidance (lmforge's choice) against xgrammar and outlines-core.

    python bench/grammar_mask.py                       # trains a BPE tokenizer on Python's stdlib source
    python bench/grammar_mask.py --tokenizer ckpt/     # or any directory with a tokenizer.json

For a JSON schema (nested objects, an array, an enum, bounded integers) each library compiles the
grammar for the tokenizer, then walks a valid document token by token: compute the mask of allowed
next tokens, then consume the document's token. Printed: compile time, mean and p95 microseconds per
token (mask + consume), in rounds that alternate the libraries (the machine is shared). "lmforge" is
llguidance through lmforge's engine path (the bitmask unpacked to a bool mask). Libraries that are not
installed are skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["person", "company", "other"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "address"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace of the Analytical Engine",
    "kind": "person",
    "age": 36,
    "tags": ["math", "poetry", "engines", "notes on the engine"],
    "address": {"city": "London", "zip": "W1J 0BD"},
}


def _tokenizer(path, vocab):
    if path:
        return Tokenizer.load(path)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files[:120]]
    return train_tokenizer(texts, vocab)


def _llguidance(tok, V, ids):
    import llguidance as llg
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lt = llg.LLTokenizer(tok._json, n_vocab=V, eos_token=tok.eos_id)
    g = llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    m = llg.LLMatcher(lt, g, log_level=0)
    compile_s = time.perf_counter() - t0
    bm = llt.allocate_token_bitmask(1, V)

    def walk():
        m.reset()
        out = []
        for t in ids:
            a = time.perf_counter()
            llt.fill_next_token_bitmask(m, bm, 0)
            assert m.consume_token(t), m.get_error()
            out.append(time.perf_counter() - a)
        return out

    return compile_s, walk


def _lmforge(tok, V, ids):
    """lmforge's own path: Grammar -> Matcher -> allowed_mask (llguidance's bitmask unpacked to a (1, V)
    bool mask with the stop ids set, as the engine applies it), then consume."""
    from lmforge.infer.grammar import Grammar, allowed_mask

    t0 = time.perf_counter()
    g = Grammar.json_schema(SCHEMA)
    g.matcher(tok, V)
    compile_s = time.perf_counter() - t0
    stops = frozenset([tok.eos_id]) if tok.eos_id is not None else frozenset()

    def walk():
        m = g.matcher(tok, V)
        out = []
        for t in ids:
            a = time.perf_counter()
            allowed_mask([(0, m, stops)], 1, V, "cpu")
            assert m.consume(t)
            out.append(time.perf_counter() - a)
        return out

    return compile_s, walk


def _xgrammar(tok, V, ids):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok._tk)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)
    cg = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    compile_s = time.perf_counter() - t0
    bm = xgr.allocate_token_bitmask(1, V)
    matcher = xgr.GrammarMatcher(cg)

    def walk():
        matcher.reset()
        out = []
        for t in ids:
            a = time.perf_counter()
            matcher.fill_next_token_bitmask(bm)
            assert matcher.accept_token(t)
            out.append(time.perf_counter() - a)
        return out

    return compile_s, walk


def _outlines(tok, V, ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    vocab: dict[str, list[int]] = {}
    eos = tok.eos_id
    for i in range(tok.vocab_size):
        if i == eos:
            continue
        s = tok._tk.id_to_token(i)
        if s is not None:
            vocab.setdefault(s, []).append(i)
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    index = Index(regex, Vocabulary(eos, vocab))
    compile_s = time.perf_counter() - t0
    mask = torch.zeros((V + 31) // 32, dtype=torch.int32)

    def walk():
        guide = Guide(index)
        out = []
        for t in ids:
            a = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            guide.advance(t)
            out.append(time.perf_counter() - a)
        return out

    return compile_s, walk


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="a directory with tokenizer.json (default: train one)")
    ap.add_argument(
        "--vocab", type=int, default=8192, help="vocabulary of the trained tokenizer (default 8192)"
    )
    ap.add_argument("--rounds", type=int, default=5, help="rounds alternating the libraries (default 5)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok = _tokenizer(a.tokenizer, a.vocab)
    V = tok.vocab_size
    text = json.dumps(DOC, separators=(",", ":"))  # compact: what every grammar here is compiled for
    ids = tok.encode(text)
    if ids and ids[0] == tok.bos_id:  # the grammar constrains the output, which has no BOS
        ids = ids[1:]
    print(f"tokenizer: {V} tokens; document: {len(text)} chars, {len(ids)} tokens")
    libs = {}
    makers = (
        ("llguidance", _llguidance),
        ("lmforge", _lmforge),
        ("xgrammar", _xgrammar),
        ("outlines-core", _outlines),
    )
    for name, make in makers:
        try:
            libs[name] = make(tok, V, ids)
            libs[name][1]()  # warm-up, and a check that the document is accepted
        except Exception as e:  # not installed, or its API differs
            print(f"{name}: skipped ({type(e).__name__}: {str(e)[:120]})")
            libs.pop(name, None)
    times = {n: [] for n in libs}
    for _ in range(a.rounds):
        for n, (_, walk) in libs.items():
            times[n] += walk()
    base = statistics.mean(times["llguidance"]) if "llguidance" in times else None
    print(
        f"{'library':<14} {'compile ms':>10} {'mean us/token':>14} {'p95 us/token':>13} {'vs llguidance':>14}"
    )
    for n, (compile_s, _) in libs.items():
        ts = sorted(times[n])
        mean = statistics.mean(ts)
        ratio = f"{mean / base:.2f}x" if base else "-"
        print(
            f"{n:<14} {compile_s * 1e3:>10.1f} {mean * 1e6:>14.1f} {ts[int(0.95 * len(ts))] * 1e6:>13.1f} {ratio:>14}"
        )


if __name__ == "__main__":
    main()
