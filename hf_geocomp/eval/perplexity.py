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
    """Mean NLL of tokens ``prefill+1 ..`` given the cached context; also tokens scored and cache bytes."""
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
