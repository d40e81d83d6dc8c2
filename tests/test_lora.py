"""SpectralLoRA: budget arithmetic, allocation, init, save/load in fresh processes, plain-LoRA export, Trainer."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_geocomp.errors import GeoCompError
from hf_geocomp.geometry import ActivationStats, Moments, Tap, collect_stats, linear_input_taps
from hf_geocomp.lora import SpectralLoraConfig, export_plain_lora, uniform_params
from hf_geocomp.lora.allocate import allocate, split_budget

from .conftest import TINY_MODELS, random_batch, model_output as _out

# (tiny model, target_modules): every dense layer of the blocks
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": r".*encoder.*\.(query|key|value|dense)",
}


def _stats(model):
    return collect_stats(model, [random_batch(seed=i, pad_last=i) for i in range(3)], linear_input_taps(model))


def _spectral(name, **kw):
    model = TINY_MODELS[name]()
    cfg = SpectralLoraConfig(r=kw.pop("r", 4), lora_alpha=8, target_modules=TARGETS[name], **kw)
    cfg.stats = _stats(TINY_MODELS[name]())
    return get_peft_model(model, cfg), cfg


def _lora_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)




@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("rule", ["effective_rank", "k_tau"])
def test_budget_never_above_within_one_percent(name, rule):
    pm, cfg = _spectral(name, allocation=rule)
    shapes = {m["name"]: (m["in_features"], m["out_features"]) for m in cfg.spectral_allocation["modules"]}
    budget = uniform_params(shapes, 4)
    trained = _lora_params(pm)
    assert trained == cfg.spectral_allocation["params"]
    assert 0.99 * budget <= trained <= budget
    assert len({m["rank"] for m in cfg.spectral_allocation["modules"]}) > 1  # not uniform


def test_split_budget_random_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(3, 40, (1,), generator=g))
        costs = torch.randint(64, 3000, (n,), generator=g).tolist()
        scores = (torch.rand(n, generator=g) * 50 + 0.1).tolist()
        hi = [min(c // 2, 256) for c in costs]
        # within 1% is reachable when one rank of any module costs at most 1% of the budget
        budget = max(int(sum(costs) * float(torch.rand(1, generator=g) * 10 + 2)), 100 * max(costs))
        if sum(h * c for h, c in zip(hi, costs)) < budget:
            continue
        ranks = split_budget(scores, costs, [1] * n, hi, budget)
        used = sum(r * c for r, c in zip(ranks, costs))
        assert 0.99 * budget <= used <= budget
        assert all(1 <= r <= h for r, h in zip(ranks, hi))


def _constructed_stats(dfs, dim=64, n=1000, names=None):
    """Inputs whose covariance is the identity on the first k dims: effective rank exactly k."""
    stats = ActivationStats()
    for i, k in enumerate(dfs):
        d = dim[i] if isinstance(dim, list) else dim
        diag = torch.zeros(d, dtype=torch.float64)
        diag[:k] = 1.0
        name = names[i] if names else f"m{i}"
        stats.taps[f"{name}:in"] = Tap(name)
        stats.moments[f"{name}:in"] = Moments(torch.zeros(d, dtype=torch.float64), torch.diag(diag) * n,
                                              torch.tensor(float(n), dtype=torch.float64))
    return stats


@pytest.mark.parametrize("rule", ["effective_rank", "k_tau"])
def test_allocation_follows_the_spectrum(rule):
    dfs = [4, 8, 16, 32]
    stats = _constructed_stats(dfs)
    shapes = {f"m{i}": (64, 64) for i in range(len(dfs))}
    plan = allocate(stats, shapes, rule=rule, r=8, lora_alpha=16, tau=1.0)
    ranks = [m.rank for m in plan.modules]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]
    assert [m.score for m in plan.modules] == pytest.approx(dfs)
    # proportional: Σr = 4·8 = 32 over scores 4:8:16:32 → 2, 4, 8, 17 (the remainder to the furthest below)
    assert abs(ranks[-1] / ranks[0] - 8) <= 1
    assert all(m.alpha / m.rank == pytest.approx(2.0) for m in plan.modules)  # alpha rule: alpha/r kept


def test_width_allocation_is_effective_rank_with_the_variance_removed():
    from hf_geocomp.prune.whitening import whiten_stats

    stats = _constructed_stats([12, 4, 8, 30], dim=[16, 32, 64, 32])  # the spectra differ; only widths count
    shapes = {"m0": (16, 16), "m1": (32, 32), "m2": (64, 64), "m3": (32, 32)}
    width = allocate(stats, shapes, rule="width", r=4, lora_alpha=8)
    removed = allocate(whiten_stats(stats), shapes, rule="effective_rank", r=4, lora_alpha=8)
    assert [m.score for m in width.modules] == pytest.approx([16, 32, 64, 32])
    assert [m.rank for m in width.modules] == [m.rank for m in removed.modules]
    assert [m.rank for m in width.modules] != [m.rank for m in allocate(stats, shapes, rule="effective_rank", r=4,
                                                                        lora_alpha=8).modules]


def test_per_kind_scope_keeps_each_kinds_uniform_share():
    # wide inputs ("down") have the larger Df: a global allocation hands them most of the budget,
    # per_kind keeps uniform LoRA's split between kinds and moves rank between layers only
    names = [f"layers.{i}.{kind}" for kind in ("q", "down") for i in range(4)]
    dfs = [4, 8, 6, 2, 40, 60, 50, 30]
    widths = [64] * 4 + [256] * 4
    stats = _constructed_stats(dfs, dim=widths, names=names)
    shapes = {n: (w, 64) for n, w in zip(names, widths)}
    kw = dict(rule="effective_rank", r=8, lora_alpha=16)
    plan = allocate(stats, shapes, scope="per_kind", **kw)
    glob = allocate(stats, shapes, **kw)
    budget = uniform_params(shapes, 8)
    assert glob.budget == plan.budget == budget and plan.to_dict()["scope"] == "per_kind"
    for kind in ("q", "down"):
        mods = [m for m in plan.modules if m.name.endswith(kind)]
        share = sum(8 * (m.in_features + m.out_features) for m in mods)
        assert 0.99 * share <= sum(m.params for m in mods) <= share
        by_score = sorted(mods, key=lambda m: m.score)
        assert [m.rank for m in by_score] == sorted(m.rank for m in mods) and by_score[0].rank < by_score[-1].rank
    q_global = sum(m.params for m in glob.modules if m.name.endswith(".q"))
    assert q_global < 0.5 * sum(m.params for m in plan.modules if m.name.endswith(".q"))
    with pytest.raises(GeoCompError, match="scope must be one of"):
        allocate(stats, shapes, scope="layers", **kw)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_per_kind_scope_on_tiny_models(name):
    pm, cfg = _spectral(name, scope="per_kind")
    mods = cfg.spectral_allocation["modules"]
    assert cfg.spectral_allocation["scope"] == "per_kind"
    assert 0.99 * cfg.spectral_allocation["budget"] <= _lora_params(pm) <= cfg.spectral_allocation["budget"]
    from hf_geocomp.lora.allocate import kind_of

    for kind in {kind_of(m["name"]) for m in mods}:
        group = [m for m in mods if kind_of(m["name"]) == kind]
        share = sum(4 * (m["in_features"] + m["out_features"]) for m in group)
        assert 0.99 * share <= sum(m["rank"] * (m["in_features"] + m["out_features"]) for m in group) <= share


def _independent_eigh(moments):
    """Eigenpairs of the uncentred second moment, descending, by numpy (not the package's solvers)."""
    import numpy as np

    evals, vecs = np.linalg.eigh((moments.outer / moments.count).numpy())
    return torch.from_numpy(evals[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())


def _check_init_rows(a, moments, whitened):
    """Rows of A are the top eigenvectors of E[xxᵀ]; whitened: scaled by 1/√λ_i, mean squared row norm 1."""
    evals, vecs = _independent_eigh(moments)
    rank = a.shape[0]
    a = a.detach().double()
    cos = torch.nn.functional.cosine_similarity(a, vecs[:, :rank].T, dim=1)
    assert torch.allclose(cos.abs(), torch.ones_like(cos), atol=1e-5)
    norms = a.norm(dim=1)
    assert norms.pow(2).mean() == pytest.approx(1.0, rel=1e-5)
    if whitened:  # ‖a_i‖ ∝ 1/√λ_i: the components of A·x have equal second moments
        torch.testing.assert_close(norms * evals[:rank].sqrt(), (norms * evals[:rank].sqrt()).mean().expand(rank),
                                   rtol=1e-4, atol=0)
        second = torch.einsum("ri,ij,rj->r", a, (moments.outer / moments.count), a)
        torch.testing.assert_close(second, second.mean().expand(rank), rtol=1e-4, atol=0)
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=0)


@pytest.mark.parametrize("init", ["principal", "whitened"])
def test_data_init_sets_eigenvectors_and_keeps_outputs(init):
    pm, cfg = _spectral("llama", spectral_init=init)
    batch = random_batch(seed=5)
    assert torch.equal(_out(pm, batch), _out(TINY_MODELS["llama"](), batch))  # B = 0
    for m in cfg.spectral_allocation["modules"]:
        if m["rank"] > 1:
            a = pm.base_model.model.get_submodule(m["name"]).lora_A["default"].weight  # (rank, in)
            _check_init_rows(a, cfg.stats.input_of(m["name"]), init == "whitened")


@pytest.mark.parametrize("name, task_type, expected", [("llama", None, "whitened"), ("gpt2", None, "whitened"),
                                                        ("bert", None, "standard"), ("llama", "SEQ_CLS", "standard"),
                                                        ("llama", "CAUSAL_LM", "whitened")])
def test_auto_init_is_whitened_for_causal_lms_only(name, task_type, expected, tmp_path):
    pm, cfg = _spectral(name, task_type=task_type) if task_type else _spectral(name)
    assert cfg.spectral_init == expected
    m = max(cfg.spectral_allocation["modules"], key=lambda m: m["rank"])
    a = pm.base_model.model.get_submodule(m["name"]).lora_A["default"].weight
    if expected == "whitened":  # A really is the whitened eigenbasis, checked against numpy's eigh
        _check_init_rows(a, cfg.stats.input_of(m["name"]), True)
    else:  # PEFT's own random A: not the eigenbasis
        evals, vecs = _independent_eigh(cfg.stats.input_of(m["name"]))
        cos = torch.nn.functional.cosine_similarity(a.detach().double(), vecs[:, : a.shape[0]].T, dim=1)
        assert cos.abs().max() < 0.99
    pm.save_pretrained(tmp_path)  # saved resolved, so a reload never depends on how "auto" is defined
    assert json.loads((tmp_path / "adapter_config.json").read_text())["spectral_init"] == expected


@pytest.mark.parametrize("d,k", [(640, 8), (640, 48), (1536, 32)])
def test_randomized_eigensolver_matches_eigh(d, k, monkeypatch):
    """d >= 512 (every SmolLM2 input) takes randomized subspace iteration: top-k eigenpairs as torch.linalg.eigh's,
    with the sign convention of sym_eigh, on a spectrum like an activation's (a few huge directions, a slow tail)."""
    import importlib

    alloc = importlib.import_module("hf_geocomp.lora.allocate")

    g = torch.Generator().manual_seed(d + k)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -1.0
    lam[:3] = torch.tensor([400.0, 60.0, 9.0])  # massive activations
    cov = (q * lam) @ q.T
    full_solves = []
    real = alloc.sym_eigh
    monkeypatch.setattr(alloc, "sym_eigh", lambda m: full_solves.append(m.shape) or real(m))
    evals, vecs = alloc.top_eigenvectors(cov, k)
    assert (d, d) not in full_solves  # the randomized branch ran
    ref_vals, ref_vecs = torch.linalg.eigh(cov)
    ref_vals, ref_vecs = ref_vals.flip(0)[:k], ref_vecs.flip(1)[:, :k]
    torch.testing.assert_close(evals, ref_vals, rtol=1e-7, atol=0)
    idx = ref_vecs.abs().argmax(0)
    ref_vecs = ref_vecs * torch.sign(ref_vecs[idx, torch.arange(k)])  # largest-magnitude entry positive
    torch.testing.assert_close(vecs, ref_vecs, rtol=0, atol=1e-4)  # a wrong sign, order or vector is O(1)
    assert (vecs * ref_vecs).sum(0).min() > 1 - 1e-6


FRESH = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from conftest import TINY_MODELS, random_batch
from peft import PeftModel
name, folder, plain, expected = {name!r}, {folder!r}, {plain!r}, torch.load({expected!r})
def out(m):
    with torch.no_grad():
        o = m(**random_batch(seed=7))
    return o.logits if hasattr(o, "logits") else o.last_hidden_state
report = {{}}
try:
    PeftModel.from_pretrained(TINY_MODELS[name](), folder)
except Exception as e:
    report["without_plugin"] = f"{{type(e).__name__}}: {{e}}"
report["plain_equal"] = torch.equal(out(PeftModel.from_pretrained(TINY_MODELS[name](), plain)), expected)
report["plugin_imported_before"] = "hf_geocomp" in sys.modules
import hf_geocomp
m = PeftModel.from_pretrained(TINY_MODELS[name](), folder)
report["config"] = type(m.peft_config["default"]).__name__
report["spectral_equal"] = torch.equal(out(m), expected)
print(json.dumps(report))
"""


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_save_load_fresh_process_and_plain_export(name, tmp_path):
    pm, _ = _spectral(name, spectral_init="principal")
    with torch.no_grad():  # make the adapters matter
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "spectral")
    export_plain_lora(pm, str(tmp_path / "plain"))
    torch.save(_out(pm, random_batch(seed=7)), tmp_path / "expected.pt")
    meta = json.loads((tmp_path / "plain" / "spectral_metadata.json").read_text())
    assert meta["params"] == _lora_params(pm) and "df" in meta["modules"][0]["spectrum"]
    script = FRESH.format(tests=str(__import__("pathlib").Path(__file__).parent), name=name,
                          folder=str(tmp_path / "spectral"), plain=str(tmp_path / "plain"),
                          expected=str(tmp_path / "expected.pt"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert "pip install hf-geocomp" in report["without_plugin"] and "import hf_geocomp" in report["without_plugin"]
    assert report["plain_equal"] and not report["plugin_imported_before"]
    assert report["config"] == "SpectralLoraConfig" and report["spectral_equal"]


@pytest.mark.parametrize("kwargs, match", [
    ({"allocation": "magic"}, "allocation must be"),
    ({"spectral_init": "zeros"}, "spectral_init must be"),
    ({"tau": 0.0}, "tau must be"),
    ({"min_rank": 0}, "min_rank must be"),
    ({"use_dora": True}, "use_dora"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(GeoCompError, match=match):
        SpectralLoraConfig(r=4, target_modules=TARGETS["llama"], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 10}, "below the .* needed"),  # less than one rank-1 adapter per target
    ({"target_modules": ["nonexistent_proj"]}, "match no module"),
    ({"r": 40}, "exceeds min\\(in, out\\)"),
    ({"budget": 10 ** 7}, "exceeds the .* rank limits allow"),
])
def test_bad_input(kwargs, match):
    model = TINY_MODELS["llama"]()
    cfg = SpectralLoraConfig(**{"r": 4, "target_modules": TARGETS["llama"], **kwargs})
    cfg.stats = _stats(model)
    with pytest.raises(GeoCompError, match=match):
        get_peft_model(model, cfg)


def test_foreign_or_stale_statistics_are_refused_by_get_peft_model():
    model = TINY_MODELS["llama"]()
    cfg = SpectralLoraConfig(r=2, target_modules=TARGETS["llama"])
    wide = type(model)(model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 64}))
    cfg.stats = _stats(wide)  # the same module names, other shapes
    with pytest.raises(GeoCompError, match="different model"):
        get_peft_model(model, cfg)
    cfg.stats = _stats(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    with pytest.raises(GeoCompError, match="stale"):
        get_peft_model(model, cfg)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # refused before any adapter was built


@pytest.mark.parametrize("kw", [{"budget": 1500}, {"budget": 6000, "allocation": "k_tau"}])
def test_explicit_budget_is_spent(kw):
    pm, cfg = _spectral("llama", **kw)
    assert cfg.spectral_allocation["budget"] == kw["budget"]
    assert 0.99 * kw["budget"] <= _lora_params(pm) <= kw["budget"]


def test_min_and_max_rank_bound_every_module():
    free = [m["rank"] for m in _spectral("llama", r=4)[1].spectral_allocation["modules"]]
    assert min(free) < 3 and max(free) > 4
    for kw, lo, hi in (({"min_rank": 3}, 3, None), ({"max_rank": 4}, None, 4)):
        pm, cfg = _spectral("llama", r=4, **kw)
        ranks = [m["rank"] for m in cfg.spectral_allocation["modules"]]
        assert (lo is None or min(ranks) == lo) and (hi is None or max(ranks) == hi)
        assert 0.99 * cfg.spectral_allocation["budget"] <= _lora_params(pm) <= cfg.spectral_allocation["budget"]


def test_uniform_allocation_is_uniform_lora():
    """The H2 control: allocation='uniform' gives every module the reference rank (and the same parameters)."""
    pm, cfg = _spectral("llama", r=4, allocation="uniform")
    assert {m["rank"] for m in cfg.spectral_allocation["modules"]} == {4}
    plain = get_peft_model(TINY_MODELS["llama"](), __import__("peft").LoraConfig(r=4, target_modules=TARGETS["llama"]))
    assert _lora_params(pm) == _lora_params(plain) == cfg.spectral_allocation["budget"]


def test_statistics_missing_a_target_or_absent():
    model = TINY_MODELS["llama"]()
    cfg = SpectralLoraConfig(r=2, target_modules=["q_proj", "o_proj"])
    cfg.stats = collect_stats(model, [random_batch()], linear_input_taps(model, ["*.q_proj"]))
    with pytest.raises(GeoCompError, match="o_proj"):
        get_peft_model(model, cfg)
    with pytest.raises(GeoCompError, match="needs activation statistics"):
        get_peft_model(TINY_MODELS["llama"](), SpectralLoraConfig(r=2, target_modules=["q_proj"]))


def test_stats_file_and_trainer_with_gradient_accumulation(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = TINY_MODELS["llama"]()
    _stats(model).save(str(tmp_path / "stats.safetensors"))
    pm = get_peft_model(model, SpectralLoraConfig(r=4, target_modules=TARGETS["llama"], spectral_init="principal",
                                                  stats_file=str(tmp_path / "stats.safetensors")))
    rows = [random_batch(batch=1, seq=12, seed=i) for i in range(8)]
    data = [{"input_ids": r["input_ids"][0], "attention_mask": r["attention_mask"][0],
             "labels": r["input_ids"][0]} for r in rows]
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, report_to=[],
                             save_strategy="no", logging_steps=1, use_cpu=True)
    result = Trainer(model=pm, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    for n, p in pm.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == ("lora_" in n), n  # adapters train, the base model stays frozen


def _allocation_worker(rank, world_size, port, out_path):
    import os

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from .test_distributed import Blocks

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="yes", GLOO_SOCKET_IFNAME="lo",
                      OMP_NUM_THREADS="1")
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=False))
    model = TINY_MODELS["llama"]()
    loader = acc.prepare(torch.utils.data.DataLoader(Blocks(9), batch_size=2))
    cfg = SpectralLoraConfig(r=4, target_modules=TARGETS["llama"])
    cfg.stats = collect_stats(model, loader, linear_input_taps(model), compute_dtype=torch.float64)
    get_peft_model(model, cfg)
    with open(f"{out_path}.rank{acc.process_index}", "w") as f:
        json.dump({m["name"]: m["rank"] for m in cfg.spectral_allocation["modules"]}, f)


def test_two_processes_allocate_identically(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from .test_distributed import Blocks

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "ranks")
    mp.spawn(_allocation_worker, args=(2, port, out), nprocs=2, join=True)
    model = TINY_MODELS["llama"]()
    cfg = SpectralLoraConfig(r=4, target_modules=TARGETS["llama"])
    cfg.stats = collect_stats(model, torch.utils.data.DataLoader(Blocks(9), batch_size=2), linear_input_taps(model),
                              compute_dtype=torch.float64)
    get_peft_model(model, cfg)
    single = {m["name"]: m["rank"] for m in cfg.spectral_allocation["modules"]}
    ranks = [json.loads(open(f"{out}.rank{r}").read()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == single


def test_bench_summary_and_cli_error(capsys, tmp_path):
    from hf_geocomp.cli import main
    from hf_geocomp.studies.lora_bench import summarize

    rows = [{"method": m, "seed": s, "accuracy": a, "params": 10, "init_share": 0.01}
            for m, accs in {"lora": [0.5, 0.6, 0.55], "spectral-df": [0.6, 0.7, 0.66]}.items()
            for s, a in enumerate(accs)]
    spectral = {s["method"]: s for s in summarize(rows)}["spectral-df"]
    assert spectral["diff_vs_lora"] == pytest.approx(0.1033333)
    assert 0 < spectral["p_vs_lora"] < 0.05
    assert spectral["control"] == "lora" and spectral["p_vs_control"] == spectral["p_vs_lora"]
    # a data-initialised variant is held against uniform ranks with the same initialisation
    rows += [{"method": m, "seed": s, "accuracy": a, "params": 10, "init_share": 0.02}
             for m, accs in {"uniform-whitened": [0.4, 0.5, 0.45], "spectral-df-whitened": [0.41, 0.52, 0.45]}.items()
             for s, a in enumerate(accs)]
    summary = {s["method"]: s for s in summarize(rows)}
    assert summary["spectral-df-whitened"]["control"] == "uniform-whitened"
    assert summary["spectral-df-whitened"]["diff_vs_control"] == pytest.approx(0.01)
    assert "control" not in summary["uniform-whitened"] and "control" not in summary["lora"]
    assert main(["lora-bench", "--methods", "bogus", "-o", str(tmp_path / "h2.json")]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err


def _lm_rows(n=12, seq=12):
    return [{"input_ids": r["input_ids"][0], "attention_mask": r["attention_mask"][0], "labels": r["input_ids"][0]}
            for r in (random_batch(batch=1, seq=seq, seed=i) for i in range(n))]


def test_adalora_callback_reaches_target_budget(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_geocomp.studies.lora_baselines import AdaLoraCallback, adalora_config, adalora_params, adalora_ranks

    steps, target_r = 10, 2
    pm = get_peft_model(TINY_MODELS["llama"](), adalora_config(target_r, steps, lora_alpha=4,
                                                                   target_modules=["q_proj", "v_proj", "down_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=pm, args=args, train_dataset=_lm_rows(), callbacks=[AdaLoraCallback()]).train()
    ranks = adalora_ranks(pm)
    assert len(ranks) == 6 and sum(ranks.values()) == target_r * 6  # the budget reached target_r on average
    assert len(set(ranks.values())) > 1  # and was moved between modules
    shapes = {"q_proj": 32 + 32, "v_proj": 32 + 16, "down_proj": 48 + 32}  # (in + out) of the tiny Llama
    assert adalora_params(pm) == sum(r * (shapes[n.rsplit(".", 1)[1]] + 1) for n, r in ranks.items())
    # masked ranks are zero in lora_E after training
    for name, p in pm.named_parameters():
        if ".lora_E." in name:
            assert int((p != 0).sum()) <= ranks[name.split(".lora_E.")[0].replace("base_model.model.", "")]


def test_adalora_callback_refuses_wrong_total_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_geocomp.studies.lora_baselines import AdaLoraCallback, adalora_config

    pm = get_peft_model(TINY_MODELS["llama"](), adalora_config(2, 20, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=5, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    with pytest.raises(GeoCompError, match="total_step is 20 but this run has 5"):
        Trainer(model=pm, args=args, train_dataset=_lm_rows(), callbacks=[AdaLoraCallback()]).train()
    with pytest.raises(GeoCompError, match="at least 3 training steps"):
        adalora_config(2, 2, target_modules=["q_proj"])


def test_eva_baseline_builds_with_uniform_parameter_count():
    from hf_geocomp.studies.lora_baselines import build_eva

    loader = [{**random_batch(batch=4, seq=16, seed=i)} for i in range(6)]
    common = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], lora_dropout=0.0)
    pm, passes = build_eva(TINY_MODELS["llama"](), common, loader)
    assert 1 < passes <= 200
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
              "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    assert _lora_params(pm) == 2 * uniform_params(shapes, 4)  # rho=1: rank r everywhere, as uniform LoRA
    a = pm.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight  # (4, 48): input directions
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-4)
    with pytest.raises(GeoCompError, match="did not converge within 2 forward passes"):
        build_eva(TINY_MODELS["llama"](), common, loader, tau=1.0, max_passes=2)


def test_lm_bench_end_to_end(tiny_llama_dir, tmp_path, capsys):
    from hf_geocomp.cli import main

    out = tmp_path / "lora_lm.json"
    argv = ["lora-lm-bench", "--model", tiny_llama_dir, "--data", "pydoc:calibration", "--tokens", "256",
            "--block-size", "32", "--train-data", "pydoc:calibration", "--eval-data", "pydoc:evaluation",
            "--eval-tokens", "256", "--eval-block", "32", "--train-block", "16", "--steps", "4", "--r", "2",
            "--targets", "q_proj", "down_proj", "--seeds", "2", "--methods", "lora", "spectral-df", "eva", "adalora",
            "-o", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "hf-geocomp " + " ".join(argv) and not result["partial"]
    assert result["baseline"]["ppl"] > 1
    rows = {(r["method"], r["seed"]): r for r in result["rows"]}
    assert len(rows) == 8 and all(r["steps"] == 4 and r["ppl"] > 1 for r in rows.values())
    lora = rows["lora", 0]["params"]
    assert lora == 2 * 2 * ((32 + 32) + (48 + 32))  # 2 layers × rank 2 × (in + out) of q_proj and down_proj
    assert 0.99 * lora <= rows["spectral-df", 0]["params"] <= lora and rows["eva", 0]["params"] == lora
    assert sum(rows["adalora", 0]["ranks"]) == 2 * 4  # AdaLoRA: target_r × modules ranks at the end
    summary = {s["method"]: s for s in result["summary"]}
    assert set(summary["spectral-df"]) >= {"ppl_mean", "ppl_sd", "p_vs_lora", "p_vs_eva"}
    assert main(argv[:-2] + ["--methods", "bogus"]) == 2

    # a second invocation of the same setting reproduces LoRA exactly, and lora-merge joins the two
    methods_at = argv.index("--methods")
    second = tmp_path / "lora_lm_kind.json"
    argv2 = argv[:methods_at + 1] + ["lora", "spectral-df-kind", "-o", str(second)]
    assert main(argv2) == 0
    rows2 = {(r["method"], r["seed"]): r for r in json.loads(second.read_text())["rows"]}
    assert [rows2["lora", s]["ppl"] for s in (0, 1)] == [rows["lora", s]["ppl"] for s in (0, 1)]
    merged_path = tmp_path / "merged.json"
    assert main(["lora-merge", str(out), str(second), "-o", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert len(merged["rows"]) == 10 and merged["sources"] == [str(out), str(second)]
    kind = {s["method"]: s for s in merged["summary"]}["spectral-df-kind"]
    assert {"p_vs_lora", "p_vs_eva"} <= set(kind) and kind["seeds"] == 2

    # files of different settings, or disagreeing rows, are refused
    bad = json.loads(second.read_text())
    bad["rows"][0]["ppl"] += 1.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["lora-merge", str(out), str(tmp_path / "bad.json"), "-o", str(tmp_path / "m2.json")]) == 2
    assert "are not one setting" in capsys.readouterr().err
    bad = json.loads(second.read_text())
    bad["hyperparameters"]["lr"] = 0.5
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["lora-merge", str(out), str(tmp_path / "bad.json"), "-o", str(tmp_path / "m2.json")]) == 2
    assert "differs from" in capsys.readouterr().err and not (tmp_path / "m2.json").exists()
    for rel, ok in ((1e-8, True), (1e-4, False)):  # the untuned score may move in its last digits, no more
        drifted = json.loads(second.read_text())
        drifted["baseline"]["ppl"] *= 1 + rel
        (tmp_path / "drift.json").write_text(json.dumps(drifted))
        m3 = tmp_path / f"m3_{ok}.json"
        assert main(["lora-merge", str(out), str(tmp_path / "drift.json"), "-o", str(m3)]) == (0 if ok else 2)
        assert m3.exists() == ok


def test_lora_taps_are_the_targets_inputs_and_allocate_the_same():
    """lora_taps measures only the target modules' inputs (q and v share one product) and gives the
    allocation and initialisation that statistics of every linear input give."""
    from hf_geocomp.lora import lora_taps

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    batches = [random_batch(seed=i, pad_last=i) for i in range(3)]
    plans = []
    for taps in (lambda m, c: linear_input_taps(m), lora_taps):
        model = TINY_MODELS["llama"]()
        cfg = SpectralLoraConfig(r=4, lora_alpha=8, target_modules=targets, spectral_init="whitened")
        cfg.stats = collect_stats(model, batches, taps(model, cfg))
        pm = get_peft_model(model, cfg)
        plans.append((cfg.spectral_allocation, {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_A" in n}))
        if taps is lora_taps:
            assert sorted(t.module.rsplit(".", 1)[1] for t in taps(TINY_MODELS["llama"](), cfg)) == sorted(targets * 2)
            assert len(cfg.stats.moments) == 2 * 3  # per layer: attention (q, v), MLP (up) and down_proj inputs
    assert plans[0][0] == plans[1][0]
    for n, a in plans[0][1].items():
        torch.testing.assert_close(plans[1][1][n], a, rtol=1e-6, atol=1e-6)
