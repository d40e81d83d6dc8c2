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

    c = sub.add_parser("bench-curvature", help="canary memorisation, then K-FAC subspace compression vs pruning and folding")
    add_model_data(c, tokens=4096)
    c.add_argument("--train-data", default="shakespeare:train", help="fine-tuning text the canaries are planted in")
    c.add_argument("--train-tokens", type=int, default=32768, help="fine-tuning text tokens (default 32768)")
    c.add_argument("--train-block", type=int, default=64, help="tokens per fine-tuning text block (default 64)")
    c.add_argument("--canaries", type=int, default=16, help="planted canary strings (default 16)")
    c.add_argument("--canary-batch", type=int, default=8, help="canaries per step (default 8)")
    c.add_argument("--text-batch", type=int, default=2, help="text blocks per step (default 2)")
    c.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    c.add_argument("--train-last", type=int, default=0,
                   help="fine-tune only the MLPs of the last N blocks (default 0: every parameter)")
    c.add_argument("--max-steps", type=int, default=200, help="most fine-tuning steps (default 200)")
    c.add_argument("--check-every", type=int, default=10, help="steps between memorisation checks (default 10)")
    c.add_argument("--memorised", type=float, default=1.5, help="digit perplexity counted as memorised (default 1.5)")
    c.add_argument("--kfac-data", default="shakespeare:train", help="text of the K-FAC factors (default the training text)")
    c.add_argument("--kfac-tokens", type=int, default=2048, help="K-FAC tokens (default 2048)")
    c.add_argument("--kfac-batch", type=int, default=4, help="blocks per K-FAC backward pass (default 4)")
    c.add_argument("--labels", default="sampled", help="sampled (true Fisher) or gold (default sampled)")
    c.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05])
    c.add_argument("--rules", nargs="+", default=["per_factor", "product"], help="keep rules (default both)")
    c.add_argument("--baselines", nargs="*", default=["prune:variance:bias+refit", "fold:data_free"],
                   help="measured at the parameters of every smaller per-factor row")
    c.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default evaluation split)")
    c.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (default 4096)")
    c.add_argument("--seed", type=int, default=0, help="canaries, data order and sampled labels (default 0)")
    c.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    c.add_argument("--output", "-o", default="recipes/results/curvature_smollm2_canaries.json", help="results JSON")
    c.add_argument("--plot", default=None, help="also plot perplexities against parameters to this PNG")
    c.set_defaults(handler=lazy(".studies.curvature_bench:run_curvature_bench"))
