"""KV-cache transform coding on tiny Llama (GQA, RoPE) and GPT-2: exactness, bytes, generate, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from hf_geocomp import GeoCompError, arch
from hf_geocomp.eval.memory import tensor_bytes
from hf_geocomp.geometry import collect_stats, linear_input_taps
from hf_geocomp.kv import KVConfig, KVPlan, build_plan, collect_kv_stats, compress, required_taps
from hf_geocomp.kv.allocate import FULL
from hf_geocomp.kv.quant import dequantize, quantize

from .conftest import random_batch, tiny_bert, tiny_gpt2, tiny_llama

DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def setup(request):
    model = DECODERS[request.param]()
    return model, collect_kv_stats(model, [random_batch(4, 32, seed=s) for s in range(3)], "fisher")


@pytest.fixture(scope="module", params=sorted(DECODERS))
def sharp(request):
    """The tiny decoders with the output head scaled ×30: logits with std ≈ 3.5 instead of ≈ 0.1, so that
    coding errors are visible against numerical noise (near-uniform logits hide them)."""
    model = DECODERS[request.param]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model, collect_kv_stats(model, [random_batch(4, 32, seed=s) for s in range(3)], "fisher")


def _two_step_logits(model, cache, batch, split=12):
    first = model(**{k: v[:, :split] for k, v in batch.items()}, past_key_values=cache)
    second = model(input_ids=batch["input_ids"][:, split:], attention_mask=batch["attention_mask"],
                   past_key_values=cache)
    return torch.cat([first.logits, second.logits], 1)


def _reference(model, batch):
    return model(**batch, past_key_values=DynamicCache(config=model.config)).logits


def test_budget_one_is_exact(setup):
    model, stats = setup
    plan = build_plan(model, stats, KVConfig(budget=1.0))
    batch = random_batch(2, 20, seed=5)
    assert torch.allclose(_two_step_logits(model, plan.cache(model), batch), _reference(model, batch), atol=1e-5)


@pytest.mark.parametrize("method", ["fisher", "aware", "pca"])
def test_full_rank_full_precision_basis_is_exact(sharp, method):
    """Every component kept at full precision through the fitted (rotated, weighted) basis: exact up to float32
    rounding, relative to logits that are not near-uniform; half the bytes is not."""
    model, stats = sharp
    plan = build_plan(model, stats, KVConfig(budget=0.5, method=method))
    batch = random_batch(2, 20, seed=6)
    ref = _reference(model, batch)
    tol = 5e-6 * ref.std()
    half = (_two_step_logits(model, plan.cache(model), batch) - ref).abs().max()
    d = plan.num_kv_heads * plan.head_dim
    plan.groups = {k: [(FULL, list(range(d)))] for k in plan.groups}
    plan._codecs = None
    assert (_two_step_logits(model, plan.cache(model), batch) - ref).abs().max() <= tol < half


@pytest.mark.parametrize("budget,bits", [(0.75, False), (0.5, False), (0.25, True), (0.125, True), (0.05, True)])
def test_budget_respected_and_bytes_measured(setup, budget, bits):
    model, stats = setup
    plan = build_plan(model, stats, KVConfig(budget=budget, bits=bits, group_size=8))
    assert plan.ratio <= budget
    assert plan.ratio > budget * 0.7  # the budget is used, not wasted
    cache = plan.cache(model)
    batch = random_batch(3, 20, seed=7)
    logits = _two_step_logits(model, cache, batch)
    assert torch.isfinite(logits).all()
    assert cache.nbytes() == plan.cache_bytes(20, batch=3)  # bytes of the cached tokens == the coded layout
    assert tensor_bytes(cache) == cache.nbytes(used=False) >= cache.nbytes()  # allocated: what the tensors hold
    dyn = DynamicCache(config=model.config)
    model(**batch, past_key_values=dyn)
    assert tensor_bytes(dyn) == plan.cache_bytes(20, batch=3, full=True)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("fitted", DTYPES, ids=str)
@pytest.mark.parametrize("used", DTYPES, ids=str)
def test_bytes_agree_in_every_dtype(setup, fitted, used):
    """A plan fitted with the model in one dtype and used in another: the cache stores exact elements (sinks,
    full-precision components) in the model's dtype, and the plan counts them in the dtype it is asked for,
    so ``cache.nbytes() == plan.cache_bytes(..., dtype=...)``; quantised components cost the same in both."""
    import copy

    model, _ = setup
    fit = copy.deepcopy(model).to(fitted)
    stats = collect_kv_stats(fit, [random_batch(4, 32, seed=s) for s in range(2)], "aware")
    kw = dict(method="aware", sink_tokens=3, reference_tokens=16)
    plans = [build_plan(fit, stats, KVConfig(budget=0.5, bits=False, **kw)),
             build_plan(fit, stats, KVConfig(budget=0.25, group_size=8, **kw))]
    assert plans[0].dtype == str(fitted).removeprefix("torch.")
    assert all(b == FULL for g in plans[0].groups.values() for b, _ in g)  # every kept component exact
    for key, groups in plans[1].groups.items():  # one exact component beside the quantised ones
        (bits, cols), rest = (groups or [(FULL, [])])[0], groups[1:]
        if bits != FULL and len(cols) > 1:
            plans[1].groups[key] = [(FULL, cols[:1]), (bits, cols[1:]), *rest]
    assert {b for g in plans[1].groups.values() for b, _ in g} > {FULL}
    plans[1]._codecs = None
    run = copy.deepcopy(model).to(used)
    batch = random_batch(3, 20, seed=7)
    for plan in plans:
        cache = plan.cache(run)
        with torch.no_grad():
            _two_step_logits(run, cache, batch)
        assert cache.nbytes() == plan.cache_bytes(20, batch=3, dtype=used) == plan.cache_bytes(20, 3, dtype=str(used)[6:])
        dyn = DynamicCache(config=run.config)
        with torch.no_grad():
            run(**batch, past_key_values=dyn)
        assert tensor_bytes(dyn) == plan.cache_bytes(20, batch=3, full=True, dtype=used)
        if used == fitted:
            assert plan.cache_bytes(20, batch=3) == cache.nbytes()  # the plan's own dtype by default


def test_coding_loses_more_at_smaller_budgets(setup):
    model, stats = setup
    batch = random_batch(2, 24, seed=8)
    ref = _reference(model, batch)
    errs = [(_two_step_logits(model, build_plan(model, stats, KVConfig(budget=b)).cache(model), batch) - ref)
            .abs().max().item() for b in (0.5, 0.125, 0.04)]
    assert errs[0] < errs[2] and errs[1] < errs[2]


def _left_padded():
    batch = random_batch(2, 10, seed=9)
    batch["attention_mask"][1, :3] = 0
    return batch


MODES = [{}, {"num_beams": 3}, {"do_sample": True, "top_k": 5}]


def _generate(model, cache=None, extra=None):
    """Tokens and the raw logits of every step."""
    torch.manual_seed(0)  # the same draws for sampling
    kw = {} if cache is None else {"past_key_values": cache}
    out = model.generate(**_left_padded(), max_new_tokens=6, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True, **{"do_sample": False, **extra}, **kw)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("extra", MODES, ids=["greedy", "beam", "sample"])
def test_generate_identity_matches_dynamic(sharp, extra):
    model, stats = sharp
    plan = build_plan(model, stats, KVConfig(budget=1.0))
    (tokens, logits), (ref_tokens, ref_logits) = _generate(model, plan.cache(model), extra), _generate(model, None, extra)
    assert torch.equal(tokens, ref_tokens) and torch.allclose(logits, ref_logits, atol=1e-5)


@pytest.mark.parametrize("extra", MODES, ids=["greedy", "beam", "sample"])
def test_generate_compressed(sharp, extra):
    """At budget 0.25, each decoding mode gives the tokens and step logits of attention on the decoded cache
    when attention reads the latents; and the coding is visible: the logits differ from the uncompressed ones."""
    from hf_geocomp.kv import use_reduced_attention

    model, stats = sharp
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8))
    tokens, logits = _generate(model, plan.cache(model), extra)
    plain = model.config._attn_implementation
    use_reduced_attention(model)
    try:
        reduced_tokens, reduced_logits = _generate(model, plan.cache(model, reduced=True), extra)
    finally:
        model.set_attn_implementation(plain)
    assert tokens.shape == (2, 16) and torch.equal(reduced_tokens, tokens)
    assert torch.allclose(reduced_logits, logits, atol=1e-4)
    ref_tokens, ref_logits = _generate(model, None, extra)
    if torch.equal(ref_tokens, tokens):  # the same path: its logits, read through the coded cache, differ
        assert (ref_logits[1:] - logits[1:]).abs().max() > 5e-5 * ref_logits.std()  # 10× the exactness tolerance


def test_crop_and_reorder(setup):
    model, stats = setup
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=0))  # sink crop: below
    batch = random_batch(3, 16, seed=10)
    full, short = plan.cache(model), plan.cache(model)
    model(**batch, past_key_values=full)
    model(**{k: v[:, :10] for k, v in batch.items()}, past_key_values=short)
    full.crop(-6)
    assert full.get_seq_length() == 10
    for a, b in zip(full.layers, short.layers):  # tokens are coded independently: crop == shorter prefill
        pairs = [(x, y) for sa, sb in zip(a.segments, b.segments) for pa, pb in zip(sa.parts, sb.parts)
                 for x, y in zip(pa, pb)]
        assert all(torch.equal(x, y) if x.dtype == torch.uint8 else torch.allclose(x, y, atol=1e-5) for x, y in pairs)
    idx = torch.tensor([2, 0, 1])
    permuted = plan.cache(model)
    model(**{k: v[idx, :10] for k, v in batch.items()}, past_key_values=permuted)
    full.reorder_cache(idx)
    nxt = {"input_ids": batch["input_ids"][idx, 10:12]}
    assert torch.allclose(model(**nxt, past_key_values=full).logits, model(**nxt, past_key_values=permuted).logits,
                          atol=1e-5)


def test_plan_round_trips(setup, tmp_path):
    model, stats = setup
    _, plan = compress(model, stats, budget=0.25, method="pca", reduced_attention=False)
    again = KVPlan.from_dict(json.loads(json.dumps(plan.to_dict())), plan.tensors)
    assert again.to_dict() == plan.to_dict()
    plan.save(str(tmp_path))
    loaded = KVPlan.load(str(tmp_path))
    batch = random_batch(2, 16, seed=11)
    assert torch.equal(_two_step_logits(model, loaded.cache(model), batch),
                       _two_step_logits(model, plan.cache(model), batch))


def test_compress_from_dataloader():
    model = tiny_llama()
    _, plan = compress(model, [random_batch(2, 16)], budget=0.5, bits=False)  # fisher: a backward pass per batch
    assert model.geocomp_kv_plan is plan and plan.ratio <= 0.5
    assert model.config._attn_implementation == "geocomp_reduced"  # exact, and what plan.cache(model) then uses
    assert plan.cache(model).layers[0].reduced


@pytest.mark.parametrize("bad,match", [
    (dict(budget=0), "budget must be"), (dict(budget=1.5), "budget must be"), (dict(budget=-0.1), "budget must be"),
    (dict(method="svd"), "method must be one of fisher, aware, pca"), (dict(widths=(3,)), "widths must be among"),
    (dict(group_size=0), "group_size must be a positive"), (dict(rope="yes"), "rope must be 'average' or 'none'"),
    (dict(k_scale=0), "k_scale must be positive"), (dict(max_rank=0), "max_rank must be a positive"),
    (dict(rope_positions=0), "rope_positions must be positive"), (dict(k_units="bits"), "k_units must be"),
    (dict(sink_tokens=5, reference_tokens=5), r"sink_tokens must be in \[0, reference_tokens=5\)"),
])
def test_bad_config(bad, match):
    with pytest.raises(GeoCompError, match=match):
        KVConfig(**bad)


def test_bad_inputs(setup):
    model, stats = setup
    with pytest.raises(GeoCompError, match="max_rank"):
        build_plan(model, stats, KVConfig(max_rank=arch.head_layout(model).head_dim + 1))
    with pytest.raises(GeoCompError, match="no 'model|no 'transformer"):
        compress(model, collect_stats(model, [random_batch(2, 8)], linear_input_taps(model)[:1]))
    with pytest.raises(GeoCompError, match="next-token loss"):
        compress(tiny_bert(), [random_batch(2, 8)])
    with pytest.raises(GeoCompError, match="encoder"):
        build_plan(tiny_bert(), stats, KVConfig(budget=1.0)).cache(tiny_bert())
    other = tiny_gpt2() if model.config.model_type == "llama" else tiny_llama()
    plan = build_plan(model, stats, KVConfig(budget=0.5))
    with pytest.raises(GeoCompError, match="was made for"):
        plan.cache(other)
    with pytest.raises(GeoCompError, match="different model"):
        build_plan(other, stats, KVConfig())


def _tiny_qwen2_sliding():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    return Qwen2ForCausalLM(cfg).eval()


def test_sliding_window_layers():
    """A model with a full and a sliding-window layer: exact at budget 1, coded below it, the window bounds memory."""
    model = _tiny_qwen2_sliding()
    assert [kind for kind, _ in arch.attention_layer_types(model)] == ["full_attention", "sliding_attention"]
    stats = collect_kv_stats(model, [random_batch(2, 16)], "fisher")
    batch = random_batch(2, 14, seed=13)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    exact = build_plan(model, stats, KVConfig(budget=1.0))
    assert torch.allclose(_two_step_logits(model, exact.cache(model), batch, split=9), _reference(model, batch),
                          atol=1e-5)
    assert torch.equal(model.generate(**batch, past_key_values=exact.cache(model), **kw), model.generate(**batch, **kw))
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=2, reference_tokens=16))
    cache = plan.cache(model)
    out = model.generate(**batch, past_key_values=cache, **kw)
    assert out.shape == (2, 22) and cache.layers[1].segments[0].length == 5  # sliding_window - 1 tokens kept
    assert cache.get_seq_length(1) == cache.get_seq_length(0) == 21
    with pytest.raises(GeoCompError, match="cannot be cropped"):
        cache.crop(-2)


@pytest.mark.parametrize("budget,reference", [(0.5, 16), (0.25, 64)])
def test_sliding_window_bytes_and_budget(budget, reference):
    """The plan counts what a sliding layer holds (its last window - 1 tokens), so ``plan.ratio`` and
    ``cache_bytes`` equal the bytes the coded cache and transformers' DynamicCache hold, at every length."""
    model = _tiny_qwen2_sliding()
    stats = collect_kv_stats(model, [random_batch(2, 16)], "fisher")
    plan = build_plan(model, stats, KVConfig(budget=budget, group_size=8, sink_tokens=2, reference_tokens=reference))
    assert plan.windows == [None, 6]
    assert budget * 0.9 < plan.ratio <= budget  # the budget holds where it is defined, sliding layer included
    for tokens in (3, 5, 6, 14):  # below, at and past the window
        batch = random_batch(2, tokens, seed=tokens)
        cache, dyn = plan.cache(model), DynamicCache(config=model.config)
        with torch.no_grad():  # a prefill alone, and a prefill then one decode step
            prefilled = plan.cache(model)
            model(**batch, past_key_values=prefilled)
            for c in (cache, dyn):
                _two_step_logits(model, c, batch, split=tokens - 1)
        assert prefilled.nbytes() == plan.cache_bytes(tokens, batch=2) <= tensor_bytes(prefilled)
        assert cache.nbytes() == plan.cache_bytes(tokens, batch=2) <= tensor_bytes(cache)  # used; storage held ≥
        # DynamicCache's kept tokens (its sliding layer slices a view, whose storage holds one token more)
        kept = sum(t.numel() * t.element_size() for layer in dyn.layers for t in (layer.keys, layer.values))
        assert kept == plan.cache_bytes(tokens, batch=2, full=True)
    assert plan.cache_bytes(reference, full=True) == (reference + 5) * plan.full_bytes_per_token // 2  # + 5 held
    identity = build_plan(model, stats, KVConfig(budget=1.0))
    assert identity.ratio == 1.0 and identity.cache_bytes(14) == plan.cache_bytes(14, full=True)


def test_reduced_attention_on_a_sliding_window_model():
    """Full layers read the latents, the sliding layer its decoded window: the same logits and tokens."""
    from hf_geocomp.kv import use_reduced_attention

    model = _tiny_qwen2_sliding()
    stats = collect_kv_stats(model, [random_batch(2, 16)], "fisher")
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=2, reference_tokens=16))
    batch = random_batch(2, 14, seed=15)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = _two_step_logits(model, plan.cache(model), batch, split=9)
        ref_out = model.generate(**batch, past_key_values=plan.cache(model), **kw)
        plain = model.config._attn_implementation
        use_reduced_attention(model)
        try:
            cache = plan.cache(model, reduced=True)
            got = _two_step_logits(model, cache, batch, split=9)
            out = model.generate(**batch, past_key_values=plan.cache(model, reduced=True), **kw)
        finally:
            model.set_attn_implementation(plain)
    assert cache.layers[0].reduced and not cache.layers[1].reduced
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(out, ref_out)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_uniform_quantizer_error_per_group(bits):
    """Mid-rise uniform codes over ±(group max): every error within half a step of its own group's scale,
    and the mean error that of a uniform error over the step (a/2^(b+1) on average)."""
    z = torch.randn(50, 7, 40, generator=torch.Generator().manual_seed(bits))
    packed, scales = quantize(z, bits, 16)  # 40 = two groups of 16 and a partial one of 8
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-40 // (8 // bits)) and scales.shape[-1] == 3
    a = scales.float().repeat_interleave(16, -1)[..., :40]  # each component's group scale
    amax = z.reshape(50, 7, -1).abs()
    groups = torch.nn.functional.pad(amax, (0, 8)).reshape(50, 7, 3, 16).amax(-1)
    assert torch.allclose(scales.float(), groups, rtol=1e-3)  # the scale is the group's absolute maximum
    err = (dequantize(packed, scales, bits, 16, 40) - z).abs()
    step = 2 * a / 2 ** bits
    assert (err <= step / 2 + 1e-3 * a).all()
    assert (err / step).mean() == pytest.approx(0.25, abs=0.03)


def test_one_bit_is_the_sign_times_the_mean_magnitude():
    z = torch.randn(400, 40, generator=torch.Generator().manual_seed(1))
    packed, scales = quantize(z, 1, 16)
    assert packed.shape == (400, 5) and scales.shape == (400, 3)
    mean_abs = torch.stack([z[:, :16].abs().mean(1), z[:, 16:32].abs().mean(1), z[:, 32:].abs().mean(1)], 1)
    assert torch.allclose(scales.float(), mean_abs, rtol=1e-3)  # the partial group divides by its 8 members
    level = mean_abs.half().float().repeat_interleave(16, -1)[:, :40]
    assert torch.allclose(dequantize(packed, scales, 1, 16, 40), torch.where(z > 0, level, -level))
    from hf_geocomp.kv.quant import relative_mse

    assert relative_mse(1, 16) == pytest.approx(1 - 2 / torch.pi, abs=0.05)  # the least-squares sign code


def test_rope_average():
    model = tiny_llama()
    c = torch.randn(8, 8, dtype=torch.float64)
    c = c @ c.T
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float64), torch.arange(9)[None])
    eye = torch.eye(8, dtype=torch.float64)[None, None]  # rows e_i as 8 "tokens" of one head
    rs = []
    for p in range(9):  # R_p applied to each basis vector: its columns
        rotated, _ = apply_rotary_pos_emb(eye, eye, cos[:, p:p + 1].double(), sin[:, p:p + 1].double())
        rs.append(rotated[0, 0].T)
    r = torch.stack(rs)  # (P, 8, 8)
    assert torch.allclose(arch.rope_average(model, c, 9), (r @ c @ r.transpose(1, 2)).mean(0), atol=1e-5)


def _stored(cache):
    return [t for layer in cache.layers for seg in layer.segments for part in (seg.parts or ()) for t in part]


def _same_storage(a, b):
    pairs = list(zip(_stored(a), _stored(b)))
    assert pairs and len(_stored(a)) == len(_stored(b))
    return all(torch.equal(x, y) if x.dtype == torch.uint8 else torch.allclose(x, y, atol=1e-5) for x, y in pairs)


def _filled(setup, *batches):
    """A 0.25 plan with 3 sink tokens, and one coded cache filled with each batch."""
    model, stats = setup
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=3, reference_tokens=16))
    caches = [plan.cache(model) for _ in batches]
    with torch.no_grad():
        for batch, cache in zip(batches, caches):
            model(**batch, past_key_values=cache)
    return model, plan, caches


def test_batch_repeat_and_select_equal_caches_filled_that_way(setup):
    """What generate does for beams and assisted decoding: repeat each row, then keep some rows."""
    batch = random_batch(2, 10, seed=16)
    model, plan, (cache, repeated) = _filled(setup, batch, {k: v.repeat_interleave(3, 0) for k, v in batch.items()})
    cache.batch_repeat_interleave(3)
    assert _same_storage(cache, repeated) and cache.get_seq_length() == 10
    idx = torch.tensor([4, 1])
    selected = plan.cache(model)
    with torch.no_grad():
        model(**{k: v.repeat_interleave(3, 0)[idx] for k, v in batch.items()}, past_key_values=selected)
        cache.batch_select_indices(idx)
        assert _same_storage(cache, selected)
        nxt = {"input_ids": batch["input_ids"].repeat_interleave(3, 0)[idx, :1]}
        assert torch.allclose(model(**nxt, past_key_values=cache).logits, model(**nxt, past_key_values=selected).logits,
                              atol=1e-5)


def test_offload_and_prefetch_move_every_stored_tensor(setup):
    batch = random_batch(2, 10, seed=17)
    model, _, (cache, kept) = _filled(setup, batch, batch)
    for layer in cache.layers:  # what Cache(offloading=True) calls per layer (its CUDA streams aside)
        layer.offload()
    assert all(t.device.type == "cpu" for t in _stored(cache))
    for layer in cache.layers:
        layer.prefetch()
    assert _same_storage(cache, kept)
    nxt = {"input_ids": batch["input_ids"][:, :2]}
    with torch.no_grad():
        assert torch.equal(model(**nxt, past_key_values=cache).logits, model(**nxt, past_key_values=kept).logits)
    for layer in cache.layers:  # prefetch goes to the layer's device, whatever it is
        layer.device = torch.device("meta")
        layer.prefetch()
    assert all(t.device.type == "meta" for t in _stored(cache))


def test_max_rank_caps_every_head(setup):
    model, stats = setup
    free = build_plan(model, stats, KVConfig(budget=0.5, bits=False))
    d = free.head_dim

    def kept_per_head(plan):
        return [sum(1 for _, cols in groups for c in cols if c // d == h) for groups in plan.groups.values()
                for h in range(plan.num_kv_heads)]

    assert max(kept_per_head(free)) > 3
    plan = build_plan(model, stats, KVConfig(budget=0.5, bits=False, max_rank=3))
    assert max(kept_per_head(plan)) == 3 and plan.ratio <= 0.5
    batch = random_batch(2, 16, seed=18)
    cache = plan.cache(model)
    assert torch.isfinite(_two_step_logits(model, cache, batch)).all()
    assert cache.nbytes() == plan.cache_bytes(16, batch=2) <= tensor_bytes(cache)


def test_fisher_needs_gradient_statistics(setup):
    model, _ = setup
    assert KVConfig(method="fisher").k_scale == 1.0 and KVConfig(method="aware").k_scale == 4.0
    with pytest.raises(GeoCompError, match="k_grad"):
        build_plan(model, collect_stats(model, [random_batch(2, 8)], required_taps(model)), KVConfig(method="fisher"))


def test_sink_tokens_exact_counted_and_cropped(setup):
    model, stats = setup
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=3, reference_tokens=16))
    assert plan.ratio <= 0.25 and plan.cache_bytes(16) <= 0.25 * plan.cache_bytes(16, full=True)
    batch = random_batch(2, 20, seed=12)
    cache = plan.cache(model)
    _two_step_logits(model, cache, batch, split=2)  # the sink fills across two updates
    assert cache.nbytes() == plan.cache_bytes(20, batch=2) and tensor_bytes(cache) == cache.nbytes(used=False)
    dyn = DynamicCache(config=model.config)
    model(**batch, past_key_values=dyn)
    for layer, ref in zip(cache.layers, dyn.layers):  # the first 3 tokens are stored exactly
        sink = layer.segments[0].parts[0][0]  # (batch, 3, kv_heads, d)
        assert torch.allclose(sink, ref.keys[:, :, :3].transpose(1, 2), atol=1e-6)
    cache.crop(2)
    assert cache.get_seq_length() == 2 and cache.nbytes() == plan.cache_bytes(2, batch=2)
    with pytest.raises(GeoCompError, match="sink_tokens"):
        KVConfig(budget=0.1, sink_tokens=200, reference_tokens=1024)


def test_encoder_projection_in_place():
    """BERT has no cache: the plan codes its keys and values in place; exact at full precision, removable."""
    from hf_geocomp.kv import project

    model = tiny_bert()
    stats = collect_kv_stats(model, [random_batch(4, 16, seed=s) for s in range(2)], "aware")
    batch = random_batch(2, 12, seed=14)
    ref = model(**batch).last_hidden_state
    plan = build_plan(model, stats, KVConfig(budget=0.25, method="aware", group_size=8))
    handle = project(model, plan)
    coded = model(**batch).last_hidden_state
    handle.remove()
    assert torch.isfinite(coded).all() and not torch.allclose(coded, ref, atol=1e-4)
    assert torch.equal(model(**batch).last_hidden_state, ref)
    d = plan.num_kv_heads * plan.head_dim
    plan.groups = {k: [(FULL, list(range(d)))] for k in plan.groups}
    plan._codecs = None
    with torch.no_grad():
        handle = project(model, plan)
        assert torch.allclose(model(**batch).last_hidden_state, ref, atol=1e-4)
        handle.remove()


def test_reduced_attention_equals_attention_on_decoded_cache(setup):
    """Scores and values computed on the stored latents equal attention on the decoded keys and values."""
    from hf_geocomp.kv import use_reduced_attention

    model, stats = setup
    model.set_attn_implementation("sdpa")
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=3, reference_tokens=16))
    batch = random_batch(2, 20, seed=3)
    batch["attention_mask"][1, :4] = 0
    real = batch["attention_mask"].bool()

    def run(cache):
        with torch.no_grad():
            parts = [model(**{k: v[:, :12] for k, v in batch.items()}, past_key_values=cache).logits]
            for a, b in ((12, 16), (16, 17)):  # a chunk, then one decode step
                parts.append(model(input_ids=batch["input_ids"][:, a:b], attention_mask=batch["attention_mask"][:, :b],
                                   past_key_values=cache).logits)
        return torch.cat(parts, 1)[real[:, :17]]  # padded positions carry no prediction

    with pytest.raises(GeoCompError, match="use_reduced_attention"):
        plan.cache(model, reduced=True)
    ref = run(plan.cache(model))
    plain = model.config._attn_implementation
    use_reduced_attention(model)
    try:
        assert torch.allclose(run(plan.cache(model, reduced=True)), ref, atol=1e-5)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        out = model.generate(**_left_padded(), past_key_values=plan.cache(model, reduced=True), **kw)
    finally:
        model.set_attn_implementation(plain)
    assert torch.equal(out, model.generate(**_left_padded(), past_key_values=plan.cache(model), **kw))


def test_two_models_generating_in_two_threads(sharp, monkeypatch):
    """Two models with their own plans and caches generating at once in two threads (a server's requests)
    give the tokens and logits of running them one after the other. The threads are held in lock step
    between each cache's hand-over and its attention call, the moment another thread's hand-over for the
    same layer could be read instead of its own."""
    import copy
    import threading

    from hf_geocomp.kv import attention, use_reduced_attention

    model, _ = sharp
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for p in models[1].parameters():  # other weights, so that the two models' codes differ
            p.add_(torch.randn(p.shape, generator=g) * p.std().nan_to_num(0.02))
    plans = []
    for m in models:
        stats = collect_kv_stats(m, [random_batch(4, 32, seed=s) for s in range(2)], "aware")
        plans.append(build_plan(m, stats, KVConfig(budget=0.25, method="aware", group_size=8, sink_tokens=2,
                                                   reference_tokens=16)))
        use_reduced_attention(m)

    def run(i):
        return _generate(models[i], plans[i].cache(models[i], reduced=True), {})

    sequential = [run(0), run(1)]
    assert (sequential[0][1] - sequential[1][1]).abs().max() > 1  # the two models say different things
    lock_step = threading.Barrier(2, timeout=60)
    handed = attention.hand_over

    def hand_over_then_wait(*args):
        handed(*args)
        lock_step.wait()

    monkeypatch.setattr(attention, "hand_over", hand_over_then_wait)
    out, errors = [None, None], []

    def worker(i):
        try:
            out[i] = run(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            lock_step.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (tokens, logits), (ref_tokens, ref_logits) in zip(out, sequential):
        assert torch.equal(tokens, ref_tokens) and torch.allclose(logits, ref_logits, atol=1e-5)


def _independent_kl(model, plan, windows, prefill):
    """Mean over scored tokens of KL(uncompressed ‖ coded cache), from one full pass each: not refine's code."""
    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows[:, None]:
            full = model(input_ids=w, past_key_values=DynamicCache(config=model.config)).logits[0, prefill:]
            cache = plan.cache(model)
            model(input_ids=w[:, :prefill], past_key_values=cache)
            coded = model(input_ids=w[:, prefill:], past_key_values=cache).logits[0]
            p, q = full.double().log_softmax(-1), coded.double().log_softmax(-1)
            total, n = total + float((p.exp() * (p - q)).sum()), n + len(p)
    return total / n


def test_refine_improves_a_worse_fit_and_round_trips():
    """Decoders halved (a fit measurably worse than the closed form): refinement recovers most of the KL,
    measured independently; a too-large step never improves, and then the fitted decoders are kept."""
    from hf_geocomp.kv import refine

    model = tiny_llama()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    stats = collect_kv_stats(model, [random_batch(4, 32, seed=s) for s in range(3)], "fisher")
    plan = build_plan(model, stats, KVConfig(budget=0.125, group_size=8, sink_tokens=0))
    windows = torch.stack([random_batch(1, 24, seed=20 + i)["input_ids"][0] for i in range(4)])
    fitted = {k: v.clone() for k, v in plan.tensors.items()}
    for k in plan.tensors:
        if k.endswith(".dec"):
            plan.tensors[k] = plan.tensors[k] * 0.5
    plan._codecs = None
    worse = _independent_kl(model, plan, windows, 16)
    assert worse > 10 * _independent_kl(model, build_plan(model, stats, plan.config), windows, 16)
    halved = {k: v.clone() for k, v in plan.tensors.items()}
    refine(model, plan, windows, prefill=16, steps=8, lr=3e-3, batch_size=2, check_every=2)
    r = plan.refinement
    assert r["kl_before"] == pytest.approx(worse, rel=1e-3) and r["best_step"] > 0
    assert r["kl_after"] < 0.5 * r["kl_before"]
    assert _independent_kl(model, plan, windows, 16) == pytest.approx(r["kl_after"], rel=1e-3)
    assert all(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(halved[k], plan.tensors[k]) for k in halved if k.endswith(".dec"))
    assert all(torch.equal(fitted[k], plan.tensors[k]) for k in fitted if k.endswith(".enc"))
    again = KVPlan.from_dict(json.loads(json.dumps(plan.to_dict())), plan.tensors)
    assert again.refinement == r

    plan = build_plan(model, stats, plan.config)
    refine(model, plan, windows, prefill=16, steps=2, lr=1.0, batch_size=2, check_every=1)  # every step overshoots
    assert plan.refinement["best_step"] == 0 and plan.refinement["kl_after"] == plan.refinement["kl_before"]
    assert all(torch.equal(fitted[k], plan.tensors[k]) for k in fitted)
    with pytest.raises(GeoCompError, match="prefill"):
        refine(model, plan, windows, prefill=24)

    # relative_lr: Adam's first step moves every entry by about lr times its own head's decoder RMS
    for k in plan.tensors:
        if k.endswith(".dec"):
            plan.tensors[k] = fitted[k] * 0.5
    plan._codecs = None
    halved = {k: v.clone() for k, v in plan.tensors.items()}
    refine(model, plan, windows, prefill=16, steps=1, lr=1e-2, batch_size=2, check_every=1, relative_lr=True)
    assert plan.refinement["best_step"] == 1 and plan.refinement["relative_lr"] is True
    for k in halved:
        if k.endswith(".dec"):
            rms = halved[k].float().pow(2).mean((1, 2)).sqrt()  # per KV head
            step = (plan.tensors[k].float() - halved[k].float()).abs().amax((1, 2)) / rms
            assert (step <= 1e-2 * 1.001).all(), (k, step)  # never more than lr of the head's own scale
            if k.endswith(".v.dec"):  # V gradients here are far above Adam's eps: exactly lr (K's are below it)
                assert torch.allclose(step, torch.full_like(step, 1e-2), rtol=1e-3), (k, step)
    assert len({round(float(r), 6) for k in halved if k.endswith(".dec")
                for r in halved[k].float().pow(2).mean((1, 2)).sqrt()}) > 1  # the heads' scales differ


def test_capacity_growth_keeps_bytes_and_contents(setup):
    """Token-by-token appends write into buffers with room: contents are each token's codes, the buffer
    is reused while it has room, grows geometrically, and batch operations act on it."""
    model, stats = setup
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=2, reference_tokens=16))
    heads = arch.head_layout(model)
    g = torch.Generator().manual_seed(15)
    keys, values = (torch.randn(3, heads.num_kv_heads, 40, heads.head_dim, generator=g) for _ in range(2))
    stepped, whole = plan.cache(model), plan.cache(model)
    stepped.update(keys[:, :, :4], values[:, :, :4], 0)
    seg = stepped.layers[0].segments[-1]
    pointers, sizes = set(), set()
    for t in range(4, 40):
        stepped.update(keys[:, :, t:t + 1], values[:, :, t:t + 1], 0)
        pointers.add(seg.buffers[1][0].data_ptr())
        sizes.add(seg.allocated)
    assert len(pointers) == 1 and sizes == {2 + seg.GROW_TOKENS}  # 2 coded tokens, one growth covers 36 more
    codecs = seg.codecs
    each = [sum((c.encode(x[:, :, t:t + 1]) for c, x in zip(codecs, (keys, values))), []) for t in range(2, 40)]
    stored = [t.clone() for t in sum(seg.parts, [])]
    assert all(torch.equal(s, torch.cat(parts, 1)) for s, parts in zip(stored, zip(*each)))
    for i in range(2):  # every layer holds 40 tokens: the plan's layout
        whole.update(keys, values, i)
    stepped.update(keys, values, 1)
    assert stepped.nbytes() == whole.nbytes() == plan.cache_bytes(40, batch=3)
    assert tensor_bytes(stepped) == stepped.nbytes(used=False) > stepped.nbytes()
    assert tensor_bytes(whole) == whole.nbytes()  # one append allocates exactly what it holds
    length = seg.allocated
    for _ in range(2):  # growth of a full buffer: by max(GROW_TOKENS, allocated // GROW_DIVISOR)
        seg._grow(seg.buffers, seg.allocated + 1)
    assert seg.allocated == length + 2 * seg.GROW_TOKENS and seg.nbytes() == whole.layers[0].segments[-1].nbytes()
    stepped.reorder_cache(torch.tensor([2, 0, 1]))
    stepped.batch_select_indices(torch.tensor([0, 1]))
    stepped.batch_repeat_interleave(2)
    idx = torch.tensor([2, 2, 0, 0])
    assert all(t.shape[0] == 4 for t in sum(seg.buffers, []))
    assert all(torch.equal(s[idx], t) for s, t in zip(stored, sum(seg.parts, [])))
