"""Benchmark: coded KV caches against transformers' QuantizedCache and the uncompressed cache.

Continuation perplexity (docs/design.md, "How we measure"): each window prefills ``prefill`` tokens into
the cache, then the next ``score`` tokens are scored in one forward pass through that cache
(every scored prediction reads the stored context). All caches see the same windows of the
held-out split in the same process; ratios are to the uncompressed ``DynamicCache`` of the
same run. Cache bytes are the bytes of the tensors the cache holds after the scoring pass.
Decode speed: ``speed_steps`` greedy steps after a prefill of 1k / 4k tokens, as tokens/s
ratios to the uncompressed cache, measured in alternation in one process.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from ..data import calibration_loader, load_corpus, token_blocks
from ..errors import GeoCompError
from ..io import write_json
from ..eval.memory import tensor_bytes
from ..eval.perplexity import continuation_nll
from ..kv.config import QUANT_WIDTHS
from ..options import ModelDataOptions, Options, option


VARIANTS = ("fisher-bits", "aware-bits", "pca-bits", "fisher-rank", "aware-rank", "pca-rank", "aware-bits-rope_none")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(kw_only=True)
class KVCodecOptions(Options):
    """The coded caches of a KV study and the QuantizedCache baselines beside them."""

    budgets: list[float] = option([0.25, 0.125], "geocomp byte budgets: fractions of the uncompressed cache bytes",
                                  range="(0, 1]")
    quant: list[str] = option(["quanto:4"], "QuantizedCache baselines as backend:bits (quanto:4 quanto:2 hqq:4 ...)",
                              nargs="*")
    group_size: int = option(64, "latent components per float16 scale", range="[1, inf)")
    sink_tokens: int = option(4, "first tokens kept exact in coded caches", range="[0, inf)")


@dataclass(kw_only=True)
class ContinuationOptions(Options):
    """Continuation perplexity: context prefilled into the cache, the following tokens scored through it."""

    windows: int = option(4, "evaluation windows", range="[1, inf)")
    prefill: int = option(1024, "context tokens per window", range="[1, inf)")
    score: int = option(256, "scored tokens per window", range="[1, inf)")


@dataclass(kw_only=True)
class KVBenchOptions(ModelDataOptions, KVCodecOptions, ContinuationOptions):
    """Coded KV caches vs QuantizedCache vs DynamicCache: continuation perplexity."""

    eval_data: str = option("shakespeare:evaluation", "held-out text")
    dtype: str = option("bfloat16", "model and cache dtype", choices=DTYPES)
    budgets: list[float] = option([1.0, 0.75, 0.5, 0.25, 0.1875, 0.125])
    quant: list[str] = option(["quanto:4", "quanto:2"])
    variants: list[str] | None = option(None, "geocomp caches as <basis>-<bits|rank>[-rope_none][-refined] (null: "
                                        "every basis, bits and rank, and the RoPE ablation); the first is also "
                                        "checked by greedy decoding")
    widths: list[int] = option(list(QUANT_WIDTHS), "quantised widths the allocator may use besides full precision "
                               "and 0", choices=QUANT_WIDTHS)
    refine_steps: int = option(30, "optimizer steps of *-refined variants", range="[0, inf)")
    refine_windows: int = option(16, "calibration windows (prefill + 128 scored) for *-refined variants",
                                 range="[1, inf)")
    refine_prefill: int = option(512, "prefill tokens of a refinement window", range="[1, inf)")
    refine_lr: list[str] = option(["0.001"], "Adam learning rates of *-refined variants, each built once per rate: "
                                  "a number (absolute) or a number and 'rel' (a fraction of each head's decoder RMS), "
                                  "e.g. 0.001 0.03rel")
    speed_steps: int = option(0, "decode steps timed per cache (0: no speed test)", range="[0, inf)")
    speed_contexts: list[int] = option([1024, 4096], "contexts for decode speed", range="[1, inf)")
    speed_methods: list[str] = option(["quantized-quanto-int4@0.25", "geocomp-fisher-bits@0.25",
                                       "geocomp-fisher-bits+reduced@0.25"],
                                      "method@budget timed beside dynamic; geocomp-...+reduced@budget: attention on "
                                      "the latents", nargs="*")
    greedy_tokens: int = option(0, "greedy tokens generated from each window's context, compared with the "
                                "uncompressed cache", range="[0, inf)")
    output: str = "recipes/results/kv_smollm2_continuation.json"
    plot: str | None = option(None, "also plot perplexity against cache bytes to this PNG")


def parse_variant(name: str) -> dict:
    """``"<basis>-<bits|rank>[-rope_none][-refined]"`` → KVConfig fields (and ``refined``)."""
    parts = name.split("-")
    extra = parts[2:]
    if len(parts) < 2 or parts[1] not in ("bits", "rank") or not set(extra) <= {"rope_none", "refined"} \
            or len(set(extra)) != len(extra):
        raise GeoCompError(f"KV variant {name!r} is not <basis>-<bits|rank>[-rope_none][-refined], e.g. 'fisher-bits'.")
    return {"method": parts[0], "bits": parts[1] == "bits", "rope": "none" if "rope_none" in extra else "average",
            "refined": "refined" in extra}


def parse_lr(spec: str) -> tuple[float, bool]:
    """``"0.001"`` → (0.001, False); ``"0.03rel"`` → (0.03, True): a rate relative to each decoder's RMS."""
    relative = spec.endswith("rel")
    try:
        lr = float(spec[:-3] if relative else spec)
    except ValueError:
        lr = float("nan")
    if not lr > 0 or lr == float("inf"):
        raise GeoCompError(f"refine_lr {spec!r} is not a positive number, optionally followed by 'rel' (e.g. 0.03rel).")
    return lr, relative


def cache_factories(model, stats, budgets, quant_backends, variants=VARIANTS, refine_windows=None, refine_steps=0,
                    refine_prefill=512, refine_lr=("0.001",), **options):
    """(method, budget, make_cache, extra) for every cache in the study."""
    from transformers import DynamicCache, QuantizedCache

    from ..kv import build_plan, describe, refine
    from ..kv.config import KVConfig

    out = [("dynamic", 1.0, lambda: DynamicCache(config=model.config), {})]
    for backend, nbits in quant_backends:
        nominal = nbits / (8 * next(model.parameters()).element_size())
        out.append((f"quantized-{backend}-int{nbits}", nominal,
                    lambda b=backend, n=nbits: QuantizedCache(backend=b, config=model.config, nbits=n), {}))
    for i, variant in enumerate(variants):
        fields = parse_variant(variant)
        refined = fields.pop("refined")
        for budget in budgets:
            if budget >= 1 and i > 0:
                continue  # budget 1.0 stores keys and values as given: one row covers every variant
            if not fields["bits"] and budget < 0.25 or fields["rope"] == "none" and budget not in (0.25, 0.125):
                continue  # rank alone at these budgets, and the RoPE ablation elsewhere, are not informative
            settings = list(refine_lr) if refined else [None]
            for setting in settings:
                plan = build_plan(model, stats, KVConfig(budget=budget, **fields, **options))
                label = f"geocomp-{variant}"
                if setting is not None and not plan.identity:
                    lr, rel = parse_lr(setting)
                    refine(model, plan, refine_windows, refine_prefill, steps=refine_steps, lr=lr, relative_lr=rel)
                    print(f"refined {variant} @ {budget}: {plan.refinement}", flush=True)
                    if len(settings) > 1:  # one row per learning rate
                        label += f"-lr{setting}"
                out.append((label, budget, lambda reduced=False, p=plan: p.cache(model, reduced),
                            {"plan_bytes_ratio": plan.ratio, "allocation": describe(plan),
                             **({"refinement": plan.refinement} if plan.refinement else {})}))
    return out


@torch.no_grad()
def decode_tokens_per_s(model, context: torch.Tensor, make_cache, steps: int) -> float:
    cache = make_cache()
    out = model(input_ids=context, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - start)


@torch.no_grad()
def greedy_agreement(model, prompts: torch.Tensor, new_tokens: int, make_cache) -> tuple[bool, float]:
    """Greedy continuations of ``prompts`` through a cache vs the uncompressed cache: (identical, fraction equal)."""
    from transformers import DynamicCache

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0)
    mask = torch.ones_like(prompts)
    ref = model.generate(input_ids=prompts, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **kw)
    out = model.generate(input_ids=prompts, attention_mask=mask, past_key_values=make_cache(), **kw)
    new_ref, new_out = ref[:, prompts.shape[1]:], out[:, prompts.shape[1]:]
    return bool(torch.equal(new_ref, new_out)), float((new_ref == new_out).float().mean())


QUANT_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}  # what transformers' QuantizedCache backends accept
QUANT_MODULES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def parse_quant(spec: str) -> tuple[str, int]:
    """``backend:bits`` → (backend, bits), checking the backend is known and installed."""
    import importlib.util

    backend, sep, bits = spec.partition(":")
    if not sep or backend not in QUANT_BITS or not bits.isdigit() or int(bits) not in QUANT_BITS[backend]:
        allowed = ", ".join(f"{b}:{n}" for b, ns in QUANT_BITS.items() for n in ns)
        raise GeoCompError(f"QuantizedCache baseline {spec!r} is not one of {allowed}.")
    if importlib.util.find_spec(QUANT_MODULES[backend].split(".")[0]) is None or (
            "." in QUANT_MODULES[backend] and importlib.util.find_spec(QUANT_MODULES[backend]) is None):
        raise GeoCompError(f"the {backend} baseline needs the bench extra: pip install 'hf-geocomp[bench]'.")
    return backend, int(bits)


def quantized_cache_refusal(config) -> str | None:
    """Why transformers' ``QuantizedCache`` refuses a model of this ``config``, or None if it runs.

    The rule of ``QuantizedCache.__init__`` (transformers 5.23, ``cache_utils``): every layer type of the text
    config, as its own ``get_layer_types_and_kwargs`` reads it, must be ``full_attention``; models with
    sliding-window (Gemma 2/3, Mistral, Qwen2 with ``use_sliding_window``) or chunked layers are refused. Read
    from the config alone, so the decision is made before any weights load.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    other = sorted(set(layer_types) - {"full_attention"})
    if not other:
        return None
    return f"transformers' QuantizedCache supports only full-attention layers, and this model has {', '.join(other)}"


def quant_baselines(specs: list[str], config, explicit: bool, where: str = "kv_baselines") -> tuple[list, list]:
    """The QuantizedCache baselines of ``specs`` that can run on a model of ``config``: ``([(backend, bits)],
    skipped)``, ``skipped`` a list of ``{"method", "reason"}`` for results files.

    Decided from the config alone, before any weights load. A baseline that cannot run is skipped with one
    printed line, unless the user named the baselines (``explicit``: not the command's default), which is
    refused at once.
    """
    parsed = [parse_quant(spec) for spec in specs]
    reason = quantized_cache_refusal(config) if parsed else None
    if reason is None:
        return parsed, []
    if explicit:
        raise GeoCompError(f"{where} {', '.join(specs)} cannot run on this model: {reason}; drop them "
                           f"({where} empty) to run without them.")
    skipped = [{"method": f"quantized-{b}-int{n}", "reason": reason} for b, n in parsed]
    print(f"skipping the QuantizedCache baseline(s) {', '.join(s['method'] for s in skipped)}: {reason}.", flush=True)
    return [], skipped


def default_of(options_cls, name: str):
    """The default value of field ``name`` of an options dataclass (to tell a user's choice from the default)."""
    import dataclasses

    f = next(f for f in dataclasses.fields(options_cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def run_kv_bench(args: KVBenchOptions) -> dict:
    from ..data import load_config, load_model
    from ..kv import collect_kv_stats

    backends, skipped = quant_baselines(args.quant, load_config(args.model), args.quant != default_of(
        type(args), "quant"), "--quant")  # bad baselines fail before the model loads
    for spec in args.refine_lr:
        parse_lr(spec)
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype)
    loader = calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size)
    args.variants = args.variants or list(VARIANTS)
    parsed = [parse_variant(v) for v in args.variants]  # bad names fail before the long calibration
    stats = collect_kv_stats(model, loader, "fisher" if any(p["method"] == "fisher" for p in parsed) else "aware")
    blocks = token_blocks(tok, load_corpus(args.eval_data), args.prefill + args.score,
                          max_tokens=args.windows * (args.prefill + args.score), model=model)
    windows = torch.stack([b["input_ids"] for b in blocks])[: args.windows]  # (windows, prefill + score)
    refine_windows = None
    if any(p["refined"] for p in parsed):  # calibration text, never the evaluation split
        refine_blocks = token_blocks(tok, load_corpus(args.data), args.refine_prefill + 128,
                                     max_tokens=args.refine_windows * (args.refine_prefill + 128), model=model)
        refine_windows = torch.stack([b["input_ids"] for b in refine_blocks])[: args.refine_windows]
    factories = cache_factories(model, stats, args.budgets, backends, args.variants, refine_windows=refine_windows,
                                refine_steps=args.refine_steps, refine_prefill=args.refine_prefill,
                                refine_lr=args.refine_lr,
                                widths=tuple(args.widths),
                                group_size=args.group_size, sink_tokens=args.sink_tokens,
                                reference_tokens=args.prefill)

    rows, base = [], None
    for method, budget, make, extra in factories:
        t0 = time.perf_counter()
        try:
            nll, n, nbytes = continuation_nll(model, windows, args.prefill, make)
        except Exception as e:  # recorded, then the run ends non-zero (below)
            rows.append({"method": method, "budget": budget, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{method:34s} {budget:6.4f}  error: {rows[-1]['error']}", flush=True)
            continue
        row = {"method": method, "budget": budget, "kv_bytes": nbytes, "ppl": math.exp(nll), "tokens": n,
               "seconds": round(time.perf_counter() - t0, 1), **extra}
        if base is None:
            base = row
        row["kv_bytes_ratio"] = nbytes / base["kv_bytes"]
        row["ppl_ratio"] = row["ppl"] / base["ppl"]
        rows.append(row)
        print(f"{method:34s} {budget:6.4f}  bytes {row['kv_bytes_ratio']:.4f}  ppl {row['ppl']:.3f} "
              f"({100 * (row['ppl_ratio'] - 1):+.1f}%)  {row['seconds']}s", flush=True)

    greedy = []
    if args.greedy_tokens > 0:
        for m, b, f, _ in factories:
            if m == f"geocomp-{args.variants[0]}":
                same, frac = greedy_agreement(model, windows[:, : args.prefill], args.greedy_tokens, f)
                greedy.append({"method": m, "budget": b, "new_tokens": args.greedy_tokens, "prompts": int(windows.shape[0]),
                               "identical": same, "token_agreement": frac})
                print(f"greedy {m:34s} {b:6.4f}  identical={same}  agreement {frac:.3f}", flush=True)

    speed = []
    if args.speed_steps > 0:
        from ..kv import use_reduced_attention

        plain = model.config._attn_implementation
        chosen = {m: (m, b, f, False) for m, b, f, _ in factories if m == "dynamic"}
        for spec in args.speed_methods:  # method@budget; a "+reduced" geocomp method attends to the latents
            name, budget = spec.split("@")
            base, reduced = name.removesuffix("+reduced"), name.endswith("+reduced")
            match = [f for m, b, f, _ in factories if m == base and b == float(budget)]
            if not match:
                raise GeoCompError(f"--speed-methods {spec!r} names no cache of this run.")
            chosen[spec] = (name, float(budget), functools.partial(match[0], reduced=True) if reduced else match[0],
                            reduced)
        corpus_ids = torch.cat(list(windows.reshape(-1).split(args.prefill + args.score)))
        for ctx in args.speed_contexts:
            context = corpus_ids.repeat(math.ceil(ctx / corpus_ids.numel()))[:ctx][None]
            rates = {}
            for k, (_, _, f, reduced) in chosen.items():
                if reduced:
                    use_reduced_attention(model)
                try:
                    rates[k] = decode_tokens_per_s(model, context, f, args.speed_steps)
                finally:
                    model.set_attn_implementation(plain)
            for k, (m, b, _, _) in chosen.items():
                speed.append({"method": m, "budget": b, "context": ctx, "tokens_per_s": rates[k],
                              "tokens_per_s_ratio": rates[k] / rates["dynamic"]})
                print(f"decode @ {ctx:5d}: {m:34s} {b:6.4f}  {rates[k]:.2f} tok/s  "
                      f"({rates[k] / rates['dynamic']:.2f}x)", flush=True)

    result = {"command": args.command_line, "model": args.model, "dtype": args.dtype,
              "data": {"calibration": args.data, "calibration_tokens": stats.tokens, "evaluation": args.eval_data,
                       "windows": int(windows.shape[0]), "prefill": args.prefill, "score": args.score},
              "baseline": base, "rows": rows, "skipped": skipped, "speed": speed, "greedy": greedy,
              "notes": "budget = fraction of the uncompressed cache bytes in the model dtype (quantized-*: nominal "
                       "bits/element over the dtype's bits); kv_bytes = bytes of the tensors the cache holds after "
                       "prefill + score tokens, batch = windows; ppl_ratio and tokens_per_s_ratio are to the "
                       "uncompressed DynamicCache of this run."}
    write_json(args.output, result)
    if args.plot:
        plot_kv(result, args.plot)
    failed = [r["method"] for r in rows if "error" in r]
    if failed:  # written beside the others for the record, but the run did not do what it was asked
        raise GeoCompError(f"{len(failed)} cache(s) failed ({', '.join(failed)}); their errors are in {args.output}.")
    return result


def plot_kv(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in result["rows"] if "ppl" in r})
    for m in methods:
        pts = sorted((r["kv_bytes_ratio"], r["ppl_ratio"]) for r in result["rows"] if r["method"] == m and "ppl" in r)
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xlabel("cache bytes / uncompressed cache bytes")
    ax.set_ylabel("continuation perplexity / uncompressed")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{result['model']}: KV cache coding ({result['data']['evaluation']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
