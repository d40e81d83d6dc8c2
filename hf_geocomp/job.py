"""The main job: one recipe → a compressed model folder ready for ``push_to_hub``, measured against its base.

``hf-geocomp run`` (no recipe: the defaults below, which ``recipes/compress_smollm2.yaml`` spells out)
loads the model, calibrates once, prunes with the recipe's criterion and, at the same budget, with
each baseline criterion; plans the coded KV cache on the pruned model and measures it beside
transformers' ``QuantizedCache`` baselines; then exports the compressed model with ``results.json``
(the results convention of every study), plots, the resolved recipe and a model card.

Quality is measured on held-out text that calibration never reads, in the calibration domain
and off it (``eval_data``): teacher-forced perplexity for the pruned models, continuation
perplexity (context prefilled into the cache, the following tokens scored through it) for the
caches, every number against the base model of the same run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import GeoCompError

DEFAULT_PRUNE = dict(sparsity=0.2, criterion="variance", targets=["mlp"], allocation="global",
                     compensation="bias+refit")  # the best one-shot setting of the README's pruning sweep
DEFAULT_KV = dict(budget=0.25, method="fisher")  # +0.1% continuation perplexity in the README's KV study


@dataclass
class JobConfig:
    """What ``hf-geocomp run`` compresses, on which text, and how it is measured.

    Args:
        model: bundled name, model folder, ``.gguf`` file or Hub id.
        calibration: text source of the statistics (never read by evaluation).
        tokens, block_size, batch_size: calibration tokens, tokens per block, blocks per forward pass.
        eval_data: held-out text sources; the first is the calibration domain, the others are off-domain.
        eval_tokens, eval_block: held-out tokens per source for teacher-forced perplexity, tokens per block.
        windows, prefill, score: continuation perplexity: windows per source, context tokens, scored tokens.
        prune_baselines: criteria run at the same budget and compensation as ``prune`` (same statistics).
        kv_baselines: QuantizedCache baselines as ``backend:bits`` (the ``bench`` extra).
        output: the model folder written.
        threads: torch threads (None: torch's default).
        prune: a :class:`~hf_geocomp.prune.PruneConfig` (as a mapping; None: no pruning).
        kv: a :class:`~hf_geocomp.kv.KVConfig` (as a mapping; None: no KV coding).
    """

    model: str = field(default="smollm2-135m", metadata={"help": "bundled name, folder, .gguf or Hub id"})
    calibration: str = field(default="shakespeare:calibration", metadata={"help": "calibration text source"})
    tokens: int = field(default=4096, metadata={"help": "calibration tokens (>= 1)"})
    block_size: int = field(default=256, metadata={"help": "tokens per calibration block (>= 2)"})
    batch_size: int = field(default=8, metadata={"help": "blocks per forward pass (>= 1)"})
    eval_data: list[str] = field(default_factory=lambda: ["shakespeare:evaluation", "pydoc:evaluation"],
                                 metadata={"help": "held-out sources: the calibration domain first, then off-domain"})
    eval_tokens: int = field(default=4096, metadata={"help": "held-out tokens per source (>= 1)"})
    eval_block: int = field(default=256, metadata={"help": "tokens per held-out block (>= 2)"})
    windows: int = field(default=2, metadata={"help": "continuation windows per source (>= 1)"})
    prefill: int = field(default=1024, metadata={"help": "context tokens of a continuation window (>= 1)"})
    score: int = field(default=256, metadata={"help": "scored tokens of a continuation window (>= 2)"})
    prune_baselines: list[str] = field(default_factory=lambda: ["wanda", "magnitude"],
                                       metadata={"help": "criteria compared at the same budget"})
    kv_baselines: list[str] = field(default_factory=lambda: ["quanto:4"],
                                    metadata={"help": "QuantizedCache baselines, backend:bits"})
    output: str = field(default="runs/smollm2-135m-geocomp", metadata={"help": "the model folder written"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (null: torch's default)"})
    prune: dict | None = field(default_factory=lambda: dict(DEFAULT_PRUNE),
                               metadata={"help": "PruneConfig fields (null: no pruning)"})
    kv: dict | None = field(default_factory=lambda: dict(DEFAULT_KV), metadata={"help": "KVConfig fields (null: off)"})

    def __post_init__(self):
        for name, least in (("tokens", 1), ("block_size", 2), ("batch_size", 1), ("eval_tokens", 1), ("eval_block", 2),
                            ("windows", 1), ("prefill", 1), ("score", 2)):
            if getattr(self, name) < least:
                raise GeoCompError(f"{name} must be at least {least}, got {getattr(self, name)}.")
        if not self.eval_data:
            raise GeoCompError("eval_data must name at least one held-out text source.")
        if self.prune is None and self.kv is None:
            raise GeoCompError("the recipe turns off both prune and kv: there is nothing to compress.")

    @classmethod
    def from_dict(cls, values: dict, where: str = "the recipe") -> "JobConfig":
        """Check ``values`` (a recipe mapping) key by key; sections merge over the defaults above."""
        from .recipes import build

        values = dict(values)
        sections = {}
        for name, default in (("prune", DEFAULT_PRUNE), ("kv", DEFAULT_KV)):
            section = values.pop(name, default)
            if section is not None and not isinstance(section, dict):
                raise GeoCompError(f"{where}: section {name!r} must be a mapping of its fields or null, got {section!r}.")
            sections[name] = None if section is None else {**default, **section}
        job = build(cls, values, where)
        job.prune, job.kv = sections["prune"], sections["kv"]
        job.prune_config(where), job.kv_config(where)  # every field checked now, before any work
        return job

    def prune_config(self, where: str = "the recipe"):
        from .prune import PruneConfig
        from .recipes import build

        return None if self.prune is None else build(PruneConfig, self.prune, f"{where}, section prune")

    def kv_config(self, where: str = "the recipe"):
        from .kv.config import KVConfig
        from .recipes import build

        return None if self.kv is None else build(KVConfig, self.kv, f"{where}, section kv")


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, leave=False)


def _held_out(tok, job: JobConfig, model) -> dict:
    """Per source: teacher-forced blocks and continuation windows (disjoint from calibration by work or file)."""
    from .data import load_corpus, model_max_length, token_blocks

    out = {}
    for source in job.eval_data:  # the model decides the BOS, as for calibration (data.block_bos)
        corpus = load_corpus(source)
        blocks = token_blocks(tok, corpus, job.eval_block, max_tokens=job.eval_tokens, max_length=model_max_length(model),
                              model=model)
        win = token_blocks(tok, corpus, job.prefill + job.score, max_tokens=job.windows * (job.prefill + job.score),
                           max_length=model_max_length(model), seed=1, model=model)
        out[source] = ([blocks[i: i + 8] for i in range(0, len(blocks), 8)],
                       torch.stack([w["input_ids"] for w in win])[: job.windows])
    return out


def _ppl(model, data: dict, progress: bool) -> dict:
    from .eval.perplexity import perplexity

    return {src: perplexity(model, _progress(batches, f"perplexity {src}", progress))
            for src, (batches, _) in data.items()}


def _continuation(model, data: dict, make_cache, prefill: int) -> dict:
    """Per source: (continuation perplexity, cache bytes after prefill + score of one window)."""
    from .eval.perplexity import continuation_nll

    out = {}
    for src, (_, windows) in data.items():
        runs = [continuation_nll(model, w[None], prefill, make_cache) for w in windows]  # (nll, tokens, bytes)
        out[src] = (math.exp(sum(r[0] * r[1] for r in runs) / sum(r[1] for r in runs)), runs[0][2])
    return out


def run_job(job: JobConfig, overwrite: bool = False, progress: bool = True, command: str | None = None,
            recipe_path: str | None = None) -> dict:
    """Compress, measure and export as ``job`` says; returns the results dict written as ``results.json``."""
    import tempfile

    import yaml
    from transformers import DynamicCache

    from . import arch
    from .data import BUNDLED_MODELS, calibration_loader, load_corpus, load_model, resolve_model
    from .eval.memory import tensor_bytes
    from .geometry import collect_stats
    from .hub import GeoCompConfig, export, mark_compressed
    from .io import check_output
    from .kv import build_plan, collect_kv_stats, use_reduced_attention
    from .prune import block_params, prune, prune_taps, score_groups, unit_groups
    from .recipes import to_yaml_dict
    from .studies.kv_bench import parse_quant

    # ---- everything that can be wrong is found before the model loads --------------------------
    check_output(job.output, overwrite)
    resolve_model(job.model)
    pcfg, kcfg = job.prune_config(), job.kv_config()
    quant = [parse_quant(q) for q in job.kv_baselines] if kcfg is not None else []
    for source in [job.calibration, *job.eval_data]:
        load_corpus(source)
    if job.threads:
        torch.set_num_threads(job.threads)
    t_start = time.perf_counter()
    say = print

    model, tok = load_model(job.model)
    say(f"loaded {job.model} ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"in {time.perf_counter() - t_start:.0f} s")
    data = _held_out(tok, job, model)
    batches = list(calibration_loader(model, tok, job.calibration, job.tokens, job.block_size, job.batch_size))

    t0 = time.perf_counter()
    base_ppl = _ppl(model, data, progress)
    per_eval = time.perf_counter() - t0
    models = 1 + (1 + len(job.prune_baselines) if pcfg is not None else 0)
    caches = (2 + len(quant)) if kcfg is not None else 1
    calib = per_eval * job.tokens / (job.eval_tokens * len(job.eval_data)) * (2 + (3 if kcfg and kcfg.method == "fisher" else 1))
    cont = per_eval * job.windows * (job.prefill + job.score) / job.eval_tokens * caches
    say(f"estimated time for the rest of the run: about {(models - 1) * per_eval + calib + cont:.0f} s "
        f"({models - 1} pruned models to evaluate, {caches} caches, calibration of {job.tokens} tokens)")
    base_cont = _continuation(model, data, lambda: DynamicCache(config=model.config), job.prefill)
    n_base = block_params(model)
    params_base = sum(p.numel() for p in model.parameters())
    rows = []

    final, prune_plan = model, None
    if pcfg is not None:
        say(f"pruning {pcfg.sparsity:.0%} of block parameters ({pcfg.criterion}, {pcfg.allocation}, "
            f"{pcfg.compensation}) and baselines {', '.join(job.prune_baselines) or '(none)'}")
        taps = prune_taps(model, pcfg.targets, criteria=[pcfg.criterion, *job.prune_baselines],
                          compensation=pcfg.compensation, head_mode=pcfg.head_mode)  # only what they read
        stats = collect_stats(model, _progress(batches, "calibration (pruning)", progress), taps) if taps else None
        for criterion in [pcfg.criterion, *[c for c in job.prune_baselines if c != pcfg.criterion]]:
            cfg = dataclasses.replace(pcfg, criterion=criterion)
            pruned = copy.deepcopy(model)
            if cfg.criterion == "taylor":
                from .prune import taylor_grads

                grads = taylor_grads(pruned, batches, cfg.targets)
            else:
                grads = None
            scores = score_groups(pruned, unit_groups(pruned, cfg.targets, cfg.head_mode), cfg, stats, grads)
            _, plan = prune(pruned, stats, config=cfg, scores=scores, grads=grads)
            ppl = _ppl(pruned, data, progress)
            params = sum(p.numel() for p in pruned.parameters())
            for src in job.eval_data:
                rows.append({"method": f"prune-{criterion}", "eval_data": src, "budget": pcfg.sparsity,
                             "sparsity": 1 - block_params(pruned) / n_base, "params": params,
                             "params_ratio": params / params_base, "ppl": ppl[src], "ppl_ratio": ppl[src] / base_ppl[src],
                             "domain": "calibration" if src == job.eval_data[0] else "off-domain"})
            if criterion == pcfg.criterion:
                final, prune_plan = pruned, plan
            else:
                del pruned
    else:
        final = copy.deepcopy(model)
    del model

    kv_plan = None
    if kcfg is not None:
        say(f"planning the KV cache at {kcfg.budget} of its bytes ({kcfg.method} basis) on the compressed model")
        from transformers import QuantizedCache

        kstats = collect_kv_stats(final, _progress(batches, "calibration (KV)", progress), kcfg.method)
        kv_plan = build_plan(final, kstats, kcfg)
        dense = _continuation(final, data, lambda: DynamicCache(config=final.config), job.prefill)
        runs = {"dynamic": (dense, 1.0)}
        for backend, nbits in quant:
            runs[f"quantized-{backend}-int{nbits}"] = (_continuation(
                final, data, lambda b=backend, n=nbits: QuantizedCache(backend=b, config=final.config, nbits=n), job.prefill),
                nbits / (8 * torch.empty((), dtype=next(final.parameters()).dtype).element_size()))
        if arch.get_spec(final).family != "bert":
            use_reduced_attention(final)
        runs["geocomp-kv"] = (_continuation(final, data, lambda: kv_plan.cache(final), job.prefill), kcfg.budget)
        for method, (res, budget) in runs.items():
            for src in job.eval_data:
                ppl, nbytes = res[src]
                rows.append({"method": f"{'prune+' if pcfg else ''}{method}", "eval_data": src, "budget": budget,
                             "kv_bytes": nbytes, "kv_bytes_ratio": nbytes / base_cont[src][1], "ppl": ppl,
                             "ppl_ratio": ppl / base_cont[src][0], "metric": "continuation ppl",
                             "domain": "calibration" if src == job.eval_data[0] else "off-domain"})
    request = GeoCompConfig(prune=pcfg, kv=kcfg, calibration=job.calibration, tokens=job.tokens,
                            block_size=job.block_size, batch_size=job.batch_size)
    mark_compressed(final, prune_plan, kv_plan, request=request)

    bundled = BUNDLED_MODELS.get(job.model)
    results = {
        "command": command or "hf-geocomp run", "model": job.model,
        "data": {"calibration": job.calibration, "calibration_tokens": job.tokens, "evaluation": job.eval_data,
                 "eval_tokens": job.eval_tokens, "continuation": {"windows": job.windows, "prefill": job.prefill,
                                                                   "score": job.score}},
        "baseline": {"method": "base", "params": params_base, "block_params": n_base,
                     **{f"ppl[{s}]": v for s, v in base_ppl.items()},
                     **{f"continuation_ppl[{s}]": v[0] for s, v in base_cont.items()},
                     **{f"kv_bytes[{s}]": v[1] for s, v in base_cont.items()}},
        "rows": rows, "recipe": to_yaml_dict(job),
        "wall_seconds": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads(),
        "notes": "ppl: teacher-forced perplexity on eval_tokens held-out tokens per source (prune-* rows, against "
                 "the base model); continuation ppl: the context prefilled into the cache, the next score tokens "
                 "scored through it (KV rows, against the base model's uncompressed cache); kv_bytes: bytes the "
                 "cache's tensors hold after one window; budget of quantized-*: nominal bits over the dtype's bits.",
    }
    with tempfile.TemporaryDirectory() as tmp:
        plots = plot_results(results, Path(tmp))
        (Path(tmp) / "recipe.yaml").write_text(yaml.safe_dump(to_yaml_dict(job), sort_keys=False))
        extra = {p.name: p for p in plots} | {"recipe.yaml": Path(tmp) / "recipe.yaml"}
        results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        export(final, job.output, results=results, tokenizer=tok, base_model=bundled.hub_id if bundled else job.model,
               command=command, overwrite=overwrite, extra_files=extra)
    diff = check_reload(final, job.output, next(iter(data.values()))[1][:1, :64])
    say(summary_table(results))
    say(f"reload check: from_pretrained({job.output!r}) gives the measured model's logits (max |Δ| {diff:.2e})")
    say(f"wrote {job.output} in {time.perf_counter() - t_start:.0f} s: model, results.json, "
        f"{', '.join(extra)}, plan.png, README.md (model card); reload with `import hf_geocomp` + from_pretrained")
    return results


@torch.no_grad()
def check_reload(model, folder: str, ids: torch.Tensor) -> float:
    """Reload ``folder`` and compare its logits with ``model``'s; a mismatch removes the folder and raises."""
    import shutil

    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).eval()
    a, b = model.eval()(input_ids=ids).logits.float(), again(input_ids=ids).logits.float()
    diff = float((a - b).abs().max())
    if not diff <= 1e-4 * max(1.0, float(a.abs().max())):
        shutil.rmtree(folder, ignore_errors=True)
        raise GeoCompError(f"the exported folder reloads with different logits (max |Δ| {diff:.3g}); it was removed.")
    return diff


def summary_table(results: dict) -> str:
    """The results as a plain-text table (the run's stdout summary)."""
    base = results["baseline"]
    lines = [f"{'method':34s} {'eval data':24s} {'params':>8s} {'KV bytes':>8s} {'ppl':>9s} {'vs base':>8s}"]
    for src in results["data"]["evaluation"]:
        lines.append(f"{'base':34s} {src:24s} {1:8.3f} {1:8.3f} {base[f'ppl[{src}]']:9.3f} {'':>8s}")
    for r in results["rows"]:
        lines.append(f"{r['method']:34s} {r['eval_data']:24s} {r.get('params_ratio', float('nan')):8.3f} "
                     f"{r.get('kv_bytes_ratio', float('nan')):8.3f} {r['ppl']:9.3f} {100 * (r['ppl_ratio'] - 1):+7.1f}%")
    return "\n".join(lines)


def plot_results(results: dict, folder: Path) -> list[Path]:
    """quality_vs_params.png and quality_vs_kv_bytes.png: every row against the base model of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for name, x, title in (("quality_vs_params.png", "params_ratio", "parameters / base model"),
                           ("quality_vs_kv_bytes.png", "kv_bytes_ratio", "KV cache bytes / uncompressed")):
        rows = [r for r in results["rows"] if x in r]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for src in results["data"]["evaluation"]:
            pts = [(r[x], r["ppl_ratio"], r["method"]) for r in rows if r["eval_data"] == src]
            sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=src)
            for px, py, m in pts:
                ax.annotate(m, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points", color=sc.get_facecolor()[0])
        ax.scatter([1.0], [1.0], marker="*", s=120, color="black", label="base model")
        ax.set_xlabel(title)
        ax.set_ylabel("perplexity / base model" + (" (continuation)" if x == "kv_bytes_ratio" else ""))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{results['model']}: measured in one run")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        out.append(folder / name)
    return out
