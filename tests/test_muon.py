"""--train.optimizer muon: torch.optim.Muon on the blocks' hidden matrices, AdamW on the rest.

What the update is (the orthogonalised gradient, against an SVD in float64, and match_rms_adamw's
learning-rate scale by hand), which parameters go where, exact resume of Muon's momentum, and fine-tuning
with it (full and LoRA). DDP against one process: tests/test_train_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from train_data import base_model, losses, make_config

from lmforge.config import preset
from lmforge.model import build
from lmforge.train import lora as L
from lmforge.train import train
from lmforge.train.config import TrainSection, load_config
from lmforge.train.optim import Optimizers, build_optimizer, set_lr
from lmforge.train.state import list_checkpoints, read_checkpoint
from lmforge.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
BLOCK_MATRICES = ("attn.wqkv.weight", "attn.wo.weight", "mlp.w_in.weight", "mlp.w_out.weight")


def _split(model, optimizer) -> tuple[set[str], set[str]]:
    """(names Muon updates, names AdamW updates)."""
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adamw = set(), set()
    for o in optimizer.optimizers:
        dest = muon if isinstance(o, torch.optim.Muon) else adamw
        dest.update(names[id(p)] for g in o.param_groups for p in g["params"])
    return muon, adamw


# ---------------------------------------------------------------------------------------------- update
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize(
    "name, device",
    [
        ("blocks.0.mlp.w_in.weight", "cpu"),
        ("blocks.1.mlp.w_out.weight", "cpu"),
        ("blocks.0.attn.wo.weight", "cpu"),
        pytest.param("blocks.0.mlp.w_in.weight", "cuda", marks=GPU),
    ],
)
def test_update_is_the_orthogonalised_gradient(name, device):
    """One step on a random gradient (first step: the Nesterov momentum is a multiple of the gradient,
    weight decay 0) moves the matrix by lr * 0.2 * sqrt(max(A, B)) * Q, where Q has the gradient's
    singular vectors (U^T Q V diagonal) and, for each singular value s_i of the gradient, s'_i in
    [0.6, 1.25] instead of exactly 1: torch's 5 Newton-Schulz steps with Keller Jordan's coefficients
    (in bf16) take every s_i >= 0.0015 * |G|_F into ~[0.68, 1.20] (the scalar polynomial's range). A
    smaller one (a random square matrix has some near zero) is raised less, never above the band.
    Shapes: tall (384, 64), wide (64, 192), square (64, 64)."""
    dev = torch.device(device)
    model = build(preset("llama", "debug", vocab_size=512), device=dev)
    model.init_weights(0)
    opt = build_optimizer(model, TrainSection(optimizer="muon", weight_decay=0.0), dev)
    lr = 0.01
    set_lr(opt, lr)
    p = dict(model.named_parameters())[name]
    G = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    p.grad = G.clone()  # the only gradient: the other parameters do not move
    w0 = p.detach().clone()
    opt.step()
    A, B = p.shape
    Q = (w0 - p.detach()).double().cpu() / (lr * 0.2 * math.sqrt(max(A, B)))  # match_rms_adamw, by hand
    G, w0, w1 = G.cpu(), w0.cpu(), p.detach().cpu()

    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)  # the exact answer: U V^T
    inner = U.T @ Q @ Vh.T  # Q in the gradient's singular bases: diagonal if the vectors match
    s_new = torch.diagonal(inner)
    assert torch.diag(s_new).norm() / inner.norm() > 0.999  # off-diagonal part: bf16 rounding only
    reached = S >= 0.002 * S.norm()  # |G|_F = the norm of the singular values
    assert reached.float().mean() > 0.9
    assert s_new[reached].min() > 0.6 and s_new.max() < 1.25 and s_new.min() > 0
    assert torch.linalg.svdvals(Q).max() < 1.25
    ref = U @ Vh
    # cosine with U V^T itself: < 1 only by the spread of the singular values (0.7..1.2 gives ~0.985)
    assert (Q * ref).sum() / (Q.norm() * ref.norm()) > 0.98
    # the update's RMS is AdamW-like: 0.2 lr times the RMS of Q's singular values (~0.85)
    rms = ((w0 - w1).pow(2).mean().sqrt() / lr).item()
    assert 0.12 < rms < 0.22

    # the scale exactly: torch's own Muon with Keller Jordan's rule (sqrt(max(1, A/B))) on the same
    # gradient gives the same Q, so the two updates differ by the ratio of the two rules
    q = torch.nn.Parameter(w0.to(dev, copy=True))
    q.grad = G.to(dev)
    torch.optim.Muon([q], lr=lr, weight_decay=0.0, nesterov=True, adjust_lr_fn="original").step()
    ratio = 0.2 * math.sqrt(max(A, B)) / math.sqrt(max(1, A / B))
    torch.testing.assert_close(w0 - w1, (w0 - q.detach().cpu()) * ratio, rtol=1e-5, atol=1e-7)


def test_optimizer_settings_come_from_train_section():
    model = build(preset("llama", "debug", vocab_size=512))
    t = TrainSection(optimizer="muon", lr=3e-3, weight_decay=0.05, muon_momentum=0.9, beta2=0.99)
    opt = build_optimizer(model, t, CPU)
    muon, adamw = opt.optimizers
    (g,) = muon.param_groups
    assert (g["adjust_lr_fn"], g["nesterov"], g["momentum"], g["weight_decay"], g["lr"]) == (
        "match_rms_adamw",
        True,
        0.9,
        0.05,
        3e-3,
    )
    assert [(g["weight_decay"], g["betas"], g["fused"]) for g in adamw.param_groups] == [
        (0.05, (0.9, 0.99), True),  # the output head
        (0.0, (0.9, 0.99), True),  # norms
        (0.0, (0.9, 0.99), True),  # the embedding
    ]
    set_lr(opt, 1e-4)  # the schedule reaches every group of both
    assert {g["lr"] for g in opt.param_groups} == {1e-4} and len(opt.param_groups) == 4
    # adamw (the default) is the plain torch AdamW it always was
    assert type(build_optimizer(model, TrainSection(), CPU)) is torch.optim.AdamW


# ---------------------------------------------------------------------------------------------- split
def test_hidden_matrices_go_to_muon_the_rest_to_adamw():
    model = build(preset("llama", "debug", vocab_size=512))  # untied lm_head
    opt = build_optimizer(model, TrainSection(optimizer="muon"), CPU)
    assert isinstance(opt, Optimizers)
    muon, adamw = _split(model, opt)
    assert muon == {f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES}
    assert adamw == {"tok_emb.weight", "lm_head.weight", "norm.weight"} | {
        f"blocks.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "mlp")
    }
    # AdamW keeps its groups: the output head decays, norms and the embedding (its own group) do not
    decay, no_decay, embedding = opt.optimizers[1].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"lm_head.weight"}
    assert {names[id(p)] for p in embedding["params"]} == {"tok_emb.weight"}
    assert no_decay["weight_decay"] == embedding["weight_decay"] == 0.0


@pytest.mark.parametrize("family", ["gpt2", "gemma", "mixtral"])
def test_split_tied_embeddings_biases_and_experts(family):
    """gpt2: biases, learned positions, tied head; gemma: tied head; mixtral: stacked 3-D experts
    (AdamW: torch's Muon takes 2-D matrices only) and the router, a 2-D linear layer (Muon)."""
    model = build(preset(family, "debug", vocab_size=512))
    muon, adamw = _split(model, build_optimizer(model, TrainSection(optimizer="muon"), CPU))
    every = {n for n, _ in model.named_parameters()}  # a tied lm_head is tok_emb, listed once
    assert muon | adamw == every and not muon & adamw
    assert "tok_emb.weight" in adamw
    if model.config.tie_embeddings:  # the tied head is the embedding: AdamW
        assert "lm_head.weight" not in every
    else:
        assert "lm_head.weight" in adamw
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in muon)
    attn = {f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES[:2]}
    assert attn <= muon
    if family == "mixtral":
        assert {"blocks.0.mlp.w_in", "blocks.0.mlp.w_out"} <= adamw and "blocks.0.mlp.router.weight" in muon
    else:
        assert {f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES} == muon
    if family == "gpt2":
        assert {"pos_emb.weight", "blocks.0.attn.wqkv.bias", "blocks.0.mlp.w_in.bias"} <= adamw
    # --train.compile names the parameters "_orig_mod.<name>" (DDP: "module.<name>"): the same split
    compiled = torch.nn.Module()  # what torch.compile's wrapper names (without importing dynamo)
    compiled._orig_mod = model
    assert _split(compiled, build_optimizer(compiled, TrainSection(optimizer="muon"), CPU))[0] == {
        f"_orig_mod.{n}" for n in muon
    }


def test_lora_adapters_stay_on_adamw():
    """LoRA's A and B are factors of the update, not hidden matrices: with only them trainable, muon
    is the plain AdamW (and the trainer says so)."""
    model = build(preset("llama", "debug", vocab_size=512))
    L.apply_lora(model, 4, 8.0, 0.0, ["all"])
    opt = build_optimizer(model, TrainSection(optimizer="muon"), CPU)
    assert type(opt) is torch.optim.AdamW
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_muon_with_fsdp_and_unknown_optimizer_are_one_line_errors():
    model = build(preset("llama", "debug", vocab_size=512))
    with pytest.raises(UserError, match=r"muon does not run on FSDP2.*--parallel ddp.*adamw"):
        build_optimizer(model, TrainSection(optimizer="muon"), CPU, sharded=True)
    build_optimizer(model, TrainSection(optimizer="adamw"), CPU, sharded=True)  # adamw shards as before
    with pytest.raises(UserError, match="--train.optimizer 'sgd': choose one of auto, adamw, muon"):
        load_config(overrides={"train.optimizer": "sgd"})
    with pytest.raises(UserError, match="--train.muon_momentum 1.5: out of range"):
        load_config(overrides={"train.muon_momentum": "1.5"})


# ---------------------------------------------------------------------------------------------- runs
def test_muon_resume_is_exact(corpus, tmp_path):  # noqa: F811
    # bf16 autocast and dropout, as test_train_resume's AdamW case; stopped and resumed at step 4
    over = {
        "train.optimizer": "muon",
        "dtype": "bf16",
        "model.dropout": 0.1,
        "train.max_steps": 8,
        "ckpt.every": 4,
    }
    a = train(make_config(corpus, tmp_path, "a", **over))
    b = train(make_config(corpus, tmp_path, "b", resume=str(tmp_path / "a/checkpoints/step_000004"), **over))
    assert a["step"] == b["step"] == 8
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in lb] == [5, 6, 7, 8]
    assert lb == la[4:]  # exact equality, not approximate
    _, optim, _ = read_checkpoint(list_checkpoints(tmp_path / "a")[0])
    st = optim["state"]
    assert set(st["blocks.0.attn.wqkv.weight"]) == {"momentum_buffer"}
    assert set(st["lm_head.weight"]) == set(st["norm.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert st["blocks.0.attn.wqkv.weight"]["momentum_buffer"].abs().sum() > 0
    # the other optimizer does not take this checkpoint: one line, not torch's KeyError
    adamw = make_config(corpus, tmp_path, "c", resume=str(tmp_path / "a/checkpoints/step_000004"), **over)
    adamw.train.optimizer = "adamw"
    with pytest.raises(UserError, match="trained with --train.optimizer muon, this run uses adamw"):
        train(adamw)
    # nor a run whose parameter groups differ (the embedding frozen: its group is gone), whose
    # settings would be matched to the wrong groups by position
    frozen = make_config(corpus, tmp_path, "d", resume=str(tmp_path / "a/checkpoints/step_000004"), **over)
    frozen.train.freeze_embeddings = True
    with pytest.raises(UserError, match="optimizer has 4 parameter groups and this run's 3"):
        train(frozen)


def test_muon_learns_and_differs_from_adamw(corpus, tmp_path):  # noqa: F811
    over = {"train.max_steps": 12, "ckpt.every": 0}
    adamw = train(make_config(corpus, tmp_path, "adamw", **over))
    muon = train(make_config(corpus, tmp_path, "muon", **over, **{"train.optimizer": "muon"}))
    lm = [v for _, v in losses(tmp_path / "muon")]
    assert lm[-1] < lm[0] - 0.3  # it trains
    assert lm != [v for _, v in losses(tmp_path / "adamw")]  # and it is another optimizer
    assert math.isfinite(muon["loss"]) and math.isfinite(adamw["loss"])


def _sft_args(corpus, base, out, name, *extra) -> list[str]:
    """`lmforge finetune` on the chat data for 10 steps of 8 x 64 tokens (fp32, no evaluation)."""
    return [
        "finetune", "--model.init_from", str(base), "--data.path", str(corpus["chat"]),
        "--out_dir", str(out), "--name", name, "--device", "cpu", "--dtype", "fp32", "--seed", "0",
        "--train.max_steps", "10", "--train.batch_size", "8", "--data.seq_len", "64",
        "--train.lr", "3e-3", "--train.warmup_steps", "2", "--eval.every", "0", "--eval.batches", "2",
        "--eval.samples", "0", "--ckpt.every", "0", "--log.every", "1", "--log.progress", "false",
        "--log.tensorboard", "false", "--log.peak_flops", "1e11", *extra,
    ]  # fmt: skip


def test_cli_finetune_with_muon_full_and_lora(corpus, tmp_path, capsys):  # noqa: F811
    """`lmforge finetune --train.optimizer muon`: a full fine-tune trains the matrices with Muon (and its
    config.yaml says so); with LoRA only the adapters train, on AdamW, so the run is the AdamW run."""
    from lmforge.cli import main

    base = base_model(corpus, tmp_path / "base")
    assert main(_sft_args(corpus, base, tmp_path, "full", "--train.optimizer", "muon")) == 0
    ls = [v for _, v in losses(tmp_path / "full")]
    assert len(ls) == 10 and ls[-1] < ls[0]
    assert "optimizer: muon" in (tmp_path / "full/config.yaml").read_text()
    _, optim, _ = read_checkpoint(list_checkpoints(tmp_path / "full")[-1])
    assert set(optim["state"]["blocks.0.mlp.w_in.weight"]) == {"momentum_buffer"}

    lora = ("--lora.rank", "4", "--lora.targets", "all")
    capsys.readouterr()
    assert main(_sft_args(corpus, base, tmp_path, "lora-muon", *lora, "--train.optimizer", "muon")) == 0
    assert "note: --train.optimizer muon: no hidden matrix trains here" in capsys.readouterr().out
    assert main(_sft_args(corpus, base, tmp_path, "lora-adamw", *lora)) == 0
    assert losses(tmp_path / "lora-muon") == losses(tmp_path / "lora-adamw")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_muon_training_and_resume(corpus, tmp_path):  # noqa: F811
    over = {
        "device": "cuda",
        "dtype": "bf16",
        "train.optimizer": "muon",
        "train.max_steps": 6,
        "ckpt.every": 3,
    }
    s = train(make_config(corpus, tmp_path, "gpu", **over))
    assert s["step"] == 6 and math.isfinite(s["loss"])
    resume = str(tmp_path / "gpu/checkpoints/step_000003")
    r = train(make_config(corpus, tmp_path, "gpu2", resume=resume, **over))
    assert r["step"] == 6
    la, lb = losses(tmp_path / "gpu"), losses(tmp_path / "gpu2")
    assert [st for st, _ in lb] == [4, 5, 6]
    # CUDA kernels need not be bit-exact (on an H200 with torch 2.11 they were: differences 0.0)
    assert all(abs(a - b) < 1e-2 for (_, a), (_, b) in zip(la[3:], lb))
