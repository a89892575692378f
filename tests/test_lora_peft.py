"""LoRA adapters in the PEFT format, checked against the real `peft` library: lmforge's adapters load in
peft with the same logits, peft's load in lmforge (separate q/k/v stacked into the fused layout, rslora,
rank/alpha patterns, modules_to_save), merging equals peft's merge_and_unload, lmforge's earlier
format still loads, and unsupported PEFT types are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hf_models import V, hf_model
from safetensors.torch import load_file, save_file
from serve_helpers import serve_ckpt  # noqa: F401

from lmforge.checkpoint import load_model
from lmforge.train.lora import (
    LoRALinear,
    apply_lora,
    load_lora_model,
    lora_state_dict,
    merge_lora_dir,
    save_adapter,
)
from lmforge.utils import UserError

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(300)

FAMILIES = ["llama", "gpt2", "mistral", "gemma", "qwen2", "phi3"]
HUB_NAME = {"qwen2": "qwen2.5-0.5b", "phi3": "phi-3.5-mini"}  # tests/hub_models.py (real hub configs)
# HF module names a peft user targets in each family (separate q/k/v, as peft adapters on the hub are)
ALL = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused in HF too: mapped whole
    **dict.fromkeys(
        ["llama", "mistral", "gemma", "qwen2"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def _hf(family: str):
    """A tiny random transformers model of `family` (Qwen2, Phi-3 from the real hub config fields)."""
    if family not in HUB_NAME:
        return hf_model(family)
    from lmforge.config import HF_MODEL_TYPE

    if family not in HF_MODEL_TYPE:
        pytest.skip(f"the {family} family is not in lmforge yet (helper 'families' adds it)")
    try:
        from hub_models import hub_model
    except ImportError:
        pytest.skip("tests/hub_models.py (helper 'families') is not there yet")
    return hub_model(HUB_NAME[family])


@pytest.fixture(scope="module", params=FAMILIES)
def base(request, tmp_path_factory):
    """(family, HF base directory, ids) for one family."""
    family = request.param
    d = tmp_path_factory.mktemp(f"base-{family}")
    model = _hf(family)
    with torch.no_grad():  # randomise biases (Qwen2's q/k/v) so that a mismatch would show
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    vocab = min(V, model.config.vocab_size)
    return family, d, torch.randint(0, vocab, (2, 11), generator=g)


def _hf_base(d):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()


def _max_diff(a: dict, b: dict) -> float:
    keys = set(a) & set(b)
    assert keys, "no common tensors"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def _merged_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lmforge_adapter_loads_in_peft_and_merges_alike(base, tmp_path):
    family, d, ids = base
    model = load_model(d)
    apply_lora(model, rank=4, alpha=8.0, targets=["all"])
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)  # B starts at 0: give the adapter a visible effect
    save_adapter(
        tmp_path / "ad", lora_state_dict(model), model.lora_config, base=str(d), model_config=model.config
    )
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["fan_in_fan_out"] == (family == "gpt2")
    assert sorted(cfg["target_modules"]) == sorted(ALL[family])
    ours = model.eval()(ids)

    pm = peft.PeftModel.from_pretrained(_hf_base(d), tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = pm(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - _hf_base(d)(ids).logits).abs().max().item() > 1e-2  # the adapter does something

    # read back fused, exactly: one shared A, rank 4 (not 12)
    again = load_lora_model(tmp_path / "ad")
    ranks = {m.rank for m in again.modules() if isinstance(m, LoRALinear)}
    assert ranks == {4}
    assert torch.equal(again(ids), ours)

    merged = merge_lora_dir(tmp_path / "ad", tmp_path / "merged")
    want = _merged_state(pm.merge_and_unload())
    assert _max_diff(load_file(merged / "model.safetensors"), want) < 1e-5


def _peft_adapter(family, d, out, **over):
    """An adapter made by peft on the transformers base: random A, B perturbed (peft starts B at 0)."""
    kw = dict(r=4, lora_alpha=8, target_modules=ALL[family], lora_dropout=0.0) | over
    pm = peft.get_peft_model(_hf_base(d), peft.LoraConfig(**kw))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            elif "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(out)
    return pm.eval()


VARIANTS = {  # what each family's peft adapter exercises
    "llama": dict(use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3}),
    "gpt2": dict(fan_in_fan_out=True),
    "mistral": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "gemma": dict(r=3, lora_alpha=5),
    "qwen2": dict(),
    "phi3": dict(target_modules=["qkv_proj", "down_proj"], lora_alpha=4),
}


def test_peft_adapter_loads_in_lmforge_and_merges_alike(base, tmp_path):
    family, d, ids = base
    pm = _peft_adapter(family, d, tmp_path / "ad", **VARIANTS[family])
    with torch.no_grad():
        theirs = pm(ids).logits
    model = load_lora_model(tmp_path / "ad")
    assert (model(ids) - theirs).abs().max().item() < 1e-4
    if family == "llama":  # separate q/k/v adapters stack: rank 4 + 2 + 4 on the fused projection
        assert model.blocks[0].attn.wqkv.rank == 10 and model.blocks[0].mlp.w_in.rank == 8
    if family == "mistral":  # only q and v: k's rows of the fused B are zero
        wqkv = model.blocks[0].attn.wqkv
        q, kv = model.config.q_dim, model.config.kv_dim
        assert not wqkv.lora_B[q : q + kv].any() and wqkv.lora_B[:q].any()

    merged = merge_lora_dir(tmp_path / "ad", tmp_path / "merged", base=d)
    want = _merged_state(pm.merge_and_unload())
    assert _max_diff(load_file(merged / "model.safetensors"), want) < 1e-5


def test_old_lmforge_format_still_loads(tmp_path):
    d = tmp_path / "base"
    hf_model("llama").save_pretrained(d)
    model = load_model(d)
    apply_lora(model, rank=4, alpha=16.0, targets=["wqkv", "w_out"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    old = tmp_path / "old"
    old.mkdir()
    save_file(
        {k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(old / "adapter_model.safetensors")
    )
    cfg = {"format": "lmforge-lora", "rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["wqkv", "w_out"]}
    (old / "adapter_config.json").write_text(json.dumps(cfg | {"base_model": str(d)}))
    ids = torch.randint(0, V, (1, 7))
    assert torch.equal(load_lora_model(old)(ids), model.eval()(ids))
    import lmforge

    lm = lmforge.load(old)  # an adapter directory loads merged, through the facade
    assert (lm(ids) - model(ids)).abs().max().item() < 1e-5
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules())


@pytest.mark.parametrize(
    "config,named",
    [
        ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}, "DoRA"),
        ({"peft_type": "IA3", "target_modules": ["k_proj"]}, "IA3"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}, "PROMPT_TUNING"),
    ],
)
def test_unsupported_peft_types_are_one_line_errors(tmp_path, config, named):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "x"}))
    with pytest.raises(UserError, match=named):
        load_lora_model(tmp_path)


def test_cli_merge_lora_of_dora_adapter_exits_2_with_one_line(tmp_path):
    d = tmp_path / "base"
    hf_model("llama").save_pretrained(d)
    pm = peft.get_peft_model(_hf_base(d), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "dora")
    p = subprocess.run(
        [sys.executable, "-m", "lmforge", "merge-lora", str(tmp_path / "dora"), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "DoRA" in lines[0], p.stderr
    assert not (tmp_path / "m").exists()


def test_server_serves_a_peft_adapter_next_to_its_base(serve_ckpt, tmp_path):  # noqa: F811
    import openai
    from serve_helpers import Server

    import lmforge
    from lmforge.lm import LM

    ckpt, _ = serve_ckpt
    pm = peft.get_peft_model(
        _hf_base(ckpt), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a visible change: the adapter's tokens differ from the base's
    pm.save_pretrained(tmp_path / "peft-ad")
    base = lmforge.load(ckpt, device="cpu")
    unmerged = LM(load_lora_model(tmp_path / "peft-ad", base=ckpt).eval(), base.tokenizer)
    prompt = "The quick brown fox"
    want = unmerged.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True)
    assert want != base.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True)
    with Server(ckpt, "--lora", f"pft={tmp_path / 'peft-ad'}", "--model-name", "base", log_dir=tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {"base", "pft"}
        r = client.completions.create(
            model="pft", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].text == want and r.model == "pft"


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens after ids, by full forward passes of lmforge's (unmerged) model."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids) :]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_gguf_runs_in_llama_cpp_like_lmforge(family, serve_ckpt, tmp_path):  # noqa: F811
    """llama: a peft-made adapter (separate q/k/v, rslora: scales folded); gpt2: an lmforge adapter on
    the fused c_attn. llama.cpp loads base GGUF + adapter GGUF through its C API."""
    from lmforge.export.gguf import export_gguf, read_gguf
    from lmforge.export.gguf_lora import attach_lora, export_lora_gguf, export_ollama_lora
    from lmforge.export.llama_cpp import LlamaCpp, LlamaCppUnavailable, _bindings
    from lmforge.tokenizer import Tokenizer

    try:
        _bindings()
    except LlamaCppUnavailable as e:
        pytest.skip(str(e))
    ckpt, _ = serve_ckpt
    tok = Tokenizer.load(ckpt)
    if family == "llama":
        base = ckpt
        kw = dict(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]
        )
        pm = peft.get_peft_model(_hf_base(base), peft.LoraConfig(**kw))
        torch.manual_seed(4)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        pm.save_pretrained(tmp_path / "ad")
    else:
        from lmforge.checkpoint import save_model
        from lmforge.config import preset
        from lmforge.model import build

        base = tmp_path / "gpt2"
        cfg = preset(
            "gpt2", "debug", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id
        )
        torch.manual_seed(0)
        save_model(build(cfg), base, tokenizer=tok)
        model = load_model(base)
        apply_lora(model, rank=4, alpha=8.0, targets=["all"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.5)
        save_adapter(tmp_path / "ad", lora_state_dict(model), model.lora_config, str(base), model.config)
    export_gguf(base, tmp_path / "base.gguf", dtype="f32")
    out = tmp_path / "ad.gguf"
    if family == "llama":  # through the CLI: an adapter directory selects the LoRA GGUF writer
        cmd = [
            sys.executable,
            "-m",
            "lmforge",
            "export",
            str(tmp_path / "ad"),
            "--format",
            "gguf",
            "--out",
            str(out),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    else:
        export_lora_gguf(tmp_path / "ad", out)
    meta = read_gguf(out)["metadata"]
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0

    ours = load_lora_model(tmp_path / "ad", base=base)
    ids = tok.encode("The quick brown fox", bos=True)
    want = _greedy(ours, ids, 12)
    plain = _greedy(load_model(base), ids, 12)
    assert want != plain  # the adapter changes the tokens
    with LlamaCpp(tmp_path / "base.gguf", n_ctx=64, n_threads=1) as llm:
        assert llm.greedy(ids, 12) == plain
        attach_lora(llm, out)
        assert llm.greedy(ids, 12) == want
        llm.reset()
        got = llm.eval(ids)
    with torch.no_grad():
        ref = ours(torch.tensor([ids]))[0].numpy()
    assert abs(got - ref).max() < 1e-3 * max(1.0, abs(ref).max())

    if family == "llama":  # Ollama: base GGUF + adapter GGUF + a Modelfile with an ADAPTER line
        d = export_ollama_lora(tmp_path / "ad", tmp_path / "ollama")
        text = (d / "Modelfile").read_text()
        assert text.startswith("FROM ./model.gguf\nADAPTER ./adapter.gguf\n")
        assert (d / "adapter.gguf").read_bytes() == out.read_bytes()
