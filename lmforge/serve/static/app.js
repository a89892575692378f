// lmforge web chat: streams replies from /v1/chat/completions (fetch + ReadableStream, SSE parsed by hand).
// No build step and no dependencies. The conversation lives in `history`; "New chat" clears it.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop"), statusEl = $("status");
const keyInput = $("api-key"), keyLabel = $("key-label"), modelSel = $("model");
const KEY_STORE = "lmforge-api-key";
let history = [];        // [{role, content}] of finished turns
let controller = null;   // AbortController of the reply being streamed

keyInput.value = localStorage.getItem(KEY_STORE) || "";
if (keyInput.value) keyLabel.hidden = false;
keyInput.addEventListener("change", () => { localStorage.setItem(KEY_STORE, keyInput.value.trim()); loadModels(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = keyInput.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { statusEl.textContent = text || ""; }

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text || "";
  div.appendChild(body);
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setMeta(div, text) {
  let meta = div.querySelector(".meta");
  if (!meta) { meta = document.createElement("span"); meta.className = "meta"; div.appendChild(meta); }
  meta.textContent = text;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error.message;
  } catch (e) { /* not JSON */ }
  return resp.status + " " + resp.statusText;
}

function needKey(message) {
  keyLabel.hidden = false;
  keyInput.focus();
  setStatus(message || "this server needs an API key: enter it above");
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.status === 401) return needKey(await errorMessage(resp));
    if (!resp.ok) return setStatus("cannot list models: " + await errorMessage(resp));
    const data = await resp.json();
    const current = modelSel.value;
    modelSel.textContent = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.parent ? `${m.id} (LoRA of ${m.parent})` : m.id;
      modelSel.appendChild(opt);
    }
    if (current) modelSel.value = current;
    setStatus("");
  } catch (e) {
    setStatus("cannot reach the server: " + e);
  }
}

function busy(on) {
  sendBtn.disabled = on;
  stopBtn.hidden = !on;
}

// Yields the parsed JSON payload of every `data:` event; stops at [DONE].
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, { role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  const replyText = reply.querySelector(".text");
  const req = {
    model: modelSel.value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value || "0.7"),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) req.max_tokens = maxTokens;

  controller = new AbortController();
  busy(true);
  setStatus("waiting for the first token...");
  const t0 = performance.now();
  let tFirst = null, chunks = 0, usage = null, finish = null, content = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(req), signal: controller.signal,
    });
    if (!resp.ok) {
      const msg = await errorMessage(resp);
      if (resp.status === 401) needKey(msg);
      reply.className = "msg error";
      replyText.textContent = msg;
      return;
    }
    for await (const ev of sseEvents(resp.body)) {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) usage = ev.usage;
      for (const choice of ev.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (tFirst === null) tFirst = performance.now();
          chunks += 1;
          content += piece;
          replyText.textContent = content;
          log.scrollTop = log.scrollHeight;
          const secs = (performance.now() - tFirst) / 1000;
          if (secs > 0) setStatus(`streaming... ${(chunks / secs).toFixed(1)} tokens/s`);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      reply.classList.add("error");
      setMeta(reply, "error: " + e.message);
    } else {
      finish = "stopped";
    }
  } finally {
    controller = null;
    busy(false);
  }
  const tEnd = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  const decodeSecs = tFirst !== null ? (tEnd - tFirst) / 1000 : 0;
  const rate = decodeSecs > 0 && tokens > 1 ? ((tokens - 1) / decodeSecs).toFixed(1) : "-";
  const ttft = tFirst !== null ? Math.round(tFirst - t0) + " ms" : "-";
  setMeta(reply, `${tokens} tokens · ${rate} tokens/s · first token ${ttft}` + (finish ? ` · ${finish}` : ""));
  setStatus("");
  if (!reply.classList.contains("error")) {
    history.push({ role: "user", content: text }, { role: "assistant", content });
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value;
  if (!text.trim() || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.textContent = "";
  setStatus("new conversation");
});

loadModels();
