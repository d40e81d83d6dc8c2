"""Attention in the reduced space: scores and values computed on the stored latents.

With a coded key ``k̂ = Σ_j z_j·dec_j`` (per KV head), ``q·k̂ = Σ_j (q·dec_j)·z_j``: the query is
projected into the latent space once (``n`` numbers per head instead of lifting every cached
key back to ``d``), and scores are products with the latents. Values are lifted after the
weighted sum: ``Σ_t p_t v̂_t = (Σ_t p_t z_t)·dec``. Both are exact rewrites of attention on
the decoded cache. The exact tokens (attention sinks, and the tokens of the current forward)
go through ordinary products; the coded ones are read from their packed codes by :mod:`.fused`.

Registered as ``attn_implementation="geocomp_reduced"`` with transformers'
``AttentionInterface`` and, for its masks, ``AttentionMaskInterface`` (additive float masks,
never skipped). A layer whose cache is not a reduced :class:`~hf_geocomp.kv.cache.GeoKVCache`
runs plain SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .fused import coded_scores, coded_values

NAME = "geocomp_reduced"
_PENDING: dict[int, tuple] = {}  # layer_idx → what the cache handed over for this forward


def hand_over(layer_idx: int, sink: int, length: int, codec_k, parts_k, codec_v, parts_v) -> None:
    """Called by the cache in ``update``: the ``length`` coded past tokens of ``layer_idx`` as stored
    (codecs and their packed parts, read by :mod:`.fused`)."""
    _PENDING[layer_idx] = (sink, length, codec_k, parts_k, codec_v, parts_v)


def reduced_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, softcap=None,
                      **kwargs):
    """``query`` (b, H, q, d); ``key``/``value`` (b, kv_heads, s + q, d): exact sink tokens then the new ones.

    ``softcap`` (Gemma 2): scores become ``softcap·tanh(scores / softcap)`` before the mask, as in eager
    attention; a layer without a coded cache then runs these products on its exact keys (SDPA has no softcap).
    """
    pending = _PENDING.pop(getattr(module, "layer_idx", None), None)
    if pending is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        pending = (key.shape[2], 0, None, [], None, [])  # every key exact
    sink, length, codec_k, parts_k, codec_v, parts_v = pending
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling = d ** -0.5 if scaling is None else scaling
    qf = query.float().reshape(b, kv_heads, group * q, d)  # the queries of each KV head's group together
    kf, vf = key.float(), value.float()
    scores_coded = (qf.new_zeros(b, kv_heads, group * q, 0) if codec_k is None
                    else coded_scores(qf, codec_k, parts_k, length))  # (b, kv_heads, G·q, L) from the packed codes
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
    if codec_v is not None:
        out = out + coded_values(p_coded, codec_v, parts_v, length)
    out = out.reshape(b, heads, q, d).transpose(1, 2).contiguous().to(query.dtype)  # (b, q, H, d)
    return out, None


AttentionInterface.register(NAME, reduced_attention)
AttentionMaskInterface.register(NAME, eager_mask)


def use_reduced_attention(model) -> None:
    """Switch ``model`` to attention in the reduced space (``plan.cache(model, reduced=True)``)."""
    model.set_attn_implementation(NAME)
