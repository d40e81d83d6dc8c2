"""The whitening control: variance-removed statistics and the function-preserving reparametrisation."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_geocomp import arch
from hf_geocomp.errors import GeoCompError
from hf_geocomp.geometry import collect_stats
from hf_geocomp.prune import get_scorer, prune_taps, taylor_grads, unit_groups
from hf_geocomp.prune.whitening import check_reparametrisable, reparametrise, whiten_stats, whitening_maps
from tests.conftest import TINY_MODELS, random_batch, model_output as _out
from tests.families import FAMILIES


def _batches(n=3, seed=1):
    return [random_batch(batch=3, seq=12, seed=seed + i) for i in range(n)]


def _targets(model):
    spec = arch.get_spec(model)
    gated = spec.mlp_chunks == 2 or len(spec.mlp_in) == 2
    return ("mlp",) * gated + ("heads",) * (spec.head_pruning is None)




def _whitened(model, targets):
    """(reparametrised copy, its groups, the stats of the original) with maps from the original's statistics."""
    groups = unit_groups(model, targets)
    stats = collect_stats(model, _batches(), prune_taps(model, targets))
    new = copy.deepcopy(model)
    reparametrise(new, unit_groups(new, targets), whitening_maps(model, groups, stats))
    return new, groups, stats


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reparametrisation_preserves_the_function(family):
    model = FAMILIES[family]()
    targets = _targets(model)
    new, _, _ = _whitened(model, targets)
    batch = random_batch(seed=7)
    ref, out = _out(model, batch), _out(new, batch)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    changed = [n for n, p in new.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert changed, "the reparametrisation must change weights"
    stats = collect_stats(new, _batches(), prune_taps(new, targets))
    for g in unit_groups(new, targets):  # the activations the criteria read are now whitened
        var = stats.input_of(g.consumer).covariance().diagonal()[g.cols.reshape(-1)]
        if g.kind == "mlp":
            assert torch.allclose(var, torch.ones_like(var), atol=1e-3)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_output_variance_is_invariant_and_magnitude_is_not(name):
    model = TINY_MODELS[name]()
    targets = _targets(model)
    new, groups, stats = _whitened(model, targets)
    new_stats = collect_stats(new, _batches(), prune_taps(new, targets))
    new_groups = unit_groups(new, targets)
    var, mag = get_scorer("variance"), get_scorer("magnitude")
    for g, h in zip(groups, new_groups):
        before, after = var.score(model, g, stats, None), var.score(new, h, new_stats, None)
        assert torch.allclose(after, before, rtol=1e-3, atol=1e-9), (g.key, before, after)
        m0, m1 = mag.score(model, g, None, None), mag.score(new, h, None, None)
        assert (m1 - m0).abs().max() > 1e-2 * m0.abs().max(), g.key
    if "mlp" in targets:  # per-neuron Wanda-sp and Taylor sums are invariant to a diagonal scaling too
        grads0 = taylor_grads(model, _batches(1), ("mlp",))
        grads1 = taylor_grads(new, _batches(1), ("mlp",))
        for g, h in zip(groups, new_groups):
            if g.kind == "mlp":
                w0, w1 = get_scorer("wanda").score(model, g, stats, None), get_scorer("wanda").score(new, h, new_stats, None)
                assert torch.allclose(w1, w0, rtol=1e-4)
                t0, t1 = get_scorer("taylor").score(model, g, None, grads0), get_scorer("taylor").score(new, h, None, grads1)
                assert torch.allclose(t1, t0, rtol=1e-3, atol=1e-6)


def test_gelu_mlps_have_no_reparametrisation():
    for name in ("gpt2", "bert"):
        model = TINY_MODELS[name]()
        with pytest.raises(GeoCompError, match="gated MLP"):
            check_reparametrisable(model, ("mlp",))
        check_reparametrisable(model, ("heads",))
    check_reparametrisable(TINY_MODELS["llama"](), ("mlp", "heads"))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_variance_removed_statistics(name):
    model = TINY_MODELS[name]()
    stats = collect_stats(model, _batches(), prune_taps(model))
    white = whiten_stats(stats)
    white.check_model(model)  # same model, same weights: compensation may still read the real ones
    for g in unit_groups(model):
        m = white.input_of(g.consumer)
        assert torch.allclose(m.covariance(), torch.eye(m.dim, dtype=torch.float64))
        assert m.n == stats.input_of(g.consumer).n
        W = arch.linear_weight(model.get_submodule(g.consumer)).detach().double()[:, g.cols]  # (out, units, c)
        assert torch.allclose(get_scorer("variance").score(model, g, white, None), W.pow(2).sum((0, 2)))
        assert torch.allclose(get_scorer("wanda").score(model, g, white, None), W.abs().sum((0, 2)))
        cond = get_scorer("variance_cond").score(model, g, white, None)
        assert torch.equal(cond.argsort(), W.pow(2).sum((0, 2)).argsort())
        assert not torch.allclose(get_scorer("variance").score(model, g, stats, None), W.pow(2).sum((0, 2)))
    assert not torch.equal(stats.input_of(g.consumer).covariance(), white.input_of(g.consumer).covariance())


def test_cli_bench_h3(tmp_path, tiny_llama_dir, text_file):
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "h3.json"
    argv = ["bench-h3", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "128", "--block-size", "32",
            "--eval-data", text_file, "--eval-tokens", "128", "--sparsities", "0.2", "0.4", "--seeds", "3",
            "--criteria", "variance", "wanda", "magnitude", "random", "-o", str(out)]
    assert main(argv + ["--plot", str(tmp_path / "h3.png")]) == 0 and (tmp_path / "h3.png").exists()
    res = json.loads(out.read_text())
    assert {"command", "model", "data", "baseline", "rows"} <= set(res)
    assert len(res["rows"]) == 3 * 3 * 4 * 2  # seeds × controls × criteria × budgets
    rows = {(r["criterion"], r["control"], r["budget"], r["seed"]): r for r in res["rows"]}
    assert rows["magnitude", "removed", 0.2, 1]["same_as_plain"]
    assert rows["magnitude", "removed", 0.2, 1]["ppl"] == rows["magnitude", "plain", 0.2, 1]["ppl"]
    assert rows["variance", "removed", 0.4, 0]["ppl"] != rows["variance", "plain", 0.4, 0]["ppl"]
    for arm in (a for a in res["arms"] if a["control"] == "reparam"):
        assert arm["max_logit_change"] < 1e-4 and abs(arm["dense_ppl_ratio"] - 1) < 1e-5
    inv = {(i["criterion"], i["budget"]): i for i in res["invariance"]}
    for b in (0.2, 0.4):
        assert inv["variance", b]["same_units_seeds"] == 3  # an invariant criterion removes the same units
        assert inv["wanda", b]["same_units_seeds"] == 3  # (per-neuron Wanda-sp too)
        assert inv["magnitude", b]["same_units_seeds"] == 0  # magnitude sees the new basis
    tests = res["tests"]
    assert len(tests) == 3 * 2 * (3 + 3)  # controls × budgets × (3 criteria vs magnitude + 3 vs wanda)
    assert all(t["p_holm"] is None or t["p_holm"] >= t["p_value"] for t in tests)
    assert {"survives", "does not survive", "no plain advantage to test"} >= {v["removed"] for v in res["verdicts"]}
    assert main(argv[:-2] + ["--controls", "plain", "whiten", "-o", str(tmp_path / "x.json")]) == 2
    assert main(argv[:-2] + ["--baselines", "taylor", "-o", str(tmp_path / "y.json")]) == 2
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_bench_h3_gqa_heads(tmp_path, tiny_llama_dir, text_file):
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "heads.json"
    argv = ["bench-h3", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "128", "--block-size", "32",
            "--eval-data", text_file, "--eval-tokens", "64", "--sparsities", "0.3", "--seeds", "2", "--targets",
            "mlp,heads", "--controls", "plain", "reparam", "--criteria", "variance", "magnitude", "--baselines",
            "magnitude", "-o", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    inv = {i["criterion"]: i["same_units_seeds"] for i in res["invariance"]}
    assert inv == {"variance": 2, "magnitude": 0}
    assert [t["method"] for t in res["tests"]] == ["variance vs magnitude"] * 2


def test_bench_h3_resume_continues_the_seeds_of_the_same_settings(tmp_path, tiny_llama_dir, text_file, capsys):
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "h3.json"
    argv = ["bench-h3", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "128", "--block-size", "32",
            "--eval-data", text_file, "--eval-tokens", "64", "--sparsities", "0.3", "--controls", "plain",
            "--criteria", "variance", "magnitude", "--baselines", "magnitude", "-o", str(out)]
    assert main(argv + ["--seeds", "1"]) == 0
    first = json.loads(out.read_text())
    assert first["seeds_done"] == [0] and first["complete"]
    assert main(argv + ["--seeds", "2"]) == 2 and "already exists" in capsys.readouterr().err  # never silently replaced
    assert main(argv + ["--seeds", "2", "--resume"]) == 0
    res = json.loads(out.read_text())
    assert res["seeds_done"] == [0, 1] and res["complete"] and len(res["parts"]) == 2
    assert [p["seeds"] for p in res["parts"]] == [[0], [1]]
    assert [r for r in res["rows"] if r["seed"] == 0] == first["rows"]  # the finished seed is kept as it was
    assert res["tests"][0]["n"] == 2
    fresh = tmp_path / "fresh.json"
    assert main(argv[:-1] + [str(fresh), "--seeds", "2"]) == 0
    assert [r["ppl"] for r in json.loads(fresh.read_text())["rows"]] == [r["ppl"] for r in res["rows"]]
    capsys.readouterr()
    assert main(argv + ["--seeds", "2", "--resume"]) == 2 and "all 2 seeds are finished" in capsys.readouterr().err
    other = [a if a != "0.3" else "0.2" for a in argv]
    assert main(other + ["--seeds", "3", "--resume"]) == 2
    assert "its 'sparsities' is [0.3]" in capsys.readouterr().err
    assert json.loads(out.read_text()) == res  # a refused resume leaves the file alone


def test_bench_h3_refuses_gelu_mlps_before_calibrating(tmp_path, text_file):
    from hf_geocomp.cli import main
    from tests.conftest import _tiny_tokenizer

    path = tmp_path / "gpt2"
    TINY_MODELS["gpt2"]().save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    argv = ["bench-h3", "--model", str(path), "--data", text_file, "--tokens", "64", "--block-size", "32",
            "--eval-data", text_file, "--eval-tokens", "64", "--seeds", "2", "-o", str(tmp_path / "g.json")]
    assert main(argv) == 2 and not (tmp_path / "g.json").exists()
    assert main(argv[:-2] + ["--targets", "heads", "--controls", "plain", "reparam", "-o", str(tmp_path / "h.json")]) == 0


def test_h3_recipes_parse_and_name_their_results_after_the_model():
    import pathlib

    from hf_geocomp.cli import parse_options
    from hf_geocomp.studies.h3 import default_output

    root = pathlib.Path(__file__).parents[1] / "recipes"
    small = parse_options(["run", str(root / "h3_smollm2_small.yaml")])
    assert small.command == "bench-h3" and small.seeds == 5 and small.controls == ["plain", "removed", "reparam"]
    big = parse_options(["run", str(root / "h3_verdict.yaml"), "--set", "model=HuggingFaceTB/SmolLM2-1.7B"])
    assert big.output is None and big.model == "HuggingFaceTB/SmolLM2-1.7B"
    assert default_output(big.model) == "recipes/results/prune_h3_smollm2-1.7b.json"
    assert default_output("smollm2-135m") == "recipes/results/prune_h3_smollm2-135m.json"
    minilm = parse_options(["run", str(root / "h3_minilm.yaml")])
    assert minilm.command == "bench-prune-h1" and minilm.targets == "heads" and len(minilm.controls) == 3


def test_bench_prune_h1_controls(tmp_path, monkeypatch):
    """The MiniLM classifier study with its controls, on a tiny BERT classifier (heads: BERT's MLP has no reparam)."""
    import json

    from hf_geocomp.studies import prune_h1

    short = {"train": ["julius_caesar", "henry_v", "twelfth_night"], "calibration": ["macbeth"],
             "evaluation": ["john", "tempest"]}  # one short play per genre (tokenising every play is slow)
    monkeypatch.setattr(prune_h1, "SHAKESPEARE_SPLITS", short)

    from transformers import BertConfig, BertForSequenceClassification

    from hf_geocomp.cli import main
    from tests.conftest import _tiny_tokenizer

    tok = _tiny_tokenizer()
    tok.add_special_tokens({"cls_token": "<cls>", "sep_token": "<sep>"})
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                                     num_hidden_layers=2, num_attention_heads=4, num_labels=3,
                                                     max_position_embeddings=64))
    path = tmp_path / "bert"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    out = tmp_path / "h1.json"
    argv = ["bench-prune-h1", "--model", str(path), "--targets", "heads", "--sparsities", "0.1", "--criteria",
            "variance", "magnitude", "wanda", "--seeds", "2", "--block-size", "32", "--train-per-genre", "8",
            "--test-per-genre", "8", "--calibration-passages", "16", "--epochs", "1", "--batch-size", "8",
            "--controls", "plain", "removed", "reparam", "-o", str(out)]
    assert main(argv + ["--plot", str(tmp_path / "h1.png")]) == 0 and (tmp_path / "h1.png").stat().st_size > 0
    res = json.loads(out.read_text())
    rows = {(r["criterion"], r["control"], r["seed"]): r for r in res["rows"]}
    assert len(rows) == 3 * 3 * 2
    assert rows["variance", "plain", 0]["method"] == "variance" and rows["variance", "reparam", 1]["method"] == \
        "variance/reparam"
    for s in (0, 1):  # the invariant criterion classifies exactly as before on the reparametrised model
        assert rows["variance", "reparam", s]["accuracy"] == rows["variance", "plain", s]["accuracy"]
    assert {t["control"] for t in res["tests"]} == {"plain", "removed", "reparam"}
    assert all(t["p_holm"] is None or t["p_holm"] >= t["p_value"] for t in res["tests"])
    bad = argv[:-2] + ["--targets", "mlp", "-o", str(tmp_path / "bad.json")]
    assert main(bad) == 2 and not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norm_reparametrisation_preserves_the_function_and_whitens_the_channels(family):
    from hf_geocomp.geometry import Tap
    from hf_geocomp.prune.whitening import norm_consumers, norm_maps, scale_norm_outputs

    model = FAMILIES[family]()
    spec = arch.get_spec(model)
    if spec.family in ("gpt2", "bert", "olmo2") or spec.family.startswith("gemma"):  # post-norms, biased or (1 + w)
        with pytest.raises(GeoCompError, match="multiplies by its weight"):
            norm_consumers(model, 0)
        return
    readers = [r for layer in range(len(arch.block_prefixes(model))) for rs in norm_consumers(model, layer).values()
               for r in rs]
    taps = [Tap(r, "input") for r in readers]
    stats = collect_stats(model, _batches(), taps)
    new = scale_norm_outputs(copy.deepcopy(model), norm_maps(model, stats))
    batch = random_batch(seed=7)
    assert torch.allclose(_out(new, batch), _out(model, batch), atol=1e-4, rtol=0)
    after = collect_stats(new, _batches(), taps)
    for r in readers:
        var = after.input_of(r).covariance().diagonal()
        assert torch.allclose(var, torch.ones_like(var), atol=1e-3)


def test_cli_bench_lora_h3(tmp_path, tiny_llama_dir, text_file):
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "lora_h3.json"
    argv = ["bench-lora-h3", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "128", "--block-size", "32",
            "--seeds", "2", "--r", "2", "-o", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    rows = {(r["control"], r["seed"]): r for r in res["rows"]}
    assert len(rows) == 3 * 2
    for seed in (0, 1):
        assert rows["plain", seed]["budget_moved_from_plain"] == 0
        assert rows["reparam", seed]["max_logit_change"] < 1e-4
        plain, moved = rows["plain", seed]["df"], rows["reparam", seed]["df"]
        assert max(abs(moved[k] / plain[k] - 1) for k in plain) > 0.01  # Df reads the coordinates
        for name, df in rows["removed", seed]["df"].items():  # with C = I, Df is the input width
            assert df == pytest.approx(32 if "down_proj" not in name else 48)
        for control in ("plain", "removed", "reparam"):  # every allocation spends the same budget
            assert abs(rows[control, seed]["params"] - rows[control, seed]["budget"]) <= 0.01 * rows[control, seed]["budget"]
    assert [s["control"] for s in res["summary"]] == ["plain", "removed", "reparam"]
    assert main(argv[:-2] + ["--controls", "removed", "-o", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
