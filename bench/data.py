"""Data benchmarks: python-docs build time, tokenizer training time, encode MB/s, prepare MB/s;
with --size-mb, the peak memory and worker scaling of `lmforge data prepare` on big inputs.

    .venv/bin/python bench/data.py                               # print a markdown table
    .venv/bin/python bench/data.py --write docs/benchmarks.md    # and replace its "## Data" section
    .venv/bin/python bench/data.py --size-mb 300                 # also: one 300 MB .txt, .jsonl, .json array
    .venv/bin/python bench/data.py --size-mb 300 --scale-only    # only that

--size-mb generates the three inputs under the temporary directory (the standard library's source,
copied as often as needed, each copy marked so no document is a duplicate; deleted afterwards) and runs
`lmforge data prepare` on each as a real process with --workers 1 and 2: peak RSS of the main process
and of each worker (VmHWM, MB = 10^6 bytes), wall-clock and CPU-time throughput, and the speed-up of 2
workers over 1 on the .txt. Its table goes to a "## Data preparation at scale" section with --write.

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
import shutil
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
    ap.add_argument(
        "--size-mb",
        type=float,
        help="also measure `data prepare` memory and 1-vs-2-worker speed on a .txt, a .jsonl and a JSON array "
        "of this many MB each (--smoke: at most 0.3)",
    )
    ap.add_argument(
        "--scale-only",
        action="store_true",
        help="with --size-mb: only the big-input table (one tokenizer trained)",
    )
    args = ap.parse_args()
    args.max_docs, args.copies = (100, 1) if args.smoke else (None, 8)
    if args.smoke and args.size_mb:
        args.size_mb = min(args.size_mb, 0.3)
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

    if args.size_mb and args.scale_only:
        tok_dir = tmp / f"tok{args.vocab[0]}"
        train_tokenizer_on("python-docs", args.vocab[0], tok_dir, max_docs=args.max_docs, verbose=False)
        text = scale(args, tmp, tok_dir)
        print(text)
        if args.write:
            write_section(Path(args.write), text, SCALE_HEADING)
        return
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
    if args.size_mb:
        text = scale(args, tmp, tok_dir)
        print(text)
        if args.write:
            write_section(Path(args.write), text, SCALE_HEADING)


# ------------------------------------------------------------------------------------ --size-mb
SCALE_HEADING = "## Data preparation at scale"


def make_inputs(tmp: Path, size_mb: float) -> dict[str, Path]:
    """One .txt, .jsonl and .json (array) of about `size_mb` MB each, from the standard library's .py files
    (not site-packages: the largest file, and so JSON record, is then pydoc_data/topics.py, 0.76 MB).

    The .txt is the files back to back (so `data prepare` cuts it into documents at blank lines); each
    JSON record is one file. Every copy of the library starts with its own marker, so nothing repeats."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in lib.rglob("*.py") if not {"site-packages", "dist-packages"} & set(f.parts))
    target = int(size_mb * 1e6)
    paths = {k: tmp / f"big.{k}" for k in ("txt", "jsonl", "json")}
    with open(paths["txt"], "w") as txt, open(paths["jsonl"], "w") as jl, open(paths["json"], "w") as arr:
        arr.write("[\n")
        written, copy, first = 0, 0, True
        while written < target:
            for f in files:
                text = f"# copy {copy}: {f.name}\n" + f.read_text(encoding="utf-8", errors="replace")
                txt.write(text + "\n\n")
                line = json.dumps({"text": text}, ensure_ascii=False)
                jl.write(line + "\n")
                arr.write(("" if first else ",\n") + line)
                first = False
                written += len(text.encode()) + 2
                if written >= target:
                    break
            copy += 1
        arr.write("\n]\n")
    return paths


def prepare_process(data: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    """`lmforge data prepare` as its own process: wall and CPU seconds (it and its workers), peak RSS."""
    import resource
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "data",
        "prepare",
        "--data",
        str(data),
        "--tokenizer",
        str(tok_dir),
    ]
    cmd += ["--out", str(out), "--workers", str(workers), "--force", "--no-progress"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    m = re.search(r"peak RSS (\d+) MB(?: \(each worker (\d+) MB\))?", p.stderr)
    meta = json.loads((out / "meta.json").read_text())
    return {
        "wall": wall,
        "cpu": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "rss": int(m[1]),
        "worker_rss": int(m[2]) if m[2] else None,
        "mb": sum(s["bytes"] for s in meta["splits"].values()) / 1e6,
        "documents": meta["documents_read"],
    }


def scale(args, tmp: Path, tok_dir: Path) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    inputs = make_inputs(tmp, args.size_mb)
    rows, rate = [], {}
    try:
        for kind, path in inputs.items():
            size = path.stat().st_size / 1e6
            for w in (1, 2):
                r = prepare_process(path, tok_dir, tmp / f"scale-{kind}", w)
                rate[kind, w] = (r["mb"] / r["wall"], r["mb"] / r["cpu"])
                worker = f"{r['worker_rss']} MB" if r["worker_rss"] is not None else "— (in-process)"
                rows.append(
                    f"| .{kind}, {size:.3g} MB file, {r['documents']} documents | {w} | {r['rss']} MB | {worker} "
                    f"| {r['wall']:.0f} s, {r['mb'] / r['wall']:.2f} MB/s | {r['cpu']:.0f} CPU s, "
                    f"{r['mb'] / r['cpu']:.2f} MB/CPU-s |"
                )
                print(rows[-1], file=sys.stderr, flush=True)  # as it comes: a long run shows progress
                shutil.rmtree(tmp / f"scale-{kind}", ignore_errors=True)
    finally:
        for path in inputs.values():
            path.unlink(missing_ok=True)
    (wall1, cpu1), (wall2, cpu2) = rate["txt", 1], rate["txt", 2]
    lines = [
        SCALE_HEADING,
        "",
        f"Machine: {args.machine}. Date: {args.date}. Python {platform.python_version()}. Command: "
        f"`.venv/bin/python bench/data.py --size-mb {args.size_mb:g}{' --scale-only' * args.scale_only}`. Load average when it started: {load:.1f}. "
        "Each row is `lmforge data prepare --workers N` run as its own process on one generated file (the "
        "standard library's source; vocabulary "
        f"{args.vocab[0]}); peak RSS is VmHWM of the main process and of the largest worker, MB = 10^6 bytes. "
        "CPU seconds are the process's and its workers' user + system time, which the load on shared "
        "cores does not inflate the way it does the wall clock.",
        "",
        "| input | --workers | peak RSS, main | peak RSS, each worker | wall clock | CPU time |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"2 workers vs 1 on the .txt: {wall2 / wall1:.2f}x the wall-clock rate, on cores shared with other "
        f"jobs. Measured in CPU time, 2 workers spend {cpu1 / cpu2:.2f}x the CPU seconds per MB of 1 (the main "
        "process's reading, hashing and hand-off to the workers, and the workers' start), so with two idle "
        f"cores they run 2 x {cpu2 / cpu1:.2f} = {2 * cpu2 / cpu1:.2f}x as fast as 1 worker.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str, heading: str = "## Data") -> None:
    """Replace the `heading` section (up to the next '## ' heading), or append it; nothing else changes."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pat = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: section + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    print(f"wrote the {heading[3:]} section of {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
