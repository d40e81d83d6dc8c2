"""Cross-domain benchmark: calibrate on one domain (or a mix), evaluate on every domain, in one run.

Users calibrate on generic text and serve their own, so a calibrated method is judged off its
calibration domain beside the calibration-free baselines of the same run (docs/design.md,
"How we measure"): magnitude pruning and transformers' ``QuantizedCache``. Domains are offline
text sources with disjoint calibration and evaluation splits (plays by work, documentation
topics by name, standard-library source files by file). Calibration sets: each domain alone,
the mix of all domains (the default, :data:`hf_geocomp.data.DEFAULT_CALIBRATION`), and for
every domain B the mix without B, so that every domain is also measured *off* a mix.

Rows (one per method × calibration × evaluation domain) give perplexity ratios to the
uncompressed model on that domain: pruning by teacher-forced perplexity of held-out blocks,
KV caches by continuation perplexity (prefill into the cache, score the next tokens through it).
``summary`` holds, per domain, what the targets of the robustness work compare.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass

import torch

from ..data import block_bos, load_config, load_corpus, load_model, model_max_length, token_blocks
from ..errors import GeoCompError
from ..eval.perplexity import continuation_nll, perplexity
from ..fold import fold
from ..geometry import collect_stats
from ..io import write_json
from ..kv import KVConfig, build_plan, collect_kv_stats
from ..options import ModelOptions, ThreadsOption, option
from ..prune import PruneConfig, prune, prune_taps
from .kv_bench import DTYPES, ContinuationOptions, KVCodecOptions, default_of, quant_baselines

# name → (calibration source, evaluation source): disjoint splits of one kind of text
DOMAINS = {
    "shakespeare": ("shakespeare:calibration", "shakespeare:evaluation"),
    "pydoc": ("pydoc:calibration", "pydoc:evaluation"),
    "pystdlib": ("pystdlib:calibration", "pystdlib:evaluation"),
}


def parse_domains(specs: list[str]) -> dict[str, tuple[str, str]]:
    """``name`` (one of :data:`DOMAINS`) or ``name=CALIBRATION|EVALUATION`` sources → {name: (calib, eval)}."""
    out = {}
    for spec in specs:
        name, sep, sources = spec.partition("=")
        if sep:
            calib, bar, evaluation = sources.partition("|")
            if not (bar and calib and evaluation):
                raise GeoCompError(f"domain {spec!r} must be NAME=CALIBRATION|EVALUATION sources.")
            out[name] = (calib, evaluation)
        elif name in DOMAINS:
            out[name] = DOMAINS[name]
        else:
            raise GeoCompError(f"domain {name!r} is not one of {', '.join(DOMAINS)} (or NAME=CALIBRATION|EVALUATION).")
    if len(out) < 2:
        raise GeoCompError("a cross-domain matrix needs at least two domains.")
    return out


def calibration_sets(domains) -> dict[str, list[str]]:
    """Each domain alone, the mix of all but one (``mix-no-<domain>``), then the mix of all (run in this order,
    results written after each, so the in-domain and off-mix rows the targets compare come first)."""
    sets = {d: [d] for d in domains}
    if len(domains) > 2:
        for d in domains:
            sets[f"mix-no-{d}"] = [o for o in domains if o != d]
    sets["mix"] = list(domains)
    return sets


def _mix(blocks: dict[str, list], parts: list[str], seed: int) -> list:
    """An equal share of each part's calibration blocks (the same total as one domain alone)."""
    n = len(next(iter(blocks.values())))
    share = -(-n // len(parts))
    out = []
    for i, part in enumerate(parts):
        idx = list(range(len(blocks[part])))
        random.Random(seed + i).shuffle(idx)
        out += [blocks[part][j] for j in sorted(idx[:share])]
    return out


def _batches(rows: list, batch_size: int) -> list[dict]:
    return [{k: torch.stack([r[k] for r in rows[i: i + batch_size]]) for k in ("input_ids", "attention_mask")}
            for i in range(0, len(rows), batch_size)]


def _prune_variants(args, robust: bool) -> list[tuple[str, str, dict]]:
    """(name, criterion, prune options): every criterion with the run's compensation; on the robustness
    calibrations also the first criterion with other compensations and with a stronger refit ridge."""
    out = [(f"{c}/{args.compensation}", c, {"compensation": args.compensation}) for c in args.criteria]
    if robust:
        crit = args.criteria[0]
        out += [(f"{crit}/{comp}", crit, {"compensation": comp}) for comp in args.robust_compensations]
        out += [(f"{crit}/{args.compensation}-damp{d:g}", crit, {"compensation": args.compensation, "refit_damp": d})
                for d in args.refit_damps]
        out += [(f"{crit}/{args.compensation}-shrink{a:g}", crit, {"compensation": args.compensation,
                                                                   "refit_shrinkage": a})
                for a in args.refit_shrinkages]
    return out


def _kv_variants(args) -> list[tuple[str, dict]]:
    """(name, KVConfig fields) of the coded caches: the default, then the robustness variants."""
    out = [("geocomp-fisher-bits", {})]
    for alpha in args.shrinkage:
        out.append((f"geocomp-fisher-bits-shrink{alpha:g}", {"shrinkage": alpha}))
    for floor in args.min_bits:
        out.append((f"geocomp-fisher-bits-floor{floor}", {"min_bits": floor}))
    return out


@dataclass(kw_only=True)
class CrossDomainOptions(ModelOptions, KVCodecOptions, ContinuationOptions, ThreadsOption):
    """Calibrate on one domain or a mix, evaluate on every domain: pruning vs magnitude, coded KV cache vs
    QuantizedCache."""

    domains: list[str] = option(["shakespeare", "pydoc", "pystdlib"],
                                "shakespeare, pydoc, pystdlib or NAME=CALIBRATION|EVALUATION sources")
    tokens: int = option(4096, "calibration tokens per calibration set", range="[1, inf)")
    eval_tokens: int = option(4096, "held-out tokens per domain", range="[1, inf)")
    block_size: int = option(256, "tokens per block", range="[1, inf)")
    batch_size: int = option(8, "blocks per forward pass", range="[1, inf)")
    seed: int = option(0, "seed of the share each mix takes of a domain")
    calibrations: list[str] | None = option(None, "only these calibration sets (domains, mix-no-<domain>, mix; "
                                            "null: all)", nargs="*")
    sparsity: float = option(0.2, "pruned fraction of block parameters", range="[0, 1)")
    targets: str = option("mlp", "pruned units: mlp, heads or mlp+heads")
    criteria: list[str] = option(["variance", "wanda"], "calibrated criteria; magnitude without compensation always "
                                 "runs as the calibration-free baseline")
    compensation: str = option("bias+refit", "compensation of calibrated rows")
    fold_repairs: list[str] = option([], "folding arms at the same sparsity (k-means, seed 0): data (repair "
                                     "measured on each calibration set) and the calibration-free none, data_free "
                                     "(once per domain)", nargs="*", choices=("none", "data_free", "data"))
    budgets: list[float] = option([0.25, 0.125], "KV byte budgets (none: no KV rows, a pruning-only matrix)",
                                  nargs="*")
    kv_dtype: str = option("bfloat16", "KV model dtype", choices=DTYPES)
    windows: int = option(4, "KV evaluation windows per domain", range="[1, inf)")
    prefill: int = 512
    score: int = 128
    shrinkage: list[float] = option([], "robustness rows: KV shrinkage values", nargs="*", range="[0, 1]")
    min_bits: list[int] = option([], "robustness rows: KV floors of bits", nargs="*", range="[0, inf)")
    robust_compensations: list[str] = option([], "robustness rows: the first criterion with these compensations too",
                                             nargs="*")
    refit_damps: list[float] = option([], "robustness rows: the first criterion with these refit ridges (the "
                                      "usual ridge is 0.01)", nargs="*", range="[0, inf)")
    refit_shrinkages: list[float] = option([], "pruning robustness rows: the refit's moments blended toward their "
                                           "diagonal", nargs="*", range="[0, 1]")
    robust_calibrations: list[str] | None = option(None, "calibration sets that also get the robustness rows "
                                                   "(null: every mix)", nargs="*")
    output: str = "recipes/results/cross_domain_smollm2.json"


def run_cross_domain(args: CrossDomainOptions) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    domains = parse_domains(args.domains)
    sets = calibration_sets(domains)
    if args.calibrations:
        unknown = [c for c in args.calibrations if c not in sets]
        if unknown:
            raise GeoCompError(f"--calibrations names {', '.join(unknown)}; allowed: {', '.join(sets)}.")
        sets = {c: sets[c] for c in sets if c in args.calibrations}
    robust = set(args.robust_calibrations or [n for n in sets if n.startswith("mix")])
    for name in robust:
        if name not in sets:
            raise GeoCompError(f"--robust-calibrations names {name!r}, not one of {', '.join(sets)}.")
    for _, crit, fields in _prune_variants(args, True):
        PruneConfig(sparsity=args.sparsity, criterion=crit, targets=args.targets, **fields)
    variants = _kv_variants(args)
    for _, fields in variants:
        for budget in args.budgets:
            KVConfig(budget=budget, reference_tokens=args.prefill, sink_tokens=args.sink_tokens, **fields)
    kv_on = bool(args.budgets)  # no budgets: a pruning-only matrix
    quant, skipped = quant_baselines(args.quant, load_config(args.model), args.quant != default_of(
        type(args), "quant"), "--quant") if kv_on else ([], [])  # decided from the config, before the weights load
    model, tok = load_model(args.model)
    kv_model = copy.deepcopy(model).to(getattr(torch, args.kv_dtype)) if kv_on else None
    bos = block_bos(tok, model)
    limit = model_max_length(model)
    t0 = time.time()
    calib = {d: list(token_blocks(tok, load_corpus(c), args.block_size, max_tokens=args.tokens, max_length=limit,
                                  bos=bos)) for d, (c, _) in domains.items()}
    evals = {d: _batches(list(token_blocks(tok, load_corpus(e), args.block_size, max_tokens=args.eval_tokens,
                                           max_length=limit, bos=bos)), args.batch_size)
             for d, (_, e) in domains.items()}
    window = args.prefill + args.score
    windows = {}
    for d, (_, e) in domains.items():
        blocks = token_blocks(tok, load_corpus(e), window, max_tokens=args.windows * window, bos=bos)
        windows[d] = torch.stack([b["input_ids"] for b in blocks])[: args.windows]  # (windows, prefill + score)
    print(f"tokenized {len(domains)} domains in {time.time() - t0:.0f}s", flush=True)

    baseline, rows = {}, []
    result = {"command": args.command_line, "model": args.model,
              "data": {"domains": {d: {"calibration": c, "evaluation": e} for d, (c, e) in domains.items()},
                       "calibration_sets": sets, "calibration_tokens": args.tokens, "eval_tokens": args.eval_tokens,
                       "block_size": args.block_size, "kv_windows": args.windows, "prefill": args.prefill,
                       "score": args.score, "bos": bos},
              "settings": {"sparsity": args.sparsity, "targets": args.targets, "compensation": args.compensation,
                           "criteria": args.criteria, "budgets": args.budgets, "kv_dtype": args.kv_dtype,
                           "quant": args.quant, "threads": args.threads, "robust_calibrations": sorted(robust),
                           "robust_compensations": args.robust_compensations, "refit_damps": args.refit_damps,
                           "refit_shrinkages": args.refit_shrinkages, "fold_repairs": args.fold_repairs,
                           "shrinkage": args.shrinkage, "min_bits": args.min_bits,
                           "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]},
              "baseline": baseline, "rows": rows, "skipped": skipped, "complete": False,
              "notes": "ppl_ratio is to the uncompressed model on the same evaluation domain in this run; KV rows "
                       "are continuation perplexity with the uncompressed DynamicCache as baseline; times are wall-clock "
                       "seconds, comparable across rows only if nothing else ran (load_average_at_start)."}

    def add(row, kind):
        base = baseline[row["eval_data"]][kind]
        row["ppl_ratio"] = row["ppl"] / base["ppl"]
        if "kv_bytes" in row:
            row["kv_bytes_ratio"] = row["kv_bytes"] / base["kv_bytes"]
        rows.append(row)
        extra = f" bytes {row['kv_bytes_ratio']:.3f}" if "kv_bytes" in row else ""
        print(f"{row['method']:40s} calib {str(row['calibration']):18s} eval {row['eval_data']:12s} "
              f"ppl {row['ppl']:9.3f} ({100 * (row['ppl_ratio'] - 1):+6.1f}%){extra}", flush=True)

    folds = {}  # calibration-free folds: one model per repair, scored on every domain
    for d in domains:  # the uncompressed model and the calibration-free baselines
        baseline[d] = {"dense": {"ppl": perplexity(model, evals[d])}}
        if kv_on:
            nll, n, nbytes = continuation_nll(kv_model, windows[d], args.prefill, _dynamic(kv_model))
            baseline[d]["kv"] = {"ppl": math.exp(nll), "kv_bytes": nbytes, "tokens": n}
        for crit in ("magnitude",):
            pruned = copy.deepcopy(model)
            prune(pruned, None, sparsity=args.sparsity, criterion=crit, targets=args.targets)
            add({"method": f"{crit}/none", "kind": "prune", "calibration": None, "eval_data": d,
                 "sparsity": args.sparsity, "ppl": perplexity(pruned, evals[d])}, "dense")
            del pruned
        for repair in (r for r in args.fold_repairs if r != "data"):  # calibration-free folds
            if repair not in folds:
                folds[repair] = fold(copy.deepcopy(model), args.sparsity, targets=args.targets, repair=repair)[0]
            add({"method": f"fold:{repair}", "kind": "prune", "calibration": None, "eval_data": d,
                 "sparsity": args.sparsity, "ppl": perplexity(folds[repair], evals[d])}, "dense")
        for backend, nbits in quant:
            try:
                nll, n, nbytes = continuation_nll(kv_model, windows[d], args.prefill, _quantized(kv_model, backend,
                                                                                                  int(nbits)))
            except Exception as e:  # an optional backend that does not run here is reported, not hidden
                rows.append({"method": f"quantized-{backend}-int{nbits}", "kind": "kv", "eval_data": d,
                             "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            add({"method": f"quantized-{backend}-int{nbits}", "kind": "kv", "calibration": None, "eval_data": d,
                 "budget": int(nbits) / (8 * next(kv_model.parameters()).element_size()), "kv_bytes": nbytes,
                 "ppl": math.exp(nll)}, "kv")
    del folds
    write_json(args.output, result)

    for name, parts in sets.items():
        loader = _batches(_mix(calib, parts, args.seed) if len(parts) > 1 else calib[parts[0]], args.batch_size)
        t = time.time()
        stats = collect_stats(model, loader, prune_taps(model, PruneConfig(targets=args.targets).targets))
        for method, crit, fields in _prune_variants(args, name in robust):
            pruned = copy.deepcopy(model)
            prune(pruned, stats, sparsity=args.sparsity, criterion=crit, targets=args.targets, **fields)
            for d in domains:
                add({"method": method, "kind": "prune", "calibration": name, "eval_data": d,
                     "in_calibration": d in parts, "sparsity": args.sparsity, "ppl": perplexity(pruned, evals[d])},
                    "dense")
            del pruned
        if "data" in args.fold_repairs:
            folded, _ = fold(copy.deepcopy(model), args.sparsity, targets=args.targets, repair="data",
                             batches=loader, stats=stats)
            for d in domains:
                add({"method": "fold:data", "kind": "prune", "calibration": name, "eval_data": d,
                     "in_calibration": d in parts, "sparsity": args.sparsity, "ppl": perplexity(folded, evals[d])},
                    "dense")
            del folded
        kv_stats = collect_kv_stats(kv_model, loader, "fisher") if kv_on else None
        for method, fields in variants:
            if fields and name not in robust:
                continue
            for budget in args.budgets:
                plan = build_plan(kv_model, kv_stats, KVConfig(budget=budget, method="fisher", group_size=args.group_size,
                                                               reference_tokens=args.prefill, sink_tokens=args.sink_tokens,
                                                               **fields))
                for d in domains:
                    nll, n, nbytes = continuation_nll(kv_model, windows[d], args.prefill,
                                                      lambda p=plan: p.cache(kv_model))
                    add({"method": method, "kind": "kv", "calibration": name, "eval_data": d, "in_calibration": d in parts,
                         "budget": budget, "plan_bytes_ratio": plan.ratio, "kv_bytes": nbytes, "ppl": math.exp(nll)},
                        "kv")
        print(f"calibration {name}: {time.time() - t:.0f}s", flush=True)
        result["summary"] = summarize(result)
        write_json(args.output, result)
    result["complete"] = True  # every calibration set ran (results are written after each one)
    write_json(args.output, result)
    return result


def _dynamic(model):
    from transformers import DynamicCache

    return lambda: DynamicCache(config=model.config)


def _quantized(model, backend: str, nbits: int):
    from transformers import QuantizedCache

    return lambda: QuantizedCache(backend=backend, config=model.config, nbits=nbits)


def _ppl(rows, **match) -> float | None:
    hit = [r for r in rows if "ppl" in r and all(r.get(k) == v for k, v in match.items())]
    return hit[0]["ppl_ratio"] - 1 if hit else None


def summarize(result: dict) -> dict:
    """Per evaluation domain: the increases the targets compare (None where a row is not there yet).

    Pruning: in-domain (calibrated on the domain itself) vs off-domain (the mix without it) for
    each criterion, and their ratio. KV: each coded cache calibrated on the mix without the domain
    vs the calibration-free QuantizedCache rows.
    """
    rows, out = result["rows"], {}
    settings = result["settings"]
    crits = sorted({r["method"] for r in rows if r.get("kind") == "prune" and r.get("calibration")})
    kv_methods = sorted({r["method"] for r in rows if r.get("kind") == "kv" and r.get("calibration")})
    for d in result["data"]["domains"]:
        off = f"mix-no-{d}"
        s = {"prune": {}, "kv": {}}
        for m in crits:
            inc_in, inc_off = _ppl(rows, method=m, calibration=d, eval_data=d), _ppl(rows, method=m, calibration=off,
                                                                                     eval_data=d)
            s["prune"][m] = {"in_domain": inc_in, "off_domain": inc_off, "mix": _ppl(rows, method=m, calibration="mix",
                                                                                     eval_data=d),
                             "off_over_in": inc_off / inc_in if inc_in and inc_off is not None else None}
        for m in ["magnitude/none"] + [f"fold:{r}" for r in settings.get("fold_repairs", []) if r != "data"]:
            s["prune"][m] = _ppl(rows, method=m, eval_data=d)
        for m in kv_methods:
            for b in settings["budgets"]:
                s["kv"][f"{m}@{b:g}"] = {"in_domain": _ppl(rows, method=m, calibration=d, eval_data=d, budget=b),
                                          "off_domain": _ppl(rows, method=m, calibration=off, eval_data=d, budget=b),
                                          "mix": _ppl(rows, method=m, calibration="mix", eval_data=d, budget=b)}
        for spec in settings["quant"]:
            backend, nbits = spec.split(":")
            s["kv"][f"quantized-{backend}-int{nbits}"] = _ppl(rows, method=f"quantized-{backend}-int{nbits}",
                                                              eval_data=d)
        out[d] = s
    return out
