"""Text sources: one interface, `iter_documents(spec)`, yielding `Document(text, id)` one at a time.

A spec is one of:
- `python-docs`                 the embedded corpus (CPython's own documentation, built locally)
- `python-stdlib`, `embedded`   CPython's standard-library source; both embedded corpora (embedded.py)
- `c4`                          `allenai/c4`, config `en`, streamed from the Hugging Face hub
- `hf:owner/name[:config][@split]`  any hub dataset, streamed (needs `datasets` and a network)
- a file, a folder (searched recursively) or a glob of: `.txt`/`.md`/`.rst` (a file is a document),
  `.json`/`.jsonl`/`.ndjson` (one record per line, or a JSON array; the text is `text_field`),
  `.parquet` (column `text_field`), any of those compressed as `.gz` or `.zst`,
  and C4-format shards (`c4-*.json.gz`: JSON lines with `text`, `url`, `timestamp`).

Everything streams, so memory does not grow with the corpus or with one file: text files are read in
blocks (a file larger than TEXT_BLOCK is cut into documents of at most that size, at blank lines),
JSON lines one line at a time, a JSON array one item at a time (`_json_array_items`), Parquet in
record batches. Bad input is counted in `SourceStats` rather than silently dropped:
invalid UTF-8 is replaced (U+FFFD) and counted, malformed JSON lines are skipped and listed with their
line numbers (or raise with `strict=True`), empty files and empty documents are counted.
"""

from __future__ import annotations

import codecs
import glob as globlib
import gzip
import io
import json
import os
import re
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from lmforge.data.document import Document
from lmforge.data.embedded import is_embedded, iter_embedded
from lmforge.utils import UserError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd"}
HUB_ALIASES = {"c4": "hf:allenai/c4:en"}
# A text file larger than this is cut into documents of at most this size (after the last blank line
# that fits; failing that, the last newline; failing that, a character boundary), so that neither the
# reader nor a tokenizer worker ever holds one huge file (a book, a dump) whole: tokenizing a document
# costs ~130 bytes of worker memory per byte of text, so 1 MiB documents keep a worker under ~300 MB.
TEXT_BLOCK = 1 << 20
READ_BLOCK = 1 << 20  # bytes read at a time from a text or JSON-array file

LOCAL_HINT = (
    "Local alternatives: `--data python-docs` (built in, no network), a folder of C4 shards "
    "(c4-*.json.gz, e.g. `--data ~/c4/en/`), or your own .txt/.md/.jsonl/.parquet files, folders or globs."
)


@dataclass
class SourceStats:
    """What the readers saw, for the summary printed after `data prepare` / `tokenizer train`."""

    files: int = 0
    documents: int = 0
    empty_files: list[str] = field(default_factory=list)
    empty_documents: int = 0
    invalid_utf8: int = 0  # documents (or lines) in which invalid bytes were replaced
    malformed: int = 0  # JSON lines that did not parse or were not objects
    missing_field: int = 0  # records without the text field (after the first had it)
    examples: list[str] = field(default_factory=list)  # "file:line: what", the first few problems

    def note(self, where: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(where)

    def summary(self) -> list[str]:
        lines = []
        if self.empty_files:
            shown = ", ".join(self.empty_files[:3]) + (" ..." if len(self.empty_files) > 3 else "")
            lines.append(f"{len(self.empty_files)} empty file(s) skipped: {shown}")
        if self.empty_documents:
            lines.append(f"{self.empty_documents} empty document(s) skipped")
        if self.invalid_utf8:
            lines.append(f"{self.invalid_utf8} document(s)/line(s) had invalid UTF-8 (replaced with U+FFFD)")
        if self.malformed:
            lines.append(
                f"{self.malformed} malformed JSON line(s) skipped (use --strict to stop at the first)"
            )
        if self.missing_field:
            lines.append(f"{self.missing_field} record(s) without the text field skipped")
        lines += [f"  {e}" for e in self.examples]
        return lines


def _decode(raw: bytes, stats: SourceStats, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.invalid_utf8 += 1
        stats.note(f"{where}: invalid UTF-8 at byte {e.start}, replaced")
        return raw.decode("utf-8", errors="replace")


def _clean_surrogates(text: str, stats: SourceStats, where: str) -> str:
    """JSON may escape lone surrogates (\\ud800) that no UTF-8 encoder accepts: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        stats.invalid_utf8 += 1
        stats.note(f"{where}: lone surrogate, replaced")
        return text.encode("utf-8", errors="replace").decode("utf-8")


# ------------------------------------------------------------------------------------------ files
def _open_binary(path: Path):
    """A binary file object, transparently decompressing .gz and .zst."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix in (".zst", ".zstd"):
        import zstandard

        # BufferedReader gives the decompressor line iteration, which it lacks on its own.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def file_kind(path: Path) -> str | None:
    """'text', 'json' or 'parquet' from the name (looking through .gz/.zst), None when unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in TEXT_SUFFIXES:
        return "text"
    if last in JSON_SUFFIXES:
        return "json"
    if last in PARQUET_SUFFIXES and path.suffix.lower() not in COMPRESSED_SUFFIXES:
        return "parquet"
    return None


def cut_text(buf: bytes | bytearray, limit: int) -> int:
    """Where the next document of a text file longer than `limit` bytes ends: after the last blank line
    within `limit`; failing that, after the last newline; failing that, at the start of the UTF-8
    character that `limit` falls in. Always in (0, limit]."""
    cut = buf.rfind(b"\n\n", 0, limit) + 2
    if cut < 2:
        cut = buf.rfind(b"\n", 0, limit) + 1
    if cut < 1:
        cut = limit
        while cut > 0 and 0x80 <= buf[cut] < 0xC0:  # a continuation byte: step back to its lead byte
            cut -= 1
        cut = cut or limit  # nothing but continuation bytes (not UTF-8 at all): cut anywhere
    return cut


def _iter_text_file(path: Path, stats: SourceStats) -> Iterator[Document]:
    """A file of at most TEXT_BLOCK bytes is one document; a larger one is read READ_BLOCK at a time and
    cut by `cut_text`, so at most TEXT_BLOCK + READ_BLOCK bytes of it are in memory."""
    limit = TEXT_BLOCK
    with _open_binary(path) as f:
        buf = bytearray()
        part = 0
        while True:
            block = f.read(READ_BLOCK)
            if block:
                buf += block
            while len(buf) > limit:  # more than one document's worth: the first one is complete
                cut = cut_text(buf, limit)
                name = f"{path}#{part}"
                yield Document(_decode(bytes(memoryview(buf)[:cut]), stats, name), name)
                del buf[:cut]
                part += 1
            if not block:
                break
        if buf or part == 0:
            name = str(path) if part == 0 else f"{path}#{part}"
            yield Document(_decode(bytes(buf), stats, name), name)


def _json_text(rec, text_field: str, where: str, first: bool, stats: SourceStats) -> str | None:
    if text_field not in rec:
        if first:
            keys = ", ".join(sorted(map(str, rec))[:12]) or "none"
            raise UserError(
                f"{where}: the records have no '{text_field}' field (fields: {keys}). "
                f"Choose the field that holds the text with --text-field."
            )
        stats.missing_field += 1
        stats.note(f"{where}: no '{text_field}' field, skipped")
        return None
    text = rec[text_field]
    if text is None:
        stats.missing_field += 1
        return None
    if not isinstance(text, str):
        raise UserError(
            f"{where}: field '{text_field}' holds {type(text).__name__}, not text. "
            "Choose a text field with --text-field (for chat data use `lmforge finetune`)."
        )
    return text


class _Utf8Reader:
    """`read(n)` -> str from a binary stream, decoded incrementally; the first invalid UTF-8 in the file
    is counted (as reading the file whole counted it) and from there on invalid bytes become U+FFFD."""

    def __init__(self, f, stats: SourceStats, where: str):
        self.f, self.stats, self.where = f, stats, where
        self.dec = codecs.getincrementaldecoder("utf-8")("strict")
        self.offset = 0  # bytes read so far, for the note

    def read(self, n: int) -> str:
        """About `n` characters; '' only at the end of the file (not when a read ends inside a character)."""
        while True:
            raw = self.f.read(max(n, 4))
            final = not raw
            try:
                text = self.dec.decode(raw, final)
            except UnicodeDecodeError as e:
                pending = self.dec.getstate()[0]  # bytes of a character cut by the previous read
                at = self.offset - len(pending) + e.start
                self.stats.invalid_utf8 += 1
                self.stats.note(f"{self.where}: invalid UTF-8 at byte {max(at, 0)}, replaced")
                self.dec = codecs.getincrementaldecoder("utf-8")("replace")
                text = self.dec.decode(pending + raw, final)
            self.offset += len(raw)
            if text or final:
                return text


_JSON_WS = re.compile(r"[ \t\n\r]*")
_TAIL = 64  # an item that ends this close to the end of what was read may go on (a number): read more


def _json_array_items(read: Callable[[int], str], where: str) -> Iterator:
    """The items of the JSON array that `read` returns piece by piece, one at a time.

    Each item is parsed by the standard library's own decoder (`raw_decode`), so the values are exactly
    what `json.loads` of the whole file gives; only the item being parsed (and READ_BLOCK characters)
    is held. An item cut by the end of what has been read fails to parse, and more is read (twice as
    much each time, so a huge item costs about twice its parse); a syntax error anywhere else is
    reported at once with its character offset in the file.
    """
    decoder = json.JSONDecoder()
    buf, pos, dropped, eof = "", 0, 0, False

    def fill(n: int) -> None:
        """Append `n` more characters (fewer only at the end of the file)."""
        nonlocal buf, pos, dropped, eof
        chunks, got = [], 0
        while got < n and not eof:
            chunk = read(n - got)
            eof = not chunk
            chunks.append(chunk)
            got += len(chunk)
        dropped += pos
        buf, pos = buf[pos:] + "".join(chunks), 0

    def peek() -> str:
        """The next character that is not white space ('' at the end of the file)."""
        nonlocal pos
        while True:
            pos = _JSON_WS.match(buf, pos).end()
            if pos < len(buf) or eof:
                return buf[pos : pos + 1]
            fill(READ_BLOCK)

    def bad(msg: str, at: int):
        return UserError(
            f"{where}: not valid JSON at character {dropped + at} ({msg}). "
            "Fix the file or convert it to JSON lines."
        )

    if peek() != "[":
        raise bad("expected '['", pos)
    pos += 1
    first = True
    while True:
        c = peek()
        if c == "]" and first:
            pos += 1
            break
        if not first:
            if c == "]":
                pos += 1
                break
            if c != ",":
                raise bad("expecting ',' or ']' after an item", pos)
            pos += 1
            peek()
        first = False
        n = READ_BLOCK
        while True:
            try:
                item, end = decoder.raw_decode(buf, pos)
                if eof or end < len(buf) - _TAIL:
                    break
            except json.JSONDecodeError as e:
                cut_short = e.pos >= len(buf) - _TAIL or e.msg.startswith("Unterminated string")
                if eof or not cut_short:
                    raise bad(e.msg, e.pos) from e
            fill(n)
            n *= 2
        pos = end
        yield item
    if peek():
        raise bad("extra data after the array", pos)


def iter_json_records(path: Path, stats: SourceStats, strict: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, record) for JSON lines, or (item number, record) for a file holding one JSON array."""
    with _open_binary(path) as f:
        head = f.peek(64)[:64] if hasattr(f, "peek") else b""
        if head.lstrip().startswith(b"["):
            reader = _Utf8Reader(f, stats, str(path))
            for i, rec in enumerate(_json_array_items(reader.read, str(path)), 1):
                if isinstance(rec, dict):
                    yield i, rec
                else:
                    stats.malformed += 1
                    stats.note(f"{path}: item {i} is not an object")
            return
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(_decode(raw, stats, where))
                if not isinstance(rec, dict):
                    raise ValueError(f"a JSON {type(rec).__name__}, not an object")
            except ValueError as e:  # JSONDecodeError is a ValueError
                if strict:
                    raise UserError(
                        f"{where}: malformed JSON line ({e}). Fix it, or drop --strict to skip it."
                    ) from e
                stats.malformed += 1
                stats.note(f"{where}: malformed JSON, skipped ({str(e)[:60]})")
                continue
            yield lineno, rec


def _iter_json_file(path: Path, text_field: str, stats: SourceStats, strict: bool) -> Iterator[Document]:
    first = True
    for lineno, rec in iter_json_records(path, stats, strict):
        where = f"{path}:{lineno}"
        text = _json_text(rec, text_field, where, first, stats)
        first = False
        if text is None:
            continue
        text = _clean_surrogates(text, stats, where)
        doc_id = rec.get("id") or rec.get("url") or where
        yield Document(text, str(doc_id))


_PARQUET_TEXT = ("string", "large_string", "string_view", "binary", "large_binary", "binary_view")


def _iter_parquet_file(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({e}).") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(
            f"{path}: no column '{text_field}' (columns: {', '.join(names[:12])}). "
            "Choose the column that holds the text with --text-field."
        )
    import pyarrow as pa

    kind = pf.schema_arrow.field(text_field).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not any(getattr(pa.types, f"is_{t}", lambda _: False)(value) for t in _PARQUET_TEXT):
        raise UserError(
            f"{path}: column '{text_field}' holds {kind}, not text. "
            "Choose the column that holds the text with --text-field."
        )
    cols = [text_field] + [c for c in ("id", "url") if c in names and c != text_field]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        for rec in batch.to_pylist():
            row += 1
            text = rec[text_field]
            where = f"{path}:row{row}"
            if isinstance(text, bytes):
                text = _decode(text, stats, where)
            if text is None:
                stats.missing_field += 1
                continue
            yield Document(text, str(rec.get("id") or rec.get("url") or where))


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def resolve_files(spec: str) -> list[Path]:
    """The files a local spec names, sorted, so every run reads them in the same order."""
    p = Path(os.path.expanduser(spec))
    if _is_glob(spec) and not p.exists():
        files = sorted(
            Path(f) for f in globlib.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file()
        )
        files = [f for f in files if file_kind(f)]
        if not files:
            raise UserError(f"--data {spec}: the pattern matches no .txt/.md/.json/.jsonl/.parquet file.")
        return files
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and file_kind(f)
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise UserError(
                f"--data {spec}: the folder has no .txt/.md/.rst/.json/.jsonl/.parquet files "
                "(plain or .gz/.zst compressed)."
            )
        return files
    if p.is_file():
        if file_kind(p) is None and p.suffix:
            raise UserError(
                f"--data {spec}: unsupported file type '{p.suffix}'. Use .txt/.md/.rst (text), "
                ".json/.jsonl (with --text-field), .parquet, optionally compressed as .gz or .zst."
            )
        return [p]
    raise UserError(
        f"--data {spec}: no such file or folder. --data takes a file, a folder, a glob, "
        "`python-docs`, `python-stdlib`, `embedded`, `c4` or `hf:owner/name[:config]`."
    )


def _iter_local(
    spec: str, text_field: str, stats: SourceStats, strict: bool, files: list[Path] | None = None
) -> Iterator[Document]:
    for path in files if files is not None else resolve_files(spec):
        stats.files += 1
        if path.stat().st_size == 0:
            stats.empty_files.append(str(path))
            continue
        kind = file_kind(path) or "text"
        try:
            if kind == "text":
                yield from _iter_text_file(path, stats)
            elif kind == "json":
                yield from _iter_json_file(path, text_field, stats, strict)
            else:
                yield from _iter_parquet_file(path, text_field, stats)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise UserError(f"{path}: the compressed file is damaged or truncated ({e}).") from e
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise UserError(f"{path}: the zstd file is damaged or truncated ({e}).") from e
            raise


# ------------------------------------------------------------------------------------------ hub
def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Can we open a TCP connection to the hub? Checked in a thread so a slow DNS cannot hang us."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    ok = [False]

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return ok[0]


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:owner/name[:config][@split]` -> (name, config, split)."""
    body = HUB_ALIASES.get(spec, spec)[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    if not name:
        raise UserError(f"--data {spec}: expected hf:owner/name[:config][@split], e.g. hf:allenai/c4:en.")
    return name, config or None, split


def require_hub(spec: str):
    """The `datasets` module, once we know the hub can be used; else a UserError at once (no hang)."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE"):
        raise UserError(
            f"--data {spec}: streaming needs the Hugging Face hub, but HF_HUB_OFFLINE "
            f"(or HF_DATASETS_OFFLINE) is set. {LOCAL_HINT}"
        )
    if not hub_reachable():  # before importing datasets, which takes seconds
        raise UserError(f"--data {spec}: the Hugging Face hub cannot be reached (no network?). {LOCAL_HINT}")
    try:
        import datasets
    except ImportError as e:
        raise UserError(
            f"--data {spec}: streaming from the hub needs the `datasets` package: "
            f"pip install datasets (or pip install 'lmforge[hf]'). {LOCAL_HINT}"
        ) from e
    return datasets


def _iter_hub(spec: str, text_field: str, stats: SourceStats) -> Iterator[Document]:
    name, config, split = parse_hub_spec(spec)
    label = f"{name}" + (f" ({config})" if config else "")
    datasets = require_hub(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise UserError(f"--data {spec}: cannot open {label} split '{split}' on the hub: {e}") from e
    stats.files += 1
    for i, rec in enumerate(ds):
        where = f"{name}[{i}]"
        text = _json_text(rec, text_field, where, i == 0, stats)
        if text is not None:
            yield Document(text, str(rec.get("id") or rec.get("url") or where))


# ------------------------------------------------------------------------------------------ entry
def is_hub(spec: str) -> bool:
    return spec in HUB_ALIASES or spec.startswith("hf:")


def check_source(spec: str) -> None:
    """Fail now, before any work starts, if `spec` names nothing readable or an unreachable hub."""
    if is_embedded(spec):
        return
    if is_hub(spec):
        parse_hub_spec(spec)
        require_hub(spec)
    else:
        resolve_files(spec)


def iter_documents(
    spec: str,
    *,
    text_field: str = "text",
    strict: bool = False,
    stats: SourceStats | None = None,
    max_docs: int | None = None,
) -> Iterator[Document]:
    """Stream the documents of `spec` (see the module docstring), skipping empty ones.

    Raises `UserError` when the spec names nothing or when nothing at all could be read.
    """
    stats = stats if stats is not None else SourceStats()
    if is_embedded(spec):
        it = iter_embedded(spec)
    elif is_hub(spec):
        it = _iter_hub(spec, text_field, stats)
    else:
        it = _iter_local(spec, text_field, stats, strict)
    n = 0
    for doc in it:
        if not doc.text.strip():
            stats.empty_documents += 1
            continue
        if max_docs is not None and n >= max_docs:
            break
        n += 1
        stats.documents += 1
        yield doc
    if n == 0:
        why = "; ".join(stats.summary()[:3]) or "the source is empty"
        raise UserError(f"--data {spec}: no documents with text ({why}). Check the path and --text-field.")
