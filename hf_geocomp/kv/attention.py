"""Attention in the reduced space: scores and values computed on the stored latents.

With a coded key ``k̂ = Σ_j z_j·dec_j`` (per KV head), ``q·k̂ = Σ_j (q·dec_j)·z_j``: the query is
projected into the latent space once (``n`` numbers per head instead of lifting every cached
key back to ``d``), and scores are products with the latents. Values are lifted after the
weighted sum: ``Σ_t p_t v̂_t = (Σ_t p_t z_t)·dec``. Both are exact rewrites of attention on
the decoded cache. The exact tokens (attention sinks, and the tokens of the current forward)
go through ordinary products; the coded ones are read from their packed codes by :mod:`.fused`.

Registered as ``attn_implementation="geocomp_reduced"`` with transformers'
``AttentionInterface`` and, for its masks, ``AttentionMaskInterface`` with SDPA's mask (boolean, or
None for a purely causal mask: a prefill then runs SDPA's causal kernel, as it would without the
coded cache, instead of attention under a materialised float mask). A layer whose cache is not a reduced :class:`~hf_geocomp.kv.cache.GeoKVCache`
runs plain SDPA.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .fused import coded_scores, coded_values

NAME = "geocomp_reduced"
# What the cache handed over for the forward under way, per thread (two models generating in two threads,
# e.g. a server's requests, must never read each other's codes): layer_idx → (keys returned, pending state).
_PENDING = threading.local()


def _pending() -> dict:
    found = getattr(_PENDING, "by_layer", None)
    if found is None:
        found = _PENDING.by_layer = {}
    return found


def hand_over(layer_idx: int, keys: torch.Tensor, sink: int, length: int, codec_k, parts_k, codec_v, parts_v) -> None:
    """Called by the cache in ``update``: the ``length`` coded past tokens of ``layer_idx`` as stored
    (codecs and their packed parts, read by :mod:`.fused`), for the attention call of this thread that
    receives ``keys`` (the exact keys ``update`` returns)."""
    _pending()[layer_idx] = (keys, (sink, length, codec_k, parts_k, codec_v, parts_v))


def take(layer_idx: int | None, keys: torch.Tensor) -> tuple | None:
    """The state handed over for this attention call: by this thread, for this layer and these very keys
    (an entry left by a forward that failed before its attention ran is dropped, never read)."""
    entry = _pending().pop(layer_idx, None)
    return entry[1] if entry is not None and entry[0] is keys else None


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, q: int) -> torch.Tensor:
    """``scores`` (b, H, q, S) with ``mask`` applied as SDPA reads it: a boolean mask (True: attend) or an additive
    float one, or None: causal over the last ``q`` keys (transformers' SDPA masks skip a purely causal mask, so
    that a prefill runs SDPA's causal kernel). Masked scores take the dtype's least value, as eager attention's."""
    low = torch.finfo(scores.dtype).min
    if mask is None:
        if q == 1:
            return scores
        s = scores.shape[-1]
        rows = torch.arange(q, device=scores.device)[:, None] + (s - q)
        return scores.masked_fill(torch.arange(s, device=scores.device) > rows, low)
    mask = mask[..., : scores.shape[-1]]
    return scores.masked_fill(~mask, low) if mask.dtype == torch.bool else scores + mask.float()


def reduced_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, softcap=None,
                      **kwargs):
    """``query`` (b, H, q, d); ``key``/``value`` (b, kv_heads, s + q, d): exact sink tokens then the new ones.

    ``softcap`` (Gemma 2): scores become ``softcap·tanh(scores / softcap)`` before the mask, as in eager
    attention; a layer without a coded cache then runs these products on its exact keys (SDPA has no softcap).
    """
    pending = take(getattr(module, "layer_idx", None), key)
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
    scores = _masked(scores, attention_mask, q)
    probs = scores.softmax(-1).reshape(b, kv_heads, group * q, -1)
    p_sink, p_coded, p_new = probs[..., :sink], probs[..., sink: sink + length], probs[..., sink + length:]
    out = p_sink @ vf[:, :, :sink] + p_new @ vf[:, :, sink:]  # (b, kv_heads, G·q, d)
    if codec_v is not None:
        out = out + coded_values(p_coded, codec_v, parts_v, length)
    out = out.reshape(b, heads, q, d).transpose(1, 2).contiguous().to(query.dtype)  # (b, q, H, d)
    return out, None


AttentionInterface.register(NAME, reduced_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_reduced_attention(model) -> None:
    """Switch ``model`` to attention in the reduced space (``plan.cache(model, reduced=True)``)."""
    model.set_attn_implementation(NAME)
