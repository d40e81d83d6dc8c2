"""hf_geocomp: compress and fine-tune Hugging Face models using the geometry of their activations.

Importing it is cheap (no torch, transformers or peft): the public names below load on first use, and the package
registers itself with each library it extends once that library is imported (at once if it already is), through
post-import hooks (``wrapt``):

* when ``peft`` is imported: the PEFT method ``SPECTRAL_LORA`` (:mod:`hf_geocomp.lora`), so that
  ``PeftModel.from_pretrained`` loads a saved SpectralLoRA adapter; ``SpectralLoraConfig`` imports it too;
* when ``transformers.modeling_utils`` is (every ``from_pretrained`` needs it): the ``geocomp`` quantizer
  (:mod:`hf_geocomp.hub.quantizer`), so that a saved compressed model reloads with plain ``from_pretrained``.
"""

__version__ = "0.1.0"

from ._lazy import lazy_names  # noqa: E402
from .errors import GeoCompError  # noqa: E402

__all__ = ["ActivationStats", "GeoCompConfig", "GeoCompError", "SpectralLoraConfig", "Spectrum", "StatsCollector",
           "Tap", "collect_stats", "export_plain_lora", "load_corpus", "load_model", "mark_compressed", "token_blocks",
           "__version__"]
__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["load_corpus", "load_model", "token_blocks"], ".data"),
    **dict.fromkeys(["ActivationStats", "Spectrum", "StatsCollector", "Tap", "collect_stats"], ".geometry"),
    **dict.fromkeys(["SpectralLoraConfig", "export_plain_lora"], ".lora"),
    **dict.fromkeys(["GeoCompConfig", "mark_compressed"], ".hub")})


def _register_when_imported() -> None:
    """Each registration runs when its library is imported: it imports the module that registers at its bottom."""
    import importlib

    import wrapt

    for library, ours in (("peft", "hf_geocomp.lora"), ("transformers.modeling_utils", "hf_geocomp.hub.quantizer")):
        wrapt.register_post_import_hook(lambda _, ours=ours: importlib.import_module(ours), library)


_register_when_imported()
