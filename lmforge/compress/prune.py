"""`lmforge prune`: remove weights (unstructured, 2:4) or whole attention head groups and FFN channels.

    lm = lmforge.load("runs/tiny/final")
    model, info = prune_model(lm.model, "wanda", 0.5, "unstructured", calibration=batches)
    prune("runs/tiny/final", "runs/tiny-heads", structure="heads", sparsity=0.25, recover_steps=200,
          data="runs/data")

Notable features
- importance: magnitude |W|, or Wanda |W| x ||X_j||_2 (Sun et al. 2023), X_j the j-th input channel
  of the layer over the calibration tokens
- unstructured: in every output row of every block linear, the round(S x in) least important weights
  are zeroed (so the sparsity is exact per row); 2:4: the 2 least important of every 4 consecutive
  weights of a row. Both are applied as masks: the checkpoint stays dense (zeros stored), and
  recovery fine-tuning keeps the zeros at zero (`train.keep_zeros`). Wanda is sequential: block i is
  scored on the outputs of the already pruned blocks
- structured: whole KV groups of attention heads (a KV head and the query heads that share it, so
  GQA stays consistent; query heads one by one for MQA) or FFN channels (gate, up and down together)
  are removed, giving a physically smaller model with n_heads / n_kv_heads / d_ff changed in
  config.json: an ordinary Hugging Face directory. Scores: the weights of the unit (magnitude), or
  the Wanda score of the output projection's input channels the unit feeds (wo for heads, w_out for
  FFN channels). FFN widths are kept at a multiple of 32 (fast kernel shapes, int4 groups)
- optional recovery: a short fine-tuning run through the training loop (checkpoints, logging, resume)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from lmforge.hf import config_to_hf
from lmforge.outputs import check_output
from lmforge.utils import UserError

METHODS = ("magnitude", "wanda")
STRUCTURES = ("unstructured", "2:4", "heads", "ffn")
FFN_MULTIPLE = 32


def _block_linears(block) -> dict[str, nn.Linear]:
    out = {"attn.wqkv": block.attn.wqkv, "attn.wo": block.attn.wo}
    if isinstance(getattr(block.mlp, "w_in", None), nn.Linear):  # dense MLP (MoE experts are skipped)
        out.update({"mlp.w_in": block.mlp.w_in, "mlp.w_out": block.mlp.w_out})
    return out


def masks_from_scores(score: torch.Tensor, sparsity: float, structure: str) -> torch.Tensor:
    """Keep-mask (N, K) bool: per row, the round(sparsity K) lowest scores dropped (unstructured), or
    the 2 lowest of every 4 consecutive columns (2:4)."""
    N, K = score.shape
    keep = torch.ones(N, K, dtype=torch.bool, device=score.device)
    if structure == "2:4":
        if K % 4:
            raise UserError(f"2:4 sparsity needs layer widths that are multiples of 4 (got {K})")
        g = score.reshape(N, K // 4, 4)
        drop = g.topk(2, dim=-1, largest=False).indices  # (N, K/4, 2)
        keep.view(N, K // 4, 4).scatter_(-1, drop, False)
        return keep
    k = round(sparsity * K)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


@torch.no_grad()
def _prune_masks(model, method, sparsity, structure, calibration, log) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}

    def apply(i, lins, norms=None):
        for name, lin in lins.items():
            W = lin.weight
            score = W.abs().float()
            if norms is not None:
                score = score * norms[name][0].sqrt()[None, :]
            keep = masks_from_scores(score, sparsity, structure)
            W.mul_(keep.to(W.dtype))
            masks[f"blocks.{i}.{name}"] = keep

    if method == "magnitude":
        for i, block in enumerate(model.blocks):
            apply(i, _block_linears(block))
        return masks
    from lmforge.compress.calibrate import blocks_in_order, input_stats

    for i, block, inputs in blocks_in_order(model, calibration):
        lins = _block_linears(block)
        norms = input_stats(lins, lambda block=block, inputs=inputs: [block(*a) for a in inputs], kind="norm")
        apply(i, lins, norms)
    return masks


@torch.no_grad()
def _unit_scores(model, method, structure, calibration) -> list[torch.Tensor]:
    """Per layer: importance of each head unit (KV group, or query head for MQA) or FFN channel."""
    cfg = model.config
    norms = None
    if method == "wanda":
        from lmforge.compress.calibrate import input_stats

        which = "wo" if structure == "heads" else "w_out"
        mods = {i: getattr(b.attn if which == "wo" else b.mlp, which) for i, b in enumerate(model.blocks)}
        dev = model.tok_emb.weight.device
        norms = input_stats(mods, lambda: [model(x.to(dev)) for x in calibration], kind="norm")
    out = []
    for i, b in enumerate(model.blocks):
        if structure == "heads":
            hd, H, KV = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
            Wo = b.attn.wo.weight.abs().float()  # (d, H hd)
            if norms is not None:
                col = (Wo * norms[i][0].sqrt()[None, :]).sum(0)  # (H hd,)
            else:
                Wqkv = b.attn.wqkv.weight.abs().float()
                q, k, v = Wqkv.split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=0)
                rep = H // KV
                col = Wo.sum(0) + q.sum(1)  # per q channel
                kv = (k.sum(1) + v.sum(1)).view(KV, hd).sum(1)  # per KV head
                col = col + kv.repeat_interleave(rep * hd) / (rep * hd)
            per_head = col.view(H, hd).sum(1)  # (H,)
            out.append(per_head if KV == 1 else per_head.view(KV, H // KV).sum(1))
        else:
            Wout = b.mlp.w_out.weight.abs().float()  # (d, ff)
            if norms is not None:
                out.append((Wout * norms[i][0].sqrt()[None, :]).sum(0))
            else:
                Win = b.mlp.w_in.weight.abs().float().view(-1, cfg.d_ff, cfg.d_model).sum(dim=(0, 2))
                out.append(Wout.sum(0) + Win)
    return out


def _structured(model, method, sparsity, structure, calibration, log):
    """A new, smaller model with the least important head units or FFN channels removed."""
    from lmforge.model import build

    cfg = model.config
    scores = _unit_scores(model, method, structure, calibration)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if structure == "heads":
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        units = KV if KV > 1 else H
        n_drop = min(round(sparsity * units), units - 1)
        if n_drop == 0:
            raise UserError(
                f"--sparsity {sparsity}: removes no head group (the model has {units} "
                f"{'KV groups' if KV > 1 else 'query heads'} per layer); use a larger sparsity"
            )
        keep_n = units - n_drop
        new = cfg.replace(
            n_heads=keep_n * (H // KV) if KV > 1 else keep_n, n_kv_heads=keep_n if KV > 1 else 1, head_dim=hd
        )
        for i, s in enumerate(scores):
            kept = s.topk(keep_n).indices.sort().values
            if KV > 1:
                rep = H // KV
                q_heads = (kept[:, None] * rep + torch.arange(rep)).flatten()
                kv_heads = kept
            else:
                q_heads, kv_heads = kept, torch.tensor([0])
            q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
            kv_rows = (kv_heads[:, None] * hd + torch.arange(hd)).flatten()
            rows = torch.cat([q_rows, cfg.q_dim + kv_rows, cfg.q_dim + cfg.kv_dim + kv_rows])
            p = f"blocks.{i}.attn."
            sd[p + "wqkv.weight"] = sd[p + "wqkv.weight"][rows]
            if p + "wqkv.bias" in sd:
                sd[p + "wqkv.bias"] = sd[p + "wqkv.bias"][rows]
            sd[p + "wo.weight"] = sd[p + "wo.weight"][:, q_rows]
            if cfg.qk_norm == "full":  # OLMo 2: one norm weight per q / k channel goes with its head
                sd[p + "q_norm.weight"] = sd[p + "q_norm.weight"][q_rows]
                sd[p + "k_norm.weight"] = sd[p + "k_norm.weight"][kv_rows]
        what = f"{n_drop} of {units} {'KV groups' if KV > 1 else 'query heads'} per layer"
    else:
        ff = cfg.d_ff
        keep_n = max(FFN_MULTIPLE, round((ff - round(sparsity * ff)) / FFN_MULTIPLE) * FFN_MULTIPLE)
        if keep_n >= ff:
            raise UserError(
                f"--sparsity {sparsity}: removes no FFN channel once the width is kept at a "
                f"multiple of {FFN_MULTIPLE} (d_ff={ff}); use a larger sparsity"
            )
        new = cfg.replace(d_ff=keep_n)
        glu = cfg.mlp == "glu"
        for i, s in enumerate(scores):
            kept = s.topk(keep_n).indices.sort().values
            rows = torch.cat([kept, ff + kept]) if glu else kept
            p = f"blocks.{i}.mlp."
            sd[p + "w_in.weight"] = sd[p + "w_in.weight"][rows]
            if p + "w_in.bias" in sd:
                sd[p + "w_in.bias"] = sd[p + "w_in.bias"][rows]
            sd[p + "w_out.weight"] = sd[p + "w_out.weight"][:, kept]
        what = f"{ff - keep_n} of {ff} FFN channels per layer (d_ff {ff} -> {keep_n})"
    try:
        config_to_hf(new)
    except ValueError as e:
        raise UserError(f"the pruned model cannot be written as a {cfg.family} checkpoint: {e}") from None
    dev, dt = model.tok_emb.weight.device, model.tok_emb.weight.dtype
    out = build(new, meta=True)
    out.materialize(dev, init=False)
    out.load_state_dict(
        {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}, strict=False
    )
    log(f"removed {what}")
    return out.to(dt).eval(), what


@torch.no_grad()
def prune_model(
    model,
    method: str = "magnitude",
    sparsity: float = 0.5,
    structure: str = "unstructured",
    calibration: list[torch.Tensor] | None = None,
    log=print,
):
    """Prune `model`. Unstructured and 2:4 zero weights in place and return (model, info with the keep
    masks); heads and ffn return (a new smaller model, info)."""
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose magnitude or wanda")
    if structure not in STRUCTURES:
        raise UserError(f"--structure {structure!r}: choose one of {', '.join(STRUCTURES)}")
    if structure != "2:4" and not 0 < sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be between 0 and 1 (e.g. 0.5)")
    if method == "wanda" and calibration is None:
        raise UserError("wanda needs calibration data (--calibration-data, e.g. python-docs)")
    cfg = model.config
    if cfg.extra.get("quantization_config"):
        raise UserError("this model is quantized; prune the float checkpoint, then quantize the result")
    if structure == "heads" and cfg.family in ("gpt", "gpt2"):
        raise UserError(
            f"{cfg.family} checkpoints derive the head size from n_embd / n_head, so removing "
            "heads cannot be expressed in config.json; use --structure ffn, unstructured or 2:4"
        )
    if structure == "ffn" and cfg.family == "gpt":
        raise UserError("openai-gpt checkpoints fix d_ff = 4 x d_model; use unstructured or 2:4")
    if structure == "ffn" and cfg.n_experts:
        raise UserError(
            "--structure ffn does not prune MoE experts; use --structure heads, unstructured or 2:4"
        )
    model.eval()
    if cfg.n_experts and structure in ("unstructured", "2:4"):
        log("note: MoE experts are not pruned (stacked (E, ...) tensors); attention layers are")
    before = model.num_params()
    if structure in ("unstructured", "2:4"):
        masks = _prune_masks(model, method, sparsity, structure, calibration, log)
        total = sum(m.numel() for m in masks.values())
        zeros = sum(int((~m).sum()) for m in masks.values())
        info = {
            "structure": structure,
            "method": method,
            "masks": masks,
            "pruned_weights": zeros,
            "prunable_weights": total,
            "sparsity": zeros / max(total, 1),
            "params_before": before,
            "params_after": before,
        }
        log(
            f"{structure} {method}: {zeros:,} of {total:,} weights of the block linear layers set to zero "
            f"({100 * zeros / max(total, 1):.2f}%)"
        )
        return model, info
    new, what = _structured(model, method, sparsity, structure, calibration, log)
    info = {
        "structure": structure,
        "method": method,
        "removed": what,
        "params_before": before,
        "params_after": new.num_params(),
        "sparsity": 1 - new.num_params() / before,
    }
    return new, info


# --------------------------------------------------------------------------------------------- command
def sparsity_of(model) -> float:
    """Fraction of exact zeros in the block linear layers."""
    z = n = 0
    for b in model.blocks:
        for lin in _block_linears(b).values():
            z += int((lin.weight == 0).sum())
            n += lin.weight.numel()
    return z / max(n, 1)


def prune(
    checkpoint,
    out,
    *,
    method: Literal["magnitude", "wanda"] = "magnitude",
    sparsity: float = 0.5,
    structure: Literal["unstructured", "2:4", "heads", "ffn"] = "unstructured",
    calibration_data: str | None = "python-docs",
    calibration_samples: int = 128,
    calibration_seq_len: int = 256,
    recover_steps: int = 0,
    data=None,
    recover_lr: float = 1e-4,
    recover_batch_size: int = 8,
    recover_seq_len: int = 256,
    run_dir=None,
    seed: int = 0,
    eval_data: str | None = "python-docs",
    eval_tokens: int = 20_000,
    device: str = "auto",
    force: bool = False,
    log=print,
) -> dict:
    """What `lmforge prune` does: prune, optionally recover with a short fine-tuning run, save to `out`,
    and compare before and after. Returns the summary.

    Args:
        checkpoint: an lmforge or Hugging Face model directory
        out: directory for the pruned checkpoint
        method: importance score: |W| (magnitude) or |W| x input-activation norm (wanda)
        sparsity: fraction to remove: of each row's weights (unstructured), of the KV head groups (heads),
            of the FFN channels (ffn); ignored for 2:4, which is always 50%
        structure: what is removed
        calibration_data: wanda: source or `data prepare` directory for the activations (training split)
        calibration_samples: wanda: sequences to calibrate on
        calibration_seq_len: wanda: tokens per calibration sequence
        recover_steps: fine-tune this many steps after pruning
        data: recovery data: a `data prepare` directory, or a source (prepared with the model's tokenizer)
        recover_lr: recovery peak learning rate; about the end of pretraining's schedule
        recover_batch_size: recovery sequences per step
        recover_seq_len: recovery tokens per sequence
        run_dir: run directory of the recovery (metrics, checkpoints) (default: <out>-recovery next to --out)
        seed: seed for calibration and recovery
        eval_data: source (or `data prepare` directory) whose validation split gives bits per byte before
            and after
        eval_tokens: tokens scored for bits per byte
        device: cuda, cpu or auto (where pruning and the checks run)
        force: replace what --out holds (a model directory, or anything else that is not an input)
    """
    import lmforge
    from lmforge.compress.summary import compare_models, format_summary

    out = check_output(out, "model", force=force, inputs=(checkpoint, data, calibration_data, eval_data))
    if recover_steps and not data:
        raise UserError(
            "--recover-steps needs --data (a `data prepare` directory or a source such as python-docs)"
        )
    lm = lmforge.load(checkpoint, device=device, dtype=torch.float32)
    calibration = None
    if method == "wanda":
        from lmforge.compress.calibrate import calibration_batches

        calibration = calibration_batches(
            calibration_data or "python-docs",
            lm.tokenizer,
            samples=calibration_samples,
            seq_len=min(calibration_seq_len, lm.config.max_seq_len),
            seed=seed,
        )
    model, info = prune_model(lm.model, method, sparsity, structure, calibration, log=log)
    extra: dict = {}
    if recover_steps:
        run_dir = Path(run_dir) if run_dir else out.parent / f"{out.name}-recovery"
        if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
            raise UserError(f"{run_dir} holds an earlier recovery run; delete it or pass another --run-dir")
        pruned = run_dir / "pruned"
        lmforge.lm.LM(model, lm.tokenizer).save(pruned)
        rec = recover(
            pruned,
            data,
            recover_steps,
            run_dir,
            lr=recover_lr,
            batch_size=recover_batch_size,
            seq_len=recover_seq_len,
            keep_zeros=structure in ("unstructured", "2:4"),
            seed=seed,
            log=log,
        )
        _copy_dir(Path(rec["final"]), out)
        extra["more_rows"] = {
            "val loss (recovery start, end)": (f"{rec['loss_before']:.4f}", f"{rec['loss_after']:.4f}")
        }
        log(
            f"recovery: {recover_steps} steps, validation loss {rec['loss_before']:.4f} -> {rec['loss_after']:.4f} "
            f"(run: {run_dir})"
        )
        info["recovery"] = rec
    else:
        lmforge.lm.LM(model, lm.tokenizer).save(out)
    if structure in ("unstructured", "2:4"):
        achieved = sparsity_of(lmforge.load(out, device="cpu").model)
        extra.setdefault("more_rows", {})["zeros in block linears"] = ("-", f"{100 * achieved:.2f}%")
        info["achieved_sparsity"] = achieved
    del lm, model
    summary = compare_models(
        checkpoint, out, eval_data=eval_data, eval_tokens=eval_tokens, device=device, extra=extra
    )
    log(format_summary(summary))
    summary["prune"] = {k: v for k, v in info.items() if k != "masks"}
    return summary


def _copy_dir(src: Path, dst: Path) -> None:
    from lmforge.utils import atomic_dir

    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)


def prepared_data(data, tokenizer_dir, where: Path, log=print) -> str:
    """`data` itself when it is a `data prepare` directory; else it is prepared (once) under `where`
    with the tokenizer of `tokenizer_dir`."""
    from lmforge.evaluate.perplexity import is_prepared

    if is_prepared(data):
        return str(data)
    from lmforge.data.prepare import prepare

    log(f"preparing {data} with the model's tokenizer into {where}")
    prepare(str(data), tokenizer_dir, where, workers=1, progress=False, verbose=False)
    return str(where)


def recover(
    pruned_dir,
    data,
    steps: int,
    run_dir,
    *,
    lr: float = 1e-4,
    batch_size: int = 8,
    seq_len: int = 256,
    keep_zeros: bool = True,
    seed: int = 0,
    log=print,
) -> dict:
    """Fine-tune a pruned checkpoint for `steps` steps through the training loop (zeros kept at zero
    when keep_zeros); returns {final, loss_before, loss_after}."""
    from lmforge.train import load_config, train

    run_dir = Path(run_dir)
    path = prepared_data(data, pruned_dir, run_dir / "data", log)
    cfg = load_config(
        None,
        {
            "name": run_dir.name,
            "out_dir": str(run_dir.parent),
            "seed": seed,
            "resume": "none",
            "model.init_from": str(pruned_dir),
            "data.path": path,
            "data.tokenizer": str(pruned_dir),
            "data.seq_len": seq_len,
            "train.max_steps": steps,
            "train.batch_size": batch_size,
            "train.lr": lr,
            "train.warmup_steps": max(1, steps // 10),
            "train.keep_zeros": keep_zeros,
            "train.weight_decay": 0.0,
            "eval.every": steps,
            "eval.samples": 0,
            "ckpt.every": 0,
            "log.progress": False,
            "log.tensorboard": False,
        },
    )
    s = train(cfg)
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    return {
        "final": s["final"],
        "loss_before": evals[0]["val_loss"] if evals else float("nan"),
        "loss_after": s["val_loss"],
        "run_dir": str(run_dir),
    }
