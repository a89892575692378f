"""lm-evaluation-harness adapter: run any lm-eval task on an lmforge checkpoint.

lm-eval (0.4.x) finds a `--model` name in its registry, and its registry only knows the models
listed in lm_eval/models/__init__.py: it has no plugin entry point, and `--include_path` adds task
YAMLs, not models. So the name `lmforge` exists once this module is imported. Two ways in:

    # command line: this module registers "lmforge", then runs lm-eval's own CLI with the arguments
    python -m lmforge.evaluate.lm_eval_adapter --model lmforge \\
        --model_args pretrained=runs/quickstart/final --tasks hellaswag --batch_size 16

    # Python: pass the object, or the name after importing this module
    import lm_eval
    from lmforge.evaluate.lm_eval_adapter import LMForgeLM
    lm_eval.simple_evaluate(model=LMForgeLM("runs/quickstart/final"), tasks=["arc_easy"])

The three request types are answered by lmforge's own scoring code (lmforge.evaluate.tasks and
.perplexity), so `lmforge evaluate --task` and lm-eval give the same log-likelihoods:
- loglikelihood: context and continuation encoded as lm-eval's causal models do (TemplateLM), BOS
  first when the tokenizer has one; (sum of log-probabilities, was the continuation greedy)
- loglikelihood_rolling: the document after the prefix token (BOS, else EOS), in windows of the
  model's context, every token scored once with as much context as fits
- generate_until: greedy (or sampled, with do_sample) through the inference engine, cut at `until`

model_args: pretrained (checkpoint directory), device (auto), dtype (fp32/bf16/fp16), batch_size,
max_gen_toks (256), max_length (default: the model's context).
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: the registry only does so when empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from tqdm import tqdm

from lmforge.evaluate.perplexity import sequence_nll
from lmforge.evaluate.tasks import generate_greedy, prefix_id, score_continuations
from lmforge.lm import load
from lmforge.utils import UserError


def _int_or_default(v, default: int) -> int:
    """lm-eval passes batch sizes as ints or strings ("8", "auto", "auto:4")."""
    try:
        return max(1, int(v))
    except (TypeError, ValueError):
        return default


class LMForgeLM(TemplateLM):
    """An lmforge checkpoint (or a loaded lmforge LM) behind lm-eval's LM interface."""

    backend = "causal"

    def __init__(
        self,
        pretrained=None,
        device: str | None = "auto",
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        lm=None,
        **kwargs,
    ):
        super().__init__()
        if lm is None:  # lm-eval's CLI names a directory: this adapter is an entry point, like the CLI
            if pretrained is None:
                raise UserError("lm-eval --model lmforge needs --model_args pretrained=CHECKPOINT_DIR")
            if str(device or "").startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes --device cuda:0 unless told otherwise; like its HF model, fall back
                print(
                    f"lmforge adapter: --device {device} but CUDA is not available; using auto",
                    file=sys.stderr,
                )
                device = "auto"
            lm = load(pretrained, device=device or "auto", dtype=dtype)
        if lm.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer (tokenizer.json); lm-eval needs one")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.batch_size = _int_or_default(batch_size, 8)
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else lm.config.max_seq_len
        self._device = lm.device
        if kwargs:
            print(f"lmforge adapter: ignoring model_args {sorted(kwargs)}", file=sys.stderr)

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0

    @property
    def prefix_token_id(self) -> int:
        pre = prefix_id(self.tokenizer)
        return pre if pre is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"lmforge-{self.tokenizer.hash}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = None if add_special_tokens is not False else False  # None: the tokenizer's own rule
        return self.tokenizer.encode(string, bos=bos, eos=False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out: list[tuple[float, bool]] = []
        step = self.batch_size * 8
        with tqdm(total=len(pairs), desc="lmforge loglikelihood", disable=disable_tqdm) as bar:
            for s in range(0, len(pairs), step):
                res = score_continuations(self.lm.model, pairs[s : s + step], self.batch_size)
                for (key, _, _), r in zip(requests[s : s + step], res):
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, r)
                out.extend(res)
                bar.update(len(res))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="lmforge loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            ids = [self.prefix_token_id, *self.tokenizer.encode(text, bos=False, eos=False)]
            ll = -float(sequence_nll(self.lm.model, ids, seq_len=self.max_length).sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            out.append(ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="lmforge generate_until", disable=disable_tqdm)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks") or kw.get("max_new_tokens") or self.max_gen_toks)
            max_new = min(max_new, self.max_length - 1)
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            seed = kw.get("seed")
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                texts = generate_greedy(
                    self.lm.model,
                    self.tokenizer,
                    [requests[i].args[0] for i in chunk],
                    max_new_tokens=max_new,
                    stop=until,
                    batch_size=self.batch_size,
                    temperature=temperature,
                    seed=seed,
                )
                for i, t in zip(chunk, texts):
                    out[i] = t
                    self.cache_hook.add_partial("generate_until", requests[i].args, t)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        return {
            "model_source": "lmforge",
            "model_name": str(self.lm.path),
            "model_num_parameters": self.lm.model.num_params(),
        }


def register() -> None:
    """Make `--model lmforge` known to lm-eval (done on import; a second import changes nothing)."""
    if "lmforge" not in model_registry:
        register_model("lmforge")(LMForgeLM)


register()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the `lmforge` model registered (this module is imported, so it is)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
