"""The embedded corpora (python-docs, python-stdlib, embedded): built offline, deterministic, sized, split by
hash, side-effect free, and python-stdlib without python-docs' validation text."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.data.document import doc_digest, is_validation
from lmforge.data.pydocs import VAL_FRACTION, build_python_docs, iter_python_docs
from lmforge.data.sources import iter_documents


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One cache per test session, shared by every test file that needs the corpus.
    root = tmp_path_factory.getbasetemp() / "lmforge-cache"
    old = os.environ.get("LMFORGE_CACHE")
    os.environ["LMFORGE_CACHE"] = str(root)
    yield root
    if old is None:
        del os.environ["LMFORGE_CACHE"]
    else:
        os.environ["LMFORGE_CACHE"] = old


def test_build_is_deterministic_and_sized(cache, tmp_path):
    d = build_python_docs(verbose=False)
    meta = json.loads((d / "meta.json").read_text())
    assert d.is_relative_to(cache)
    assert meta["bytes"] > 1_500_000 and meta["documents"] > 1000  # "a few MB" of English prose
    assert meta["build_seconds"] < 60
    # A second build from scratch gives the same bytes.
    again = build_python_docs(tmp_path, force=True, verbose=False)
    assert (again / "documents.jsonl").read_bytes() == (d / "documents.jsonl").read_bytes()
    assert json.loads((again / "meta.json").read_text())["sha256"] == meta["sha256"]


def test_contents_and_skipped_modules(cache):
    docs = {d.id: d.text for d in iter_documents("python-docs")}
    assert "topic:assert" in docs and "assert" in docs["topic:assert"]
    assert "module:json" in docs and "JSON (JavaScript Object Notation)" in docs["module:json"]
    assert any(k.startswith("class:collections.OrderedDict") for k in docs)
    for bad in ("antigravity", "this", "idlelib", "tkinter", "turtle", "test.", "__main__"):
        assert not any(k.split(":", 1)[1].startswith(bad) for k in docs if ":" in k), bad
    assert not any(" at 0x" in t for t in docs.values())  # no memory addresses: the text is reproducible


def test_fixed_split_by_hash(cache):
    train = list(iter_python_docs("train"))
    val = list(iter_python_docs("val"))
    all_docs = list(iter_python_docs())
    assert len(train) + len(val) == len(all_docs)
    assert all(is_validation(doc_digest(d.text), VAL_FRACTION) for d in val)
    assert 0.01 < len(val) / len(all_docs) < 0.04  # ~2%
    assert {d.id for d in val}.isdisjoint(d.id for d in train)


def test_a_module_that_hangs_or_crashes_is_skipped(tmp_path, monkeypatch):
    """The builder restarts the walk without the module that stalled or killed the worker."""
    import lmforge.data.pydocs as pydocs

    fake = tmp_path / "worker.py"
    fake.write_text(
        "import json, os, sys, time\n"
        "out, skip = sys.argv[1], set(sys.argv[2:])\n"
        "with open(out, 'w') as f:\n"
        "    f.write(json.dumps({'id': 'topic:a', 'text': 'A' * 100}) + '\\n')\n"
        "    for mod in ('good', 'hangs', 'crashes', 'after'):\n"
        "        if mod in skip: continue\n"
        "        f.write(json.dumps({'begin': mod}) + '\\n'); f.flush()\n"
        "        if mod == 'hangs': time.sleep(60)\n"
        "        if mod == 'crashes': os.abort()\n"
        "        f.write(json.dumps({'id': 'module:' + mod, 'text': mod * 50}) + '\\n')\n"
        "    f.write(json.dumps({'done': True}) + '\\n')\n"
    )
    monkeypatch.setattr(pydocs, "WORKER", fake)
    d = pydocs.build_python_docs(tmp_path / "c", timeout=1, verbose=False)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["skipped_modules"] == ["hangs", "crashes"]
    ids = [json.loads(line)["id"] for line in (d / "documents.jsonl").read_text().splitlines()]
    assert ids == ["topic:a", "module:good", "module:after"]


def test_python_stdlib_is_the_standard_library_without_tests_or_the_yardstick(cache, tmp_path):
    """python-stdlib: the interpreter's own Lib/*.py, deterministic, without test suites, generated
    tables or site-packages, and with no line of python-docs' validation documents in it (checked here
    by a plain scan of every kept file against every long validation line)."""
    from lmforge.data.pystdlib import build_python_stdlib, iter_python_stdlib, stdlib_root

    d = build_python_stdlib(verbose=False)
    meta = json.loads((d / "meta.json").read_text())
    assert d.is_relative_to(cache) and meta["bytes"] > 3 * 1_000_000 and meta["documents"] > 300
    assert "PSF" in meta["licence"]
    again = build_python_stdlib(tmp_path, force=True, verbose=False)
    assert (again / "documents.jsonl").read_bytes() == (d / "documents.jsonl").read_bytes()
    docs = {doc.id: doc.text for doc in iter_python_stdlib()}
    root = stdlib_root()
    assert docs["Lib/json/decoder.py"] == (root / "json" / "decoder.py").read_text(encoding="utf-8")
    for bad in ("Lib/test/", "/tests/", "Lib/site-packages/", "Lib/pydoc_data/", "Lib/encodings/"):
        assert not any(bad in k for k in docs), bad
    held = {
        line.strip()
        for doc in iter_python_docs("val")
        for line in doc.text.splitlines()
        if len(line.strip()) >= 32
    }
    assert meta["left_out_sharing_python_docs_validation_text"]  # the guard had work to do
    for left in meta["left_out_sharing_python_docs_validation_text"]:
        text = (root / left).read_text(encoding="utf-8")
        assert any(line.strip() in held for line in text.splitlines()), left
    for k, text in docs.items():
        assert not any(line.strip() in held for line in text.splitlines()), k
    val = list(iter_python_stdlib("val"))
    assert val and all(is_validation(doc_digest(x.text), VAL_FRACTION) for x in val)
    assert len(val) + len(list(iter_python_stdlib("train"))) == len(docs)


def test_embedded_is_both_corpora_and_keeps_python_docs_validation_split(cache):
    from lmforge.data.pystdlib import iter_python_stdlib

    ids = [d.id for d in iter_documents("embedded")]
    docs_ids = [d.id for d in iter_python_docs()]
    assert ids == docs_ids + [d.id for d in iter_python_stdlib()]
    val = [d.id for d in iter_documents("embedded") if is_validation(doc_digest(d.text), VAL_FRACTION)]
    assert set(d.id for d in iter_python_docs("val")) <= set(val)
    assert set(val) - set(d.id for d in iter_python_docs("val")) == set(
        d.id for d in iter_python_stdlib("val")
    )
