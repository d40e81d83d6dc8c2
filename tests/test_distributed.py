"""Statistics summed over 2 CPU processes (gloo) equal those of one process, uneven shards included."""

import pytest
import torch

from hf_geocomp.geometry import (ActivationStats, Tap, collect_stats, collect_stats_sequential, kv_head_taps,
                                 linear_input_taps)

from .conftest import random_batch, tiny_llama


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n):
        rows = [random_batch(batch=1, seq=12, seed=i, pad_last=i % 4) for i in range(n)]
        self.rows = [{k: v[0] for k, v in r.items()} for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _taps(model):
    diag = [Tap(t.module, moments="diag", name=f"{t.module}:diag") for t in linear_input_taps(model)]
    return linear_input_taps(model) + kv_head_taps(model) + diag


def _worker(rank, world_size, port, n_samples, out_path, sequential=False):
    import os

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="yes", GLOO_SOCKET_IFNAME="lo",
                      OMP_NUM_THREADS="1")
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=False))
    model = tiny_llama()
    loader = acc.prepare(torch.utils.data.DataLoader(Blocks(n_samples), batch_size=2))
    if sequential:  # block by block: each block's sums are reduced before the next block is measured
        stats = collect_stats_sequential(model, loader, _taps(model), compute_dtype=torch.float64, keep=True)
    else:
        stats = collect_stats(model, loader, _taps(model), compute_dtype=torch.float64)
    stats.save(f"{out_path}.rank{acc.process_index}")


@pytest.mark.parametrize("sequential", [False, True], ids=["whole-model", "block-by-block"])
@pytest.mark.parametrize("n_samples", [9, 2])  # 5 batches split 3/2; one batch, so one rank sees nothing
def test_two_processes_match_one(tmp_path, n_samples, sequential):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port on loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "stats")
    # spawn, not fork: forking a process whose OpenMP pool already ran can deadlock
    mp.spawn(_worker, args=(2, port, n_samples, out, sequential), nprocs=2, join=True)
    model = tiny_llama()
    single = collect_stats(model, torch.utils.data.DataLoader(Blocks(n_samples), batch_size=2), _taps(model),
                           compute_dtype=torch.float64)
    for rank in (0, 1):
        dist = ActivationStats.load(f"{out}.rank{rank}")
        assert dist.aliases == single.aliases
        for key in single.keys():
            assert dist[key].n == single[key].n
            for a, b in ((dist[key].outer, single[key].outer), (dist[key].sum, single[key].sum)):
                assert float((a - b).abs().max() / b.abs().max()) < 1e-10
