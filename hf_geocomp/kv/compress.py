"""``compress``: statistics → bases → allocation → a :class:`KVPlan` (scoring separate from the cache)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..geometry import ActivationStats, Tap, collect_stats
from .allocate import FULL, allocate
from .bases import fit_bases
from .cache import check_supported
from .config import KVConfig
from .plan import KVPlan


def required_taps(model: nn.Module, method: str = "aware") -> list[Tap]:
    """The engine taps KV coding needs: per-KV-head K and V and per-query-head Q, before RoPE;
    for ``fisher`` also the per-KV-head gradients of the loss w.r.t. K and V."""
    from ..geometry import kv_grad_taps, kv_head_taps, q_head_taps

    return kv_head_taps(model) + q_head_taps(model) + (kv_grad_taps(model) if method == "fisher" else [])


def collect_kv_stats(model: nn.Module, batches: Iterable, method: str = "aware") -> ActivationStats:
    """Calibration statistics for ``method`` (``fisher`` adds one backward pass per batch)."""
    from ..geometry import collect_gradient_stats

    taps = required_taps(model, method)
    return (collect_gradient_stats if method == "fisher" else collect_stats)(model, batches, taps)


def _check(model: nn.Module, config: KVConfig) -> None:
    check_supported(model, cache=False)
    if config.method == "fisher" and arch.get_spec(model).family == "bert":
        raise GeoCompError("method 'fisher' needs a next-token loss; use method='aware' or 'pca' for encoders.")


def build_plan(model: nn.Module, stats: ActivationStats, config: KVConfig) -> KVPlan:
    """Fit bases and allocate widths under ``config.budget`` (no change to ``model``)."""
    _check(model, config)
    heads = arch.head_layout(model)
    if config.max_rank is not None and config.max_rank > heads.head_dim:
        raise GeoCompError(f"max_rank {config.max_rank} is above head_dim {heads.head_dim}.")
    stats.check_model(model)
    dtype = next(model.parameters()).dtype
    elt = torch.empty((), dtype=dtype).element_size()
    layers = len(arch.block_prefixes(model))
    full = layers * 2 * heads.num_kv_heads * heads.head_dim * elt
    windows = [kw.get("sliding_window") if kind == "sliding_attention" else None
               for kind, kw in arch.attention_layer_types(model)]
    common = dict(config=config, model_type=model.config.model_type, num_layers=layers,
                  num_kv_heads=heads.num_kv_heads, head_dim=heads.head_dim, dtype=str(dtype).replace("torch.", ""),
                  full_bytes_per_token=full, windows=windows if any(windows) else None)
    if config.budget >= 1:
        return KVPlan(groups={}, bytes_per_token=full, identity=True, **common)
    bases = fit_bases(model, stats, config)
    coded = target = None
    if any(windows):  # layers hold different numbers of tokens: the budget counts what each one holds
        probe = KVPlan(groups={}, bytes_per_token=full, **common)
        held = probe.held_tokens(config.reference_tokens)
        coded = {i: n for i, (_, n) in enumerate(held)}
        target = config.budget * probe.cache_bytes(config.reference_tokens, full=True) - sum(
            exact for exact, _ in held) * (full // layers)
    groups, nbytes = allocate(bases, config, elt, coded, target)
    tensors = {}
    for (layer, kind), basis in bases.items():
        tensors[f"{layer}.{kind}.enc"], tensors[f"{layer}.{kind}.dec"] = basis.enc, basis.dec
    return KVPlan(groups={f"{l}.{k}": g for (l, k), g in groups.items()}, bytes_per_token=nbytes,
                  tensors=tensors, **common)


def compress(model: nn.Module, stats_or_dataloader: ActivationStats | Iterable, budget: float = 0.25,
             method: str = "fisher", reduced_attention: bool = True, **options) -> tuple[nn.Module, KVPlan]:
    """Plan a transform-coded KV cache for ``model`` within ``budget`` of the uncompressed cache bytes.

    ``stats_or_dataloader``: statistics with :func:`required_taps` of ``method``, or batches to collect them
    from. ``options`` are the other :class:`KVConfig` fields. Returns the model (its weights
    untouched; the plan is also set as ``model.geocomp_kv_plan``) and the plan; generate with
    ``model.generate(..., past_key_values=plan.cache(model))``; encoders have no cache: apply
    the coding in place with :func:`hf_geocomp.kv.project`. With ``reduced_attention`` (decoders)
    the model is switched to attention on the stored latents (:mod:`hf_geocomp.kv.attention`,
    exact and faster than decoding the cache every step).
    """
    config = KVConfig(budget=budget, method=method, **options)
    _check(model, config)
    if isinstance(stats_or_dataloader, ActivationStats):
        stats = stats_or_dataloader
    else:
        stats = collect_kv_stats(model, stats_or_dataloader, method)
    plan = build_plan(model, stats, config)
    model.geocomp_kv_plan = plan
    if reduced_attention and arch.get_spec(model).family != "bert":
        from .attention import use_reduced_attention

        use_reduced_attention(model)
    return model, plan


def describe(plan: KVPlan) -> dict:
    """Components kept per width, for K and V (a summary for results and logs)."""
    out = {}
    for key, groups in plan.groups.items():
        kind = key.split(".")[1]
        for bits, cols in groups:
            name = f"{kind}_{bits}" if bits != FULL else f"{kind}_full"
            out[name] = out.get(name, 0) + len(cols)
    return out
