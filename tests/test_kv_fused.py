"""The fused decode path of reduced attention (kv.fused): equal to attention on the decoded cache."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_geocomp import arch
from hf_geocomp.kv import KVConfig, build_plan, collect_kv_stats, fused, use_reduced_attention
from hf_geocomp.kv.allocate import FULL

from .conftest import random_batch, tiny_llama

WIDTHS = (FULL, 8, 4, 2, 1)


def _every_width(plan, seed=0):
    """Give every (layer, K/V) of ``plan`` groups of every width, of odd sizes mixing heads, some components dropped."""
    g = torch.Generator().manual_seed(seed)
    d = plan.num_kv_heads * plan.head_dim
    for key in plan.groups:
        cols = torch.randperm(d, generator=g)[: d - 3].tolist()
        cuts = sorted(torch.randperm(len(cols) - 1, generator=g)[: len(WIDTHS) - 1].add(1).tolist())
        parts = [cols[a:b] for a, b in zip([0, *cuts], [*cuts, len(cols)])]
        plan.groups[key] = [(w, c) for w, c in zip(WIDTHS, parts)]
    plan._codecs = None
    return plan


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    stats = collect_kv_stats(model, [random_batch(4, 32, seed=s) for s in range(2)], "fisher")
    plan = build_plan(model, stats, KVConfig(budget=0.25, group_size=4, sink_tokens=3, reference_tokens=16))
    return model, _every_width(plan)


@pytest.fixture(params=["kernel", "portable", "torch"])
def path(request, monkeypatch):
    """The fused kernel (its fastest unpack here), the kernel with its portable unpack, the PyTorch path."""
    if request.param != "torch" and fused.kernel() is None:
        pytest.skip("the fused kernel could not be built here")
    if request.param == "portable":
        monkeypatch.setattr(fused, "_PORTABLE", [True])
    if request.param == "torch":
        monkeypatch.setattr(fused, "_use_kernel", lambda *t: False)
    return request.param


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_and_values_equal_decoded(llama, path, dtype):
    """Per codec, every width present: q·k̂ and Σ p·v̂ from the codes equal products with the decoded cache."""
    model, plan = llama
    heads = arch.head_layout(model)
    g = torch.Generator().manual_seed(1)
    cache = plan.cache(model)
    x = torch.randn(3, heads.num_kv_heads, 37, heads.head_dim, generator=g).to(dtype)
    cache.update(x[:, :, :30], x[:, :, :30] * 0.5, 0)
    cache.update(x[:, :, 30:], x[:, :, 30:] * 0.5, 0)  # a second append: views of buffers with room
    seg = cache.layers[0].segments[-1]
    length = seg.length
    for codec, part in zip(seg.codecs, seg.parts):
        assert {b for b, _ in codec.groups} == set(WIDTHS)
        decoded = codec.decode(part, x[:, :, :length].float(), length)  # (3, kv_heads, L, d), lifted in float32
        q = torch.randn(3, heads.num_kv_heads, 5, heads.head_dim, generator=g)
        p = torch.rand(3, heads.num_kv_heads, 5, length + 2, generator=g)[..., 1:-1]  # strided, as sliced probs
        assert torch.allclose(fused.coded_scores(q, codec, part, length), q @ decoded.transpose(-1, -2), atol=1e-5)
        assert torch.allclose(fused.coded_values(p, codec, part, length), p @ decoded, atol=1e-5)


@pytest.mark.parametrize("heads, d, widths, group_size", [
    (3, 64, {8: 20, 4: 104, 2: 38, 1: 18}, 64),  # SmolLM2's shape at budget 0.25
    (2, 8, {0: 3, 8: 2, 4: 5, 2: 3, 1: 1}, 4),  # full precision beside every width, odd group sizes
    (4, 32, {4: 9, 2: 112, 1: 7}, 4),  # 33 scales per token: beyond the vector unpack's 31
    (1, 256, {8: 100, 4: 100, 1: 56}, 32),  # 157 code bytes per token: beyond the vector unpack's 128
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_unpacks_agree(heads, d, widths, group_size, dtype):
    """Both unpacks of the kernel give the same floats bit for bit, and equal products with the decoded cache,
    for query rows per head from 1 to 7 (prefill chunks) and lengths that are not whole blocks of tokens."""
    from hf_geocomp.studies.kv_speed import synthetic_codec

    if fused.kernel() is None:
        pytest.skip("the fused kernel could not be built here")
    codec = synthetic_codec(heads, d, widths, group_size)
    g = torch.Generator().manual_seed(2)
    for batch, length, m in [(1, 37, 3), (3, 21, 1), (2, 17, 7), (2, 1, 4)]:
        x = (torch.randn(batch, heads, length + 3, d, generator=g) / d ** 0.5).to(dtype)
        parts = [t[:, :length] for t in codec.encode(x)]  # views of longer buffers, as in the cache
        decoded = codec.decode(parts, x[:, :, :length].float(), length).float()
        q = torch.randn(batch, heads, m, d, generator=g)
        p = torch.rand(batch, heads, m, length + 2, generator=g)[..., 1:-1]
        out = {}
        for portable in (False, True):
            with fused.portable_unpack(portable):
                out[portable] = fused.coded_scores(q, codec, parts, length), fused.coded_values(p, codec, parts, length)
        assert torch.equal(out[False][0], out[True][0]) and torch.equal(out[False][1], out[True][1])
        assert torch.allclose(out[False][0], q @ decoded.transpose(-1, -2), atol=1e-5)
        assert torch.allclose(out[False][1], p @ decoded, atol=1e-5)


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def _check_against_decoded(codec, parts, length, g, rows=5):
    """The fused products of ``parts`` (a batch of ``length`` coded tokens) equal products with the decoded cache."""
    batch, heads, d = parts[0].shape[0], codec.dec.shape[0], codec.dec.shape[1]
    decoded = codec.decode(parts, torch.empty(batch, heads, length, d), length)  # (batch, heads, L, d) float32
    q = torch.randn(batch, heads, rows, d, generator=g)
    p = torch.rand(batch, heads, rows, length + 2, generator=g)[..., 1:-1].softmax(-1)
    scores, sums = fused.coded_scores(q, codec, parts, length), fused.coded_values(p, codec, parts, length)
    assert torch.allclose(scores, q @ decoded.transpose(-1, -2), atol=2e-5, rtol=1e-5)
    assert torch.allclose(sums, p @ decoded, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [600, 1030])
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_caches_split_into_tasks(llama, path, dtype, length, four_threads):
    """Caches long enough that each sequence is split into several tasks of at least 128 tokens (the value sums
    of a sequence added across tasks), at 4 threads, in every dtype: equal to products with the decoded cache,
    for the tiny plan (every width, exact components) and SmolLM2's shape at budget 0.25."""
    from hf_geocomp.studies.kv_speed import synthetic_codec

    model, plan = llama
    heads = arch.head_layout(model)
    g = torch.Generator().manual_seed(3)
    cache = plan.cache(model)
    x = torch.randn(2, heads.num_kv_heads, length, heads.head_dim, generator=g).to(dtype)
    cache.update(x, x * 0.5, 0)
    seg = cache.layers[0].segments[-1]
    assert seg.length == length - plan.config.sink_tokens
    for codec, parts in zip(seg.codecs, seg.parts):
        _check_against_decoded(codec, parts, seg.length, g)
    smol = synthetic_codec(3, 64, {0: 4, 8: 20, 4: 100, 2: 38, 1: 18}, 64)
    x = (torch.randn(2, 3, length, 64, generator=g) / 8).to(dtype)
    _check_against_decoded(smol, smol.encode(x), length, g, rows=3)


def test_segment_grows_past_2048_tokens(llama, path, four_threads):
    """Token by token past 2,048 tokens: the coded segment grows by a sixteenth of what it holds (not the
    64-token minimum), keeps every token's codes, and reduced attention reads the grown buffers correctly."""
    model, plan = llama
    heads = arch.head_layout(model)
    g = torch.Generator().manual_seed(4)
    keys, values = (torch.randn(1, heads.num_kv_heads, 2130, heads.head_dim, generator=g) for _ in range(2))
    stepped, whole = plan.cache(model), plan.cache(model)
    whole.update(keys, values, 0)
    stepped.update(keys[:, :, :1990], values[:, :, :1990], 0)
    seg = stepped.layers[0].segments[-1]
    sizes = [seg.allocated]
    for t in range(1990, 2130):
        stepped.update(keys[:, :, t:t + 1], values[:, :, t:t + 1], 0)
        if seg.allocated != sizes[-1]:
            sizes.append(seg.allocated)
    coded = 1990 - plan.config.sink_tokens
    first = coded + coded // seg.GROW_DIVISOR
    assert sizes == [coded, first, first + first // seg.GROW_DIVISOR] and sizes[0] < 2048 < sizes[1]
    ref = whole.layers[0].segments[-1]
    assert all(torch.equal(a, b) for a, b in zip(sum(seg.parts, []), sum(ref.parts, [])))
    assert stepped.nbytes() == whole.nbytes() < stepped.nbytes(used=False)
    for codec, parts in zip(seg.codecs, seg.parts):
        _check_against_decoded(codec, parts, seg.length, g)


def _logits(model, cache, batch, chunks=((0, 12), (12, 16), (16, 17), (17, 18))):
    with torch.no_grad():
        return torch.cat([model(input_ids=batch["input_ids"][:, a:b], attention_mask=batch["attention_mask"][:, :b],
                                past_key_values=cache).logits for a, b in chunks], 1)


def _reduced(model):
    class Ctx:
        def __enter__(self):
            self.plain = model.config._attn_implementation
            use_reduced_attention(model)

        def __exit__(self, *exc):
            model.set_attn_implementation(self.plain)
    return Ctx()


def test_model_equal_decoded_batch_padding_beams_crop(llama, path):
    """Logits through reduced attention on the codes equal attention on the decoded cache (left padding,
    a prefill chunk and decode steps), and so do beam search and a cropped cache continued."""
    model, plan = llama
    batch = random_batch(3, 20, seed=3)
    batch["attention_mask"][1, :4] = 0
    real = batch["attention_mask"].bool()[:, :18]
    ref = _logits(model, plan.cache(model), batch)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=3)
    ref_beams = model.generate(**{k: v[:, :10] for k, v in batch.items()}, past_key_values=plan.cache(model), **kw)
    decoded = plan.cache(model)
    _logits(model, decoded, batch, ((0, 16),))
    decoded.crop(-4)
    ref_crop = _logits(model, decoded, batch, ((12, 14),))
    with _reduced(model):
        assert torch.allclose(_logits(model, plan.cache(model, reduced=True), batch)[real], ref[real], atol=1e-5)
        beams = model.generate(**{k: v[:, :10] for k, v in batch.items()},
                               past_key_values=plan.cache(model, reduced=True), **kw)
        cache = plan.cache(model, reduced=True)
        _logits(model, cache, batch, ((0, 16),))
        cache.crop(-4)
        crop = _logits(model, cache, batch, ((12, 14),))
    assert torch.equal(beams, ref_beams)
    assert torch.allclose(crop, ref_crop, atol=1e-5)


def test_sliding_window_model(path):
    """A full and a sliding-window layer: the full one reads its codes, the sliding one decodes; equal logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model = Qwen2ForCausalLM(cfg).eval()
    stats = collect_kv_stats(model, [random_batch(2, 16)], "fisher")
    plan = _every_width(build_plan(model, stats, KVConfig(budget=0.25, group_size=4, sink_tokens=2,
                                                         reference_tokens=16)), seed=2)
    batch = random_batch(2, 18, seed=4)
    ref = _logits(model, plan.cache(model), batch)
    with _reduced(model):
        cache = plan.cache(model, reduced=True)
        out = _logits(model, cache, batch)
    assert cache.layers[0].reduced and not cache.layers[1].reduced
    assert torch.allclose(out, ref, atol=1e-5)


def test_missing_compiler_falls_back_loudly(llama, monkeypatch):
    """A kernel that cannot be built: one warning naming why, then the PyTorch path, same results as the fused path.

    Compared with the fused path on the same codes, not with the decoded cache: through two coded layers a
    1e-7 rounding difference of layer 0 can move a key of layer 1 across a quantisation level (with this
    batch one 8-bit code of layer 1 differs between reduced and decoded attention, on either path; the
    batches of the tests against the decoded cache cross no level)."""
    import torch.utils.cpp_extension as ext

    model, plan = llama
    batch = random_batch(2, 18, seed=5)
    with _reduced(model):
        ref = _logits(model, plan.cache(model, reduced=True), batch)  # the fused path where it builds

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(ext, "load", no_compiler)
    monkeypatch.setattr(fused, "_KERNEL", [])
    with _reduced(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _logits(model, plan.cache(model, reduced=True), batch)
        _logits(model, plan.cache(model, reduced=True), batch)
    messages = [str(w.message) for w in caught if "fused decode kernel" in str(w.message)]
    assert len(messages) == 1 and "g++: command not found" in messages[0]
    assert torch.allclose(out, ref, atol=1e-5)


def test_speed_study_writes_interleaved_ratios(tiny_llama_dir, tmp_path):
    """The speed study on a tiny model: rows per cache with median/min/max ratios, bytes and the bytes bound."""
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "speed.json"
    main(["bench-kv-speed", "--model", tiny_llama_dir, "--dtypes", "float32", "bfloat16", "--data", "pydoc:calibration",
          "--eval-data", "pydoc:evaluation", "--tokens", "256", "--block-size", "32", "--quant", "--group-size", "8",
          "--budgets", "0.25", "--configs", "1x40:2", "2x24", "--steps", "2", "--repeats", "2",
          "--prefill-context", "16", "--prefill-repeats", "1", "--profile-steps", "1", "--allow-torch-path",
          "-o", str(out)])
    result = json.loads(out.read_text())
    every = {(r["method"], r["dtype"], r["batch"], r["context"]): r for r in result["rows"]}
    assert set(every) == {(m, d, b, c) for m in ("baseline", "dynamic", "geocomp-fisher-bits")
                          for d in ("float32", "bfloat16") for b, c in ((1, 40), (2, 24))}
    for b, c in ((1, 40), (2, 24)):  # each ratio also against the fastest uncompressed dtype
        base = [every["baseline", d, b, c] for d in ("float32", "bfloat16")]
        assert max(r["tokens_per_s_vs_fastest"] for r in base) == 1.0
        assert every["baseline", "bfloat16", b, c]["bits_per_element"] == 16
    assert [r["dtype"] for r in result["prefill"]] == ["float32", "bfloat16"]
    assert min(r["latency_vs_fastest"] for r in result["prefill"]) > 0
    rows = {(m, b, c): r for (m, d, b, c), r in every.items() if d == "float32"}
    assert 0 < rows["geocomp-fisher-bits", 1, 40]["bits_per_element"] < 16  # budget 0.25 of float32's 32 bits
    geo = rows["geocomp-fisher-bits", 1, 40]
    assert len(geo["ratios"]) == 2 and geo["ratio_min"] <= geo["tokens_per_s_ratio"] <= geo["ratio_max"]
    assert geo["kv_bytes"] <= geo["kv_bytes_allocated"] and geo["kv_bytes_ratio"] < 0.5 and geo["bound_ratio"] > 1
    assert result["prefill"][0]["latency_ratio"] > 0 and result["machine"]["load_before"]
    assert any(k.startswith("float32 geocomp") for k in result["profiles"]) and result["command"].startswith("hf-geocomp")
    assert main(["bench-kv-speed", "--model", tiny_llama_dir, "--configs", "4096", "-o", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
