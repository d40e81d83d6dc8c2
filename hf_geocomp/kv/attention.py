"""Attention in the reduced space: scores and values computed on the stored latents.

With a coded key ``k̂ = Σ_j z_j·dec_j`` (per KV head), ``q·k̂ = Σ_j (q·dec_j)·z_j``: the query is
projected into the latent space once (``n`` numbers per head instead of lifting every cached
key back to ``d``), and scores are products with the latents. Values are lifted after the
weighted sum: ``Σ_t p_t v̂_t = (Σ_t p_t z_t)·dec``. Both are exact rewrites of attention on
the decoded cache. The exact tokens (attention sinks, and the tokens of the current forward)
go through ordinary products.

Registered as ``attn_implementation="geocomp_reduced"`` with transformers'
``AttentionInterface`` and, for its masks, ``AttentionMaskInterface`` (additive float masks,
never skipped). A layer whose cache is not a reduced :class:`~hf_geocomp.kv.cache.GeoKVCache`
runs plain SDPA, or, with a softcap (Gemma 2), the same products as the reduced path with every key exact.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "geocomp_reduced"
_PENDING: dict[int, tuple] = {}  # layer_idx → what the cache handed over for this forward


def hand_over(layer_idx: int, sink: int, length: int, latents_k, latents_v, dec_k, dec_v) -> None:
    """Called by the cache in ``update``: the ``length`` coded past tokens of ``layer_idx`` as latents."""
    _PENDING[layer_idx] = (sink, length, latents_k, latents_v, dec_k, dec_v)


def reduced_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, softcap=None,
                      **kwargs):
    """``query`` (b, H, q, d); ``key``/``value`` (b, kv_heads, s + q, d): exact sink tokens then the new ones.

    ``softcap`` (Gemma 2): scores become ``softcap·tanh(scores / softcap)`` before the mask, as in eager attention.
    """
    pending = _PENDING.pop(getattr(module, "layer_idx", None), None)
    if pending is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        pending = (key.shape[2], 0, [], [], None, None)  # SDPA has no softcap: every key exact, the products below
    sink, length, latents_k, latents_v, dec_k, dec_v = pending
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling = d ** -0.5 if scaling is None else scaling
    qf = query.float().reshape(b, kv_heads, group * q, d)  # the queries of each KV head's group together
    kf, vf = key.float(), value.float()
    scores_coded = qf.new_zeros(b, kv_heads, group * q, length)
    for (z, _), rows in zip(latents_k, _group_rows(latents_k, dec_k)):  # z (b, L, n) float; rows (kv_heads, n, d)
        q_lat = torch.einsum("bkmd,knd->bkmn", qf, rows)  # the queries in latent space (0 on other heads' columns)
        scores_coded += (q_lat.reshape(b, kv_heads * group * q, -1) @ z.transpose(1, 2)).reshape(scores_coded.shape)
    scores = torch.cat([qf @ kf[:, :, :sink].transpose(-1, -2), scores_coded,
                        qf @ kf[:, :, sink:].transpose(-1, -2)], dim=-1) * scaling  # (b, kv_heads, G·q, s+L+q)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.reshape(b, heads, q, -1)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : scores.shape[-1]].float()
    probs = scores.softmax(-1).reshape(b, kv_heads, group * q, -1)
    p_sink, p_coded, p_new = probs[..., :sink], probs[..., sink: sink + length], probs[..., sink + length:]
    out = p_sink @ vf[:, :, :sink] + p_new @ vf[:, :, sink:]  # (b, kv_heads, G·q, d)
    for (z, _), rows in zip(latents_v, _group_rows(latents_v, dec_v)):
        y = (p_coded.reshape(b, kv_heads * group * q, length) @ z).reshape(b, kv_heads, group * q, -1)
        out += torch.einsum("bkmn,knd->bkmd", y, rows)  # values lifted after the weighted sum
    out = out.reshape(b, heads, q, d).transpose(1, 2).contiguous().to(query.dtype)  # (b, q, H, d)
    return out, None


def _group_rows(latents, dec: torch.Tensor) -> list[torch.Tensor]:
    """Per width group, the decoder rows of its columns split by KV head: (kv_heads, n, d), zero off-head."""
    if not latents:
        return []
    kv_heads, d, _ = dec.shape
    full = torch.block_diag(*dec)  # (kv_heads·d, kv_heads·d): latent column → output of its head
    return [full[cols].reshape(len(cols), kv_heads, d).transpose(0, 1) for _, cols in latents]


AttentionInterface.register(NAME, reduced_attention)
AttentionMaskInterface.register(NAME, eager_mask)


def use_reduced_attention(model) -> None:
    """Switch ``model`` to attention in the reduced space (``plan.cache(model, reduced=True)``)."""
    model.set_attn_implementation(NAME)
