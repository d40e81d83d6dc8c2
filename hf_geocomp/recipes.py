"""YAML recipes parsed into the dataclasses the Python API takes.

A job recipe (no ``command:`` key) is a mapping whose top-level keys are :class:`~hf_geocomp.job.JobConfig`
fields; its ``prune:`` and ``kv:`` sections are :class:`~hf_geocomp.prune.PruneConfig` and
:class:`~hf_geocomp.kv.KVConfig` fields (``null`` turns a method off). Unknown keys and values of
the wrong type are errors that name the key and the file; ``--set section.key=value`` overrides a
key (the value is read as YAML).

A study recipe has ``command:`` naming a subcommand; its other keys are the fields of that
subcommand's options dataclass (:mod:`hf_geocomp.options`), read by :func:`load_study`. The
resolved options are saved beside the results (:func:`recipe_file`, :func:`recipe_text`) as a recipe
that reruns the study, every key commented with its type, help and default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING
from pathlib import Path

from .errors import GeoCompError
from .options import default_of, metadata, option_fields, shape


def read_yaml(path: str) -> dict:
    """The mapping in a YAML file, or a :class:`GeoCompError` saying why there is none."""
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except OSError as e:
        raise GeoCompError(f"cannot read recipe {path!r}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise GeoCompError(f"recipe {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise GeoCompError(f"recipe {path!r} must be a mapping of keys to values.")
    return recipe


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """``key=value`` or ``section.key=value`` (YAML values) applied to a copy of ``recipe``."""
    import yaml

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GeoCompError(f"--set takes KEY=VALUE, got {item!r}.")
        section, dot, sub = key.partition(".")
        if dot:
            if out.get(section) is None:
                out[section] = {}
            if not isinstance(out[section], dict):
                raise GeoCompError(f"--set {item!r}: {section!r} is not a section of this recipe.")
            out[section][sub] = yaml.safe_load(value)
        else:
            out[key] = yaml.safe_load(value)
    return out


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint) -> str:
    """A field's type as recipes spell it: ``int``, ``list[float]``, ``str | null``."""
    kind, many = shape(hint)
    name = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
    name = f"list[{name}]" if many else name
    return name + " | null" if type(None) in typing.get_args(hint) else name


def _coerce(value, hint):
    """A whole number given for a float field (or a list of them) as a float, the type the command line gives."""
    kind, many = shape(hint)
    if kind is not float:
        return value
    if many and isinstance(value, list):
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def build(cls, values: dict, where: str):
    """``cls(**values)`` after checking every key is a field of ``cls`` and every value has the field's type."""
    fields = {f.name: f for f in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise GeoCompError(f"{where}: unknown key {key!r}; allowed: {', '.join(fields)}.")
        if not _matches(value, hints[key]):
            raise GeoCompError(f"{where}: key {key!r} must be {type_name(hints[key])}, got {value!r}.")
    missing = [k for k, f in fields.items() if k not in values and default_of(f) is MISSING]
    if missing:
        raise GeoCompError(f"{where}: key {missing[0]!r} is required.")
    values = {k: _coerce(v, hints[k]) for k, v in values.items()}
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) and typing.get_origin(hints[k]) is tuple else v
                      for k, v in values.items()})
    except GeoCompError as e:  # the dataclass's own range checks, located
        raise GeoCompError(f"{where}: {e}") from None


def to_yaml_dict(obj) -> dict:
    """A dataclass as plain YAML-able values (tuples as lists), for the resolved recipe saved with results."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return to_yaml_dict(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def load_job(path: str | None, overrides: list[str] = ()) -> "JobConfig":  # noqa: F821
    """The :class:`~hf_geocomp.job.JobConfig` of a job recipe (the defaults when ``path`` is None)."""
    from .job import JobConfig

    recipe = read_yaml(path) if path is not None else {}
    where = f"recipe {path!r}" if path is not None else "the default recipe"
    if "command" in recipe:
        raise GeoCompError(f"{where} names a study command; run it with `hf-geocomp run {path}`.")
    _refuse_overwrite(recipe, where)
    return JobConfig.from_dict(apply_overrides(recipe, list(overrides)), where)


def _refuse_overwrite(recipe: dict, where: str) -> None:
    if "overwrite" in recipe:
        raise GeoCompError(f"{where} sets `overwrite`; a recipe never replaces existing results by itself: "
                           "remove the key and pass --overwrite to `hf-geocomp run`.")


def load_study(path: str, overrides: list[str], commands: dict[str, type]):
    """The options dataclass instance of a study recipe (``commands``: subcommand → its options class)."""
    recipe, where = read_yaml(path), f"recipe {path!r}"
    if "command" not in recipe:
        raise GeoCompError(f"{where} must be a mapping with a `command:` key.")
    _refuse_overwrite(recipe, where)
    recipe = apply_overrides(recipe, list(overrides))
    command = recipe.pop("command")
    if command not in commands:
        raise GeoCompError(f"{where}: command {command!r} is not one of {', '.join(commands)}.")
    options = build(commands[command], recipe, where)
    options.command = command
    return options


def is_job_recipe(path: str) -> bool:
    """Whether ``path`` is a job recipe (no ``command:`` key), as opposed to a study recipe."""
    return "command" not in read_yaml(path)


def _flow(value) -> str:
    """``value`` as one line of YAML."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).removesuffix("...\n").strip()


def key_comment(cls, name: str) -> str:
    """``type: help (default X)`` of field ``name``: the comment a recipe key carries."""
    help, default = metadata(cls, name).get("help"), default_of(cls.__dataclass_fields__[name])
    text = type_name(typing.get_type_hints(cls)[name]) + (f": {help}" if help else "")
    return text + (" (required)" if default is MISSING else f" (default {_flow(default)})")


def recipe_text(options) -> str:
    """The resolved options of a study as a recipe that reruns it, every key commented with its type and default."""
    cls = type(options)
    lines = [f"# The resolved recipe of: {options.command_line or options.command}",
             "# Rerun: hf-geocomp run <this file> --overwrite",
             f"{'command: ' + _flow(options.command):40s} # str: the subcommand this recipe runs"]
    values = to_yaml_dict(options)
    for key in (f.name for f in option_fields(cls)):
        text, value = _flow(values[key]), values[key]
        long = isinstance(value, list) and len(text) > 60  # one item a line
        lines.append(f"{f'{key}:' if long else f'{key}: {text}':40s} # {key_comment(cls, key)}")
        lines += [f"  - {_flow(v)}" for v in value] if long else []
    return "\n".join(lines) + "\n"


def recipe_file(output: str) -> Path:
    """Where a study's resolved recipe is saved: ``recipe.yaml`` inside a folder output, else ``<stem>.recipe.yaml``."""
    out = Path(output)
    return out / "recipe.yaml" if out.is_dir() else out.with_name(f"{out.stem}.recipe.yaml")


def save_recipe(options) -> Path | None:
    """Write the resolved recipe of a study that ran beside its output (see :func:`recipe_file`); its path."""
    if not options.output or not Path(options.output).exists():
        return None
    path = recipe_file(options.output)
    path.write_text(recipe_text(options))
    print(f"wrote the resolved recipe {path}")
    return path
