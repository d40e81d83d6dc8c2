"""``hf-geocomp analyze``: spectra of a model's activations, per-head keys/values and weights."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import ModelDataOptions, option


@dataclass(kw_only=True)
class AnalyzeOptions(ModelDataOptions):
    """Spectra of activations, per-head K/V and weights → report.json + plots."""

    tokens: int = 16384
    modules: list[str] | None = option(None, "only these module patterns (glob, or re:<regex>)", nargs="*")
    output: str = option("runs/analyze", "output folder")
    save_stats: bool = option(False, "also write stats.safetensors for later steps")
    no_progress: bool = option(False, "no progress bar")


def run_analyze(args: AnalyzeOptions) -> None:
    import json
    import platform

    import torch
    import transformers

    from .. import __version__
    from ..data import calibration_loader, load_model
    from ..io import output_dir, resolved_args
    from .report import analyze, plot_eigencurves, plot_report

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
