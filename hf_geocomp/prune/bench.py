"""Benchmark: one-shot pruning of a causal LM by every criterion at several budgets.

Everything in one run: the unpruned model's held-out perplexity and latency are the
baseline of every row. Calibration text (statistics, Taylor gradients) never overlaps the
evaluation text. Latency is the median forward time at batch 1 × ``latency_tokens``
relative to the unpruned model, runs alternating so machine load hits both.
"""

from __future__ import annotations

import copy
import itertools
import time

import torch

from ..data import calibration_loader, load_model
from ..eval.perplexity import latency_ratio, perplexity
from ..geometry import collect_stats
from ..io import write_json
from .api import prune, prune_taps, score_groups, taylor_grads
from .config import PruneConfig
from .units import block_params, unit_groups


def run_prune_bench(args) -> dict:
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    calib = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size))
    evals = list(calibration_loader(model, tok, args.eval_data, args.eval_tokens, args.block_size, args.batch_size))
    lat_ids = evals[0]["input_ids"].reshape(-1)[: args.latency_tokens].unsqueeze(0)  # (1, latency_tokens)
    targets = tuple(args.targets.split(","))
    stats = collect_stats(model, calib, prune_taps(model, targets))
    grads = None
    if "taylor" in args.criteria:
        grads = taylor_grads(model, calib[: args.taylor_batches], targets)
    base_params = block_params(model)
    baseline = {"ppl": perplexity(model, evals), "params": base_params}
    print(f"baseline ppl {baseline['ppl']:.3f}, block params {base_params}", flush=True)
    rows, scores = [], {}
    for sparsity, criterion, comp, alloc in itertools.product(args.sparsities, args.criteria, args.compensations,
                                                            args.allocations):
        t = time.time()
        cfg = PruneConfig(sparsity=sparsity, criterion=criterion, targets=targets, allocation=alloc,
                          compensation=comp, round_to=args.round_to, head_mode=args.head_mode,
                          min_keep=args.min_keep)
        if criterion not in scores:  # scores depend on the unpruned model only: once per criterion
            scores[criterion] = score_groups(model, unit_groups(model, targets, args.head_mode), cfg, stats, grads)
        pruned = copy.deepcopy(model)
        _, plan = prune(pruned, stats, config=cfg, scores=scores[criterion])
        ppl = perplexity(pruned, evals)
        params = block_params(pruned)
        row = {"method": f"{criterion}/{comp}/{alloc}", "criterion": criterion, "compensation": comp,
               "allocation": alloc, "budget": sparsity, "sparsity": 1 - params / base_params, "params": params,
               "ppl": ppl, "ppl_ratio": ppl / baseline["ppl"],
               "latency_ratio": latency_ratio(pruned, model, lat_ids, args.latency_repeats),
               "mlp_widths": plan.widths("mlp"), "head_units": plan.widths("heads"),
               "stock_loadable": pruned.config.geocomp_pruning["stock_loadable"], "seconds": time.time() - t}
        rows.append(row)
        print(f"{row['method']:28s} budget {sparsity:.2f} achieved {row['sparsity']:.4f} ppl {ppl:10.3f} "
              f"({100 * (row['ppl_ratio'] - 1):+.1f}%) latency x{row['latency_ratio']:.3f}", flush=True)
        del pruned
        write_json(args.output, _result(args, baseline, stats, rows))
    return _result(args, baseline, stats, rows)


def _result(args, baseline, stats, rows) -> dict:
    return {"command": args.command_line, "model": args.model,
            "data": {"calibration": args.data, "calibration_tokens": stats.tokens, "evaluation": args.eval_data,
                     "evaluation_tokens": args.eval_tokens, "block_size": args.block_size,
                     "latency_tokens": args.latency_tokens},
            "targets": args.targets, "head_mode": args.head_mode, "round_to": args.round_to,
            "min_keep": args.min_keep, "baseline": baseline, "rows": rows}
