"""Learned refinement of a plan's decoders: a short optimisation against the uncompressed model.

The bases are fitted in closed form from second moments; the quantiser then adds errors the
fit never saw. Refinement keeps the encoders and the stored codes as they are and fits the
decoders (``x̂ = z·dec``, per layer, KV head, K and V) by gradient descent on calibration
windows: prefill ``prefill`` tokens into a coded cache, score the rest through it, and
minimise the KL divergence from the uncompressed model's next-token distribution. The
prefill pass does not read the cache (it attends to its own exact states), so only the
scoring pass is differentiated: a step costs about one forward and backward of the scored tokens.

Decoders of different heads differ in scale by orders of magnitude (keys are large, values
small), and Adam's step is about ``lr`` per entry whatever the gradient's size. With
``relative_lr`` every head's decoder is optimised as ``s_h·P`` with ``s_h`` its fitted RMS and
``P`` the parameter, so that ``lr`` is a fraction of each head's own scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GeoCompError
from .cache import plan_codecs


def refine(model: nn.Module, plan, windows: torch.Tensor, prefill: int, steps: int = 30, lr: float = 1e-3,
           batch_size: int = 4, seed: int = 0, check_every: int = 10, relative_lr: bool = False):
    """Fit ``plan``'s decoders on ``windows`` (n, prefill + scored) of calibration token ids; returns ``plan``.

    Every ``check_every`` steps the mean KL over all ``windows`` is measured and the best
    decoders so far are kept (the fitted ones if no step improves on them): they replace
    ``plan.tensors["{layer}.{k|v}.dec"]``; ``plan.refinement`` records the settings, the KL
    before and after, and the step kept. ``relative_lr``: ``lr`` is a fraction of each head's
    decoder RMS (see the module's docstring).
    """
    if plan.identity:
        raise GeoCompError("a budget-1.0 plan stores keys and values exactly: there is nothing to refine.")
    if not 0 < prefill < windows.shape[1]:
        raise GeoCompError(f"prefill must be between 0 and the window length {windows.shape[1]}, got {prefill}.")
    from transformers import DynamicCache

    plan._codecs = None
    codecs = plan_codecs(plan)
    params, scales = {}, {}
    for (layer, kind), codec in codecs.items():
        dec = codec.dec.detach().float()  # (kv_heads, d, d)
        key = f"{layer}.{kind}.dec"
        scales[key] = (dec.pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-12) if relative_lr
                       else torch.ones(()))
        params[key] = nn.Parameter((dec / scales[key]).to(codec.dec.dtype))

    def bind() -> None:  # the codecs read s·P (a graph through P while it is trained; s = 1 for an absolute lr)
        for (layer, kind), codec in codecs.items():
            key = f"{layer}.{kind}.dec"
            codec.dec = params[key] * scales[key].to(params[key].dtype)

    def current() -> dict[str, torch.Tensor]:
        return {k: p.detach() * scales[k].to(p.dtype) for k, p in params.items()}
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    optim = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def kl(batch: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.no_grad():
            ref_cache = DynamicCache(config=model.config)
            model(input_ids=batch[:, :prefill], past_key_values=ref_cache)
            ref = model(input_ids=batch[:, prefill:], past_key_values=ref_cache).logits.float().log_softmax(-1)
            cache = plan.cache(model)
            model(input_ids=batch[:, :prefill], past_key_values=cache)
        with torch.set_grad_enabled(grad):
            out = model(input_ids=batch[:, prefill:], past_key_values=cache).logits.float().log_softmax(-1)
            return torch.nn.functional.kl_div(out.flatten(0, 1), ref.flatten(0, 1), log_target=True,
                                              reduction="batchmean")

    def mean_kl() -> float:
        return float(sum(kl(b, False) * len(b) for b in windows.split(batch_size)) / len(windows))

    try:
        bind()
        before = best = mean_kl()
        kept = current()
        best_step = 0
        for step in range(1, steps + 1):
            idx = torch.randperm(len(windows), generator=gen)[:batch_size]
            bind()
            loss = kl(windows[idx], True)
            optim.zero_grad()
            loss.backward()
            optim.step()
            bind()
            if step % check_every == 0 or step == steps:  # keep the best decoders seen, never worse than the fit
                now = mean_kl()
                if now < best:
                    best, best_step = now, step
                    kept = current()
    finally:  # on an error the plan keeps its fitted decoders (plan.tensors untouched)
        for p, flag in frozen:
            p.requires_grad_(flag)
        plan._codecs = None
    plan.tensors.update(kept)
    plan.refinement = {"steps": steps, "lr": lr, "relative_lr": relative_lr, "batch_size": batch_size, "windows": int(len(windows)),
                       "prefill": prefill, "scored": int(windows.shape[1] - prefill), "kl_before": before,
                       "kl_after": best, "best_step": best_step}
    return plan
