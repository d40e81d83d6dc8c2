"""Save, reload and compress on load through transformers' quantizer plugin; stock transformers never loads wrongly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_geocomp  # noqa: F401  (registers the quantizer)
from hf_geocomp import kv
from hf_geocomp.errors import GeoCompError
from hf_geocomp.eval.memory import tensor_bytes
from hf_geocomp.geometry import collect_stats
from hf_geocomp.hub import GUARD, GeoCompConfig, mark_compressed, register, register_module_kind
from hf_geocomp.prune import prune, prune_taps

from .conftest import random_batch, tiny_gpt2, tiny_llama


def tiny_qwen2_sliding():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    return Qwen2ForCausalLM(cfg).eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2_sliding}
# kind → (pruning kwargs or None, whether the KV cache is coded)
KINDS = {
    "uniform": (dict(targets=("mlp",), allocation="uniform"), False),
    "global": (dict(targets=("mlp", "heads"), allocation="global"), False),
    "heads": (dict(targets=("heads",), allocation="uniform"), False),
    "kv-groups": (dict(targets=("mlp", "heads"), head_mode="kv", allocation="global"), False),  # whole GQA groups
    "kv": (None, True),
    "kv+prune": (dict(targets=("mlp",), allocation="global"), True),
}
CASES = [(f, k) for f in FAMILIES for k in KINDS]
IDS = random_batch(2, 12, seed=9)["input_ids"]
GEN = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True)


def compress(family: str, kind: str):
    """A tiny model compressed with the Python API and marked for saving."""
    model = FAMILIES[family]()
    batches = [random_batch(2, 16, seed=i) for i in range(3)]
    pruning, coded = KINDS[kind]
    prune_plan = kv_plan = None
    if pruning:
        stats = collect_stats(model, batches, prune_taps(model, pruning["targets"]))
        _, prune_plan = prune(model, stats, sparsity=0.3, compensation="bias+refit", **pruning)
    if coded:
        _, kv_plan = kv.compress(model, batches, budget=0.5, method="aware", group_size=8, sink_tokens=2,
                                 reference_tokens=16)
    mark_compressed(model, prune_plan, kv_plan)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every (family, kind) compressed, saved, with its reference logits and greedy tokens."""
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for family, kind in CASES:
        model = compress(family, kind)
        folder = root / f"{family}-{kind}"
        model.save_pretrained(folder)
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        gen = model.generate(input_ids=IDS, **GEN)
        torch.save({"logits": logits}, folder / "reference.pt")
        out[family, kind] = (folder, model, logits, gen)
    return out


@pytest.mark.parametrize("family,kind", CASES)
def test_round_trip(saved, family, kind):
    folder, model, logits, gen = saved[family, kind]
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plan = again.config.quantization_config.plan
    assert isinstance(again.config.quantization_config, GeoCompConfig)
    assert plan["shapes"] == model.config.quantization_config.plan["shapes"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, logits)
    if kind == "global":
        assert len(set(plan["shapes"]["mlp_widths"])) > 1 and not plan["stock_loadable"]
    if kind == "kv-groups" and family != "gpt2":
        assert min(plan["shapes"]["num_kv_heads"]) < 2 and not plan["stock_loadable"]
    out = again.generate(input_ids=IDS, **GEN)
    assert torch.equal(out.sequences, gen.sequences)
    if KINDS[kind][1]:  # the coded cache without past_key_values=, holding the plan's bytes
        kv_plan = again.geocomp_kv_plan
        assert type(out.past_key_values).__name__ == "GeoKVCache"
        assert again.config._attn_implementation == "geocomp_reduced"
        tokens = out.sequences.shape[1] - 1
        if family != "qwen2":  # a sliding layer keeps only its window
            cache = out.past_key_values  # the used bytes are the plan's; the buffers may hold room for more tokens
            assert cache.nbytes() == kv_plan.cache_bytes(tokens, batch=2) <= cache.nbytes(used=False) == tensor_bytes(cache)
        mine = kv_plan.cache(again)  # an explicit cache still wins
        assert again.generate(input_ids=IDS, past_key_values=mine, **GEN).past_key_values is mine
    again.save_pretrained(folder.parent / f"{folder.name}-again")  # a reloaded model saves the same checkpoint
    cfg = json.loads((folder.parent / f"{folder.name}-again" / "config.json").read_text())
    assert cfg["quantization_config"]["plan"] == plan
    assert (cfg.get("attn_implementation") == GUARD) == (not plan["stock_loadable"])


NO_PLUGIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "hf_geocomp" not in sys.modules
out = {}
for folder in sys.argv[1:]:
    try:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits = m(input_ids=torch.load(folder + "/ids.pt")).logits
        out[folder] = {"equal": bool(torch.equal(logits, torch.load(folder + "/reference.pt")["logits"]))}
    except Exception as e:
        out[folder] = {"error": str(e)}
assert "hf_geocomp" not in sys.modules
print(json.dumps(out))
"""


def test_no_plugin_never_silently_wrong(saved, tmp_path):
    """Stock transformers (hf_geocomp never imported): identical logits or an error naming hf-geocomp."""
    folders = []
    for (family, kind), (folder, *_) in saved.items():
        torch.save(IDS, folder / "ids.pt")
        folders.append(str(folder))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = ""  # no hf_geocomp on the path at all
    res = subprocess.run([sys.executable, "-c", NO_PLUGIN, *folders], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for (family, kind), (folder, model, *_) in saved.items():
        r = results[str(folder)]
        if model.config.quantization_config.plan["stock_loadable"]:
            assert r == {"equal": True}, (family, kind, r)
        else:
            assert "pip install hf-geocomp" in r.get("error", "") and "import hf_geocomp" in r["error"], (family, kind, r)
    stock = {k for (k, (_, m, *_)) in saved.items() if m.config.quantization_config.plan["stock_loadable"]}
    assert ("llama", "uniform") in stock and ("llama", "heads") in stock and ("gpt2", "heads") not in stock


def test_kv_bases_stay_float32_in_bfloat16(saved):
    folder = saved["llama", "kv"][0]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert {b.dtype for b in model.geocomp_kv.buffers()} == {torch.float32}
    assert type(model.generate(input_ids=IDS, **GEN).past_key_values).__name__ == "GeoKVCache"


def _edit_plan(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_checkpoints(saved, tmp_path):
    folder = saved["llama", "kv+prune"][0]

    def widths(cfg):
        cfg["quantization_config"]["plan"]["shapes"]["mlp_widths"][0] += 1

    def model_type(cfg):
        cfg["quantization_config"]["plan"]["model_type"] = "gpt2"

    def newer(cfg):
        cfg["quantization_config"]["plan"]["format_version"] = 99

    def newer_outer(cfg):
        cfg["quantization_config"]["format_version"] = 2

    def no_plan(cfg):
        cfg["quantization_config"]["plan"] = None
        cfg["quantization_config"]["prune"] = None

    for edit, match in ((widths, "does not match the weights"), (model_type, "made for model type 'gpt2'"),
                        (newer, "format version 99"), (newer_outer, "format version 2"), (no_plan, "needs prune")):
        bad = _edit_plan(folder, tmp_path / edit.__name__, edit)
        with pytest.raises(GeoCompError, match=match):
            AutoModelForCausalLM.from_pretrained(bad)


def test_config_validation():
    with pytest.raises(GeoCompError, match="no option 'prunning'"):
        GeoCompConfig(prunning={"sparsity": 0.2}, calibration="pydoc")
    with pytest.raises(GeoCompError, match="unknown key 'sparsityy'; allowed: .*sparsity"):
        GeoCompConfig(prune={"sparsityy": 0.2}, calibration="pydoc")
    with pytest.raises(GeoCompError, match=r"sparsity must be in \[0, 1\)"):
        GeoCompConfig(prune={"sparsity": 1.5}, calibration="pydoc")
    with pytest.raises(GeoCompError, match=r"budget must be .* in \(0, 1\]"):
        GeoCompConfig(kv={"budget": 0}, calibration="pydoc")
    with pytest.raises(GeoCompError, match="tokens must be an integer >= 1"):
        GeoCompConfig(kv={}, calibration="pydoc", tokens=0)
    with pytest.raises(GeoCompError, match="calibration text or stats_file, not both"):
        GeoCompConfig(kv={}, calibration="pydoc", stats_file="x")
    with pytest.raises(GeoCompError, match="same head counts"):
        GeoCompConfig(kv={}, prune={"allocation": "global"}, calibration="pydoc")
    with pytest.raises(GeoCompError, match="nothing to compress"):
        GeoCompConfig(calibration="pydoc")
    cfg = GeoCompConfig(prune={"sparsity": 0.1}, kv={"budget": 0.5}, calibration="pydoc")
    assert GeoCompConfig.from_dict(json.loads(cfg.to_json_string())).to_dict() == cfg.to_dict()
    register()  # a second registration is a no-op


def _request(text_file):
    return dict(prune=dict(sparsity=0.3, targets=("mlp",), allocation="global", compensation="bias+refit"),
                kv=dict(budget=0.5, method="aware", group_size=8, sink_tokens=2, reference_tokens=16),
                calibration=f"file:{text_file}", tokens=256, block_size=32, batch_size=4)


def test_compress_on_load_equals_compress_then_save(tiny_llama_dir, text_file, tmp_path):
    from transformers import AutoTokenizer

    from hf_geocomp.data import calibration_loader

    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=GeoCompConfig(**_request(text_file)))
    plan = loaded.config.quantization_config.plan
    assert plan["prune"]["achieved_sparsity"] > 0.2 and len(set(plan["shapes"]["mlp_widths"])) > 1
    assert plan["kv"]["bytes_per_token"] < plan["kv"]["full_bytes_per_token"]

    req = GeoCompConfig(**_request(text_file))  # the same steps with the Python API
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batches = list(calibration_loader(model, AutoTokenizer.from_pretrained(tiny_llama_dir), req.calibration,
                                      req.tokens, req.block_size, req.batch_size, req.seed))
    _, pp = prune(model, collect_stats(model, batches, prune_taps(model, ("mlp",))), config=req.prune)
    _, kp = kv.compress(model, kv.collect_kv_stats(model, batches, "aware"), **req.to_dict()["kv"])
    mark_compressed(model, pp, kp, request=req)
    assert model.config.quantization_config.to_dict() == loaded.config.quantization_config.to_dict()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)
    loaded.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.generate(input_ids=IDS, **GEN).sequences, model.generate(input_ids=IDS, **GEN).sequences)


def test_stats_file_on_load(tiny_llama_dir, text_file, tmp_path):
    from transformers import AutoTokenizer

    from hf_geocomp.data import calibration_loader

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batches = calibration_loader(base, AutoTokenizer.from_pretrained(tiny_llama_dir), f"file:{text_file}", 128, 32)
    collect_stats(base, batches, prune_taps(base, ("mlp",))).save(str(tmp_path / "stats.safetensors"))
    cfg = GeoCompConfig(prune=dict(sparsity=0.25, targets=["mlp"]), stats_file=str(tmp_path / "stats.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    assert model.config.quantization_config.plan["prune"]["achieved_sparsity"] > 0.15
    other = tmp_path / "other"
    tiny_gpt2().save_pretrained(other)
    with pytest.raises(GeoCompError, match="different model architecture"):
        AutoModelForCausalLM.from_pretrained(other, quantization_config=cfg)


def test_trainer_fine_tunes_a_reloaded_model(saved, tmp_path):
    from transformers import Trainer, TrainingArguments

    folder = saved["llama", "global"][0]
    model = AutoModelForCausalLM.from_pretrained(folder)
    rows = [{"input_ids": ids, "labels": ids} for ids in random_batch(8, 12, seed=3)["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)
    trainer.save_model(str(tmp_path / "tuned"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)
    assert again.config.quantization_config.plan["shapes"] == model.config.quantization_config.plan["shapes"]


class LowRankLinear(torch.nn.Module):
    """A test-only replacement module speaking the geocomp_record protocol: y = (x Rᵀ) Lᵀ."""

    def __init__(self, in_features, out_features, rank, dtype=None):
        super().__init__()
        self.R = torch.nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.L = torch.nn.Parameter(torch.empty(out_features, rank, dtype=dtype))

    def forward(self, x):
        return x @ self.R.T @ self.L.T

    def geocomp_record(self) -> dict:
        return {"kind": "test.lowrank", "in_features": self.R.shape[1], "out_features": self.L.shape[0],
                "rank": self.R.shape[0]}

    @classmethod
    def from_geocomp_record(cls, record: dict, dtype) -> "LowRankLinear":
        return cls(record["in_features"], record["out_features"], record["rank"], dtype=dtype)


def test_replaced_modules(tmp_path):
    model = tiny_llama()
    w = model.model.layers[1].self_attn.o_proj.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    low = LowRankLinear(32, 32, 4)
    low.L.data, low.R.data = (u[:, :4] * s[:4]).contiguous(), vh[:4].contiguous()
    model.model.layers[1].self_attn.o_proj = low
    mark_compressed(model)
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["plan"]
    assert plan["replaced"] == {"model.layers.1.self_attn.o_proj": low.geocomp_record()} and not plan["stock_loadable"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["attn_implementation"] == GUARD  # stock refuses
    with pytest.raises(GeoCompError, match="kind 'test.lowrank' is unknown"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    register_module_kind("test.lowrank", f"{__name__}:LowRankLinear")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(again.model.layers[1].self_attn.o_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, ref)
    with pytest.raises(GeoCompError, match="already registered"):
        register_module_kind("test.lowrank", "elsewhere:Other")
