"""Public names of a package imported on first use (PEP 562), so that importing the package stays cheap.

``import hf_geocomp`` must not cost torch, transformers and peft (seconds each): the CLI's ``--help`` and
``--version`` and its argument errors answer without them, and a library user pays only for what they use.
"""

from __future__ import annotations

import importlib
import importlib.util


def lazy_names(package: str, names: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to the submodule (relative, e.g.
    ``".data"``) that defines it; any submodule is also an attribute on first use, as after an eager import."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(importlib.import_module(package), name, value)  # once: later look-ups are plain attributes
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(names))

    return __getattr__, __dir__
