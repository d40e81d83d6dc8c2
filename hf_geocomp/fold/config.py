"""Configuration of model folding."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..arch import LAYERS_HELP
from ..errors import GeoCompError
from ..prune.config import PruneConfig

METHODS = ("kmeans", "agglomerative")
REPAIRS = ("none", "data_free", "data")
REPAIR_AT = ("auto", "consumer", "gate", "producers")


@dataclass
class FoldConfig:
    """What to fold and how.

    Args:
        sparsity: fraction of transformer-block parameters to remove, in [0, 1) (the pruning budget).
        clusters: instead of ``sparsity``, fold every MLP to exactly this many units (0 < clusters < units).
        targets: unit kinds to fold: ``mlp`` (intermediate neurons), ``heads`` (attention heads).
        allocation: ``uniform`` (same fraction in every layer) or ``global`` (data-free redundancy
            scores, standardised per layer and ranked together, as pruning's global allocation).
        method: ``kmeans`` (k-means++ then Lloyd, seeded) or ``agglomerative`` (Ward linkage).
        repair: ``none``; ``data_free`` (Fold-AR: a cluster of n units with mean pairwise cosine ρ̄ of their
            producer rows is rescaled by sqrt(n / (1 + (n−1)ρ̄))); ``data`` (each merged unit's output
            standard deviation measured on calibration text is matched to the mean of its members').
        repair_at: where the scale goes: ``consumer`` (the merged unit's consumer column, i.e. its
            output; for SwiGLU identical to scaling ``up``), ``gate`` (SwiGLU gate row only),
            ``producers`` (every producer row by s^(1/number of producers)); ``auto`` picks the
            measured default (``consumer``; see the README's folding section).
        head_mode: ``query`` (fold query heads within one GQA group) or ``kv`` (fold whole KV groups).
        min_keep, max_keep, round_to: as in pruning.
        iters: Lloyd iterations of k-means.
        seed: clustering seed (k-means++ initialisation).
        layers: only these blocks are folded (as in pruning: indices, negative from the end, or a fraction of
            the last blocks; the budget stays a fraction of all block parameters). None: every block.
    """

    sparsity: float = field(default=0.2, metadata={"help": "fraction of block parameters to remove, in [0, 1)"})
    clusters: int | None = field(default=None, metadata={"help": "fixed MLP cluster count per layer (overrides sparsity)"})
    targets: tuple[str, ...] = field(default=("mlp",), metadata={"help": "mlp and/or heads"})
    allocation: str = field(default="uniform", metadata={"help": "uniform | global"})
    method: str = field(default="kmeans", metadata={"help": "kmeans | agglomerative"})
    repair: str = field(default="data_free", metadata={"help": "none | data_free (Fold-AR) | data"})
    repair_at: str = field(default="auto", metadata={"help": "auto | consumer | gate | producers"})
    head_mode: str = field(default="query", metadata={"help": "query (within GQA groups) | kv (whole groups)"})
    min_keep: float = field(default=0.05, metadata={"help": "least fraction of units a layer keeps, in (0, 1]"})
    max_keep: float = field(default=1.0, metadata={"help": "most fraction of units a layer keeps, in (0, 1]"})
    round_to: int = field(default=1, metadata={"help": "kept MLP widths rounded up to a multiple of this (>= 1)"})
    iters: int = field(default=20, metadata={"help": "Lloyd iterations of k-means (>= 1)"})
    seed: int = field(default=0, metadata={"help": "clustering seed"})
    layers: tuple[int, ...] | float | None = field(default=None, metadata={"help": "blocks folded: " + LAYERS_HELP})

    def __post_init__(self):
        # the budget fields mean what they mean in pruning, and are checked by its config
        budget = self.budget()
        self.targets, self.layers = budget.targets, budget.layers
        if self.clusters is not None and (int(self.clusters) != self.clusters or self.clusters <= 0):
            raise GeoCompError(f"clusters must be a positive integer below the number of units, got {self.clusters!r}.")
        for name, value, allowed in [("method", self.method, METHODS), ("repair", self.repair, REPAIRS),
                                     ("repair_at", self.repair_at, REPAIR_AT)]:
            if value not in allowed:
                raise GeoCompError(f"{name} {value!r} does not exist; allowed: {', '.join(allowed)}.")
        if int(self.iters) != self.iters or self.iters < 1:
            raise GeoCompError(f"iters must be a positive integer, got {self.iters!r}.")

    def budget(self) -> PruneConfig:
        """The pruning config with this budget, whose allocation gives the cluster counts."""
        return PruneConfig(sparsity=self.sparsity, criterion="magnitude", targets=self.targets,
                           allocation=self.allocation, head_mode=self.head_mode, min_keep=self.min_keep,
                           max_keep=self.max_keep, round_to=self.round_to, layers=self.layers)

    @property
    def placement(self) -> str:
        """``repair_at`` with ``auto`` resolved."""
        return "consumer" if self.repair_at == "auto" else self.repair_at

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return d
