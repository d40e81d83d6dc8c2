"""The fold plan: a :class:`~hf_geocomp.prune.PrunePlan` whose kept units are cluster representatives.

Cluster ``j`` of a group is represented by its lowest unit; ``keep`` lists the representatives
in order, so a folded model has exactly the shapes of a model pruned to ``keep``, and the
pruning surgery and config record (``prune.update_config``) apply unchanged. ``labels[u]`` is
the cluster of unit ``u``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..prune.plan import GroupPlan, PrunePlan, allocate
from ..prune.units import UnitGroup, block_params, unit_groups
from .cluster import cluster, redundancy, unit_features
from .config import FoldConfig


@dataclass
class FoldGroupPlan(GroupPlan):
    labels: list[int] = field(default_factory=list)  # (units,) cluster of each unit, clusters numbered by lowest unit

    def members(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.keep]
        for u, c in enumerate(self.labels):
            out[c].append(u)
        return out


@dataclass
class FoldPlan(PrunePlan):
    groups: list[FoldGroupPlan]

    def validate(self, groups: list[UnitGroup]) -> None:
        """Raise unless this plan fits ``groups``: same units, a label per unit, clusters inside GQA blocks."""
        super().validate(groups)
        by_key = {g.key: g for g in groups}
        for gp in self.groups:
            ug = by_key[gp.key]
            if len(gp.labels) != gp.num_units:
                raise GeoCompError(f"the fold plan's group {gp.key} labels {len(gp.labels)} units, "
                                   f"the model has {gp.num_units}.")
            mem = gp.members()
            if any(not m for m in mem) or [m[0] for m in mem] != gp.keep:
                raise GeoCompError(f"the fold plan's group {gp.key} has clusters whose lowest units are not its "
                                   "kept units.")
            size = ug.num_units // ug.blocks
            if any(len({u // size for u in m}) > 1 for m in mem):
                raise GeoCompError(f"the fold plan's group {gp.key} merges query heads of different GQA groups.")

    def to_dict(self) -> dict:
        d = super().to_dict()
        for gd, gp in zip(d["groups"], self.groups):
            gd["labels"] = list(gp.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FoldPlan":
        return cls([FoldGroupPlan(**g) for g in d["groups"]], d.get("config", {}), d.get("block_params", 0))


def _counts(model: nn.Module, groups: list[UnitGroup], cfg: FoldConfig, feats: dict) -> dict[str, int]:
    """Clusters per group: the widths pruning would keep at this budget (or ``cfg.clusters`` for MLPs);
    groups outside ``cfg.layers`` keep every unit."""
    layers = arch.layer_indices(model, cfg.layers)
    if cfg.clusters is not None:
        counts = {}
        for g in groups:
            if g.kind != "mlp":
                raise GeoCompError("clusters fixes MLP widths only; fold heads with sparsity instead.")
            if layers is not None and g.layer not in layers:
                counts[g.key] = g.num_units
                continue
            if cfg.clusters >= g.num_units:
                raise GeoCompError(f"clusters must be below the number of units of layer {g.layer} "
                                   f"({g.num_units}), got {cfg.clusters}.")
            counts[g.key] = int(cfg.clusters)
        return counts
    pcfg = cfg.budget()
    # uniform allocation reads only the counts; global ranks units by their data-free redundancy
    scores = {g.key: redundancy(feats[g.key]) if cfg.allocation == "global" else torch.zeros(g.num_units)
              for g in groups}
    return {gp.key: len(gp.keep) for gp in allocate(groups, scores, pcfg, block_params(model), layers=layers).groups}


def plan_fold(model: nn.Module, config: FoldConfig) -> FoldPlan:
    """Cluster the units of every group of ``model`` to the budget of ``config`` (needs no data)."""
    groups = unit_groups(model, config.targets, config.head_mode)
    feats = {g.key: unit_features(model, g) for g in groups}
    counts = _counts(model, groups, config, feats)
    plans = []
    for g in groups:
        k, size = counts[g.key], g.num_units // g.blocks
        per_block = k // g.blocks  # GQA query heads: the same count in every group, clusters within a group
        labels = torch.empty(g.num_units, dtype=torch.long)
        for b in range(g.blocks):
            lab = cluster(feats[g.key][b * size:(b + 1) * size], per_block, config.method,
                          config.seed * 1000003 + g.layer * 31 + b, config.iters)
            labels[b * size:(b + 1) * size] = lab + b * per_block
        keep = [int(u) for u in torch.stack([(labels == c).nonzero()[0, 0] for c in range(k)])]
        plans.append(FoldGroupPlan(g.layer, g.kind, g.num_units, keep, g.params_per_unit, labels.tolist()))
    return FoldPlan(plans, {**config.to_dict(), "method_family": "fold"}, block_params(model))


def plan_from_labels(model: nn.Module, labels: dict[str, list[int]], config: FoldConfig | None = None) -> FoldPlan:
    """A fold plan from given cluster labels per group key (``"3.mlp"``); groups not named stay unfolded."""
    config = config or FoldConfig()
    plans = []
    for g in unit_groups(model, config.targets, config.head_mode):
        lab = torch.as_tensor(labels.get(g.key, range(g.num_units)), dtype=torch.long)
        if lab.numel() != g.num_units:
            raise GeoCompError(f"labels of group {g.key} name {lab.numel()} units, the model has {g.num_units}.")
        first: dict[int, int] = {}
        for u, c in enumerate(lab.tolist()):
            first.setdefault(c, len(first))
        canon = [first[c] for c in lab.tolist()]
        keep = [canon.index(c) for c in range(len(first))]  # lowest unit of each cluster
        plans.append(FoldGroupPlan(g.layer, g.kind, g.num_units, keep, g.params_per_unit, canon))
    return FoldPlan(plans, {**config.to_dict(), "method_family": "fold"}, block_params(model))
