"""Command-line options derived from code, so that the help cannot drift from it (litgpt's way).

Two sources, one set of rules:
- a dataclass: each field's docstring (the string written under it, read with `ast`) is its help;
- a function: its signature and the `Args:` section of its Google-style docstring:

      def quantize(checkpoint: str, out: str, group_size: int = 64, keep_float: tuple[str, ...] = ()):
          '''One-line summary.

          Args:
              group_size: int4: inputs per (scale, zero) group
              keep_float: parts to leave in float: embeddings, lm_head
          '''

Types: `bool` is a flag (`--x`; `--no-x`, "do not <help>", when the default is True); `Literal[...]` gives choices;
`int`/`float` are typed; `X | None` is X; `tuple[T, ...]` is comma-separated (`--keep-float a,b`); a
list, tuple or dict whose help says "repeatable" takes one item per use (`--stop A --stop B`; dict items
as KEY=VALUE). "(default: X)" is added to the help unless it already speaks of the default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass
from functools import cache

import yaml

from lmforge.utils import UserError

REQUIRED = MISSING  # Option.default of a parameter without one


# ---------------------------------------------------------------------------------------------- docs
@cache
def field_docs(cls) -> dict[str, str]:
    """{field: docstring} from the string literal written under each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def arg_docs(fn) -> dict[str, str]:
    """{parameter: help} from the `Args:` section of a Google-style docstring (continuation lines are
    indented deeper than the `name:` line they continue)."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(fn.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:"))
    except StopIteration:
        return docs
    name, indent = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section (Returns:, ...)
            break
        m = re.match(r"\s*(\*{0,2}\w+)(?:\s*\([^)]*\))?:\s*(.*)", line)
        if m and (indent is None or depth <= indent):
            name, indent = m.group(1).lstrip("*"), depth
            docs[name] = m.group(2).strip()
        elif name is not None:
            docs[name] = f"{docs[name]} {line.strip()}".strip()
    return docs


def summary(fn) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].split())


# ---------------------------------------------------------------------------------------------- types
@cache
def hints(obj) -> dict:
    """Evaluated annotations of a function or dataclass; one that cannot be evaluated (a name imported
    only for type checkers) is left as its string: such a parameter is not a command-line option."""
    try:
        return typing.get_type_hints(obj)
    except (NameError, TypeError, AttributeError):
        pass
    target = obj.__init__ if isinstance(obj, type) and not hasattr(obj, "__dataclass_fields__") else obj
    namespace = vars(inspect.getmodule(obj))
    out = {}
    for k, v in getattr(target, "__annotations__", {}).items():
        try:
            out[k] = eval(v, namespace) if isinstance(v, str) else v  # noqa: S307 - our own annotations
        except Exception:  # noqa: BLE001 - see the docstring
            out[k] = v
    return out


def is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _plain(tp):
    """X for `X | None` (the first member of a union); tp otherwise."""
    if is_union(tp):
        return [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def _sequence_item(tp):
    """T for list[T] / tuple[T, ...]; None when tp is not such a sequence."""
    tp = _plain(tp)
    if typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _is_dict(tp) -> bool:
    tp = _plain(tp)
    return tp is dict or typing.get_origin(tp) is dict


# ---------------------------------------------------------------------------------------------- coercion
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def coerce(value, tp, where: str):
    """Convert a YAML value or a command-line string to the field's type, or raise a UserError naming it."""
    if is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        return coerce(value, args[0], where)
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, int):
                return value
            s = str(value).strip().replace("_", "")
            m = re.fullmatch(r"([0-9.eE+-]+)\s*([kKmMbBgGtT]?)", s)
            if not m:
                raise ValueError("expected an integer (suffixes k, M, B allowed)")
            x = float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1)
            if x != int(x):
                raise ValueError("expected a whole number")
            return int(x)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = (
                    [v.strip() for v in value.split(",") if v.strip()]
                    if not value.startswith("[")
                    else yaml.safe_load(value)
                )
            if not isinstance(value, (list, tuple)):
                raise ValueError("expected a list")
            (item,) = typing.get_args(tp) or (str,)
            return [coerce(v, item, where) for v in value]
        if tp is dict or origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError("expected a mapping, e.g. {rope_type: linear, factor: 2.0}")
            return dict(value)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"{where}={value!r}: {e}") from None
    return value


def key_values(items: list[str], flag: str = "--option", metavar: str = "KEY=VALUE", key=str, value=None):
    """Repeated KEY=VALUE items -> {key(KEY): value(VALUE)}; without `value`, VALUE is read as JSON when
    it parses (false, 3, [1, 2]) and kept as the string otherwise."""
    out = {}
    example = {"KEY=VALUE": "enable_thinking=false", "ID=BIAS": "50256=-100", "NAME=DIR": "reverse=runs/lora"}
    for item in items:
        k, eq, v = item.partition("=")
        try:
            if not eq or not k.strip():
                raise ValueError
            if value is not None:
                parsed = value(v)
            else:
                try:
                    parsed = json.loads(v)
                except ValueError:
                    parsed = v
            out[key(k.strip())] = parsed
        except ValueError:
            eg = example.get(metavar)
            raise UserError(f"{flag} {item!r}: expected {metavar}" + (f", e.g. {eg}" if eg else "")) from None
    return out


# ---------------------------------------------------------------------------------------------- help
def metavar(tp) -> str:
    """The train config's metavars: N, X, STR, BOOL, A,B, YAML."""
    tp = _plain(tp)
    if tp is bool:
        return "BOOL"
    if typing.get_origin(tp) is list:
        return "A,B"
    return {int: "N", float: "X", str: "STR", dict: "YAML"}.get(tp, "V")


def fmt_default(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items()) or "none"
    return "none" if v is None else str(v)


def with_default(doc: str, default, show: bool = True) -> str:
    """argparse help: '%' escaped, "(default: X)" added unless the text already speaks of it."""
    show = show and "default" not in doc and default is not REQUIRED
    return doc.replace("%", "%%") + (f" (default: {fmt_default(default)})" if show else "")


def add_field(group, flags, dest, tp, doc, default, show_default=True) -> None:
    """One dataclass-field option of the train config: default SUPPRESS (only what the user typed
    overrides the YAML file), the value a string that `coerce` converts; a bool takes an optional value."""
    kw = dict(dest=dest, default=argparse.SUPPRESS, help=with_default(doc, default, show_default))
    kw["metavar"] = metavar(tp)
    if _plain(tp) is bool:  # (bool | None: none means "decided for you")
        kw.update(nargs="?", const="true")
    group.add_argument(*flags, **kw)


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One command-line option (or positional) for one parameter or field."""

    name: str  # the parameter
    flags: tuple[str, ...]  # ("--max-new-tokens",); () for a positional
    tp: object
    default: object  # REQUIRED when the command line must give it
    help: str
    metavar: str | None = None

    @property
    def repeat(self) -> bool:
        return bool(re.search(r"\brepeat", self.help)) and (
            _sequence_item(self.tp) is not None or _is_dict(self.tp)
        )

    @property
    def flag(self) -> str:
        return self.flags[0] if self.flags else self.name

    def add_to(self, parser) -> None:
        tp, default = _plain(self.tp), self.default
        # an empty default (None, off, nothing) goes without saying on the command line
        kw: dict = {"help": with_default(self.help, default, default not in (None, "", (), [], {}))}
        if not self.flags:  # a positional; an optional one (`lmforge info [CHECKPOINT]`) has a default
            if default is not REQUIRED:
                kw.update(nargs="?", default=default)
            parser.add_argument(self.name, **kw)
            return
        kw["dest"] = self.name
        if default is REQUIRED:
            kw["required"] = True
        else:
            kw["default"] = default
        if tp is bool:
            kw["action"] = "store_false" if default is True else "store_true"
            kw["help"] = ("do not " if default is True else "") + self.help.replace("%", "%%")
            kw.pop("required", None)
            parser.add_argument(*self.flags, **kw)
            return
        if typing.get_origin(tp) is typing.Literal:
            choices = list(typing.get_args(tp))
            kw.update(choices=choices, type=type(choices[0]))
        elif self.repeat:
            kw.update(action="append", metavar=self.metavar or ("KEY=VALUE" if _is_dict(tp) else None))
            kw["default"] = None if default is REQUIRED else []
            item = _sequence_item(tp)
            if item in (int, float):
                kw["type"] = item
        elif _sequence_item(tp) is not None:
            kw["metavar"] = self.metavar or "A,B"
        elif tp in (int, float):
            kw.update(type=tp, metavar=self.metavar or metavar(tp))
        if "metavar" not in kw and self.metavar:
            kw["metavar"] = self.metavar
        parser.add_argument(*self.flags, **kw)

    def value(self, given):
        """The parameter's value from what argparse parsed."""
        if self.repeat and _is_dict(self.tp):
            k, v = (typing.get_args(_plain(self.tp)) or (str, None))[:2] or (str, None)
            conv = None if v in (None, typing.Any, object) else v
            return key_values(given or [], self.flag, self.metavar or "KEY=VALUE", key=k, value=conv)
        item = _sequence_item(self.tp)
        if item is not None and isinstance(given, str):  # comma-separated
            try:
                given = [item(x.strip()) for x in given.split(",") if x.strip()]
            except ValueError:
                raise UserError(
                    f"{self.flag} {given!r}: expected comma-separated {item.__name__} values"
                ) from None
        if item is not None and given is not None and typing.get_origin(_plain(self.tp)) is tuple:
            given = tuple(given)
        return given


def function_options(
    fn,
    *,
    positionals=(),
    skip=(),
    flags: dict | None = None,
    defaults: dict | None = None,
    required=(),
    metavars: dict | None = None,
    shared_help: dict | None = None,
) -> list[Option]:
    """The options of `fn`'s parameters (but `skip`, *args and **kwargs), help from its `Args:`
    section (else `shared_help`); a parameter without help is a mistake the caller must see."""
    flags, defaults, metavars, shared_help = flags or {}, defaults or {}, metavars or {}, shared_help or {}
    docs, tps, out = arg_docs(fn), hints(fn), []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        doc = docs.get(p.name) or shared_help.get(p.name)
        if not doc:
            raise TypeError(f"{fn.__module__}.{fn.__qualname__}: parameter {p.name!r} has no `Args:` line")
        default = p.default if p.default is not p.empty else REQUIRED
        default = defaults.get(p.name, REQUIRED if p.name in required else default)
        names = ()
        if p.name not in positionals:
            names = tuple(flags.get(p.name, "").split()) or (_flag(p.name, default),)
        out.append(Option(p.name, names, tps.get(p.name, str), default, doc, metavars.get(p.name)))
    return out


def dataclass_options(cls, *, skip=(), metavars: dict | None = None) -> list[Option]:
    """The options of a dataclass's fields (but `skip`), help from the fields' docstrings."""
    docs, tps, metavars = field_docs(cls), hints(cls), metavars or {}
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if not docs.get(f.name):
            raise TypeError(f"{cls.__qualname__}.{f.name} has no docstring")
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append(
            Option(
                f.name, (_flag(f.name, default),), tps[f.name], default, docs[f.name], metavars.get(f.name)
            )
        )
    return out


def _flag(name: str, default) -> str:
    return f"--{'no-' if default is True else ''}{name.replace('_', '-')}"


def values(ns: argparse.Namespace, options: list[Option]) -> dict:
    """{parameter: value} of `options` from parsed arguments."""
    return {o.name: o.value(getattr(ns, o.name)) for o in options}
