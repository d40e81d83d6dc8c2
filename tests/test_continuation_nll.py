"""continuation_nll against a hand-written loop: what it scores, and why the first continuation token is not scored."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from hf_geocomp.eval.perplexity import continuation_nll

from .conftest import random_batch
from .families import FAMILIES

PREFILL, SCORE = 20, 9


def _by_hand(model, windows, prefill):
    """Prefill into a DynamicCache, then feed the tokens after the context one at a time, summing -log p of the next."""
    total, count = 0.0, 0
    for w in windows:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=w[None, :prefill], past_key_values=cache, use_cache=True)
            for t in range(prefill, len(w) - 1):
                logits = model(input_ids=w[None, t: t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
                total -= float(torch.log_softmax(logits.double(), -1)[w[t + 1]])
                count += 1
    return total / count, count


@pytest.mark.parametrize("name", ["llama3", "gemma2"])  # gemma2: softcaps and a sliding-window layer
def test_continuation_nll_is_the_hand_written_loop(name):
    model = FAMILIES[name]()
    windows = random_batch(3, PREFILL + SCORE, seed=2)["input_ids"]
    nll, count, nbytes = continuation_nll(model, windows, PREFILL, lambda: DynamicCache(config=model.config))
    expected, n = _by_hand(model, windows, PREFILL)
    assert count == n == 3 * (SCORE - 1)  # score - 1 tokens per window: the one at position `prefill` is not scored
    assert nll == pytest.approx(expected, rel=1e-5)
    assert nbytes > 0


def test_the_unscored_token_does_not_depend_on_the_cache():
    """The prediction of the token at position ``prefill`` comes from the prefill's forward, which reads the exact
    context whatever the cache stores (here a coded cache at a quarter of the bytes); the scored ones do not."""
    from hf_geocomp.kv import KVConfig, build_plan, collect_kv_stats

    model = FAMILIES["llama3"]()
    plan = build_plan(model, collect_kv_stats(model, [random_batch(4, 24, seed=s) for s in range(2)], "aware"),
                      KVConfig(budget=0.25, method="aware"))
    windows = random_batch(2, PREFILL + SCORE, seed=4)["input_ids"]
    outs = {}
    for name, make in (("dynamic", lambda: DynamicCache(config=model.config)), ("coded", lambda: plan.cache(model))):
        cache = make()
        with torch.no_grad():
            first = model(input_ids=windows[:, :PREFILL], past_key_values=cache, use_cache=True).logits[:, -1]
            rest = model(input_ids=windows[:, PREFILL:], past_key_values=cache, use_cache=True).logits
        outs[name] = first, rest, continuation_nll(model, windows, PREFILL, make)[0]
    torch.testing.assert_close(outs["coded"][0], outs["dynamic"][0])
    assert (outs["coded"][1] - outs["dynamic"][1]).abs().max() > 1e-3
    assert not math.isclose(outs["coded"][2], outs["dynamic"][2], rel_tol=1e-6)


def test_a_window_without_a_token_to_score_is_refused():
    model = FAMILIES["llama3"]()
    windows = random_batch(1, PREFILL + 1, seed=0)["input_ids"]
    with pytest.raises(ValueError, match="prefill \\+ 2 tokens"):
        continuation_nll(model, windows, PREFILL, lambda: DynamicCache(config=model.config))
