"""Variance repair of merged units: a per-cluster scale s restoring the members' output spread.

The mean of n units with variance σ² and pairwise correlation ρ has variance σ²(1+(n−1)ρ)/n,
so averaging shrinks what the layer passes on.

* Data-free (Fold-AR, Wang et al., ICLR 2025, arXiv:2502.10216): ρ is approximated by the mean
  pairwise cosine similarity ρ̄ of the members' producer rows (exact for the pre-activations of
  whitened inputs), and ``s = sqrt(n / (1 + (n−1)ρ̄))`` (ρ̄ clipped to [0, 1]).
* Data (REPAIR-style, Jordan et al., arXiv:2211.08403): each merged unit's output standard
  deviation is measured on calibration text by the statistics engine, and ``s`` is the mean of
  its members' standard deviations in the unfolded model over the measured one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..prune.units import UnitGroup
from .cluster import producer_features
from .plan import FoldGroupPlan, FoldPlan


def fold_ar_scale(features: torch.Tensor, members: list[list[int]]) -> torch.Tensor:
    """(k,) Fold-AR scales from producer features (units, d) and cluster member lists."""
    f = features.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-30)
    out = torch.ones(len(members), dtype=torch.float64)
    for c, mem in enumerate(members):
        n = len(mem)
        if n < 2:
            continue
        cos = f[mem] @ f[mem].T  # (n, n)
        rho = ((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))).clamp(0, 1)
        out[c] = torch.sqrt(n / (1 + (n - 1) * rho))
    return out


def data_free_scales(model: nn.Module, groups: list[UnitGroup], plan: FoldPlan) -> dict[str, torch.Tensor]:
    by_key = {g.key: g for g in groups}
    return {gp.key: fold_ar_scale(producer_features(model, by_key[gp.key]), gp.members())
            for gp in plan.groups if gp.removed}


def unit_std(moments, group: UnitGroup) -> torch.Tensor:
    """(units,) standard deviation of each unit's output, RMS over its consumer columns."""
    var = moments.covariance().diagonal().clamp_min(0)  # (in,)
    return var[group.cols].mean(1).sqrt()


def data_scales(stats_before, groups_before: list[UnitGroup], stats_after, groups_after: list[UnitGroup],
                plan: FoldPlan) -> dict[str, torch.Tensor]:
    """(k,) per folded group: mean member std in the unfolded model over the merged unit's measured std.

    Keys are group keys; a cluster of one unit keeps scale 1 exactly.
    """
    before = {g.key: g for g in groups_before}
    after = {g.key: g for g in groups_after}
    out = {}
    for gp in plan.groups:
        if not gp.removed:
            continue
        sd0 = unit_std(stats_before.input_of(before[gp.key].consumer), before[gp.key])  # (n,)
        sd1 = unit_std(stats_after.input_of(after[gp.key].consumer), after[gp.key])  # (k,)
        members = gp.members()
        target = torch.stack([sd0[m].mean() for m in members])
        s = torch.where(sd1 > 1e-12, target / sd1.clamp_min(1e-12), torch.ones_like(sd1))
        s[torch.tensor([len(m) == 1 for m in members])] = 1.0
        out[gp.key] = s
    return out


def identity_plan(group: UnitGroup) -> FoldGroupPlan:
    """Every unit its own cluster: merging by it only applies a scale."""
    n = group.num_units
    return FoldGroupPlan(group.layer, group.kind, n, list(range(n)), group.params_per_unit, list(range(n)))
