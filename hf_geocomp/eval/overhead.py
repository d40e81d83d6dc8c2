"""Benchmark: cost of the calibration pass relative to the same forward passes without hooks.

Both passes see the same batches in the same process; repetitions alternate plain and
calibrated passes so drift hits both. Memory is what the statistics tensors hold, plus the
peak resident-set growth of the calibrated pass over the plain one (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` before each pass).
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

from .. import arch
from ..geometry import Tap, collect_stats


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def all_linear_taps(model) -> list[Tap]:
    return [Tap(n, "input") for n, m in model.named_modules() if arch.is_linear(m)]


def run_overhead(args) -> dict:
    from ..data import calibration_loader, load_model
    from ..io import resolved_args, write_json

    model, tok = load_model(args.model)
    loader = calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size)
    batches = list(loader)
    taps = all_linear_taps(model)

    def plain():
        with torch.no_grad():
            for b in batches:
                model(**b)

    def calibrated():
        return collect_stats(model, batches, taps)

    plain()  # warm-up (allocator, kernels)
    times = {"plain": [], "calibrated": []}
    peaks = {"plain": [], "calibrated": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("calibrated", calibrated)):
            stats = None  # free the previous pass's statistics before measuring this one
            gc.collect()
            can_reset = _reset_peak()
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            peaks[name].append(_peak_bytes() if can_reset else None)
            if out is not None:
                stats, tokens, stats_bytes, distinct = out, out.tokens, out.nbytes(), len(out.moments)
            del out
    ratios = [c / p for p, c in zip(times["plain"], times["calibrated"])]
    peak_extra = (None if None in peaks["plain"] + peaks["calibrated"]
                  else max(peaks["calibrated"]) - max(peaks["plain"]))
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
        "baseline": {"method": "forward, no hooks", "seconds_median": statistics.median(times["plain"])},
        "rows": [{
            "method": "calibration (Σx, Σxxᵀ on every linear input)",
            "latency_ratio": statistics.median(ratios),
            "latency_ratios": ratios,
            "seconds_median": statistics.median(times["calibrated"]),
            "stats_bytes": stats_bytes,
            "peak_extra_rss_bytes": peak_extra,
        }],
        "target": {"latency_ratio_max": 1.5},
    }
    write_json(args.output, result)
    row = result["rows"][0]
    print(f"calibration / plain forward: {row['latency_ratio']:.3f}x (median of {args.repeats}; "
          f"{tokens} tokens, {len(taps)} linear inputs, {distinct} distinct)")
    print(f"statistics held: {row['stats_bytes'] / 2**20:.1f} MiB; peak RSS growth over plain pass: "
          f"{'n/a' if peak_extra is None else f'{peak_extra / 2**20:.1f} MiB'}")
    print(f"wrote {args.output}")
    return result
