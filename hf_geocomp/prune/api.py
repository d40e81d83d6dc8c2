"""One-shot structured pruning: ``prune(model, stats, sparsity=...)`` → (model, plan)."""

from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..geometry import Tap
from .config import COMPENSATIONS, PruneConfig
from .plan import PrunePlan, allocate
from .scorers import READS, get_scorer
from .surgery import apply_plan
from .units import TARGETS, UnitGroup, block_params, unit_groups


def prune_taps(model: nn.Module, targets=TARGETS, *, criteria=None, compensation: str = "none",
               head_mode: str = "query") -> list[Tap]:
    """The statistics pruning reads: the inputs of every consumer (down_proj, o_proj, ...).

    Without ``criteria``, every consumer input in full (whatever any criterion or compensation
    may read). With ``criteria`` (names, e.g. a run's criterion and its baselines) and
    ``compensation``, only what they read: full inputs for ``variance_cond`` and ``refit``;
    per-unit covariance blocks for ``variance`` (per-feature variances for neurons, per-head
    statistics for heads: d or d·head_dim multiply-adds per token instead of d²); per-feature
    second moments for ``wanda`` and the mean for ``bias``; nothing for ``magnitude``,
    ``random`` and ``taylor`` (an empty list: no calibration pass is needed). Scores and
    compensation from these statistics equal those from full ones up to rounding.
    """
    if compensation not in COMPENSATIONS:
        raise GeoCompError(f"compensation {compensation!r} does not exist; allowed: {', '.join(COMPENSATIONS)}.")
    if criteria is None:
        need = "full"
    else:
        reads = [get_scorer(c).reads for c in criteria]
        reads.append("full" if "refit" in compensation else "diag" if "bias" in compensation else None)
        need = max(reads, key=READS.index)
    if need is None:
        return []
    taps = []
    for g in unit_groups(model, targets, head_mode):
        width = g.cols.shape[1]  # input columns per unit
        if need == "full":
            taps.append(Tap(g.consumer, "input"))
        elif need == "diag" or width == 1:
            taps.append(Tap(g.consumer, "input", moments="diag"))
        else:  # covariance blocks of whole heads (or KV groups)
            taps.append(Tap(g.consumer, "input", head_dim=width))
    return taps


def score_groups(model, groups: list[UnitGroup], cfg: PruneConfig, stats=None, grads=None) -> dict[str, torch.Tensor]:
    scorer = get_scorer(cfg.criterion, cfg.seed)
    if scorer.needs_stats and stats is None:
        raise GeoCompError(f"criterion {cfg.criterion!r} needs activation statistics (see prune_taps).")
    return {g.key: scorer.score(model, g, stats, grads) for g in groups}


def update_config(model: nn.Module, plan: PrunePlan) -> bool:
    """Record the new widths in ``model.config``; return whether stock ``from_pretrained`` rebuilds them.

    Uniform widths (and, for Llama-like models, uniform head counts) go into the ordinary
    config keys. Otherwise the ordinary keys keep their original values, so stock
    ``from_pretrained`` stops with a size-mismatch error instead of loading wrong shapes;
    ``config.geocomp_pruning`` holds the per-layer widths for the geocomp loader.
    """
    spec, cfg = arch.get_spec(model), model.config
    heads = arch.head_layout(model)
    mlp, q = plan.widths("mlp"), plan.widths("heads")
    per_unit = {g.kind: g for g in plan.groups}
    record = {"mlp_widths": mlp or None, "head_units": q or None, "head_mode": plan.config.get("head_mode")}
    stock = True
    if mlp and len(set(mlp)) == 1:
        setattr(cfg, spec.mlp_width, mlp[0])
    elif mlp:
        stock = False
    if q and any(len(g.keep) < g.num_units for g in plan.groups if g.kind == "heads"):
        if len(set(q)) == 1 and spec.head_config:
            g = per_unit["heads"]
            gqa_query = plan.config.get("head_mode") == "query" and heads.group_size > 1
            n_heads = q[0] * (1 if g.num_units == heads.num_heads else heads.group_size)
            n_kv = heads.num_kv_heads if gqa_query else q[0] if g.num_units == heads.num_kv_heads else n_heads
            cfg.head_dim = heads.head_dim  # explicit, so it is not re-derived from hidden_size / heads
            cfg.num_attention_heads, cfg.num_key_value_heads = n_heads, n_kv
        else:
            stock = False
    record["stock_loadable"] = stock
    cfg.geocomp_pruning = record
    return stock


def taylor_grads(model: nn.Module, batches, targets=TARGETS) -> dict[str, torch.Tensor]:
    """Σ over batches of w·∂L/∂w (language-model loss) for every module a unit group touches, (out, in)."""
    groups = unit_groups(model, targets)
    names = sorted({n for g in groups for n in (g.consumer, *g.producers)})
    acc = {n: torch.zeros_like(arch.linear_weight(model.get_submodule(n)), dtype=torch.float64) for n in names}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(**batch, labels=batch["input_ids"])
            if getattr(out, "loss", None) is None:
                raise GeoCompError("the taylor criterion needs a model that returns a loss (a task head).")
            out.loss.backward()
            for n in names:
                m = model.get_submodule(n)
                acc[n] += (arch.linear_weight(m).detach() * arch.linear_weight_grad(m)).double()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return acc


def prune(model: nn.Module, stats=None, sparsity: float = 0.2, criterion: str = "variance",
          targets=("mlp", "heads"), allocation: str = "uniform", compensation: str = "none",
          grads: dict | None = None, config: PruneConfig | None = None, scores: dict | None = None,
          **kwargs) -> tuple[nn.Module, PrunePlan]:
    """Prune ``model`` in place to about ``sparsity`` of its block parameters; return it and the plan.

    ``stats`` come from :func:`hf_geocomp.geometry.collect_stats` with :func:`prune_taps` (needed by
    the variance and wanda criteria and by compensation); they must be from this model and its
    current weights. ``grads`` (from :func:`taylor_grads`) feed the taylor criterion; ``scores``
    (from :func:`score_groups` on this model) skip scoring when one model is pruned at several budgets. Extra
    keyword arguments are :class:`PruneConfig` fields.
    """
    cfg = config or PruneConfig(sparsity=sparsity, criterion=criterion, targets=targets, allocation=allocation,
                                compensation=compensation, **kwargs)
    if stats is not None:
        stats.check_model(model)
    if cfg.compensation != "none" and stats is None:
        raise GeoCompError(f"compensation {cfg.compensation!r} needs activation statistics (see prune_taps).")
    groups = unit_groups(model, cfg.targets, cfg.head_mode)
    if scores is None:
        scores = score_groups(model, groups, cfg, stats, grads)
    plan = allocate(groups, scores, cfg, block_params(model), layers=arch.layer_indices(model, cfg.layers))
    apply_plan(model, groups, plan, stats, cfg.compensation, cfg.refit_damp, cfg.refit_shrinkage)
    update_config(model, plan)
    return model, plan


def prune_sequential(model: nn.Module, batches, config: PruneConfig, propagate: str = "original",
                     grads: dict | None = None, scores: dict | None = None,
                     progress: bool = False) -> tuple[nn.Module, PrunePlan]:
    """:func:`prune`, with one block's statistics in memory at a time (a model of any size).

    Two block-by-block passes (:func:`~hf_geocomp.geometry.collect_stats_sequential`): the first
    scores every unit from the small statistics its criterion reads (per-feature variances,
    per-head blocks) and the plan is allocated over the whole model, as :func:`prune` does; the
    second measures each block's consumer inputs in full where the compensation reads them, cuts
    the block and refits it, and frees them. With ``propagate="original"`` the result equals
    :func:`prune` on whole-model statistics; with ``"compressed"`` each block's compensation is
    fitted to the outputs of the already pruned blocks before it, what it will really receive.
    """
    from ..geometry import collect_stats_sequential

    cfg = config
    if cfg.criterion == "taylor" and grads is None:
        raise GeoCompError("the taylor criterion needs grads (see taylor_grads).")
    batches = list(batches)
    groups = unit_groups(model, cfg.targets, cfg.head_mode)
    if scores is None:
        taps = prune_taps(model, cfg.targets, criteria=[cfg.criterion], head_mode=cfg.head_mode)
        if taps:
            scores = {}

            def score_block(i, stats):
                scores.update(score_groups(model, [g for g in groups if g.layer == i], cfg, stats, grads))

            collect_stats_sequential(model, batches, taps, score_block, progress=progress)
        else:
            scores = score_groups(model, groups, cfg, None, grads)
    plan = allocate(groups, scores, cfg, block_params(model), layers=arch.layer_indices(model, cfg.layers))
    taps = prune_taps(model, cfg.targets, criteria=[], compensation=cfg.compensation, head_mode=cfg.head_mode)
    if taps:
        def cut_block(i, stats):
            apply_plan(model, groups, plan, stats, cfg.compensation, cfg.refit_damp, cfg.refit_shrinkage,
                       layers={i}, check=False)

        collect_stats_sequential(model, batches, taps, cut_block, propagate=propagate, progress=progress)
    else:
        apply_plan(model, groups, plan)
    update_config(model, plan)
    return model, plan


def prune_calibrated(model: nn.Module, batches, config: PruneConfig, pipeline: str = "sequential",
                     propagate: str = "original", progress: bool = False) -> tuple[nn.Module, PrunePlan]:
    """Calibrate on ``batches`` and prune: the one pruning step of the main job and of compress on load.

    ``pipeline="sequential"``: :func:`prune_sequential` (one block's statistics at a time);
    ``"whole-model"``: every block's statistics at once, then :func:`prune`. The taylor criterion's
    gradients come from a backward pass through the whole model either way.
    """
    from ..geometry import PIPELINES, collect_stats

    if pipeline not in PIPELINES:
        raise GeoCompError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}.")
    cfg = config
    grads = taylor_grads(model, batches, cfg.targets) if cfg.criterion == "taylor" else None
    if pipeline == "sequential":
        return prune_sequential(model, batches, cfg, propagate, grads=grads, progress=progress)
    taps = prune_taps(model, cfg.targets, criteria=[cfg.criterion], compensation=cfg.compensation,
                      head_mode=cfg.head_mode)
    stats = collect_stats(model, batches, taps, progress=progress) if taps else None
    return prune(model, stats, grads=grads, config=cfg)
