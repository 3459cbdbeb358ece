"""BFGS, Broyden family, L-BFGS forms, Theorem 1 ([Ren-thesis] (2.6), (2.11), (3.16),
Theorem 1 and the momentum remark after it)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import BFGS, LbfgsInvHessProduct

from refcurv.errors import HyperParameterError, NotSPDError, ShapeError
from refcurv.linalg import quasi_newton as Q
from refcurv.linalg.woodbury import sherman_morrison
from refcurv.testing.strategies import spd_matrices
from refcurv.testing.tolerance import EPS, assert_close, forward_tol


def _convex_pairs(rng, n, p, cond=1e2):
    """p pairs y = A s + small perturbation with sᵀy > 0 (A SPD with condition ≤ cond)."""
    from refcurv.testing.strategies import orthogonal

    Qm = orthogonal(n, rng)
    A = (Qm * np.geomspace(1, cond, n)) @ Qm.T
    S = rng.standard_normal((p, n))
    Y = S @ A + 0.1 * rng.standard_normal((p, n))
    keep = (S * Y).sum(1) > 1e-3 * np.linalg.norm(S, axis=1) * np.linalg.norm(Y, axis=1)
    return S[keep], Y[keep]


@given(spd_matrices(max_log10_cond=4), st.integers(0, 2**31 - 1))
def test_bfgs_secant_spd_and_lockstep(spd, seed):
    """Secant conditions H⁺y = s, B⁺s = y as residuals, bounded by C·n·eps times the size of
    the update's terms (the formula adds O(‖H‖) terms that cancel); SPD kept; B⁺ = (H⁺)⁻¹."""
    rng = np.random.default_rng(seed)
    n = spd.A.shape[0]
    H = spd.A
    for s, y in zip(*_convex_pairs(rng, n, 4)):
        B = np.linalg.inv(H)  # fresh each step: the lockstep check is per update
        rho = 1 / (s @ y)
        Hy, Bs = H @ y, B @ s
        size_H = np.linalg.norm(H, 2) + 2 * rho * np.linalg.norm(s) * np.linalg.norm(Hy) + (rho**2 * (y @ Hy) + rho) * (s @ s)
        size_B = np.linalg.norm(B, 2) + (Bs @ Bs) / (s @ Bs) + rho * (y @ y)
        H, B = Q.bfgs_update_H(H, s, y), Q.bfgs_update_B(B, s, y)
        assert np.linalg.norm(H @ y - s) <= 100 * n * EPS * size_H * np.linalg.norm(y), "secant H⁺y = s"
        assert np.linalg.norm(B @ s - y) <= 100 * n * EPS * size_B * np.linalg.norm(s), "secant B⁺s = y"
        assert np.linalg.eigvalsh((H + H.T) / 2).min() > 0
        lock = size_H * np.linalg.norm(B, 2) + size_B * np.linalg.norm(H, 2) + np.linalg.cond(H)
        assert np.linalg.norm(B @ H - np.eye(n)) <= 100 * n * EPS * lock, "B⁺ = (H⁺)⁻¹"


@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_bfgs_equals_scipy_step_for_step(n, p, seed):
    rng = np.random.default_rng(seed)
    ref = BFGS(exception_strategy="skip_update", init_scale=1.0)
    ref.initialize(n, "inv_hess")
    H = np.eye(n)
    for s, y in zip(*_convex_pairs(rng, n, p)):
        ref.update(s, y)
        H = Q.bfgs_update_H(H, s, y)
        assert_close(H, ref.get_matrix(), rtol=forward_tol(n, np.linalg.cond(H)), atol=0)


@given(st.integers(1, 8), st.integers(0, 6), st.floats(0.1, 10), st.integers(0, 2**31 - 1))
def test_lbfgs_compact_equals_two_loop_equals_dense_at_every_memory_size(n, p, gamma, seed):
    rng = np.random.default_rng(seed)
    S, Y = _convex_pairs(rng, n, p)
    G = rng.standard_normal((n, 3))
    for k in range(S.shape[0] + 1):
        Hd = Q.lbfgs_dense(S[:k], Y[:k], gamma)
        tol = forward_tol(n, np.linalg.cond(Hd)) * (k + 1)
        assert_close(Q.lbfgs_two_loop(S[:k], Y[:k], G, gamma), Hd @ G, rtol=tol, atol=0, what=f"two-loop k={k}")
        assert_close(Q.lbfgs_compact_apply(S[:k], Y[:k], G, gamma), Hd @ G, rtol=tol, atol=0, what=f"compact k={k}")
        assert_close(Q.lbfgs_two_loop(S[:k], Y[:k], G[:, 0], gamma), Hd @ G[:, 0], rtol=tol, atol=0)


@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_lbfgs_matches_scipy_inverse_hessian_product(n, p, seed):
    """scipy's LbfgsInvHessProduct uses H₀ = I: compare with γ = 1."""
    rng = np.random.default_rng(seed)
    S, Y = _convex_pairs(rng, n, p)
    if S.shape[0] == 0:
        return
    G = rng.standard_normal((n, 2))
    ref = LbfgsInvHessProduct(S, Y).matmat(G)
    tol = forward_tol(n, np.linalg.cond(Q.lbfgs_dense(S, Y))) * (S.shape[0] + 1)
    assert_close(Q.lbfgs_compact_apply(S, Y, G), ref, rtol=tol, atol=0)
    assert_close(Q.lbfgs_two_loop(S, Y, G), ref, rtol=tol, atol=0)


@given(spd_matrices(max_log10_cond=3), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_broyden_family_interpolates_dfp_and_bfgs(spd, phi, seed):
    """(2.11) is linear in φ: H_φ = (1−φ) H_DFP + φ H_BFGS, with DFP written out here
    (H + ssᵀ/sᵀy − HyyᵀH/yᵀHy); checked on generic pairs (where h ≠ 0)."""
    rng = np.random.default_rng(seed)
    H = spd.A
    n = H.shape[0]
    for s, y in zip(*_convex_pairs(rng, n, 3)):
        Hy = H @ y
        dfp = H + np.outer(s, s) / (s @ y) - np.outer(Hy, Hy) / (y @ Hy)
        bfgs = Q.bfgs_update_H(H, s, y)
        size = np.linalg.norm(H) + np.linalg.norm(dfp) + np.linalg.norm(bfgs)
        out = Q.broyden_update_H(H, s, y, phi)
        assert np.linalg.norm(out - ((1 - phi) * dfp + phi * bfgs)) <= 100 * n * EPS * size * np.linalg.cond(H)


@given(spd_matrices(max_log10_cond=4), st.floats(0.01, 10), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_theorem1_broyden_family_is_sherman_morrison(spd, c, phi, seed):
    """Thesis Theorem 1: H = A⁻¹, s = Ha, y = A⁺s, A⁺ = A + c aaᵀ ⇒ every Broyden update
    (φ ∈ [0, 1]; DFP φ=0, BFGS φ=1) equals (A⁺)⁻¹ = H − Ha(c⁻¹ + aᵀHa)⁻¹aᵀH."""
    rng = np.random.default_rng(seed)
    A = spd.A
    n = A.shape[0]
    a = rng.standard_normal(n) * np.sqrt(spd.eigenvalues.max())
    H = np.linalg.inv(A)
    Aplus = A + c * np.outer(a, a)
    s = H @ a
    y = Aplus @ s
    ref = sherman_morrison(H, np.sqrt(c) * a)
    tol = forward_tol(n, np.linalg.cond(Aplus) * spd.cond)
    assert_close(ref, np.linalg.inv(Aplus), rtol=tol, atol=0, what="SM")
    for ph in (0.0, phi, 1.0):
        assert_close(Q.broyden_update_H(H, s, y, ph), ref, rtol=tol, atol=0, what=f"φ={ph}")
    assert_close(Q.bfgs_update_H(H, s, y), ref, rtol=tol, atol=0, what="BFGS")


@given(spd_matrices(min_n=2, max_log10_cond=3), st.floats(0.5, 0.95), st.integers(0, 2**31 - 1))
def test_theorem1_momentum_needs_rescaling(spd, beta, seed):
    """A⁺ = βA + (1−β)aaᵀ: BFGS from H = A⁻¹ misses (A⁺)⁻¹; from H/β it equals it."""
    rng = np.random.default_rng(seed)
    A = spd.A
    n = A.shape[0]
    a = rng.standard_normal(n) * np.sqrt(spd.eigenvalues.max())
    Aplus = beta * A + (1 - beta) * np.outer(a, a)
    target = np.linalg.inv(Aplus)
    tol = forward_tol(n, np.linalg.cond(Aplus) * spd.cond)
    H = np.linalg.inv(A) / beta
    s = H @ a
    assert_close(Q.bfgs_update_H(H, s, Aplus @ s), target, rtol=tol, atol=0, what="rescaled")
    H = np.linalg.inv(A)
    s = H @ a
    wrong = Q.bfgs_update_H(H, s, Aplus @ s)
    # Without rescaling, H⁺ acts as (βA)⁻¹·β = A⁻¹ on directions A-orthogonal to s, so the
    # error is (1/β − 1)‖A⁻¹ restricted there‖ — far above rounding.
    assert np.linalg.norm(wrong - target) > 1e3 * tol * np.linalg.norm(target)


def test_bad_input():
    with pytest.raises(NotSPDError, match="sᵀy"):
        Q.bfgs_update_H(np.eye(2), np.array([1.0, 0.0]), np.array([-1.0, 0.0]))
    with pytest.raises(NotSPDError, match="sᵢᵀyᵢ > 0"):
        Q.lbfgs_two_loop(np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]]), np.ones(2))
    with pytest.raises(HyperParameterError, match="gamma"):
        Q.lbfgs_dense(np.ones((1, 2)), np.ones((1, 2)), gamma=0.0)
    with pytest.raises(ShapeError, match="S and Y"):
        Q.lbfgs_compact(np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(ShapeError, match="square"):
        Q.bfgs_update_B(np.ones((2, 3)), np.ones(2), np.ones(2))
