"""Block-by-block calibration: one block's statistics in memory at a time.

The pipeline of GPTQ, SparseGPT and llm-compressor's sequential mode. The calibration batches go
through the embeddings once; every block's arguments (attention masks, rotary tables: they depend
on positions and padding only, never on the hidden states) are recorded in the same pass. Then,
block by block in order: the block's taps are measured on its inputs, the statistics (summed
across processes) go to a callback that may compress the block, they are freed, and the block's
outputs become the next block's inputs. Peak statistics memory is one block's, not the model's;
the hidden states of the calibration tokens (tokens × hidden) are all that crosses blocks.

``propagate="original"``: the next inputs are the outputs of the block as it was measured, so
every block's statistics equal those of a whole-model pass. ``propagate="compressed"``: the next
inputs are recomputed through the block after the callback compressed it, so each block is fitted
to what it will really receive (one more forward of each block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from .stats import ActivationStats, StatsCollector, Tap, skip_logits

PIPELINES = ("sequential", "whole-model")
PROPAGATE = ("original", "compressed")


class _Recorder(nn.Module):
    """Stands in for a block during the embedding pass: records its arguments, returns its input unchanged.

    Attribute reads fall through to the block, so a model loop that asks a layer for its
    ``attention_type`` (sliding or full) still chooses the right mask.
    """

    def __init__(self, block: nn.Module, calls: list):
        super().__init__()
        self.block = block
        self.calls = calls

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden, *args, **kwargs):
        self.calls.append((hidden, args, kwargs))
        return hidden


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _blocks(model: nn.Module) -> tuple[nn.ModuleList, list[str]]:
    prefixes = arch.block_prefixes(model)
    return model.get_submodule(prefixes[0].rstrip(".").rpartition(".")[0]), prefixes


@torch.no_grad()
def block_inputs(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[list, list]:
    """``(hidden, calls)``: per batch, the first block's input and every block's other arguments.

    ``calls[b][i]`` is ``(args, kwargs)`` block ``i`` receives in batch ``b`` (shared tensors are shared,
    not copied). The blocks do not run: each is replaced by a recorder for the pass.
    """
    layers, _ = _blocks(model)
    originals = list(layers)
    device = next(model.parameters()).device
    hidden, calls = [], []
    try:
        per_block = [[] for _ in originals]
        for i, block in enumerate(originals):
            layers[i] = _Recorder(block, per_block[i])
        extra = {"use_cache": False, **skip_logits(model, [])}
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            model(**extra, **batch)
            first = per_block[0].pop()
            hidden.append((first[0], batch.get("attention_mask")))  # the mask on the model's device, as its rows
            calls.append([(first[1], first[2])] + [(c[1], c[2]) for c in (p.pop() for p in per_block[1:])])
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
    return hidden, calls


def collect_stats_sequential(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], taps: Iterable[Tap],
                             on_block: Callable[[int, ActivationStats], None] | None = None, *,
                             propagate: str = "original", compute_dtype: torch.dtype = torch.float32,
                             keep: bool = False, progress: bool = False) -> ActivationStats | None:
    """Measure ``taps`` block by block, handing each block's statistics to ``on_block(index, stats)``.

    ``on_block`` may change the block in place (prune, fold, refit); with ``propagate="compressed"``
    the next block's inputs then come from the changed block. With ``keep=True`` all blocks'
    statistics are also returned merged (for tests and small models: the memory of a whole-model
    pass); otherwise each block's are dropped after its callback and None is returned. Taps must
    lie inside the blocks; gradient taps (``output_grad``) need a backward pass through the later
    blocks and are refused (use :func:`~hf_geocomp.geometry.collect_gradient_stats`).
    """
    from tqdm.auto import tqdm

    if propagate not in PROPAGATE:
        raise GeoCompError(f"propagate must be one of {', '.join(PROPAGATE)}, got {propagate!r}.")
    taps = list(taps)
    layers, prefixes = _blocks(model)
    by_block: list[list[Tap]] = [[] for _ in prefixes]
    for t in taps:
        if t.where == "output_grad":
            raise GeoCompError(f"tap {t.key!r} reads gradients, which block-by-block calibration cannot give; "
                               "collect it with collect_gradient_stats on the whole model.")
        i = arch.layer_index(t.module)
        if i is None or not (t.module + ".").startswith(prefixes[i]):
            raise GeoCompError(f"tap {t.key!r} is not inside a transformer block; block-by-block calibration "
                               "measures block modules only.")
        by_block[i].append(t)
    hidden, calls = block_inputs(model, batches)
    if not hidden and not _distributed():  # in a distributed run an empty shard still takes part in every sum
        raise GeoCompError("calibration saw zero tokens; give it non-empty data.")
    merged = ActivationStats(meta={"tokens": 0}) if keep else None
    with torch.no_grad():
        for i in tqdm(range(len(prefixes)), disable=not progress, desc="blocks", unit="block"):
            block = layers[i]
            outputs = []
            stats = None
            if by_block[i]:
                with StatsCollector(model, by_block[i], compute_dtype=compute_dtype, fingerprint=False) as col:
                    for (h, mask), (args, kwargs) in zip(hidden, (c[i] for c in calls)):
                        col.begin_batch(mask)
                        outputs.append(block(h, *args, **kwargs))
                        col.end_batch()
                stats = col.stats.reduce_()
                stats.meta.update(batches=col.batches, tokens=stats.tokens, block=i)
            else:
                outputs = [block(h, *args, **kwargs) for (h, _), (args, kwargs) in zip(hidden, (c[i] for c in calls))]
            if on_block is not None and stats is not None:
                on_block(i, stats)
            if keep and stats is not None:
                merged.moments.update(stats.moments)
                merged.taps.update(stats.taps)
                merged.aliases.update(stats.aliases)
                merged.meta["tokens"] = max(merged.meta["tokens"], stats.tokens)
            del stats
            if propagate == "compressed":
                block = layers[i]
                outputs = [block(h, *args, **kwargs) for (h, _), (args, kwargs) in zip(hidden, (c[i] for c in calls))]
            hidden = [(o[0] if isinstance(o, tuple) else o, mask) for o, (_, mask) in zip(outputs, hidden)]
    return merged
