"""``GeoCompConfig``: the transformers quantization config of a geocomp model.

Two roles in one object, as GPTQ's config has: a *request* (``prune`` / ``kv`` settings and
where calibration statistics come from, read when ``from_pretrained(base,
quantization_config=GeoCompConfig(...))`` compresses on load) and a *record* (``plan``: the
shapes, replaced modules and KV plan a compressed model was saved with, written into
``config.json`` and read back by ``from_pretrained(folder_or_repo_id)``).
"""

from __future__ import annotations

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import GeoCompError

QUANT_METHOD = "geocomp"
FORMAT_VERSION = 1  # of ``plan``; a newer one is refused (this version cannot know what it adds)

FIELDS = {  # name → help (the docstring of __init__ mirrors this)
    "prune": "PruneConfig or its dict: structured pruning on load (None: no pruning)",
    "kv": "KVConfig or its dict: KV-cache transform coding on load (None: no KV coding)",
    "calibration": "text source of the calibration statistics (e.g. shakespeare:calibration)",
    "stats_file": "statistics saved by `hf-geocomp analyze --save-stats` instead of calibration text (one method)",
    "tokens": "calibration tokens (>= block_size)",
    "block_size": "tokens per calibration block (>= 2)",
    "batch_size": "calibration blocks per forward pass (>= 1)",
    "seed": "seed of the calibration block selection",
    "pipeline": "sequential (one block's statistics in memory at a time) | whole-model (every block's at once)",
    "propagate": "block-by-block inputs: original (equal to the whole-model statistics) | compressed (from the "
                 "pruned blocks before)",
    "tokenizer": "tokenizer folder or Hub id for the calibration text (None: the model's own)",
    "plan": "the resolved plan of a compressed model (written on save; never set it by hand)",
    "format_version": "version of the plan format",
    "quant_method": "always 'geocomp'",
}


def _as(cls, value, name):
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise GeoCompError(f"GeoCompConfig {name} must be a {cls.__name__} or a dict of its fields, "
                           f"got {type(value).__name__}.")
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise GeoCompError(f"GeoCompConfig {name} has unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}.")
    return cls(**value)


class GeoCompConfig(QuantizationConfigMixin):
    """Compress on load, or record how a saved model was compressed.

    Args:
        prune: :class:`~hf_geocomp.prune.PruneConfig` (or a dict of its fields): structured pruning.
        kv: :class:`~hf_geocomp.kv.KVConfig` (or a dict of its fields): KV-cache transform coding.
        calibration: text source of the calibration statistics (``shakespeare:calibration``, a file...).
        stats_file: statistics file (``hf-geocomp analyze --save-stats``) instead of calibration text;
            it serves one method, measured on the very model being loaded.
        tokens: calibration tokens; block_size: tokens per block; batch_size: blocks per pass;
        seed: seed of the block selection; tokenizer: folder or Hub id (None: the model's).
        pipeline: ``sequential`` (pruning statistics measured and used one block at a time: the memory of
            one block's, any model size) or ``whole-model`` (every block's at once).
        propagate: with ``sequential``, each block's inputs come from the ``original`` blocks before it
            (the same statistics as a whole-model pass) or from the ``compressed`` ones.
        plan: the resolved plan (written on save, read on reload); format_version: its version.
    """

    def __init__(self, prune=None, kv=None, calibration: str | None = None, stats_file: str | None = None,
                 tokens: int = 4096, block_size: int = 256, batch_size: int = 8, seed: int = 0,
                 pipeline: str = "sequential", propagate: str = "original", tokenizer: str | None = None, plan: dict | None = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **kwargs):
        if kwargs:
            raise GeoCompError(f"GeoCompConfig has no option {sorted(kwargs)[0]!r}; allowed: {', '.join(FIELDS)}.")
        if quant_method != QUANT_METHOD:
            raise GeoCompError(f"GeoCompConfig quant_method must be {QUANT_METHOD!r}, got {quant_method!r}.")
        if not isinstance(format_version, int) or format_version < 1:
            raise GeoCompError(f"format_version must be a positive integer, got {format_version!r}.")
        if format_version > FORMAT_VERSION:
            raise GeoCompError(f"this checkpoint's geocomp plan has format version {format_version}, newer than the "
                               f"{FORMAT_VERSION} this hf_geocomp reads: upgrade with `pip install -U hf-geocomp`.")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        # imported here: kv and prune load transformers' models, whose import registers the quantizer (hf_geocomp's
        # __init__), which needs this module complete
        from ..kv.config import KVConfig
        from ..prune.config import PruneConfig

        self.prune = _as(PruneConfig, prune, "prune")
        self.kv = _as(KVConfig, kv, "kv")
        self.calibration, self.stats_file, self.tokenizer = calibration, stats_file, tokenizer
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.pipeline, self.propagate = pipeline, propagate
        self.plan = plan
        self._check()

    def _check(self) -> None:
        from ..geometry.sequential import PIPELINES, PROPAGATE

        for name, value, allowed in (("pipeline", self.pipeline, PIPELINES), ("propagate", self.propagate, PROPAGATE)):
            if value not in allowed:
                raise GeoCompError(f"GeoCompConfig {name} must be one of {', '.join(allowed)}, got {value!r}.")
        for name, value, least in (("tokens", self.tokens, 1), ("block_size", self.block_size, 2),
                                   ("batch_size", self.batch_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise GeoCompError(f"GeoCompConfig {name} must be an integer >= {least}, got {value!r}.")
        if self.plan is not None:
            if not isinstance(self.plan, dict):
                raise GeoCompError(f"GeoCompConfig plan must be a dict, got {type(self.plan).__name__}.")
            version = self.plan.get("format_version")
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise GeoCompError(f"this checkpoint's geocomp plan has format version {version!r}; this hf_geocomp "
                                   f"reads versions up to {FORMAT_VERSION}: upgrade with `pip install -U hf-geocomp`.")
            return  # a saved record: the request fields are kept for the card, not run again
        if self.prune is None and self.kv is None:
            raise GeoCompError("GeoCompConfig needs prune=... and/or kv=... (nothing to compress).")
        if self.calibration is not None and self.stats_file is not None:
            raise GeoCompError("GeoCompConfig takes calibration text or stats_file, not both.")
        if self.calibration is None and self.stats_file is None:
            raise GeoCompError("GeoCompConfig needs calibration='<text source>' or stats_file='<path>'.")
        if self.stats_file is not None and self.prune is not None and self.kv is not None:
            raise GeoCompError("a stats_file serves one method; with both prune and kv give calibration text "
                               "(KV statistics must be measured on the pruned model).")
        if self.tokens < self.block_size:
            raise GeoCompError(f"GeoCompConfig tokens ({self.tokens}) must be at least block_size ({self.block_size}).")
        if self.kv is not None and self.prune is not None and "heads" in self.prune.targets \
                and self.prune.allocation == "global":
            raise GeoCompError("KV coding needs the same head counts in every layer: with kv, prune heads with "
                               "allocation='uniform' or prune targets=('mlp',) only.")

    def __deepcopy__(self, memo):
        """A copy sharing ``plan`` (a record, never changed in place; a large KV plan makes the deep copies
        transformers takes of the config during ``from_pretrained`` slow)."""
        import copy

        new = copy.copy(self)
        new.prune, new.kv = copy.deepcopy(self.prune, memo), copy.deepcopy(self.kv, memo)
        return new

    @property
    def is_compressed(self) -> bool:
        return self.plan is not None

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "prune": None if self.prune is None else self.prune.to_dict(),
                "kv": None if self.kv is None else {**self.kv.__dict__, "widths": list(self.kv.widths)},
                "calibration": self.calibration, "stats_file": self.stats_file, "tokens": self.tokens,
                "block_size": self.block_size, "batch_size": self.batch_size, "seed": self.seed,
                "pipeline": self.pipeline, "propagate": self.propagate, "tokenizer": self.tokenizer, "plan": self.plan}

    def __iter__(self):
        yield from self.to_dict().items()
