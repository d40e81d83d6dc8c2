"""Model cards of compressed models: the Jinja template in ``model_cards/``, rendered with huggingface_hub.

``render_card(model, results=...)`` fills ``model_cards/geocomp_model.md`` through
``ModelCard.from_template`` with ``ModelCardData`` metadata (``base_model``, ``base_model_relation``,
``library_name: transformers``, tags, and ``model-index`` built from ``EvalResult`` of the measured
perplexities) and a body made from the saved plan: the budget asked and achieved, a per-layer
table (and plot), results against the base model, the command, versions, how to load it.
``Trainer.create_model_card`` drops perplexity, so write this card after transformers writes its own.
"""

from __future__ import annotations

import platform
from pathlib import Path

from torch import nn

from ..errors import GeoCompError

TEMPLATE = "geocomp_model.md"
COLUMNS = ("method", "params", "params_ratio", "kv_bytes_ratio", "ppl", "ppl_ratio", "continuation_ppl",
           "continuation_ppl_ratio", "eval_data")


def template_path(name: str = TEMPLATE) -> Path:
    """A card template: packaged beside the code in a wheel (``hf_geocomp/model_cards``), or the
    repository's top-level ``model_cards/`` in a source checkout."""
    here = Path(__file__).resolve().parents[1]
    for folder in (here / "model_cards", here.parent / "model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise GeoCompError(f"the model card template {name!r} is missing from this installation of hf_geocomp.")


def versions() -> dict[str, str]:
    import huggingface_hub
    import peft
    import torch
    import transformers

    from .. import __version__

    return {"hf_geocomp": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "peft": peft.__version__, "huggingface_hub": huggingface_hub.__version__,
            "python": platform.python_version()}


def _components(groups) -> str:
    counts = {"full": 0, 8: 0, 4: 0, 2: 0, 1: 0}
    for bits, cols in groups or ():
        counts[bits] = counts.get(bits, 0) + len(cols)
    return "/".join(str(counts[k]) for k in ("full", 8, 4, 2, 1))


def layer_rows(plan: dict) -> list[dict]:
    s, kv = plan["shapes"], plan.get("kv") or {}
    groups = kv.get("groups", {})
    return [{"layer": i, "mlp": s["mlp_widths"][i], "heads": f"{s['num_heads'][i]} / {s['num_kv_heads'][i]}",
             "k": _components(groups.get(f"{i}.k")), "v": _components(groups.get(f"{i}.v"))}
            for i in range(len(s["mlp_widths"]))]


def budget_rows(plan: dict, stock: dict) -> list[dict]:
    rows = [{"name": "parameters", "asked": "-", "achieved": f"{plan['params']:,}"}]
    if plan.get("prune"):
        p = plan["prune"]
        rows.append({"name": "block parameters removed", "asked": f"{p['config']['sparsity']:.1%}",
                     "achieved": f"{p['achieved_sparsity']:.1%} ({p['params_removed']:,} of {p['block_params']:,})"})
    widths, base = plan["shapes"]["mlp_widths"], stock["mlp_widths"]
    rows.append({"name": "MLP width kept (min / mean / max over layers)", "asked": "-",
                 "achieved": f"{min(widths)} / {sum(widths) / len(widths):.0f} / {max(widths)} of {base[0]}"})
    kv = plan.get("kv")
    if kv:
        ratio = (kv["bytes_per_token"] / kv["full_bytes_per_token"]) if not kv.get("identity") else 1.0
        rows.append({"name": "KV cache bytes per coded token", "asked": f"{kv['config']['budget']:.1%}",
                     "achieved": f"{kv['bytes_per_token']} of {kv['full_bytes_per_token']} ({ratio:.1%}; "
                                 f"{kv['config']['sink_tokens']} sink tokens kept exact)"})
    return rows


def plot_plan(plan: dict, stock: dict, path: str | Path) -> str:
    """Per-layer MLP width and KV components kept, as a PNG; returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(plan["shapes"]["mlp_widths"])))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(layers, [w / b for w, b in zip(plan["shapes"]["mlp_widths"], stock["mlp_widths"])], color="#4c72b0",
           label="MLP width kept")
    ax.plot(layers, [q / b for q, b in zip(plan["shapes"]["num_heads"], stock["num_heads"])], "k.-",
            label="query heads kept")
    kv = plan.get("kv")
    if kv and not kv.get("identity"):
        d = kv["num_kv_heads"] * kv["head_dim"]
        kept = [sum(len(c) for _, c in kv["groups"].get(f"{i}.k", []) + kv["groups"].get(f"{i}.v", [])) / (2 * d)
                for i in layers]
        ax.plot(layers, kept, "r.-", label="KV components kept")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of the base model")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def _results(results: dict | None):
    if not results:
        return [], [], "", []
    rows = list(results.get("rows", []))
    base = dict(results.get("baseline") or {})
    base.setdefault("method", "base model")
    table = [base, *rows]
    cols = [c for c in COLUMNS if any(c in r for r in table)]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

    data = results.get("data")
    note = "; ".join(f"{k}: {v}" for k, v in data.items()) if isinstance(data, dict) else str(data or "")
    note = f"Data: {note}." if note else ""
    return cols, [[fmt(r.get(c)) for c in cols] for r in table], note, rows


def render_card(model: nn.Module, results: dict | None = None, base_model: str | None = None,
                repo_id: str | None = None, command: str | None = None, plot: str | None = None,
                license: str | None = None):
    """The :class:`huggingface_hub.ModelCard` of a geocomp model (``model.config.quantization_config.plan``).

    ``results``: a results dict (``baseline`` and ``rows`` with ``ppl``, ``params``, ``kv_bytes_ratio``,
    ``eval_data``...), measured against the base model on the same held-out data; rows other than
    the base model become ``model-index`` entries. Never give it secrets: the card is public.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .shapes import stock_shapes

    qc = getattr(model.config, "quantization_config", None)
    plan = getattr(qc, "plan", None)
    if plan is None:
        raise GeoCompError("this model carries no geocomp plan; compress it (or call hub.mark_compressed) first.")
    methods = [m for m, on in (("structured pruning", plan.get("prune")), ("KV-cache transform coding", plan.get("kv")),
                               ("replaced modules", plan.get("replaced"))) if on] or ["no compression"]
    tags = ["hf-geocomp", *(t for t, on in (("pruning", plan.get("prune")), ("kv-cache", plan.get("kv")),
                                            ("low-rank", plan.get("replaced"))) if on)]
    cols, rows, note, measured = _results(results)
    name = repo_id or getattr(model, "name_or_path", None) or "geocomp-model"
    evals = [EvalResult(task_type="text-generation", dataset_type=r.get("eval_data", "held-out text"),
                        dataset_name=r.get("eval_data", "held-out text"), metric_type="perplexity",
                        metric_value=round(float(r["ppl"]), 4), metric_name=f"perplexity ({r.get('method', name)})")
             for r in measured if r.get("ppl") is not None]
    data = ModelCardData(base_model=base_model, library_name="transformers", tags=tags, license=license,
                         pipeline_tag="text-generation", model_name=name if evals else None,
                         eval_results=evals or None, base_model_relation="quantized" if base_model else None)
    stock = stock_shapes(model)
    kw = dict(model_name=name, repo_id=name, methods=methods, kv=bool(plan.get("kv")),
              base_model_line=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A model",
              stock_loadable=plan.get("stock_loadable"), budget=budget_rows(plan, stock), layers=layer_rows(plan),
              results_columns=cols, results_rows=rows, results_note=note, plot=plot,
              command=command or (results or {}).get("command") or "(not recorded)", versions=versions())
    return ModelCard.from_template(data, template_path=str(template_path()), **kw)
