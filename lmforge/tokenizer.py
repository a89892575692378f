"""Byte-level BPE tokenizer: training, loading, special tokens, chat template, token byte lengths.

Notable features:
- Trained with the Hugging Face `tokenizers` library (the merge loop is Rust, not ours), GPT-4-style
  pre-tokenization regex, byte-level alphabet so that every string round-trips exactly.
- Saved as `tokenizer.json` + `tokenizer_config.json` (with a Jinja `chat_template`), so the same files
  load in `transformers.AutoTokenizer` and give the same ids, plain text and rendered chat alike.
- Any existing HF `tokenizer.json` loads too (`Tokenizer.load`), byte-level or SentencePiece-style.
- `token_bytes()` gives each token's UTF-8 length (special tokens 0), the denominator of bits-per-byte.
- `hash` is a content hash of `tokenizer.json`; token shards carry it so that a mismatch is caught.
- `stream_decoder()` turns a token stream into text without ever emitting half a UTF-8 character.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from lmforge.utils import UserError, atomic_write_text

# GPT-4 (cl100k) split pattern: letters, 1-3 digit groups, punctuation runs and whitespace are split
# apart before BPE, so merges never cross a word/number/punctuation boundary.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]

# One turn is `<|role|>content<|end|>`; the conversation starts with BOS. No newlines around markers:
# special tokens already separate the turns, and a stray "\n" would be a token of unclear ownership.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Names other tokenizers use, tried in order when tokenizer_config.json does not say.
_BOS_NAMES = [BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"]
_EOS_NAMES = [EOS, "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"]
_PAD_NAMES = [PAD, "<pad>", "<|finetune_right_pad_id|>"]


def _tokenizers():
    import tokenizers  # imported lazily: tokenizer.py is imported by light commands too

    return tokenizers


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_name(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _content_hash(json_text: str) -> str:
    """Hash of the parsed JSON (key order and whitespace do not matter), 16 hex digits."""
    canon = json.dumps(json.loads(json_text), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text completed by that token.

    It decodes a short window of recent tokens and emits only the new suffix, holding back while the
    window ends in an incomplete UTF-8 sequence (decoded as U+FFFD). Decoding a window that starts one
    emitted chunk back keeps SentencePiece-style decoders from dropping a leading space.
    `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []  # the last emitted chunk (context), then tokens not yet emitted
        self._read = 0  # ids[:read] were emitted

    def _pending(self) -> str:
        """Text of the tokens not yet emitted, decoded in the context of the last emitted chunk."""
        prefix_text = self._tok.decode(self._ids[: self._read], skip_special=self._skip)
        return self._tok.decode(self._ids, skip_special=self._skip)[len(prefix_text) :]

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        out = self._pending()
        if not out or out.endswith("\ufffd"):
            return ""  # nothing yet, or a character still incomplete
        del self._ids[: self._read]  # keep only the chunk just emitted as context
        self._read = len(self._ids)
        return out

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as `decode` would)."""
        out = self._pending()
        self._ids, self._read = [], 0
        return out


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the lmforge conventions: BOS/EOS/PAD, chat template, byte lengths."""

    def __init__(self, json_text: str, config: dict | None = None, chat_template: str | None = None):
        tk = _tokenizers().Tokenizer.from_str(json_text)
        self._tk = tk
        self._json = json_text
        self.config = dict(config or {})
        self.hash = _content_hash(json_text)
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self.special_tokens: dict[str, int] = {
            t["content"]: t["id"] for t in json.loads(json_text).get("added_tokens", []) if t.get("special")
        }
        self.bos_id = self._pick("bos_token", _BOS_NAMES)
        self.eos_id = self._pick("eos_token", _EOS_NAMES)
        self.pad_id = self._pick("pad_token", _PAD_NAMES)
        tpl = chat_template or self.config.get("chat_template")
        if isinstance(tpl, list):  # older transformers: [{"name": "default", "template": ...}, ...]
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        if not tpl and all(t in vocab for t in (USER, ASSISTANT, END)):
            tpl = CHAT_TEMPLATE
        self.chat_template: str | None = tpl
        self.model_max_length = int(self.config.get("model_max_length") or 2048)
        self._token_bytes: np.ndarray | None = None
        self._jinja = None

    def _pick(self, key: str, names: list[str]) -> int | None:
        name = _token_name(self.config.get(key))
        if name is not None:
            return self._tk.token_to_id(name)
        for n in names:
            i = self._tk.token_to_id(n)
            if i is not None:
                return i
        return None

    # ----------------------------------------------------------------------------- load / save
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory with `tokenizer.json` (+ `tokenizer_config.json`) or a `tokenizer.json` file."""
        p = Path(path)
        if p.is_dir():
            f = p / "tokenizer.json"
            if not f.is_file():
                raise UserError(
                    f"{p} has no tokenizer.json. Train one with `lmforge tokenizer train --out {p}` "
                    "or point at a Hugging Face model directory that has one."
                )
        elif p.is_file():
            f, p = p, p.parent
        else:
            raise UserError(f"tokenizer {path} does not exist (expected a directory with tokenizer.json).")
        try:
            text = f.read_text(encoding="utf-8")
            config = {}
            if (p / "tokenizer_config.json").is_file():
                config = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
            tpl = None
            if (p / "chat_template.jinja").is_file():  # transformers >= 4.47 may save it separately
                tpl = (p / "chat_template.jinja").read_text(encoding="utf-8")
            return cls(text, config, tpl)
        except UserError:
            raise
        except Exception as e:  # json errors, and tokenizers raises a plain Exception on a bad file
            raise UserError(f"cannot read the tokenizer in {p}: {e}") from e

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` (byte for byte as loaded, so the hash survives) and `tokenizer_config.json`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self._json)
        atomic_write_text(
            d / "tokenizer_config.json", json.dumps(self.hf_config(), indent=2, ensure_ascii=False)
        )

    def hf_config(self) -> dict:
        """`tokenizer_config.json` for transformers: no automatic BOS (our template and callers add it).

        Settings of a loaded tokenizer's own config (a Llama's tokenizer_class, say) are kept.
        """
        cfg = dict(self.config)
        names = {i: t for t, i in self._tk.get_vocab(with_added_tokens=True).items()}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None and _token_name(cfg.get(key)) is None:
                cfg[key] = names[i]
        defaults = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.model_max_length,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        for k, v in defaults.items():
            cfg.setdefault(k, v)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    # ----------------------------------------------------------------------------- encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False, *, special: bool = True) -> list[int]:
        """Ids of `text`, with BOS/EOS only when asked for.

        `special=True` (as transformers does) turns special-token text such as "<|user|>" into that
        token; `special=False` encodes it as plain text, which is what `data prepare` does with
        documents so that no document can inject a role marker.
        """
        with self._special(special):
            ids = self._tk.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: list[str], bos: bool = False, eos: bool = False, *, special: bool = True
    ) -> list[list[int]]:
        """Encode many texts at once (the Rust side uses all cores unless TOKENIZERS_PARALLELISM=false)."""
        enc = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)  # _fast skips offsets
        with self._special(special):
            out = enc(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in out]

    @contextlib.contextmanager
    def _special(self, special: bool):
        if special:
            yield
            return
        self._tk.encode_special_tokens = True  # split special-token text like any other text
        try:
            yield
        finally:
            self._tk.encode_special_tokens = False

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise UserError("this tokenizer has no BOS token; encode with bos=False.")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise UserError("this tokenizer has no EOS token; encode with eos=False.")
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and (start, end) character offsets of each token, for loss masks over rendered chat."""
        e = self._tk.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def decode(self, ids, skip_special: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end generation: EOS and the end-of-turn marker when there is one."""
        ids = [self.eos_id, self._tk.token_to_id(END)]
        return sorted({i for i in ids if i is not None})

    # ----------------------------------------------------------------------------- bits per byte
    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int32: UTF-8 bytes each token stands for; special tokens count 0."""
        if self._token_bytes is None:
            self._token_bytes = self._compute_token_bytes()
        return self._token_bytes

    def _compute_token_bytes(self) -> np.ndarray:
        spec = json.loads(self._json)
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
            spec.get("pre_tokenizer")
        )
        dec = _byte_decoder()
        out = np.zeros(self.vocab_size, dtype=np.int32)
        special = set(self.special_tokens.values())
        added = {t["id"] for t in spec.get("added_tokens", [])}
        for tok, i in self._tk.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            if i in added:  # non-special added tokens are matched as literal text
                out[i] = len(tok.encode("utf-8"))
            elif byte_level and all(c in dec for c in tok):
                out[i] = len(tok)  # one character per byte
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out[i] = 1  # SentencePiece byte fallback
            else:
                out[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
        return out

    # ----------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation to text with the Jinja chat template (as transformers would)."""
        if not self.chat_template:
            raise UserError(
                "this tokenizer has no chat template (tokenizer_config.json has no chat_template and "
                "the vocabulary has no <|user|>/<|assistant|>/<|end|> markers). Train one with "
                "`lmforge tokenizer train` or add a chat_template to tokenizer_config.json."
            )
        if self._jinja is None:
            self._jinja = _compile_template(self.chat_template)
        names = {k: _token_name(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if names[key] is None and i is not None:
                names[key] = self._tk.id_to_token(i)
        try:
            return self._jinja.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **{k: v or "" for k, v in names.items()},
            )
        except UserError:
            raise
        except Exception as e:  # jinja errors: undefined fields, bad message dicts
            raise UserError(f"cannot render the chat template: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Ids of the rendered conversation. The template writes BOS itself, so none is added here."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash}, specials={len(self.special_tokens)})"
        )


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UserError(f"chat template: {message}")

    # Same environment settings as transformers, so both render the same text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"the chat template does not parse: {e}") from e


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: list[str] | None = None,
    min_frequency: int = 0,
    model_max_length: int = 2048,
    pattern: str = SPLIT_PATTERN,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `documents` (streamed once; only word counts are kept).

    The vocabulary is: special tokens (ids 0..n-1), the 256 byte tokens, then merges in learned order.
    A corpus too small to learn `vocab_size - 256 - n` merges gives a smaller vocabulary.
    """
    tk_mod = _tokenizers()
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    need = 256 + len(specials)
    if vocab_size < need:
        raise UserError(
            f"vocabulary size {vocab_size} is too small: the 256 byte tokens and {len(specials)} special "
            f"tokens need {need}. Use --vocab-size {need} or more (a few thousand is typical)."
        )
    tk = tk_mod.Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = None  # BOS/EOS are added explicitly, never behind the caller's back
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
    )
    count = [0]

    def docs() -> Iterator[str]:
        for d in documents:
            count[0] += 1
            yield d

    tk.train_from_iterator(docs(), trainer)
    if count[0] == 0:
        raise UserError("no documents to train the tokenizer on; check --data.")
    config = {"model_max_length": model_max_length}
    for key, name in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        if name in specials:
            config[key] = name
    return Tokenizer(tk.to_str(pretty=True), config, CHAT_TEMPLATE if END in specials else None)


def compression(tokenizer: Tokenizer, texts: Iterable[str]) -> dict:
    """Bytes per token over `texts`: higher means the tokenizer compresses better."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}
