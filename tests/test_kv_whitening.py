"""The KV whitening control: variance removed from the K/V statistics, and the function-preserving
reparametrisation of keys and values under which the Fisher basis is invariant and PCA is not."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from hf_geocomp import GeoCompError, arch
from hf_geocomp.kv import KVConfig, build_plan, collect_kv_stats
from hf_geocomp.kv.whitening import kv_whitening_maps, remove_kv_variance, reparametrise_kv
from hf_geocomp.studies.kv_h3 import _digest
from tests.conftest import random_batch, model_output, tiny_llama
from tests.families import FAMILIES

DECODERS = sorted(n for n in FAMILIES if n != "bert")


def _batches(n=3):
    return [random_batch(4, 32, seed=s) for s in range(n)]


def _normed(model) -> bool:
    spec = arch.get_spec(model)
    return spec.k_out is not None or spec.q_out is not None


@torch.no_grad()
def _coding_error(model, window, plan, prefill=32):
    """RMS change of the scored logits when the context goes through ``plan``'s cache instead of the exact one."""
    from transformers import DynamicCache

    out = []
    for cache in (DynamicCache(config=model.config), plan.cache(model)):
        model(input_ids=window[:, :prefill], past_key_values=cache, use_cache=True)
        out.append(model(input_ids=window[:, prefill:], past_key_values=cache, use_cache=True).logits)
    return float((out[1] - out[0]).pow(2).mean().sqrt())


@pytest.mark.parametrize("family", DECODERS)
def test_reparametrisation_preserves_the_function_and_whitens_what_it_may(family):
    model = FAMILIES[family]()
    stats = collect_kv_stats(model, _batches(), "aware")
    if _normed(model):  # a norm after the key projection: no exact map exists, and it says so
        with pytest.raises(GeoCompError, match="normalises keys or queries"):
            kv_whitening_maps(model, stats)
        return
    new = reparametrise_kv(copy.deepcopy(model), kv_whitening_maps(model, stats))
    batch = random_batch(seed=7)
    ref, out = model_output(model, batch), model_output(new, batch)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    assert any(not torch.equal(p, model.get_parameter(n)) for n, p in new.named_parameters())
    after = collect_kv_stats(new, _batches(), "aware")
    d = arch.head_layout(model).head_dim
    for t in arch.kv_taps(new):
        m = after[f"{t.module}:{t.kind}"].second_moment()  # (kv_heads, d, d), the same batches
        if t.kind == "v":  # values fully whitened
            assert torch.allclose(m, torch.eye(d, dtype=m.dtype).expand_as(m), atol=1e-3)
        else:  # keys: every RoPE pair (and pass-through component) at unit mean second moment
            inv_freq, _ = arch.rope_frequencies(new, t.layer)
            half = 0 if inv_freq is None else inv_freq.shape[0]
            diag = torch.diagonal(m, dim1=-2, dim2=-1)
            pairs = torch.cat([(diag[:, :half] + diag[:, half: 2 * half]) / 2, diag[:, 2 * half:]], -1)
            assert torch.allclose(pairs, torch.ones_like(pairs), atol=1e-3)


def test_fisher_basis_is_invariant_and_pca_is_not():
    model = tiny_llama()
    with torch.no_grad():  # anisotropic keys and values, as trained models have (random ones are near-isotropic)
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight *= torch.logspace(-1, 1, proj.weight.shape[0])[torch.randperm(proj.weight.shape[0])][:, None]
    batches = _batches()
    stats = collect_kv_stats(model, batches, "fisher")
    new = reparametrise_kv(copy.deepcopy(model), kv_whitening_maps(model, stats))
    stats_new = collect_kv_stats(new, batches, "fisher")
    window = random_batch(2, 40, seed=9)["input_ids"]
    for budget in (0.25, 0.125):
        plans = {m: [build_plan(x, s, KVConfig(budget=budget, method=m, sink_tokens=0))
                     for x, s in ((model, stats), (new, stats_new))] for m in ("fisher", "pca")}
        err = {m: [_coding_error(x, window, p) for x, p in zip((model, new), plans[m])] for m in plans}
        assert _digest(plans["fisher"][0]) == _digest(plans["fisher"][1])  # the same widths for every layer and head
        # the same latents, coded the same way: equal up to the few values that float rounding moves across a
        # quantiser step (about 0.1% at 2 bits), an order of magnitude inside PCA's change (13% and more)
        assert err["fisher"][0] == pytest.approx(err["fisher"][1], rel=1e-2)
        assert err["pca"][0] != pytest.approx(err["pca"][1], rel=0.1)  # PCA sees the new coordinates


def test_removed_variance_keeps_the_fisher_and_flattens_pca():
    model = tiny_llama()
    stats = collect_kv_stats(model, _batches(), "fisher")
    white = remove_kv_variance(model, stats)
    d = arch.head_layout(model).head_dim
    for t in arch.kv_taps(model):
        key = f"{t.module}:{t.kind}"
        m = white[key].second_moment()
        assert torch.allclose(m, torch.eye(d, dtype=m.dtype).expand_as(m))
        assert not torch.allclose(stats[key].second_moment(), m)
        assert torch.equal(white[key + "_grad"].second_moment(), stats[key + "_grad"].second_moment())
    from hf_geocomp.kv.bases import fit_bases

    for basis in fit_bases(model, white, KVConfig(method="pca", rope="none")).values():  # no geometry left:
        assert torch.allclose(basis.weight, basis.weight[..., :1].expand_as(basis.weight))  # all components weigh the same
        eye = torch.eye(d).expand_as(basis.enc)  # in the stored coordinates (a signed permutation of them)
        assert torch.allclose(basis.enc @ basis.enc.transpose(1, 2), eye) and torch.all(basis.enc.abs().amax(-1) == 1)
    fisher = [build_plan(model, s, KVConfig(budget=0.25, method="fisher", sink_tokens=0)) for s in (stats, white)]
    assert _digest(fisher[0]) != _digest(fisher[1])  # the Fisher basis did read the variance


def test_cli_bench_kv_h3(tmp_path, tiny_llama_dir, text_file, capsys):
    from hf_geocomp.cli import main

    out = tmp_path / "kvh3.json"
    argv = ["bench-kv-h3", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "128", "--block-size", "32",
            "--eval-data", text_file, "--windows", "2", "--prefill", "24", "--score", "8", "--budgets", "0.25",
            "0.125", "--seeds", "3", "--sink-tokens", "0", "-o", str(out)]
    assert main(argv + ["--plot", str(tmp_path / "kvh3.png")]) == 0 and (tmp_path / "kvh3.png").exists()
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 3 * 3 * 2 * 2  # seeds × controls × variants × budgets
    assert res["compute"]["cpu_seconds"] > 0 and res["compute"]["wall_seconds"] > 0  # what a rerun costs
    for arm in (a for a in res["arms"] if a["control"] == "reparam"):
        assert arm["max_logit_change"] < 1e-4 and abs(arm["dense_ppl_ratio"] - 1) < 1e-4
    inv = {(i["criterion"], i["budget"]): i for i in res["invariance"]}
    for b in (0.25, 0.125):
        assert inv["fisher-bits", b]["same_units_seeds"] == 3  # the Fisher basis allocates the same widths
        assert inv["pca-bits", b]["max_abs_log_ppl_change"] > 10 * inv["fisher-bits", b]["max_abs_log_ppl_change"]
    assert [t["method"] for t in res["tests"]] == ["fisher-bits vs pca-bits"] * 6  # controls × budgets
    alone = {t["budget"]: t for t in res["sensitivity_alone"]}
    rows = {(r["criterion"], r["control"], r["budget"], r["seed"]): r["ppl"] for r in res["rows"]}
    for b in (0.25, 0.125):
        assert alone[b]["method"] == "fisher-bits/removed vs pca-bits/plain" and alone[b]["n"] == 3
        diff = [math.log(rows["pca-bits", "plain", b, s]) - math.log(rows["fisher-bits", "removed", b, s]) for s in range(3)]
        assert alone[b]["advantage_log_ppl"] == pytest.approx(sum(diff) / 3)
    assert {v["removed"] for v in res["verdicts"]} <= {"survives", "does not survive", "no plain advantage to test"}
    bad = tmp_path / "bad.json"
    for extra in (["--variants", "fisher-bits", "pca-bits-refined"], ["--baselines", "aware-bits"],
                  ["--controls", "plain", "whiten"], ["--budgets", "1.0"]):
        assert main(argv[:-2] + extra + ["-o", str(bad)]) == 2 and not bad.exists()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # never silently replaced
