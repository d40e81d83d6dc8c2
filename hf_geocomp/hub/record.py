"""Turn a compressed model into a saveable geocomp model: the plan in its config, the KV bases in its weights.

``mark_compressed(model, prune_plan=..., kv_plan=...)`` is what compress-on-load runs at the end,
and what a user runs after compressing with the Python API, before ``save_pretrained``.
"""

from __future__ import annotations

from torch import nn

from .. import arch
from .config import FORMAT_VERSION, GeoCompConfig
from .kvstore import attach_bases, use_coded_cache
from .shapes import read_shapes, replaced_modules, stock_differences, stock_shapes

# Written as ``attn_implementation`` into the config.json of every checkpoint stock transformers
# would load wrongly: without hf_geocomp, building the model stops with
# `Specified attn_implementation="<this>" is not supported` before any weight is read; with it,
# the quantizer puts the real attention back (see GeoCompHfQuantizer.update_attn_implementation).
GUARD = arch.PLUGIN_GUARD


def prune_record(prune_plan) -> dict | None:
    """What a pruning plan decided, compactly (the kept unit indices are in the weights, not here)."""
    if prune_plan is None:
        return None
    kept = {}
    for g in prune_plan.groups:
        kept.setdefault(g.kind, []).append(len(g.keep))
    return {"config": prune_plan.config, "block_params": prune_plan.block_params,
            "params_removed": prune_plan.params_removed, "achieved_sparsity": prune_plan.achieved_sparsity,
            "kept_units": kept, "num_units": {g.kind: g.num_units for g in prune_plan.groups}}


def build_plan_record(model: nn.Module, prune_plan=None, kv_plan=None, extra: dict | None = None) -> dict:
    shapes, replaced = read_shapes(model), replaced_modules(model)
    same, biases = stock_differences(model)
    stock = same and shapes == stock_shapes(model) and not replaced and (kv_plan is None or kv_plan.identity)
    from ..kv.attention import NAME

    attn = NAME if kv_plan is not None and model.config._attn_implementation == NAME else None
    return {"format_version": FORMAT_VERSION, "model_type": model.config.model_type,
            "num_layers": len(arch.block_prefixes(model)), "shapes": shapes, "biases": biases,
            "replaced": replaced,
            "prune": prune_record(prune_plan), "kv": None if kv_plan is None else kv_plan.to_dict(),
            "attn_implementation": attn, "stock_loadable": bool(stock),
            "params": sum(p.numel() for p in model.parameters()), **(extra or {})}


def mark_compressed(model: nn.Module, prune_plan=None, kv_plan=None, request: GeoCompConfig | None = None,
                    extra: dict | None = None) -> GeoCompConfig:
    """Record the compression of ``model`` in ``model.config.quantization_config`` (a :class:`GeoCompConfig`
    whose ``plan`` is resolved), put a KV plan's bases into the weights and its cache into ``generate``.

    ``request``: the GeoCompConfig that asked for it (kept beside the plan for the model card).
    Returns the config. Then ``model.save_pretrained(folder)`` writes a checkpoint that
    ``from_pretrained(folder)`` reloads after ``import hf_geocomp``.
    """
    plan = build_plan_record(model, prune_plan, kv_plan, extra)  # before the KV buffers join the state dict
    if kv_plan is not None:
        kv_plan.check(model)
        if not kv_plan.identity:
            device = next(model.parameters()).device
            attach_bases(model, kv_plan, device=device).load_plan(kv_plan)
        use_coded_cache(model, kv_plan)
    fields = {} if request is None else {k: v for k, v in request.to_dict().items() if k != "plan"}
    cfg = GeoCompConfig(**{**fields, "plan": plan})
    model.config.quantization_config = cfg
    guard(model)
    return cfg


def guard(model: nn.Module) -> None:
    """Write the no-plugin guard into the config of a model stock transformers would rebuild wrongly."""
    plan = model.config.quantization_config.plan
    if plan["stock_loadable"]:
        if getattr(model.config, "attn_implementation", None) == GUARD:
            del model.config.attn_implementation
    else:
        model.config.attn_implementation = GUARD
