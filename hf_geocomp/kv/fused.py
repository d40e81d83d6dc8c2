"""Scores and value sums straight from the packed codes: the decode step of reduced attention.

Attention in the reduced space (:mod:`.attention`) needs, per layer and KV head, the products of
the queries with every stored key latent and the probability-weighted sum of every stored value
latent. Dequantising the whole history into float tensors first (several PyTorch ops per width
group, each writing ``seq × n`` floats) costs more than reading the codes. Here each token's
latents are unpacked into a per-thread buffer (stored order) and used at once:

* scores ``s[b, h, m, t] = Σ_k q̃[b, h, m, k] · z[b, t, k]`` with ``q̃ = q · rows[h]`` (the query
  projected onto the decoder rows of every stored component, 0 for other heads' components);
* value sums ``y[b, h, m, k] = Σ_t p[b, h, m, t] · z[b, t, k]``, lifted by ``y · rows[h]``.

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
from contextlib import contextmanager
from pathlib import Path

import torch

from .allocate import FULL

_KERNEL: list = []  # [module or None], built once per process
_DISABLED: list[bool] = [False]
BLOCK = 512  # tokens per partial sum of the value kernel


@contextmanager
def disabled(flag: bool = True):
    """Within the block (if ``flag``), run the PyTorch path even when the kernel is available (benchmarks)."""
    before, _DISABLED[0] = _DISABLED[0], flag
    try:
        yield
    finally:
        _DISABLED[0] = before


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
    """The stored order of one codec's components (its width groups one after another) and their decoder rows.

    ``rows`` (kv_heads, n, d): row ``i`` of head ``h`` is the decoder row of component ``i`` if it
    belongs to head ``h``, else 0, so a query projected on ``rows[h]`` reads only its own head.
    Built once per codec; ``rows`` is rebuilt when the decoder changes (refinement updates it in place).
    """

    def __init__(self, codec):
        kv_heads, d, _ = codec.dec.shape
        cols = [c for _, c in codec.groups]
        cols = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
        self.head, self.latent, self.n = cols // d, cols % d, len(cols)
        self.bits = [0 if bits == FULL else int(bits) for bits, _ in codec.groups]
        self.sizes = [len(c) for _, c in codec.groups]
        self.kv_heads, self.head_dim = kv_heads, d
        self._rows, self._key = None, None

    def rows(self, dec: torch.Tensor) -> torch.Tensor:
        """(kv_heads, n, d) float32 decoder rows; cached unless ``dec`` needs gradients."""
        if dec.requires_grad and torch.is_grad_enabled():
            return self._build(dec)
        key = (id(dec), dec._version, dec.device)
        if self._key != key:
            self._rows, self._key = self._build(dec.detach()), key
        return self._rows

    def _build(self, dec: torch.Tensor) -> torch.Tensor:
        head, latent = self.head.to(dec.device), self.latent.to(dec.device)
        own = torch.arange(self.kv_heads, device=dec.device)[:, None] == head  # (kv_heads, n)
        return (dec[head, latent][None] * own[..., None]).float()  # (kv_heads, n, d)


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
    return codes, scales, lay.bits, lay.sizes, codec.group_size


def _latents(codec, parts: list[torch.Tensor]) -> torch.Tensor:
    """PyTorch path: (batch, length, n) float32 dequantised latents in stored order."""
    return torch.cat([z for z, _ in codec.latents(parts)], -1)


def _use_kernel(*tensors) -> bool:
    return (not _DISABLED[0] and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and all(t.device.type == "cpu" for t in tensors) and kernel() is not None)


def coded_scores(q: torch.Tensor, codec, parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """``q`` (b, kv_heads, M, d) float32 against the ``length`` coded keys in ``parts`` → (b, kv_heads, M, length)."""
    lay = layout(codec)
    if not parts:
        return q.new_zeros(*q.shape[:3], length)
    rows = lay.rows(codec.dec.to(q.device))
    q_lat = torch.einsum("bkmd,knd->bkmn", q, rows)  # (b, kv_heads, M, n): the queries in latent space
    if not _use_kernel(q_lat, rows):
        return torch.einsum("bkmn,btn->bkmt", q_lat, _latents(codec, parts))
    b, k, m, _ = q.shape
    out = q.new_empty(b, k * m, length)
    with torch.profiler.record_function("geocomp::fused_scores"):
        kernel().scores(q_lat.reshape(b, k * m, -1).contiguous(), *_kernel_args(codec, lay, parts), length, out)
    return out.reshape(b, k, m, length)


def coded_values(p: torch.Tensor, codec, parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """``p`` (b, kv_heads, M, length) float32 weights of the coded values in ``parts`` → Σ_t p_t v̂_t (b, kv_heads, M, d)."""
    lay = layout(codec)
    if not parts:
        return p.new_zeros(*p.shape[:3], lay.head_dim)
    rows = lay.rows(codec.dec.to(p.device))
    if not _use_kernel(p, rows):
        y = torch.einsum("bkmt,btn->bkmn", p, _latents(codec, parts))
    else:
        b, k, m, _ = p.shape
        flat = p.reshape(b, k * m, length)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        blocks = -(-length // BLOCK)
        partial = p.new_zeros(b, blocks, k * m, lay.n)
        with torch.profiler.record_function("geocomp::fused_values"):
            kernel().values(flat, *_kernel_args(codec, lay, parts), length, BLOCK, partial)
        y = partial.sum(1).reshape(b, k, m, lay.n)
    return torch.einsum("bkmn,knd->bkmd", y, rows)  # values lifted after the weighted sum
