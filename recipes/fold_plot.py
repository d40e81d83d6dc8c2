"""Plot the folding table at every budget: the 20% run (5 seeds) and the 10/30/50% run (1 seed) on one figure.

Run: PYTHONPATH=. python recipes/fold_plot.py  → recipes/results/fold_smollm2_all.png
"""

import json

from hf_geocomp.studies.fold_bench import plot_fold

runs = [json.load(open(f"recipes/results/{name}.json")) for name in ("fold_smollm2", "fold_smollm2_budgets")]
merged = {**runs[0], "summary": [s for r in runs for s in r["summary"]]}
plot_fold(merged, "recipes/results/fold_smollm2_all.png")
