"""SMW solves vs dense references (issue: linear algebra; SENG (8)-(9), thesis (5.6)-(5.7))."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import HyperParameterError, NonFiniteError, NotSPDError, ShapeError
from refcurv.linalg import woodbury as W
from refcurv.testing.strategies import dampings, lowrank_factors, orthogonal, spd_matrices
from refcurv.testing.tolerance import EPS, assert_close, forward_tol


def _exact_lowrank_solve(lam, U, B):
    """(λI + UUᵀ)^{-1}B from U's SVD, without cancellation: Q diag(1/(λ+σ²)) QᵀB + (I−QQᵀ)B/λ."""
    Q, s, _ = np.linalg.svd(U, full_matrices=False)
    QtB = Q.T @ B
    return Q @ (QtB / ((lam + s**2)[:, None] if B.ndim == 2 else lam + s**2)) + (B - Q @ QtB) / lam


@given(lowrank_factors(), dampings(), st.integers(0, 3), st.integers(0, 1000))
def test_lowrank_solve_equals_dense(U, lam, k, seed):
    """All shapes: n < ρ, n ≫ ρ, rank-deficient U, λ from 1e-6 to 1e2. Forward error of a
    stable solve: C·n·eps·κ with κ = (λ + σ_max²)/λ."""
    n = U.shape[0]
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, k)) if k else rng.standard_normal(n)
    kappa = (lam + np.linalg.norm(U, 2) ** 2) / lam
    ref = _exact_lowrank_solve(lam, U, B)
    assert_close(W.lowrank_solve(lam, U, B), ref, rtol=forward_tol(n + U.shape[1], kappa), atol=0)
    assert_close(W.lowrank_inverse(lam, U), _exact_lowrank_solve(lam, U, np.eye(n)),
                 rtol=forward_tol(n + U.shape[1], kappa), atol=0)


def _softmax_hessian(rng, C):
    p = rng.dirichlet(np.ones(C))
    return np.diag(p) - np.outer(p, p)  # PSD, singular (1 in its null space)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 10), dampings(-4, 1),
       st.floats(0.1, 2.0), st.integers(0, 2**31 - 1))
def test_gn_solve_symmetric_and_nonsymmetric_equal_dense(N, C, n, lam, scale, seed):
    """(λI + s JᵀHJ)^{-1}B by (5.6) with SPD H and by (5.7) with singular (softmax) H. SMW
    forms the answer as (B − correction)/λ, so relative errors scale with ‖G‖/λ (the
    cancellation factor), which can exceed κ(G); the tolerance uses the larger of the two
    and of κ(D)."""
    rng = np.random.default_rng(seed)
    m = N * C
    J = rng.standard_normal((m, n))
    B = rng.standard_normal((n, 2))
    Hs = np.kron(np.eye(N), (lambda Q: (Q * rng.uniform(0.1, 2, C)) @ Q.T)(orthogonal(C, rng)))
    Hsing = np.kron(np.eye(N), _softmax_hessian(rng, C))
    for H, symmetric in ((Hs, True), (Hs, False), (Hsing, False)):
        G = lam * np.eye(n) + scale * J.T @ H @ J
        w = np.linalg.eigvalsh(G)
        Dcond = np.linalg.cond(lam * np.eye(m) + scale * J @ J.T @ H)
        ref = np.linalg.solve(G, B)
        out = W.gn_solve(lam, J, H, B, scale=scale, symmetric=symmetric)
        assert_close(out, ref, rtol=forward_tol(m + n, max(w[-1] / lam, Dcond)), atol=0)


@given(spd_matrices(max_log10_cond=4), st.integers(0, 1000))
def test_sherman_morrison_equals_dense_inverse(spd, seed):
    rng = np.random.default_rng(seed)
    A = spd.A
    n = A.shape[0]
    u = rng.standard_normal(n) * np.sqrt(spd.eigenvalues.max())
    Aplus = A + np.outer(u, u)
    kappa = np.linalg.cond(Aplus) * spd.cond
    assert_close(W.sherman_morrison(np.linalg.inv(A), u), np.linalg.inv(Aplus), rtol=forward_tol(n, kappa), atol=0)


@given(spd_matrices(max_log10_cond=8), st.integers(0, 1000))
def test_spd_solve(spd, seed):
    n = spd.A.shape[0]
    b = np.random.default_rng(seed).standard_normal(n)
    x = W.spd_solve(spd.A, b)
    # Cholesky is backward stable: ‖Ax − b‖ ≤ C n eps ‖A‖ ‖x‖
    assert np.linalg.norm(spd.A @ x - b) <= 100 * n * EPS * np.linalg.norm(spd.A, 2) * np.linalg.norm(x)


def test_spd_solve_refuses_indefinite_and_singular():
    with pytest.raises(NotSPDError, match="not positive definite"):
        W.spd_solve(np.diag([1.0, -1.0]), np.ones(2))
    with pytest.raises(NotSPDError, match="not positive definite"):
        W.spd_solve(np.zeros((2, 2)), np.ones(2))
    with pytest.raises(NotSPDError, match="symmetric"):
        W.spd_solve(np.array([[1.0, 2.0], [0.0, 1.0]]), np.ones(2))


def test_bad_input():
    U = np.ones((3, 2))
    for lam in (0.0, -1.0, np.nan):
        with pytest.raises(HyperParameterError, match="lam must be"):
            W.lowrank_solve(lam, U, np.ones(3))
    with pytest.raises(ShapeError, match="B must have 3 rows"):
        W.lowrank_solve(1.0, U, np.ones(4))
    with pytest.raises(NonFiniteError, match="U contains"):
        W.lowrank_solve(1.0, np.full((3, 2), np.inf), np.ones(3))
    with pytest.raises(ShapeError, match="H must be"):
        W.gn_solve(1.0, np.ones((2, 3)), np.eye(3), np.ones(3))
    with pytest.raises(NotSPDError, match="singular"):
        W.sherman_morrison(np.eye(2), np.array([1.0, 0.0]), np.array([-1.0, 0.0]))
