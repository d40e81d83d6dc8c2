"""From the Hub and back: compressed models as ordinary Hugging Face checkpoints.

* :class:`GeoCompConfig` is a transformers quantization config (``quant_method="geocomp"``):
  ``AutoModelForCausalLM.from_pretrained(base, quantization_config=GeoCompConfig(prune={...},
  kv={...}, calibration="shakespeare:calibration"))`` compresses on load;
  ``from_pretrained(folder_or_repo_id)`` reloads a saved compressed model (after ``import
  hf_geocomp``, which registers the config and :class:`GeoCompHfQuantizer`).
* :func:`mark_compressed` records a model compressed with the Python API, so that
  ``save_pretrained`` writes the plan into ``config.json`` and the KV bases into the safetensors.
* Without hf_geocomp, stock transformers never loads a geocomp checkpoint wrongly: a model whose
  shapes its config cannot express (non-uniform widths or heads, GPT-2 heads, replaced modules, a
  coded KV cache) carries :data:`~hf_geocomp.hub.record.GUARD` as ``attn_implementation``, so
  building it stops with an error that says to install and import hf_geocomp; a uniformly pruned
  model is an ordinary checkpoint that stock transformers loads with identical logits.

The saved plan (``config.quantization_config.plan``, version ``FORMAT_VERSION``; newer ones are refused):
``shapes`` (per-layer ``mlp_widths``, ``num_heads``, ``num_kv_heads``, ``head_dim``: method-agnostic,
read from the modules, so pruning and folding reload the same way), ``replaced`` (below), ``kv``
(a :class:`~hf_geocomp.kv.KVPlan` as JSON; its bases are the ``geocomp_kv.*`` buffers), ``prune``
(what pruning decided), ``attn_implementation``, ``stock_loadable``, ``params``.

Replaced modules protocol (for methods that put their own module in place of a dense layer):
the module class provides ``geocomp_record(self) -> dict`` — JSON shape fields plus ``"kind"``
(a string naming the class) — and a classmethod ``from_geocomp_record(record: dict, dtype) ->
nn.Module`` that builds an empty module of those shapes (values come from the state dict; it
is called on the meta device). :func:`mark_compressed` stores ``{module_name: record}`` of every
module that has ``geocomp_record``; on reload the kind is resolved lazily through
:data:`~hf_geocomp.hub.shapes.MODULE_KINDS` (kind → ``"package.module:ClassName"``), extended
with :func:`register_module_kind`. An unknown kind is an error, never a silent dense layer. The
parent of a replaced module is marked initialised for transformers' load-time weight init (whose
family code may read the dense child's ``weight`` from the parent, as GPT-2's does).
"""

from .._lazy import lazy_names
from .export import export, push  # eager (the submodule of the same name must not shadow it); imports nothing heavy

__all__ = ["FORMAT_VERSION", "GUARD", "GeoCompConfig", "GeoCompHfQuantizer", "MODULE_KINDS", "QUANT_METHOD",
           "export", "export_onnx", "mark_compressed", "push", "register", "register_module_kind", "render_card"]
# the quantizer registers itself at the bottom of .quantizer, which `import hf_geocomp` imports with transformers'
# models (hf_geocomp/__init__.py)
__getattr__, __dir__ = lazy_names(__name__, {
    "render_card": ".card", "export_onnx": ".onnx", **dict.fromkeys(["FORMAT_VERSION", "QUANT_METHOD", "GeoCompConfig"], ".config"),
    **dict.fromkeys(["GeoCompHfQuantizer", "register"], ".quantizer"),
    **dict.fromkeys(["GUARD", "mark_compressed"], ".record"),
    **dict.fromkeys(["MODULE_KINDS", "register_module_kind"], ".shapes")})
