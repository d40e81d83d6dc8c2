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
import sys
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
        pipeline: ``sequential`` (pruning statistics measured, used and freed one block at a time) or
            ``whole-model`` (every block's statistics at once, shared by the criteria).
        propagate: with ``sequential``, each block's inputs come from the ``original`` blocks before it (the
            whole-model statistics) or from the ``compressed`` ones.
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
    pipeline: str = field(default="sequential", metadata={"help": "sequential (one block's statistics at a time) | "
                                                                  "whole-model"})
    propagate: str = field(default="original", metadata={"help": "sequential inputs: original | compressed"})
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
        if self.threads is not None and self.threads < 1:
            raise GeoCompError(f"threads must be at least 1 (or null for torch's default), got {self.threads}.")
        from .geometry.sequential import PIPELINES, PROPAGATE

        for name, allowed in (("pipeline", PIPELINES), ("propagate", PROPAGATE)):
            if getattr(self, name) not in allowed:
                raise GeoCompError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")
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


@dataclass
class Prepared:
    """Everything a job needs that is decided before any weights load: from the model's config and tokenizer."""

    config: object  # the model's transformers config
    tokenizer: object
    data: dict  # held-out source → (perplexity batches, continuation windows (windows, prefill + score))
    batches: list  # calibration batches
    quant: list  # QuantizedCache baselines that can run: (backend, bits)
    skipped: list  # baselines that cannot, as {"method", "reason"}


def prepare(job: JobConfig, overwrite: bool = False) -> Prepared:
    """Check everything that can be wrong and tokenize every text, reading the model's config and tokenizer only.

    Refused here, in seconds: an unwritable or existing output, an unknown model, text sources that are missing or
    too short for what the job asks (``tokens``, ``eval_tokens``, ``windows``), blocks or windows longer than
    the model's positions, and QuantizedCache baselines the model's layers cannot use (skipped, or refused
    where the user named them).
    """
    from .data import load_config, load_corpus, load_tokenizer, model_max_length
    from .io import check_output
    from .studies.kv_bench import quant_baselines

    check_output(job.output, overwrite)  # also that its folder is writable (for the partial results file too)
    config = load_config(job.model)
    pcfg, kcfg = job.prune_config(), job.kv_config()
    default = JobConfig.__dataclass_fields__["kv_baselines"].default_factory()
    quant, skipped = quant_baselines(job.kv_baselines, config, job.kv_baselines != default) if kcfg else ([], [])
    limit = model_max_length(config)
    for name, n in (("block_size", job.block_size), ("eval_block", job.eval_block),
                    ("prefill + score", job.prefill + job.score)):
        if limit is not None and n > limit:
            raise GeoCompError(f"{name} = {n} tokens exceeds the {limit} positions of model {job.model!r}; "
                               f"make it at most {limit}.")
    for source in [job.calibration, *job.eval_data]:
        load_corpus(source)
    tok = load_tokenizer(job.model)
    data = _held_out(tok, job, config)
    return Prepared(config, tok, data, _calibration(tok, job, config), quant, skipped)


def _enough(blocks, asked: int, size: int, what: str, source: str) -> None:
    """Refuse a request the text cannot meet, rather than quietly measure less than was asked."""
    if len(blocks) * size < asked:
        raise GeoCompError(f"{what} = {asked} but {source!r} gives only {len(blocks) * size} tokens in blocks of "
                           f"{size}; ask for at most that, or use a longer text.")


def _calibration(tok, job: JobConfig, config) -> list:
    from .data import calibration_loader

    loader = calibration_loader(config, tok, job.calibration, job.tokens, job.block_size, job.batch_size)
    _enough(loader.dataset, job.tokens, job.block_size, "tokens", job.calibration)
    return list(loader)


def _held_out(tok, job: JobConfig, config) -> dict:
    """Per source: teacher-forced blocks and continuation windows (disjoint from calibration by work or file)."""
    from .data import load_corpus, model_max_length, token_blocks

    out = {}
    for source in job.eval_data:  # the model decides the BOS, as for calibration (data.block_bos)
        corpus = load_corpus(source)
        blocks = token_blocks(tok, corpus, job.eval_block, max_tokens=job.eval_tokens,
                              max_length=model_max_length(config), model=config)
        _enough(blocks, job.eval_tokens, job.eval_block, "eval_tokens", source)
        win = token_blocks(tok, corpus, job.prefill + job.score, max_tokens=job.windows * (job.prefill + job.score),
                           max_length=model_max_length(config), seed=1, model=config)
        _enough(win, job.windows * (job.prefill + job.score), job.prefill + job.score, "windows x (prefill + score)",
                source)
        out[source] = ([blocks[i: i + 8] for i in range(0, len(blocks), 8)],
                       torch.stack([w["input_ids"] for w in win])[: job.windows])
    return out


def partial_path(job: JobConfig) -> Path:
    """Where a job that fails after its first measurement keeps what it measured: ``<output>.partial.json``."""
    out = Path(job.output)
    return out.with_name(out.name + ".partial.json")


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


def _domain(job: JobConfig, src: str) -> str:
    return "calibration" if src == job.eval_data[0] else "off-domain"


def _evaluate_base(model, job: JobConfig, pre: Prepared, results: dict, progress: bool) -> tuple[dict, dict]:
    """The base model's perplexity and continuation perplexity (into ``results["baseline"]``); prints a lower
    bound of the time the rest of the run takes, from the evaluation just measured."""
    from transformers import DynamicCache

    from .prune import block_params

    t0 = time.perf_counter()
    base_ppl = _ppl(model, pre.data, progress)
    per_eval = time.perf_counter() - t0
    models = (1 + len(job.prune_baselines)) if job.prune is not None else 0
    caches = (2 + len(pre.quant)) if job.kv is not None else 1
    forwards = models * per_eval + per_eval * job.tokens / (job.eval_tokens * len(job.eval_data)) * (
        1 + (job.prune is not None) + (job.kv is not None)) + per_eval * job.windows * (job.prefill + job.score) / (
        job.eval_tokens) * caches
    print(f"estimated time for the rest of the run: at least {forwards:.0f} s, a lower bound (the forward passes "
          f"still to run, at the speed this machine just evaluated the base model: {models} pruned models to "
          f"evaluate, {caches} caches, calibration of {job.tokens} tokens; backward passes, fitting and export come "
          f"on top)", flush=True)
    base_cont = _continuation(model, pre.data, lambda: DynamicCache(config=model.config), job.prefill)
    results["baseline"].update({"params": sum(p.numel() for p in model.parameters()), "block_params": block_params(model),
                                **{f"ppl[{s}]": v for s, v in base_ppl.items()},
                                **{f"continuation_ppl[{s}]": v[0] for s, v in base_cont.items()},
                                **{f"kv_bytes[{s}]": v[1] for s, v in base_cont.items()}})
    return base_ppl, base_cont


def _prune_one(model, cfg, stats, batches, job: JobConfig) -> object:
    """Prune ``model`` in place with ``cfg``: block by block (``job.pipeline``), or its criterion scored on the
    shared whole-model ``stats`` (gradients for taylor)."""
    from .prune import prune, prune_calibrated, taylor_grads

    if job.pipeline == "sequential":
        return prune_calibrated(model, batches, cfg, job.pipeline, job.propagate)[1]
    grads = taylor_grads(model, batches, cfg.targets) if cfg.criterion == "taylor" else None
    return prune(model, stats, config=cfg, grads=grads)[1]  # prune scores the criterion on the shared stats


def _prune_stage(model, job: JobConfig, pre: Prepared, results: dict, base_ppl: dict, progress: bool):
    """Prune with each baseline criterion, then with the recipe's own; returns the plan of the last, which is
    applied to ``model`` itself (the base is no longer needed then).

    One model beside the base at a time: each baseline prunes a copy that is measured and freed before the next,
    so memory holds the base and one pruned copy, never a copy per baseline.
    """
    import gc

    from .geometry import collect_stats
    from .prune import block_params, prune_taps

    pcfg = job.prune_config()
    print(f"pruning {pcfg.sparsity:.0%} of block parameters ({pcfg.criterion}, {pcfg.allocation}, "
          f"{pcfg.compensation}) and baselines {', '.join(job.prune_baselines) or '(none)'}", flush=True)
    base = results["baseline"]
    if job.pipeline == "sequential":  # each criterion calibrates block by block: one block's statistics at a time
        stats = None
    else:
        taps = prune_taps(model, pcfg.targets, criteria=[pcfg.criterion, *job.prune_baselines],
                          compensation=pcfg.compensation, head_mode=pcfg.head_mode)  # only what they read
        stats = collect_stats(model, _progress(pre.batches, "calibration (pruning)", progress), taps) if taps else None

    def measure(pruned, criterion) -> list[dict]:
        ppl, params = _ppl(pruned, pre.data, progress), sum(p.numel() for p in pruned.parameters())
        return [{"method": f"prune-{criterion}", "eval_data": src, "budget": pcfg.sparsity,
                 "sparsity": 1 - block_params(pruned) / base["block_params"], "params": params,
                 "params_ratio": params / base["params"], "ppl": ppl[src], "ppl_ratio": ppl[src] / base_ppl[src],
                 "domain": _domain(job, src)} for src in job.eval_data]

    first = len(results["rows"])
    for criterion in dict.fromkeys(c for c in job.prune_baselines if c != pcfg.criterion):
        pruned = copy.deepcopy(model)
        _prune_one(pruned, dataclasses.replace(pcfg, criterion=criterion), stats, pre.batches, job)
        results["rows"].extend(measure(pruned, criterion))
        del pruned
        gc.collect()
    plan = _prune_one(model, pcfg, stats, pre.batches, job)
    del stats
    results["rows"][first:first] = measure(model, pcfg.criterion)  # the recipe's own criterion first
    return plan


def _kv_stage(model, job: JobConfig, pre: Prepared, results: dict, base_cont: dict, progress: bool):
    """Plan the coded KV cache on ``model`` and measure it beside the uncompressed cache and the QuantizedCache
    baselines (continuation perplexity); returns the plan."""
    from transformers import DynamicCache

    from . import arch
    from .kv import build_plan, collect_kv_stats, use_reduced_attention

    kcfg = job.kv_config()
    print(f"planning the KV cache at {kcfg.budget} of its bytes ({kcfg.method} basis) on the compressed model",
          flush=True)
    kstats = collect_kv_stats(model, _progress(pre.batches, "calibration (KV)", progress), kcfg.method)
    kv_plan = build_plan(model, kstats, kcfg)
    del kstats
    runs = {"dynamic": (_continuation(model, pre.data, lambda: DynamicCache(config=model.config), job.prefill), 1.0)}
    if pre.quant:
        from transformers import QuantizedCache

        bits = 8 * torch.empty((), dtype=next(model.parameters()).dtype).element_size()
        for backend, nbits in pre.quant:
            runs[f"quantized-{backend}-int{nbits}"] = (_continuation(
                model, pre.data, lambda b=backend, n=nbits: QuantizedCache(backend=b, config=model.config, nbits=n),
                job.prefill), nbits / bits)
    if arch.get_spec(model).family != "bert":
        use_reduced_attention(model)
    runs["geocomp-kv"] = (_continuation(model, pre.data, lambda: kv_plan.cache(model), job.prefill), kcfg.budget)
    for method, (res, budget) in runs.items():
        for src in job.eval_data:
            ppl, nbytes = res[src]
            results["rows"].append({"method": f"{'prune+' if job.prune else ''}{method}", "eval_data": src,
                                    "budget": budget, "kv_bytes": nbytes, "kv_bytes_ratio": nbytes / base_cont[src][1],
                                    "ppl": ppl, "ppl_ratio": ppl / base_cont[src][0], "metric": "continuation ppl",
                                    "domain": _domain(job, src)})
    return kv_plan


def _export_stage(model, prune_plan, kv_plan, job: JobConfig, pre: Prepared, results: dict, t_start: float,
                  command: str | None, overwrite: bool) -> list[str]:
    """Record the plans in ``model`` and write the model folder (atomic) with results, plots, recipe and card;
    returns the names of the extra files."""
    import tempfile

    import yaml

    from .data import BUNDLED_MODELS
    from .hub import GeoCompConfig, export, mark_compressed
    from .recipes import to_yaml_dict

    request = GeoCompConfig(prune=job.prune_config(), kv=job.kv_config(), calibration=job.calibration,
                            tokens=job.tokens, block_size=job.block_size, batch_size=job.batch_size,
                            pipeline=job.pipeline, propagate=job.propagate)
    mark_compressed(model, prune_plan, kv_plan, request=request)
    bundled = BUNDLED_MODELS.get(job.model)
    with tempfile.TemporaryDirectory() as tmp:
        plots = plot_results(results, Path(tmp))
        (Path(tmp) / "recipe.yaml").write_text(yaml.safe_dump(to_yaml_dict(job), sort_keys=False))
        extra = {p.name: p for p in plots} | {"recipe.yaml": Path(tmp) / "recipe.yaml"}
        results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        export(model, job.output, results=results, tokenizer=pre.tokenizer,
               base_model=bundled.hub_id if bundled else job.model, command=command, overwrite=overwrite,
               extra_files=extra)
    return list(extra)


def run_job(job: JobConfig, overwrite: bool = False, progress: bool = True, command: str | None = None,
            recipe_path: str | None = None) -> dict:
    """Compress, measure and export as ``job`` says; returns the results dict written as ``results.json``.

    Stages: :func:`prepare` (no weights), load, base evaluation, pruning, KV coding, export, reload check. A
    failure after the model loads writes what was measured to :func:`partial_path` (``"partial": true`` and
    the error) and re-raises; the model folder is only ever written whole.
    """
    from .data import load_model
    from .io import write_json
    from .recipes import to_yaml_dict

    pre = prepare(job, overwrite)  # everything that can be wrong is found before the model loads
    if job.threads:
        torch.set_num_threads(job.threads)
    t_start = time.perf_counter()
    results = {
        "command": command or "hf-geocomp run", "model": job.model,
        "data": {"calibration": job.calibration, "calibration_tokens": job.tokens, "evaluation": job.eval_data,
                 "eval_tokens": job.eval_tokens, "continuation": {"windows": job.windows, "prefill": job.prefill,
                                                                   "score": job.score}},
        "baseline": {"method": "base"}, "rows": [], "skipped": pre.skipped, "recipe": to_yaml_dict(job),
        "wall_seconds": None, "threads": torch.get_num_threads(),
        "notes": "ppl: teacher-forced perplexity on eval_tokens held-out tokens per source (prune-* rows, against "
                 "the base model); continuation ppl: the context prefilled into the cache, the next score tokens "
                 "scored through it (KV rows, against the base model's uncompressed cache); kv_bytes: bytes the "
                 "cache's tensors hold after one window; budget of quantized-*: nominal bits over the dtype's bits; "
                 "skipped: baselines this model cannot run, and why.",
    }
    model, _ = load_model(job.model)
    print(f"loaded {job.model} ({sum(p.numel() for p in model.parameters()):,} parameters) "
          f"in {time.perf_counter() - t_start:.0f} s", flush=True)
    stage = "base evaluation"
    try:
        base_ppl, base_cont = _evaluate_base(model, job, pre, results, progress)
        stage = "pruning"
        prune_plan = _prune_stage(model, job, pre, results, base_ppl, progress) if job.prune is not None else None
        stage = "KV coding"
        kv_plan = _kv_stage(model, job, pre, results, base_cont, progress) if job.kv is not None else None
        stage = "export"
        extra = _export_stage(model, prune_plan, kv_plan, job, pre, results, t_start, command, overwrite)
        stage = "reload check"
        window = next(iter(pre.data.values()))[1][:1]  # (1, prefill + score)
        diff = check_reload(model, job.output, window, job.prefill)
    except (Exception, KeyboardInterrupt) as e:
        partial = {**results, "partial": True, "failed_stage": stage, "error": f"{type(e).__name__}: {e}"[:500],
                   "wall_seconds": round(time.perf_counter() - t_start, 1)}
        write_json(partial_path(job), partial)
        print(f"the run failed during {stage}; what it measured is kept in {partial_path(job)} (partial)",
              file=sys.stderr, flush=True)
        raise
    partial_path(job).unlink(missing_ok=True)  # a failed earlier run's partial results are superseded
    print(summary_table(results))
    print(f"reload check: from_pretrained({job.output!r}) gives the measured model's logits and its own cache's "
          f"continuation (max |Δ| {diff:.2e})")
    print(f"wrote {job.output} in {time.perf_counter() - t_start:.0f} s: model, results.json, "
          f"{', '.join(extra)}, plan.png, README.md (model card); reload with `import hf_geocomp` + from_pretrained")
    return results


@torch.no_grad()
def continuation_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``ids`` read as a continuation: ``ids[:, :prefill]`` prefilled into the model's own cache (the
    coded cache of a model with a KV plan), then the rest scored through that cache; (batch, seq, vocab) float."""
    first = model(input_ids=ids[:, :prefill], use_cache=True)
    rest = model(input_ids=ids[:, prefill:], past_key_values=first.past_key_values, use_cache=True)
    return torch.cat([first.logits, rest.logits], 1).float()


@torch.no_grad()
def check_reload(model, folder: str, ids: torch.Tensor, prefill: int) -> float:
    """Reload ``folder`` and compare its continuation logits (:func:`continuation_logits`) with ``model``'s, so
    the saved cache bases are read too; a mismatch removes the folder and raises."""
    import shutil

    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).eval()
    a, b = continuation_logits(model.eval(), ids, prefill), continuation_logits(again, ids, prefill)
    diff = float((a - b).abs().max())
    if not diff <= 1e-4 * max(1.0, float(a.abs().max())):
        shutil.rmtree(folder, ignore_errors=True)
        raise GeoCompError(f"the exported folder reloads with different logits or cache continuation (max |Δ| "
                           f"{diff:.3g}); it was removed.")
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
