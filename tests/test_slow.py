"""The real bundled SmolLM2-135M (GGUF, dequantised): paths that exist only at real size (576- and 1536-wide
inputs, the randomized eigensolver, bfloat16). Run with HF_GEOCOMP_SLOW=1 (``.ci/run`` does)."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hf_geocomp.data import calibration_loader, load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    calib = list(calibration_loader(model, tok, "shakespeare:calibration", tokens=1024, block_size=128, batch_size=4))
    held_out = next(iter(calibration_loader(model, tok, "shakespeare:evaluation", tokens=256, block_size=64,
                                            batch_size=4)))
    return model.eval(), calib, held_out


def test_pruned_smollm2_reloads_identically(smollm2, tmp_path):
    """Whole KV groups and MLP neurons removed with compensation, saved, reloaded by stock from_pretrained."""
    from transformers import AutoModelForCausalLM

    from hf_geocomp.geometry import collect_stats
    from hf_geocomp.prune import prune, prune_taps

    base, calib, batch = smollm2
    model = copy.deepcopy(base)
    stats = collect_stats(model, calib, prune_taps(model))
    _, plan = prune(model, stats, sparsity=0.3, head_mode="kv", compensation="bias+refit")
    heads = plan.widths("heads")
    assert heads == [2] * len(heads) and model.config.num_key_value_heads == 2  # one of 3 KV groups in every layer
    assert 0.25 < plan.achieved_sparsity <= 0.3 and model.config.geocomp_pruning["stock_loadable"]
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_kv_coding_at_a_quarter_in_bfloat16(smollm2):
    """Fisher bases and bit allocation at 0.25 on the bfloat16 model: the bytes held are the plan's, and attention
    on the latents gives the logits of attention on the decoded cache."""
    from hf_geocomp.eval.memory import tensor_bytes
    from hf_geocomp.kv import KVConfig, build_plan, collect_kv_stats, use_reduced_attention

    base, calib, batch = smollm2
    model = copy.deepcopy(base).to(torch.bfloat16)
    stats = collect_kv_stats(model, calib[:2], "fisher")
    plan = build_plan(model, stats, KVConfig(budget=0.25))
    assert 0.2 < plan.ratio <= 0.25

    def run(cache):
        with torch.no_grad():
            first = model(**{k: v[:, :48] for k, v in batch.items()}, past_key_values=cache).logits
            second = model(input_ids=batch["input_ids"][:, 48:], attention_mask=batch["attention_mask"],
                           past_key_values=cache).logits
        return torch.cat([first, second], 1).float()

    decoded_cache = plan.cache(model)
    decoded = run(decoded_cache)
    assert decoded_cache.nbytes() == plan.cache_bytes(64, batch=4) <= tensor_bytes(decoded_cache)  # used; held
    use_reduced_attention(model)
    reduced = run(plan.cache(model, reduced=True))
    err = (reduced[:, 48:] - decoded[:, 48:]).abs().max()
    # bfloat16 rounding of two exact rewrites of one attention over 30 layers: measured 0.09·std on SmolLM2, the
    # same with the PyTorch path (HF_GEOCOMP_KV_FUSED=0), so it is the rounding of the two paths, not the kernel
    assert err < 0.15 * decoded.std()
    with torch.no_grad():
        full = model(**batch).logits.float()
    assert (decoded[:, 48:] - full[:, 48:]).abs().max() > 5 * err  # the coding itself is what differs


def test_spectral_lora_allocation_with_the_randomized_solver(smollm2):
    """576- and 1536-wide inputs take the randomized eigensolver: whitened A against torch.linalg.eigh."""
    from peft import get_peft_model

    from hf_geocomp.geometry import collect_stats, linear_input_taps
    from hf_geocomp.lora import SpectralLoraConfig, uniform_params

    base, calib, _ = smollm2
    model = copy.deepcopy(base)
    cfg = SpectralLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], spectral_init="whitened")
    cfg.stats = collect_stats(model, calib, linear_input_taps(model, ["*.q_proj", "*.down_proj"]))
    pm = get_peft_model(model, cfg)
    mods = cfg.spectral_allocation["modules"]
    budget = uniform_params({m["name"]: (m["in_features"], m["out_features"]) for m in mods}, 8)
    assert 0.99 * budget <= cfg.spectral_allocation["params"] <= budget and len({m["rank"] for m in mods}) > 1
    for width in (576, 1536):
        m = max((m for m in mods if m["in_features"] == width), key=lambda m: m["rank"])
        a = pm.base_model.model.get_submodule(m["name"]).lora_A["default"].weight.detach().double()  # (rank, in)
        second = cfg.stats.input_of(m["name"]).second_moment()
        evals, vecs = torch.linalg.eigh(second)
        evals, vecs = evals.flip(0)[: a.shape[0]], vecs.flip(1)[:, : a.shape[0]]
        unit = a / a.norm(dim=1, keepdim=True)
        captured = torch.einsum("ri,ij,rj->", unit, second, unit)  # variance the rows span, at most Σ top λ
        assert captured == pytest.approx(float(evals.sum()), rel=1e-3), (m["name"], float(captured / evals.sum() - 1))
        rayleigh = torch.einsum("ri,ij,rj->r", unit, second, unit)
        torch.testing.assert_close(rayleigh, evals, rtol=1e-3, atol=0)
        cos = torch.nn.functional.cosine_similarity(a, vecs.T, dim=1).abs()
        assert cos.min() > 0.99, (m["name"], cos.min())  # a wrong order or vector is far off
        scaled = a.norm(dim=1) * evals.sqrt()  # whitened: ‖a_i‖ ∝ 1/√λ_i
        torch.testing.assert_close(scaled, scaled.mean().expand_as(scaled), rtol=2e-3, atol=0)
