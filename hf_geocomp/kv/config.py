"""Configuration of KV-cache transform coding."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import GeoCompError

METHODS = ("fisher", "aware", "pca")
QUANT_WIDTHS = (8, 4, 2, 1)


@dataclass
class KVConfig:
    """How to code the KV cache.

    Args:
        budget: bytes the cache may hold, as a fraction of the uncompressed cache (model dtype), in (0, 1].
        method: basis per layer, KV head, K and V: ``fisher`` (weighted by the empirical Fisher
            of the stored keys and values: needs gradient statistics), ``aware`` (K weighted by
            its GQA group's queries, V by the o_proj columns that read it) or ``pca`` (unweighted).
        bits: allocate bit widths per component (transform coding); ``False`` keeps ranks only,
            each kept component at full precision.
        widths: quantised widths the allocator may use besides full precision and 0.
        group_size: latent components sharing one float16 scale, per token.
        rope: ``average`` fits the K basis on the post-RoPE second moment averaged over
            ``rope_positions`` positions (the cache stores post-RoPE keys); ``none`` uses the
            pre-RoPE statistics as they are.
        rope_positions: positions averaged over for ``rope="average"``.
        max_rank: at most this many components per KV head (None: head_dim).
        k_units: how ``aware`` puts K errors beside V errors: ``scores`` (squared score error
            ``(q·e)²/d`` as is) or ``sensitivity`` (times the group's mean ``E‖W_o,h(v − v̄)‖²``,
            a first-order output sensitivity; worse in a probe, see README).
        sink_tokens: the first tokens of every sequence are kept exact (attention sinks: the
            first positions draw a large share of attention whatever they hold), their bytes
            counted in the budget.
        reference_tokens: the cache length at which the budget holds exactly when
            ``sink_tokens > 0`` (longer caches are below it, shorter ones above).
        k_scale: extra multiplier of the K weights against V (the K/V exchange rate); None: 1.0
            for ``fisher`` (K and V costs are already in loss units), 4.0 otherwise.
        shrinkage: ``α`` in [0, 1]: the K and V second moments become ``(1 − α)·C + α·diag(C)``
            before the bases are fitted (less tied to the calibration text's correlations).
        min_bits: a floor: no component is dropped or coded below this width (0: no floor).
    """

    budget: float = field(default=0.25, metadata={"help": "fraction of the uncompressed cache bytes, in (0, 1]"})
    method: str = field(default="fisher", metadata={"help": "basis: fisher | aware | pca"})
    bits: bool = field(default=True, metadata={"help": "allocate bit widths (True) or ranks only (False)"})
    widths: tuple[int, ...] = field(default=QUANT_WIDTHS, metadata={"help": "quantised widths among 8, 4, 2, 1"})
    group_size: int = field(default=64, metadata={"help": "components per float16 scale, per token"})
    rope: str = field(default="average", metadata={"help": "K basis under RoPE: average | none"})
    rope_positions: int = field(default=1024, metadata={"help": "positions averaged for rope=average"})
    max_rank: int | None = field(default=None, metadata={"help": "cap on kept components per KV head"})
    k_units: str = field(default="scores", metadata={"help": "aware K error units: scores | sensitivity"})
    k_scale: float | None = field(default=None, metadata={"help": "multiplier of K weights against V (> 0); "
                                                                  "None: 1 for fisher, 4 otherwise"})

    shrinkage: float = field(default=0.0, metadata={"help": "shrink K/V second moments toward their diagonal, in [0, 1]"})
    min_bits: int = field(default=0, metadata={"help": "least width of every component (0: components may be dropped)"})

    sink_tokens: int = field(default=4, metadata={"help": "first tokens kept exact, counted in the budget"})
    reference_tokens: int = field(default=1024, metadata={"help": "cache length at which the budget is exact"})

    def __post_init__(self):
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise GeoCompError(f"budget must be a fraction of the cache bytes in (0, 1], got {self.budget!r}.")
        if self.method not in METHODS:
            raise GeoCompError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        self.widths = tuple(sorted({int(w) for w in self.widths}, reverse=True))
        if not set(self.widths) <= set(QUANT_WIDTHS):
            raise GeoCompError(f"widths must be among {QUANT_WIDTHS}, got {self.widths}.")
        if self.group_size < 1:
            raise GeoCompError(f"group_size must be a positive integer, got {self.group_size}.")
        if self.rope not in ("average", "none"):
            raise GeoCompError(f"rope must be 'average' or 'none', got {self.rope!r}.")
        if self.rope_positions < 1:
            raise GeoCompError(f"rope_positions must be positive, got {self.rope_positions}.")
        if self.k_units not in ("scores", "sensitivity"):
            raise GeoCompError(f"k_units must be 'scores' or 'sensitivity', got {self.k_units!r}.")
        if self.k_scale is None:
            self.k_scale = 1.0 if self.method == "fisher" else 4.0
        if not self.k_scale > 0:
            raise GeoCompError(f"k_scale must be positive, got {self.k_scale}.")
        if not 0 <= self.sink_tokens < self.reference_tokens:
            raise GeoCompError(f"sink_tokens must be in [0, reference_tokens={self.reference_tokens}), "
                               f"got {self.sink_tokens}.")
        if self.sink_tokens and self.budget < 1 and self.coded_fraction() <= 0:
            raise GeoCompError(f"sink_tokens={self.sink_tokens} exact tokens alone exceed budget {self.budget} "
                               f"of a {self.reference_tokens}-token cache.")
        if not 0 <= self.shrinkage <= 1:
            raise GeoCompError(f"shrinkage must be in [0, 1], got {self.shrinkage}.")
        if self.min_bits and self.min_bits not in self.widths:
            raise GeoCompError(f"min_bits must be 0 or one of the widths {self.widths}, got {self.min_bits}.")
        if self.max_rank is not None and self.max_rank < 1:
            raise GeoCompError(f"max_rank must be a positive integer or None, got {self.max_rank}.")

    def coded_fraction(self) -> float:
        """Bytes per coded token over uncompressed bytes per token, so that a ``reference_tokens``
        cache with ``sink_tokens`` exact tokens holds ``budget`` of the uncompressed bytes."""
        n, s = self.reference_tokens, self.sink_tokens
        return (self.budget * n - s) / (n - s)
