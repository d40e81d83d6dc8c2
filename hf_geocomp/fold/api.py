"""One-shot folding: ``fold(model, sparsity=...)`` → (model, plan). Needs no data unless ``repair="data"``."""

from __future__ import annotations

from torch import nn

from ..errors import GeoCompError
from ..geometry import collect_stats
from ..prune.api import prune_taps, update_config
from ..prune.units import unit_groups
from .config import FoldConfig
from .merge import apply_fold, merge_group
from .plan import FoldPlan, plan_fold
from .repair import data_free_scales, data_scales, identity_plan


def fold(model: nn.Module, sparsity: float = 0.2, config: FoldConfig | None = None, plan: FoldPlan | None = None,
         batches=None, stats=None, **kwargs) -> tuple[nn.Module, FoldPlan]:
    """Fold ``model`` in place to about ``sparsity`` of its block parameters; return it and the plan.

    ``plan`` (from :func:`plan_fold` on this model) skips clustering, e.g. to compare repairs
    of one clustering. ``repair="data"`` needs calibration ``batches``: the folded model is run
    over them once; ``stats`` (from :func:`hf_geocomp.prune.prune_taps` on the unfolded model)
    are collected from the same batches when not given. Extra keyword arguments are
    :class:`FoldConfig` fields.
    """
    cfg = config or FoldConfig(sparsity=sparsity, **kwargs)
    if cfg.repair == "data" and batches is None:
        raise GeoCompError("repair 'data' needs calibration batches; pass batches (or use repair data_free).")
    groups = unit_groups(model, cfg.targets, cfg.head_mode)
    if plan is None:
        plan = plan_fold(model, cfg)
    plan.validate(groups)
    placement = cfg.placement
    if cfg.repair == "data":
        batches = list(batches)
        if stats is None:
            stats = collect_stats(model, batches, prune_taps(model, cfg.targets))
        stats.check_model(model)
    scales = data_free_scales(model, groups, plan) if cfg.repair == "data_free" else None
    apply_fold(model, groups, plan, scales, placement)
    if cfg.repair == "data":
        after = unit_groups(model, cfg.targets, cfg.head_mode)
        measured = collect_stats(model, batches, prune_taps(model, cfg.targets))
        scales = data_scales(stats, groups, measured, after, plan)
        for g in after:
            if g.key in scales:
                merge_group(model, g, identity_plan(g), scales[g.key], placement)
    update_config(model, plan)
    model.config.geocomp_pruning["method"] = "fold"
    return model, plan
