"""data prepare: every format gives the reference token stream; parallel == serial; reuse; failures are safe."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from lmforge.data import prepare as prep
from lmforge.data.document import doc_digest, is_validation
from lmforge.data.loader import TokenLoader
from lmforge.data.prepare import prepare, read_meta, token_dtype
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import UserError

WORDS = "the of and to in is was for on that with as by it from at data model token byte café 日本 🎉".split()
VF = 0.2


def make_docs(n=240, seed=0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "." for _ in range(n)]
    return docs + docs[:15]  # 15 exact duplicates


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer(docs, 320)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def reference(tok, docs, vf=VF):
    """Expected (tokens, doc lengths) per split, computed the slow, obvious way."""
    seen, out = set(), {"train": ([], []), "val": ([], [])}
    for t in docs:
        if t in seen:
            continue
        seen.add(t)
        ids = tok.encode(t, bos=True, eos=True)
        split = "val" if is_validation(doc_digest(t), vf) else "train"
        out[split][0].extend(ids)
        out[split][1].append(len(ids))
    return out


def read_split(directory, split):
    meta = read_meta(directory)
    info = meta["splits"][split]
    toks, starts, base = [], [], 0
    for s in info["shards"]:
        toks.append(np.fromfile(directory / s["file"], dtype=meta["dtype"]))
        starts.append(np.fromfile(directory / s["index"], dtype="<i8") + base)
        base += s["tokens"]
    toks = np.concatenate(toks) if toks else np.zeros(0, np.int64)
    starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return toks, np.diff(np.append(starts, len(toks)))


def check_against_reference(out, tok, docs):
    ref = reference(tok, docs)
    meta = read_meta(out)
    assert meta["tokenizer_hash"] == tok.hash and meta["dtype"] == "<u2"
    assert meta["duplicates_removed"] == 15
    for split in ("train", "val"):
        toks, lens = read_split(out, split)
        assert toks.tolist() == ref[split][0]
        assert lens.tolist() == ref[split][1]
        assert meta["splits"][split]["tokens"] == len(ref[split][0])
        assert meta["splits"][split]["documents"] == len(ref[split][1])
    assert len(ref["val"][1]) > 10  # the split is not degenerate


def write_formats(tmp, docs):
    """The same documents as C4 shards, JSONL, Parquet and a folder of text files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c4 = tmp / "c4"
    c4.mkdir()
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        with gzip.open(c4 / f"c4-train.{i:05d}-of-01024.json.gz", "wt", encoding="utf-8") as f:
            for j, t in enumerate(part):
                f.write(
                    json.dumps({"text": t, "url": f"https://x/{i}/{j}", "timestamp": "2019-04-25T12:57:54Z"})
                    + "\n"
                )
    with open(tmp / "d.jsonl", "w", encoding="utf-8") as f:
        for t in docs:
            f.write(json.dumps({"content": t}) + "\n")
    pq.write_table(pa.table({"text": docs}), tmp / "d.parquet", row_group_size=50)
    txt = tmp / "txt"
    txt.mkdir()
    for i, t in enumerate(docs):
        (txt / f"{i:04d}.txt").write_text(t, encoding="utf-8")
    return {
        "c4": (str(c4), "text"),
        "jsonl": (str(tmp / "d.jsonl"), "content"),
        "parquet": (str(tmp / "d.parquet"), "text"),
        "text": (str(txt / "*.txt"), "text"),
    }


def test_all_formats_give_the_reference_stream(tmp_path, tok, tok_dir, docs):
    for name, (spec, field) in write_formats(tmp_path, docs).items():
        out = tmp_path / f"out-{name}"
        r = prepare(
            spec, tok_dir, out, workers=1, text_field=field, val_fraction=VF, progress=False, verbose=False
        )
        assert not r["reused"] and r["mb_per_s"] > 0 and r["peak_rss_mb"] > 0
        check_against_reference(out, tok, docs)


def test_parallel_equals_serial_byte_for_byte(tmp_path, tok, tok_dir, docs, monkeypatch):
    spec = str(tmp_path / "d.jsonl")
    with open(spec, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    monkeypatch.setattr(prep, "CHUNK_BYTES", 2000)  # many chunks in flight
    kw = dict(val_fraction=VF, shard_tokens=1500, progress=False, verbose=False)
    prepare(spec, tok_dir, tmp_path / "serial", workers=1, **kw)
    r = prepare(spec, tok_dir, tmp_path / "parallel", workers=2, **kw)
    assert r["peak_worker_rss_mb"] > 0
    files = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert len([f for f in files if f.startswith("train_")]) > 4  # several shards
    assert files == sorted(p.name for p in (tmp_path / "parallel").iterdir())
    for f in files:
        if f != "meta.json":
            assert (tmp_path / "serial" / f).read_bytes() == (tmp_path / "parallel" / f).read_bytes(), f
    check_against_reference(tmp_path / "parallel", tok, docs)
    # Shards never split a document and stay within the size unless one document is longer.
    meta = read_meta(tmp_path / "serial")
    assert all(s["tokens"] <= 1500 for s in meta["splits"]["train"]["shards"])


def test_rerun_reuses_and_force_redoes(tmp_path, tok_dir, docs, capsys):
    spec = tmp_path / "d.jsonl"
    spec.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:50]))
    out = tmp_path / "out"
    prepare(str(spec), tok_dir, out, workers=1, progress=False)
    mtime = (out / "meta.json").stat().st_mtime_ns
    r = prepare(str(spec), tok_dir, out, workers=1, progress=False)
    assert r["reused"] and "reusing the finished preparation" in capsys.readouterr().err
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    assert not prepare(str(spec), tok_dir, out, workers=1, progress=False, force=True)["reused"]
    # Changing the input (or an option) is a different preparation: it replaces this one only with force.
    spec.write_text(spec.read_text() + json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(UserError, match="holds another data preparation.*--force"):
        prepare(str(spec), tok_dir, out, workers=1, progress=False, verbose=False)
    r = prepare(str(spec), tok_dir, out, workers=1, progress=False, verbose=False, force=True)
    assert not r["reused"]


def test_failed_run_keeps_the_finished_preparation(tmp_path, tok_dir, docs):
    spec = tmp_path / "d.jsonl"
    spec.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:50]))
    out = tmp_path / "out"
    prepare(str(spec), tok_dir, out, workers=1, progress=False, verbose=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    with pytest.raises(UserError, match="bad.jsonl:2: malformed JSON"):
        prepare(str(bad), tok_dir, out, workers=1, strict=True, progress=False, verbose=False, force=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="no documents"):
        prepare(str(empty), tok_dir, out, workers=2, progress=False, verbose=False, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporaries left


def test_refuses_to_replace_a_foreign_directory(tmp_path, tok_dir):
    (tmp_path / "d.txt").write_text("some text")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="holds files that are not a data preparation.*--force"):
        prepare(str(tmp_path / "d.txt"), tok_dir, tmp_path / "mine", workers=1, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_bad_utf8_and_malformed_lines_are_counted(tmp_path, tok, tok_dir):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok \xff bytes"}\n{broken\n{"text": "fine"}\n')
    out = tmp_path / "out"
    meta = prepare(str(p), tok_dir, out, workers=1, val_fraction=0, progress=False, verbose=False)
    assert meta["invalid_utf8"] == 1 and meta["malformed_lines"] == 1
    toks, _ = read_split(out, "train")
    assert tok.decode(toks) == "<|bos|>ok \ufffd bytes<|eos|><|bos|>fine<|eos|>"


def test_special_token_text_in_documents_stays_text(tmp_path, tok, tok_dir):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "web page quoting <|user|> and <|bos|> markers"}) + "\n")
    out = tmp_path / "out"
    prepare(str(p), tok_dir, out, workers=1, val_fraction=0, progress=False, verbose=False)
    toks, _ = read_split(out, "train")
    ids = toks.tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert not set(ids[1:-1]) & set(tok.special_tokens.values())  # no injected role markers or BOS
    assert tok.decode(ids[1:-1]) == "web page quoting <|user|> and <|bos|> markers"
    assert ids == tok.encode(
        "web page quoting <|user|> and <|bos|> markers", bos=True, eos=True, special=False
    )


def test_dtype_and_tokenizer_mismatch(tmp_path, tok, tok_dir, docs):
    assert token_dtype(300) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    spec = tmp_path / "d.jsonl"
    spec.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:40]))
    out = tmp_path / "out32"
    prepare(str(spec), tok_dir, out, workers=1, dtype="uint32", val_fraction=0, progress=False, verbose=False)
    meta = read_meta(out)
    assert meta["dtype"] == "<u4"
    assert read_split(out, "train")[0].tolist() == reference(tok, docs[:40], 0)["train"][0]
    other = train_tokenizer(docs[:40], 300)
    assert TokenLoader(out, "train", 2, 8, tokenizer=tok).tokenizer_hash == tok.hash
    with pytest.raises(UserError, match=f"tokenized with tokenizer {tok.hash}.*uses tokenizer {other.hash}"):
        TokenLoader(out, "train", 2, 8, tokenizer=other)


def test_cli_data_prepare(tmp_path, tok_dir, capsys):
    from lmforge.cli import main

    (tmp_path / "d.txt").write_text("A small text.\n\nWith two paragraphs.")
    out = tmp_path / "out"
    args = [
        "data",
        "prepare",
        "--data",
        str(tmp_path / "d.txt"),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
    ]
    assert main([*args, "--workers", "1", "--no-progress"]) == 0
    assert "MB/s" in capsys.readouterr().err
    assert main(["data", "info", str(out)]) == 0
    assert "tokenizer: " in capsys.readouterr().out
    assert (
        main(
            [
                "data",
                "prepare",
                "--data",
                str(tmp_path / "nope"),
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "no such file or folder" in capsys.readouterr().err
