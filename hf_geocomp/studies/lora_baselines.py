"""The H2 peers, built with PEFT's own APIs: EVA (arXiv:2410.07170) and AdaLoRA (arXiv:2303.10512).

**EVA** (``LoraConfig(init_lora_weights="eva")`` + ``initialize_lora_eva_weights``) runs an
incremental SVD of every target's input over calibration batches, cycling through the
loader until, for every layer, the top components of two consecutive steps have cosine
similarity >= ``tau``. On the MiniLM genre task with 2 batches of 8 × 64 tokens and PEFT's
defaults (rho=2, tau=0.99) it had not converged after 60 passes (35 s at 1 thread, and never
in the earlier session): the components are compared with their sign, and with only two
batches repeating, trailing components flip sign or swap inside near-degenerate pairs
from one step to the next (measured cosines of -1.00 and 0.40 after 20 passes). With 4
batches of 16 × 64 tokens, ``rho=1`` and ``tau=0.9`` it converges in ~30 passes (17 s).
That is the documented setting here (:data:`EVA_SETTING`). ``rho=1`` also means EVA keeps
rank ``r`` on every module, so its trainable parameters equal uniform LoRA's exactly
(EVA budgets rank *count*; with rho > 1 it moves ranks between modules of different
in + out, and the parameter count drifts from the budget). :func:`build_eva` stops with a
clear error instead of cycling forever.

**AdaLoRA** (``AdaLoraConfig``) needs ``update_and_allocate(step)`` after every optimizer
step and before the gradients are zeroed; Trainer does not call it, so
:class:`AdaLoraCallback` does, from ``on_optimizer_step``. AdaLoRA's budget is a rank
count too (``target_r`` × modules, each rank a triplet costing in + out + 1 parameters);
:func:`adalora_params` reports the parameters of the ranks it keeps.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from ..errors import GeoCompError

EVA_SETTING = {"rho": 1.0, "tau": 0.9}  # converges in tens of passes; rho=1 keeps uniform LoRA's parameter count
EVA_MAX_PASSES = 200  # forward passes before build_eva gives up


def build_eva(model, lora_kwargs: dict, loader, rho: float = EVA_SETTING["rho"], tau: float = EVA_SETTING["tau"],
              max_passes: int = EVA_MAX_PASSES):
    """``get_peft_model`` with EVA-initialised LoRA; returns ``(peft_model, forward passes used)``."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    cfg = LoraConfig(**lora_kwargs, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=tau))
    pm = get_peft_model(model, cfg, low_cpu_mem_usage=True)
    passes = 0

    def forward(m, inputs):
        nonlocal passes
        passes += 1
        if passes > max_passes:
            raise GeoCompError(f"EVA's incremental SVD did not converge within {max_passes} forward passes "
                               f"(tau={tau}); lower tau, use rho=1, or give more calibration tokens per batch.")
        return m(**inputs)

    initialize_lora_eva_weights(pm, dataloader=loader, forward_fn=forward, show_progress_bar=False)
    return pm, passes


def adalora_config(r: int, total_steps: int, **lora_kwargs):
    """AdaLoRA whose final budget is rank ``r`` on average (PEFT's ``target_r``), starting at 1.5 r.

    Schedule: warm-up ``tinit`` = 10% of the steps, budget shrinks cubically, the last 20%
    (``tfinal``, at least 1 step) train at the final ranks; one allocation per step.
    """
    from peft import AdaLoraConfig

    if total_steps < 3:
        raise GeoCompError(f"AdaLoRA needs at least 3 training steps (warm-up, budgeting, final), got {total_steps}.")
    tfinal = max(1, total_steps // 5)
    return AdaLoraConfig(target_r=r, init_r=math.ceil(1.5 * r), tinit=total_steps // 10, tfinal=tfinal, deltaT=1,
                         total_step=total_steps, **lora_kwargs)


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model


class AdaLoraCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after each optimizer step (before ``zero_grad``).

    >>> trainer = Trainer(model=adalora_model, args=args, train_dataset=ds, callbacks=[AdaLoraCallback()])

    Refuses to start if the config's ``total_step`` differs from the run's optimizer steps
    (the budget schedule would never reach ``target_r``).
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        cfg = self._config(model)
        if cfg.total_step != state.max_steps:
            raise GeoCompError(f"AdaLoraConfig.total_step is {cfg.total_step} but this run has {state.max_steps} "
                               "optimizer steps; set total_step to the run's steps.")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # state.global_step counts the steps finished before this one: 0, 1, ..., max_steps - 1
        _unwrap(model).base_model.update_and_allocate(state.global_step)

    @staticmethod
    def _config(model):
        from peft import AdaLoraConfig

        model = _unwrap(model)
        cfg = getattr(model, "peft_config", {}).get("default")
        if not isinstance(cfg, AdaLoraConfig):
            raise GeoCompError("AdaLoraCallback needs a PEFT model built from an AdaLoraConfig (adapter 'default').")
        return cfg


def adalora_ranks(model) -> dict[str, int]:
    """Ranks AdaLoRA keeps per module ({module name: rank}): its last allocation (``rank_pattern``
    of the config), or ``init_r`` everywhere before the first one."""
    model = _unwrap(model)
    pattern = AdaLoraCallback._config(model).rank_pattern or {}
    out = {}
    for name, p in model.base_model.model.named_parameters():  # the names rank_pattern uses
        if ".lora_E." in name:  # (init_r, 1)
            keep = pattern.get(name)
            out[name.split(".lora_E.")[0]] = p.shape[0] if keep is None else int(sum(keep))
    return out


def adalora_params(model) -> int:
    """Parameters of the ranks AdaLoRA keeps: a rank of a module with (in, out) costs in + out + 1."""
    model = _unwrap(model)
    params = dict(model.base_model.model.named_parameters())
    total = 0
    for module_name, rank in adalora_ranks(model).items():
        in_f = params[module_name + ".lora_A.default"].shape[1]  # (init_r, in)
        out_f = params[module_name + ".lora_B.default"].shape[0]  # (out, init_r)
        total += rank * (in_f + out_f + 1)
    return total
