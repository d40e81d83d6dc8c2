"""Bytes actually held by tensors inside an object (a cache, a module), not nominal arithmetic."""

from __future__ import annotations

import torch


def tensor_bytes(obj, _seen: set | None = None) -> int:
    """Sum of the storage bytes of every distinct tensor reachable from ``obj``.

    Walks attributes, lists, tuples and dicts; tensor subclasses that wrap inner tensors
    (optimum-quanto's packed tensors) are counted by their inner tensors. Objects marked
    ``shared_constants = True`` (a codec's basis, shared by all caches like weights) are skipped.
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        key = ("storage", obj.untyped_storage().data_ptr()) if obj.numel() else None
        if key is not None and key in seen:
            return 0
        if key is not None:
            seen.add(key)
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if getattr(obj, "shared_constants", False):  # e.g. a codec's basis: weights shared by every cache
        return 0
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0
