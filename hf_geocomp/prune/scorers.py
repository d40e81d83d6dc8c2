"""Per-unit importance scores; higher means more important (kept first).

Every scorer is a tiny class with one method, ``score(model, group, stats, grads) -> (units,)``.

* ``variance`` — the unit's contribution to the consumer's output variance,
  tr(W_u Σ_uu W_uᵀ) with W_u the consumer columns it feeds and Σ_uu their input covariance;
  for one neuron Var(h_j)·‖W[:, j]‖². FLAP's fluctuation metric (An et al., arXiv:2312.11983)
  generalised to head blocks.
* ``variance_cond`` — conditional output variance: units are removed greedily, each time the
  one whose output contribution the *remaining* units reproduce best after a least-squares
  refit, ΔE = tr(W_u (H_uu)⁻¹ W_uᵀ) with H = Σ⁻¹ (the structured Optimal Brain Surgeon step,
  Hassibi & Stork 1993; Frantar & Alistarh, arXiv:2208.11580); the score is the cumulative ΔE
  at the unit's removal, so the order is the greedy one. Pair it with ``refit`` compensation.
* ``magnitude`` — L1 norm of every weight the unit owns (Torch-Pruning's default).
* ``wanda`` — Wanda-sp: Σ_i |W_ij|·‖x_j‖ over the consumer columns (Sun et al., arXiv:2306.11695;
  structured form from FLAP).
* ``random`` — a seeded control.
* ``taylor`` — first-order Taylor |Σ w·∂L/∂w| over the unit's weights (LLM-Pruner,
  Ma et al., arXiv:2305.11627); needs accumulated ``w·grad`` per module.
"""

from __future__ import annotations

import zlib

import torch

from .. import arch
from ..errors import GeoCompError
from .units import UnitGroup


READS = (None, "diag", "blocks", "full")  # what a scorer reads of its consumer's input, least first


class Scorer:
    needs_stats = True
    needs_grads = False
    reads: str | None = "full"  # one of READS: the least statistics :func:`prune_taps` collects for it

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, model, group: UnitGroup, stats, grads) -> torch.Tensor:
        raise NotImplementedError


def _consumer(model, group: UnitGroup) -> torch.Tensor:
    return arch.linear_weight(model.get_submodule(group.consumer)).detach().double()  # (out, in)


class VarianceScorer(Scorer):
    reads = "blocks"

    def score(self, model, group, stats, grads):
        w = _consumer(model, group)[:, group.cols]  # (out, units, c)
        blk = stats.input_of(group.consumer).covariance_blocks(group.cols)  # (units, c, c)
        return torch.einsum("ouc,ucd,oud->u", w, blk, w)


class ConditionalVarianceScorer(Scorer):
    damp = 1e-2
    steps = 64  # greedy rounds per layer; each removes 1/steps of the units (exact greedy for few units)

    def score(self, model, group, stats, grads):
        cols = group.cols.reshape(-1)
        W = _consumer(model, group)[:, cols]  # (out, units·c), unit-major columns
        C = stats.input_of(group.consumer).covariance()[cols][:, cols]
        C = C + self.damp * C.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cols), dtype=C.dtype)
        H = torch.linalg.inv(C)  # (units·c, units·c)
        n, c = group.num_units, group.cols.shape[1]
        alive = torch.ones(n, dtype=torch.bool)
        score = torch.zeros(n, dtype=torch.float64)
        total, chunk = 0.0, max(1, -(-n // self.steps))
        while alive.any():
            if c == 1:
                loss = W.pow(2).sum(0) / H.diagonal().clamp_min(1e-30)  # (units,)
            else:
                loss = torch.stack([torch.trace(W[:, u * c:(u + 1) * c] @ torch.linalg.solve(
                    H[u * c:(u + 1) * c, u * c:(u + 1) * c], W[:, u * c:(u + 1) * c].T)) if alive[u]
                    else torch.tensor(0.0, dtype=torch.float64) for u in range(n)])
            loss = loss.masked_fill(~alive, float("inf"))
            drop = loss.argsort()[: min(chunk, int(alive.sum()))]  # cheapest units this round
            for u in drop.tolist():
                total += float(loss[u])
                score[u], alive[u] = total, False
            idx = (drop[:, None] * c + torch.arange(c)[None, :]).reshape(-1)  # their columns
            Hinv = torch.linalg.inv(H[idx][:, idx])  # (|idx|, |idx|)
            Hrow = H[idx]  # (|idx|, units·c)
            W -= (W[:, idx] @ Hinv) @ Hrow  # refit the remaining columns; the dropped ones become 0
            H -= Hrow.T @ Hinv @ Hrow
            H[idx] = 0
            H[:, idx] = 0
            H[idx, idx] = 1.0  # keep removed columns inert
        return score


class MagnitudeScorer(Scorer):
    needs_stats = False
    reads = None

    def score(self, model, group, stats, grads):
        s = _consumer(model, group)[:, group.cols].abs().sum((0, 2))  # (units,)
        for name, rows in group.producers.items():
            m = model.get_submodule(name)
            s = s + arch.linear_weight(m).detach().double()[rows].abs().sum((1, 2))
            if m.bias is not None:
                s = s + m.bias.detach().double()[rows].abs().sum(1)
        return s


class WandaScorer(Scorer):
    reads = "diag"

    def score(self, model, group, stats, grads):
        msq = stats.input_of(group.consumer).second_moment_diagonal().reshape(-1)  # (in,); per-head: heads side by side
        norm = msq.clamp_min(0).sqrt()  # RMS of x_j
        return (_consumer(model, group).abs() * norm).sum(0)[group.cols].sum(1)


class RandomScorer(Scorer):
    needs_stats = False
    reads = None

    def score(self, model, group, stats, grads):
        gen = torch.Generator().manual_seed(self.seed * 100003 + zlib.crc32(group.key.encode()))
        return torch.rand(group.num_units, generator=gen, dtype=torch.float64)


class TaylorScorer(Scorer):
    needs_stats = False
    needs_grads = True
    reads = None

    def score(self, model, group, stats, grads):
        if not grads or group.consumer not in grads:
            raise GeoCompError("the taylor criterion needs gradients; pass grads (see taylor_grads) "
                               "or use it through the pruning callback.")
        s = grads[group.consumer].double()[:, group.cols].sum((0, 2))  # w·g, (out, in) layout
        for name, rows in group.producers.items():
            s = s + grads[name].double()[rows].sum((1, 2))
        return s.abs()


SCORERS: dict[str, type[Scorer]] = {"variance": VarianceScorer, "variance_cond": ConditionalVarianceScorer,
                                    "magnitude": MagnitudeScorer,
                                    "wanda": WandaScorer, "random": RandomScorer, "taylor": TaylorScorer}


def get_scorer(name: str, seed: int = 0) -> Scorer:
    if name not in SCORERS:
        raise GeoCompError(f"criterion {name!r} does not exist; allowed: {', '.join(SCORERS)}.")
    return SCORERS[name](seed)
