"""The decode engine: a fixed set of rows on one preallocated KV cache; requests come and go.

    engine = Engine(model, tokenizer, max_batch=8)
    engine.add([Sequence(ids, SamplingParams(...))])   # prefill; the first token is already sampled
    while engine.active:
        for seq in engine.step():                     # one decode step for every row
            print(seq.id, seq.pop_text(), seq.finish_reason)

How rows share the cache (see cache.py): all rows write slot `cache.length` in a decode step, each with
its own position. `add` on an idle engine prefills all new prompts in one left-padded batch. Added to a
running engine, a prompt of P tokens is prefilled alone, through a one-row view of the cache, into the
P slots that end where the other rows are (its earlier slots are marked empty), so from the next step
on it decodes in lock-step with them. When the slots run out, every row is shifted left by the slots
no active row uses any more (or, in a ring buffer, rolled), which is rare and costs one copy.

The decode loop does no tensor concatenation and one device-to-host transfer per step (the B new
tokens); stop checks are plain Python on those ints (sequence.py). On CUDA the decode step runs as a
compiled CUDA graph (`torch.compile(mode="reduce-overhead")`): it reads and writes the whole static
cache at a slot held in a tensor, so every step has the same shapes (`_StaticStep`).

Per request, beyond sampling (sampling.py): logprobs of each generated token (and of the prompt's, from
the prefill's own logits, no second pass) are the log-softmax of the raw logits; a grammar (grammar.py)
masks each constrained row's logits in the same step as the free rows and ends the row when complete.

Sizing: the cache holds max_batch x max_len slots; max_len defaults to what a memory budget that fits
the machine allows (kv_budget.py), never blindly the model's context (131072 for Llama 3.2).

Prefix caching (prefix_cache=True, prefix_cache.py): prompts that start with the token blocks of a
recent prompt or finished conversation copy those blocks' K/V into their row and prefill the rest only.
Such prompts are prefilled row by row (the path continuous batching uses anyway).
"""

from __future__ import annotations

import copy
import time
import types

import torch

from lmforge.cache import KVCache, make_mask
from lmforge.infer.kv_budget import plan_kv_cache
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.sampling import Sampler
from lmforge.infer.sequence import Sequence, TokenLogprob
from lmforge.kernels import rows
from lmforge.utils import UserError


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end generation by default: the tokenizer's EOS / end-of-turn and the config's EOS."""
    ids = set()
    if tokenizer is not None:
        stops = tokenizer.stop_ids
        ids = set(stops() if callable(stops) else stops)
    eos = model.config.eos_token_id
    if eos is not None:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: list[int]) -> list[TokenLogprob]:
    """TokenLogprob of tokens (n,) under logits (n, V) (raw: log-softmax only), with top[i] alternatives."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    k = max(top, default=0)
    if k:
        vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
    out = []
    for i, t in enumerate(tokens.tolist()):
        alts = list(zip(ids[i][: top[i]], vals[i][: top[i]])) if k and top[i] else []
        out.append(TokenLogprob(t, chosen[i], alts))
    return out


def prompt_logprobs(model, hidden: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob | None]:
    """Per prompt token: None for the first, then its logprob under the logits of the position before
    it, from the prefill's final hidden states (P, d); the logits are made 256 positions at a time, so a
    long prompt with a large vocabulary never holds (P, V) floats."""
    out: list[TokenLogprob | None] = [None]
    ids = torch.tensor(prompt, device=hidden.device)
    head = getattr(model, "logits", None) or model.lm_head
    for a in range(0, len(prompt) - 1, 256):
        b = min(a + 256, len(prompt) - 1)
        out += token_logprobs(head(hidden[a:b]), ids[a + 1 : b + 1], [top] * (b - a))
    return out


def _row_view(cache: KVCache, rows: slice) -> KVCache:
    """A KVCache over `rows` of `cache` that shares its storage (writes land in the parent)."""
    view = copy.copy(cache)
    view.k = [t[rows] for t in cache.k]
    view.v = [t[rows] for t in cache.v]
    view.key_pos, view.next_pos = cache.key_pos[rows], cache.next_pos[rows]
    if getattr(cache, "ids", None) is not None:  # token ids per slot (LongRoPE restarts read them)
        view.ids = cache.ids[rows]
    view.ids = cache.ids[rows]
    view.batch_size = view.key_pos.shape[0]
    return view


class _StaticStep:
    """Stands in for the KVCache during a decode step with fixed shapes (for CUDA graphs): writes the
    new K/V at `slot` (a 0-dim tensor) and attends over the whole buffer, masking empty slots."""

    def __init__(self, cache: KVCache):
        self.c = cache
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.key_pos.device)

    def prepare(self, T: int, valid=None):
        c = self.c
        pos = c.next_pos[:, None].clone()  # (B, 1)
        c.key_pos.index_copy_(1, self.slot, pos)
        c.next_pos.add_(1)
        self.pos = pos
        return pos, make_mask(pos, c.key_pos, c.window, self.slot), False  # mask (B, 1, 1, S)

    def window_mask(self, window: int):  # sliding layers of a model that mixes layer kinds (Gemma 2/3)
        return make_mask(self.pos, self.c.key_pos, window, self.slot)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.c.k[layer], self.c.v[layer]
        kc.index_copy_(2, self.slot, k)  # k (B, KV, 1, hd) into (B, KV, S, hd)
        vc.index_copy_(2, self.slot, v)
        return kc, vc


class Engine:
    """Rows of a batch on one KV cache; see the module docstring.

    max_batch: rows decoded together (idle rows still cost compute, as the shapes are fixed).
    max_len: slots per row (prompt + generated tokens of a request must fit); default: as many as
        kv_cache_memory allows, at most the context (kv_budget.plan_kv_cache).
    kv_cache_memory: the KV cache's budget: bytes, "2GiB", or a fraction of the available memory
        (default: kv_budget.default_budget, a share of the machine's free memory).
    compile: run the decode step through torch.compile with CUDA graphs; None = on CUDA only.
    prefix_cache: reuse the K/V of prompt prefixes seen recently (True: an LRU of
        max(max_len, max_batch * max_len / 2) tokens; an int: that many tokens; False: off).
    skip_idle_tail: eager decode steps run rows [0, last busy row] only (the server's engines): a
        server sized for its peak load is mostly less busy than that, and on a CPU an empty row costs
        as much as a busy one (a 1-of-32 step of the tiny model is ~3x a 1-row step). New requests take
        the lowest free rows, so the busy rows gather at the front; rows past the last busy one neither
        compute nor advance, and a request joining one resets it (_prefill_row). Same tokens either
        way. Compiled steps (CUDA graphs: fixed shapes) always decode every row.

    The engine never changes the model: its fast CPU kernels are the caller's choice, installed on the
    model beforehand (`lmforge.kernels.install`, which `lmforge.load` does).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        max_batch: int = 1,
        max_len: int | None = None,
        compile: bool | None = None,
        cache_dtype: torch.dtype | None = None,
        kv_cache_memory=None,
        prefix_cache: bool | int = False,
        skip_idle_tail: bool = False,
    ):
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.skip_idle_tail = skip_idle_tail
        self.device = model.tok_emb.weight.device
        dtype = cache_dtype or model.tok_emb.weight.dtype
        _, self.max_len, self.kv_bytes = plan_kv_cache(
            cfg, max_batch, max_len, kv_cache_memory, dtype=dtype, device=self.device
        )
        self.cache = model.new_cache(max_batch, self.max_len, cache_dtype)
        self.prefix: PrefixCache | None = None
        rope = cfg.rope_scaling or {}
        if rope.get("rope_type", rope.get("type")) in ("longrope", "su"):
            # LongRoPE recomputes every key with other factors once a sequence passes its pretraining
            # length, so a cached block's keys depend on how long its sequence grew: never reuse them.
            prefix_cache = False
        if prefix_cache:
            cap = (
                max(self.max_len, max_batch * self.max_len // 2)
                if prefix_cache is True
                else int(prefix_cache)
            )
            self.prefix = PrefixCache(cap)
        self.rows: list[Sequence | None] = [None] * max_batch
        self.start = [0] * max_batch  # first slot each row uses (for compaction)
        self.cur = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # token each row feeds next
        self.sampler = Sampler(max_batch, cfg.vocab_size, self.device)
        self.default_stop_ids = stop_token_ids(model, tokenizer)
        self.stats = {
            "prefill_tokens": 0,
            "prefill_s": 0.0,
            "decode_steps": 0,
            "decode_tokens": 0,
            "decode_s": 0.0,
            "cached_prompt_tokens": 0,
        }
        if compile is None:
            compile = self.device.type == "cuda"
        # On CPU the compiled step calls lmforge's decode kernel like the eager one, on a model whose
        # kernels are installed (lmforge.kernels). Without the kernel, fp32 keeps the weight storage
        # install chose (inductor's matmuls read it as it is) and bf16 lets inductor's freezing pack the
        # weights for oneDNN (DecodeLinear leaves its own packing out of compiled graphs).
        cpu = self.device.type == "cpu"
        freeze = cpu and compile and not rows.available() and model.tok_emb.weight.dtype != torch.float32
        self._step_fn = None
        if compile:
            self._static = _StaticStep(self.cache)
            for t in [
                *self.cache.k,
                *self.cache.v,
                self.cache.key_pos,
                self.cache.next_pos,
                self._static.slot,
            ]:
                torch._dynamo.mark_static_address(t)  # cache tensors keep their addresses across replays
            if self.device.type == "cuda":  # CUDA graphs: one replay per step
                self._step_fn = torch.compile(self._static_logits, mode="reduce-overhead", fullgraph=True)
            else:  # CPU: the ~60 small ops per layer fused into C++ kernels, called from C++ rather
                # than Python; minutes to compile the first time (inductor caches it on disk after).
                # Checking dynamo's guards on every module and parameter costs ~1 ms a step, so they
                # are skipped: safe because this engine's step function has its own code object (so
                # its own dynamo cache, which no other engine's model can hit) and the parameters
                # are graph inputs read afresh at every call (not frozen in), so in-place updates show.
                opts = {"freezing": freeze, "cpp_wrapper": True}
                if not freeze:
                    opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
                code = Engine._static_logits.__code__.replace()  # a copy: this engine's cache alone
                step = types.FunctionType(code, Engine._static_logits.__globals__).__get__(self)
                self._step_fn = torch.compile(step, fullgraph=True, options=opts)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def _check(self, seq: Sequence) -> None:
        p = seq.params
        if len(seq.prompt_ids) < 1:
            raise UserError("the prompt is empty: give at least one token")
        need = len(seq.prompt_ids) + p.max_new_tokens
        if need > self.max_len:
            raise UserError(
                f"prompt of {len(seq.prompt_ids)} tokens + max_new_tokens={p.max_new_tokens} = {need} "
                f"tokens does not fit the engine's {self.max_len} slots per row (its KV cache: max_len, "
                "sized by kv_cache_memory)"
            )
        if p.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        V = self.model.config.vocab_size
        outside = [t for t in p.logit_bias if t >= V]
        if outside:
            raise UserError(f"logit_bias: token id {outside[0]} is outside the vocabulary of {V} tokens")
        if p.grammar is not None and seq.matcher is None:
            if self.tokenizer is None:
                raise UserError(
                    "grammar-constrained decoding needs the model's tokenizer; this model has none"
                )
            seq.matcher = p.grammar.matcher(self.tokenizer, V)

    def _start_sequence(self, seq: Sequence, row: int, generator) -> None:
        p = seq.params
        seq.stop_ids = frozenset(set(p.stop_token_ids) | (set() if p.ignore_eos else self.default_stop_ids))
        if self.tokenizer is not None and seq.decoder is None and not seq.token_ids:
            seq.decoder = self.tokenizer.stream_decoder(skip_special=True)
        self.rows[row] = seq
        self.sampler.set_row(row, p, seq.prompt_ids, generator)

    def _retire(self, row: int, store: bool = False) -> None:
        """Free a row; store: remember its tokens' K/V in the prefix cache (a finished conversation
        is the prefix of its next turn)."""
        seq = self.rows[row]
        if store and self.prefix is not None and seq is not None:
            ids = seq.prompt_ids + seq.token_ids[:-1]  # the last token was sampled, never fed
            if len(ids) == self.cache.length - self.start[row]:
                self.prefix.store(self.cache, row, self.start[row], ids)
        self.rows[row] = None
        self.sampler.clear_row(row)

    def _park_idle_rows(self) -> None:
        """Idle rows are decoded too (fixed shapes); keep their positions at 0, or a row idle for longer
        than the context would index past the position tables. A request joining a row resets it."""
        idle = self.free_rows
        if idle:
            self.cache.next_pos[idle] = 0

    def cancel(self, seq: Sequence) -> bool:
        """Stop generating `seq` (e.g. its client went away) and free its row; False if it holds none."""
        for i, r in enumerate(self.rows):
            if r is seq:
                self._retire(i)
                return True
        return False

    def clear(self) -> list[Sequence]:
        """Free every row (e.g. after an error in a step); returns the sequences that held one."""
        dropped = [r for r in self.rows if r is not None]
        for i, r in enumerate(self.rows):
            if r is not None:
                self._retire(i)
        return dropped

    # ------------------------------------------------------------------ admission (prefill)
    @torch.inference_mode()
    def add(self, seqs: list[Sequence], generator: torch.Generator | None = None) -> list[Sequence]:
        """Prefill `seqs` into free rows and sample their first token. Returns them (some may already
        be finished, e.g. when the first token is EOS). `generator`: one generator shared by all of
        them (otherwise each uses its params.seed, or torch's global generator)."""
        free = self.free_rows
        if len(seqs) > len(free):
            raise UserError(
                f"{len(seqs)} requests but only {len(free)} free rows (max_batch={len(self.rows)})"
            )
        for s in seqs:  # all checks before any row changes
            self._check(s)
        t0 = time.perf_counter()
        idle = self.active == 0
        # One left-padded batch on an idle engine, unless a prompt wants its logprobs (the row path keeps
        # all its positions' logits) or starts with cached blocks (copied into its row).
        batch = idle and not any(s.params.prompt_logprobs is not None or self._cached_prefix(s) for s in seqs)
        rows = list(range(len(seqs))) if idle else free[: len(seqs)]
        for r, s in zip(rows, seqs):
            self._start_sequence(s, r, generator)
        try:
            if idle:
                self.cache.reset()
            if batch:
                logits = self._prefill_batch(seqs)
            else:
                logits = torch.cat([self._prefill_row(r, s) for r, s in zip(rows, seqs)])
        except BaseException:
            for r in rows:  # leave the engine as it was (the other rows keep running)
                self._retire(r)
            raise
        self._sample_into(logits, rows)
        cached = sum(s.cached_tokens for s in seqs)
        self.stats["prefill_tokens"] += sum(len(s.prompt_ids) for s in seqs) - cached
        self.stats["cached_prompt_tokens"] += cached
        self.stats["prefill_s"] += time.perf_counter() - t0
        return seqs

    def _cached_prefix(self, seq: Sequence) -> list:
        """The prefix cache's blocks that start seq's prompt ([] without a cache, or for prompt logprobs,
        which need every position's logits)."""
        if self.prefix is None or seq.params.prompt_logprobs is not None:
            return []
        return self.prefix.lookup(seq.prompt_ids)

    def _prefill_batch(self, seqs: list[Sequence]) -> torch.Tensor:
        """Left-padded prefill of rows 0..n-1 of an empty cache; returns last-token logits (n, V)."""
        n, T = len(seqs), max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros(n, T, dtype=torch.long)
        valid = torch.zeros(n, T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            P = len(s.prompt_ids)
            ids[i, T - P :] = torch.tensor(s.prompt_ids)
            valid[i, T - P :] = True
            self.start[i] = T - P
        view = _row_view(self.cache, slice(0, n))
        mask = None if bool(valid.all()) else valid.to(self.device)
        logits = self.model(ids.to(self.device), attention_mask=mask, cache=view, logits_to_keep=1)
        self.cache.length = T
        self.cache.has_holes = view.has_holes or n < len(self.rows)
        if self.prefix is not None:
            for i, s in enumerate(seqs):
                self.prefix.store(self.cache, i, self.start[i], s.prompt_ids)
        return logits[:, -1]

    def _prefill_row(self, row: int, seq: Sequence) -> torch.Tensor:
        """Prefill one prompt into `row` of a running batch, ending at the current slot; logits (1, V).
        Its first tokens come from the prefix cache when they are there."""
        c, prompt = self.cache, seq.prompt_ids
        P = len(prompt)
        if P > c.length:  # make room on the left: shift every row right
            self._shift(P - c.length)
        blocks = self._cached_prefix(seq)  # looked up per row: an earlier row of this add may have stored it
        view = _row_view(c, slice(row, row + 1))
        view.key_pos.fill_(-1)  # forget the previous occupant
        view.next_pos.zero_()
        start = self.start[row] = c.length - P
        n = self.prefix.load(c, row, start, blocks) if blocks else 0  # positions 0..n-1, next_pos = n
        seq.cached_tokens = n
        view.length, view.has_holes = start + n, True
        ids = torch.tensor([prompt[n:]], dtype=torch.long, device=self.device)
        want = seq.params.prompt_logprobs
        if want is None:
            logits = self.model(ids, cache=view, logits_to_keep=1)
        else:  # n == 0 here: every position's hidden state is at hand (one pass, no second forward)
            hidden = self.model(ids, cache=view, return_hidden=True)  # (1, P, d)
            seq.prompt_logprobs = prompt_logprobs(self.model, hidden[0, :-1], prompt, want)
            head = getattr(self.model, "logits", None) or self.model.lm_head
            logits = head(hidden[:, -1:])
        c.has_holes = True
        if self.prefix is not None:
            self.prefix.store(c, row, start, prompt)
        return logits[:, -1]

    # ------------------------------------------------------------------ slot management
    def _shift(self, delta: int) -> None:
        """Move every row's slots by delta (> 0: right, < 0: left); vacated slots become empty."""
        c, L = self.cache, self.cache.length
        if c.ring:
            # Slot s lives at s % W, so rolling the ring by delta moves every slot; the window of the
            # last W slots holds the same keys before and after, so nothing needs emptying.
            if delta % c.window:
                for t in [*c.k, *c.v]:
                    t.copy_(t.roll(delta, dims=2))
                c.key_pos.copy_(c.key_pos.roll(delta, dims=1))
                if getattr(c, "ids", None) is not None:
                    c.ids.copy_(c.ids.roll(delta, dims=1))
        else:
            src, dst = (
                (slice(0, L), slice(delta, L + delta))
                if delta > 0
                else (slice(-delta, L), slice(0, L + delta))
            )
            for t in [*c.k, *c.v]:
                t[:, :, dst] = t[:, :, src].clone()
            c.key_pos[:, dst] = c.key_pos[:, src].clone()
            if getattr(c, "ids", None) is not None:
                c.ids[:, dst] = c.ids[:, src].clone()
            c.ids[:, dst] = c.ids[:, src].clone()  # token ids (LongRoPE models recompute from them)
            c.key_pos[:, slice(0, delta) if delta > 0 else slice(L + delta, L)] = -1
        c.length = L + delta
        c.has_holes = True
        self.start = [max(0, s + delta) for s in self.start]

    def _make_room(self) -> None:
        """Before a decode step on a full cache: drop the slots that no active row uses any more."""
        s = min(self.start[i] for i, r in enumerate(self.rows) if r is not None)
        if s == 0:
            raise RuntimeError("KV cache full although every request fits its budget (engine bug)")
        self._shift(-s)

    # ------------------------------------------------------------------ decoding
    def _static_logits(self, tok: torch.Tensor) -> torch.Tensor:
        return self.model(tok, cache=self._static)[:, -1]

    def _decode_logits(self, tok: torch.Tensor) -> torch.Tensor:
        """Logits (k, V) of one decode step feeding tok (k, 1) to rows [0, k) (k < B: eager only)."""
        c = self.cache
        if self._step_fn is None:
            k = tok.shape[0]
            view = c if k == len(self.rows) else _row_view(c, slice(0, k))
            logits = self.model(tok, cache=view)[:, -1]
            c.length = view.length
            return logits
        self._static.slot.fill_(c.length % c.window if c.ring else c.length)
        logits = self._step_fn(tok)
        c.length += 1
        return logits.clone()  # CUDA graph outputs are overwritten by the next replay

    def _sample_into(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Sample the first token of each of `rows` from logits (len(rows), V); append it to the sequences."""
        tok = self._sample(logits, rows, rows)
        idx = torch.tensor(rows, device=self.device)
        self.cur[idx] = tok
        self.sampler.observe(tok, idx)
        self._deliver(logits, tok, rows, rows)

    def _sample(self, logits: torch.Tensor, rows: list[int] | None, batch_rows: list[int]) -> torch.Tensor:
        """Tokens (n,) for logits (n, V) of batch rows `batch_rows` (rows: the same, or None for all B),
        with the grammar masks of the constrained rows."""
        constrained = [
            (j, s.matcher, s.stop_ids)
            for j, r in enumerate(batch_rows)
            if (s := self.rows[r]) is not None and s.matcher is not None and not s.done
        ]
        allowed = None
        if constrained:
            from lmforge.infer.grammar import allowed_mask

            allowed = allowed_mask(constrained, logits.shape[0], logits.shape[1], self.device)
        return self.sampler(logits, rows, allowed)

    def _deliver(self, logits, tok: torch.Tensor, batch_rows: list[int], live: list[int]) -> list[Sequence]:
        """Append token tok[j] to the sequence of batch row batch_rows[j], for the rows in `live`: its
        logprobs first (from the raw logits), then the grammar; retire the rows that finished."""
        want = [
            (j, r) for j, r in enumerate(batch_rows) if r in live and self.rows[r].params.logprobs is not None
        ]
        lps = {}
        if want:
            js = torch.tensor([j for j, _ in want], device=self.device)
            top = [self.rows[r].params.logprobs for _, r in want]
            lps = dict(zip((j for j, _ in want), token_logprobs(logits[js], tok[js], top)))
        toks = tok.tolist()  # the one host sync of the step
        out = []
        pos = {r: j for j, r in enumerate(batch_rows)}
        for r in live:
            seq, j = self.rows[r], pos[r]
            t = toks[j]
            if j in lps:
                seq.logprobs.append(lps[j])
            done = seq.append(t)
            if not done and seq.matcher is not None:
                if not seq.matcher.consume(t) or seq.matcher.stopped:
                    seq.finish("stop")  # complete: nothing else may follow
                    done = True
            if done:
                seq.matcher = None
                self._retire(r, store=True)
            out.append(seq)
        return out

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One decode step for every row; returns the sequences that got a token (finished ones are
        retired from their rows and have finish_reason set)."""
        live = [i for i, r in enumerate(self.rows) if r is not None]
        if not live:
            return []
        t0 = time.perf_counter()
        if self.cache.length + 1 > self.max_len:
            self._make_room()
        self._park_idle_rows()  # idle rows that are decoded keep their positions at 0
        B = len(self.rows)
        k = live[-1] + 1 if self.skip_idle_tail and self._step_fn is None else B
        logits = self._decode_logits(self.cur[:k, None])  # (k, V)
        rows = None if k == B else list(range(k))
        tok = self._sample(logits, rows, list(range(k)))  # (k,)
        self.sampler.observe(tok, None if k == B else torch.arange(k, device=self.device))
        self.cur[:k] = tok
        out = self._deliver(logits, tok, list(range(k)), live)
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(live)
        self.stats["decode_s"] += time.perf_counter() - t0
        return out
