"""Inverse p-th roots (thesis Algorithm 16), the Brand rank-one eigen update ([QNG-Ginger]
§2.3), randomized SVD, and tensor identities (thesis §4.2.1: Lemma 8, Proposition 1)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import fractional_matrix_power

from refcurv.errors import HyperParameterError, NotSPDError, ShapeError
from refcurv.linalg import lowrank as LR
from refcurv.linalg import roots as R
from refcurv.linalg import tensor as T
from refcurv.testing.strategies import orthogonal, spd_matrices
from refcurv.testing.tolerance import EPS, assert_close, forward_tol


@given(spd_matrices(max_log10_cond=6), st.integers(1, 8))
def test_eigh_root_matches_scipy(spd, p):
    ref = np.real(fractional_matrix_power(spd.A, -1.0 / p))
    assert_close(R.inv_root_eigh(spd.A, p), ref, rtol=forward_tol(spd.A.shape[0], spd.cond), atol=0)


@given(spd_matrices(max_log10_cond=4), st.integers(1, 8))
def test_coupled_newton_within_its_tolerance(spd, p):
    """X_k = A^{-1/p} M_k^{1/p} (invariant M_k = X_k^p A), so when the iteration stops with
    max|M − I| = e, ‖M − I‖₂ ≤ n e =: δ and ‖X − A^{-1/p}‖ ≤ ‖A^{-1/p}‖ δ/(p(1 − δ)), plus
    rounding drift bounded by one forward error per iteration."""
    n = spd.A.shape[0]
    X, rep = R.inv_root_newton(spd.A, p)
    assert rep.converged and rep.iterations <= 100 and rep.error <= 1e-6
    ref = R.inv_root_eigh(spd.A, p)
    delta = n * rep.error
    bound = delta / (p * (1 - delta)) + forward_tol(n, spd.cond) * (rep.iterations + 1)
    assert_close(X, ref, rtol=bound, atol=0)
    assert_close(ref, np.real(fractional_matrix_power(spd.A, -1.0 / p)), rtol=forward_tol(n, spd.cond), atol=0)


def test_coupled_newton_report_when_capped():
    A = np.diag([1.0, 1e-3, 1e3])
    X, rep = R.inv_root_newton(A, 4, max_iter=2)
    assert rep.iterations == 2 and not rep.converged and rep.error > 1e-6


@st.composite
def eigen_state(draw):
    """U (d×τ semi-orthogonal), K > 0 with gaps, h, c > 0."""
    d = draw(st.integers(2, 10))
    tau = draw(st.integers(1, d - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    U = orthogonal(d, rng)[:, :tau]
    K = np.sort(10 ** rng.uniform(-2, 2, tau))[::-1]
    h = rng.standard_normal(d) * 10 ** rng.uniform(-1, 1)
    if draw(st.booleans()):  # h inside range(U): no new direction
        h = U @ rng.standard_normal(tau)
    return U, K, h, draw(st.floats(0.01, 10.0))


@given(eigen_state(), st.booleans())
def test_brand_update_equals_dense_eigh(state, truncate):
    """Compare U'K'U'ᵀ (never raw eigenvectors) with the dense top-τ reconstruction; the
    truncated projector moves by ‖E‖/gap under a perturbation E (Davis–Kahan), so the
    tolerance is C·d·eps·‖M‖·(1 + ‖M‖/gap)."""
    U, K, h, c = state
    d, tau = U.shape
    M = (U * K) @ U.T + c * np.outer(h, h)
    w, V = np.linalg.eigh(M)
    w, V = w[::-1], V[:, ::-1]
    keep = tau if truncate else min(tau + 1, d)
    U2, K2 = LR.brand_update(U, K, h, c, rank=tau if truncate else None)
    out = (U2 * K2) @ U2.T
    ref = (V[:, :keep] * w[:keep]) @ V[:, :keep].T
    gap = w[keep - 1] - (w[keep] if keep < d else 0.0)
    nM = np.linalg.norm(M, 2)
    tol = 100 * d * EPS * nM * (1 + nM / max(gap, 1e-300))
    assert np.linalg.norm(out - ref) <= tol
    assert_close(U2.T @ U2, np.eye(U2.shape[1]), rtol=0, atol=100 * d * EPS * (1 + nM / max(gap, 1e-300)))
    assert np.all(np.diff(K2) <= 0)


@given(st.integers(2, 12), st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_randomized_svd_exact_for_low_rank_and_hmt_bound(m, n, k, seed):
    rng = np.random.default_rng(seed)
    k = min(k, m, n)
    r = rng.integers(1, k + 1)
    X = orthogonal(m, rng)[:, :r] @ np.diag(10 ** rng.uniform(-1, 1, r)) @ orthogonal(n, rng)[:r]
    U, s, Vt = LR.randomized_svd(X, k, seed=seed)
    assert_close((U * s) @ Vt, X, rtol=1e-12 * np.sqrt(k), atol=0, what="rank ≤ k: exact")
    # general matrix, q = 0 power iterations, oversampling p = 10: HMT (2011) eq. (1.9)
    # ‖X − QQᵀX‖ ≤ [1 + 11√(k+p)·√min(m,n)] σ_{k+1} with probability ≥ 1 − 6·p^{-p}
    Xg = rng.standard_normal((m, n))
    sig = np.linalg.svd(Xg, compute_uv=False)
    U, s, Vt = LR.randomized_svd(Xg, k, oversample=10, n_iter=0, seed=seed)
    err = np.linalg.norm(Xg - (U * s) @ Vt, 2)
    nxt = sig[k] if k < len(sig) else 0.0
    assert err >= nxt * (1 - 1e-10)  # Eckart–Young
    assert err <= (1 + 11 * np.sqrt(k + 10) * np.sqrt(min(m, n))) * nxt + 1e-12 * sig[0] * max(m, n)


@given(st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_proposition1_and_lemma8(k, seed):
    rng = np.random.default_rng(seed)
    dims = tuple(rng.integers(1, 4, size=k))
    G = rng.standard_normal(dims)
    Us = [rng.standard_normal((d, d)) for d in dims]
    big = Us[0]
    for U in Us[1:]:
        big = np.kron(big, U)
    assert_close(T.kron_apply(Us, G).ravel(), big @ G.ravel(), rtol=1e-13)
    # Lemma 8 (row-major vec): (A ⊗ Bᵀ) vec̄(X) = vec̄(A X B)
    X = rng.standard_normal(dims[:2])
    A, B = rng.standard_normal((dims[0],) * 2), rng.standard_normal((dims[1],) * 2)
    assert_close(np.kron(A, B.T) @ X.ravel(), (A @ X @ B).ravel(), rtol=1e-13)
    # mode products as matrix products: mat_i(A ×_i U) = U mat_i(A); contraction
    for i in range(k):
        V = rng.standard_normal((2, dims[i]))
        assert_close(T.mat(T.mode_product(G, V, i), i), V @ T.mat(G, i), rtol=1e-13)
        assert_close(T.contraction(G, i), T.mat(G, i) @ T.mat(G, i).T, rtol=1e-14)
    assert np.array_equal(T.mat(G, 0).ravel(), G.ravel())  # vec̄(A) = vec̄(mat_1(A))


def test_bad_input():
    with pytest.raises(NotSPDError, match="positive definite"):
        R.inv_root_eigh(np.diag([1.0, -1.0]), 2)
    with pytest.raises(NotSPDError, match="positive definite"):
        R.inv_root_newton(np.zeros((2, 2)), 2)
    with pytest.raises(HyperParameterError, match="p must be a positive int"):
        R.inv_root_eigh(np.eye(2), 0)
    with pytest.raises(HyperParameterError, match="tol"):
        R.inv_root_newton(np.eye(2), 2, tol=0)
    with pytest.raises(HyperParameterError, match="rank must be"):
        LR.randomized_svd(np.ones((3, 2)), 3)
    with pytest.raises(ShapeError, match="K must be a vector of length 2"):
        LR.brand_update(np.eye(3)[:, :2], np.ones(3), np.ones(3))
    with pytest.raises(ShapeError, match="one matrix per mode"):
        T.kron_apply([np.eye(2)], np.ones((2, 2)))
    with pytest.raises(ShapeError, match="mode 2 out of range"):
        T.mat(np.ones((2, 2)), 2)


@given(st.integers(3, 12), st.integers(-10, -4), st.integers(0, 2**31 - 1))
def test_brand_update_basis_stays_orthonormal_when_h_nearly_in_range(d, log10_r, seed):
    """h = U c + r p with tiny r: one Gram–Schmidt pass leaves ‖UᵀU − I‖ ~ eps‖h‖/r; with the
    reorthogonalization it stays at rounding (C·d·eps)."""
    rng = np.random.default_rng(seed)
    tau = d - 1
    Q = orthogonal(d, rng)
    U, p = Q[:, :tau], Q[:, tau]
    h = U @ rng.standard_normal(tau) + 10.0**log10_r * p
    U2, _ = LR.brand_update(U, np.abs(rng.standard_normal(tau)) + 0.1, h, 1.0)
    assert np.abs(U2.T @ U2 - np.eye(U2.shape[1])).max() <= 100 * d * EPS
