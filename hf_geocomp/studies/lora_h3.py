"""H3 for H2: does SpectralLoRA's effective-rank allocation read the function or the coordinates?

The allocation (rank ∝ Df = tr(C)²/‖C‖²_F of each target module's input covariance, under the
budget of uniform LoRA at rank ``r``) is computed per seed (a calibration subset) under each
control, without training:

* ``plain``   — the model's statistics;
* ``removed`` — every input covariance replaced by I (:func:`hf_geocomp.prune.whitening.whiten_stats`):
  Df becomes the input width, so the allocation follows dimensions alone;
* ``reparam`` — the model reparametrised by function-preserving maps that whiten the inputs as far
  as an exact map allows (:mod:`hf_geocomp.prune.whitening`: per channel through the pre-norms for
  q/k/v and gate/up, per gated-MLP neuron for down_proj, per KV head for o_proj), statistics
  collected afresh on it.

For each control the result gives the ranks, each module's Df, and how far the allocation moved
from ``plain``: the fraction of the parameter budget reassigned (½·Σ|Δrank|·(in + out) / budget)
and the Spearman correlation of the ranks. An allocation rule that read the function would not
move under ``reparam``; Df does, because it is a property of the coordinates an input is written
in. Whether the moved allocation trains differently is a separate (training) question; the
committed H2 runs measured the plain allocation against uniform rank.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass

import torch

from ..data import calibration_loader, load_model
from ..errors import GeoCompError
from ..geometry import collect_stats
from ..io import write_json
from ..options import ModelDataOptions, ThreadsOption, option

CONTROLS = ("plain", "removed", "reparam")


@dataclass(kw_only=True)
class LoraH3Options(ModelDataOptions, ThreadsOption):
    """H3 for H2: SpectralLoRA's effective-rank allocation, plain, with variance removed and after a
    function-preserving whitening of the adapted inputs (hf_geocomp.studies.lora_h3)."""

    tokens: int = 1024
    targets: list[str] = option(["q_proj", "v_proj", "up_proj", "down_proj"], "target module names")
    r: int = option(8, "rank of the reference uniform LoRA; sets the budget", range="[1, inf)")
    controls: list[str] = option(list(CONTROLS), "plain, removed (variance removed), reparam (whitening)",
                                 choices=CONTROLS)
    seeds: int = option(5, "seeds: calibration subsets", range="[1, inf)")
    output: str = "recipes/results/lora_h3_smollm2.json"

    def __post_init__(self):
        super().__post_init__()
        if "plain" not in self.controls:
            raise GeoCompError("controls must include plain: every other allocation is compared with it.")


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties averaged); NaN when either allocation is uniform."""
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # a uniform allocation has no ranking: NaN, said in the docstring
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


def reparametrised(model, calib, stats_taps):
    """A copy of ``model`` with its adapted inputs whitened by exact maps, and the largest logit change."""
    from ..prune.api import prune_taps
    from ..prune.units import unit_groups
    from ..prune.whitening import (check_reparametrisable, max_output_change, norm_maps, reparametrise,
                                   scale_norm_outputs, whitening_maps)

    check_reparametrisable(model, ("mlp",))
    targets = ("mlp", "heads")
    st = collect_stats(model, calib, prune_taps(model, targets) + stats_taps)
    work = copy.deepcopy(model)
    reparametrise(work, unit_groups(work, targets), whitening_maps(model, unit_groups(model, targets), st))
    scale_norm_outputs(work, norm_maps(model, st))
    return work, max_output_change(model, work, {k: v[:1] for k, v in calib[0].items()})


def run_lora_h3(args: LoraH3Options) -> dict:
    from ..lora import SpectralLoraConfig
    from ..lora.allocate import allocate
    from ..lora.model import lora_taps, target_shapes
    from ..prune.whitening import whiten_stats

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    config = SpectralLoraConfig(target_modules=list(args.targets), r=args.r, lora_alpha=2 * args.r)
    model, tok = load_model(args.model)
    shapes = target_shapes(model, config)
    taps = lora_taps(model, config)
    rows = []
    for seed in range(args.seeds):
        calib = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size,
                                        seed=seed))
        t = time.time()
        stats = collect_stats(model, calib, taps)
        plans, record = {}, {}
        for control in args.controls:
            if control == "plain":
                st = stats
            elif control == "removed":
                st = whiten_stats(stats)
            else:
                work, record["max_logit_change"] = reparametrised(model, calib, taps)
                st = collect_stats(work, calib, lora_taps(work, config))
            plans[control] = allocate(st, shapes, rule="effective_rank", r=args.r, lora_alpha=config.lora_alpha)
        plain = plans["plain"]
        for control, plan in plans.items():
            ranks = {m.name: m.rank for m in plan.modules}
            moved = sum(abs(m.rank - p.rank) * (m.in_features + m.out_features)
                        for m, p in zip(plan.modules, plain.modules)) / 2 / plan.budget
            rows.append({"seed": seed, "control": control, "budget": plan.budget, "params": plan.params,
                         "ranks": ranks, "df": {m.name: m.spectrum["df"] for m in plan.modules},
                         "budget_moved_from_plain": moved,
                         "spearman_with_plain": _spearman([m.rank for m in plan.modules],
                                                          [p.rank for p in plain.modules]),
                         **(record if control == "reparam" else {}), "seconds": time.time() - t})
            print(f"seed {seed} {control:8s} budget moved from plain {moved:.3f}  "
                  f"spearman {rows[-1]['spearman_with_plain']:.3f}", flush=True)
        write_json(args.output, _result(args, rows, load))
    return _result(args, rows, load)


def _result(args, rows, load: float) -> dict:
    summary = []
    for control in args.controls:
        mine = [r for r in rows if r["control"] == control]
        moved = [r["budget_moved_from_plain"] for r in mine]
        rho = [r["spearman_with_plain"] for r in mine]
        kinds = {}
        for r in mine:
            for name, k in r["ranks"].items():
                kinds.setdefault(name.rsplit(".", 1)[-1], []).append(k)
        summary.append({"control": control, "seeds": len(mine), "budget_moved_mean": statistics.fmean(moved),
                        "budget_moved_sd": statistics.stdev(moved) if len(moved) > 1 else None,
                        "spearman_mean": statistics.fmean(rho),
                        "mean_rank_by_kind": {k: statistics.fmean(v) for k, v in sorted(kinds.items())}})
    return {"command": args.command_line, "model": args.model, "seeds_done": sorted({r["seed"] for r in rows}),
            "data": {"calibration": args.data, "calibration_tokens": args.tokens,
                     "calibration_subsets": "one seeded block selection per seed"},
            "allocation": {"rule": "effective_rank", "r": args.r, "targets": list(args.targets)},
            "threads": args.threads, "cpus": os.cpu_count(), "load_average_at_start": load,
            "summary": summary, "rows": rows}
