"""Spectra of second moments and weights: effective rank, k at τ, anisotropy, whitening.

Definitions (λ = eigenvalues of a second-moment matrix, descending, clipped at 0):

* effective rank ``Df = (Σλ)² / Σλ²`` (participation ratio; 1 for rank one, d when isotropic)
* stable rank ``Σλ / λ₁`` (for a weight W with λ = σ², this is ‖W‖²_F / ‖W‖²₂)
* ``k(τ)``: the fewest components whose eigenvalues sum to at least τ·Σλ
* top share ``λ₁ / Σλ`` and anisotropy ``d·λ₁ / Σλ`` (1 when isotropic, d for rank one)

A weight matrix is described by the eigenvalues of ``WᵀW`` (σ², its energy per direction),
so its numbers are comparable with those of an activation covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GeoCompError


def sym_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric matrices (..., d, d) in float64, descending.

    Eigenvalues below zero from round-off are clipped to 0. Each eigenvector's sign is fixed
    so its largest-magnitude entry is positive, which makes results reproducible.
    """
    a = matrix.to(torch.float64)
    a = (a + a.transpose(-1, -2)) / 2
    evals, evecs = torch.linalg.eigh(a)  # ascending
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    idx = evecs.abs().argmax(dim=-2, keepdim=True)  # (..., 1, d)
    signs = torch.sign(torch.gather(evecs, -2, idx))
    signs[signs == 0] = 1
    return evals, evecs * signs


def effective_rank(evals: torch.Tensor) -> torch.Tensor:
    s1, s2 = evals.sum(-1), (evals ** 2).sum(-1)
    return torch.where(s2 > 0, s1 ** 2 / s2.clamp_min(1e-300), torch.zeros_like(s1))


def stable_rank(evals: torch.Tensor) -> torch.Tensor:
    top = evals.max(-1).values
    return torch.where(top > 0, evals.sum(-1) / top.clamp_min(1e-300), torch.zeros_like(top))


def k_at(evals: torch.Tensor, tau: float) -> torch.Tensor:
    """Fewest leading components explaining at least ``tau`` of the total (per row)."""
    if not 0 < tau <= 1:
        raise GeoCompError(f"tau must be in (0, 1], got {tau}.")
    total = evals.sum(-1, keepdim=True)
    frac = evals.cumsum(-1) / total.clamp_min(1e-300)
    k = (frac < tau - 1e-12).sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, k, torch.zeros_like(k))


@dataclass
class Spectrum:
    """Eigenvalues (descending, float64) of one second moment, with its summary numbers."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None = None

    @classmethod
    def of(cls, matrix: torch.Tensor, vectors: bool = False) -> "Spectrum":
        if vectors:
            return cls(*sym_eigh(matrix))
        evals = torch.linalg.eigvalsh(((matrix + matrix.transpose(-1, -2)) / 2).to(torch.float64))
        return cls(evals.flip(-1).clamp_min(0))

    @classmethod
    def of_weight(cls, weight: torch.Tensor) -> "Spectrum":
        """σ² of a weight matrix (out, in): the eigenvalues of WᵀW."""
        sv = torch.linalg.svdvals(weight.detach().to(torch.float64))
        return cls(sv ** 2)

    @property
    def dim(self) -> int:
        return self.eigenvalues.shape[-1]

    def effective_rank(self) -> torch.Tensor:
        return effective_rank(self.eigenvalues)

    def stable_rank(self) -> torch.Tensor:
        return stable_rank(self.eigenvalues)

    def k_at(self, tau: float) -> torch.Tensor:
        return k_at(self.eigenvalues, tau)

    def top_share(self) -> torch.Tensor:
        total = self.eigenvalues.sum(-1)
        return self.eigenvalues[..., 0] / total.clamp_min(1e-300)

    def anisotropy(self) -> torch.Tensor:
        return self.top_share() * self.dim

    def explained(self) -> torch.Tensor:
        """Cumulative fraction of the total explained by the first k components."""
        return self.eigenvalues.cumsum(-1) / self.eigenvalues.sum(-1, keepdim=True).clamp_min(1e-300)

    def summary(self) -> dict[str, float]:
        """Scalars for a single (non-batched) spectrum."""
        if self.eigenvalues.dim() != 1:
            raise GeoCompError("summary() takes one spectrum; index the batch first.")
        return {
            "dim": self.dim,
            "df": float(self.effective_rank()),
            "stable_rank": float(self.stable_rank()),
            "k90": int(self.k_at(0.90)),
            "k95": int(self.k_at(0.95)),
            "k99": int(self.k_at(0.99)),
            "top_share": float(self.top_share()),
            "anisotropy": float(self.anisotropy()),
        }


def _regularised(matrix: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = sym_eigh(matrix)
    scale = evals.sum(-1, keepdim=True) / evals.shape[-1]
    return evals + eps * scale.clamp_min(1e-300), evecs


def whitening(matrix: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Symmetric (ZCA) whitening ``(C + δI)^(-1/2)`` with ``δ = eps · tr(C)/d``.

    The ridge keeps rank-deficient matrices finite: directions with no variance are scaled
    by ``δ^(-1/2)`` instead of infinity.
    """
    evals, evecs = _regularised(matrix, eps)
    return (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)


def coloring(matrix: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(C + δI)^(1/2)``, the inverse of :func:`whitening` with the same ridge."""
    evals, evecs = _regularised(matrix, eps)
    return (evecs * evals.sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
