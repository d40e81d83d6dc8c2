"""Token blocks: one BOS rule for calibration, training and evaluation, and equal shares of a mix."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hf_geocomp.data import load_corpus, token_blocks
from hf_geocomp.errors import GeoCompError

from .conftest import _tiny_tokenizer


def _sources(blocks, sources: list[str]) -> list[str]:
    """The mix source of every block (its doc ids are ``<source>/<doc>``)."""
    return [next(s for s in sources if d.startswith(s + "/")) for d in blocks.with_format(None)["doc"]]


@pytest.fixture(scope="module")
def three_files(tmp_path_factory):
    """Three text sources of different lengths (about 60, 35 and 12 blocks of 32 tiny-tokenizer tokens)."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("mix")
    texts = [t for _, t in sorted(topics.items()) if len(t) > 2000]
    paths = []
    for name, chunk in (("long", texts[0:6]), ("mid", texts[6:9]), ("short", texts[9:10])):
        (root / f"{name}.txt").write_text("\n\n".join(chunk))
        paths.append(f"file:{root / name}.txt")
    return paths


@pytest.mark.parametrize("n_blocks", [6, 7, 8, 9])
def test_every_source_of_a_mix_gets_an_equal_share(three_files, n_blocks):
    """Each of p sources gets ceil(n / p) blocks, whether or not p divides n."""
    tok = _tiny_tokenizer()
    mix = "mix:" + ",".join(three_files)
    sizes = {s: len(token_blocks(tok, load_corpus(s), 32)) for s in three_files}
    assert min(sizes.values()) >= 3 and len(set(sizes.values())) == 3  # unequal sources, each with room for 3
    blocks = token_blocks(tok, load_corpus(mix), 32, max_tokens=32 * n_blocks, bos=None)
    counts = {s: _sources(blocks, three_files).count(s) for s in three_files}
    assert counts == {s: -(-n_blocks // 3) for s in three_files}


def test_a_mix_source_shorter_than_its_share_is_refused(three_files):
    tok = _tiny_tokenizer()
    short = len(token_blocks(tok, load_corpus(three_files[2]), 32))
    mix = "mix:" + ",".join(three_files)
    token_blocks(tok, load_corpus(mix), 32, max_tokens=32 * 3 * short)  # exactly what the short source can share
    with pytest.raises(GeoCompError, match=rf"source 'file:.*short.txt' of the mix gives {short} blocks of 32 tokens, "
                                           rf"fewer than its equal share of {short + 1}.*at most {3 * short * 32} tokens"):
        token_blocks(tok, load_corpus(mix), 32, max_tokens=32 * 3 * (short + 1))


def test_every_token_blocks_call_names_its_model_or_bos():
    """A call without ``model=`` falls back to the tokenizer's own BOS, which misses a family that needs one:
    every call in the package passes the model (or an explicit ``bos``)."""
    root = Path(__file__).resolve().parents[1] / "hf_geocomp"
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "token_blocks":
                calls.append((path.relative_to(root).as_posix(), node.lineno, {k.arg for k in node.keywords}))
    assert len(calls) >= 8
    assert [(p, line) for p, line, kw in calls if not kw & {"model", "bos"}] == []


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny Gemma (a family that needs a BOS) whose tokenizer has a <bos> it does not add by itself."""
    from .families import FAMILIES

    tok = _tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    model = FAMILIES["gemma"]()
    model.resize_token_embeddings(len(tok))
    path = tmp_path_factory.mktemp("tiny-gemma")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok.bos_token_id


def test_job_evaluates_and_calibrates_on_blocks_that_start_with_the_models_bos(gemma_dir, text_file, tmp_path,
                                                                               monkeypatch):
    import hf_geocomp.data as data
    import hf_geocomp.eval.perplexity as perplexity
    from hf_geocomp.data import tokenizer_bos
    from hf_geocomp.job import JobConfig, run_job

    folder, bos = gemma_dir
    from transformers import AutoTokenizer

    assert tokenizer_bos(AutoTokenizer.from_pretrained(folder)) is None  # "auto" by the tokenizer alone: no BOS
    firsts = {"calibration": [], "perplexity": [], "continuation": []}

    def spy(name, real, get):
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            firsts[name].extend(get(args, out))
            return out
        return wrapped

    monkeypatch.setattr(data, "calibration_loader", spy("calibration", data.calibration_loader,
                                                        lambda a, out: [b["input_ids"][:, 0] for b in out]))
    real_ppl = perplexity.perplexity

    def ppl(model, batches):
        batches = list(batches)
        firsts["perplexity"].extend(b["input_ids"][:, 0] for b in batches)
        return real_ppl(model, batches)

    monkeypatch.setattr(perplexity, "perplexity", ppl)
    monkeypatch.setattr(perplexity, "continuation_nll", spy("continuation", perplexity.continuation_nll,
                                                            lambda a, out: [a[1][:, 0]]))
    job = JobConfig.from_dict(dict(model=folder, calibration=f"file:{text_file}", tokens=64, block_size=32, batch_size=4,
                                   eval_data=[f"file:{text_file}"], eval_tokens=48, eval_block=24, windows=1,
                                   prefill=40, score=8, prune_baselines=[], kv_baselines=[],
                                   output=str(tmp_path / "out"), prune=dict(sparsity=0.2), kv=dict(budget=0.5)))
    run_job(job, progress=False)
    assert all(len(v) for v in firsts.values()), {k: len(v) for k, v in firsts.items()}
    for name, ids in firsts.items():
        assert all((i == bos).all() for i in ids), name
