"""SpectralLoRA: a registered PEFT method whose per-module LoRA ranks follow activation spectra.

``get_peft_model(model, SpectralLoraConfig(r=8, target_modules=[...], stats_file=...))``
allocates the trainable-parameter budget of uniform rank-``r`` LoRA across the target modules
in proportion to each module's input effective rank (or k at τ), then builds PEFT's LoRA
layers with that ``rank_pattern``. ``export_plain_lora`` writes an adapter stock PEFT loads.
"""

from peft.utils.peft_types import register_peft_method

from .allocate import AllocationPlan, allocate, uniform_params
from .config import SpectralLoraConfig
from .export import export_plain_lora, to_lora_config
from .model import SpectralLoraModel, lora_taps, target_shapes
from .peft_type import SPECTRAL_LORA, register_saved_alias

__all__ = ["AllocationPlan", "SpectralLoraConfig", "SpectralLoraModel", "allocate", "export_plain_lora",
           "lora_taps", "target_shapes", "to_lora_config", "uniform_params"]

register_peft_method(name=SPECTRAL_LORA.lower(), config_cls=SpectralLoraConfig, model_cls=SpectralLoraModel,
                     prefix="lora_")
register_saved_alias(SPECTRAL_LORA, SpectralLoraConfig)
