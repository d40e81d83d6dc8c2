"""Export a SpectralLoRA adapter as a plain LoRA adapter that stock PEFT loads.

The per-module ranks and alphas become ``rank_pattern``/``alpha_pattern`` of a standard
``LoraConfig``; the weights are PEFT's own adapter state dict (the same keys); the spectral
metadata (budget, scores, spectra, ranks) goes beside them in ``spectral_metadata.json``.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict

from ..errors import GeoCompError
from ..io import write_json
from .config import SpectralLoraConfig

METADATA_FILE = "spectral_metadata.json"


def to_lora_config(config: SpectralLoraConfig) -> LoraConfig:
    """The equivalent stock ``LoraConfig`` (same targets, ranks and alphas)."""
    lora_fields = {f.name for f in fields(LoraConfig) if f.init}
    kwargs = {k: v for k, v in config.to_dict().items() if k in lora_fields and k != "peft_type"}
    kwargs["init_lora_weights"] = True
    return LoraConfig(**kwargs)


def export_plain_lora(peft_model, output: str, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` (plain LoRA), ``adapter_model.safetensors`` and the metadata."""
    from safetensors.torch import save_file

    config = peft_model.peft_config.get(adapter_name)
    if not isinstance(config, SpectralLoraConfig):
        raise GeoCompError(f"adapter {adapter_name!r} is not a SpectralLoRA adapter.")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    to_lora_config(config).save_pretrained(str(out))
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    write_json(out / METADATA_FILE, {"method": "spectral_lora", "allocation": config.allocation,
                                     "spectral_init": config.spectral_init, **(config.spectral_allocation or {})})
    return out
