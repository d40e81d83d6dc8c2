"""Streaming second-order statistics of activations: the engine every method shares.

Forward hooks accumulate, per tapped tensor, the float64 sums ``Σx`` (d), ``Σxxᵀ`` (d, d)
and the token count ``n``; memory is O(d²) per tap whatever the number of tokens. A tap with
``moments="diag"`` keeps ``Σx²`` (d) instead of ``Σxxᵀ``, for methods that read variances only.
Padding tokens are dropped using the ``attention_mask`` the model was called with. Taps whose
modules read the very same tensor object (q/k/v, gate/up) with the same selection are found in
the first batch, accumulated once and aliased.
Sums from several processes are added with accelerate, so every rank ends with the same
statistics.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import arch
from ..errors import GeoCompError
from .accumulate import add_gram, add_upper, fill_lower


WHERE = {"input": "in", "output": "out", "output_grad": "grad"}  # where → default key suffix
MOMENTS = ("full", "diag")
FOLD_ROWS = 16384  # rows of float32 products accumulated before they are added into the float64 sums


@dataclass(frozen=True)
class Tap:
    """One tensor to measure.

    Args:
        module: dotted module name.
        where: ``"input"`` (first positional input), ``"output"``, or ``"output_grad"`` (the
            gradient of the loss with respect to the output, during a backward pass; see
            :func:`collect_gradient_stats`).
        head_dim: split the last dimension into heads of this size and keep one statistic
            per head (leading dimension of the sums).
        offset, width: measure only ``x[..., offset:offset + width]`` (a fused projection's
            K or V part); ``width=None`` means to the end.
        heads_first: a 4-d tensor is (batch, heads, seq, d) (Gemma 3's per-head norms); otherwise a
            4-d tensor is (batch, seq, heads, d) (Qwen3's). Either way heads are laid side by side.
        name: key of this tap in :class:`ActivationStats`; defaults to ``module:in``/``module:out``.
        moments: ``"full"`` (``Σx``, ``Σxxᵀ``: covariance, spectra, refits) or ``"diag"`` (``Σx``,
            ``Σx²`` per feature: variances only, d multiply-adds per token instead of d²). A method
            asks for the least it reads (e.g. :func:`hf_geocomp.prune.prune_taps`).
    """

    module: str
    where: str = "input"
    head_dim: int | None = None
    offset: int = 0
    width: int | None = None
    name: str | None = None
    heads_first: bool = False
    moments: str = "full"

    def __post_init__(self):
        if self.where not in WHERE:
            raise GeoCompError(f"Tap.where must be one of {', '.join(WHERE)}, got {self.where!r}.")
        if self.moments not in MOMENTS:
            raise GeoCompError(f"Tap.moments must be one of {', '.join(MOMENTS)}, got {self.moments!r}.")

    @property
    def key(self) -> str:
        return self.name or f"{self.module}:{WHERE[self.where]}"

    @property
    def selection(self) -> tuple:
        """What this tap takes from its tensor; taps with equal selections on one tensor are shared."""
        return (self.head_dim, self.offset, self.width, self.moments)


class Moments:
    """Float64 running sums of one tapped tensor: ``sum`` (..., d), ``outer``, ``count``.

    ``outer`` is ``Σxxᵀ`` (..., d, d), or only its diagonal ``Σx²`` (..., d) for a tap with
    ``moments="diag"`` (:attr:`diagonal_only`). A leading head dimension is present for
    per-head taps.

    Full products are accumulated in the compute dtype over a window of rows (the upper block
    triangle only, see :mod:`hf_geocomp.geometry.accumulate`) and added into the float64 sums
    when the window holds ``fold_rows`` rows, and whenever ``outer`` is read; in float64 they go
    straight into the sums. Reading ``outer`` therefore always gives the complete, symmetric sums.
    The float64 ``Σxxᵀ`` of :meth:`zeros` is allocated by the first fold, as a float64 copy of
    the first window (no zero-filled gigabytes before the first product; while collecting, only
    the float32 windows are held).
    """

    def __init__(self, sum: torch.Tensor, outer: torch.Tensor | None, count: torch.Tensor):
        self.sum, self.count = sum, count
        self._diag = False
        self.outer = outer

    @classmethod
    def zeros(cls, shape: tuple[int, ...], diag: bool = False) -> "Moments":
        return cls(torch.zeros(shape, dtype=torch.float64),
                   torch.zeros(shape, dtype=torch.float64) if diag else None,  # Σxxᵀ: allocated by the first fold
                   torch.zeros((), dtype=torch.float64))

    # ---- the sums --------------------------------------------------------------------------
    @property
    def outer(self) -> torch.Tensor:
        self._fold(read=True)
        return self._allocated_outer()  # zeros if no rows yet

    @outer.setter
    def outer(self, value: torch.Tensor | None) -> None:
        """Replace the float64 sums (products not yet folded in are discarded); ``None``: zeros."""
        if value is not None:
            self._diag = value.shape == self.sum.shape
        self._outer = value
        self._window: torch.Tensor | None = None  # products of the current window, compute dtype
        self._window_rows = 0
        self._lower_stale = False  # lower blocks of a 2-d ``_outer`` lag its upper blocks

    def _outer_shape(self) -> tuple[int, ...]:
        return tuple(self.sum.shape) + (() if self._diag else (self.dim,))

    def _allocated_outer(self) -> torch.Tensor:
        """The float64 sums, allocated as zeros if nothing has been folded into them yet."""
        if self._outer is None:
            self._outer = torch.zeros(self._outer_shape(), dtype=torch.float64)
        return self._outer

    @property
    def diagonal_only(self) -> bool:
        return self._diag

    @property
    def dim(self) -> int:
        return self.sum.shape[-1]

    @property
    def n(self) -> int:
        return int(self.count.item())

    def update(self, x: torch.Tensor, compute_dtype: torch.dtype, fold_rows: int = FOLD_ROWS) -> torch.Tensor:
        """Add rows of ``x`` (N, d) or (N, heads, d); returns this batch's ``Σx`` for checks."""
        xc = x.detach().to(compute_dtype)
        if self.diagonal_only:
            self._outer.add_((xc * xc).sum(0))  # (d,) or (heads, d)
        else:
            exact = compute_dtype == torch.float64
            if exact:
                acc, beta = self._allocated_outer(), 1.0
            else:
                if self._window is None or self._window.dtype != compute_dtype:
                    self._fold()
                    self._window = torch.empty(self._outer_shape(), dtype=compute_dtype)
                acc, beta = self._window, float(self._window_rows > 0)  # 0: the window starts, old contents ignored
            if xc.dim() == 2:  # (N, d) → upper blocks of (d, d)
                add_gram(acc, xc, beta)
                self._lower_stale = True
            else:  # (N, heads, d) → (heads, d, d)
                xh = xc.transpose(0, 1)  # (heads, N, d)
                acc.baddbmm_(xh.transpose(1, 2), xh, beta=beta)
            if not exact:
                self._window_rows += x.shape[0]
                if self._window_rows >= fold_rows:
                    self._fold()
        batch_sum = xc.sum(0)
        self.sum.add_(batch_sum)
        self.count += x.shape[0]
        return batch_sum

    def _fold(self, read: bool = False) -> None:
        """Add the window's products into the float64 sums; on a read, also free it and fill the lower blocks."""
        if self._window_rows:
            if self._outer is None:  # the first fold: a float64 copy (its lower blocks are refilled on read)
                self._outer = self._window.to(torch.float64)
                self._lower_stale = self._window.dim() == 2
            elif self._window.dim() == 2:
                add_upper(self._outer, self._window)
            else:
                self._outer.add_(self._window)
            self._window_rows = 0
        if read:
            self._window = None
            if self._lower_stale and self._outer is not None:
                fill_lower(self._outer)
                self._lower_stale = False

    # ---- what the methods read -----------------------------------------------------------
    def _full(self, what: str) -> None:
        if self.diagonal_only:
            raise GeoCompError(f"these statistics hold only per-feature variances (moments='diag'), not the "
                               f"{what}; recollect with moments='full'.")

    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def second_moment(self) -> torch.Tensor:
        """Uncentred ``E[xxᵀ]``."""
        self._full("second-moment matrix")
        return self.outer / self.count

    def covariance(self) -> torch.Tensor:
        """Centred covariance ``E[xxᵀ] − μμᵀ`` (population, divides by n)."""
        self._full("covariance matrix")
        mu = self.mean()
        return self.second_moment() - mu.unsqueeze(-1) * mu.unsqueeze(-2)

    def second_moment_diagonal(self) -> torch.Tensor:
        """``E[x²]`` per feature (..., d), whatever the statistics hold."""
        outer = self.outer
        return (outer if self.diagonal_only else outer.diagonal(dim1=-2, dim2=-1)) / self.count

    def covariance_blocks(self, cols: torch.Tensor) -> torch.Tensor:
        """Centred covariance blocks ``Σ[cols[u], cols[u]]`` (units, c, c) for column groups ``cols`` (units, c).

        Full statistics give any blocks; per-feature variances (``moments="diag"``) give blocks
        of one column; per-head statistics (``head_dim=c``) give the blocks of whole heads.
        """
        c = cols.shape[1]
        if self.diagonal_only and self.sum.dim() == 1:
            if c != 1:
                raise GeoCompError(f"these statistics hold only per-feature variances (moments='diag'); blocks of "
                                   f"{c} columns need moments='full' or head_dim={c}.")
            mu = self.mean()
            var = self.outer / self.count - mu * mu  # (d,)
            return var[cols].unsqueeze(-1)  # (units, 1, 1)
        if self.sum.dim() == 1:
            cov = self.covariance()  # (d, d)
            return cov[cols[:, :, None], cols[:, None, :]]
        heads, hd = self.sum.shape  # per-head statistics: (heads, hd, hd)
        starts = cols[:, 0]
        if hd != c or bool((starts % hd).any()) or not torch.equal(cols, starts[:, None] + torch.arange(c)):
            raise GeoCompError(f"per-head statistics of {hd}-wide heads cannot give covariance blocks of {c} "
                               "arbitrary columns; recollect with moments='full'.")
        return self.covariance()[starts // hd]

    def nbytes(self) -> int:
        """Bytes of the float64 sums, and of the current window of products while there is one."""
        held = [t for t in (self._window, self.sum, self._outer, self.count) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Hashes that tie statistics to a model: its architecture and its current weights.

    The weights hash is SHA-256 over every byte of every parameter, so any change to any
    element alters it (about 0.7 s for 135M float32 parameters). It is not cached across
    calls: an in-place write through ``param.data`` leaves ``param._version`` unchanged, so no
    cheap key can tell that a cached hash went stale.
    """
    shapes = hashlib.sha256()
    weights = hashlib.sha256()
    cfg = getattr(model, "config", None)
    shapes.update(str(getattr(cfg, "model_type", type(model).__name__)).encode())
    for name, p in model.named_parameters():
        shapes.update(f"{name}:{tuple(p.shape)};".encode())
        weights.update(f"{name}:{p.dtype};".encode())
        if p.device.type != "meta":
            raw = p.detach().reshape(-1).cpu().contiguous().view(torch.uint8)  # the stored bytes, any dtype
            weights.update(memoryview(raw.numpy()))
    return {"arch": shapes.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


@dataclass
class ActivationStats:
    """Statistics of a set of taps: ``stats[key]`` gives :class:`Moments` (aliases resolved)."""

    moments: dict[str, Moments] = field(default_factory=dict)
    taps: dict[str, Tap] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # key → key it shares a tensor with
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Moments:
        return self.moments[self.aliases.get(key, key)]

    def __contains__(self, key: str) -> bool:
        return key in self.taps

    def keys(self) -> list[str]:
        return list(self.taps)

    def input_of(self, module: str) -> Moments:
        """Input statistics of a module, or a :class:`GeoCompError` saying they were not collected."""
        key = f"{module}:in"
        if key not in self.taps:
            raise GeoCompError(f"the statistics have no input of module {module!r}; recollect with it tapped.")
        return self[key]

    @property
    def tokens(self) -> int:
        return max((m.n for m in self.moments.values()), default=0)

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.moments.values())

    def check_model(self, model: nn.Module, weights: bool = True) -> None:
        """Raise unless these statistics were measured on ``model`` (and, if asked, its current weights)."""
        fp = model_fingerprint(model)
        mine = self.meta.get("fingerprint")
        if not mine or mine.get("arch") != fp["arch"]:
            raise GeoCompError("these statistics were measured on a different model architecture.")
        if weights and mine.get("weights") != fp["weights"]:
            raise GeoCompError("these statistics are stale: the model's weights changed since they were measured.")

    def clone(self) -> "ActivationStats":
        """An independent copy (e.g. to reduce across processes while collection continues)."""
        return ActivationStats({k: Moments(m.sum.clone(), m.outer.clone(), m.count.clone())
                                for k, m in self.moments.items()},
                               dict(self.taps), dict(self.aliases), json.loads(json.dumps(self.meta)))

    # ---- distributed -------------------------------------------------------------------
    def reduce_(self) -> "ActivationStats":
        """Sum every statistic over all processes (no-op in a single process).

        A process whose shard was empty still takes part: the keys, shapes and aliases seen
        anywhere are agreed first, so every rank ends with identical statistics.
        """
        import torch.distributed as dist
        from accelerate.utils import reduce

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self

        mine = ({k: (tuple(m.sum.shape), m.diagonal_only) for k, m in self.moments.items()}, self.aliases)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for shapes, aliases in everyone:
            self.aliases.update(aliases)
            for key, (shape, diag) in shapes.items():
                self.moments.setdefault(key, Moments.zeros(shape, diag=diag))
        for key in sorted(self.moments):
            m = self.moments[key]
            m.sum, m.outer, m.count = reduce([m.sum, m.outer, m.count], reduction="sum")
        return self

    # ---- persistence -------------------------------------------------------------------
    def _kept(self, keys) -> dict:
        if keys is None:
            return self.moments
        missing = [k for k in keys if k not in self.moments]
        if missing:
            raise GeoCompError(f"no statistics under {missing[0]!r}; present: {', '.join(sorted(self.moments))}.")
        return {k: self.moments[k] for k in keys}

    def file_bytes(self, keys=None, dtype: torch.dtype = torch.float64) -> int:
        """Bytes of the tensors :meth:`save` writes with the same ``keys`` and ``dtype``."""
        elt = torch.empty((), dtype=dtype).element_size()
        return sum((m.sum.numel() + m.outer.numel()) * elt + m.count.element_size() for m in self._kept(keys).values())

    def save(self, path: str, keys=None, dtype: torch.dtype = torch.float64) -> None:
        """Write a safetensors file (sums, taps and metadata as JSON header).

        ``keys``: only these statistics (e.g. the taps one method reads); ``dtype=torch.float32``
        halves the file (sums are read back as float64, with float32's rounding). Aliases to
        statistics left out are dropped. :meth:`file_bytes` tells the size beforehand.
        """
        from safetensors.torch import save_file

        kept = self._kept(keys)
        tensors = {}
        for key, m in kept.items():
            tensors[f"{key}::sum"] = m.sum.to(dtype).contiguous()
            tensors[f"{key}::outer"] = m.outer.to(dtype).contiguous()
            tensors[f"{key}::count"] = m.count.reshape(1)
        header = {
            "format": "hf_geocomp.activation_stats/1",
            "taps": json.dumps({k: asdict(t) for k, t in self.taps.items() if self.aliases.get(k, k) in kept}),
            "aliases": json.dumps({k: v for k, v in self.aliases.items() if v in kept}),
            "meta": json.dumps(self.meta),
        }
        save_file(tensors, path, metadata=header)

    @classmethod
    def load(cls, path: str) -> "ActivationStats":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != "hf_geocomp.activation_stats/1":
                    raise GeoCompError(f"{path} is not an hf_geocomp statistics file.")
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, RuntimeError) as e:  # missing file, bad header
            raise GeoCompError(f"cannot read statistics file {path}: {e}.") from None
        stats = cls(taps={k: Tap(**v) for k, v in json.loads(header["taps"]).items()},
                    aliases=json.loads(header["aliases"]), meta=json.loads(header["meta"]))
        for name in raw:
            if name.endswith("::sum"):
                key = name[: -len("::sum")]
                stats.moments[key] = Moments(raw[name].double(), raw[f"{key}::outer"].double(),
                                             raw[f"{key}::count"].reshape(()))
        return stats


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of real tokens: (B, T, d) → (N, d) using the attention mask."""
    if x.dim() == 2:
        return x
    if mask is not None and x.dim() == 3 and x.shape[0] == mask.shape[0]:
        return x[mask[:, -x.shape[1]:].bool()]  # with a cache, the mask covers past tokens too
    return x.reshape(-1, x.shape[-1])


class StatsCollector:
    """Context manager that accumulates :class:`ActivationStats` over forward passes.

    >>> with StatsCollector(model, taps) as col:
    ...     for batch in loader:
    ...         model(**batch)
    >>> stats = col.stats

    Hooks are removed on exit, whatever happens. Pass ``attention_mask`` to the model as a
    keyword so padding is excluded. Gram products are computed in ``compute_dtype`` (float32
    by default, the speed of the forward pass itself), accumulated over windows of
    ``fold_rows`` rows and added into float64 running sums (the float32 error of a window is
    bounded in :mod:`hf_geocomp.geometry.accumulate`); pass ``torch.float64`` for products
    added straight into the float64 sums. While a float32 window is open each full statistic
    holds a float32 copy of its ``Σxxᵀ`` besides the float64 one; it is freed when the
    collector exits or the sums are read. With ``training_only``, forward passes made in eval
    mode (a Trainer's evaluation) are ignored.
    """

    def __init__(self, model: nn.Module, taps: Iterable[Tap], compute_dtype: torch.dtype = torch.float32,
                 training_only: bool = False, fold_rows: int = FOLD_ROWS, fingerprint: bool = True):
        self.model = model
        self.taps = list(taps)
        if not self.taps:
            raise GeoCompError("no modules to measure: the list of taps is empty.")
        modules = dict(model.named_modules())
        for t in self.taps:
            if t.module not in modules:
                raise GeoCompError(f"module {t.module!r} does not exist in this model.")
        if not (isinstance(fold_rows, int) and fold_rows >= 1):
            raise GeoCompError(f"fold_rows must be a positive number of rows, got {fold_rows!r}.")
        self.compute_dtype = compute_dtype
        self.fold_rows = fold_rows
        self.training_only = training_only
        self._skip = False
        self.stats = ActivationStats(taps={t.key: t for t in self.taps},
                                     meta={"fingerprint": model_fingerprint(model)} if fingerprint else {})
        self._by_module: dict[str, list[Tap]] = {}
        for t in self.taps:
            self._by_module.setdefault(t.module, []).append(t)
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        # first batch only: (weak reference to an input tensor, selection, key) to find shared inputs.
        # Weak, so measuring never keeps a layer's activations alive.
        self._seen: list[tuple[weakref.ref, tuple, str]] = []
        self.batches = 0

    # hooks -----------------------------------------------------------------------------
    def begin_batch(self, attention_mask: torch.Tensor | None = None, training: bool = False) -> None:
        """A batch starts: its 2-d ``attention_mask`` selects the real tokens (called by the model's
        forward pre-hook, or by a caller that runs the modules itself, block by block)."""
        self._skip = self.training_only and not training
        mask = attention_mask
        usable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all())
        self._mask = mask if usable else None  # an all-ones mask selects nothing: skip the copy

    def end_batch(self) -> None:
        if self._skip:
            return
        self._seen.clear()  # dedup groups are fixed by the first batch
        self.batches += 1

    def _pre_root(self, module, args, kwargs):
        self.begin_batch(kwargs.get("attention_mask"), module.training)

    def _post_root(self, module, args, kwargs, output):
        self.end_batch()

    def _module_hook(self, name: str):
        def hook(module, args, output):
            if self._skip:
                return
            for tap in self._by_module[name]:
                x = args[0] if tap.where == "input" else output
                if isinstance(x, tuple):
                    x = x[0]
                if not isinstance(x, torch.Tensor):
                    continue
                key = tap.key
                if key in self.stats.aliases:
                    continue
                if tap.where == "output_grad":
                    if x.requires_grad:  # measured when the backward pass reaches this tensor
                        mask, batch = self._mask, self.batches
                        x.register_hook(lambda g, tap=tap, mask=mask, batch=batch: self._add(tap, g, mask, batch))
                    continue
                if self.batches == 0 and tap.where == "input":
                    self._seen = [e for e in self._seen if e[0]() is not None]
                    leader = next((k for ref, s, k in self._seen if ref() is x and s == tap.selection), None)
                    if leader is not None:
                        self.stats.aliases[key] = leader
                        continue
                    self._seen.append((weakref.ref(x), tap.selection, key))
                self._add(tap, x, self._mask, self.batches)
        return hook

    def _add(self, tap: Tap, x: torch.Tensor, mask: torch.Tensor | None, batch: int) -> None:
        if x.dim() == 4:  # a per-head module's (B, T, heads, d) or, heads_first, (B, heads, T, d) → (B, T, heads·d)
            x = (x.transpose(1, 2) if tap.heads_first else x).flatten(2)
        rows = _select(x, mask)
        rows = rows[..., tap.offset: None if tap.width is None else tap.offset + tap.width]
        if tap.head_dim is not None:
            rows = rows.reshape(rows.shape[0], -1, tap.head_dim)  # (N, heads, head_dim)
        if tap.key not in self.stats.moments:
            self.stats.moments[tap.key] = Moments.zeros(tuple(rows.shape[1:]), diag=tap.moments == "diag")
        batch_sum = self.stats.moments[tap.key].update(rows, self.compute_dtype, self.fold_rows)
        if not torch.isfinite(batch_sum).all():
            what = "gradients" if tap.where == "output_grad" else "activations"
            raise GeoCompError(f"non-finite {what} (NaN or Inf) at the {tap.where} of {tap.module!r} in batch {batch}.")

    def __enter__(self) -> "StatsCollector":
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pre_root, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._post_root, with_kwargs=True,
                                                                  always_call=True))
            for name in self._by_module:
                self._handles.append(self.model.get_submodule(name).register_forward_hook(self._module_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        self._mask = None
        for m in self.stats.moments.values():
            m.outer  # noqa: B018 -- reading folds the open window into the float64 sums and frees it


# ---- standard tap sets ---------------------------------------------------------------------

def linear_input_taps(model: nn.Module, patterns: str | list[str] | None = None) -> list[Tap]:
    """Inputs of the dense layers in the blocks (or of the modules matching ``patterns``)."""
    names = arch.match_modules(model, patterns) if patterns else arch.block_linears(model)
    return [Tap(n, "input") for n in names]


def kv_head_taps(model: nn.Module) -> list[Tap]:
    """Per-KV-head keys and values as they leave their projections (before RoPE)."""
    return [Tap(t.module, "output", head_dim=t.head_dim, offset=t.offset, width=t.width,
                name=f"{t.module}:{t.kind}", heads_first=t.heads_first) for t in arch.kv_taps(model)]


def kv_grad_taps(model: nn.Module) -> list[Tap]:
    """Per-KV-head gradients of the loss w.r.t. keys and values (before RoPE), keys ``"{module}:{k|v}_grad"``."""
    return [Tap(t.module, "output_grad", head_dim=t.head_dim, offset=t.offset, width=t.width,
                name=f"{t.module}:{t.kind}_grad", heads_first=t.heads_first) for t in arch.kv_taps(model)]


def q_head_taps(model: nn.Module) -> list[Tap]:
    """Per-query-head queries as they leave their projection (before RoPE), keys ``"{module}:q"``."""
    return [Tap(t.module, "output", head_dim=t.head_dim, offset=t.offset, width=t.width,
                name=f"{t.module}:q", heads_first=t.heads_first) for t in arch.q_taps(model)]


def block_output_taps(model: nn.Module) -> list[Tap]:
    """The residual stream after every block."""
    return [Tap(p.rstrip("."), "output") for p in arch.block_prefixes(model)]


def collect_stats(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], taps: Iterable[Tap], *,
                  compute_dtype: torch.dtype = torch.float32, progress: bool = False,
                  total: int | None = None, fold_rows: int = FOLD_ROWS) -> ActivationStats:
    """Run ``model`` over ``batches`` and return the statistics of ``taps``, summed over processes.

    Each batch is a mapping passed as keyword arguments (``input_ids``, ``attention_mask``).
    In a distributed run, give every process its own shard (for instance a DataLoader
    prepared by an ``Accelerator(even_batches=False)``); the sums are added across processes.
    """
    from tqdm.auto import tqdm

    taps = list(taps)
    device = next(model.parameters()).device
    extra = skip_logits(model, taps)
    with StatsCollector(model, taps, compute_dtype=compute_dtype, fold_rows=fold_rows) as col, torch.no_grad():
        for batch in tqdm(batches, total=total, disable=not progress, desc="calibration", unit="batch"):
            model(**extra, **{k: v.to(device) for k, v in batch.items()})
    return _finish(col)


def skip_logits(model: nn.Module, taps: list[Tap]) -> dict:
    """``{"logits_to_keep": 1}`` when the model takes it and no tap reads the output head, else ``{}``.

    Statistics never need the logits of every position; on a small LM the vocabulary projection
    is a fifth of the forward pass (SmolLM2-135M: 576 × 49,152 per token).
    """
    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    head = model.get_output_embeddings() if accepts and hasattr(model, "get_output_embeddings") else None
    if head is None:
        return {}
    names = [n for n, m in model.named_modules() if m is head]
    if any(t.module == n or t.module.startswith(n + ".") for t in taps for n in names):
        return {}
    return {"logits_to_keep": 1}


LABELS = ("gold", "sampled")


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per position drawn from the model's own softmax: (B, T, vocab) → (B, T)."""
    probs = torch.softmax(logits.detach().float(), -1).flatten(0, 1)  # (B·T, vocab)
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:2])


def collect_gradient_stats(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], taps: Iterable[Tap], *,
                           compute_dtype: torch.dtype = torch.float32, labels: str = "gold",
                           seed: int = 0) -> ActivationStats:
    """Like :func:`collect_stats`, with a backward pass of the next-token loss after each forward.

    Taps with ``where="output_grad"`` measure ``∂L/∂output`` per token, where ``L`` is the
    *summed* (not averaged) next-token cross-entropy of the batch, so ``E[ggᵀ]`` is the
    per-token empirical Fisher of that output — the second-order cost of perturbing it.
    With ``labels="sampled"`` the targets are drawn from the model's own next-token softmax
    (seeded by ``seed``), so ``E[ggᵀ]`` is the true Fisher instead of the empirical one.
    Parameters get no gradients (they are frozen for the pass and restored after).
    """
    if labels not in LABELS:
        raise GeoCompError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}.")
    gen = torch.Generator().manual_seed(seed)
    taps = list(taps)
    device = next(model.parameters()).device
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    was_training = model.training
    model.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with StatsCollector(model, taps, compute_dtype=compute_dtype) as col, torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**batch, use_cache=False).logits  # (B, T, vocab)
                target = (batch["input_ids"][:, 1:] if labels == "gold" else
                          sample_labels(logits[:, :-1], gen).to(logits.device))  # (B, T-1)
                if "attention_mask" in batch:
                    target = target.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                                         ignore_index=-100, reduction="sum")
                loss.backward()
    finally:
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return _finish(col)


def _finish(col: StatsCollector) -> ActivationStats:
    """Sum a collector's statistics over processes and record what they saw."""
    stats = col.stats.reduce_()
    if stats.tokens == 0:
        raise GeoCompError("calibration saw zero tokens; give it non-empty data.")
    stats.meta["batches"] = col.batches
    stats.meta["tokens"] = stats.tokens
    return stats
