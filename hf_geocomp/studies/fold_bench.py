"""Benchmark: folding vs pruning at the same fraction of block parameters, over seeds.

Every row of one run shares the unfolded model's held-out perplexity as its baseline.
Methods (``--methods``):

* ``fold:<repair>[:<placement>[:<cluster method>]]`` — data-free clustering of MLP units
  (``repair`` none, data_free (Fold-AR) or data; ``placement`` auto, consumer, gate or
  producers; ``cluster method`` kmeans or agglomerative, default ``--cluster-method``). The
  k-means seed is the run's seed; agglomerative (Ward) clustering has no seed, so it is
  clustered once per budget; ``data`` repair reads the seed's calibration subset.
* ``prune:<criterion>:<compensation>`` — one-shot structured pruning (variance, wanda,
  magnitude...; none, bias+refit...). Each seed draws its own calibration subset, so
  data-driven rows vary with the seed; a row that reads no data (magnitude/none) is computed
  once and repeated per seed, marked ``deterministic`` (so is data-free agglomerative folding).

Summaries give mean ± sd per (method, budget) and paired t-tests over seeds (on log
perplexity) of every fold method against every prune method at that budget.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch

from ..data import calibration_loader, load_model
from ..errors import GeoCompError
from ..eval.perplexity import perplexity
from ..fold import FoldConfig, fold, plan_fold
from ..fold.config import REPAIR_AT, REPAIRS
from ..geometry import collect_stats
from ..io import resolved_args, write_json
from ..options import EvalOptions, ModelDataOptions, ThreadsOption, option
from ..prune import PruneConfig, block_params, prune, prune_taps, score_groups, unit_groups


def parse_method(spec: str) -> dict:
    """``fold:<repair>[:<placement>[:<cluster method>]]`` or ``prune:<criterion>:<compensation>`` → a dict (checked)."""
    parts = spec.split(":")
    if parts[0] == "fold" and len(parts) in (2, 3, 4):
        placement = parts[2] if len(parts) >= 3 and parts[2] else "auto"
        method = parts[3] if len(parts) == 4 else None
        FoldConfig(repair=parts[1], repair_at=placement, method=method or "kmeans")
        return {"family": "fold", "repair": parts[1], "repair_at": placement, "cluster_method": method}
    if parts[0] == "prune" and len(parts) == 3:
        PruneConfig(criterion=parts[1], compensation=parts[2])
        return {"family": "prune", "criterion": parts[1], "compensation": parts[2]}
    raise GeoCompError(f"method {spec!r} must be fold:<repair>[:<placement>] (repairs {', '.join(REPAIRS)}; "
                       f"placements {', '.join(REPAIR_AT)}) or prune:<criterion>:<compensation>.")


def _deterministic(m: dict, args) -> bool:
    """Rows that read neither data nor the seed: the same model every seed."""
    if _needs_data(m):
        return False
    return m["family"] == "prune" or (m["cluster_method"] or args.cluster_method) == "agglomerative"


def _needs_data(m: dict) -> bool:
    return (m["family"] == "fold" and m["repair"] == "data") or (
        m["family"] == "prune" and (m["criterion"] not in ("magnitude", "random") or m["compensation"] != "none"))


@dataclass(kw_only=True)
class FoldBenchOptions(ModelDataOptions, EvalOptions, ThreadsOption):
    """Folding vs variance / Wanda-sp / L1 pruning at the same block budget."""

    sparsities: list[float] = option([0.1, 0.2, 0.3, 0.5], "fractions of block parameters removed or folded away",
                                     range="[0, 1)")
    methods: list[str] = option([
        "fold:none", "fold:data_free", "fold:data", "prune:variance:none", "prune:variance:bias+refit",
        "prune:wanda:none", "prune:wanda:bias+refit", "prune:magnitude:none", "prune:magnitude:bias+refit"],
        "fold:<repair>[:<placement>] and prune:<criterion>:<compensation> (see hf_geocomp.studies.fold_bench)")
    seeds: int = option(5, "seeds: clustering seed and calibration subset", range="[1, inf)")
    allocation: str = option("uniform", "uniform or global")
    cluster_method: str = option("kmeans", "kmeans or agglomerative")
    iters: int = option(20, "Lloyd iterations of k-means", range="[1, inf)")
    output: str = "recipes/results/fold_smollm2.json"
    plot: str | None = option(None, "also plot perplexity against budget to this PNG")


def run_fold_bench(args: FoldBenchOptions) -> dict:
    torch.set_num_threads(args.threads)
    methods = {spec: parse_method(spec) for spec in args.methods}  # fail before loading anything
    for b in args.sparsities:
        FoldConfig(sparsity=b, allocation=args.allocation, method=args.cluster_method)
    if args.seeds < 1:
        raise GeoCompError(f"seeds must be at least 1, got {args.seeds}.")
    model, tok = load_model(args.model)
    targets = ("mlp",)
    evals = list(calibration_loader(model, tok, args.eval_data, args.eval_tokens, args.block_size, args.batch_size))
    base_params = block_params(model)
    t = time.time()
    baseline = {"ppl": perplexity(model, evals), "params": base_params, "seconds": time.time() - t}
    print(f"baseline ppl {baseline['ppl']:.3f}, block params {base_params}", flush=True)
    rows, fixed, fixed_plans = [], {}, {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        calib = stats = None
        if any(_needs_data(m) for m in methods.values()):
            t = time.time()
            calib = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size,
                                            seed=seed))
            stats = collect_stats(model, calib, prune_taps(model, targets))
            print(f"seed {seed}: statistics of {stats.tokens} calibration tokens in {time.time() - t:.0f}s", flush=True)
        scores = {}
        for budget in args.sparsities:
            plans = {}  # cluster method → (plan, seconds): one clustering per (seed, budget) serves every repair
            for spec, m in methods.items():
                t = time.time()
                key = (spec, budget)
                if key in fixed:  # reads neither data nor seed: the same model every seed
                    rows.append({**fixed[key], "seed": seed})
                    continue
                work = copy.deepcopy(model)
                plan_seconds = None
                if m["family"] == "fold":
                    cm = m["cluster_method"] or args.cluster_method
                    cfg = FoldConfig(sparsity=budget, targets=targets, allocation=args.allocation, method=cm,
                                     repair=m["repair"], repair_at=m["repair_at"], iters=args.iters, seed=seed)
                    if cm not in plans:
                        if cm == "agglomerative" and (cm, budget) in fixed_plans:
                            plans[cm] = fixed_plans[(cm, budget)]
                        else:
                            plans[cm] = (plan_fold(model, cfg), time.time() - t)
                            if cm == "agglomerative":
                                fixed_plans[(cm, budget)] = plans[cm]
                    plan, plan_seconds = plans[cm]
                    fold(work, plan=plan, config=cfg, batches=calib, stats=stats)
                else:
                    cfg = PruneConfig(sparsity=budget, criterion=m["criterion"], targets=targets,
                                      allocation=args.allocation, compensation=m["compensation"], seed=seed)
                    if m["criterion"] not in scores:
                        scores[m["criterion"]] = score_groups(model, unit_groups(model, targets), cfg, stats)
                    prune(work, stats, config=cfg, scores=scores[m["criterion"]])
                ppl = perplexity(work, evals)
                params = block_params(work)
                row = {"method": spec, **m, "budget": budget, "sparsity": 1 - params / base_params, "params": params,
                       "params_ratio": params / base_params, "ppl": ppl, "ppl_ratio": ppl / baseline["ppl"],
                       "seed": seed, "uses_data": _needs_data(m), "deterministic": _deterministic(m, args), "mlp_widths": work.config.geocomp_pruning["mlp_widths"],
                       "cluster_seconds": plan_seconds,
                       "seconds": time.time() - t}
                if row["deterministic"]:
                    fixed[key] = {k: v for k, v in row.items() if k != "seed"}
                rows.append(row)
                print(f"seed {seed} {spec:28s} budget {budget:.2f} achieved {row['sparsity']:.4f} ppl {ppl:10.3f} "
                      f"({100 * (row['ppl_ratio'] - 1):+.1f}%) {row['seconds']:.0f}s", flush=True)
                del work
            write_json(args.output, _result(args, baseline, rows))
    result = _result(args, baseline, rows)
    write_json(args.output, result)
    if args.plot:
        plot_fold(result, args.plot)
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± sd per (method, budget), and paired t-tests (log ppl, over seeds) of fold vs prune rows."""
    from scipy.stats import ttest_rel

    by: dict[tuple, dict[int, float]] = {}
    for r in rows:
        by.setdefault((r["method"], r["budget"]), {})[r["seed"]] = r["ppl"]
    out = []
    for (method, budget), per_seed in by.items():
        v = list(per_seed.values())
        s = {"method": method, "budget": budget, "seeds": len(v), "ppl_mean": statistics.fmean(v),
             "ppl_sd": statistics.stdev(v) if len(v) > 1 else 0.0}
        if method.startswith("fold"):
            for (other, b2), theirs in by.items():
                if b2 != budget or not other.startswith("prune"):
                    continue
                seeds = sorted(set(per_seed) & set(theirs))
                diff = [math.log(per_seed[k]) - math.log(theirs[k]) for k in seeds]
                s[f"diff_vs_{other}"] = statistics.fmean(diff) if diff else None  # mean log-ppl difference
                s[f"p_vs_{other}"] = (float(ttest_rel([math.log(per_seed[k]) for k in seeds],
                                                      [math.log(theirs[k]) for k in seeds]).pvalue)
                                      if len(seeds) > 1 and any(diff) and len(set(diff)) > 1 else None)
        out.append(s)
    return out


def _result(args, baseline, rows) -> dict:
    return {"command": args.command_line, "model": args.model,
            "data": {"calibration": args.data, "calibration_tokens": args.tokens,
                     "calibration_subsets": "one seeded block selection per seed", "evaluation": args.eval_data,
                     "evaluation_tokens": args.eval_tokens, "block_size": args.block_size},
            "targets": "mlp", "allocation": args.allocation, "cluster_method": args.cluster_method,
            "threads": args.threads, "note": "run on a shared 2-core machine, other jobs used the cores",
            "args": resolved_args(args), "baseline": baseline, "rows": rows, "summary": summarize(rows)}


def plot_fold(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(s["method"] for s in result["summary"]))
    for m in methods:
        pts = sorted((s["budget"], s["ppl_mean"], s["ppl_sd"]) for s in result["summary"] if s["method"] == m)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o" if
                    m.startswith("fold") else "s", ls="-" if m.startswith("fold") else "--", label=m, capsize=2)
    ax.axhline(result["baseline"]["ppl"], color="k", lw=0.8, label="unpruned")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of block parameters removed (MLP units)")
    ax.set_ylabel("held-out perplexity (mean ± sd over seeds)")
    ax.set_title(f"{result['model']}: folding vs pruning ({result['data']['evaluation']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
