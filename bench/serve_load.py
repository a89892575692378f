"""Load test of `lmforge serve`: N concurrent streaming clients, as many requests as asked, then the numbers.

    .venv/bin/python bench/serve_load.py                                  # starts a server on a tiny model
    .venv/bin/python bench/serve_load.py --clients 1,16,32 --rounds 4 --max-tokens 64
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --api-key "$KEY" --clients 8

Each client sends --rounds streaming /v1/completions requests (ignore_eos, so every request generates
exactly --max-tokens tokens) one after another, so a level of C clients makes C x rounds requests. Per concurrency level it
prints requests/s, output tokens/s (usage counts over wall time), time to first token and inter-token
latency (the gap between streamed chunks; one token each, except a token that completes no character)
at p50/p99, and failures (non-200, broken streams, wrong token counts).

--features measures what the application features cost or save instead, on a model with a 2048-token
context (built once into runs/bench-serve-features), alternating the contestants request by request:
- structured output: ms per generated token of a JSON-schema-constrained request (a string that never
  closes within --max-tokens, so both generate the same number of tokens) against a free one;
- prefix caching: time to first token of requests sharing a 1,000-token system prompt (each with its own
  question) on a server with the prefix cache against one started with --no-prefix-cache.

Without --url it starts `python -m lmforge serve` on 127.0.0.1 on --checkpoint, by default
runs/quickstart/final, or, when that does not exist, a `preset("llama", "tiny")` model with random
weights and a 4096-token BPE trained on python-docs (built once into runs/bench-serve-tiny). The
clients run in this process, on the same machine as the server: on a small CPU they take a share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "def fibonacci(n):",
    "The Python standard library",
    "import os\nimport sys\n\ndef main():",
    "Continuous batching lets a server",
    "class Stack:\n    def __init__(self):",
    "Once upon a time, in a land far away,",
    "SELECT name FROM users WHERE",
    "The capital of France is",
]


def tiny_checkpoint(out: Path) -> Path:
    """A preset("llama", "tiny") model (random weights) with a python-docs tokenizer; built once."""
    if (out / "config.json").is_file():
        return out
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.data.pydocs import iter_python_docs
    from lmforge.model import build
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer((d.text for d in iter_python_docs("train")), 4096)
    cfg = preset("llama", "tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    save_model(build(cfg).eval(), out, tokenizer=tok)
    return out


def features_checkpoint(out: Path) -> Path:
    """preset("llama", "tiny") with a 2048-token context and random weights, a 1024-token BPE; built once."""
    if (out / "config.json").is_file():
        return out
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer([p * 20 for p in PROMPTS] + [SYSTEM] * 5, 1024)
    cfg = preset("llama", "tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                 max_seq_len=2048)  # fmt: skip
    torch.manual_seed(0)
    save_model(build(cfg).eval(), out, tokenizer=tok)
    return out


SYSTEM = " ".join(
    f"Rule {i}: answer in plain words, cite the {w} section, keep the {v} short and never guess."
    for i, (w, v) in enumerate(
        zip(["first", "second", "third", "last"] * 40, ["reply", "list", "code", "note"] * 40)
    )
)


def _post(url: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def _ttft(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("no chunk")


def features(a) -> None:
    ckpt = features_checkpoint(ROOT / "runs/bench-serve-features")
    log = Path(a.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with_cache, url = start_server(ckpt, 4, a.threads, log)
    without, url_nc = start_server(ckpt, 4, a.threads, log.with_suffix(".nocache.log"), "--no-prefix-cache")
    try:
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.load(ckpt)
        system = tok.decode(tok.encode(SYSTEM, bos=False, eos=False)[:1000])  # a 1,000-token system prompt
        n_sys = len(tok.encode_prompt(system))
        # structured output: the same number of tokens, constrained or not
        schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
        free = {"prompt": "JSON:", "max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 0.8}
        constrained = {
            **free,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
        }
        for body in (free, constrained):
            _post(url, {**body, "seed": 0})  # warm-up (the grammar's tokenizer is built once)
        per_tok = {"free": [], "json_schema": []}
        for i in range(a.rounds * 4):
            for name, body in (("free", free), ("json_schema", constrained))[:: 1 if i % 2 else -1]:
                dt, out = _post(url, {**body, "seed": i})
                per_tok[name].append(1000 * dt / out["usage"]["completion_tokens"])
        # prefix cache: a shared 1,000-token system prompt, a new question each time
        ttft = {"prefix cache": [], "no prefix cache": []}
        for u in (url, url_nc):
            _ttft(u, {"prompt": system + " Question: warm-up?", "max_tokens": 1})
        for i in range(a.rounds * 4):
            body = {"prompt": f"{system} Question {i}: what does rule {i % 7} say?", "max_tokens": 4}
            for name, u in (("prefix cache", url), ("no prefix cache", url_nc))[:: 1 if i % 2 else -1]:
                ttft[name].append(1000 * _ttft(u, body))
    finally:
        for proc in (with_cache, without):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    f, c = pct(per_tok["free"], 50), pct(per_tok["json_schema"], 50)
    p, n = pct(ttft["prefix cache"], 50), pct(ttft["no prefix cache"], 50)
    print(f"machine: {os.cpu_count()}-core CPU ({platform.machine()}), load average {os.getloadavg()[0]:.1f}; "
          f"{ckpt.name}: preset llama tiny, 2048 context; {a.rounds * 4} alternating requests per contestant")  # fmt: skip
    print("| measurement | anchor | contestant | ratio |\n|---|---|---|---|")
    print(f"| ms per token, {a.max_tokens} tokens (p50) | free {f:.2f} | json_schema {c:.2f} | {c / f:.2f}x "
          f"(+{c - f:.2f} ms/token) |")  # fmt: skip
    print(f"| TTFT, {n_sys}-token shared system prompt (p50 ms) | no prefix cache {n:.0f} | prefix cache {p:.0f} "
          f"| {n / p:.1f}x faster |")  # fmt: skip


def start_server(
    ckpt: Path, max_batch: int, threads: int, log: Path, *extra: str
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LMFORGE_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "serve",
        str(ckpt),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-queue",
        "1024",
        "--device",
        "cpu",
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"the server did not become healthy in 120 s; see {log}")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def one_request(
    h: httpx.AsyncClient, model: str | None, prompt: str, max_tokens: int, stats: dict
) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    last = None
    tokens = None
    done = False
    try:
        async with h.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - t0)
                    else:
                        stats["itl"].append(now - last)
                    last = now
    except (httpx.HTTPError, ValueError) as e:  # ValueError: an event that is not JSON
        stats["errors"].append(f"{type(e).__name__}: {e}")
        return
    if not done or tokens != max_tokens:
        stats["errors"].append(f"stream ended early (done={done}, tokens={tokens})")
        return
    stats["tokens"] += tokens
    stats["ok"] += 1


async def run_level(
    url: str,
    headers: dict,
    model: str | None,
    clients: int,
    requests: int,
    max_tokens: int,
    max_seconds: float,
) -> dict:
    stats = {"ttft": [], "itl": [], "errors": [], "tokens": 0, "ok": 0}
    todo = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def client(h):
        for i in todo:
            if time.perf_counter() > deadline:
                stats["errors"].append("not sent: --max-seconds reached")
                continue
            await one_request(h, model, PROMPTS[i % len(PROMPTS)], max_tokens, stats)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(h) for _ in range(clients)])
        wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": requests,
        "ok": stats["ok"],
        "failures": len(stats["errors"]),
        "wall_s": wall,
        "req_s": stats["ok"] / wall,
        "tok_s": stats["tokens"] / wall,
        "ttft_p50_ms": 1000 * pct(stats["ttft"], 50),
        "ttft_p99_ms": 1000 * pct(stats["ttft"], 99),
        "itl_p50_ms": 1000 * pct(stats["itl"], 50),
        "itl_p99_ms": 1000 * pct(stats["itl"], 99),
        "first_errors": stats["errors"][:3],
    }


def table(rows: list[dict]) -> str:
    base = next((r["tok_s"] for r in rows if r["clients"] == 1), None)
    out = [
        "| clients | requests (ok) | requests/s | output tokens/s | vs 1 client | TTFT p50 / p99 (ms) "
        "| inter-token p50 / p99 (ms) | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['tok_s'] / base:.1f}x" if base else "-"
        out.append(
            f"| {r['clients']} | {r['requests']} ({r['ok']}) | {r['req_s']:.2f} | {r['tok_s']:.0f} | {speed} "
            f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} "
            f"| {r['failures']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="model to serve when starting a server (default: runs/quickstart/final, else a tiny one)",
    )
    ap.add_argument("--api-key", default=None, help="API key of the --url server")
    ap.add_argument("--model", default=None, help="model id to request (default: the server's default)")
    ap.add_argument(
        "--clients", default="1,16,32", help="comma-separated concurrency levels (default: 1,16,32)"
    )
    ap.add_argument("--rounds", type=int, default=4, help="requests per client in each level (default: 4)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    ap.add_argument(
        "--max-batch", type=int, default=32, help="--max-batch of the started server (default: 32)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the started server (default: 1; the clients need the other core)",
    )
    ap.add_argument("--max-seconds", type=float, default=300, help="stop sending in a level after this long")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument(
        "--features",
        action="store_true",
        help="measure structured-output overhead per token and the prefix cache's TTFT gain instead",
    )
    ap.add_argument(
        "--log",
        default=str(ROOT / "runs/bench-serve.log"),
        help="the started server's output (default: %(default)s)",
    )
    a = ap.parse_args()
    if a.features:
        return features(a)
    levels = [int(c) for c in a.clients.split(",") if c.strip()]
    if a.rounds * sum(levels) > 1000:
        sys.exit("at most 1000 requests in all: lower --rounds or the --clients levels")

    proc, model_desc = None, a.url
    if a.url is None:
        ckpt = (
            Path(a.checkpoint).resolve() if a.checkpoint else ROOT / "runs/quickstart/final"
        )  # the server runs in ROOT
        if not (ckpt / "config.json").is_file():
            if a.checkpoint:
                sys.exit(f"{ckpt}: not a checkpoint")
            ckpt = tiny_checkpoint(ROOT / "runs/bench-serve-tiny")
        log = Path(a.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        proc, url = start_server(ckpt, a.max_batch, a.threads, log)
        model_desc = f"{ckpt} (--max-batch {a.max_batch}, {a.threads} torch thread(s))"
    else:
        url = a.url.rstrip("/")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    try:
        info = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]
        print(
            f"server: {url}, model {info['id']} ({model_desc}), context {info['max_model_len']}", flush=True
        )
        asyncio.run(run_level(url, headers, a.model, 2, 4, 8, 60))  # warm-up
        rows = []
        for c in levels:
            r = asyncio.run(run_level(url, headers, a.model, c, c * a.rounds, a.max_tokens, a.max_seconds))
            rows.append(r)
            print(
                f"clients {c}: {r['ok']}/{r['requests']} ok in {r['wall_s']:.1f} s, {r['tok_s']:.0f} tokens/s"
                + (f", errors: {r['first_errors']}" if r["first_errors"] else ""),
                flush=True,
            )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print()
    print(
        f"machine: {os.cpu_count()}-core CPU ({platform.machine()}), Python {platform.python_version()}, "
        f"load average at the end {os.getloadavg()[0]:.1f}; {a.rounds} requests per client, "
        f"{a.max_tokens} tokens each"
    )
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"url": url, "model": model_desc, "levels": rows}, indent=2))


if __name__ == "__main__":
    main()
