"""The family matrix: every supported family (tests/families.py) through every method's generic checks.

Statistics taps hit exactly what ``cache.update`` receives (before RoPE), pruning cuts and
reloads, KV coding is exact at full precision and its reduced attention equals attention on
the decoded cache (softcap, sliding windows and per-layer RoPE included), SpectralLoRA builds on
the default targets; an unsupported family is refused from its config alone.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import DynamicCache

from hf_geocomp import GeoCompError, arch
from hf_geocomp.geometry import collect_stats, kv_head_taps, linear_input_taps, q_head_taps
from hf_geocomp.kv import KVConfig, build_plan, collect_kv_stats, use_reduced_attention
from hf_geocomp.kv.allocate import FULL
from hf_geocomp.prune import apply_masks, apply_plan, prune, prune_taps, unit_groups

from .conftest import random_batch, model_output as _out
from .families import DECODERS, FAMILIES, KV_VARIANTS

BUILD = {**FAMILIES, **KV_VARIANTS}
KV_CASES = DECODERS + list(KV_VARIANTS)  # the KV checks also run on variants (longrope, Mistral without a window)


def test_every_supported_family_is_in_the_matrix():
    built = {FAMILIES[n]().config.model_type for n in FAMILIES}
    assert built == set(arch.SUPPORTED)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_declared_attention_matches_the_modules(name):
    """Query scale, softcap and embedding scale as declared in arch equal what the family's modules use."""
    model = FAMILIES[name]()
    attn = model.get_submodule(arch.block_prefixes(model)[0] + arch.get_spec(model).attn)
    if hasattr(attn, "scaling"):
        assert arch.attention_scaling(model) == pytest.approx(attn.scaling)
    assert arch.attention_softcap(model) == getattr(attn, "attn_logit_softcapping", None)
    ids = torch.tensor([[3, 5, 7]])
    emb = model.get_input_embeddings()
    captured = {}  # the hidden states entering the first block: the scaled embeddings
    layer = model.get_submodule(arch.block_prefixes(model)[0].rstrip("."))
    h = layer.register_forward_pre_hook(
        lambda m, a, kw: captured.update(x=kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    if arch.get_spec(model).rope:  # GPT-2 and BERT add position embeddings (and BERT a norm) before the blocks
        torch.testing.assert_close(captured["x"], emb.weight[ids].detach() * arch.embed_scale(model))


class _SpyCache(DynamicCache):
    """A DynamicCache that records what every layer's ``update`` receives."""

    def __init__(self, config):
        super().__init__(config=config)
        self.seen = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.seen[layer_idx] = (key_states.detach().clone(), value_states.detach().clone())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _tapped_and_cached(model, batch):
    """(per (layer, "k"/"v") what the KV taps see (b, kv, T, d), per layer what cache.update receives)."""
    tapped, handles = {}, []
    for t in arch.kv_taps(model):
        def hook(module, args, out, t=t):
            flat = (out.transpose(1, 2) if t.heads_first else out).flatten(2) if out.dim() == 4 else out
            x = flat[..., t.offset: t.offset + t.width]
            tapped[t.layer, t.kind] = x.reshape(*x.shape[:2], -1, t.head_dim).transpose(1, 2).detach()  # (b, kv, T, d)
        handles.append(model.get_submodule(t.module).register_forward_hook(hook))
    cache = _SpyCache(model.config)
    try:
        with torch.no_grad():
            model(**batch, past_key_values=cache)
    finally:
        for h in handles:
            h.remove()
    return tapped, cache.seen


@pytest.mark.parametrize("name", KV_CASES)
def test_kv_taps_are_what_the_cache_receives(name):
    """RoPE(tapped K) == the keys cache.update gets, tapped V == its values, and the engine sums those taps."""
    model = BUILD[name]()
    batch = random_batch(2, 10, seed=1)
    taps = arch.kv_taps(model)
    tapped, seen = _tapped_and_cached(model, batch)
    positions = torch.arange(10)
    for layer, (k, v) in seen.items():
        torch.testing.assert_close(arch.apply_rope(model, layer, tapped[layer, "k"], positions), k.double(),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tapped[layer, "v"], v)
    stats = collect_stats(model, [batch], kv_head_taps(model) + q_head_taps(model), compute_dtype=torch.float64)
    for t in taps:
        torch.testing.assert_close(stats[f"{t.module}:{t.kind}"].sum, tapped[t.layer, t.kind].double().sum((0, 2)))


@pytest.mark.parametrize("name", KV_CASES)
def test_rope_average_is_the_mean_over_rotations(name):
    model = BUILD[name]()
    d = arch.head_layout(model).head_dim
    c = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = c @ c.T
    eye = torch.eye(d, dtype=torch.float64)
    for n in (7, 20):  # 20: past phi3_longrope's original length, where its long factors apply
        for layer in range(len(arch.block_prefixes(model))):
            r = torch.stack([arch.apply_rope(model, layer, eye, torch.full((d,), p), seq_len=n).T
                             for p in range(n)])  # (P, d, d): as one forward of n tokens rotates them
            torch.testing.assert_close(arch.rope_average(model, c, n, layer), (r @ c @ r.transpose(1, 2)).mean(0))
            rg = torch.linalg.inv(r).transpose(1, 2)  # gradients map by R⁻ᵀ
            torch.testing.assert_close(arch.rope_average(model, c, n, layer, gradient=True),
                                       (rg @ c @ rg.transpose(1, 2)).mean(0))


def test_longrope_follows_each_forwards_length_not_the_last_one():
    """Longrope picks short or long frequencies by the length of each forward, and transformers keeps the last
    choice in the rotary module: RoPE as arch applies it must depend on the positions asked for, not on which
    forward ran last (calibration, another sequence), both with its attention_scaling of about 1.4."""
    from .families import LONGROPE_ORIGINAL, phi3_longrope

    model = phi3_longrope()
    assert arch.rope_scale(model) == pytest.approx(1.3973548652929608)
    short, long = LONGROPE_ORIGINAL - 2, LONGROPE_ORIGINAL + 6
    runs = {n: _tapped_and_cached(model, random_batch(2, n, seed=n)) for n in (short, long)}
    for n, other in ((short, long), (long, short)):
        with torch.no_grad():
            model(input_ids=random_batch(1, other)["input_ids"])  # leaves the other length's frequencies behind
        tapped, seen = runs[n]
        for layer, (k, _) in seen.items():
            torch.testing.assert_close(arch.apply_rope(model, layer, tapped[layer, "k"], torch.arange(n)), k.double(),
                                       rtol=1e-5, atol=1e-5)
    inv_short, inv_long = (arch.rope_frequencies(model, 0, seq_len=n)[0] for n in (short, long))
    assert not torch.allclose(inv_short, inv_long)
    torch.testing.assert_close(arch.rope_frequencies(model, 0)[0], inv_short)  # no length: the original (short) set


def _kv_run(model, cache, batch):
    """Prefill 12, a chunk of 4, one decode step; logits of the real tokens."""
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        parts = [model(**{k: v[:, :12] for k, v in batch.items()}, past_key_values=cache).logits]
        for a, b in ((12, 16), (16, 17)):
            parts.append(model(input_ids=batch["input_ids"][:, a:b], attention_mask=batch["attention_mask"][:, :b],
                               past_key_values=cache).logits)
    return torch.cat(parts, 1)[real[:, :17]]


@pytest.fixture(scope="module")
def kv_setup():
    cache = {}

    def get(name):
        if name not in cache:
            model = BUILD[name]()
            cache[name] = model, collect_kv_stats(model, [random_batch(4, 24, seed=s) for s in range(2)], "fisher")
        return cache[name]
    return get


@pytest.mark.parametrize("name", KV_CASES)
def test_kv_coding_exact_and_reduced_equals_decoded(name, kv_setup, monkeypatch):
    """Budget 1 and a full-precision fitted basis reproduce the model; reduced attention == attention on the decoded
    cache within 1e-5 (softcap, sliding windows, per-layer RoPE, longrope past its original length), and both
    generate the same tokens. The reduced path really runs wherever a layer has full attention."""
    import hf_geocomp.kv.attention as reduced

    calls = []
    monkeypatch.setattr(reduced, "coded_scores", lambda *a, f=reduced.coded_scores: calls.append(1) or f(*a))
    model, stats = kv_setup(name)
    batch = random_batch(2, 20, seed=3)
    batch["attention_mask"][1, :4] = 0
    ref = _kv_run(model, DynamicCache(config=model.config), batch)
    torch.testing.assert_close(_kv_run(model, build_plan(model, stats, KVConfig(budget=1.0)).cache(model), batch), ref,
                               rtol=1e-5, atol=1e-5)
    full = build_plan(model, stats, KVConfig(budget=0.5, method="aware"))
    d = full.num_kv_heads * full.head_dim
    full.groups = {k: [(FULL, list(range(d)))] for k in full.groups}
    torch.testing.assert_close(_kv_run(model, full.cache(model), batch), ref, rtol=1e-4, atol=1e-4)

    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, sink_tokens=3, reference_tokens=16))
    decoded = _kv_run(model, plan.cache(model), batch)
    plain = model.config._attn_implementation
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, input_ids=batch["input_ids"][:, :10],
               attention_mask=batch["attention_mask"][:, :10])
    expected = model.generate(**gen, past_key_values=plan.cache(model))
    use_reduced_attention(model)
    try:
        torch.testing.assert_close(_kv_run(model, plan.cache(model, reduced=True), batch), decoded, rtol=1e-5, atol=1e-5)
        out = model.generate(**gen, past_key_values=plan.cache(model, reduced=True))
    finally:
        model.set_attn_implementation(plain)
    assert torch.equal(out, expected)
    full = any(kind == "full_attention" for kind, _ in arch.attention_layer_types(model))
    assert bool(calls) == full, (name, len(calls))  # reduced attention read the codes of every full layer




@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pruning_cuts_and_reloads(name, tmp_path):
    """Surgery equals masking; the pruned model saves and reloads with stock from_pretrained to identical outputs."""
    model = FAMILIES[name]()
    spec = arch.get_spec(model)
    batch = random_batch(4, 16, pad_last=3)
    targets = ("mlp",) if spec.head_pruning else ("mlp", "heads")
    if spec.head_pruning:
        with pytest.raises(GeoCompError, match="cannot be pruned"):
            unit_groups(model, ("mlp", "heads"))
    stats = collect_stats(model, [batch], prune_taps(model, targets), compute_dtype=torch.float64)
    from hf_geocomp.prune import PruneConfig, allocate, block_params, score_groups

    cfg = PruneConfig(sparsity=0.3, criterion="variance", targets=targets)
    groups = unit_groups(model, targets)
    plan = allocate(groups, score_groups(model, groups, cfg, stats), cfg, block_params(model))
    masked_model = FAMILIES[name]()
    apply_masks(masked_model, groups, plan)
    before = block_params(model)
    apply_plan(model, groups, plan)
    assert before - block_params(model) == plan.params_removed > 0
    torch.testing.assert_close(_out(model, batch), _out(masked_model, batch), rtol=1e-4, atol=1e-5)

    model = FAMILIES[name]()
    if not spec.head_config:  # GPT-2 and BERT keep no per-layer head counts in the config: pruned heads need
        targets = ("mlp",)  # the geocomp loader (tests/test_prune.py checks a stock load refuses them)
    prune(model, stats, sparsity=0.3, targets=targets)
    assert model.config.geocomp_pruning["stock_loadable"]
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(again, batch), _out(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bias_compensation_reloads_or_is_refused_by_stock(name, tmp_path):
    """Compensation that adds a bias reloads with stock transformers where the family's config can turn the bias
    on; elsewhere stock transformers refuses the checkpoint and the geocomp loader rebuilds the biases."""
    from transformers import AutoModelForCausalLM

    import hf_geocomp  # noqa: F401
    from hf_geocomp.hub import mark_compressed

    model = FAMILIES[name]()
    spec = arch.get_spec(model)
    batch = random_batch(4, 16)
    stats = collect_stats(model, [batch], prune_taps(model, ("mlp",)), compute_dtype=torch.float64)
    has_bias = model.get_submodule(arch.block_prefixes(model)[0] + spec.mlp_out).bias is not None
    _, plan = prune(model, stats, sparsity=0.2, targets=("mlp",), compensation="bias")
    if spec.bias_flags[0] is None and not has_bias:
        assert model.config.attn_implementation == arch.PLUGIN_GUARD
        model.save_pretrained(tmp_path / "plain")
        with pytest.raises(ValueError, match="hf_geocomp-required"):
            type(model).from_pretrained(tmp_path / "plain")  # never a model that silently lost its biases
        mark_compressed(model, plan)
        model.save_pretrained(tmp_path / "geocomp")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "geocomp").eval()
    else:
        model.save_pretrained(tmp_path)
        again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(again, batch), _out(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_spectral_lora_on_default_targets(name):
    from peft import get_peft_model

    from hf_geocomp.lora import SpectralLoraConfig

    model = FAMILIES[name]()
    batch = random_batch(3, 12)
    ref = _out(model, batch)
    targets = arch.lora_targets(model)
    cfg = SpectralLoraConfig(r=4, lora_alpha=8, target_modules=targets)
    cfg.stats = collect_stats(model, [batch], linear_input_taps(model))
    pm = get_peft_model(model, cfg)
    ranks = cfg.spectral_allocation
    assert ranks and sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n) > 0
    torch.testing.assert_close(_out(pm, batch), ref)  # B = 0 at step 0, whatever the init


def test_unsupported_family_refused_from_config(tmp_path):
    """A folder with only a config of an unsupported family: refused before any weights, fast, with the list."""
    from transformers import OlmoConfig

    from hf_geocomp.data import load_model

    OlmoConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4).save_pretrained(tmp_path)  # no weights at all: loading them would fail differently
    start = time.perf_counter()
    with pytest.raises(GeoCompError, match="'olmo' is not supported.*gemma2.*phi3.*qwen3"):
        load_model(str(tmp_path))
    assert time.perf_counter() - start < 5
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "olmo" and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(GeoCompError, match="gemma3_text"):  # multimodal Gemma 3: load the text model
        arch.check_config(type("C", (), {"model_type": "gemma3"})())
