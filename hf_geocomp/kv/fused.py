"""Scores and value sums straight from the packed codes: the decode step of reduced attention.

Attention in the reduced space (:mod:`.attention`) needs, per layer and KV head, the products of
the queries with every stored key latent and the probability-weighted sum of every stored value
latent. Dequantising the whole history into float tensors first (several PyTorch ops per width
group, each writing ``seq × n`` floats) costs more than reading the codes. Here each token's
latents are unpacked into a per-thread buffer laid out head by head and used at once:

* scores ``s[b, h, m, t] = Σ_k q̃[b, h, m, k] · z[b, t, h, k]`` with ``q̃ = q · dec_rows`` (the
  query projected onto the decoder rows of head ``h``'s kept components, ``N`` slots per head);
* value sums ``y[b, h, m, k] = Σ_t p[b, h, m, t] · z[b, t, h, k]``, lifted by ``y · dec_rows``.

The kernel is a small C++ extension (``_fused.cpp``) built on first use with
``torch.utils.cpp_extension`` (gcc, ninja) and parallel over tokens with torch's thread pool.
If it cannot be built, a warning says why, once, and the same products run on dequantised
latents in PyTorch (same results to float32 rounding; slower). The PyTorch path is also what
runs when gradients are needed (``kv.refine`` through reduced attention) or when
``HF_GEOCOMP_KV_FUSED=0``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .allocate import FULL

_KERNEL: list = []  # [module or None], built once per process
BLOCK = 512  # tokens per partial sum of the value kernel


def kernel():
    """The compiled extension, or ``None`` (with one warning naming why) when it cannot be built."""
    if not _KERNEL:
        if os.environ.get("HF_GEOCOMP_KV_FUSED", "1") == "0":
            _KERNEL.append(None)
            return None
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).with_name("_fused.cpp")
            _KERNEL.append(load(name="hf_geocomp_kv_fused", sources=[str(source)],
                                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                verbose=False))
        except Exception as e:  # no compiler, no ninja, a failed build: say so, then run the PyTorch path
            warnings.warn(f"hf_geocomp.kv: the fused decode kernel could not be built ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); reduced attention runs on "
                          f"dequantised latents in PyTorch instead (same results, slower). It needs a C++ compiler "
                          f"(g++) and ninja (pip install ninja).", RuntimeWarning, stacklevel=2)
            _KERNEL.append(None)
    return _KERNEL[0]


class Layout:
    """Where each stored component of one codec goes in the head-by-head buffer, and its decoder rows.

    ``dest[g]`` (n_g,) int32: slot ``head · N + rank`` of group ``g``'s components (``N`` the most
    components any head keeps); ``rows`` (kv_heads, N, d): the decoder row of each slot (0 if unused).
    Built once per codec; ``rows`` is rebuilt when the decoder changes (refinement updates it in place).
    """

    def __init__(self, codec):
        kv_heads, d, _ = codec.dec.shape
        counts = [0] * kv_heads
        self.bits, heads_of, latent_of, ranks = [], [], [], []
        for bits, cols in codec.groups:
            head = cols // d
            rank = []
            for h in head.tolist():  # components of one head take its next slots, in stored order
                rank.append(counts[h])
                counts[h] += 1
            heads_of.append(head)
            latent_of.append(cols % d)
            ranks.append(torch.tensor(rank, dtype=torch.long))
            self.bits.append(0 if bits == FULL else int(bits))
        self.slots = max(counts + [1])
        self.dest = [(h * self.slots + r).to(torch.int32) for h, r in zip(heads_of, ranks)]
        self.head = torch.cat(heads_of) if heads_of else torch.zeros(0, dtype=torch.long)
        self.latent = torch.cat(latent_of) if latent_of else torch.zeros(0, dtype=torch.long)
        self.slot = torch.cat(self.dest).long() if self.dest else torch.zeros(0, dtype=torch.long)
        self.kv_heads, self.head_dim = kv_heads, d
        self._rows, self._key = None, None

    def rows(self, dec: torch.Tensor) -> torch.Tensor:
        """(kv_heads, N, d) float32 decoder rows of the slots; cached unless ``dec`` needs gradients."""
        key = (id(dec), dec._version, dec.device)
        if dec.requires_grad and torch.is_grad_enabled():
            return self._build(dec)
        if self._key != key:
            self._rows, self._key = self._build(dec.detach()), key
        return self._rows

    def _build(self, dec: torch.Tensor) -> torch.Tensor:
        flat = dec.new_zeros(self.kv_heads * self.slots, self.head_dim)
        picked = dec[self.head.to(dec.device), self.latent.to(dec.device)]  # (kept, d)
        flat = flat.index_put((self.slot.to(dec.device),), picked)
        return flat.reshape(self.kv_heads, self.slots, self.head_dim).float()


def layout(codec) -> Layout:
    found = getattr(codec, "_layout", None)
    if found is None:
        found = codec._layout = Layout(codec)
    return found


def _kernel_args(codec, lay: Layout, parts: list[torch.Tensor]):
    codes, scales, i = [], [], 0
    empty = torch.empty(0, 0, 0, dtype=torch.float16)
    for bits in lay.bits:
        codes.append(parts[i])
        scales.append(parts[i + 1] if bits else empty)
        i += 2 if bits else 1
    return codes, scales, lay.bits, [d.to(parts[0].device) for d in lay.dest], codec.group_size


def _latents(codec, lay: Layout, parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """PyTorch path: (batch, length, kv_heads, N) float32 latents in the head-by-head layout."""
    b = parts[0].shape[0]
    z = parts[0].new_zeros((b, length, lay.kv_heads * lay.slots), dtype=torch.float32)
    for (zg, _), dest in zip(codec.latents(parts), lay.dest):
        z[..., dest.long().to(z.device)] = zg
    return z.reshape(b, length, lay.kv_heads, lay.slots)


def _use_kernel(*tensors) -> bool:
    return (not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and all(t.device.type == "cpu" for t in tensors) and kernel() is not None)


def coded_scores(q: torch.Tensor, codec, parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """``q`` (b, kv_heads, M, d) float32 against the ``length`` coded keys in ``parts`` → (b, kv_heads, M, length)."""
    lay = layout(codec)
    rows = lay.rows(codec.dec.to(q.device))
    q_lat = torch.einsum("bkmd,knd->bkmn", q, rows)  # (b, kv_heads, M, N): the queries in latent space
    if not parts or not _use_kernel(q_lat, rows):
        if not parts:
            return q.new_zeros(*q.shape[:3], length)
        return torch.einsum("bkmn,btkn->bkmt", q_lat, _latents(codec, lay, parts, length))
    out = q.new_empty(*q.shape[:3], length)
    kernel().scores(q_lat.contiguous(), *_kernel_args(codec, lay, parts), length, out)
    return out


def coded_values(p: torch.Tensor, codec, parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """``p`` (b, kv_heads, M, length) float32 weights of the coded values in ``parts`` → Σ_t p_t v̂_t (b, kv_heads, M, d)."""
    lay = layout(codec)
    rows = lay.rows(codec.dec.to(p.device))
    if not parts:
        return p.new_zeros(*p.shape[:3], lay.head_dim)
    if not _use_kernel(p, rows):
        y = torch.einsum("bkmt,btkn->bkmn", p, _latents(codec, lay, parts, length))
    else:
        if p.stride(-1) != 1:
            p = p.contiguous()
        blocks = -(-length // BLOCK)
        partial = p.new_zeros(p.shape[0], blocks, *p.shape[1:3], lay.slots)
        kernel().values(p, *_kernel_args(codec, lay, parts), length, BLOCK, partial)
        y = partial.sum(1)  # (b, kv_heads, M, N)
    return torch.einsum("bkmn,knd->bkmd", y, rows)  # values lifted after the weighted sum
