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
    """Upper blocks accumulated over windows (the first ignoring stale contents), folded and mirrored: xᵀx."""
    from hf_geocomp.geometry.accumulate import add_gram, add_upper, fill_lower

    gen = torch.Generator().manual_seed(d)
    xs = [torch.randn(40, d, dtype=torch.float64, generator=gen) for _ in range(3)]
    for block in (64, 128):
        out = torch.zeros(d, d, dtype=torch.float64)
        acc = torch.full((d, d), float("nan"), dtype=torch.float64)
        for i, x in enumerate(xs):
            add_gram(acc, x, beta=float(i > 0), block=block)
        add_upper(out, acc, block=block)
        fill_lower(out, block=block)
        x = torch.cat(xs)
        torch.testing.assert_close(out, x.T @ x, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("fold_rows", [1, 1000, 10**9])
def test_float32_windows_within_rounding_bound(fold_rows):
    """Products accumulated in float32 over windows of rows, folded into float64, stay within the
    rounding bound γ_n·|X|ᵀ|X| of a float32 sum of n products (n: rows in the largest window),
    plus float64's over all rows, element by element (Higham §3.1; any order of summation)."""
    from hf_geocomp.geometry import Moments

    gen = torch.Generator().manual_seed(0)
    d, batch, batches = 300, 256, 16  # 300 columns: three 100-wide blocks of the upper triangle
    scale = torch.logspace(-2, 1, d, dtype=torch.float64)
    xs = [(torch.randn(batch, d, dtype=torch.float64, generator=gen) * scale + 0.5).float() for _ in range(batches)]
    m = Moments.zeros((d,))
    for x in xs:
        m.update(x, torch.float32, fold_rows=fold_rows)
    x64 = torch.cat(xs).double()  # float32 values: every product is exact in float64
    exact, mags = x64.T @ x64, x64.abs().T @ x64.abs()  # the reference's own float64 rounding is below 1e-12

    def gamma(n, u):
        return n * u / (1 - n * u)

    window = min(batch * batches, -(-fold_rows // batch) * batch)  # a window closes once it holds fold_rows rows
    bound = (gamma(window, 2.0 ** -24) + gamma(batch * batches, 2.0 ** -53)) * mags
    err = (m.outer - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert torch.equal(m.outer, m.outer.T)  # mirrored from the upper blocks exactly
    assert m.n == batch * batches and m._window is None  # reading folded and freed the window
    torch.testing.assert_close(m.sum, x64.sum(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fold_rows", [1, 10**9])
def test_fold_window_close_to_float64_in_a_model(fold_rows):
    model = tiny_llama()
    batches = [random_batch(seed=s, pad_last=2) for s in range(4)]
    taps = linear_input_taps(model) + kv_head_taps(model)
    s32 = collect_stats(model, batches, taps, fold_rows=fold_rows)
    s64 = collect_stats(model, batches, taps, compute_dtype=torch.float64)
    for key in s64.keys():
        torch.testing.assert_close(s32[key].outer, s64[key].outer, rtol=1e-5, atol=1e-5)


def test_fold_rows_must_be_positive():
    model = tiny_llama()
    with pytest.raises(GeoCompError, match="fold_rows"):
        StatsCollector(model, linear_input_taps(model), fold_rows=0)


def test_diagonal_moments_equal_the_diagonal_of_full_ones(tiny_model):
    """moments='diag' keeps Σx² per feature: the diagonal of Σxxᵀ; full-matrix reads say what to recollect."""
    batches = [random_batch(seed=s, pad_last=3) for s in range(2)]
    full = linear_input_taps(tiny_model)
    diag = [Tap(t.module, "input", moments="diag", name=t.module + ":diag") for t in full]
    stats = collect_stats(tiny_model, batches, full + diag, compute_dtype=torch.float64)
    for f, g in zip(full, diag):
        m, md = stats[f.key], stats[g.key]
        assert md.diagonal_only and md.outer.shape == (m.dim,)
        assert g.key not in stats.aliases or stats.aliases[g.key] != f.key  # never shares a full statistic
        torch.testing.assert_close(md.outer, m.outer.diagonal(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(md.sum, m.sum, rtol=0, atol=0)
        torch.testing.assert_close(md.second_moment_diagonal(), m.second_moment_diagonal(), rtol=1e-12, atol=1e-12)
        cols = torch.arange(m.dim)[:, None]
        torch.testing.assert_close(md.covariance_blocks(cols), m.covariance_blocks(cols), rtol=1e-10, atol=1e-12)
    with pytest.raises(GeoCompError, match="moments='full'"):
        stats[diag[0].key].covariance()
    with pytest.raises(GeoCompError, match="moments='full'"):
        stats[diag[0].key].covariance_blocks(torch.arange(4).reshape(2, 2))


def test_per_head_statistics_give_head_blocks():
    model = tiny_llama()
    o = "model.layers.0.self_attn.o_proj"
    taps = [Tap(o, "input"), Tap(o, "input", head_dim=8, name=o + ":heads")]
    stats = collect_stats(model, [random_batch(seed=1)], taps, compute_dtype=torch.float64)
    cols = torch.arange(32).reshape(4, 8)  # 4 heads of 8
    torch.testing.assert_close(stats[o + ":heads"].covariance_blocks(cols), stats[o + ":in"].covariance_blocks(cols),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(GeoCompError, match="per-head"):
        stats[o + ":heads"].covariance_blocks(torch.arange(32).reshape(2, 16))


def test_tap_moments_must_be_known():
    with pytest.raises(GeoCompError, match="moments"):
        Tap("x", moments="upper")
