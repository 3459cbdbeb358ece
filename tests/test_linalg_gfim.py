"""refcurv.linalg.gfim (NG+ [NG+] kernels), each against its definition written out with
explicit per-sample matrices 𝒢_i = P_i Q_iᵀ (never through another gfim kernel).

Tolerances: sums of products over the ≤ 40 terms of these tiny problems are exact to
``residual_tol(n)`` relative (C·n·eps); solves are compared at ``forward_tol(n, κ)`` with κ
the condition number of the matrix solved; exact reorganizations (storage, masks) at 0.
"""
import numpy as np
import pytest

from refcurv.errors import NotSPDError, ShapeError
from refcurv.linalg import gfim as GF
from refcurv.linalg import sketch as SK
from refcurv.operators import BlockDiagonal, Kronecker
from refcurv.testing.tolerance import assert_close, forward_tol, residual_tol

N, M, NN, KAPPA = 5, 4, 6, 3


def _factors(seed=0, N=N, m=M, n=NN, T=KAPPA):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, m, T)), rng.standard_normal((N, n, T))


def _grads(P, Q):
    return np.einsum("nat,nbt->nab", P, Q)  # 𝒢_i = P_i Q_iᵀ (8)


def _spd(m, seed=0, shift=0.5):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((m, m))
    return B @ B.T / m + shift * np.eye(m)


# ------------------------------------------------------------------ orientation
def test_sides_orient_and_oriented_factors():
    assert GF.sides([(3, 4), (5, 2), (4, 4)]) == ["left", "right", "left"]  # (4): m ≤ n, (5): m > n
    assert GF.sides([(3, 4), (5, 2)], "right") == ["right", "right"]
    X = np.arange(6.0).reshape(2, 3)
    assert GF.orient("left", X) is X and np.array_equal(GF.orient("right", X), X.T)
    P, Q = _factors()
    Gi = _grads(P, Q)
    for side in ("left", "right"):
        A, B = GF.oriented_factors(side, P, Q)
        assert np.array_equal(np.einsum("nat,nbt->nab", A, B), GF.orient(side, Gi))
        assert_close(GF.mean_gradient(A, B), GF.orient(side, Gi.mean(axis=0)), rtol=residual_tol(N * KAPPA))


# ------------------------------------------------------------------ sketches
def test_as_sketch_keeps_every_entry():
    rng = np.random.default_rng(0)
    rs = SK.ngplus_sketch(7, 4, seed=rng)
    O = rs.to_dense()
    got = GF.as_sketch(O)
    assert isinstance(got, SK.RowSketch)
    assert np.array_equal(got.index, rs.index) and np.array_equal(got.weight, rs.weight)
    assert np.array_equal(got.to_dense(), O)
    G = rng.standard_normal((3, 7))
    dense = GF.as_sketch(G)  # not a row sampling: applied as the matrix it is
    assert not isinstance(dense, SK.RowSketch) and np.array_equal(dense.to_dense(), G)
    assert GF.as_sketch(None) is None
    with pytest.raises(ShapeError):
        GF.as_sketch(np.ones(3))


@pytest.mark.parametrize("kind", ["rows", "dense"])
def test_sketch_rows_is_omega_times_each_Q_i(kind):
    rng = np.random.default_rng(1)
    _, Q = _factors(1)
    O = SK.ngplus_sketch(NN, 4, seed=rng).to_dense() if kind == "rows" else rng.standard_normal((4, NN))
    got = GF.sketch_rows(Q, GF.as_sketch(O))
    want = np.stack([O @ q for q in Q])
    assert_close(got, want, rtol=residual_tol(NN))


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("T", [1, 3])
def test_gram_from_factors_4_17_18(T):
    """(4): (1/N) Σ 𝒢_i𝒢_iᵀ; (17): (1/N) Σ 𝒢_iΩᵀΩ𝒢_iᵀ; (18): the diagonal blocks."""
    P, Q = _factors(2, T=T)
    Gi = _grads(P, Q)
    L = np.einsum("nab,ncb->ac", Gi, Gi) / N
    tol = residual_tol(NN * T)
    assert_close(GF.gram_from_factors(P, Q), L, rtol=tol)
    O = SK.ngplus_sketch(NN, 3, seed=0).to_dense()
    Ls = np.einsum("nab,bc,ndc->ad", Gi, O.T @ O, Gi) / N
    assert_close(GF.gram_from_factors(P, Q, GF.as_sketch(O)), Ls, rtol=tol)
    for p in (1, 2, 3, 4, 6):
        B = GF.gram_from_factors(P, Q, block_size=p)
        s = -(-M // p)
        assert B.shape == (s, p, p)
        for b in range(s):
            lo, hi = b * p, min((b + 1) * p, M)
            assert_close(B[b, : hi - lo, : hi - lo], L[lo:hi, lo:hi], rtol=tol)
            assert np.all(B[b, hi - lo :, :] == 0) and np.all(B[b, :, hi - lo :] == 0)  # zero padding


def test_gram_of_matrix_12_term():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((M, NN))
    assert_close(GF.gram_of_matrix(X), X @ X.T, rtol=residual_tol(NN))
    O = SK.ngplus_sketch(NN, 3, seed=1).to_dense()
    assert_close(GF.gram_of_matrix(X, GF.as_sketch(O)), X @ O.T @ O @ X.T, rtol=residual_tol(NN))
    B = GF.gram_of_matrix(X, block_size=3)
    assert_close(GF.blocks_to_dense(B, M), (X @ X.T) * GF.block_mask(M, 3), rtol=residual_tol(NN))


def test_momentum_11_and_minibatch_12_recurrences():
    rng = np.random.default_rng(4)
    L0, L1, L2 = (rng.standard_normal((3, 3)) for _ in range(3))
    assert GF.momentum_11(None, L0, 0.7) is L0  # L̄_0 = L_0
    got = GF.momentum_11(GF.momentum_11(L0, L1, 0.7), L2, 0.7)
    assert_close(got, 0.49 * L0 + 0.21 * L1 + 0.3 * L2, rtol=1e-15)
    b, g, l0 = 0.6, 0.5, 0.25
    got = GF.minibatch_12(GF.minibatch_12(None, L1, b, g, l0), L2, b, g, l0)
    assert_close(got, b * b * l0 * np.eye(3) + b * g * L1 + g * L2, rtol=1e-15)
    blocks = rng.standard_normal((2, 2, 2))
    got = GF.minibatch_12(None, blocks, b, g, l0)  # blockwise λ₀I
    assert_close(got, b * l0 * np.eye(2)[None] + g * blocks, rtol=1e-15)


@pytest.mark.parametrize("m,p", [(4, 2), (5, 2), (5, 3), (3, 7), (6, 1)])
def test_block_storage_round_trip(m, p):
    rng = np.random.default_rng(m * 10 + p)
    A = rng.standard_normal((m, m))
    mask = GF.block_mask(m, p)
    b = np.arange(m) // p
    assert np.array_equal(mask, (b[:, None] == b[None, :]).astype(float))
    B = GF.dense_to_blocks(A, p)
    assert B.shape == (-(-m // p), p, p)
    assert np.array_equal(GF.blocks_to_dense(B, m), A * mask)


# ------------------------------------------------------------------ (14)
@pytest.mark.parametrize("T", [1, 3])
def test_lowrank_factor_14(T):
    P, Q = _factors(5, T=T)
    U = GF.lowrank_factor(P, Q)
    assert U.shape == (M, N * T)
    Gi = _grads(P, Q)
    assert_close(U @ U.T, np.einsum("nab,ncb->ac", Gi, Gi) / N, rtol=residual_tol(NN * T))
    if T == 1:  # (14)'s columns √(c_i/N) g_i, c_i = a_iᵀa_i
        c = (Q[:, :, 0] ** 2).sum(axis=1)
        assert_close(U, (P[:, :, 0] * np.sqrt(c / N)[:, None]).T, rtol=1e-15)


# ------------------------------------------------------------------ solves
def test_cholesky_factor_and_solve_full_and_blocks():
    rng = np.random.default_rng(6)
    L, lam = _spd(M, 6, 0.0), 0.2
    X = rng.standard_normal((M, NN))
    Mx = lam * np.eye(M) + L
    tol = forward_tol(M, np.linalg.cond(Mx))
    assert_close(GF.cholesky_solve(GF.cholesky_factor(L, lam), X), np.linalg.solve(Mx, X), rtol=tol)
    for p in (1, 3):
        B = GF.dense_to_blocks(L, p)
        Mb = lam * np.eye(M) + GF.blocks_to_dense(B, M)
        Y = GF.cholesky_solve(GF.cholesky_factor(B, lam), X)
        assert_close(Y, np.linalg.solve(Mb, X), rtol=forward_tol(M, np.linalg.cond(Mb)))
    with pytest.raises(NotSPDError):
        GF.cholesky_factor(-np.eye(3), 0.1)


@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0])
def test_smw_14_and_ls_15_solve_lambda_I_plus_UUt(lam):
    rng = np.random.default_rng(7)
    U = rng.standard_normal((M, 3))
    X = rng.standard_normal((M, NN))
    Mx = lam * np.eye(M) + U @ U.T
    tol = forward_tol(M + NN, np.linalg.cond(Mx))
    want = np.linalg.solve(Mx, X)
    assert_close(GF.smw_solve(U, GF.smw_factor(U, lam), lam, X), want, rtol=tol)
    assert_close(GF.ls_solve(U, GF.ls_factor(U, lam), lam, X), want, rtol=tol)


def test_sketched_ls_16_is_the_push_through_form():
    rng = np.random.default_rng(8)
    U = rng.standard_normal((M, 3))
    X = rng.standard_normal((M, NN))
    lam = 0.3
    sk = GF.as_sketch(SK.ngplus_sketch(M, 2, seed=2).to_dense())
    O = sk.to_dense()
    Mx = lam * np.eye(M) + U @ U.T @ O.T @ O  # non-symmetric
    tol = forward_tol(M + NN, max(np.linalg.cond(Mx), (lam + np.linalg.norm(O @ U, 2) ** 2) / lam))
    assert_close(GF.ls_solve(U, GF.ls_factor(U, lam, sk), lam, X, sk), np.linalg.solve(Mx, X), rtol=tol)


# ------------------------------------------------------------------ curvature operator
@pytest.mark.parametrize("side", ["left", "right"])
def test_damped_operator_acts_on_row_major_vec(side):
    """Left: C vec(Θ) = vec((λI + L)Θ); right: vec(Θ(λI + R)) (refcurv's row-major vec of the
    (out, d) weight); the dense matrix is the explicit Kronecker product."""
    rng = np.random.default_rng(9)
    m, n, lam = 3, 5, 0.4
    dim = m if side == "left" else n
    L = _spd(dim, 9, 0.0)
    C = GF.damped_operator(side, (m, n), L, lam)
    assert isinstance(C, Kronecker) and C.shape == (m * n, m * n)
    D = lam * np.eye(dim) + L
    Theta = rng.standard_normal((m, n))
    want = D @ Theta if side == "left" else Theta @ D
    assert_close(C.matvec(Theta.ravel()), want.ravel(), rtol=residual_tol(dim))
    K = np.kron(D, np.eye(n)) if side == "left" else np.kron(np.eye(m), D)
    assert_close(C.todense(), K, rtol=0, atol=0)
    assert_close(GF.damped_operator(side, (m, n), L, 0.0).todense(), K - lam * np.eye(m * n), rtol=1e-15)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_damped_operator_of_18_blocks(side, p):
    """(18): the operator is block-diagonal over row bands (left) / column bands (right) of Θ;
    its dense matrix is the Kronecker form of λI + mask ⊙ L, the padding dropped."""
    m, n, lam = 5, 3, 0.2
    dim = m if side == "left" else n
    L = _spd(dim, p, 0.0)
    B = GF.dense_to_blocks(L, p)
    C = GF.damped_operator(side, (m, n), B, lam)
    assert isinstance(C, BlockDiagonal) and len(C.blocks) == -(-dim // p)
    D = lam * np.eye(dim) + L * GF.block_mask(dim, p)
    K = np.kron(D, np.eye(n)) if side == "left" else np.kron(np.eye(m), D)
    assert_close(C.todense(), K, rtol=1e-15, atol=0)
    v = np.random.default_rng(p).standard_normal(m * n)
    assert_close(C.solve(v), np.linalg.solve(K, v), rtol=forward_tol(m * n, np.linalg.cond(K)))
