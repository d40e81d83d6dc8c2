"""Curvature-subspace compression: keep a dense layer's high-curvature K-FAC directions, W ≈ L·C·Rᵀ.

Based on Merullo et al. 2025, "From Memorization to Reasoning in the Spectrum of Loss
Curvature" (arXiv:2510.24256). ``kfac_factors`` measures A = E[xxᵀ] and G = E[ggᵀ] with the
statistics engine (gradients of the model's own sampled labels by default: the true Fisher),
``compress`` swaps layers for :class:`CurvatureSubspaceLinear` (L, R fixed eigenbases, C
trainable) by the product-mass or per-factor keep rule.
"""

from .api import compress, rebuild, stored_block_params, target_modules
from .config import CurvatureConfig
from .kfac import KFACFactors, kfac_factors, kfac_taps, mlp_linears, select
from .modules import CurvatureSubspaceLinear

__all__ = ["CurvatureConfig", "CurvatureSubspaceLinear", "KFACFactors", "compress", "kfac_factors", "kfac_taps",
           "mlp_linears", "rebuild", "select", "stored_block_params", "target_modules"]
