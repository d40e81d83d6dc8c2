"""The study subcommands: each name → a :class:`~hf_geocomp.options.Command` (its module, options dataclass and the
function that runs it), named without importing it: ``hf-geocomp --help`` must not load torch.

Each study defines its options dataclass beside the function that runs it; ``hf-geocomp`` builds
the subcommand's flags from it (:mod:`hf_geocomp.options`) and ``hf-geocomp run`` reads a study
recipe into it (:func:`hf_geocomp.recipes.load_study`). Every committed result under
``recipes/results/`` names one of these subcommands in its ``command`` field.
"""

from __future__ import annotations

from ..options import Command


def _study(module: str, options: str, run: str) -> Command:
    return Command(f".studies.{module}", options, run)


STUDIES = {
    "bench-overhead": _study("overhead", "OverheadOptions", "run_overhead"),
    "lora-bench": _study("lora_bench", "GenreLoraOptions", "run_genre_bench"),
    "lora-lm-bench": _study("lora_lm", "LMLoraOptions", "run_lm_bench"),
    "lora-merge": _study("lora_bench", "LoraMergeOptions", "run_merge"),
    "bench-kv": _study("kv_bench", "KVBenchOptions", "run_kv_bench"),
    "bench-prune": _study("prune_oneshot", "PruneBenchOptions", "run_prune_bench"),
    "bench-prune-recovery": _study("prune_recovery", "RecoveryOptions", "run_recovery"),
    "bench-prune-h1": _study("prune_h1", "H1Options", "run_h1"),
    "bench-h3": _study("h3", "H3Options", "run_h3"),
    "bench-kv-h3": _study("kv_h3", "KVH3Options", "run_kv_h3"),
    "bench-lora-h3": _study("lora_h3", "LoraH3Options", "run_lora_h3"),
    "bench-cross-domain": _study("cross_domain", "CrossDomainOptions", "run_cross_domain"),
    "bench-fold": _study("fold_bench", "FoldBenchOptions", "run_fold_bench"),
    "bench-curvature": _study("curvature_bench", "CurvatureBenchOptions", "run_curvature_bench"),
    "bench-kv-speed": _study("kv_speed", "KVSpeedOptions", "run_kv_speed"),
    "bench-kv-kernel": _study("kv_speed", "KVKernelOptions", "run_kv_kernel_speed"),
    "bench-onnx": _study("onnx_bench", "OnnxBenchOptions", "run_onnx_bench"),
    "bench-serve": _study("serve_bench", "ServeBenchOptions", "run_serve_bench"),
}
