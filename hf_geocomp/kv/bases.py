"""Bases per layer, KV head, K and V: weighted projectors from the statistics engine.

Reduced-rank regression (docs/design.md, "Weighted projector"): to code ``x`` with second
moment ``C`` where errors matter through a consumer with second moment ``M``, take the
eigenpairs ``(λ_j, u_j)`` of ``M^½ C M^½``; the latent ``z_j = u_jᵀ M^½ x / √λ_j`` has unit
variance and an error ``e`` in it costs ``λ_j e²`` in the consumer's metric, so the
components are ordered and weighted by ``λ_j`` (reverse water-filling, Cover & Thomas §10.3).

* ``pca``: ``M = I``.
* ``aware``: K is read by ``s·q·k`` (``s`` the family's query scale, ``1/√d`` or from
  ``query_pre_attn_scalar``) from every query head of its GQA group, so
  ``M_K = s²·Σ_h E[q_h q_hᵀ]`` (a softcap only shrinks score errors); V is read by the o_proj
  columns of those heads, so ``M_V = Σ_h W_o,hᵀ W_o,h``. K errors (squared score errors) and V errors (squared output
  errors) are compared as they are (``k_units="scores"``), or with K weights multiplied by
  the first-order sensitivity of the output to a score error, ``mean_h E‖W_o,h (v − v̄)‖²``
  (``k_units="sensitivity"``).
* ``fisher``: ``M`` is the empirical Fisher of the stored tensor itself, ``E[ggᵀ]`` with
  ``g = ∂L/∂k`` (or ``∂L/∂v``) of the summed next-token loss on calibration text
  (:func:`hf_geocomp.geometry.collect_gradient_stats`). A latent error ``e`` then costs
  ``½·λ_j e²`` of loss to second order (Gauss–Newton), in the same units for K and V, every
  layer and head, so no K/V exchange rate is needed and depth and attention patterns are
  accounted for (what the ``aware`` metric approximates from the first consumer only).
* RoPE: the cache holds post-RoPE keys and queries meet them post-RoPE, so with
  ``rope="average"`` both ``C_K`` and ``M_K`` are the pre-RoPE second moments averaged over
  RoPE rotations of positions ``0..P-1`` with each layer's own RoPE (:func:`hf_geocomp.arch.rope_average`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..geometry import ActivationStats
from ..geometry.spectrum import sym_eigh
from .config import KVConfig


@dataclass
class Basis:
    """The coding basis of one (layer, kind) for all its KV heads.

    ``enc`` (heads, d, d): latents ``z = x @ enc[h]`` (unit variance, columns by importance);
    ``dec`` (heads, d, d): ``x̂ = z @ dec[h]``; ``weight`` (heads, d): cost of a unit error in each latent.
    """

    enc: torch.Tensor
    dec: torch.Tensor
    weight: torch.Tensor


def _sqrt_and_inverse(m: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``M^½`` and ``M^-½`` for symmetric PSD (..., d, d), regularised relative to the trace."""
    d = m.shape[-1]
    ridge = eps * torch.diagonal(m, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30) / d
    evals, evecs = sym_eigh(m + ridge[..., None, None] * torch.eye(d, dtype=m.dtype))
    root = evals.clamp_min(1e-30).sqrt()
    return (evecs * root[..., None, :]) @ evecs.transpose(-1, -2), (evecs / root[..., None, :]) @ evecs.transpose(-1, -2)


def weighted_basis(c: torch.Tensor, m: torch.Tensor, scale: torch.Tensor | float = 1.0) -> Basis:
    """Basis of ``x`` with second moment ``c`` (heads, d, d) read through metric ``m`` (heads, d, d)."""
    m_half, m_inv_half = _sqrt_and_inverse(m)
    lam, u = sym_eigh(m_half @ c @ m_half)  # (heads, d), (heads, d, d)
    sigma = lam.clamp_min(lam[..., :1] * 1e-12 + 1e-30).sqrt()  # (heads, d)
    enc = m_half @ u / sigma[..., None, :]  # z = x enc: z_j = u_jᵀ M^½ x / σ_j
    dec = sigma[..., :, None] * (u.transpose(-1, -2) @ m_inv_half)  # x̂ = z dec
    weight = lam * (scale[:, None] if isinstance(scale, torch.Tensor) else scale)
    return Basis(enc.float(), dec.float(), weight)


def _moment(stats: ActivationStats, key: str) -> torch.Tensor:
    if key not in stats:
        raise GeoCompError(f"the statistics have no {key!r}; collect them with kv.collect_kv_stats(model, batches, method).")
    return stats[key].second_moment()


def _shrink(c: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * c + alpha * torch.diag_embed(torch.diagonal(c, dim1=-2, dim2=-1))


def fit_bases(model: nn.Module, stats: ActivationStats, config: KVConfig) -> dict[tuple[int, str], Basis]:
    """One :class:`Basis` per (layer, ``"k"``/``"v"``) from the engine's per-head statistics."""
    heads = arch.head_layout(model)
    taps = {(t.layer, t.kind): t for t in arch.kv_taps(model) + arch.q_taps(model)}
    layers = sorted({layer for layer, _ in taps})
    scale = arch.attention_scaling(model)
    bases = {}
    for layer in layers:
        c_k = _moment(stats, f"{taps[layer, 'k'].module}:k")  # (kv_heads, d, d), pre-RoPE
        c_v = _moment(stats, f"{taps[layer, 'v'].module}:v")
        if config.rope == "average":
            c_k = arch.rope_average(model, c_k, config.rope_positions, layer)
        if config.shrinkage:  # toward the diagonal: (1 − α)·C + α·diag(C)
            c_k, c_v = (_shrink(c, config.shrinkage) for c in (c_k, c_v))
        if config.method == "pca":
            eye = torch.eye(heads.head_dim, dtype=torch.float64).expand_as(c_k)
            bases[layer, "k"], bases[layer, "v"] = weighted_basis(c_k, eye, config.k_scale), weighted_basis(c_v, eye)
            continue
        if config.method == "fisher":
            g_k = _moment(stats, f"{taps[layer, 'k'].module}:k_grad")  # (kv_heads, d, d), pre-RoPE
            g_v = _moment(stats, f"{taps[layer, 'v'].module}:v_grad")
            if config.rope == "average":  # post-RoPE g' = R⁻ᵀ g (R g / s for k' = s R k)
                g_k = arch.rope_average(model, g_k, config.rope_positions, layer, gradient=True)
            bases[layer, "k"] = weighted_basis(c_k, g_k, config.k_scale)
            bases[layer, "v"] = weighted_basis(c_v, g_v)
            continue
        q = _moment(stats, f"{taps[layer, 'q'].module}:q")  # (heads, d, d)
        if config.rope == "average":
            q = arch.rope_average(model, q, config.rope_positions, layer)
        group = heads.group_size
        m_k = q.reshape(heads.num_kv_heads, group, *q.shape[1:]).sum(1) * scale ** 2  # scores are scale·q·k
        w_o = arch.o_proj_head_weights(model, layer).to(torch.float64)  # (heads, hidden, d)
        m_v = (w_o.transpose(1, 2) @ w_o).reshape(heads.num_kv_heads, group, *q.shape[1:]).sum(1)
        cov_v = stats[f"{taps[layer, 'v'].module}:v"].covariance()
        sensitivity = torch.einsum("hij,hji->h", m_v, cov_v) / group  # mean over the group of E‖W_o,h(v − v̄)‖²
        k_weight = sensitivity if config.k_units == "sensitivity" else torch.ones_like(sensitivity)
        bases[layer, "k"] = weighted_basis(c_k, m_k, k_weight * config.k_scale)
        bases[layer, "v"] = weighted_basis(c_v, m_v)
    return bases
