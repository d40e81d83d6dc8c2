"""KV-cache transform coding: rotate keys and values into fitted bases, spend bits by reverse water-filling.

Based on the weighted projector (reduced-rank regression) and reverse water-filling of
docs/design.md; the cache layout follows KIVI (arXiv:2402.02750) as transformers' QuantizedCache does.

>>> model, plan = compress(model, loader, budget=0.25, method="fisher")
>>> model.generate(**inputs, past_key_values=plan.cache(model))
"""

from .attention import use_reduced_attention
from .cache import GeoKVCache, GeoKVLayer
from .compress import build_plan, collect_kv_stats, compress, describe, required_taps
from .config import KVConfig
from .plan import KVPlan
from .project import KVProjection, project
from .refine import refine

__all__ = ["GeoKVCache", "GeoKVLayer", "KVConfig", "KVPlan", "KVProjection", "build_plan", "collect_kv_stats", "compress", "describe", "project", "refine", "required_taps", "use_reduced_attention"]
