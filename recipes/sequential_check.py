"""Block-by-block calibration on SmolLM2-135M: same statistics, its speed and memory, and which propagation to use.

1. The default job's pruning statistics (variance + wanda + magnitude criteria, bias+refit: every
   consumer input in full) collected on the whole model and block by block with
   ``propagate="original"``: largest relative difference, calibration tokens/s of each (interleaved
   repetitions in one process), and the statistics bytes held at once (whole model vs the largest block).
2. ``propagate="original"`` vs ``"compressed"`` for the default pruning (20%, variance, global,
   bias+refit), scored on development text only (``shakespeare:train``, ``pydoc:dev``,
   ``pystdlib:dev``), so the default is chosen without reading evaluation text.

Run: PYTHONPATH=. python recipes/sequential_check.py  → recipes/results/sequential_smollm2.json
"""

import copy
import json
import resource
import sys
import time

import torch

from hf_geocomp.data import calibration_loader, load_model
from hf_geocomp.eval.perplexity import perplexity
from hf_geocomp.geometry import collect_stats, collect_stats_sequential
from hf_geocomp.io import write_json
from hf_geocomp.prune import PruneConfig, prune_sequential, prune_taps

OUT = sys.argv[1] if len(sys.argv) > 1 else "recipes/results/sequential_smollm2.json"
TOKENS, REPEATS = 4096, 2
DEV = ["shakespeare:train", "pydoc:dev", "pystdlib:dev"]

model, tok = load_model("smollm2-135m")
batches = list(calibration_loader(model, tok, "shakespeare:calibration", TOKENS, 256, 8))
tokens = sum(int(b["attention_mask"].sum()) for b in batches)
taps = prune_taps(model, ["mlp"], criteria=["variance", "wanda", "magnitude"], compensation="bias+refit")

times = {"whole": [], "sequential": []}
block_bytes = []
for _ in range(REPEATS):  # interleaved, so both see the same load on the machine
    t = time.perf_counter()
    whole = collect_stats(model, batches, taps)
    times["whole"].append(time.perf_counter() - t)
    whole_bytes = whole.nbytes()
    block_bytes.clear()
    t = time.perf_counter()
    seq = collect_stats_sequential(model, batches, taps, lambda i, s: block_bytes.append(s.nbytes()), keep=True)
    times["sequential"].append(time.perf_counter() - t)
worst = 0.0
for key in whole.keys():
    for a, b in ((whole[key].sum, seq[key].sum), (whole[key].outer, seq[key].outer)):
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)))
del whole, seq
best = {k: min(v) for k, v in times.items()}
stats_row = {"method": "statistics", "tokens": tokens, "taps": len(taps), "max_rel_diff": worst,
             "whole_seconds": best["whole"], "sequential_seconds": best["sequential"],
             "whole_tokens_per_s": tokens / best["whole"], "sequential_tokens_per_s": tokens / best["sequential"],
             "time_ratio": best["sequential"] / best["whole"], "whole_stats_bytes": whole_bytes,
             "sequential_peak_block_stats_bytes": max(block_bytes),
             "stats_bytes_ratio": max(block_bytes) / whole_bytes}
print(json.dumps(stats_row), flush=True)

dev = {src: list(calibration_loader(model, tok, src, 4096, 256, 8, seed=1)) for src in DEV}
base = {src: perplexity(model, b) for src, b in dev.items()}
cfg = PruneConfig(sparsity=0.2, criterion="variance", targets=["mlp"], allocation="global", compensation="bias+refit")
rows = [stats_row]
for propagate in ("original", "compressed"):
    pruned = copy.deepcopy(model)
    t = time.perf_counter()
    prune_sequential(pruned, batches, cfg, propagate=propagate)
    seconds = time.perf_counter() - t
    for src, b in dev.items():
        ppl = perplexity(pruned, b)
        rows.append({"method": f"prune-variance/{propagate}", "sparsity": cfg.sparsity, "eval_data": src, "ppl": ppl,
                     "ppl_ratio": ppl / base[src], "prune_seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    del pruned

write_json(OUT, {
    "command": "PYTHONPATH=. python recipes/sequential_check.py", "model": "smollm2-135m",
    "data": {"calibration": "shakespeare:calibration", "calibration_tokens": tokens, "development": DEV},
    "baseline": {"method": "base", **{f"ppl[{s}]": v for s, v in base.items()}}, "rows": rows,
    "threads": torch.get_num_threads(), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "notes": "statistics: the default job's pruning taps (consumer inputs in full), best of "
             f"{REPEATS} interleaved repetitions; dev rows: teacher-forced perplexity on development text, "
             "default pruning with each propagation (the plan is the same, the refits differ).",
})
