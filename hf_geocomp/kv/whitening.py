"""The whitening control of the study's third hypothesis for KV bases: is the advantage variance or sensitivity?

The ``fisher`` basis reads two statistics of each stored tensor: its second moment ``C``
(variance) and the empirical Fisher ``G = E[ggᵀ]`` of the loss with respect to it
(sensitivity); ``pca`` reads ``C`` alone. Two controls separate them:

1. **Variance removed** (:func:`remove_kv_variance`): ``C_K`` and ``C_V`` are replaced by the
   identity (every direction of the stored key or value given unit variance), the Fisher
   untouched and the model unchanged. ``pca`` is then the identity basis with every component
   equally weighted (uniform widths: no geometry at all); ``fisher`` keeps the sensitivity alone.
2. **Function-preserving reparametrisation** (:func:`kv_whitening_maps`, :func:`reparametrise_kv`):
   maps folded into the weights so that the model computes the same function while the stored
   keys and values are whitened as far as an exact map allows.

   * Values enter attention linearly and a head's output is a convex combination of them, so
     ``v ↦ A v`` on the value rows of each KV head with the o_proj columns of every query head
     of its group multiplied by ``A⁻¹`` is exact for any invertible ``A``;
     ``A = (C_V + λI)^-½`` whitens the values fully (:func:`hf_geocomp.prune.whitening.fold_value_maps`,
     the fold the pruning control uses for heads).
   * Keys meet queries only through ``q·k`` after RoPE, which rotates each frequency pair
     ``(i, i + d/2)`` by a position-dependent angle. A map on the key with its inverse transpose on
     the query is exact only if it commutes with every such rotation: within a pair a scaled
     rotation, across pairs nothing (the frequencies differ). Full whitening of K is therefore not
     function-preserving; the variant used scales each pair to unit mean second moment
     (``k ↦ s_i k``, ``q ↦ q / s_i``), which equalises the variance across pairs and keeps the
     within-pair correlations (components a partial rotary passes through, and every component
     of a layer without RoPE, are scaled one by one). Families with a norm after the key projection (``k_norm``) have no
     such exact map and are refused.

   Under these maps the ``fisher`` basis codes the same latents (``G ↦ A⁻ᵀ G A⁻¹``,
   ``C ↦ A C Aᵀ``: the weighted problem is the same up to a rotation), so its rows should come out
   unchanged up to rounding, while ``pca`` sees the new coordinates.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..geometry import ActivationStats
from ..prune.whitening import fold_value_maps, inv_sqrt, whiten_stats


def _kv_keys(model: nn.Module, kinds=("k", "v")) -> dict[tuple[int, str], str]:
    return {(t.layer, t.kind): f"{t.module}:{t.kind}" for t in arch.kv_taps(model) if t.kind in kinds}


def remove_kv_variance(model: nn.Module, stats: ActivationStats) -> ActivationStats:
    """A copy of ``stats`` whose stored keys and values have mean 0 and second moment I; gradients untouched."""
    keys = set(_kv_keys(model).values())
    missing = keys - set(stats.keys())
    if missing:
        raise GeoCompError(f"the statistics have no {sorted(missing)[0]!r}; collect them with kv.collect_kv_stats.")
    return whiten_stats(stats, keys)


def check_kv_reparametrisable(model: nn.Module) -> None:
    """Raise unless the key pair scaling and the value whitening are exact in this family."""
    spec = arch.get_spec(model)
    if spec.k_out is not None or spec.q_out is not None:
        raise GeoCompError(f"{spec.family} normalises keys or queries after their projection ({spec.k_out or spec.q_out}); "
                           "no scaling of the projection passes through that norm, so the KV reparametrisation "
                           "control is not defined for it.")


def kv_whitening_maps(model: nn.Module, stats: ActivationStats, ridge: float = 1e-6) -> dict[int, dict]:
    """Per layer: ``"v"`` (kv_heads, d, d) whitening maps of the values, ``"k"`` (kv_heads, d) key scales."""
    check_kv_reparametrisable(model)
    keys = _kv_keys(model)
    maps = {}
    for layer in sorted({layer for layer, _ in keys}):
        c_v = stats[keys[layer, "v"]].second_moment()  # (kv_heads, d, d)
        c_k = torch.diagonal(stats[keys[layer, "k"]].second_moment(), dim1=-2, dim2=-1).clone()  # (kv_heads, d)
        inv_freq, _ = arch.rope_frequencies(model, layer)
        half = 0 if inv_freq is None else inv_freq.shape[0]  # rotate-half pairs (i, i + half), i < half
        pair = (c_k[:, :half] + c_k[:, half: 2 * half]) / 2
        c_k[:, :half], c_k[:, half: 2 * half] = pair, pair  # one scale per pair; pass-through dims each their own
        c_k = c_k + ridge * c_k.mean(-1, keepdim=True).clamp_min(1e-12)
        maps[layer] = {"v": torch.stack([inv_sqrt(c, ridge) for c in c_v]), "k": c_k.rsqrt()}
    return maps


def _rows(model: nn.Module, tap) -> torch.Tensor:
    m = model.get_submodule(tap.module)
    return arch.linear_weight(m), m.bias


@torch.no_grad()
def reparametrise_kv(model: nn.Module, maps: dict[int, dict]) -> nn.Module:
    """Fold ``maps`` into the weights in place (the same function): values whitened, key pairs scaled."""
    check_kv_reparametrisable(model)
    heads = arch.head_layout(model)
    hd, group = heads.head_dim, heads.group_size
    prefixes = arch.block_prefixes(model)
    for layer, m in maps.items():
        fold_value_maps(model, layer, arch.linear_weight(model.get_submodule(prefixes[layer] + arch.get_spec(model).o)),
                        m["v"])
    k_taps = {t.layer: t for t in arch.kv_taps(model) if t.kind == "k"}
    q_taps = {t.layer: t for t in arch.q_taps(model)}
    for layer, m in maps.items():
        (wk, bk), (wq, bq) = _rows(model, k_taps[layer]), _rows(model, q_taps[layer])
        k_off, q_off = k_taps[layer].offset, q_taps[layer].offset
        for kv in range(heads.num_kv_heads):
            s = m["k"][kv]
            rows = slice(k_off + kv * hd, k_off + (kv + 1) * hd)
            wk[rows] = (wk[rows].double() * s[:, None]).to(wk.dtype)
            if bk is not None:
                bk[rows] = (bk[rows].double() * s).to(bk.dtype)
            for h in range(kv * group, (kv + 1) * group):
                rows = slice(q_off + h * hd, q_off + (h + 1) * hd)
                wq[rows] = (wq[rows].double() / s[:, None]).to(wq.dtype)
                if bq is not None:
                    bq[rows] = (bq[rows].double() / s).to(bq.dtype)
    return model
