"""The study subcommands: each name → (its options dataclass, the function that runs it).

Each study defines its options dataclass beside the function that runs it; ``hf-geocomp`` builds
the subcommand's flags from it (:mod:`hf_geocomp.options`) and ``hf-geocomp run`` reads a study
recipe into it (:func:`hf_geocomp.recipes.load_study`). Every committed result under
``recipes/results/`` names one of these subcommands in its ``command`` field.
"""

from __future__ import annotations

from . import (cross_domain, curvature_bench, fold_bench, h3, kv_bench, kv_h3, kv_speed, lora_bench, lora_h3, lora_lm,
               onnx_bench, overhead, prune_h1, prune_oneshot, prune_recovery, serve_bench)

STUDIES = {
    "bench-overhead": (overhead.OverheadOptions, overhead.run_overhead),
    "lora-bench": (lora_bench.GenreLoraOptions, lora_bench.run_genre_bench),
    "lora-lm-bench": (lora_lm.LMLoraOptions, lora_lm.run_lm_bench),
    "lora-merge": (lora_bench.LoraMergeOptions, lora_bench.run_merge),
    "bench-kv": (kv_bench.KVBenchOptions, kv_bench.run_kv_bench),
    "bench-prune": (prune_oneshot.PruneBenchOptions, prune_oneshot.run_prune_bench),
    "bench-prune-recovery": (prune_recovery.RecoveryOptions, prune_recovery.run_recovery),
    "bench-prune-h1": (prune_h1.H1Options, prune_h1.run_h1),
    "bench-h3": (h3.H3Options, h3.run_h3),
    "bench-kv-h3": (kv_h3.KVH3Options, kv_h3.run_kv_h3),
    "bench-lora-h3": (lora_h3.LoraH3Options, lora_h3.run_lora_h3),
    "bench-cross-domain": (cross_domain.CrossDomainOptions, cross_domain.run_cross_domain),
    "bench-fold": (fold_bench.FoldBenchOptions, fold_bench.run_fold_bench),
    "bench-curvature": (curvature_bench.CurvatureBenchOptions, curvature_bench.run_curvature_bench),
    "bench-kv-speed": (kv_speed.KVSpeedOptions, kv_speed.run_kv_speed),
    "bench-kv-kernel": (kv_speed.KVKernelOptions, kv_speed.run_kv_kernel_speed),
    "bench-onnx": (onnx_bench.OnnxBenchOptions, onnx_bench.run_onnx_bench),
    "bench-serve": (serve_bench.ServeBenchOptions, serve_bench.run_serve_bench),
}
