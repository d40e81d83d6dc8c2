"""``hf-geocomp export-onnx``: tiny pruned (uniform, non-uniform), folded and three-factor Llama (GQA) and Qwen2
models exported, reloaded in ONNX Runtime and compared with PyTorch; refusals before any weights are read."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import hf_geocomp  # noqa: F401  (registers the quantizer: compressed folders reload compressed)
from hf_geocomp import kv
from hf_geocomp.cli import main
from hf_geocomp.geometry import collect_stats
from hf_geocomp.hub import mark_compressed
from hf_geocomp.hub.onnx import PACKAGES, REPORT
from hf_geocomp.prune import prune, prune_taps

from .conftest import _tiny_tokenizer, random_batch
from .families import llama3, qwen2

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in PACKAGES),
                                reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed: "
                                       "pip install 'hf-geocomp[onnx]'")

BATCHES = [random_batch(2, 16, seed=i) for i in range(3)]


def _pruned(model, **kw):
    stats = collect_stats(model, BATCHES, prune_taps(model, kw["targets"]))
    return prune(model, stats, sparsity=0.3, compensation="bias+refit", **kw)[1]


def llama_nonuniform():
    """Widths and query heads differ per layer (global allocation over MLP neurons and heads)."""
    model = llama3()
    mark_compressed(model, _pruned(model, targets=("mlp", "heads"), allocation="global"))
    return model


def qwen2_uniform_kv():
    """Uniformly pruned MLPs, and a coded KV cache (which ONNX cannot hold)."""
    model = qwen2()
    plan = _pruned(model, targets=("mlp",), allocation="uniform")
    _, kv_plan = kv.compress(model, BATCHES, budget=0.5, method="aware", group_size=8, sink_tokens=2,
                             reference_tokens=16)
    mark_compressed(model, plan, kv_plan)
    return model


def qwen2_folded():
    """Neurons and whole GQA groups folded (global allocation): widths differ per layer, one KV head is left."""
    from hf_geocomp.fold import fold

    model = qwen2()
    fold(model, sparsity=0.5, targets="mlp+heads", head_mode="kv", allocation="global")
    mark_compressed(model)
    return model


def llama_three_factor():
    """Every MLP projection replaced by W ≈ L·C·Rᵀ (K-FAC subspaces)."""
    from hf_geocomp.curvature import CurvatureConfig, compress, kfac_factors

    model = llama3()
    compress(model, kfac_factors(model, BATCHES[:1]), CurvatureConfig(keep=0.3))
    mark_compressed(model)
    return model


MODELS = {f.__name__: f for f in (llama_nonuniform, qwen2_uniform_kv, qwen2_folded, llama_three_factor)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-models")
    out, tok = {}, _tiny_tokenizer()
    for name, make in MODELS.items():
        make().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _ort_generate(folder, ids, mask, steps=2):
    """Plain onnxruntime on the saved graphs (not the exporter's own code): the prefill graph, then one-token
    steps of the with-past graph feeding back its cache; the logits of every call."""
    import onnxruntime as ort

    prefill, decode = (ort.InferenceSession(str(folder / f"{g}.onnx"), providers=["CPUExecutionProvider"])
                       for g in ("prefill", "decode"))
    pos = np.cumsum(mask, -1) - 1
    outs = prefill.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": np.where(mask == 1, pos, 1)})
    names = [o.name for o in prefill.get_outputs()][1:]
    logits, cache = [outs[0]], outs[1:]
    for _ in range(steps):
        nxt = logits[-1][:, -1:].argmax(-1)
        mask = np.concatenate([mask, np.ones_like(nxt)], 1)
        feed = {"input_ids": nxt, "attention_mask": mask, "position_ids": mask.sum(-1, keepdims=True) - 1,
                **{f"input.{n}": c for n, c in zip(names, cache)}}
        outs = decode.run(None, feed)
        logits.append(outs[0])
        cache = outs[1:]
    return logits, cache


def _torch_generate(model, ids, mask, steps=2):
    from transformers import DynamicCache

    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    past, logits = DynamicCache(config=model.config), []
    past._is_user_defined = True  # a KV-coded model would swap in its coded cache otherwise
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past)
            logits.append(out.logits.numpy())
            ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            pos = mask.sum(-1, keepdim=True) - 1
    return logits


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_pytorch(folders, tmp_path, name, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "onnx"
    flags = ["--without-kv-coding"] if name == "qwen2_uniform_kv" else []
    assert main(["export-onnx", str(folders[name]), str(out), *flags]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / REPORT).read_text())
    parity = report["parity"]
    assert f"{parity['prefill']['max_abs_diff']:.3g} without a past" in printed
    for graph in ("prefill", "decode"):
        assert parity[graph]["within_tolerance"] and parity[graph]["max_abs_diff"] < 1e-4
    assert {(r["graph"], r["batch"]) for r in parity["runs"]} == {(g, b) for g in ("prefill", "decode") for b in (1, 2)}
    assert {"prefill.onnx", "decode.onnx", "export.json", "config.json"} <= {p.name for p in out.iterdir()}

    model = AutoModelForCausalLM.from_pretrained(folders[name], dtype=torch.float32).eval()
    plan = model.config.quantization_config.plan
    if name == "qwen2_uniform_kv":
        assert "plain float KV cache" in printed and "coded cache" in report["kv_coding"]
    import onnxruntime as ort

    decode = ort.InferenceSession(str(out / "decode.onnx"), providers=["CPUExecutionProvider"])
    kv_heads = [i.shape[1] for i in decode.get_inputs() if i.name.endswith(".keys")]
    assert kv_heads == plan["shapes"]["num_kv_heads"]  # per-layer head counts are the cache's shapes
    shapes = plan["shapes"]
    if name == "llama_nonuniform":
        assert len(set(shapes["mlp_widths"])) > 1 and len(set(shapes["num_heads"])) > 1
    if name == "qwen2_folded":
        assert len(set(shapes["mlp_widths"])) > 1 and shapes["num_kv_heads"] == [1, 1]
    if name == "llama_three_factor":
        assert report["plan"]["replaced_modules"] == 6
    # a batch of three (a size the command never checked), one row padded, 12 prompt tokens then 2 steps: past the
    # tiny Qwen2's 12-token sliding window
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(5)).numpy()
    mask = np.ones_like(ids)
    mask[2, :4] = 0
    got, cache = _ort_generate(out, ids, mask)
    ref = _torch_generate(model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[0][real] - ref[0][real]).max() < 1e-4
    for g, r in zip(got[1:], ref[1:]):
        assert np.abs(g - r).max() < 1e-4
    assert cache[0].shape[2] == 14  # the with-past graph's cache grew by one token a step


def _no_weights(monkeypatch):
    """Make reading any weights fail the test: refusals must come from the config alone."""
    import hf_geocomp.data
    import hf_geocomp.studies.onnx_bench

    def fail(*a, **k):
        raise AssertionError("weights were loaded before the refusal")

    for module in (hf_geocomp.data, hf_geocomp.studies.onnx_bench):
        monkeypatch.setattr(module, "load_model", fail)


def test_coded_kv_cache_is_refused(folders, tmp_path, monkeypatch, capsys):
    _no_weights(monkeypatch)
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(folders["qwen2_uniform_kv"]), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "codes its KV cache" in err and "--without-kv-coding" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_outputs_and_inputs(folders, tmp_path, monkeypatch, capsys):
    _no_weights(monkeypatch)
    model = str(folders["llama_nonuniform"])
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = [(str(a_file), [], "already exists"), (str(a_file / "onnx"), [], "is a file, not a folder"),
             (str(full), [], "not empty"), (model, ["--overwrite"], "would replace the model"),
             (str(folders["llama_nonuniform"].parent), ["--overwrite"], "would replace the model"),
             (str(tmp_path / "ok"), ["--tolerance", "0"], "tolerance must be a positive number")]
    for out, flags, message in cases:
        assert main(["export-onnx", model, out, *flags]) == 2, out
        assert message in capsys.readouterr().err, message
    assert (full / "keep.txt").exists() and not (tmp_path / "ok").exists()
    bert = tmp_path / "bert"
    from .conftest import tiny_bert

    tiny_bert().save_pretrained(bert)
    assert main(["export-onnx", str(bert), str(tmp_path / "b")]) == 2
    assert "exports causal language models" in capsys.readouterr().err


def test_missing_extra_names_the_install(monkeypatch):
    from hf_geocomp.errors import GeoCompError
    from hf_geocomp.hub import onnx

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(GeoCompError, match=r"needs onnxscript: .*pip install 'hf-geocomp\[onnx\]'"):
        onnx.require_onnx()


def test_bench_refuses_before_any_work(folders, tmp_path, monkeypatch, capsys):
    _no_weights(monkeypatch)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    base = ["bench-onnx", "--model", str(folders["llama_nonuniform"]), "-o", str(tmp_path / "r.json")]
    assert main([*base, "--onnx-dir", str(full)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(base) == 2  # a compressed folder is timed as it is, never pruned again
    assert "already compressed; pass --sparsity 0" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_tolerance_scales_with_the_logits():
    from hf_geocomp.hub.onnx import summarize

    runs = [{"graph": "prefill", "max_abs_diff": 5e-4, "max_abs_logit": 10.0},
            {"graph": "decode", "max_abs_diff": 5e-4, "max_abs_logit": 2.0},
            {"graph": "decode", "max_abs_diff": 1e-6, "max_abs_logit": 0.3}]
    out = summarize(runs, 1e-4)
    assert out["prefill"]["within_tolerance"] and out["prefill"]["allowed"] == pytest.approx(1e-3)
    assert not out["decode"]["within_tolerance"] and out["decode"]["allowed"] == pytest.approx(2e-4)
    small = [{**runs[2], "graph": g} for g in ("prefill", "decode")]
    assert summarize(small, 1e-4)["decode"]["allowed"] == pytest.approx(1e-4)  # never below the tolerance itself
