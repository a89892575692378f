"""Sources: every local format yields the documents written, bad input is counted or refused, hub fails fast."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from lmforge.data import sources
from lmforge.data.sources import SourceStats, iter_documents, parse_hub_spec
from lmforge.utils import UserError

DOCS = ["first document\nwith two lines", "second — with ünïcode 日本 🎉", "third"]


def texts(spec, **kw):
    return [d.text for d in iter_documents(spec, **kw)]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def test_text_files_folders_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text(DOCS[1])
    (tmp_path / "a.md").write_text(DOCS[0])
    (tmp_path / "sub" / "c.rst").write_text(DOCS[2])
    (tmp_path / "skip.csv").write_text("not,a,document")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    # A folder is searched recursively in sorted order, skipping hidden and unsupported files.
    assert texts(str(tmp_path)) == [DOCS[0], DOCS[1], DOCS[2]]
    assert texts(str(tmp_path / "*.txt")) == [DOCS[1]]
    assert texts(str(tmp_path / "**" / "*.rst")) == [DOCS[2]]
    assert [d.id for d in iter_documents(str(tmp_path / "b.txt"))] == [str(tmp_path / "b.txt")]
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        texts(str(tmp_path / "skip.csv"))
    with pytest.raises(UserError, match="no such file or folder"):
        texts(str(tmp_path / "missing.txt"))


def test_large_text_file_is_cut_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TEXT_BLOCK", 64)
    paragraphs = [f"paragraph {i} " + "é" * 20 for i in range(20)]
    (tmp_path / "big.txt").write_text("\n\n".join(paragraphs))
    docs = texts(str(tmp_path / "big.txt"))
    assert len(docs) > 3 and "".join(docs) == "\n\n".join(paragraphs)
    assert all(d.endswith("\n\n") for d in docs[:-1])
    # No blank line, no newline at all: cut at character boundaries, nothing lost or broken.
    (tmp_path / "line.txt").write_text("日本語🎉é" * 100)
    stats = SourceStats()
    docs = texts(str(tmp_path / "line.txt"), stats=stats)
    assert len(docs) > 3 and "".join(docs) == "日本語🎉é" * 100 and stats.invalid_utf8 == 0


def test_jsonl_text_field_ids_and_malformed_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"body": DOCS[0], "id": "x1"}),
        "{broken json",
        json.dumps({"body": DOCS[1]}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({"other": 1}),
        json.dumps({"body": DOCS[2]}),
    ]
    p.write_text("\n".join(lines) + "\n")
    stats = SourceStats()
    docs = list(iter_documents(str(p), text_field="body", stats=stats))
    assert [d.text for d in docs] == DOCS
    assert [d.id for d in docs] == ["x1", f"{p}:3", f"{p}:7"]
    assert stats.malformed == 2 and stats.missing_field == 1
    summary = "\n".join(stats.summary())
    assert f"{p}:2: malformed JSON" in summary and f"{p}:5: malformed JSON" in summary
    assert f"{p}:6: no 'body' field" in summary
    with pytest.raises(UserError, match=f"{p}:2: malformed JSON line"):
        texts(str(p), text_field="body", strict=True)


def test_missing_text_field_names_the_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match=r"no 'text' field \(fields: completion, prompt\).*--text-field"):
        texts(str(p))
    write_jsonl(p, [{"text": ["a", "list"]}])
    with pytest.raises(UserError, match="holds list, not text"):
        texts(str(p))


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": t} for t in DOCS]))
    assert texts(str(p)) == DOCS


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good start \xff\xfe bad bytes \xe6\x97 cut")
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok \xc3\x28 line"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "fine"}\n')
    stats = SourceStats()
    docs = texts(str(tmp_path / "bad.txt"), stats=stats)
    assert docs == ["good start \ufffd\ufffd bad bytes \ufffd cut"] and stats.invalid_utf8 == 1
    stats = SourceStats()
    assert texts(str(p), stats=stats) == ["ok \ufffd( line", "lone ? surrogate", "fine"]
    assert stats.invalid_utf8 == 2


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"content": DOCS, "id": ["a", "b", "c"]}), tmp_path / "d.parquet", row_group_size=2
    )
    docs = list(iter_documents(str(tmp_path / "d.parquet"), text_field="content"))
    assert [d.text for d in docs] == DOCS and [d.id for d in docs] == ["a", "b", "c"]
    with pytest.raises(UserError, match="no column 'text' \\(columns: content, id\\)"):
        texts(str(tmp_path / "d.parquet"))


def test_compressed_and_c4_shards(tmp_path):
    import zstandard

    c4 = tmp_path / "c4" / "en"
    c4.mkdir(parents=True)
    recs = [
        {"text": t, "url": f"https://example.com/{i}", "timestamp": "2019-04-25T12:57:54Z"}
        for i, t in enumerate(DOCS)
    ]
    write_jsonl(c4 / "c4-train.00000-of-01024.json.gz", recs[:2], gzip.open)
    write_jsonl(c4 / "c4-train.00001-of-01024.json.gz", recs[2:], gzip.open)
    docs = list(iter_documents(str(tmp_path / "c4")))
    assert [d.text for d in docs] == DOCS
    assert [d.id for d in docs] == [r["url"] for r in recs]  # C4's url is the document id
    with zstandard.open(tmp_path / "d.jsonl.zst", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    assert texts(str(tmp_path / "d.jsonl.zst")) == DOCS
    with gzip.open(tmp_path / "t.txt.gz", "wt") as f:
        f.write(DOCS[1])
    assert texts(str(tmp_path / "t.txt.gz")) == [DOCS[1]]
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(UserError, match="damaged or truncated"):
        texts(str(tmp_path / "trunc.jsonl.gz"))


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("   \n\n")
    with pytest.raises(UserError, match="no documents with text.*1 empty file"):
        texts(str(tmp_path))
    (tmp_path / "real.txt").write_text("content")
    stats = SourceStats()
    assert texts(str(tmp_path), stats=stats) == ["content"]
    assert stats.empty_files == [str(tmp_path / "empty.txt")] and stats.empty_documents == 1


def test_max_docs(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    assert texts(str(tmp_path / "d.jsonl"), max_docs=3) == ["doc 0", "doc 1", "doc 2"]


def test_hub_specs():
    assert parse_hub_spec("c4") == ("allenai/c4", "en", "train")
    assert parse_hub_spec("hf:owner/name") == ("owner/name", None, "train")
    assert parse_hub_spec("hf:owner/name:cfg@validation") == ("owner/name", "cfg", "validation")


def test_hub_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE.*python-docs.*c4-\\*.json.gz"):
        texts("c4")
    assert time.perf_counter() - t0 < 2


def test_hub_unreachable_fails_fast(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="cannot be reached.*python-docs"):
        texts("hf:owner/name")
    assert time.perf_counter() - t0 < 5


def test_hub_stream_records_become_documents(monkeypatch):
    """With a network, `c4` streams allenai/c4 (en, train) through `datasets`; here a fake stands in."""
    import sys
    import types

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": t, "url": f"u{i}", "timestamp": "t"} for i, t in enumerate(DOCS)])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=2.0: True)
    docs = list(iter_documents("c4", max_docs=2))
    assert calls == [("allenai/c4", "en", "train", True)]
    assert [(d.text, d.id) for d in docs] == [(DOCS[0], "u0"), (DOCS[1], "u1")]


def test_hub_without_datasets_package(monkeypatch):
    import sys

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=2.0: True)
    with pytest.raises(UserError, match="needs the `datasets` package: pip install datasets"):
        texts("hf:owner/name")
