"""A KV plan inside the model: its bases as buffers (saved with the weights), its cache used by ``generate``.

``KVBases`` is a submodule ``geocomp_kv`` of the model whose persistent buffers are the plan's
encoders and decoders (``geocomp_kv.{layer}_{k|v}_{enc|dec}``, (kv_heads, d, d) float32), so
``save_pretrained`` writes them into the safetensors files as ordinary state-dict tensors.

``generate(**inputs)`` without ``past_key_values`` uses the coded cache: a forward pre-hook
(torch's ``register_forward_pre_hook(with_kwargs=True)``) swaps the empty ``DynamicCache`` that
``generate`` made for itself (or ``None`` with ``use_cache``, in eval mode) for a fresh
:class:`~hf_geocomp.kv.GeoKVCache`; the model returns it, so ``generate`` keeps using it. A
cache the caller passed (``generate`` marks it ``_is_user_defined``), a non-empty cache, or any
other cache class is left alone: an explicit ``past_key_values`` always wins.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GeoCompError
from ..kv.plan import KVPlan

ATTR = "geocomp_kv"


class KVBases(nn.Module):
    """The basis tensors of a KV plan as persistent buffers (fp32, kept so whatever the model dtype)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device=None):
        super().__init__()
        for i in range(num_layers):
            for kind in "kv":
                for part in ("enc", "dec"):
                    self.register_buffer(f"{i}_{kind}_{part}", torch.empty(num_kv_heads, head_dim, head_dim,
                                                                           dtype=torch.float32, device=device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """In the plan's naming (``"{layer}.{k|v}.{enc|dec}"``)."""
        return {name.replace("_", "."): buf for name, buf in self.named_buffers()}

    def load_plan(self, plan: KVPlan) -> None:
        with torch.no_grad():
            for key, t in plan.tensors.items():
                getattr(self, key.replace(".", "_")).copy_(t.float())


def attach_bases(model: nn.Module, plan: KVPlan, device=None) -> KVBases:
    bases = KVBases(plan.num_layers, plan.num_kv_heads, plan.head_dim, device=device)
    model.add_module(ATTR, bases)
    return bases


def plan_from_model(model: nn.Module, plan_dict: dict) -> KVPlan:
    """The KV plan of a reloaded model: JSON from its config, tensors from its ``geocomp_kv`` buffers."""
    bases = getattr(model, ATTR, None)
    tensors = {} if bases is None else {k: v.float() for k, v in bases.tensors().items()}
    plan = KVPlan.from_dict(plan_dict, tensors)
    plan.check(model)
    return plan


def _swap_cache(module, args, kwargs):
    plan = getattr(module, "geocomp_kv_plan", None)
    if plan is None or plan.identity:
        return None
    from transformers import DynamicCache

    cache = kwargs.get("past_key_values")
    fresh = (cache is None and not module.training and kwargs.get("use_cache", module.config.use_cache)) or (
        type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0)
    if not fresh or len(args) > 1:  # a positional past_key_values is never touched
        return None
    kwargs["past_key_values"] = plan.cache(module)
    return args, kwargs


def use_coded_cache(model: nn.Module, plan: KVPlan) -> None:
    """Make ``model.generate`` (and cached forwards) use ``plan``'s coded cache unless a cache is given."""
    if getattr(model, "_geocomp_cache_hook", None) is not None:
        model._geocomp_cache_hook.remove()
    model.geocomp_kv_plan = plan
    model._geocomp_cache_hook = model.register_forward_pre_hook(_swap_cache, with_kwargs=True)


def check_bases(model: nn.Module, plan: KVPlan) -> None:
    bases = getattr(model, ATTR, None)
    if bases is None and not plan.identity:
        raise GeoCompError("this geocomp checkpoint has a KV plan but no geocomp_kv basis tensors.")
