"""Prunable units of a transformer block: MLP neurons and attention heads (GQA-aware).

A :class:`UnitGroup` is one layer's set of units of one kind. Unit ``u`` owns output rows
``rows[m][u]`` of each producer module ``m`` and input columns ``cols[u]`` of the consumer;
removing it deletes exactly those rows and columns. The layout comes from :mod:`arch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError

TARGETS = ("mlp", "heads")
HEAD_MODES = ("query", "kv")


@dataclass
class UnitGroup:
    layer: int
    kind: str  # "mlp" or "heads"
    producers: dict[str, torch.Tensor]  # module → (units, rows per unit) output-row indices
    consumer: str  # module reading the units
    cols: torch.Tensor  # (units, cols per unit) input-column indices of the consumer
    params_per_unit: int
    blocks: int = 1  # removals must be equal in each of this many contiguous blocks (GQA query heads)
    heads_per_unit: int = 0  # query heads per unit (heads only)
    kv_per_unit: int = 0  # KV heads per unit (heads only)

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def num_units(self) -> int:
        return self.cols.shape[0]


def _ranges(starts: torch.Tensor, width: int) -> torch.Tensor:
    return starts[:, None] + torch.arange(width)[None, :]  # (units, width)


def _params(model: nn.Module, producers: dict, consumer: str, cols: torch.Tensor) -> int:
    n = 0
    for name, rows in producers.items():
        m = model.get_submodule(name)
        n += rows.shape[1] * (arch.linear_weight(m).shape[1] + (m.bias is not None))
    return n + cols.shape[1] * arch.linear_weight(model.get_submodule(consumer)).shape[0]


def unit_groups(model: nn.Module, targets=TARGETS, head_mode: str = "query") -> list[UnitGroup]:
    """Every prunable group of ``model`` for ``targets``, in layer order."""
    spec = arch.get_spec(model)
    heads = arch.head_layout(model)
    hd, g = heads.head_dim, heads.group_size
    groups = []
    for i, prefix in enumerate(arch.block_prefixes(model)):
        if "mlp" in targets:
            cons = prefix + spec.mlp_out
            width = arch.linear_weight(model.get_submodule(cons)).shape[1]
            idx = torch.arange(width)[:, None]  # (units, 1)
            rows = idx + torch.arange(spec.mlp_chunks) * width  # (units, chunks): a fused [gate | up] owns j and I + j
            prods = {prefix + n: rows for n in spec.mlp_in}
            groups.append(UnitGroup(i, "mlp", prods, cons, idx, _params(model, prods, cons, idx)))
        if "heads" in targets:
            if spec.head_pruning:
                raise GeoCompError(f"attention heads cannot be pruned here: {spec.head_pruning}.")
            cons = prefix + spec.o
            nq = arch.linear_weight(model.get_submodule(cons)).shape[1] // hd
            nkv = nq // g if spec.qkv is None else nq  # current counts (GPT-2/BERT have no GQA)
            if head_mode == "kv" and g > 1:  # unit = one KV head with its query heads
                cols = _ranges(torch.arange(nkv) * g * hd, g * hd)
                kv_rows = _ranges(torch.arange(nkv) * hd, hd)
                prods = {prefix + spec.q: cols, prefix + spec.k: kv_rows, prefix + spec.v: kv_rows}
                groups.append(UnitGroup(i, "heads", prods, cons, cols, _params(model, prods, cons, cols),
                                        heads_per_unit=g, kv_per_unit=1))
                continue
            cols = _ranges(torch.arange(nq) * hd, hd)  # (heads, head_dim)
            if spec.qkv is not None:  # fused [q | k | v] rows, no GQA
                e = nq * hd
                prods = {prefix + spec.qkv: torch.cat([cols, cols + e, cols + 2 * e], 1)}
                kv = 1
            elif g == 1:
                prods = {prefix + n: cols for n in (spec.q, spec.k, spec.v)}
                kv = 1
            else:  # GQA, query heads: k/v stay, every group must keep the same number of heads
                prods, kv = {prefix + spec.q: cols}, 0
            groups.append(UnitGroup(i, "heads", prods, cons, cols, _params(model, prods, cons, cols),
                                    blocks=nkv if kv == 0 else 1, heads_per_unit=1, kv_per_unit=kv))
    if not groups:
        raise GeoCompError(f"targets {targets!r} select nothing; allowed: {', '.join(TARGETS)}.")
    return groups


def block_params(model: nn.Module) -> int:
    """Parameters inside the transformer blocks (the budget's denominator)."""
    prefixes = tuple(arch.block_prefixes(model))
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
