"""The `lmforge` command line: a table of commands, each one function of the package.

A command's options come from its function (lmforge/options.py): the signature gives the names,
types and defaults, the `Args:` lines of its docstring the help. A new option is one parameter with
one docstring line. The table says what the code cannot: the command's name, help and examples,
which parameters are positional, which are not options (`hidden`), and the rare option whose name
is not the parameter's. Some parameters are resolved by the plumbing below rather than typed:
`model, tokenizer` come from a CHECKPOINT path (`lmforge.load`, with --device and --dtype),
`params` from the SamplingParams fields, `cfg` / `config, overrides` from the training options.

Only the chosen command's function is imported (`lmforge --help` imports nothing heavy). User errors
(`UserError`, missing files) print one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------- table
_TRAIN_HELP = """\
Options read the same on the command line and in a YAML recipe (--config): `--train.lr 3e-4` is
`train: {lr: 3e-4}`. Precedence: defaults < the run's saved config.yaml (with --resume) < --config < options.
Under torchrun, `--parallel ddp|fsdp` trains on every process (NCCL on GPU, gloo on CPU)."""


@dataclass(frozen=True)
class Command:
    name: str
    target: str  # "module:function" that the command calls; "" for a command with actions
    help: str
    examples: tuple[str, ...]
    description: str = ""  # the --help text above the options (default: help)
    positionals: tuple[str, ...] = ()  # parameters given without a flag, in this order
    hidden: tuple[str, ...] = ()  # parameters the command line does not set
    flags: dict[str, str] = field(default_factory=dict)  # parameter -> its flags, where not --the-name
    defaults: dict[str, object] = field(
        default_factory=dict
    )  # the command line's default, where not the function's
    required: tuple[str, ...] = ()  # options that must be given although the function has a default
    metavars: dict[str, str] = field(default_factory=dict)
    task: str = ""  # training commands: the RunConfig task (pretrain or sft)
    checkpoint: str = ""  # what the CHECKPOINT positional must hold, after "an lmforge or HF model directory"
    usage: str | None = None
    actions: tuple[Command, ...] = ()  # `lmforge data prepare`, `lmforge data info`


_SOURCE_DEFAULT = {"data": "python-docs"}

COMMANDS: tuple[Command, ...] = (  # the order of `lmforge --help`
    Command(
        "quickstart",
        "lmforge.quickstart:quickstart",
        "build a first model end to end on the embedded corpora (python-docs + python-stdlib)",
        ("lmforge quickstart", "lmforge quickstart --fresh", "lmforge quickstart --steps 20 --no-export"),
    ),
    Command(
        "tokenizer",
        "",
        "train a byte-level BPE tokenizer, or inspect one",
        (
            "lmforge tokenizer train --data python-docs --vocab-size 8192 --out runs/tok",
            "lmforge tokenizer encode --tokenizer runs/tok 'Hello, world!'",
        ),
        actions=(
            Command(
                "train",
                "lmforge.data.tokenize_corpus:train_tokenizer_on",
                "train a byte-level BPE tokenizer (GPT-4 split regex, chat special tokens)",
                (
                    "lmforge tokenizer train --data python-docs --vocab-size 8192 --out runs/tok",
                    "lmforge tokenizer train --data 'corpus/*.jsonl' --text-field body --vocab-size 32768 --out tok32k",
                    "lmforge tokenizer train --data c4 --max-docs 200000 --vocab-size 32768 --out tok-c4",
                ),
                description="Train a byte-level BPE tokenizer with the Hugging Face tokenizers library and "
                "write tokenizer.json + tokenizer_config.json (loadable by transformers.AutoTokenizer). "
                "The validation split of the documents is held out and used to report compression.",
                hidden=("special_tokens", "verbose"),
                flags={"model_max_length": "--max-length"},
                defaults=_SOURCE_DEFAULT,
                required=("out",),
            ),
            Command(
                "encode",
                "lmforge.tokenizer:print_encoding",
                "show how a tokenizer splits a text (ids, tokens, bytes per token)",
                ("lmforge tokenizer encode --tokenizer runs/tok 'def f(x): return x'",),
                positionals=("text",),
            ),
        ),
    ),
    Command(
        "data",
        "",
        "prepare token shards from text sources, or describe them",
        (
            "lmforge data prepare --data python-docs --tokenizer runs/tok --out runs/data",
            "lmforge data info runs/data",
        ),
        actions=(
            Command(
                "prepare",
                "lmforge.data.prepare:prepare",
                "tokenize documents into uint16/uint32 shards with a train/validation split",
                (
                    "lmforge data prepare --data python-docs --tokenizer runs/tok --out runs/data",
                    "lmforge data prepare --data ~/c4/en/ --tokenizer runs/tok --out data/c4 --workers 8",
                    "lmforge data prepare --data c4 --max-docs 1000000 --tokenizer runs/tok --out data/c4-1m",
                    "lmforge data prepare --data 'books/*.txt' --tokenizer runs/tok --out data/books",
                ),
                description="Stream documents, drop exact duplicates, split train/validation by content "
                "hash, tokenize in parallel (BOS + text + EOS per document) and write memmap shards plus "
                "meta.json. A finished preparation of the same input and tokenizer is reused; a failed "
                "run leaves the previous one untouched.",
                hidden=("verbose", "dtype"),
                defaults=_SOURCE_DEFAULT,
            ),
            Command(
                "info",
                "lmforge.data.info:describe",
                "describe a prepared shard directory, or count the documents of a source",
                (
                    "lmforge data info runs/data",
                    "lmforge data info python-docs",
                    "lmforge data info 'notes/*.md'",
                ),
                positionals=("path",),
            ),
        ),
    ),
    Command(
        "pretrain",
        "lmforge.train:train",
        "train a language model from scratch on token shards",
        (
            "lmforge pretrain --config configs/tiny-cpu.yaml",
            "lmforge pretrain --data.path data/pydocs --data.tokenizer runs/tok --model.size tiny --train.max_steps 2000",
            "lmforge pretrain --config configs/tiny-cpu.yaml --time-budget 10m",
            "lmforge pretrain --name tiny --resume auto          # continue after a stop or crash",
            "torchrun --nproc-per-node 8 -m lmforge pretrain --config configs/gpu-125m.yaml --parallel fsdp",
        ),
        hidden=("data", "loss_fn"),
        task="pretrain",
    ),
    Command(
        "finetune",
        "lmforge.train:train",
        "supervised fine-tuning on chat data (loss on assistant tokens only)",
        (
            "lmforge finetune --model.init_from runs/tiny/final --data.path chat.jsonl --train.max_steps 300",
            "lmforge finetune --config configs/sft-lora.yaml --model.init_from ./my-hf-llama --lora.rank 16",
            "lmforge finetune --model.init_from runs/tiny/final --data.path chat.jsonl --train.freeze_embeddings",
            "lmforge merge-lora runs/sft-final/final --out runs/sft-merged",
        ),
        hidden=("data", "loss_fn"),
        task="sft",
    ),
    Command(
        "merge-lora",
        "lmforge.train.lora:merge_lora_command",
        "fold a LoRA adapter into its base model: a plain Hugging Face directory",
        (
            "lmforge merge-lora runs/sft-lora/final --out runs/sft-merged",
            "lmforge merge-lora runs/sft-lora/checkpoints/step_000300 --base ./my-hf-llama --out merged --dtype bf16",
        ),
        positionals=("adapter",),
    ),
    Command(
        "generate",
        "lmforge.infer.console:print_generation",
        "generate text from a checkpoint (streamed for a single prompt)",
        (
            "lmforge generate runs/quickstart/final --prompt 'def fibonacci(n):' --temperature 0",
            "lmforge generate ckpt --prompt 'Once upon a time' --num-samples 3 --top-p 0.9 --seed 0",
            "lmforge generate ckpt --prompt 'a' --prompt 'b' --max-new-tokens 64 --stop '\\n\\n'",
            "lmforge generate ckpt --prompt 'x = ' --draft small-ckpt --temperature 0",
            "cat long.txt | lmforge generate ckpt --prompt - --truncate left",
        ),
        metavars={"kv_cache_memory": "SIZE"},
        checkpoint=" with a tokenizer",
    ),
    Command(
        "chat",
        "lmforge.infer.chat:chat",
        "chat with a checkpoint in the terminal (chat template, streamed replies)",
        (
            "lmforge chat runs/sft/final",
            "lmforge chat ckpt --system 'You answer briefly.' --temperature 0.7 --top-p 0.9",
            "printf 'hello\\n/reset\\nhi\\n' | lmforge chat ckpt --temperature 0",
        ),
        description="Chat with a checkpoint. Type a message and press enter; /reset starts a new "
        "conversation, /quit (or Ctrl-D) leaves. The oldest turns are dropped, with a note, when the "
        "conversation outgrows the model's context.",
        hidden=("input", "output", "err", "tools", "num_samples"),
        flags={"template_kwargs": "--template-kwarg"},
        checkpoint=" whose tokenizer has a chat template",
    ),
    Command(
        "evaluate",
        "lmforge.evaluate.console:print_evaluation",
        "loss, perplexity, bits per byte and accuracy on data; task accuracy; robustness",
        (
            "lmforge evaluate runs/quickstart/final --data python-docs --max-tokens 50000",
            "lmforge evaluate ckpt --data runs/data                 # a `data prepare` dir: its val split",
            "lmforge evaluate ckpt --data notes.txt --split all --out results.json",
            "lmforge evaluate ckpt --task hellaswag_val.jsonl --task arithmetic.jsonl",
            "lmforge evaluate ckpt --task arc_easy.jsonl --robustness --seed 0",
        ),
        description="Evaluate a checkpoint. --data: loss, perplexity, bits per byte (tokenizer-independent) "
        "and next-token accuracy over every document of the held-out split, in windows no longer than the "
        "model's context (nothing is truncated). --task: multiple choice by log-likelihood (acc, acc_norm) "
        "or generation with exact match, from JSONL files; --robustness repeats each task under seeded "
        "perturbations of the inputs (typos, case, whitespace). See docs/evaluation.md.",
        checkpoint=" with a tokenizer",
    ),
    Command(
        "bench",
        "lmforge.evaluate.console:print_bench",
        "speed of a checkpoint: prefill/decode tokens/s, time to first token, memory, roofline",
        (
            "lmforge bench runs/quickstart/final",
            "lmforge bench ckpt --batch-sizes 1,8,32 --prompt-len 512 --new-tokens 128 --json",
            "lmforge bench ckpt --dtype bf16 --out bench.json",
            "lmforge bench ckpt --quick",
        ),
        description="Benchmark a checkpoint through the inference engine at several batch sizes: prefill "
        "and decode tokens/s, time to first token, peak memory, size on disk, and the share of the "
        "memory-bandwidth roofline decode reaches (bandwidth measured in the same run; a decode step reads "
        "the weights plus the KV cache). On GPU also the prefill MFU against the measured matmul peak.",
        flags={"as_json": "--json"},
    ),
    Command(
        "report",
        "lmforge.evaluate.report:compare_checkpoints",
        "compare variants of a model (fp32, bf16, quantized, pruned, ...) in a table and plots",
        (
            "lmforge report runs/q/final runs/q/bf16 runs/q/int8 --data python-docs --out runs/q/report",
            "lmforge report a b --names teacher,student --data runs/data --max-tokens 20000 --out cmp",
        ),
        description="Evaluate and benchmark each checkpoint on the same data (same documents, same token "
        "budget) and write report.md (size, parameters, bits per byte, perplexity, decode speed, memory), "
        "report.json and two plots: quality against size and quality against speed.",
        positionals=("checkpoints",),
        hidden=("prompt_len", "echo"),
        defaults={"data": "python-docs", "progress": True, "echo": True},
    ),
    Command(
        "inspect",
        "lmforge.evaluate.console:print_inspection",
        "see what a model does with a prompt: per-token loss, attention maps, next tokens, RoPE",
        (
            "lmforge inspect runs/quickstart/final --prompt 'def add(a, b):' --out runs/inspect",
            "lmforge inspect ckpt --prompt 'The capital of France is' --layers 0,5 --top-k 20 --out pics",
        ),
        description="Run a prompt through the model and write pictures: token_loss.png (which tokens "
        "surprised the model), attention_layer_NN.png (attention probabilities of every head), "
        "next_token.png (top next-token candidates), rope.png (RoPE frequency tables), plus inspect.json "
        "with the numbers.",
        checkpoint=" with a tokenizer",
    ),
    Command(
        "quantize",
        "lmforge.compress.quantize:quantize",
        "weight-only int8 / int4 quantization: a smaller checkpoint that loads and runs everywhere",
        (
            "lmforge quantize runs/tiny/final --method int8 --out runs/tiny-int8",
            "lmforge quantize runs/tiny/final --method int4 --group-size 64 --out runs/tiny-int4",
            "lmforge quantize runs/tiny/final --method int4 --calibration-data python-docs --out runs/tiny-gptq",
            "lmforge quantize ckpt --method int8 --keep-float embeddings,lm_head --out ckpt-int8-linear",
            "lmforge report runs/tiny/final runs/tiny-int8 runs/tiny-int4 --out runs/q-report",
        ),
        description="Quantize the linear layers of every block (and the output projection, when it is not "
        "tied) to int8 (per output channel, symmetric) or int4 (groups of --group-size inputs, a scale and a "
        "zero per group, two codes per byte), and the embedding table to int8 rows. Round to nearest, or "
        "GPTQ with --calibration-data. The result is a checkpoint directory (config.json records "
        "quantization_config) that generate, chat, evaluate, bench, report and serve load directly; on CPU "
        "and CUDA it runs on PyTorch's int8/int4 matmul kernels. Ends with size, bits per byte and decode "
        "speed before and after. See docs/compression.md.",
        positionals=("checkpoint",),
        hidden=("log",),
        required=("method",),
    ),
    Command(
        "prune",
        "lmforge.compress.prune:prune",
        "remove weights (unstructured, 2:4) or whole heads / FFN channels, optionally recover by fine-tuning",
        (
            "lmforge prune runs/tiny/final --method magnitude --sparsity 0.5 --out runs/tiny-50",
            "lmforge prune runs/tiny/final --method wanda --structure 2:4 --out runs/tiny-24",
            "lmforge prune runs/tiny/final --method wanda --structure ffn --sparsity 0.25 --out runs/tiny-ffn",
            "lmforge prune runs/tiny/final --structure heads --sparsity 0.25 --recover-steps 200 "
            "--data runs/data --out runs/tiny-heads",
        ),
        description="Unstructured and 2:4 pruning zero weights of the block linear layers (masks; the "
        "checkpoint stays dense, with zeros). Structured pruning removes whole KV groups of attention heads "
        "or FFN channels and writes a physically smaller Hugging Face model (n_heads, n_kv_heads or d_ff "
        "changed in config.json). Importance is |W| (magnitude) or |W| x ||X|| over calibration activations "
        "(wanda). --recover-steps fine-tunes the result through the training loop, keeping pruned weights "
        "at zero. Ends with size, bits per byte and decode speed before and after.",
        positionals=("checkpoint",),
        hidden=("log", "calibration_seq_len"),
    ),
    Command(
        "distill",
        "lmforge.compress.distill:distill",
        "train a student model on a teacher's predictions (knowledge distillation)",
        (
            "lmforge distill --teacher runs/tiny/final --student debug --data python-docs --train.max_steps 500",
            "lmforge distill --teacher runs/tiny/final --student llama:debug --data runs/data --alpha 0.9 -T 4",
            "lmforge distill --teacher big/final --student small/final --data runs/data --config configs/tiny-cpu.yaml",
            "lmforge distill --teacher runs/tiny/final --student debug --data runs/data --resume auto",
        ),
        description="train a student model on a teacher's predictions (knowledge distillation). The student "
        "learns from alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the data, "
        "where _T means softmax(logits / T), through the training loop: every training option below works "
        "(checkpoints, --resume, logging, torchrun). Teacher and student must share the tokenizer. Ends "
        "with size, bits per byte and decode speed of teacher and student.",
        hidden=("log",),
        flags={"temperature": "-T --temperature"},
        defaults={"data": None},
        usage="lmforge distill --teacher CKPT --student PRESET|CKPT --data DATA [--section.option VALUE ...]",
    ),
    Command(
        "export",
        "lmforge.export.console:export_and_print",
        "export a checkpoint to ONNX (onnxruntime), GGUF (llama.cpp) or Ollama",
        (
            "lmforge export runs/quickstart/final --format onnx --with-cache",
            "lmforge export runs/quickstart/final --format gguf --dtype q8_0 --out model-q8.gguf",
            "lmforge export runs/quickstart/final --format ollama --out my-model",
            "ollama create my-model -f my-model/Modelfile",
        ),
        description="Export a checkpoint directory. onnx writes a directory with model.onnx (input_ids + "
        "attention_mask -> logits) and, with --with-cache, model_with_past.onnx (a KV-cache decoder step), "
        "checked against PyTorch in onnxruntime before it is kept. gguf writes one llama.cpp file (every "
        "family but original GPT) with the tokenizer and chat template, or a LoRA adapter GGUF when "
        "CHECKPOINT is an adapter directory. ollama writes a directory with the GGUF file(s) and a "
        "Modelfile. Output is written atomically. See docs/export.md.",
        positionals=("checkpoint",),
    ),
    Command(
        "serve",
        "lmforge.serve.app:serve",
        "serve a checkpoint over an OpenAI-compatible HTTP API with a web chat page",
        (
            "lmforge serve runs/quickstart/final",
            'lmforge serve runs/sft/final --port 8080 --api-key "$(cat key.txt)" --max-batch 16',
            "lmforge serve base/ --lora reverse=runs/sft-lora/final --lora poet=runs/poet-lora/final",
            "lmforge serve ckpt --host 0.0.0.0 --cors-origins https://example.com --model-name tiny",
            "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
            '-d \'{"messages": [{"role": "user", "content": "hi"}]}\'',
        ),
        description="Serve a checkpoint with FastAPI + uvicorn: /v1/models, /v1/completions and "
        "/v1/chat/completions (streaming as Server-Sent Events, as OpenAI clients expect), /tokenize, "
        "/detokenize, /health, /metrics (Prometheus) and a web chat page at /. Requests are decoded together "
        "by continuous batching. SIGINT/SIGTERM stops taking requests and lets the running ones finish. "
        "See docs/serving.md.",
        positionals=("checkpoint",),
        flags={
            "loras": "--lora",
            "keep_alive_timeout": "--timeout-keep-alive",
            "header_timeout": "--timeout-header",
            "body_timeout": "--timeout-body",
        },
        metavars={"loras": "NAME=DIR", "cors_origins": "ORIGIN", "kv_cache_memory": "SIZE"},
    ),
    Command(
        "info",
        "lmforge.info:print_info",
        "describe a checkpoint: family, architecture switches, parameters, size, dtype, context, config; "
        "without a checkpoint, the families lmforge reads and what each switches on",
        ("lmforge info runs/quickstart/final", "lmforge info ./my-hf-llama --json", "lmforge info"),
        positionals=("checkpoint",),
        flags={"as_json": "--json"},
    ),
)

# Help of parameters that many command functions share, where a function's `Args:` has no line.
SHARED_HELP = {
    "checkpoint": "an lmforge or Hugging Face model directory",
    "device": "cuda, mps, cpu or auto (CUDA, then MPS, then CPU)",
    "dtype": "fp32, bf16 or fp16 (default: fp32 on CPU, the checkpoint's on GPU)",
    "text_field": "JSON/Parquet field that holds the text",
    "tokenizer": "directory with tokenizer.json (or the file itself)",
    "progress": "show progress bars",
}
# SamplingParams fields that are not options of generate/chat (the server's and the API's only).
SAMPLING_HIDDEN = ("logprobs", "prompt_logprobs", "grammar", "extra")
SAMPLING_METAVARS = {"logit_bias": "ID=BIAS", "stop": "TEXT"}


# --------------------------------------------------------------------------------------- resolvers
# Parameters the plumbing fills in from other options: name -> (add options, value). A resolver's
# value runs before the model loads when it is cheap (sampling parameters are checked first).
def _add_model(p, cmd: Command, opts) -> None:
    p.add_argument("checkpoint", help=SHARED_HELP["checkpoint"] + cmd.checkpoint)
    _derived(p, cmd, "device", "dtype")


def _derived(p, cmd: Command, *names) -> None:
    """--device / --dtype as plain options (their help from SHARED_HELP)."""
    from lmforge.options import Option

    for n in names:
        default = "auto" if n == "device" else None
        Option(n, (f"--{n}",), str if n == "device" else str | None, default, SHARED_HELP[n]).add_to(p)


def _load(ns, kwargs) -> None:
    import lmforge

    lm = lmforge.load(ns.checkpoint, device=ns.device, dtype=ns.dtype)
    kwargs["model"], kwargs["tokenizer"] = lm.model, lm.tokenizer
    if getattr(ns, "draft", None):  # speculative decoding: a model on the same device, in the same dtype
        w = lm.model.tok_emb.weight
        kwargs["draft"] = lmforge.load(ns.draft, device=str(w.device), dtype=w.dtype).model


def _sampling_options(cmd: Command):
    from lmforge.infer.sampling import SamplingParams
    from lmforge.options import dataclass_options

    skip = SAMPLING_HIDDEN + tuple(h for h in cmd.hidden)
    return dataclass_options(SamplingParams, skip=skip, metavars=SAMPLING_METAVARS)


def _add_sampling(p, cmd: Command, opts) -> None:
    for o in _sampling_options(cmd):
        o.add_to(p)


def _sampling(ns, cmd: Command):
    from lmforge.infer.sampling import SamplingParams
    from lmforge.options import values

    return SamplingParams(**values(ns, _sampling_options(cmd)))


def _add_train_config(p, cmd: Command, opts) -> None:
    from lmforge.train.config import add_config_arguments

    add_config_arguments(p, skip=("task",))
    p.description = f"{p.description}\n\n{_TRAIN_HELP}"
    p.usage = cmd.usage or f"lmforge {cmd.name} [--config YAML] [--section.option VALUE ...]"


def _run_config(ns, cmd: Command):
    from lmforge.train.config import config_for_run, overrides_from_args

    return config_for_run(ns.config, overrides_from_args(ns), cmd.task)


def _overrides(ns, cmd: Command):
    from lmforge.train.config import overrides_from_args

    return overrides_from_args(ns)


def _add_no_eval(p, cmd: Command, opts) -> None:
    p.add_argument(
        "--no-eval", action="store_true", help="skip the before/after evaluation and speed test (size only)"
    )


def _add_models(p, cmd: Command, opts) -> None:
    p.add_argument("checkpoints", nargs="+", help="model directories to compare")
    _derived(p, cmd, "device", "dtype")


def _models(ns, cmd: Command):
    from lmforge.lm import load_each

    return load_each(ns.checkpoints, device=ns.device, dtype=ns.dtype)


# parameter -> (adds its options, its value from the parsed options; None: `_load` fills it in)
RESOLVERS = {
    "model": (_add_model, None),
    "tokenizer": (None, None),  # with model
    "draft": (None, None),  # with model: --draft is the function's own option, a path
    "params": (_add_sampling, _sampling),
    "models": (_add_models, _models),
    "cfg": (_add_train_config, _run_config),
    "config": (_add_train_config, lambda ns, cmd: ns.config),
    "overrides": (None, _overrides),
}


# --------------------------------------------------------------------------------------- plumbing
def _function(cmd: Command):
    module, name = cmd.target.split(":")
    return getattr(importlib.import_module(module), name)


def _options(cmd: Command, fn):
    """The function's parameters that are command-line options, and those the resolvers fill in."""
    import inspect

    from lmforge.options import function_options

    params = inspect.signature(fn).parameters
    takes_model = "model" in params
    resolved = [n for n in params if n in RESOLVERS and (n != "tokenizer" or takes_model)]
    if takes_model and "draft" in resolved:
        resolved.remove("draft")  # an option (a path); _load turns it into a model
    skip = set(cmd.hidden) | set(resolved)
    opts = function_options(
        fn,
        positionals=cmd.positionals,
        skip=skip,
        flags=cmd.flags,
        defaults=cmd.defaults,
        required=cmd.required,
        metavars={"draft": "CKPT", **cmd.metavars},
        shared_help=SHARED_HELP,
    )
    return opts, resolved


def _add_command(sub, cmd: Command, full: bool) -> None:
    p = sub.add_parser(
        cmd.name,
        help=cmd.help,
        description=cmd.description or cmd.help,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in cmd.examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if cmd.actions:
        p.set_defaults(func=lambda ns: p.print_help())
        ss = p.add_subparsers(dest="action", metavar="<action>")
        for a in cmd.actions:
            _add_command(ss, a, full)
        return
    p.set_defaults(command_row=cmd)
    if not full:
        return
    fn = _function(cmd)
    opts, resolved = _options(cmd, fn)
    positionals = [o for o in opts if not o.flags]
    positionals.sort(key=lambda o: cmd.positionals.index(o.name))
    added = set()
    for name in resolved:  # CHECKPOINT first, then the positionals, then options in signature order
        add = RESOLVERS[name][0]
        if add is not None and add not in added and name in ("model", "models"):
            add(p, cmd, opts)
            added.add(add)
    for o in positionals:
        o.add_to(p)
    for o in opts:
        if o.flags:
            o.add_to(p)
    for name in resolved:
        add = RESOLVERS[name][0]
        if add is not None and add not in added:
            add(p, cmd, opts)
            added.add(add)
    if "eval_data" in {o.name for o in opts}:
        _add_no_eval(p, cmd, opts)
    p.set_defaults(func=lambda ns: _call(cmd, fn, opts, resolved, ns))


def _call(cmd: Command, fn, opts, resolved, ns):
    from lmforge.options import values

    kwargs = values(ns, opts)
    kwargs.update((k, v) for k, v in cmd.defaults.items() if k in cmd.hidden)  # fixed by the command
    if getattr(ns, "no_eval", False):
        kwargs["eval_data"] = None
    for name in resolved:  # the cheap ones first: a bad sampling option fails before the model loads
        value = RESOLVERS[name][1]
        if value is not None:
            kwargs[name] = value(ns, cmd)
    if "model" in resolved:
        _load(ns, kwargs)
    return fn(**kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that command's options are derived (the others
    are listed by name and help, so `lmforge --help` imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: build language models end to end on your own hardware.\n"
        "tokenizer -> data -> pretrain -> finetune -> generate -> compress -> evaluate -> export -> serve",
        epilog="examples:\n  lmforge quickstart\n  lmforge info runs/quickstart/final\n  lmforge <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in COMMANDS:
        _add_command(sub, cmd, full=command is None or cmd.name == command)
    return parser


def _finish(result) -> int:
    """Exit status from what the function returned: text is printed; a training run stopped by a
    signal (its checkpoint written) exits with the usual status of that signal."""
    if isinstance(result, str):
        print(result)
    if isinstance(result, dict) and result.get("stopped") in ("SIGINT", "SIGTERM"):
        return 130 if result["stopped"] == "SIGINT" else 143
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = {c.name for c in COMMANDS}
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in names else "")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from lmforge.utils import UserError

    try:
        return _finish(args.func(args))
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
