"""Subprocess half of the python-docs builder: imports standard-library modules and dumps their docs.

Run as `python -I -S _pydocs_worker.py OUT.jsonl [SKIP ...]` by `lmforge.data.pydocs`, never imported
by lmforge itself: it uses the standard library only, so that `-I -S` (no site-packages, no user
paths) sees exactly the interpreter's own stdlib. Importing arbitrary modules is risky, hence the
separate process: the parent applies a timeout, and a module that hangs or crashes the interpreter
is added to SKIP and the build restarts. Each module is announced with a {"begin": name} line before
its import, so the parent can tell which one was at fault.

Output: JSON lines {"id": ..., "text": ...}, in a fixed order (sorted topics, then a sorted
depth-first walk of the modules; members sorted by name), so the corpus is the same on every run.
"""

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import re
import signal
import sys
import warnings

# Modules whose import has side effects (opens a browser or a window, prints, writes files,
# runs a program) or that are test suites or platform stubs without useful prose.
BLOCKED = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "idle_test",
    "__hello__", "__phello__", "__main__", "xxlimited", "xxlimited_35", "xxsubtype", "lib2to3",
    "readline", "msilib", "winreg", "winsound", "msvcrt", "nt", "ensurepip", "pydoc_data",
    "sitecustomize", "usercustomize", "site", "encodings", "idle", "venv",
}  # fmt: skip
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # reprs of default values carry memory addresses
MODULE_TIMEOUT = 10  # seconds for one module's import and doc extraction
MIN_CHARS = 64  # shorter documents ("class ast.Eq\n\nEq") carry no prose worth training on


def emit(out, doc_id, text):
    text = ADDRESS.sub("", text).strip()
    if len(text) >= MIN_CHARS:
        out.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")


def signature(name, obj):
    try:
        return name + ADDRESS.sub("", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return name


def own_doc(obj, base=object):
    """The object's docstring, unless it is the one it inherits (object.__init__'s, say)."""
    doc = inspect.getdoc(obj)
    name = getattr(obj, "__name__", None)
    if not doc or (name and doc == inspect.getdoc(getattr(base, name, None))):
        return None
    return doc


def defined_here(obj, modname):
    """Defined in this module, or in its C accelerator (`_json` for `json`)."""
    mod = getattr(obj, "__module__", None) or ""
    return mod == modname or mod.lstrip("_") == modname.rsplit(".", 1)[-1]


def class_doc(qual, cls):
    parts = [f"class {signature(qual, cls)}"]
    doc = own_doc(cls)
    if doc:
        parts.append(doc)
    for name, member in sorted(vars(cls).items()):
        if name.startswith("_") and name != "__init__" and name != "__call__":
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            doc = inspect.getdoc(member)
            if doc:
                parts.append(f"{qual}.{name} (property)\n{doc}")
            continue
        if not callable(member):
            continue
        doc = own_doc(member, type if name == "__init__" else object)
        if doc:
            parts.append(f"{qual}.{signature(name, member)}\n{doc}")
    return "\n\n".join(parts) if len(parts) > 1 else ""


def module_docs(out, modname, mod):
    parts = [f"Module {modname}"]
    doc = own_doc(mod)
    if doc:
        parts.append(doc)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or inspect.ismodule(obj) or not defined_here(obj, modname):
            continue
        if inspect.isclass(obj):
            emit(out, f"class:{modname}.{name}", class_doc(f"{modname}.{name}", obj))
        elif callable(obj):
            doc = own_doc(obj)
            if doc:
                parts.append(f"{modname}.{signature(name, obj)}\n{doc}")
    if len(parts) > 1:
        emit(out, f"module:{modname}", "\n\n".join(parts))


def on_alarm(signum, frame):
    raise TimeoutError("module took too long")


def walk(out, modname, skip):
    if modname in skip or modname.rsplit(".", 1)[-1] in BLOCKED:
        return
    out.write(json.dumps({"begin": modname}) + "\n")
    out.flush()
    if hasattr(signal, "alarm"):
        signal.alarm(MODULE_TIMEOUT)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mod = importlib.import_module(modname)
            module_docs(out, modname, mod)
    except BaseException:  # ImportError, platform errors, SystemExit from a module: skip it
        return
    finally:
        if hasattr(signal, "alarm"):
            signal.alarm(0)
    path = getattr(mod, "__path__", None)
    if path:
        for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
            if not info.name.startswith("_"):
                walk(out, f"{modname}.{info.name}", skip)


def main():
    out_path, skip = sys.argv[1], set(sys.argv[2:])
    warnings.simplefilter("ignore")
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
    with open(out_path, "w", encoding="utf-8") as out:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            emit(out, f"topic:{key}", topics[key])
        for name in sorted(sys.stdlib_module_names):
            if not name.startswith("_"):
                walk(out, name, skip)
        out.write(json.dumps({"done": True}) + "\n")


if __name__ == "__main__":
    main()
