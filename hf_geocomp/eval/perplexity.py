"""Teacher-forced and continuation perplexity on held-out text, and forward latency ratios measured in one run."""

from __future__ import annotations

import math
import time

import torch

from .memory import tensor_bytes


# Float32 bytes of the logits of one chunk of positions: 256 MiB is 441 positions of a 152k vocabulary (Qwen2.5),
# where the logits of a whole 8 × 256 batch would be 1.2 GB (and as much again for the log-softmax).
LOGITS_BYTES = 1 << 28


def _decoder_and_lm(model):
    """``(decoder, causal LM)``: the module giving the final hidden states, and the LM whose head reads them
    (a PEFT model is unwrapped; its adapters stay in the decoder's layers)."""
    from ..errors import GeoCompError

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(lm, "base_model", lm)
    if decoder is lm or lm.get_output_embeddings() is None:
        raise GeoCompError(f"perplexity needs a language model with an output head; {type(lm).__name__} has none.")
    return decoder, lm


def _chunk_rows(lm, chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of positions, got {chunk}.")
        return chunk
    return max(1, LOGITS_BYTES // (4 * lm.get_output_embeddings().weight.shape[0]))


def _nll_sum(lm, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None) -> float:
    """Σ next-token NLL of ``targets`` (N,) given final hidden states ``hidden`` (N, d), through the output head
    ``chunk`` positions at a time, so no more than (chunk, vocab) logits exist at once."""
    from ..arch import lm_logits

    rows = _chunk_rows(lm, chunk)
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, hidden.shape[0], rows):
        logits = lm_logits(lm, hidden[s: s + rows]).float()  # (rows, vocab), the head in the model's dtype
        total += torch.nn.functional.cross_entropy(logits, targets[s: s + rows], reduction="sum").double().cpu()
    return float(total)


@torch.no_grad()
def perplexity(model, batches, *, chunk: int | None = None) -> float:
    """exp(mean next-token NLL) over every real token of ``batches`` (dicts with input_ids, attention_mask).

    The decoder gives the final hidden states of a batch; the logits are computed from them ``chunk`` positions
    at a time (default: :data:`LOGITS_BYTES` of float32 logits), never for the whole batch at once.
    """
    model.eval()
    decoder, lm = _decoder_and_lm(model)
    nll, count = 0.0, 0
    for b in batches:
        hidden = decoder(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state  # (B, T, d)
        mask = b["attention_mask"][:, 1:].bool().to(hidden.device)
        target = b["input_ids"][:, 1:].to(hidden.device)
        nll += _nll_sum(lm, hidden[:, :-1][mask], target[mask], chunk)  # (N, d) rows of real next tokens
        count += int(mask.sum())
    return math.exp(nll / count)


@torch.no_grad()
def continuation_nll(model, windows: torch.Tensor, prefill: int, make_cache, *,
                     chunk: int | None = None) -> tuple[float, int, int]:
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
    it. Equals, for an exact cache (``DynamicCache``), feeding the scored span one token at a time. The
    prefill computes no logits; the scored span's are computed ``chunk`` positions at a time (:func:`perplexity`).
    """
    if windows.shape[1] < prefill + 2:
        raise ValueError(f"a continuation window needs prefill + 2 tokens or more (one to feed, one to score), "
                         f"got {windows.shape[1]} with prefill {prefill}.")
    decoder, lm = _decoder_and_lm(model)
    cache = make_cache()
    decoder(input_ids=windows[:, :prefill], past_key_values=cache, use_cache=True)
    hidden = decoder(input_ids=windows[:, prefill:], past_key_values=cache, use_cache=True).last_hidden_state
    targets = windows[:, prefill + 1:].to(hidden.device)  # (B, score - 1)
    nll = _nll_sum(lm, hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1), chunk)
    return nll / targets.numel(), targets.numel(), tensor_bytes(cache)


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
