"""The pruning callback in short Trainer runs: gradient accumulation, final surgery, save/reload, 2 processes."""

import json
import math
from pathlib import Path

import pytest
import torch

from hf_geocomp import GeoCompError
from transformers import TrainerCallback

from hf_geocomp.prune import VarianceWeightedPruningCallback, block_params

from .conftest import random_batch, tiny_llama


class LMData(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        self.rows = [{k: v[0] for k, v in random_batch(batch=1, seq=16, seed=seed + i).items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = dict(self.rows[i])
        row["labels"] = row["input_ids"].clone()
        return row


def _train(out_dir, criterion="variance", n=32, before=(), after=(), evaluate=False, **cb_kw):
    """6 optimizer steps of 2 accumulated micro-batches of 2; ``before``/``after``: callbacks around the pruning one;
    ``evaluate``: an evaluation pass (eval mode, 8 rows) after every step."""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    cb = VarianceWeightedPruningCallback(0.3, criterion=criterion, update_every=2, end=0.6, **cb_kw)
    for probe in (*before, *after):
        probe.pruner = cb
    extra = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4) if evaluate else {}
    args = TrainingArguments(str(out_dir), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             learning_rate=1e-3, disable_tqdm=True, dataloader_num_workers=0, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=LMData(n), eval_dataset=LMData(8, seed=100) if evaluate
                      else None, callbacks=[*before, cb, *after])
    trainer.train()
    return trainer, cb


class MaskProbe(TrainerCallback):
    """At step end, whether every removed unit's weights are exactly zero (``zeros``: steps where they were, ``moved``:
    steps where the optimizer had moved them); at train end, the model's logits on ``batch``."""

    def __init__(self, batch):
        self.batch, self.zeros, self.moved, self.logits, self.pruner = batch, 0, 0, None, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        plan = self.pruner.plan
        if plan is None:
            return
        from hf_geocomp import arch

        zero = True
        for g, gp in zip(self.pruner._groups, plan.groups):
            zero &= bool(arch.linear_weight(model.get_submodule(g.consumer))[:, g.cols[gp.removed].reshape(-1)].eq(0).all())
            for name, rows in g.producers.items():
                zero &= bool(arch.linear_weight(model.get_submodule(name))[rows[gp.removed].reshape(-1)].eq(0).all())
        self.zeros, self.moved = self.zeros + zero, self.moved + (not zero)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        was = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(**self.batch).logits
        model.train(was)


@pytest.mark.parametrize("criterion,compensation", [("variance", "none"), ("taylor", "none"), ("variance_cond", "refit")])
def test_callback_prunes_during_training(tmp_path, criterion, compensation):
    from transformers import AutoModelForCausalLM

    n0 = block_params(tiny_llama())
    trainer, cb = _train(tmp_path, criterion, compensation=compensation)
    model = trainer.model.eval()
    assert block_params(model) == n0 - cb.plan.params_removed
    assert 0.25 < 1 - block_params(model) / n0 <= 0.3  # achieved, not only scheduled
    assert cb.history[-1]["achieved"] == pytest.approx(1 - block_params(model) / n0)
    assert [h["step"] for h in cb.history] == [2, 3]  # every 2 steps, and at the end of the ramp (0.6 · 6)
    assert cb.history[-1]["sparsity"] == pytest.approx(0.3)
    assert 0 < cb.history[0]["achieved"] < cb.history[-1]["achieved"]
    if criterion == "variance":  # statistics came from every micro-batch: 2 steps × 2 accumulations × 2 × 16
        assert cb.history[0]["tokens"] == 2 * 2 * 2 * 16
    plan = json.loads((tmp_path / "prune_plan.json").read_text())
    assert plan["params_removed"] == cb.plan.params_removed
    trainer.save_model(str(tmp_path / "final"))  # what the Trainer saves is the pruned model
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_callback_masks_every_step_ignores_evaluation_and_cuts_exactly(tmp_path):
    """Evaluation passes add no statistics; after every optimizer step the removed units are zero again; the final
    physical removal gives exactly the masked model's outputs."""
    batch = random_batch()
    before, after = MaskProbe(batch), MaskProbe(batch)
    trainer, cb = _train(tmp_path, before=[before], after=[after], evaluate=True)
    assert after.zeros == 6 - 1 and after.moved == 0  # steps 2..6 (masks exist from step 2 on), after the callback
    assert before.moved >= 3  # before it, the optimizer step had moved the masked weights (steps 3..6)
    assert cb.history[0]["tokens"] == 2 * 2 * 2 * 16  # 2 steps × 2 accumulations × 2 rows × 16: no eval rows
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before.logits, rtol=1e-5, atol=1e-6)
    assert block_params(model) < block_params(tiny_llama())


def test_callback_bad_input():
    with pytest.raises(GeoCompError, match="schedule"):
        VarianceWeightedPruningCallback(0.2, schedule="exp")
    with pytest.raises(GeoCompError, match="sparsity"):
        VarianceWeightedPruningCallback(1.2)
    with pytest.raises(GeoCompError, match="start and end"):
        VarianceWeightedPruningCallback(0.2, start=0.8, end=0.5)


def _worker(rank, world_size, port, out_dir):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="yes", GLOO_SOCKET_IFNAME="lo",
                      OMP_NUM_THREADS="1")
    from pathlib import Path

    trainer, cb = _train(Path(out_dir) / f"rank{rank}", n=32)
    keep = {gp.key: gp.keep for gp in cb.plan.groups}
    (Path(out_dir) / f"keep{rank}.json").write_text(json.dumps({"keep": keep, "history": cb.history,
                                                                "world": trainer.args.world_size}))


def test_two_processes_prune_the_same_units(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"keep{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2
    assert r0["keep"] == r1["keep"]
    # statistics were summed: each rank saw half the micro-batches, the scores saw all of them
    assert r0["history"][0]["tokens"] == r1["history"][0]["tokens"] == 2 * 2 * 2 * 2 * 16


def test_recovery_bench_end_to_end(tiny_llama_dir, tmp_path):
    """Several criteria in one run share the data and the dense control; each pruned row is set against it."""
    from hf_geocomp.cli import main

    out = tmp_path / "recovery.json"
    argv = ["bench-prune-recovery", "--model", tiny_llama_dir, "--train-data", "pydoc:calibration",
            "--eval-data", "pydoc:evaluation", "--eval-tokens", "128", "--block-size", "16", "--sparsities", "0.3",
            "--criteria", "variance", "taylor", "--allocation", "global", "--compensation", "bias+refit",
            "--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--update-every", "1", "--dense-control",
            "--latency-repeats", "0", "-o", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "hf-geocomp " + " ".join(argv) and not result["partial"]
    assert [r["method"] for r in result["rows"]] == ["callback/variance/bias+refit", "finetune (no pruning)",
                                                     "callback/taylor/bias+refit"]
    control = result["rows"][1]
    assert control["sparsity"] == 0 and "ppl_vs_control" not in control
    for row in (result["rows"][0], result["rows"][2]):
        assert 0.2 < row["sparsity"] < 0.4 and row["latency_ratio"] is None
        assert row["ppl_vs_control"] == pytest.approx(row["ppl"] / control["ppl"])
    assert main(argv[:-2] + ["--criteria", "variance", "bogus", "-o", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()  # refused before any fine-tune
    assert not list(Path.cwd().iterdir())  # the Trainer's folder was a temporary one, not runs/ in the working dir


def test_callback_prunes_only_the_given_layers(tmp_path):
    trainer, cb = _train(tmp_path, targets=("mlp",), layers=[-1])
    widths = cb.plan.widths("mlp")
    assert widths[0] == 48 and widths[1] < 48  # block 0 untouched, during training and at the end
    assert trainer.model.model.layers[0].mlp.down_proj.weight.shape == (32, 48)


def test_recovery_bench_over_seeds_pairs_each_criterion_with_its_dense_control(tiny_llama_dir, tmp_path):
    from hf_geocomp.cli import main

    out = tmp_path / "recovery_seeds.json"
    argv = ["bench-prune-recovery", "--model", tiny_llama_dir, "--train-data", "pydoc:calibration",
            "--eval-data", "pydoc:evaluation", "--eval-tokens", "128", "--block-size", "16", "--sparsities", "0.3",
            "--criteria", "variance", "magnitude", "--steps", "3", "--batch-size", "2", "--grad-accum", "1",
            "--update-every", "1", "--dense-control", "--latency-repeats", "0", "--seeds", "3", "-o", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 3 * 3 and {r["seed"] for r in res["rows"]} == {0, 1, 2}
    dense = {r["seed"]: r["ppl"] for r in res["rows"] if r["method"] == "finetune (no pruning)"}
    assert len(set(dense.values())) == 3  # each seed its own blocks and order
    for r in (r for r in res["rows"] if "criterion" in r):
        assert r["ppl_vs_control"] == pytest.approx(r["ppl"] / dense[r["seed"]])  # against its own seed's control
    [test] = res["tests"]
    assert test["method"] == "variance vs magnitude" and test["n"] == 3 and test["p_holm"] >= test["p_value"]
    vs = {v["criterion"]: v for v in res["vs_dense"]}
    for c in ("variance", "magnitude"):
        logs = [math.log(r["ppl_vs_control"]) for r in res["rows"] if r.get("criterion") == c]
        assert vs[c]["log_ppl_vs_dense"] == pytest.approx(sum(logs) / 3)
    bad = tmp_path / "bad.json"
    assert main(argv[:-2] + ["--baselines", "wanda", "-o", str(bad)]) == 2 and not bad.exists()


def _recovery_argv(model_dir, out, *extra):
    return ["bench-prune-recovery", "--model", model_dir, "--train-data", "pydoc:calibration",
            "--eval-data", "pydoc:evaluation", "--eval-tokens", "64", "--block-size", "16", "--sparsities", "0.3",
            "--criteria", "variance", "magnitude", "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
            "--update-every", "1", "--dense-control", "--latency-repeats", "0", "-o", str(out), *extra]


def test_recovery_bench_resume_runs_only_the_missing_fine_tunes(tiny_llama_dir, tmp_path):
    """A run cut short after seed 0 is continued with --resume: seed 0's rows are kept as they were, only seed 1's
    fine-tunes run, and the paired tests then cover both seeds. Other settings are refused before any model loads."""
    from hf_geocomp.cli import main

    out = tmp_path / "rec.json"
    assert main(_recovery_argv(tiny_llama_dir, out, "--seeds", "2", "--only-seeds", "0", "--resume")) == 0
    first = json.loads(out.read_text())
    assert first["partial"] and {r["seed"] for r in first["rows"]} == {0} and len(first["rows"]) == 3
    assert main(_recovery_argv(tiny_llama_dir, out, "--seeds", "2")) == 2  # no --resume: refused, file kept
    assert main(_recovery_argv(tiny_llama_dir, out, "--seeds", "2", "--resume")) == 0
    res = json.loads(out.read_text())
    assert not res["partial"] and len(res["rows"]) == 6
    assert [(r["seed"], r["method"]) for r in res["rows"]] == [
        (s, m) for s in (0, 1) for m in ("callback/variance/refit", "finetune (no pruning)", "callback/magnitude/refit")]
    assert [r["ppl"] for r in res["rows"][:3]] == [r["ppl"] for r in first["rows"]]  # kept, not re-run
    assert [p["seeds"] for p in res["parts"]] == [[0], [0, 1]] and [p["fine_tunes"] for p in res["parts"]] == [3, 3]
    assert res["tests"][0]["n"] == 2
    assert main(_recovery_argv(tiny_llama_dir, out, "--seeds", "2", "--resume")) == 2  # nothing left to run
    for bad in (["--seeds", "2", "--resume", "--steps", "3"],  # another setting
                ["--seeds", "2", "--only-seeds", "2", "--resume"]):  # no such seed
        assert main(_recovery_argv("no/such/model", out, *bad)) == 2  # refused before the model is looked up
    assert json.loads(out.read_text())["rows"] == res["rows"]


def test_shared_results_file_keeps_rows_written_by_other_processes(tmp_path):
    """Two processes of the same settings writing one file: each write merges the other's rows read under the
    folder lock, one row per key, parts side by side in start order."""
    from hf_geocomp.studies.resume import save_shared

    path = tmp_path / "shared.json"

    def build(rows, parts):
        return {"rows": rows, "parts": parts}

    def key(r):
        return r["seed"], r["i"]

    a = {"id": "a", "started": "2026-01-01T00:00:00"}
    b = {"id": "b", "started": "2026-01-01T00:00:01"}
    save_shared(str(path), [{"seed": 0, "i": 0, "v": 1}], a, key, build)
    save_shared(str(path), [{"seed": 1, "i": 0, "v": 2}], b, key, build)
    merged = save_shared(str(path), [{"seed": 0, "i": 0, "v": 1}, {"seed": 0, "i": 1, "v": 3}], a, key, build)
    assert [(r["seed"], r["i"]) for r in merged] == [(0, 0), (0, 1), (1, 0)]
    assert json.loads(path.read_text()) == {"rows": merged, "parts": [a, b]}
    assert not list(tmp_path.glob("*.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == ["shared.json"]


def test_processes_sharing_a_results_file_split_its_rows_by_claims(tmp_path):
    """Each process claims the next row no one has written or claimed; a live process's claim is honoured, a dead
    one's is taken over, and writing the row releases the claim."""
    import subprocess
    import sys

    from hf_geocomp.studies.resume import claim_next, save_shared

    path = str(tmp_path / "shared.json")
    todo = [(0, 0), (0, 0.5), (0, 1)]

    def key(r):
        return r["seed"], r["i"]

    def build(rows, parts):
        return {"rows": rows, "parts": parts}

    assert claim_next(path, todo, key, build) == (0, 0)
    assert claim_next(path, todo, key, build) == (0, 0.5)  # (0, 0) is claimed by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    doc = json.loads(open(path).read())
    doc["claims"][0]["pid"] = int(dead.stdout)  # (0, 0)'s process has ended
    open(path, "w").write(json.dumps(doc))
    assert claim_next(path, todo, key, build) == (0, 0)
    save_shared(path, [{"seed": 0, "i": 0.5}], {"id": "me", "started": "x"}, key, build)
    doc = json.loads(open(path).read())
    assert [c["key"] for c in doc["claims"]] == [[0, 0]] and doc["rows"] == [{"seed": 0, "i": 0.5}]
    assert claim_next(path, todo, key, build) == (0, 1)
    assert claim_next(path, todo, key, build) is None  # everything is written or claimed


def test_recovery_bench_leaves_rows_claimed_by_a_live_process(tiny_llama_dir, tmp_path):
    """A row another running process has claimed is not run again; the file stays partial with the claim."""
    import os

    from hf_geocomp.cli import main

    out = tmp_path / "rec.json"
    assert main(_recovery_argv(tiny_llama_dir, out, "--seeds", "2", "--only-seeds", "0", "--resume")) == 0
    doc = json.loads(out.read_text())
    doc["claims"] = [{"key": [1, 0], "host": __import__("socket").gethostname(), "pid": os.getpid()}]
    out.write_text(json.dumps(doc))
    assert main(_recovery_argv(tiny_llama_dir, out, "--seeds", "2", "--resume")) == 0
    res = json.loads(out.read_text())
    assert [(r["seed"], r["method"]) for r in res["rows"]][3:] == [(1, "finetune (no pruning)"),
                                                                   (1, "callback/magnitude/refit")]
    assert res["partial"] and res["claims"] == doc["claims"]
