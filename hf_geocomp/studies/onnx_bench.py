"""ONNX Runtime vs PyTorch CPU latency of a pruned causal LM, as ratios measured in one run.

The model is pruned as the main job prunes it (unless ``--sparsity 0``: a compressed folder is timed as it
is, a coded KV cache replaced by a plain one on both sides), exported with :func:`hf_geocomp.hub.onnx.export_onnx`
(whose parity check must pass), and both engines run the same float32 model on the same threads: a batch-1
prefill of ``prefill`` tokens of held-out text (full logits and the cache), and ``steps`` greedy decode
steps after it (one token a step through the cache: PyTorch's ``DynamicCache``, ONNX Runtime's with-past
graph fed back its own cache). Runs interleave ``A X A …`` per repeat (``A`` PyTorch, after one warm-up of
each); a ratio is ONNX Runtime's value over the mean of the two PyTorch runs around it, and rows give the
median with min and max. The greedy tokens of the two engines are compared, and the machine's load is
recorded before and after (shared machines).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from ..data import calibration_loader, load_config, load_corpus, load_model, token_blocks
from ..errors import GeoCompError
from ..io import resolved_args, write_json
from ..options import ThreadsOption, option
from ..prune.cli import PruneCommandOptions
from .kv_speed import _load, sharing


@dataclass(kw_only=True)
class OnnxBenchOptions(PruneCommandOptions, ThreadsOption):
    """ONNX Runtime vs PyTorch CPU latency of a pruned model (batch-1 prefill and greedy decode, float32,
    interleaved ratios in one run)."""

    tokens: int = 4096
    allocation: str = "global"  # the main job's pruning (prune.* of recipes/compress_smollm2.yaml)
    sparsity: float = option(0.2, "fraction of block parameters pruned before the export (0: time the model as it "
                             "is, e.g. a compressed folder)", range="[0, 1)")
    eval_data: str = option("shakespeare:evaluation", "held-out text of the timed prompt")
    prefill: int = option(512, "prompt tokens, batch 1", range="[1, inf)")
    steps: int = option(64, "greedy decode steps after the prompt", range="[1, inf)")
    repeats: int = option(3, "interleaved repeats A X A ... of each phase", range="[1, inf)")
    threads: int = option(2, "torch threads, and ONNX Runtime's intra-op threads", range="[1, inf)")
    onnx_dir: str | None = option(None, "keep the exported graphs in this folder (default: a temporary folder)")
    output: str = option("recipes/results/onnx_smollm2_latency.json", "results JSON", aliases=["-o"])


def _prune(model, tok, args):
    from ..geometry import collect_stats
    from ..hub import mark_compressed
    from ..prune import PruneConfig, prune, prune_taps

    cfg = PruneConfig(sparsity=args.sparsity, criterion=args.criterion, targets=args.targets,
                      allocation=args.allocation, compensation=args.compensation, head_mode=args.head_mode,
                      round_to=args.round_to, min_keep=args.min_keep)
    loader = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size))
    taps = prune_taps(model, cfg.targets, criteria=[cfg.criterion], compensation=cfg.compensation,
                      head_mode=cfg.head_mode)
    _, plan = prune(model, collect_stats(model, loader, taps) if taps else None, config=cfg)
    mark_compressed(model, plan)


def _torch_run(model, ids, steps):
    """PyTorch: (prefill seconds, decode tokens/s, greedy tokens) for ``ids`` (1, n) then ``steps`` steps."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        prefill = time.perf_counter() - start
        past, token, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        start = time.perf_counter()
        for _ in range(steps):
            tokens.append(int(token))
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, position_ids=torch.full_like(token, mask.shape[1] - 1),
                        past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, steps / (time.perf_counter() - start), tokens


def _onnx_run(lm, ids, steps):
    """ONNX Runtime: the same as :func:`_torch_run` (the logits leave ONNX Runtime only for each step's argmax)."""
    import numpy as np

    ids = ids.numpy()
    mask = np.ones_like(ids)
    start = time.perf_counter()
    logits, past = lm(ids, mask)
    prefill = time.perf_counter() - start
    token, tokens = logits.numpy()[:, -1:].argmax(-1), []
    start = time.perf_counter()
    for _ in range(steps):
        tokens.append(int(token[0, 0]))
        mask = np.concatenate([mask, np.ones_like(token)], 1)
        logits, past = lm(token, mask, past)
        token = logits.numpy()[:, -1:].argmax(-1)
    return prefill, steps / (time.perf_counter() - start), tokens


def run_onnx_bench(args: OnnxBenchOptions) -> dict:
    from ..hub.onnx import (OnnxCausalLM, check_destination, config_plan, export_onnx, kv_note, plain_cache,
                            require_onnx)

    require_onnx()
    if args.onnx_dir:
        check_destination(args.onnx_dir, args.model, args.overwrite)
    plan = config_plan(load_config(args.model))
    if plan is not None and args.sparsity > 0:
        raise GeoCompError(f"{args.model!r} is already compressed; pass --sparsity 0 to time it as it is.")
    model, tok = load_model(args.model, task="causal-lm")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.sparsity > 0:
        _prune(model, tok, args)
    prune_seconds, start = time.time() - start, time.time()
    folder = args.onnx_dir or tempfile.mkdtemp(prefix="hf-geocomp-onnx-")
    report = export_onnx(model, folder, tokenizer=tok, without_kv_coding=True,
                         overwrite=args.overwrite or args.onnx_dir is None, source=args.model,
                         command=args.command_line)
    export_seconds = time.time() - start
    text = token_blocks(tok, load_corpus(args.eval_data), args.prefill, max_tokens=args.prefill, model=model)
    ids = text[0]["input_ids"].unsqueeze(0)  # (1, prefill)
    lm = OnnxCausalLM(folder, threads=args.threads)
    load_before = _load()
    runs = {"pytorch": [], "onnxruntime": []}

    def timed(engine):
        with plain_cache(model):
            result = _torch_run(model, ids, args.steps) if engine == "pytorch" else _onnx_run(lm, ids, args.steps)
        runs[engine].append(result)
        return result

    timed("pytorch"), timed("onnxruntime")  # warm-up: first-call allocations on both sides
    for engine in runs:
        runs[engine].clear()
    timed("pytorch")
    for _ in range(args.repeats):  # A X A X ... A
        timed("onnxruntime")
        timed("pytorch")
    load_after = _load()
    del lm
    if args.onnx_dir is None:
        shutil.rmtree(folder, ignore_errors=True)

    def phase(i):  # prefill seconds (i = 0) or decode tokens/s (i = 1): ONNX Runtime over its PyTorch neighbours
        out = [x[i] / ((runs["pytorch"][k][i] + runs["pytorch"][k + 1][i]) / 2)
               for k, x in enumerate(runs["onnxruntime"])]
        return {"median": statistics.median(out), "min": min(out), "max": max(out), "all": out}

    torch_tokens, onnx_tokens = runs["pytorch"][0][2], runs["onnxruntime"][0][2]
    same = next((i for i, (a, b) in enumerate(zip(torch_tokens, onnx_tokens)) if a != b), None)
    prefill, decode = phase(0), phase(1)
    baseline = {"engine": "pytorch", "prefill_seconds": statistics.median(r[0] for r in runs["pytorch"]),
                "decode_tokens_per_s": statistics.median(r[1] for r in runs["pytorch"])}
    rows = [{"method": "onnxruntime prefill", "phase": "prefill", "batch": 1, "context": args.prefill,
             "latency_ratio": prefill["median"], "latency_ratio_min": prefill["min"],
             "latency_ratio_max": prefill["max"], "seconds": statistics.median(r[0] for r in runs["onnxruntime"])},
            {"method": "onnxruntime decode", "phase": "decode", "batch": 1, "context": args.prefill,
             "steps": args.steps,
             "tokens_per_s_ratio": decode["median"], "tokens_per_s_ratio_min": decode["min"],
             "tokens_per_s_ratio_max": decode["max"],
             "tokens_per_s": statistics.median(r[1] for r in runs["onnxruntime"])}]
    result = {"command": args.command_line, "model": args.model, "options": resolved_args(args),
              "data": {"calibration": args.data if args.sparsity > 0 else None,
                       "calibration_tokens": args.tokens if args.sparsity > 0 else None,
                       "prompt": args.eval_data, "prompt_tokens": args.prefill},
              "dtype": "float32", "threads": args.threads, "baseline": baseline, "rows": rows,
              "ratios": {"prefill_latency": prefill, "decode_tokens_per_s": decode},
              "greedy_tokens_equal": same is None, "first_token_mismatch": same,
              "parity": {g: report["parity"][g] for g in ("prefill", "decode")},
              "plan": report["plan"],
              "kv_coding": kv_note(plan) and "both engines timed with a plain float KV cache: " + kv_note(plan),
              "seconds": {"prune": prune_seconds, "export_and_check": export_seconds},
              "load_before": load_before, "load_after": load_after, "sharing": sharing(load_before),
              "versions": report["versions"],
              "method": "interleaved A X A per repeat after one warm-up each; ratio = ONNX Runtime over the mean of "
                        "its two PyTorch neighbours; prefill: seconds of one batch-1 forward with full logits and the "
                        "cache; decode: greedy tokens/s of one-token steps through the cache"}
    write_json(args.output, result)
    print(f"prefill {args.prefill} tokens: ONNX Runtime / PyTorch latency x{prefill['median']:.3f} "
          f"({prefill['min']:.3f}-{prefill['max']:.3f}); decode {args.steps} steps: tokens/s x{decode['median']:.3f} "
          f"({decode['min']:.3f}-{decode['max']:.3f}); greedy tokens equal: {same is None}", flush=True)
    return result
