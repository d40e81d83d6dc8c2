"""Compress a model's dense layers into :class:`CurvatureSubspaceLinear` modules (in place)."""

from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..prune.surgery import _set_module
from ..prune.units import block_params
from .config import CurvatureConfig
from .kfac import KFACFactors, kfac_factors, mlp_linears, select
from .modules import CurvatureSubspaceLinear

CONFIG_KEY = "geocomp_modules"  # config record: module name → geocomp_record()


def compress(model: nn.Module, factors: dict[str, KFACFactors] | None = None, config: CurvatureConfig | None = None,
             batches=None, **kwargs) -> tuple[nn.Module, dict]:
    """Replace every target layer by its K-FAC subspace at ``config.keep``; return (model, summary).

    ``factors`` from :func:`kfac_factors` on this model (computed from ``batches`` when not given).
    The records of the new modules go into ``model.config.geocomp_modules`` for reloading.
    """
    cfg = config or CurvatureConfig(**kwargs)
    names = target_modules(model, cfg)
    if factors is None:
        if batches is None:
            raise GeoCompError("curvature compression needs K-FAC factors or calibration batches to compute them.")
        factors = kfac_factors(model, batches, names, cfg.labels, cfg.seed)
    missing = [n for n in names if n not in factors]
    if missing:
        raise GeoCompError(f"the K-FAC factors have no entry for module {missing[0]!r}; recompute them for it.")
    before = stored_block_params(model)
    records = dict(getattr(model.config, CONFIG_KEY, None) or {})
    for n in names:
        m = model.get_submodule(n)
        if not arch.is_linear(m):
            raise GeoCompError(f"module {n!r} is a {type(m).__name__}, not a dense layer.")
        W = arch.linear_weight(m)  # (out, in)
        f = factors[n]
        if f.A.shape[0] != W.shape[1] or f.G.shape[0] != W.shape[0]:
            raise GeoCompError(f"the K-FAC factors of {n!r} are {tuple(f.G.shape)}, {tuple(f.A.shape)}; the layer "
                               f"is {tuple(W.shape)} (out, in): they were measured on another model.")
        L, R, mask = select(f, cfg.keep, cfg.rule)
        new = CurvatureSubspaceLinear.from_dense(W.detach(), m.bias, L, R, mask).train(m.training)
        _set_module(model, n, new)
        records[n] = new.geocomp_record()
    setattr(model.config, CONFIG_KEY, records)
    model.config.geocomp_curvature = cfg.to_dict()
    return model, {"params_before": before, "params_after": stored_block_params(model), "modules": len(names)}


def target_modules(model: nn.Module, config: CurvatureConfig) -> list[str]:
    """The dense layers ``config`` compresses: its ``modules`` (default every MLP linear) inside its ``layers``."""
    names = arch.match_modules(model, list(config.modules)) if config.modules else mlp_linears(model)
    layers = arch.layer_indices(model, config.layers)
    if layers is None:
        return names
    prefixes = tuple(arch.block_prefixes(model)[i] for i in layers)
    inside = [n for n in names if n.startswith(prefixes)]
    if not inside:
        raise GeoCompError(f"no module to compress lies in blocks {layers} (modules {list(config.modules or [])} "
                           "select none there).")
    return inside


def rebuild(model: nn.Module, records: dict | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Put empty modules of the recorded shapes (``config.geocomp_modules``) in place, ready for a state dict."""
    records = records if records is not None else getattr(model.config, CONFIG_KEY, None) or {}
    for name, rec in records.items():
        if rec.get("kind") == "curvature_subspace":
            _set_module(model, name, CurvatureSubspaceLinear.from_geocomp_record(rec, dtype))
    return model


def stored_block_params(model: nn.Module) -> int:
    """Block parameters plus the fixed bases of curvature layers, minus their masked-out core entries."""
    n = block_params(model)
    for m in model.modules():
        if isinstance(m, CurvatureSubspaceLinear):
            n += m.stored_params() - m.C.numel() - (0 if m.bias is None else m.bias.numel())
    return n
