"""The shared core: streaming activation statistics and their spectra."""

from .sequential import PIPELINES, PROPAGATE, block_inputs, collect_stats_sequential
from .spectrum import Spectrum, coloring, effective_rank, k_at, stable_rank, sym_eigh, whitening
from .stats import (ActivationStats, Moments, StatsCollector, Tap, block_output_taps, collect_gradient_stats,
                    collect_stats, kv_grad_taps, kv_head_taps, linear_input_taps, model_fingerprint, q_head_taps,
                    sample_labels)

__all__ = [
    "ActivationStats", "Moments", "PIPELINES", "PROPAGATE", "Spectrum", "StatsCollector", "Tap", "block_inputs",
    "block_output_taps", "collect_gradient_stats", "collect_stats", "collect_stats_sequential", "coloring",
    "effective_rank", "k_at", "kv_grad_taps", "kv_head_taps", "linear_input_taps", "model_fingerprint",
    "q_head_taps", "sample_labels", "stable_rank", "sym_eigh", "whitening",
]
