"""``hf-geocomp analyze``: spectra of activations, per-head keys/values and weights, with plots."""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch
from torch import nn

from .. import arch
from .spectrum import Spectrum, effective_rank
from .stats import ActivationStats, block_output_taps, collect_stats, kv_head_taps, linear_input_taps

KINDS = ("activation_input", "activation_output", "k_head", "v_head", "weight")


def _entry(module: str, kind: str, moments_cov: torch.Tensor, moments_sm: torch.Tensor | None, tokens: int,
           head: int | None = None, shared_with: list[str] | None = None) -> dict:
    spec = Spectrum.of(moments_cov)
    row = {"module": module, "kind": kind, "layer": arch.layer_index(module), "head": head, "tokens": tokens,
           **spec.summary()}
    if moments_sm is not None:
        unc = Spectrum.of(moments_sm)
        row.update(df_uncentred=float(unc.effective_rank()), k95_uncentred=int(unc.k_at(0.95)),
                   top_share_uncentred=float(unc.top_share()))
    if shared_with:
        row["shared_with"] = shared_with
    return row


def spectra_entries(model: nn.Module, stats: ActivationStats) -> list[dict]:
    """One row per (module, kind[, head]): activation spectra from ``stats``, weight spectra from ``model``."""
    rows = []
    leaders = defaultdict(list)
    for key, leader in stats.aliases.items():
        leaders[leader].append(stats.taps[key].module)
    for key, tap in stats.taps.items():
        if key in stats.aliases:
            continue
        m = stats[key]
        if tap.head_dim is not None:
            kind = "k_head" if key.endswith(":k") else "v_head"
            cov, sm = m.covariance(), m.second_moment()
            for h in range(cov.shape[0]):
                rows.append(_entry(tap.module, kind, cov[h], sm[h], m.n, head=h))
        else:
            kind = "activation_input" if tap.where == "input" else "activation_output"
            rows.append(_entry(tap.module, kind, m.covariance(), m.second_moment(), m.n,
                               shared_with=leaders.get(key)))
    for name in arch.block_linears(model):
        w = arch.linear_weight(model.get_submodule(name)).detach().to(torch.float64)
        spec = Spectrum.of_weight(w)
        rows.append({"module": name, "kind": "weight", "layer": arch.layer_index(name), "head": None,
                     "shape": list(w.shape), **spec.summary(),
                     # the same participation ratio over singular values σ rather than σ²
                     "df_singular": float(effective_rank(spec.eigenvalues.sqrt()))})
    return rows


def summarise(rows: list[dict], by_module_type: bool = False) -> dict:
    """Median Df / k95 / top share per kind (and uncentred, for activations).

    With ``by_module_type`` the groups are ``kind:last-name`` (``activation_input:down_proj``).
    """
    groups = defaultdict(list)
    for r in rows:
        name = r["module"].rsplit(".", 1)[-1]
        name = "block" if name.isdigit() else name
        groups[f"{r['kind']}:{name}" if by_module_type else r["kind"]].append(r)
    out = {}
    for kind in sorted(groups, key=lambda g: (KINDS.index(g.split(":")[0]), g)):
        sel = groups[kind]
        s = {"count": len(sel)}
        for field in ("dim", "df", "k95", "top_share", "df_uncentred", "k95_uncentred", "df_singular"):
            vals = [r[field] for r in sel if field in r]
            if vals:
                s[f"median_{field}"] = statistics.median(vals)
                s[f"min_{field}"] = min(vals)
                s[f"max_{field}"] = max(vals)
        out[kind] = s
    return out


def analyze(model: nn.Module, batches, *, total: int | None = None, progress: bool = True,
            patterns: list[str] | None = None) -> tuple[dict, ActivationStats]:
    """Measure everything the report holds; returns ``(report, stats)``."""
    taps = linear_input_taps(model, patterns)
    if not patterns:
        taps += kv_head_taps(model) + block_output_taps(model)
    stats = collect_stats(model, batches, taps, progress=progress, total=total)
    rows = spectra_entries(model, stats) if not patterns else [
        r for r in spectra_entries(model, stats) if r["kind"] != "weight" or any(
            r["module"] == t.module for t in taps)]
    return {"tokens": stats.tokens, "summary": summarise(rows),
            "summary_by_module_type": summarise(rows, by_module_type=True), "entries": rows}, stats


def plot_report(report: dict, outdir: str) -> list[str]:
    """PNG plots: Df and k95 by layer for each kind, and a few normalised eigenvalue curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in report["entries"] if r["layer"] is not None]
    for field, label in (("df", "effective rank Df (centred)"), ("k95", "k at 95% variance")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for kind in KINDS:
            by_layer = defaultdict(list)
            for r in rows:
                if r["kind"] == kind:
                    by_layer[r["layer"]].append(r[field])
            if by_layer:
                xs = sorted(by_layer)
                ax.plot(xs, [statistics.median(by_layer[x]) for x in xs], marker="o", ms=3,
                        label=f"{kind} (median over modules/heads)")
        if field == "df":
            by_layer = defaultdict(list)
            for r in rows:
                if r["kind"] == "activation_input" and "df_uncentred" in r:
                    by_layer[r["layer"]].append(r["df_uncentred"])
            xs = sorted(by_layer)
            ax.plot(xs, [statistics.median(by_layer[x]) for x in xs], ls="--", label="activation_input, uncentred")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{report.get('model', '')}: {label} by layer")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = f"{outdir}/{field}_by_layer.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_eigencurves(model: nn.Module, stats: ActivationStats, outdir: str) -> str:
    """Normalised eigenvalue curves for the first, middle and last block: inputs, K head 0, weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefixes = arch.block_prefixes(model)
    picks = sorted({0, len(prefixes) // 2, len(prefixes) - 1})
    spec = arch.get_spec(model)
    fig, axes = plt.subplots(1, len(picks), figsize=(4.5 * len(picks), 4), squeeze=False)
    for ax, i in zip(axes[0], picks):
        p = prefixes[i]
        curves = {}
        first_in = p + (spec.q or spec.qkv)
        for label, module in (("attn input", first_in), ("mlp input", p + spec.mlp_in[0]),
                              ("mlp_out input", p + spec.mlp_out)):
            key = f"{module}:in"
            if key in stats:
                curves[f"{label} (act)"] = Spectrum.of(stats[key].covariance()).eigenvalues
        kkey = next((k for k in stats.keys() if k.endswith(":k") and stats.taps[k].module.startswith(p)), None)
        if kkey:
            curves["K head 0 (act)"] = Spectrum.of(stats[kkey].covariance()[0]).eigenvalues
        curves["mlp input weight"] = Spectrum.of_weight(arch.linear_weight(model.get_submodule(p + spec.mlp_in[0]))).eigenvalues
        for label, ev in curves.items():
            ev = ev / ev.sum()
            ax.plot(range(1, len(ev) + 1), ev.clamp_min(1e-12), label=label, ls="--" if "weight" in label else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"layer {i}")
        ax.set_xlabel("component")
        ax.set_ylabel("share of variance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = f"{outdir}/eigenvalue_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
