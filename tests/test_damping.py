"""Damping invariants and the BFGS/L-BFGS bounds they buy ([Ren-thesis] §2.3, (2.7)-(2.10),
Algorithms 3, 8, 11, Lemmas 4-6). Inputs include nonconvex pairs (sᵀy ≤ 0)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import HyperParameterError, ShapeError
from refcurv.linalg import damping as D
from refcurv.linalg import quasi_newton as Q
from refcurv.testing.strategies import curvature_pairs, spd_matrices
from refcurv.testing.tolerance import EPS

MU = st.floats(0.01, 0.99)


def _slack(*terms):
    """Rounding allowance for an inequality between inner products of size ``terms``."""
    return 100 * EPS * sum(abs(float(t)) for t in terms)


@st.composite
def problem(draw, max_log10_cond=4):
    spd = draw(spd_matrices(max_log10_cond=max_log10_cond))
    s, y = draw(curvature_pairs(spd.A.shape[0]))
    return spd.A, s, y


@given(problem(), MU)
def test_powell_on_B(prob, mu):
    B, s, y = prob
    y_t, theta = D.powell_B(s, y, B, mu)
    sBs = s @ B @ s
    assert 0 <= theta <= 1
    assert s @ y_t >= mu * sBs - _slack(s @ y, sBs)


@given(problem(), MU)
def test_powell_on_H(prob, mu):
    H, s, y = prob
    s_t, theta = D.powell_H(s, y, H, mu)
    yHy = y @ H @ y
    assert 0 <= theta <= 1
    assert s_t @ y >= mu * yHy - _slack(s @ y, yHy)


@given(problem(), MU, st.floats(0.01, 1.0))
def test_double_damping_both_steps(prob, mu1, mu2):
    H, s, y = prob
    s_t, y_t, th1, th2 = D.double_damping(s, y, H, mu1, mu2)
    yHy = y @ H @ y
    assert s_t @ y >= mu1 * yHy - _slack(s @ y, yHy)  # step 1 (Powell on H)
    assert s_t @ y_t >= mu2 * (s_t @ s_t) - _slack(s_t @ y, s_t @ s_t)  # step 2 (B = I)
    assert 0 <= th1 <= 1 and 0 <= th2 <= 1


@given(problem(), MU, st.floats(1e-3, 1e3))
def test_dp_dlm(prob, mu1, mu2):
    H, s, y = prob
    s_t, y_t, _ = D.dp_dlm(s, y, H, mu1, mu2)
    assert s_t @ y_t >= mu2 * (s_t @ s_t) - _slack(s_t @ y, mu2 * (s_t @ s_t))


@given(st.integers(1, 8).flatmap(curvature_pairs), MU, st.floats(1e-3, 1e3))
def test_dpi_dlm_lemma4(pair, mu1, mu2):
    s, y = pair
    s_t, y_t, _ = D.dpi_dlm(s, y, mu1, mu2)
    sy = s_t @ y_t
    m3 = D.mu3(mu1, mu2)
    assert sy > 0
    assert (s_t @ s_t) / sy <= (1 / mu2) * (1 + 1e-12)
    assert (y_t @ y_t) / sy <= (1 / m3) * (1 + 1e-12)


@given(problem(max_log10_cond=3), MU, st.floats(1e-2, 1e2))
def test_lemma5_bfgs_norm_bounds(prob, mu1, mu2):
    """BFGS with a D_P(I)D_LM pair: ‖B⁺‖ ≤ ‖B‖ + 1/μ₃, ‖H⁺‖ ≤ (1 + 1/√(μ₂μ₃))²‖H‖ + 1/μ₂."""
    H, s, y = prob
    s_t, y_t, _ = D.dpi_dlm(s, y, mu1, mu2)
    m3 = D.mu3(mu1, mu2)
    B = np.linalg.inv(H)
    Hp, Bp = Q.bfgs_update_H(H, s_t, y_t), Q.bfgs_update_B(B, s_t, y_t)
    nH, nB = np.linalg.norm(H, 2), np.linalg.norm(B, 2)
    assert np.linalg.norm(Bp, 2) <= (nB + 1 / m3) * (1 + 1e-10)
    assert np.linalg.norm(Hp, 2) <= ((1 + 1 / np.sqrt(mu2 * m3)) ** 2 * nH + 1 / mu2) * (1 + 1e-10)


@given(st.integers(1, 6), st.integers(1, 8), MU, st.floats(1e-2, 10), st.integers(0, 2**31 - 1))
def test_lemma6_lbfgs_eigenvalue_bounds(n, p, mu1, mu2, seed):
    """L-BFGS from H₀ = μ₂⁻¹I with p D_P(I)D_LM pairs has spectrum in [κ_lo, κ_hi]:
    κ_lo = 1/(μ₂ + p/μ₃), κ_hi = μ̂^p/μ₂ + (μ̂^p − 1)/(μ̂ − 1)/μ₂, μ̂ = (1 + 1/√(μ₂μ₃))²."""
    rng = np.random.default_rng(seed)
    pairs = [D.dpi_dlm(rng.standard_normal(n), rng.standard_normal(n) * 10 ** rng.uniform(-2, 2), mu1, mu2)[:2]
             for _ in range(p)]
    S, Y = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    m3 = D.mu3(mu1, mu2)
    mu_hat = (1 + 1 / np.sqrt(mu2 * m3)) ** 2
    lo = 1 / (mu2 + p / m3)
    hi = mu_hat**p / mu2 + (mu_hat**p - 1) / (mu_hat - 1) / mu2
    w = np.linalg.eigvalsh(Q.lbfgs_dense(S, Y, gamma=1 / mu2))
    assert w.min() >= lo * (1 - 1e-8) and w.max() <= hi * (1 + 1e-8)


@given(problem(max_log10_cond=3))
def test_bfgs_change_bounds_2_7_to_2_10(prob):
    """(2.7)-(2.10) with μ₁, μ₂ set to the pair's own ratios (the tightest values for which
    the hypotheses 0 < yᵀHy/sᵀy ≤ 1/μ₁, 0 < sᵀs/sᵀy ≤ 1/μ₂ hold); pairs made convex by DD."""
    H, s, y = prob
    s, y, _, _ = D.double_damping(s, y, H, 0.2, 0.5)
    sy = s @ y
    r1, r2 = (y @ H @ y) / sy, (s @ s) / sy  # = 1/μ₁, 1/μ₂
    assert r1 > 0 and r2 > 0
    B = np.linalg.inv(H)
    Bp, Hp = Q.bfgs_update_B(B, s, y), Q.bfgs_update_H(H, s, y)
    nB, nH = np.linalg.norm(B, 2), np.linalg.norm(H, 2)
    assert np.linalg.norm(Bp, 2) <= nB * (1 + r1) * (1 + 1e-10)
    assert np.linalg.norm(Hp, 2) <= ((np.sqrt(nH) + np.sqrt(r1 * r2)) ** 2 + r2) * (1 + 1e-10)


def test_bad_hyper_parameters():
    H, s, y = np.eye(2), np.ones(2), -np.ones(2)
    for bad in (0.0, 1.0, -0.5, np.nan):
        with pytest.raises(HyperParameterError, match="mu"):
            D.powell_H(s, y, H, bad)
    with pytest.raises(HyperParameterError, match=r"mu2 must lie in \(0, 1\]"):
        D.double_damping(s, y, H, 0.2, 1.5)
    with pytest.raises(HyperParameterError, match="mu2"):
        D.dp_dlm(s, y, H, 0.2, 0.0)
    with pytest.raises(ShapeError, match="y must be a vector of length 2"):
        D.powell_H(s, np.ones(3), H, 0.2)


@given(problem(), MU, st.floats(0.01, 1.0))
def test_operator_H_equals_matrix_H(prob, mu1, mu2):
    """H given as ``v -> H v`` (an L-BFGS matrix never formed) damps exactly as the matrix."""
    H, s, y = prob
    for f in (D.powell_H, lambda s, y, H, mu: D.dp_dlm(s, y, H, mu, mu2)):
        a, b = f(s, y, H, mu1), f(s, y, lambda v: H @ v, mu1)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    a = D.double_damping(s, y, H, mu1, mu2)
    b = D.double_damping(s, y, lambda v: H @ v, mu1, mu2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_operator_H_shape_checked():
    s, y = np.ones(3), np.ones(3)
    with pytest.raises(ShapeError):
        D.powell_H(s, y, lambda v: np.ones(4), 0.2)
    with pytest.raises(ShapeError):
        D.powell_H(s, y, np.eye(4), 0.2)
