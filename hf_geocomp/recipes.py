"""YAML recipes parsed into the dataclasses the Python API takes.

A job recipe (no ``command:`` key) is a mapping whose top-level keys are :class:`~hf_geocomp.job.JobConfig`
fields; its ``prune:`` and ``kv:`` sections are :class:`~hf_geocomp.prune.PruneConfig` and
:class:`~hf_geocomp.kv.KVConfig` fields (``null`` turns a method off). Unknown keys and values of
the wrong type are errors that name the key and the file; ``--set section.key=value`` overrides a
key (the value is read as YAML). A recipe with ``command:`` names a study subcommand instead
(see :mod:`hf_geocomp.cli`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from .errors import GeoCompError


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


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def build(cls, values: dict, where: str):
    """``cls(**values)`` after checking every key is a field of ``cls`` and every value has the field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise GeoCompError(f"{where}: unknown key {key!r}; allowed: {', '.join(fields)}.")
        if not _matches(value, hints[key]):
            raise GeoCompError(f"{where}: key {key!r} must be {_type_name(hints[key])}, got {value!r}.")
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
    if "overwrite" in recipe:
        raise GeoCompError(f"{where} sets `overwrite`; a recipe never replaces existing results by itself: "
                           "remove the key and pass --overwrite to `hf-geocomp run`.")
    return JobConfig.from_dict(apply_overrides(recipe, list(overrides)), where)


def is_job_recipe(path: str) -> bool:
    """Whether ``path`` is a job recipe (no ``command:`` key), as opposed to a study recipe."""
    return "command" not in read_yaml(path)
