"""Curvature-subspace compression on tiny Llama (GQA), GPT-2 and BERT-free LMs: K-FAC, the layer, save/reload, errors."""

import pytest
import torch

from hf_geocomp import GeoCompError, arch
from hf_geocomp.curvature import (CurvatureConfig, CurvatureSubspaceLinear, KFACFactors, compress, kfac_factors,
                                  mlp_linears, rebuild, select, stored_block_params, target_modules)
from hf_geocomp.geometry import sample_labels

from .conftest import TINY_MODELS, random_batch

LMS = ["llama", "gpt2"]


def _random_factors(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(in_f, 3 * in_f, generator=g, dtype=torch.float64)
    b = torch.randn(out_f, 3 * out_f, generator=g, dtype=torch.float64)
    return KFACFactors(a @ a.T / in_f, b @ b.T / out_f, 100)


@pytest.mark.parametrize("rule", ["per_factor", "product"])
@pytest.mark.parametrize("bias", [False, True])
def test_keep_one_equals_dense(rule, bias):
    lin = torch.nn.Linear(12, 7, bias=bias).double()
    L, R, mask = select(_random_factors(7, 12), 1.0, rule)
    layer = CurvatureSubspaceLinear.from_dense(lin.weight, lin.bias, L, R, mask)
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.stored_params() == 7 * 7 + 12 * 12 + 7 * 12 + (7 if bias else 0)


def test_keep_rules():
    f = _random_factors(10, 16)
    L, R, mask = select(f, 0.3, "per_factor")
    assert (L.shape, R.shape, mask) == ((10, 3), (16, 5), None)
    assert torch.allclose(L.T @ L, torch.eye(3, dtype=torch.float64))
    lam, mu = torch.linalg.eigvalsh(f.G).flip(0), torch.linalg.eigvalsh(f.A).flip(0)
    L, R, mask = select(f, 0.5, "product")
    prod = lam[: L.shape[1], None] * mu[None, : R.shape[1]]
    kept = (prod * mask).sum() / (lam.sum() * mu.sum())
    assert kept >= 0.5 - 1e-9
    assert kept - prod[mask].min() / (lam.sum() * mu.sum()) < 0.5  # the last pair was needed
    assert mask[0, 0] and mask.any(1).all() and mask.any(0).all()
    # the kept pairs are the largest products: none outside the mask beats the smallest inside
    assert (lam[:, None] * mu[None, :])[: L.shape[1], : R.shape[1]][~mask].max() <= prod[mask].min() + 1e-12


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("labels", ["gold", "sampled"])
def test_kfac_factors_equal_direct_computation(name, labels):
    model = TINY_MODELS[name]()
    batch = random_batch(batch=2, seq=8, pad_last=2)
    target = mlp_linears(model)[-1]  # the last down projection
    fac = kfac_factors(model, [batch], [target], labels=labels, seed=3)[target]
    xs, gs = [], []
    mod = model.get_submodule(target)

    def hook(m, a, out):
        xs.append(a[0])
        out.register_hook(gs.append)

    h = mod.register_forward_hook(hook)
    try:
        logits = model(**batch).logits
        tgt = batch["input_ids"][:, 1:] if labels == "gold" else sample_labels(logits[:, :-1],
                                                                               torch.Generator().manual_seed(3))
        tgt = tgt.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                          reduction="sum").backward()
    finally:
        h.remove()
    keep = batch["attention_mask"].bool()
    x, g = xs[0][keep].double(), gs[0][keep].double()  # (N, in), (N, out): real tokens only
    torch.testing.assert_close(fac.A, x.T @ x / len(x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fac.G, g.T @ g / len(g), rtol=1e-4, atol=1e-9)
    assert fac.tokens == int(keep.sum())


def test_sampled_labels_differ_from_gold():
    model = TINY_MODELS["llama"]()
    t = mlp_linears(model)[-1]
    gold = kfac_factors(model, [random_batch()], [t], labels="gold")[t]
    samp = kfac_factors(model, [random_batch()], [t], labels="sampled")[t]
    again = kfac_factors(model, [random_batch()], [t], labels="sampled")[t]
    assert not torch.allclose(gold.G, samp.G) and torch.equal(samp.G, again.G)
    assert torch.equal(gold.A, samp.A)


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("rule", ["per_factor", "product"])
def test_compress_and_save_reload(tmp_path, name, rule):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = TINY_MODELS[name]()
    batch = random_batch()
    with torch.no_grad():
        dense = model(**batch).logits
    factors = kfac_factors(model, [random_batch(seed=1)])
    full = TINY_MODELS[name]()
    compress(full, factors, CurvatureConfig(keep=1.0, rule=rule))
    with torch.no_grad():
        torch.testing.assert_close(full(**batch).logits, dense, rtol=1e-4, atol=1e-4)
    _, summary = compress(model, factors, CurvatureConfig(keep=0.3, rule=rule))
    assert summary["modules"] == len(mlp_linears(model)) and summary["params_after"] == stored_block_params(model)
    assert all(isinstance(model.get_submodule(n), CurvatureSubspaceLinear) for n in mlp_linears(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".C") for n in trainable) and not any(n.endswith((".L", ".R")) for n in trainable)
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    again = rebuild(AutoModelForCausalLM.from_config(cfg), cfg.geocomp_modules)
    again.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    missing = set(again.state_dict()) - set(load_file(str(tmp_path / "model.safetensors")))
    assert not (missing - {"lm_head.weight"})  # tied heads are stored once
    again.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**batch).logits, ref)


@pytest.mark.parametrize("layers,blocks", [((-1,), [1]), ([0], [0]), (0.5, [1]), (1.0, [0, 1]), (None, [0, 1])])
def test_layers_compress_only_those_blocks(layers, blocks):
    model = TINY_MODELS["llama"]()
    cfg = CurvatureConfig(keep=0.3, layers=layers)
    names = target_modules(model, cfg)
    assert sorted({arch.layer_index(n) for n in names}) == blocks and len(names) == 3 * len(blocks)
    _, summary = compress(model, kfac_factors(model, [random_batch()], names), cfg)
    replaced = {n for n, m in model.named_modules() if isinstance(m, CurvatureSubspaceLinear)}
    assert replaced == set(names) and summary["modules"] == len(names)
    assert model.config.geocomp_curvature["layers"] == (list(layers) if isinstance(layers, tuple) else layers)
    gpt2 = TINY_MODELS["gpt2"]()  # layers narrow module patterns too
    assert target_modules(gpt2, CurvatureConfig(modules="*.mlp.c_proj", layers=[-1])) == ["transformer.h.1.mlp.c_proj"]


def test_parse_layers():
    assert arch.parse_layers("all") is None
    assert arch.parse_layers("last:3") == (-3, -2, -1)
    assert arch.parse_layers("last:0.25") == 0.25
    assert arch.parse_layers("12:15") == (12, 13, 14)
    assert arch.parse_layers("0,10:12,29") == (0, 10, 11, 29)
    for bad in ("last:0", "x", "3:3", "-1", "last:1.5", "1,,2", ""):
        with pytest.raises(GeoCompError, match="layer subset|fraction"):
            arch.parse_layers(bad)


def test_record_roundtrip():
    layer = CurvatureSubspaceLinear(6, 4, 2, 3, bias=True, masked=True)
    rec = layer.geocomp_record()
    import json
    assert json.loads(json.dumps(rec)) == rec
    empty = CurvatureSubspaceLinear.from_geocomp_record(rec, torch.float16)
    assert empty.geocomp_record() == rec and empty.C.dtype == torch.float16
    with pytest.raises(GeoCompError, match="kind"):
        CurvatureSubspaceLinear.from_geocomp_record({**rec, "kind": "other"}, None)
    with pytest.raises(GeoCompError, match="lacks the field"):
        CurvatureSubspaceLinear.from_geocomp_record({"kind": "curvature_subspace"}, None)


def test_bad_inputs():
    for keep in (0, 1.5, -0.1):
        with pytest.raises(GeoCompError, match="keep must be a fraction"):
            CurvatureConfig(keep=keep)
    with pytest.raises(GeoCompError, match="rule"):
        CurvatureConfig(rule="both")
    with pytest.raises(GeoCompError, match="labels"):
        CurvatureConfig(labels="teacher")
    for layers, match in ((0.0, "fraction"), (2.0, "fraction"), ([], "at least one block"), ([True], "block indices"),
                          ("last", "block indices")):
        with pytest.raises(GeoCompError, match=match):
            CurvatureConfig(layers=layers)
    model = TINY_MODELS["llama"]()
    down = mlp_linears(model)[-1]
    handle = model.get_submodule(down).register_forward_hook(lambda m, a, out: out.detach())
    try:
        with pytest.raises(GeoCompError, match="received no gradient"):
            kfac_factors(model, [random_batch()], [down])
    finally:
        handle.remove()
    with pytest.raises(GeoCompError, match="language-model head"):
        kfac_factors(TINY_MODELS["bert"](), [random_batch()], ["encoder.layer.0.output.dense"])
    with pytest.raises(GeoCompError, match="dense layer"):
        kfac_factors(model, [random_batch()], ["model.layers.0.mlp"])
    with pytest.raises(GeoCompError, match="does not exist"):
        kfac_factors(model, [random_batch()], ["model.layers.9.mlp.up_proj"])
    with pytest.raises(GeoCompError, match="needs K-FAC factors"):
        compress(model)
    other = kfac_factors(TINY_MODELS["gpt2"](), [random_batch()])
    with pytest.raises(GeoCompError, match="no entry"):
        compress(model, other)
    fake = {n: KFACFactors(torch.eye(3), torch.eye(3), 1) for n in mlp_linears(model)}
    with pytest.raises(GeoCompError, match="another model"):
        compress(model, fake)
    with pytest.raises(GeoCompError, match=r"names block -3, but this llama model has 2 blocks"):
        compress(model, fake, CurvatureConfig(layers=[-3]))
    with pytest.raises(GeoCompError, match="names block 1 twice"):
        compress(model, fake, CurvatureConfig(layers=[1, -1]))
    with pytest.raises(GeoCompError, match="no module to compress"):
        compress(model, fake, CurvatureConfig(modules="model.layers.0.mlp.up_proj", layers=[1]))


def test_cli_bench_curvature(tmp_path, tiny_llama_dir, text_file, capsys):
    import json

    from hf_geocomp.cli import main

    out = tmp_path / "curv.json"
    argv = ["bench-curvature", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "128", "--block-size", "32",
            "--train-data", text_file, "--train-tokens", "256", "--train-block", "16", "--canaries", "4",
            "--canary-batch", "2", "--max-steps", "4", "--check-every", "2", "--kfac-data", text_file,
            "--kfac-tokens", "64", "--eval-data", text_file, "--eval-tokens", "128", "--keeps", "1.0", "0.3",
            "--rules", "per_factor", "--lr", "1e-3", "--train-last", "1", "--layers", "all", "last:1",
            "-o", str(out), "--plot", str(tmp_path / "c.png")]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    by = {(r["method"], r.get("keep"), r.get("layers")): r for r in res["rows"]}
    for layers in (None, "last:1"):
        assert by[("curvature:per_factor", 1.0, layers)]["ppl"] == pytest.approx(res["baseline"]["ppl"], rel=1e-4)
    one = [r for r in res["rows"] if r.get("layers") == "last:1"]
    assert {r["method"] for r in one} == {"curvature:per_factor", "prune:variance:bias+refit", "fold:data_free"}
    assert all(r["layer_indices"] == [1] for r in one)
    curv = next(r["params"] for r in one if r.get("keep") == 0.3)
    fold_row = next(r for r in one if r["method"] == "fold:data_free")
    assert fold_row["matched_keep"] == 0.3 and 0 <= fold_row["params"] - curv < 3 * 32  # matched to within a unit
    assert {r["method"] for r in res["rows"]} >= {"pretrained", "finetuned", "prune:variance:bias+refit",
                                                  "fold:data_free"}
    assert res["finetune"]["steps"] <= 4 and (tmp_path / "c.png").exists()
    assert res["finetune"]["trained_parameters"] == 3 * 32 * 48  # the last block's gate, up and down
    assert main(argv[:-4] + ["--keeps", "0"]) == 2  # a bad keep fraction fails before any work
    assert main(argv[:-4] + ["--layers", "last:0"]) == 2  # so does a bad layer subset
    assert main(argv[:-4] + ["--layers", "5"]) == 2  # and one the model lacks, before fine-tuning


def _reload_case(name):
    """(model, factors, config, auto class) for a from_pretrained reload. BERT has no next-token head, so K-FAC
    cannot measure it; its layers get constructed factors (compression itself takes any dense layer)."""
    from transformers import AutoModel, AutoModelForCausalLM

    model = TINY_MODELS[name.split(":")[0]]()
    if name == "bert":
        names = mlp_linears(model)
        factors = {}
        for i, n in enumerate(names):
            out_f, in_f = arch.linear_weight(model.get_submodule(n)).shape
            factors[n] = _random_factors(out_f, in_f, seed=i)
        return model, factors, CurvatureConfig(keep=0.3), AutoModel
    modules = ("*.attn.c_proj", "*.mlp.c_fc") if name == "gpt2:attn" else None  # GPT-2's init reads attn.c_proj too
    cfg = CurvatureConfig(keep=0.3, modules=modules)
    names = arch.match_modules(model, list(modules)) if modules else None
    return model, kfac_factors(model, [random_batch(seed=1)], names), cfg, AutoModelForCausalLM


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt2:attn", "bert"])
def test_three_factor_model_reloads_with_from_pretrained(tmp_path, name):
    """Through the hub: the plan records the replaced modules, from_pretrained rebuilds them with identical logits
    (GPT-2: although transformers' GPT-2 init reads `c_proj.weight` of the MLP and attention modules), nothing is
    missing or unexpected, and stock transformers (the guard) refuses the checkpoint instead of loading random
    dense weights."""
    import json

    import hf_geocomp  # noqa: F401
    from hf_geocomp.hub import GUARD, mark_compressed

    from .conftest import model_output

    model, factors, cfg, auto = _reload_case(name)
    batch = random_batch()
    _, summary = compress(model, factors, cfg)
    replaced = [n for n, m in model.named_modules() if isinstance(m, CurvatureSubspaceLinear)]
    assert len(replaced) == summary["modules"] > 0
    mark_compressed(model)
    ref = model_output(model, batch)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == GUARD
    again, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert [n for n, m in again.named_modules() if isinstance(m, CurvatureSubspaceLinear)] == replaced
    torch.testing.assert_close(model_output(again.eval(), batch), ref, rtol=0, atol=0)
