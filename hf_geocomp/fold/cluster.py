"""Unit feature vectors and their clustering (k-means++ / Lloyd, Ward agglomerative), seeded.

The feature of unit ``u`` is ``[producer rows of u | consumer columns of u]`` — for a SwiGLU
MLP ``[gate row | up row | down column]`` — flattened. Units with similar features compute
similar things and are folded together (Wang et al., "Forget the Data and Fine-Tuning! Just
Fold the Network to Compress", ICLR 2025, arXiv:2502.10216).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from ..prune.units import UnitGroup


def producer_features(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """Producer rows (and biases) of every unit, flattened: (units, d_p) float64."""
    parts = []
    for name, rows in group.producers.items():
        m = model.get_submodule(name)
        w = arch.linear_weight(m).detach().double()  # (out, in)
        parts.append(w[rows].flatten(1))  # (units, rows·in)
        if m.bias is not None:
            parts.append(m.bias.detach().double()[rows])  # (units, rows)
    return torch.cat(parts, 1)


def unit_features(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """``[producer rows | consumer columns]`` of every unit: (units, d) float64."""
    w = arch.linear_weight(model.get_submodule(group.consumer)).detach().double()  # (out, in)
    cons = w[:, group.cols].permute(1, 0, 2).flatten(1)  # (units, out·cols)
    return torch.cat([producer_features(model, group), cons], 1)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise GeoCompError(f"cluster count must be between 1 and the number of units ({n}), got {k}.")


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """Labels (n,) in [0, k) from k-means++ seeding and ``iters`` Lloyd steps; ``k == n`` gives the identity."""
    n = x.shape[0]
    _check_k(n, k)
    if k == n:
        return torch.arange(n)
    x = x.float()  # (n, d)
    gen = torch.Generator().manual_seed(seed)
    sq = x.pow(2).sum(1)  # (n,)
    dist_all = (sq[:, None] - 2 * x @ x.T + sq[None, :]).clamp_min(0)  # (n, n) once: seeding reads columns
    centers = [int(torch.randint(n, (1,), generator=gen))]
    d2 = dist_all[:, centers[0]].clone()  # (n,) distance² to the nearest centre
    for _ in range(1, k):
        total = d2.sum()
        p = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        c = int(torch.multinomial(p, 1, generator=gen))
        centers.append(c)
        torch.minimum(d2, dist_all[:, c], out=d2)
    cent = x[centers].clone()  # (k, d)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = sq[:, None] - 2 * x @ cent.T + cent.pow(2).sum(1)[None, :]  # (n, k)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():  # refill empty clusters with the points farthest from their centre
            far = dist.gather(1, new[:, None]).squeeze(1).argsort(descending=True)
            for e, p in zip(empty.tolist(), far[: empty.numel()].tolist()):
                new[p] = e
            counts = torch.bincount(new, minlength=k)
        if torch.equal(new, labels):
            break
        labels = new
        cent = torch.zeros_like(cent).index_add_(0, labels, x) / counts[:, None].to(x.dtype)
    return _canonical(labels)


def agglomerative(x: torch.Tensor, k: int) -> torch.Tensor:
    """Labels (n,) from Ward-linkage agglomerative clustering cut at ``k`` clusters (deterministic)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = x.shape[0]
    _check_k(n, k)
    if k == n:
        return torch.arange(n)
    z = linkage(x.double().numpy(), method="ward")
    labels = torch.as_tensor(fcluster(z, t=k, criterion="maxclust"), dtype=torch.long) - 1
    if int(labels.max()) + 1 != k:  # ties can merge past k; fcluster then returns fewer clusters
        raise GeoCompError(f"agglomerative clustering found {int(labels.max()) + 1} clusters instead of {k} "
                           "(tied distances); use method kmeans.")
    return _canonical(labels)


def _canonical(labels: torch.Tensor) -> torch.Tensor:
    """Relabel so clusters are numbered by their lowest unit (the cluster's representative)."""
    first = {}
    for u, c in enumerate(labels.tolist()):
        first.setdefault(c, len(first))
    return torch.tensor([first[c] for c in labels.tolist()], dtype=torch.long)


def cluster(x: torch.Tensor, k: int, method: str = "kmeans", seed: int = 0, iters: int = 20) -> torch.Tensor:
    return kmeans(x, k, seed, iters) if method == "kmeans" else agglomerative(x, k)


def redundancy(x: torch.Tensor) -> torch.Tensor:
    """Data-free per-unit score for global allocation: distance to the nearest other unit (n,), relative
    to the layer's mean feature norm. Units with a near twin are cheap to fold."""
    d = torch.cdist(x.float(), x.float())  # (n, n)
    d.fill_diagonal_(float("inf"))
    return (d.min(1).values / x.float().norm(dim=1).mean().clamp_min(1e-12)).double()
