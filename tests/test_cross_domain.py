"""Calibration mixes, the standard-library source, BOS conventions and the cross-domain benchmark end to end."""

from __future__ import annotations

import json

import pytest

from hf_geocomp import GeoCompError
from hf_geocomp.cli import main
from hf_geocomp.data import DEFAULT_CALIBRATION, load_corpus, stdlib_files, token_blocks


def test_pystdlib_split_by_file_and_disjoint():
    calib, evaluation = load_corpus("pystdlib:calibration"), load_corpus("pystdlib:evaluation")
    files = stdlib_files()
    assert len(calib.documents) + len(evaluation.documents) == len(files) > 100
    assert not any("/test/" in f.as_posix() for f in files)
    assert {t for _, t in calib.documents[:50]}.isdisjoint({t for _, t in evaluation.documents})
    with pytest.raises(GeoCompError, match="pystdlib split"):
        load_corpus("pystdlib:train")


def test_mix_gives_equal_shares_and_names_unknown_sources(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    mix = "mix:pydoc:calibration,shakespeare:poems"
    blocks = token_blocks(tok, load_corpus(mix), 64, max_tokens=64 * 10, bos=None)
    assert len(blocks) == 10
    assert DEFAULT_CALIBRATION.startswith("mix:") and "pystdlib:calibration" in DEFAULT_CALIBRATION
    with pytest.raises(GeoCompError, match="calibration mix .*'nowhere:x'"):
        load_corpus("mix:pydoc,nowhere:x")


def test_cross_domain_bench_end_to_end(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cross.json"
    other = tmp_path / "other.txt"
    other.write_text(open(text_file).read()[::-1])  # a second, different "domain" of the same size
    code = main(["bench-cross-domain", "--model", tiny_llama_dir, "--domains", "pydoc",
                 f"doc=file:{text_file}|file:{text_file}", f"rev=file:{other}|file:{other}", "--tokens", "256",
                 "--eval-tokens", "256", "--block-size", "32", "--windows", "2", "--prefill", "64", "--score", "8", "--sink-tokens", "2",
                 "--kv-dtype", "float32", "--group-size", "8", "--shrinkage", "0.2", "--min-bits", "1", "--output",
                 str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert set(result["data"]["calibration_sets"]) == {"pydoc", "doc", "rev", "mix", "mix-no-pydoc", "mix-no-doc",
                                                       "mix-no-rev"}
    ok = [r for r in result["rows"] if "ppl" in r]
    assert all(r["ppl_ratio"] > 0 for r in ok)
    methods = {r["method"] for r in ok}
    assert {"magnitude/none", "variance/bias+refit", "wanda/bias+refit", "geocomp-fisher-bits",
            "geocomp-fisher-bits-shrink0.2", "geocomp-fisher-bits-floor1"} <= methods
    assert not any(r["method"].endswith(("shrink0.2", "floor1")) and not r["calibration"].startswith("mix")
                   for r in ok)  # the robustness rows only on the mixes
    assert result["summary"]["pydoc"]["prune"]["variance/bias+refit"]["off_domain"] is not None
    code = main(["bench-cross-domain", "--model", tiny_llama_dir, "--domains", "pydoc", "--output", str(out)])
    assert code == 2 and "at least two domains" in capsys.readouterr().err
