"""Physically remove the units a plan drops, with optional compensation; or only mask them.

Compensation of the consumer y = W x + b when the inputs R are dropped and K kept
(C the consumer's uncentred input second moment, Σ its covariance, μ its mean):

* bias (FLAP):     W' = W[:, K],                        b' = b + W[:, R] μ_R
* refit:           W' = W C[:, K] (C_KK + λI)⁻¹          (least squares, no intercept)
* bias + refit:    W' = W Σ[:, K] (Σ_KK + λI)⁻¹,         b' = b + W μ − W' μ_K
"""

from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from .plan import PrunePlan
from .units import UnitGroup


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _consumer_weights(W: torch.Tensor, b: torch.Tensor | None, keep: torch.Tensor, drop: torch.Tensor,
                      moments, bias: bool, refit: bool, damp: float, shrinkage: float = 0.0):
    """(W', b') of the consumer for kept input columns ``keep``; W is (out, in) float64.

    ``shrinkage`` α blends the refit's moment matrix toward its diagonal, ``(1 − α)·C + α·diag(C)``:
    at 1 no cross-correlation of the calibration text is read and the refit only rescales kept columns
    by ``c/(c + λ)`` (the ridge), close to bias compensation alone; at 0 it is the full refit.
    """
    if not (bias or refit) or drop.numel() == 0:
        return W[:, keep], b
    mu = moments.mean().reshape(-1)  # (in,); per-head statistics lie heads side by side
    if bias and b is None:
        b = torch.zeros(W.shape[0], dtype=W.dtype)
    if not refit:
        return W[:, keep], b + W[:, drop] @ mu[drop]
    C = moments.covariance() if bias else moments.second_moment()  # (in, in)
    if shrinkage:
        C = (1 - shrinkage) * C + shrinkage * torch.diag(C.diagonal())
    ckk = C[keep][:, keep]
    ridge = damp * ckk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=C.dtype)
    Wn = torch.linalg.solve(ckk + ridge, (W @ C[:, keep]).T).T  # W C[:, K] (C_KK + λI)⁻¹, (out, |K|)
    return Wn, (b + W @ mu - Wn @ mu[keep]) if bias else b


def _rows(group: UnitGroup, units: list[int], name: str) -> torch.Tensor:
    return group.producers[name][units].reshape(-1).sort().values


def _pruned(groups: list[UnitGroup], plan: PrunePlan):
    """(group, its plan) for every group that loses units."""
    by_key = {gp.key: gp for gp in plan.groups}
    return [(g, by_key[g.key]) for g in groups if g.key in by_key and by_key[g.key].removed]


def apply_plan(model: nn.Module, groups: list[UnitGroup], plan: PrunePlan, stats=None,
               compensation: str = "none", damp: float = 1e-2, shrinkage: float = 0.0,
               layers: set[int] | None = None, check: bool = True) -> nn.Module:
    """Replace the modules of ``groups`` by smaller ones holding only the kept units (in place).

    ``layers``: cut only the groups of these blocks (block-by-block pruning hands each block its own
    statistics); ``check=False`` skips the check that ``stats`` were measured on these very weights
    (a caller that measured them itself, block by block, on a model it is changing as it goes).
    """
    plan.validate(groups)
    if layers is not None:
        groups = [g for g in groups if g.layer in layers]
    bias, refit = "bias" in compensation, "refit" in compensation
    by_key = {gp.key: gp for gp in plan.groups}
    if (bias or refit) and stats is None:
        raise GeoCompError(f"compensation {compensation!r} needs activation statistics.")
    if (bias or refit) and check:  # the refit reads these statistics: never from another model or older weights
        stats.check_model(model)
    for kind in ("mlp", "heads"):
        if bias and any(by_key[g.key].removed for g in groups if g.kind == kind and g.key in by_key):
            if any(getattr(model.get_submodule(g.consumer), "bias", None) is None for g in groups if g.kind == kind):
                arch.ensure_bias(model, kind)
    spec = arch.get_spec(model)
    with torch.no_grad():
        for g, gp in _pruned(groups, plan):
            for name in g.producers:
                m = model.get_submodule(name)
                rows = _rows(g, gp.keep, name)
                W = arch.linear_weight(m)
                _set_module(model, name, arch.new_linear(m, W[rows], None if m.bias is None else m.bias[rows]))
            m = model.get_submodule(g.consumer)
            keep = g.cols[gp.keep].reshape(-1).sort().values
            drop = g.cols[gp.removed].reshape(-1).sort().values
            W = arch.linear_weight(m)
            moments = stats.input_of(g.consumer) if (bias or refit) else None
            Wn, bn = _consumer_weights(W.double(), None if m.bias is None else m.bias.double(), keep, drop,
                                       moments, bias, refit, damp, shrinkage)
            _set_module(model, g.consumer, arch.new_linear(m, Wn.to(W.dtype), None if bn is None else bn.to(W.dtype)))
            if g.kind == "heads":
                heads = arch.head_layout(model)
                n_kv_before = (g.num_units * g.kv_per_unit) or heads.num_kv_heads
                prefix = arch.block_prefixes(model)[g.layer]
                arch.set_attention_heads(model, model.get_submodule(prefix + spec.attn),
                                         len(gp.keep) * g.heads_per_unit,
                                         n_kv_before - len(gp.removed) * g.kv_per_unit)
    return model


def apply_masks(model: nn.Module, groups: list[UnitGroup], plan: PrunePlan, stats=None,
                compensation: str = "none", damp: float = 1e-2, shrinkage: float = 0.0) -> None:
    """Zero the weights of every removed unit in place (shapes unchanged): producer rows and consumer columns.

    With ``compensation`` (and ``stats`` of the current, already masked model) the consumer's
    kept columns and bias are refitted first, as :func:`apply_plan` would.
    """
    bias, refit = "bias" in compensation, "refit" in compensation
    if (bias or refit) and stats is None:
        raise GeoCompError(f"compensation {compensation!r} needs activation statistics.")
    if bias:
        for kind in {g.kind for g, _ in _pruned(groups, plan)}:
            arch.ensure_bias(model, kind)
    with torch.no_grad():
        for g, gp in _pruned(groups, plan):
            if bias or refit:
                m = model.get_submodule(g.consumer)
                keep = g.cols[gp.keep].reshape(-1).sort().values
                drop = g.cols[gp.removed].reshape(-1).sort().values
                W = arch.linear_weight(m)
                Wn, bn = _consumer_weights(W.double(), None if m.bias is None else m.bias.double(), keep, drop,
                                           stats.input_of(g.consumer), bias, refit, damp, shrinkage)
                W[:, keep] = Wn.to(W.dtype)
                if bn is not None:
                    m.bias.copy_(bn.to(m.bias.dtype))
            for name in g.producers:
                m = model.get_submodule(name)
                rows = _rows(g, gp.removed, name)
                arch.linear_weight(m)[rows] = 0
                if m.bias is not None:
                    m.bias[rows] = 0
            arch.linear_weight(model.get_submodule(g.consumer))[:, g.cols[gp.removed].reshape(-1)] = 0
