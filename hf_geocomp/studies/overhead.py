"""Benchmark: cost of calibration passes relative to the same forward passes without hooks, beside
the arithmetic bound of the products they compute.

Variants (rows), each timed in pairs with the plain forward (plain, variant, plain, variant, ...;
the order of the variants rotates every repetition, so drift hits all of them), reported as the
median ratio with its min–max:

* ``plain-last``: the forward asking for the last position's logits only (``logits_to_keep=1``),
  what a calibration pass runs whenever no tap reads the output head;
* ``full-previous``: statistics on every linear input with the engine's previous products (per
  batch a new float32 Gram of 144-wide upper blocks, mirrored by transposed copies, added into the
  float64 sums) — kept here only to measure against;
* ``full``: the same statistics with the current engine (float32 windows written in place);
* ``prune``: what one-shot pruning with its default configuration reads (:func:`prune_taps`);
* ``lora``: what SpectralLoRA on ``LORA_TARGETS`` reads (:func:`lora_taps`).

Bound: per token, the multiply-adds of the products over the *distinct* tapped inputs (the
engine measures a tensor read by several modules once: q/k/v, gate/up) — d(d+1)/2 for a
symmetric (``syrk``-shaped) product, d² for a full one, d for per-feature variances — against
the forward's multiply-adds (every linear layer, the attention scores and value sums over the
causal context, the output head at the positions whose logits the pass computes). The bound of
a row is (its forward + its products) / the plain forward: the time it would take if every
multiply-add cost the same. ``Σx`` (d additions per input) is left out of it.

Memory is what the statistics tensors hold, and the peak resident-set growth of one pass of each
variant over one plain pass, each measured in a fresh process (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before the pass).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import arch
from ..geometry import ActivationStats, Moments, Tap, collect_stats
from ..geometry.accumulate import product_share
from ..geometry.stats import skip_logits
from ..options import ModelDataOptions, option

VARIANTS = ("plain-last", "full-previous", "full", "prune", "lora")
LORA_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")  # lora-lm-bench's default targets
PREVIOUS_BLOCK = 144
METHOD = {
    "plain-last": "forward, last-position logits only (no hooks)",
    "full-previous": "full statistics (Σx, Σxxᵀ on every linear input), previous engine",
    "full": "full statistics (Σx, Σxxᵀ on every linear input)",
    "prune": "pruning's statistics (default criterion: variance, mlp + heads)",
    "lora": f"SpectralLoRA's statistics (inputs of {', '.join(LORA_TARGETS)})",
}


@dataclass(kw_only=True)
class OverheadOptions(ModelDataOptions):
    """Calibration pass time and memory vs plain forward passes, beside the arithmetic bound."""

    tokens: int = 8192
    repeats: int = option(3, "timed repetitions; each times a plain pass before every variant", range="[1, inf)")
    variants: list[str] = option(list(VARIANTS), "passes timed against the plain forward", choices=VARIANTS)
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


def variant_taps(kind: str, model) -> list[Tap] | None:
    """The taps a variant measures (``None`` for a forward without hooks)."""
    if kind in ("plain", "plain-last"):
        return None
    if kind in ("full", "full-previous"):
        return all_linear_taps(model)
    if kind == "prune":
        from ..prune import PruneConfig, prune_taps

        cfg = PruneConfig()
        return prune_taps(model, cfg.targets, criteria=[cfg.criterion], compensation=cfg.compensation,
                          head_mode=cfg.head_mode)
    from ..lora import SpectralLoraConfig, lora_taps

    return lora_taps(model, SpectralLoraConfig(r=8, target_modules=list(LORA_TARGETS)))


# ---- the previous engine's products, to measure against -------------------------------------------

def _previous_block(d: int) -> int | None:
    """The previous engine's block width for a ``d``-wide input (``None``: one plain product)."""
    return None if d < 2 * PREVIOUS_BLOCK else -(-d // -(-d // PREVIOUS_BLOCK))


def _previous_gram(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    block = _previous_block(d)
    if block is None:
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for i in range(0, d, block):
        out[i: i + block, i:] = x[:, i: i + block].T @ x[:, i:]  # (block, d - i)
        out[i + block:, i: i + block] = out[i: i + block, i + block:].T
    return out


def _previous_update(self: Moments, x: torch.Tensor, compute_dtype: torch.dtype, fold_rows: int = 0) -> torch.Tensor:
    xc = x.detach().to(compute_dtype)
    if xc.dim() == 2:
        gram = _previous_gram(xc)
    else:
        xh = xc.transpose(0, 1)
        gram = xh.transpose(1, 2) @ xh
    batch_sum = xc.sum(0)
    self.outer.add_(gram)
    self.sum.add_(batch_sum)
    self.count += x.shape[0]
    return batch_sum


@contextlib.contextmanager
def _previous_engine():
    current = Moments.update
    Moments.update = _previous_update
    try:
        yield
    finally:
        Moments.update = current


def _previous_share(d: int) -> float:
    block = _previous_block(d)
    if block is None:
        return 1.0
    return sum(min(block, d - i) * (d - i) for i in range(0, d, block)) / (d * d)


# ---- the arithmetic ------------------------------------------------------------------------------

def forward_macs(model, batches, last_logits: bool = False) -> dict:
    """Multiply-adds per real token of a forward pass: linear layers, attention, output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = sum(arch.linear_weight(m).numel() for m in model.modules() if arch.is_linear(m) and m is not head)
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).double()  # (sequences,)
    tokens = float(lengths.sum())
    causal = bool(getattr(model, "can_generate", lambda: False)())
    context = float((lengths * (lengths + 1) / 2).sum() if causal else (lengths * lengths).sum()) / tokens
    layout = arch.head_layout(model)
    attention = len(arch.block_prefixes(model)) * 2 * layout.num_heads * layout.head_dim * context  # q·k and p·v
    per_head = arch.linear_weight(head).numel() if head is not None else 0
    head_macs = per_head * (len(lengths) / tokens if last_logits else 1.0)
    return {"linears": linears, "attention": attention, "head": head_macs,
            "total": linears + attention + head_macs, "mean_context": context}


def stats_macs(stats: ActivationStats, previous: bool = False) -> dict:
    """Multiply-adds per token of the products over the distinct statistics: symmetric, full, and the engine's."""
    out = {"symmetric": 0.0, "full": 0.0, "engine": 0.0}
    for m in stats.moments.values():
        d = m.dim
        if m.diagonal_only:
            n = m.sum.numel()  # Σx² per feature (per head and feature)
            out["symmetric"] += n
            out["full"] += n
            out["engine"] += n
            continue
        heads = m.sum.numel() // d
        out["symmetric"] += heads * d * (d + 1) / 2
        out["full"] += heads * d * d
        share = 1.0 if heads > 1 else _previous_share(d) if previous else product_share(d)
        out["engine"] += heads * d * d * share
    return out


# ---- the passes ----------------------------------------------------------------------------------

def _setup(args):
    from ..data import calibration_loader, load_model

    model, tok = load_model(args.model)
    loader = calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size)
    return model, list(loader)


def _pass(kind: str, model, batches, taps):
    if kind == "full-previous":
        with _previous_engine():
            return collect_stats(model, batches, taps)
    if taps is not None:
        return collect_stats(model, batches, taps)
    extra = {"logits_to_keep": 1} if kind == "plain-last" else {}
    with torch.no_grad():
        for b in batches:
            model(**b, **extra)
    return None


def _peak_growth_child(kind: str, args) -> int | None:
    """In a fresh process: peak resident-set growth during one pass (``VmHWM`` reset before it)."""
    model, batches = _setup(args)
    taps = variant_taps(kind, model)
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


def _spread(ratios: list[float]) -> dict:
    return {"latency_ratio": statistics.median(ratios), "latency_ratio_min": min(ratios),
            "latency_ratio_max": max(ratios), "latency_ratios": ratios}


def run_overhead(args: OverheadOptions) -> dict:
    import multiprocessing as mp

    from ..errors import GeoCompError
    from ..io import resolved_args, write_json

    variants = list(dict.fromkeys(args.variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise GeoCompError(f"variant {(unknown or ['(none)'])[0]!r} does not exist; allowed: {', '.join(VARIANTS)}.")
    model, batches = _setup(args)
    taps = {kind: variant_taps(kind, model) for kind in variants}
    _pass("plain", model, batches, None)  # warm-up (allocator, kernels)
    plain, times, ratios, stats = [], {k: [] for k in variants}, {k: [] for k in variants}, {}
    for r in range(args.repeats):
        for kind in variants[r % len(variants):] + variants[: r % len(variants)]:  # rotated every repetition
            for k in ("plain", kind):
                gc.collect()
                t0 = time.perf_counter()
                out = _pass(k, model, batches, taps.get(k))
                (plain if k == "plain" else times[kind]).append(time.perf_counter() - t0)
                if out is not None:
                    stats[kind] = (out.tokens, out.nbytes(), len(out.moments), stats_macs(out, kind == "full-previous"))
                del out
            ratios[kind].append(times[kind][-1] / plain[-1])
    skip_logits_of = {kind: bool(skip_logits(model, t)) for kind, t in taps.items() if t is not None}
    fwd = forward_macs(model, batches)
    fwd_last = forward_macs(model, batches, last_logits=True)
    del model, batches
    # memory: each pass alone in a fresh process, so allocator reuse between passes cannot hide growth
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        growth = {kind: pool.apply(_peak_growth_child, (kind, args)) for kind in ["plain", *variants]}
    rows = []
    for kind in variants:
        tap_list = taps[kind]
        all_logits = tap_list is not None and not skip_logits_of[kind]  # a tap reads the output head
        forward = fwd if all_logits else fwd_last
        row = {"method": METHOD[kind], "variant": kind, **_spread(ratios[kind]),
               "seconds_median": statistics.median(times[kind]), "forward_macs_per_token": forward["total"]}
        if kind in stats:
            tokens, nbytes, distinct, macs = stats[kind]
            row.update({"taps": len(tap_list), "distinct_inputs": distinct, "stats_bytes": nbytes,
                        "stats_macs_per_token": macs["symmetric"], "stats_macs_full_products": macs["full"],
                        "stats_macs_engine": macs["engine"]})
        else:
            macs = {"symmetric": 0.0, "full": 0.0, "engine": 0.0}
        row["bound_ratio"] = (forward["total"] + macs["symmetric"]) / fwd["total"]
        row["bound_ratio_full_products"] = (forward["total"] + macs["full"]) / fwd["total"]
        row["engine_products_ratio"] = (forward["total"] + macs["engine"]) / fwd["total"]
        row["latency_to_bound"] = row["latency_ratio"] / row["bound_ratio"]
        row["peak_rss_growth_bytes"] = growth[kind]
        row["peak_extra_bytes"] = None if None in (growth[kind], growth["plain"]) else growth[kind] - growth["plain"]
        rows.append(row)
    full = next((row for row in rows if row["variant"] == "full"), None)
    tokens = next(iter(stats.values()))[0] if stats else None
    result = {
        "command": args.command_line,
        "args": resolved_args(args),
        "model": args.model,
        "data": args.data,
        "tokens": tokens,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "taps": full["taps"] if full else None,
        "distinct_inputs": full["distinct_inputs"] if full else None,
        "baseline": {"method": "forward, no hooks, logits at every position", "seconds_median": statistics.median(plain),
                     "seconds": plain, "forward_macs_per_token": fwd, "peak_rss_growth_bytes": growth["plain"]},
        "rows": rows,
        "target": {"full_latency_to_bound_max": 1.05, "method_latency_ratio_max": 1.2},
    }
    write_json(args.output, result)
    print(f"{tokens} tokens, {args.repeats} interleaved repetitions, {torch.get_num_threads()} threads; "
          f"plain forward {result['baseline']['seconds_median']:.2f} s (median), "
          f"{fwd['total']:,.0f} multiply-adds per token")
    print(f"{'variant':14s} {'ratio':>6s} {'min–max':>12s} {'bound':>6s} {'bound d²':>8s} {'/bound':>7s} {'stats MiB':>9s}")
    for row in rows:
        mib = f"{row['stats_bytes'] / 2**20:.0f}" if "stats_bytes" in row else "-"
        print(f"{row['variant']:14s} {row['latency_ratio']:6.3f} {row['latency_ratio_min']:5.3f}–{row['latency_ratio_max']:5.3f} "
              f"{row['bound_ratio']:6.3f} {row['bound_ratio_full_products']:8.3f} {row['latency_to_bound']:7.3f} {mib:>9s}")
    print(f"wrote {args.output}")
    return result
