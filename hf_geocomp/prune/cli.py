"""``hf-geocomp prune``: calibrate, prune one-shot, save the smaller model with its plan."""

from __future__ import annotations

from dataclasses import dataclass

from ..data import calibration_loader, load_model
from ..geometry import collect_stats
from ..io import output_dir, write_json
from ..options import ModelDataOptions, Options, option
from .api import prune, prune_taps, taylor_grads
from .config import ALLOCATIONS, COMPENSATIONS, PruneConfig
from .scorers import SCORERS
from .units import HEAD_MODES, block_params


@dataclass(kw_only=True)
class PruneOptions(Options):
    """The shape options of structured pruning shared by the prune command and the pruning studies."""

    targets: str = option("mlp,heads", "comma list of mlp, heads")
    head_mode: str = option("query", "query (heads within GQA groups) or kv (whole groups)", choices=HEAD_MODES)
    round_to: int = option(1, "kept MLP widths rounded up to a multiple", range="[1, inf)")
    min_keep: float = option(0.05, "least fraction of units per layer", range="(0, 1]")


@dataclass(kw_only=True)
class PruneCommandOptions(ModelDataOptions, PruneOptions):
    """One-shot structured pruning → a saved, smaller model + plan.json."""

    tokens: int = 16384
    targets: str = "mlp"  # the README's measured best settings
    sparsity: float = option(0.2, "fraction of block parameters to remove", range="[0, 1)")
    criterion: str = option("variance", "what scores the units", choices=tuple(SCORERS))
    allocation: str = option("uniform", "uniform or global (global: widths differ per layer)", choices=ALLOCATIONS)
    compensation: str = option("bias+refit", "none, bias, refit or bias+refit", choices=COMPENSATIONS)
    output: str = option(help="output model folder")


def prune_command(args: PruneCommandOptions) -> None:
    cfg = PruneConfig(sparsity=args.sparsity, criterion=args.criterion, targets=args.targets,
                      allocation=args.allocation, compensation=args.compensation, head_mode=args.head_mode,
                      round_to=args.round_to, min_keep=args.min_keep)
    model, tok = load_model(args.model)
    loader = list(calibration_loader(model, tok, args.data, args.tokens, args.block_size, args.batch_size))
    taps = prune_taps(model, cfg.targets, criteria=[cfg.criterion], compensation=cfg.compensation,
                      head_mode=cfg.head_mode)  # only what the criterion and compensation read
    stats = collect_stats(model, loader, taps) if taps else None
    grads = taylor_grads(model, loader, cfg.targets) if cfg.criterion == "taylor" else None
    before = block_params(model)
    with output_dir(args.output, args.overwrite) as out:
        model, plan = prune(model, stats, grads=grads, config=cfg)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        write_json(out / "plan.json", {"command": args.command_line, "model": args.model, "data": args.data,
                                       "block_params_before": before, "block_params_after": block_params(model),
                                       **plan.to_dict()})
    stock = model.config.geocomp_pruning["stock_loadable"]
    print(f"wrote {args.output}: removed {before - block_params(model)} of {before} block parameters "
          f"({plan.achieved_sparsity:.2%}); {'reloads with' if stock else 'needs the geocomp loader, not'} "
          "stock from_pretrained")
