"""TokenLoader: windows equal the token stream, epochs are permutations, ranks split the global batch,
and a restored loader continues with exactly the batch that would have come."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.data.prepare import FORMAT, ShardWriter
from lmforge.utils import UserError

BOS = 0


def make_shards(directory, doc_lens, shard_tokens):
    """Shards of a known stream: document d is [BOS, v, v+1, ...] with values unique over the stream."""
    directory.mkdir(parents=True, exist_ok=True)
    lens = np.asarray(doc_lens, dtype=np.int64)
    stream = (np.arange(lens.sum()) % 60000 + 1).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    stream[starts] = BOS
    w = ShardWriter(directory, "train", np.dtype("<u2"), shard_tokens)
    w.add(stream, lens)
    info = {**w.finish(), "bytes": int(lens.sum())}
    meta = {"format": FORMAT, "version": 1, "tokenizer_hash": "feedfacefeedface", "vocab_size": 60001,
            "bos_id": BOS, "eos_id": None, "dtype": "<u2", "source": "test", "splits": {"train": info}}  # fmt: skip
    (directory / "meta.json").write_text(json.dumps(meta))
    return stream, starts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    stream, starts = make_shards(d, rng.integers(3, 60, size=120), shard_tokens=500)
    assert len(json.loads((d / "meta.json").read_text())["splits"]["train"]["shards"]) > 5
    return d, stream, starts


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_packed_windows_are_the_stream(data):
    d, stream, _ = data
    B, T = 4, 16
    loader = TokenLoader(d, "train", B, T, shuffle=False)
    assert loader.n_tokens == len(stream) and loader.n_windows == (len(stream) - 1) // T
    for k, (x, y) in enumerate(take(loader, loader.batches_per_epoch + 2)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        k %= loader.batches_per_epoch  # the third epoch starts over
        for i in range(B):
            s = (k * B + i) * T  # windows cross shard boundaries freely
            assert x[i].tolist() == stream[s : s + T].tolist()
            assert y[i].tolist() == stream[s + 1 : s + T + 1].tolist()


def test_each_epoch_is_a_seeded_permutation(data):
    d, stream, _ = data
    T = 16
    loader = TokenLoader(d, "train", 8, T, seed=3)
    epochs = []
    for _ in range(2):
        rows = torch.cat([x for x, _ in take(loader, loader.batches_per_epoch)])
        epochs.append([int(r[0]) for r in rows])
    # Each epoch visits distinct windows (first tokens are unique in the stream but for BOS)...
    firsts = {int(stream[i * T]) for i in range(loader.n_windows)}
    for e in epochs:
        assert len(e) == loader.batches_per_epoch * 8 and set(e) <= firsts
    # ...in an order that differs per epoch and repeats for the same seed.
    assert epochs[0] != epochs[1]
    again = TokenLoader(d, "train", 8, T, seed=3)
    assert [int(r[0]) for r in next(again)[0]] == epochs[0][:8]
    other = TokenLoader(d, "train", 8, T, seed=4)
    assert [int(r[0]) for r in next(other)[0]] != epochs[0][:8]


@pytest.mark.parametrize("doc_aligned", [False, True])
def test_resume_is_exact_at_any_step(data, doc_aligned):
    d, _, _ = data
    ref = TokenLoader(d, "train", 4, 16, seed=7, doc_aligned=doc_aligned)
    per_epoch = ref.batches_per_epoch
    batches = take(ref, 2 * per_epoch + 5)
    for step in (0, 1, per_epoch - 1, per_epoch, per_epoch + 3):
        a = TokenLoader(d, "train", 4, 16, seed=7, doc_aligned=doc_aligned)
        take(a, step)
        state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
        b = TokenLoader(d, "train", 4, 16, seed=7, doc_aligned=doc_aligned)
        b.load_state_dict(state)
        for k in range(5):
            x, y = next(b)
            assert torch.equal(x, batches[step + k][0]) and torch.equal(y, batches[step + k][1]), (step, k)


def test_two_ranks_split_the_global_batch(data):
    """Rank r gets rows [r*B, (r+1)*B) of the batch one rank with batch 2B gets: disjoint, union exact."""
    d, _, _ = data
    one = TokenLoader(d, "train", 6, 16, seed=1)
    r0 = TokenLoader(d, "train", 3, 16, seed=1, rank=0, world_size=2)
    r1 = TokenLoader(d, "train", 3, 16, seed=1, rank=1, world_size=2)
    for _ in range(one.batches_per_epoch + 2):
        (x, y), (x0, y0), (x1, y1) = next(one), next(r0), next(r1)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # A checkpoint taken with 2 ranks resumes with 1 rank of the same global batch (and vice versa).
    resumed = TokenLoader(d, "train", 6, 16, seed=1)
    resumed.load_state_dict(r0.state_dict())
    x, _ = next(resumed)
    assert torch.equal(x[:3], next(r0)[0]) and torch.equal(x[3:], next(r1)[0])


def test_doc_aligned_rows_start_at_bos(data):
    d, stream, starts = data
    T = 16
    loader = TokenLoader(d, "train", 4, T, doc_aligned=True, shuffle=False)
    ends = np.append(starts[1:], len(stream))
    # Rows: each document start, plus continuation rows every T tokens in long documents.
    expect = [s + j * T for s, e in zip(starts, ends) for j in range(max(1, -(-(e - s - 1) // T)))]
    expect = [s for s in expect if s + T + 1 <= len(stream)]
    assert loader.n_windows == len(expect)
    for k, (x, y) in enumerate(take(loader, loader.batches_per_epoch)):
        assert (x[:, 0] == BOS).all()
        for i in range(4):
            s = expect[k * 4 + i]
            assert x[i, 1:].tolist() == stream[s + 1 : s + T].tolist()
            assert y[i].tolist() == stream[s + 1 : s + T + 1].tolist()
    # Every token of every document but its BOS is a target somewhere (up to the stream's tail).
    covered = {s + j for s in expect for j in range(1, T + 1)}
    assert covered >= set(range(1, expect[-1] + T + 1)) - set(starts.tolist())


def test_errors_are_clear(data, tmp_path):
    d, _, _ = data
    with pytest.raises(UserError, match="not a token-shard directory.*lmforge data prepare"):
        TokenLoader(tmp_path, "train", 2, 8)
    with pytest.raises(UserError, match="split 'val' is not in"):
        TokenLoader(d, "val", 2, 8)
    with pytest.raises(UserError, match="fewer than one global batch"):
        TokenLoader(d, "train", 10_000, 64)
    with pytest.raises(UserError, match="rank 2 / world size 2"):
        TokenLoader(d, "train", 2, 8, rank=2, world_size=2)
    state = TokenLoader(d, "train", 2, 8).state_dict()
    with pytest.raises(UserError, match="saved seq_len is 8 but this loader has 16"):
        TokenLoader(d, "train", 2, 16).load_state_dict(state)
    with pytest.raises(UserError, match="saved seed"):
        TokenLoader(d, "train", 2, 8, seed=5).load_state_dict(state)
