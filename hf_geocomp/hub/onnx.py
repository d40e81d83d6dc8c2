"""ONNX export of a (compressed) causal LM: a no-past graph and a with-past graph, checked against PyTorch.

optimum-onnx (where optimum's ONNX exporter went) pins ``transformers < 4.58``, so the graphs come from
transformers' own exporter (``transformers.exporters.OnnxExporter``: ``torch.export`` then
``torch.onnx.export``, the dynamo exporter with onnxscript, plus transformers' patches for its cache and
masks), and they run in ONNX Runtime. What pruning, folding and three-factor (``W ≈ L·C·Rᵀ``) compression
leave is ordinary tensor algebra, so it exports as it is: per-layer MLP widths and head counts are just the
shapes of each layer's weights and cache. The coded KV cache of :mod:`hf_geocomp.kv` is not: it is a Python
cache object holding packed codes with a custom attention over them, which no ONNX graph carries; such a
model is refused unless the caller asks for its weights alone (``without_kv_coding``).

The folder written (atomically) is what ``transformers.exporters.ExportedModel.save_pretrained`` writes:

* ``prefill.onnx`` (no past): ``input_ids``, ``attention_mask``, ``position_ids`` (batch, sequence) →
  ``logits`` (batch, sequence, vocab) and ``past_key_values.layers.{i}.keys`` / ``.values``
  (batch, kv_heads of layer i, sequence, head_dim);
* ``decode.onnx`` (with past): the same three inputs (``attention_mask`` spans past + new tokens) and
  ``input.past_key_values.layers.{i}.keys`` / ``.values`` → ``logits`` and
  ``output.past_key_values.layers.{i}.keys`` / ``.values`` (past + new tokens);
* their weights in ``*.onnx.data``, ``export.json`` (transformers' manifest), ``config.json``, the tokenizer,
  and :data:`REPORT` (what was exported and ONNX Runtime's largest logit difference to PyTorch).

Batch, sequence and past length are dynamic axes. Before anything is renamed into place, ONNX Runtime runs
both saved graphs on a padded batch of two (a prefill, a several-token step, a one-token step) and on a
batch of one, against the PyTorch model on the same inputs; a difference above the tolerance is an error.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from pathlib import Path

import torch

from ..errors import GeoCompError

PACKAGES = ("onnx", "onnxscript", "onnxruntime")
REPORT = "geocomp_onnx.json"  # beside the graphs
GRAPHS = ("prefill", "decode")  # no past, with past (transformers' component names)
# sample shapes the graphs are traced at: no dynamic axis at 0 or 1 (torch.export would fix it) and no two alike
TRACE_BATCH, TRACE_PREFILL, TRACE_PAST, TRACE_STEP = 2, 6, 5, 3


def require_onnx() -> None:
    """Raise unless the ``onnx`` extra (onnx, onnxscript, onnxruntime) is installed."""
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise GeoCompError(f"ONNX export needs {', '.join(missing)}: install them with pip install 'hf-geocomp[onnx]'.")


def check_tolerance(tolerance: float) -> None:
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < float("inf")):
        raise GeoCompError(f"tolerance must be a positive number (a fraction of the largest |logit|), "
                           f"got {tolerance!r}.")


def config_plan(config) -> dict | None:
    """The geocomp plan a model config records (None: not a compressed model), read before any model is built."""
    qc = getattr(config, "quantization_config", None) or {}  # a dict until a model is built from the config
    return qc.get("plan") if isinstance(qc, dict) else getattr(qc, "plan", None)


def kv_refusal(plan: dict | None) -> str | None:
    """The one sentence refusing a plan whose part no ONNX graph can hold (its coded KV cache), else None."""
    kv = (plan or {}).get("kv")
    if kv is None or kv.get("identity"):
        return None
    return ("this model's geocomp plan codes its KV cache (hf_geocomp.kv), which runs only in PyTorch (a Python "
            "cache of packed codes read by a custom attention) and cannot be exported to ONNX; pass "
            "--without-kv-coding (without_kv_coding=True) to export its weights with a plain float KV cache.")


def kv_note(plan: dict | None) -> str | None:
    """What a user exporting a KV-coded model without its coding gets, in one sentence (None: nothing dropped)."""
    kv = (plan or {}).get("kv")
    if kv is None or kv.get("identity"):
        return None
    return (f"the ONNX graphs hold the compressed weights with a plain float KV cache of "
            f"{kv.get('full_bytes_per_token')} bytes per token, not the plan's coded cache of "
            f"{kv.get('bytes_per_token')} bytes per token, which runs only in PyTorch.")


@contextlib.contextmanager
def plain_cache(model):
    """A KV-coded model runs as its weights alone while the block runs: SDPA instead of the reduced attention, and
    a plain ``DynamicCache`` where it would swap in its coded cache (see :mod:`hf_geocomp.hub.kvstore`)."""
    from ..kv.attention import NAME

    attention, plan = model.config._attn_implementation, getattr(model, "geocomp_kv_plan", None)
    if attention == NAME:
        model.set_attn_implementation("sdpa")
    if plan is not None:
        model.geocomp_kv_plan = None
    try:
        yield
    finally:
        if attention == NAME:
            model.set_attn_implementation(attention)
        if plan is not None:
            model.geocomp_kv_plan = plan


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left-)padded ``attention_mask`` (batch, total), as ``generate`` makes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _tokens(model, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, length), generator=g)
    return ids.to(model.device)


def _forward(model, ids, mask, past=None):
    """The model's logits and cache for ``ids`` (batch, new) after ``past``, ``mask`` (batch, past + new)."""
    pos = _positions(mask)[:, mask.shape[1] - ids.shape[1]:]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
    return out.logits, out.past_key_values


def _trace_inputs(model) -> dict[str, tuple[dict, dict]]:
    """Per graph: the forward kwargs it is traced with, and their dynamic axes (``Dim.AUTO`` everywhere that
    varies: torch.export relates them itself, e.g. the mask's length to past + new tokens)."""
    from torch.export import Dim
    from transformers.exporters.exporter_dynamo import get_auto_dynamic_shapes

    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_STEP, dtype=torch.long, device=model.device)
    mask[1, :2] = 0  # a left-padded row
    _, past = _forward(model, _tokens(model, TRACE_BATCH, TRACE_PAST, 1), mask[:, :TRACE_PAST])
    axes = {name: {0: Dim.AUTO, 1: Dim.AUTO} for name in ("input_ids", "attention_mask", "position_ids")}
    prefill_mask = mask[:, :TRACE_PREFILL]
    prefill = {"input_ids": _tokens(model, TRACE_BATCH, TRACE_PREFILL, 2), "attention_mask": prefill_mask,
               "position_ids": _positions(prefill_mask), "use_cache": True}
    decode = {"input_ids": _tokens(model, TRACE_BATCH, TRACE_STEP, 3), "attention_mask": mask,
              "position_ids": _positions(mask)[:, TRACE_PAST:], "past_key_values": past}
    # the cache as torch.export sees it (transformers flattens it to its tensors): keys and values (batch, heads,
    # length, head_dim) vary in batch and length; anything else a layer holds (a window size) is fixed
    cache_axes = [{0: Dim.AUTO, 2: Dim.AUTO} if len(a) == 4 else a for a in get_auto_dynamic_shapes(past)]
    return {"prefill": (prefill, axes), "decode": (decode, {**axes, "past_key_values": cache_axes})}


def export_graphs(model):
    """A ``transformers.exporters.ExportedModel`` of the ``prefill`` (no past) and ``decode`` (with past) graphs
    (of a KV-coded model: its weights with a plain cache)."""
    from transformers.exporters import ExportedModel, OnnxConfig, OnnxExporter
    from transformers.utils import logging as hf_logging

    components = {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the exporter's "experimental" and version-drift notices
    try:
        with plain_cache(model):
            exporter = OnnxExporter()
            for name, (inputs, axes) in _trace_inputs(model).items():
                exported = exporter.export(model, copy.deepcopy(inputs), OnnxConfig(dynamic_shapes=axes))
                components[name] = exported.components["model"]
    finally:
        hf_logging.set_verbosity(verbosity)
    return ExportedModel(components, "onnx", config=model.config, generation_config=model.generation_config)


class OnnxCausalLM:
    """The two exported graphs in ONNX Runtime (CPU) sessions, called like the model with a cache.

    ``lm(ids, mask, past)`` → ``(logits, past)``: ``ids`` (batch, new) and ``mask`` (batch, past + new) are int64
    arrays, ``past`` is None (the no-past graph runs) or what the previous call returned (the with-past graph
    runs); logits and the cache stay ``onnxruntime.OrtValue`` (no copy between steps).
    """

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.sessions = {}
        for name in GRAPHS:
            try:
                self.sessions[name] = ort.InferenceSession(str(Path(folder) / f"{name}.onnx"), options,
                                                           providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own Fail / NotImplemented / InvalidGraph types
                raise GeoCompError(f"ONNX Runtime cannot open the exported {name}.onnx: "
                                   f"{str(e).strip().splitlines()[-1]}") from None
        self.outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self.cache_inputs = [i.name for i in self.sessions["decode"].get_inputs() if "past_key_values" in i.name]
        self.cache_outputs = [n for n in self.outputs["prefill"] if n.startswith("past_key_values.")]
        if len(self.cache_inputs) != len(self.cache_outputs):
            raise GeoCompError(f"the exported decode graph takes {len(self.cache_inputs)} cache tensors but the "
                               f"prefill graph returns {len(self.cache_outputs)}.")

    def __call__(self, ids, mask, past=None):
        import numpy as np
        from onnxruntime import OrtValue

        positions = np.cumsum(mask, -1) - 1
        positions[mask == 0] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions[:, mask.shape[1] - ids.shape[1]:]}
        feed = {k: OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in feed.items()}
        graph = "prefill" if past is None else "decode"
        if past is not None:
            feed.update(zip(self.cache_inputs, past))
        out = self.sessions[graph].run_with_ort_values(self.outputs[graph], feed)
        return out[0], list(out[1:])


def compare(model, lm: OnnxCausalLM, seed: int = 0) -> list[dict]:
    """ONNX Runtime against PyTorch on the same tokens: a left-padded batch of two (a 9-token prefill, a 4-token
    step, a 1-token step) and a batch of one (5, then 1), each engine carrying its own cache. Per run: the graph,
    shape, and the largest absolute logit difference over real (unpadded) tokens beside the largest |logit|."""
    runs = []
    for batch, lengths in ((2, (9, 4, 1)), (1, (5, 1))):
        ids = _tokens(model, batch, sum(lengths), seed + batch)
        mask = torch.ones_like(ids)
        mask[1:, :2] = 0
        t_past = o_past = None
        done = 0
        for new in lengths:
            m, x = mask[:, : done + new], ids[:, done: done + new]
            ref, t_past = _forward(model, x, m, t_past)
            got, o_past = lm(x.cpu().numpy(), m.cpu().numpy(), o_past)
            real = m[:, done:].bool().cpu()  # (batch, new): the tokens whose logits mean something
            ref = ref.float().cpu()[real]
            diff = (torch.from_numpy(got.numpy()).float()[real] - ref).abs().max().item()
            runs.append({"graph": "prefill" if done == 0 else "decode", "batch": batch, "past": done, "new": new,
                         "max_abs_diff": diff, "max_abs_logit": ref.abs().max().item()})
            done += new
    return runs


def summarize(runs: list[dict], tolerance: float) -> dict:
    """Per graph: the largest difference and |logit| over its runs, and whether it is within the tolerance
    (``tolerance`` × max(1, largest |logit|))."""
    out = {}
    for graph in GRAPHS:
        mine = [r for r in runs if r["graph"] == graph]
        diff, scale = max(r["max_abs_diff"] for r in mine), max(r["max_abs_logit"] for r in mine)
        out[graph] = {"max_abs_diff": diff, "max_abs_logit": scale, "allowed": tolerance * max(1.0, scale),
                      "within_tolerance": diff <= tolerance * max(1.0, scale)}
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "transformers", *PACKAGES):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def export_onnx(model, out_dir: str | Path, tokenizer=None, without_kv_coding: bool = False, tolerance: float = 1e-4,
                overwrite: bool = False, source: str | None = None, command: str | None = None) -> dict:
    """Export ``model`` (a causal LM, compressed or not) to ``out_dir`` as a no-past and a with-past ONNX graph,
    check them in ONNX Runtime against the model, and return the report also written there as :data:`REPORT`.

    ``without_kv_coding``: export a KV-coded model's weights with a plain float cache (otherwise refused).
    ``tolerance``: the largest allowed logit difference as a fraction of the largest |logit| (at least 1); a
    larger one is an error and nothing is written.
    """
    from ..io import output_dir, write_json

    require_onnx()
    check_tolerance(tolerance)
    plan = config_plan(model.config)
    refusal = kv_refusal(plan)
    if refusal and not without_kv_coding:
        raise GeoCompError(refusal)
    check_destination(out_dir, None, overwrite)
    with plain_cache(model):
        graphs = export_graphs(model)
        with output_dir(str(out_dir), overwrite) as tmp:
            graphs.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            lm = OnnxCausalLM(tmp)
            runs = compare(model, lm)
            report = {"command": command, "model": source, "dtype": str(next(model.parameters()).dtype),
                      "graphs": {name: {"file": f"{name}.onnx",
                                        "inputs": [i.name for i in s.get_inputs()], "outputs": lm.outputs[name]}
                                 for name, s in lm.sessions.items()},
                      "plan": _plan_summary(plan), "kv_coding": kv_note(plan) if refusal else None,
                      "parity": {"tolerance": tolerance, **summarize(runs, tolerance), "runs": runs},
                      "versions": _versions()}
            del lm
            write_json(tmp / REPORT, report)
            bad = {g: v for g, v in report["parity"].items() if isinstance(v, dict) and not v["within_tolerance"]}
            if bad:
                g, v = next(iter(bad.items()))
                raise GeoCompError(f"ONNX Runtime's {g} logits differ from PyTorch's by up to {v['max_abs_diff']:.3g} "
                                   f"(allowed {v['allowed']:.3g}), so nothing was written; raise the tolerance to "
                                   "keep such an export.")
    return report


def _plan_summary(plan: dict | None) -> dict | None:
    """The shapes a geocomp plan gave the model (None: an uncompressed model)."""
    if plan is None:
        return None
    shapes = plan.get("shapes") or {}
    return {**{k: shapes.get(k) for k in ("mlp_widths", "num_heads", "num_kv_heads", "head_dim")},
            "replaced_modules": len(plan.get("replaced") or {}), "params": plan.get("params"),
            "pruned_sparsity": (plan.get("prune") or {}).get("achieved_sparsity")}


def check_destination(out_dir: str | Path, model: str | None = None, overwrite: bool = False) -> None:
    """Raise, before any work, unless ``out_dir`` can become the export folder: absent or empty (or
    ``overwrite``), under a folder rather than a file, and neither the model's own folder nor one holding it."""
    from ..io import check_output

    check_output(out_dir, overwrite)
    target = Path(out_dir).expanduser().absolute()
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir():
        raise GeoCompError(f"cannot create output folder {str(out_dir)!r}: {str(parent)!r} is a file, not a folder.")
    source = Path(model).expanduser() if model else None
    if source is not None and source.exists():
        source = source.resolve()
        if target.resolve() == source or target.resolve() in source.parents:
            raise GeoCompError(f"output folder {str(out_dir)!r} would replace the model {model!r}; choose another "
                               "folder.")
