"""``SpectralLoraModel``: PEFT's LoRA tuner with ranks allocated before injection.

Before the adapters are built, the ranks (and alphas) of the target modules are allocated
from the statistics engine's input statistics (:func:`hf_geocomp.lora.allocate.allocate`)
and written into the config's ``rank_pattern``/``alpha_pattern``; PEFT's own LoRA layers
then do the rest. After injection, ``principal``/``whitened`` initialisation sets A from the
input eigenvectors (B stays zero, so the model's outputs are unchanged at step 0). A config
that already carries ``spectral_allocation`` (a saved adapter) is built as recorded.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..geometry import Tap
from .allocate import allocate, init_directions
from .config import SpectralLoraConfig


def target_shapes(model: nn.Module, config: SpectralLoraConfig) -> dict[str, tuple[int, int]]:
    """{module name: (in, out)} of the dense layers ``config.target_modules`` selects."""
    shapes = {}
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if not arch.is_linear(module):
            raise GeoCompError(f"target module {name!r} is a {type(module).__name__}; SpectralLoRA adapts dense "
                               "(Linear / Conv1D) layers only.")
        out_f, in_f = arch.linear_weight(module).shape
        shapes[name] = (int(in_f), int(out_f))
    if not shapes:
        raise GeoCompError(f"target_modules {config.target_modules!r} match no module of this model.")
    return shapes


def lora_taps(model: nn.Module, config: SpectralLoraConfig) -> list[Tap]:
    """The statistics SpectralLoRA reads: the full input moments of its target modules, nothing else.

    Every allocation rule records each input's Df and trace (the covariance, not only its
    diagonal), ``effective_rank`` and ``k_tau`` score from it, and ``principal``/``whitened``
    initialisation takes its eigenvectors; modules reading one tensor (q/k/v) are measured once.
    """
    return [Tap(name, "input") for name in target_shapes(model, config)]


def resolve_init(config: SpectralLoraConfig, model: nn.Module) -> str:
    """``spectral_init`` with ``"auto"`` resolved: ``whitened`` for a causal language model, else
    ``standard`` (in the H2 study whitened A won on causal-LM fine-tuning and sent a classifier's
    seeds to chance; README, SpectralLoRA)."""
    if config.spectral_init != "auto":
        return config.spectral_init
    if config.task_type:  # PEFT's TaskType is a str enum
        causal = config.task_type == "CAUSAL_LM"
    else:
        mcfg = getattr(model, "config", None)
        generates = getattr(model, "can_generate", lambda: False)()
        causal = bool(generates) and not getattr(mcfg, "is_encoder_decoder", False)
    return "whitened" if causal else "standard"


def resolve_stats(config: SpectralLoraConfig, model: nn.Module):
    from ..geometry import ActivationStats

    stats = config.stats
    if stats is None and config.stats_file:
        stats = ActivationStats.load(config.stats_file)
    if stats is None:
        raise GeoCompError("SpectralLoraConfig needs activation statistics: set stats_file to a saved "
                           "ActivationStats file or config.stats to one (collect_stats with lora_taps(model, config)).")
    stats.check_model(model)
    return stats


class SpectralLoraModel(LoraModel):
    """LoRA tuner whose ranks come from activation spectra (see :class:`SpectralLoraConfig`)."""

    prefix: str = "lora_"

    def _pre_injection_hook(self, model: nn.Module, config: SpectralLoraConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        if config.spectral_allocation:  # a saved adapter: shapes are already in rank_pattern
            return
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        config.spectral_init = resolve_init(config, model)
        shapes = target_shapes(model, config)
        stats = resolve_stats(config, model)
        plan = allocate(stats, shapes, rule=config.allocation, r=config.r, lora_alpha=config.lora_alpha,
                        budget=config.budget, tau=config.tau, min_rank=config.min_rank, max_rank=config.max_rank,
                        scope=config.scope)
        config.rank_pattern = plan.rank_pattern()
        config.alpha_pattern = plan.alpha_pattern()
        config.spectral_allocation = plan.to_dict()
        if config.spectral_init != "standard":
            self._pending_init = (plan, stats)

    def _post_injection_hook(self, model: nn.Module, config: SpectralLoraConfig, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        pending = self.__dict__.pop("_pending_init", None)
        if pending is None:
            return
        plan, stats = pending
        whitened = config.spectral_init == "whitened"
        with torch.no_grad():
            for m in plan.modules:
                lora_a = model.get_submodule(m.name).lora_A[adapter_name].weight  # (rank, in)
                rows = init_directions(stats.input_of(m.name), m.rank, whitened)
                lora_a.copy_(rows.to(lora_a.dtype))
