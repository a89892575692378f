"""data prepare under stress: bounded memory for every input kind, streaming readers equal whole-file
readers, one-line errors (exit code 2) that leave earlier output byte-identical, no stale temporaries.

Inputs are a few MB at most; the sizes that matter (documents, read blocks) are shrunk with monkeypatch
so that the cuts and buffer refills happen hundreds of times on small files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import sources
from lmforge.data.prepare import ShardWriter, prepare, read_meta
from lmforge.data.sources import SourceStats, _json_array_items, iter_documents
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import UserError

WORDS = "the of and to in is was for on that with as by it from at data model token byte café 日本 ü".split()
QUIET = {"progress": False, "verbose": False}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer([words(rng, 200) for _ in range(50)], 300).save(d)
    return d


def tree(d: Path) -> dict[str, str]:
    """Every file under `d` (dotfiles too) -> its sha256: 'byte-identical' made checkable."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def train_tokens(out: Path) -> list[int]:
    meta = read_meta(out)
    return [
        t
        for s in meta["splits"]["train"]["shards"]
        for t in np.fromfile(out / s["file"], meta["dtype"]).tolist()
    ]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120
    )


def error_line(p: subprocess.CompletedProcess, *, alone: bool = True) -> str:
    """The CLI's one-line error (exit code 2, no traceback); `alone`: nothing else was printed."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("lmforge data: error: ") and (len(lines) == 1 or not alone), p.stderr
    return lines[-1]


# ------------------------------------------------------------------------------ text files
def reference_text_docs(data: bytes, limit: int) -> list[bytes]:
    """The cut rule applied to the whole file at once, written out plainly (the streaming reader's spec)."""
    if len(data) <= limit:
        return [data]
    docs = []
    while len(data) > limit:
        window = data[:limit]
        if b"\n\n" in window:
            cut = window.rindex(b"\n\n") + 2
        elif b"\n" in window:
            cut = window.rindex(b"\n") + 1
        else:
            cut = limit
            while 0x80 <= data[cut] < 0xC0:  # never inside a UTF-8 character
                cut -= 1
        docs.append(data[:cut])
        data = data[cut:]
    return docs + [data]


def test_text_reader_streams_documents_equal_to_the_whole_file_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TEXT_BLOCK", 4096)
    monkeypatch.setattr(sources, "READ_BLOCK", 1000)  # not a divisor: cuts land everywhere in a block
    rng = random.Random(1)
    parts = []
    for _ in range(400):  # paragraphs, long lines without blank lines, and runs with no newline at all
        kind = rng.random()
        if kind < 0.5:
            parts.append(words(rng, rng.randint(5, 300)) + "\n\n")
        elif kind < 0.8:
            parts.append("\n".join(words(rng, 40) for _ in range(rng.randint(1, 30))) + "\n")
        else:
            parts.append("日本語ü🎉" * rng.randint(100, 1500))
    data = "".join(parts).encode()
    (tmp_path / "big.txt").write_bytes(data)
    ref = reference_text_docs(data, 4096)
    docs = list(iter_documents(str(tmp_path / "big.txt")))
    assert [d.text.encode() for d in docs] == [r for r in ref if r.strip()]
    assert all(len(d.text.encode()) <= 4096 for d in docs) and len(docs) > 100
    assert [d.id for d in docs][:2] == [f"{tmp_path / 'big.txt'}#0", f"{tmp_path / 'big.txt'}#1"]
    # A file no larger than a document is one document named by its path, as always.
    (tmp_path / "small.txt").write_bytes(data[:4096])
    assert [d.id for d in iter_documents(str(tmp_path / "small.txt"))] == [str(tmp_path / "small.txt")]


def test_text_reader_memory_is_bounded_on_one_huge_line(tmp_path, monkeypatch):
    """A 6 MB file with no newline at all: the reader holds about a document and a block, not the file."""
    monkeypatch.setattr(sources, "TEXT_BLOCK", 128 << 10)
    monkeypatch.setattr(sources, "READ_BLOCK", 64 << 10)
    (tmp_path / "line.txt").write_bytes(("x" * 1000 + "é").encode() * 6000)  # 6 MB, no newline
    tracemalloc.start()
    try:
        n, size = 0, 0
        for doc in iter_documents(str(tmp_path / "line.txt")):
            n, size = n + 1, max(size, len(doc.text.encode()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size <= 128 << 10 and -(-6_012_000 // (128 << 10)) <= n <= -(-6_012_000 // ((128 << 10) - 3))
    assert peak < 1 << 20, f"reader peak {peak / 1e6:.1f} MB for a 6 MB file"


# ------------------------------------------------------------------------------ JSON arrays
def tricky_items(rng: random.Random) -> list:
    items = []
    for i in range(300):
        k = rng.random()
        if k < 0.6:
            items.append(
                {
                    "text": words(rng, rng.randint(1, 80)),
                    "id": f"r{i}",
                    "n": rng.random() * 10 ** rng.randint(-5, 9),
                }
            )
        elif k < 0.7:
            items.append(
                {"text": 'quotes " and ] and , and \\ and \n newlines ' + "é" * 3000}
            )  # > a read block
        elif k < 0.8:
            items.append({"text": "nested", "meta": {"a": [1, 2, [3, {"b": None}]], "t": True, "f": False}})
        elif k < 0.9:
            items.append(
                rng.choice([12345678901234567890, -0.5e-7, "a string", [1, 2], None, True])
            )  # not objects
        else:
            items.append({"text": "lone \ud800 surrogate and \U0001f389"})
    return items


def test_json_array_items_equal_json_loads(monkeypatch):
    rng = random.Random(2)
    items = tricky_items(rng)
    for indent, seps in ((None, (",", ":")), (2, (", ", ": ")), (None, (" ,\n\t ", " : "))):
        text = json.dumps(items, indent=indent, separators=seps)
        for block in (1, 7, 4096):  # every item, separator and number cut by a buffer end somewhere
            monkeypatch.setattr(sources, "READ_BLOCK", block)
            assert list(_json_array_items(io.StringIO(text).read, "x.json")) == json.loads(text)
    assert list(_json_array_items(io.StringIO(" [ \n ] ").read, "e.json")) == []


@pytest.mark.parametrize(
    "text",
    [
        '[{"text": "a"}, {oops}]',
        '[{"text": "a"} {"text": "b"}]',  # missing comma
        '[{"text": "a"},]',  # trailing comma
        '[{"text": "a"}] extra',
        '[{"text": "never closed',
        '{"text": "not an array"}',
    ],
)
def test_json_array_syntax_errors_name_the_offset(text, monkeypatch):
    monkeypatch.setattr(sources, "READ_BLOCK", 4)
    try:
        json.loads(text)
        at = 0  # valid JSON, but not an array
    except json.JSONDecodeError as e:
        at = e.pos  # where reading the whole file reports it
    with pytest.raises(UserError, match=rf"^x\.json: not valid JSON at character {at} \(") as e:
        list(_json_array_items(io.StringIO(text).read, "x.json"))
    assert "\n" not in str(e.value)


def test_json_array_file_documents_equal_the_whole_file_reader(tmp_path, monkeypatch, tok_dir):
    monkeypatch.setattr(sources, "READ_BLOCK", 500)
    items = tricky_items(random.Random(3))
    raw = json.dumps(items, ensure_ascii=False).encode("utf-8", "surrogatepass")  # lone surrogates: bad bytes
    raw = raw.replace(
        b"quotes", b"bad \xff byte", 1
    )  # and more invalid UTF-8: replaced and counted, as before
    p = tmp_path / "d.json"
    p.write_bytes(raw)
    old = json.loads(raw.decode("utf-8", errors="replace"))  # what the whole-file reader did
    want = [
        (r["text"].encode("utf-8", errors="replace").decode(), r.get("id") or f"{p}:{i}")
        for i, r in enumerate(old, 1)
        if isinstance(r, dict) and r.get("text", "").strip()
    ]
    stats = SourceStats()
    assert [(d.text, d.id) for d in iter_documents(str(p), stats=stats)] == want
    assert stats.invalid_utf8 >= 1 and stats.malformed == sum(not isinstance(r, dict) for r in old)
    # Same tokens as the same records given as JSON lines.
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old if isinstance(r, dict)))
    prepare(str(p), tok_dir, tmp_path / "a", workers=1, val_fraction=0, **QUIET)
    prepare(str(tmp_path / "d.jsonl"), tok_dir, tmp_path / "b", workers=1, val_fraction=0, **QUIET)
    assert (
        train_tokens(tmp_path / "a") == train_tokens(tmp_path / "b")
        and len(train_tokens(tmp_path / "a")) > 1000
    )


def test_json_array_memory_is_bounded(tmp_path, monkeypatch):
    """A 3 MB array: the parser holds a read block and one item; json.loads would hold all of it (~10x)."""
    monkeypatch.setattr(sources, "READ_BLOCK", 64 << 10)
    rng = random.Random(4)
    p = tmp_path / "big.json"
    with open(p, "w") as f:
        f.write("[")
        for i in range(1000):
            f.write(("," if i else "") + json.dumps({"text": words(rng, 700), "id": i}))
        f.write("]")
    assert p.stat().st_size > 3_000_000
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_documents(str(p)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 1000 and peak < 600_000, f"parser peak {peak / 1e6:.2f} MB for a 4 MB array"


# ------------------------------------------------------------------------------ workers on one big file
def test_one_big_paragraph_free_file_uses_both_workers_in_bounded_memory(tmp_path, tok_dir, monkeypatch):
    """One file without a blank line: documents of at most TEXT_BLOCK (the reader runs in this process,
    so the patch applies), spread over 2 workers, output equal to 1 worker's, each worker's peak RSS
    within the 400 MB bound."""
    monkeypatch.setattr(sources, "TEXT_BLOCK", 256 << 10)
    rng = random.Random(5)
    lines = [words(rng, 30) for _ in range(5500)]
    (tmp_path / "big.txt").write_text("\n".join(lines))
    size = (tmp_path / "big.txt").stat().st_size
    assert 2 * (256 << 10) < size < 3 * (256 << 10) - 1000
    r = prepare(str(tmp_path / "big.txt"), tok_dir, tmp_path / "par", workers=2, val_fraction=0, **QUIET)
    assert r["documents_read"] == 3
    assert r["peak_worker_rss_mb"] < 400 and r["workers"] == 2
    one = prepare(str(tmp_path / "big.txt"), tok_dir, tmp_path / "one", workers=1, val_fraction=0, **QUIET)
    assert train_tokens(tmp_path / "par") == train_tokens(tmp_path / "one")
    assert one["splits"]["train"]["bytes"] == size  # MB figures are bytes / 1e6 of exactly this


# ------------------------------------------------------------------------------ errors: one line, exit 2
def test_cli_workers_zero_and_negative_exit_2_in_one_line(tmp_path, tok_dir):
    (tmp_path / "d.txt").write_text("some text")
    for w in ("0", "-3"):
        p = cli("data", "prepare", "--data", str(tmp_path / "d.txt"), "--tokenizer", str(tok_dir), "--out",
                str(tmp_path / "out"), "--workers", w)  # fmt: skip
        assert f"--workers {w}: must be at least 1" in error_line(p)
        assert not (tmp_path / "out").exists()


def test_cli_refuses_to_replace_another_preparation(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("first corpus " * 50)
    (tmp_path / "b.txt").write_text("second corpus " * 50)
    out = tmp_path / "out"
    prepare(str(tmp_path / "a.txt"), tok_dir, out, workers=1, **QUIET)
    before = tree(out)
    base = [
        "data",
        "prepare",
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-progress",
    ]
    p = cli(*base, "--data", str(tmp_path / "b.txt"))
    line = error_line(p)
    assert "holds another data preparation" in line and "--force" in line
    assert tree(out) == before
    # The same preparation again is reused (documented), and --force replaces it with the other one.
    assert (
        prepare(str(tmp_path / "a.txt"), tok_dir, out, workers=1, **QUIET)["reused"] and tree(out) == before
    )
    p = cli(*base, "--data", str(tmp_path / "b.txt"), "--force")
    assert p.returncode == 0, p.stderr
    assert read_meta(out)["source"] == str(tmp_path / "b.txt")


def test_foreign_directory_file_and_own_input_are_refused(tmp_path, tok_dir):
    (tmp_path / "d.txt").write_text("some text")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(
        UserError, match=r"--out .*mine: holds files that are not a data preparation.*--force"
    ):
        prepare(str(tmp_path / "d.txt"), tok_dir, mine, workers=1, **QUIET)
    assert tree(mine) == {"notes.txt": hashlib.sha256(b"precious").hexdigest()}
    with pytest.raises(UserError, match="never writes into what it reads"):
        prepare(str(mine), tok_dir, mine / "prep", workers=1, **QUIET)  # shards inside the input folder
    assert not (mine / "prep").exists()


def test_parquet_integer_text_column_is_one_line(tmp_path, tok_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), tmp_path / "d.parquet")
    with pytest.raises(UserError) as e:
        prepare(str(tmp_path / "d.parquet"), tok_dir, tmp_path / "out", workers=1, **QUIET)
    msg = str(e.value)
    assert "column 'text' holds int64, not text" in msg and "--text-field" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()
    r = prepare(str(tmp_path / "d.parquet"), tok_dir, tmp_path / "out", workers=1, text_field="body", **QUIET)
    assert r["documents_read"] == 3


# ------------------------------------------------------------------------------ disk full, read-only
@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A small real tmpfs at `where` (root only; skipped where mounting is not allowed)."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _big_text(path: Path, mb: float) -> Path:
    rng = random.Random(6)
    path.write_text("\n\n".join(words(rng, 100) for _ in range(int(mb * 1e6 / 500))))
    return path


def test_disk_full_on_a_real_tmpfs(tmp_path, tok_dir):
    (tmp_path / "small.txt").write_text("a small corpus " * 20)
    big = _big_text(tmp_path / "big.txt", 1.0)  # ~600 KB of uint16 tokens: more than the tmpfs holds
    with tmpfs(tmp_path / "mnt", "300k") as mnt:
        out = mnt / "out"
        prepare(str(tmp_path / "small.txt"), tok_dir, out, workers=1, **QUIET)
        before = tree(mnt)
        with pytest.raises(UserError) as e:
            prepare(str(big), tok_dir, out, workers=1, force=True, **QUIET)
        assert "no space left on device" in str(e.value).lower() and "\n" not in str(e.value)
        assert tree(mnt) == before  # earlier preparation byte-identical, the temporary removed


def test_read_only_out_on_a_real_mount(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("a small corpus " * 20)
    (tmp_path / "b.txt").write_text("another corpus " * 20)
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        prepare(str(tmp_path / "a.txt"), tok_dir, mnt / "out", workers=1, **QUIET)
        before = tree(mnt)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for out in (mnt / "out", mnt / "new"):
            p = cli("data", "prepare", "--data", str(tmp_path / "b.txt"), "--tokenizer", str(tok_dir),
                    "--out", str(out), "--workers", "1", "--force", "--no-progress")  # fmt: skip
            assert "read-only file system" in error_line(p, alone=False).lower()
        assert tree(mnt) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_write_errors_injected_at_the_shard_write(tmp_path, tok_dir, monkeypatch, code):
    """Where no tmpfs can be mounted, the same errors raised where the shards are written."""
    (tmp_path / "a.txt").write_text("a small corpus " * 20)
    (tmp_path / "b.txt").write_text("another corpus " * 20)
    out = tmp_path / "out"
    prepare(str(tmp_path / "a.txt"), tok_dir, out, workers=1, **QUIET)
    before = tree(tmp_path)

    def fail(self):
        raise OSError(code, os.strerror(code), str(self.dir / "train_00000.bin"))

    monkeypatch.setattr(ShardWriter, "_open", fail)
    with pytest.raises(UserError) as e:
        prepare(str(tmp_path / "b.txt"), tok_dir, out, workers=1, force=True, **QUIET)
    assert os.strerror(code).lower() in str(e.value).lower() and "\n" not in str(e.value)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------ stale temporaries
KILLED_WRITER = """
import sys, time
from lmforge.data import prepare as p
def stall(self, flat, lens):
    (self.dir / "started").write_text("")
    time.sleep(600)
p.ShardWriter.add = stall
p.prepare(sys.argv[1], sys.argv[2], sys.argv[3], workers=1, force=True, progress=False, verbose=False)
"""


def test_temporary_of_a_killed_prepare_is_removed_by_the_next_run(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("a small corpus " * 20)
    (tmp_path / "b.txt").write_text("another corpus " * 20)
    out = tmp_path / "out"
    prepare(str(tmp_path / "a.txt"), tok_dir, out, workers=1, **QUIET)
    before = tree(out)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "b.txt"), str(tok_dir), str(out)]
    )
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".out.*.tmp/started")):
            assert child.poll() is None and time.time() < deadline, "the writer never started"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert list(tmp_path.glob(".out.*.tmp")) and tree(out) == before  # killed mid-write: old output whole
    # The next run reuses the finished preparation, and removes the dead run's temporary.
    assert prepare(str(tmp_path / "a.txt"), tok_dir, out, workers=1, **QUIET)["reused"]
    assert not list(tmp_path.glob(".out.*")) and tree(out) == before
