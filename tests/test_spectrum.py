"""Spectra on matrices whose eigenvalues are known."""

import math

import pytest
import torch

from hf_geocomp.errors import GeoCompError
from hf_geocomp.geometry import Spectrum, coloring, effective_rank, k_at, stable_rank, sym_eigh, whitening


def with_eigenvalues(evals, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return (q * torch.tensor(evals, dtype=torch.float64)) @ q.T


def test_known_eigenvalues_and_summaries():
    evals = [8.0, 4.0, 2.0, 1.0, 1.0, 0.0]
    spec = Spectrum.of(with_eigenvalues(evals))
    torch.testing.assert_close(spec.eigenvalues, torch.tensor(evals, dtype=torch.float64), atol=1e-10, rtol=0)
    s = spec.summary()
    assert s["df"] == pytest.approx(16.0 ** 2 / (64 + 16 + 4 + 1 + 1))
    assert s["stable_rank"] == pytest.approx(16.0 / 8.0)
    assert s["top_share"] == pytest.approx(0.5)
    assert s["anisotropy"] == pytest.approx(3.0)
    # cumulative shares: .5 .75 .875 .9375 1.0
    assert (s["k90"], s["k95"], s["k99"]) == (4, 5, 5)


def test_limits_isotropic_and_rank_one():
    assert float(effective_rank(torch.ones(10, dtype=torch.float64))) == pytest.approx(10.0)
    assert float(effective_rank(torch.tensor([3.0, 0, 0], dtype=torch.float64))) == pytest.approx(1.0)
    assert float(stable_rank(torch.ones(7, dtype=torch.float64))) == pytest.approx(7.0)
    assert int(k_at(torch.ones(10, dtype=torch.float64), 0.95)) == 10
    assert int(k_at(torch.ones(10, dtype=torch.float64), 0.5)) == 5
    zero = Spectrum(torch.zeros(4, dtype=torch.float64)).summary()
    assert zero["df"] == 0 and zero["k95"] == 0
    with pytest.raises(GeoCompError, match="tau"):
        k_at(torch.ones(3), 1.5)


def test_weight_spectrum_is_singular_values_squared():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    sv = torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    w = u[:, :4] * sv @ v.T  # (6, 4)
    spec = Spectrum.of_weight(w)
    torch.testing.assert_close(spec.eigenvalues, sv ** 2)
    assert float(spec.stable_rank()) == pytest.approx(float((w ** 2).sum() / 25.0))


def test_eigenvector_signs_are_deterministic():
    c = with_eigenvalues([5.0, 3.0, 1.0])
    e1, v1 = sym_eigh(c)
    e2, v2 = sym_eigh(c.clone())
    torch.testing.assert_close(v1, v2)
    idx = v1.abs().argmax(0)
    assert (v1[idx, torch.arange(3)] > 0).all()
    torch.testing.assert_close((v1 * e1) @ v1.T, c, atol=1e-10, rtol=0)
    # batched
    eb, vb = sym_eigh(torch.stack([c, 2 * c]))
    torch.testing.assert_close(eb[1], 2 * e1)


def test_whitening_and_coloring():
    c = with_eigenvalues([9.0, 4.0, 1.0, 0.25])
    w = whitening(c, eps=0.0)
    torch.testing.assert_close(w @ c @ w, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(coloring(c, eps=0.0) @ w, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(w, w.T)


def test_whitening_rank_deficient_is_finite():
    c = with_eigenvalues([4.0, 1.0, 0.0, 0.0])
    w = whitening(c, eps=1e-4)
    assert torch.isfinite(w).all()
    white = w @ c @ w
    ev = torch.linalg.eigvalsh(white).flip(0)
    # the supported directions are (nearly) unit variance, the null space stays zero
    assert ev[0] == pytest.approx(1.0, rel=1e-3) and ev[1] == pytest.approx(1.0, rel=1e-3)
    assert ev[2:].abs().max() < 1e-8
    ridge = 1e-4 * 5.0 / 4
    assert float(torch.linalg.matrix_norm(w, 2)) == pytest.approx(1 / math.sqrt(ridge), rel=1e-6)
