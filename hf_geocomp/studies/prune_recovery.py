"""Benchmark: prune a causal LM *during* a short fine-tune with the pruning callback.

Rows, all in one run and on the same held-out text: the unpruned model as loaded (the
baseline), the same model fine-tuned for the same steps without pruning (control: how much
the fine-tune alone changes perplexity), and one model pruned by
:class:`VarianceWeightedPruningCallback` per sparsity and criterion. Every fine-tune sees the
same blocks in the same order. CPU time of each fine-tune is recorded; with the control, each
pruned row also records ``ppl_vs_control``, its perplexity over the control's.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from ..data import calibration_loader, causal_lm_collate, load_corpus, load_model, token_blocks
from ..errors import GeoCompError
from ..eval.perplexity import latency_ratio, perplexity
from ..eval.significance import compare
from ..io import folder_lock
from ..options import EvalOptions, ModelOptions, ThreadsOption, option
from ..prune.callback import VarianceWeightedPruningCallback
from ..prune.units import block_params
from .resume import check_same_baseline, claim_next, previous_run, save_shared


@dataclass(kw_only=True)
class RecoveryOptions(ModelOptions, EvalOptions, ThreadsOption):
    """Prune during a short fine-tune with the callback."""

    train_data: str = option("shakespeare:train", "fine-tune text")
    block_size: int = option(256, "tokens per training and held-out block", range="[1, inf)")
    sparsities: list[float] = option([0.2], "target fractions of block parameters, run in the order given",
                                     range="[0, 1)")
    criteria: list[str] = option(["variance"], "pruning criteria, one callback run per sparsity and criterion",
                                 aliases=["--criterion"])
    targets: str = option("mlp", "comma list of mlp, heads")
    allocation: str = option("uniform", "uniform or global")
    compensation: str = option("refit", "applied at every mask update")
    schedule: str = option("cubic", "cubic or linear sparsity schedule")
    end: float = option(0.5, "fraction of steps where the target is reached", range="(0, 1]")
    update_every: int | None = option(None, "optimizer steps between mask updates", range="[1, inf)")
    steps: int = option(60, "optimizer steps of every fine-tune", range="[1, inf)")
    lr: float = option(5e-5, "peak learning rate, cosine schedule", range="(0, inf)")
    batch_size: int = option(4, "blocks per micro-batch", range="[1, inf)")
    grad_accum: int = option(2, "micro-batches per optimizer step", range="[1, inf)")
    dense_control: bool = option(False, "also fine-tune without pruning for the same steps; rows then record "
                                 "ppl_vs_control")
    seeds: int = option(1, "seeds: each its own training blocks and Trainer seed, every criterion and the dense "
                        "control paired on it; with 2 or more, paired tests vs the baselines (Holm over the table)",
                        range="[1, inf)")
    baselines: list[str] = option(["magnitude"], "criteria every other is compared with when seeds >= 2")
    only_seeds: list[int] | None = option(None, "run only these of the seeds 0..seeds-1 (null: all)",
                                          range="[0, inf)")
    resume: bool = option(False, "continue an unfinished results file of the same settings: keep its rows, run the "
                                 "missing ones; processes started alike share the file and split its rows")
    latency_tokens: int = option(512, "tokens of the latency forward", range="[1, inf)")
    latency_repeats: int = option(5, "0 skips latency (recorded as null)", range="[0, inf)")
    output: str = "recipes/results/prune_smollm2_recovery.json"

    def __post_init__(self):
        super().__post_init__()
        bad = [s for s in self.only_seeds or [] if s >= self.seeds]
        if bad:
            raise GeoCompError(f"only_seeds {bad} are not among the seeds 0..{self.seeds - 1}.")


def _finetune(model, rows, args, callbacks, seed: int = 0) -> float:
    import tempfile

    from transformers import Trainer, TrainingArguments

    # the Trainer's folder, discarded: it gets no checkpoint, only the callback's prune_plan.json, which every fine-tune
    # overwrote (the row keeps its mask updates)
    with tempfile.TemporaryDirectory(prefix="hf_geocomp-recovery-trainer-") as scratch:
        targs = TrainingArguments(scratch, max_steps=args.steps, learning_rate=args.lr,
                                  per_device_train_batch_size=args.batch_size,
                                  gradient_accumulation_steps=args.grad_accum, warmup_steps=0.1,
                                  lr_scheduler_type="cosine", report_to=[], save_strategy="no", logging_steps=10,
                                  use_cpu=True, disable_tqdm=True, seed=seed)
        cpu = time.process_time()
        Trainer(model=model, args=targs, train_dataset=rows, data_collator=causal_lm_collate,
                callbacks=callbacks).train()
        return (time.process_time() - cpu) / 60


DENSE = "finetune (no pruning)"


def _settings(args: RecoveryOptions) -> dict:
    """Everything a row's number depends on; a resumed file must match it (more seeds may follow)."""
    return {k: getattr(args, k) for k in
            ("model", "train_data", "eval_data", "eval_tokens", "block_size", "sparsities", "criteria", "baselines",
             "targets", "allocation", "compensation", "schedule", "end", "update_every", "steps", "lr", "batch_size",
             "grad_accum", "dense_control", "latency_tokens", "latency_repeats", "seeds")}


def _key(args: RecoveryOptions):
    """A row's place in the run: (seed, position), the dense control right after the seed's first pruned run."""
    order = {(c, s): i for i, (s, c) in enumerate((s, c) for s in args.sparsities for c in args.criteria)}

    def key(row):
        return row["seed"], 0.5 if row["method"] == DENSE else order[row["criterion"], row["budget"]]
    return key


def run_recovery(args: RecoveryOptions) -> dict:
    def callback(sparsity, criterion):
        return VarianceWeightedPruningCallback(sparsity, criterion=criterion, targets=args.targets,
                                               allocation=args.allocation, schedule=args.schedule, end=args.end,
                                               compensation=args.compensation, update_every=args.update_every)

    runs = [(s, c) for s in args.sparsities for c in args.criteria]
    for sparsity, criterion in runs:  # every setting checked before the first fine-tune
        callback(sparsity, criterion)
    missing = [b for b in args.baselines if b not in args.criteria]
    if args.seeds > 1 and missing:
        raise GeoCompError(f"baselines {missing} must also be among the criteria {args.criteria}.")
    settings, key = _settings(args), _key(args)
    previous = previous_run(args.output, settings) if args.resume else None
    seeds = list(range(args.seeds)) if args.only_seeds is None else sorted(set(args.only_seeds))

    def wanted(seed_list):
        return {(s, i) for s in seed_list for i in range(len(runs))} | (
            {(s, 0.5) for s in seed_list} if args.dense_control else set())

    done = {key(r) for r in previous["rows"]} if previous else set()
    if previous and wanted(seeds) <= done:
        raise GeoCompError(f"cannot resume {args.output}: every row of seeds {seeds} is there; nothing to run.")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base, tok = load_model(args.model)
    evals = list(calibration_loader(base, tok, args.eval_data, args.eval_tokens, args.block_size, 8))
    lat_ids = evals[0]["input_ids"].reshape(-1)[: args.latency_tokens].unsqueeze(0)
    n_train = args.steps * args.batch_size * args.grad_accum * args.block_size
    corpus = load_corpus(args.train_data)
    n0 = block_params(base)
    baseline = {"ppl": perplexity(base, evals), "params": n0}
    print(f"baseline ppl {baseline['ppl']:.3f}", flush=True)
    check_same_baseline(args.output, previous, baseline["ppl"])
    if previous:
        print(f"resuming {args.output}: {len(done)} rows there", flush=True)
    rows = []  # this process's
    part = {"id": f"{os.getpid()}@{time.time():.6f}", "command": args.command_line,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "seeds": seeds, "threads": args.threads,
            "load_average_at_start": os.getloadavg()[0], "fine_tunes": 0, "train_cpu_minutes": 0.0}
    train_tokens = n_train // args.block_size * args.block_size

    def result(all_rows, parts):
        controls = {c["seed"]: c["ppl"] for c in all_rows if c["method"] == DENSE}
        for r in all_rows:
            if r["seed"] in controls and "criterion" in r:
                r["ppl_vs_control"] = r["ppl"] / controls[r["seed"]]
        return {"command": args.command_line, "model": args.model, "settings": settings,
                "data": {"train": args.train_data, "train_tokens": train_tokens,
                         "evaluation": args.eval_data, "evaluation_tokens": args.eval_tokens,
                         "block_size": args.block_size},
                "finetune": {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                             "grad_accum": args.grad_accum},
                "callback": {"criteria": list(args.criteria), "targets": args.targets, "schedule": args.schedule,
                             "end": args.end, "compensation": args.compensation, "allocation": args.allocation,
                             "update_every": args.update_every},
                "threads": args.threads, "partial": not wanted(range(args.seeds)) <= {key(r) for r in all_rows},
                "parts": parts,  # one per process that added rows, with its command, seeds and fine-tune CPU time
                "baseline": baseline, "rows": all_rows,
                **(_paired(all_rows, args) if args.seeds > 1 else {})}

    def record(method, model, minutes, extra):
        ppl = perplexity(model, evals)
        rows.append({"method": method, "sparsity": 1 - block_params(model) / n0, "params": block_params(model),
                     "ppl": ppl, "ppl_ratio": ppl / baseline["ppl"],
                     "latency_ratio": latency_ratio(model, base, lat_ids, args.latency_repeats),
                     "train_cpu_minutes": minutes, **extra})
        part["fine_tunes"] += 1
        part["train_cpu_minutes"] = round(part["train_cpu_minutes"] + minutes, 2)
        print({k: v for k, v in rows[-1].items() if k != "mask_updates"}, flush=True)
        save_shared(args.output, rows, part, key, result)

    order = [(seed, i) for seed in seeds for i in range(len(runs))]
    if args.dense_control:  # right after the seed's first pruned run, so a cut-short run still has both
        order = [k for seed in seeds for k in [(seed, 0), (seed, 0.5)] + [(seed, i) for i in range(1, len(runs))]]
    train_sets = {}
    while (claimed := claim_next(args.output, order, key, result)) is not None:
        seed, pos = claimed
        if seed not in train_sets:
            train_sets[seed] = token_blocks(tok, corpus, args.block_size, max_tokens=n_train, seed=seed, model=base)
        model = copy.deepcopy(base).train()
        if pos == 0.5:
            record(DENSE, model.eval(), _finetune(model, train_sets[seed], args, [], seed), {"seed": seed})
        else:
            sparsity, criterion = runs[pos]
            cb = callback(sparsity, criterion)
            minutes = _finetune(model, train_sets[seed], args, [cb], seed)
            record(f"callback/{criterion}/{args.compensation}", model.eval(), minutes,
                   {"criterion": criterion, "budget": sparsity, "mask_updates": cb.history, "seed": seed})
        del model
    if not rows:
        print(f"every row of seeds {seeds} left is being run by another process", flush=True)
    with folder_lock(args.output):
        with open(args.output) as f:
            return json.load(f)


def _paired(rows: list[dict], args: RecoveryOptions) -> dict:
    """Over seeds: each criterion against each baseline (log ppl, paired, Holm over the table, as the H1/H3
    study), and each criterion against the dense control fine-tuned the same steps on the same blocks
    (``log_ppl_vs_dense`` = mean log ppl(pruned) − log ppl(dense): what pruning costs after recovery)."""
    from .h3 import analyse

    pruned = [{**r, "control": "recovered"} for r in rows if "criterion" in r]
    out = analyse(pruned, args.criteria, args.baselines, ["recovered"], args.sparsities)
    dense = {r["seed"]: r["ppl"] for r in rows if r["method"] == DENSE}
    vs_dense = []
    for budget in args.sparsities:
        for c in args.criteria:
            mine = {r["seed"]: r["ppl"] for r in pruned if r["criterion"] == c and r["budget"] == budget}
            seeds = sorted(set(mine) & set(dense))
            if len(seeds) >= 2:
                res = compare([math.log(mine[s]) for s in seeds], [math.log(dense[s]) for s in seeds])
                vs_dense.append({"criterion": c, "budget": budget, "log_ppl_vs_dense": res.pop("mean_diff"), **res})
    return {"summary": out["summary"], "tests": out["tests"], "vs_dense": vs_dense}
