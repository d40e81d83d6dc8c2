"""Benchmark: cost of the calibration pass relative to the same forward passes without hooks.

Both passes see the same batches in the same process; repetitions alternate plain and
calibrated passes so drift hits both. Memory is what the statistics tensors hold, and the
peak resident-set growth of one calibrated pass over one plain pass, each measured in a
fresh process (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before the pass).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import arch
from ..geometry import Tap, collect_stats
from ..options import ModelDataOptions, option


@dataclass(kw_only=True)
class OverheadOptions(ModelDataOptions):
    """Calibration pass time and memory vs plain forward passes."""

    tokens: int = 8192
    repeats: int = option(3, "timed repetitions of each pass", range="[1, inf)")
    output: str = "recipes/results/geometry_overhead.json"


def _proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def all_linear_taps(model) -> list[Tap]:
    return [Tap(n, "input") for n, m in model.named_modules() if arch.is_linear(m)]


def _setup(args):
    from ..data import calibration_loader, load_model

    model, tok = load_model(args.model)
    loader = calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size)
    return model, list(loader), all_linear_taps(model)


def _pass(kind: str, model, batches, taps):
    if kind == "calibrated":
        return collect_stats(model, batches, taps)
    with torch.no_grad():
        for b in batches:
            model(**b)
    return None


def _peak_growth_child(kind: str, args) -> int | None:
    """In a fresh process: peak resident-set growth during one pass (``VmHWM`` reset before it)."""
    model, batches, taps = _setup(args)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    except OSError:
        return None
    before = _proc_status("VmRSS")
    out = _pass(kind, model, batches, taps)
    peak = _proc_status("VmHWM")
    del out
    return None if before is None or peak is None else peak - before


def run_overhead(args: OverheadOptions) -> dict:
    import multiprocessing as mp

    from ..io import resolved_args, write_json

    model, batches, taps = _setup(args)
    _pass("plain", model, batches, taps)  # warm-up (allocator, kernels)
    times = {"plain": [], "calibrated": []}
    for _ in range(args.repeats):
        for kind in ("plain", "calibrated"):
            gc.collect()
            t0 = time.perf_counter()
            out = _pass(kind, model, batches, taps)
            times[kind].append(time.perf_counter() - t0)
            if out is not None:
                tokens, stats_bytes, distinct = out.tokens, out.nbytes(), len(out.moments)
            del out
    ratios = [c / p for p, c in zip(times["plain"], times["calibrated"])]
    del model, batches
    # memory: each pass alone in a fresh process, so allocator reuse between passes cannot hide growth
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        growth = {kind: pool.apply(_peak_growth_child, (kind, args)) for kind in ("plain", "calibrated")}
    peak_extra = None if None in growth.values() else growth["calibrated"] - growth["plain"]
    result = {
        "command": args.command_line,
        "args": resolved_args(args),
        "model": args.model,
        "data": args.data,
        "tokens": tokens,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "taps": len(taps),
        "distinct_inputs": distinct,
        "baseline": {"method": "forward, no hooks", "seconds_median": statistics.median(times["plain"]),
                     "peak_rss_growth_bytes": growth["plain"]},
        "rows": [{
            "method": "calibration (Σx, Σxxᵀ on every linear input)",
            "latency_ratio": statistics.median(ratios),
            "latency_ratios": ratios,
            "seconds_median": statistics.median(times["calibrated"]),
            "stats_bytes": stats_bytes,
            "peak_rss_growth_bytes": growth["calibrated"],
            "peak_extra_bytes": peak_extra,
        }],
        "target": {"latency_ratio_max": 1.5},
    }
    write_json(args.output, result)
    row = result["rows"][0]
    print(f"calibration / plain forward: {row['latency_ratio']:.3f}x (median of {args.repeats}; "
          f"{tokens} tokens, {len(taps)} linear inputs, {distinct} distinct)")
    print(f"statistics tensors: {stats_bytes / 2**20:.1f} MiB; peak extra memory of the calibrated pass over "
          f"the plain one: {'n/a' if peak_extra is None else f'{peak_extra / 2**20:.1f} MiB'}")
    print(f"wrote {args.output}")
    return result
