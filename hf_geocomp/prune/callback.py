"""Prune during fine-tuning: a ``TrainerCallback`` that masks, then removes, low-scoring units.

Statistics come from the training forward passes themselves (hooks of the shared engine, no
extra passes); at scheduled optimizer steps the sparsity grows toward the target along a
cubic (Zhu & Gupta, arXiv:1710.01878) or linear schedule; masks are re-applied after every
optimizer step; at the end of training the masked units are physically removed, so the
model the Trainer saves is the small one. With several processes the statistics are summed
first, so every rank chooses the same units.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from .. import arch
from ..errors import GeoCompError
from ..geometry import StatsCollector
from .api import prune_taps, score_groups, update_config
from .config import PruneConfig
from .plan import allocate
from .surgery import apply_masks, apply_plan
from .units import block_params, unit_groups

SCHEDULES = ("cubic", "linear")


class VarianceWeightedPruningCallback(TrainerCallback):
    """Args:
        target_sparsity: fraction of block parameters removed by the end of training.
        criterion, targets, allocation, head_mode, min_keep, round_to: as in :class:`PruneConfig`.
        schedule: ``cubic`` (fast early, gentle late) or ``linear``.
        start, end: fractions of the training steps where masking begins and reaches the target.
        update_every: optimizer steps between mask updates (default: a tenth of the ramp).
        compensation: applied at every mask update to the consumers' kept weights, from the
            statistics of the training passes since the previous update (``refit`` needs no new
            parameters; ``bias`` may add biases, which then stay fixed). The final physical
            removal is exact: the removed units are already zero.
    """

    def __init__(self, target_sparsity: float = 0.2, criterion: str = "variance", targets=("mlp", "heads"),
                 allocation: str = "uniform", schedule: str = "cubic", start: float = 0.0, end: float = 0.7,
                 update_every: int | None = None, compensation: str = "none", **config):
        self.config = PruneConfig(sparsity=target_sparsity, criterion=criterion, targets=targets,
                                  allocation=allocation, compensation=compensation, **config)
        if schedule not in SCHEDULES:
            raise GeoCompError(f"schedule {schedule!r} does not exist; allowed: {', '.join(SCHEDULES)}.")
        if not (0 <= start < end <= 1):
            raise GeoCompError(f"start and end must satisfy 0 <= start < end <= 1, got {start} and {end}.")
        if update_every is not None and update_every < 1:
            raise GeoCompError(f"update_every must be a positive number of steps, got {update_every}.")
        self.schedule, self.start, self.end, self.update_every = schedule, start, end, update_every
        # ---- state (set during training) ----
        self.plan = None  # current PrunePlan (masks), then the final one
        self.history: list[dict] = []  # one entry per mask update
        self._model = self._collector = self._groups = self._grads = None
        self._active = False  # between on_train_begin and on_train_end
        self._total = self._steps = None

    # ---- schedule ----------------------------------------------------------------------------
    def sparsity_at(self, step: int) -> float:
        t0, t1 = self._steps
        p = min(1.0, max(0.0, (step - t0) / max(1, t1 - t0)))
        shape = 1 - (1 - p) ** 3 if self.schedule == "cubic" else p
        return self.config.sparsity * shape

    def _is_update(self, step: int) -> bool:
        t0, t1 = self._steps
        return t0 < step <= t1 and ((step - t0) % self.update_every == 0 or step == t1)

    # ---- callbacks -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        self._groups = unit_groups(model, self.config.targets, self.config.head_mode)
        self._total = block_params(model)
        t0, t1 = int(self.start * state.max_steps), max(1, int(self.end * state.max_steps))
        self._steps = (t0, max(t0 + 1, t1))
        if self.update_every is None:
            self.update_every = max(1, (self._steps[1] - t0) // 10)
        taps = prune_taps(model, self.config.targets, criteria=[self.config.criterion],
                          compensation=self.config.compensation, head_mode=self.config.head_mode)
        self._collector = StatsCollector(model, taps, training_only=True) if taps else None  # only what it reads
        if self._collector is not None:
            self._collector.__enter__()
        self._active = True
        if self.config.criterion == "taylor":
            self._grads = {n: torch.zeros_like(arch.linear_weight(model.get_submodule(n)), dtype=torch.float64)
                           for g in self._groups for n in (g.consumer, *g.producers)}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._grads is not None:  # accumulated (and, under DDP, already averaged) gradients
            with torch.no_grad():
                for n, acc in self._grads.items():
                    m = self._model.get_submodule(n)
                    acc += (arch.linear_weight(m) * arch.linear_weight_grad(m)).double()

    def on_step_end(self, args, state, control, **kwargs):
        if self._is_update(state.global_step):
            self._update(self.sparsity_at(state.global_step), state.global_step)
        if self.plan is not None:
            apply_masks(self._model, self._groups, self.plan)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._active:
            return
        try:
            if self.plan is None or self.plan.config["sparsity"] < self.config.sparsity:
                self._update(self.config.sparsity, state.global_step)
            apply_plan(self._model, self._groups, self.plan)
            update_config(self._model, self.plan)
        finally:
            if self._collector is not None:
                self._collector.remove()
            self._collector, self._active = None, False
        if state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "prune_plan.json"), "w") as f:
                json.dump({**self.plan.to_dict(), "history": self.history}, f, indent=1)

    # ---- internals -----------------------------------------------------------------------------
    def _reduced_stats(self):
        stats = self._collector.stats.clone().reduce_()  # identical on every rank
        if stats.tokens == 0:
            raise GeoCompError("the pruning callback saw no training tokens before a mask update; start later.")
        return stats

    def _update(self, sparsity: float, step: int) -> None:
        cfg = PruneConfig(**{**self.config.to_dict(), "sparsity": sparsity})
        stats = self._reduced_stats() if self._collector is not None else None  # collected only when read
        forced = {gp.key: set(gp.removed) for gp in self.plan.groups} if self.plan is not None else None
        scores = score_groups(self._model, self._groups, cfg, stats, self._grads)
        layers = arch.layer_indices(self._model, cfg.layers)
        self.plan = allocate(self._groups, scores, cfg, self._total, forced, layers)
        apply_masks(self._model, self._groups, self.plan, stats, cfg.compensation, cfg.refit_damp,
                    cfg.refit_shrinkage)
        self.history.append({"step": step, "sparsity": sparsity, "achieved": self.plan.achieved_sparsity,
                             "tokens": int(stats.tokens) if stats is not None else None})
        if self._collector is not None:  # start afresh: later scores see the masked model's activations
            old = self._collector.stats
            self._collector.stats = type(old)(taps=old.taps, aliases=old.aliases, meta=old.meta)
        if self._grads is not None:
            for acc in self._grads.values():
                acc.zero_()
