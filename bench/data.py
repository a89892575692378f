"""Data benchmarks: python-docs build time, tokenizer training time, encode MB/s, prepare MB/s.

    .venv/bin/python bench/data.py                               # print a markdown table
    .venv/bin/python bench/data.py --write docs/benchmarks.md    # and replace its "## Data" section

Everything runs on the embedded python-docs corpus (no network), in a temporary cache. The second
prepare figure uses python-docs copied 8 times (each copy's documents made distinct, so that none is
dropped as a duplicate) to show the steady-state rate once worker start-up is amortised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, *a, **kw):
    """(result, wall seconds, CPU seconds of this process and its finished children)."""
    t = os.times()
    w0, c0 = time.perf_counter(), t.user + t.system + t.children_user + t.children_system
    out = fn(*a, **kw)
    t = os.times()
    return out, time.perf_counter() - w0, t.user + t.system + t.children_user + t.children_system - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", help="markdown file whose '## Data' section is replaced with the results")
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 8192], help="vocabulary sizes to train")
    ap.add_argument(
        "--machine", default=f"{os.cpu_count()}-core CPU ({platform.machine()})", help="machine label"
    )
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="date label")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check that the script runs (vocabulary 512, the first 100 documents, one copy): no figures",
    )
    args = ap.parse_args()
    args.max_docs, args.copies = (100, 1) if args.smoke else (None, 8)
    if args.smoke:
        args.vocab = [512]

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-data-") as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    os.environ["LMFORGE_CACHE"] = str(tmp / "cache")
    from lmforge.data.prepare import prepare
    from lmforge.data.pydocs import build_python_docs, iter_python_docs
    from lmforge.data.tokenize_corpus import train_tokenizer_on
    from lmforge.tokenizer import Tokenizer

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []  # (what, input, wall result, CPU-time result)

    d, wall, cpu = timed(build_python_docs, verbose=False)
    meta = json.loads((d / "meta.json").read_text())
    mb = meta["bytes"] / 1e6
    rows.append(("build python-docs", f"{meta['documents']} documents, {mb:.2f} MB", f"{wall:.2f} s", "—"))

    for v in args.vocab:
        (_, rep), wall, cpu = timed(
            train_tokenizer_on, "python-docs", v, tmp / f"tok{v}", max_docs=args.max_docs, verbose=False
        )
        what = f"{rep['train_bytes'] / 1e6:.2f} MB; {rep['bytes_per_token']:.2f} bytes/token held out"
        rows.append((f"train tokenizer, vocab {v}", what, f"{wall:.2f} s", f"{cpu:.2f} CPU s"))

    tok_dir = tmp / f"tok{args.vocab[0]}"
    tok = Tokenizer.load(tok_dir)
    texts = [doc.text for doc in iter_python_docs()][: args.max_docs]
    tok.encode_batch(texts[:50])  # warm up
    for label, fn in (
        ("encode_batch (Rust threads, all cores)", lambda: tok.encode_batch(texts)),
        ("encode one text at a time (1 core)", lambda: [tok.encode(t) for t in texts]),
    ):
        _, wall, cpu = min((timed(fn) for _ in range(2)), key=lambda r: r[1])
        rows.append(
            (f"{label}, vocab {args.vocab[0]}", f"{mb:.2f} MB", f"{mb / wall:.2f} MB/s", f"{mb / cpu:.2f}")
        )

    big = tmp / "pydocs-x8.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for k in range(args.copies):
            for t in texts:
                f.write(json.dumps({"text": f"[copy {k}]\n{t}"}, ensure_ascii=False) + "\n")
    for spec, label in (("python-docs", "python-docs"), (str(big), "python-docs x8 (JSONL)")):
        for w in (1, 2):
            r, wall, cpu = timed(
                prepare,
                spec,
                tok_dir,
                tmp / "prep",
                workers=w,
                force=True,
                progress=False,
                verbose=False,
                max_docs=args.max_docs,
            )
            size = sum(s["bytes"] for s in r["splits"].values()) / 1e6
            rss = f"peak RSS {r['peak_rss_mb']:.0f} MB" + (
                f", {r['peak_worker_rss_mb']:.0f} MB per worker" if r.get("peak_worker_rss_mb") else ""
            )
            rows.append(
                (
                    f"prepare {label}, --workers {w}",
                    f"{size:.1f} MB; {rss}",
                    f"{r['mb_per_s']:.2f} MB/s",
                    f"{size / cpu:.2f}",
                )
            )

    table = [
        "## Data",
        "",
        f"Machine: {args.machine}. Date: {args.date}. Python {platform.python_version()}. "
        f"Command: `.venv/bin/python bench/data.py`. Load average when it started: {load:.1f}. "
        "The cores were shared with other jobs, so the wall-clock rates are lower bounds; the last "
        "column, MB per CPU-second (this process and its workers), does not depend on the load. "
        "MB = 10^6 bytes of UTF-8 text; prepare includes reading, hashing, tokenizing and writing.",
        "",
        "| what | input | result (wall clock) | MB per CPU-second |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows],
        "",
    ]
    text = "\n".join(table)
    print(text)
    if args.write:
        write_section(Path(args.write), text)


def write_section(path: Path, section: str) -> None:
    """Replace the '## Data' section (up to the next '## ' heading), or append it; nothing else changes."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pat = re.compile(r"^## Data\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: section + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    print(f"wrote the Data section of {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
