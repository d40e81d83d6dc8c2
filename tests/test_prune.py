"""Structured pruning on tiny Llama (GQA), GPT-2 and BERT: scorers, allocation, surgery, save/reload, errors."""

import pytest
import torch

from hf_geocomp import GeoCompError
from hf_geocomp.geometry import Moments, collect_stats
from hf_geocomp.prune import (PruneConfig, PrunePlan, allocate, apply_masks, apply_plan, block_params, get_scorer,
                              prune, prune_taps, score_groups, taylor_grads, unit_groups)

from .conftest import TINY_MODELS, random_batch, model_output as _out

# (name, model, pruning kwargs): the matrix every generic check runs over
CASES = [
    ("llama-query", "llama", {"head_mode": "query"}),
    ("llama-kv", "llama", {"head_mode": "kv", "allocation": "global"}),  # uniform keeps both groups at 0.3
    ("llama-global", "llama", {"allocation": "global"}),
    ("gpt2", "gpt2", {}),
    ("gpt2-global", "gpt2", {"allocation": "global", "compensation": "bias"}),
    ("bert", "bert", {"compensation": "refit"}),
    ("bert-global", "bert", {"allocation": "global"}),
]
CRITERIA = ["variance", "variance_cond", "magnitude", "wanda", "random"]


def _setup(name):
    model = TINY_MODELS[name]()
    batch = random_batch(batch=4, seq=16, pad_last=3)
    stats = collect_stats(model, [batch], prune_taps(model), compute_dtype=torch.float64)
    return model, batch, stats




# ---- scorers: a constructed case with a known answer ----------------------------------------------

def _designed_inputs(n_units, width, n=400):
    """Consumer inputs (n, units*width): unit 0 constant (mean 5, no variance), unit 2 silent, others noise."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, n_units, width, generator=g, dtype=torch.float64)
    x[:, 0] = 5.0
    x[:, 3] *= 3.0  # unit 3: most variance
    return x.reshape(n, -1)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("kind", ["mlp", "heads"])
def test_scorers_known_answer(name, kind):
    from hf_geocomp import arch

    model, _, stats = _setup(name)
    group = next(g for g in unit_groups(model) if g.kind == kind and g.layer == 0)
    cons = model.get_submodule(group.consumer)
    x = _designed_inputs(group.num_units, group.cols.shape[1])
    stats[f"{group.consumer}:in"].__init__(x.sum(0), x.T @ x, torch.tensor(float(len(x)), dtype=torch.float64))
    with torch.no_grad():
        W = arch.linear_weight(cons)
        W.copy_(torch.randn(W.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        W[:, group.cols[1]] *= 50  # unit 1: by far the largest weights
        W[:, group.cols[2]] = 0  # unit 2: reads nothing ...
        for prod, rows in group.producers.items():
            arch.linear_weight(model.get_submodule(prod))[rows[2]] = 0  # ... and writes nothing
            if model.get_submodule(prod).bias is not None:
                model.get_submodule(prod).bias[rows[2]] = 0
    s = {c: get_scorer(c).score(model, group, stats, None) for c in CRITERIA}
    # variance = tr(W_u Σ_uu W_uᵀ), checked against the variance of the unit's actual output contribution
    Wd = W.detach().double()
    brute = torch.stack([(x[:, c] @ Wd[:, c].T).var(0, unbiased=False).sum() for c in group.cols])
    torch.testing.assert_close(s["variance"], brute, rtol=1e-8, atol=1e-10)
    assert s["variance"][0] < 1e-9 * s["variance"].max()  # constant input: no variance contributed
    assert s["wanda"][0] > torch.median(s["wanda"])  # ... but a large RMS, so Wanda keeps it
    assert int(s["magnitude"].argmax()) == 1 and int(s["magnitude"].argmin()) == 2
    assert int(s["wanda"].argmin()) == 2
    assert int(s["variance"].argmax()) in (1, 3)
    torch.testing.assert_close(get_scorer("random", 3).score(model, group, stats, None),
                               get_scorer("random", 3).score(model, group, stats, None))
    assert not torch.equal(s["random"], get_scorer("random", 4).score(model, group, stats, None))


def test_taylor_scorer_and_grads():
    model, batch, _ = _setup("llama")
    group = unit_groups(model, ("mlp",))[0]
    names = [group.consumer, *group.producers]
    grads = {n: torch.zeros_like(model.get_submodule(n).weight, dtype=torch.float64) for n in names}
    grads[group.consumer][:, 5] = 1.0  # Σ w·g large for unit 5 only
    grads[group.consumer][:, 7] = 0.5
    s = get_scorer("taylor").score(model, group, None, grads)
    assert int(s.argmax()) == 5 and sorted(s.argsort()[-2:].tolist()) == [5, 7]
    real = taylor_grads(model, [batch], ("mlp",))
    assert set(real) >= set(names) and float(real[group.consumer].abs().sum()) > 0
    with pytest.raises(GeoCompError, match="gradients"):
        get_scorer("taylor").score(model, group, None, None)


# ---- surgery ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_zero_sparsity_is_identity(case):
    _, name, kw = case
    model, batch, stats = _setup(name)
    ref = _out(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, plan = prune(model, stats, sparsity=0.0, **kw)
    assert plan.params_removed == 0
    torch.testing.assert_close(_out(model, batch), ref, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_surgery_equals_masking_and_counts(case, criterion):
    """Cutting the plan's units gives the masked model's outputs, with exactly the planned parameter count."""
    _, name, kw = case
    kw = {k: v for k, v in kw.items() if k != "compensation"}
    model, batch, stats = _setup(name)
    cfg = PruneConfig(sparsity=0.3, criterion=criterion, **kw)
    groups = unit_groups(model, cfg.targets, cfg.head_mode)
    from hf_geocomp.prune import score_groups
    plan = allocate(groups, score_groups(model, groups, cfg, stats), cfg, block_params(model))
    before = block_params(model)
    assert 0.15 < plan.achieved_sparsity <= 0.3 + 1e-9
    if kw.get("head_mode") == "kv":  # whole KV groups go: the KV-group surgery runs
        assert sum(len(gp.removed) for gp in plan.groups if gp.kind == "heads") >= 1
    apply_masks(model, groups, plan)
    masked = _out(model, batch)
    apply_plan(model, groups, plan)
    torch.testing.assert_close(_out(model, batch), masked, rtol=1e-4, atol=1e-5)
    assert before - block_params(model) == plan.params_removed
    for g, gp in zip(groups, plan.groups):
        from hf_geocomp import arch
        width = arch.linear_weight(model.get_submodule(g.consumer)).shape[1]
        assert width == len(gp.keep) * g.cols.shape[1]
        for prod, rows in g.producers.items():
            assert arch.linear_weight(model.get_submodule(prod)).shape[0] == len(gp.keep) * rows.shape[1]


def test_gqa_query_heads_stay_consistent():
    model, batch, stats = _setup("llama")
    _, plan = prune(model, stats, sparsity=0.3, targets=("heads",), head_mode="query")
    for gp in plan.groups:  # heads were removed, the same number from each of the 2 KV groups (2 query heads each)
        assert len(gp.removed) == 2 and sorted(u // 2 for u in gp.removed) == [0, 1]
    attn = model.model.layers[0].self_attn
    assert model.config.num_key_value_heads == 2 and attn.k_proj.out_features == 2 * 8
    assert model.config.num_attention_heads == 2 and attn.q_proj.out_features == 2 * 8
    assert attn.num_key_value_groups == 1
    assert torch.isfinite(_out(model, batch)).all()


def test_kv_groups_removed_whole():
    """head_mode='kv' removes one KV head with its query heads; why the mixed uniform allocation at 0.3 keeps
    both: one group per layer is 19.8% of the block parameters, and the uniform rule removes the same fraction
    (here 1 of 2 = 50%) of every kind, which would take 25% of the MLP too: 34.7% > 30%."""
    model, batch, stats = _setup("llama")
    groups = unit_groups(model, ("mlp", "heads"), "kv")
    heads = next(g for g in groups if g.kind == "heads")
    assert heads.params_per_unit * 2 / block_params(model) == pytest.approx(0.198, abs=1e-3)
    cfg = PruneConfig(sparsity=0.3, head_mode="kv")
    from hf_geocomp.prune import score_groups
    assert allocate(groups, score_groups(model, groups, cfg, stats), cfg, block_params(model)).widths("heads") == [2, 2]
    _, plan = prune(model, stats, sparsity=0.4, head_mode="kv")
    assert plan.widths("heads") == [1, 1]
    attn = model.model.layers[1].self_attn
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert attn.k_proj.out_features == attn.v_proj.out_features == 8 and attn.q_proj.out_features == 16
    assert attn.num_key_value_groups == 2 and model.config.geocomp_pruning["stock_loadable"]
    assert torch.isfinite(_out(model, batch)).all()


def _keep_and_inputs(model, batch, cfg):
    """The down_proj input rows of ``batch`` (float64, every token), then prune; → (kept columns, X, W before)."""
    from hf_geocomp import arch

    seen = []
    down = model.model.layers[0].mlp.down_proj
    handle = down.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, 48).double()))
    try:
        _out(model, batch)
    finally:
        handle.remove()
    W, b = arch.linear_weight(down).detach().double().clone(), None
    stats = collect_stats(model, [batch], prune_taps(model, ("mlp",)), compute_dtype=torch.float64)
    _, plan = prune(model, stats, config=cfg)
    keep = torch.tensor(plan.groups[0].keep)
    return keep, seen[0], W


@pytest.mark.parametrize("compensation", ["bias", "refit", "bias+refit"])
def test_compensation_is_the_least_squares_solution(compensation):
    """With no ridge, the consumer after surgery is the closed-form best fit of its old output from the kept inputs,
    solved here by lstsq on the very activations the statistics summed."""
    model, _, _ = _setup("llama")
    batch = random_batch(batch=4, seq=16)  # no padding: every row is a token the statistics counted
    cfg = PruneConfig(sparsity=0.3, targets=("mlp",), compensation=compensation, refit_damp=0.0)
    keep, X, W = _keep_and_inputs(model, batch, cfg)
    down = model.model.layers[0].mlp.down_proj
    target = X @ W.T  # (tokens, out): the output to reproduce (the layer had no bias)
    drop = torch.tensor([j for j in range(48) if j not in set(keep.tolist())])
    if compensation == "refit":
        expect_w, expect_b = torch.linalg.lstsq(X[:, keep], target).solution.T, None
    elif compensation == "bias+refit":
        design = torch.cat([X[:, keep], torch.ones(len(X), 1, dtype=X.dtype)], 1)
        sol = torch.linalg.lstsq(design, target).solution  # (|K| + 1, out)
        expect_w, expect_b = sol[:-1].T, sol[-1]
    else:  # the removed inputs replaced by their mean: the best constant
        expect_w, expect_b = W[:, keep], W[:, drop] @ X[:, drop].mean(0)
    torch.testing.assert_close(down.weight.double(), expect_w, rtol=1e-4, atol=1e-5)
    if expect_b is None:
        assert down.bias is None
    else:
        torch.testing.assert_close(down.bias.double(), expect_b, rtol=1e-4, atol=1e-5)


def test_refit_shrinkage_blends_toward_the_diagonal():
    """α = 0 is the refit, α = 1 reads no cross-correlation (kept columns only rescaled by c/(c + λ)), and
    α in between lies between them."""
    from hf_geocomp.prune.surgery import _consumer_weights

    torch.manual_seed(0)
    X = torch.randn(400, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)  # correlated inputs

    class M:  # the two moments the surgery asks of its statistics
        def mean(self):
            return X.mean(0)

        def covariance(self):
            return torch.cov(X.T, correction=0)

    W = torch.randn(3, 6, dtype=torch.float64)
    keep, drop = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 4])
    full, _ = _consumer_weights(W, None, keep, drop, M(), True, True, 1e-2)
    same, _ = _consumer_weights(W, None, keep, drop, M(), True, True, 1e-2, 0.0)
    diag, _ = _consumer_weights(W, None, keep, drop, M(), True, True, 1e-2, 1.0)
    half, _ = _consumer_weights(W, None, keep, drop, M(), True, True, 1e-2, 0.5)
    torch.testing.assert_close(same, full)
    c = M().covariance().diagonal()[keep]
    lam = 1e-2 * c.mean()
    torch.testing.assert_close(diag, W[:, keep] * c / (c + lam))
    d_full, d_diag = (half - full).norm(), (half - diag).norm()
    assert 0 < d_full < (full - diag).norm() and 0 < d_diag < (full - diag).norm()
    with pytest.raises(GeoCompError, match="refit_shrinkage"):
        PruneConfig(refit_shrinkage=1.5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_compensation_reduces_error(name):
    errs = {}
    for comp in ("none", "bias", "refit", "bias+refit"):
        model, batch, stats = _setup(name)
        ref = _out(model, batch)
        prune(model, stats, sparsity=0.3, targets=("mlp",), compensation=comp)
        errs[comp] = float((_out(model, batch) - ref).pow(2).mean())
    assert errs["bias+refit"] < min(errs["refit"], errs["bias"]) and max(errs["refit"], errs["bias"]) < errs["none"]
    assert errs["bias+refit"] < 0.7 * errs["none"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("llama-query", "llama-kv", "gpt2", "bert")],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("compensation", ["bias", "refit", "bias+refit"])
def test_masking_with_compensation_equals_surgery_with_compensation(case, compensation):
    """The callback's path (compensate while masking, cut later) gives the model one-shot surgery gives."""
    _, name, kw = case
    kw = {k: v for k, v in kw.items() if k != "compensation"}
    masked, batch, stats = _setup(name)
    cut, _, _ = _setup(name)
    cfg = PruneConfig(sparsity=0.3, compensation=compensation, **kw)
    groups = unit_groups(masked, cfg.targets, cfg.head_mode)
    from hf_geocomp.prune import score_groups
    plan = allocate(groups, score_groups(masked, groups, cfg, stats), cfg, block_params(masked))
    apply_masks(masked, groups, plan, stats, compensation)
    with_masks = _out(masked, batch)
    apply_plan(masked, groups, plan)  # removed units are already zero: no compensation needed any more
    apply_plan(cut, groups, plan, stats, compensation)
    ref = _out(cut, batch)
    torch.testing.assert_close(with_masks, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_out(masked, batch), ref, rtol=1e-4, atol=1e-5)
    assert block_params(masked) == block_params(cut)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_min_keep_and_max_keep_bound_every_layer(allocation):
    model, _, stats = _setup("llama")
    groups = unit_groups(model)
    from hf_geocomp.prune import score_groups

    def plan_for(**kw):
        cfg = PruneConfig(criterion="variance", allocation=allocation, **kw)
        return allocate(groups, score_groups(model, groups, cfg, stats), cfg, block_params(model))

    deep = plan_for(sparsity=0.8, min_keep=0.5)
    assert all(len(gp.keep) >= gp.num_units / 2 for gp in deep.groups)
    assert any(len(gp.keep) == gp.num_units / 2 for gp in deep.groups)  # the bound binds
    assert plan_for(sparsity=0.8).achieved_sparsity > deep.achieved_sparsity
    forced = plan_for(sparsity=0.0, max_keep=0.75)  # at most 75% kept: units go even at sparsity 0
    assert all(len(gp.keep) <= 0.75 * gp.num_units for gp in forced.groups)
    assert all(gp.removed for gp in forced.groups)


def test_uniform_allocation_is_the_same_fraction_per_layer():
    model, _, stats = _setup("llama")
    _, plan = prune(model, stats, sparsity=0.35, criterion="magnitude")
    assert len(set(plan.widths("mlp"))) == 1 and len(set(plan.widths("heads"))) == 1
    assert plan.widths("mlp")[0] < 48 and plan.widths("heads")[0] < 4
    model, _, stats = _setup("llama")
    _, glob = prune(model, stats, sparsity=0.35, criterion="magnitude", allocation="global")
    assert len(set(glob.widths("mlp"))) > 1  # the control: global adapts per layer


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_layers_prune_only_those_blocks_at_the_whole_model_budget(allocation):
    model, _, stats = _setup("llama")
    before = block_params(model)
    _, plan = prune(model, stats, sparsity=0.15, criterion="variance", targets=("mlp",), allocation=allocation,
                    layers=[-1])
    assert plan.widths("mlp")[0] == 48 and plan.widths("mlp")[1] < 48  # block 0 untouched
    assert 0.1 < 1 - block_params(model) / before <= 0.15  # a fraction of *all* block parameters, from block 1
    assert model.config.geocomp_pruning["stock_loadable"] is False  # per-layer widths: refused by stock loading
    assert PruneConfig(layers=0.5).to_dict()["layers"] == 0.5 and PruneConfig(layers=(0, 1)).to_dict()["layers"] == [0, 1]
    with pytest.raises(GeoCompError, match="has 2 blocks"):
        prune(_setup("llama")[0], stats, sparsity=0.1, layers=[2])


def test_round_to_and_plan_roundtrip():
    model, _, stats = _setup("llama")
    _, plan = prune(model, stats, sparsity=0.3, targets=("mlp",), round_to=8, allocation="global")
    assert all(w % 8 == 0 for w in plan.widths("mlp"))
    again = PrunePlan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict()


# ---- save / reload ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw,stock", [
    ("llama", {"head_mode": "query"}, True),
    ("llama", {"head_mode": "kv", "compensation": "bias", "sparsity": 0.4}, True),  # one KV group per layer goes
    ("llama", {"head_mode": "kv", "allocation": "global"}, False),  # one layer loses a group, the other not
    ("gpt2", {"targets": ("mlp",)}, True),
    ("bert", {"targets": ("mlp",), "compensation": "bias+refit"}, True),
    ("llama", {"allocation": "global"}, False),
    ("gpt2", {}, False),
])
def test_save_reload(tmp_path, name, kw, stock):
    from transformers import AutoModel

    model, batch, stats = _setup(name)
    _, plan = prune(model, stats, **{"sparsity": 0.3, **kw})
    assert model.config.geocomp_pruning["stock_loadable"] is stock
    if kw.get("head_mode") == "kv":
        assert sum(len(gp.removed) for gp in plan.groups if gp.kind == "heads") >= 1
    model.save_pretrained(tmp_path)
    cls = type(model)
    if stock:
        again = cls.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_out(again, batch), _out(model, batch), rtol=0, atol=0)
        assert again.config.num_key_value_heads == model.config.num_key_value_heads if name == "llama" else True
    else:  # never loads silently wrong
        with pytest.raises(RuntimeError, match="mismatch"):
            AutoModel.from_pretrained(tmp_path) if name == "bert" else cls.from_pretrained(tmp_path)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"criterion": "l2"}, "criterion"),
    ({"targets": ("ffn",)}, "target"), ({"allocation": "layerwise"}, "allocation"),
    ({"compensation": "ols"}, "compensation"), ({"min_keep": 0.0}, "min_keep"),
    ({"head_mode": "group"}, "head_mode"), ({"max_keep": 1.5}, "max_keep"), ({"round_to": 0}, "round_to"),
    ({"targets": ()}, "target"), ({"refit_damp": -1.0}, "refit_damp"), ({"layers": 1.5}, "layers as a fraction"),
    ({"layers": []}, "at least one block"), ({"layers": ["last"]}, "block indices"),
])
def test_bad_config(kw, match):
    with pytest.raises(GeoCompError, match=match):
        PruneConfig(**kw)


def test_bad_inputs():
    model, batch, stats = _setup("llama")
    other, _, other_stats = _setup("gpt2")
    with pytest.raises(GeoCompError, match="different model"):
        prune(model, other_stats, sparsity=0.2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    with pytest.raises(GeoCompError, match="stale"):
        prune(model, stats, sparsity=0.2)
    with pytest.raises(GeoCompError, match="statistics"):
        prune(model, None, sparsity=0.2, criterion="variance")
    groups = unit_groups(model)
    cfg = PruneConfig(sparsity=0.2, criterion="magnitude")
    from hf_geocomp.prune import score_groups
    plan = allocate(groups, score_groups(model, groups, cfg), cfg, block_params(model))
    plan.groups[0].keep = []
    with pytest.raises(GeoCompError, match="removes every unit"):
        apply_plan(model, groups, plan)

    # the same family with other widths is a different model too
    cfg = model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 64})
    wide = type(model)(cfg).eval()
    with pytest.raises(GeoCompError, match="different model"):
        prune(wide, stats, sparsity=0.2)

    class Unknown(torch.nn.Module):
        config = type("C", (), {"model_type": "t5"})()
    with pytest.raises(GeoCompError, match="not supported"):
        unit_groups(Unknown())


def test_bad_statistics_and_plans():
    """Statistics without the needed taps, stale statistics at surgery, a plan made for other units."""
    model, batch, _ = _setup("llama")
    mlp_only = collect_stats(model, [batch], prune_taps(model, ("mlp",)), compute_dtype=torch.float64)
    with pytest.raises(GeoCompError, match="no input of module"):
        prune(model, mlp_only, sparsity=0.2, targets=("mlp", "heads"))
    groups = unit_groups(model, ("mlp",))
    cfg = PruneConfig(sparsity=0.2, criterion="magnitude", targets=("mlp",))
    plan = allocate(groups, {g.key: get_scorer("magnitude").score(model, g, None, None) for g in groups}, cfg,
                    block_params(model))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(0.5)
    with pytest.raises(GeoCompError, match="stale"):  # compensation would read the old activations
        apply_plan(model, groups, plan, mlp_only, compensation="refit")
    with pytest.raises(GeoCompError, match="stale"):
        apply_plan(model, groups, plan, mlp_only, compensation="bias")
    other = PrunePlan.from_dict(plan.to_dict())
    other.groups[0].num_units += 1
    other.groups[0].keep = list(range(other.groups[0].num_units - 2))
    with pytest.raises(GeoCompError, match="does not match"):
        apply_plan(model, groups, other)
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(GeoCompError, match="needs activation statistics"):
        apply_plan(model, groups, plan, None, compensation="bias+refit")
    assert [tuple(p.shape) for p in model.parameters()] == shapes  # nothing was cut by the failed calls


def test_conditional_variance_spots_redundant_units():
    """Two units carrying the same signal: plain variance keeps both, conditional variance drops one first."""
    from hf_geocomp import arch

    model, _, stats = _setup("llama")
    group = unit_groups(model, ("mlp",))[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, group.num_units, generator=g, dtype=torch.float64)
    x[:, 4] = x[:, 3] = 3 * x[:, 3]  # the same large signal twice
    stats[f"{group.consumer}:in"].__init__(x.sum(0), x.T @ x, torch.tensor(600.0, dtype=torch.float64))
    with torch.no_grad():
        W = arch.linear_weight(model.get_submodule(group.consumer))
        W.copy_(torch.randn(W.shape, generator=g))
        W[:, 4] = W[:, 3]
    plain = get_scorer("variance").score(model, group, stats, None).argsort().tolist()
    cond = get_scorer("variance_cond").score(model, group, stats, None).argsort().tolist()
    assert plain.index(3) > 40 and plain.index(4) > 40  # both near the top
    assert min(cond.index(3), cond.index(4)) == 0  # one is removed first: the other reproduces it
    assert max(cond.index(3), cond.index(4)) > 40


def test_cli_prune(tmp_path, tiny_llama_dir, text_file, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from hf_geocomp.cli import main

    out = tmp_path / "pruned"
    argv = ["prune", "--model", tiny_llama_dir, "--data", f"file:{text_file}", "--tokens", "512", "--block-size",
            "32", "--sparsity", "0.25", "--criterion", "variance_cond", "--compensation", "refit", "-o", str(out)]
    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["command"].startswith("hf-geocomp prune") and plan["block_params_after"] < plan["block_params_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size < 48
    assert main(argv[:-2] + ["--criterion", "l3", "-o", str(tmp_path / "x")]) == 2
    assert "criterion 'l3' does not exist" in capsys.readouterr().err


def test_cli_bench_prune_sweeps(tmp_path, tiny_llama_dir, text_file, capsys):
    """Two sweeps in one run share the baseline; latency repeats 0 records null, not a number."""
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "bench.json"
    data = ["--model", tiny_llama_dir, "--data", f"file:{text_file}", "--eval-data", f"file:{text_file}",
            "--tokens", "256", "--eval-tokens", "128", "--block-size", "32", "--latency-repeats", "0"]
    argv = ["bench-prune", *data, "--sweep", "0.2,0.3:variance,taylor:bias+refit:uniform:mlp",
            "0.2:variance:none,bias+refit:uniform,global:mlp+heads", "0.2:variance:bias+refit:uniform:mlp",
            "-o", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["command"].startswith("hf-geocomp bench-prune") and len(rows) == 4 + 4  # the repeat is dropped
    assert all(r["latency_ratio"] is None for r in rows) and "not measured" in result["latency"]
    heads = [r for r in rows if r["targets"] == "mlp+heads"]
    assert all(r["head_units"] for r in heads) and not any(r["head_units"] for r in rows if r["targets"] == "mlp")
    assert all(0 < r["sparsity"] < 0.35 and r["ppl_ratio"] == pytest.approx(r["ppl"] / result["baseline"]["ppl"])
               for r in rows)
    # the numbers again, independently: the unpruned model's perplexity and one row through the Python API
    from hf_geocomp.data import calibration_loader, load_model
    from hf_geocomp.eval.perplexity import perplexity
    from hf_geocomp.geometry import collect_stats as collect

    model, tok = load_model(tiny_llama_dir)
    calib = list(calibration_loader(model, tok, f"file:{text_file}", 256, 32, 8))
    evals = list(calibration_loader(model, tok, f"file:{text_file}", 128, 32, 8))
    assert result["baseline"]["ppl"] == pytest.approx(perplexity(model, evals), rel=1e-6)
    stats = collect(model, calib, prune_taps(model, ("mlp", "heads")))
    row = next(r for r in rows if r["method"] == "variance/bias+refit/global/mlp+heads")
    _, plan = prune(model, stats, sparsity=0.2, criterion="variance", compensation="bias+refit", allocation="global")
    assert row["ppl"] == pytest.approx(perplexity(model, evals), rel=1e-6) and row["params"] == block_params(model)
    assert row["head_units"] == plan.widths("heads") and row["ppl_ratio"] > 1
    assert main(["bench-prune", *data, "--sweep", "0.2:variance", "-o", str(out)]) == 2  # results never replaced
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    bad = str(tmp_path / "bad.json")
    assert main(["bench-prune", *data, "--sweep", "0.2:variance:bias", "-o", bad]) == 2
    assert "BUDGETS:CRITERIA" in capsys.readouterr().err
    assert main(["bench-prune", *data, "--sweep", "1.2:variance:none:uniform", "-o", bad]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


# ---- a method asks only for what it reads ----------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("criterion", CRITERIA + ["taylor"])
def test_least_statistics_give_the_same_pruning(case, criterion):
    """prune_taps(criteria=...) collects only what the criterion and compensation read (per-feature
    variances, per-head blocks, or nothing); scores, plan and pruned model equal those from full statistics."""
    name, model_name, kw = case
    if criterion == "taylor" and model_name == "bert":
        pytest.skip("the taylor criterion needs a model with a loss; the BERT encoder has none")
    cfg = PruneConfig(sparsity=0.3, criterion=criterion, **kw)
    model = TINY_MODELS[model_name]()
    batches = [random_batch(batch=4, seq=16, pad_last=3, seed=s) for s in range(2)]
    taps = prune_taps(model, cfg.targets, criteria=[criterion], compensation=cfg.compensation, head_mode=cfg.head_mode)
    full = collect_stats(model, batches, prune_taps(model, cfg.targets), compute_dtype=torch.float64)
    if not taps:
        assert not get_scorer(criterion).needs_stats and cfg.compensation == "none"
        return
    least = collect_stats(model, batches, taps, compute_dtype=torch.float64)
    kinds = {"full" if not m.diagonal_only and m.sum.dim() == 1 else "heads" if m.sum.dim() == 2 else "diag"
             for m in least.moments.values()}
    if criterion == "variance_cond" or "refit" in cfg.compensation:
        assert kinds == {"full"}
    else:
        assert "full" not in kinds  # no d × d products
    groups = unit_groups(model, cfg.targets, cfg.head_mode)
    grads = taylor_grads(model, batches, cfg.targets) if criterion == "taylor" else None
    s_full = score_groups(model, groups, cfg, full, grads)
    s_least = score_groups(model, groups, cfg, least, grads)
    for key in s_full:
        torch.testing.assert_close(s_least[key], s_full[key], rtol=1e-10, atol=1e-12)
    a, plan_a = prune(TINY_MODELS[model_name](), full, config=cfg, grads=grads)
    b, plan_b = prune(TINY_MODELS[model_name](), least, config=cfg, grads=grads)
    assert plan_a.to_dict() == plan_b.to_dict()
    torch.testing.assert_close(_out(a, batches[0]), _out(b, batches[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("criterion", ["variance", "wanda"])
def test_least_statistics_same_plan_in_float32(criterion):
    """The default float32 products: per-feature and per-head statistics choose the same units as full ones."""
    model = TINY_MODELS["llama"]()
    batches = [random_batch(batch=4, seq=16, pad_last=3, seed=s) for s in range(2)]
    cfg = PruneConfig(sparsity=0.3, criterion=criterion, compensation="bias")
    full = collect_stats(model, batches, prune_taps(model, cfg.targets))
    least = collect_stats(model, batches, prune_taps(model, cfg.targets, criteria=[criterion], compensation="bias"))
    groups = unit_groups(model, cfg.targets)
    s_full, s_least = score_groups(model, groups, cfg, full), score_groups(model, groups, cfg, least)
    for key in s_full:
        torch.testing.assert_close(s_least[key], s_full[key], rtol=1e-5, atol=1e-9)
    _, plan_a = prune(TINY_MODELS["llama"](), full, config=cfg)
    _, plan_b = prune(TINY_MODELS["llama"](), least, config=cfg)
    assert plan_a.to_dict() == plan_b.to_dict()


def test_least_statistics_refuse_what_they_lack():
    model = TINY_MODELS["llama"]()
    cfg = PruneConfig(sparsity=0.3, criterion="variance_cond")
    least = collect_stats(model, [random_batch()], prune_taps(model, criteria=["wanda"]))
    with pytest.raises(GeoCompError, match="moments='full'"):
        prune(model, least, config=cfg)
    with pytest.raises(GeoCompError, match="compensation"):
        prune_taps(model, criteria=["variance"], compensation="least-squares")
