"""``hf-geocomp``: compress and fine-tune Hugging Face models using the geometry of their activations.

User mistakes end with one sentence on stderr and exit status 2, never a traceback, and are
found before any model is loaded where they can be (options, recipes, output folders).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import time

from .errors import GeoCompError
from .options import Command, HelpFormatter, Options, add_options, from_namespace, summary


def _run_lazy(target: str, args) -> None:
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module, __package__), name)(args)


def _lazy(target: str):
    """A handler that imports ``.module:function`` only when its subcommand runs (light start-up).

    A ``partial`` of a module-level function, so ``args`` stays picklable for spawned workers.
    """
    return functools.partial(_run_lazy, target)


def command_table(group: str = "all") -> dict[str, Command]:
    """Subcommands whose options are a dataclass → where they are (:class:`~hf_geocomp.options.Command`), unimported.

    ``group``: ``"tools"`` (analyze, prune), ``"studies"`` or ``"all"``.
    """
    from .studies.cli import STUDIES

    tools = {"analyze": Command(".geometry.cli", "AnalyzeOptions", "run_analyze"),
             "prune": Command(".prune.cli", "PruneCommandOptions", "prune_command")}
    return {"tools": tools, "studies": STUDIES, "all": {**tools, **STUDIES}}[group]


def commands(group: str = "all") -> dict[str, tuple[type, callable]]:
    """Subcommands whose options are a dataclass → (that dataclass, the function that runs it); imports them all."""
    return {name: command.load() for name, command in command_table(group).items()}


def _add_commands(sub, group: str, wanted: str | None) -> None:
    """Every subcommand of ``group``; only ``wanted`` (all if None) with its options, the others with their summary
    alone (what ``hf-geocomp --help`` lists), so that a command line imports only the command it runs."""
    for name, command in command_table(group).items():
        if wanted is None or name == wanted:
            cls = command.load()[0]
            add_options(sub.add_parser(name, help=summary(cls), description=summary(cls)), cls)
        else:
            sub.add_parser(name, help=command.summary())


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line ``argv``, one whose subcommands other than the one ``argv`` names
    are listed but not loaded (each would import torch and transformers: ``--help`` and usage errors stay fast)."""
    from . import __version__
    from .hub.cli import add_parsers as add_hub_parsers
    from .memory_cli import add_parser as add_memory_parser
    from .serve.cli import add_parser as add_serve_parser

    parser = argparse.ArgumentParser(prog="hf-geocomp", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf-geocomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    _add_commands(sub, "tools", wanted)
    add_hub_parsers(sub, _lazy)
    add_serve_parser(sub, _lazy)
    add_memory_parser(sub, _lazy)
    _add_commands(sub, "studies", wanted)

    rp = sub.add_parser("report", help="markdown tables from results JSON files or folders (or regenerate the "
                        "report tables of a markdown file)")
    rp.add_argument("results", nargs="*", help="results JSON files, or folders holding results.json")
    rp.add_argument("--readme", default=None, help="regenerate the <!-- report: PATH --> tables of this markdown file")
    rp.add_argument("--check", action="store_true", help="with --readme: only check the tables match, exit 2 if not")
    rp.add_argument("--output", "-o", default=None, help="write the report here instead of stdout")
    rp.add_argument("--plot", default=None, help="also draw the paired tests of one results file (effect against "
                    "budget, 95%% CI, a panel per control) to this PNG")
    rp.set_defaults(handler=_lazy(".report:run_report"))

    run_help = ("the main job: compress a model as a recipe says, measure it against its base and baselines, write "
                "a model folder ready for push_to_hub (no recipe: SmolLM2-135M with the measured best settings); a "
                "recipe with `command:` runs that study instead, its other keys the study's options (see `hf-geocomp "
                "COMMAND --help`), and saves the resolved recipe beside the results: <output stem>.recipe.yaml next "
                "to a results file, recipe.yaml inside an output folder")
    r = sub.add_parser("run", help=run_help, description=run_help[0].upper() + run_help[1:] + ".")
    r.add_argument("recipe", nargs="?", default=None,
                   help="a YAML recipe (see recipes/; default: the built-in job, recipes/compress_smollm2.yaml)")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override recipe keys (section.key=value for prune/kv fields; values are YAML)")
    r.add_argument("--output", "-o", default=None, help="the output folder or file (the recipe's `output` key)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--overwrite", action="store_true",
                   help="let the recipe replace its existing output (a recipe file cannot ask for this itself)")
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        if any(a.dest == "output" for a in p._actions) and not any(a.dest == "overwrite" for a in p._actions):
            p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.subcommands = sub.choices
    return parser


def options_of(ns: argparse.Namespace):
    """The dataclass a parsed command line stands for: a :class:`~hf_geocomp.job.JobConfig` (``run`` of a job
    recipe or of none), a study's or tool's options (``run`` of a study recipe, or its subcommand), else None."""
    if ns.command == "run":
        from .recipes import is_job_recipe, load_job, load_study

        if ns.output is not None and not ns.output.strip():
            raise GeoCompError("--output is empty; give the folder (or results file) to write.")
        overrides = ns.set + ([f"output={ns.output}"] if ns.output is not None else [])
        if ns.recipe is None or is_job_recipe(ns.recipe):
            return load_job(ns.recipe, overrides)
        options = load_study(ns.recipe, overrides, {name: cls for name, (cls, _) in commands().items()})
        options.overwrite = ns.overwrite
        if ns.no_progress and hasattr(options, "no_progress"):
            options.no_progress = True
        return options
    if getattr(ns, "options", None) is None:
        return None
    options = from_namespace(ns.options, ns)
    options.command = ns.command
    return options


def parse_options(argv: list[str]):
    """The options dataclass of a command line (``hf-geocomp`` left out), e.g. a committed result's ``command``."""
    return options_of(build_parser(argv).parse_args(argv))


def check_output(args) -> None:
    """Refuse, before any work, to replace an existing output file or non-empty folder without ``--overwrite``."""
    from .io import check_output as check

    if getattr(args, "output", None) is not None and not getattr(args, "resume", False):  # --resume continues it
        check(args.output, getattr(args, "overwrite", False))


def record_compute(options, wall_start: float, cpu_start: float, load: float) -> None:
    """Add what this run cost to its results JSON: wall and CPU seconds (every thread of this process), cores, load."""
    import json
    from pathlib import Path

    from .io import folder_lock, write_json

    path = Path(getattr(options, "output", None) or "")
    if path.suffix != ".json" or not path.is_file():
        return
    with folder_lock(path):  # processes sharing one results file (--resume with disjoint seeds) take turns
        result = json.loads(path.read_text())
        result["compute"] = {"wall_seconds": round(time.time() - wall_start, 1),
                             "cpu_seconds": round(time.process_time() - cpu_start, 1), "cpus": os.cpu_count(),
                             "load_average_at_start": load,
                             "note": "this invocation only (a resumed file's earlier parts, or other processes "
                                     "sharing it, are not included)"}
        write_json(path, result)


def main(argv: list[str] | None = None) -> int:
    import shlex

    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser(argv).parse_args(argv)
    command_line = "hf-geocomp " + shlex.join(argv)  # recorded beside every result
    try:
        options = options_of(ns)
        if ns.command == "run" and not isinstance(options, Options):  # the main job
            from .job import run_job

            run_job(options, overwrite=ns.overwrite, progress=not ns.no_progress, command=command_line,
                    recipe_path=ns.recipe)
            return 0
        args = ns if options is None else options
        args.command_line = command_line
        check_output(args)
        if options is None:
            ns.handler(ns)
        else:
            from .recipes import save_recipe

            started = (time.time(), time.process_time(), os.getloadavg()[0])
            command_table()[options.command].load()[1](options)
            record_compute(options, *started)
            save_recipe(options)
    except GeoCompError as e:
        print(f"hf-geocomp {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
