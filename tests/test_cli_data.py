"""Models and data resolution, and the CLI end to end on a tiny model, bad inputs included."""

import json
import os

import pytest

from hf_geocomp.cli import main
from hf_geocomp.data import (SHAKESPEARE_SPLITS, load_corpus, read_text_file, resolve_model, shakespeare_works,
                             token_blocks)
from hf_geocomp.errors import GeoCompError


def test_shakespeare_splits_are_disjoint_by_work():
    splits = {k: set(shakespeare_works(k)) for k in SHAKESPEARE_SPLITS}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not splits[a] & splits[b], (a, b)
    assert shakespeare_works("hamlet+tempest") == ["hamlet", "tempest"]
    with pytest.raises(GeoCompError, match="unknown Shakespeare"):
        shakespeare_works("hamlett")


def test_pydoc_splits_are_disjoint():
    cal = {d for d, _ in load_corpus("pydoc:calibration").documents}
    ev = {d for d, _ in load_corpus("pydoc:evaluation").documents}
    assert cal and ev and not cal & ev


def test_token_blocks_are_fixed_length_and_deterministic(tiny_llama_dir, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    corpus = load_corpus(f"file:{text_file}")
    a = token_blocks(tok, corpus, 16, max_tokens=100)
    b = token_blocks(tok, corpus, 16, max_tokens=100)
    assert len(a) == 7 and a[0]["input_ids"].shape == (16,)
    assert (a[:]["input_ids"] == b[:]["input_ids"]).all()
    with pytest.raises(GeoCompError, match="exceeds the model's maximum"):
        token_blocks(tok, corpus, 256, max_length=128)
    with pytest.raises(GeoCompError, match="zero blocks"):
        token_blocks(tok, corpus, 10 ** 7)
    with pytest.raises(GeoCompError, match="positive"):
        token_blocks(tok, corpus, 16, max_tokens=0)


def test_bad_files(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "blob.bin"
    empty.write_text("  \n")
    binary.write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(GeoCompError, match="empty"):
        read_text_file(empty)
    with pytest.raises(GeoCompError, match="binary"):
        read_text_file(binary)
    with pytest.raises(GeoCompError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")


def test_model_resolution_errors(tmp_path):
    with pytest.raises(GeoCompError, match="neither a bundled name"):
        resolve_model(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(GeoCompError, match="no config.json"):
        resolve_model(str(tmp_path / "notamodel"))
    with pytest.raises(GeoCompError, match="does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse rejects an option's value itself (exit 2, one line after the usage)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_analyze_end_to_end(tmp_path, capsys, tiny_llama_dir, text_file):
    out = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "analyze", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "256",
                                "--block-size", "32", "--batch-size", "4", "-o", str(out), "--save-stats",
                                "--no-progress")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    kinds = {e["kind"] for e in report["entries"]}
    assert kinds == {"activation_input", "activation_output", "k_head", "v_head", "weight"}
    assert report["tokens"] == 256
    assert report["command"].startswith("hf-geocomp analyze")
    for e in report["entries"]:
        assert 1 <= e["k95"] <= e["dim"] and 0 < e["df"] <= e["dim"] + 1e-6
    assert sorted(os.listdir(out)) == ["df_by_layer.png", "eigenvalue_curves.png", "k95_by_layer.png",
                                       "recipe.yaml", "report.json", "stats.safetensors"]
    # an existing output folder is not overwritten silently
    code, _, err = run_cli(capsys, "analyze", "--model", tiny_llama_dir, "--data", text_file, "--tokens", "64",
                           "--block-size", "32", "-o", str(out), "--no-progress")
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model-name/really/not"], "neither a bundled name"),
    (["--modules", "*.nothing_here"], "matches no module"),
    (["--block-size", "4096"], "exceeds the model's maximum"),
    (["--tokens", "0"], "--tokens: 0 must be at least 1"),
    (["--data", "EMPTY"], "empty"),
    (["--data", "BINARY"], "binary"),
    (["--model", "BADGGUF"], "cannot parse GGUF"),
    (["--data", "shakespeare:nonsense"], "unknown Shakespeare"),
])
def test_analyze_bad_input(tmp_path, capsys, tiny_llama_dir, text_file, args, message):
    files = {"EMPTY": tmp_path / "empty.txt", "BINARY": tmp_path / "blob.dat", "BADGGUF": tmp_path / "bad.gguf"}
    files["EMPTY"].write_text("")
    files["BINARY"].write_bytes(bytes(range(256)) * 4)
    files["BADGGUF"].write_bytes(b"GGUF this is not a gguf file")
    args = [str(files.get(a, a)) for a in args]
    base = {"--model": tiny_llama_dir, "--data": text_file, "--tokens": "64", "--block-size": "32"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["analyze", "-o", str(tmp_path / "out"), "--no-progress"]
    for flag, value in base.items():
        argv += [flag, value]
    if "--modules" in args:
        argv += ["--modules", args[args.index("--modules") + 1]]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "out").exists()


def test_datasets_source_from_a_local_folder(tmp_path):
    import json as _json

    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"passage number {i} about the sea"} for i in range(5)] + [{"text": "  "}]
    (folder / "train.jsonl").write_text("\n".join(_json.dumps(r) for r in rows))
    corpus = load_corpus(f"hf:{folder}:train")
    assert len(corpus.documents) == 5 and corpus.documents[0][1].startswith("passage number 0")
    with pytest.raises(GeoCompError, match="no column 'body'"):
        load_corpus(f"hf:{folder}::train:body")
    with pytest.raises(GeoCompError, match="cannot load dataset"):
        load_corpus(f"hf:{tmp_path / 'nope'}:train")


def test_run_recipe_equals_the_command(tmp_path, capsys, tiny_llama_dir, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"command: analyze\nmodel: {tiny_llama_dir}\ndata: {text_file}\ntokens: 64\n"
                      f"block_size: 32\nmodules: ['*.down_proj']\noutput: {tmp_path / 'out'}\nno_progress: true\n")
    code, _, err = run_cli(capsys, "run", str(recipe), "--set", "tokens=96")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tokens"] == 96 and report["args"]["modules"] == ["*.down_proj"]
    assert report["command"] == f"hf-geocomp run {recipe} --set tokens=96"
    assert {e["module"].rsplit(".", 1)[-1] for e in report["entries"]} == {"down_proj"}


@pytest.mark.parametrize("body, message", [
    ("command: analyze\ntokenz: 5\n", "unknown key 'tokenz'; allowed: model, data, tokens"),
    ("command: analyse\n", "command 'analyse' is not one of analyze, prune, bench-overhead"),
    ("model: x\n", "model 'x' is not a bundled name"),  # a job recipe (no command): its model is checked first
    ("command: analyze\nsave_stats: 3\n", "key 'save_stats' must be bool, got 3"),
    ("command: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes(tmp_path, capsys, body, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(body)
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert code == 2 and message in err, err


def test_overhead_benchmark_runs_on_a_tiny_model(tmp_path, capsys, tiny_llama_dir, text_file):
    out = tmp_path / "overhead.json"
    code, stdout, err = run_cli(capsys, "bench-overhead", "--model", tiny_llama_dir, "--data", text_file,
                                "--tokens", "64", "--block-size", "32", "--repeats", "2", "-o", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["plain-last", "full-previous", "full", "prune", "lora"]
    assert result["tokens"] == 64 and len(result["baseline"]["seconds"]) == 2 * 5  # one plain pass before each
    for row in rows.values():
        assert len(row["latency_ratios"]) == 2
        assert row["latency_ratio"] == pytest.approx(sum(row["latency_ratios"]) / 2)  # the median of two
        assert row["latency_ratio_min"] <= row["latency_ratio"] <= row["latency_ratio_max"]
    # 2 layers × (attention input, o_proj, mlp input, down_proj) + lm_head, float64 sums Σx, Σxxᵀ, n
    dims = [32, 32, 32, 48] * 2 + [32]
    assert result["distinct_inputs"] == 9 and rows["full"]["stats_bytes"] == 8 * sum(d + d * d + 1 for d in dims)
    # the arithmetic: tiny Llama, hidden 32, MLP 48, 4 query heads of 8 (2 KV heads), vocabulary 300;
    # two sequences of 32 tokens, so a causal query attends to 33/2 keys on average
    linears = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48)
    attention = 2 * 2 * 4 * 8 * 33 / 2
    forward, forward_last = linears + attention + 32 * 300, linears + attention + 32 * 300 * 2 / 64
    assert result["baseline"]["forward_macs_per_token"]["total"] == pytest.approx(forward)
    full = sum(d * (d + 1) / 2 for d in dims)
    assert rows["full"]["bound_ratio"] == pytest.approx((forward + full) / forward)
    assert rows["full"]["bound_ratio_full_products"] == pytest.approx((forward + sum(d * d for d in dims)) / forward)
    assert rows["full-previous"]["bound_ratio"] == rows["full"]["bound_ratio"]
    assert rows["plain-last"]["bound_ratio"] == pytest.approx(forward_last / forward)
    # pruning's default (variance): per-feature variances of down_proj's input, 8-wide head blocks of o_proj's
    assert rows["prune"]["stats_macs_per_token"] == 2 * (48 + 4 * 8 * 9 / 2)
    assert rows["prune"]["bound_ratio"] == pytest.approx((forward_last + 2 * (48 + 144)) / forward)
    # SpectralLoRA on q, v, up, down: three distinct inputs per layer, full products
    assert rows["lora"]["distinct_inputs"] == 6
    assert rows["lora"]["stats_macs_per_token"] == 2 * (2 * 32 * 33 / 2 + 48 * 49 / 2)
    assert "bound" in stdout and "full-previous" in stdout

def test_overwrite_keeps_the_old_output_when_the_final_rename_fails(tmp_path, monkeypatch):
    """--overwrite renames the old output aside before the new one takes its place: a failure (a kill) between
    the two never leaves neither; here the failed rename puts the old one back."""
    from pathlib import Path

    from hf_geocomp import io

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.replace

    def fail_on_the_new(src, dst):
        if Path(dst) == target and Path(src).name != target.name:  # the new folder (not the old one put back)
            raise OSError("killed between the two renames")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", fail_on_the_new)
    with pytest.raises(OSError, match="killed"):
        with io.output_dir(str(target), overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "old.txt").read_text() == "old"
    monkeypatch.undo()
    with io.output_dir(str(target), overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["new.txt"]


def test_bad_outputs_and_inputs_are_one_sentence_before_any_work(tmp_path, capsys, monkeypatch):
    """Each found before a model loads, as one error line and exit status 2, never a traceback."""
    from hf_geocomp import data

    def no_weights(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "load_model", no_weights)
    for argv, message in [
        (["run", "-o", ""], "--output is empty"),
        (["run", "-o", "/proc/geocomp-out"], "cannot write '/proc/geocomp-out': the folder '/proc' is not writable"),
        (["run", "-o", "/etc/hostname/out"], "'/etc/hostname' is a file, not a folder"),
        (["run", "--set", "threads=-1", "-o", "o"], "threads must be at least 1 (or null for torch's default), got -1"),
        (["run", "--set", "threads=0", "-o", "o"], "threads must be at least 1"),
        (["analyze", "-o", ""], "the output path is empty"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_export_of_a_folder_without_weights(tmp_path, capsys):
    from .conftest import tiny_llama

    folder = tmp_path / "model"
    tiny_llama().config.save_pretrained(folder)
    code, _, err = run_cli(capsys, "export", str(folder), "-o", str(tmp_path / "exported"))
    assert code == 2 and "has a config.json but no weights" in err and "Traceback" not in err, err
    assert not (tmp_path / "exported").exists()


def test_push_without_network_is_one_sentence(tmp_path, capsys, monkeypatch):
    """No network: a host that does not resolve or refuses fails at once; a connection that breaks is named."""
    import socket
    import threading
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def hang_up():  # accepts, then closes without answering: the client's transport error
        while True:
            conn, _ = server.accept()
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    for endpoint, message in [("http://no-such-host.invalid", "the Hub host 'no-such-host.invalid' cannot be resolved"),
                              (f"http://127.0.0.1:{refused}", f"no connection to the Hub at 127.0.0.1:{refused} opens"),
                              (f"http://127.0.0.1:{server.getsockname()[1]}", "cannot be reached (RemoteProtocolError")]:
        t = time.perf_counter()
        code, _, err = run_cli(capsys, "push", str(folder), "--repo-id", "me/model", "--endpoint", endpoint)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and time.perf_counter() - t < 10, err
    server.close()


def test_unreachable_hub_ids_fail_at_once(tmp_path, monkeypatch):
    """A model or dataset id that is not cached fails at once offline or when the Hub's host does not resolve,
    instead of after about 30 s of the clients' retries."""
    import time

    import datasets
    from huggingface_hub import constants

    t = time.perf_counter()
    with pytest.raises(GeoCompError, match="HF_HUB_OFFLINE is set, so it cannot be downloaded"):
        resolve_model("someone/no-such-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://no-such-host.invalid")
    with pytest.raises(GeoCompError, match="the Hub host 'no-such-host.invalid' cannot be resolved"):
        resolve_model("someone/no-such-model")
    with pytest.raises(GeoCompError, match="dataset 'someone/no-such-data' is not a local folder and the Hub host "
                                           "'no-such-host.invalid' cannot be resolved"):
        load_corpus("hf:someone/no-such-data:train")
    assert time.perf_counter() - t < 10
