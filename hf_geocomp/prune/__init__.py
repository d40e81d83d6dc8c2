"""Structured pruning of MLP neurons and attention heads by activation geometry.

Scorers (``scorers.py``) rank units, ``plan.allocate`` turns a parameter budget into a
:class:`PrunePlan`, ``surgery.apply_plan`` cuts physically smaller modules (with optional bias
compensation or least-squares refit), ``VarianceWeightedPruningCallback`` does it during
fine-tuning with a ``transformers.Trainer``.
"""

from .api import prune, prune_calibrated, prune_sequential, prune_taps, score_groups, taylor_grads, update_config
from .config import PruneConfig
from .plan import GroupPlan, PrunePlan, allocate
from .scorers import SCORERS, Scorer, get_scorer
from .surgery import apply_masks, apply_plan
from .units import UnitGroup, block_params, unit_groups

__all__ = ["GroupPlan", "PruneConfig", "PrunePlan", "SCORERS", "Scorer", "UnitGroup", "allocate", "apply_masks",
           "apply_plan", "block_params", "get_scorer", "prune", "prune_calibrated", "prune_sequential", "prune_taps", "score_groups", "taylor_grads",
           "unit_groups", "update_config", "VarianceWeightedPruningCallback"]


def __getattr__(name):  # the callback imports transformers' Trainer machinery: load it on demand
    if name == "VarianceWeightedPruningCallback":
        from .callback import VarianceWeightedPruningCallback
        return VarianceWeightedPruningCallback
    raise AttributeError(name)
