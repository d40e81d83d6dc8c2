"""Command-line parsers of the studies (light: nothing heavy is imported until a command runs)."""

from __future__ import annotations


def add_study_parsers(sub, lazy, add_model_data) -> None:
    f = sub.add_parser("bench-fold", help="folding vs variance / Wanda-sp / L1 pruning at the same block budget")
    add_model_data(f, tokens=4096)
    f.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default evaluation split)")
    f.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (default 4096)")
    f.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    f.add_argument("--methods", nargs="+", default=[
        "fold:none", "fold:data_free", "fold:data", "prune:variance:none", "prune:variance:bias+refit",
        "prune:wanda:none", "prune:wanda:bias+refit", "prune:magnitude:none", "prune:magnitude:bias+refit"],
        help="fold:<repair>[:<placement>] and prune:<criterion>:<compensation> (see hf_geocomp.studies.fold_bench)")
    f.add_argument("--seeds", type=int, default=5, help="seeds: clustering seed and calibration subset (default 5)")
    f.add_argument("--allocation", default="uniform", help="uniform or global (default uniform)")
    f.add_argument("--cluster-method", default="kmeans", help="kmeans or agglomerative (default kmeans)")
    f.add_argument("--iters", type=int, default=20, help="Lloyd iterations of k-means (default 20)")
    f.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    f.add_argument("--output", "-o", default="recipes/results/fold_smollm2.json", help="results JSON")
    f.add_argument("--plot", default=None, help="also plot perplexity against budget to this PNG")
    f.set_defaults(handler=lazy(".studies.fold_bench:run_fold_bench"))
