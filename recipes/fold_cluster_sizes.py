"""Cluster sizes of SmolLM2-135M's MLP units at 20% of block parameters (1,127 of 1,536 units kept, the widths of recipes/results/fold_smollm2.json):
k-means (seed 0) and Ward, layers 0, 10 and 20.

Run: PYTHONPATH=. python recipes/fold_cluster_sizes.py  → recipes/results/fold_smollm2_cluster_sizes.json
"""

import sys

import torch

from hf_geocomp.data import load_model
from hf_geocomp.fold.cluster import agglomerative, kmeans, unit_features
from hf_geocomp.io import write_json
from hf_geocomp.prune import unit_groups

torch.set_num_threads(1)
model, _ = load_model("smollm2-135m")
rows = []
for g in unit_groups(model, ("mlp",))[::10]:
    x = unit_features(model, g)
    for method, labels in (("kmeans", kmeans(x, 1127, 0, 20)), ("agglomerative", agglomerative(x, 1127))):
        sizes = torch.bincount(labels)
        rows.append({"method": method, "layer": g.layer, "clusters": 1127, "units": g.num_units,
                     "largest": sorted(sizes.tolist(), reverse=True)[:8], "singletons": int((sizes == 1).sum())})
        print(rows[-1], flush=True)
write_json("recipes/results/fold_smollm2_cluster_sizes.json",
           {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "model": "smollm2-135m", "data": None,
            "baseline": None, "rows": rows})
