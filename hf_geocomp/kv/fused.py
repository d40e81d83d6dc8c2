"""Scores and value sums straight from the packed codes: the decode step of reduced attention.

Attention in the reduced space (:mod:`.attention`) needs, per layer and KV head, the products of
the queries with every stored key latent and the probability-weighted sum of every stored value
latent. Dequantising the whole history into float tensors first (several PyTorch ops per width
group, each writing ``seq × n`` floats) costs more than reading the codes. Here each block of
tokens is unpacked into a per-thread buffer in *head order* (the components of KV head 0, then
head 1, …, :class:`Layout`) and used at once, each query row reading only its own head's
components (``n_h`` of them):

* scores ``s[b, h, m, t] = Σ_j q̃[b, h, m, j] · z[b, t, h, j]`` with ``q̃ = q · rows_h`` (the query
  projected onto the decoder rows of its head's stored components);
* value sums ``y[b, h, m, j] = Σ_t p[b, h, m, t] · z[b, t, h, j]``, lifted by ``y · rows_h``.

so a token costs ``Σ_h M·n_h`` products for ``M`` query rows per KV head, not ``(Σ_h M)·n``.
The kernel is a small C++ extension (``_fused.cpp``) built on first use with
``torch.utils.cpp_extension`` (gcc, ninja; :mod:`.kernel_build`), parallel over blocks of tokens with torch's
thread pool.
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
_PORTABLE: list[bool] = [False]
VL = 16  # floats per vector of the kernel: each head's slice of the head order is padded to a multiple


@contextmanager
def disabled(flag: bool = True):
    """Within the block (if ``flag``), run the PyTorch path even when the kernel is available (benchmarks)."""
    before, _DISABLED[0] = _DISABLED[0], flag
    try:
        yield
    finally:
        _DISABLED[0] = before


@contextmanager
def portable_unpack(flag: bool = True):
    """Within the block (if ``flag``), the kernel unpacks codes with its portable path even where the
    AVX-512 VBMI one is compiled in (tests and benchmarks; both give the same floats)."""
    before, _PORTABLE[0] = _PORTABLE[0], flag
    try:
        yield
    finally:
        _PORTABLE[0] = before


CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def kernel():
    """The compiled extension, or ``None`` (with one warning naming why) when it cannot be built.

    Built once per machine and environment under a lock no dead process can hold (:mod:`.kernel_build`)."""
    if not _KERNEL:
        if os.environ.get("HF_GEOCOMP_KV_FUSED", "1") == "0":
            _KERNEL.append(None)
            return None
        from .kernel_build import BuildLockTimeout, load

        try:
            _KERNEL.append(load("hf_geocomp_kv_fused", Path(__file__).with_name("_fused.cpp"), CFLAGS, LDFLAGS,
                                "the fused decode kernel of hf_geocomp.kv"))
        except Exception as e:  # no compiler, no ninja, a failed build, a hung builder: say so, then the PyTorch path
            needs = "" if isinstance(e, BuildLockTimeout) else \
                " It needs a C++ compiler (g++) and ninja (pip install ninja)."
            warnings.warn(f"hf_geocomp.kv: the fused decode kernel could not be built ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); reduced attention runs on "
                          f"dequantised latents in PyTorch instead (same results, slower).{needs}", RuntimeWarning,
                          stacklevel=2)
            _KERNEL.append(None)
    return _KERNEL[0]


class Layout:
    """The stored order of one codec's components (its width groups one after another), their head
    order for the kernel, and their decoder rows.

    ``order`` (np,): the stored slot of every component of KV head 0, then of head 1, …, each head's
    slice padded with ``-1`` to a multiple of :data:`VL`; ``offsets`` (kv_heads + 1) the slices.
    ``head_rows`` (np, d): the decoder row of each slot of ``order`` (0 for padding), for the kernel;
    ``rows`` (kv_heads, n, d): row ``i`` of head ``h`` is the decoder row of stored component ``i``
    if it belongs to head ``h``, else 0 (the PyTorch path). Built once per codec; the rows are
    rebuilt when the decoder changes (refinement updates it in place).
    """

    def __init__(self, codec):
        kv_heads, d, _ = codec.dec.shape
        cols = [c for _, c in codec.groups]
        cols = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
        self.head, self.latent, self.n = cols // d, cols % d, len(cols)
        self.bits = [0 if bits == FULL else int(bits) for bits, _ in codec.groups]
        self.sizes = [len(c) for _, c in codec.groups]
        self.kv_heads, self.head_dim = kv_heads, d
        order, self.offsets = [], [0]
        for h in range(kv_heads):
            own = torch.nonzero(self.head == h).flatten().tolist()  # stored slots of head h, in stored order
            order += own + [-1] * (-len(own) % VL)
            self.offsets.append(len(order))
        self.order = torch.tensor(order, dtype=torch.long)
        self._rows, self._key, self._head_rows, self._head_key = None, None, None, None

    def rows(self, dec: torch.Tensor) -> torch.Tensor:
        """(kv_heads, n, d) float32 decoder rows; cached unless ``dec`` needs gradients."""
        if dec.requires_grad and torch.is_grad_enabled():
            return self._build(dec)
        key = (id(dec), dec._version, dec.device)
        if self._key != key:
            self._rows, self._key = self._build(dec.detach()), key
        return self._rows

    def head_rows(self, dec: torch.Tensor) -> torch.Tensor:
        """(np, d) float32 decoder rows in head order, 0 for padding (no gradients: the kernel's input)."""
        key = (id(dec), dec._version, dec.device)
        if self._head_key != key:
            dec = dec.detach()
            real = self.order >= 0
            slots = self.order[real]
            rows = dec.new_zeros(len(self.order), self.head_dim, dtype=torch.float32)
            rows[real.to(dec.device)] = dec[self.head[slots].to(dec.device), self.latent[slots].to(dec.device)].float()
            self._head_rows, self._head_key = rows.contiguous(), key
        return self._head_rows

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
    dec = codec.dec.to(q.device)
    if not _use_kernel(q, dec):
        q_lat = torch.einsum("bkmd,knd->bkmn", q, lay.rows(dec))  # (b, kv_heads, M, n): the queries in latent space
        return torch.einsum("bkmn,btn->bkmt", q_lat, _latents(codec, parts))
    b, k, m, _ = q.shape
    out = q.new_empty(b, k * m, length)
    with torch.profiler.record_function("geocomp::fused_scores"):
        kernel().scores(q.contiguous(), lay.head_rows(dec), lay.offsets, lay.order,
                        *_kernel_args(codec, lay, parts), length, out, _PORTABLE[0])
    return out.view(b, k, m, length)


def coded_values(p: torch.Tensor, codec, parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """``p`` (b, kv_heads, M, length) float32 weights of the coded values in ``parts``
    → ``Σ_t p_t v̂_t`` (b, kv_heads, M, d)."""
    lay = layout(codec)
    if not parts:
        return p.new_zeros(*p.shape[:3], lay.head_dim)
    dec = codec.dec.to(p.device)
    if not _use_kernel(p, dec):
        y = torch.einsum("bkmt,btn->bkmn", p, _latents(codec, parts))
        return torch.einsum("bkmn,knd->bkmd", y, lay.rows(dec))  # values lifted after the weighted sum
    b, k, m, _ = p.shape
    flat = p.reshape(b, k * m, length)  # a view of sliced probabilities (row stride the whole key length)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = p.new_empty(b, k, m, lay.head_dim)
    with torch.profiler.record_function("geocomp::fused_values"):
        kernel().values(flat, lay.head_rows(dec), lay.offsets, lay.order, *_kernel_args(codec, lay, parts), length,
                        out, _PORTABLE[0])
    return out
