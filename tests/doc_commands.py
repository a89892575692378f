"""Finds the shell commands that README.md and docs/*.md show, for tests/test_docs_commands.py.

A command is a line of a fenced code block:

- in a ```bash / ```sh / ```shell / ```console block, every line that is not blank or a comment;
- in a block without a language, a line after a `$ ` prompt (the rest of such a block is output),
  or a line whose first word is a program (`lmforge`, `python`, `torchrun`, `make`, `curl`, `docker`,
  ... see PROGRAMS); diagrams, file layouts and output are neither;
- a line ending in `\\`, or one inside an unclosed quote, continues on the next line;

plus inline code spans that run a benchmark script (`.venv/bin/python bench/...`), which is how
docs/benchmarks.md names the command behind each figure. Blocks in any other language (python, yaml,
json, ...) are not commands.
"""

from __future__ import annotations

import codecs
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
# First words that make a line of an unlabelled block a command. Lines of ```bash blocks are commands
# whatever their first word, so a program missing here is still caught there.
PROGRAMS = {
    "lmforge", "python", "python3", "torchrun", "make", "curl", "cat", "printf", "echo", "pip", "uv",
    "git", "cd", "export", "docker", "kubectl", "ollama", "llama-cli", "llama-server", "scp", "ssh",
    "gunzip", "gzip", "wget", "lm_eval", "lm-eval", "hf", "huggingface-cli", "ctr", "kind", "minikube",
    "bash", "sh", "ls", "uvicorn", "pytest",
}  # fmt: skip
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_INLINE = re.compile(r"`(\.venv/bin/python bench/[^`]+)`")


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository root
    line: int  # 1-based line of the command's first line
    text: str  # the command as shown, continuation lines joined, without the `$ ` prompt

    @property
    def id(self) -> str:
        short = self.text if len(self.text) <= 70 else self.text[:67] + "..."
        return f"{self.file}:{self.line}: {short}"


def doc_files() -> list[Path]:
    """README.md, then the docs pages in the order README.md's Documentation section lists them (a
    reader's order: data, training, fine-tuning, ...), then any page it does not list."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Documentation\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    linked = re.findall(r"\(docs/([\w.-]+\.md)\)", section.group(1) if section else readme)
    pages = [ROOT / "docs" / n for n in dict.fromkeys(linked) if (ROOT / "docs" / n).is_file()]
    return [ROOT / "README.md", *pages, *(p for p in sorted((ROOT / "docs").glob("*.md")) if p not in pages)]


def first_word(text: str) -> str:
    """The program a command line runs: the first word after any VAR=value prefixes."""
    for w in text.split():
        if not _ENV.match(w):
            return w
    return ""


def _complete(text: str) -> bool:
    """Whether a (joined) line is a whole command: no trailing backslash, no open quote."""
    if text.rstrip().endswith("\\"):
        return False
    try:
        split(text)
    except ValueError:
        return False
    return True


def _logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, text) with continuation lines joined (a trailing backslash or an open quote)."""
    out, i = [], 0
    while i < len(block):
        n, text = block[i]
        i += 1
        while not _complete(text) and i < len(block):
            nxt = block[i][1]
            text = (
                text.rstrip()[:-1].rstrip() + " " + nxt.strip()
                if text.rstrip().endswith("\\")
                else text + "\n" + nxt
            )
            i += 1
        out.append((n, text))
    return out


def _block_commands(lang: str, block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    lines = _logical_lines(block)
    if any(t.startswith("$ ") for _, t in lines):  # a session: prompts are commands, the rest output
        return [(n, t[2:].strip()) for n, t in lines if t.startswith("$ ")]
    cmds = []
    for n, t in lines:
        s = t.strip()
        if not s or s.startswith("#"):
            continue
        if lang in SHELL_LANGS or first_word(s) in PROGRAMS:
            cmds.append((n, s))
    return cmds


def extract(path: Path) -> list[DocCommand]:
    """Every command `path` shows, in document order."""
    return extract_text(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))


def extract_text(markdown: str, rel: str) -> list[DocCommand]:
    lines = markdown.splitlines()
    found: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```|~~~)\s*([\w+-]*)", lines[i])
        if not m:
            found += [(i + 1, c) for c in _INLINE.findall(lines[i])]
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        block = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            block.append((i + 1, lines[i]))
            i += 1
        i += 1  # the closing fence
        if lang in SHELL_LANGS or lang == "":
            found += _block_commands(lang, block)
    return [DocCommand(rel, n, t) for n, t in found]


def all_commands() -> list[DocCommand]:
    return [c for f in doc_files() for c in extract(f)]


# ------------------------------------------------------------------------------------- shell words
def _ansi_c(m: re.Match) -> str:
    """bash's $'...' quoting (backslash escapes), as an ordinary single-quoted shell word."""
    return shlex.quote(codecs.decode(m.group(1), "unicode_escape"))


def split(text: str) -> list[str]:
    """Shell words of a command: POSIX quoting, $'...' escapes, `# comments` dropped."""
    return shlex.split(re.sub(r"\$'((?:[^'\\]|\\.)*)'", _ansi_c, text), comments=True)


def expand(word: str, env: dict[str, str]) -> str:
    """$NAME, ${NAME} and a leading ~ as the shell expands them (from `env`)."""
    word = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), word)
    if word == "~" or word.startswith("~/"):
        word = env["HOME"] + word[1:]
    return word
