"""Static KV cache: preallocated buffers, a ring buffer for sliding windows, per-row positions.

Slots vs positions. Every row of a batch writes its tokens into the same slot range (`length` is one
Python int, so a decode step writes with plain slicing), but each row keeps its own positions: a
left-padded row has padding in its first slots, marked with position -1 and never attended to.
Rows that join later (continuous batching) simply have -1 in the slots before they joined.

Masks are built once per forward pass from `key_pos` (the position held by each slot) and shared by
all layers: a query at position p sees a key at position q iff 0 <= q <= p (and p - q < window).

Models whose every layer slides (Mistral) keep only the last `window` slots per layer (a ring: slot s
lives at s % window). Models that mix sliding and full layers (Gemma 2/3, Qwen2 with layer_types) keep
every slot for every layer: the full layers need them, and `window_mask(window)` gives the sliding
layers their own mask over the same slots.
A decode step writes first and attends to the ring; a multi-token chunk attends to ring + new keys
(one concatenation per prefill, never per decode step) and then writes its last `window` tokens.
"""

from __future__ import annotations

import torch


def make_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, q_offset: int) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S): True where query t may attend to key s.

    q_pos (B, T) positions of the queries; k_pos (B, S) positions of the keys, -1 for no token;
    query t sits at key index q_offset + t, and always sees itself, so that padding queries
    (whose output is discarded) never produce an all-masked row, which would turn into NaN.
    """
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    m = (kp >= 0) & (kp <= qp)
    if window is not None:
        m &= (qp - kp) < window
    T, S = q_pos.shape[1], k_pos.shape[1]
    eye = (
        torch.arange(S, device=q_pos.device)[None, :]
        == (q_offset + torch.arange(T, device=q_pos.device))[:, None]
    )
    return m | eye


def positions_from_valid(
    valid: torch.Tensor | None, start: torch.Tensor | int, T: int, device
) -> torch.Tensor:
    """Positions (B, T) of a chunk: `start` (per row) plus the count of real tokens before each one."""
    if valid is None:
        ar = torch.arange(T, device=device)
        return (start[:, None] + ar) if torch.is_tensor(start) else (ar + start)[None]
    pos = valid.long().cumsum(1) - 1
    if torch.is_tensor(start):
        pos = pos + start[:, None]
    return pos.clamp_(min=0)


class KVCache:
    """Preallocated K/V for `batch_size` rows and up to `max_len` tokens per row.

    k[i], v[i]: (B, KV, S, hd) with S = max_len, or S = window for sliding-window models.
    """

    def __init__(
        self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32, ring: bool = True
    ):
        if max_len > config.max_seq_len:
            raise ValueError(
                f"KV cache of {max_len} tokens exceeds the model's context of {config.max_seq_len}"
            )
        self.batch_size, self.max_len = batch_size, max_len
        self.window = config.cache_window  # shared by every layer, else None (see window_mask)
        # ring=False keeps every slot even for sliding windows (masks still apply the window), so that
        # slots can be rolled back (speculative decoding).
        self.ring = ring and self.window is not None and self.window < max_len
        size = self.window if self.ring else max_len
        shape = (batch_size, config.n_kv_heads, size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.key_pos = torch.full((batch_size, size), -1, dtype=torch.long, device=device)
        # token id in each slot: written only for LongRoPE models, which recompute the cache once a
        # sequence grows past their pretraining length (see Transformer.forward)
        self.ids = torch.zeros((batch_size, size), dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # per-row position counter
        self.length = 0  # slots written so far (shared by all rows)
        self.has_holes = False  # some written slot holds no token (padding, or a row that joined late)
        self._chunk = None  # how the current forward pass writes: set by prepare(), used by update()
        self._last = None  # (positions, first slot) of the current chunk, for window_mask

    def reset(self) -> None:
        self.key_pos.fill_(-1)
        self.next_pos.zero_()
        self.length, self.has_holes = 0, False

    def rollback(self, n: int) -> None:
        """Forget the last n slots (tokens a speculative verifier rejected); positions rewind with them.
        Not possible on a ring buffer, whose overwritten keys are gone: build the cache with ring=False."""
        if n <= 0:
            return
        if self.ring:
            raise ValueError("cannot roll back a ring-buffer KV cache; build it with ring=False")
        L = self.length
        self.next_pos -= (self.key_pos[:, L - n : L] >= 0).sum(1)
        self.key_pos[:, L - n : L] = -1
        self.length = L - n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def prepare(self, T: int, valid: torch.Tensor | None = None):
        """Register a chunk of T new tokens per row. valid (B, T) marks real tokens (False = padding).

        Returns (positions (B, T), mask (B, 1, T, S) or None, is_causal) for the attention layers.
        """
        L = self.length
        if L + T > self.max_len:
            raise ValueError(f"KV cache is full: {L} + {T} tokens exceed its {self.max_len} slots")
        pos = positions_from_valid(valid, self.next_pos, T, self.key_pos.device)
        new_kpos = pos if valid is None else pos.masked_fill(~valid, -1)
        if valid is not None:
            self.has_holes = self.has_holes or not bool(valid.all())
            self.next_pos += valid.sum(1)
        else:
            self.next_pos += T
        self.length = L + T
        self._last = (pos, L)
        if not self.ring:
            self.key_pos[:, L : L + T] = new_kpos
            self._chunk = ("slice", L, T)
            if not self.has_holes and (self.window is None or L + T <= self.window):
                if T == 1:
                    return pos, None, False  # every cached key is visible: no mask needed
                if L == 0:
                    return pos, None, True  # plain causal prefill (flash/efficient kernels)
            return pos, make_mask(pos, self.key_pos[:, : L + T], self.window, L), False
        W = self.window
        if T == 1:
            slot = L % W
            self.key_pos[:, slot] = new_kpos[:, 0]
            self._chunk = ("ring1", slot, 1)
            if not self.has_holes and L + 1 >= W:
                return pos, None, False  # the ring is full and every key is inside the window
            return pos, make_mask(pos, self.key_pos, W, slot), False
        k_pos = torch.cat([self.key_pos, new_kpos], 1)  # (B, W + T): old ring, then the chunk
        mask = make_mask(pos, k_pos, W, W)
        keep = min(T, W)
        self._chunk = ("ringT", torch.arange(L + T - keep, L + T, device=self.key_pos.device) % W, T)
        self.key_pos[:, self._chunk[1]] = new_kpos[:, T - keep :]
        return pos, mask, False

    def window_mask(self, window: int) -> torch.Tensor:
        """The mask (B, 1, T, L + T) of the current chunk for layers sliding over `window` tokens, in a
        cache whose own mask (prepare) is the full layers' (mixed layer kinds never ring)."""
        if self.ring:
            raise ValueError("window_mask is for caches without a ring buffer")
        pos, L = self._last
        return make_mask(pos, self.key_pos[:, : self.length], window, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's k, v (B, KV, T, hd) for `layer`; return the keys/values to attend to."""
        kind, where, T = self._chunk
        kc, vc = self.k[layer], self.v[layer]
        if kind == "slice":
            kc[:, :, where : where + T] = k
            vc[:, :, where : where + T] = v
            return kc[:, :, : where + T], vc[:, :, : where + T]
        if kind == "ring1":
            kc[:, :, where] = k[:, :, 0]
            vc[:, :, where] = v[:, :, 0]
            return kc, vc
        k_all, v_all = torch.cat([kc, k], 2), torch.cat([vc, v], 2)  # attend before overwriting the ring
        keep = where.numel()
        kc.index_copy_(2, where, k[:, :, T - keep :])
        vc.index_copy_(2, where, v[:, :, T - keep :])
        return k_all, v_all
