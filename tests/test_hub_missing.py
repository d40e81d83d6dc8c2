"""A geocomp checkpoint that lacks a tensor its model needs fails to load instead of initialising it at random."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_geocomp  # noqa: F401  (registers the quantizer)
from hf_geocomp import kv
from hf_geocomp.errors import GeoCompError
from hf_geocomp.geometry import collect_stats
from hf_geocomp.hub import mark_compressed
from hf_geocomp.prune import prune, prune_taps

from .conftest import random_batch
from .families import FAMILIES


def _saved(family: str, folder, compensation: str, coded: bool):
    """A tiny ``family`` model with 30% of its MLP pruned (``compensation``) and, if ``coded``, a KV plan; saved."""
    model = FAMILIES[family]()
    batches = [random_batch(2, 16, seed=i) for i in range(3)]
    stats = collect_stats(model, batches, prune_taps(model, ("mlp",)))
    _, prune_plan = prune(model, stats, sparsity=0.3, targets=("mlp",), allocation="global", compensation=compensation)
    kv_plan = kv.compress(model, batches, budget=0.5, method="aware", group_size=8)[1] if coded else None
    mark_compressed(model, prune_plan, kv_plan)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("missing")
    gemma = _saved("gemma", root / "gemma", "bias", coded=False)  # Gemma's config cannot build an MLP bias
    assert gemma.config.quantization_config.plan["biases"]
    _saved("llama3", root / "llama3", "bias+refit", coded=True)
    return root


def _strip(src, dst, key):
    """A copy of the checkpoint ``src`` without tensor ``key`` in its model.safetensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors[key]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family,key", [
    ("gemma", "model.layers.1.mlp.down_proj.bias"),  # a bias compensation added, recorded in the plan's biases
    ("llama3", "geocomp_kv.1_v_dec"),  # a basis of the KV plan
    ("llama3", "model.layers.0.mlp.down_proj.weight"),  # a pruned (resized) layer
    ("llama3", "model.layers.1.input_layernorm.weight"),  # any tensor of a block
])
def test_a_checkpoint_missing_a_tensor_fails_to_load(checkpoints, tmp_path, family, key):
    again = AutoModelForCausalLM.from_pretrained(checkpoints / family)  # the whole checkpoint loads
    assert key in again.state_dict()
    bad = _strip(checkpoints / family, tmp_path / "bad", key)
    with pytest.raises(GeoCompError, match=f"has no tensor {key.replace('.', '[.]')}, which"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_a_new_head_outside_the_blocks_may_be_missing(checkpoints):
    """Loading a compressed causal LM into another head class (a fresh classifier) is not a damaged checkpoint."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoints / "llama3", num_labels=3)
    assert model.score.weight.shape[0] == 3
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=random_batch(1, 8)["input_ids"]).logits).all()


def test_a_pytorch_bin_checkpoint_is_checked_too(checkpoints, tmp_path):
    """The same check reads a ``pytorch_model.bin`` (names and shapes only, on the meta device)."""
    from safetensors.torch import load_file

    tensors = load_file(checkpoints / "llama3" / "model.safetensors")
    for name, drop in (("whole", None), ("stripped", "geocomp_kv.0_k_enc")):
        folder = tmp_path / name
        shutil.copytree(checkpoints / "llama3", folder)
        (folder / "model.safetensors").unlink()
        torch.save({k: v for k, v in tensors.items() if k != drop}, folder / "pytorch_model.bin")
        if drop is None:
            again = AutoModelForCausalLM.from_pretrained(folder)
            torch.testing.assert_close(again.geocomp_kv.get_buffer("0_k_enc"), tensors["geocomp_kv.0_k_enc"])
        else:
            with pytest.raises(GeoCompError, match="has no tensor geocomp_kv.0_k_enc"):
                AutoModelForCausalLM.from_pretrained(folder)
