"""refcurv.linalg.kronecker, KFAC section: the damped split of [Ren-thesis] Algorithm 12 line 19
(``split="pi"``) and Algorithm 7 line 11 (``split="sqrt"``), tested on its own (the KFAC fast
form uses it; the dense form writes the split out)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import HyperParameterError, NotSPDError, ShapeError
from refcurv.linalg.kronecker import SPLITS, damped_split, split_pi
from refcurv.testing.tolerance import assert_close, residual_tol


def _psd(rng, n, rank=None, scale=1.0):
    X = rng.standard_normal((n, rank if rank is not None else n + 2))
    return scale * (X @ X.T)


factor_dims = st.integers(1, 5)
dampings = st.floats(1e-4, 10.0)
seeds = st.integers(0, 2**31 - 1)


@given(factor_dims, factor_dims, st.floats(1e-3, 1e3), dampings, seeds)
def test_pi_is_the_trace_ratio_of_algorithm_12(dA, dG, c, lam, seed):
    """π² = trace(Ω ⊗ I)/trace(I ⊗ Γ) = (tr Ω / dim Ω)/(tr Γ / dim Γ), written with the
    Kronecker products of line 19 (so each factor's damping is the same multiple of its mean
    eigenvalue: π√λ / (tr Ω/dim Ω) = (√λ/π) / (tr Γ/dim Γ)); the damping added is π√λ I to Ω
    and (√λ/π) I to Γ."""
    rng = np.random.default_rng(seed)
    O, G = _psd(rng, dA, scale=c), _psd(rng, dG)
    Od, Gd, pi = damped_split(O, G, lam, "pi")
    ratio = np.trace(np.kron(O, np.eye(dG))) / np.trace(np.kron(np.eye(dA), G))
    assert_close(pi**2, ratio, rtol=residual_tol(dA * dG), atol=0)
    assert isinstance(pi, float) and pi == split_pi(O, G)
    # the damping added: π√λ I to Ω, (√λ/π) I to Γ (to the rounding of the sums)
    r = np.sqrt(lam)
    assert_close(Od - O, pi * r * np.eye(dA), rtol=0, atol=residual_tol(dA) * (np.abs(O).max() + pi * r))
    assert_close(Gd - G, r / pi * np.eye(dG), rtol=0, atol=residual_tol(dG) * (np.abs(G).max() + r / pi))


@given(factor_dims, factor_dims, dampings, seeds)
def test_sqrt_split_is_pi_one(dA, dG, lam, seed):
    """Algorithm 7 line 11: (A + √λ I, G + √λ I)."""
    rng = np.random.default_rng(seed)
    O, G = _psd(rng, dA), _psd(rng, dG)
    Od, Gd, pi = damped_split(O, G, lam, "sqrt")
    assert pi == 1.0
    assert np.array_equal(Od, O + np.sqrt(lam) * np.eye(dA))
    assert np.array_equal(Gd, G + np.sqrt(lam) * np.eye(dG))


@given(factor_dims, factor_dims, dampings, seeds, st.sampled_from(SPLITS))
def test_damping_terms_multiply_to_lambda(dA, dG, lam, seed, split):
    """(Γ + (√λ/π)I) ⊗ (Ω + π√λI) = Γ⊗Ω + π√λ (Γ⊗I) + (√λ/π)(I⊗Ω) + λ I (row-major G ⊗ A)."""
    rng = np.random.default_rng(seed)
    O, G = _psd(rng, dA), _psd(rng, dG)
    Od, Gd, pi = damped_split(O, G, lam, split)
    r = np.sqrt(lam)
    want = (np.kron(G, O) + pi * r * np.kron(G, np.eye(dA)) + (r / pi) * np.kron(np.eye(dG), O)
            + lam * np.eye(dA * dG))
    assert_close(np.kron(Gd, Od), want, rtol=residual_tol(dA * dG), atol=0)


@given(factor_dims, factor_dims, st.floats(1e-3, 1e3), dampings, seeds)
def test_pi_split_is_invariant_to_rescaling_the_factors(dA, dG, c, lam, seed):
    """With π from the traces, (cΩ, Γ/c) gives the same damped Kronecker product (π scales
    by c) — so the expand/KFC scaling conventions (which differ by T) give one direction."""
    rng = np.random.default_rng(seed)
    O, G = _psd(rng, dA), _psd(rng, dG)
    O1, G1, p1 = damped_split(O, G, lam, "pi")
    O2, G2, p2 = damped_split(c * O, G / c, lam, "pi")
    assert_close(p2, c * p1, rtol=residual_tol(dA + dG), atol=0)
    assert_close(np.kron(G2, O2), np.kron(G1, O1), rtol=1e-12)


def test_zero_factor_gives_pi_one():
    """A zero factor (e.g. a dead layer) has no trace ratio: π = 1."""
    O, G = np.zeros((3, 3)), np.eye(2)
    for a, b in ((O, G), (G, O)):
        Od, Gd, pi = damped_split(a, b, 0.25, "pi")
        assert pi == 1.0
        assert np.array_equal(Od, a + 0.5 * np.eye(len(a))) and np.array_equal(Gd, b + 0.5 * np.eye(len(b)))


def test_dtype_is_kept():
    rng = np.random.default_rng(0)
    O, G = _psd(rng, 3).astype(np.float32), _psd(rng, 2).astype(np.float32)
    Od, Gd, pi = damped_split(O, G, 1e-3, "pi")
    assert Od.dtype == Gd.dtype == np.float32 and isinstance(pi, float)


def test_bad_arguments():
    O, G = np.eye(3), np.eye(2)
    with pytest.raises(HyperParameterError, match="split"):
        damped_split(O, G, 1.0, "half")
    with pytest.raises(HyperParameterError, match="damping"):
        damped_split(O, G, 0.0)
    with pytest.raises(ShapeError, match="Omega"):
        damped_split(np.ones((3, 2)), G, 1.0)
    with pytest.raises(NotSPDError, match="Gamma"):
        damped_split(O, np.array([[1.0, 2.0], [0.0, 1.0]]), 1.0)
