"""The one place where hf_geocomp extends PEFT's ``PeftType`` enum.

PEFT registers a method by name (``register_peft_method``) but requires the name to exist
in ``peft.utils.peft_types.PeftType``, a closed ``enum``. This module adds members to that
enum, idempotently, and nothing else in the package touches it.

A saved adapter of a plugin method records its type in ``adapter_config.json``. A process
that has not imported ``hf_geocomp`` fails in PEFT with a bare ``KeyError`` on that string,
so the string saved to disk (``SAVED_TYPE``) is the install/import instruction itself;
:func:`register_saved_alias` maps it back to the method's config class once the plugin is
imported.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

SPECTRAL_LORA = "SPECTRAL_LORA"
# What adapter_config.json holds as "peft_type": without the plugin PEFT raises KeyError(<this>).
SAVED_TYPE = {SPECTRAL_LORA: "SPECTRAL_LORA: this adapter needs the hf_geocomp plugin; "
                             "`pip install hf-geocomp` and `import hf_geocomp` before loading it"}


def extend_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``PeftType`` if it is not there yet, and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)  # class attribute first: Enum forbids it once mapped
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_saved_alias(name: str, config_cls) -> None:
    """Let PEFT find ``config_cls`` from the type string written to disk (``SAVED_TYPE[name]``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[SAVED_TYPE[name]] = config_cls
