"""``SpectralLoraConfig``: LoRA whose per-module ranks come from activation spectra.

The configuration is a :class:`peft.LoraConfig` plus the fields below. ``get_peft_model``
turns it into ``rank_pattern``/``alpha_pattern`` (see :mod:`hf_geocomp.lora.allocate`) before
the adapters are built, and records the allocation in ``spectral_allocation`` so that
``PeftModel.from_pretrained`` rebuilds exactly the same shapes without any statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig
from peft.utils.peft_types import PeftType

from ..errors import GeoCompError
from .allocate import SCOPES
from .peft_type import SAVED_TYPE, SPECTRAL_LORA, extend_peft_type

extend_peft_type(SPECTRAL_LORA)

ALLOCATIONS = ("effective_rank", "k_tau", "width", "uniform")
INITS = ("auto", "standard", "principal", "whitened")


@dataclass
class SpectralLoraConfig(LoraConfig):
    """LoRA with ranks allocated from the spectra of each target module's input activations.

    Args (besides those of ``LoraConfig``; ``r`` and ``lora_alpha`` define the reference
    uniform LoRA whose parameter count is the default budget):
        budget: trainable adapter parameters to spend; ``None`` means the count of uniform
            LoRA at rank ``r`` on the same target modules.
        allocation: ``"effective_rank"`` (rank ∝ Df = (Σλ)²/Σλ² of the input covariance),
            ``"k_tau"`` (rank ∝ the fewest eigen-directions holding ``tau`` of the variance),
            ``"width"`` (rank ∝ the input width: ``effective_rank`` with the variance removed, the
            whitening control of H2) or ``"uniform"`` (rank ∝ 1: uniform LoRA spread over the budget).
        tau: variance share for ``allocation="k_tau"``.
        scope: ``"global"`` (every target module against every other) or ``"per_kind"``
            (each kind of module, e.g. all ``down_proj``, keeps uniform LoRA's share of the
            budget; the spectrum moves rank between layers only).
        min_rank, max_rank: bounds of every module's rank (``max_rank`` also never exceeds
            min(in, out) of the module).
        spectral_init: ``"standard"`` (PEFT's: A random, B = 0), ``"principal"`` (rows of A
            are the top eigenvectors of the input's uncentred second moment, B = 0),
            ``"whitened"`` (the same directions scaled by 1/√λ, normalised so the mean row
            norm is 1, B = 0) or ``"auto"`` (the default: ``whitened`` for a causal language
            model, ``standard`` otherwise, the best measured choice on each task of the H2 study;
            resolved by ``get_peft_model`` and saved resolved).
        stats_file: a statistics file saved by ``ActivationStats.save`` (input taps of every
            target module); alternatively set ``config.stats`` to an ``ActivationStats``.
        spectral_allocation: written by ``get_peft_model`` (ranks, scores, budget); leave unset.

    Alpha rule: every module keeps the scaling of the reference, alpha_m / r_m = lora_alpha / r.
    """

    budget: int | None = field(default=None, metadata={
        "help": "Trainable adapter parameters to spend; None = uniform LoRA at rank r on the same targets."})
    allocation: str = field(default="effective_rank", metadata={
        "help": f"Rank allocation rule, one of {', '.join(ALLOCATIONS)}."})
    tau: float = field(default=0.9, metadata={"help": "Variance share for allocation='k_tau', in (0, 1]."})
    scope: str = field(default="global", metadata={
        "help": f"Which modules compete for rank, one of {', '.join(SCOPES)}: all of them, or the layers "
                "of one kind of module within the share uniform LoRA gives that kind."})
    min_rank: int = field(default=1, metadata={"help": "Smallest rank given to any target module (>= 1)."})
    max_rank: int | None = field(default=None, metadata={
        "help": "Largest rank given to any target module; None = min(in, out) of the module."})
    spectral_init: str = field(default="auto", metadata={
        "help": f"Initialisation of the adapters, one of {', '.join(INITS)}; 'auto' = 'whitened' for a causal "
                "language model (task_type CAUSAL_LM, or a decoder-only model that generates), else 'standard'."})
    stats_file: str | None = field(default=None, metadata={
        "help": "Saved ActivationStats with the input of every target module (or set config.stats)."})
    spectral_allocation: dict | None = field(default=None, metadata={
        "help": "Filled in by get_peft_model: the allocation (ranks, scores, budget); do not set by hand."})

    def __post_init__(self):
        # A saved config comes back with peft_type set to the instruction string (see peft_type.py).
        super().__post_init__()
        self.peft_type = PeftType.SPECTRAL_LORA
        if self.allocation not in ALLOCATIONS:
            raise GeoCompError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}.")
        if self.scope not in SCOPES:
            raise GeoCompError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}.")
        if self.spectral_init not in INITS:
            raise GeoCompError(f"spectral_init must be one of {', '.join(INITS)}, got {self.spectral_init!r}.")
        if not 0.0 < self.tau <= 1.0:
            raise GeoCompError(f"tau must be in (0, 1], got {self.tau}.")
        if self.min_rank < 1:
            raise GeoCompError(f"min_rank must be at least 1, got {self.min_rank}.")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise GeoCompError(f"max_rank ({self.max_rank}) must be at least min_rank ({self.min_rank}).")
        if self.budget is not None and self.budget < 1:
            raise GeoCompError(f"budget must be a positive number of parameters, got {self.budget}.")
        if self.use_rslora or self.use_dora:
            raise GeoCompError("SpectralLoraConfig supports neither use_rslora nor use_dora (the alpha rule "
                               "keeps alpha/r of the reference LoRA).")
        if not hasattr(self, "stats"):
            self.stats = None  # an in-memory ActivationStats; never serialised

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("stats", None)
        d["peft_type"] = SAVED_TYPE[SPECTRAL_LORA]
        return d
