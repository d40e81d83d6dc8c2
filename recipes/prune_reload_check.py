"""Prune SmolLM2-135M one-shot, save it, reload it with stock from_pretrained, compare logits.

Run: PYTHONPATH=. python recipes/prune_reload_check.py  → recipes/results/prune_smollm2_reload.json
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

from hf_geocomp.data import calibration_loader, load_model
from hf_geocomp.geometry import collect_stats
from hf_geocomp.io import write_json
from hf_geocomp.prune import block_params, prune, prune_taps

rows = []
model0, tok = load_model("smollm2-135m")
calib = list(calibration_loader(model0, tok, "shakespeare:calibration", 2048))
ids = next(iter(calibration_loader(model0, tok, "shakespeare:evaluation", 512, block_size=256)))["input_ids"][:2]
for alloc in ("uniform", "global"):
    model, _ = load_model("smollm2-135m")
    stats = collect_stats(model, calib, prune_taps(model, ("mlp",)))
    prune(model, stats, sparsity=0.2, criterion="variance", targets=("mlp",), allocation=alloc,
          compensation="bias+refit")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        try:
            again = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            with torch.no_grad():
                out = again(input_ids=ids).logits
            row = {"reloaded": True, "identical_logits": bool(torch.equal(out, ref)),
                   "max_abs_diff": float((out - ref).abs().max())}
        except RuntimeError as e:
            row = {"reloaded": False, "error": str(e).splitlines()[-1][:200]}
    rows.append({"method": f"variance/bias+refit/{alloc}", "sparsity": 1 - block_params(model) / block_params(model0),
                 "params": block_params(model), "stock_loadable": model.config.geocomp_pruning["stock_loadable"], **row})
    print(rows[-1], flush=True)
write_json("recipes/results/prune_smollm2_reload.json",
           {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "model": "smollm2-135m",
            "data": {"calibration": "shakespeare:calibration (2048 tokens)", "check": "2 x 256 tokens of shakespeare:evaluation"},
            "baseline": {"params": block_params(model0)}, "rows": rows})
