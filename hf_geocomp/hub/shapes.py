"""The shape record of a compressed model, and its rebuild on the meta device.

Method-agnostic: the record is read from the modules themselves (whatever made them smaller:
pruning, folding), so every method that changes per-layer widths or head counts reloads the
same way. ``replaced`` modules (a method's own module class in place of a dense layer) are
recorded through the ``geocomp_record`` protocol of :mod:`hf_geocomp.hub`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError

# kind → "module.path:ClassName" of a replacement module (resolved lazily, on reload only).
MODULE_KINDS: dict[str, str] = {
    "curvature_subspace": "hf_geocomp.curvature.modules:CurvatureSubspaceLinear",  # K-FAC W ≈ L·C·Rᵀ
}


def register_module_kind(kind: str, target: str) -> None:
    """Declare that replaced modules of ``kind`` are rebuilt by ``target`` (``"package.module:Class"``)."""
    if MODULE_KINDS.get(kind, target) != target:
        raise GeoCompError(f"module kind {kind!r} is already registered for {MODULE_KINDS[kind]}.")
    MODULE_KINDS[kind] = target


def module_class(kind: str) -> type:
    if kind not in MODULE_KINDS:
        raise GeoCompError(f"replaced module kind {kind!r} is unknown to this hf_geocomp; known: "
                           f"{', '.join(sorted(MODULE_KINDS)) or '(none)'} (upgrade with `pip install -U hf-geocomp`).")
    path, _, name = MODULE_KINDS[kind].partition(":")
    return getattr(importlib.import_module(path), name)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a dense layer, None for anything else (a replaced module)."""
    return tuple(arch.linear_weight(module).shape) if arch.is_linear(module) else None


def stock_shapes(model: nn.Module) -> dict:
    """Per-layer widths and head counts that the model's config alone would build."""
    heads = arch.head_layout(model)
    spec, n = arch.get_spec(model), len(arch.block_prefixes(model))
    cfg = model.config
    width = getattr(cfg, spec.mlp_width, None) or 4 * (getattr(cfg, "hidden_size", None) or cfg.n_embd)
    return {"mlp_widths": [int(width)] * n, "num_heads": [heads.num_heads] * n,
            "num_kv_heads": [heads.num_kv_heads] * n, "head_dim": heads.head_dim}


def read_shapes(model: nn.Module) -> dict:
    """The widths and head counts every block has now (read from its dense layers)."""
    spec, heads = arch.get_spec(model), arch.head_layout(model)
    hd, out = heads.head_dim, stock_shapes(model)
    for i, prefix in enumerate(arch.block_prefixes(model)):
        down = _dims(model.get_submodule(prefix + spec.mlp_out))
        up = _dims(model.get_submodule(prefix + spec.mlp_in[0]))
        if down or up:
            out["mlp_widths"][i] = down[1] if down else up[0] // spec.mlp_chunks
        o = _dims(model.get_submodule(prefix + spec.o))
        if o:
            out["num_heads"][i] = o[1] // hd
        if spec.qkv:  # fused [q | k | v] rows: (heads + 2·kv_heads)·head_dim (GPT-2: kv_heads = heads)
            qkv = _dims(model.get_submodule(prefix + spec.qkv))
            if qkv:
                nq = out["num_heads"][i] if o else qkv[0] // (3 * hd)
                out["num_heads"][i], out["num_kv_heads"][i] = nq, (qkv[0] // hd - nq) // 2
        else:
            k = _dims(model.get_submodule(prefix + spec.k))
            if k:
                out["num_kv_heads"][i] = k[0] // hd
    return out


def replaced_modules(model: nn.Module) -> dict[str, dict]:
    """``{module name: record}`` of every module that speaks the ``geocomp_record`` protocol."""
    out = {}
    for name, m in model.named_modules():
        if callable(getattr(m, "geocomp_record", None)) and not isinstance(m, type):
            record = m.geocomp_record()
            if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
                raise GeoCompError(f"{type(m).__name__}.geocomp_record() of {name!r} must return a dict with a 'kind'.")
            out[name] = record
    return out


def stock_differences(model: nn.Module) -> tuple[bool, list[str]]:
    """(whether the model's config alone builds exactly its state dict, dense layers that have a bias the
    config does not build). A config flag a family ignores (Qwen2 has no ``mlp_bias``) shows up here."""
    import copy

    with torch.device("meta"):
        ref = type(model)(copy.deepcopy(model.config))
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ref_modules = dict(ref.named_modules())
    added = [n for n, m in model.named_modules() if arch.is_linear(m) and m.bias is not None
             and n in ref_modules and arch.is_linear(ref_modules[n]) and ref_modules[n].bias is None]
    return mine == theirs, added


def add_biases(model: nn.Module, names: list[str], dtype: torch.dtype | None = None) -> None:
    """Give the (meta) dense layers ``names`` an empty bias each."""
    for name in names:
        m = model.get_submodule(name)
        if m.bias is None:
            m.bias = nn.Parameter(torch.empty(arch.linear_weight(m).shape[0], device="meta",
                                              dtype=dtype or m.weight.dtype))


def _meta_linear(like: nn.Module, out_f: int, in_f: int) -> nn.Module:
    """An empty (meta) dense layer of ``like``'s kind and bias, (out_f, in_f)."""
    with torch.device("meta"):
        if type(like).__name__ == "Conv1D":
            return type(like)(out_f, in_f)
        return nn.Linear(in_f, out_f, bias=like.bias is not None, dtype=like.weight.dtype)


def _resize(model: nn.Module, name: str, out_f: int | None = None, in_f: int | None = None) -> None:
    m = model.get_submodule(name)
    o, i = _dims(m)
    if (out_f or o, in_f or i) != (o, i):
        _set_module(model, name, _meta_linear(m, out_f or o, in_f or i))


def rebuild(model: nn.Module, shapes: dict, replaced: dict[str, dict], dtype: torch.dtype | None = None,
            biases: list[str] = ()) -> None:
    """Give a freshly built (meta) model the recorded shapes and biases, then put the replaced modules in."""
    spec, stock = arch.get_spec(model), stock_shapes(model)
    prefixes = arch.block_prefixes(model)
    n = len(prefixes)
    for key in ("mlp_widths", "num_heads", "num_kv_heads"):
        if len(shapes.get(key, ())) != n:
            raise GeoCompError(f"the geocomp plan records {len(shapes.get(key, ()))} layers of {key}, "
                               f"but this {spec.family} model has {n}.")
    if shapes.get("head_dim") != stock["head_dim"]:
        raise GeoCompError(f"the geocomp plan's head_dim {shapes.get('head_dim')} differs from the config's "
                           f"{stock['head_dim']}.")
    hd = stock["head_dim"]
    for i, prefix in enumerate(prefixes):
        w, nq, nkv = shapes["mlp_widths"][i], shapes["num_heads"][i], shapes["num_kv_heads"][i]
        if min(w, nq, nkv) < 1 or nq % nkv:
            raise GeoCompError(f"the geocomp plan's layer {i} has impossible shapes (width {w}, heads {nq}/{nkv}).")
        if w != stock["mlp_widths"][i]:
            for name in spec.mlp_in:  # a fused [gate | up] (Phi-3) holds mlp_chunks rows per neuron
                _resize(model, prefix + name, out_f=w * spec.mlp_chunks)
            _resize(model, prefix + spec.mlp_out, in_f=w)
        if (nq, nkv) != (stock["num_heads"][i], stock["num_kv_heads"][i]):
            if spec.qkv:
                _resize(model, prefix + spec.qkv, out_f=(nq + 2 * nkv) * hd)
            else:
                _resize(model, prefix + spec.q, out_f=nq * hd)
                _resize(model, prefix + spec.k, out_f=nkv * hd)
                _resize(model, prefix + spec.v, out_f=nkv * hd)
            _resize(model, prefix + spec.o, in_f=nq * hd)
            arch.set_attention_heads(model, model.get_submodule(prefix + spec.attn), nq, nkv)
    add_biases(model, list(biases), dtype)
    for name, record in replaced.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise GeoCompError(f"the geocomp plan replaces module {name!r}, which this model does not have.") from None
        with torch.device("meta"):
            new = module_class(record["kind"]).from_geocomp_record(dict(record), dtype)
        _set_module(model, name, new)
        _skip_parent_init(model, name)


def _skip_parent_init(model: nn.Module, name: str) -> None:
    """Mark the parent of replaced module ``name`` as initialised for transformers' weight init.

    After loading, ``from_pretrained`` runs the family's ``_init_weights`` on every module not marked
    ``_is_hf_initialized``, and some read a child's dense weight from the parent (GPT-2's MLP and
    attention: ``module.c_proj.weight``), which a replaced module does not have. The parent's own
    tensors are its children's, which the checkpoint fills (and ``check_checkpoint`` checks); the
    children keep their own init pass, so nothing the checkpoint lacks goes uninitialised.
    """
    parent = name.rpartition(".")[0]
    (model.get_submodule(parent) if parent else model)._is_hf_initialized = True


def planned_tensors(model: nn.Module, replaced: dict, biases: list[str], kv_attr: str) -> set[str]:
    """Names of the tensors a geocomp checkpoint must hold for the rebuilt ``model``: every tensor of the
    transformer blocks (the plan sets their shapes) and of replaced modules, the biases the plan adds and
    the KV bases under ``kv_attr``. Tensors outside them (a task head of another class) may be new, as in
    any ``from_pretrained``; tied copies are not stored."""
    roots = (*arch.block_prefixes(model), *(f"{name}." for name in replaced), f"{kv_attr}.")
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    return ({k for k in model.state_dict() if k.startswith(roots)} | {f"{b}.bias" for b in biases}) - tied


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of one checkpoint file, read without loading the tensors."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    return {key: tuple(t.shape) for key, t in state.items()}


def check_checkpoint(model: nn.Module, checkpoint_files: list[str] | None, required: set[str] = frozenset()) -> None:
    """Raise unless every tensor of the checkpoint has the shape of the rebuilt model's tensor of that name,
    and every ``required`` tensor (:func:`planned_tensors`) is there: transformers initialises a missing
    tensor at random with only a warning, which for a compressed model is a damaged checkpoint."""
    if not checkpoint_files:
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    found = set()
    for path in checkpoint_files:
        for key, shape in _checkpoint_shapes(path).items():
            if key in expected and expected[key] != shape:
                raise GeoCompError(f"the checkpoint's {key} has shape {list(shape)} but its geocomp plan "
                                   f"gives {list(expected[key])}: the plan does not match the weights.")
            found |= {key, key.removeprefix(prefix), prefix + key}  # a head class or the bare model loads it alike
    missing = sorted(required - found)
    if missing:
        raise GeoCompError(f"the checkpoint has no tensor {missing[0]}, which its compressed model needs "
                           f"({len(missing)} missing in all; transformers would initialise them at random): "
                           "save the compressed model again.")
