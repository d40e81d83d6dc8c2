"""H3 for the KV cache: does the Fisher basis beat PCA through variance or through sensitivity?

For every seed (a calibration subset of ``--data``) the KV statistics of the model, with
gradients, are collected once, and every variant (``fisher-bits``, ``pca-bits``, ...) codes the
cache at every budget under each control of :mod:`hf_geocomp.kv.whitening`:

* ``plain``   — the bases read the model's statistics;
* ``removed`` — the stored keys' and values' second moments are replaced by I (variance removed),
  the Fisher kept: ``pca`` loses all geometry, ``fisher`` keeps the sensitivity alone;
* ``reparam`` — values whitened and key RoPE pairs scaled by maps folded into the weights (the
  model computes the same function: its largest logit change and dense perplexity are recorded
  per seed), then statistics, bases and caches on the reparametrised model.

Continuation perplexity (:func:`hf_geocomp.eval.perplexity.continuation_nll`: context prefilled into
the coded cache, the next tokens scored through it) on held-out windows, all in one run with the
uncompressed cache. Comparisons pair seeds exactly as the pruning study does
(:func:`hf_geocomp.studies.h3.analyse`): advantage = log ppl(baseline) − log ppl(variant), paired
t-test and the rest, Holm over every comparison; ``verdicts`` say whether a plain advantage
survives each control; ``invariance`` how far each variant moved under the reparametrisation
(``units_removed`` is here a fingerprint of the widths allocated per layer and head).

``sensitivity_alone`` sets each variant with its variance removed against each baseline as it is
(the Fisher alone against PCA's variance alone).

Reading: an advantage of ``fisher`` over ``pca`` that survives the variance removal rests on the
sensitivity; one that survives the reparametrisation belongs to the function, not to the
coordinates the keys and values happen to be stored in.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import zlib
from dataclasses import dataclass

import torch

from ..data import calibration_loader, load_corpus, load_model, token_blocks
from ..errors import GeoCompError
from ..eval.perplexity import continuation_nll
from ..eval.significance import compare, holm
from ..io import write_json
from ..options import EvalOptions, ModelDataOptions, ThreadsOption, option
from .h3 import analyse, plot_h3
from .kv_bench import DTYPES, ContinuationOptions, parse_variant

CONTROLS = ("plain", "removed", "reparam")


@dataclass(kw_only=True)
class KVH3Options(ModelDataOptions, EvalOptions, ContinuationOptions, ThreadsOption):
    """H3 for KV bases: Fisher vs PCA over seeds, plain, with variance removed and after a function-preserving
    whitening of keys and values (hf_geocomp.studies.kv_h3)."""

    dtype: str = option("float32", "model and cache dtype (float32: the reparametrisation is exact to rounding)",
                        choices=DTYPES)
    budgets: list[float] = option([0.125, 0.0625], "byte budgets: fractions of the uncompressed cache in the model "
                                  "dtype (float32 0.125 = 4 bits per element)", range="(0, 1)")
    variants: list[str] = option(["fisher-bits", "pca-bits"], "coded caches as <basis>-<bits|rank>")
    baselines: list[str] = option(["pca-bits"], "variants every other is compared with")
    controls: list[str] = option(list(CONTROLS), "plain, removed (variance removed), reparam (whitening)",
                                 choices=CONTROLS)
    group_size: int = option(64, "latent components per float16 scale", range="[1, inf)")
    sink_tokens: int = option(4, "first tokens kept exact", range="[0, inf)")
    seeds: int = option(5, "seeds: calibration subsets", range="[1, inf)")
    output: str = "recipes/results/kv_h3_smollm2.json"
    plot: str | None = option(None, "also plot the advantages against budget to this PNG")

    def __post_init__(self):
        super().__post_init__()
        for v in self.variants:
            if parse_variant(v)["refined"]:
                raise GeoCompError(f"variant {v!r}: refined caches are not part of this study.")
        missing = [b for b in self.baselines if b not in self.variants]
        if missing:
            raise GeoCompError(f"baselines {missing} must also be among the variants {self.variants}.")


def _digest(plan) -> str:
    """A short fingerprint of the widths a plan allocates per layer and head (equal: the same allocation)."""
    widths = {k: sorted((str(bits), len(cols)) for bits, cols in g) for k, g in sorted(plan.groups.items())}
    return f"{zlib.crc32(json.dumps(widths).encode()):08x}"


def control_model(model, control: str, stats, calib, probe):
    """(model, statistics the bases read, record) of one control; ``reparam`` measures a reparametrised copy."""
    from ..kv import collect_kv_stats
    from ..kv.whitening import kv_whitening_maps, remove_kv_variance, reparametrise_kv
    from ..prune.whitening import max_output_change

    if control == "plain":
        return model, stats, {}
    if control == "removed":
        return model, remove_kv_variance(model, stats), {}
    t = time.time()
    work = reparametrise_kv(copy.deepcopy(model), kv_whitening_maps(model, stats))
    change = max_output_change(model, work, {"input_ids": probe})
    return work, collect_kv_stats(work, calib, "fisher"), {"max_logit_change": change,
                                                          "stats_seconds": time.time() - t}


def run_kv_h3(args: KVH3Options) -> dict:
    from ..kv import build_plan, collect_kv_stats
    from ..kv.config import KVConfig
    from ..kv.whitening import check_kv_reparametrisable

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    parsed = {v: parse_variant(v) for v in args.variants}
    configs = {(v, b): KVConfig(budget=b, method=p["method"], bits=p["bits"], rope=p["rope"],
                                group_size=args.group_size, sink_tokens=args.sink_tokens,
                                reference_tokens=args.prefill)
               for v, p in parsed.items() for b in args.budgets}  # bad settings fail before the model loads
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    if "reparam" in args.controls:
        check_kv_reparametrisable(model)
    blocks = token_blocks(tok, load_corpus(args.eval_data), args.prefill + args.score,
                          max_tokens=args.windows * (args.prefill + args.score), model=model)
    windows = torch.stack([b["input_ids"] for b in blocks])[: args.windows]
    dense = lambda m: math.exp(continuation_nll(m, windows, args.prefill, lambda: _dynamic(m))[0])  # noqa: E731
    baseline = {"ppl": dense(model)}
    print(f"uncompressed cache: continuation ppl {baseline['ppl']:.4f}", flush=True)
    rows, arms = [], []
    for seed in range(args.seeds):
        calib = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size,
                                        seed=seed))
        t = time.time()
        stats = collect_kv_stats(model, calib, "fisher")
        seconds = time.time() - t
        for control in args.controls:
            work, st, record = control_model(model, control, stats, calib, calib[0]["input_ids"][:1])
            record = {"seed": seed, "control": control, "stats_seconds": seconds, **record}
            if control == "reparam":
                record["dense_ppl_ratio"] = dense(work) / baseline["ppl"]
            arms.append(record)
            for (variant, budget), cfg in configs.items():
                t = time.time()
                plan = build_plan(work, st, cfg)
                nll, n, nbytes = continuation_nll(work, windows, args.prefill, lambda: plan.cache(work))
                ppl = math.exp(nll)
                rows.append({"method": f"{variant}/{control}", "criterion": variant, "control": control,
                             "budget": budget, "ppl": ppl, "ppl_ratio": ppl / baseline["ppl"], "seed": seed,
                             "plan_bytes_ratio": plan.ratio, "units_removed": _digest(plan), "tokens": n,
                             "seconds": time.time() - t})
                print(f"seed {seed} {control:8s} {variant:12s} budget {budget:.4f} ppl {ppl:9.4f} "
                      f"({100 * (ppl / baseline['ppl'] - 1):+.2f}%) {time.time() - t:.0f}s", flush=True)
        write_json(args.output, _result(args, baseline, rows, arms, load))
    result = _result(args, baseline, rows, arms, load)
    if args.plot:
        plot_h3(result, args.plot, xlabel="cache bytes / uncompressed cache bytes")
    return result


def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _result(args, baseline, rows, arms, load: float) -> dict:
    done = sorted({r["seed"] for r in rows})
    return {"command": args.command_line, "model": args.model, "dtype": args.dtype, "seeds_done": done,
            "complete": len(done) == args.seeds,
            "data": {"calibration": args.data, "calibration_tokens": args.tokens,
                     "calibration_subsets": "one seeded block selection per seed", "evaluation": args.eval_data,
                     "windows": args.windows, "prefill": args.prefill, "score": args.score},
            "threads": args.threads, "cpus": os.cpu_count(), "load_average_at_start": load,
            "controls": args.controls, "baselines": args.baselines,
            "advantage": "log ppl(baseline) - log ppl(variant), continuation perplexity paired over seeds; "
                         "positive: the variant is better",
            "baseline": baseline, "arms": arms, "rows": rows,
            **analyse(rows, args.variants, args.baselines, args.controls, args.budgets),
            "sensitivity_alone": _sensitivity_alone(rows, args)}


def _sensitivity_alone(rows: list[dict], args) -> list[dict]:
    """Each variant with the variance removed against each baseline as it is (e.g. the Fisher alone against
    PCA's variance alone), paired over seeds, Holm within this list."""
    if not {"plain", "removed"} <= set(args.controls):
        return []
    out = []
    for budget in args.budgets:
        for base in args.baselines:
            theirs = {r["seed"]: math.log(r["ppl"]) for r in rows
                      if r["criterion"] == base and r["control"] == "plain" and r["budget"] == budget}
            for v in (v for v in args.variants if v != base):
                mine = {r["seed"]: math.log(r["ppl"]) for r in rows
                        if r["criterion"] == v and r["control"] == "removed" and r["budget"] == budget}
                seeds = sorted(set(mine) & set(theirs))
                if len(seeds) >= 2:
                    res = compare([theirs[s] for s in seeds], [mine[s] for s in seeds])
                    out.append({"method": f"{v}/removed vs {base}/plain", "budget": budget,
                                "advantage_log_ppl": res.pop("mean_diff"), **res})
    for t, p in zip(out, holm([t["p_value"] for t in out])):
        t["p_holm"] = p
    return out
