"""The statistics engine: sums, masks, shared inputs, per-head taps, save/load, errors."""

import copy

import pytest
import torch

from hf_geocomp import arch
from hf_geocomp.errors import GeoCompError
from hf_geocomp.geometry import (ActivationStats, StatsCollector, Tap, block_output_taps, collect_stats,
                                 kv_head_taps, linear_input_taps, model_fingerprint)

from .conftest import random_batch, tiny_gpt2, tiny_llama


def capture(model, batches, taps):
    """Direct computation: the raw tensors each tap sees, rows of real tokens concatenated."""
    seen = {t.key: [] for t in taps}
    handles = []
    masks = []
    for t in taps:
        def hook(mod, args, out, t=t):
            x = args[0] if t.where == "input" else (out[0] if isinstance(out, tuple) else out)
            x = x[masks[-1].bool()] if x.dim() == 3 else x
            x = x[..., t.offset: None if t.width is None else t.offset + t.width]
            seen[t.key].append(x.detach().double())
        handles.append(model.get_submodule(t.module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                masks.append(b["attention_mask"])
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def all_taps(model):
    return linear_input_taps(model) + kv_head_taps(model) + block_output_taps(model)


def test_sums_equal_direct_computation(tiny_model):
    batches = [random_batch(seed=s, pad_last=3) for s in range(3)]
    taps = all_taps(tiny_model)
    stats = collect_stats(tiny_model, batches, taps, compute_dtype=torch.float64)
    direct = capture(tiny_model, batches, taps)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    for t in taps:
        x, m = direct[t.key], stats[t.key]
        assert m.n == n_real
        if t.head_dim:
            x = x.reshape(x.shape[0], -1, t.head_dim)
            outer = torch.einsum("nhd,nhe->hde", x, x)
        else:
            outer = x.T @ x
        torch.testing.assert_close(m.sum, x.sum(0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.outer, outer, rtol=1e-10, atol=1e-10)


def test_float32_products_close_to_float64(tiny_model):
    batches = [random_batch(seed=s) for s in range(2)]
    taps = linear_input_taps(tiny_model)
    s32 = collect_stats(tiny_model, batches, taps)
    s64 = collect_stats(tiny_model, batches, taps, compute_dtype=torch.float64)
    for key in s64.keys():
        torch.testing.assert_close(s32[key].outer, s64[key].outer, rtol=1e-5, atol=1e-5)


def test_padding_is_excluded():
    """Changing the tokens under padding changes nothing; unmasking them does."""
    model = tiny_llama()
    taps = linear_input_taps(model)
    b1 = random_batch(seed=1, pad_last=4)
    b2 = {k: v.clone() for k, v in b1.items()}
    b2["input_ids"][-1, -4:] = (b2["input_ids"][-1, -4:] + 7) % 300
    # right padding: real tokens never attend to later (padded) ones in a causal model
    s1 = collect_stats(model, [b1], taps, compute_dtype=torch.float64)
    s2 = collect_stats(model, [b2], taps, compute_dtype=torch.float64)
    key = taps[0].key
    assert s1[key].n == 3 * 10 - 4
    torch.testing.assert_close(s1[key].outer, s2[key].outer, rtol=1e-10, atol=1e-10)
    b3 = {"input_ids": b2["input_ids"], "attention_mask": torch.ones_like(b2["attention_mask"])}
    s3 = collect_stats(model, [b3], taps, compute_dtype=torch.float64)
    assert s3[key].n == 30
    assert not torch.allclose(s1[key].outer, s3[key].outer)


def test_shared_inputs_are_computed_once(tiny_model):
    spec = arch.get_spec(tiny_model)
    stats = collect_stats(tiny_model, [random_batch()], linear_input_taps(tiny_model))
    p = arch.block_prefixes(tiny_model)[0]
    if spec.q:  # q, k, v read one tensor
        assert stats.aliases[f"{p}{spec.k}:in"] == f"{p}{spec.q}:in"
        assert stats.aliases[f"{p}{spec.v}:in"] == f"{p}{spec.q}:in"
        assert stats[f"{p}{spec.v}:in"] is stats[f"{p}{spec.q}:in"]
    if len(spec.mlp_in) == 2:
        assert stats.aliases[f"{p}{spec.mlp_in[1]}:in"] == f"{p}{spec.mlp_in[0]}:in"
    # a module's output is never aliased to another module's input
    assert f"{p}{spec.o}:in" not in stats.aliases
    distinct = len(stats.moments)
    assert distinct == len(stats.keys()) - len(stats.aliases)
    # the aliased statistics equal those measured alone
    if spec.q:
        alone = collect_stats(tiny_model, [random_batch()], [Tap(f"{p}{spec.k}")])
        torch.testing.assert_close(alone[f"{p}{spec.k}:in"].outer, stats[f"{p}{spec.k}:in"].outer)


def test_per_head_kv_taps_shapes(tiny_model):
    stats = collect_stats(tiny_model, [random_batch()], kv_head_taps(tiny_model))
    heads = arch.head_layout(tiny_model)
    for key in stats.keys():
        assert stats[key].outer.shape == (heads.num_kv_heads, heads.head_dim, heads.head_dim)


def test_save_load_roundtrip(tmp_path, tiny_model):
    stats = collect_stats(tiny_model, [random_batch()], all_taps(tiny_model))
    path = tmp_path / "stats.safetensors"
    stats.save(str(path))
    back = ActivationStats.load(str(path))
    assert back.keys() == stats.keys() and back.aliases == stats.aliases and back.taps == stats.taps
    for key in stats.keys():
        torch.testing.assert_close(back[key].outer, stats[key].outer, rtol=0, atol=0)
        assert back[key].n == stats[key].n
    back.check_model(tiny_model)


def test_stale_or_foreign_stats_are_refused(tiny_model):
    stats = collect_stats(tiny_model, [random_batch()], linear_input_taps(tiny_model))
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    with pytest.raises(GeoCompError, match="stale"):
        stats.check_model(tiny_model)
    with pytest.raises(GeoCompError, match="different model"):
        other = tiny_gpt2() if arch.get_spec(tiny_model).family == "llama" else tiny_llama()
        stats.check_model(other)


def test_any_single_element_change_makes_stats_stale(tiny_model):
    """The weights fingerprint covers every byte: one element moved by one ulp, anywhere, is caught."""
    stats = collect_stats(tiny_model, [random_batch()], linear_input_taps(tiny_model))
    params = list(tiny_model.named_parameters())
    mlp_out = next(n for n, _ in params if n.endswith(("mlp.down_proj.weight", "mlp.c_proj.weight",
                                                      "output.dense.weight")))
    for name, p in [params[0], (mlp_out, dict(params)[mlp_out]), params[-1]]:
        flat = p.data.reshape(-1)
        i = flat.numel() // 2 + 1  # an entry a sampling hash would skip
        old = flat[i].clone()
        flat[i] = torch.nextafter(old, old + 1)  # through .data: the version counter does not move
        with pytest.raises(GeoCompError, match="stale"):
            stats.check_model(tiny_model)
        flat[i] = old
        stats.check_model(tiny_model)  # restored: accepted again
    with torch.no_grad():
        dict(params)[mlp_out][0, 0] += 10  # the probe of the issue: +10 on one down_proj entry
    with pytest.raises(GeoCompError, match="stale"):
        stats.check_model(tiny_model)
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)  # a dtype numpy cannot hold is hashed by its bytes
    assert model_fingerprint(half)["weights"] != model_fingerprint(tiny_model)["weights"]
    assert model_fingerprint(half)["arch"] == model_fingerprint(tiny_model)["arch"]


def test_hooks_removed_even_on_error():
    model = tiny_llama()
    with pytest.raises(RuntimeError):
        with StatsCollector(model, linear_input_taps(model)):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_nonfinite_activations_name_module_and_batch():
    model = tiny_llama()
    bad = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").weight[0, 0] = float("nan")
    with pytest.raises(GeoCompError, match=rf"{bad}.*batch 0"):
        collect_stats(model, [random_batch()], [Tap(bad)])


def test_pattern_matching_nothing_is_an_error():
    model = tiny_llama()
    with pytest.raises(GeoCompError, match="matches no module"):
        linear_input_taps(model, ["*.nonexistent"])
    assert [t.module for t in linear_input_taps(model, ["*.down_proj"])] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_zero_tokens_is_an_error():
    model = tiny_llama()
    empty = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(GeoCompError, match="zero tokens"):
        collect_stats(model, [empty], linear_input_taps(model))


@pytest.mark.parametrize("d", [50, 300, 577])
def test_block_triangular_gram_equals_full_product(d):
    from hf_geocomp.geometry.stats import _gram

    x = torch.randn(40, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    torch.testing.assert_close(_gram(x), x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_gram(x, block=64), x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build,kind", [(tiny_llama, "k"), (tiny_llama, "v"), (tiny_gpt2, "k"), (tiny_gpt2, "v")])
def test_gradient_taps_equal_autograd(build, kind):
    """output_grad taps hold Σ g gᵀ of the summed next-token loss w.r.t. the K or V projection output
    (GPT-2: its slice of the fused c_attn), per KV head, padding excluded."""
    from hf_geocomp.geometry import collect_gradient_stats, kv_grad_taps

    model = build()
    batch = random_batch(2, 12, seed=3)
    batch["attention_mask"][1, :4] = 0
    taps = [t for t in kv_grad_taps(model) if t.name.endswith(f":{kind}_grad")][1:2]  # the second layer's
    stats = collect_gradient_stats(model, [batch], taps)
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    grads = {}
    module = model.get_submodule(next(k.module for k in arch.kv_taps(model) if k.layer == 1 and k.kind == kind))
    def keep_grad(mod, args, out):
        out.register_hook(lambda g: grads.setdefault("g", g))

    handle = module.register_forward_hook(keep_grad)
    try:
        logits = model(**batch).logits
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                          reduction="sum").backward()
    finally:
        handle.remove()
    t = next(k for k in arch.kv_taps(model) if k.layer == 1 and k.kind == kind)  # where K/V leave, independently
    assert taps[0].module == t.module
    g = grads["g"][batch["attention_mask"].bool()][:, t.offset: t.offset + t.width].double()
    g = g.reshape(len(g), -1, t.head_dim)  # (tokens, kv_heads, head_dim)
    expect = torch.einsum("nhi,nhj->hij", g, g)
    assert expect.abs().max() > 0
    assert torch.allclose(stats[taps[0].key].outer, expect, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_calibration_skips_logits_unless_a_tap_reads_the_head(build):
    model = build().eval()
    batch = random_batch(seq=12)
    positions = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: positions.append(out.shape[1]))
    taps = block_output_taps(model)
    stats = collect_stats(model, [batch], taps)
    assert positions == [1]  # the vocabulary projection ran for the last position only
    direct = capture(model, [batch], taps)
    for t in taps:
        torch.testing.assert_close(stats.moments[t.key].outer, direct[t.key].T @ direct[t.key])
    head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()][0]
    positions.clear()
    stats = collect_stats(model, [batch], [Tap(head, "input")])
    assert positions == [12] and stats.moments[f"{head}:in"].count == int(batch["attention_mask"].sum())


def test_save_says_its_size_and_offers_smaller_files(tmp_path):
    import os

    import torch

    from hf_geocomp.geometry import linear_input_taps

    model = tiny_llama()
    stats = collect_stats(model, [random_batch()], linear_input_taps(model))
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    stats.save(str(full))
    assert 0 <= os.path.getsize(full) - stats.file_bytes() < 64 * 1024  # only the JSON header beside the tensors
    key = "model.layers.0.mlp.down_proj:in"
    key = key if key in stats.moments else sorted(stats.moments)[0]
    stats.save(str(part), keys=[key], dtype=torch.float32)
    assert stats.file_bytes([key], torch.float32) < stats.file_bytes() / 4
    back = ActivationStats.load(str(part))
    assert set(back.moments) == {key} and back.moments[key].outer.dtype == torch.float64
    torch.testing.assert_close(back.moments[key].outer, stats.moments[key].outer, rtol=1e-6, atol=1e-6)
    with pytest.raises(GeoCompError, match="no statistics under 'nope'"):
        stats.save(str(part), keys=["nope"])
