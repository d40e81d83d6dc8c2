"""``hf-geocomp``: compress and fine-tune Hugging Face models using the geometry of their activations.

User mistakes end with one sentence on stderr and exit status 2, never a traceback, and are
found before any model is loaded where they can be (options, recipes, output folders).
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


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the help text already states it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default not in (None, False, [])
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_model_data(p: argparse.ArgumentParser, tokens: int) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled name (smollm2-135m, minilm-l6), model folder, .gguf file or Hub id")
    p.add_argument("--data", default="shakespeare:calibration",
                   help="text source: shakespeare:<split|work+work>, pydoc[:split], file:<a+b>, hf:<ds>:<split>")
    p.add_argument("--tokens", type=positive_int, default=tokens, help=f"calibration tokens (default {tokens})")
    p.add_argument("--block-size", type=positive_int, default=256, help="tokens per block (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="blocks per forward pass (default 8)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-geocomp", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf-geocomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("analyze", help="spectra of activations, per-head K/V and weights → report.json + plots")
    _add_model_data(a, tokens=16384)
    a.add_argument("--modules", nargs="*", help="only these module patterns (glob, or re:<regex>)")
    a.add_argument("--output", "-o", default="runs/analyze", help="output folder (default runs/analyze)")
    a.add_argument("--save-stats", action="store_true", help="also write stats.safetensors for later steps")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(handler=_analyze)

    _add_prune_parser(sub)
    from .hub.cli import add_parsers as add_hub_parsers  # light: no transformers import
    from .studies.cli import add_study_parsers

    add_hub_parsers(sub, _lazy)
    add_study_parsers(sub, _lazy, _add_model_data, _add_prune_options)

    rp = sub.add_parser("report", help="markdown tables from results JSON files or folders (or regenerate the "
                        "report tables of a README)")
    rp.add_argument("results", nargs="*", help="results JSON files, or folders holding results.json")
    rp.add_argument("--readme", default=None, help="regenerate the <!-- report: PATH --> tables of this markdown file")
    rp.add_argument("--check", action="store_true", help="with --readme: only check the tables match, exit 2 if not")
    rp.add_argument("--output", "-o", default=None, help="write the report here instead of stdout")
    rp.set_defaults(handler=_lazy(".report:run_report"))

    r = sub.add_parser("run", help="the main job: compress a model as a recipe says, measure it against its base "
                       "and baselines, write a model folder ready for push_to_hub (no recipe: SmolLM2-135M with the "
                       "measured best settings); a recipe with `command:` runs that study instead")
    r.add_argument("recipe", nargs="?", default=None,
                   help="a YAML recipe (see recipes/; default: the built-in job, recipes/compress_smollm2.yaml)")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override recipe keys (section.key=value for prune/kv fields; values are YAML)")
    r.add_argument("--output", "-o", default=None, help="the output folder (a job recipe's `output` key)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--overwrite", action="store_true",
                   help="let the recipe replace its existing output (a recipe file cannot ask for this itself)")
    for p in sub.choices.values():
        p.formatter_class = _HelpFormatter
        if any(a.dest == "output" for a in p._actions) and not any(a.dest == "overwrite" for a in p._actions):
            p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.subcommands = sub.choices
    return parser


def recipe_argv(parser: argparse.ArgumentParser, path: str, overrides: list[str]) -> list[str]:
    """The argument list a study recipe stands for; unknown keys and values of the wrong type are errors."""
    from .recipes import apply_overrides, read_yaml

    recipe = read_yaml(path)
    if "command" not in recipe:
        raise GeoCompError(f"recipe {path!r} must be a mapping with a `command:` key.")
    if "overwrite" in recipe:
        raise GeoCompError(f"recipe {path!r} sets `overwrite`; a recipe never replaces existing results by itself: "
                           "remove the key and pass --overwrite to `hf-geocomp run`.")
    recipe = apply_overrides(recipe, overrides)
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
    p.add_argument("--targets", default="mlp,heads", help="comma list of mlp, heads")
    p.add_argument("--head-mode", default="query", help="query (heads within GQA groups) or kv (whole groups)")
    p.add_argument("--round-to", type=int, default=1, help="kept MLP widths rounded up to a multiple (default 1)")
    p.add_argument("--min-keep", type=float, default=0.05, help="least fraction of units per layer (default 0.05)")


def _add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="one-shot structured pruning → a saved, smaller model + plan.json")
    _add_model_data(p, tokens=16384)
    _add_prune_options(p)
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of block parameters to remove")
    p.add_argument("--criterion", default="variance",
                   help="variance, variance_cond, wanda, taylor, magnitude or random")
    p.add_argument("--allocation", default="uniform", help="uniform or global (global: widths differ per layer)")
    p.add_argument("--compensation", default="bias+refit", help="none, bias, refit or bias+refit")
    p.add_argument("--output", "-o", required=True, help="output model folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=_lazy(".prune.cli:prune_command"), targets="mlp")  # the README's measured best settings


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
            print(f"writing stats.safetensors: {stats.file_bytes() / 2**20:,.0f} MiB of float64 sums (in Python, "
                  "ActivationStats.save(path, keys=..., dtype=torch.float32) writes less)", flush=True)
            stats.save(str(out / "stats.safetensors"))
    s = report["summary"]
    print(f"wrote {args.output}/report.json ({len(report['entries'])} entries, {report['tokens']} tokens) "
          f"and {len(plots)} plots")
    for kind, v in s.items():
        extra = f", uncentred Df {v['median_df_uncentred']:.2f}" if "median_df_uncentred" in v else ""
        print(f"  {kind:18s} n={v['count']:4d}  median Df {v['median_df']:8.2f}  median k95 {v['median_k95']:6.1f}"
              f"  (dim {v['median_dim']:.0f}){extra}")

def check_output(args) -> None:
    """Refuse, before any work, to replace an existing output file or non-empty folder without ``--overwrite``."""
    from .io import check_output as check

    if getattr(args, "output", None):
        check(args.output, getattr(args, "overwrite", False))


def main(argv: list[str] | None = None) -> int:
    import shlex

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command_line = "hf-geocomp " + shlex.join(argv)  # recorded beside every result
    try:
        if args.command == "run":
            from .recipes import is_job_recipe, load_job

            if args.recipe is None or is_job_recipe(args.recipe):
                from .job import run_job

                job = load_job(args.recipe, args.set + ([f"output={args.output}"] if args.output else []))
                run_job(job, overwrite=args.overwrite, progress=not args.no_progress, command=command_line,
                        recipe_path=args.recipe)
                return 0
            overwrite = args.overwrite
            args = parser.parse_args(recipe_argv(parser, args.recipe, args.set) + (["--overwrite"] if overwrite else []))
        check_output(args)
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
