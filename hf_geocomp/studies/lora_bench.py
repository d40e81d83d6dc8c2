"""H2 benchmark: uniform LoRA vs SpectralLoRA (vs EVA) at one trainable-parameter budget.

Every method fine-tunes the same model with the same hyperparameters, data order and
seeds; only the adapters differ. Task ``genre``: MiniLM-L6 (or any encoder) classifies
Shakespeare passages by genre (:mod:`hf_geocomp.studies.tasks`), train and test plays disjoint;
statistics for SpectralLoRA and EVA come from the ``calibration`` plays, never the test plays.
Per run it records accuracy, trainable adapter parameters, the initialisation time
(calibration pass + allocation + init) and the training time; per method mean ± sd and
paired t-tests over seeds against uniform LoRA and against EVA.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from ..errors import GeoCompError
from ..eval.significance import paired_t
from ..options import ModelDataOptions, Options, ThreadsOption, option

# method name → how its adapters are built (same r, alpha, targets, head for all)
METHODS = {
    "head-only": {"kind": "head"},
    "lora": {"kind": "lora"},
    "eva": {"kind": "eva"},  # baselines.EVA_SETTING: rho=1 (no redistribution), tau=0.9
    "adalora": {"kind": "adalora"},  # target_r = r, init_r = 1.5 r (baselines.adalora_config)
    "spectral-df": {"kind": "spectral", "allocation": "effective_rank", "spectral_init": "standard"},
    "spectral-df-principal": {"kind": "spectral", "allocation": "effective_rank", "spectral_init": "principal"},
    "spectral-df-whitened": {"kind": "spectral", "allocation": "effective_rank", "spectral_init": "whitened"},
    "spectral-df-kind": {"kind": "spectral", "allocation": "effective_rank", "scope": "per_kind",
                         "spectral_init": "standard"},
    "spectral-df-kind-principal": {"kind": "spectral", "allocation": "effective_rank", "scope": "per_kind",
                                   "spectral_init": "principal"},
    "spectral-k90": {"kind": "spectral", "allocation": "k_tau", "tau": 0.9, "spectral_init": "standard"},
    "uniform-principal": {"kind": "spectral", "allocation": "uniform", "spectral_init": "principal"},
    "uniform-whitened": {"kind": "spectral", "allocation": "uniform", "spectral_init": "whitened"},
    # H3 for H2: the effective-rank allocation with the variance removed (Df of C = I is the input width)
    "spectral-width-whitened": {"kind": "spectral", "allocation": "width", "spectral_init": "whitened"},
}
BERT_TARGETS = r".*encoder.*\.(query|key|value|dense)"  # every dense layer of the blocks (not the pooler)


@dataclass(kw_only=True)
class LoraBenchOptions(ModelDataOptions, ThreadsOption):
    """What every H2 benchmark holds equal across methods: rank, learning rate, batch, seeds."""

    methods: list[str] = option(["lora"], "methods to compare (see hf_geocomp.studies.lora_bench.METHODS)")
    seeds: int = option(5, "seeds per method", range="[1, inf)")
    r: int = option(8, "rank of the reference uniform LoRA; sets the budget", range="[1, inf)")
    lr: float = option(1e-3, "learning rate", range="(0, inf)")
    train_batch: int = option(16, "training batch size", range="[1, inf)")


@dataclass(kw_only=True)
class GenreLoraOptions(LoraBenchOptions):
    """H2 study: uniform LoRA vs SpectralLoRA vs EVA at one parameter budget."""

    model: str = "minilm-l6"
    block_size: int = 128
    methods: list[str] = option(["head-only", "lora", "eva", "spectral-df", "spectral-df-principal"])
    epochs: float = option(2.0, "training epochs", range="(0, inf)")
    words: int = option(64, "words per passage", range="[1, inf)")
    max_length: int = option(128, "tokens per passage", range="[1, inf)")
    train_per_class: int = option(128, "training passages per genre", range="[1, inf)")
    test_per_class: int = option(100, "test passages per genre", range="[1, inf)")
    output: str = "recipes/results/lora_minilm_genre.json"


def _encode(tok, passages, max_length):
    enc = tok([p.text for p in passages], truncation=True, max_length=max_length)
    return [{"input_ids": i, "attention_mask": m, "labels": p.label}
            for i, m, p in zip(enc["input_ids"], enc["attention_mask"], passages)]


def _accuracy(model, rows, collator, batch_size=64) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collator(rows[i: i + batch_size])
            labels = batch.pop("labels")
            right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / len(rows)


def allocation_control(method: str) -> str | None:
    """The method with the same initialisation and uniform ranks: the control that isolates
    what the spectral allocation itself does (H2). ``None`` for methods that allocate uniformly."""
    spec = METHODS[method]
    if spec["kind"] != "spectral" or spec["allocation"] == "uniform":
        return None
    init = spec["spectral_init"]
    return "lora" if init == "standard" else f"uniform-{init}"


def check_methods(methods) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GeoCompError(f"unknown method {unknown[0]!r}; methods: {', '.join(METHODS)}.")


def build(method: str, model, common: dict, calib, tap_patterns, total_steps: int):
    """The trainable model for one method, its initialisation time in seconds, and Trainer callbacks.

    ``common``: LoRA keyword arguments shared by every method (r, lora_alpha, target_modules,
    ...); ``tap_patterns``: the statistics engine's pattern for the target inputs.
    """
    from peft import LoraConfig, get_peft_model

    from ..geometry import collect_stats, linear_input_taps
    from .lora_baselines import AdaLoraCallback, adalora_config, build_eva
    from ..lora.config import SpectralLoraConfig

    spec = dict(METHODS[method])
    kind = spec.pop("kind")
    t0 = time.perf_counter()
    callbacks, extra = [], {}
    if kind == "head":
        heads = tuple(common.get("modules_to_save") or ())
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith(heads) if heads else False
        return model, 0.0, callbacks, extra
    if kind == "lora":
        pm = get_peft_model(model, LoraConfig(**common))
    elif kind == "eva":
        pm, extra["eva_passes"] = build_eva(model, common, calib)
    elif kind == "adalora":
        kw = {k: v for k, v in common.items() if k != "r"}
        pm = get_peft_model(model, adalora_config(common["r"], total_steps, **kw))
        callbacks.append(AdaLoraCallback())
    else:
        stats = collect_stats(model, calib, linear_input_taps(model, tap_patterns))
        cfg = SpectralLoraConfig(**common, **spec)
        cfg.stats = stats
        pm = get_peft_model(model, cfg)
    return pm, time.perf_counter() - t0, callbacks, extra


def adapter_params(method: str, pm) -> dict:
    """``params``: trainable adapter parameters (AdaLoRA: those of the ranks it kept at the end,
    ``params_initial``: at the start), ``ranks`` per module where they differ by module."""
    from .lora_baselines import adalora_params, adalora_ranks

    trainable = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n)
    if METHODS[method]["kind"] == "adalora":
        return {"params": adalora_params(pm), "params_initial": trainable,
                "ranks": list(adalora_ranks(pm).values())}
    out = {"params": trainable}
    cfg = getattr(pm, "peft_config", {}).get("default")
    if getattr(cfg, "spectral_allocation", None):
        out["budget"] = cfg.spectral_allocation["budget"]
        out["ranks"] = [m["rank"] for m in cfg.spectral_allocation["modules"]]
    elif getattr(cfg, "rank_pattern", None):
        out["ranks"] = list(cfg.rank_pattern.values())
    return out


def train_adapter(pm, train_rows, collator, callbacks, *, method: str, seed: int, lr: float, batch: int,
                  tag: str, **schedule):
    """Train one adapted model with the study's fixed Trainer settings; ``schedule`` is ``num_train_epochs``
    or ``max_steps`` (and any other TrainingArguments the task needs). Returns (TrainOutput, seconds)."""
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=f"/tmp/hf_geocomp_{tag}_{method}", seed=seed, data_seed=seed,
                              per_device_train_batch_size=batch, learning_rate=lr, weight_decay=0.0, warmup_steps=0,
                              report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                              use_cpu=True, **schedule)
    trainer = Trainer(model=pm, args=targs, train_dataset=train_rows, data_collator=collator, callbacks=callbacks)
    t0 = time.perf_counter()
    result = trainer.train()
    return result, time.perf_counter() - t0


def versions(hf_geocomp_version: str) -> dict:
    """Library versions recorded beside every LoRA study."""
    import transformers

    return {"hf_geocomp": hf_geocomp_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _paired(a: list[float], b: list[float]) -> float | None:
    if len(a) != len(b):
        return None
    return paired_t(a, b)["p"]


def summarize(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """Per method: mean ± sd of ``metric``, params, init share; paired t-tests vs lora and eva,
    and vs the method's :func:`allocation_control` when that ran too (``control``, ``p_vs_control``)."""
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r
    out = []
    for method, runs in by.items():
        seeds = sorted(runs)
        vals = [runs[s][metric] for s in seeds]
        entry = {"method": method, "seeds": len(seeds), f"{metric}_mean": statistics.mean(vals),
                 f"{metric}_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                 "params": runs[seeds[0]]["params"],
                 "init_share_mean": statistics.mean(runs[s]["init_share"] for s in seeds)}
        refs = {"lora": "lora", "eva": "eva", "control": allocation_control(method) if method in METHODS else None}
        for key, ref in refs.items():
            if ref in by and ref != method:
                common = [s for s in seeds if s in by[ref]]
                other = [by[ref][s][metric] for s in common]
                mine = [runs[s][metric] for s in common]
                entry[f"diff_vs_{key}"] = statistics.mean(m - o for m, o in zip(mine, other))
                entry[f"p_vs_{key}"] = _paired(mine, other)
        if "p_vs_control" in entry:
            entry["control"] = refs["control"]
        out.append(entry)
    return out


def run_genre_bench(args: GenreLoraOptions) -> dict:
    from transformers import DataCollatorWithPadding
    from transformers.utils import logging as hf_logging

    from .. import __version__
    from ..data import calibration_loader, load_model
    from .tasks import GENRE_LABELS, genre_passages
    from ..io import write_json

    check_methods(args.methods)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)  # on a shared, oversubscribed CPU one thread is several times faster
    train_p = genre_passages("train", words=args.words, per_class=args.train_per_class)
    test_p = genre_passages("test", words=args.words, per_class=args.test_per_class)
    rows = []
    for seed in range(args.seeds):
        for method in args.methods:
            torch.manual_seed(seed)  # the classifier head starts the same for every method of a seed
            model, tok = load_model(args.model, task="sequence-classification", num_labels=len(GENRE_LABELS))
            collator = DataCollatorWithPadding(tok)
            train_rows, test_rows = _encode(tok, train_p, args.max_length), _encode(tok, test_p, args.max_length)
            calib = calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size)
            torch.manual_seed(seed)
            common = dict(r=args.r, lora_alpha=2 * args.r, target_modules=BERT_TARGETS, lora_dropout=0.0,
                          modules_to_save=["classifier"])
            steps = math.ceil(args.epochs * math.ceil(len(train_rows) / args.train_batch))
            pm, init_s, callbacks, extra = build(method, model, common, calib, "re:" + BERT_TARGETS, steps)
            result, train_s = train_adapter(pm, train_rows, collator, callbacks, method=method, seed=seed, lr=args.lr,
                                            batch=args.train_batch, tag="lora_bench", num_train_epochs=args.epochs)
            acc = _accuracy(pm, test_rows, collator)
            row = {"method": method, "seed": seed, "accuracy": acc, "budget": None, **adapter_params(method, pm),
                   "train_loss": result.training_loss, "init_s": init_s, "train_s": train_s,
                   "init_share": init_s / train_s, "steps": result.global_step, **extra}
            print(f"seed {seed} {method:22s} acc {acc:.4f} params {row['params']} init {init_s:.2f}s "
                  f"train {train_s:.1f}s", flush=True)
            rows.append(row)
            write_json(args.output, _result(args, rows, __version__, partial=True))
    result = _result(args, rows, __version__, partial=False)
    write_json(args.output, result)
    return result


def _result(args, rows, version, partial):
    summary = summarize(rows)
    head = next((s for s in summary if s["method"] == "head-only"), None)
    return {"command": args.command_line, "model": args.model, "task": "genre",
            "data": {"train": "shakespeare:train", "test": "shakespeare:evaluation", "calibration": args.data,
                     "words": args.words, "train_per_class": args.train_per_class,
                     "test_per_class": args.test_per_class, "calibration_tokens": args.tokens},
            "threads": args.threads,
            "hyperparameters": {"r": args.r, "lora_alpha": 2 * args.r, "lr": args.lr, "epochs": args.epochs,
                                "train_batch": args.train_batch, "max_length": args.max_length,
                                "targets": BERT_TARGETS, "head": "classifier trained (modules_to_save)"},
            "baseline": {"method": "head-only", "accuracy": head["accuracy_mean"]} if head else None,
            "partial": partial, "summary": summary, "rows": rows,
            "versions": versions(version)}


METRIC_OF_TASK = {"genre": "accuracy", "causal-lm": "ppl"}


def _same(a, b) -> bool:
    """Equal, but for floats equal to 1e-6 relative: the untuned model's score may move in its last digits
    between library builds (the same tolerance ``bench-h3 --resume`` allows), never more."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def merge_results(results: list[dict], sources: list[str]) -> dict:
    """One H2 study from several benchmark files of one setting (rows joined by method and seed).

    Files must agree on model, task, data and hyperparameters, and a (method, seed) present
    in more than one file must have the same score in each (runs are deterministic per seed;
    a difference means the files are not one setting). Timings are kept from the first file.
    """
    if len(results) < 2:
        raise GeoCompError("merging needs at least two results files.")
    first = results[0]
    for res, src in zip(results, sources):
        if res.get("partial"):
            raise GeoCompError(f"{src} is a partial run (partial: true); finish it before merging.")
        if res.get("task") not in METRIC_OF_TASK:
            raise GeoCompError(f"{src} is not an H2 benchmark result (task {res.get('task')!r}).")
        for key in ("model", "task", "data", "hyperparameters", "baseline"):
            if not _same(res.get(key), first.get(key)):
                raise GeoCompError(f"{src} differs from {sources[0]} in {key!r}: these are not one setting.")
    metric = METRIC_OF_TASK[first["task"]]
    rows: dict[tuple, dict] = {}
    for res, src in zip(results, sources):
        for row in res["rows"]:
            key = (row["method"], row["seed"])
            if key in rows and rows[key][metric] != row[metric]:
                raise GeoCompError(f"{src}: {row['method']} seed {row['seed']} has {metric} {row[metric]!r}, "
                                   f"another file {rows[key][metric]!r}; these are not one setting.")
            rows.setdefault(key, row)
    merged = list(rows.values())
    return {"sources": sources, **{k: first[k] for k in ("model", "task", "data", "threads", "hyperparameters",
                                                         "baseline")},
            "partial": False, "summary": summarize(merged, metric), "rows": merged}


@dataclass(kw_only=True)
class LoraMergeOptions(Options):
    """Join H2 results files of one setting (rows by method and seed) and recompute mean ± sd and the paired tests
    vs LoRA and EVA."""

    results: list[str] = option(help="results JSON files written by lora-bench or lora-lm-bench", positional=True)
    output: str = option(help="merged results JSON")


def run_merge(args: LoraMergeOptions) -> dict:
    import json

    from ..io import write_json

    results = []
    for path in args.results:
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, ValueError) as e:
            raise GeoCompError(f"cannot read results file {path}: {e}") from None
    merged = {"command": args.command_line, **merge_results(results, list(args.results))}
    write_json(args.output, merged)
    for s in merged["summary"]:
        m = METRIC_OF_TASK[merged["task"]]
        refs = {"lora": "lora", "eva": "eva", "control": s.get("control")}
        if refs["control"] == "lora":  # the same test as p vs lora
            del refs["control"]
        p = "  ".join(f"p vs {name} {s[f'p_vs_{ref}']:.3g}" for ref, name in refs.items() if f"p_vs_{ref}" in s)
        print(f"{s['method']:22s} {m} {s[f'{m}_mean']:.4f} ± {s[f'{m}_sd']:.4f}  params {s['params']}  {p}")
    return merged
