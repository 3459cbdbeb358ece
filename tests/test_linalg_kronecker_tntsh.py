"""refcurv.linalg.kronecker, TNT / Shampoo section: (4.10) normalization, damping, F_TNT and
the mode marginal (partial trace) that the dense forms use — each against a definition
written out here."""
from functools import reduce

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import ShapeError
from refcurv.linalg.kronecker import add_damping, damped_factors, f_tnt, mode_marginal, normalized_factors
from refcurv.testing.tolerance import EPS, assert_close


@st.composite
def tensors(draw):
    k = draw(st.integers(1, 4))
    dims = tuple(draw(st.integers(1, 4)) for _ in range(k))
    N = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return rng.standard_normal((N,) + dims)


def _mat(T, i):
    """mat_i by slices (§4.2.1): row j = vec̄ of the j-th slice along mode i."""
    return np.stack([np.take(T, j, axis=i).ravel() for j in range(T.shape[i])])


@given(tensors())
def test_mode_marginal_is_the_contraction_of_the_second_moment(Gs):
    """tr_{¬i} E[vec̄G vec̄Gᵀ] = E[mat_i(G) mat_i(G)ᵀ] (4.2), the sum over samples of the
    slice-built contractions; rounding: both sum the same products in another order."""
    dims = Gs.shape[1:]
    V = Gs.reshape(len(Gs), -1)
    Sigma = V.T @ V / len(Gs)
    for i in range(len(dims)):
        want = sum(_mat(T, i) @ _mat(T, i).T for T in Gs) / len(Gs)
        assert_close(mode_marginal(Sigma, dims, i), want, rtol=100 * Sigma.size * EPS, atol=1e-300)


def test_mode_marginal_rejects_bad_shapes():
    with pytest.raises(ShapeError):
        mode_marginal(np.eye(6), (2, 2), 0)
    with pytest.raises(ShapeError):
        mode_marginal(np.eye(4), (2, 2), 2)


@given(tensors(), st.floats(1e-3, 1e3))
def test_normalized_factors_4_10(Gs, s):
    """(4.10) written out: c_0 = (tr S_1 / Π d)^{1/k}, Ũ_i = S_i / (c_0^{k−1} Π_{j≠i} d_j); equal
    average eigenvalues tr(Ũ_i)/d_i = c_0; degree-1/k homogeneity."""
    dims = Gs.shape[1:]
    k = len(dims)
    S = [sum(_mat(T, i) @ _mat(T, i).T for T in Gs) / len(Gs) for i in range(k)]
    U = normalized_factors(S)
    c0 = (np.trace(S[0]) / np.prod(dims)) ** (1 / k)
    for i in range(k):
        want = S[i] / (c0 ** (k - 1) * np.prod([dims[j] for j in range(k) if j != i]))
        assert_close(U[i], want, rtol=1e-13, atol=0)
        assert abs(np.trace(U[i]) / dims[i] - c0) <= 1e-13 * c0
    for a, b in zip(normalized_factors([s * x for x in S]), U):
        assert_close(a, s ** (1 / k) * b, rtol=1e-13, atol=0)


def test_zero_statistics_give_zero_factors_and_eps_identity():
    S = [np.zeros((2, 2)), np.zeros((3, 3))]
    assert all(np.array_equal(u, np.zeros_like(u)) for u in normalized_factors(S))
    F = damped_factors(S, 0.3)
    np.testing.assert_array_equal(f_tnt(F), 0.09 * np.eye(6))


def test_add_damping_damped_factors_and_f_tnt():
    rng = np.random.default_rng(0)
    A = [rng.standard_normal((d, d)) for d in (2, 3, 2)]
    S = [a @ a.T for a in A]
    D = add_damping(S, 0.5)
    for s, d in zip(S, D):
        np.testing.assert_array_equal(d, s + 0.5 * np.eye(len(s)))
    F = damped_factors(S, 0.5)
    for f, u in zip(F, normalized_factors(S)):
        np.testing.assert_array_equal(f, u + 0.5 * np.eye(len(u)))
    np.testing.assert_array_equal(f_tnt(F), reduce(np.kron, F))
    assert np.linalg.eigvalsh(f_tnt(F)).min() >= 0.5**3 * (1 - 1e-12)  # ε^k I ⪯ F_TNT (errata TNT-3)
