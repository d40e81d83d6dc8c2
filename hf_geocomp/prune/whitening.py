"""The whitening control of the study's third hypothesis: does a criterion's advantage come from variance?

Two controls, each run beside the plain criterion at the same budget and compensation:

1. **Variance removed** (:func:`whiten_stats`): the scorer reads statistics in which every
   consumer input has mean 0 and covariance I (the statistics of the whitened variable
   z = Σ^-½(x − μ)); the model and its weights are unchanged, and compensation still reads the
   real statistics (compensation is not the criterion). What each criterion becomes:

   * ``variance``  tr(W_u Σ_uu W_uᵀ) → ‖W_u‖²_F, the squared L2 norm of the consumer columns;
   * ``variance_cond``  with C = I the greedy refit couples no columns, so ΔE = ‖W_u‖²_F at
     every step: the same order as ``variance`` above;
   * ``wanda``  Σ_i |W_ij|·‖x_j‖ → Σ_i |W_ij|, the consumer-only L1 norm;
   * ``magnitude``, ``random``, ``taylor`` read no activation statistics: unchanged.

2. **Function-preserving reparametrisation** (:func:`whitening_maps`, :func:`reparametrise`):
   an invertible map folded into the weights that produce and consume the activations a
   criterion reads, chosen to whiten them, so the model computes the same function.

   * Attention heads: the value of KV head k enters attention linearly and the head's
     output is a convex combination of values, so v ↦ A_k v with o_proj columns of every
     query head reading k multiplied by A_k⁻¹ is exact for any invertible A_k (head_dim ×
     head_dim). A_k = (Σ̄_k + λI)^-½, Σ̄_k the o_proj input covariance of the head (averaged
     over the query heads of a GQA group, which share the value).
   * MLP neurons: a rotation of the neuron basis is not function-preserving through the
     nonlinearity, so the per-unit diagonal variant is the only exact one, and only where a
     producer enters linearly: in a gated MLP h_j = act(g_j·x)·(u_j·x), scaling the up row
     u_j by a_j = (Var h_j + λ)^-½ and the down column by 1/a_j is exact. GPT-2 (gelu_new) and
     BERT (GELU) apply the nonlinearity to their only producer, and gelu(a·x) = c·gelu(x) for
     all x forces a = c = 1 (x → +∞ gives c = a, x → −∞ gives Φ(ax) = Φ(x)): the control is
     defined for gated MLPs and for heads only.

   * Residual-stream inputs (what q/k/v and gate/up read): they leave an RMSNorm whose weight
     multiplies each channel, so scaling channel i of that weight by s_i and the matching input
     column of every consumer by 1/s_i is exact (:func:`norm_maps`, :func:`scale_norm_outputs`);
     a rotation is not (the norm divides by the RMS of the unnormalised stream), so the
     per-channel variant is used: every channel given unit variance, correlations kept.

   Under these maps ``variance`` (and, for neurons, ``wanda`` and ``taylor``, whose per-unit
   sums are invariant to a diagonal scaling) come out unchanged; ``magnitude`` changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..geometry.stats import ActivationStats, Moments
from .units import UnitGroup


def whiten_stats(stats: ActivationStats, keys=None) -> ActivationStats:
    """A copy of ``stats`` whose every tap (or only ``keys``) has mean 0 and covariance I (same token counts),
    for scorers only."""
    out = stats.clone()
    for key, m in out.moments.items():
        if keys is not None and key not in keys:
            continue
        eye = torch.eye(m.dim, dtype=torch.float64).expand_as(m.outer)
        out.moments[key] = Moments(torch.zeros_like(m.sum), (m.count * eye).clone(), m.count.clone())
    return out


def inv_sqrt(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + λ·mean(diag C)·I)^-½ of a symmetric (d, d) matrix."""
    lam = ridge * c.diagonal().mean().clamp_min(1e-12)
    vals, vecs = torch.linalg.eigh(c + lam * torch.eye(c.shape[0], dtype=c.dtype))
    return (vecs * vals.clamp_min(1e-30).rsqrt()) @ vecs.T


def check_reparametrisable(model: nn.Module, targets) -> None:
    """Raise unless every unit kind in ``targets`` has a function-preserving whitening in this family."""
    spec = arch.get_spec(model)
    if "mlp" in targets and spec.mlp_chunks != 2 and len(spec.mlp_in) != 2:
        raise GeoCompError(f"the function-preserving reparametrisation of MLP neurons needs a gated MLP; "
                           f"{spec.family}'s MLP applies its activation to its only input projection, and no "
                           "per-neuron scaling but the identity commutes with it: use targets heads.")


def _up_rows(model: nn.Module, group: UnitGroup) -> tuple[str, torch.Tensor]:
    """The producer whose rows enter a gated MLP linearly (the up projection) and those rows, (units,)."""
    spec = arch.get_spec(model)
    check_reparametrisable(model, ("mlp",))
    if spec.mlp_chunks == 2:  # fused [gate | up]: neuron j owns rows j and I + j
        name = next(iter(group.producers))
        return name, group.producers[name][:, 1]
    name = [n for n in group.producers if n.endswith("." + spec.mlp_in[1])][0]
    return name, group.producers[name][:, 0]


def whitening_maps(model: nn.Module, groups: list[UnitGroup], stats: ActivationStats,
                   ridge: float = 1e-6) -> dict[str, torch.Tensor]:
    """Per group key, the whitening map of its consumer's input: MLP (units,) scales a_j; heads (kv, hd, hd) A_k."""
    heads = arch.head_layout(model)
    maps = {}
    for g in groups:
        cov = stats.input_of(g.consumer).covariance()  # (in, in)
        if g.kind == "mlp":
            check_reparametrisable(model, ("mlp",))
            var = cov.diagonal()[g.cols[:, 0]]  # (units,)
            maps[g.key] = (var + ridge * var.mean().clamp_min(1e-12)).rsqrt()
            continue
        hd, nq = heads.head_dim, cov.shape[0] // heads.head_dim
        nkv = nq // heads.group_size  # value heads (the unpruned layout)
        blocks = cov.reshape(nq, hd, nq, hd).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (nq, hd, hd)
        pooled = blocks.reshape(nkv, nq // nkv, hd, hd).mean(1)  # (kv, hd, hd): query heads sharing a value
        maps[g.key] = torch.stack([inv_sqrt(c, ridge) for c in pooled])
    return maps


def _value_rows(model: nn.Module, layer: int) -> tuple[nn.Module, int]:
    """The module producing the values of block ``layer`` and the row offset of the first value row."""
    tap = [t for t in arch.kv_taps(model) if t.layer == layer and t.kind == "v"][0]
    m = model.get_submodule(tap.module)
    if not hasattr(m, "weight") or arch.linear_weight(m).shape[0] < tap.offset + tap.width:
        raise GeoCompError(f"the values of block {layer} do not leave a linear projection ({tap.module}); "
                           "the head reparametrisation is not defined for this family.")
    return m, tap.offset


@torch.no_grad()
def reparametrise(model: nn.Module, groups: list[UnitGroup], maps: dict[str, torch.Tensor]) -> nn.Module:
    """Fold ``maps`` into the weights in place (same function): producers by the map, consumers by its inverse."""
    for g in groups:
        if g.key not in maps:
            continue
        a = maps[g.key]
        W = arch.linear_weight(model.get_submodule(g.consumer))  # (out, in), a view for Conv1D
        if g.kind == "mlp":
            name, rows = _up_rows(model, g)
            up = model.get_submodule(name)
            Wu = arch.linear_weight(up)
            Wu[rows] = (Wu[rows].double() * a[:, None]).to(Wu.dtype)
            if up.bias is not None:
                up.bias[rows] = (up.bias[rows].double() * a).to(up.bias.dtype)
            cols = g.cols[:, 0]
            W[:, cols] = (W[:, cols].double() / a).to(W.dtype)
            continue
        fold_value_maps(model, g.layer, W, a)
    return model


@torch.no_grad()
def max_output_change(model: nn.Module, other: nn.Module, batch: dict) -> float:
    """The largest absolute difference of the two models' logits (an encoder's last hidden state) on ``batch``:
    how exactly a reparametrisation kept the function."""
    a, b = other(**batch), model(**batch)
    a, b = (a.logits, b.logits) if hasattr(a, "logits") else (a.last_hidden_state, b.last_hidden_state)
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def fold_value_maps(model: nn.Module, layer: int, o_weight: torch.Tensor, a: torch.Tensor) -> None:
    """In place, exact: ``v ↦ A_k v`` on the value rows of each KV head ``k`` of block ``layer`` and
    ``o ↦ o A_k⁻¹`` on the columns of ``o_weight`` (the o_proj weight, (out, heads·hd)) of its query heads."""
    hd = arch.head_layout(model).head_dim
    v, off = _value_rows(model, layer)
    Wv = arch.linear_weight(v)
    nkv, nq = a.shape[0], o_weight.shape[1] // hd
    for k in range(nkv):
        rows = slice(off + k * hd, off + (k + 1) * hd)
        Wv[rows] = (a[k] @ Wv[rows].double()).to(Wv.dtype)  # v ↦ A v
        if v.bias is not None:
            v.bias[rows] = (a[k] @ v.bias[rows].double()).to(v.bias.dtype)
        inv = torch.linalg.inv(a[k])
        for h in range(k * (nq // nkv), (k + 1) * (nq // nkv)):  # the query heads reading value k
            cols = slice(h * hd, (h + 1) * hd)
            o_weight[:, cols] = (o_weight[:, cols].double() @ inv).to(o_weight.dtype)  # o ↦ o A⁻¹


PRE_NORMS = {"attention": "input_layernorm", "mlp": "post_attention_layernorm"}  # Llama-style block norms


def norm_consumers(model: nn.Module, layer: int) -> dict[str, list[str]]:
    """{norm module: the dense modules reading its output} of block ``layer``, for norms that multiply by their weight."""
    spec = arch.get_spec(model)
    prefix = arch.block_prefixes(model)[layer]
    readers = {"attention": [spec.qkv] if spec.qkv else [spec.q, spec.k, spec.v], "mlp": list(spec.mlp_in)}
    out = {}
    for part, norm in PRE_NORMS.items():
        try:
            module = model.get_submodule(prefix + norm)
        except AttributeError:
            module = None
        if module is None or getattr(module, "weight", None) is None or spec.family.startswith("gemma"):
            raise GeoCompError(f"the residual-stream reparametrisation needs a norm that multiplies by its weight "
                               f"before {part} ({prefix + norm}); {spec.family} has none there.")
        out[prefix + norm] = [prefix + r for r in readers[part]]
    return out


def _any_input(stats: ActivationStats, modules: list[str]):
    """The input moments of the first of ``modules`` the statistics hold (they all read the same tensor)."""
    for name in modules[:-1]:
        try:
            return stats.input_of(name)
        except GeoCompError:
            continue
    return stats.input_of(modules[-1])


def norm_maps(model: nn.Module, stats: ActivationStats, ridge: float = 1e-6) -> dict[str, torch.Tensor]:
    """Per pre-norm module, scales s (hidden,) giving every channel of its output unit variance."""
    maps = {}
    for layer in range(len(arch.block_prefixes(model))):
        for norm, readers in norm_consumers(model, layer).items():
            var = _any_input(stats, readers).covariance().diagonal()
            maps[norm] = (var + ridge * var.mean().clamp_min(1e-12)).rsqrt()
    return maps


@torch.no_grad()
def scale_norm_outputs(model: nn.Module, maps: dict[str, torch.Tensor]) -> nn.Module:
    """Fold ``maps`` into the norms' weights and their readers' input columns, in place (the same function)."""
    readers = {n: r for layer in range(len(arch.block_prefixes(model))) for n, r in norm_consumers(model, layer).items()}
    for norm, s in maps.items():
        w = model.get_submodule(norm).weight
        w.copy_((w.double() * s).to(w.dtype))
        for name in readers[norm]:
            W = arch.linear_weight(model.get_submodule(name))
            W.copy_((W.double() / s).to(W.dtype))
    return model
