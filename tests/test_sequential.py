"""Block-by-block calibration: the statistics equal a whole-model pass, in every supported family."""

from __future__ import annotations

import pytest
import torch

from hf_geocomp.errors import GeoCompError
from hf_geocomp.geometry import collect_stats, collect_stats_sequential, kv_head_taps, linear_input_taps
from hf_geocomp.geometry.stats import kv_grad_taps

from .conftest import model_output, random_batch
from .families import FAMILIES


def _batches(model, n=3, pad_last=0):
    """Rows longer than the sliding windows of the tiny families (12), the last batch right-padded."""
    return [random_batch(batch=2, seq=20, seed=s, pad_last=pad_last if s == n - 1 else 0) for s in range(n)]


def _assert_equal_stats(a, b, rel=1e-10):
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        ma, mb = a[key], b[key]
        assert ma.n == mb.n > 0, key
        for x, y in ((ma.sum, mb.sum), (ma.outer, mb.outer)):
            scale = max(float(x.abs().max()), 1e-30)
            assert float((x - y).abs().max()) <= rel * scale, key


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sequential_statistics_equal_the_whole_model_pass(name):
    model = FAMILIES[name]()
    batches = _batches(model, pad_last=3)
    taps = linear_input_taps(model) + kv_head_taps(model)
    whole = collect_stats(model, batches, taps)
    seen = []
    seq = collect_stats_sequential(model, batches, taps, on_block=lambda i, s: seen.append((i, sorted(s.keys()))),
                                   keep=True)
    _assert_equal_stats(whole, seq)
    assert [i for i, _ in seen] == list(range(model.config.num_hidden_layers))
    for i, keys in seen:  # each callback sees its own block's taps only
        assert keys and all(f".{i}." in k for k in keys)


def test_gradient_taps_and_taps_outside_blocks_are_refused():
    model = FAMILIES["llama3"]()
    with pytest.raises(GeoCompError, match="gradients"):
        collect_stats_sequential(model, _batches(model), kv_grad_taps(model))
    with pytest.raises(GeoCompError, match="not inside a transformer block"):
        collect_stats_sequential(model, _batches(model), linear_input_taps(model, "lm_head"))
    with pytest.raises(GeoCompError, match="propagate"):
        collect_stats_sequential(model, _batches(model), linear_input_taps(model), propagate="pruned")


def test_compressed_propagation_feeds_the_changed_block_forward():
    """With propagate="compressed" the next block sees the changed block's outputs; with "original" it does not."""
    results = {}
    for propagate in ("original", "compressed"):
        model = FAMILIES["llama3"]()
        batches = _batches(model)

        def zero_mlp(i, stats, model=model):
            if i == 0:
                with torch.no_grad():
                    model.model.layers[0].mlp.down_proj.weight.zero_()

        results[propagate] = collect_stats_sequential(model, batches, linear_input_taps(model), zero_mlp,
                                                      propagate=propagate, keep=True)
    changed = FAMILIES["llama3"]()
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.zero_()
    whole_changed = collect_stats(changed, _batches(changed), linear_input_taps(changed))
    whole = collect_stats(FAMILIES["llama3"](), _batches(changed), linear_input_taps(changed))
    key = "model.layers.1.mlp.down_proj:in"
    _assert_equal_stats(results["compressed"], whole_changed)
    assert torch.allclose(results["original"][key].outer, whole[key].outer, rtol=1e-10, atol=0)
    assert not torch.allclose(results["compressed"][key].outer, whole[key].outer)


PRUNE_CASES = [dict(criterion="variance", targets=["mlp", "heads"], allocation="global", compensation="bias+refit"),
               dict(criterion="wanda", targets=["mlp"], allocation="uniform", compensation="bias")]


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("case", range(len(PRUNE_CASES)))
def test_sequential_pruning_equals_whole_model_pruning(name, case):
    from hf_geocomp.prune import PruneConfig, prune, prune_sequential, prune_taps

    from .conftest import model_output

    from hf_geocomp import arch

    whole, seq = FAMILIES[name](), FAMILIES[name]()
    case = dict(PRUNE_CASES[case])
    if arch.get_spec(whole).head_pruning:  # a family whose heads cannot be cut alone (OLMo2)
        case["targets"] = ["mlp"]
    cfg = PruneConfig(sparsity=0.3, **case)
    batches = _batches(whole)
    stats = collect_stats(whole, batches, prune_taps(whole, cfg.targets, criteria=[cfg.criterion],
                                                     compensation=cfg.compensation, head_mode=cfg.head_mode))
    _, plan = prune(whole, stats, config=cfg)
    _, plan_seq = prune_sequential(seq, batches, cfg)
    assert plan_seq.to_dict() == plan.to_dict()
    for (n, p), (n2, q) in zip(whole.state_dict().items(), seq.state_dict().items()):
        assert n == n2 and p.shape == q.shape and torch.allclose(p, q, rtol=1e-6, atol=1e-7), n
    test = random_batch(batch=2, seq=20, seed=9)
    assert torch.allclose(model_output(whole, test), model_output(seq, test), rtol=1e-5, atol=1e-5)


def test_compressed_propagation_prunes_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    import hf_geocomp  # noqa: F401  (the geocomp quantizer rebuilds the pruned shapes)
    from hf_geocomp.hub import mark_compressed
    from hf_geocomp.prune import PruneConfig, prune_sequential

    from .conftest import model_output

    cfg = PruneConfig(sparsity=0.3, criterion="variance", targets=["mlp"], allocation="global",
                      compensation="bias+refit")
    model, original = FAMILIES["qwen2"](), FAMILIES["qwen2"]()
    batches = _batches(model)
    _, plan = prune_sequential(model, batches, cfg, propagate="compressed")
    _, plan_orig = prune_sequential(original, batches, cfg, propagate="original")
    assert plan.to_dict() == plan_orig.to_dict()  # the same units go; only the refits differ
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(model.state_dict()[down], original.state_dict()[down])
    mark_compressed(model, plan, None)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    test = random_batch(batch=2, seq=20, seed=9)
    assert torch.equal(model_output(model, test), model_output(again, test))


def test_compress_on_load_pipelines_agree(tiny_llama_dir):
    """from_pretrained(..., quantization_config=GeoCompConfig(...)) runs the block-by-block pipeline by default."""
    from transformers import AutoModelForCausalLM

    from hf_geocomp import GeoCompConfig

    prune = {"sparsity": 0.3, "criterion": "variance", "targets": ["mlp"], "allocation": "global",
             "compensation": "bias+refit"}
    models = {}
    for pipeline in ("sequential", "whole-model"):
        cfg = GeoCompConfig(prune=prune, calibration="pydoc:calibration", tokens=64, block_size=16, pipeline=pipeline)
        models[pipeline] = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    plans = {k: m.config.quantization_config.plan for k, m in models.items()}
    assert plans["sequential"]["prune"] == plans["whole-model"]["prune"]
    assert models["sequential"].config.quantization_config.pipeline == "sequential"
    test = random_batch(batch=2, seq=20, seed=9)
    a, b = (model_output(m, test) for m in models.values())
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(GeoCompError, match="pipeline must be one of"):
        GeoCompConfig(prune=prune, calibration="pydoc:calibration", pipeline="layerwise")
