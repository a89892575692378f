"""`lmforge chat`: an interactive conversation with the chat template, streamed as it is generated.

Lines are read from `input` (stdin), so the loop runs the same at a terminal and with piped input
(tests drive it as a subprocess). `/reset` starts over, `/quit` (or end of input) leaves. When the
conversation plus max_new_tokens no longer fits the model's context, the oldest turns are dropped
(the system message stays) and a note on stderr says so. Template keyword arguments (Qwen3's
`enable_thinking=False`, say) and `tools` reach the chat template on every turn. A reply ends at any of
the tokenizer's stop ids (its EOS, the eos ids of config.json / generation_config.json and the
template's end-of-turn token), which the engine adds by default.
"""

from __future__ import annotations

import sys

from lmforge.infer.generate import stream
from lmforge.infer.sampling import SamplingParams
from lmforge.utils import UserError

HELP = "type a message; /reset starts a new conversation, /quit leaves"


def fit_conversation(
    tokenizer, messages: list[dict], max_new_tokens: int, context: int, tools=None, **template_kwargs
):
    """(prompt ids, messages kept, turns dropped): drop the oldest non-system messages, a user turn
    and its reply at a time, until the rendered prompt plus max_new_tokens fits the context.
    Returns ids None when even the last message alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while True:
        kept = system + turns
        ids = tokenizer.encode_chat(kept, add_generation_prompt=True, tools=tools, **template_kwargs)
        if len(ids) + max_new_tokens <= context:
            return ids, kept, dropped
        if len(turns) <= 1:
            return None, kept, dropped
        n = 2 if len(turns) > 2 and turns[0]["role"] == "user" else 1  # a user turn and its reply
        turns, dropped = turns[n:], dropped + n


def chat(
    model,
    tokenizer,
    params: SamplingParams | None = None,
    *,
    system: str | None = None,
    draft=None,
    input=None,
    output=None,
    err=None,
    template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
) -> None:
    """Run the chat loop with `model` and `tokenizer` until /quit or end of input; `draft` (a smaller
    Transformer) decodes speculatively. `template_kwargs` (e.g. {"enable_thinking": False})
    and `tools` (OpenAI function schemas) are passed to the chat template.

    Args:
        system: a system message that starts every conversation
        draft: a smaller checkpoint with the same tokenizer for speculative decoding
        template_kwargs: a keyword argument for the chat template, VALUE read as JSON when it parses (e.g.
            enable_thinking=false for Qwen3); repeat for more
    """
    input, output, err = input or sys.stdin, output or sys.stdout, err or sys.stderr
    tok = tokenizer
    where = f"{model.name_or_path}: " if getattr(model, "name_or_path", None) else ""
    if tok is None:
        raise UserError(f"{where}the checkpoint has no tokenizer (tokenizer.json); chat needs one")
    if not tok.chat_template:
        raise UserError(f"{where}the tokenizer has no chat template; chat needs one (see lmforge tokenizer)")
    params = params or SamplingParams()
    ctx = model.config.max_seq_len
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    interactive = hasattr(input, "isatty") and input.isatty()
    if interactive:
        print(f"lmforge chat: {HELP}", file=err)
    while True:
        if interactive:
            output.write("> ")
            output.flush()
        line = input.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() == "/quit":
            break
        if text.strip() == "/reset":
            messages = list(base)
            print("(conversation reset)", file=err, flush=True)
            continue
        if text.strip().startswith("/") and text.strip() in ("/help", "/?"):
            print(HELP, file=err, flush=True)
            continue
        ids, kept, dropped = fit_conversation(
            tok,
            [*messages, {"role": "user", "content": text}],
            params.max_new_tokens,
            ctx,
            tools,
            **(template_kwargs or {}),
        )
        if ids is None:
            print(
                f"(message not sent: it alone is too long for the model's context of {ctx} tokens with "
                f"max_new_tokens={params.max_new_tokens})",
                file=err,
                flush=True,
            )
            continue
        if dropped:
            print(
                f"(dropped the {dropped} oldest message(s) to stay within the model's context of {ctx} tokens)",
                file=err,
                flush=True,
            )
        reply = []
        for piece in stream(model, tok, ids, params, draft=draft):
            output.write(piece)
            output.flush()
            reply.append(piece)
        output.write("\n")
        output.flush()
        messages = [*kept, {"role": "assistant", "content": "".join(reply)}]
