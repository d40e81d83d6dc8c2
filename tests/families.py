"""One tiny random-weight model per supported family, built from the family's own config class.

Each keeps what makes its family differ (see ``hf_geocomp.arch.ArchSpec``): GQA, q/k norms,
fused projections, softcapping, sliding-window layers, per-layer-type RoPE, partial rotary,
query scaling, NoPE layers. Sizes are tiny so a model builds and runs in milliseconds.
"""

from __future__ import annotations

import torch

VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def _build(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**_COMMON, **kw})).eval()
    return model


def llama3():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return _build(LlamaConfig, LlamaForCausalLM, rope_parameters=rope)


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _build(MistralConfig, MistralForCausalLM, sliding_window=12)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=12, max_window_layers=1)


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3Config, Qwen3ForCausalLM)


def smollm3():
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    return _build(SmolLM3Config, SmolLM3ForCausalLM, no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return _build(GraniteConfig, GraniteForCausalLM, attention_multiplier=0.2, embedding_multiplier=3.0,
                  residual_multiplier=0.5, logits_scaling=2.0)


def gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return _build(GemmaConfig, GemmaForCausalLM, num_key_value_heads=1, head_dim=16)  # MQA, head_dim > hidden/heads


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # weights and a softcap that make the cap bite: scores of a few units against a cap of 1
    return _build(Gemma2Config, Gemma2ForCausalLM, query_pre_attn_scalar=12, attn_logit_softcapping=1.0,
                  initializer_range=0.2,
                  final_logit_softcapping=30.0, sliding_window=12, layer_types=["sliding_attention", "full_attention"])


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return _build(Gemma3TextConfig, Gemma3ForCausalLM, query_pre_attn_scalar=12, sliding_window=12,
                  layer_types=["sliding_attention", "full_attention"], rope_parameters=rope)


def olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _build(Olmo2Config, Olmo2ForCausalLM)


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    kw = {k: v for k, v in _COMMON.items() if k != "head_dim"}  # Phi-3 derives head_dim from hidden / heads
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}  # Phi-4-mini style
    return Phi3ForCausalLM(Phi3Config(**kw, rope_parameters=rope, pad_token_id=0)).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()


def bert():
    from transformers import BertConfig, BertModel

    kw = {k: v for k, v in _COMMON.items() if k not in ("num_key_value_heads", "head_dim")}
    torch.manual_seed(0)
    return BertModel(BertConfig(**kw)).eval()


# name → builder; the model type each builds is the family the matrix certifies
FAMILIES = {f.__name__: f for f in (llama3, mistral, qwen2, qwen3, smollm3, granite, gemma, gemma2, gemma3, olmo2,
                                    phi3, gpt2, bert)}
DECODERS = [n for n in FAMILIES if n != "bert"]


# ---- variants of a family for the KV checks: what the family's tiny model above does not exercise ----------

LONGROPE_ORIGINAL = 12  # original_max_position_embeddings of phi3_longrope: the KV checks run past it


def phi3_longrope():
    """Phi-3 / Phi-4-mini long-context RoPE: ``longrope`` frequencies (short factors up to
    ``original_max_position_embeddings``, long ones past it, chosen by each forward's length) and an
    ``attention_scaling`` of sqrt(1 + ln(max / original) / ln(original)) on cos and sin (1.40 here)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    kw = {k: v for k, v in _COMMON.items() if k != "head_dim"}
    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,  # rotary dims 6: 3 pairs
            "short_factor": [1.0, 1.4, 2.5], "long_factor": [1.5, 6.0, 40.0],
            "original_max_position_embeddings": LONGROPE_ORIGINAL}
    return Phi3ForCausalLM(Phi3Config(**kw, rope_parameters=rope, original_max_position_embeddings=LONGROPE_ORIGINAL,
                                      pad_token_id=0)).eval()


def mistral_full():
    """Mistral without a sliding window (Mistral 7B v0.2 and later): every layer full attention, so the
    reduced-space attention runs (the sliding-window ``mistral`` above never uses it)."""
    from transformers import MistralConfig, MistralForCausalLM

    return _build(MistralConfig, MistralForCausalLM, sliding_window=None)


KV_VARIANTS = {f.__name__: f for f in (phi3_longrope, mistral_full)}
