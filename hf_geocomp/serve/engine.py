"""One served model: loading, prompts (its chat template), generation through its own KV cache, perplexity.

Nothing here knows HTTP; :mod:`.app` calls these methods from worker threads, never on the event loop.

Sampling is seeded per request without torch's process-global RNG (which concurrent requests would share):
greedy decoding over temperature-scaled, top-p-masked scores plus Gumbel(0, 1) noise drawn from the
request's own ``torch.Generator`` takes exactly a sample of softmax(scores / T) (the Gumbel-max trick), so
the same seed gives the same tokens whatever else the server is doing.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, StoppingCriteria, TextStreamer

from ..errors import GeoCompError

# Attention implementations whose generations on one model must not overlap. None today: hf_geocomp's reduced
# attention hands the coded cache's state over per thread (hf_geocomp/kv/attention.py), so concurrent
# generations on the coded cache equal sequential ones (tests/test_serve.py checks it).
SERIAL_ATTENTION: set[str] = set()


@dataclass
class Sampling:
    """How one request generates: ``temperature`` 0 is greedy; ``seed`` picks the sample otherwise."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (cut from the text)
    ignore_eos: bool = False  # always generate max_new_tokens (equal lengths for timing)


@dataclass
class Generation:
    """One model's answer and what it cost."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    generated_tokens: int
    latency_s: float  # prefill and every decoding step
    time_to_first_token_s: float | None
    tokens_per_s: float  # generated tokens / latency
    kv_cache_bytes: int  # bytes held by the cache's tensors at the end (hf_geocomp.eval.memory.tensor_bytes)
    kv_cache_bytes_used: int  # of those, the bytes of the cached tokens (a coded cache holds room for more)
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


class GumbelNoise(LogitsProcessor):
    """Gumbel(0, 1) noise from one request's generator: the argmax of the noisy scores samples softmax(scores)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids, scores):
        u = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32)
        return scores + (-torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))).to(scores.dtype)


class Cancelled(StoppingCriteria):
    """Stops generating once ``event`` is set (the client of a stream went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopText(StoppingCriteria):
    """Stops once the text generated after ``prompt`` tokens holds one of ``stop`` (decoded as the answer is; unlike
    transformers' ``StopStringCriteria`` this works with every tokenizer, whatever its vocabulary looks like)."""

    def __init__(self, tokenizer, prompt: int, stop: list[str]):
        self.tokenizer, self.prompt, self.stop = tokenizer, prompt, stop

    def __call__(self, input_ids, scores, **kwargs):
        done = [cut_at_stop(self.tokenizer.decode(row[self.prompt:], skip_special_tokens=True), self.stop)[1]
                for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Stream(TextStreamer):
    """Times the first generated token and hands each piece of finished text to ``on_text`` (if any)."""

    def __init__(self, tokenizer, on_text=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.first = on_text, None

    def put(self, value):
        if not self.next_tokens_are_prompt and self.first is None:
            self.first = time.perf_counter()
        if self.on_text is not None:
            super().put(value)
        else:
            self.next_tokens_are_prompt = False

    def end(self):
        if self.on_text is not None:
            super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.on_text(text)


class _HoldStops:
    """Streams text to ``on_text`` but never a stop string or what follows it: holds back the tail that could
    still become one until more text (or the end) decides."""

    def __init__(self, on_text, stop: list[str]):
        self.on_text, self.stop, self.text, self.sent, self.stopped = on_text, stop, "", 0, False

    def __call__(self, piece: str) -> None:
        self.text += piece
        self._send(len(self.text) - max(map(len, self.stop)) + 1)

    def finish(self) -> None:
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if self.stopped:
            return
        cut, self.stopped = cut_at_stop(self.text, self.stop)
        upto = len(cut) if self.stopped else upto
        if upto > self.sent:
            self.on_text(self.text[self.sent:upto])
            self.sent = upto


def used_bytes(cache) -> int:
    """Bytes of the tokens a cache holds: a coded cache says (``nbytes``); transformers' caches hold no spare room."""
    from ..eval.memory import tensor_bytes

    return cache.nbytes() if hasattr(cache, "nbytes") else tensor_bytes(cache)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _plain(value):
    return asdict(value) if is_dataclass(value) else value


class ServedModel:
    """A causal LM and its tokenizer, loaded with :func:`hf_geocomp.data.load_model`, under a ``name``."""

    def __init__(self, name: str, source: str, dtype: torch.dtype = torch.float32):
        from ..data import load_model

        self.name, self.source = name, source
        self.model, self.tokenizer = load_model(source, task="causal-lm", dtype=dtype)
        if not self.model.can_generate():
            raise GeoCompError(f"{name} model {source!r} cannot generate text; serve a causal language model.")
        self.device = next(self.model.parameters()).device
        serial = self.model.config._attn_implementation in SERIAL_ATTENTION
        self.lock = threading.Lock() if serial else contextlib.nullcontext()
        self.summary = self._summary()

    # ---- prompts ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt of a chat, written by the tokenizer's own chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise GeoCompError(f"model {self.name!r} has no chat template in its tokenizer; use /v1/completions.")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def new_cache(self):
        """A fresh KV cache: the coded cache of a model with a KV plan, else transformers' ``DynamicCache``."""
        plan = getattr(self.model, "geocomp_kv_plan", None)
        if plan is not None and not plan.identity:
            return plan.cache(self.model)
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    # ---- work (called in worker threads) ------------------------------------------------------
    def generate(self, ids: list[int], sampling: Sampling, on_text=None, cancel: threading.Event | None = None
                 ) -> Generation:
        """Generate after ``ids``; ``on_text`` receives the text as it is decoded (streaming)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList, TemperatureLogitsWarper, TopPLogitsWarper

        from ..eval.memory import tensor_bytes

        processors = []
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
            processors = [TemperatureLogitsWarper(sampling.temperature)]
            processors += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else []
            processors.append(GumbelNoise(generator))
        held = _HoldStops(on_text, sampling.stop) if on_text is not None and sampling.stop else None
        stream = _Stream(self.tokenizer, held or on_text)
        input_ids = torch.tensor([ids], device=self.device)  # (1, prompt)
        stopping = [StopText(self.tokenizer, len(ids), sampling.stop)] if sampling.stop else []
        stopping += [Cancelled(cancel)] if cancel is not None else []
        cache = self.new_cache()
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=False, top_k=None, top_p=None,
                      temperature=None, logits_processor=LogitsProcessorList(processors),
                      stopping_criteria=StoppingCriteriaList(stopping),
                      streamer=stream, past_key_values=cache, attention_mask=torch.ones_like(input_ids),
                      pad_token_id=self.tokenizer.pad_token_id)
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = sampling.max_new_tokens
        with self.lock, torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(input_ids, **kwargs)  # (1, prompt + new)
            latency = time.perf_counter() - start
        if held is not None:
            held.finish()
        new = out[0, len(ids):].tolist()
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), sampling.stop)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        stopped = stopped or bool(new and new[-1] in eos)
        return Generation(text=text, finish_reason="stop" if stopped or len(new) < sampling.max_new_tokens else "length",
                          prompt_tokens=len(ids), generated_tokens=len(new), latency_s=latency,
                          time_to_first_token_s=None if stream.first is None else stream.first - start,
                          tokens_per_s=len(new) / latency if latency > 0 else 0.0,
                          kv_cache_bytes=tensor_bytes(cache), kv_cache_bytes_used=used_bytes(cache), seed=sampling.seed)

    def score(self, ids: list[int], prefill: int) -> dict:
        """Perplexity of ``ids`` teacher-forced, and of the tokens after ``prefill`` read through this model's
        own KV cache (continuation perplexity: what a coded cache does to a stored context shows only there)."""
        from ..eval.perplexity import continuation_nll, perplexity

        ids_t = torch.tensor([ids], device=self.device)  # (1, tokens)
        batch = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "use_cache": False}
        with self.lock, torch.inference_mode():
            start = time.perf_counter()
            ppl = perplexity(self.model, [batch])
            nll, scored, cache_bytes = continuation_nll(self.model, ids_t, prefill, self.new_cache)
            latency = time.perf_counter() - start
        return {"perplexity": ppl, "continuation_perplexity": math.exp(nll), "tokens": len(ids), "prefill": prefill,
                "continuation_tokens": scored, "kv_cache_bytes": cache_bytes, "latency_s": latency}

    # ---- what it is --------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Bytes one more token adds to the cache at batch 1: the coded plan's, or measured on a DynamicCache."""
        plan = getattr(self.model, "geocomp_kv_plan", None)
        if plan is not None and not plan.identity:
            return int(plan.bytes_per_token)
        from ..eval.memory import tensor_bytes

        cache = self.new_cache()
        with self.lock, torch.inference_mode():
            self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), past_key_values=cache,
                       use_cache=True)
        return tensor_bytes(cache)

    def _summary(self) -> dict:
        """What GET /models tells of this model: size, KV bytes per token, and its compression (config and card)."""
        qc = getattr(self.model.config, "quantization_config", None)
        plan = getattr(qc, "plan", None) if qc is not None and not isinstance(qc, dict) else None
        out = {"name": self.name, "source": self.source, "model_type": self.model.config.model_type,
               "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
               "parameters": sum(p.numel() for p in self.model.parameters()),
               "attn_implementation": self.model.config._attn_implementation,
               "kv_bytes_per_token": self.kv_bytes_per_token(),
               "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
               "compression": None if plan is None else plan_summary(plan), "card": card_summary(self.source)}
        return out


def plan_summary(plan: dict) -> dict:
    """The budget asked and achieved, from a geocomp plan (``config.quantization_config.plan``)."""
    out = {"params": plan.get("params"), "stock_loadable": plan.get("stock_loadable")}
    prune = plan.get("prune")
    if prune:
        cfg = _plain(prune.get("config")) or {}
        out["prune"] = {"sparsity": cfg.get("sparsity"), "criterion": cfg.get("criterion"),
                        "targets": list(cfg.get("targets") or []), "achieved_sparsity": prune.get("achieved_sparsity"),
                        "params_removed": prune.get("params_removed")}
    shapes = plan.get("shapes") or {}
    if shapes.get("mlp_widths"):
        out["mlp_widths"] = {"min": min(shapes["mlp_widths"]), "max": max(shapes["mlp_widths"])}
    kv = plan.get("kv")
    if kv:
        cfg = kv.get("config") or {}
        out["kv"] = {"budget": cfg.get("budget"), "method": cfg.get("method"), "bytes_per_token": kv.get("bytes_per_token"),
                     "full_bytes_per_token": kv.get("full_bytes_per_token"), "sink_tokens": cfg.get("sink_tokens")}
    return out


def card_summary(source: str) -> dict | None:
    """Base model and reported results from a model card (README.md) in a model folder or the Hub cache."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from ..data import resolve_model

    try:
        where, _ = resolve_model(source)
    except GeoCompError:
        return None
    path = Path(where) / "README.md"
    if not path.is_file():
        cached = try_to_load_from_cache(where, "README.md") if not Path(where).exists() else None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        data = ModelCard.load(path).data
    except (ValueError, OSError):  # a README whose metadata does not parse has nothing to tell here
        return None
    results = [{"metric": r.metric_name or r.metric_type, "value": r.metric_value, "dataset": r.dataset_name}
               for r in (data.eval_results or [])]
    return {"base_model": data.base_model, "results": results}
