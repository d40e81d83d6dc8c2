"""The main job end to end on a tiny model: recipe → compressed folder that reloads, results, plots, card."""

import json
import re
from pathlib import Path

import pytest
import torch

from hf_geocomp.errors import GeoCompError
from hf_geocomp.recipes import load_job, to_yaml_dict


def tiny_job(tmp_path, tiny_llama_dir, text_file, **over):
    from hf_geocomp.job import JobConfig

    values = dict(model=tiny_llama_dir, calibration=f"file:{text_file}", tokens=256, block_size=32, batch_size=4,
                  eval_data=[f"file:{text_file}", "pydoc:evaluation"], eval_tokens=128, eval_block=32, windows=1,
                  prefill=48, score=16, prune_baselines=["magnitude"], kv_baselines=[],
                  output=str(tmp_path / "out"), prune=dict(sparsity=0.3), kv=dict(budget=0.5, method="aware"))
    values.update(over)
    return JobConfig.from_dict(values)


def test_default_recipe_file_is_the_built_in_job():
    assert to_yaml_dict(load_job(str(Path(__file__).parents[1] / "recipes/compress_smollm2.yaml"))) == to_yaml_dict(load_job(None))


def test_job_writes_a_folder_that_reloads_with_its_results(tmp_path, tiny_llama_dir, text_file, capsys):
    import hf_geocomp  # noqa: F401
    from transformers import AutoModelForCausalLM

    from hf_geocomp.job import run_job

    results = run_job(tiny_job(tmp_path, tiny_llama_dir, text_file), progress=False, command="hf-geocomp run test")
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "results.json", "README.md", "plan.png", "quality_vs_params.png",
            "quality_vs_kv_bytes.png", "recipe.yaml"} <= names
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"] == "hf-geocomp run test" and saved["rows"] == results["rows"]
    methods = {r["method"] for r in saved["rows"]}
    assert methods == {"prune-variance", "prune-magnitude", "prune+dynamic", "prune+geocomp-kv"}
    for r in saved["rows"]:
        assert r["ppl"] > 0 and r["ppl_ratio"] == pytest.approx(r["ppl"] / (
            saved["baseline"][f"ppl[{r['eval_data']}]"] if "params" in r else
            saved["baseline"][f"continuation_ppl[{r['eval_data']}]"]))
    kv = {r["eval_data"]: r for r in saved["rows"] if r["method"] == "prune+geocomp-kv"}
    dense = {r["eval_data"]: r for r in saved["rows"] if r["method"] == "prune+dynamic"}
    assert all(kv[s]["kv_bytes"] < dense[s]["kv_bytes"] for s in kv)
    assert all(0.25 < r["sparsity"] < 0.35 for r in saved["rows"] if "sparsity" in r)
    card = (out / "README.md").read_text()
    assert "hf-geocomp run test" in card and "import hf_geocomp" in card
    # the folder is the compressed model: reload gives the logits of the model the job measured
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert model.config.quantization_config.plan["kv"] is not None
    printed = capsys.readouterr().out
    assert "prune-variance" in printed and "estimated time" in printed and "reload check" in printed
    assert "a lower bound" in printed and saved["skipped"] == [] and "partial" not in saved


@pytest.mark.parametrize("over, message", [
    (dict(prune=dict(sparsity=1.5)), "section prune: sparsity must be in [0, 1)"),
    (dict(kv=dict(budget=0)), "section kv: budget must be"),
    (dict(prune=None, kv=None), "nothing to compress"),
    (dict(kv_baselines=["foo:4"]), "QuantizedCache baseline 'foo:4'"),
    (dict(tokens=0), "tokens must be at least 1"),
])
def test_bad_jobs_fail_before_loading(over, message, tmp_path, tiny_llama_dir, text_file):
    from hf_geocomp.job import run_job

    with pytest.raises(GeoCompError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_job(tiny_job(tmp_path, tiny_llama_dir, text_file, **over), progress=False)
    assert not (tmp_path / "out").exists()


def test_recipe_errors_name_the_key_and_file(tmp_path, capsys):
    from hf_geocomp.cli import main

    bad = tmp_path / "bad.yaml"
    for text, message in [("tokens: many\n", "key 'tokens' must be int, got 'many'"),
                          ("prune:\n  critrion: x\n", "section prune: unknown key 'critrion'"),
                          ("model: [unclosed\n", "is not valid YAML"),
                          ("- a list\n", "must be a mapping")]:
        bad.write_text(text)
        assert main(["run", str(bad), "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad) in err, err
    assert main(["run", "--set", "prune.sparsity=2", "-o", str(tmp_path / "o")]) == 2
    assert "the default recipe, section prune: sparsity must be in [0, 1)" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    assert main(["run", "-o", str(tmp_path / "o")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def _family_dir(tmp_path, name):
    """A saved tiny model of a family from tests/families.py, with the tiny tokenizer: a folder run_job loads."""
    from .conftest import _tiny_tokenizer
    from .families import FAMILIES

    path = tmp_path / name
    FAMILIES[name]().save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_models_skip_quantized_cache_baselines(family, tmp_path, text_file, capsys,
                                                              monkeypatch):
    """transformers' QuantizedCache refuses sliding-window layers: the default baseline is skipped with one line
    and recorded; named explicitly, it is refused before the weights load."""
    from hf_geocomp import data
    from hf_geocomp.job import run_job

    model_dir = _family_dir(tmp_path, family)
    results = run_job(tiny_job(tmp_path, model_dir, text_file, prune=None, kv_baselines=["quanto:4"]), progress=False)
    assert [s["method"] for s in results["skipped"]] == ["quantized-quanto-int4"]
    assert "sliding_attention" in results["skipped"][0]["reason"]
    assert not any("quantized" in r["method"] for r in results["rows"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped"] == results["skipped"]
    printed = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(printed) == 1 and "quantized-quanto-int4" in printed[0] and "full-attention" in printed[0]

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the baselines were checked")

    monkeypatch.setattr(data, "load_model", no_weights)
    with pytest.raises(GeoCompError, match="kv_baselines quanto:2 cannot run on this model: .*sliding_attention"):
        run_job(tiny_job(tmp_path, model_dir, text_file, kv_baselines=["quanto:2"], output=str(tmp_path / "o2")),
                progress=False)


def test_failed_run_keeps_partial_results_and_holds_one_pruned_copy(tmp_path, tiny_llama_dir, text_file,
                                                                    monkeypatch, capsys):
    """A stage that fails after measurements leaves <output>.partial.json (marked partial, with the error) and no
    model folder; the baselines are pruned one copy at a time, never a copy per baseline held at once."""
    import copy
    import types
    import weakref

    from hf_geocomp import job as job_module

    live, peak = set(), [0]

    def counted_deepcopy(obj, *args):
        out = copy.deepcopy(obj, *args)
        live.add(id(out))
        weakref.finalize(out, live.discard, id(out))
        peak[0] = max(peak[0], len(live))
        return out

    monkeypatch.setattr(job_module, "copy", types.SimpleNamespace(deepcopy=counted_deepcopy))  # job.py's copies only

    def failing_kv_stage(*args, **kwargs):
        raise RuntimeError("KV stage exploded")

    monkeypatch.setattr(job_module, "_kv_stage", failing_kv_stage)
    job = tiny_job(tmp_path, tiny_llama_dir, text_file, prune_baselines=["magnitude", "wanda"])
    with pytest.raises(RuntimeError, match="KV stage exploded"):
        job_module.run_job(job, progress=False)
    assert not (tmp_path / "out").exists()
    partial = json.loads((tmp_path / "out.partial.json").read_text())
    assert partial["partial"] is True and partial["failed_stage"] == "KV coding"
    assert partial["error"] == "RuntimeError: KV stage exploded"
    assert {r["method"] for r in partial["rows"]} == {"prune-variance", "prune-magnitude", "prune-wanda"}
    assert all(partial["baseline"][f"ppl[{s}]"] > 0 for s in job.eval_data)
    assert "partial" in capsys.readouterr().err
    assert peak[0] == 1  # one pruned baseline copy beside the base at a time (the recipe's own prunes the base)


def test_reload_check_reads_the_saved_cache_bases(tmp_path, tiny_llama_dir, text_file):
    """A corrupted geocomp_kv tensor in the export changes no forward without a past, but the continuation check
    (prefill into the coded cache, then scoring through it) catches it."""
    import hf_geocomp  # noqa: F401
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hf_geocomp.data import load_tokenizer
    from hf_geocomp.job import check_reload, run_job

    job = tiny_job(tmp_path, tiny_llama_dir, text_file, prune=None)
    run_job(job, progress=False)
    out = tmp_path / "out"
    measured = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(tiny_llama_dir)
    window = tok(open(text_file).read()[:2000], return_tensors="pt")["input_ids"][:, : job.prefill + job.score]
    assert check_reload(measured, str(out), window, job.prefill) < 1e-4  # the intact export passes
    weights = load_file(out / "model.safetensors")
    names = sorted(n for n in weights if n.startswith("geocomp_kv.") and n.endswith("_dec"))
    assert names
    for n in names:
        weights[n] = weights[n].flip(-1)  # wrong decoders, right shapes
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GeoCompError, match="reloads with different logits or cache continuation"):
        check_reload(measured, str(out), window, job.prefill)
    assert not out.exists()


@pytest.mark.parametrize("over, message", [
    (dict(threads=-1), "threads must be at least 1 (or null"),
    (dict(block_size=200), "block_size = 200 tokens exceeds the 128 positions"),
    (dict(prefill=100, score=64), "prefill + score = 164 tokens exceeds the 128 positions"),
    (dict(tokens=10 ** 12), "tokens = 1000000000000 but 'file:"),
    (dict(eval_tokens=10 ** 9), "eval_tokens = 1000000000 but 'file:"),
    (dict(windows=10 ** 6), "windows x (prefill + score) = 64000000 but 'file:"),
    (dict(calibration="TINY"), "gives zero blocks of 32 tokens"),
    (dict(output=""), "the output path is empty"),
    (dict(output="/proc/geocomp-out"), "cannot write '/proc/geocomp-out': the folder '/proc' is not writable"),
    (dict(output="/etc/hostname/out"), "cannot write '/etc/hostname/out': '/etc/hostname' is a file"),
])
def test_bad_jobs_found_from_config_and_tokenizer(over, message, tmp_path, tiny_llama_dir, text_file, monkeypatch):
    """Found before any weights load (the config and the tokenizer are enough), and never silently capped."""
    from hf_geocomp import data
    from hf_geocomp.job import run_job

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the job was checked")

    monkeypatch.setattr(data, "load_model", no_weights)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("twelve bytes")
    over = {k: (f"file:{tiny}" if v == "TINY" else v) for k, v in over.items()}
    with pytest.raises(GeoCompError, match=re.escape(message)):
        run_job(tiny_job(tmp_path, tiny_llama_dir, text_file, **over), progress=False)
    assert not (tmp_path / "out").exists()


def test_encoder_positions_message_names_prefill_and_score(tmp_path, tiny_bert_dir, text_file):
    """An encoder's positions (minilm-l6's 512, here a tiny BERT's 128) are checked against prefill + score, and
    the message names those settings, not a block size the user never set."""
    from hf_geocomp.job import run_job

    with pytest.raises(GeoCompError) as err:
        run_job(tiny_job(tmp_path, tiny_bert_dir, text_file, prefill=120, score=16), progress=False)
    assert "prefill + score = 136 tokens exceeds the 128 positions" in str(err.value)
    assert "block size" not in str(err.value)
