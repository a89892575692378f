"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Each round the draft decodes k tokens one by one; the target runs one (k + 1)-token chunk over the
last accepted token and the k proposals (the cache's multi-token path), which gives its distribution
at every proposal. Proposals are accepted left to right with probability min(1, p/q) (Leviathan et
al. 2023); the first rejected one is replaced by a sample from max(p - q, 0), and if all k pass the
target's distribution after them gives one more token for free. Greedy decoding accepts a proposal
iff it is the target's argmax, so its output is exactly the target's greedy output. Sampled output
has exactly the target's distribution (temperature, top-k/p, min-p, logit bias and repetition penalty
apply to both models, the penalty with the proposals counted as seen). Presence/frequency penalties,
grammars and logprobs are the engine's only (a UserError here).

Rejected tokens leave both caches with `KVCache.rollback`. A ring buffer cannot be rolled back (the
chunk overwrote keys still needed), so sliding-window models get caches without a ring here: the
window is applied by the attention mask and the cache holds the full length (more memory, same
numbers). One row at a time: a batch is generated prompt by prompt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from lmforge.cache import KVCache
from lmforge.infer.engine import stop_token_ids
from lmforge.infer.sampling import Sampler
from lmforge.infer.sequence import Sequence
from lmforge.utils import UserError


def accept_proposals(
    p: torch.Tensor, q: torch.Tensor | None, drafted: torch.Tensor, sampler: Sampler, k: int
):
    """Rejection step of speculative sampling. p (k + 1, V): the target's probabilities at each proposal
    and after the last; q (k, V): the draft's; drafted (k,). Returns (proposals accepted n, next token):
    proposal i passes with probability min(1, p_i / q_i); the first that fails is replaced by a sample
    of max(p - q, 0); if all pass, the next token is sampled from p_k."""
    if k:
        ar = torch.arange(k, device=p.device)
        ratio = p[ar, drafted] / q[ar, drafted]
        u = torch.rand(k, device=p.device, generator=sampler.generators[0])
        ok = (u < ratio).tolist()  # the one host sync of the round
        n = ok.index(False) if False in ok else k
        if n < k:
            resid = (p[n] - q[n]).clamp(min=0)
            if not bool(resid.sum() > 0):  # p == q up to rounding: nothing to correct
                resid = p[n]
            return n, int(sampler.draw((resid / resid.sum())[None], [0]))
    return k, int(sampler.draw(p[k][None], [0]))


class SpeculativeDecoder:
    """Generate with `target`, proposals from `draft` (same vocabulary), k proposals per round."""

    def __init__(self, target, draft, tokenizer=None, k: int = 4):
        if k < 1:
            raise UserError(f"draft_tokens={k}: must be >= 1")
        tv, dv = target.config.vocab_size, draft.config.vocab_size
        if tv != dv:
            raise UserError(
                f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}); "
                "speculative decoding needs the same tokenizer"
            )
        self.target, self.draft, self.tokenizer, self.k = target, draft, tokenizer, k
        self.device = target.tok_emb.weight.device  # fast CPU kernels: the caller's (lmforge.kernels)
        self.stats = {
            "drafted": 0,
            "accepted": 0,
            "rounds": 0,
            "prefill_tokens": 0,
            "prefill_s": 0.0,
            "decode_tokens": 0,
            "decode_s": 0.0,
        }

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / max(self.stats["drafted"], 1)

    def _cache(self, model, need: int) -> KVCache:
        cfg = model.config
        w = model.tok_emb.weight
        return KVCache(cfg, 1, min(need, cfg.max_seq_len), w.device, w.dtype, ring=False)

    @torch.inference_mode()
    def run(self, seq: Sequence, generator: torch.Generator | None = None) -> Iterator[Sequence]:
        """Generate `seq` to the end, yielding it after each round (new tokens in seq.token_ids)."""
        p, P = seq.params, len(seq.prompt_ids)
        for name, m in (("target", self.target), ("draft", self.draft)):
            if P + p.max_new_tokens > m.config.max_seq_len:
                raise UserError(
                    f"prompt of {P} tokens + max_new_tokens={p.max_new_tokens} exceeds the {name} "
                    f"model's context of {m.config.max_seq_len} tokens"
                )
        if p.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        unsupported = [
            name
            for name, used in (
                ("presence_penalty/frequency_penalty", p.uses_counts),
                ("grammar", p.grammar is not None),
                ("logprobs", p.logprobs is not None or p.prompt_logprobs is not None),
            )
            if used
        ]
        if unsupported:
            raise UserError(
                f"{', '.join(unsupported)}: not supported with a draft model (speculative decoding); "
                "generate without the draft"
            )
        seq.stop_ids = frozenset(
            set(p.stop_token_ids) | (set() if p.ignore_eos else stop_token_ids(self.target, self.tokenizer))
        )
        if self.tokenizer is not None and seq.decoder is None:
            seq.decoder = self.tokenizer.stream_decoder(skip_special=True)
        need = P + p.max_new_tokens + self.k
        tc, dc = self._cache(self.target, need), self._cache(self.draft, need)
        sampler = Sampler(1, self.target.config.vocab_size, self.device)
        sampler.set_row(0, p, seq.prompt_ids, generator)
        seen = sampler.seen  # (1, V) or None: tokens in prompt + output, for the repetition penalty

        t0 = time.perf_counter()
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        logits = self.target(ids, cache=tc, logits_to_keep=1)[:, -1]
        self.draft(ids, cache=dc, logits_to_keep=1)
        cur = sampler(logits)  # (1,) first generated token: in neither cache yet
        self.stats["prefill_tokens"] += P
        self.stats["prefill_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        pend = cur[:, None]  # (1, n) tokens the draft has not seen yet
        if seen is not None:
            seen[0, cur] = True
        if seq.append(int(cur)):
            yield seq
            return
        yield seq
        while True:
            k = min(self.k, p.max_new_tokens - len(seq.token_ids) - 1, tc.max_len - tc.length - 1)
            emitted = self._round(seq, sampler, tc, dc, cur, pend, k, seen)
            toks, pend = emitted
            self.stats["rounds"] += 1
            done = False
            for t in toks:
                self.stats["decode_tokens"] += 1
                if seq.append(t):
                    done = True
                    break
            yield seq
            if done:
                break
            cur = torch.tensor([toks[-1]], device=self.device)
        self.stats["decode_s"] += time.perf_counter() - t0

    def _round(self, seq, sampler: Sampler, tc: KVCache, dc: KVCache, cur, pend, k: int, seen):
        """One draft-and-verify round. Returns (tokens to emit, new draft pending tokens (1, n))."""
        greedy = seq.params.greedy
        rows = torch.zeros(k + 1, dtype=torch.long, device=self.device)  # every position uses row 0's params
        drafted, q = [], []
        seen_d = None if seen is None else seen.clone()
        x = pend
        for _ in range(k):  # draft k proposals, feeding each back
            lg = sampler.process(self.draft(x, cache=dc)[:, -1], rows[:1], seen_d)  # (1, V)
            if greedy:
                d = lg.argmax(dim=-1)
            else:
                probs = lg.softmax(dim=-1)
                d = sampler.draw(probs, [0])
                q.append(probs)
            drafted.append(d)
            if seen_d is not None:
                seen_d[0, d] = True
            x = d[:, None]
        chunk = torch.cat([cur, *drafted])[None]  # (1, k + 1): the last accepted token, then the proposals
        t_seen = None
        if seen is not None:  # position i has seen the proposals before it
            t_seen = seen.repeat(k + 1, 1)
            for i, d in enumerate(drafted):
                t_seen[i + 1 :, d] = True
        lg = sampler.process(self.target(chunk, cache=tc)[0], rows, t_seen)  # (k + 1, V)
        d_all = chunk[0, 1:]  # (k,)
        if greedy:
            best = lg.argmax(dim=-1)  # (k + 1,)
            ok = (best[:k] == d_all).tolist()
            n = ok.index(False) if False in ok else k
            t = int(best[n])
        else:
            n, t = accept_proposals(lg.softmax(dim=-1), torch.cat(q) if q else None, d_all, sampler, k)
        accepted = d_all[:n].tolist()
        self.stats["drafted"] += k
        self.stats["accepted"] += n
        tc.rollback(k - n)  # the target fed cur + k proposals; keep cur + n
        if n < k:
            dc.rollback(k - 1 - n)  # the draft fed pend + k - 1 proposals; keep pend + n
            new_pend = torch.tensor([[t]], device=self.device)
        elif k:  # the draft never saw its last proposal
            new_pend = torch.tensor([[int(d_all[-1]), t]], device=self.device)
        else:
            new_pend = torch.cat([pend, torch.tensor([[t]], device=self.device)], 1)
        if seen is not None:
            seen[0, [*accepted, t]] = True
        return [*accepted, t], new_pend
