"""Decode and prefill speed of KV caches, as ratios to ``DynamicCache`` interleaved in one run.

For each (batch, context) the context is prefilled once into a ``DynamicCache``; every cache
under test is then filled from those keys and values (``cache.update`` per layer, what a
prefill forward does) so no timing depends on a separate prefill. Each cache ``X`` is timed
for ``steps`` greedy decode steps in the order ``A X1 A X2 … A`` per repeat (``A`` the
uncompressed ``DynamicCache``), and its ratio in a repeat is its tokens/s over the mean of
the two ``A`` runs around it; rows give the median ratio over repeats with min and max, so
one slow measurement cannot move a ratio. Prefill time is measured the same way at batch 1.

Beside each ratio: the bound from bytes read per decode step, ``(W + C_A) / (W + C_X)`` with
``W`` the model's weight bytes (every weight is read once per step; tied embeddings once) and
``C`` the cache bytes held for the context, what a decoder at the memory limit would reach.
The machine's load average is recorded before and after (shared machines).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..data import block_bos, calibration_loader, load_config, load_corpus, load_model, token_blocks
from ..errors import GeoCompError
from .kv_bench import DTYPES, KVCodecOptions, cache_factories, default_of, quant_baselines
from ..eval.memory import tensor_bytes
from ..io import resolved_args, write_json
from ..options import ModelDataOptions, ThreadsOption, option


@dataclass(kw_only=True)
class KVSpeedOptions(ModelDataOptions, KVCodecOptions, ThreadsOption):
    """Decode/prefill speed of KV caches as ratios to DynamicCache (interleaved A X A ..., median with min-max,
    beside the bytes-read bound)."""

    eval_data: str = option("shakespeare:evaluation", "text of the timed contexts")
    dtypes: list[str] = option(["float32", "bfloat16"], f"model dtypes timed in one run, each of {', '.join(DTYPES)}")
    quant: list[str] = option(["quanto:4", "hqq:4"])
    configs: list[str] = option(["1x4096", "8x4096", "1x8064"], "BATCHxCONTEXT[:STEPS] timed")
    steps: int = option(16, "greedy decode steps per timed run, unless a config says :STEPS", range="[1, inf)")
    repeats: int = option(3, "interleaved repeats per configuration", range="[1, inf)")
    prefill_context: int = option(4096, "prefill timed at batch 1 (0: skip)", range="[0, inf)")
    prefill_repeats: int = option(3, "interleaved prefill repeats", range="[1, inf)")
    threads: int = 2
    torch_path: bool = option(False, "also time the smallest budget on the PyTorch path (no fused kernel), first "
                              "config only")
    profile_steps: int = option(0, "also profile this many decode steps per cache at the first config "
                                "(torch.profiler)", range="[0, inf)")
    allow_torch_path: bool = option(False, "run even if the fused kernel cannot be built (then geocomp rows time the "
                                    "PyTorch path)")
    output: str = "recipes/results/kv_smollm2_decode_speed_fused.json"


@dataclass(kw_only=True)
class KVKernelOptions(ThreadsOption):
    """One layer's decode-step attention on a synthetic coded cache: the fused path vs SDPA + cat (no model;
    seconds)."""

    widths: list[str] = option(help="LABEL=bits:n,bits:n,... components per width of each codec (bits 0: full "
                               "precision)")
    configs: list[str] = option(["1x4096", "8x4096", "1x8192"], "BATCHxLENGTH pairs")
    kv_heads: int = option(3, "KV heads", range="[1, inf)")
    head_dim: int = option(64, "head dim", range="[1, inf)")
    query_group: int = option(3, "query heads per KV head", range="[1, inf)")
    group_size: int = option(64, "components per float16 scale", range="[1, inf)")
    calls: int = option(20, "calls per timed run", range="[1, inf)")
    repeats: int = option(5, "interleaved repeats", range="[1, inf)")
    threads: int = 2
    output: str = "recipes/results/kv_smollm2_decode_kernel.json"


def _load() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]] if os.path.exists("/proc/loadavg") else []


def sharing(load_before: list[float]) -> str:
    """What the load averages before a run say about other jobs on the cores (its own threads come after)."""
    if not load_before:
        return "unknown: no load averages on this system"
    if load_before[0] < 0.5:
        return f"idle before the run (1-minute load {load_before[0]:.2f}); see load_after for the run itself"
    return f"other jobs shared the cores (1-minute load {load_before[0]:.2f} before the run)"


def weight_bytes(model) -> int:
    """Bytes of the model's distinct parameters and buffers (tied weights once)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


@contextmanager
def attention(model, name: str):
    plain = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(plain)


def fill(cache, states):
    """``cache`` holding the prefilled ``states`` [(keys, values)] of every layer (one update per layer)."""
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)
    return cache


@torch.no_grad()
def decode_rate(model, cache, token: torch.Tensor, steps: int) -> float:
    """Greedy tokens/s (all sequences of the batch) of ``steps`` steps from ``token`` (batch, 1)."""
    start = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return token.shape[0] * steps / (time.perf_counter() - start)


@torch.no_grad()
def profile_decode(model, cache, token: torch.Tensor, steps: int, top: int = 15) -> dict:
    """torch.profiler over ``steps`` decode steps: total and the ``top`` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_rate(model, cache, token, steps)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return {"steps": steps, "self_cpu_ms_total": total / 1e3,
            "top": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in ops[:top]]}


def _summary(ratios: list[float]) -> dict:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "all": ratios}


def interleaved(baseline, others: dict, repeats: int) -> dict:
    """``A X1 A X2 … A`` per repeat; per X the ratios of its value to the mean of its two neighbouring A values."""
    ratios = {k: [] for k in others}
    values = {"baseline": [], **{k: [] for k in others}}
    for _ in range(repeats):
        before = baseline()
        values["baseline"].append(before)
        for k, measure in others.items():
            x = measure()
            after = baseline()
            values[k].append(x)
            values["baseline"].append(after)
            ratios[k].append(x / ((before + after) / 2))
            before = after
    return {k: {**_summary(r), "values": values[k]} for k, r in ratios.items()} | {"baseline": values["baseline"]}


def run_kv_speed(args: KVSpeedOptions) -> dict:
    """Every dtype of ``args.dtypes`` in one run; each row's ratios are to DynamicCache in its own dtype and
    (``*_vs_fastest``) to the fastest uncompressed configuration measured in any dtype, what a user gets over
    their best option; ``bits_per_element`` beside each budget (a budget is a fraction of the dtype's bytes)."""
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        raise GeoCompError(f"--dtypes must name one or more of {', '.join(DTYPES)}, got {args.dtypes}.")
    runs = {d: _run_dtype(args, d) for d in args.dtypes}
    rows = [r for run in runs.values() for r in run["rows"]]
    prefill = [r for run in runs.values() for r in run["prefill"]]
    fastest = {}  # (batch, context) → the uncompressed tokens/s of the fastest dtype
    for r in rows:
        if r["method"] == "baseline":
            key = r["batch"], r["context"]
            fastest[key] = max(fastest.get(key, 0.0), r["tokens_per_s"])
    for r in rows:
        r["tokens_per_s_vs_fastest"] = r["tokens_per_s"] / fastest[r["batch"], r["context"]]
    if prefill:
        quickest = min(run["prefill_seconds"] for run in runs.values() if run["prefill_seconds"])
        for r in prefill:
            r["latency_vs_fastest"] = r["seconds"] / quickest
    first = runs[args.dtypes[0]]
    result = {"command": args.command_line, "model": args.model, "dtypes": list(args.dtypes),
              "data": {"calibration": args.data, "calibration_tokens": first["tokens"], "context_text": args.eval_data},
              "baseline": {"method": "dynamic", "weights_bytes": {d: run["weights"] for d, run in runs.items()},
                           "prefill_seconds": {d: run["prefill_seconds"] for d, run in runs.items()}},
              "rows": rows, "skipped": first["skipped"], "prefill": prefill, "profiles": {f"{d} {k}": v for d, run in runs.items()
                                                             for k, v in run["profiles"].items()},
              "machine": first["machine"] | {"load_after": _load()},
              "options": resolved_args(args),
              "notes": "tokens_per_s_ratio: median over repeats of tokens/s over the mean of the DynamicCache runs "
                       "just before and after (A X A ...) in the same dtype, with min/max; tokens_per_s_vs_fastest: "
                       "tokens/s over the uncompressed (baseline) tokens/s of the fastest dtype at the same batch and "
                       "context; bits_per_element: bits the cache holds per cached key or value element (a budget is "
                       "a fraction of the dtype's own bytes: 0.25 is 8 bits in float32, 4 in bfloat16); bound_ratio = "
                       "(weights + DynamicCache bytes) / (weights + cache bytes), the speed-up of a decoder limited by "
                       "bytes read per step; kv_bytes: bytes of the cached tokens after prefill, kv_bytes_allocated: "
                       "bytes its tensors hold; prefill latency_ratio: time to prefill into the cache over "
                       "DynamicCache in the same dtype, same interleaving; latency_vs_fastest: over the fastest "
                       "dtype's DynamicCache prefill (median seconds); every row of a batch holds the same prefilled "
                       "context (prefilled once at batch 1)."}
    write_json(args.output, result)
    return result


def _run_dtype(args: KVSpeedOptions, dtype_name: str) -> dict:
    """The decode and prefill rows of one model dtype."""
    dtype = getattr(torch, dtype_name)
    configs, steps_of = [], {}
    for spec in args.configs:  # "BATCHxCONTEXT" or "BATCHxCONTEXT:STEPS"
        try:
            shape, _, steps = spec.partition(":")
            batch, ctx = (int(x) for x in shape.split("x"))
        except ValueError:
            raise GeoCompError(f"--configs {spec!r} is not BATCHxCONTEXT[:STEPS], e.g. 8x4096:8.") from None
        configs.append((batch, ctx))
        steps_of[batch, ctx] = int(steps) if steps else args.steps
    backends, skipped = quant_baselines(args.quant, load_config(args.model), args.quant != default_of(
        type(args), "quant"), "--quant")  # decided from the config, before the weights load
    model, tok = load_model(args.model, dtype=dtype)
    longest = max(ctx + steps_of[b, ctx] for b, ctx in configs) + 1
    if longest > model.config.max_position_embeddings:
        raise GeoCompError(f"context + steps = {longest} exceeds the model's {model.config.max_position_embeddings} "
                           "positions.")
    torch.set_num_threads(args.threads)
    load_before = _load()
    from ..kv import collect_kv_stats, fused

    if fused.kernel() is None and not args.allow_torch_path:
        raise GeoCompError("the fused decode kernel is not available (see the warning above); pass "
                           "--allow-torch-path to time the PyTorch path instead.")
    stats = collect_kv_stats(model, calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size), "fisher")
    factories = cache_factories(model, stats, args.budgets, backends, ["fisher-bits"], group_size=args.group_size,
                                sink_tokens=args.sink_tokens, reference_tokens=max(ctx for _, ctx in configs))
    methods = {}  # label → (method, budget, make, attention implementation)
    for method, budget, make, _ in factories:
        if method == "dynamic":
            continue
        if method.startswith("geocomp"):
            methods[f"{method}@{budget}"] = (method, budget, lambda m=make: m(reduced=True), "geocomp_reduced")
        else:
            methods[f"{method}@{budget}"] = (method, budget, make, "sdpa")
    dynamic = next(make for m, _, make, _ in factories if m == "dynamic")
    bos = block_bos(tok, model)  # one sequence of concatenated blocks: the model's BOS at its start only
    text = torch.cat([torch.tensor([bos] if bos is not None else [], dtype=torch.long)] + [
        b["input_ids"] for b in token_blocks(tok, load_corpus(args.eval_data), 1024,
                                             max_tokens=max(c for _, c in configs) * 8, bos=None)])
    weights = weight_bytes(model)
    rows, profiles = [], {}

    def timed_decode(make, impl, states, token, torch_path=False):
        with attention(model, impl), fused.disabled(torch_path):
            return decode_rate(model, fill(make(), states), token, steps_of[token.shape[0], states[0][0].shape[-2]])

    prefilled = {}  # context → (states, next token) of one sequence, prefilled once
    for batch, ctx in configs:
        if ctx not in prefilled:
            with torch.no_grad(), attention(model, "sdpa"):
                one = dynamic()
                out = model(input_ids=text[None, :ctx], past_key_values=one, use_cache=True)
            prefilled[ctx] = ([(layer.keys, layer.values) for layer in one.layers], out.logits[:, -1:].argmax(-1))
            del out
        single, first = prefilled[ctx]
        # a batch repeats the sequence: decode cost does not depend on what the rows hold
        states = [(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous())
                  for k, v in single]
        token = first.expand(batch, 1).contiguous()
        ref = fill(dynamic(), states)
        chosen = {"dynamic@1.0": ("dynamic", 1.0, dynamic, "sdpa"), **methods}  # A/A: the noise of the baseline
        if args.torch_path and (batch, ctx) == configs[0]:
            g = next(k for k in methods if k.startswith("geocomp") and methods[k][1] == min(args.budgets))
            chosen[g + "+torch_path"] = methods[g]
        bytes_of = {}
        for label, (_, _, make, impl) in chosen.items():
            with attention(model, impl):
                c = fill(make(), states)
            bytes_of[label] = (c.nbytes() if hasattr(c, "nbytes") else tensor_bytes(c),
                               tensor_bytes(c))
            del c
        base_bytes = tensor_bytes(ref)
        result = interleaved(lambda: timed_decode(dynamic, "sdpa", states, token),
                             {k: (lambda m=m, tp=k.endswith("+torch_path"): timed_decode(m[2], m[3], states, token, tp))
                              for k, m in chosen.items()}, args.repeats)
        base_rate = statistics.median(result["baseline"])
        elements = base_bytes // dtype.itemsize  # cached key and value elements
        rows.append({"method": "baseline", "dtype": dtype_name, "budget": 1.0, "bits_per_element": 8 * dtype.itemsize,
                     "batch": batch, "context": ctx,
                     "steps": steps_of[batch, ctx], "tokens_per_s": base_rate,
                     "tokens_per_s_all": result["baseline"], "tokens_per_s_ratio": 1.0, "kv_bytes": base_bytes,
                     "kv_bytes_ratio": 1.0, "bound_ratio": 1.0})
        for label, (method, budget, _, impl) in chosen.items():
            r = result[label]
            used, allocated = bytes_of[label]
            rows.append({"method": method + ("+torch_path" if label.endswith("+torch_path") else ""),
                         "dtype": dtype_name, "budget": budget, "bits_per_element": 8 * used / elements, "batch": batch, "context": ctx, "attention": impl,
                         "tokens_per_s": statistics.median(r["values"]), "tokens_per_s_ratio": r["median"],
                         "ratio_min": r["min"], "ratio_max": r["max"], "ratios": r["all"],
                         "kv_bytes": used, "kv_bytes_allocated": allocated, "kv_bytes_ratio": used / base_bytes,
                         "bound_ratio": (weights + base_bytes) / (weights + used)})
            print(f"decode {dtype_name} b={batch} ctx={ctx}: {label:40s} {r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]  "
                  f"bound {rows[-1]['bound_ratio']:.2f}x  bytes {used / base_bytes:.3f}", flush=True)
        if args.profile_steps and (batch, ctx) == configs[0]:
            for label, (_, _, make, impl) in [("dynamic", (None, None, dynamic, "sdpa")),
                                              *[(k, m) for k, m in chosen.items() if k.startswith("geocomp")]]:
                with attention(model, impl), fused.disabled(label.endswith("+torch_path")):
                    profiles[f"{label} b={batch} ctx={ctx}"] = profile_decode(model, fill(make(), states), token,
                                                                              args.profile_steps)
        del ref, states

    prefill = []
    if args.prefill_context:
        ctx = args.prefill_context
        context = text[:ctx][None]

        def timed_prefill(make, impl):
            with torch.no_grad(), attention(model, impl):
                cache = make()
                start = time.perf_counter()
                model(input_ids=context, past_key_values=cache, use_cache=True)
                return 1.0 / (time.perf_counter() - start)  # a rate, so that ratios read as speed-ups

        result = interleaved(lambda: timed_prefill(dynamic, "sdpa"),
                             {k: (lambda m=m: timed_prefill(m[2], m[3])) for k, m in methods.items()},
                             args.prefill_repeats)
        prefill_seconds = statistics.median(1 / r_ for r_ in result["baseline"])
        bits = {(r["method"], r["budget"]): r["bits_per_element"] for r in rows}
        for label, (method, budget, _, impl) in methods.items():
            r = result[label]
            times = [1 / r_ for r_ in r["all"]]  # time ratio = 1 / speed ratio
            prefill.append({"method": method, "dtype": dtype_name, "budget": budget,
                            "bits_per_element": bits.get((method, budget)), "batch": 1, "context": ctx,
                            "latency_ratio": statistics.median(times), "latency_ratio_min": min(times),
                            "latency_ratio_max": max(times), "seconds": statistics.median(1 / v for v in r["values"])})
            print(f"prefill {dtype_name} ctx={ctx}: {label:40s} time {prefill[-1]['latency_ratio']:.2f}x "
                  f"[{min(times):.2f}, {max(times):.2f}]", flush=True)
    else:
        prefill_seconds = None
    return {"rows": rows, "prefill": prefill, "profiles": profiles, "weights": weights, "tokens": stats.tokens,
            "skipped": skipped,
            "prefill_seconds": prefill_seconds,
            "machine": {"threads": args.threads, "cpus": os.cpu_count(), "load_before": load_before,
                        "fused_kernel": fused.kernel() is not None, "shared": sharing(load_before)}}


def synthetic_codec(kv_heads: int, head_dim: int, widths: dict, group_size: int, seed: int = 0):
    """A codec with ``widths`` {bits: components} (bits 0: full precision) over random columns and bases."""
    from ..kv.allocate import FULL
    from ..kv.cache import Codec

    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(kv_heads * head_dim, generator=g).tolist()
    groups, start = [], 0
    for bits, n in widths.items():
        groups.append((FULL if bits == 0 else bits, cols[start: start + n]))
        start += n
    enc = torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim, generator=g))[0]
    return Codec(groups, enc, enc.transpose(1, 2).contiguous(), group_size)


def run_kv_kernel_speed(args: KVKernelOptions) -> dict:
    """One attention layer's decode step on a synthetic coded cache (no model): the fused path (and the
    PyTorch path) against SDPA on the bfloat16 keys and values plus the DynamicCache append (torch.cat)."""
    from ..kv import fused

    if fused.kernel() is None:
        raise GeoCompError("the fused decode kernel is not available (see the warning above).")
    torch.set_num_threads(args.threads)
    load_before = _load()
    kv_heads, d, group = args.kv_heads, args.head_dim, args.query_group
    rows = []
    for spec in args.widths:  # "label=bits:n,bits:n,..." per codec (K and V alike)
        label, _, body = spec.partition("=")
        widths = {int(b): int(n) for b, n in (item.split(":") for item in body.split(","))}
        codec = synthetic_codec(kv_heads, d, widths, args.group_size)
        for batch, length in [tuple(int(x) for x in c.split("x")) for c in args.configs]:
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, kv_heads, length, d, generator=g).bfloat16()
            parts = codec.encode(x)
            q = torch.randn(batch, kv_heads * group, 1, d, generator=g).bfloat16()
            p = torch.rand(batch, kv_heads, group, length, generator=g).softmax(-1)
            one = x[:, :, :1]

            def plain():
                start = time.perf_counter()
                for _ in range(args.calls):
                    k, v = torch.cat([x, one], -2), torch.cat([x, one], -2)  # DynamicCache.update
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                return args.calls / (time.perf_counter() - start)

            def coded(torch_path=False):
                qf = q.float().reshape(batch, kv_heads, group, d)
                with fused.disabled(torch_path):
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fused.coded_scores(qf, codec, parts, length)
                        fused.coded_values(p, codec, parts, length)
                    return args.calls / (time.perf_counter() - start)

            result = interleaved(plain, {"fused": coded, "torch_path": lambda: coded(True)}, args.repeats)
            nbytes = sum(t.numel() * t.element_size() for t in parts) * 2  # K and V
            for path in ("fused", "torch_path"):
                r = result[path]
                rows.append({"method": f"geocomp-{path}", "budget": label, "batch": batch, "context": length,
                             "widths": widths, "speed_ratio": r["median"], "ratio_min": r["min"], "ratio_max": r["max"],
                             "kv_bytes_ratio": nbytes / (2 * x.numel() * x.element_size())})
                print(f"{label:8s} b={batch} T={length}: {path:10s} {r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}] "
                      f"of SDPA + cat", flush=True)
    result = {"command": args.command_line, "model": f"synthetic layer: {kv_heads} KV heads x {d}, {group} queries "
                                                     "per KV head (SmolLM2-135M's shape)",
              "data": "random keys and values", "baseline": {"method": "sdpa+cat", "dtype": "bfloat16"}, "rows": rows,
              "machine": {"threads": args.threads, "cpus": os.cpu_count(), "load_before": load_before,
                          "load_after": _load(), "shared": sharing(load_before)},
              "options": resolved_args(args),
              "notes": "speed_ratio: calls/s of one layer's decode-step attention over the coded cache (scores + value "
                       "sums, K and V) over SDPA on the bfloat16 cache plus DynamicCache's torch.cat append; median of "
                       "interleaved repeats (A X A ...), min/max beside it."}
    write_json(args.output, result)
    return result
