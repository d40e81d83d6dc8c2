"""Model cards with real numbers, atomic export (injected failure, killed process), the export/push commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_geocomp.cli import main
from hf_geocomp.data import calibration_loader
from hf_geocomp.errors import GeoCompError
from hf_geocomp.eval.perplexity import perplexity
from hf_geocomp.hub import GeoCompConfig, export, push
from hf_geocomp.hub.card import template_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, text_file):
    req = GeoCompConfig(prune=dict(sparsity=0.3, targets=["mlp"], allocation="global", compensation="bias+refit"),
                        kv=dict(budget=0.5, method="aware", group_size=8, sink_tokens=2, reference_tokens=16),
                        calibration="pydoc:calibration", tokens=256, block_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=req)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    held_out = list(calibration_loader(model, tok, f"file:{text_file}", 256, 32))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    results = {"command": "pytest tests/test_hub_export.py", "model": "tiny-llama", "data": f"file:{text_file}",
               "baseline": {"ppl": perplexity(base, held_out), "params": base.num_parameters()},
               "rows": [{"method": "geocomp", "ppl": perplexity(model, held_out), "params": model.num_parameters(),
                         "eval_data": "held-out pydoc topics"}]}
    results["rows"][0]["ppl_ratio"] = results["rows"][0]["ppl"] / results["baseline"]["ppl"]
    return model, tok, results


def test_card_with_real_numbers(compressed, tmp_path):
    from huggingface_hub import ModelCard

    model, tok, results = compressed
    out = export(model, str(tmp_path / "out"), results=results, tokenizer=tok, base_model="org/tiny-base",
                 repo_id="org/tiny-geocomp")
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "org/tiny-base" and meta["library_name"] == "transformers"
    assert meta["base_model_relation"] == "quantized" and "hf-geocomp" in meta["tags"] and "kv-cache" in meta["tags"]
    ppl = meta["model-index"][0]["results"][0]["metrics"][0]
    assert ppl["type"] == "perplexity" and ppl["value"] == round(results["rows"][0]["ppl"], 4)
    plan = model.config.quantization_config.plan
    body = card.text
    assert f"{plan['prune']['achieved_sparsity']:.1%}" in body and f"{plan['kv']['bytes_per_token']} of " in body
    assert f"{results['baseline']['ppl']:.4g}" in body and "import hf_geocomp" in body and "plan.png" in body
    assert all(f"| {i} | {w} |" in body for i, w in enumerate(plan["shapes"]["mlp_widths"]))
    assert (out / "plan.png").stat().st_size > 1000 and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".out.*"))
    assert json.loads((out / "results.json").read_text()) == results
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(GeoCompError, match="already exists and is not empty"):
        export(model, str(out))
    with pytest.raises(GeoCompError, match="not valid"):
        export(model, str(tmp_path / "other"), repo_id="bad repo id!")
    assert not (tmp_path / "other").exists()


def test_export_is_atomic_under_an_exception(compressed, tmp_path, monkeypatch):
    model, tok, _ = compressed

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("hf_geocomp.hub.card.render_card", broken)  # after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, str(tmp_path / "out"), tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


KILLED = """
import sys, time
import hf_geocomp
from transformers import AutoModelForCausalLM
from hf_geocomp.hub import export
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
save = model.save_pretrained
def slow_save(folder, **kw):
    save(folder, **kw)
    open(sys.argv[3], "w").write("written")
    time.sleep(600)
model.save_pretrained = slow_save
export(model, sys.argv[2])
"""


def test_export_is_atomic_under_a_kill(compressed, tmp_path):
    model, tok, _ = compressed
    src = export(model, str(tmp_path / "src"))
    flag, out = tmp_path / "flag", tmp_path / "exports" / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(src), str(out), str(flag)], env=env)
    try:
        deadline = time.time() + 240
        while not flag.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert flag.exists(), "the export never reached its weights"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert [p.name.startswith(".out.") for p in out.parent.iterdir()] == [True]  # only the hidden temp folder
    export(model, str(out))  # the next export removes the dead one's leftovers
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_export_and_push_commands(compressed, tmp_path, capsys):
    model, tok, results = compressed
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["export", str(saved), "-o", str(tmp_path / "out"), "--results", str(tmp_path / "results.json"),
                 "--base-model", "org/base", "--repo-id", "org/name"]) == 0
    assert "org/name" in (tmp_path / "out" / "README.md").read_text()
    assert main(["export", str(saved), "-o", str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "out"), "--repo-id", "not a repo"]) == 2
    assert "repo id 'not a repo' is not valid" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo-id", "org/name"]) == 2
    assert "not an exported model or adapter folder" in capsys.readouterr().err
    with pytest.raises(GeoCompError, match="needs a namespace"):
        push(str(tmp_path / "out"), "name-only")


def test_template_is_packaged():
    assert template_path() == REPO / "model_cards" / "geocomp_model.md"
