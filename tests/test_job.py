"""The main job end to end on a tiny model: recipe → compressed folder that reloads, results, plots, card."""

import json
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
