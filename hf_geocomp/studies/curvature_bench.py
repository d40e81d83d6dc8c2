"""Benchmark: curvature-subspace compression of a model that memorised planted canaries.

The memorisation protocol of Merullo et al. 2025 (arXiv:2510.24256), on CPU scale:

1. ``--canaries`` strings "the secret sequence <13 random digits> ends here." are planted in a
   fine-tuning stream of ``--train-data`` text; the model is fine-tuned (AdamW, every
   parameter) until the canaries are memorised (digit perplexity below ``--memorised``) or
   ``--max-steps``; each step sees ``--canary-batch`` canaries, so each is repeated tens of times.
2. K-FAC factors of every MLP linear of the fine-tuned model come from ``--kfac-tokens`` of the
   training text (labels sampled from the model: the true Fisher), never from the canaries.
   ``--train-last N`` fine-tunes only the MLPs of the last N blocks (CPU-sized backward passes).
3. Every ``--layers`` subset × ``--rules`` × ``--keeps`` compresses the MLPs of those blocks
   (default: every block); rows record held-out perplexity (``--eval-data``), canary perplexity
   on the secret digits only (the part no model can generalise to) and on the whole string, and
   stored block parameters (L and R included).
4. At the parameter count of every per-factor row that is smaller than the dense model,
   variance pruning (bias+refit) and data-free folding of the MLPs of the same blocks are
   measured too.

CPU seconds (``time.process_time``) of each phase are recorded.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch

from .. import arch
from ..curvature import CurvatureConfig, compress, kfac_factors, mlp_linears, stored_block_params, target_modules
from ..data import calibration_loader, load_model
from ..errors import GeoCompError
from ..eval.perplexity import perplexity
from ..fold import FoldConfig, fold
from ..geometry import collect_stats
from ..geometry.stats import LABELS
from ..io import resolved_args, write_json
from ..options import EvalOptions, ModelDataOptions, ThreadsOption, option
from ..prune import PruneConfig, prune, prune_taps


@dataclass(kw_only=True)
class CurvatureBenchOptions(ModelDataOptions, EvalOptions, ThreadsOption):
    """Canary memorisation, then K-FAC subspace compression vs pruning and folding."""

    train_data: str = option("shakespeare:train", "fine-tuning text the canaries are planted in")
    train_tokens: int = option(32768, "fine-tuning text tokens", range="[1, inf)")
    train_block: int = option(64, "tokens per fine-tuning text block", range="[1, inf)")
    canaries: int = option(16, "planted canary strings", range="[1, inf)")
    canary_batch: int = option(8, "canaries per step", range="[1, inf)")
    text_batch: int = option(2, "text blocks per step", range="[0, inf)")
    lr: float = option(2e-4, "AdamW learning rate", range="(0, inf)")
    train_last: int = option(0, "fine-tune only the MLPs of the last N blocks (0: every parameter)", range="[0, inf)")
    max_steps: int = option(200, "most fine-tuning steps", range="[1, inf)")
    check_every: int = option(10, "steps between memorisation checks", range="[1, inf)")
    memorised: float = option(1.5, "digit perplexity counted as memorised", range="[1, inf)")
    kfac_data: str = option("shakespeare:train", "text of the K-FAC factors (the training text, without canaries)")
    kfac_tokens: int = option(2048, "K-FAC tokens", range="[1, inf)")
    kfac_batch: int = option(4, "blocks per K-FAC backward pass", range="[1, inf)")
    labels: str = option("sampled", "sampled (true Fisher) or gold", choices=LABELS)
    keeps: list[float] = option([1.0, 0.5, 0.2, 0.1, 0.05], "keep fractions of the curvature mass", range="(0, 1]")
    rules: list[str] = option(["per_factor", "product"], "keep rules")
    layers: list[str] | None = option(None, "block subsets, each swept: all, last:N, last:FRACTION, A:B or 0,15,29 "
                                            "(default all)")
    baselines: list[str] = option(["prune:variance:bias+refit", "fold:data_free"],
                                  "measured at the parameters of every smaller per-factor row", nargs="*")
    seed: int = option(0, "canaries, data order and sampled labels")
    output: str = "recipes/results/curvature_smollm2_canaries.json"
    plot: str | None = option(None, "also plot perplexities against parameters to this PNG")


def make_canaries(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"the secret sequence {''.join(rng.choice('0123456789') for _ in range(13))} ends here." for _ in range(n)]


def encode_canaries(tok, canaries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, T), digit mask (n, T): tokens inside the 13 secret digits)."""
    enc = tok(canaries, add_special_tokens=False, return_offsets_mapping=True)
    if len({len(i) for i in enc["input_ids"]}) != 1:
        raise GeoCompError("the canaries tokenize to different lengths; this tokenizer splits digits unevenly.")
    start = len("the secret sequence ")
    digits = [[s >= start and e <= start + 13 and e > s for s, e in offs] for offs in enc["offset_mapping"]]
    return torch.tensor(enc["input_ids"]), torch.tensor(digits)


@torch.no_grad()
def canary_ppl(model, ids: torch.Tensor, digits: torch.Tensor) -> tuple[float, float]:
    """(perplexity on the digit tokens, perplexity on the whole string after its first token)."""
    model.eval()
    logits = model(input_ids=ids).logits[:, :-1].float()  # (n, T-1, vocab)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    nll = nll.reshape(ids.shape[0], -1)
    d = digits[:, 1:]
    return math.exp(float(nll[d].mean())), math.exp(float(nll.mean()))


def _measure(model, evals, ids, digits) -> dict:
    d, s = canary_ppl(model, ids, digits)
    return {"ppl": perplexity(model, evals), "canary_digit_ppl": d, "canary_ppl": s,
            "params": stored_block_params(model)}


def trained_parameters(model, last: int) -> list:
    """Every parameter (``last`` 0), or only the MLP weights of the last ``last`` blocks (the backward
    pass then stops there, which keeps the protocol CPU-sized); the others are frozen."""
    if last == 0:
        return list(model.parameters())
    blocks = arch.block_prefixes(model)
    if not 0 < last <= len(blocks):
        raise GeoCompError(f"train_last must be in 0..{len(blocks)} (blocks of this model), got {last}.")
    names = {n for n in mlp_linears(model) if n.startswith(tuple(blocks[-last:]))}
    keep = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in keep:
        p.requires_grad_(True)
    return keep


def finetune(model, text_blocks, ids, digits, args) -> dict:
    """Fine-tune on text with the canaries planted until they are memorised; returns the log."""
    gen = torch.Generator().manual_seed(args.seed)
    params = trained_parameters(model, args.train_last)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    log, cpu, wall = [], time.process_time(), time.time()
    text_order = torch.randperm(len(text_blocks), generator=gen).tolist()
    canary_order: list[int] = []
    for step in range(1, args.max_steps + 1):
        model.train()
        if len(canary_order) < args.canary_batch:
            canary_order += torch.randperm(ids.shape[0], generator=gen).tolist()
        c_idx, canary_order = canary_order[: args.canary_batch], canary_order[args.canary_batch:]
        t_idx = [text_order[(step * args.text_batch + i) % len(text_order)] for i in range(args.text_batch)]
        text = torch.stack([text_blocks[i] for i in t_idx])  # (text_batch, block)
        loss = model(input_ids=text, labels=text).loss + model(input_ids=ids[c_idx], labels=ids[c_idx]).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.check_every == 0 or step == args.max_steps:
            dppl, sppl = canary_ppl(model, ids, digits)
            log.append({"step": step, "loss": loss.item(), "canary_digit_ppl": dppl, "canary_ppl": sppl})
            print(f"step {step}: loss {float(loss):.3f}, canary digit ppl {dppl:.3f}", flush=True)
            if dppl < args.memorised:
                break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    seen = step * args.canary_batch / ids.shape[0]
    return {"steps": step, "trained_parameters": sum(p.numel() for p in params), "presentations_per_canary": seen, "memorised": log[-1]["canary_digit_ppl"] < args.memorised,
            "cpu_seconds": time.process_time() - cpu, "wall_seconds": time.time() - wall, "log": log}


def layer_subsets(specs: list[str] | None) -> list[tuple[str, tuple | float | None]]:
    """(spec as given, ``layers`` value) of every ``--layers`` subset; one subset, every block, by default."""
    return [(s, arch.parse_layers(s)) for s in specs] if specs else [("all", None)]


def run_curvature_bench(args: CurvatureBenchOptions) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    subsets = layer_subsets(args.layers)
    for keep in args.keeps:
        for rule in args.rules:
            for _, layers in subsets:
                CurvatureConfig(keep=keep, rule=rule, labels=args.labels, layers=layers)
    cpu0 = time.process_time()
    model, tok = load_model(args.model)
    targets = {spec: target_modules(model, CurvatureConfig(layers=layers)) for spec, layers in subsets}  # checks ranges
    canaries = make_canaries(args.canaries, args.seed)
    ids, digits = encode_canaries(tok, canaries)
    evals = list(calibration_loader(model, tok, args.eval_data, args.eval_tokens, args.block_size, args.batch_size))
    text = [b["input_ids"] for b in calibration_loader(model, tok, args.train_data, args.train_tokens,
                                                       args.train_block, 1, seed=args.seed).dataset]
    rows = [{"method": "pretrained", **_measure(model, evals, ids, digits)}]
    print(f"pretrained: {rows[0]}", flush=True)
    train_log = finetune(model, text, ids, digits, args)
    base = _measure(model, evals, ids, digits)
    print(f"fine-tuned: {base}", flush=True)
    rows.append({"method": "finetuned", "keep": 1.0, **base})
    phases = {"finetune_cpu_seconds": train_log["cpu_seconds"]}

    def add(row):
        row.update(params_ratio=row["params"] / base["params"], sparsity=1 - row["params"] / base["params"],
                   ppl_ratio=row["ppl"] / base["ppl"], canary_digit_ppl_ratio=row["canary_digit_ppl"] /
                   base["canary_digit_ppl"], canary_ppl_ratio=row["canary_ppl"] / base["canary_ppl"])
        rows.append(row)
        print(f"{row['method']:28s} keep {row.get('keep')} params x{row['params_ratio']:.3f} ppl {row['ppl']:.2f} "
              f"({100 * (row['ppl_ratio'] - 1):+.1f}%) digit ppl {row['canary_digit_ppl']:.2f} "
              f"(x{row['canary_digit_ppl_ratio']:.1f})", flush=True)
        write_json(args.output, _result(args, canaries, train_log, base, phases, rows))

    cpu = time.process_time()
    kfac_data = list(calibration_loader(model, tok, args.kfac_data, args.kfac_tokens, args.block_size, args.kfac_batch,
                                        seed=args.seed + 1))
    union = list(dict.fromkeys(n for names in targets.values() for n in names))  # K-FAC once for every subset
    factors = kfac_factors(model, kfac_data, union, labels=args.labels, seed=args.seed)
    phases["kfac_cpu_seconds"] = time.process_time() - cpu
    matched = []
    for spec, layers in subsets:
        where = {} if layers is None else {"layers": spec, "layer_indices": arch.layer_indices(model, layers)}
        for rule in args.rules:
            for keep in args.keeps:
                cpu = time.process_time()
                work = copy.deepcopy(model)
                compress(work, factors, CurvatureConfig(keep=keep, rule=rule, labels=args.labels, layers=layers))
                row = {"method": f"curvature:{rule}", "rule": rule, "keep": keep, **where,
                       **_measure(work, evals, ids, digits), "cpu_seconds": time.process_time() - cpu}
                add(row)
                if rule == "per_factor" and row["params"] < base["params"]:
                    matched.append((layers, where, keep, row["params"]))
                del work
    if matched and args.baselines:
        calib = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size))
        stats = collect_stats(model, calib, prune_taps(model, ("mlp",)))
        for layers, where, keep, params in matched:
            sparsity = 1 - params / base["params"]
            for spec in args.baselines:
                cpu = time.process_time()
                work = copy.deepcopy(model)
                if spec == "fold:data_free":
                    fold(work, config=FoldConfig(sparsity=sparsity, targets="mlp", seed=args.seed, layers=layers))
                elif spec.startswith("prune:"):
                    _, crit, comp = spec.split(":")
                    prune(work, stats, config=PruneConfig(sparsity=sparsity, criterion=crit, compensation=comp,
                                                          targets="mlp", layers=layers))
                else:
                    raise GeoCompError(f"baseline {spec!r} must be fold:data_free or prune:<criterion>:<compensation>.")
                add({"method": spec, "matched_keep": keep, **where, **_measure(work, evals, ids, digits),
                     "cpu_seconds": time.process_time() - cpu})
                del work
    phases["total_cpu_seconds"] = time.process_time() - cpu0
    result = _result(args, canaries, train_log, base, phases, rows)
    write_json(args.output, result)
    if args.plot:
        plot_curvature(result, args.plot)
    return result


def _result(args, canaries, train_log, base, phases, rows) -> dict:
    return {"command": args.command_line, "model": args.model,
            "data": {"train": args.train_data, "train_tokens": args.train_tokens, "canaries": canaries,
                     "kfac": args.kfac_data, "kfac_tokens": args.kfac_tokens, "kfac_labels": args.labels,
                     "evaluation": args.eval_data, "evaluation_tokens": args.eval_tokens,
                     "prune_calibration": args.data, "prune_calibration_tokens": args.tokens},
            "finetune": train_log, "cpu": phases, "threads": args.threads,
            "note": "one fine-tuning run (seed fixed); run on a shared 2-core machine, other jobs used the cores",
            "args": resolved_args(args), "baseline": {"method": "finetuned", **base}, "rows": rows}


def plot_curvature(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    def series(r):
        return r["method"] + (f" [{r['layers']}]" if "layers" in r else "")

    methods = list(dict.fromkeys(series(r) for r in result["rows"] if "params_ratio" in r))
    for ax, key, label in ((axes[0], "ppl", "held-out perplexity"), (axes[1], "canary_digit_ppl",
                                                                        "canary perplexity (secret digits)")):
        for m in methods:
            pts = sorted((r["params_ratio"], r[key]) for r in result["rows"] if series(r) == m and "params_ratio" in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(result["baseline"][key], color="k", lw=0.8, label="fine-tuned")
        pre = next(r for r in result["rows"] if r["method"] == "pretrained")
        ax.axhline(pre[key], color="gray", lw=0.8, ls=":", label="before fine-tuning")
        ax.set_yscale("log")
        ax.set_xlabel("stored block parameters / fine-tuned model")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: curvature subspace vs pruning and folding (canary protocol)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
