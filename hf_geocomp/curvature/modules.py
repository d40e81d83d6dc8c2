"""``CurvatureSubspaceLinear``: a dense layer restricted to the high-curvature K-FAC subspace.

Based on Merullo et al. 2025, "From Memorization to Reasoning in the Spectrum of Loss
Curvature" (arXiv:2510.24256). With K-FAC factors A = E[xxᵀ] (inputs) and G = E[ggᵀ]
(output gradients), eigenvectors L of G and R of A, the weight is ``W ≈ L·C·Rᵀ`` with
``C = LᵀWR``: L and R are fixed buffers, C is the trainable core. An optional 0/1 mask keeps
only chosen (i, j) eigen-pairs of C (the product-mass rule).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GeoCompError

KIND = "curvature_subspace"


class CurvatureSubspaceLinear(nn.Module):
    """y = L·((C ⊙ mask)·(Rᵀx)) + b.

    Buffers ``L`` (out, r_out) and ``R`` (in, r_in), parameter ``C`` (r_out, r_in), optional
    buffer ``mask`` (r_out, r_in) and parameter ``bias`` (out,). All are in the state dict, so
    a saved model reloads once the module is rebuilt from :meth:`geocomp_record`.
    """

    def __init__(self, in_features: int, out_features: int, rank_out: int, rank_in: int, bias: bool = False,
                 masked: bool = False, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not (0 < rank_out <= out_features and 0 < rank_in <= in_features):
            raise GeoCompError(f"ranks ({rank_out}, {rank_in}) must be in 1..({out_features}, {in_features}).")
        self.in_features, self.out_features = in_features, out_features
        kw = {"dtype": dtype, "device": device}
        self.register_buffer("L", torch.zeros(out_features, rank_out, **kw))
        self.register_buffer("R", torch.zeros(in_features, rank_in, **kw))
        self.C = nn.Parameter(torch.zeros(rank_out, rank_in, **kw))
        self.register_buffer("mask", torch.ones(rank_out, rank_in, **kw) if masked else None)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def rank_out(self) -> int:
        return self.L.shape[1]

    @property
    def rank_in(self) -> int:
        return self.R.shape[1]

    def core(self) -> torch.Tensor:
        return self.C if self.mask is None else self.C * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.R  # (..., r_in)
        z = z @ self.core().T  # (..., r_out)
        y = z @ self.L.T  # (..., out)
        return y if self.bias is None else y + self.bias

    def weight_equivalent(self) -> torch.Tensor:
        """The dense (out, in) weight this layer computes."""
        return self.L @ self.core() @ self.R.T

    def stored_params(self) -> int:
        """Numbers this layer needs: L, R, the kept entries of C, the bias."""
        kept = self.C.numel() if self.mask is None else int(self.mask.count_nonzero())
        return self.L.numel() + self.R.numel() + kept + (0 if self.bias is None else self.bias.numel())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
                   mask: torch.Tensor | None = None) -> "CurvatureSubspaceLinear":
        """From a dense weight (out, in) and orthonormal bases L (out, r_out), R (in, r_in): C = LᵀWR."""
        dtype = weight.dtype
        m = cls(weight.shape[1], weight.shape[0], L.shape[1], R.shape[1], bias is not None, mask is not None,
                dtype=dtype, device=weight.device)
        with torch.no_grad():
            W = weight.detach().double()
            m.L.copy_(L.to(dtype))
            m.R.copy_(R.to(dtype))
            core = L.double().T @ W @ R.double()  # (r_out, r_in)
            if mask is not None:
                m.mask.copy_(mask.to(dtype))
                core = core * mask.double()
            m.C.copy_(core.to(dtype))
            if bias is not None:
                m.bias.copy_(bias.detach())
        return m

    # ---- the record the Hub loader rebuilds the module from -------------------------------
    def geocomp_record(self) -> dict:
        return {"kind": KIND, "in_features": self.in_features, "out_features": self.out_features,
                "rank_out": self.rank_out, "rank_in": self.rank_in, "bias": self.bias is not None,
                "masked": self.mask is not None}

    @classmethod
    def from_geocomp_record(cls, record: dict, dtype: torch.dtype | None = None) -> "CurvatureSubspaceLinear":
        """An empty module of the recorded shapes (values come from the state dict)."""
        if record.get("kind") != KIND:
            raise GeoCompError(f"record of kind {record.get('kind')!r} is not a {KIND} layer.")
        try:
            return cls(int(record["in_features"]), int(record["out_features"]), int(record["rank_out"]),
                       int(record["rank_in"]), bool(record["bias"]), bool(record["masked"]), dtype=dtype)
        except KeyError as e:
            raise GeoCompError(f"the {KIND} record lacks the field {e.args[0]!r}.") from None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank_out={self.rank_out}, "
                f"rank_in={self.rank_in}, masked={self.mask is not None}, bias={self.bias is not None}")
