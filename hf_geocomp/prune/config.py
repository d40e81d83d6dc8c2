"""Configuration of structured pruning."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..arch import LAYERS_HELP, check_layers
from ..errors import GeoCompError
from .units import HEAD_MODES, TARGETS

ALLOCATIONS = ("uniform", "global")
COMPENSATIONS = ("none", "bias", "refit", "bias+refit")


@dataclass
class PruneConfig:
    """What to prune and how.

    Args:
        sparsity: fraction of transformer-block parameters to remove, in [0, 1).
        criterion: scorer name (``variance``, ``magnitude``, ``wanda``, ``random``, ``taylor``).
        targets: unit kinds to prune: ``mlp`` (intermediate neurons), ``heads`` (attention heads).
        allocation: ``uniform`` (same fraction in every layer) or ``global`` (scores standardised
            per layer and ranked together, so per-layer ratios adapt).
        compensation: ``none``, ``bias`` (mean of removed inputs folded into the consumer's bias),
            ``refit`` (least-squares refit of the consumer from its input second moment) or both.
        head_mode: ``query`` (prune query heads, the same number in every GQA group) or ``kv``
            (prune whole KV groups with their query heads).
        min_keep: each layer keeps at least this fraction of its units (and at least one).
        max_keep: each layer keeps at most this fraction of its units.
        round_to: kept MLP widths are rounded up to a multiple of this.
        refit_damp: ridge added to the refit, relative to the mean diagonal of the kept block.
        refit_shrinkage: ``α`` in [0, 1]: the refit reads ``(1 − α)·C + α·diag(C)`` instead of the
            calibration text's moment matrix ``C`` (less tied to its correlations; 1: no cross terms).
        seed: seed of the random criterion.
        layers: only these blocks lose units (indices, negative from the end, or a fraction in (0, 1] of the
            last blocks); the budget stays a fraction of *all* block parameters. None: every block.
    """

    sparsity: float = field(default=0.2, metadata={"help": "fraction of block parameters to remove, in [0, 1)"})
    criterion: str = field(default="variance", metadata={"help": "variance | magnitude | wanda | random | taylor"})
    targets: tuple[str, ...] = field(default=("mlp", "heads"), metadata={"help": "mlp and/or heads"})
    allocation: str = field(default="uniform", metadata={"help": "uniform | global"})
    compensation: str = field(default="none", metadata={"help": "none | bias | refit | bias+refit"})
    head_mode: str = field(default="query", metadata={"help": "query (heads within GQA groups) | kv (whole groups)"})
    min_keep: float = field(default=0.05, metadata={"help": "least fraction of units a layer keeps, in (0, 1]"})
    max_keep: float = field(default=1.0, metadata={"help": "most fraction of units a layer keeps, in (0, 1]"})
    round_to: int = field(default=1, metadata={"help": "kept MLP widths rounded up to a multiple of this (>= 1)"})
    refit_damp: float = field(default=1e-2, metadata={"help": "relative ridge of the least-squares refit (>= 0)"})
    refit_shrinkage: float = field(default=0.0, metadata={"help": "blend of the refit's moments toward their "
                                                                   "diagonal, in [0, 1]"})
    seed: int = field(default=0, metadata={"help": "seed of the random criterion"})
    layers: tuple[int, ...] | float | None = field(default=None, metadata={"help": "blocks pruned: " + LAYERS_HELP})

    def __post_init__(self):
        from .scorers import SCORERS

        self.layers = check_layers(self.layers)
        if isinstance(self.targets, str):
            self.targets = tuple(t for t in self.targets.replace("+", ",").split(",") if t)
        self.targets = tuple(self.targets)
        if not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise GeoCompError(f"sparsity must be in [0, 1), got {self.sparsity!r}.")
        checks = [("criterion", self.criterion, tuple(SCORERS)), ("allocation", self.allocation, ALLOCATIONS),
                  ("compensation", self.compensation, COMPENSATIONS), ("head_mode", self.head_mode, HEAD_MODES)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise GeoCompError(f"{name} {value!r} does not exist; allowed: {', '.join(allowed)}.")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise GeoCompError(f"target {','.join(bad) or '(none)'} does not exist; allowed: {', '.join(TARGETS)}.")
        if not (0 < self.min_keep <= self.max_keep <= 1):
            raise GeoCompError(f"min_keep and max_keep must satisfy 0 < min_keep <= max_keep <= 1, "
                               f"got {self.min_keep} and {self.max_keep}.")
        if int(self.round_to) != self.round_to or self.round_to < 1:
            raise GeoCompError(f"round_to must be a positive integer, got {self.round_to!r}.")
        if self.refit_damp < 0:
            raise GeoCompError(f"refit_damp must be >= 0, got {self.refit_damp}.")
        if not 0 <= self.refit_shrinkage <= 1:
            raise GeoCompError(f"refit_shrinkage must be in [0, 1], got {self.refit_shrinkage}.")

    @property
    def bias(self) -> bool:
        return "bias" in self.compensation

    @property
    def refit(self) -> bool:
        return "refit" in self.compensation

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return d
