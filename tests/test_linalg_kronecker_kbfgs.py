"""The K-BFGS kernels of refcurv.linalg.kronecker, each against its definition written here
with explicit loops ([Ren-thesis] (2.3), (3.9), (3.14), (3.15), Algorithm 4/9 line 2, §2.4)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv import curvature as cv
from refcurv.linalg.kronecker import damping_split, factor_A, hessian_action, hessian_action_pair, mean_patch
from refcurv.nn import Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing.tolerance import assert_close, residual_tol


def _patches(seed, N=5, d=4, T=3):
    return np.random.default_rng(seed).standard_normal((N, d, T))


def _loop_A(P):
    N, d, T = P.shape
    A = np.zeros((d, d))
    for n in range(N):
        for t in range(T):
            A += np.outer(P[n, :, t], P[n, :, t])
    return A / N


@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4))
def test_factor_A_hessian_action_and_mean_patch_match_their_loops(seed, N, d, T):
    """(3.9) A = (1/N) Σ_n Σ_t a aᵀ (sum over locations); (3.15) A s without A; (3.14) â the
    mean over samples and locations. Bounds: sums of products, C·n·eps·(|A||s|)."""
    P = _patches(seed, N, d, T)
    s = np.random.default_rng(seed + 1).standard_normal(d)
    A = _loop_A(P)
    absA = _loop_A(np.abs(P))
    assert_close(factor_A(P), A, rtol=0, atol=residual_tol(N * T) * np.linalg.norm(absA))
    assert_close(hessian_action(P, s), A @ s, rtol=0, atol=residual_tol(N * T * d) * np.linalg.norm(absA @ np.abs(s)))
    abar = sum(P[n, :, t] for n in range(N) for t in range(T)) / (N * T)
    assert_close(mean_patch(P), abar, rtol=0, atol=residual_tol(N * T) * np.abs(P).max())


def test_factor_A_is_T_times_kfac_expand_A():
    """A sums over locations: |T| × curvature.kfac_factors(conv="expand")'s A (which averages)."""
    net = Sequential([Conv2d(2, 3, 3, stride=2, padding=1), Tanh(), Flatten(), Linear(27, 3)])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 2, 5, 5)), rng.integers(0, 3, 6)
    params = net.init(0)
    patches, _ = net.factors(params, x, y, CrossEntropy())
    for P, (Ak, _) in zip(patches, cv.kfac_factors(net, params, x, y, CrossEntropy(), kind="empirical")):
        assert_close(factor_A(P), P.shape[-1] * Ak, rtol=1e-13)


@pytest.mark.parametrize("T", [1, 4, 36])
@pytest.mark.parametrize("lam", [0.37, 1e-3, 5.0])
def test_damping_split(T, lam):
    """Algorithm 9 line 2: λ_A = √|T|√λ, λ_G = √λ/√|T| (product λ); Algorithm 4 line 2 for
    |T| = 1: λ_A = λ_G = √λ."""
    lA, lG = damping_split(lam, T)
    assert lA == pytest.approx(np.sqrt(T) * np.sqrt(lam), rel=1e-15)
    assert lG == pytest.approx(np.sqrt(lam) / np.sqrt(T), rel=1e-15)
    assert lA * lG == pytest.approx(lam, rel=1e-15)
    if T == 1:
        assert damping_split(lam) == (np.sqrt(lam), np.sqrt(lam))


def test_hessian_action_pair_from_matrix_and_from_patches():
    """§2.4 / (3.14): s = H_a ā, y = A s + λ_A s — the same pair whether A is given as a matrix
    or as the patches (then A s is (3.15)); with H_a = (A + λ_A I)⁻¹ the pair satisfies
    y = (A + λ_A I) s = ā (Theorem 1 with c = 0)."""
    P = _patches(3, N=7, d=4, T=5)
    A, abar, lam = _loop_A(P), mean_patch(P), 0.3
    H = np.linalg.inv(A + lam * np.eye(4))
    s1, y1 = hessian_action_pair(H, abar, A, lam)
    s2, y2 = hessian_action_pair(H, abar, P, lam)
    assert_close(s1, H @ abar, rtol=1e-15)
    assert_close(s2, s1, rtol=0, atol=0)
    assert_close(y2, y1, rtol=1e-13)
    assert_close(y1, abar, rtol=1e-12)
