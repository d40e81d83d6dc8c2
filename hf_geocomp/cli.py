"""``hf-geocomp``: the command line.

User mistakes end with one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from .errors import GeoCompError


def _run_lazy(target: str, args) -> None:
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module, __package__), name)(args)


def _lazy(target: str):
    """A handler that imports ``.module:function`` only when its subcommand runs (light start-up).

    A ``partial`` of a module-level function, so ``args`` stays picklable for spawned workers.
    """
    return functools.partial(_run_lazy, target)


def _add_model_data(p: argparse.ArgumentParser, tokens: int) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled name (smollm2-135m, minilm-l6), model folder, .gguf file or Hub id")
    p.add_argument("--data", default="shakespeare:calibration",
                   help="text source: shakespeare:<split|work+work>, pydoc[:split], file:<a+b>, hf:<ds>:<split>")
    p.add_argument("--tokens", type=int, default=tokens, help=f"calibration tokens (default {tokens})")
    p.add_argument("--block-size", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-geocomp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="spectra of activations, per-head K/V and weights → report.json + plots")
    _add_model_data(a, tokens=16384)
    a.add_argument("--modules", nargs="*", help="only these module patterns (glob, or re:<regex>)")
    a.add_argument("--output", "-o", default="runs/analyze", help="output folder (default runs/analyze)")
    a.add_argument("--save-stats", action="store_true", help="also write stats.safetensors for later steps")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(handler=_analyze)

    b = sub.add_parser("bench-overhead", help="calibration pass time and memory vs plain forward passes")
    _add_model_data(b, tokens=8192)
    b.add_argument("--repeats", type=int, default=3, help="timed repetitions of each pass (default 3)")
    b.add_argument("--output", "-o", default="recipes/results/geometry_overhead.json", help="results JSON")
    b.set_defaults(handler=_lazy(".eval.overhead:run_overhead"))
    lb = sub.add_parser("lora-bench", help="H2 study: uniform LoRA vs SpectralLoRA vs EVA at one parameter budget")
    _add_model_data(lb, tokens=4096)
    lb.set_defaults(model="minilm-l6", block_size=128)
    lb.add_argument("--methods", nargs="+", default=["head-only", "lora", "eva", "spectral-df", "spectral-df-principal"],
                    help="methods to compare (see hf_geocomp.lora.bench.METHODS)")
    lb.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    lb.add_argument("--r", type=int, default=8, help="rank of the reference uniform LoRA; sets the budget (default 8)")
    lb.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    lb.add_argument("--epochs", type=float, default=2, help="training epochs (default 2)")
    lb.add_argument("--train-batch", type=int, default=16, help="training batch size (default 16)")
    lb.add_argument("--words", type=int, default=64, help="words per passage (default 64)")
    lb.add_argument("--max-length", type=int, default=128, help="tokens per passage (default 128)")
    lb.add_argument("--train-per-class", type=int, default=128, help="training passages per genre (default 128)")
    lb.add_argument("--test-per-class", type=int, default=100, help="test passages per genre (default 100)")
    lb.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    lb.add_argument("--output", "-o", default="recipes/results/lora_minilm_genre.json", help="results JSON")
    lb.set_defaults(handler=_lazy(".lora.bench:run_genre_bench"))
    ll = sub.add_parser("lora-lm-bench", help="H2 study, causal LM: LoRA variants fine-tuned on some works, "
                        "perplexity on held-out works")
    _add_model_data(ll, tokens=4096)
    ll.set_defaults(block_size=128)
    ll.add_argument("--methods", nargs="+", default=["lora", "spectral-df", "eva", "adalora"],
                    help="methods to compare (see hf_geocomp.lora.bench.METHODS)")
    ll.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    ll.add_argument("--r", type=int, default=8, help="rank of the reference uniform LoRA; sets the budget (default 8)")
    ll.add_argument("--targets", nargs="+", default=["q_proj", "v_proj", "up_proj", "down_proj"],
                    help="target module names (default q_proj v_proj up_proj down_proj)")
    ll.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    ll.add_argument("--steps", type=int, default=24, help="optimizer steps (default 24)")
    ll.add_argument("--train-batch", type=int, default=4, help="training batch size (default 4)")
    ll.add_argument("--train-block", type=int, default=64, help="tokens per training block (default 64)")
    ll.add_argument("--train-data", default="shakespeare:train", help="training text (default shakespeare:train)")
    ll.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default shakespeare:evaluation)")
    ll.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    ll.add_argument("--eval-block", type=int, default=128, help="tokens per held-out block (default 128)")
    ll.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    ll.add_argument("--output", "-o", default="recipes/results/lora_smollm2_lm.json", help="results JSON")
    ll.set_defaults(handler=_lazy(".lora.lm_bench:run_lm_bench"))
    lm = sub.add_parser("lora-merge", help="join H2 results files of one setting (rows by method and seed) "
                        "and recompute mean ± sd and the paired tests vs LoRA and EVA")
    lm.add_argument("results", nargs="+", help="results JSON files written by lora-bench or lora-lm-bench")
    lm.add_argument("--output", "-o", required=True, help="merged results JSON")
    lm.set_defaults(handler=_lazy(".lora.bench:run_merge"))

    k = sub.add_parser("bench-kv", help="coded KV caches vs QuantizedCache vs DynamicCache: continuation perplexity")
    _add_model_data(k, tokens=4096)
    k.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default shakespeare:evaluation)")
    k.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    k.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.1875, 0.125],
                   help="fractions of the uncompressed cache bytes")
    k.add_argument("--quant", nargs="*", default=["quanto:4", "quanto:2"],
                   help="QuantizedCache baselines as backend:bits (quanto:4 quanto:2 hqq:4 ...)")
    k.add_argument("--variants", nargs="+", default=None,
                   help="geocomp caches as <basis>-<bits|rank>[-rope_none][-refined] (default: every basis, bits and rank, "
                        "and the RoPE ablation); the first is also checked by greedy decoding")
    k.add_argument("--widths", type=int, nargs="+", default=[8, 4, 2, 1],
                   help="quantised widths the allocator may use besides full precision and 0 (default 8 4 2 1)")
    k.add_argument("--group-size", type=int, default=64, help="latent components per float16 scale (default 64)")
    k.add_argument("--sink-tokens", type=int, default=4,
                   help="first tokens kept exact, counted in the budget at a --prefill-token cache (default 4)")
    k.add_argument("--refine-steps", type=int, default=30, help="optimizer steps of *-refined variants (default 30)")
    k.add_argument("--refine-windows", type=int, default=16,
                   help="calibration windows (prefill + 128 scored) for *-refined variants (default 16)")
    k.add_argument("--refine-prefill", type=int, default=512, help="prefill tokens of a refinement window")
    k.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    k.add_argument("--prefill", type=int, default=1024, help="context tokens per window (default 1024)")
    k.add_argument("--score", type=int, default=256, help="scored tokens per window (default 256)")
    k.add_argument("--speed-steps", type=int, default=0, help="decode steps timed per cache (0: no speed test)")
    k.add_argument("--speed-contexts", type=int, nargs="+", default=[1024, 4096], help="contexts for decode speed")
    k.add_argument("--speed-methods", nargs="*", default=["quantized-quanto-int4@0.25", "geocomp-fisher-bits@0.25",
                                                         "geocomp-fisher-bits+reduced@0.25"],
                   help="method@budget timed beside dynamic; geocomp-...+reduced@budget: attention on the latents")
    k.add_argument("--greedy-tokens", type=int, default=0,
                   help="greedy tokens generated from each window's context, compared with the uncompressed cache")
    k.add_argument("--output", "-o", default="recipes/results/kv_smollm2_continuation.json", help="results JSON")
    k.add_argument("--plot", default=None, help="also plot perplexity against cache bytes to this PNG")
    k.set_defaults(handler=_lazy(".eval.kv_bench:run_kv_bench"))

    ks = sub.add_parser("bench-kv-speed", help="decode/prefill speed of KV caches as ratios to DynamicCache "
                        "(interleaved A X A ..., median with min-max, beside the bytes-read bound)")
    _add_model_data(ks, tokens=4096)
    ks.add_argument("--eval-data", default="shakespeare:evaluation", help="text of the timed contexts")
    ks.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    ks.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125], help="geocomp budgets (fisher-bits)")
    ks.add_argument("--quant", nargs="*", default=["quanto:4", "hqq:4"], help="QuantizedCache baselines backend:bits")
    ks.add_argument("--group-size", type=int, default=64, help="latent components per float16 scale (default 64)")
    ks.add_argument("--sink-tokens", type=int, default=4, help="first tokens kept exact (default 4)")
    ks.add_argument("--configs", nargs="+", default=["1x4096", "8x4096", "1x8064"],
                    help="batch x context pairs timed (default 1x4096 8x4096 1x8064)")
    ks.add_argument("--steps", type=int, default=16, help="greedy decode steps per timed run, unless a config says :STEPS")
    ks.add_argument("--repeats", type=int, default=3, help="interleaved repeats per configuration (default 3)")
    ks.add_argument("--prefill-context", type=int, default=4096, help="prefill timed at batch 1 (0: skip)")
    ks.add_argument("--prefill-repeats", type=int, default=3, help="interleaved prefill repeats (default 3)")
    ks.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ks.add_argument("--torch-path", action="store_true",
                    help="also time the smallest budget on the PyTorch path (no fused kernel), first config only")
    ks.add_argument("--profile-steps", type=int, default=0,
                    help="also profile this many decode steps per cache at the first config (torch.profiler)")
    ks.add_argument("--allow-torch-path", action="store_true",
                    help="run even if the fused kernel cannot be built (then geocomp rows time the PyTorch path)")
    ks.add_argument("--output", "-o", default="recipes/results/kv_smollm2_decode_speed_fused.json", help="results JSON")
    ks.set_defaults(handler=_lazy(".studies.kv_speed:run_kv_speed"))

    kk = sub.add_parser("bench-kv-kernel", help="one layer's decode-step attention on a synthetic coded cache: "
                        "the fused path vs SDPA + cat (no model; seconds)")
    kk.add_argument("--widths", nargs="+", required=True,
                    help="LABEL=bits:n,bits:n,... components per width of each codec (bits 0: full precision)")
    kk.add_argument("--configs", nargs="+", default=["1x4096", "8x4096", "1x8192"], help="BATCHxLENGTH pairs")
    kk.add_argument("--kv-heads", type=int, default=3, help="KV heads (default 3)")
    kk.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    kk.add_argument("--query-group", type=int, default=3, help="query heads per KV head (default 3)")
    kk.add_argument("--group-size", type=int, default=64, help="components per float16 scale (default 64)")
    kk.add_argument("--calls", type=int, default=20, help="calls per timed run (default 20)")
    kk.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    kk.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    kk.add_argument("--output", "-o", default="recipes/results/kv_smollm2_decode_kernel.json", help="results JSON")
    kk.set_defaults(handler=_lazy(".studies.kv_speed:run_kv_kernel_speed"))

    _add_prune_parsers(sub)

    r = sub.add_parser("run", help="run a YAML recipe: `command:` names a subcommand, other keys are its options")
    r.add_argument("recipe", help="path to a recipe (see recipes/)")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys")
    parser.subcommands = sub.choices
    return parser


def recipe_argv(parser: argparse.ArgumentParser, path: str, overrides: list[str]) -> list[str]:
    """The argument list a recipe stands for; unknown keys and values of the wrong type are errors."""
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except OSError as e:
        raise GeoCompError(f"cannot read recipe {path!r}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise GeoCompError(f"recipe {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict) or "command" not in recipe:
        raise GeoCompError(f"recipe {path!r} must be a mapping with a `command:` key.")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise GeoCompError(f"--set takes KEY=VALUE, got {item!r}.")
        recipe[key] = yaml.safe_load(value)
    command = recipe.pop("command")
    subcommands = {k: v for k, v in parser.subcommands.items() if k != "run"}
    if command not in subcommands:
        raise GeoCompError(f"recipe command {command!r} is not one of {', '.join(subcommands)}.")
    actions = {a.dest: a for a in subcommands[command]._actions if a.option_strings}
    argv = [command]
    for key, value in recipe.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest == "help":
            allowed = ", ".join(sorted(d for d in actions if d != "help"))
            raise GeoCompError(f"recipe key {key!r} is not an option of `{command}`; allowed: {allowed}.")
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise GeoCompError(f"recipe key {key!r} is a switch: give true or false, not {value!r}.")
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="mlp,heads", help="comma list of mlp, heads (default mlp,heads)")
    p.add_argument("--head-mode", default="query", help="query (heads within GQA groups) or kv (whole groups)")
    p.add_argument("--round-to", type=int, default=1, help="kept MLP widths rounded up to a multiple (default 1)")
    p.add_argument("--min-keep", type=float, default=0.05, help="least fraction of units per layer (default 0.05)")


def _add_prune_parsers(sub) -> None:
    p = sub.add_parser("prune", help="one-shot structured pruning → a saved, smaller model + plan.json")
    _add_model_data(p, tokens=16384)
    _add_prune_options(p)
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of block parameters to remove")
    p.add_argument("--criterion", default="variance", help="variance, magnitude, wanda, random, taylor")
    p.add_argument("--allocation", default="uniform", help="uniform or global")
    p.add_argument("--compensation", default="none", help="none, bias, refit, bias+refit")
    p.add_argument("--output", "-o", required=True, help="output model folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=_lazy(".prune.cli:prune_command"))

    b = sub.add_parser("bench-prune", help="perplexity, parameters and latency of every criterion and budget")
    _add_model_data(b, tokens=16384)
    _add_prune_options(b)
    b.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default evaluation split)")
    b.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens (default 16384)")
    b.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    b.add_argument("--criteria", nargs="+", default=["magnitude", "random", "wanda", "variance", "taylor"])
    b.add_argument("--compensations", nargs="+", default=["none", "bias+refit"])
    b.add_argument("--allocations", nargs="+", default=["uniform"])
    b.add_argument("--taylor-batches", type=int, default=4, help="calibration batches for Taylor gradients")
    b.add_argument("--latency-tokens", type=int, default=512, help="tokens of the batch-1 latency input")
    b.add_argument("--latency-repeats", type=int, default=5, help="0 skips latency (recorded as null)")
    b.add_argument("--sweep", nargs="+", default=None, metavar="SPEC",
                   help="rows as BUDGETS:CRITERIA:COMPENSATIONS:ALLOCATIONS[:TARGETS] products (comma lists, "
                        "targets joined by +), several allowed; replaces --sparsities/--criteria/...")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    b.add_argument("--output", "-o", default="recipes/results/prune_smollm2_oneshot.json", help="results JSON")
    b.set_defaults(handler=_lazy(".prune.bench:run_prune_bench"))

    r = sub.add_parser("bench-prune-recovery", help="prune during a short fine-tune with the callback")
    r.add_argument("--model", default="smollm2-135m", help="bundled name, model folder, .gguf file or Hub id")
    r.add_argument("--train-data", default="shakespeare:train", help="fine-tune text (default shakespeare:train)")
    r.add_argument("--eval-data", default="shakespeare:evaluation",
                   help="held-out text (default shakespeare:evaluation)")
    r.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    r.add_argument("--block-size", type=int, default=256, help="tokens per training and held-out block")
    r.add_argument("--sparsities", type=float, nargs="+", default=[0.2],
                   help="target fractions of block parameters, run in the order given (default 0.2)")
    r.add_argument("--criteria", "--criterion", nargs="+", default=["variance"], dest="criteria",
                   help="pruning criteria, one callback run per sparsity and criterion (default variance)")
    r.add_argument("--targets", default="mlp", help="comma list of mlp, heads (default mlp)")
    r.add_argument("--allocation", default="uniform", help="uniform or global (default uniform)")
    r.add_argument("--compensation", default="refit", help="applied at every mask update")
    r.add_argument("--schedule", default="cubic", help="cubic or linear sparsity schedule (default cubic)")
    r.add_argument("--end", type=float, default=0.5, help="fraction of steps where the target is reached")
    r.add_argument("--update-every", type=int, default=None, help="optimizer steps between mask updates")
    r.add_argument("--steps", type=int, default=60, help="optimizer steps of every fine-tune (default 60)")
    r.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, cosine schedule (default 5e-5)")
    r.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch (default 4)")
    r.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    r.add_argument("--dense-control", action="store_true",
                   help="also fine-tune without pruning for the same steps; rows then record ppl_vs_control")
    r.add_argument("--latency-tokens", type=int, default=512, help="tokens of the latency forward (default 512)")
    r.add_argument("--latency-repeats", type=int, default=5, help="0 skips latency (recorded as null)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    r.add_argument("--output", "-o", default="recipes/results/prune_smollm2_recovery.json", help="results JSON")
    r.set_defaults(handler=_lazy(".prune.recovery:run_recovery"))

    h = sub.add_parser("bench-prune-h1", help="H1: pruning criteria on a fine-tuned genre classifier, over seeds")
    h.add_argument("--model", default="minilm-l6", help="encoder (default minilm-l6)")
    h.add_argument("--targets", default="mlp", help="comma list of mlp, heads (default mlp)")
    h.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4])
    h.add_argument("--criteria", nargs="+", default=["variance", "variance_cond", "magnitude", "wanda", "random"])
    h.add_argument("--seeds", type=int, default=5)
    h.add_argument("--block-size", type=int, default=128, help="tokens per passage (default 128)")
    h.add_argument("--train-per-genre", type=int, default=200)
    h.add_argument("--test-per-genre", type=int, default=150)
    h.add_argument("--calibration-passages", type=int, default=128, help="training passages for statistics")
    h.add_argument("--epochs", type=float, default=1.0)
    h.add_argument("--lr", type=float, default=5e-5)
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--output", "-o", default="recipes/results/prune_h1_minilm.json", help="results JSON")
    h.set_defaults(handler=_lazy(".prune.h1:run_h1"))






def _analyze(args) -> None:
    import json
    import platform

    import torch
    import transformers

    from . import __version__
    from .data import calibration_loader, load_model
    from .geometry.report import analyze, plot_eigencurves, plot_report
    from .io import output_dir, resolved_args

    model, tok = load_model(args.model)
    loader = calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size)
    with output_dir(args.output, args.overwrite) as out:
        report, stats = analyze(model, loader, total=len(loader), progress=not args.no_progress,
                                patterns=args.modules)
        report = {"command": args.command_line, "model": args.model, "data": args.data,
                  "block_size": args.block_size, "args": resolved_args(args), "versions": {
                      "hf_geocomp": __version__, "torch": torch.__version__,
                      "transformers": transformers.__version__, "python": platform.python_version()},
                  **report}
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        plots = plot_report(report, str(out))
        if not args.modules:
            plots.append(plot_eigencurves(model, stats, str(out)))
        if args.save_stats:
            stats.meta.update(model=args.model, data=args.data)
            stats.save(str(out / "stats.safetensors"))
    s = report["summary"]
    print(f"wrote {args.output}/report.json ({len(report['entries'])} entries, {report['tokens']} tokens) "
          f"and {len(plots)} plots")
    for kind, v in s.items():
        extra = f", uncentred Df {v['median_df_uncentred']:.2f}" if "median_df_uncentred" in v else ""
        print(f"  {kind:18s} n={v['count']:4d}  median Df {v['median_df']:8.2f}  median k95 {v['median_k95']:6.1f}"
              f"  (dim {v['median_dim']:.0f}){extra}")





def main(argv: list[str] | None = None) -> int:
    import shlex

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command_line = "hf-geocomp " + shlex.join(argv)  # recorded beside every result
    try:
        if args.command == "run":
            args = parser.parse_args(recipe_argv(parser, args.recipe, args.set))
        args.command_line = command_line
        args.handler(args)
    except GeoCompError as e:
        print(f"hf-geocomp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
