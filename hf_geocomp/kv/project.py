"""Coded keys and values without a cache: encoders (BERT) get the projection in place.

An encoder keeps no KV cache, so there are no bytes to save; what the plan does to its keys
and values can still be applied and measured: every K and V projection output is coded and
decoded through the plan's bases and widths, exactly as a coded cache would store it.
"""

from __future__ import annotations

from torch import nn

from .. import arch
from .cache import plan_codecs


class KVProjection:
    """Forward hooks that code and decode every block's keys and values; ``remove()`` undoes them.

    >>> handle = project(encoder, plan)
    >>> encoder(**batch)      # keys and values as the plan's codes would return them
    >>> handle.remove()
    """

    def __init__(self, model: nn.Module, plan):
        plan.check(model)
        codecs = plan_codecs(plan)
        self.handles = []
        try:
            for tap in arch.kv_taps(model):
                hook = self._hook(codecs[tap.layer, tap.kind], tap.offset, tap.width, tap.head_dim, tap.heads_first)
                self.handles.append(model.get_submodule(tap.module).register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _hook(codec, offset: int, width: int, head_dim: int, heads_first: bool):
        def hook(module, args, out):
            four = out.dim() == 4  # a per-head norm's (batch, seq, heads, d), or (batch, heads, seq, d) heads_first
            if four and heads_first:
                out = out.transpose(1, 2)
            shape = out.shape
            flat = out.flatten(2) if four else out
            x = flat[..., offset: offset + width]  # (batch, seq, kv_heads·d)
            b, t, _ = x.shape
            heads = x.reshape(b, t, -1, head_dim).transpose(1, 2)  # (batch, kv_heads, seq, d)
            coded = codec.decode(codec.encode(heads), heads, t).transpose(1, 2).reshape(b, t, width)
            flat = flat.clone()
            flat[..., offset: offset + width] = coded
            flat = flat.reshape(shape)
            return flat.transpose(1, 2) if four and heads_first else flat
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def project(model: nn.Module, plan) -> KVProjection:
    """Apply ``plan``'s coding to ``model``'s keys and values in every forward pass (no cache needed)."""
    return KVProjection(model, plan)
