"""Compress on load: calibrate the freshly loaded base model, prune, plan the KV cache, record the plan."""

from __future__ import annotations

from torch import nn

from ..errors import GeoCompError
from .config import GeoCompConfig
from .record import mark_compressed


def _calibration(model: nn.Module, cfg: GeoCompConfig) -> list:
    from transformers import AutoTokenizer

    from ..data import calibration_loader

    source = cfg.tokenizer or getattr(model, "name_or_path", None)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise GeoCompError(f"cannot load a tokenizer for the calibration text from {source!r} (pass "
                           f"GeoCompConfig(tokenizer=...)): {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return list(calibration_loader(model, tok, cfg.calibration, cfg.tokens, cfg.block_size, cfg.batch_size, cfg.seed))


def compress_loaded(model: nn.Module, cfg: GeoCompConfig) -> GeoCompConfig:
    """Run ``cfg``'s request on ``model`` (in place) and record the result; returns the resolved config."""
    from ..geometry import ActivationStats

    stats = ActivationStats.load(cfg.stats_file) if cfg.stats_file else None
    if stats is None and cfg.prune is not None and cfg.prune.criterion == "taylor" and not cfg.calibration:
        raise GeoCompError("the taylor criterion needs calibration text for its gradients, not a stats_file.")
    batches = _calibration(model, cfg) if cfg.calibration else None
    was_training = model.training
    model.eval()
    prune_plan = kv_plan = None
    if cfg.prune is not None:
        from ..prune import prune, prune_calibrated

        if stats is not None:
            _, prune_plan = prune(model, stats, config=cfg.prune)
        else:
            _, prune_plan = prune_calibrated(model, batches, cfg.prune, cfg.pipeline, cfg.propagate)
    if cfg.kv is not None:
        from .. import arch
        from ..kv import build_plan, collect_kv_stats, use_reduced_attention

        kstats = stats if stats is not None else collect_kv_stats(model, batches, cfg.kv.method)
        kv_plan = build_plan(model, kstats, cfg.kv)
        if arch.get_spec(model).family != "bert":
            use_reduced_attention(model)
    model.train(was_training)
    return mark_compressed(model, prune_plan, kv_plan, request=cfg)
