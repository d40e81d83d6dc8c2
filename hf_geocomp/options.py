"""Config dataclasses as command-line options and recipe keys (in the style of transformers' HfArgumentParser).

A command's options are one dataclass, a subclass of :class:`Options`, defined beside the code that
runs it. Its field ``eval_tokens`` is the flag ``--eval-tokens`` and the recipe key ``eval_tokens``; a
``list`` field takes several values, a ``bool`` field is a switch, a field without a default is a
required flag, and every help ends with the field's default. Field metadata (see :func:`option`):

* ``help``: one line that never states the default (the help adds the field's own);
* ``aliases``: more flags for the same field (``-o``, ``--criterion``); ``positional``: no flag at all;
* ``nargs``: ``"*"`` where a list may be empty (otherwise ``"+"``: at least one value);
* ``choices``: the allowed values (shown in the usage);
* ``range``: an interval such as ``"[0, 1)"`` or ``"[1, inf)"``;
* ``metavar``: the name of the value in the help.

A subclass changes a field's default by declaring it again (``tokens: int = 2048``) and keeps its
metadata. Ranges, choices and non-empty lists are checked by :meth:`Options.__post_init__`, with a
:class:`GeoCompError` naming the field (the command line's one-sentence error); a whole-number flag
with a range is also read as such by argparse (``--batch-size 0``: "0 must be at least 1").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field

from .errors import GeoCompError


def option(default=MISSING, help: str | None = None, **meta):
    """A dataclass field with ``metadata={"help": help, **meta}``; a list default is copied for each instance."""
    if help is not None:
        meta["help"] = help
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class Options:
    """Base of every command's options: the output it writes, and what the command line adds (not options)."""

    output: str | None = option(None, "results JSON", aliases=["-o"])
    command: str | None = field(default=None, init=False, repr=False, compare=False)  # the subcommand that ran
    command_line: str | None = field(default=None, init=False, repr=False, compare=False)  # recorded in results
    overwrite: bool = field(default=False, init=False, repr=False, compare=False)  # --overwrite (never a recipe key)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.init:
                check_value(type(self), f.name, getattr(self, f.name))


@dataclass(kw_only=True)
class ModelOptions(Options):
    model: str = option("smollm2-135m", "bundled name (smollm2-135m, minilm-l6), model folder, .gguf file or Hub id")


@dataclass(kw_only=True)
class ModelDataOptions(ModelOptions):
    """A model and the calibration text its statistics come from."""

    data: str = option("shakespeare:calibration", "text source: shakespeare:<split|work+work>, pydoc[:split], "
                       "pystdlib[:split], file:<a+b>, hf:<ds>:<split>")
    tokens: int = option(4096, "calibration tokens", range="[1, inf)")
    block_size: int = option(256, "tokens per block", range="[1, inf)")
    batch_size: int = option(8, "blocks per forward pass", range="[1, inf)")


@dataclass(kw_only=True)
class EvalOptions(Options):
    """Held-out text, never calibrated on."""

    eval_data: str = option("shakespeare:evaluation", "held-out text")
    eval_tokens: int = option(4096, "held-out tokens scored", range="[1, inf)")


@dataclass(kw_only=True)
class ThreadsOption(Options):
    threads: int = option(1, "torch threads (1 is the fastest on a shared, busy CPU)", range="[1, inf)")


def metadata(cls, name: str) -> dict:
    """The metadata of field ``name`` of ``cls``, inherited from the classes that declared it before."""
    out = {}
    for klass in reversed(cls.__mro__):
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None:
            out.update(f.metadata)
    return out


def shape(hint) -> tuple[type, bool]:
    """(element type, whether a list) of a field's type hint; ``X | None`` is ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) in (list, tuple):
        return typing.get_args(hint)[0], True
    return hint, False


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def outside(value, interval: str) -> str | None:
    """``None`` if ``value`` lies in ``interval`` (``"[0, 1)"``, ``"[1, inf)"``), else what it must be."""
    low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])(.+),(.+)([\])])", interval.replace(" ", "")).groups()
    low, high = float(low), float(high)
    above = value >= low if low_bracket == "[" else value > low
    if above and (value <= high if high_bracket == "]" else value < high):
        return None
    if math.isinf(high):
        return f"at least {_number(low)}" if low_bracket == "[" else f"above {_number(low)}"
    return f"in {interval}"


def check_value(cls, name: str, value) -> None:
    """Raise a :class:`GeoCompError` naming field ``name`` if ``value`` breaks its range, choices or nargs."""
    meta = metadata(cls, name)
    if isinstance(value, (list, tuple)) and not value and meta.get("nargs", "+") == "+":
        raise GeoCompError(f"{name} must name at least one value.")
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None or isinstance(v, bool):
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise GeoCompError(f"{name} {v!r} does not exist; allowed: {', '.join(map(str, meta['choices']))}.")
        why = outside(v, meta["range"]) if "range" in meta and isinstance(v, (int, float)) else None
        if why:
            raise GeoCompError(f"{name} must be {why}, got {value}.")


def _arg_type(kind: type, interval: str | None):
    """An argparse type: ``kind``; for a whole number with a range, one inside it (a count, read as such)."""
    if interval is None or kind is not int:
        return kind

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        why = outside(value, interval)
        if why:
            raise argparse.ArgumentTypeError(f"{value} must be {why}")
        return value
    return convert


def default_of(f: dataclasses.Field):
    """The default value of a field (a fresh one from its factory), ``MISSING`` if it has none."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the help text already states it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default not in (None, False, [])
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


_FIRST, _LAST = ("model", "data", "tokens", "block_size", "batch_size"), ("threads", "output")


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` a command line or recipe sets, in the order of the help: model and data first, threads
    and output last, the rest in declaration order."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    return sorted(fields, key=lambda f: 0 if f.name in _FIRST else 2 if f.name in _LAST else 1)


def add_options(parser: argparse.ArgumentParser, cls, overwrite: bool = True) -> argparse.ArgumentParser:
    """Add one argument per field of the dataclass ``cls`` (in :func:`option_fields` order) and (``overwrite``)
    ``--overwrite``."""
    hints = typing.get_type_hints(cls)
    for f in option_fields(cls):
        meta = metadata(cls, f.name)
        kind, many = shape(hints[f.name])
        kwargs = {"help": meta.get("help"), "default": default_of(f)}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _arg_type(kind, meta.get("range"))
            if "choices" in meta:  # shown, but checked by __post_init__: one sentence naming the field
                kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
            if many:
                kwargs["nargs"] = meta.get("nargs", "+")
        if meta.get("positional"):
            parser.add_argument(f.name, **{k: v for k, v in kwargs.items() if v is not MISSING})
            continue
        if kwargs["default"] is MISSING:
            del kwargs["default"]
            kwargs["required"] = True
        parser.add_argument(f"--{f.name.replace('_', '-')}", *meta.get("aliases", ()), dest=f.name, **kwargs)
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(options=cls)
    return parser


def from_namespace(cls, ns: argparse.Namespace):
    """The ``cls`` instance of parsed arguments (its range checks run here), with ``--overwrite`` applied."""
    options = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init})
    options.overwrite = ns.overwrite
    return options


def summary(cls) -> str:
    """The first paragraph of ``cls``'s docstring, on one line (a subcommand's help)."""
    return _first_paragraph(cls.__doc__ or "")


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


@dataclass(frozen=True)
class Command:
    """A subcommand named without importing it: the module ``module`` (relative to ``hf_geocomp``, e.g.
    ``".studies.kv_bench"``) defines its options dataclass ``options`` and the function ``run`` that runs it.
    ``hf-geocomp --help`` reads each summary from the source (:meth:`summary`), so only the command that
    runs is imported (with torch and transformers behind it)."""

    module: str
    options: str
    run: str

    def load(self) -> tuple[type, typing.Callable]:
        """(options dataclass, function): imports the module."""
        import importlib

        module = importlib.import_module(self.module, "hf_geocomp")
        return getattr(module, self.options), getattr(module, self.run)

    def summary(self) -> str:
        """:func:`summary` of the options dataclass, read from its source (imported only if it has no docstring)."""
        import ast
        from pathlib import Path

        path = Path(__file__).parent.joinpath(*self.module.lstrip(".").split(".")).with_suffix(".py")
        found = [node for node in ast.parse(path.read_text()).body
                 if isinstance(node, ast.ClassDef) and node.name == self.options]
        doc = ast.get_docstring(found[0]) if found else None
        return _first_paragraph(doc) if doc else summary(self.load()[0])
