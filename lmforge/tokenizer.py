"""Byte-level BPE tokenizer: training, loading, special tokens, chat template, token byte lengths.

Notable features:
- Trained with the Hugging Face `tokenizers` library (the merge loop is Rust, not ours), GPT-4-style
  pre-tokenization regex, byte-level alphabet so that every string round-trips exactly.
- Saved as `tokenizer.json` + `tokenizer_config.json` (with a Jinja `chat_template`), so the same files
  load in `transformers.AutoTokenizer` and give the same ids, plain text and rendered chat alike.
- Any existing HF `tokenizer.json` loads too (`Tokenizer.load`), byte-level or SentencePiece-style; a
  directory with only a SentencePiece `tokenizer.model` is converted on load by transformers' own
  converter (extra `lmforge[sentencepiece]`).
- BOS/EOS follow the tokenizer's own rule (its tokenizer.json post-processor, as transformers >= 5 does):
  `encode(text)` equals `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`. lmforge's own tokenizers
  write the rule "BOS + text" into their tokenizer.json, since lmforge models are trained on BOS + document.
- `stop_ids()`: the tokenizer's EOS, every `eos_token_id` of config.json / generation_config.json next to
  it, and the chat template's end-of-turn tokens (found by rendering a probe conversation).
- Chat templates from tokenizer_config.json, chat_template.jinja or chat_template.json, rendered in the
  same Jinja environment as transformers (tools, documents, template kwargs such as enable_thinking).
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


# Tokens that end a turn in the chat templates of popular models; those the template itself writes
# join the stop set (Llama-3.1 writes <|eom_id|> only after tool calls, so a probe cannot find it).
_END_OF_TURN_NAMES = [END, "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end_of_turn|>"]
# Keys transformers passes to a chat template (only those the tokenizer sets).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class StopIds(list):
    """Sorted stop ids. Callable (`tok.stop_ids()`, the agreed interface) and a plain list for older
    callers that read `tok.stop_ids` as an attribute; both give the same ids."""

    def __call__(self) -> list[int]:
        return list(self)


def _id_list(value) -> list[int]:
    """config.json writes eos_token_id as an int, a list of ints or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the lmforge conventions: BOS/EOS/PAD, chat template, byte lengths."""

    def __init__(
        self,
        json_text: str,
        config: dict | None = None,
        chat_template: str | dict | None = None,
        *,
        eos_token_ids: Iterable[int] = (),
    ):
        tk = _tokenizers().Tokenizer.from_str(json_text)
        self._tk = tk
        self._json = json_text
        self.config = dict(config or {})
        self.hash = _content_hash(json_text)
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        spec = json.loads(json_text)
        self.special_tokens: dict[str, int] = {
            t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")
        }
        self._added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.bos_id = self._pick("bos_token", _BOS_NAMES)
        self.eos_id = self._pick("eos_token", _EOS_NAMES)
        self.pad_id = self._pick("pad_token", _PAD_NAMES)
        self._prefix, self._suffix = self._special_rule(spec)
        self.chat_templates = self._templates(chat_template, vocab)
        self.model_max_length = int(self.config.get("model_max_length") or 2048)
        if self.model_max_length > 10**9:  # transformers' "no limit" sentinel (1e30)
            self.model_max_length = 2048
        self._token_bytes: np.ndarray | None = None
        self._jinja: dict = {}
        self._config_eos = [int(i) for i in eos_token_ids if 0 <= int(i) < self.vocab_size]
        self._stop: StopIds | None = None

    def _pick(self, key: str, names: list[str]) -> int | None:
        """The id of a named special token: tokenizer_config.json's choice when it makes one (null means
        none: Qwen's bos_token), else the first of the usual names the vocabulary has."""
        if key in self.config:
            name = _token_name(self.config.get(key))
            return None if name is None else self._tk.token_to_id(name)
        for n in names:
            i = self._tk.token_to_id(n)
            if i is not None:
                return i
        return None

    def _special_rule(self, spec: dict) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text that the tokenizer adds on its own (its post-processor).

        transformers >= 5 takes this from tokenizer.json alone (it drops tokenizer_config's
        add_bos_token when a tokenizer.json exists), so we do too. Found by encoding a probe with and
        without special tokens, which covers every post-processor kind without parsing it.
        An lmforge tokenizer saved before the rule was written into tokenizer.json (no post-processor,
        our own <|bos|>) keeps the BOS its models were trained and prompted with.
        """
        if spec.get("post_processor") is None:
            legacy = self.bos_id is not None and self._tk.id_to_token(self.bos_id) == BOS
            return ([self.bos_id] if legacy else []), []
        plain = self._tk.encode("a", add_special_tokens=False).ids
        full = self._tk.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k : k + len(plain)] == plain:
                return full[:k], full[k + len(plain) :]
        return [], []

    @property
    def add_bos(self) -> bool:
        """Whether `encode(text)` starts with BOS (the tokenizer's own rule)."""
        return self.bos_id is not None and self._prefix == [self.bos_id]

    @property
    def add_eos(self) -> bool:
        return self.eos_id is not None and self._suffix == [self.eos_id]

    # ----------------------------------------------------------------------------- load / save
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory with `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`,
        `chat_template.jinja|json`, and the eos ids of `config.json` / `generation_config.json`), a
        directory with only a SentencePiece `tokenizer.model`, or a `tokenizer.json` file."""
        p = Path(path)
        if p.is_dir():
            f = p / "tokenizer.json"
            if not f.is_file() and (p / "tokenizer.model").is_file():
                return cls._from_sentencepiece(p)
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
            config, tpl = cls._side_files(p)
            return cls(f.read_text(encoding="utf-8"), config, tpl, eos_token_ids=cls._eos_from_configs(p))
        except UserError:
            raise
        except Exception as e:  # json errors, and tokenizers raises a plain Exception on a bad file
            raise UserError(f"cannot read the tokenizer in {p}: {e}") from e

    @staticmethod
    def _side_files(p: Path) -> tuple[dict, str | dict | None]:
        """(tokenizer config, chat template) from the files next to tokenizer.json; eos ids are read by
        `_eos_from_configs`. A separate chat_template.jinja wins over the config's entry (as in
        transformers, which now writes the template in its own file)."""
        config = _read_json(p / "tokenizer_config.json")
        for k, v in _read_json(p / "special_tokens_map.json").items():
            config.setdefault(k, v)
        tpl: str | dict | None = None
        if (p / "chat_template.jinja").is_file():
            tpl = (p / "chat_template.jinja").read_text(encoding="utf-8")
        elif (p / "chat_template.json").is_file():
            tpl = _read_json(p / "chat_template.json").get("chat_template")
        return config, tpl

    @classmethod
    def _eos_from_configs(cls, p: Path) -> list[int]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            try:
                ids += _id_list(_read_json(p / name).get("eos_token_id"))
            except (OSError, ValueError):
                pass  # a broken model config is the model loader's to report
        return ids

    @classmethod
    def _from_sentencepiece(cls, p: Path) -> Tokenizer:
        """Convert a SentencePiece-only directory with transformers' own converter (exactly the
        tokenizer transformers builds from it), or say which extra / command makes a tokenizer.json."""
        try:
            import sentencepiece  # noqa: F401
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(
                f"{p} has only a SentencePiece tokenizer.model: install the extra with "
                "`pip install 'lmforge[sentencepiece]' transformers` to convert it on load, or write a "
                'tokenizer.json once with `python -c "from transformers import AutoTokenizer; '
                f"AutoTokenizer.from_pretrained('{p}').save_pretrained('{p}')\"`."
            ) from None
        try:
            hf = AutoTokenizer.from_pretrained(str(p))
            json_text = hf.backend_tokenizer.to_str()
        except Exception as e:
            raise UserError(f"cannot convert the SentencePiece tokenizer.model in {p}: {e}") from e
        config, tpl = cls._side_files(p)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):  # the class defaults it applied
            if key not in config and getattr(hf, key, None) is not None:
                config[key] = str(getattr(hf, key))
        return cls(json_text, config, tpl, eos_token_ids=cls._eos_from_configs(p))

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` (byte for byte as loaded, so the hash survives) and `tokenizer_config.json`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self._json)
        atomic_write_text(
            d / "tokenizer_config.json", json.dumps(self.hf_config(), indent=2, ensure_ascii=False)
        )

    def hf_config(self) -> dict:
        """`tokenizer_config.json` for transformers, stating the BOS/EOS rule (add_bos_token) we follow.

        Settings of a loaded tokenizer's own config (a Llama's tokenizer_class, say) are kept.
        """
        cfg = dict(self.config)
        names = {i: t for t, i in self._tk.get_vocab(with_added_tokens=True).items()}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None and _token_name(cfg.get(key)) is None and key not in cfg:
                cfg[key] = names[i]
        defaults = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
        }
        for k, v in defaults.items():
            cfg.setdefault(k, v)
        cfg["add_bos_token"], cfg["add_eos_token"] = self.add_bos, self.add_eos
        if len(self.chat_templates) > 1:
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        elif self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    # ----------------------------------------------------------------------------- encode / decode
    def encode(
        self, text: str, bos: bool | None = None, eos: bool | None = None, *, special: bool = True
    ) -> list[int]:
        """Ids of `text`. bos/eos None (the default) follow the tokenizer's own rule, so the ids equal
        `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`; True/False force BOS/EOS on or off.

        `special=True` (as transformers does) turns special-token text such as "<|user|>" into that
        token; `special=False` encodes it as plain text, which is what `data prepare` does with
        documents so that no document can inject a role marker.
        """
        with self._special(special):
            ids = self._tk.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a text prompt for generation: the tokenizer's BOS rule, never a trailing EOS."""
        return self.encode(text, eos=False)

    def encode_batch(
        self, texts: list[str], bos: bool | None = None, eos: bool | None = None, *, special: bool = True
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

    def _wrap(self, ids: list[int], bos: bool | None, eos: bool | None) -> list[int]:
        if bos is None:
            pre = self._prefix
        elif bos:
            if self.bos_id is None:
                raise UserError("this tokenizer has no BOS token; encode with bos=False.")
            pre = [self.bos_id]
        else:
            pre = []
        if eos is None:
            post = self._suffix
        elif eos:
            if self.eos_id is None:
                raise UserError("this tokenizer has no EOS token; encode with eos=False.")
            post = [self.eos_id]
        else:
            post = []
        return [*pre, *ids, *post] if pre or post else ids

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
    def stop_ids(self) -> StopIds:
        """Every id that ends generation: EOS, the eos_token_id lists of config.json and
        generation_config.json, and the chat template's end-of-turn tokens. `tok.stop_ids()` or
        `tok.stop_ids` (a list either way)."""
        if self._stop is None:
            ids = {self.eos_id, *self._config_eos, *self._template_end_ids()}
            self._stop = StopIds(sorted(i for i in ids if i is not None))
        return self._stop

    def _template_end_ids(self) -> set[int]:
        """End-of-turn tokens of the chat template: the token the template writes right after an
        assistant message (rendered on a probe conversation), and the usual names it writes literally."""
        src = "\n".join(self.chat_templates.values())
        out = {self._added[n] for n in _END_OF_TURN_NAMES if n in self._added and n in src}
        if not src:
            return out
        probe = "lmforgeprobe"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
        try:
            text = self.apply_chat_template(msgs)
        except Exception:  # a template with its own demands (a system message first, say): names only
            return out
        rest = text[text.rfind(probe) + len(probe) :] if probe in text else ""
        for tok in sorted(self.special_tokens, key=len, reverse=True):  # special: never a plain "\n"
            if tok.strip() and rest.startswith(tok):
                out.add(self.special_tokens[tok])
                break
        return out

    def end_markers(self) -> list[str]:
        """Texts of the stop tokens, longest first (SFT masks end an assistant turn at one of them)."""
        names = {self._tk.id_to_token(i) for i in self.stop_ids}
        return sorted((n for n in names if n), key=len, reverse=True)

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
    def _templates(self, given: str | dict | list | None, vocab: dict) -> dict[str, str]:
        """Named chat templates ("default", and "tool_use" where a tokenizer ships one)."""
        tpl = given if given is not None else self.config.get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...] as transformers writes it
            tpl = {t["name"]: t["template"] for t in tpl if isinstance(t, dict) and "name" in t}
        if isinstance(tpl, str):
            tpl = {"default": tpl}
        tpl = {k: v for k, v in (tpl or {}).items() if isinstance(v, str) and v}
        if not tpl and all(t in vocab for t in (USER, ASSISTANT, END)):
            tpl = {"default": CHAT_TEMPLATE}
        return tpl

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default") or next(iter(self.chat_templates.values()), None)

    def template_for(self, tools=None) -> str:
        """The chat template source that renders a request with (or without) `tools`: the "tool_use"
        template where the tokenizer has one and tools are given, else the default."""
        if not self.chat_templates:
            raise UserError(
                "this tokenizer has no chat template (tokenizer_config.json has no chat_template, there is "
                "no chat_template.jinja, and the vocabulary has no <|user|>/<|assistant|>/<|end|> markers). "
                "Train one with `lmforge tokenizer train` or add a chat_template to tokenizer_config.json."
            )
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        return self.chat_template

    def template_variables(self) -> dict:
        """The special-token names a template sees (`bos_token`, ...), only those the tokenizer sets."""
        out = {}
        for key in _SPECIAL_KEYS:
            name = _token_name(self.config.get(key))
            if name is None and key not in self.config:
                i = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}.get(key)
                name = self._tk.id_to_token(i) if i is not None else None
            if name is not None:
                out[key] = name
        return out

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs,
    ) -> str:
        """Render a conversation to text with the Jinja chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` does: the same environment and variables (special
        tokens, `tools`, `documents`, `add_generation_prompt`, and any template kwargs such as
        `enable_thinking=False`); keys whose value is None are dropped from each message."""
        return self._render(messages, add_generation_prompt, tools, documents, template_kwargs)[0]

    def _render(
        self, messages, add_generation_prompt, tools, documents, template_kwargs, track: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """(text, spans): spans are the character ranges inside `{% generation %}` blocks when `track`."""
        source = self.template_for(tools)
        if source not in self._jinja:
            self._jinja[source] = _compile_template(source)
        template = self._jinja[source]
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise UserError("tools must be JSON schemas (dicts in the OpenAI 'tools' shape)")
        variables = {**self.template_variables(), **template_kwargs}
        msgs = [_normalize_message(m) for m in messages]
        try:
            text = template.render(
                messages=msgs,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                _lmforge_track=track,
                **variables,
            )
        except UserError:
            raise
        except Exception as e:  # jinja errors: undefined fields, bad message dicts
            raise UserError(f"cannot render the chat template: {e}") from e
        return _split_generation_marks(text) if track else (text, [])

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs,
    ) -> list[int]:
        """Ids of the rendered conversation, as transformers' `apply_chat_template(..., tokenize=True)`:
        the template writes BOS itself, so no special tokens are added around it."""
        text = self.apply_chat_template(
            messages, add_generation_prompt, tools=tools, documents=documents, **template_kwargs
        )
        return self.encode(text, bos=False, eos=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash}, specials={len(self.special_tokens)})"
        )


# Private-use characters that bracket `{% generation %}` output while tracking (stripped afterwards).
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"


def _normalize_message(m) -> dict:
    """As transformers: None-valued keys dropped (OpenAI clients send content=None with tool_calls),
    reasoning under its usual names aliased to `reasoning_content` and `thinking`."""
    if not isinstance(m, dict):
        raise UserError(f"a chat message is not a dict: {str(m)[:80]}")
    m = {k: v for k, v in m.items() if v is not None}
    reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
    if reasoning is not None:
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    return m


def _split_generation_marks(text: str) -> tuple[str, list[tuple[int, int]]]:
    out, spans, start, n = [], [], None, 0
    for ch in text:
        if ch == _GEN_OPEN:
            start = n
        elif ch == _GEN_CLOSE:
            spans.append((start if start is not None else n, n))
            start = None
        else:
            out.append(ch)
            n += 1
    return "".join(out), spans


@lru_cache(maxsize=32)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body;
        when the caller tracks, brackets it with private-use marks that `_split_generation_marks` turns
        into character spans."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            track = jinja2.nodes.Name("_lmforge_track", "load")
            return jinja2.nodes.CallBlock(self.call_method("_mark", [track]), [], [], body).set_lineno(lineno)

        def _mark(self, track, caller):
            body = caller()
            return f"{_GEN_OPEN}{body}{_GEN_CLOSE}" if track else body

    def raise_exception(message):
        raise UserError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps, as transformers.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    # Same environment settings as transformers, so both render the same text.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
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
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

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
    # The BOS rule, written where transformers reads it: lmforge trains on BOS + document, so a text
    # prompt starts with BOS (`AutoTokenizer(dir)(text)` and `encode(text)` alike). Chat ids come from
    # the template, which writes BOS itself, and are encoded without special tokens.
    tk.post_processor = (
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, tk.token_to_id(BOS))]
        )
        if BOS in specials
        else None
    )
    config = {"model_max_length": model_max_length}
    for key, name in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        if name in specials:
            config[key] = name
    return Tokenizer(tk.to_str(pretty=True), config, CHAT_TEMPLATE if END in specials else None)


def compression(tokenizer: Tokenizer, texts: Iterable[str]) -> dict:
    """Bytes per token over `texts`: higher means the tokenizer compresses better."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts, bos=False, eos=False))
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}


def print_encoding(text: str, *, tokenizer: str) -> list[int]:
    """Print how `tokenizer` splits `text` (ids, tokens, bytes per token); return the ids.

    Args:
        text: text to encode
        tokenizer: directory with tokenizer.json (or the file itself)
    """
    tok = Tokenizer.load(tokenizer)
    ids = tok.encode(text)
    print(f"{len(ids)} tokens, {len(text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token")
    print("ids:   ", ids)
    print("tokens:", [tok.decode([i]) for i in ids])
    return ids
