"""SpectralLoRA's initialisation calibrated on, and off, the target domain: one table from three runs of the same
fine-tuning (SmolLM2-135M on pydoc:calibration, held-out pydoc:evaluation, 5 seeds, the same seeds and steps),
which differ only in the text the statistics were read from. Paired by seed (the seed fixes the LoRA
initialisation's randomness and the training order, so each seed's runs differ only in the statistics):
every calibration against PEFT LoRA (which reads no statistics) and each off-domain calibration against the
in-domain one, Holm-corrected over the table.

Run: PYTHONPATH=. python recipes/lora_cross_domain_summary.py  → recipes/results/lora_smollm2_cross_domain_summary.json
"""

import json
import statistics
import sys

from hf_geocomp.eval.significance import compare, holm
from hf_geocomp.io import write_json

METHOD = "spectral-df-whitened"
RUNS = {  # calibration -> results file (the in-domain file also holds the LoRA rows)
    "pydoc (in-domain)": "recipes/results/lora_smollm2_lm_pydoc.json",
    "plays": "recipes/results/lora_smollm2_cross_domain.json",
    "mix of plays and stdlib code": "recipes/results/lora_smollm2_cross_domain_mix.json",
}


def ppl_by_seed(result: dict, method: str) -> dict[int, float]:
    return {r["seed"]: r["ppl"] for r in result["rows"] if r["method"] == method}


results = {name: json.load(open(path)) for name, path in RUNS.items()}
for name, res in results.items():
    if res.get("partial"):
        sys.exit(f"{RUNS[name]} is a partial run; finish it first.")
    for key in ("model", "hyperparameters", "baseline"):
        if res[key] != results["pydoc (in-domain)"][key]:
            sys.exit(f"{RUNS[name]} differs from the in-domain run in {key!r}: not the same fine-tuning.")
    for key in ("train", "test", "train_tokens", "eval_tokens", "calibration_tokens"):
        if res["data"][key] != results["pydoc (in-domain)"]["data"][key]:
            sys.exit(f"{RUNS[name]} differs from the in-domain run in data {key!r}: not the same fine-tuning.")
lora = ppl_by_seed(results["pydoc (in-domain)"], "lora")
runs = {name: ppl_by_seed(res, METHOD) for name, res in results.items()}
summary = [{"method": "lora", "calibration": "none", "seeds": len(lora), "ppl_mean": statistics.mean(lora.values()),
            "ppl_sd": statistics.stdev(lora.values())}]
summary += [{"method": METHOD, "calibration": name, "calibration_text": results[name]["data"]["calibration"],
             "seeds": len(ppl), "ppl_mean": statistics.mean(ppl.values()), "ppl_sd": statistics.stdev(ppl.values())}
            for name, ppl in runs.items()]
rows = [{"method": "lora", "calibration": "none", "seed": seed, "ppl": ppl} for seed, ppl in sorted(lora.items())]
rows += [{"method": METHOD, "calibration": name, "seed": seed, "ppl": p}
         for name, ppl in runs.items() for seed, p in sorted(ppl.items())]
tests = []
for name, ppl in runs.items():
    pairs = [("lora", lora)] + ([("pydoc (in-domain)", runs["pydoc (in-domain)"])] if name != "pydoc (in-domain)" else [])
    for other, ref in pairs:
        seeds = sorted(set(ppl) & set(ref))
        tests.append({"method": f"{METHOD} calibrated on {name} vs {other}", **compare([ppl[s] for s in seeds],
                                                                                       [ref[s] for s in seeds])})
for t, p in zip(tests, holm([t["p_value"] for t in tests])):
    t["p_holm"] = p
for row in summary + tests:
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
write_json("recipes/results/lora_smollm2_cross_domain_summary.json",
           {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "model": results["pydoc (in-domain)"]["model"],
            "data": {name: res["data"] for name, res in results.items()}, "sources": RUNS,
            "baseline": results["pydoc (in-domain)"]["baseline"], "summary": summary, "tests": tests, "rows": rows})
