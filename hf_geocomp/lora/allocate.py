"""Rank allocation under a parameter budget, from input-activation spectra.

Hypothesis H2 of this project: LoRA rank given to each module in proportion to the
effective rank of its input activations beats uniform rank at a matched count of trainable
parameters. Related: AdaLoRA (arXiv:2303.10512) moves budget during training; EVA
(arXiv:2410.07170) initialises A from activation SVDs and redistributes *rank count* by
explained variance. Here the *parameter count* is matched: a rank of module m costs
c_m = in_m + out_m parameters, and the ranks r_m ∝ score_m are chosen so that
Σ r_m c_m ≤ budget and ≥ 0.99·budget.

Scope: ``"global"`` compares every target module with every other; ``"per_kind"`` first gives
each kind of module (its name with the layer indices removed, e.g. ``model.layers.*.mlp.down_proj``)
the share of the budget that uniform LoRA gives it, and lets the spectrum move rank between the
layers of a kind only. Df is bounded by the input width, so a 1536-wide ``down_proj`` input and a
576-wide ``q_proj`` input are not on one scale; ``per_kind`` keeps uniform LoRA's split between
attention and MLP and asks only which layers need more.

A scorer (one tiny class, one method) turns a module's input statistics into a positive
number; :func:`allocate` does the budget arithmetic and returns an :class:`AllocationPlan`
(what to build), which the tuner then applies (scoring is separate from surgery).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field

import torch

from ..errors import GeoCompError
from ..geometry.spectrum import Spectrum, sym_eigh
from ..geometry.stats import Moments


class Scorer:
    """Maps a module's input :class:`Moments` to a positive allocation weight."""

    def score(self, moments: Moments) -> float:
        raise NotImplementedError


class EffectiveRankScorer(Scorer):
    """Df = (Σλ)²/Σλ² of the centred input covariance C, computed as tr(C)²/‖C‖_F² (no eigensolver)."""

    def score(self, moments: Moments) -> float:
        cov = moments.covariance()  # (d, d)
        return float(torch.diagonal(cov).sum() ** 2 / cov.pow(2).sum().clamp_min(1e-300))


class KTauScorer(Scorer):
    """The fewest eigen-directions of the centred input covariance holding ``tau`` of the variance."""

    def __init__(self, tau: float):
        self.tau = tau

    def score(self, moments: Moments) -> float:
        return float(Spectrum.of(moments.covariance()).k_at(self.tau))


class WidthScorer(Scorer):
    """The input width: ``effective_rank`` with the variance removed (Df of C = I is d), the H3 control of H2."""

    def score(self, moments: Moments) -> float:
        return float(moments.dim)


class UniformScorer(Scorer):
    """Every module weighs the same (uniform rank, spread over the budget)."""

    def score(self, moments: Moments) -> float:
        return 1.0


def make_scorer(allocation: str, tau: float = 0.9) -> Scorer:
    if allocation == "k_tau":
        return KTauScorer(tau)
    return {"effective_rank": EffectiveRankScorer, "width": WidthScorer, "uniform": UniformScorer}[allocation]()


@dataclass
class ModuleAllocation:
    name: str
    in_features: int
    out_features: int
    score: float
    rank: int
    alpha: float
    spectrum: dict = field(default_factory=dict)  # of the centred input covariance: dim, trace, df

    @property
    def params(self) -> int:
        """Trainable parameters of this module's adapter: A (r, in) and B (out, r)."""
        return self.rank * (self.in_features + self.out_features)


@dataclass
class AllocationPlan:
    """Ranks per target module under a parameter budget (what ``get_peft_model`` will build)."""

    modules: list[ModuleAllocation]
    budget: int
    rule: str
    reference_rank: int
    extra: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    def rank_pattern(self) -> dict[str, int]:
        # Keys are escaped full names: PEFT matches them as regexes against module names.
        return {re.escape(m.name): m.rank for m in self.modules}

    def alpha_pattern(self) -> dict[str, float]:
        return {re.escape(m.name): m.alpha for m in self.modules}

    def to_dict(self) -> dict:
        return {"rule": self.rule, "budget": self.budget, "params": self.params,
                "reference_rank": self.reference_rank, **self.extra,
                "modules": [asdict(m) for m in self.modules]}


def uniform_params(shapes: dict[str, tuple[int, int]], r: int) -> int:
    """Trainable parameters of uniform LoRA at rank ``r`` on modules of (in, out) ``shapes``."""
    return sum(r * (i + o) for i, o in shapes.values())


def split_budget(scores: list[float], costs: list[int], lo: list[int], hi: list[int], budget: int) -> list[int]:
    """Integer ranks r_m ∈ [lo_m, hi_m], r_m ≈ t·score_m, with budget ≥ Σ r_m c_m ≥ 0.99·budget.

    The scale t solves Σ clip(t·s_m, lo, hi)·c_m = budget (bisection, the sum is monotone in
    t); ranks are floored, then single ranks go to the modules furthest below their share
    while they fit.
    """
    floor_cost = sum(l * c for l, c in zip(lo, costs))
    if floor_cost > budget:
        raise GeoCompError(f"budget of {budget} parameters is below the {floor_cost} needed to give every target "
                           f"module its minimum rank ({min(lo)}); raise the budget or target fewer modules.")
    ceiling = sum(h * c for h, c in zip(hi, costs))
    if ceiling < 0.99 * budget:
        raise GeoCompError(f"budget of {budget} parameters exceeds the {ceiling} that the rank limits allow "
                           "(max_rank, or min(in, out) of each module); lower the budget or raise max_rank.")

    def spent(t: float) -> float:
        return sum(min(h, max(l, t * s)) * c for s, c, l, h in zip(scores, costs, lo, hi))

    a, b = 0.0, 1.0
    while spent(b) < budget and b < 1e12:
        b *= 2
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if spent(mid) < budget else (a, mid)
    target = [min(h, max(l, a * s)) for s, l, h in zip(scores, lo, hi)]
    ranks = [max(l, math.floor(x)) for x, l in zip(target, lo)]
    left = budget - sum(r * c for r, c in zip(ranks, costs))
    while True:
        fits = [i for i in range(len(ranks)) if ranks[i] < hi[i] and costs[i] <= left]
        if not fits:
            break
        i = max(fits, key=lambda j: (target[j] - ranks[j], -j))
        ranks[i] += 1
        left -= costs[i]
    used = budget - left
    if used < 0.99 * budget:
        raise GeoCompError(f"cannot spend the budget of {budget} parameters within 1% (reached {used}); "
                           "the adapters are too coarse for it: raise the budget.")
    return ranks


SCOPES = ("global", "per_kind")


def kind_of(name: str) -> str:
    """A module's kind: its name with the layer indices replaced by ``*``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _split_per_kind(names, scores, costs, lo, hi, budget: int) -> list[int]:
    """:func:`split_budget` within each kind, on the kind's uniform-LoRA share of ``budget``."""
    kinds: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        kinds.setdefault(kind_of(n), []).append(i)
    total_cost = sum(costs)
    ranks = [0] * len(names)
    for kind, idx in kinds.items():
        share = budget * sum(costs[i] for i in idx) // total_cost
        try:
            sub = split_budget([scores[i] for i in idx], [costs[i] for i in idx], [lo[i] for i in idx],
                               [hi[i] for i in idx], share)
        except GeoCompError as e:
            raise GeoCompError(f"modules {kind}: {e}") from None
        for i, k in zip(idx, sub):
            ranks[i] = k
    used = sum(k * c for k, c in zip(ranks, costs))
    if used < 0.99 * budget:
        raise GeoCompError(f"cannot spend the budget of {budget} parameters within 1% per kind of module "
                           f"(reached {used}); raise the budget or use scope='global'.")
    return ranks


def allocate(stats, shapes: dict[str, tuple[int, int]], *, rule: str, r: int, lora_alpha: float,
             budget: int | None = None, tau: float = 0.9, min_rank: int = 1,
             max_rank: int | None = None, scope: str = "global") -> AllocationPlan:
    """Allocate ranks to the modules of ``shapes`` ({name: (in, out)}) from their input statistics.

    ``budget=None`` means the parameter count of uniform LoRA at rank ``r``; ``scope`` is
    ``"global"`` or ``"per_kind"`` (module docstring). Raises a
    :class:`GeoCompError` for a statistic that is missing, a rank above min(in, out) or an
    impossible budget.
    """
    names = list(shapes)
    for name in names:
        i, o = shapes[name]
        if r > min(i, o):
            raise GeoCompError(f"rank r={r} exceeds min(in, out)={min(i, o)} of target module {name!r}.")
        if min_rank > min(i, o):
            raise GeoCompError(f"min_rank={min_rank} exceeds min(in, out)={min(i, o)} of target module {name!r}.")
    scorer = make_scorer(rule, tau)
    inputs = [stats.input_of(n) for n in names]  # names a module the statistics lack
    scored: dict[int, tuple[float, dict]] = {}  # modules reading one tensor (q/k/v) share their Moments
    for m in inputs:
        if id(m) not in scored:
            cov = m.covariance()
            df = EffectiveRankScorer().score(m)
            scored[id(m)] = (max(scorer.score(m), 1e-12),
                             {"dim": m.dim, "trace": float(torch.diagonal(cov).sum()), "df": df})
    scores = [scored[id(m)][0] for m in inputs]
    summaries = [scored[id(m)][1] for m in inputs]
    costs = [sum(shapes[n]) for n in names]
    lo = [min_rank] * len(names)
    hi = [min(shapes[n]) if max_rank is None else min(max_rank, *shapes[n]) for n in names]
    budget = uniform_params(shapes, r) if budget is None else int(budget)
    if scope not in SCOPES:
        raise GeoCompError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
    split = split_budget if scope == "global" else functools.partial(_split_per_kind, names)
    ranks = split(scores, costs, lo, hi, budget)
    mods = [ModuleAllocation(n, shapes[n][0], shapes[n][1], s, k, lora_alpha * k / r, sp)
            for n, s, k, sp in zip(names, scores, ranks, summaries)]
    extra = {"tau": tau} if rule == "k_tau" else {}
    if scope != "global":
        extra["scope"] = scope
    return AllocationPlan(mods, budget, rule, r, extra=extra)


def top_eigenvectors(matrix: torch.Tensor, k: int, exact_below: int = 512, iters: int = 10) -> tuple:
    """Top-``k`` eigenpairs (descending, float64) of a symmetric PSD matrix (d, d).

    Exact (``sym_eigh``) for d < ``exact_below``; above, randomized subspace iteration
    (Halko et al., arXiv:0909.4061) on 2k + 8 columns with a fixed seed and ``iters`` power
    steps, O(d²k) instead
    of a full O(d³) eigensolver. Signs follow ``sym_eigh`` (largest-magnitude entry positive).
    """
    a = matrix.to(torch.float64)
    d = a.shape[0]
    width = 2 * k + 8
    if d < exact_below or width >= d // 2:
        evals, vecs = sym_eigh(a)
        return evals[:k], vecs[:, :k]
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(a @ torch.randn(d, width, generator=g, dtype=torch.float64))[0]  # (d, width)
    for _ in range(iters):
        q = torch.linalg.qr(a @ q)[0]
    small_evals, small_vecs = sym_eigh(q.T @ a @ q)  # (width,), (width, width)
    vecs = q @ small_vecs[:, :k]  # (d, k)
    idx = vecs.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(vecs, 0, idx))
    signs[signs == 0] = 1
    return small_evals[:k], vecs * signs


def init_directions(moments: Moments, rank: int, whitened: bool) -> torch.Tensor:
    """Rows for LoRA's A (rank, in): top eigenvectors of the uncentred input second moment.

    ``whitened`` scales row i by 1/√λ_i (the components of A·x get equal second moments),
    then all rows by one factor so that the mean squared row norm is 1, as for ``principal``.
    """
    evals, vecs = top_eigenvectors(moments.second_moment(), rank)
    rows = vecs.T  # (rank, in)
    if whitened:
        rows = rows / evals.clamp_min(1e-12).sqrt().unsqueeze(1)
        rows = rows / rows.norm(dim=1).pow(2).mean().sqrt()
    return rows
