"""``import hf_geocomp`` and the CLI's start stay light, and the registrations still happen when their library is used.

Each check runs in a fresh interpreter: the test process itself has long imported torch, transformers and peft.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import random_batch, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft")
CLI = ("import atexit, sys\n"
       f"atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules),\n"
       "                              file=sys.stderr))\n"
       "from hf_geocomp.cli import main\n"
       "sys.exit(main(sys.argv[1:]))")


def _python(*args: str, timeout: float = 120) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started, res


@pytest.mark.parametrize("argv, status", [
    (["--version"], 0), (["--help"], 0), ([], 2), (["frobnicate"], 2), (["run", "--frobnicate"], 2),
    (["export"], 2), (["report", "--plot"], 2)])
def test_help_version_and_usage_errors_start_light(argv, status):
    """They answer without importing torch, transformers or peft (seconds each; 8 s in all before), within 2 s of
    the bare interpreter's start: the best of three tries, so that a loaded machine does not fail it."""
    bare = min(_python("-c", "pass")[0] for _ in range(3))
    for _ in range(3):
        took, res = _python("-c", CLI, *argv)
        if took - bare < 2:
            break
    assert res.returncode == status, res.stderr
    assert res.stderr.splitlines()[-1] == "HEAVY=", res.stderr  # nothing heavy was imported
    assert took - bare < 2, f"hf-geocomp {' '.join(argv)} took {took:.1f} s (the bare interpreter {bare:.1f} s)"
    assert ("hf-geocomp 0.1.0" in res.stdout) == (argv == ["--version"])


FRESH = r"""
import json, sys
HEAVY = ("torch", "transformers", "peft")
exec(sys.argv[1])  # the first import of hf_geocomp, or of the libraries
if sys.argv[1] == "import hf_geocomp":
    assert not [m for m in HEAVY if m in sys.modules], [m for m in HEAVY if m in sys.modules]
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
import hf_geocomp
model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
with torch.no_grad():
    equal = torch.equal(model(input_ids=torch.load(sys.argv[4])).logits, torch.load(sys.argv[5]))
base = LlamaForCausalLM(LlamaConfig.from_pretrained(sys.argv[2] + "-base"))
adapter = PeftModel.from_pretrained(base, sys.argv[3])
print(json.dumps({"quantization_config": type(model.config.quantization_config).__name__, "equal": equal,
                  "adapter_config": type(adapter.peft_config["default"]).__name__}))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama pruned to uneven MLP widths (stock transformers cannot build it) and a SpectralLoRA adapter."""
    import torch
    from peft import get_peft_model

    from hf_geocomp import SpectralLoraConfig, collect_stats, mark_compressed
    from hf_geocomp.geometry import linear_input_taps
    from hf_geocomp.prune import prune, prune_taps

    root = tmp_path_factory.mktemp("saved")
    model = tiny_llama()
    model.config.save_pretrained(root / "model-base")
    stats = collect_stats(model, [random_batch(2, 16, seed=i) for i in range(3)], prune_taps(model, ("mlp",)))
    _, plan = prune(model, stats, sparsity=0.3, targets=("mlp",), allocation="global")
    mark_compressed(model, plan)
    model.save_pretrained(root / "model")
    ids = random_batch(2, 12, seed=9)["input_ids"]
    torch.save(ids, root / "ids.pt")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, root / "logits.pt")
    cfg = SpectralLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg.stats = collect_stats(tiny_llama(), [random_batch(seed=i) for i in range(3)], linear_input_taps(tiny_llama()))
    get_peft_model(tiny_llama(), cfg).save_pretrained(root / "adapter")
    return [str(root / p) for p in ("model", "adapter", "ids.pt", "logits.pt")]


@pytest.mark.parametrize("first", [
    "import hf_geocomp", "from hf_geocomp import GeoCompConfig", "from hf_geocomp.hub import mark_compressed",
    "from hf_geocomp.kv import KVConfig", "import torch, peft, transformers.modeling_utils"])
def test_saved_models_and_adapters_load_after_import(first, saved):
    """After ``import hf_geocomp`` (before or after transformers and peft, and whichever of its modules loads them):
    ``from_pretrained`` reloads a compressed model whose shapes stock transformers cannot express, and
    ``PeftModel.from_pretrained`` a SpectralLoRA adapter."""
    _, res = _python("-c", FRESH, first, *saved, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1]) == {"quantization_config": "GeoCompConfig", "equal": True,
                                                       "adapter_config": "SpectralLoraConfig"}
