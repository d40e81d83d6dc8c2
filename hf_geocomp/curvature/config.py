"""Configuration of curvature-subspace compression."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..arch import LAYERS_HELP, check_layers
from ..errors import GeoCompError
from ..geometry.stats import LABELS

RULES = ("product", "per_factor")


@dataclass
class CurvatureConfig:
    """Which K-FAC directions a layer keeps.

    Args:
        keep: fraction in (0, 1]. ``product``: of the total curvature mass (Σλ)(Σμ), reached by
            the eigen-pairs with the largest λ_i(G)·μ_j(A); ``per_factor``: of each factor's
            eigenvectors (ranks ceil(keep·out) and ceil(keep·in)).
        rule: ``product`` or ``per_factor``.
        modules: module patterns to compress (glob or ``re:``); default every MLP linear.
        layers: only layers inside these blocks (indices, negative from the end, e.g. ``(-8, ..., -1)``, or
            a fraction in (0, 1] of the last blocks); None: every block. Narrows ``modules`` too.
        labels: ``sampled`` (targets drawn from the model's softmax: the true Fisher) or ``gold``.
        seed: seed of the sampled labels.
    """

    keep: float = field(default=0.2, metadata={"help": "fraction kept, in (0, 1]"})
    rule: str = field(default="per_factor", metadata={"help": "product (curvature mass) | per_factor (ranks)"})
    modules: tuple[str, ...] | None = field(default=None, metadata={"help": "module patterns; default MLP linears"})
    layers: tuple[int, ...] | float | None = field(default=None, metadata={"help": "blocks compressed: " + LAYERS_HELP})
    labels: str = field(default="sampled", metadata={"help": "sampled (true Fisher) | gold (empirical Fisher)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled labels"})

    def __post_init__(self):
        if not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise GeoCompError(f"keep must be a fraction in (0, 1], got {self.keep!r}.")
        if self.rule not in RULES:
            raise GeoCompError(f"rule {self.rule!r} does not exist; allowed: {', '.join(RULES)}.")
        if self.labels not in LABELS:
            raise GeoCompError(f"labels {self.labels!r} does not exist; allowed: {', '.join(LABELS)}.")
        if isinstance(self.modules, str):
            self.modules = (self.modules,)
        self.layers = check_layers(self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules) if self.modules else None
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return d
