"""refcurv.operators: every structure against its dense matrix (matvec, solve, eigvalsh,
the SciPy LinearOperator), with tolerances from the tolerance model (κ known by
construction: each factor is built as Q diag(λ) Qᵀ with a drawn spectrum)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import ArgumentTypeError, NotSPDError, ShapeError
from refcurv.operators import (
    BlockDiagonal,
    Dense,
    Inverse,
    Kronecker,
    KroneckerSum,
    LowRankPlusIdentity,
    Diagonal,
    ScaledIdentity,
)
from refcurv.testing.tolerance import forward_tol, residual_tol


def spd(rng, n, log_cond):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.logspace(0, log_cond, n)
    return (Q * w) @ Q.T, w.max() / w.min()


def _cases(seed, kind):
    """(operator, its dense matrix built independently, κ)."""
    rng = np.random.default_rng(seed)
    if kind == "scaled":
        return ScaledIdentity(5, 2.5), 2.5 * np.eye(5), 1.0
    if kind == "diagonal":
        d = np.logspace(0, 3, 6)[rng.permutation(6)]
        return Diagonal(d), np.diag(d), 1e3
    if kind == "dense":
        M, k = spd(rng, 6, 3)
        return Dense(M), M, k
    if kind == "kron2":
        (G, kg), (A, ka) = spd(rng, 3, 2), spd(rng, 4, 2)
        # row-major vec: (G ⊗ A) vec(W) = vec(G W Aᵀ), checked independently below
        return Kronecker(G, A), np.kron(G, A), kg * ka
    if kind == "kron3":
        F = [spd(rng, d, 1) for d in (2, 3, 2)]
        return Kronecker(*[f for f, _ in F]), np.kron(np.kron(F[0][0], F[1][0]), F[2][0]), np.prod([k for _, k in F])
    if kind == "ksum":
        (A, ka), (B, kb) = spd(rng, 3, 1), spd(rng, 4, 1)
        M = np.kron(A, np.eye(4)) + np.kron(np.eye(3), B)
        return KroneckerSum(A, B), M, np.linalg.cond(M)
    if kind == "lowrank":
        U = rng.standard_normal((7, 3))
        K = np.array([2.0, 0.5, -0.3 / np.linalg.norm(U[:, 2]) ** 2])  # indefinite core, SPD sum
        M = 1.5 * np.eye(7) + (U * K) @ U.T
        return LowRankPlusIdentity(1.5, U, K), M, np.linalg.cond(M)
    if kind == "blocks":
        (A, _), (B, _) = spd(rng, 3, 1), spd(rng, 2, 1)
        idx = [np.array([4, 0, 2]), np.array([3, 1])]
        M = np.zeros((5, 5))
        M[np.ix_(idx[0], idx[0])], M[np.ix_(idx[1], idx[1])] = A, B
        return BlockDiagonal([Dense(A), Dense(B)], index=idx), M, np.linalg.cond(M)
    if kind == "inverse":
        (G, kg), (A, ka) = spd(rng, 2, 2), spd(rng, 3, 1)
        return Inverse(Kronecker(G, A)), np.linalg.inv(np.kron(G, A)), kg * ka
    raise KeyError(kind)


KINDS = ["scaled", "diagonal", "dense", "kron2", "kron3", "ksum", "lowrank", "blocks", "inverse"]


@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2**31 - 1))
def test_operator_equals_its_dense_matrix(kind, seed):
    op, M, kappa = _cases(seed, kind)
    n = M.shape[0]
    assert op.shape == (n, n)
    assert np.allclose(op.todense(), M, rtol=0, atol=forward_tol(n, kappa) * np.abs(M).max())
    rng = np.random.default_rng(seed + 1)
    for v in (rng.standard_normal(n), rng.standard_normal((n, 3))):
        Mv = M @ v
        assert np.linalg.norm(op.matvec(v) - Mv) <= residual_tol(n) * np.linalg.norm(M) * np.linalg.norm(v) + forward_tol(n, kappa) * np.linalg.norm(Mv)
        x = np.linalg.solve(M, v)
        assert np.linalg.norm(op.solve(v) - x) <= forward_tol(n, kappa) * np.linalg.norm(x)
    ev = np.linalg.eigvalsh(M)
    assert np.all(np.diff(op.eigvalsh()) >= -forward_tol(n, kappa) * ev.max())
    assert np.allclose(op.eigvalsh(), ev, rtol=0, atol=forward_tol(n, kappa) * ev.max())
    L = op.aslinearoperator()
    v = rng.standard_normal(n)
    assert np.array_equal(L @ v, op.matvec(v))
    V = rng.standard_normal((n, 2))
    assert np.array_equal(L @ V, op.matvec(V))


def test_kronecker_row_major_convention():
    """(G ⊗ A) vec(W) = vec(G W Aᵀ) with refcurv's row-major vec (README conventions)."""
    rng = np.random.default_rng(0)
    G, A, W = rng.standard_normal((3, 3)), rng.standard_normal((4, 4)), rng.standard_normal((3, 4))
    G, A = G @ G.T + np.eye(3), A @ A.T + np.eye(4)
    assert np.allclose(Kronecker(G, A).matvec(W.ravel()), (G @ W @ A.T).ravel())
    assert np.allclose(KroneckerSum(G, A).matvec(W.ravel()), (G @ W + W @ A.T).ravel())


def test_inverse_swaps_matvec_and_solve():
    rng = np.random.default_rng(1)
    M, _ = spd(rng, 4, 1)
    v = rng.standard_normal(4)
    assert np.array_equal(Inverse(Dense(M)).matvec(v), Dense(M).solve(v))
    assert np.array_equal(Inverse(Dense(M)).solve(v), Dense(M).matvec(v))


def test_bad_input_is_refused():
    rng = np.random.default_rng(2)
    M, _ = spd(rng, 3, 1)
    with pytest.raises(ShapeError):
        Dense(M).matvec(np.ones(4))
    with pytest.raises(NotSPDError):
        Dense(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(NotSPDError):
        Dense(-M).solve(np.ones(3))
    with pytest.raises(NotSPDError):
        LowRankPlusIdentity(1.0, np.ones((3, 1)), np.array([-1.0])).solve(np.ones(3))
    with pytest.raises(ArgumentTypeError):
        BlockDiagonal([M])
    with pytest.raises(ShapeError):
        BlockDiagonal([Dense(M)], index=[np.array([0, 1, 1])])
    with pytest.raises(ArgumentTypeError):
        Inverse(M)
    with pytest.raises(ArgumentTypeError):
        Kronecker()
    with pytest.raises(ArgumentTypeError):
        ScaledIdentity(0)
    with pytest.raises(NotSPDError, match="positive entries"):
        Diagonal(np.array([1.0, 0.0]))
    with pytest.raises(ShapeError, match="non-empty vector"):
        Diagonal(np.ones((2, 2)))
