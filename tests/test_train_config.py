"""Training configuration, schedules, parameter groups, checkpoint packing and the budget planner
(the parts that need no training run)."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import preset
from lmforge.model import build
from lmforge.train.config import (
    RunConfig,
    TrainSection,
    add_config_arguments,
    config_for_run,
    field_docs,
    load_config,
    overrides_from_args,
)
from lmforge.train.optim import build_optimizer, lr_at, param_groups, set_lr
from lmforge.utils import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    a = p.parse_args(argv)
    return a, overrides_from_args(a)


def test_yaml_and_command_line_read_the_same(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {size: small, d_model: 96, dropout: 0.1}\ntrain: {lr: 0.001, tokens: 2M}\n"
        "lora: {targets: [wqkv, w_out]}\nname: a\n"
    )
    a, over = _parse(
        [
            "--config",
            str(f),
            "--train.lr",
            "3e-4",
            "--model.n_layers",
            "3",
            "--train.compile",
            "--lora.targets",
            "wo,w_in",
            "--time-budget",
            "10m",
            "--eval.prompts",
            "def ,class ",
        ]
    )
    cfg = load_config(a.config, over)
    assert cfg.train.lr == 3e-4 and cfg.train.tokens == 2_000_000 and cfg.train.compile is True
    assert cfg.model.size == "small" and cfg.model.overrides == {"d_model": 96, "dropout": 0.1, "n_layers": 3}
    assert cfg.lora.targets == ["wo", "w_in"] and cfg.time_budget == "10m" and cfg.name == "a"
    assert cfg.eval.prompts == ["def", "class"]
    # the resolved config round-trips through YAML, flat model fields included
    import yaml

    d = yaml.safe_load(cfg.to_yaml())
    assert d["model"]["d_model"] == 96 and "overrides" not in d["model"]
    assert RunConfig.from_dict(d) == cfg


def test_bad_options_name_the_option():
    with pytest.raises(UserError, match=r"unknown option\(s\) train.learning_rate.*known: .*lr"):
        load_config(overrides={"train.learning_rate": 1})
    with pytest.raises(UserError, match=r"train.max_steps='ten'"):
        load_config(overrides={"train.max_steps": "ten"})
    with pytest.raises(UserError, match=r"model.n_layers=2.5: expected a whole number"):
        load_config(overrides={"model.n_layers": 2.5})
    with pytest.raises(UserError, match="log.progress"):
        load_config(overrides={"log.progress": "maybe"})


def test_every_option_has_help_from_its_docstring():
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "pretrain", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    for cls in (TrainSection, RunConfig):
        for name, doc in field_docs(cls).items():
            assert doc, name
    out = " ".join(r.stdout.split())
    assert "--train.lr X peak learning rate (default: 0.001)" in out
    assert "--model.d_model N width of the residual stream (overrides the preset)" in out
    assert "--time-budget" in out and "examples:" in out
    for cmd in ("finetune", "merge-lora"):
        r = subprocess.run([sys.executable, "-m", "lmforge", cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "examples:" in r.stdout


def test_shipped_recipes_load():
    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert len(recipes) >= 4
    for f in recipes:
        cfg = load_config(f)
        if not cfg.model.init_from:
            preset(cfg.model.family, cfg.model.size, **cfg.model.overrides)  # a valid model


def test_resume_reads_the_saved_run_config(tmp_path):
    run = tmp_path / "runs/x"
    run.mkdir(parents=True)
    saved = load_config(overrides={"train.lr": 0.005, "model.size": "debug", "name": "x"})
    (run / "config.yaml").write_text(saved.to_yaml())
    cfg = config_for_run(
        None,
        {"name": "x", "out_dir": str(tmp_path / "runs"), "resume": "auto", "train.max_steps": 50},
        "pretrain",
    )
    assert cfg.train.lr == 0.005 and cfg.model.size == "debug" and cfg.train.max_steps == 50
    assert cfg.resume == "auto"
    fresh = config_for_run(None, {"name": "x", "out_dir": str(tmp_path / "runs")}, "pretrain")
    assert fresh.train.lr == 1e-3  # without --resume the saved config is not read


@pytest.mark.parametrize("value", ["none", "no", "false", "False", ""])
def test_resume_no_is_a_fresh_run_everywhere(tmp_path, value):
    # the saved config is not the base, and the checkpointer starts fresh (refusing to overwrite)
    from lmforge.train.config import Resume
    from lmforge.train.distributed import Dist
    from lmforge.train.state import Checkpointer

    assert Resume.parse(value) == Resume("fresh") and Resume.parse(False) == Resume("fresh")
    assert Resume.parse("auto") == Resume("auto")
    assert Resume.parse("runs/x/checkpoints/step_000004") == Resume(
        "path", Path("runs/x/checkpoints/step_000004")
    )
    run = tmp_path / "runs/x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(load_config(overrides={"train.lr": 0.005, "name": "x"}).to_yaml())
    cfg = config_for_run(None, {"name": "x", "out_dir": str(tmp_path / "runs"), "resume": value}, "pretrain")
    assert cfg.train.lr == 1e-3
    assert Checkpointer(run, Resume.parse(cfg.resume), Dist()).resume_from is None
    (run / "checkpoints/step_000004").mkdir(parents=True)
    (run / "checkpoints/step_000004/trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="already has checkpoints"):
        Checkpointer(run, Resume.parse(value), Dist())
    ck = Checkpointer(run, Resume.parse("auto"), Dist())
    assert ck.resume_from == ck.last == run / "checkpoints/step_000004"


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    t = TrainSection(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(s, 100, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))
    if schedule == "cosine":
        assert lrs[-1] == pytest.approx(0.1)
        mid = 10 + (99 - 10) // 2
        assert lrs[mid] == pytest.approx(0.55, abs=0.02)
    elif schedule == "wsd":
        assert lrs[10:80] == [1.0] * 70 and lrs[-1] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    else:
        assert lrs[10:] == [1.0] * 90
    # warmup never eats more than a tenth of a short run
    assert lr_at(0, 20, TrainSection(lr=1.0, warmup_steps=100)) == pytest.approx(0.5)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = build(preset("gpt2", "debug"))  # biases, LayerNorms, tied and learned-position embeddings
    t = TrainSection(weight_decay=0.1, embedding_lr_scale=8.0)
    decay, no_decay, emb = param_groups(model, t)
    names = {id(p): n for n, p in model.named_parameters()}
    dn, nn_, en = ({names[id(p)] for p in g["params"]} for g in (decay, no_decay, emb))
    assert (decay["weight_decay"], no_decay["weight_decay"], emb["weight_decay"]) == (0.1, 0.0, 0.0)
    assert all(n.endswith("weight") and ("attn." in n or "mlp." in n) for n in dn)
    assert {"blocks.0.attn_norm.weight", "blocks.0.attn.wqkv.bias"} <= nn_
    assert en == {"tok_emb.weight", "pos_emb.weight"} and emb["lr_scale"] == 8.0
    assert len(dn) + len(nn_) + len(en) == len(names)  # every trainable tensor once (tied lm_head is tok_emb)
    # set_lr applies each group's scale to the schedule's rate, Muon's included
    model = build(preset("llama", "debug", tie_embeddings=False))
    t = TrainSection(optimizer="muon", embedding_lr_scale=4.0, muon_lr_scale=2.0)
    opt = build_optimizer(model, t, torch.device("cpu"))
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["tok_emb.weight"])] == pytest.approx(4e-3)
    assert lr_of[id(named["blocks.0.attn.wo.weight"])] == pytest.approx(2e-3)  # Muon
    assert lr_of[id(named["lm_head.weight"])] == lr_of[id(named["norm.weight"])] == pytest.approx(1e-3)


def test_checkpoint_state_packs_without_pickle():
    from lmforge.train.state import pack, unpack

    state = {
        "a": 1,
        "t": torch.arange(3.0),
        "arr": np.arange(4, dtype=np.uint32),
        "tup": (1, "x"),
        "nested": {"l": [torch.ones(2), 2.5, None]},
        7: "int key",
    }
    tensors: dict = {}
    js = pack(state, tensors)
    import json

    back = unpack(json.loads(json.dumps(js)), tensors)
    assert back["a"] == 1 and torch.equal(back["t"], state["t"]) and back["tup"] == (1, "x")
    assert back["arr"].dtype == np.uint32 and (back["arr"] == state["arr"]).all()
    assert torch.equal(back["nested"]["l"][0], torch.ones(2)) and back[7] == "int key"
    with pytest.raises(TypeError, match="cannot store object"):
        pack({"bad": object()}, {})


def test_parse_duration():
    from lmforge.train.budget import parse_duration

    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    assert parse_duration("2h") == 7200 and parse_duration("45s") == 45
    with pytest.raises(UserError, match="like 90s, 10m"):
        parse_duration("ten minutes")


def test_budget_plan_is_compute_optimal_on_a_simulated_machine():
    """On a machine that sustains 5 TFLOP/s, a 1-hour budget buys the largest depth that still gets
    20 tokens per parameter, and the next depth would not."""
    import time

    from lmforge.train.budget import DEPTHS, TOKENS_PER_PARAM, matmul_params, plan, shape
    from lmforge.train.data import Data
    from lmforge.train.distributed import Dist

    T, flops = 512, 5e12

    def fake_measure(mc, batch_size, seq_len, device, dtype, **kw):
        return flops / mc.flops_per_token(seq_len)

    cfg = load_config(
        overrides={"time_budget": "1h", "data.seq_len": T, "train.batch_size": 8, "model.family": "llama"}
    )
    data = Data(
        train=iter(()), vocab_size=8192, n_train_tokens=10**10
    )  # data to spare: the compute rule alone
    out, lines = plan(cfg, data, Dist(), torch.bfloat16, time.time(), measure_fn=fake_measure)
    mc = preset("llama", "tiny", **out.model.overrides)
    depth = mc.n_layers
    n = matmul_params(mc)
    assert out.train.tokens >= TOKENS_PER_PARAM * n * 0.95
    bigger = preset("llama", "tiny", **shape("llama", DEPTHS[DEPTHS.index(depth) + 1], 8192, T))
    tokens_bigger = flops * 3600 * 0.9 / bigger.flops_per_token(T)
    assert tokens_bigger < TOKENS_PER_PARAM * matmul_params(bigger)
    assert (
        out.train.global_batch_tokens % (8 * T) == 0
        and out.train.tokens // out.train.global_batch_tokens >= 300
    )
    assert out.time_budget is None and out.train.max_time == 3600
    assert math.isclose(out.train.lr, float(f"{min(3e-3, 6e-4 * 768 / mc.d_model):.2g}"))
    assert any("chosen: llama depth" in x for x in lines)
    # the budget's recipe: a tied head with a faster embedding, unless the user asked for an untied one
    from lmforge.train.budget import EMBEDDING_LR_SCALE, MIN_LR_RATIO, MUON_LR_SCALE

    assert mc.tie_embeddings and out.train.embedding_lr_scale == EMBEDDING_LR_SCALE > 1
    assert out.train.muon_lr_scale == MUON_LR_SCALE > 1
    assert any(", tied embeddings, warmup-stable-decay" in x for x in lines)
    assert out.train.min_lr_ratio == MIN_LR_RATIO and out.train.schedule == "wsd"
    # an hour's budget compiles where a compiler is found; a user's choice stands either way
    from lmforge.train.budget import can_compile

    assert cfg.train.compile is None and out.train.compile is can_compile(torch.device("cpu"))
    cfg.model.overrides["tie_embeddings"] = False
    cfg.train.compile = False
    untied, lines = plan(cfg, data, Dist(), torch.bfloat16, time.time(), measure_fn=fake_measure)
    assert untied.model.overrides["tie_embeddings"] is False and untied.train.compile is False
    assert any("untied embeddings" in x for x in lines)


def test_budget_plan_grows_the_model_instead_of_repeating_data():
    """A CPU-sized budget (100 GFLOP/s, 5 minutes): with data to spare the compute rule's depth stays; on
    a corpus it would see over MAX_EPOCHS times the model grows, by the measured pace, to the first depth
    within MAX_EPOCHS; on a corpus too small for even that (more parameters than MAX_PARAMS_PER_TOKEN
    per unique token) it keeps the compute rule's depth."""
    import time

    from lmforge.train.budget import (
        CPU_COMPILE_SPEEDUP,
        CPU_MICRO_TOKENS,
        DEPTHS,
        MAX_EPOCHS,
        MAX_PARAMS_PER_TOKEN,
        can_compile,
        matmul_params,
        plan,
        shape,
    )
    from lmforge.train.data import Data
    from lmforge.train.distributed import Dist

    T, flops, seen = 256, 1e11, []

    def fake_measure(mc, batch_size, seq_len, device, dtype, **kw):
        seen.append(kw["optimizer"])
        return flops / mc.flops_per_token(seq_len)

    def plan_for(unique):
        cfg = load_config(
            overrides={
                "time_budget": "5m",
                "data.seq_len": T,
                "train.batch_size": 8,
            }
        )
        data = Data(train=iter(()), vocab_size=4096, n_train_tokens=unique)
        out, lines = plan(cfg, data, Dist(), torch.bfloat16, time.time(), measure_fn=fake_measure)
        mc = preset("llama", "tiny", **out.model.overrides)
        # on a CPU a step of up to CPU_MICRO_TOKENS is one micro-batch; larger ones accumulate batch 8
        gbt = out.train.global_batch_tokens
        assert out.train.batch_size * T == (gbt if gbt <= CPU_MICRO_TOKENS else 8 * T)
        return mc, out.train.tokens, lines

    base, tokens, _ = plan_for(10**9)
    # the default optimizer, auto, is muon for a budget's model, and the planner times that optimizer
    assert base.n_layers == DEPTHS[0] and set(seen) == {"muon"}
    unique = tokens // 6  # six epochs for the compute rule's depth
    mc, tokens, lines = plan_for(unique)
    # the epochs are counted at the eager pace measured; a 5-minute plan compiles where it can and
    # plans its tokens at the compiled pace (CPU_COMPILE_SPEEDUP)
    speed = CPU_COMPILE_SPEEDUP if can_compile(torch.device("cpu")) else 1.0
    assert mc.n_layers > base.n_layers and tokens <= MAX_EPOCHS * unique * speed * 1.01
    smaller = preset("llama", "tiny", **shape("llama", DEPTHS[DEPTHS.index(mc.n_layers) - 1], 4096, T))
    assert flops * 285 / smaller.flops_per_token(T) > MAX_EPOCHS * unique  # the depth below still repeats
    assert any("the model grows instead" in x for x in lines)
    tiny = int(matmul_params(mc) / MAX_PARAMS_PER_TOKEN) - 1000  # the grown model is over the cap
    assert plan_for(tiny)[0].n_layers < mc.n_layers


@pytest.mark.parametrize("seconds_per_step, planned", [(0.5, 50), (1.0, 300)])
def test_pace_moves_the_end_of_a_wsd_run_to_the_deadline(monkeypatch, seconds_per_step, planned):
    """A plan made for the wrong speed (too slow, too fast) still ends at the deadline, and the learning
    rate never jumps: the end moves only while it is at its peak, then the decay runs whole."""
    from types import SimpleNamespace

    from lmforge.train import budget
    from lmforge.train.optim import decay_start

    clock = [1000.0]
    monkeypatch.setattr(budget, "time", SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))
    t = TrainSection(lr=1e-3, schedule="wsd", warmup_steps=2, decay_fraction=0.2)
    pace = budget.Pace(max_time=100.0, t_start=clock[0])
    cost = {"eval": 1.0, "save": 0.5}
    total, step, lrs = planned, 0, []
    while step < total:
        lrs.append(lr_at(step, total, t))
        clock[0] += seconds_per_step
        step += 1
        if step % 20 == 0:  # an evaluation every 20 steps, left out of the pace
            clock[0] += cost["eval"]
            pace.exclude(cost["eval"])
        if not pace.frozen:
            total = pace.update(step, total, t, 20, cost)
            pace.frozen = decay_start(total, t) <= step + 1
    end = clock[0] - 1000.0 + cost["eval"] + 2 * cost["save"]  # the final evaluation and saves
    assert 100 - 4 * seconds_per_step <= end <= 100, end
    assert lrs[2 : decay_start(total, t)] == [1e-3] * (decay_start(total, t) - 2)  # flat until the decay
    assert all(a >= b for a, b in zip(lrs[decay_start(total, t) :], lrs[decay_start(total, t) + 1 :]))


def test_threads_keep_the_faster_count(monkeypatch):
    """Trials of the other thread count switch when it is clearly faster, and back off when not."""
    from lmforge.train.budget import Threads

    counts = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: counts.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: counts[-1] if counts else 2)
    th = Threads(2, period=5, trial=2)
    speed = {2: 1.0, 1: 0.4}  # the cores are busy: one thread is faster
    for step in range(40):
        th.before_step(step)
        th.after_step(step + 1, speed[torch.get_num_threads()])
    assert th.current == 1 and counts[-1] == 1
    speed = {2: 0.3, 1: 0.4}  # the other job ended: two threads win again at the next trial
    for step in range(40, 120):
        th.before_step(step)
        th.after_step(step + 1, speed[torch.get_num_threads()])
    assert th.current == 2 and th.period > 5  # trials of one thread lost since, so they came rarer


def test_threads_of_a_compiled_model_are_tried_only_after_a_slowdown(monkeypatch):
    """A compiled model recompiles for a new thread count: no trials while the steps keep their pace;
    once they run 1.5x slower than the best (another job took the cores), the trials come back."""
    from lmforge.train.budget import Threads

    counts = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: counts.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: counts[-1] if counts else 2)
    th = Threads(2, period=5, trial=2, on_slowdown=True)
    speed = {2: 0.3, 1: 0.5}
    for step in range(100):
        th.before_step(step)
        th.after_step(step + 1, speed[torch.get_num_threads()])
    assert counts == []  # never switched, not even for a trial
    speed = {2: 1.0, 1: 0.5}  # busy cores
    for step in range(100, 130):
        th.before_step(step)
        th.after_step(step + 1, speed[torch.get_num_threads()])
    assert th.current == 1 and counts[-1] == 1


def test_budget_plan_measures_larger_models_where_they_run_faster():
    """On a GPU a tiny probe leaves the device mostly idle; the planner measures its choice and the
    depths above it, so it ends where a machine with that model's full speed would (the test above)."""
    import time

    from lmforge.train.budget import matmul_params, plan
    from lmforge.train.data import Data
    from lmforge.train.distributed import Dist

    def plan_with(measure):
        cfg = load_config(
            overrides={
                "time_budget": "1h",
                "data.seq_len": 512,
                "train.batch_size": 8,
                "model.family": "llama",
            }
        )
        data = Data(
            train=iter(()), vocab_size=8192, n_train_tokens=10**10
        )  # data to spare: the compute rule alone
        out, _ = plan(cfg, data, Dist(), torch.bfloat16, time.time(), measure_fn=measure)
        return out.model.overrides["n_layers"]

    def saturating(mc, batch_size, seq_len, device, dtype, **kw):  # utilization grows until 5M params
        return 5e12 * min(1.0, matmul_params(mc) / 5e6) / mc.flops_per_token(seq_len)

    def full(mc, batch_size, seq_len, device, dtype, **kw):
        return 5e12 / mc.flops_per_token(seq_len)

    assert plan_with(saturating) == plan_with(full) > 1


def test_progress_eta_comes_from_the_pace_since_the_previous_line(tmp_path, monkeypatch, capsys):
    """A compile (or a slow start) in the first steps does not linger in the eta: 10 steps in 30 s,
    then 10 in 1 s, of 100 -> 4m30s, then 8 s (not the 2m-odd an average since the start would give)."""
    from lmforge.train import metrics

    clock = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    m = metrics.Metrics(
        tmp_path, total_steps=100, start_step=0, enabled=True, progress=False, tensorboard=False
    )
    m.lines = True
    for t, step in ((30.0, 10), (31.0, 20)):
        clock[0] = t
        m.log({"step": step, "loss": 1.0, "lr": 1e-3, "tok_per_s": 100.0})
    err = capsys.readouterr().err.splitlines()
    assert err[-2].endswith("| eta 4m30s") and err[-1].endswith("| eta 8s"), err


def test_no_working_cpp_compiler_means_no_compile(monkeypatch):
    """A CPU plan compiles only where inductor finds a C++ compiler that runs (here: none does)."""
    import torch._inductor.config

    from lmforge.train.budget import can_compile

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("false",))
    assert not can_compile(torch.device("cpu")) and can_compile(torch.device("cuda"))
