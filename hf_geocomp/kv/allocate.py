"""Rank and bit widths under one byte budget: discrete reverse water-filling.

Every latent component ``j`` (all layers, KV heads, K and V) has a weight ``w_j`` (the cost
of a unit error, :mod:`.bases`) and unit variance. Coding it at width ``b`` costs
``w_j·D(b)`` with ``D`` the measured relative MSE of :mod:`.quant` (``D(0) = 1``,
``D(full) = 0``) and ``b + 16/group`` bits (the float16 scale shared by a group). For a
multiplier θ each component takes ``argmin_b w_j·D(b) + θ·bits(b)`` — the discrete form of
``b_j = max(0, ½·log2(w_j/θ))`` — and θ is found by bisection so that the exact bytes of the
stored layout (packing and scales included) do not exceed the budget.
"""

from __future__ import annotations

import math

import torch

from ..errors import GeoCompError
from .bases import Basis
from .config import KVConfig
from .quant import packed_bytes, relative_mse

FULL = "full"


def group_bytes(bits, n: int, group: int, elt: int) -> int:
    """Bytes per token of ``n`` components coded at ``bits`` (``"full"``: the model dtype)."""
    if n == 0:
        return 0
    return n * elt if bits == FULL else packed_bytes(n, bits, group)


def allocate(bases: dict[tuple[int, str], Basis], config: KVConfig, elt: int,
             coded_tokens: dict[int, int] | None = None, target: float | None = None) -> tuple[dict, int]:
    """Widths per component → ``({(layer, kind): [(bits, cols)]}, bytes per token)``.

    By default every layer codes the same tokens and a coded token may take
    ``config.coded_fraction()`` of the uncompressed bytes. With sliding-window layers the layers
    hold different numbers of coded tokens: ``coded_tokens`` (layer → coded tokens held at
    ``config.reference_tokens``) weighs each layer's bytes, and ``target`` bounds the weighted sum.
    A layer's tokens scale its distortion and its bytes alike, so the choice per component at a
    given θ is unchanged; only the bytes the bisection meets differ.
    """
    keys = sorted(bases)
    weights = torch.cat([bases[k].weight.reshape(-1) for k in keys]).double()  # (N,)
    sizes = [bases[k].weight.numel() for k in keys]
    d = bases[keys[0]].weight.shape[-1]
    options = [0, *(config.widths if config.bits else ()), FULL]
    distortion = torch.tensor([1.0] + [relative_mse(b, config.group_size) for b in options[1:-1]] + [0.0],
                              dtype=torch.float64)
    cost = torch.tensor([0.0] + [b + 16 / config.group_size for b in options[1:-1]] + [8.0 * elt],
                        dtype=torch.float64)
    allowed = torch.ones(len(weights), len(options), dtype=torch.bool)
    if config.max_rank is not None:  # components past max_rank in each head may only be dropped
        rank = torch.cat([torch.arange(n) % d for n in sizes])
        allowed[rank >= config.max_rank, 1:] = False
    if config.min_bits:  # a floor: neither dropped nor below min_bits
        allowed[:, [i for i, b in enumerate(options) if b != FULL and b < config.min_bits]] = False
    if coded_tokens is None:
        target = config.coded_fraction() * sum(sizes) * elt
    held = {layer: 1 if coded_tokens is None else coded_tokens[layer] for layer, _ in keys}

    def layout(theta: float):
        total = weights[:, None] * distortion + theta * cost  # (N, options)
        choice = total.masked_fill(~allowed, math.inf).argmin(1)
        plan, nbytes, weighted, start = {}, 0, 0, 0
        for key, n in zip(keys, sizes):
            ch, w = choice[start: start + n], weights[start: start + n]
            groups = []
            for i, bits in enumerate(options[1:], start=1):
                cols = torch.nonzero(ch == i).flatten()
                if len(cols):
                    cols = cols[torch.argsort(w[cols], descending=True, stable=True)]
                    groups.append((bits, cols.tolist()))
                    nb = group_bytes(bits, len(cols), config.group_size, elt)
                    nbytes, weighted = nbytes + nb, weighted + held[key[0]] * nb
            plan[key], start = groups, start + n
        return plan, nbytes, weighted

    top = float(weights.max().clamp_min(1e-30))
    lo, hi = math.log(top * 1e-14), math.log(top * 1e3)  # small θ: everything full; large θ: nothing
    best = layout(math.exp(hi))
    for _ in range(50):
        mid = (lo + hi) / 2
        trial = layout(math.exp(mid))
        if trial[2] <= target:
            best, hi = trial, mid
        else:
            lo = mid
    if best[2] > target:
        raise GeoCompError(f"min_bits={config.min_bits} on every component alone exceeds budget {config.budget}.")
    return best[:2]
