"""Benchmark: one-shot pruning of a causal LM by every criterion at several budgets.

Everything in one run: the unpruned model's held-out perplexity and latency are the
baseline of every row. Calibration text (statistics, Taylor gradients) never overlaps the
evaluation text. Latency is the median forward time at batch 1 × ``latency_tokens``
relative to the unpruned model, runs alternating so machine load hits both; with
``--latency-repeats 0`` it is not measured and every row's ``latency_ratio`` is null.

Rows are the union of one or more sweeps, each a product of budgets × criteria ×
compensations × allocations × targets (``--sweep``), so a main grid and its ablations
share one baseline and one set of statistics.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass

import torch

from ..data import calibration_loader, load_model
from ..errors import GeoCompError
from ..eval.perplexity import latency_ratio, perplexity
from ..geometry import collect_stats
from ..io import write_json
from ..options import EvalOptions, ModelDataOptions, ThreadsOption, option
from ..prune.api import prune, prune_taps, score_groups, taylor_grads
from ..prune.cli import PruneOptions
from ..prune.config import PruneConfig
from ..prune.units import block_params, unit_groups


@dataclass(kw_only=True)
class PruneBenchOptions(ModelDataOptions, PruneOptions, EvalOptions, ThreadsOption):
    """Perplexity, parameters and latency of every criterion and budget."""

    tokens: int = 16384
    eval_tokens: int = 16384
    sparsities: list[float] = option([0.1, 0.2, 0.3, 0.5], "fractions of block parameters to remove", range="[0, 1)")
    criteria: list[str] = option(["magnitude", "random", "wanda", "variance", "taylor"],
                                 "pruning criteria (variance, variance_cond, wanda, taylor, magnitude, random)")
    compensations: list[str] = option(["none", "bias+refit"], "compensations (none, bias, refit, bias+refit)")
    allocations: list[str] = option(["uniform"], "allocations (uniform, global)")
    taylor_batches: int = option(4, "calibration batches for Taylor gradients", range="[1, inf)")
    latency_tokens: int = option(512, "tokens of the batch-1 latency input", range="[1, inf)")
    latency_repeats: int = option(5, "0 skips latency (recorded as null)", range="[0, inf)")
    sweep: list[str] | None = option(None, "rows as BUDGETS:CRITERIA:COMPENSATIONS:ALLOCATIONS[:TARGETS] products "
                                     "(comma lists, targets joined by +), several allowed; replaces "
                                     "--sparsities/--criteria/...", metavar="SPEC")
    output: str = "recipes/results/prune_smollm2_oneshot.json"


def parse_sweep(spec: str, default_targets: str) -> list[tuple[float, str, str, str, str]]:
    """``BUDGETS:CRITERIA:COMPENSATIONS:ALLOCATIONS[:TARGETS]`` (comma lists; targets joined by +) → rows."""
    parts = spec.split(":")
    if len(parts) not in (4, 5) or not all(parts):
        raise GeoCompError(f"sweep {spec!r} must be BUDGETS:CRITERIA:COMPENSATIONS:ALLOCATIONS[:TARGETS], "
                           "e.g. 0.2,0.3:variance,wanda:bias+refit:uniform:mlp+heads.")
    if len(parts) == 4:
        parts.append(default_targets.replace(",", "+"))
    try:
        budgets = [float(b) for b in parts[0].split(",")]
    except ValueError:
        raise GeoCompError(f"sweep {spec!r}: budgets must be numbers, got {parts[0]!r}.") from None
    return list(itertools.product(budgets, *(p.split(",") for p in parts[1:])))


def bench_rows(args) -> list[tuple[float, str, str, str, str]]:
    """Every (budget, criterion, compensation, allocation, targets) of the run, in order, without repeats."""
    if args.sweep:
        rows = [r for spec in args.sweep for r in parse_sweep(spec, args.targets)]
    else:
        rows = list(itertools.product(args.sparsities, args.criteria, args.compensations, args.allocations,
                                      [args.targets.replace(",", "+")]))
    for b, crit, comp, alloc, targets in rows:  # fail before any work on a bad name or budget
        PruneConfig(sparsity=b, criterion=crit, compensation=comp, allocation=alloc, targets=targets)
    return list(dict.fromkeys(rows))


def run_prune_bench(args: PruneBenchOptions) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows_todo = bench_rows(args)
    model, tok = load_model(args.model)
    calib = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size))
    evals = list(calibration_loader(model, tok, args.eval_data, args.eval_tokens, args.block_size, args.batch_size))
    lat_ids = evals[0]["input_ids"].reshape(-1)[: args.latency_tokens].unsqueeze(0)  # (1, latency_tokens)
    all_targets = tuple(t for t in ("mlp", "heads") if any(t in r[4].split("+") for r in rows_todo))
    t = time.time()
    stats = collect_stats(model, calib, prune_taps(model, all_targets))
    grads = None
    if any(r[1] == "taylor" for r in rows_todo):
        grads = taylor_grads(model, calib[: args.taylor_batches], all_targets)
    base_params = block_params(model)
    baseline = {"ppl": perplexity(model, evals), "params": base_params, "stats_seconds": time.time() - t}
    print(f"baseline ppl {baseline['ppl']:.3f}, block params {base_params}, {len(rows_todo)} rows", flush=True)
    rows, scores = [], {}
    for sparsity, criterion, comp, alloc, targets in rows_todo:
        t = time.time()
        cfg = PruneConfig(sparsity=sparsity, criterion=criterion, targets=targets, allocation=alloc,
                          compensation=comp, round_to=args.round_to, head_mode=args.head_mode,
                          min_keep=args.min_keep)
        key = (criterion, cfg.targets)
        score_seconds = 0.0
        if key not in scores:  # scores depend on the unpruned model only: once per criterion and targets
            scores[key] = score_groups(model, unit_groups(model, cfg.targets, args.head_mode), cfg, stats, grads)
            score_seconds = time.time() - t
        pruned = copy.deepcopy(model)
        _, plan = prune(pruned, stats, config=cfg, scores=scores[key])
        ppl = perplexity(pruned, evals)
        params = block_params(pruned)
        row = {"method": f"{criterion}/{comp}/{alloc}/{targets}", "criterion": criterion, "compensation": comp,
               "allocation": alloc, "targets": targets, "budget": sparsity, "sparsity": 1 - params / base_params,
               "params": params, "ppl": ppl, "ppl_ratio": ppl / baseline["ppl"],
               "latency_ratio": latency_ratio(pruned, model, lat_ids, args.latency_repeats),
               "mlp_widths": plan.widths("mlp"), "head_units": plan.widths("heads"),
               "stock_loadable": pruned.config.geocomp_pruning["stock_loadable"],
               "score_seconds": score_seconds, "seconds": time.time() - t}
        rows.append(row)
        lat = "not measured" if row["latency_ratio"] is None else f"x{row['latency_ratio']:.3f}"
        print(f"{row['method']:40s} budget {sparsity:.2f} achieved {row['sparsity']:.4f} ppl {ppl:10.3f} "
              f"({100 * (row['ppl_ratio'] - 1):+.1f}%) latency {lat} {row['seconds']:.0f}s", flush=True)
        del pruned
        write_json(args.output, _result(args, baseline, stats, rows))
    return _result(args, baseline, stats, rows)


def _result(args, baseline, stats, rows) -> dict:
    return {"command": args.command_line, "model": args.model,
            "data": {"calibration": args.data, "calibration_tokens": stats.tokens, "evaluation": args.eval_data,
                     "evaluation_tokens": args.eval_tokens, "block_size": args.block_size,
                     "latency_tokens": args.latency_tokens},
            "latency": (f"median of {args.latency_repeats} alternating runs" if args.latency_repeats else
                        "not measured in this run (--latency-repeats 0): latency_ratio is null"),
            "threads": args.threads, "targets": args.targets, "head_mode": args.head_mode, "round_to": args.round_to,
            "min_keep": args.min_keep, "baseline": baseline, "rows": rows}
