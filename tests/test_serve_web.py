"""The web chat page in a real headless Chromium (driven by playwright): it asks for the API key, streams
a reply from /v1/chat/completions, shows tokens/s, and keeps the conversation for the next turn.

Chromium comes from the system (`scripts/ensure_chromium.sh` installs Debian's package); playwright's
own browser download is never used. The test skips, saying why, only when either is missing."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest
from serve_helpers import Server, serve_ckpt  # noqa: F401

KEY = "sk-web"
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if shutil.which(p)), None)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CANDIDATES = ["Hello there!", "What is continuous batching?", "Tell me about foxes.", "def add(a, b):"]


@pytest.fixture(scope="module")
def browser_ctx(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Chromium not found: run scripts/ensure_chromium.sh (apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
        )
        yield ctx
        ctx.close()


def _expected(url: str) -> tuple[str, str]:
    """A message whose greedy reply (max 24 tokens) is long enough to arrive in several pieces."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        for msg in CANDIDATES:
            r = h.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": msg}], "max_tokens": 24, "temperature": 0},
            ).json()
            if r["usage"]["completion_tokens"] >= 8 and len(r["choices"][0]["message"]["content"]) >= 8:
                return msg, r["choices"][0]["message"]["content"]
    pytest.fail("no candidate message gave a reply of 8+ tokens")


def test_chat_page_streams_a_reply(browser_ctx, serve_ckpt, tmp_path):  # noqa: F811
    with Server(serve_ckpt[0], "--api-key", KEY, log_dir=tmp_path) as server:
        msg, want = _expected(server.url)
        page = browser_ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        posted = []
        page.on(
            "request",
            lambda r: posted.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None,
        )
        page.goto(server.url + "/")
        # /v1/models answered 401: the page shows the key field
        page.wait_for_selector("#key-label:not([hidden])", timeout=15_000)
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=15_000)
        assert page.eval_on_selector("#model", "s => s.value") == "model"
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        # record every text the reply shows while it grows
        page.evaluate("""() => {
            window.__seen = [];
            new MutationObserver(() => {
                const t = document.querySelector('.msg.assistant:last-child .text');
                if (t) window.__seen.push(t.textContent);
            }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
        }""")
        page.fill("#input", msg)
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .meta", timeout=30_000)
        assert page.inner_text(".msg.user .text") == msg
        assert page.eval_on_selector(".msg.assistant .text", "e => e.textContent") == want
        meta = page.inner_text(".msg.assistant .meta")
        assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · first token \d+ ms · (stop|length)", meta), meta
        seen = [s for s in page.evaluate("window.__seen") if s]
        assert len(set(seen)) >= 2 and seen[-1] == want, seen  # it grew piece by piece: streamed
        assert all(want.startswith(s) for s in seen)
        # second turn: the conversation so far goes with it
        page.fill("#input", "And then?")
        page.press("#input", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant .meta').length == 2", timeout=30_000
        )
        body = json.loads(posted[-1])
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["messages"][1]["content"] == want and body["stream"] is True
        assert not errors, errors
