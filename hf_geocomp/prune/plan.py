"""What to keep: allocation of a parameter budget over layers, recorded in a serialisable plan.

The plan is the only thing surgery reads, so scoring and cutting stay separate
(Torch-Pruning's pruner/function split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import GeoCompError
from .config import PruneConfig
from .units import TARGETS, UnitGroup


@dataclass
class GroupPlan:
    layer: int
    kind: str
    num_units: int
    keep: list[int]  # sorted unit indices kept
    params_per_unit: int

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [u for u in range(self.num_units) if u not in kept]

    @property
    def params_removed(self) -> int:
        return (self.num_units - len(self.keep)) * self.params_per_unit


@dataclass
class PrunePlan:
    """Units kept per (layer, kind), the config that chose them and the achieved budget."""

    groups: list[GroupPlan]
    config: dict = field(default_factory=dict)
    block_params: int = 0

    @property
    def params_removed(self) -> int:
        return sum(g.params_removed for g in self.groups)

    @property
    def achieved_sparsity(self) -> float:
        return self.params_removed / self.block_params if self.block_params else 0.0

    def widths(self, kind: str) -> list[int]:
        return [len(g.keep) for g in self.groups if g.kind == kind]

    def validate(self, groups: list[UnitGroup]) -> None:
        """Raise unless this plan fits ``groups`` (same units) and keeps something in every layer."""
        by_key = {g.key: g for g in groups}
        for gp in self.groups:
            ug = by_key.get(gp.key)
            if ug is None or ug.num_units != gp.num_units:
                raise GeoCompError(f"the plan's group {gp.key} does not match this model's units.")
            if not gp.keep:
                raise GeoCompError(f"the plan removes every unit of layer {gp.layer} ({gp.kind}); keep at least one.")
            if min(gp.keep) < 0 or max(gp.keep) >= gp.num_units or len(set(gp.keep)) != len(gp.keep):
                raise GeoCompError(f"the plan's kept units of {gp.key} are not distinct indices below {gp.num_units}.")
            removed_per_block = torch.zeros(ug.blocks, dtype=torch.long)
            for u in gp.removed:
                removed_per_block[u * ug.blocks // ug.num_units] += 1
            if ug.blocks > 1 and len(set(removed_per_block.tolist())) > 1:
                raise GeoCompError(f"the plan for {gp.key} removes different numbers of query heads from the GQA "
                                   "groups; every group must keep the same number.")

    def to_dict(self) -> dict:
        return {"config": self.config, "block_params": self.block_params, "params_removed": self.params_removed,
                "achieved_sparsity": self.achieved_sparsity,
                "groups": [{"layer": g.layer, "kind": g.kind, "num_units": g.num_units, "keep": g.keep,
                            "params_per_unit": g.params_per_unit} for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        return cls([GroupPlan(**g) for g in d["groups"]], d.get("config", {}), d.get("block_params", 0))


# ---- allocation --------------------------------------------------------------------------------

def _removal_order(group: UnitGroup, scores: torch.Tensor, forced: set[int]) -> list[list[int]]:
    """Removal steps, cheapest first; a step is one unit, or one unit per GQA block."""
    s = scores.clone().double()
    if forced:
        s[list(forced)] = -math.inf  # already removed (masked) units go first
    n_b = group.num_units // group.blocks
    per_block = [(torch.argsort(s[b * n_b:(b + 1) * n_b], stable=True) + b * n_b).tolist()
                 for b in range(group.blocks)]
    return [[order[i] for order in per_block] for i in range(n_b)]


def _limits(group: UnitGroup, cfg: PruneConfig, layers: list[int] | None = None) -> tuple[int, int]:
    """(least, most) removal steps allowed in this group (none outside ``layers``)."""
    if layers is not None and group.layer not in layers:
        return 0, 0
    n_b = group.num_units // group.blocks
    keep_min = max(1, math.ceil(cfg.min_keep * n_b - 1e-9))
    keep_max = max(keep_min, math.floor(cfg.max_keep * n_b + 1e-9))
    return n_b - keep_max, n_b - keep_min


def _rounded_steps(group: UnitGroup, steps: int, cfg: PruneConfig) -> int:
    """Fewer removal steps so an MLP's kept width is a multiple of ``round_to``."""
    if group.kind != "mlp" or cfg.round_to == 1:
        return steps
    keep = group.num_units - steps
    keep = min(group.num_units, -(-keep // cfg.round_to) * cfg.round_to)
    return group.num_units - keep


def allocate(groups: list[UnitGroup], scores: dict[str, torch.Tensor], cfg: PruneConfig, block_params: int,
             forced: dict[str, set[int]] | None = None, layers: list[int] | None = None) -> PrunePlan:
    """Choose units to remove so about ``cfg.sparsity`` of ``block_params`` goes.

    ``forced`` maps group keys to units that must be removed (earlier masks). ``layers`` (``cfg.layers``
    resolved by :func:`hf_geocomp.arch.layer_indices`): only groups of these blocks lose units.
    """
    forced = forced or {}
    budget = cfg.sparsity * block_params
    orders = {g.key: _removal_order(g, scores[g.key], forced.get(g.key, set())) for g in groups}
    limits = {g.key: _limits(g, cfg, layers) for g in groups}
    step_cost = {g.key: g.params_per_unit * g.blocks for g in groups}

    def removed_params(steps: dict[str, int]) -> int:
        return sum(steps[k] * step_cost[k] for k in steps)

    if cfg.allocation == "uniform":
        def steps_at(r: float, kinds, base=None) -> dict[str, int]:
            out = dict(base or {})
            for g in groups:
                if g.kind in kinds:
                    lo, hi = limits[g.key]
                    out[g.key] = min(hi, max(lo, _rounded_steps(g, round(r * len(orders[g.key])), cfg)))
            return out

        def largest(kinds, base=None, lo_r=0.0) -> tuple[float, dict[str, int]]:
            hi_r = 1.0
            for _ in range(50):  # largest uniform ratio within budget
                mid = (lo_r + hi_r) / 2
                lo_r, hi_r = (mid, hi_r) if removed_params(steps_at(mid, kinds, base)) <= budget else (lo_r, mid)
            return lo_r, steps_at(lo_r, kinds, base)
        r, steps = largest(TARGETS)
        for kind in ("mlp", "heads"):  # coarse units (heads) may stop short: the other kind fills the budget
            steps = largest((kind,), steps, r)[1]
    else:  # global: z-scored per group, cheapest steps first across all groups
        steps = {g.key: limits[g.key][0] for g in groups}
        cands = []
        for g in groups:
            s = scores[g.key].double()
            z = (s - s.mean()) / (s.std() + 1e-12) if s.numel() > 1 else s * 0
            for g_key in forced.get(g.key, ()):
                z[g_key] = -math.inf
            for i, step in enumerate(orders[g.key]):
                if i >= steps[g.key]:
                    cands.append((float(z[step].mean()), g.key, i))
        cands.sort()
        total = removed_params(steps)
        for _, key, i in cands:
            if total + step_cost[key] > budget:
                continue
            if i == steps[key] and steps[key] < limits[key][1]:
                steps[key] += 1
                total += step_cost[key]
        by_key = {g.key: g for g in groups}
        steps = {k: max(limits[k][0], _rounded_steps(by_key[k], v, cfg)) for k, v in steps.items()}
    plans = []
    for g in groups:
        removed = {u for step in orders[g.key][: steps[g.key]] for u in step}
        plans.append(GroupPlan(g.layer, g.kind, g.num_units, [u for u in range(g.num_units) if u not in removed],
                               g.params_per_unit))
    return PrunePlan(plans, cfg.to_dict(), block_params)
