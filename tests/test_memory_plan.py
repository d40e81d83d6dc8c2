"""The memory model: statistics bytes predicted from a meta-device model equal the bytes the engine's tensors hold
(ActivationStats.nbytes()) on real tiny models of several families; a run that does not fit gets one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_geocomp import memory
from hf_geocomp.errors import GeoCompError
from tests.families import FAMILIES, VOCAB

FAMS = ["llama3", "qwen3", "gemma3", "phi3", "gpt2", "bert"]  # GQA, q/k norms, heads-first norms, fused, Conv1D


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, 3, 12), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]


def _tap_sets(model):
    """(name, taps, gradient pass?) of every method's statistics the job and the studies collect."""
    from hf_geocomp.geometry import linear_input_taps
    from hf_geocomp.kv.compress import required_taps
    from hf_geocomp.prune import prune_taps

    from hf_geocomp.arch import get_spec

    decoder = get_spec(model).family != "bert"
    targets = ["mlp"] if get_spec(model).head_pruning else ["mlp", "heads"]  # Phi-3: mlp only
    sets = [("prune full (refit)", prune_taps(model, targets, criteria=["variance"], compensation="bias+refit"),
             False),
            ("prune variance per unit", prune_taps(model, targets, criteria=["variance"]), False),
            ("prune wanda + bias (diag)", prune_taps(model, ["mlp"], criteria=["wanda"], compensation="bias"), False),
            ("KV aware", required_taps(model, "aware"), False),
            ("lora inputs (q/k/v and gate/up shared)", linear_input_taps(model), False)]
    if decoder:
        sets.append(("KV fisher", required_taps(model, "fisher"), True))
    return sets


@pytest.mark.parametrize("family", FAMS)
def test_predicted_statistics_bytes_equal_the_tensors_held(family):
    from hf_geocomp.arch import block_prefixes
    from hf_geocomp.geometry import StatsCollector, collect_gradient_stats, collect_stats

    model = FAMILIES[family]()
    meta = memory.meta_model(model.config)
    assert all(p.device.type == "meta" for p in meta.parameters())
    batches = _batches()
    for name, taps, gradient in _tap_sets(model):
        meta_taps = next(t for n, t, _ in _tap_sets(meta) if n == name)
        assert meta_taps == taps  # the taps come from the config alone
        stats = (collect_gradient_stats if gradient else collect_stats)(model, batches, taps)
        assert memory.stats_bytes(meta, taps) == stats.nbytes(), (family, name)
        one_block = [t for t in taps if t.module.startswith(block_prefixes(model)[0])]
        measured = collect_stats(model, batches, one_block).nbytes() if not gradient else \
            collect_gradient_stats(model, batches, one_block).nbytes()
        assert memory.stats_bytes(meta, taps, per_block=True) == measured, (family, name)  # equal blocks here
        if not gradient:  # while collecting: a float32 window of products beside each full float64 sum
            with StatsCollector(model, taps, fold_rows=1) as col, torch.no_grad():
                model(**batches[0])
                during = col.stats.nbytes()
            assert memory.stats_bytes(meta, taps, collecting=True) == during, (family, name)


def test_weights_and_kv_cache_bytes_are_the_tensors_bytes():
    from transformers import DynamicCache

    from hf_geocomp.eval.memory import tensor_bytes
    from hf_geocomp.job import JobConfig

    model = FAMILIES["llama3"]()  # full attention in every block (a sliding-window layer holds at most the window)
    job = JobConfig(model="unused", prefill=20, score=4, kv=None)
    plan = memory.plan_job(job, config=model.config, available=None)
    assert plan.parts["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.fits is None and plan.peak == max(plan.phases.values())
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (1, 24)), past_key_values=cache, use_cache=True)
    assert plan.parts["KV cache (continuation window)"] == tensor_bytes(cache)
    half = memory.plan_job(job, dtype=torch.bfloat16, config=model.config, available=None)
    assert half.parts["weights"] * 2 == plan.parts["weights"]


def test_the_sequential_path_holds_one_block_of_statistics():
    from hf_geocomp.job import JobConfig

    model = FAMILIES["llama3"]()
    job = JobConfig(model="unused")
    whole = memory.plan_job(job, "whole", config=model.config, available=None)
    seq = memory.plan_job(job, "sequential", config=model.config, available=None)
    blocks = model.config.num_hidden_layers
    assert whole.parts["statistics (prune, held)"] == blocks * seq.parts["statistics (prune, held)"]
    assert seq.parts["hidden states (calibration tokens, in and out)"] == 2 * job.tokens * 32 * 4
    with pytest.raises(GeoCompError, match="pipeline 'streamed' is not one of whole, sequential"):
        memory.plan_job(job, "streamed", config=model.config)


def test_a_run_that_does_not_fit_gets_one_sentence(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from hf_geocomp.cli import main
    from hf_geocomp.job import JobConfig

    plan = memory.plan_job(JobConfig(model=tiny_llama_dir), available=10**9 // 2)
    with pytest.raises(GeoCompError) as err:
        plan.check()
    text = str(err.value)
    assert text.startswith(f"{tiny_llama_dir} (float32, whole pipeline) is predicted to need ")
    assert text.endswith(f"GB at its peak ({plan.peak_phase}), but this machine has 0.5 GB available.")
    assert text.count(".") - text.count("GB") - tiny_llama_dir.count(".") <= 3  # one sentence: decimals only

    monkeypatch.setattr(memory, "available_bytes", lambda: 10**6)
    out = tmp_path / "plan.json"
    assert main(["plan-memory", tiny_llama_dir, "--set", "tokens=512", "-o", str(out)]) == 2
    assert "is predicted to need" in capsys.readouterr().err and out.is_file()  # the plan is written first
    result = json.loads(out.read_text())
    assert result["rows"][0]["fits"] is False and result["data"]["calibration_tokens"] == 512
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**12)
    assert main(["plan-memory", tiny_llama_dir, "--pipeline", "both", "--dtype", "bfloat16", "-o", str(out),
                 "--overwrite"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pipeline"], r["dtype"], r["fits"]) for r in rows] == [("whole", "bfloat16", True),
                                                                      ("sequential", "bfloat16", True)]
    assert main(["plan-memory", tiny_llama_dir, "--dtype", "int8"]) == 2
    assert "dtype 'int8' is not a torch floating-point dtype" in capsys.readouterr().err


def test_the_committed_large_configs_have_their_public_sizes():
    """The Llama-3 8B and 70B configs written from their public numbers build to their public parameter counts."""
    root = Path(__file__).parents[1] / "recipes" / "memory"
    for name, params in (("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496)):
        meta = memory.meta_model(memory.load_config(str(root / name)), torch.bfloat16)
        assert sum(p.numel() for p in meta.parameters()) == params, name


def _measure_peaks() -> list:
    """``[(measured, predicted), ...]`` resident bytes above the steady size of a perplexity batch and a KV fisher
    batch on SmolLM2-135M (float32, 8 x 256), in this process."""
    import threading
    import time

    from hf_geocomp.data import calibration_loader, load_model
    from hf_geocomp.eval.perplexity import perplexity
    from hf_geocomp.kv.compress import collect_kv_stats

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))

    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    model, tok = load_model("smollm2-135m")
    batch = next(iter(calibration_loader(model, tok, "shakespeare:calibration", 2048, 256, 8)))
    with torch.no_grad():  # one-time allocations of a first forward (thread pools, kernels) before measuring
        model(input_ids=batch["input_ids"][:1, :16])
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    measured = []
    try:
        for run, predicted in ((lambda: perplexity(model, [batch]), memory.forward_bytes(model.config, 8, 256, 4)
                                + memory.logits_chunk_bytes(model.config)),
                               (lambda: collect_kv_stats(model, [batch], "fisher"),
                                memory.backward_bytes(model.config, 8, 256, 4))):
            time.sleep(0.1)
            steady = rss()
            peak[0] = steady
            run()
            time.sleep(0.1)
            measured.append((peak[0] - steady, predicted))
    finally:
        done.set()
    return measured


@pytest.mark.slow
def test_slow_predictions_match_measured_peaks():
    """SmolLM2-135M in float32, one batch of 8 × 256: the resident size a perplexity batch (activations and a
    logits chunk) and a KV fisher batch (backward) add above the steady size, within 20% and 15% of the prediction
    (measured 0.60-0.72 GB vs 0.61 and 4.21 GB vs 4.13). Measured in a fresh process: memory that earlier tests
    freed stays with the allocator and would absorb the growth."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import json, tests.test_memory_plan as t; print(json.dumps(t._measure_peaks()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    (ppl, ppl_predicted), (fisher, fisher_predicted) = measured
    # the perplexity batch measured 0.60 GB in a script and 0.72 GB under pytest (allocator state), predicted 0.61
    assert ppl == pytest.approx(ppl_predicted, rel=0.2), measured
    assert fisher == pytest.approx(fisher_predicted, rel=0.15), measured
