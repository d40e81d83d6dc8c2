"""Tiny random-weight models built from configs, and a tiny tokenizer: offline and fast."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 300


def pytest_collection_modifyitems(config, items):
    """``slow`` tests load the real bundled models: they run only with HF_GEOCOMP_SLOW=1 (as .ci/run does)."""
    if os.environ.get("HF_GEOCOMP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="loads a real bundled model; set HF_GEOCOMP_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _own_working_dir(tmp_path_factory, monkeypatch):
    """Every test runs in an empty working directory of its own: none may depend on what is in the user's (e.g. the
    ``runs/smollm2-135m-geocomp`` the README's main command leaves there) or leave anything in it."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
    return BertModel(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return TINY_MODELS[request.param]()


def random_batch(batch=3, seq=10, seed=0, pad_last=0):
    """Random token ids; with ``pad_last``, the last row is right-padded by that many tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def model_output(model, batch):
    """Logits of a model with a head, else its last hidden state (encoders), without gradients."""
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tiny_tokenizer(encoder: bool = False):
    """A byte-level BPE of VOCAB ids trained on Python's docs; ``encoder``: with BERT's [CLS]/[SEP]-style tokens."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<eos>"] + (["<cls>", "<sep>"] if encoder else [])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:40], trainer)
    extra = dict(cls_token="<cls>", sep_token="<sep>") if encoder else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>", **extra)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama with a tokenizer: a model folder the CLI can load."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A saved tiny BERT encoder with a tokenizer: what the classifier benchmarks fine-tune."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(path)
    _tiny_tokenizer(encoder=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text("\n\n".join(list(topics.values())[40:60]))
    return str(path)
