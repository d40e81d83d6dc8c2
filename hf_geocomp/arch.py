"""The one place that knows model families.

Methods ask this module where the attention and MLP projections of a transformer block
live, how heads are laid out (including GQA groups), and which linear modules exist.
Nothing else in the package hard-codes a module name.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import GeoCompError


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family, and what its attention does differently.

    Module paths are relative to a decoder/encoder block; ``layers`` is the dotted path of
    the ``ModuleList`` of blocks from the model root. Every field below ``mlp_out`` says how
    the family departs from Llama, as read from its transformers modeling code.
    """

    family: str
    layers: str
    q: str | None  # separate query projection (None when fused)
    k: str | None
    v: str | None
    qkv: str | None  # fused projection (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``): output is [q | k | v]
    o: str
    mlp_in: tuple[str, ...]  # modules reading the block's MLP input (gate/up, c_fc, intermediate)
    mlp_out: str  # module writing the MLP output (down_proj, c_proj, output.dense)
    conv1d: bool = False  # GPT-2 style Conv1D: weight is (in, out)
    attn: str = "self_attn"  # the attention module whose head counts change when heads are pruned
    mlp_width: str = "intermediate_size"  # config key of the MLP width
    # config keys turning on the (mlp, attention) biases; None where the modeling code hard-codes them
    bias_flags: tuple[str | None, str | None] = (None, None)
    head_config: bool = True  # head counts and head_dim are all stored in the config (stock reload works)
    mlp_chunks: int = 1  # 2: mlp_in[0] is a fused [gate | up] (Phi-3 gate_up_proj), neuron j owns rows j and I + j
    q_out: str | None = None  # module whose output is the query before RoPE, when not the projection (q_norm)
    k_out: str | None = None  # module whose output is the key the cache stores before RoPE (k_norm)
    qk_norm: str | None = None  # "head": one norm per head (shared weights); "all": one norm over every head
    qk_norm_heads_first: bool = False  # the per-head norm sees (batch, heads, seq, d) (Gemma 3), not (batch, seq, heads, d)
    softcap: str | None = None  # config key of the attention logit softcap, tanh(s / c)·c
    scaling: str | None = None  # config key of the query scale: query_pre_attn_scalar (v^-½) or attention_multiplier (v)
    embed_scale: str | None = None  # "sqrt_hidden" or a config key multiplying the input embeddings
    rope: bool = True  # rotate-half RoPE on queries and keys
    rope_per_layer_type: bool = False  # the rotary module holds one frequency set per layer type (Gemma 3)
    no_rope_layers: str | None = None  # config key of a per-layer 0/1 list, 1 = the layer applies RoPE (SmolLM3)
    head_pruning: str | None = None  # why heads cannot be pruned in this family (None: they can)
    needs_bos: bool = False  # sequences must start with BOS whatever the tokenizer adds (Gemma: far worse without)
    logits_divisor: str | None = None  # config key the output head's logits are divided by (Granite logits_scaling)
    final_softcap: str | None = None  # config key of the final logit softcap, c·tanh(logits / c) (Gemma 2/3)


_LLAMA = ArchSpec("llama", "model.layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None,
                  "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                  bias_flags=("mlp_bias", "attention_bias"))
_QK_NORM = dict(q_out="self_attn.q_norm", k_out="self_attn.k_norm", qk_norm="head")
_GEMMA = dict(embed_scale="sqrt_hidden", bias_flags=(None, "attention_bias"), needs_bos=True)

_SPECS = {
    "llama": _LLAMA,
    "gpt2": ArchSpec("gpt2", "transformer.h", None, None, None, "attn.c_attn", "attn.c_proj",
                     ("mlp.c_fc",), "mlp.c_proj", conv1d=True, attn="attn", mlp_width="n_inner",
                     head_config=False, rope=False, bias_flags=(None, None)),
    "bert": ArchSpec("bert", "encoder.layer", "attention.self.query", "attention.self.key",
                     "attention.self.value", None, "attention.output.dense",
                     ("intermediate.dense",), "output.dense", attn="attention.self", head_config=False, rope=False,
                     bias_flags=(None, None)),
    "mistral": replace(_LLAMA, family="mistral", bias_flags=(None, None)),
    "qwen2": replace(_LLAMA, family="qwen2", bias_flags=(None, None)),  # q/k/v biases always on, o_proj never
    "qwen3": replace(_LLAMA, family="qwen3", bias_flags=(None, "attention_bias"), **_QK_NORM),
    "smollm3": replace(_LLAMA, family="smollm3", no_rope_layers="no_rope_layers"),
    "granite": replace(_LLAMA, family="granite", scaling="attention_multiplier", embed_scale="embedding_multiplier",
                       logits_divisor="logits_scaling"),
    "gemma": replace(_LLAMA, family="gemma", **_GEMMA),
    "gemma2": replace(_LLAMA, family="gemma2", softcap="attn_logit_softcapping", scaling="query_pre_attn_scalar",
                      final_softcap="final_logit_softcapping", **_GEMMA),
    "gemma3_text": replace(_LLAMA, family="gemma3_text", scaling="query_pre_attn_scalar", softcap="attn_logit_softcapping",
                           rope_per_layer_type=True, qk_norm_heads_first=True, final_softcap="final_logit_softcapping",
                           **_GEMMA, **_QK_NORM),
    "olmo2": replace(_LLAMA, family="olmo2", bias_flags=(None, "attention_bias"),
                     **{**_QK_NORM, "qk_norm": "all"},
                     head_pruning="OLMo2 normalises the queries and keys of all heads together (q_norm/k_norm over "
                                  "heads × head_dim), so removing a head changes the others; prune mlp only"),
    "phi3": replace(_LLAMA, family="phi3", q=None, k=None, v=None, qkv="self_attn.qkv_proj",
                    mlp_in=("mlp.gate_up_proj",), mlp_chunks=2, bias_flags=(None, None),
                    head_pruning="Phi-3 splits its fused qkv_proj by the head counts of the shared config, so "
                                 "per-layer head pruning cannot be expressed; prune mlp only"),
}
# The families the test matrix (tests/test_families.py) runs every method on; nothing else is accepted.
SUPPORTED = tuple(sorted(_SPECS))


def check_config(config) -> ArchSpec:
    """The :class:`ArchSpec` of a model ``config`` (before any weights are loaded), or a :class:`GeoCompError`
    naming the type and the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _SPECS:
        hint = " (for Gemma 3 load the text model, model type gemma3_text)" if model_type == "gemma3" else ""
        raise GeoCompError(f"model type {model_type!r} is not supported{hint}; supported families: "
                           f"{', '.join(SUPPORTED)}.")
    return _SPECS[model_type]


def get_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of ``model`` (or of a config) or a :class:`GeoCompError` naming its type."""
    return check_config(getattr(model, "config", model))


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


# ---- which blocks a method touches (the ``layers`` field of the method configs) -------------------
LAYERS_HELP = ("block indices (negative from the end, -1 the last) or a fraction in (0, 1] of the last blocks; "
               "None: every block")


def check_layers(layers, name: str = "layers"):
    """``layers`` in canonical form (None, a float in (0, 1], or a tuple of distinct ints), else one clear error.

    The model-free half of :func:`layer_indices`: configs call it in ``__post_init__``.
    """
    if layers is None:
        return None
    if isinstance(layers, float):
        if not 0 < layers <= 1:
            raise GeoCompError(f"{name} as a fraction of the last blocks must be in (0, 1], got {layers!r}.")
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in layers):
        raise GeoCompError(f"{name} must be {LAYERS_HELP}, got {layers!r}.")
    if not layers:
        raise GeoCompError(f"{name} must name at least one block (or be None for every block).")
    return tuple(layers)


def layer_indices(model: nn.Module, layers) -> list[int] | None:
    """The sorted block indices ``layers`` names in ``model`` (None stays None: every block).

    A float f keeps the last ceil(f·n) of the n blocks; ints are block indices, negative from the end.
    """
    layers = check_layers(layers)
    if layers is None:
        return None
    n = len(block_prefixes(model))
    if isinstance(layers, float):
        return list(range(n - max(1, math.ceil(layers * n - 1e-9)), n))
    out = []
    for i in layers:
        if not -n <= i < n:
            raise GeoCompError(f"layers names block {i}, but this {get_spec(model).family} model has {n} blocks "
                               f"(0..{n - 1}, or -{n}..-1 from the end).")
        j = i % n
        if j in out:
            raise GeoCompError(f"layers names block {j} twice.")
        out.append(j)
    return sorted(out)


def parse_layers(text: str):
    """A layer subset from the command line: ``all``, ``last:8`` (the last 8 blocks), ``last:0.25`` (the last
    quarter), ``12:18`` (blocks 12..17), ``3`` or a comma list of those (``0,10:12,29``). Returns what the
    method configs' ``layers`` field takes."""
    text = str(text).strip()
    bad = GeoCompError(f"layer subset {text!r} is not all, last:N, last:FRACTION, A:B, an index or a comma list "
                       "of indices and A:B ranges (e.g. 22:30 or 0,15,29).")
    if text == "all":
        return None
    try:
        if text.startswith("last:"):
            value = text[5:]
            if "." in value:
                return check_layers(float(value))
            n = int(value)
            if n < 1:
                raise bad
            return tuple(range(-n, 0))
        out: list[int] = []
        for item in text.split(","):
            a, colon, b = item.partition(":")
            out.extend(range(int(a), int(b)) if colon else [int(a)])
    except ValueError:
        raise bad from None
    if not out or min(out) < 0:
        raise bad
    return check_layers(out)


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

    ``offset`` selects the slice of a fused projection's output; ``heads_first``: the module's
    output is (batch, heads, seq, d) (Gemma 3's per-head norms), else (batch, seq, ...).
    """

    module: str
    kind: str  # "k" or "v"
    layer: int
    offset: int
    width: int
    head_dim: int
    heads_first: bool = False


def kv_taps(model: nn.Module) -> list[KVTap]:
    """Per block, the modules whose outputs are exactly the keys and values ``cache.update`` receives, before RoPE.

    The K projection's output, or the module after it (``k_norm`` of Qwen3, OLMo2, Gemma 3); the
    K and V slices of a fused projection (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``: [q | k | v]).
    """
    spec = get_spec(model)
    heads = head_layout(model)
    width = heads.num_kv_heads * heads.head_dim
    taps = []
    for i, prefix in enumerate(block_prefixes(model)):
        if spec.qkv is not None:
            q_width = heads.num_heads * heads.head_dim
            k_module = prefix + (spec.k_out or spec.qkv)
            taps.append(KVTap(k_module, "k", i, 0 if spec.k_out else q_width, width, heads.head_dim))
            taps.append(KVTap(prefix + spec.qkv, "v", i, q_width + width, width, heads.head_dim))
        else:
            taps.append(KVTap(prefix + (spec.k_out or spec.k), "k", i, 0, width, heads.head_dim,
                              bool(spec.k_out) and spec.qk_norm_heads_first))
            taps.append(KVTap(prefix + spec.v, "v", i, 0, width, heads.head_dim))
    return taps


def q_taps(model: nn.Module) -> list[KVTap]:
    """The queries of every block as attention receives them before RoPE (after ``q_norm`` where there is one)."""
    spec = get_spec(model)
    heads = head_layout(model)
    width = heads.num_heads * heads.head_dim
    return [KVTap(prefix + (spec.q_out or spec.qkv or spec.q), "q", i, 0, width, heads.head_dim,
                  bool(spec.q_out) and spec.qk_norm_heads_first) for i, prefix in enumerate(block_prefixes(model))]


def o_proj_head_weights(model: nn.Module, layer: int) -> torch.Tensor:
    """The output projection of block ``layer`` split by the query head that feeds it: (heads, hidden, head_dim)."""
    spec = get_spec(model)
    heads = head_layout(model)
    w = linear_weight(model.get_submodule(block_prefixes(model)[layer] + spec.o)).detach()  # (hidden, heads·hd)
    return w.reshape(w.shape[0], heads.num_heads, heads.head_dim).transpose(0, 1)


# ---- what attention does with queries and keys ------------------------------------------------

def attention_scaling(model: nn.Module) -> float:
    """The factor the query–key products are multiplied by before the softmax (and the softcap)."""
    spec, cfg = get_spec(model), model.config
    if spec.scaling == "query_pre_attn_scalar":
        return float(cfg.query_pre_attn_scalar) ** -0.5
    if spec.scaling == "attention_multiplier":
        return float(cfg.attention_multiplier)
    return head_layout(model).head_dim ** -0.5


def attention_softcap(model: nn.Module) -> float | None:
    """The attention logit softcap ``c`` (scores become ``c·tanh(s / c)``), or None."""
    spec = get_spec(model)
    value = getattr(model.config, spec.softcap, None) if spec.softcap else None
    return None if value is None else float(value)


def embed_scale(model: nn.Module) -> float:
    """The factor the input embeddings are multiplied by (Gemma: √hidden; Granite: embedding_multiplier)."""
    spec, cfg = get_spec(model), model.config
    if spec.embed_scale == "sqrt_hidden":
        return float(cfg.hidden_size) ** 0.5
    return float(getattr(cfg, spec.embed_scale)) if spec.embed_scale else 1.0


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a causal LM's forward computes from its final hidden states ``hidden`` (..., hidden): the output
    head, then what the family does after it (Granite divides by ``logits_scaling``; Gemma 2/3 soft-cap)."""
    spec, cfg = get_spec(model), model.config
    logits = model.get_output_embeddings()(hidden)  # (..., vocab)
    if spec.logits_divisor:
        logits = logits / getattr(cfg, spec.logits_divisor)
    cap = getattr(cfg, spec.final_softcap, None) if spec.final_softcap else None
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _rotary(model: nn.Module):
    if not get_spec(model).rope:
        return None
    return next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)


def rope_frequencies(model: nn.Module, layer: int = 0, seq_len: int | None = None) -> tuple[torch.Tensor | None, float]:
    """``(inv_freq (rot/2,), scale)`` of block ``layer``'s RoPE, as its rotary module computes cos and sin
    in a forward of ``seq_len`` positions; ``(None, 1.0)`` where the block applies none (GPT-2, BERT,
    SmolLM3's NoPE layers).

    ``rot = 2·len(inv_freq)`` may be below head_dim (partial rotary, e.g. Phi-4-mini): the rest passes through.
    ``scale`` is the RoPE type's ``attention_scaling`` (longrope, yarn: above 1), which multiplies cos and sin.
    ``longrope`` (Phi-3, Phi-4-mini) takes short factors in a forward of up to
    ``original_max_position_embeddings`` positions and long ones past it: its frequencies are computed for
    ``seq_len`` by transformers' own ``ROPE_INIT_FUNCTIONS`` (``None``: the short set the model starts
    with), never read from the rotary module, which keeps whatever the last forward chose.
    """
    spec, cfg = get_spec(model), model.config
    rotary = _rotary(model)
    if rotary is None or (spec.no_rope_layers and not getattr(cfg, spec.no_rope_layers)[layer]):
        return None, 1.0
    kind = cfg.layer_types[layer] if spec.rope_per_layer_type else None
    rope_type = rotary.rope_type[kind] if kind else rotary.rope_type
    if rope_type == "longrope":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        device = (getattr(rotary, f"{kind}_inv_freq") if kind else rotary.inv_freq).device
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, device, seq_len=seq_len,
                                                         **({"layer_type": kind} if kind else {}))
        return inv_freq, float(scale)
    if kind:
        return getattr(rotary, f"{kind}_inv_freq").detach(), float(getattr(rotary, f"{kind}_attention_scaling"))
    return rotary.inv_freq.detach(), float(getattr(rotary, "attention_scaling", 1.0) or 1.0)


def rope_scale(model: nn.Module, layer: int = 0) -> float:
    """The factor RoPE multiplies cos and sin by (``attention_scaling``; 1.0 without RoPE)."""
    return rope_frequencies(model, layer)[1]


def _rope_tables(model: nn.Module, layer: int, positions: torch.Tensor, gradient: bool = False,
                 seq_len: int | None = None):
    """``cos``, ``sin`` (P, d) and the signed half swap ``J`` (d, d) with ``R_p x = cos_p ⊙ x + sin_p ⊙ Jx``,
    or None without RoPE. Pass-through components of a partial rotary get cos 1, sin 0. ``gradient``:
    the tables of ``R_p⁻ᵀ`` (how a gradient w.r.t. the pre-RoPE key maps to the stored one). ``seq_len``:
    the length of the forward that rotates them (see :func:`rope_frequencies`)."""
    inv_freq, scale = rope_frequencies(model, layer, seq_len)
    if inv_freq is None:
        return None
    d, half = head_layout(model).head_dim, inv_freq.shape[0]
    s = 1 / scale if gradient else scale
    angle = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)  # (P, rot/2)
    cos = torch.ones(len(positions), d, dtype=torch.float64)
    sin = torch.zeros(len(positions), d, dtype=torch.float64)
    cos[:, : 2 * half] = (angle.cos() * s).repeat(1, 2)
    sin[:, : 2 * half] = (angle.sin() * s).repeat(1, 2)
    j = torch.zeros(d, d, dtype=torch.float64)  # J x = rotate_half(x[:rot]) = [−x2, x1], pass-through 0
    j[torch.arange(half), torch.arange(half) + half] = -1
    j[torch.arange(half) + half, torch.arange(half)] = 1
    return cos, sin, j


def apply_rope(model: nn.Module, layer: int, x: torch.Tensor, positions: torch.Tensor,
               seq_len: int | None = None) -> torch.Tensor:
    """RoPE of block ``layer`` applied to ``x`` (..., P, head_dim) at ``positions`` (P,), in float64, as a
    forward of ``seq_len`` positions applies it (default: up to the last of ``positions``)."""
    seq_len = int(positions.max()) + 1 if seq_len is None and len(positions) else seq_len
    tables = _rope_tables(model, layer, positions, seq_len=seq_len)
    if tables is None:
        return x.to(torch.float64)
    cos, sin, j = tables
    x = x.to(torch.float64)
    return x * cos + (x @ j.T) * sin


def rope_average(model: nn.Module, matrix: torch.Tensor, positions: int, layer: int = 0,
                 gradient: bool = False) -> torch.Tensor:
    """``mean_p R_p · matrix · R_pᵀ`` over positions ``0..positions-1``: a pre-RoPE second moment seen after RoPE.

    ``matrix`` is (..., head_dim, head_dim); ``layer`` picks the block's RoPE (Gemma 3 gives its
    sliding and global layers different bases; SmolLM3 skips RoPE on some layers: ``matrix``
    comes back unchanged there, as for models without RoPE). ``gradient``: average
    ``R_p⁻ᵀ · matrix · R_p⁻¹`` instead (second moments of gradients w.r.t. the key). Uses the
    rotate-half layout (``R_p x = cos_p ⊙ x + sin_p ⊙ Jx``, J the signed half swap), so the
    average is four Hadamard products with position-averaged cos/sin outer products, exact and O(P·d²).
    Each position is rotated as in one forward of ``positions`` tokens (longrope: long factors past its
    original length).
    """
    tables = _rope_tables(model, layer, torch.arange(positions), gradient, seq_len=positions)
    if tables is None:
        return matrix
    cos, sin, j = tables
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


def lora_targets(model: nn.Module) -> list[str]:
    """Default SpectralLoRA targets: every dense layer in the blocks, by full name (the fused ones of Phi-3 and
    GPT-2 included); the statistics of :func:`hf_geocomp.geometry.linear_input_taps` cover exactly these."""
    return block_linears(model)


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


# The ``attn_implementation`` of a config whose checkpoint stock transformers would rebuild wrongly
# (hf_geocomp.hub writes it; ``ensure_bias`` too): stock transformers refuses it before reading a weight.
PLUGIN_GUARD = "hf_geocomp-required: pip install hf-geocomp, then import hf_geocomp before from_pretrained"


def ensure_bias(model: nn.Module, kind: str) -> None:
    """Give every ``kind`` ("mlp" or "heads") projection of every block a bias (zeros where new).

    Needed when compensation folds a constant into a layer that has none. Where the family's
    config can turn the bias on, that flag is set, so a stock ``from_pretrained`` builds the same
    modules. Where it cannot (the family builds the layer without a bias whatever its config
    says), the config gets :data:`PLUGIN_GUARD`, so stock transformers refuses the checkpoint
    instead of dropping the bias; ``hf_geocomp.hub.mark_compressed`` then records the biases and
    ``from_pretrained`` after ``import hf_geocomp`` rebuilds them.
    """
    spec = get_spec(model)
    names = (*spec.mlp_in, spec.mlp_out) if kind == "mlp" else tuple(
        n for n in (spec.q, spec.k, spec.v, spec.qkv, spec.o) if n)
    flag = spec.bias_flags[0 if kind == "mlp" else 1]
    for prefix in block_prefixes(model):
        for n in names:
            m = model.get_submodule(prefix + n)
            if getattr(m, "bias", None) is None:
                if flag is None:
                    model.config.attn_implementation = PLUGIN_GUARD
                m.bias = nn.Parameter(torch.zeros(linear_weight(m).shape[0], dtype=m.weight.dtype,
                                                  device=m.weight.device))
    if flag is not None:
        setattr(model.config, flag, True)
