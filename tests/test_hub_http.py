"""Loading by repo id through huggingface_hub's real client over HTTP on 127.0.0.1 (tests/hub_server.py):
push to the write side, load from olah, then load again from the populated cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("olah", reason="the read-side server is olah (pip install -e .[test])")

from hf_geocomp.errors import GeoCompError  # noqa: E402
from hf_geocomp.hub import GeoCompConfig, export, push  # noqa: E402

from .conftest import random_batch  # noqa: E402

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the test Hub server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the test Hub server did not listen on {port}")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The URL of a test Hub serving the git repositories it commits."""
    root = tmp_path_factory.mktemp("hub-server")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "hub_server.py"), str(root / "mirrors"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), cwd=root)
    try:
        _wait(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


LOAD = """
import json, sys, torch
import hf_geocomp
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = m(input_ids=ids).logits
out = m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
torch.save({"logits": logits, "tokens": out.sequences}, sys.argv[3])
print(json.dumps({"cache": type(out.past_key_values).__name__, "tokenizer": type(tok).__name__}))
"""


def _load(repo_id: str, ids_file: Path, out_file: Path, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", LOAD, repo_id, str(ids_file), str(out_file)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_push_then_load_by_repo_id(hub, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read = write = hub
    req = GeoCompConfig(prune=dict(sparsity=0.3, targets=["mlp"], allocation="global"),
                        kv=dict(budget=0.5, method="aware", group_size=8, sink_tokens=2, reference_tokens=16),
                        calibration="pydoc:calibration", tokens=256, block_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=req)
    folder = export(model, str(tmp_path / "export"), tokenizer=AutoTokenizer.from_pretrained(tiny_llama_dir),
                    repo_id="geo/tiny-llama")
    with pytest.raises(GeoCompError, match="HF_HUB_OFFLINE is set"):  # this test process is offline
        push(str(folder), "geo/tiny-llama", endpoint=write)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": read,
           "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_secret_test_token"}
    res = subprocess.run([sys.executable, "-m", "hf_geocomp.cli", "push", str(folder), "--repo-id", "geo/tiny-llama",
                          "--endpoint", write], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{read}/geo/tiny-llama/commit/" in res.stdout and "hf_secret" not in res.stdout + res.stderr
    ids = random_batch(2, 10, seed=4)["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert _load("geo/tiny-llama", tmp_path / "ids.pt", tmp_path / "online.pt", env)["cache"] == "GeoKVCache"
    online = torch.load(tmp_path / "online.pt")
    assert torch.equal(online["logits"], ref) and torch.equal(online["tokens"], tokens)
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # from the populated cache only
    assert _load("geo/tiny-llama", tmp_path / "ids.pt", tmp_path / "offline.pt", offline)["cache"] == "GeoKVCache"
    assert torch.equal(torch.load(tmp_path / "offline.pt")["logits"], ref)


ADAPTERS = """
import json, sys, torch
mode, tests, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, tests)
from conftest import random_batch, tiny_llama
from peft import PeftModel
batch = random_batch(seed=7)
if mode == "push":
    import hf_geocomp
    from peft import get_peft_model
    from hf_geocomp.geometry import collect_stats, linear_input_taps
    from hf_geocomp.hub import push
    from hf_geocomp.lora import SpectralLoraConfig, export_plain_lora
    cfg = SpectralLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    stats_model = tiny_llama()
    cfg.stats = collect_stats(stats_model, [random_batch(seed=i) for i in range(3)], linear_input_taps(stats_model))
    pm = get_peft_model(tiny_llama(), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        torch.save(pm(**batch).logits, out)
    pm.push_to_hub("geo/spectral-adapter")
    export_plain_lora(pm, out + ".plain")
    push(out + ".plain", "geo/plain-adapter")
else:
    if mode == "spectral":
        import hf_geocomp
    repo = "geo/spectral-adapter" if mode == "spectral" else "geo/plain-adapter"
    pm = PeftModel.from_pretrained(tiny_llama(), repo)
    with torch.no_grad():
        torch.save(pm(**batch).logits, out)
    print(json.dumps({"config": type(pm.peft_config["default"]).__name__, "plugin": "hf_geocomp" in sys.modules}))
"""


def test_lora_adapters_through_the_hub(hub, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub,
           "HF_HUB_OFFLINE": "0"}

    def run(mode):
        res = subprocess.run([sys.executable, "-c", ADAPTERS, mode, str(HERE), str(tmp_path / f"{mode}.pt")],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1]) if mode != "push" else None

    run("push")
    expected = torch.load(tmp_path / "push.pt")
    assert run("spectral") == {"config": "SpectralLoraConfig", "plugin": True}
    assert torch.equal(torch.load(tmp_path / "spectral.pt"), expected)
    assert run("plain") == {"config": "LoraConfig", "plugin": False}  # stock PEFT, hf_geocomp never imported
    assert torch.allclose(torch.load(tmp_path / "plain.pt"), expected, atol=1e-6)
