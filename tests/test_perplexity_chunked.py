"""Perplexity and continuation perplexity computed from hidden states through the output head a chunk of positions
at a time equal the whole-batch logits of the model's own forward (every family's head, scaling and softcap), and
never hold more than one chunk of logits."""

from __future__ import annotations

import math

import pytest
import torch

from hf_geocomp.eval.perplexity import continuation_nll, perplexity
from tests.families import DECODERS, FAMILIES, VOCAB


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(3, VOCAB, (3, 17), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # a padded row: its padding is not scored
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


@torch.no_grad()
def _whole_batch_ppl(model, batches) -> float:
    """The reference: full-vocabulary logits of the whole batch from the model's forward."""
    nll, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
        mask = b["attention_mask"][:, 1:].bool()
        nll += float(torch.nn.functional.cross_entropy(logits[mask], b["input_ids"][:, 1:][mask], reduction="sum"))
        count += int(mask.sum())
    return math.exp(nll / count)


@torch.no_grad()
def _whole_batch_continuation(model, windows, prefill) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=windows[:, :prefill], past_key_values=cache, use_cache=True)
    logits = model(input_ids=windows[:, prefill:], past_key_values=cache, use_cache=True).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   windows[:, prefill + 1:].reshape(-1)))


@pytest.mark.parametrize("family", DECODERS)
def test_chunked_perplexity_equals_whole_batch_logits(family):
    model = FAMILIES[family]()
    batches = _batches()
    ref = _whole_batch_ppl(model, batches)
    for chunk in (None, 1, 7, 10_000):  # 7 does not divide the 43 scored positions of a batch
        assert perplexity(model, batches, chunk=chunk) == pytest.approx(ref, rel=1e-6), (family, chunk)


@pytest.mark.parametrize("family", DECODERS)
def test_chunked_continuation_equals_whole_batch_logits(family):
    from transformers import DynamicCache

    model = FAMILIES[family]()
    windows = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    ref = _whole_batch_continuation(model, windows, prefill=18)
    for chunk in (None, 5):  # 5 does not divide the 2 × 11 scored positions
        nll, n, nbytes = continuation_nll(model, windows, 18, lambda: DynamicCache(config=model.config), chunk=chunk)
        assert nll == pytest.approx(ref, rel=1e-6) and n == 2 * 11 and nbytes > 0, (family, chunk)


def test_the_final_softcap_and_logit_scaling_are_applied():
    """Gemma 2's final softcap (made to bite) and Granite's logits_scaling change the perplexity; the chunked path
    follows both (a head applied without them would give the uncapped or unscaled value)."""
    from hf_geocomp.eval import perplexity as ppl_module

    batches = _batches()
    for family, key, value in (("gemma2", "final_logit_softcapping", 0.3), ("granite", "logits_scaling", 0.05)):
        model = FAMILIES[family]()
        setattr(model.config, key, value)
        ref = _whole_batch_ppl(model, batches)
        assert perplexity(model, batches, chunk=7) == pytest.approx(ref, rel=1e-6)
        head_only = model.get_output_embeddings()
        with torch.no_grad():
            decoder, lm = ppl_module._decoder_and_lm(model)
            b = batches[0]
            h = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            capped = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert not torch.allclose(head_only(h), capped, rtol=1e-3, atol=1e-3), family  # the transform matters here


def test_the_logits_held_are_one_chunk():
    """A hook on the output head: every call returns at most ``chunk`` rows, never a whole batch's logits."""
    from transformers import DynamicCache

    model = FAMILIES["llama3"]()
    sizes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape)))
    try:
        perplexity(model, _batches(), chunk=7)
        assert sizes and max(s[0] for s in sizes) == 7 and all(len(s) == 2 and s[1] == VOCAB for s in sizes)
        assert sum(s[0] for s in sizes) == 2 * 43  # every scored position once (3 × 16, the padded row 5 fewer)
        sizes.clear()
        windows = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
        continuation_nll(model, windows, 18, lambda: DynamicCache(config=model.config), chunk=5)
        assert [s[0] for s in sizes] == [5, 5, 5, 5, 2]  # the prefill computes no logits at all
    finally:
        handle.remove()


def test_default_chunk_bounds_the_logits_bytes(monkeypatch):
    from hf_geocomp.eval import perplexity as ppl_module

    model = FAMILIES["qwen2"]()
    monkeypatch.setattr(ppl_module, "LOGITS_BYTES", 4 * VOCAB * 6)  # six positions of float32 logits
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    try:
        value = perplexity(model, _batches())
    finally:
        handle.remove()
    assert max(rows) == 6 and value == pytest.approx(_whole_batch_ppl(model, _batches()), rel=1e-6)


def test_bfloat16_and_peft_models():
    """The head runs in the model's dtype (bfloat16 logits, as the forward's); a PEFT model's adapters count."""
    from peft import LoraConfig, get_peft_model

    model = FAMILIES["llama3"]().to(torch.bfloat16)
    batches = _batches()
    assert perplexity(model, batches, chunk=7) == pytest.approx(_whole_batch_ppl(model, batches), rel=1e-3)
    base = FAMILIES["llama3"]()
    plain = perplexity(base, batches)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    with_adapters = perplexity(pm, batches, chunk=7)
    assert with_adapters == pytest.approx(_whole_batch_ppl(pm, batches), rel=1e-6) and with_adapters != plain


def test_a_model_without_a_head_is_refused():
    from hf_geocomp.errors import GeoCompError

    with pytest.raises(GeoCompError, match="BertModel has none"):
        perplexity(FAMILIES["bert"](), _batches())
    with pytest.raises(ValueError, match="chunk must be a positive"):
        perplexity(FAMILIES["llama3"](), _batches(), chunk=0)
