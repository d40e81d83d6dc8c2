"""``GeoCompHfQuantizer``: transformers' quantizer plugin for geocomp checkpoints (transformers 5.23 hooks).

* ``update_attn_implementation`` (before the model is built): checks the saved plan against the
  config and replaces the no-plugin guard (:data:`~hf_geocomp.hub.record.GUARD`) by the real
  attention (``geocomp_reduced`` for a KV-coded model).
* ``_process_model_before_weight_loading`` (meta device): rebuilds the recorded shapes, replaced
  modules and KV basis buffers, and checks the checkpoint's tensor shapes against them and that it
  holds every tensor of the blocks, the added biases and the KV bases (none left to random init).
* ``_process_model_after_weight_loading``: a saved model gets its coded cache back; a plain base
  model loaded with a :class:`GeoCompConfig` request is calibrated and compressed (as GPTQ
  quantizes in this hook), its resolved plan written into ``config.quantization_config``.
"""

from __future__ import annotations

from transformers.quantizers.base import HfQuantizer

from ..errors import GeoCompError
from .config import QUANT_METHOD, GeoCompConfig

# Only transformers, errors and .config at module level, everything else inside the hooks: `import hf_geocomp`
# imports this module as soon as transformers' models are imported, which any other module of the package may be
# doing halfway through its own import (see hf_geocomp/__init__.py).


class GeoCompHfQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: GeoCompConfig

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized and not self.quantization_config.is_compressed:
            raise GeoCompError("this checkpoint's geocomp quantization_config has no plan: it was not saved by "
                               "hf_geocomp after compression.")
        if not self.pre_quantized and self.quantization_config.is_compressed:
            raise GeoCompError("a GeoCompConfig with a resolved plan belongs to a saved geocomp model; to compress "
                               "on load pass a new GeoCompConfig(prune=..., kv=..., calibration=...).")

    def update_attn_implementation(self, config):
        if not self.pre_quantized:
            return config
        plan = self.quantization_config.plan
        if plan.get("model_type") != config.model_type:
            raise GeoCompError(f"this checkpoint's geocomp plan was made for model type {plan.get('model_type')!r}, "
                               f"but its config is {config.model_type!r}.")
        layers = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
        if layers is not None and plan.get("num_layers") != layers:
            raise GeoCompError(f"this checkpoint's geocomp plan has {plan.get('num_layers')} layers, its config {layers}.")
        from .record import GUARD

        if config._attn_implementation in (GUARD, None):
            config._attn_implementation = plan.get("attn_implementation")
        return config

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        from .kvstore import ATTR, attach_bases
        from .shapes import check_checkpoint, planned_tensors, rebuild

        plan = self.quantization_config.plan
        replaced, biases = plan.get("replaced") or {}, plan.get("biases") or ()
        rebuild(model, plan["shapes"], replaced, dtype, biases)
        kv = plan.get("kv")
        if kv is not None and not kv.get("identity"):
            attach_bases(model, _KVShape(kv), device="meta")
            model._keep_in_fp32_modules_strict = set(model._keep_in_fp32_modules_strict or ()) | {ATTR}
        check_checkpoint(model, checkpoint_files, planned_tensors(model, replaced, biases, ATTR))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            kv = self.quantization_config.plan.get("kv")
            if kv is not None:
                from .kvstore import plan_from_model, use_coded_cache

                use_coded_cache(model, plan_from_model(model, kv))
            from .record import guard

            guard(model)
            return model
        from .compress import compress_loaded

        compress_loaded(model, self.quantization_config)
        self.quantization_config = model.config.quantization_config
        return model

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:  # the weights are ordinary float tensors: full fine-tuning works
        return True

    def is_serializable(self):
        return True


class _KVShape:
    """The sizes ``attach_bases`` reads, from a KV plan's JSON (before the tensors exist)."""

    def __init__(self, d: dict):
        try:
            self.num_layers, self.num_kv_heads, self.head_dim = d["num_layers"], d["num_kv_heads"], d["head_dim"]
        except KeyError as e:
            raise GeoCompError(f"this checkpoint's KV plan lacks {e.args[0]!r}.") from None


def register() -> None:
    """Register the config and the quantizer under ``quant_method="geocomp"`` (once; a second call is a no-op)."""
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    for mapping, cls, register_fn in ((AUTO_QUANTIZATION_CONFIG_MAPPING, GeoCompConfig, register_quantization_config),
                                      (AUTO_QUANTIZER_MAPPING, GeoCompHfQuantizer, register_quantizer)):
        present = mapping.get(QUANT_METHOD)
        if present is None:
            register_fn(QUANT_METHOD)(cls)
        elif present.__qualname__ != cls.__qualname__ or not present.__module__.startswith("hf_geocomp."):
            raise GeoCompError(f"quant_method {QUANT_METHOD!r} is already registered by {present.__module__}."
                               f"{present.__qualname__}, not by hf_geocomp.")


register()
