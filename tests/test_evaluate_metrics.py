"""Evaluation numbers against references: perplexity and bits per byte by hand, a uniform model,
multiple choice from logits, the lm-eval adapter against lmforge, robustness, attention maps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lmforge
from lmforge.checkpoint import save_model
from lmforge.config import preset
from lmforge.model import build
from lmforge.tokenizer import train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Hello world, this is a small test of the evaluation code.\n",
    "Ünïcödé tëxt, café and naïve résumé; 日本語 too.\n",
] * 30

TEXT = (
    "The quick brown fox jumps over the lazy dog, and then the dog sleeps. "
    "def add(a, b): return a + b. Café, naïve, 日本語.\n"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_checkpoint(path, family: str = "llama", seed: int = 0, uniform: bool = False, **overrides):
    """A tiny random model with a trained byte-level BPE tokenizer, saved as a checkpoint."""
    tok = train_tokenizer(CORPUS, 400)
    torch.manual_seed(seed)
    cfg = preset(
        family,
        "debug",
        vocab_size=tok.vocab_size,
        max_seq_len=64,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        **overrides,
    )
    model = build(cfg).eval()
    if uniform:  # all logits equal: every token has probability 1/V
        with torch.no_grad():
            model.lm_head.weight.zero_()
    save_model(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ev") / "ck")


@pytest.fixture(scope="module")
def lm(ckpt):
    return lmforge.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "doc.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Written out, not F.log_softmax: x - log(sum(exp(x - max))) - max."""
    m = logits.max(-1, keepdim=True).values
    return logits - m - torch.log(torch.exp(logits - m).sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n", [1, 2, 5, 17, 64, 65, 200])
@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 5), (16, 1), (64, 32)])
def test_windows_score_every_target_once(n, seq_len, stride):
    from lmforge.evaluate.perplexity import windows

    scored = []
    for b, e, prev in windows(n, seq_len, stride):
        assert e - b <= seq_len and b >= 0 and e <= n - 1
        scored += list(range(prev + 1, e + 1))
        # later windows use the whole window as context
        if prev > 0:
            assert e - b == seq_len or b == 0
    assert scored == list(range(1, n))


# --------------------------------------------------------------------------------------------- perplexity


def test_uniform_model_has_perplexity_vocab_size(tmp_path, text_file):
    from lmforge.evaluate import evaluate_lm

    path = make_checkpoint(tmp_path / "uniform", uniform=True)
    lm = lmforge.load(path, device="cpu")
    V = lm.config.vocab_size
    r = evaluate_lm(lm.model, lm.tokenizer, str(text_file), split="all", seq_len=16, stride=8)
    tok = lm.tokenizer
    text_ids = tok.encode(TEXT, bos=False)
    assert r["tokens"] == len(text_ids) + 1  # every text token and EOS (BOS is never a target)
    assert r["text_tokens"] == len(text_ids)
    assert r["bytes"] == len(TEXT.encode("utf-8"))
    assert r["perplexity"] == pytest.approx(V, rel=1e-5)
    assert r["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(
        math.log2(V) * len(text_ids) / len(TEXT.encode("utf-8")), rel=1e-6
    )


def test_bits_per_byte_by_hand_single_window(lm, text_file):
    from lmforge.evaluate import evaluate_lm

    tok = lm.tokenizer
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert len(ids) <= lm.config.max_seq_len
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids[:-1]]))[0].double()
    lp = log_softmax(logits)
    nll = -lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    nb = torch.tensor(tok.token_bytes()[ids[1:]], dtype=torch.float64)
    bpb = float((nll * (nb > 0)).sum() / (math.log(2) * nb.sum()))
    loss = float(nll.mean())
    acc = float((logits.argmax(-1) == torch.tensor(ids[1:])).double().mean())
    r = evaluate_lm(lm.model, lm.tokenizer, str(text_file), split="all")
    assert r["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert r["loss"] == pytest.approx(loss, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert r["accuracy"] == pytest.approx(acc)
    assert r["bytes"] == len(TEXT.encode("utf-8"))


def test_sliding_windows_match_naive_contexts(lm, text_file):
    """Stride 1: target t is predicted from exactly ids[max(0, t - W) : t] (a forward pass per token)."""
    from lmforge.evaluate import evaluate_lm
    from lmforge.evaluate.perplexity import sequence_nll

    W = 8
    ids = lm.tokenizer.encode(TEXT, bos=True, eos=True)
    ref = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = ids[max(0, t - W) : t]
            ref.append(-float(log_softmax(lm.model(torch.tensor([ctx]))[0, -1].double())[ids[t]]))
    got = sequence_nll(lm.model, ids, seq_len=W, stride=1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    r = evaluate_lm(lm.model, lm.tokenizer, str(text_file), split="all", seq_len=W, stride=1)
    assert r["loss"] == pytest.approx(float(np.mean(ref)), rel=1e-5)


def test_max_tokens_and_documents(lm, tmp_path):
    from lmforge.evaluate import evaluate_lm

    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": f"{TEXT} number {i}"}) + "\n" for i in range(6)))
    r = evaluate_lm(lm.model, lm.tokenizer, str(f), split="all", max_tokens=100)
    assert r["tokens"] == 100
    full = evaluate_lm(lm.model, lm.tokenizer, str(f), split="all", batch_size=2)
    assert full["documents"] == 6
    assert full["bytes"] == sum(len(f"{TEXT} number {i}".encode()) for i in range(6))


def test_prepared_directory_equals_source(lm, tmp_path):
    """A `data prepare` directory's val split and the same source tokenized on the fly agree."""
    from lmforge.data.prepare import prepare
    from lmforge.evaluate import evaluate_lm

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": f"{TEXT} variant {i}"}) + "\n" for i in range(24)))
    out = tmp_path / "prepared"
    prepare(str(src), lm.tokenizer, out, workers=1, val_fraction=0.4, progress=False, verbose=False)
    a = evaluate_lm(lm.model, lm.tokenizer, str(out))
    b = evaluate_lm(lm.model, lm.tokenizer, str(src), val_fraction=0.4)
    assert a["documents"] == b["documents"] > 0
    for k in ("tokens", "text_tokens", "bytes"):
        assert a[k] == b[k]
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-6)


def test_empty_split_is_a_clear_error(lm, text_file):
    from lmforge.evaluate import evaluate_lm
    from lmforge.utils import UserError

    with pytest.raises(UserError, match="--split all"):
        evaluate_lm(lm.model, lm.tokenizer, str(text_file), val_fraction=0.0)


# --------------------------------------------------------------------------------------------- tasks

MC = [
    {"context": "The quick brown", "choices": ["fox", "dog jumps", "cat"], "label": 0},
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "a - b"], "label": 1},
    {"context": "Hello ", "choices": ["world", "there, friend"], "label": "world"},
    {"ctx": "Café and", "endings": ["naïve", "résumé", "日本語"], "label": "2"},
]


def direct_choice_loglik(lm, context: str, choice: str) -> float:
    """log p(" " + choice | context) straight from the logits (BOS first, trailing spaces moved)."""
    tok = lm.tokenizer
    cont = " " + choice
    if context.endswith(" "):
        context, cont = context.rstrip(" "), context[len(context.rstrip(" ")) :] + cont
    ctx_ids = tok.encode(context, bos=True)
    whole = tok.encode(context + cont, bos=True)
    with torch.no_grad():
        lp = log_softmax(lm.model(torch.tensor([whole[:-1]]))[0].double())
    return sum(float(lp[t - 1, whole[t]]) for t in range(len(ctx_ids), len(whole)))


def test_multiple_choice_equals_direct_computation(lm, tmp_path):
    from lmforge.evaluate import evaluate_task

    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MC))
    r = evaluate_task(lm.model, lm.tokenizer, str(f), keep_predictions=True, batch_size=3)
    labels = [0, 1, 0, 2]
    acc = acc_norm = 0
    for rec, pred, label in zip(MC, r["predictions"], labels):
        ctx = rec.get("context", rec.get("ctx"))
        choices = rec.get("choices", rec.get("endings"))
        ll = [direct_choice_loglik(lm, ctx, c) for c in choices]
        np.testing.assert_allclose(pred["loglikelihoods"], ll, rtol=1e-5)
        assert pred["label"] == label
        acc += int(np.argmax(ll) == label)
        acc_norm += int(np.argmax([x / len(c.encode()) for x, c in zip(ll, choices)]) == label)
    assert r["acc"] == acc / len(MC) and r["acc_norm"] == acc_norm / len(MC) and r["n"] == len(MC)


def test_generation_exact_match(lm, tmp_path):
    from lmforge.evaluate import evaluate_task
    from lmforge.evaluate.tasks import generate_greedy

    prompts = ["The quick brown fox", "def add(a, b):"]
    outs = generate_greedy(lm.model, lm.tokenizer, prompts, max_new_tokens=6)
    assert all("\n" not in o for o in outs)
    f = tmp_path / "gen.jsonl"
    rows = [
        {"prompt": prompts[0], "answer": outs[0]},
        {"prompt": prompts[1], "answer": [outs[1] + "x", "nope"]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = evaluate_task(lm.model, lm.tokenizer, str(f), max_new_tokens=6)
    assert r["kind"] == "generation" and r["exact_match"] == 0.5


def test_task_format_errors(tmp_path):
    from lmforge.evaluate import load_task
    from lmforge.utils import UserError

    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"context": "a", "choices": ["x", "y"], "label": 5}) + "\n")
    with pytest.raises(UserError, match="out of range"):
        load_task(f)
    f.write_text(
        json.dumps({"context": "a", "choices": ["x", "y"], "label": 0})
        + "\n"
        + json.dumps({"prompt": "a", "answer": "b"})
        + "\n"
    )
    with pytest.raises(UserError, match="mixes"):
        load_task(f)
    f.write_text(
        json.dumps({"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"})
        + "\n"
    )
    t = load_task(f)
    assert t.examples[0] == {"context": "Question: q\nAnswer:", "choices": ["x", "y"], "label": 1}


# --------------------------------------------------------------------------------------------- robustness


def test_perturbations_are_seeded_and_controlled():
    from lmforge.evaluate.robustness import Perturbation, parse_perturbations

    text = "The Quick brown fox jumps over the lazy dog again and again."
    p = Perturbation("typos", 0.1)
    assert p(text, 3, seed=0) == p(text, 3, seed=0)
    assert p(text, 3, seed=0) != p(text, 3, seed=1) or p(text, 4, seed=0) != p(text, 3, seed=0)
    assert p(text, 0) != text
    assert Perturbation("typos", 0.0)(text, 0) == text
    assert Perturbation("upper")(text, 0) == text.upper()
    assert Perturbation("lower")(text, 0) == text.lower()
    flipped = Perturbation("random_case", 1.0)(text, 0)
    assert flipped == text.swapcase()
    ws = Perturbation("whitespace", 1.0)(text, 0)
    assert ws.split() == text.split() and " " not in ws.replace("  ", "")
    names = [q.name for q in parse_perturbations("typos:0.05,upper")]
    assert names == ["clean", "typos 5%", "upper"]


def test_robustness_clean_row_equals_task(lm, tmp_path):
    from lmforge.evaluate import evaluate_task, robustness_report
    from lmforge.evaluate.robustness import parse_perturbations

    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MC))
    r = robustness_report(
        lm.model, lm.tokenizer, str(f), perturbations=parse_perturbations("typos:0.2,upper"), seed=0
    )
    clean = evaluate_task(lm.model, lm.tokenizer, str(f))
    assert [row["perturbation"] for row in r["rows"]] == ["clean", "typos 20%", "upper"]
    assert r["rows"][0]["acc"] == clean["acc"] and r["rows"][0]["acc_norm"] == clean["acc_norm"]
    again = robustness_report(
        lm.model, lm.tokenizer, str(f), perturbations=parse_perturbations("typos:0.2,upper"), seed=0
    )
    assert again["rows"] == r["rows"]
    for row in r["rows"]:
        assert row["delta_acc"] == pytest.approx(row["acc"] - clean["acc"])


# --------------------------------------------------------------------------------------------- lm-eval adapter


def test_lm_eval_adapter_equals_lmforge(lm):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lmforge.evaluate.lm_eval_adapter import LMForgeLM
    from lmforge.evaluate.perplexity import sequence_nll
    from lmforge.evaluate.tasks import generate_greedy, loglikelihoods

    adapter = LMForgeLM(lm=lm, batch_size=2)
    pairs = [
        ("The quick brown", " fox"),
        ("Hello ", "world"),
        ("", "def add(a, b):"),
        ("Café", " naïve 日本語"),
    ]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = adapter.loglikelihood(reqs, disable_tqdm=True)
    want = loglikelihoods(lm.model, lm.tokenizer, pairs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)
    assert [g[1] for g in got] == [w[1] for w in want]
    # and both equal the direct computation from logits
    assert got[0][0] == pytest.approx(direct_choice_loglik(lm, "The quick brown", "fox"), rel=1e-5)

    rolled = adapter.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (TEXT,), 0)], disable_tqdm=True
    )
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(TEXT, bos=False)]
    assert rolled[0] == pytest.approx(-float(sequence_nll(lm.model, ids).sum()), rel=1e-6)

    gen = adapter.generate_until(
        [Instance("generate_until", {}, ("The quick brown fox", {"until": ["\n"], "max_gen_toks": 5}), 0)],
        disable_tqdm=True,
    )
    assert gen == generate_greedy(lm.model, lm.tokenizer, ["The quick brown fox"], max_new_tokens=5)


# --------------------------------------------------------------------------------------------- attention


def naive_head_probs(
    model, x: torch.Tensor, layer: int, head: int, window: int | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) for one head from the layer input x (1, T, d), with loops."""
    attn = model.blocks[layer].attn
    cfg = model.config
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    W = attn.wqkv.weight.double()
    wq = W[head * hd : (head + 1) * hd]
    kv = head // group
    wk = W[cfg.q_dim + kv * hd : cfg.q_dim + (kv + 1) * hd]
    xs = x[0].double()
    T = xs.shape[0]

    def rope(v, pos):  # rotate pairs (i, i + hd/2) by pos * inv_freq_i
        half = hd // 2
        out = v.clone()
        for i in range(half):
            ang = pos * (1.0 / cfg.rope_theta ** (2 * i / hd))
            c, s = math.cos(ang), math.sin(ang)
            out[i] = v[i] * c - v[i + half] * s
            out[i + half] = v[i + half] * c + v[i] * s
        return out

    q = [rope(wq @ xs[t], t) for t in range(T)]
    k = [rope(wk @ xs[t], t) for t in range(T)]
    P = torch.zeros(T, T, dtype=torch.float64)
    for t in range(T):
        keys = [s for s in range(t + 1) if window is None or t - s < window]
        sc = torch.tensor([float(q[t] @ k[s]) / math.sqrt(hd) for s in keys], dtype=torch.float64)
        P[t, keys] = torch.softmax(sc, 0)
    return P


@pytest.mark.parametrize("family", ["llama", "mistral"])
@torch.no_grad()
def test_attention_probs_match_reference(tmp_path, family):
    from lmforge.evaluate.inspect import attention_probs

    extra = {"sliding_window": 8} if family == "mistral" else {}
    lm = lmforge.load(make_checkpoint(tmp_path / family, family=family, seed=1, **extra), device="cpu")
    model = lm.model
    ids = lm.tokenizer.encode(TEXT, bos=True)[:24]
    window = model.config.sliding_window
    if family == "mistral":
        assert window is not None and window < len(ids)  # the masked path is exercised
    inputs, outputs = {}, {}
    layer = 1
    attn = model.blocks[layer].attn
    h1 = attn.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0].detach().clone()))  # returns None
    h2 = attn.register_forward_hook(lambda m, a, o: outputs.update(y=o.detach().clone()))
    try:
        logits, probs = attention_probs(model, torch.tensor([ids]))
    finally:
        h1.remove()
        h2.remove()
    assert torch.allclose(logits, lm(ids))  # hooks do not change the model's output
    for P in probs:
        assert P.shape == (1, model.config.n_heads, len(ids), len(ids))
        torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))
        assert bool((P[0].triu(diagonal=1) == 0).all())  # causal: no weight on future keys
    ref = naive_head_probs(model, inputs["x"], layer, head=3, window=window)
    torch.testing.assert_close(probs[layer][0, 3].double(), ref, rtol=1e-4, atol=1e-6)
    # P @ V through the output projection gives the layer's real output
    cfg = model.config
    v = attn.wqkv(inputs["x"])[..., cfg.q_dim + cfg.kv_dim :].view(1, len(ids), cfg.n_kv_heads, cfg.head_dim)
    v = v.transpose(1, 2).repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
    y = (probs[layer] @ v).transpose(1, 2).reshape(1, len(ids), cfg.q_dim)
    torch.testing.assert_close(attn.wo(y), outputs["y"], rtol=1e-4, atol=1e-5)


def test_decode_weight_bytes_counts_what_a_step_reads():
    from lmforge.evaluate.bench import decode_weight_bytes

    for tied in (False, True):
        m = build(preset("llama", "debug", tie_embeddings=tied))
        total = sum(p.numel() * 4 for p in m.parameters())  # parameters() counts a tied tensor once
        emb = m.tok_emb.weight.numel() * 4
        assert decode_weight_bytes(m) == (total if tied else total - emb)
    g = build(preset("gpt2", "debug"))  # tied, plus a learned position table read one row at a time
    assert decode_weight_bytes(g) == sum(p.numel() * 4 for p in g.parameters()) - g.pos_emb.weight.numel() * 4
