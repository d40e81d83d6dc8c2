"""Model folding: cluster similar MLP neurons or attention heads and merge them (no data needed).

Based on "Forget the Data and Fine-Tuning! Just Fold the Network to Compress" (Wang et al.,
ICLR 2025, arXiv:2502.10216) and "Cut Less, Fold More: Model Compression through the Lens of
Projection Geometry" (arXiv:2602.18116): pruning is an axis-aligned projection of a layer's
units, folding a low-rank projection onto cluster means. ``plan_fold`` clusters (k-means or
agglomerative, seeded) to the same parameter budget pruning uses, ``apply_fold`` merges
(producers → cluster means, consumer → cluster sums) and cuts physically smaller modules with
the pruning surgery, ``repair`` rescales merged units (data-free Fold-AR, or measured).
"""

from .api import fold
from .cluster import agglomerative, kmeans, unit_features
from .config import FoldConfig
from .merge import apply_fold, membership, merge_group
from .plan import FoldGroupPlan, FoldPlan, plan_fold, plan_from_labels
from .repair import data_free_scales, data_scales, fold_ar_scale

__all__ = ["FoldConfig", "FoldGroupPlan", "FoldPlan", "agglomerative", "apply_fold", "data_free_scales",
           "data_scales", "fold", "fold_ar_scale", "kmeans", "membership", "merge_group", "plan_fold",
           "plan_from_labels", "unit_features"]
