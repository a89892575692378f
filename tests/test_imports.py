"""Imports run one way: no module of lmforge/ imports (directly or through others) one that imports it.

Every import counts, function-local ones too (a local import that closes a circle only hides it).
Nothing is imported: strings and comments are blanked out of each file, a regex finds the import
statements left (at any indentation) and `ast` reads each of them. Parsing whole files with `ast`
would take most of a second for the package's megabyte of source; this takes a few milliseconds.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmforge"
# String literals (triple-quoted first) and comments: an import inside a docstring is an example.
_STRINGS_AND_COMMENTS = re.compile(
    r'"""(?:\\[\s\S]|[^\\])*?"""|\'\'\'(?:\\[\s\S]|[^\\])*?\'\'\'|"(?:\\[\s\S]|[^"\\\n])*"|\'(?:\\[\s\S]|[^\'\\\n])*\'|#[^\n]*'
)
# One import statement at the start of a line: `from X import (a,\n b)`, `from X import a`, `import a, b`.
_IMPORT = re.compile(
    r"^[ \t]*(from[ \t]+[.\w]+[ \t]+import[ \t]+(?:\([^)]*\)|[^\n;]*)|import[ \t]+[^\n;]*)", re.M
)


def import_statements(source: str) -> list[ast.stmt]:
    """Every import statement of `source`, module-level or nested in functions, classes, ifs, trys."""
    code = _STRINGS_AND_COMMENTS.sub(lambda m: "" if m[0][0] == "#" else '""', source)
    code = code.replace("\\\n", " ")  # line continuations
    return [ast.parse(m.group(1).strip()).body[0] for m in _IMPORT.finditer(code)]


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` (a package is named by its __init__)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `files` it imports. `from pkg import name` counts as importing pkg.name
    when that is a module, else pkg; an import of a.b.c that is not a module counts as its package."""

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in import_statements(path.read_text(encoding="utf-8")):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.add(full if full in files else known(base))
        graph[mod] = {t for t in targets if t is not None and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_finds_a_circle_and_its_members(tmp_path):
    # The checker itself, on a package made for it: a -> b -> c -> a (c's import is function-local and
    # relative; the import in its docstring is not one), d -> a (outside the circle), and pkg/__init__ -> e -> pkg.f (a package is not its modules).
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.e import x\n")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("from pkg import c\n")
    (pkg / "c.py").write_text(
        '"""Not code:\n    import pkg.d\n"""\n\n\ndef f():\n    from .a import (\n        g,\n    )\n'
    )
    (pkg / "d.py").write_text("from pkg.a import g\n")
    (pkg / "e.py").write_text("from pkg.f import y\n")
    (pkg / "f.py").write_text('X = """\\\nimport pkg.a\n"""\nimport os\n')
    graph = import_graph(module_files(pkg))
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg"] == {"pkg.e"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_lmforge_has_no_import_circles():
    files = module_files()
    assert len(files) > 50 and "lmforge.model" in files
    found = cycles(import_graph(files))
    assert not found, "import circles (each line: modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )
