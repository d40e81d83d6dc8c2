"""H1/H3 study: pruning criteria against magnitude and Wanda-sp, plain and under the whitening control.

For every seed (a calibration subset of ``--data``) the same causal LM is pruned one-shot to
each budget by each criterion, with one compensation held equal for every criterion
(compensation is not the hypothesis), under each control of
:mod:`hf_geocomp.prune.whitening`:

* ``plain``   — the criterion reads the model's statistics;
* ``removed`` — the criterion reads statistics with mean 0 and covariance I (variance removed);
  compensation reads the real ones; criteria that read no statistics (magnitude, random,
  taylor) are then the plain rows, copied and marked ``same_as_plain``;
* ``reparam`` — the model is first reparametrised by the function-preserving whitening
  (statistics, gradients and pruning all on the reparametrised model; its dense perplexity
  and largest logit change are recorded per seed). ``bias`` and ``none`` compensation are exactly
  invariant to it; ``refit``'s ridge λ·mean(diag C)·I is not (after whitening every input has
  unit variance, so the ridge is relatively far weaker on the low-variance units), so with
  ``bias+refit`` a reparam row can move through the compensation alone: read it beside the
  ``invariance`` entry (same units removed, different perplexity).

Held-out perplexity (``--eval-data``, never calibrated on) of every row is compared in one
run with the unpruned model. Comparisons pair seeds: the advantage of a criterion over a
baseline is mean over seeds of log ppl(baseline) − log ppl(criterion) (positive: the
criterion is better), with the paired t-test, Wilcoxon, bootstrap interval and d_z of
:func:`hf_geocomp.eval.significance.compare`, and Holm-corrected p-values across every
comparison of the table. ``verdicts`` say per (criterion, baseline, budget) whether a plain
advantage survives each control; ``invariance`` gives per criterion how far the reparametrised
rows moved from the plain ones.

Reading, in the study's terms: an advantage that disappears with the variance removed came
from the activation statistics (statistical structure); one that remains after the
reparametrisation, where an invariant criterion removes the same units while magnitude sees
the new basis, belongs to the function rather than to the coordinates the weights happen to
be written in. A verdict needs both, at ≥ 5 seeds, with the Holm-corrected p below 0.05.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import statistics
import time
import zlib
from dataclasses import dataclass

import torch

from ..data import calibration_loader, load_model
from ..errors import GeoCompError
from ..eval.perplexity import perplexity
from ..eval.significance import compare, holm
from ..geometry import collect_stats
from ..io import check_output, write_json
from ..options import EvalOptions, ModelDataOptions, ThreadsOption, option
from ..prune.api import prune, prune_taps, score_groups, taylor_grads
from ..prune.cli import PruneOptions
from ..prune.config import ALLOCATIONS, PruneConfig
from ..prune.scorers import get_scorer
from ..prune.units import block_params, unit_groups
from ..prune.whitening import (check_reparametrisable, max_output_change, reparametrise, whiten_stats,
                               whitening_maps)
from .resume import check_same_baseline, previous_run

CONTROLS = ("plain", "removed", "reparam")
ALPHA = 0.05


@dataclass(kw_only=True)
class H3Options(ModelDataOptions, EvalOptions, PruneOptions, ThreadsOption):
    """H1/H3: pruning criteria vs magnitude and Wanda-sp over seeds, plain, with variance removed and after a
    function-preserving whitening (hf_geocomp.studies.h3)."""

    tokens: int = 2048
    eval_tokens: int = 2048
    sparsities: list[float] = option([0.2], "fractions of block parameters removed", range="[0, 1)")
    criteria: list[str] = option(["variance", "wanda", "magnitude"],
                                 "criteria (variance, variance_cond, wanda, taylor, magnitude, random)")
    baselines: list[str] = option(["magnitude", "wanda"], "criteria every other is compared with")
    controls: list[str] = option(list(CONTROLS), "plain, removed (variance removed), reparam (whitening)",
                                 choices=CONTROLS)
    compensation: str = option("bias+refit", "held equal for every criterion")
    targets: str = "mlp"  # heads: the V/O whitening; mlp needs a gated MLP for the reparam control
    allocation: str = option("uniform", "uniform or global", choices=ALLOCATIONS)
    seeds: int = option(5, "seeds: calibration subsets", range="[1, inf)")
    taylor_batches: int = option(4, "calibration batches for Taylor gradients", range="[1, inf)")
    output: str | None = option(None, "results JSON (null: recipes/results/prune_h3_<model name>.json)")
    plot: str | None = option(None, "also plot the advantages against budget to this PNG")
    resume: bool = option(False, "continue an unfinished results file of the same settings: keep the seeds it "
                                 "finished, run the others")

    def __post_init__(self):
        super().__post_init__()
        missing = [b for b in self.baselines if b not in self.criteria]
        if missing:
            raise GeoCompError(f"baselines {missing} must also be among the criteria {self.criteria}.")


def _configs(args: H3Options) -> dict:
    """(criterion, budget) → PruneConfig, checked before any model is loaded."""
    return {(c, b): PruneConfig(sparsity=b, criterion=c, targets=args.targets, allocation=args.allocation,
                                compensation=args.compensation, head_mode=args.head_mode, round_to=args.round_to,
                                min_keep=args.min_keep)
            for c in args.criteria for b in args.sparsities}


def default_output(model: str) -> str:
    """``recipes/results/prune_h3_<model name>.json`` (the last path part of a Hub id or folder, lower case)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", model.lower().rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    return f"recipes/results/prune_h3_{slug}.json"


def _settings(args: H3Options) -> dict:
    """Everything a row's number depends on; a resumed file must match it exactly."""
    return {"model": args.model, "data": args.data, "tokens": args.tokens, "eval_data": args.eval_data,
            "eval_tokens": args.eval_tokens, "block_size": args.block_size, "batch_size": args.batch_size,
            "sparsities": list(args.sparsities), "criteria": list(args.criteria), "baselines": list(args.baselines),
            "controls": list(args.controls), "compensation": args.compensation, "targets": args.targets,
            "allocation": args.allocation, "head_mode": args.head_mode, "round_to": args.round_to,
            "min_keep": args.min_keep, "taylor_batches": args.taylor_batches, "seeds": args.seeds}


def _resumed(args: H3Options) -> dict | None:
    """The unfinished results file ``args.output`` to continue (None: nothing there yet), checked against ``args``."""
    previous = previous_run(args.output, _settings(args))
    if previous is not None and set(range(args.seeds)) <= set(previous["seeds_done"]):
        raise GeoCompError(f"cannot resume {args.output}: all {args.seeds} seeds are finished; nothing to run.")
    return previous


def _measure(model, calib, targets, taylor_batches: int, need_grads: bool):
    """(statistics, Taylor gradients or None) of ``model`` on the calibration batches."""
    stats = collect_stats(model, calib, prune_taps(model, targets))
    return stats, taylor_grads(model, calib[:taylor_batches], targets) if need_grads else None


def control_arm(model, control: str, calib, measured: tuple, targets, head_mode: str, measure):
    """(model pruned from, statistics the scorer reads, ``measured`` of that model, record) for one control.

    ``measured`` is ``measure(model)``, e.g. (statistics, gradients) of the unchanged model; for
    ``reparam`` the copy with its whitening folded in is measured afresh, and the record holds the
    largest change of its logits (or outputs) on one calibration block.
    """
    if control not in CONTROLS:
        raise GeoCompError(f"control {control!r} does not exist; allowed: {', '.join(CONTROLS)}.")
    record = {}
    if control == "reparam":
        work = copy.deepcopy(model)
        reparametrise(work, unit_groups(work, targets, head_mode),
                      whitening_maps(model, unit_groups(model, targets, head_mode), measured[0]))
        record["max_logit_change"] = max_output_change(model, work, {k: v[:1] for k, v in calib[0].items()})
        model, measured = work, measure(work)
    return model, whiten_stats(measured[0]) if control == "removed" else measured[0], measured, record


def run_h3(args: H3Options) -> dict:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other jobs may share the cores: recorded, as is the thread count
    configs = _configs(args)
    if args.output is None:  # named after the model, so pointing a recipe at another model is its only change
        args.output = default_output(args.model)
        if not args.resume:
            check_output(args.output, getattr(args, "overwrite", False))
    previous = _resumed(args) if args.resume else None
    targets = next(iter(configs.values())).targets
    model, tok = load_model(args.model)
    if "reparam" in args.controls:
        check_reparametrisable(model, targets)
    evals = list(calibration_loader(model, tok, args.eval_data, args.eval_tokens, args.block_size, args.batch_size))
    base_params = block_params(model)
    baseline = {"ppl": perplexity(model, evals), "params": base_params}
    print(f"baseline ppl {baseline['ppl']:.3f}, block params {base_params}", flush=True)
    rows, arms_info, parts = [], [], []
    check_same_baseline(args.output, previous, baseline["ppl"])
    if previous is not None:
        rows, arms_info, parts = previous["rows"], previous["arms"], previous["parts"]
        print(f"resuming {args.output}: seeds {previous['seeds_done']} finished", flush=True)
    part = {"command": args.command_line, "load_average_at_start": load, "threads": args.threads, "seeds": []}
    parts.append(part)
    for seed in range(args.seeds):
        if any(r["seed"] == seed for r in rows):
            continue
        calib = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size,
                                        seed=seed))
        t = time.time()
        measured = _measure(model, calib, targets, args.taylor_batches, "taylor" in args.criteria)
        seconds = time.time() - t
        for control in args.controls:
            t = time.time()
            work, score_stats, (comp_stats, grads), record = control_arm(
                model, control, calib, measured, targets, args.head_mode,
                lambda m: _measure(m, calib, targets, args.taylor_batches, "taylor" in args.criteria))
            record = {"stats_seconds": time.time() - t if control == "reparam" else seconds, **record}
            if control == "reparam":
                record["dense_ppl_ratio"] = perplexity(work, evals) / baseline["ppl"]
            arms_info.append({"seed": seed, "control": control, **record})
            groups = unit_groups(work, targets, args.head_mode)
            for criterion in args.criteria:
                copied = control == "removed" and not get_scorer(criterion).needs_stats and "plain" in args.controls
                seeded = PruneConfig(**{**configs[criterion, args.sparsities[0]].to_dict(), "seed": seed})
                scores = None if copied else score_groups(work, groups, seeded, score_stats, grads)
                for budget in args.sparsities:
                    t = time.time()
                    if copied:
                        plain = next(r for r in rows if r["seed"] == seed and r["control"] == "plain"
                                     and r["criterion"] == criterion and r["budget"] == budget)
                        rows.append({**plain, "method": f"{criterion}/removed", "control": "removed",
                                     "same_as_plain": True})
                        continue
                    cfg = PruneConfig(**{**configs[criterion, budget].to_dict(), "seed": seed})
                    pruned = copy.deepcopy(work)
                    _, plan = prune(pruned, comp_stats, config=cfg, scores=scores)
                    ppl = perplexity(pruned, evals)
                    params = block_params(pruned)
                    rows.append({"method": f"{criterion}/{control}", "criterion": criterion, "control": control,
                                 "compensation": args.compensation, "budget": budget,
                                 "sparsity": 1 - params / base_params, "params": params, "ppl": ppl,
                                 "ppl_ratio": ppl / baseline["ppl"], "seed": seed, "eval_data": args.eval_data,
                                 "same_as_plain": False, "units_removed": _digest(plan),
                                 "seconds": time.time() - t})
                    del pruned
                    print(f"seed {seed} {control:8s} {criterion:14s} budget {budget:.2f} ppl {ppl:10.3f} "
                          f"({100 * (ppl / baseline['ppl'] - 1):+.1f}%) {time.time() - t:.0f}s", flush=True)
        part["seeds"].append(seed)
        write_json(args.output, _result(args, baseline, rows, arms_info, load, parts))
    result = _result(args, baseline, rows, arms_info, load, parts)
    if args.plot:
        plot_h3(result, args.plot)
    return result


def _digest(plan) -> str:
    """A short fingerprint of which units a plan removes (equal digests: the same units)."""
    removed = [(g.key, g.removed) for g in plan.groups]
    return f"{zlib.crc32(json.dumps(removed).encode()):08x}"


def _log_ppl(rows, criterion, control, budget) -> dict[int, float]:
    return {r["seed"]: math.log(r["ppl"]) for r in rows
            if r["criterion"] == criterion and r["control"] == control and r["budget"] == budget}


def analyse(rows: list[dict], criteria, baselines, controls, budgets) -> dict:
    """Summaries, paired comparisons with Holm-corrected p-values, survival verdicts and invariance."""
    summary = []
    for control in controls:
        for budget in budgets:
            for c in criteria:
                v = [r["ppl"] for r in rows if r["criterion"] == c and r["control"] == control and r["budget"] == budget]
                if v:
                    summary.append({"method": f"{c}/{control}", "criterion": c, "control": control, "budget": budget,
                                    "seeds": len(v), "ppl_mean": statistics.fmean(v),
                                    "ppl_sd": statistics.stdev(v) if len(v) > 1 else None})
    tests = []
    for control in controls:
        for budget in budgets:
            for base in baselines:
                theirs = _log_ppl(rows, base, control, budget)
                for c in criteria:
                    mine = _log_ppl(rows, c, control, budget)
                    seeds = sorted(set(mine) & set(theirs))
                    if c == base or len(seeds) < 2:
                        continue
                    res = compare([theirs[s] for s in seeds], [mine[s] for s in seeds])
                    tests.append({"method": f"{c} vs {base}", "criterion": c, "baseline": base, "control": control,
                                  "budget": budget, "advantage_log_ppl": res.pop("mean_diff"), **res})
    for t, p in zip(tests, holm([t["p_value"] for t in tests])):
        t["p_holm"] = p
        t["significant"] = p is not None and p < ALPHA
    verdicts = []
    for t in (t for t in tests if t["control"] == "plain"):
        v = {"criterion": t["criterion"], "baseline": t["baseline"], "budget": t["budget"],
             "plain_advantage": t["advantage_log_ppl"], "plain_p_holm": t["p_holm"]}
        plain_wins = t["significant"] and t["advantage_log_ppl"] > 0
        for control in (c for c in controls if c != "plain"):
            o = next((x for x in tests if x["control"] == control and x["criterion"] == t["criterion"]
                      and x["baseline"] == t["baseline"] and x["budget"] == t["budget"]), None)
            if o is None:
                continue
            v[f"{control}_advantage"], v[f"{control}_p_holm"] = o["advantage_log_ppl"], o["p_holm"]
            if not plain_wins:
                v[control] = "no plain advantage to test"
            elif o["significant"] and o["advantage_log_ppl"] > 0:
                v[control] = "survives"
            else:
                v[control] = "does not survive"
        verdicts.append(v)
    invariance = []
    if "plain" in controls and "reparam" in controls:
        for budget in budgets:
            for c in criteria:
                a, b = _log_ppl(rows, c, "plain", budget), _log_ppl(rows, c, "reparam", budget)
                seeds = sorted(set(a) & set(b))
                if seeds:
                    d = [b[s] - a[s] for s in seeds]
                    units = {(r["seed"], r["control"]): r["units_removed"] for r in rows
                             if r["criterion"] == c and r["budget"] == budget}
                    invariance.append({"criterion": c, "budget": budget, "seeds": len(seeds),
                                       "mean_log_ppl_change": statistics.fmean(d),
                                       "max_abs_log_ppl_change": max(abs(x) for x in d),
                                       "same_units_seeds": sum(units[s, "plain"] == units[s, "reparam"]
                                                               for s in seeds)})
    return {"summary": summary, "tests": tests, "verdicts": verdicts, "invariance": invariance}


def _result(args, baseline, rows, arms_info, load: float, parts: list[dict]) -> dict:
    done = sorted({r["seed"] for r in rows})
    return {"command": args.command_line, "model": args.model, "settings": _settings(args),
            "seeds_done": done, "complete": len(done) == args.seeds,
            "parts": parts,  # one per run that added seeds (--resume), with its command and machine load
            "data": {"calibration": args.data, "calibration_tokens": args.tokens,
                     "calibration_subsets": "one seeded block selection per seed", "evaluation": args.eval_data,
                     "evaluation_tokens": args.eval_tokens, "block_size": args.block_size},
            "threads": args.threads, "cpus": os.cpu_count(), "load_average_at_start": load, "targets": args.targets, "compensation": args.compensation,
            "allocation": args.allocation, "controls": args.controls, "baselines": args.baselines,
            "advantage": "log ppl(baseline) - log ppl(criterion), paired over seeds; positive: criterion better",
            "alpha": ALPHA, "baseline": baseline, "arms": arms_info, "rows": rows,
            **analyse(rows, args.criteria, args.baselines, args.controls, args.sparsities)}


def plot_h3(result: dict, path: str, xlabel: str = "fraction of block parameters removed",
            effect: str = "advantage_log_ppl",
            ylabel: str = "advantage: log ppl(baseline) − log ppl(criterion)") -> None:
    """The advantage (``effect`` of the tests, 95% t interval) of every criterion over every baseline against budget,
    one panel per control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    controls = result.get("controls") or list(dict.fromkeys(t["control"] for t in result["tests"]))
    labels = len(dict.fromkeys(t["method"] for t in result["tests"] if t["control"] in controls))
    width = max(5.6, 4.2 * len(controls))
    columns = max(1, min(labels, int(width // 2)))
    below = 0.25 * -(-labels // columns) + 0.15  # inches for the legend, below the panels so that it covers no line
    fig, axes = plt.subplots(1, len(controls), figsize=(width, 3.8 + below), sharey=True, squeeze=False)
    legend = {}  # label -> the first line drawn with it
    for ax, control in zip(axes[0], controls):
        tests = [t for t in result["tests"] if t["control"] == control]
        for name in dict.fromkeys(t["method"] for t in tests):
            pts = sorted((t["budget"], t[effect], t["ci_low"], t["ci_high"]) for t in tests
                         if t["method"] == name)
            err = [[p[1] - p[2] if p[2] is not None else 0 for p in pts], [p[3] - p[1] if p[3] is not None else 0
                                                                            for p in pts]]
            line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, marker="o", capsize=2)
            legend.setdefault(name, line)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{control}")
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=columns, fontsize=7, frameon=False)
    fig.suptitle(f"{result['model']}: criterion vs baseline, mean and 95% CI over seeds", fontsize=9)
    fig.tight_layout(rect=(0, below / (3.8 + below), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
