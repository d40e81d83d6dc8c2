"""Teacher-forced and continuation perplexity on held-out text, and forward latency ratios measured in one run."""

from __future__ import annotations

import math
import time

import torch

from .memory import tensor_bytes


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(mean next-token NLL) over every real token of ``batches`` (dicts with input_ids, attention_mask)."""
    model.eval()
    nll, count = 0.0, 0
    for b in batches:
        logits = model(**b).logits[:, :-1].float()  # (B, T-1, vocab)
        target = b["input_ids"][:, 1:]
        mask = b["attention_mask"][:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
        nll += float(loss)
        count += int(mask.sum())
    return math.exp(nll / count)


@torch.no_grad()
def continuation_nll(model, windows: torch.Tensor, prefill: int, make_cache) -> tuple[float, int, int]:
    """``(mean NLL, tokens scored, cache bytes)`` of ``windows`` (batch, prefill + score) read through a cache.

    The first ``prefill`` tokens are prefilled into ``make_cache()``; the other ``score`` tokens then go
    through that cache in one forward, and each but the last predicts its successor. So ``score - 1``
    tokens per window are scored, those at positions ``prefill + 1 .. prefill + score - 1``, every one
    predicted by a query that reads the context as the cache stored it. The token at position ``prefill``
    is not scored: its prediction comes out of the prefill's own forward, whose attention sees the
    context's exact keys and values whatever the cache keeps of them (transformers' ``QuantizedCache``
    and the coded cache both store only for later reads), so it would not measure the cache. Within the
    scored span the tokens read one another exactly (as new states of one forward), as a chunked
    prefill does; this is not token-by-token decoding, where each token is stored before the next reads
    it. Equals, for an exact cache (``DynamicCache``), feeding the scored span one token at a time.
    """
    if windows.shape[1] < prefill + 2:
        raise ValueError(f"a continuation window needs prefill + 2 tokens or more (one to feed, one to score), "
                         f"got {windows.shape[1]} with prefill {prefill}.")
    cache = make_cache()
    model(input_ids=windows[:, :prefill], past_key_values=cache, use_cache=True)
    logits = model(input_ids=windows[:, prefill:], past_key_values=cache, use_cache=True).logits.float()
    targets = windows[:, prefill + 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return float(nll), targets.numel(), tensor_bytes(cache)


@torch.no_grad()
def latency_ratio(model, baseline, input_ids: torch.Tensor, repeats: int = 5) -> float | None:
    """Median forward time of ``model`` over that of ``baseline`` on the same input, alternating runs.

    ``repeats=0`` measures nothing and returns None (latency not measured in this run).
    """
    if repeats < 0:
        raise ValueError(f"latency repeats must be >= 0 (0 skips latency), got {repeats}.")
    if repeats == 0:
        return None
    times = {id(model): [], id(baseline): []}
    for m in (model, baseline):  # warm-up
        m.eval()(input_ids=input_ids)
    for _ in range(repeats):
        for m in (baseline, model):
            t = time.perf_counter()
            m(input_ids=input_ids)
            times[id(m)].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return med[id(model)] / med[id(baseline)]
