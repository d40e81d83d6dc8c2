"""Peak memory of a run predicted from the model's config alone, before any weight is read (issue 29 §6).

The model is built on the meta device from its config (no weights, no memory), so the very taps each
method reads (:func:`hf_geocomp.prune.prune_taps`, :func:`hf_geocomp.kv.compress.required_taps`) give
the shapes of their statistics: ``Σx``, ``Σxxᵀ`` (or ``Σx²``) and ``n`` in float64, plus, while a full
statistic is being collected, a window of its products in float32 (:class:`hf_geocomp.geometry.Moments`).
Taps whose modules read one tensor (q/k/v, gate/up) are accumulated once, as the engine does.

A run goes through phases; each holds the weights and what that phase adds:

* ``load``: a GGUF checkpoint is mapped in full and each tensor is dequantised to float32 before its cast;
* ``calibration (prune)`` / ``calibration (KV)``: the statistics being collected (every block's on the
  ``whole`` path; the largest block's on the ``sequential`` path, plus the hidden states of the
  calibration tokens, a block's inputs and outputs) and the activations of one forward pass; KV ``fisher``
  also keeps every block's activations for the backward pass and the batch's full logits for its loss;
* ``evaluation``: the activations of an evaluation batch and one chunk of logits
  (:data:`hf_geocomp.eval.perplexity.LOGITS_BYTES`), and the KV cache of a continuation window.

On the ``whole`` path the main job (today's ``hf_geocomp.job``) also holds copies of the model while it prunes:
the base, the chosen pruned model and the baseline being measured (:func:`job_weight_copies`); the ``sequential``
path is predicted as issue 29 designs it, one model at a time (baselines measured one after another). KV
``fisher`` is predicted with today's whole-model backward on both paths. Activations are estimates per token
(documented at :func:`forward_bytes`, :func:`backward_bytes`); statistics, weights, logits chunks and caches are
counted exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import GeoCompError
from .memory_cli import PIPELINES  # torch-free, so `hf-geocomp --help` lists plan-memory cheaply

GB = 1e9
RUNTIME_BYTES = int(0.6 * GB)  # resident size of Python with torch, transformers, datasets and hf_geocomp imported


# ---- the model without weights --------------------------------------------------------------------------

def load_config(model: str):
    """The transformers config of a bundled name, folder, GGUF file or Hub id (no weights are read)."""
    from transformers import AutoConfig

    from .arch import check_config
    from .data import resolve_model

    where, gguf = resolve_model(model)
    config = AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    check_config(config)
    return config


def meta_model(config, dtype: torch.dtype = torch.float32):
    """The model of ``config`` on the meta device: every module and shape, no storage."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype).eval()


# ---- statistics -------------------------------------------------------------------------------------------

def tap_shape(model, tap) -> tuple[int, ...]:
    """The shape of a tap's ``Σx``: (d,) or (heads, head_dim)."""
    from .arch import is_linear, linear_weight

    module = model.get_submodule(tap.module)
    if tap.width is not None:
        d = tap.width
    elif is_linear(module):
        d = linear_weight(module).shape[1 if tap.where == "input" else 0] - tap.offset
    else:
        raise GeoCompError(f"cannot tell the width of tap {tap.key!r} from the config; give it a width.")
    return (d // tap.head_dim, tap.head_dim) if tap.head_dim else (d,)


def tap_bytes(model, tap, collecting: bool = False, compute_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one tap's statistics: float64 ``Σx``, ``Σxxᵀ`` (``Σx²`` for diag taps) and ``n``; with
    ``collecting``, also the window of products a full statistic holds in ``compute_dtype`` until it is read."""
    shape = tap_shape(model, tap)
    n = math.prod(shape)
    outer = n if tap.moments == "diag" else n * shape[-1]
    held = 8 * (n + outer + 1)
    window = collecting and tap.moments == "full" and compute_dtype != torch.float64
    return held + (outer * torch.empty((), dtype=compute_dtype).element_size() if window else 0)


def _share_key(model, tap, prefixes: list[str]):
    """Taps with one key read one tensor (the engine aliases them): inputs of q/k/v, of gate/up, of one block."""
    from .arch import get_spec

    if tap.where != "input":
        return tap.key
    spec = get_spec(model)
    prefix = next((p for p in prefixes if tap.module.startswith(p)), "")
    local = tap.module[len(prefix):]
    group = ("attn_in" if local in {spec.q, spec.k, spec.v, spec.qkv} - {None} else
             "mlp_in" if local in spec.mlp_in else local)
    return (prefix, group, tap.selection)


def stats_bytes(model, taps, *, per_block: bool = False, collecting: bool = False) -> int:
    """Bytes of the statistics of ``taps`` as :class:`~hf_geocomp.geometry.ActivationStats` holds them
    (``nbytes()``): shared tensors counted once; ``per_block``: the largest block's only (the sequential path)."""
    from .arch import block_prefixes, layer_index

    prefixes = block_prefixes(model)
    seen, blocks = set(), {}
    for tap in taps:
        key = _share_key(model, tap, prefixes)
        if key in seen:
            continue
        seen.add(key)
        block = layer_index(tap.module) if per_block else None
        blocks[block] = blocks.get(block, 0) + tap_bytes(model, tap, collecting)
    return max(blocks.values(), default=0) if per_block else sum(blocks.values())


# ---- activations ------------------------------------------------------------------------------------------

def _dims(config) -> dict:
    g = lambda *keys: next((getattr(config, k) for k in keys if getattr(config, k, None)), None)  # noqa: E731
    hidden = g("hidden_size", "n_embd")
    heads = g("num_attention_heads", "n_head")
    return {"hidden": hidden, "inter": g("intermediate_size", "n_inner") or 4 * hidden, "heads": heads,
            "kv_heads": g("num_key_value_heads") or heads, "head_dim": g("head_dim") or hidden // heads,
            "layers": g("num_hidden_layers", "n_layer"), "vocab": g("vocab_size")}


def forward_bytes(config, batch: int, tokens: int, elt: int) -> int:
    """Transient activations of one forward pass without gradients over ``batch`` sequences of ``tokens``: a
    block's widest tensors (residual, norm output, q/k/v, attention output: 4·hidden; gate, up and their
    product: 3·intermediate per token) and the attention scores of one block (batch·heads·tokens², float32,
    as the math path of scaled-dot-product attention holds them)."""
    d = _dims(config)
    return batch * tokens * (4 * d["hidden"] + 3 * d["inter"]) * elt + batch * d["heads"] * tokens ** 2 * 4


def backward_bytes(config, batch: int, tokens: int, elt: int) -> int:
    """What a backward pass through every block keeps: per block and token about 10·hidden + 4·intermediate
    saved activations (scaled-dot-product attention on CPU saves its log-sum-exp, not the probabilities); plus
    the batch's logits, a float32 copy where they are not float32, the log-softmax and its gradient for the loss.
    Measured on SmolLM2-135M in float32, one batch of 8 × 256 (``test_slow_predictions_match_measured_peaks``):
    4.21 GB above the steady size, predicted 4.13 GB."""
    d = _dims(config)
    per_block = batch * tokens * (10 * d["hidden"] + 4 * d["inter"]) * elt
    return d["layers"] * per_block + batch * tokens * d["vocab"] * (elt + (4 if elt != 4 else 0) + 2 * 4)


def logits_chunk_bytes(config) -> int:
    """One chunk of evaluation logits in float32 and the log-softmax of it (see hf_geocomp.eval.perplexity)."""
    from .eval.perplexity import LOGITS_BYTES

    vocab = _dims(config)["vocab"]
    return 2 * max(1, LOGITS_BYTES // (4 * vocab)) * vocab * 4


def kv_cache_bytes(config, tokens: int, elt: int, batch: int = 1) -> int:
    """The uncompressed KV cache of ``batch`` windows of ``tokens`` tokens: keys and values of every block."""
    d = _dims(config)
    return 2 * d["layers"] * batch * tokens * d["kv_heads"] * d["head_dim"] * elt


# ---- the plan --------------------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    """Predicted bytes of each component and of each phase of a run (weights and the runtime included)."""

    model: str
    dtype: str
    pipeline: str
    parts: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    available: int | None = None

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.peak <= self.available

    def refusal(self) -> str:
        """The one sentence for a run predicted not to fit."""
        return (f"{self.model} ({self.dtype}, {self.pipeline} pipeline) is predicted to need {self.peak / GB:.1f} GB "
                f"at its peak ({self.peak_phase}), but this machine has {self.available / GB:.1f} GB available.")

    def check(self) -> None:
        """A :class:`GeoCompError` (:meth:`refusal`) when the run is predicted not to fit."""
        if self.fits is False:
            raise GeoCompError(self.refusal())

    def to_dict(self) -> dict:
        return {"method": "plan-memory", "model_name": self.model, "dtype": self.dtype, "pipeline": self.pipeline,
                "peak_bytes": self.peak, "peak_phase": self.peak_phase, "available_bytes": self.available,
                "fits": self.fits, **{f"phase[{k}]": v for k, v in self.phases.items()},
                **{f"bytes[{k}]": v for k, v in self.parts.items()}}

    def table(self) -> str:
        rows = [f"{self.model} ({self.dtype}, {self.pipeline} pipeline)"]
        rows += [f"  {k:<50} {v / GB:8.2f} GB" for k, v in self.parts.items()]
        rows += [f"  phase {k:<44} {v / GB:8.2f} GB" + ("  <- peak" if k == self.peak_phase else "")
                 for k, v in self.phases.items()]
        avail = "unknown" if self.available is None else f"{self.available / GB:.2f} GB"
        verdict = {None: "cannot tell", True: "fits", False: "does not fit"}[self.fits]
        return "\n".join(rows + [f"  available {avail}: {verdict}"])


def available_bytes() -> int | None:
    """Memory available to a new process now: ``MemAvailable`` of /proc/meminfo, else psutil's, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def job_weight_copies(job) -> int:
    """Model copies the main job holds while it prunes: the base and the pruned copy being measured, plus the
    chosen pruned model while the baselines are measured."""
    return 2 + (1 if [c for c in job.prune_baselines if c != job.prune["criterion"]] else 0)


def plan_job(job, pipeline: str = "whole", dtype: torch.dtype = torch.float32, config=None,
             available: int | None = -1) -> MemoryPlan:
    """The :class:`MemoryPlan` of the main job ``job`` (:class:`~hf_geocomp.job.JobConfig`) on ``pipeline``.

    ``config``: the model's config (default: read from ``job.model``); ``available``: bytes available
    (default: this machine's now, :func:`available_bytes`).
    """
    from .data import BUNDLED_MODELS, resolve_model
    from .kv.compress import required_taps
    from .prune import prune_taps

    if pipeline not in PIPELINES:
        raise GeoCompError(f"pipeline {pipeline!r} is not one of {', '.join(PIPELINES)}.")
    config = load_config(job.model) if config is None else config
    model = meta_model(config, dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    sequential = pipeline == "sequential"
    d = _dims(config)
    parts: dict[str, int] = {"runtime": RUNTIME_BYTES}
    parts["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4
    gguf = BUNDLED_MODELS.get(job.model)
    file_bytes = 0
    if job.model.endswith(".gguf") or (gguf is not None and gguf.gguf):
        import os

        where, name = resolve_model(job.model)
        file_bytes = os.path.getsize(os.path.join(where, name))
    parts["load (GGUF mapped + a float32 tensor)"] = file_bytes + largest if file_bytes else 0
    parts["forward activations (calibration batch)"] = forward_bytes(config, job.batch_size, job.block_size, elt)
    parts["forward activations (evaluation batch)"] = max(forward_bytes(config, 8, job.eval_block, elt),
                                                          forward_bytes(config, 1, job.prefill + job.score, elt))
    parts["logits chunk (evaluation)"] = logits_chunk_bytes(config)
    parts["KV cache (continuation window)"] = kv_cache_bytes(config, job.prefill + job.score, elt)
    if sequential:
        parts["hidden states (calibration tokens, in and out)"] = 2 * job.tokens * d["hidden"] * elt
    hidden = parts.get("hidden states (calibration tokens, in and out)", 0)
    copies = 1 if sequential else job_weight_copies(job)  # sequential: baselines one at a time (issue 29 §4)
    w, rt = parts["weights"], RUNTIME_BYTES
    phases = {"load": rt + w + parts["load (GGUF mapped + a float32 tensor)"]}
    prune_held = 0
    if job.prune is not None:
        pcfg = job.prune_config()
        taps = prune_taps(model, pcfg.targets, criteria=[pcfg.criterion, *job.prune_baselines],
                          compensation=pcfg.compensation, head_mode=pcfg.head_mode)
        parts["statistics (prune, collecting)"] = stats_bytes(model, taps, per_block=sequential, collecting=True)
        parts["statistics (prune, held)"] = prune_held = stats_bytes(model, taps, per_block=sequential)
        phases["calibration (prune)"] = (rt + w + hidden + parts["statistics (prune, collecting)"]
                                         + parts["forward activations (calibration batch)"])
        phases["pruning and baselines"] = (rt + copies * w + prune_held + parts["logits chunk (evaluation)"]
                                           + parts["forward activations (evaluation batch)"])
    if job.kv is not None:
        kcfg = job.kv_config()
        taps = required_taps(model, kcfg.method)
        parts["statistics (KV, collecting)"] = stats_bytes(model, taps, per_block=sequential, collecting=True)
        grad = backward_bytes(config, job.batch_size, job.block_size, elt) if kcfg.method == "fisher" else 0
        parts["backward (KV fisher: saved activations, logits)"] = grad
        phases["calibration (KV)"] = (rt + w + (0 if sequential else prune_held) + hidden
                                      + parts["statistics (KV, collecting)"] + max(
                                          grad, parts["forward activations (calibration batch)"]))
    phases["evaluation"] = (rt + w + parts["logits chunk (evaluation)"]
                            + parts["forward activations (evaluation batch)"] + parts["KV cache (continuation window)"])
    return MemoryPlan(job.model, str(dtype).removeprefix("torch."), pipeline, parts, phases,
                      available_bytes() if available == -1 else available)


# ---- the command ------------------------------------------------------------------------------------------

def run_plan_memory(args) -> None:
    """``hf-geocomp plan-memory MODEL [MODEL ...] [RECIPE.yaml]``: print each plan, write them as JSON, and
    refuse (exit 2, one sentence) a run predicted not to fit unless ``--no-check``."""
    import shlex
    import sys

    from .io import write_json
    from .recipes import load_job

    recipes = [a for a in args.models if a.endswith((".yaml", ".yml"))]
    models = [a for a in args.models if a not in recipes]
    if len(recipes) > 1 or not models:
        raise GeoCompError("plan-memory takes one or more models and at most one job recipe (a .yaml file).")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GeoCompError(f"dtype {args.dtype!r} is not a torch floating-point dtype (float32, bfloat16, float16).")
    pipelines = PIPELINES if args.pipeline == "both" else (args.pipeline,)
    job = load_job(recipes[0] if recipes else None, args.set)
    plans = []
    for model in models:
        config = load_config(model)
        job.model = model
        for pipeline in pipelines:
            plans.append(plan_job(job, pipeline, dtype, config=config))
            print(plans[-1].table())
    if args.output:
        write_json(args.output, {
            "command": getattr(args, "command_line", None) or "hf-geocomp plan-memory " + shlex.join(sys.argv[1:]),
            "model": models, "data": {"calibration_tokens": job.tokens, "block_size": job.block_size,
                                      "batch_size": job.batch_size, "prefill": job.prefill, "score": job.score},
            "baseline": {"runtime_bytes": RUNTIME_BYTES}, "rows": [p.to_dict() for p in plans],
            "notes": "bytes predicted from each model's config on the meta device before loading (hf_geocomp.memory);"
                     " statistics are exact (float64 sums, float32 product windows while collecting), activations"
                     " estimated per token; recipe: " + (recipes[0] if recipes else "the default job")})
    if not args.no_check:
        for plan in plans:
            plan.check()
