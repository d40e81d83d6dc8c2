"""K-FAC factors through the statistics engine, and which eigen-directions to keep.

For a dense layer y = Wx: A = E[xxᵀ] over its inputs (an input tap) and G = E[ggᵀ] over
g = ∂L/∂y (an ``output_grad`` tap, one backward pass per batch), so the Fisher of W is
approximated by A ⊗ G (Martens & Grosse, arXiv:1503.05671).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..geometry import Tap, collect_gradient_stats, sym_eigh


@dataclass
class KFACFactors:
    A: torch.Tensor  # (in, in) E[xxᵀ]
    G: torch.Tensor  # (out, out) E[ggᵀ]
    tokens: int
    _eig: tuple | None = field(default=None, repr=False, compare=False)

    def eig(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(λ (out,), eigenvectors of G, μ (in,), eigenvectors of A), descending and clipped at 0; computed once."""
        if self._eig is None:
            self._eig = (*sym_eigh(self.G), *sym_eigh(self.A))
        return self._eig


def mlp_linears(model: nn.Module) -> list[str]:
    """Every MLP projection of every block (gate/up/down, c_fc/c_proj, intermediate/output)."""
    spec = arch.get_spec(model)
    return [p + n for p in arch.block_prefixes(model) for n in (*spec.mlp_in, spec.mlp_out)]


def kfac_taps(modules: list[str]) -> list[Tap]:
    return [t for n in modules for t in (Tap(n, "input"), Tap(n, "output_grad"))]


def kfac_factors(model: nn.Module, batches, modules: list[str] | None = None, labels: str = "sampled",
                 seed: int = 0) -> dict[str, KFACFactors]:
    """A and G of every module (default :func:`mlp_linears`) from forward + backward passes over ``batches``."""
    modules = modules or mlp_linears(model)
    named = dict(model.named_modules())
    for n in modules:
        if n not in named:
            raise GeoCompError(f"module {n!r} does not exist in this model.")
        if not arch.is_linear(named[n]):
            raise GeoCompError(f"K-FAC needs a dense layer; {n!r} is a {type(named[n]).__name__}.")
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise GeoCompError("K-FAC needs a model with a language-model head (next-token logits) to take gradients.")
    stats = collect_gradient_stats(model, batches, kfac_taps(modules), compute_dtype=torch.float64, labels=labels,
                                   seed=seed)
    out = {}
    for n in modules:
        grad_key = stats.aliases.get(f"{n}:grad", f"{n}:grad")
        if grad_key not in stats.moments:
            raise GeoCompError(f"module {n!r} received no gradient from the loss, so K-FAC has no G for it.")
        a, g = stats[f"{n}:in"], stats.moments[grad_key]
        out[n] = KFACFactors(a.second_moment(), g.second_moment(), a.n)
    return out


def select(factors: KFACFactors, keep: float, rule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(L (out, r_out), R (in, r_in), mask (r_out, r_in) or None) for one layer.

    ``per_factor``: the top ceil(keep·d) eigenvectors of each factor. ``product``: eigen-pairs
    (i, j) by λ_i(G)·μ_j(A), largest first, until ``keep`` of (Σλ)(Σμ) is reached; L and R hold
    the directions any kept pair uses, the mask the pairs themselves. ``keep=1`` keeps everything.
    """
    lam, L, mu, R = factors.eig()
    if rule == "per_factor" or keep >= 1:
        r_o, r_i = math.ceil(keep * L.shape[0] - 1e-9), math.ceil(keep * R.shape[0] - 1e-9)
        return L[:, :r_o], R[:, :r_i], None
    prod = lam[:, None] * mu[None, :]  # (out, in)
    flat, order = prod.flatten().sort(descending=True)
    n_keep = int(torch.searchsorted(flat.cumsum(0), keep * flat.sum()).item()) + 1
    n_keep = min(max(n_keep, 1), flat.numel())
    mask = torch.zeros_like(prod, dtype=torch.bool).flatten()
    mask[order[:n_keep]] = True
    mask = mask.reshape(prod.shape)
    r_o = int(mask.any(1).nonzero().max()) + 1  # λ, μ descending: kept pairs form a staircase
    r_i = int(mask.any(0).nonzero().max()) + 1
    return L[:, :r_o], R[:, :r_i], mask[:r_o, :r_i]
