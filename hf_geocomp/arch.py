"""The one place that knows model families.

Methods ask this module where the attention and MLP projections of a transformer block
live, how heads are laid out (including GQA groups), and which linear modules exist.
Nothing else in the package hard-codes a module name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import GeoCompError


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family.

    Module paths are relative to a decoder/encoder block; ``layers`` is the dotted path of
    the ``ModuleList`` of blocks from the model root.
    """

    family: str
    layers: str
    q: str | None  # separate query projection (None when fused)
    k: str | None
    v: str | None
    qkv: str | None  # fused projection (GPT-2 ``c_attn``): output is [q | k | v]
    o: str
    mlp_in: tuple[str, ...]  # modules reading the block's MLP input (gate/up, c_fc, intermediate)
    mlp_out: str  # module writing the MLP output (down_proj, c_proj, output.dense)
    conv1d: bool = False  # GPT-2 style Conv1D: weight is (in, out)
    attn: str = "self_attn"  # the attention module whose head counts change when heads are pruned
    mlp_width: str = "intermediate_size"  # config key of the MLP width
    bias_flags: tuple[str, str] | None = None  # config keys turning on (mlp, attention) biases, if any
    head_config: bool = True  # head counts and head_dim are all stored in the config (stock reload works)


_SPECS = {
    "llama": ArchSpec("llama", "model.layers", "self_attn.q_proj", "self_attn.k_proj",
                      "self_attn.v_proj", None, "self_attn.o_proj",
                      ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                      bias_flags=("mlp_bias", "attention_bias")),
    "gpt2": ArchSpec("gpt2", "transformer.h", None, None, None, "attn.c_attn", "attn.c_proj",
                     ("mlp.c_fc",), "mlp.c_proj", conv1d=True, attn="attn", mlp_width="n_inner",
                     head_config=False),
    "bert": ArchSpec("bert", "encoder.layer", "attention.self.query", "attention.self.key",
                     "attention.self.value", None, "attention.output.dense",
                     ("intermediate.dense",), "output.dense", attn="attention.self", head_config=False),
}
# Families whose blocks are laid out exactly like Llama's.
for _name in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite"):
    _SPECS[_name] = dataclasses.replace(_SPECS["llama"], family=_name)


def get_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of ``model`` or a :class:`GeoCompError` naming its type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _SPECS:
        raise GeoCompError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(_SPECS))}."
        )
    return _SPECS[model_type]


def _base_prefix(model: nn.Module, spec: ArchSpec) -> str:
    """Dotted prefix (possibly empty) under which ``spec.layers`` is found in ``model``."""
    names = dict(model.named_modules())
    for name in names:
        if name == spec.layers or name.endswith("." + spec.layers):
            return name[: -len(spec.layers)]
    raise GeoCompError(f"could not find the blocks ({spec.layers!r}) in this {spec.family} model.")


def block_prefixes(model: nn.Module) -> list[str]:
    """Dotted names of the transformer blocks, in order (``model.layers.0.`` ...)."""
    spec = get_spec(model)
    root = _base_prefix(model, spec) + spec.layers
    blocks = model.get_submodule(root)
    return [f"{root}.{i}." for i in range(len(blocks))]


@dataclass(frozen=True)
class HeadLayout:
    """Head geometry of the attention in every block."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads reading one KV head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


def head_layout(model: nn.Module) -> HeadLayout:
    cfg = model.config
    num_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // num_heads
    return HeadLayout(int(num_heads), int(num_kv), int(head_dim))


@dataclass(frozen=True)
class KVTap:
    """Where the keys or values of one block leave their projection (before RoPE).

    ``offset`` selects the slice of a fused projection's output.
    """

    module: str
    kind: str  # "k" or "v"
    layer: int
    offset: int
    width: int
    head_dim: int


def kv_taps(model: nn.Module) -> list[KVTap]:
    """The K and V projection outputs of every block, for per-KV-head statistics."""
    spec = get_spec(model)
    heads = head_layout(model)
    width = heads.num_kv_heads * heads.head_dim
    taps = []
    for i, prefix in enumerate(block_prefixes(model)):
        if spec.qkv is not None:
            q_width = heads.num_heads * heads.head_dim
            taps.append(KVTap(prefix + spec.qkv, "k", i, q_width, width, heads.head_dim))
            taps.append(KVTap(prefix + spec.qkv, "v", i, q_width + width, width, heads.head_dim))
        else:
            taps.append(KVTap(prefix + spec.k, "k", i, 0, width, heads.head_dim))
            taps.append(KVTap(prefix + spec.v, "v", i, 0, width, heads.head_dim))
    return taps


def q_taps(model: nn.Module) -> list[KVTap]:
    """The query projection output of every block (before RoPE), for per-query-head statistics."""
    spec = get_spec(model)
    heads = head_layout(model)
    width = heads.num_heads * heads.head_dim
    return [KVTap(prefix + (spec.qkv or spec.q), "q", i, 0, width, heads.head_dim)
            for i, prefix in enumerate(block_prefixes(model))]


def o_proj_head_weights(model: nn.Module, layer: int) -> torch.Tensor:
    """The output projection of block ``layer`` split by the query head that feeds it: (heads, hidden, head_dim)."""
    spec = get_spec(model)
    heads = head_layout(model)
    w = linear_weight(model.get_submodule(block_prefixes(model)[layer] + spec.o)).detach()  # (hidden, heads·hd)
    return w.reshape(w.shape[0], heads.num_heads, heads.head_dim).transpose(0, 1)


def _rotary(model: nn.Module):
    if get_spec(model).family in ("gpt2", "bert"):
        return None
    return next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)


def _scaling(rotary) -> float:
    return float(getattr(rotary, "attention_scaling", 1.0))  # a module without the attribute (or None): 1.0


def rope_scale(model: nn.Module) -> float:
    """The factor RoPE multiplies cos and sin by (``attention_scaling``; 1.0 without RoPE)."""
    return _scaling(_rotary(model))


def rope_average(model: nn.Module, matrix: torch.Tensor, positions: int) -> torch.Tensor:
    """``mean_p R_p · matrix · R_pᵀ`` over positions ``0..positions-1``: a pre-RoPE second moment seen after RoPE.

    ``matrix`` is (..., head_dim, head_dim). Models without RoPE get ``matrix`` back. Uses the
    rotate-half layout of Llama-like models (``R_p x = cos_p ⊙ x + sin_p ⊙ Jx``, J the signed
    half swap), so the average is four Hadamard products with position-averaged cos/sin
    outer products, exact and O(P·d²).
    """
    rotary = _rotary(model)
    if rotary is None:
        return matrix
    inv_freq = rotary.inv_freq.detach().to(torch.float64)  # (d/2,)
    scale = _scaling(rotary)
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq  # (P, d/2)
    cos = (angle.cos() * scale).repeat(1, 2)  # (P, d)
    sin = (angle.sin() * scale).repeat(1, 2)
    d, half = cos.shape[1], inv_freq.shape[0]
    j = torch.zeros(d, d, dtype=torch.float64)  # Jx = rotate_half(x) = [−x2, x1]
    j[torch.arange(half), torch.arange(half) + half] = -1
    j[torch.arange(half) + half, torch.arange(half)] = 1
    c = matrix.to(torch.float64)
    acc, ass = cos.T @ cos / positions, sin.T @ sin / positions  # (d, d)
    acs = cos.T @ sin / positions
    return c * acc + (c @ j.T) * acs + (j @ c) * acs.T + (j @ c @ j.T) * ass


def attention_layer_types(model: nn.Module) -> list[tuple[str, dict]]:
    """(``full_attention`` / ``sliding_attention`` / ..., cache-layer kwargs such as ``sliding_window``)
    per block, as transformers' own caches read them from the config."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or get_spec(model).family == "bert":
        return [("full_attention", {})] * len(block_prefixes(model))
    return list(zip(*get_layer_types_and_kwargs(config)))


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), the two dense layers we handle."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer's storage convention."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def linear_weight_grad(module: nn.Module) -> torch.Tensor:
    """The weight's gradient as (out_features, in_features), zeros when there is none."""
    g = module.weight.grad
    if g is None:
        return torch.zeros_like(linear_weight(module))
    return g.T if type(module).__name__ == "Conv1D" else g


def block_linears(model: nn.Module) -> list[str]:
    """Names of every dense layer inside the transformer blocks, in model order."""
    prefixes = tuple(block_prefixes(model))
    return [n for n, m in model.named_modules() if n.startswith(prefixes) and is_linear(m)]


def layer_index(name: str) -> int | None:
    """The block index in a dotted module name (``model.layers.12.mlp`` → 12)."""
    m = re.search(r"\.(\d+)\.", "." + name + ".")
    return int(m.group(1)) if m else None


def match_modules(model: nn.Module, patterns: str | list[str]) -> list[str]:
    """Module names matching any glob (``*.mlp.down_proj``) or ``re:`` regex pattern.

    Raises a :class:`GeoCompError` naming each pattern that matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pat in patterns:
        if pat.startswith("re:"):
            rx = re.compile(pat[3:])
            hits = [n for n in names if rx.fullmatch(n)]
        else:
            hits = fnmatch.filter(names, pat)
        if not hits:
            raise GeoCompError(f"module pattern {pat!r} matches no module of this model.")
        out.extend(h for h in hits if h not in out)
    return out


# ---- rebuilding smaller modules (used by pruning surgery) ------------------------------------

def new_linear(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dense layer of ``like``'s kind holding ``weight`` (out, in) and ``bias`` (out,) or None."""
    out_f, in_f = weight.shape
    if type(like).__name__ == "Conv1D":  # GPT-2: weight stored (in, out), bias always present
        layer = type(like)(out_f, in_f)
        layer.weight = nn.Parameter(weight.T.contiguous().clone())
        layer.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(out_f, dtype=weight.dtype))
    else:
        layer = nn.Linear(in_f, out_f, bias=bias is not None, dtype=weight.dtype, device=weight.device)
        layer.weight = nn.Parameter(weight.contiguous().clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone())
    return layer.to(weight.device).train(like.training)


def set_attention_heads(model: nn.Module, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Tell one attention module it now has ``num_heads`` query and ``num_kv_heads`` KV heads."""
    spec = get_spec(model)
    hd = head_layout(model).head_dim
    if spec.family == "gpt2":
        attn.num_heads, attn.split_size, attn.embed_dim = num_heads, num_heads * hd, num_heads * hd
    elif spec.family == "bert":
        attn.num_attention_heads, attn.all_head_size = num_heads, num_heads * hd
    else:  # Llama-like: heads are inferred from shapes; only the GQA repeat count is stored
        attn.num_key_value_groups = num_heads // num_kv_heads
        for name in ("num_heads", "num_key_value_heads"):
            if hasattr(attn, name):
                setattr(attn, name, num_heads if name == "num_heads" else num_kv_heads)


def ensure_bias(model: nn.Module, kind: str) -> None:
    """Give every ``kind`` ("mlp" or "heads") projection of every block a bias (zeros where new).

    Needed when compensation folds a constant into a layer that has none; the config flag is
    set too, so a stock ``from_pretrained`` builds the same modules.
    """
    spec = get_spec(model)
    names = (*spec.mlp_in, spec.mlp_out) if kind == "mlp" else tuple(
        n for n in (spec.q, spec.k, spec.v, spec.qkv, spec.o) if n)
    for prefix in block_prefixes(model):
        for n in names:
            m = model.get_submodule(prefix + n)
            if getattr(m, "bias", None) is None:
                if spec.bias_flags is None:
                    raise GeoCompError(f"{spec.family} layer {prefix + n} has no bias to compensate into.")
                m.bias = nn.Parameter(torch.zeros(linear_weight(m).shape[0], dtype=m.weight.dtype,
                                                  device=m.weight.device))
    if spec.bias_flags is not None:
        setattr(model.config, spec.bias_flags[0 if kind == "mlp" else 1], True)
