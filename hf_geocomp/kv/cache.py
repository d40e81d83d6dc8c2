"""A transformers cache that holds transform-coded keys and values.

Each layer keeps, per K and V, the latents of every cached token grouped by bit width:
full-precision components as the model dtype (batch, seq, n), quantised ones as packed
uint8 codes (batch, seq, bytes) with float16 scales (batch, seq, groups). Every stored
tensor has the token axis at dim 1 and the batch at dim 0, so crop, beam reorder and batch
selection are slices. The tensors are buffers with room for later tokens (an append writes
only the new ones); ``cache.nbytes()`` is the bytes of the cached tokens, ``nbytes(used=False)``
the bytes allocated, which is what the cache's tensors hold (``tensor_bytes(cache)``).

As in transformers' ``QuantizedLayer``, ``update`` returns the decoded past followed by the
new states as given; the new states are stored coded. A layer built with ``reduced=True``
instead hands its latents to :mod:`.attention` and returns only the exact tokens (sinks and
new states), so attention runs in the reduced space without decoding the past.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .. import arch
from ..errors import GeoCompError
from .allocate import FULL
from .quant import dequantize, quantize


class Codec:
    """Encoder/decoder of one (layer, K or V): (batch, heads, seq, d) ↔ list of stored tensors.

    The basis tensors are constants shared by every cache of a plan (weights, not cache).
    """

    shared_constants = True  # hf_geocomp.eval.memory.tensor_bytes does not count them as cache

    def __init__(self, groups, enc: torch.Tensor | None, dec: torch.Tensor | None, group_size: int):
        self.groups = [(b, torch.tensor(c, dtype=torch.long)) for b, c in groups]
        self.enc, self.dec, self.group_size = enc, dec, group_size  # (heads, d, d) each, or None: identity

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.enc is None:
            return [x.transpose(1, 2)]  # (batch, seq, heads, d), copied into the segment's buffer
        b, h, t, d = x.shape
        z = torch.einsum("bhtd,hdk->bthk", x.float(), self.enc.to(x.device)).reshape(b, t, h * d)
        out = []
        for bits, cols in self.groups:
            zc = z[..., cols.to(x.device)]  # (batch, seq, n)
            out.extend([zc.to(x.dtype)] if bits == FULL else quantize(zc, bits, self.group_size))
        return out

    def decode(self, codes: list[torch.Tensor], like: torch.Tensor, length: int) -> torch.Tensor:
        """Stored tensors of ``length`` tokens → (batch, heads, length, d) in the dtype of ``like``.

        The latents of every group are written into one (batch, length, heads·d) tensor and
        lifted by one batched product per head (attention in the reduced space avoids this).
        """
        if self.enc is None:
            return codes[0].transpose(1, 2)
        b, heads, _, d = like.shape
        z = torch.zeros(b, length, heads * d, device=like.device)
        for (zg, cols) in self.latents(codes):
            z[..., cols] = zg
        x = torch.einsum("bthk,hkd->bhtd", z.reshape(b, length, heads, d), self.dec.to(z.device))
        return x.to(like.dtype)  # (batch, heads, seq, d)

    def latents(self, codes: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per width group: its dequantised latents (batch, length, n) float32 and its columns ``head·d + j``."""
        out, i = [], 0
        for bits, cols in self.groups:
            if bits == FULL:
                z, i = codes[i].float(), i + 1
            else:
                z, i = dequantize(codes[i], codes[i + 1], bits, self.group_size, len(cols)), i + 2
            out.append((z, cols.to(z.device)))
        return out


class _Segment:
    """Consecutive cached tokens stored by one pair of codecs: K parts and V parts, token axis at dim 1.

    The stored tensors live in buffers with room for more tokens, (batch, allocated, ...), so an
    append writes only the new tokens. The first append allocates exactly what it holds; when
    full, a buffer grows by ``max(GROW_TOKENS, allocated // GROW_DIVISOR)`` tokens (one copy),
    so appends cost O(1) amortised and the slack is at most 1/16 of the tokens (or 64 tokens).
    ``parts`` are views of the used tokens.
    """

    GROW_TOKENS, GROW_DIVISOR = 64, 16

    def __init__(self, codecs: tuple[Codec, Codec], capacity: int | None):
        self.codecs, self.capacity = codecs, capacity  # capacity None: unbounded
        self.buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (batch, allocated, ...) each
        self.length = self.allocated = 0

    @property
    def parts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The stored tensors of the ``length`` used tokens (views of the buffers)."""
        if self.buffers is None:
            return None
        return tuple([t[:, : self.length] for t in part] for part in self.buffers)

    def room(self, n: int) -> int:
        return n if self.capacity is None else max(0, min(n, self.capacity - self.length))

    def nbytes(self, used: bool = True) -> int:
        """Bytes of the stored tensors: of the used tokens, or (``used=False``) all allocated."""
        if self.buffers is None:
            return 0
        n = self.length if used else self.allocated
        return sum(t[:, :n].numel() * t.element_size() for part in self.buffers for t in part)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        new = tuple(c.encode(x) for c, x in zip(self.codecs, (keys, values)))
        start, end = self.length, self.length + keys.shape[-2]
        if end > self.allocated:
            self._grow(new, end)
        for bufs, fresh in zip(self.buffers, new):
            for buf, t in zip(bufs, fresh):
                buf[:, start:end] = t
        self.length = end

    def _grow(self, like: tuple[list[torch.Tensor], list[torch.Tensor]], needed: int) -> None:
        size = needed if self.buffers is None else max(needed, self.allocated + max(
            self.GROW_TOKENS, self.allocated // self.GROW_DIVISOR))
        if self.capacity is not None:
            size = min(size, self.capacity)
        grown = []
        for i, part in enumerate(like):
            bufs = []
            for j, t in enumerate(part):
                try:
                    buf = t.new_empty((t.shape[0], size, *t.shape[2:]))
                except RuntimeError as e:  # out of memory: name what was asked for
                    raise GeoCompError(f"the coded KV cache cannot hold {needed} tokens at batch {t.shape[0]}: "
                                       f"allocating {size} tokens failed ({e}).") from e
                if self.buffers is not None:
                    buf[:, : self.length] = self.buffers[i][j][:, : self.length]
                bufs.append(buf)
            grown.append(bufs)
        self.buffers, self.allocated = tuple(grown), size

    def keep(self, start: int, stop: int) -> None:
        """Keep tokens ``start:stop`` in buffers of exactly that size (the rest is released)."""
        if stop <= start:
            self.buffers, self.length, self.allocated = None, 0, 0
            return
        self.map(lambda t: t[:, start:stop].clone())
        self.length = self.allocated = stop - start

    def decode(self, like: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(c.decode(p, x, self.length) for c, p, x in zip(self.codecs, self.parts, like))

    def map(self, fn) -> None:
        """Apply ``fn`` to every buffer (batch operations: the token axis is untouched)."""
        if self.buffers is not None:
            self.buffers = tuple([fn(t) for t in part] for part in self.buffers)


class GeoKVLayer(DynamicLayer):
    """One layer's coded cache: the first ``sink`` tokens exact, every later token coded (module docstring)."""

    def __init__(self, k_codec: Codec, v_codec: Codec, sink: int = 0, layer_idx: int | None = None,
                 reduced: bool = False):
        super().__init__()
        exact = Codec([], None, None, k_codec.group_size)
        self.segments = ([_Segment((exact, exact), sink)] if sink else []) + [_Segment((k_codec, v_codec), None)]
        self.layer_idx, self.reduced = layer_idx, reduced and k_codec.enc is not None

    @property
    def length(self) -> int:
        return sum(seg.length for seg in self.segments)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.tensor([], dtype=self.dtype, device=self.device)  # unused: keeps the base class happy
        self.values = torch.tensor([], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        coded = self.segments[-1]
        if self.reduced and coded.length:  # attention reads the latents (kv.attention): return exact tokens only
            from .attention import hand_over

            exact = self.segments[0] if len(self.segments) > 1 else None
            (ck, cv) = coded.codecs
            sink, length, parts = exact.length if exact else 0, coded.length, coded.parts
            coded.append(key_states, value_states)  # the sink is full once coded tokens exist
            keys, values = key_states, value_states
            if exact is not None:
                sink_k, sink_v = exact.decode((key_states, value_states))
                keys, values = torch.cat([sink_k, key_states], dim=-2), torch.cat([sink_v, value_states], dim=-2)
            hand_over(self.layer_idx, keys, sink, length, ck, parts[0], cv, parts[1])
            return keys, values
        past = [seg.decode((key_states, value_states)) for seg in self.segments if seg.length]
        start = 0
        for seg in self.segments:  # new tokens fill the exact sink first, the rest is coded
            n = seg.room(key_states.shape[-2] - start)
            if n:
                seg.append(key_states[..., start: start + n, :], value_states[..., start: start + n, :])
                start += n
        if not past:
            return key_states, value_states
        return (torch.cat([k for k, _ in past] + [key_states], dim=-2),
                torch.cat([v for _, v in past] + [value_states], dim=-2))

    def _map(self, fn) -> None:
        for seg in self.segments:
            seg.map(fn)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        for seg in self.segments:
            seg.buffers, seg.length, seg.allocated = None, 0, 0
        super().reset()

    def nbytes(self, used: bool = True) -> int:
        """Bytes this layer's stored tensors hold for its tokens (``used=False``: all allocated)."""
        return sum(seg.nbytes(used) for seg in self.segments)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value removes that many from the end."""
        keep = self.length + max_length if max_length < 0 else max_length
        for seg in self.segments:
            n = max(0, min(seg.length, keep))
            if n < seg.length:  # copies, so that the dropped tokens' memory is released
                seg.keep(0, n)
            keep -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._map(lambda t: t.to(self.device, non_blocking=True))


class GeoKVSlidingLayer(GeoKVLayer):
    """A sliding-window layer's coded cache: only the last ``sliding_window - 1`` tokens are kept
    (as transformers' ``DynamicSlidingWindowLayer``), all coded; no sink, the window drops it anyway."""

    is_sliding = True

    def __init__(self, k_codec: Codec, v_codec: Codec, sliding_window: int):
        super().__init__(k_codec, v_codec, sink=0)  # attention on decoded keys and values (not reduced)
        self.sliding_window, self.cumulative_length = sliding_window, 0

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        seg, keep = self.segments[0], self.sliding_window - 1
        if seg.length > keep:  # copies, so that tokens leaving the window release their memory
            seg.keep(seg.length - keep, seg.length)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        if self.cumulative_length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, offset
        return self.cumulative_length + query_length, offset

    def reset(self) -> None:
        self.cumulative_length = 0
        super().reset()

    def crop(self, max_length: int) -> None:
        if self.cumulative_length >= self.sliding_window:
            raise GeoCompError("a sliding-window layer that has filled its window cannot be cropped: the tokens "
                               "before the window are gone.")
        super().crop(max_length)
        self.cumulative_length = self.length


class GeoKVCache(Cache):
    """A cache of :class:`GeoKVLayer` built from a :class:`~hf_geocomp.kv.plan.KVPlan` for ``model``."""

    def __init__(self, model: nn.Module, plan, reduced: bool = False):
        plan.check(model)
        check_supported(model)
        if reduced:
            from .attention import NAME

            if model.config._attn_implementation != NAME:
                raise GeoCompError(f"a reduced-space cache needs the model to run attention_implementation={NAME!r}; "
                                   f"call hf_geocomp.kv.use_reduced_attention(model) first.")
        codecs = plan_codecs(plan)
        layers = [GeoKVSlidingLayer(codecs[i, "k"], codecs[i, "v"], kw["sliding_window"]) if kind == "sliding_attention"
                  else GeoKVLayer(codecs[i, "k"], codecs[i, "v"], plan.config.sink_tokens, i, reduced)
                  for i, (kind, kw) in enumerate(arch.attention_layer_types(model))]
        super().__init__(layers=layers)

    def nbytes(self, used: bool = True) -> int:
        """Bytes of the stored keys and values: of the cached tokens, or (``used=False``) allocated,
        room for later tokens included (what ``tensor_bytes(cache)`` measures)."""
        return sum(layer.nbytes(used) for layer in self.layers)


def plan_codecs(plan) -> dict[tuple[int, str], Codec]:
    """Codecs of a plan, built once and cached on it (they hold no per-sequence state)."""
    cached = getattr(plan, "_codecs", None)
    if cached is None:
        cached = {}
        for i in range(plan.num_layers):
            for kind in "kv":
                enc = None if plan.identity else plan.tensors[f"{i}.{kind}.enc"]
                dec = None if plan.identity else plan.tensors[f"{i}.{kind}.dec"]
                cached[i, kind] = Codec(plan.groups.get(f"{i}.{kind}", []), enc, dec, plan.config.group_size)
        plan._codecs = cached
    return cached


def check_supported(model: nn.Module, cache: bool = True) -> None:
    """Raise unless we can code ``model``'s keys and values: in a cache (decoders whose every attention
    layer is full or sliding-window), or with ``cache=False`` in place (also encoders, see :mod:`.project`)."""
    spec = arch.get_spec(model)
    if spec.family == "bert" and cache:
        raise GeoCompError(f"{spec.family} is an encoder without a KV cache; code its keys and values in place "
                           "with hf_geocomp.kv.project(model, plan).")
    other = sorted({kind for kind, _ in arch.attention_layer_types(model)} - {"full_attention", "sliding_attention"})
    if other:
        raise GeoCompError(f"attention layer types {other} are not supported by the coded KV cache; "
                           "full_attention and sliding_attention layers are.")
