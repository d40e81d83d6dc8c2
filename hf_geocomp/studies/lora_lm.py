"""H2 benchmark, causal-LM task: LoRA variants fine-tune a decoder on some works, scored on others.

Every method adapts the same copy of the model (loaded once), with the same targets, rank,
alpha, learning rate, steps, training blocks and seeds; only the adapters differ
(:data:`hf_geocomp.studies.lora_bench.METHODS`). Training blocks come from ``--train-data``
(default the ``train`` plays), perplexity from ``--eval-data`` (the ``evaluation`` plays),
statistics for SpectralLoRA and EVA from ``--data`` (the ``calibration`` plays): three
disjoint sets of works. The untuned model's perplexity on the same evaluation blocks is the
baseline of the run. Per run: perplexity, its ratio to the baseline, adapter parameters,
initialisation time (calibration pass + allocation + init) and training time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..options import EvalOptions, option
from .lora_bench import LoraBenchOptions, adapter_params, build, check_methods, summarize, train_adapter, versions

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(kw_only=True)
class LMLoraOptions(LoraBenchOptions, EvalOptions):
    """H2 study, causal LM: LoRA variants fine-tuned on some works, perplexity on held-out works."""

    block_size: int = 128
    methods: list[str] = option(["lora", "spectral-df", "eva", "adalora"])
    targets: list[str] = option(LLAMA_TARGETS, "target module names")
    steps: int = option(24, "optimizer steps", range="[1, inf)")
    train_batch: int = 4
    train_block: int = option(64, "tokens per training block", range="[1, inf)")
    train_data: str = option("shakespeare:train", "training text")
    eval_block: int = option(128, "tokens per held-out block", range="[1, inf)")
    output: str = "recipes/results/lora_smollm2_lm.json"


def run_lm_bench(args: LMLoraOptions) -> dict:
    from transformers.utils import logging as hf_logging

    from .. import __version__
    from ..data import calibration_loader, causal_lm_collate, load_corpus, load_model, model_max_length, token_blocks
    from ..eval.perplexity import perplexity
    from ..io import write_json

    check_methods(args.methods)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)  # on a shared, oversubscribed CPU one thread is several times faster
    base, tok = load_model(args.model, task="causal-lm")
    max_len = model_max_length(base)
    train = token_blocks(tok, load_corpus(args.train_data), args.train_block,
                         max_tokens=args.steps * args.train_batch * args.train_block, max_length=max_len, model=base)
    held_out = token_blocks(tok, load_corpus(args.eval_data), args.eval_block, max_tokens=args.eval_tokens,
                            max_length=max_len, model=base)
    eval_batches = [causal_lm_collate([held_out[j] for j in range(i, min(i + 8, len(held_out)))])
                    for i in range(0, len(held_out), 8)]
    calib = calibration_loader(base, tok, args.data, args.tokens, args.block_size, args.batch_size)
    baseline_ppl = perplexity(base, eval_batches)
    print(f"baseline ppl {baseline_ppl:.3f}", flush=True)
    targets = args.targets
    taps = [f"*.{t}" for t in targets]
    meta = {"baseline_ppl": baseline_ppl, "train_blocks": len(train), "eval_blocks": len(held_out)}
    rows = []
    for seed in range(args.seeds):
        for method in args.methods:
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            common = dict(r=args.r, lora_alpha=2 * args.r, target_modules=list(targets), lora_dropout=0.0)
            pm, init_s, callbacks, extra = build(method, model, common, calib, taps, args.steps)
            result, train_s = train_adapter(pm, train, causal_lm_collate, callbacks, method=method, seed=seed,
                                            lr=args.lr, batch=args.train_batch, tag="lora_lm", max_steps=args.steps,
                                            remove_unused_columns=False)
            ppl = perplexity(pm, eval_batches)
            row = {"method": method, "seed": seed, "ppl": ppl, "ppl_ratio": ppl / baseline_ppl, "budget": None,
                   **adapter_params(method, pm), "train_loss": result.training_loss, "init_s": init_s,
                   "train_s": train_s, "init_share": init_s / train_s, "steps": result.global_step, **extra}
            rows.append(row)
            print(f"seed {seed} {method:14s} ppl {ppl:.3f} params {row['params']} init {init_s:.2f}s "
                  f"train {train_s:.1f}s", flush=True)
            write_json(args.output, _result(args, rows, meta, __version__, partial=True))
            del pm, model
    result = _result(args, rows, meta, __version__, partial=False)
    write_json(args.output, result)
    return result


def _result(args, rows, meta, version, partial):
    return {"command": args.command_line, "model": args.model, "task": "causal-lm",
            "data": {"train": args.train_data, "test": args.eval_data, "calibration": args.data,
                     "train_tokens": meta["train_blocks"] * args.train_block,
                     "eval_tokens": meta["eval_blocks"] * args.eval_block, "calibration_tokens": args.tokens},
            "threads": args.threads,
            "hyperparameters": {"r": args.r, "lora_alpha": 2 * args.r, "lr": args.lr, "steps": args.steps,
                                "train_batch": args.train_batch, "train_block": args.train_block,
                                "targets": list(args.targets)},
            "baseline": {"method": "untuned", "ppl": meta["baseline_ppl"]},
            "partial": partial, "summary": summarize(rows, metric="ppl"), "rows": rows,
            "versions": versions(version)}
