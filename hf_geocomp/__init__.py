"""hf_geocomp: compress and fine-tune Hugging Face models using the geometry of their activations."""

__version__ = "0.1.0"

from .data import load_corpus, load_model, token_blocks  # noqa: E402
from .errors import GeoCompError  # noqa: E402
from .geometry import ActivationStats, Spectrum, StatsCollector, Tap, collect_stats  # noqa: E402
from .lora import SpectralLoraConfig, export_plain_lora  # noqa: E402  (registers the PEFT method)
from .hub import GeoCompConfig, mark_compressed  # noqa: E402  (registers the quantizer)

__all__ = ["ActivationStats", "GeoCompConfig", "GeoCompError", "SpectralLoraConfig", "Spectrum", "StatsCollector", "Tap",
           "collect_stats", "export_plain_lora", "load_corpus", "load_model", "mark_compressed", "token_blocks", "__version__"]
