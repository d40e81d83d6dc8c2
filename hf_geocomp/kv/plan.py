"""The plan: what a compressed KV cache stores, serialisable for ``from_pretrained`` later.

Two parts, as a model has config and weights: :meth:`KVPlan.to_dict` is JSON (settings,
the model it fits, and per layer and K/V which latent components are kept at which width),
meant for ``config.quantization_config``; ``tensors`` (encoder/decoder per layer and K/V,
``"{layer}.{k|v}.enc"``/``.dec``, (kv_heads, d, d)) belong with the weights (safetensors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from .config import KVConfig

FORMAT = "hf_geocomp.kv_plan/1"


@dataclass
class KVPlan:
    config: KVConfig
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # storage dtype of full-precision components (the model's)
    groups: dict[str, list[tuple]]  # "{layer}.{k|v}" → [(bits | "full", [column, ...])], columns = head·d + j
    bytes_per_token: int  # of a coded token, batch 1 (the first config.sink_tokens are stored exact)
    full_bytes_per_token: int  # of the uncompressed cache
    identity: bool = False  # budget 1.0: stored exactly as given
    refinement: dict | None = None  # settings and KL of kv.refine, when the decoders were refined
    windows: list[int | None] | None = None  # per layer: sliding_window of a sliding layer, None for full (None: all full)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def ratio(self) -> float:
        """Cache bytes over uncompressed bytes at ``config.reference_tokens`` tokens, in the plan's dtype."""
        return self.cache_bytes(self.config.reference_tokens) / self.cache_bytes(self.config.reference_tokens, full=True)

    def element_size(self, dtype: torch.dtype | str | None = None) -> int:
        """Bytes of one exact element (a sink token's or a full-precision component's) stored in ``dtype``
        (None: the plan's dtype, the model's when it was fitted)."""
        dtype = self.dtype if dtype is None else dtype
        return torch.empty((), dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype).element_size()

    def layer_bytes_per_token(self, full: bool = False, dtype: torch.dtype | str | None = None) -> list[int]:
        """Bytes per stored token of each layer, K and V (``full``: uncompressed), batch 1, with exact
        elements in ``dtype`` (None: the plan's). Quantised components cost the same in every dtype."""
        elt = self.element_size(dtype)
        flat = self.full_bytes_per_token // self.num_layers // self.element_size() * elt
        if full or self.identity:
            return [flat] * self.num_layers
        from .allocate import group_bytes

        return [sum(group_bytes(b, len(c), self.config.group_size, elt) for k in "kv"
                    for b, c in self.groups.get(f"{i}.{k}", [])) for i in range(self.num_layers)]

    def held_tokens(self, tokens: int) -> list[tuple[int, int]]:
        """Per layer, (exact, coded) tokens the cache holds after ``tokens`` tokens: a full layer keeps the
        first ``sink_tokens`` exact and codes the rest; a sliding layer keeps its last ``window - 1``, coded."""
        sink = 0 if self.identity else min(tokens, self.config.sink_tokens)
        return [(sink, tokens - sink) if w is None else (0, min(tokens, w - 1))
                for w in (self.windows or [None] * self.num_layers)]

    def cache_bytes(self, tokens: int, batch: int = 1, full: bool = False,
                    dtype: torch.dtype | str | None = None) -> int:
        """Bytes the cache's tensors hold for ``tokens`` tokens (``full``: the uncompressed cache, as
        transformers' ``DynamicCache`` holds it, sliding layers included).

        ``dtype``: the model's dtype when the cache is used (the cache stores exact elements, sinks and
        full-precision components, as the model gives them); None: the plan's dtype. A plan fitted in
        one dtype keeps its quantised layout in another, so its ratio to the uncompressed cache changes:
        ``cache_bytes(n, dtype=d) / cache_bytes(n, full=True, dtype=d)``.
        """
        held = self.held_tokens(tokens)
        flat = self.layer_bytes_per_token(full=True, dtype=dtype)
        if full:
            return batch * sum((exact + n) * f for (exact, n), f in zip(held, flat))
        coded = self.layer_bytes_per_token(dtype=dtype)
        return batch * sum(exact * f + n * c for (exact, n), f, c in zip(held, flat, coded))

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "tensors"}
        d["config"]["widths"] = list(self.config.widths)
        d["groups"] = {k: [[b, list(c)] for b, c in g] for k, g in self.groups.items()}
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, torch.Tensor] | None = None) -> "KVPlan":
        if d.get("format") != FORMAT:
            raise GeoCompError(f"not a KV plan (format {d.get('format')!r}, expected {FORMAT!r}).")
        d = {k: v for k, v in d.items() if k != "format"}
        d["config"] = KVConfig(**d["config"])
        d["groups"] = {k: [(b, list(c)) for b, c in g] for k, g in d["groups"].items()}
        return cls(**d, tensors=dict(tensors or {}))

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "kv_plan.json").write_text(json.dumps(self.to_dict()) + "\n")
        if self.tensors:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(Path(folder) / "kv_plan.safetensors"))

    @classmethod
    def load(cls, folder: str) -> "KVPlan":
        from safetensors.torch import load_file

        path = Path(folder) / "kv_plan.json"
        if not path.exists():
            raise GeoCompError(f"no KV plan in {folder!r} (kv_plan.json is missing).")
        weights = Path(folder) / "kv_plan.safetensors"
        return cls.from_dict(json.loads(path.read_text()), load_file(str(weights)) if weights.exists() else {})

    # ---- the model it fits ---------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise unless this plan was made for a model shaped like ``model``."""
        heads = arch.head_layout(model)
        mine = (self.model_type, self.num_layers, self.num_kv_heads, self.head_dim)
        theirs = (model.config.model_type, len(arch.block_prefixes(model)), heads.num_kv_heads, heads.head_dim)
        if mine != theirs:
            raise GeoCompError(f"this KV plan was made for (type, layers, kv heads, head_dim) = {mine}, "
                               f"but the model has {theirs}.")
        if not self.identity:
            missing = [f"{i}.{k}.{t}" for i in range(self.num_layers) for k in "kv" for t in ("enc", "dec")
                       if f"{i}.{k}.{t}" not in self.tensors]
            if missing:
                raise GeoCompError(f"this KV plan lacks its basis tensors (first missing: {missing[0]!r}).")

    def cache(self, model: nn.Module, reduced: bool | None = None):
        """A fresh compressed cache for ``model.generate(..., past_key_values=plan.cache(model))``.

        ``reduced``: attention reads the stored latents directly (needs
        :func:`hf_geocomp.kv.use_reduced_attention` on the model), else it runs on decoded keys
        and values; ``None``: reduced exactly when the model already uses it.
        """
        if reduced is None:
            from .attention import NAME

            reduced = model.config._attn_implementation == NAME
        from .cache import GeoKVCache

        return GeoKVCache(model, self, reduced)
