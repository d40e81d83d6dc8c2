"""Command-line parsers of the studies and benchmarks (light: nothing heavy is imported until a command runs).

Every committed result under ``recipes/results/`` names one of these subcommands in its ``command`` field.
"""

from __future__ import annotations


def add_study_parsers(sub, lazy, add_model_data, add_prune_options) -> None:
    """Add the study subcommands to ``sub``; ``lazy(".module:function")`` makes a handler imported on demand."""
    b = sub.add_parser("bench-overhead", help="calibration pass time and memory vs plain forward passes")
    add_model_data(b, tokens=8192)
    b.add_argument("--repeats", type=int, default=3, help="timed repetitions of each pass (default 3)")
    b.add_argument("--variants", nargs="+", default=["plain-last", "full-previous", "full", "prune", "lora"], help="passes timed against the plain forward (see hf_geocomp.studies.overhead.VARIANTS)")
    b.add_argument("--output", "-o", default="recipes/results/geometry_overhead.json", help="results JSON")
    b.set_defaults(handler=lazy(".studies.overhead:run_overhead"))
    lb = sub.add_parser("lora-bench", help="H2 study: uniform LoRA vs SpectralLoRA vs EVA at one parameter budget")
    add_model_data(lb, tokens=4096)
    lb.set_defaults(model="minilm-l6", block_size=128)
    lb.add_argument("--methods", nargs="+", default=["head-only", "lora", "eva", "spectral-df", "spectral-df-principal"],
                    help="methods to compare (see hf_geocomp.studies.lora_bench.METHODS)")
    lb.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    lb.add_argument("--r", type=int, default=8, help="rank of the reference uniform LoRA; sets the budget (default 8)")
    lb.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    lb.add_argument("--epochs", type=float, default=2, help="training epochs (default 2)")
    lb.add_argument("--train-batch", type=int, default=16, help="training batch size (default 16)")
    lb.add_argument("--words", type=int, default=64, help="words per passage (default 64)")
    lb.add_argument("--max-length", type=int, default=128, help="tokens per passage (default 128)")
    lb.add_argument("--train-per-class", type=int, default=128, help="training passages per genre (default 128)")
    lb.add_argument("--test-per-class", type=int, default=100, help="test passages per genre (default 100)")
    lb.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    lb.add_argument("--output", "-o", default="recipes/results/lora_minilm_genre.json", help="results JSON")
    lb.set_defaults(handler=lazy(".studies.lora_bench:run_genre_bench"))
    ll = sub.add_parser("lora-lm-bench", help="H2 study, causal LM: LoRA variants fine-tuned on some works, "
                        "perplexity on held-out works")
    add_model_data(ll, tokens=4096)
    ll.set_defaults(block_size=128)
    ll.add_argument("--methods", nargs="+", default=["lora", "spectral-df", "eva", "adalora"],
                    help="methods to compare (see hf_geocomp.studies.lora_bench.METHODS)")
    ll.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    ll.add_argument("--r", type=int, default=8, help="rank of the reference uniform LoRA; sets the budget (default 8)")
    ll.add_argument("--targets", nargs="+", default=["q_proj", "v_proj", "up_proj", "down_proj"],
                    help="target module names (default q_proj v_proj up_proj down_proj)")
    ll.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    ll.add_argument("--steps", type=int, default=24, help="optimizer steps (default 24)")
    ll.add_argument("--train-batch", type=int, default=4, help="training batch size (default 4)")
    ll.add_argument("--train-block", type=int, default=64, help="tokens per training block (default 64)")
    ll.add_argument("--train-data", default="shakespeare:train", help="training text (default shakespeare:train)")
    ll.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default shakespeare:evaluation)")
    ll.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    ll.add_argument("--eval-block", type=int, default=128, help="tokens per held-out block (default 128)")
    ll.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    ll.add_argument("--output", "-o", default="recipes/results/lora_smollm2_lm.json", help="results JSON")
    ll.set_defaults(handler=lazy(".studies.lora_lm:run_lm_bench"))
    lm = sub.add_parser("lora-merge", help="join H2 results files of one setting (rows by method and seed) "
                        "and recompute mean ± sd and the paired tests vs LoRA and EVA")
    lm.add_argument("results", nargs="+", help="results JSON files written by lora-bench or lora-lm-bench")
    lm.add_argument("--output", "-o", required=True, help="merged results JSON")
    lm.set_defaults(handler=lazy(".studies.lora_bench:run_merge"))

    k = sub.add_parser("bench-kv", help="coded KV caches vs QuantizedCache vs DynamicCache: continuation perplexity")
    add_model_data(k, tokens=4096)
    k.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default shakespeare:evaluation)")
    k.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    k.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.1875, 0.125],
                   help="fractions of the uncompressed cache bytes")
    k.add_argument("--quant", nargs="*", default=["quanto:4", "quanto:2"],
                   help="QuantizedCache baselines as backend:bits (quanto:4 quanto:2 hqq:4 ...)")
    k.add_argument("--variants", nargs="+", default=None,
                   help="geocomp caches as <basis>-<bits|rank>[-rope_none][-refined] (default: every basis, bits and rank, "
                        "and the RoPE ablation); the first is also checked by greedy decoding")
    k.add_argument("--widths", type=int, nargs="+", default=[8, 4, 2, 1],
                   help="quantised widths the allocator may use besides full precision and 0 (default 8 4 2 1)")
    k.add_argument("--group-size", type=int, default=64, help="latent components per float16 scale (default 64)")
    k.add_argument("--sink-tokens", type=int, default=4,
                   help="first tokens kept exact, counted in the budget at a --prefill-token cache (default 4)")
    k.add_argument("--refine-steps", type=int, default=30, help="optimizer steps of *-refined variants (default 30)")
    k.add_argument("--refine-windows", type=int, default=16,
                   help="calibration windows (prefill + 128 scored) for *-refined variants (default 16)")
    k.add_argument("--refine-prefill", type=int, default=512, help="prefill tokens of a refinement window")
    k.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    k.add_argument("--prefill", type=int, default=1024, help="context tokens per window (default 1024)")
    k.add_argument("--score", type=int, default=256, help="scored tokens per window (default 256)")
    k.add_argument("--speed-steps", type=int, default=0, help="decode steps timed per cache (0: no speed test)")
    k.add_argument("--speed-contexts", type=int, nargs="+", default=[1024, 4096], help="contexts for decode speed")
    k.add_argument("--speed-methods", nargs="*", default=["quantized-quanto-int4@0.25", "geocomp-fisher-bits@0.25",
                                                         "geocomp-fisher-bits+reduced@0.25"],
                   help="method@budget timed beside dynamic; geocomp-...+reduced@budget: attention on the latents")
    k.add_argument("--greedy-tokens", type=int, default=0,
                   help="greedy tokens generated from each window's context, compared with the uncompressed cache")
    k.add_argument("--output", "-o", default="recipes/results/kv_smollm2_continuation.json", help="results JSON")
    k.add_argument("--plot", default=None, help="also plot perplexity against cache bytes to this PNG")
    k.set_defaults(handler=lazy(".studies.kv_bench:run_kv_bench"))


    b = sub.add_parser("bench-prune", help="perplexity, parameters and latency of every criterion and budget")
    add_model_data(b, tokens=16384)
    add_prune_options(b)
    b.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default evaluation split)")
    b.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens (default 16384)")
    b.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5],
                   help="fractions of block parameters to remove")
    b.add_argument("--criteria", nargs="+", default=["magnitude", "random", "wanda", "variance", "taylor"],
                   help="pruning criteria (variance, variance_cond, wanda, taylor, magnitude, random)")
    b.add_argument("--compensations", nargs="+", default=["none", "bias+refit"],
                   help="compensations (none, bias, refit, bias+refit)")
    b.add_argument("--allocations", nargs="+", default=["uniform"], help="allocations (uniform, global)")
    b.add_argument("--taylor-batches", type=int, default=4, help="calibration batches for Taylor gradients")
    b.add_argument("--latency-tokens", type=int, default=512, help="tokens of the batch-1 latency input")
    b.add_argument("--latency-repeats", type=int, default=5, help="0 skips latency (recorded as null)")
    b.add_argument("--sweep", nargs="+", default=None, metavar="SPEC",
                   help="rows as BUDGETS:CRITERIA:COMPENSATIONS:ALLOCATIONS[:TARGETS] products (comma lists, "
                        "targets joined by +), several allowed; replaces --sparsities/--criteria/...")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    b.add_argument("--output", "-o", default="recipes/results/prune_smollm2_oneshot.json", help="results JSON")
    b.set_defaults(handler=lazy(".studies.prune_oneshot:run_prune_bench"))

    r = sub.add_parser("bench-prune-recovery", help="prune during a short fine-tune with the callback")
    r.add_argument("--model", default="smollm2-135m", help="bundled name, model folder, .gguf file or Hub id")
    r.add_argument("--train-data", default="shakespeare:train", help="fine-tune text (default shakespeare:train)")
    r.add_argument("--eval-data", default="shakespeare:evaluation",
                   help="held-out text (default shakespeare:evaluation)")
    r.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    r.add_argument("--block-size", type=int, default=256, help="tokens per training and held-out block")
    r.add_argument("--sparsities", type=float, nargs="+", default=[0.2],
                   help="target fractions of block parameters, run in the order given (default 0.2)")
    r.add_argument("--criteria", "--criterion", nargs="+", default=["variance"], dest="criteria",
                   help="pruning criteria, one callback run per sparsity and criterion (default variance)")
    r.add_argument("--targets", default="mlp", help="comma list of mlp, heads (default mlp)")
    r.add_argument("--allocation", default="uniform", help="uniform or global (default uniform)")
    r.add_argument("--compensation", default="refit", help="applied at every mask update")
    r.add_argument("--schedule", default="cubic", help="cubic or linear sparsity schedule (default cubic)")
    r.add_argument("--end", type=float, default=0.5, help="fraction of steps where the target is reached")
    r.add_argument("--update-every", type=int, default=None, help="optimizer steps between mask updates")
    r.add_argument("--steps", type=int, default=60, help="optimizer steps of every fine-tune (default 60)")
    r.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, cosine schedule (default 5e-5)")
    r.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch (default 4)")
    r.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    r.add_argument("--dense-control", action="store_true",
                   help="also fine-tune without pruning for the same steps; rows then record ppl_vs_control")
    r.add_argument("--latency-tokens", type=int, default=512, help="tokens of the latency forward (default 512)")
    r.add_argument("--latency-repeats", type=int, default=5, help="0 skips latency (recorded as null)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    r.add_argument("--output", "-o", default="recipes/results/prune_smollm2_recovery.json", help="results JSON")
    r.set_defaults(handler=lazy(".studies.prune_recovery:run_recovery"))

    h = sub.add_parser("bench-prune-h1", help="H1: pruning criteria on a fine-tuned genre classifier, over seeds")
    h.add_argument("--model", default="minilm-l6", help="encoder (default minilm-l6)")
    h.add_argument("--targets", default="mlp", help="comma list of mlp, heads (default mlp)")
    h.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4],
                   help="fractions of block parameters to remove")
    h.add_argument("--criteria", nargs="+", default=["variance", "variance_cond", "magnitude", "wanda", "random"],
                   help="pruning criteria")
    h.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds")
    h.add_argument("--block-size", type=int, default=128, help="tokens per passage (default 128)")
    h.add_argument("--train-per-genre", type=int, default=200, help="training passages per genre")
    h.add_argument("--test-per-genre", type=int, default=150, help="test passages per genre")
    h.add_argument("--calibration-passages", type=int, default=128, help="training passages for statistics")
    h.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs")
    h.add_argument("--lr", type=float, default=5e-5, help="fine-tuning learning rate")
    h.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch size")
    h.add_argument("--controls", nargs="+", default=["plain"],
                   help="plain, removed (variance removed), reparam (whitening folded into V/O; targets heads)")
    h.add_argument("--output", "-o", default="recipes/results/prune_h1_minilm.json", help="results JSON")
    h.set_defaults(handler=lazy(".studies.prune_h1:run_h1"))

    w = sub.add_parser("bench-h3", help="H1/H3: pruning criteria vs magnitude and Wanda-sp over seeds, plain, with "
                       "variance removed and after a function-preserving whitening (hf_geocomp.studies.h3)")
    add_model_data(w, tokens=2048)
    w.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default evaluation split)")
    w.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens (default 2048)")
    w.add_argument("--sparsities", type=float, nargs="+", default=[0.2], help="fractions of block parameters removed")
    w.add_argument("--criteria", nargs="+", default=["variance", "wanda", "magnitude"],
                   help="criteria (variance, variance_cond, wanda, taylor, magnitude, random)")
    w.add_argument("--baselines", nargs="+", default=["magnitude", "wanda"], help="criteria every other is compared with")
    w.add_argument("--controls", nargs="+", default=["plain", "removed", "reparam"], help="plain, removed, reparam")
    w.add_argument("--compensation", default="bias+refit", help="held equal for every criterion (default bias+refit)")
    add_prune_options(w)
    w.set_defaults(targets="mlp")  # heads: the V/O whitening; mlp needs a gated MLP for the reparam control
    w.add_argument("--allocation", default="uniform", help="uniform or global (default uniform)")
    w.add_argument("--seeds", type=int, default=5, help="seeds: calibration subsets (default 5)")
    w.add_argument("--taylor-batches", type=int, default=4, help="calibration batches for Taylor gradients")
    w.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    w.add_argument("--output", "-o", default=None,
                   help="results JSON (default recipes/results/prune_h3_<model name>.json)")
    w.add_argument("--plot", default=None, help="also plot the advantages against budget to this PNG")
    w.set_defaults(handler=lazy(".studies.h3:run_h3"))

    c = sub.add_parser("bench-cross-domain", help="calibrate on one domain or a mix, evaluate on every domain: "
                       "pruning vs magnitude, coded KV cache vs QuantizedCache")
    c.add_argument("--model", default="smollm2-135m", help="bundled name, model folder, .gguf file or Hub id")
    c.add_argument("--domains", nargs="+", default=["shakespeare", "pydoc", "pystdlib"],
                   help="shakespeare, pydoc, pystdlib or NAME=CALIBRATION|EVALUATION sources (default: the three)")
    c.add_argument("--tokens", type=int, default=4096, help="calibration tokens per calibration set (default 4096)")
    c.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain (default 4096)")
    c.add_argument("--block-size", type=int, default=256, help="tokens per block (default 256)")
    c.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default 8)")
    c.add_argument("--seed", type=int, default=0, help="seed of the share each mix takes of a domain (default 0)")
    c.add_argument("--calibrations", nargs="*", default=None,
                   help="only these calibration sets (domains, mix-no-<domain>, mix; default all)")
    c.add_argument("--sparsity", type=float, default=0.2, help="pruned fraction of block parameters (default 0.2)")
    c.add_argument("--targets", default="mlp", help="pruned units: mlp, heads or mlp+heads (default mlp)")
    c.add_argument("--criteria", nargs="+", default=["variance", "wanda"], help="calibrated criteria (default "
                   "variance wanda); magnitude without compensation always runs as the calibration-free baseline")
    c.add_argument("--compensation", default="bias+refit", help="compensation of calibrated rows (default bias+refit)")
    c.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125], help="KV byte budgets (default 0.25 0.125)")
    c.add_argument("--group-size", type=int, default=64, help="latent components per float16 scale (default 64)")
    c.add_argument("--quant", nargs="*", default=["quanto:4"], help="QuantizedCache baselines (default quanto:4)")
    c.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="KV model dtype")
    c.add_argument("--windows", type=int, default=4, help="KV evaluation windows per domain (default 4)")
    c.add_argument("--prefill", type=int, default=512, help="context tokens per window (default 512)")
    c.add_argument("--score", type=int, default=128, help="scored tokens per window (default 128)")
    c.add_argument("--sink-tokens", type=int, default=4, help="first tokens kept exact in coded caches (default 4)")
    c.add_argument("--shrinkage", type=float, nargs="*", default=[], help="robustness rows: KV shrinkage values")
    c.add_argument("--min-bits", type=int, nargs="*", default=[], help="robustness rows: KV floors of bits")
    c.add_argument("--robust-compensations", nargs="*", default=[],
                   help="robustness rows: the first criterion with these compensations too")
    c.add_argument("--refit-damps", type=float, nargs="*", default=[],
                   help="robustness rows: the first criterion with these refit ridges (default ridge 0.01)")
    c.add_argument("--robust-calibrations", nargs="*", default=None,
                   help="calibration sets that also get the robustness rows (default: every mix)")
    c.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    c.add_argument("--output", "-o", default="recipes/results/cross_domain_smollm2.json", help="results JSON")
    c.set_defaults(handler=lazy(".studies.cross_domain:run_cross_domain"))

    f = sub.add_parser("bench-fold", help="folding vs variance / Wanda-sp / L1 pruning at the same block budget")
    add_model_data(f, tokens=4096)
    f.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default evaluation split)")
    f.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (default 4096)")
    f.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5],
                   help="fractions of block parameters removed or folded away")
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

    v = sub.add_parser("bench-curvature", help="canary memorisation, then K-FAC subspace compression vs pruning and folding")
    add_model_data(v, tokens=4096)
    v.add_argument("--train-data", default="shakespeare:train", help="fine-tuning text the canaries are planted in")
    v.add_argument("--train-tokens", type=int, default=32768, help="fine-tuning text tokens (default 32768)")
    v.add_argument("--train-block", type=int, default=64, help="tokens per fine-tuning text block (default 64)")
    v.add_argument("--canaries", type=int, default=16, help="planted canary strings (default 16)")
    v.add_argument("--canary-batch", type=int, default=8, help="canaries per step (default 8)")
    v.add_argument("--text-batch", type=int, default=2, help="text blocks per step (default 2)")
    v.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    v.add_argument("--train-last", type=int, default=0,
                   help="fine-tune only the MLPs of the last N blocks (default 0: every parameter)")
    v.add_argument("--max-steps", type=int, default=200, help="most fine-tuning steps (default 200)")
    v.add_argument("--check-every", type=int, default=10, help="steps between memorisation checks (default 10)")
    v.add_argument("--memorised", type=float, default=1.5, help="digit perplexity counted as memorised (default 1.5)")
    v.add_argument("--kfac-data", default="shakespeare:train", help="text of the K-FAC factors (default the training text)")
    v.add_argument("--kfac-tokens", type=int, default=2048, help="K-FAC tokens (default 2048)")
    v.add_argument("--kfac-batch", type=int, default=4, help="blocks per K-FAC backward pass (default 4)")
    v.add_argument("--labels", default="sampled", help="sampled (true Fisher) or gold (default sampled)")
    v.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05],
                   help="keep fractions of the curvature mass")
    v.add_argument("--rules", nargs="+", default=["per_factor", "product"], help="keep rules (default both)")
    v.add_argument("--baselines", nargs="*", default=["prune:variance:bias+refit", "fold:data_free"],
                   help="measured at the parameters of every smaller per-factor row")
    v.add_argument("--eval-data", default="shakespeare:evaluation", help="held-out text (default evaluation split)")
    v.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (default 4096)")
    v.add_argument("--seed", type=int, default=0, help="canaries, data order and sampled labels (default 0)")
    v.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    v.add_argument("--output", "-o", default="recipes/results/curvature_smollm2_canaries.json", help="results JSON")
    v.add_argument("--plot", default=None, help="also plot perplexities against parameters to this PNG")
    v.set_defaults(handler=lazy(".studies.curvature_bench:run_curvature_bench"))

    ks = sub.add_parser("bench-kv-speed", help="decode/prefill speed of KV caches as ratios to DynamicCache "
                        "(interleaved A X A ..., median with min-max, beside the bytes-read bound)")
    add_model_data(ks, tokens=4096)
    ks.add_argument("--eval-data", default="shakespeare:evaluation", help="text of the timed contexts")
    ks.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    ks.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125], help="geocomp budgets (fisher-bits)")
    ks.add_argument("--quant", nargs="*", default=["quanto:4", "hqq:4"], help="QuantizedCache baselines backend:bits")
    ks.add_argument("--group-size", type=int, default=64, help="latent components per float16 scale (default 64)")
    ks.add_argument("--sink-tokens", type=int, default=4, help="first tokens kept exact (default 4)")
    ks.add_argument("--configs", nargs="+", default=["1x4096", "8x4096", "1x8064"],
                    help="batch x context pairs timed (default 1x4096 8x4096 1x8064)")
    ks.add_argument("--steps", type=int, default=16, help="greedy decode steps per timed run, unless a config says :STEPS")
    ks.add_argument("--repeats", type=int, default=3, help="interleaved repeats per configuration (default 3)")
    ks.add_argument("--prefill-context", type=int, default=4096, help="prefill timed at batch 1 (0: skip)")
    ks.add_argument("--prefill-repeats", type=int, default=3, help="interleaved prefill repeats (default 3)")
    ks.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ks.add_argument("--torch-path", action="store_true",
                    help="also time the smallest budget on the PyTorch path (no fused kernel), first config only")
    ks.add_argument("--profile-steps", type=int, default=0,
                    help="also profile this many decode steps per cache at the first config (torch.profiler)")
    ks.add_argument("--allow-torch-path", action="store_true",
                    help="run even if the fused kernel cannot be built (then geocomp rows time the PyTorch path)")
    ks.add_argument("--output", "-o", default="recipes/results/kv_smollm2_decode_speed_fused.json", help="results JSON")
    ks.set_defaults(handler=lazy(".studies.kv_speed:run_kv_speed"))

    kk = sub.add_parser("bench-kv-kernel", help="one layer's decode-step attention on a synthetic coded cache: "
                        "the fused path vs SDPA + cat (no model; seconds)")
    kk.add_argument("--widths", nargs="+", required=True,
                    help="LABEL=bits:n,bits:n,... components per width of each codec (bits 0: full precision)")
    kk.add_argument("--configs", nargs="+", default=["1x4096", "8x4096", "1x8192"], help="BATCHxLENGTH pairs")
    kk.add_argument("--kv-heads", type=int, default=3, help="KV heads (default 3)")
    kk.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    kk.add_argument("--query-group", type=int, default=3, help="query heads per KV head (default 3)")
    kk.add_argument("--group-size", type=int, default=64, help="components per float16 scale (default 64)")
    kk.add_argument("--calls", type=int, default=20, help="calls per timed run (default 20)")
    kk.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    kk.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    kk.add_argument("--output", "-o", default="recipes/results/kv_smollm2_decode_kernel.json", help="results JSON")
    kk.set_defaults(handler=lazy(".studies.kv_speed:run_kv_kernel_speed"))
