"""Calibration for GPTQ and Wanda: a few hundred token sequences, and statistics of what each linear
layer sees, gathered block by block.

    batches = calibration_batches("python-docs", lm.tokenizer, samples=128, seq_len=256)
    for i, block, inputs in blocks_in_order(model, batches):      # block i sees what the changed
        stats = input_stats(block, {"wqkv": block.attn.wqkv}, inputs)   # blocks before it produce
        ...change block i...

Sequential, as in GPTQ and Wanda: block i is calibrated on the outputs of blocks 0..i-1 *after* they
were quantized or pruned, so later layers correct for the error of earlier ones.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.utils import UserError


def calibration_batches(
    data,
    tokenizer,
    *,
    samples: int = 128,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    split: str = "train",
    text_field: str = "text",
) -> list[torch.Tensor]:
    """`samples` windows of seq_len tokens (in batches), drawn at random positions from the documents of
    `data` (a source spec such as python-docs, or a `data prepare` directory) joined end to end."""
    from lmforge.evaluate.perplexity import token_documents

    if tokenizer is None:
        raise UserError("calibration needs the checkpoint's tokenizer (tokenizer.json) to read the data")
    if samples < 1 or seq_len < 2:
        raise UserError("calibration needs at least 1 sample of at least 2 tokens")
    want = 4 * samples * seq_len  # read more than needed, so windows come from many documents
    parts, n = [], 0
    for ids in token_documents(data, tokenizer, split=split, text_field=text_field):
        parts.append(np.asarray(ids, dtype=np.int64))
        n += len(parts[-1])
        if n >= want:
            break
    if n < seq_len + 1:
        raise UserError(
            f"--calibration-data {data}: only {n} tokens in its {split} split; need at least {seq_len + 1}"
        )
    stream = np.concatenate(parts)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seq_len, size=samples)
    x = torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]))
    return list(x.split(batch_size))


class _Stop(Exception):
    pass


@torch.no_grad()
def blocks_in_order(model, batches: list[torch.Tensor]):
    """Yield (i, block, inputs) for each block in order; `inputs` are the block's positional arguments
    for every calibration batch. After the caller changes block i (between two yields), its outputs are
    recomputed with the changed block and become block i+1's inputs."""
    model.eval()
    dev = model.tok_emb.weight.device
    inputs: list[tuple] = []

    def grab(module, args, kwargs):
        inputs.append(tuple(args))
        raise _Stop

    h = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(x.to(dev))
            except _Stop:
                pass
    finally:
        h.remove()
    for i, block in enumerate(model.blocks):
        yield i, block, inputs
        inputs = [(block(*args),) + args[1:] for args in inputs]


@torch.no_grad()
def input_stats(modules: dict, run, kind: str = "hessian") -> dict:
    """Statistics of the inputs x (tokens, K) each module in `modules` receives while `run()` runs:
    hessian: (X^T X / n (K, K) float32, n); norm: (sum of x_j^2 over tokens (K,), n) for Wanda's ||X_j||."""
    stats = {name: [None, 0] for name in modules}
    hooks = []

    def make(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (n, K)
            acc = stats[name]
            add = x.t() @ x if kind == "hessian" else (x * x).sum(0)
            acc[0] = add if acc[0] is None else acc[0] + add
            acc[1] += x.shape[0]

        return hook

    for name, m in modules.items():
        hooks.append(m.register_forward_pre_hook(make(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (s, n) in stats.items():
        if s is None:
            raise UserError(f"calibration: layer {name} received no input")
        out[name] = (s / max(n, 1), n) if kind == "hessian" else (s, n)
    return out
