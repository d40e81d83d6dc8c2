"""Merge clustered units: producers become cluster means, the consumer cluster sums.

With M the (k, n) 0/1 membership matrix of one group, producer rows become
``W' = diag(1/|c|)·M·W`` (gate and up, c_fc, q/k/v of a head; biases likewise) and the
consumer's columns ``W_down' = W_down·Mᵀ``. Units that are exact copies therefore fold without
changing the model. The merged unit is written over its cluster's lowest unit, then the other
members are removed by the pruning surgery, so folded and pruned models share one layout.
An optional per-cluster scale ``s`` (a variance repair, see :mod:`.repair`) multiplies the
merged unit where ``placement`` says.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..prune.surgery import apply_plan
from ..prune.units import UnitGroup
from .plan import FoldGroupPlan, FoldPlan

PLACEMENTS = ("consumer", "gate", "producers")


def membership(labels: list[int], k: int) -> torch.Tensor:
    """The (k, n) 0/1 matrix M with M[c, u] = 1 when unit u is in cluster c."""
    m = torch.zeros(k, len(labels), dtype=torch.float64)
    m[torch.as_tensor(labels), torch.arange(len(labels))] = 1
    return m


def _scale_targets(group: UnitGroup, placement: str) -> tuple[list[str], bool, float]:
    """(producers to scale, scale the consumer?, exponent per producer) for one placement."""
    names = list(group.producers)
    if placement == "consumer":
        return [], True, 1.0
    if placement == "gate":
        gate = [n for n in names if n.endswith("gate_proj")]
        if group.kind != "mlp" or not gate:
            raise GeoCompError("repair_at 'gate' needs a gated (SwiGLU) MLP; use consumer or producers.")
        return gate, False, 1.0
    if placement == "producers":
        return names, False, 1.0 / len(names)
    raise GeoCompError(f"repair placement {placement!r} does not exist; allowed: {', '.join(PLACEMENTS)}.")


@torch.no_grad()
def merge_group(model: nn.Module, group: UnitGroup, gp: FoldGroupPlan, scale: torch.Tensor | None = None,
                placement: str = "consumer") -> None:
    """Write every cluster's merged unit over its representative (in place, shapes unchanged).

    ``scale`` is (k,) per cluster, or None for no repair.
    """
    M = membership(gp.labels, len(gp.keep))  # (k, n)
    mean = M / M.sum(1, keepdim=True)  # diag(1/|c|)·M
    reps = torch.as_tensor(gp.keep)
    scaled, cons_scaled, expo = _scale_targets(group, placement) if scale is not None else ([], False, 1.0)
    for name, rows in group.producers.items():
        m = model.get_submodule(name)
        W = arch.linear_weight(m)  # (out, in) view
        per_unit = W.detach().double()[rows]  # (n, r, in)
        merged = torch.einsum("kn,nri->kri", mean, per_unit)  # (k, r, in)
        mb = None if m.bias is None else mean @ m.bias.detach().double()[rows]  # (k, r)
        if name in scaled:
            s = scale.double().pow(expo)[:, None]  # (k, 1)
            merged, mb = merged * s[..., None], None if mb is None else mb * s
        W[rows[reps].reshape(-1)] = merged.reshape(-1, merged.shape[-1]).to(W.dtype)
        if mb is not None:
            m.bias[rows[reps].reshape(-1)] = mb.reshape(-1).to(m.bias.dtype)
    W = arch.linear_weight(model.get_submodule(group.consumer))  # (out, in)
    cols = W.detach().double()[:, group.cols]  # (out, n, c)
    summed = torch.einsum("kn,onc->okc", M, cols)  # W·Mᵀ per column offset, (out, k, c)
    if cons_scaled:
        summed = summed * scale.double()[None, :, None]
    W[:, group.cols[reps].reshape(-1)] = summed.reshape(W.shape[0], -1).to(W.dtype)


def apply_fold(model: nn.Module, groups: list[UnitGroup], plan: FoldPlan,
               scales: dict[str, torch.Tensor] | None = None, placement: str = "consumer") -> nn.Module:
    """Fold ``model`` in place by ``plan``: merge every cluster, then cut the non-representatives."""
    plan.validate(groups)
    by_key = {gp.key: gp for gp in plan.groups}
    scales = scales or {}
    for g in groups:
        gp = by_key.get(g.key)
        if gp is not None and gp.removed:
            merge_group(model, g, gp, scales.get(g.key), placement)
    return apply_plan(model, groups, plan)
