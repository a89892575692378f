"""Run an exported GGUF file in llama.cpp: tokenize, logits for every prompt position, greedy decoding.

    from lmforge.export.llama_cpp import LlamaCpp
    with LlamaCpp("model.gguf", n_ctx=128) as llm:
        ids = llm.tokenize("def add(a, b):")      # no BOS, special tokens not parsed
        logits = llm.eval(ids)                    # (len(ids), vocab) float32, one row per position
        new = llm.greedy(ids, 16)                 # 16 argmax tokens after ids
    quantize("model-f32.gguf", "model-q4_k_m.gguf", "q4_k_m")   # llama.cpp's own quantizer
    chat_template_apply(template, messages)       # llama.cpp's built-in chat formatting

llama.cpp comes from the prebuilt `llama-cpp-py-sync` wheel (pip install "lmforge[llama]"): CFFI
bindings generated from llama.h over llama.cpp's own shared libraries, so nothing is compiled. Its
high-level class asks for the last position's logits only, so this file drives the C API directly
(about what llama.cpp's examples/simple does). The KV cache is f32 by default, so that a comparison
with lmforge differs only by the kernels. Importing this module needs nothing; LlamaCpp needs the
package.
"""

from __future__ import annotations

import os

import numpy as np

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
PACKAGE = "llama-cpp-py-sync"


class LlamaCppUnavailable(ImportError):
    """llama-cpp-py-sync is not installed, or its shared libraries do not load on this system."""


def _bindings():
    """(ffi, lib) of llama-cpp-py-sync, or LlamaCppUnavailable saying what to do."""
    try:
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib
    except ImportError as e:
        raise LlamaCppUnavailable(f'llama.cpp needs {PACKAGE}: pip install "lmforge[llama]" ({e})') from e
    try:
        return get_ffi(), get_lib()
    except (RuntimeError, OSError) as e:
        msg = str(e)
        if "GLIBC_2.38" in msg:  # the wheel's libraries want glibc >= 2.38 for four C23 functions
            msg = (
                f"{PACKAGE}'s prebuilt libraries need glibc 2.38 and this system has "
                f"{os.confstr('CS_GNU_LIBC_VERSION')}: run `python scripts/llama_cpp_glibc.py` once "
                "(make test does), see docs/export.md"
            )
        raise LlamaCppUnavailable(f"llama.cpp does not load: {msg}") from e


_log: list[str] = []  # llama.cpp's warnings and errors, kept to explain a failed load
_log_callback = None  # the C callback must outlive every call into llama.cpp


def _quiet(ffi, lib) -> None:
    """Route llama.cpp's log (chatty on every load) into `_log` instead of stderr."""
    global _log_callback
    if _log_callback is None:

        @ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def keep(level, text, _user):
            if level >= 3:  # GGML_LOG_LEVEL_WARN, _ERROR, _CONT
                _log.append(ffi.string(text).decode("utf-8", "replace"))
                del _log[:-50]

        _log_callback = keep
        lib.llama_log_set(keep, ffi.NULL)


class LlamaCpp:
    """One GGUF model and one context in llama.cpp: `n_seq` sequences (1: `eval` and `greedy`; more:
    `greedy_batch`, several decoded together) of up to `n_ctx` tokens each."""

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int = 512,
        n_threads: int | None = None,
        kv_type: int = GGML_TYPE_F32,
        n_seq: int = 1,
    ):
        self.ffi, self.lib = _bindings()
        ffi, lib = self.ffi, self.lib
        self.model = self.ctx = None
        _quiet(ffi, lib)
        lib.llama_backend_init()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        del _log[:]
        self.model = lib.llama_model_load_from_file(os.fsencode(path), mp)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}: {''.join(_log).strip()}")
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = cp.n_ubatch = max(n_ctx, n_seq)  # a whole prompt, or a token of every sequence
        cp.n_seq_max = n_seq
        # kv_unified stays off (llama.cpp's default): each sequence attends over its own n_ctx cells,
        # 1.2-2.7x faster at 8-32 sequences here than one unified buffer whose cells all are masked
        cp.n_threads = cp.n_threads_batch = n_threads or os.cpu_count() or 1
        cp.type_k = cp.type_v = kv_type
        cp.flash_attn_type = 0  # disabled: the plain attention path, as llama-cpp-python's default
        cp.embeddings = False
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if self.ctx == ffi.NULL:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context for {path}: {''.join(_log).strip()}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.n_seq = n_seq
        self.n_past = 0  # tokens in the KV cache (sequence 0)

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """llama.cpp's tokenization of `text` (by default: no BOS, special-token text not parsed)."""
        b = text.encode()
        n = len(b) + 8
        buf = self.ffi.new("llama_token[]", n)
        got = self.lib.llama_tokenize(self.vocab, b, len(b), buf, n, add_special, parse_special)
        if got < 0:  # -got is the size needed
            buf = self.ffi.new("llama_token[]", -got)
            got = self.lib.llama_tokenize(self.vocab, b, len(b), buf, -got, add_special, parse_special)
        return list(buf[0:got])

    def detokenize(
        self, tokens: list[int], remove_special: bool = False, unparse_special: bool = True
    ) -> str:
        """llama.cpp's text for `tokens` (by default special tokens are written out, none dropped)."""
        arr = self.ffi.new("llama_token[]", list(tokens) or [0])
        n = 16 * len(tokens) + 16
        for _ in range(2):
            buf = self.ffi.new("char[]", n)
            got = self.lib.llama_detokenize(
                self.vocab, arr, len(tokens), buf, n, remove_special, unparse_special
            )
            if got >= 0:
                return self.ffi.unpack(buf, got).decode("utf-8", "replace")
            n = -got
        raise RuntimeError("llama_detokenize failed")

    def piece_bytes(self, tokens: list[int]) -> bytes:
        """The bytes llama.cpp outputs for `tokens` one at a time (llama_token_to_piece, as a runtime
        streams generated text; special tokens written out)."""
        out = b""
        buf = self.ffi.new("char[]", 256)
        for t in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, t, buf, 256, 0, True)
            out += self.ffi.unpack(buf, max(n, 0))
        return out

    def special_ids(self) -> dict[str, int | bool]:
        """The vocabulary's bos/eos/eot ids (-1: none) and whether llama.cpp adds BOS/EOS to a prompt."""
        lib, v = self.lib, self.vocab
        return {
            "bos": lib.llama_vocab_bos(v),
            "eos": lib.llama_vocab_eos(v),
            "eot": lib.llama_vocab_eot(v),
            "add_bos": bool(lib.llama_vocab_get_add_bos(v)),
            "add_eos": bool(lib.llama_vocab_get_add_eos(v)),
        }

    def is_eog(self, token: int) -> bool:
        """Whether llama.cpp ends generation at `token` (end of generation: EOS, EOT, ...)."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF file (tokenizer.chat_template), or None."""
        p = self.lib.llama_model_chat_template(self.model, self.ffi.NULL)
        return None if p == self.ffi.NULL else self.ffi.string(p).decode()

    def reset(self) -> None:
        """Empty the KV cache: the next eval starts at position 0."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Run (token, position, sequence, wants logits) entries through llama_decode, n_batch at a
        time; returns the logits (float32, (n_vocab,)) of the entries that want them, in order."""
        rows = []
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            batch = self.lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, (t, pos, seq, want) in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, want
                    batch.seq_id[i][0] = seq
                rc = self.lib.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed ({rc}): {''.join(_log).strip()}")
                for i, (*_, want) in enumerate(chunk):
                    if want:
                        p = self.lib.llama_get_logits_ith(self.ctx, i)
                        rows.append(np.frombuffer(self.ffi.buffer(p, 4 * self.n_vocab), np.float32).copy())
            finally:
                self.lib.llama_batch_free(batch)
        return rows

    def eval(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        """Append `tokens` to the sequence; returns the logits (float32) of every new position,
        (len(tokens), n_vocab), or only of the last one, (1, n_vocab), when all_logits is False."""
        if not tokens:
            raise ValueError("eval: no tokens")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ValueError(f"eval: {self.n_past} + {len(tokens)} tokens exceed the context of {self.n_ctx}")
        n = len(tokens)
        rows = self._decode([(t, self.n_past + i, 0, all_logits or i == n - 1) for i, t in enumerate(tokens)])
        self.n_past += n
        return np.stack(rows)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """`n` tokens after `prompt`, each the argmax of the previous position's logits (from an empty
        cache; the prompt is one batch, then one token per step, as a runtime generates)."""
        return self.greedy_batch([prompt], n)[0]

    def greedy_batch(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """`n` greedy tokens after each of the prompts, decoded together as sequences 0, 1, ... of one
        cache (from empty): each prompt prefilled in its own batch, then one batch per step holding the
        next token of every sequence, as llama.cpp's batched examples (llama-batched-bench) do."""
        if not 0 < len(prompts) <= self.n_seq:
            raise ValueError(f"greedy_batch: 1 to {self.n_seq} prompts (n_seq), not {len(prompts)}")
        self.reset()
        last = [
            self._decode([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])[0]
            for s, p in enumerate(prompts)
        ]
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(n):
            for s, logits in enumerate(last):
                out[s].append(int(np.argmax(logits)))
            if step < n - 1:
                last = self._decode(
                    [(o[-1], len(p) + step, s, True) for s, (p, o) in enumerate(zip(prompts, out))]
                )
        self.n_past = len(prompts[0]) + n - 1  # sequence 0's length, where `eval` would continue it
        return out

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "lib", None) is not None:
            self.close()


def quantize(
    src: str | os.PathLike, dst: str | os.PathLike, qtype: str, imatrix=None, n_threads: int = 0
) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`, as the llama-quantize tool runs it) from the f32/f16
    GGUF `src` to `dst` with type `qtype` (a key of lmforge.export.QUANT_TYPES: q4_0, q4_k_m, ...).
    imatrix: {GGUF tensor name: (in_features,) float32 mean squared activations} or None."""
    from lmforge.export.targets import QUANT_TYPES

    ffi, lib = _bindings()
    _quiet(ffi, lib)
    lib.llama_backend_init()
    p = lib.llama_model_quantize_default_params()
    p.ftype = QUANT_TYPES[qtype]
    p.nthread = n_threads
    keep = []  # the C strings and arrays must outlive the call
    if imatrix:
        entries = ffi.new("struct llama_model_imatrix_data[]", len(imatrix) + 1)  # NULL-name terminated
        for i, (name, values) in enumerate(imatrix.items()):
            cname = ffi.new("char[]", name.encode())
            data = ffi.new("float[]", [float(x) for x in np.asarray(values, np.float32)])
            keep += [cname, data]
            entries[i].name, entries[i].data, entries[i].size = cname, data, len(values)
        entries[len(imatrix)].name = ffi.NULL
        p.imatrix = entries
        keep.append(entries)
    del _log[:]
    rc = lib.llama_model_quantize(
        os.fsencode(src), os.fsencode(dst), ffi.new("llama_model_quantize_params *", p)
    )
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype}: {''.join(_log).strip()}")


def chat_template_apply(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """llama.cpp's own rendering of `messages` ([{"role", "content"}]) with `template` (a Jinja chat
    template it recognises, or a built-in name such as "chatml"), as llama_chat_apply_template does."""
    ffi, lib = _bindings()
    keep = [ffi.new("char[]", template.encode())]
    chat = ffi.new("llama_chat_message[]", len(messages))
    for i, m in enumerate(messages):
        role, content = ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())
        keep += [role, content]
        chat[i].role, chat[i].content = role, content
    n = 4 * sum(len(m["content"]) + 32 for m in messages) + 256
    for _ in range(2):
        buf = ffi.new("char[]", n)
        got = lib.llama_chat_apply_template(keep[0], chat, len(messages), add_generation_prompt, buf, n)
        if got < 0:
            raise ValueError("llama.cpp does not recognise this chat template")
        if got <= n:
            return ffi.unpack(buf, got).decode("utf-8")
        n = got
    raise RuntimeError("llama_chat_apply_template: output kept growing")
