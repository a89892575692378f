"""Prefix caching: the K/V of recent prompts' token blocks, reused by prompts that start the same way.

A system prompt, few-shot examples or the earlier turns of a chat are prefilled once; a later prompt
that starts with the same tokens copies their keys/values into its row and prefills only the rest.

Blocks: a prompt is cut into BLOCK-token blocks; block i is keyed by the hash of (key of block i-1,
its tokens), so a key names the whole prefix up to the block's end and equal keys mean equal prefixes
(the tokens are compared too, against hash collisions). Only whole blocks are cached, and the last
prompt token is always prefilled (its logits are what the first sample needs).

Positions: every row's prompt starts at position 0 wherever its slots lie (cache.py's per-row
positions; left padding only shifts slots), so a block's K/V (rotary embeddings included) do not
depend on where they were computed, and copying them to other slots gives the same attention.
Ring buffers (sliding windows): a layer with S < max_len slots holds slot s at s % S, so a prefix
longer than S only needs its last S positions copied (the rest is outside every later window); a
prompt is stored only while its whole range is still in every ring (no wrap-around yet).

Memory: an LRU of at most `capacity` tokens ((n_layers, 2, KV, BLOCK, hd) tensors in the cache's
dtype); a hit refreshes its blocks deepest first, so eviction takes leaves before the prefixes that
other entries hang from.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

BLOCK = 16


class _Block:
    __slots__ = ("tokens", "kv")

    def __init__(self, tokens: tuple[int, ...], kv: torch.Tensor):
        self.tokens, self.kv = tokens, kv  # kv (n_layers, 2, KV, BLOCK, hd)


def _keys(ids: list[int], n_blocks: int):
    """(key, tokens) of the first n_blocks whole blocks of ids."""
    key = 0
    for b in range(n_blocks):
        toks = tuple(ids[b * BLOCK : (b + 1) * BLOCK])
        key = hash((key, toks))
        yield key, toks


class PrefixCache:
    """Blocks of K/V for one engine's KVCache (same layers, heads and dtype)."""

    def __init__(self, capacity_tokens: int):
        self.capacity = max(1, capacity_tokens // BLOCK)  # in blocks
        self.blocks: OrderedDict[int, _Block] = OrderedDict()
        self.stats = {"lookups": 0, "hit_tokens": 0, "stored_tokens": 0}

    def __len__(self) -> int:
        return len(self.blocks) * BLOCK  # tokens held

    def clear(self) -> None:
        self.blocks.clear()

    def lookup(self, ids: list[int]) -> list[_Block]:
        """The cached blocks that start `ids` (longest run, leaving its last token to prefill)."""
        self.stats["lookups"] += 1
        found, keys = [], []
        for key, toks in _keys(ids, (len(ids) - 1) // BLOCK):
            b = self.blocks.get(key)
            if b is None or b.tokens != toks:
                break
            found.append(b)
            keys.append(key)
        for key in reversed(keys):  # deepest first: the shared root ends most recently used
            self.blocks.move_to_end(key)
        self.stats["hit_tokens"] += len(found) * BLOCK
        return found

    def load(self, cache, row: int, start: int, blocks: list[_Block]) -> int:
        """Copy `blocks` into `row` of `cache` at slots start.. with positions 0..; returns the tokens
        loaded. The caller has emptied the row (key_pos -1) and sets cache lengths."""
        if not blocks:
            return 0
        kv = torch.cat([b.kv for b in blocks], dim=3)  # (n_layers, 2, KV, n, hd)
        n = kv.shape[3]
        dev = cache.key_pos.device
        for layer, (kc, vc) in enumerate(zip(cache.k, cache.v)):
            S = kc.shape[2]
            m = min(n, S)  # a ring keeps only the last S positions
            idx = torch.arange(start + n - m, start + n, device=dev) % S
            kc[row].index_copy_(1, idx, kv[layer, 0, :, n - m :])
            vc[row].index_copy_(1, idx, kv[layer, 1, :, n - m :])
        S = cache.key_pos.shape[1]
        m = min(n, S)
        idx = torch.arange(start + n - m, start + n, device=dev) % S
        cache.key_pos[row, idx] = torch.arange(n - m, n, device=dev)
        tokens = [t for b in blocks for t in b.tokens][n - m :]  # LongRoPE models recompute from these
        cache.ids[row, idx] = torch.tensor(tokens, dtype=torch.long, device=dev)
        cache.next_pos[row] = n
        return n

    def store(self, cache, row: int, start: int, ids: list[int]) -> None:
        """Remember the K/V of `ids`, held by `row` of `cache` at slots start..start+len(ids)-1."""
        n_blocks = len(ids) // BLOCK
        end = start + len(ids)
        if not n_blocks or any(end - t.shape[2] > start for t in cache.k) or self.capacity < 1:
            return  # nothing whole to store, or a ring already overwrote the first slots
        new, keys = [], []
        for b, (key, toks) in enumerate(_keys(ids, n_blocks)):
            keys.append(key)
            old = self.blocks.get(key)
            if old is None or old.tokens != toks:
                new.append((b, key, toks))
        if new:
            dev = cache.key_pos.device
            lo, hi = new[0][0] * BLOCK, (new[-1][0] + 1) * BLOCK
            per_layer = []
            for kc, vc in zip(cache.k, cache.v):
                idx = torch.arange(start + lo, start + hi, device=dev) % kc.shape[2]
                per_layer.append(torch.stack([kc[row].index_select(1, idx), vc[row].index_select(1, idx)]))
            kv = torch.stack(per_layer)  # (n_layers, 2, KV, hi - lo, hd)
            for b, key, toks in new:
                a = b * BLOCK - lo
                self.blocks[key] = _Block(toks, kv[:, :, :, a : a + BLOCK].clone())
                self.stats["stored_tokens"] += BLOCK
        for key in reversed(keys):  # deepest first: the root ends most recently used
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
