"""Checkpoint directories: round trips, HF layouts, and clear errors for broken files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import lmforge
from lmforge.checkpoint import load_model, save_model, to_hf_state_dict
from lmforge.config import preset
from lmforge.model import build
from lmforge.utils import UserError


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build(preset("llama", "debug", bos_token_id=1, eos_token_id=2)).eval()
    save_model(model, tmp_path / "m")
    return model, tmp_path / "m"


def test_round_trip_is_exact(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    back = load_model(path)
    assert back.config == model.config
    for (n1, a), (n2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    assert json.loads((path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_bf16_round_trip_keeps_dtype(tmp_path):
    model = build(preset("gemma", "debug"), dtype=torch.bfloat16)
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "m").tok_emb.weight.dtype == torch.bfloat16
    assert lmforge.load(tmp_path / "m", device="cpu").dtype == torch.float32  # CPU default: fp32 compute


def test_truncated_safetensors_names_the_file(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_model(path)


def test_garbage_header_names_the_file(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match=r"model\.safetensors"):
        load_model(path)


def test_missing_files(tmp_path, saved):
    _, path = saved
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    (path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model weights"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(UserError, match="config.json"):
        load_model(path)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] += 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"gate_proj.weight has shape \(192, 64\).*\(256, 64\)"):
        load_model(path)


def test_missing_and_unexpected_tensors_are_errors(saved):
    model, path = saved
    state = to_hf_state_dict(model)
    extra = dict(state, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    save_file(extra, str(path / "model.safetensors"))
    with pytest.raises(UserError, match="not used"):
        load_model(path)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(UserError, match="missing tensor.*k_proj"):
        load_model(path)


def test_failed_save_leaves_previous_checkpoint_whole(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    import lmforge.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_model(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["m"]  # no temporary left behind


def test_sharded_and_bin_hf_checkpoints_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import hf_model

    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(
            lmforge.load(tmp_path / "sharded", device="cpu")(ids), ref, atol=1e-5, rtol=0
        )
    # an old-style pytorch_model.bin is read with weights_only=True (no arbitrary unpickling)
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    torch.testing.assert_close(lmforge.load(tmp_path / "bin", device="cpu")(ids), ref, atol=1e-5, rtol=0)
    del transformers


def test_lm_api(saved):
    model, path = saved
    lm = lmforge.load(path, device="cpu")
    ids = [[5, 6, 7, 8]]
    torch.testing.assert_close(lm(ids), model(torch.tensor(ids)))
    lm.save(path.parent / "copy")
    torch.testing.assert_close(lmforge.load(path.parent / "copy", device="cpu")(ids), lm(ids))
    assert "llama" in repr(lm)


def test_device_and_dtype_errors():
    from lmforge.utils import resolve_device, resolve_dtype

    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="fp16"):
        resolve_dtype("fp16", torch.device("cpu"))
    with pytest.raises(UserError, match="fp64"):
        resolve_dtype("fp64", torch.device("cpu"))
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_cli_help_and_info(saved):
    _, path = saved
    r = _cli("--help")
    assert r.returncode == 0 and "info" in r.stdout and "quickstart" in r.stdout
    r = _cli("info", str(path))
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "622,912" in r.stdout and "context_length: 256" in r.stdout
    r = _cli("info", str(path), "--json")
    assert json.loads(r.stdout)["config"]["n_layers"] == 2


def test_cli_user_errors_have_no_traceback(tmp_path):
    r = _cli("info", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_every_command_has_help_with_examples():
    """Every command (and sub-command, e.g. `tokenizer train`) shows examples and documents every option."""
    import argparse

    from lmforge.cli import build_parser

    def leaves(parser, name=""):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield name, parser
        for sub in subs:
            for child, p in sub.choices.items():
                yield from leaves(p, f"{name} {child}".strip())

    commands = list(leaves(build_parser()))
    assert len(commands) >= 2
    for name, p in commands:
        assert "examples:" in (p.epilog or ""), name
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest} has no help text"
