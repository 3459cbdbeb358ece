"""refcurv.linalg.ema — the dense references of [QNG-Ginger] §2.2–2.3, each on its own:
the EMA (7), QNG's β (10) and product form (9)–(11), Ginger's (14), (16), (18) (with the
clip of errata GIN-4) and its dense update (7)+(17). These are the kernels the QNG and
Ginger dense forms are built from (qng_beta and ginger_sigma are also used by the fast forms).

Tolerances: refcurv.testing.tolerance (forward error C·n·eps·κ of a solve; products of m
explicit factors: C·n·(m+1)·eps·Π κ(K_j))."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import HyperParameterError, ShapeError
from refcurv.linalg import ema as E
from refcurv.testing.tolerance import EPS, assert_close, forward_tol, residual_tol

alphas = st.floats(0.2, 0.99)


def _ds(seed, T, n):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, n)) * 10 ** rng.uniform(-1, 1, (T, 1))


def _K(alpha, q, b):
    return math.sqrt(alpha) * np.eye(q.size) + b * np.outer(q, q)


# ------------------------------------------------------------------ (7)
@given(st.integers(1, 6), alphas, st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_ema_matrix_is_the_closed_form_of_7(n, alpha, T, seed):
    """G_T = α^T G_0 + Σ_t α^{T−t}(1−α) d_t d_tᵀ (the recursion (7) unrolled), G_0 = I or given."""
    ds = _ds(seed, T, n)
    G0 = np.random.default_rng(seed + 1).standard_normal((n, n))
    G0 = G0 @ G0.T
    for g0, arg in ((np.eye(n), None), (G0, G0)):
        want = alpha**T * g0 + sum(alpha ** (T - 1 - t) * (1 - alpha) * np.outer(d, d) for t, d in enumerate(ds))
        scale = np.linalg.norm(g0) + sum(np.dot(d, d) for d in ds)
        assert np.linalg.norm(E.ema_matrix(ds, alpha, arg) - want) <= residual_tol(n * T) * scale
    with pytest.raises(ShapeError):
        E.ema_matrix(ds[0], alpha)
    with pytest.raises(HyperParameterError, match="alpha"):
        E.ema_matrix(ds, 1.0)


# ------------------------------------------------------------------ (10): β
@given(alphas, st.integers(1, 6), st.floats(-4, 4) | st.just(None), st.integers(0, 2**31 - 1))
def test_beta_makes_K_Kt_the_ema_increment(alpha, n, log_norm, seed):
    """(10) needs K Kᵀ = αI + (1 − α) q qᵀ, i.e. 2√αβ + β²‖q‖² = 1 − α; β > 0 (also at q = 0)."""
    q = np.zeros(n) if log_norm is None else np.random.default_rng(seed).standard_normal(n)
    if log_norm is not None:
        q *= 10**log_norm / np.linalg.norm(q)
    s = float(q @ q)
    b = E.qng_beta(alpha, s)
    assert b > 0 and type(b) is float
    assert abs(2 * math.sqrt(alpha) * b + b * b * s - (1 - alpha)) <= 10 * EPS * max(1.0, b * b * s)
    K = E.qng_factor(q, b, alpha)
    assert_close(K, _K(alpha, q, b), rtol=4 * EPS, atol=0)
    target = alpha * np.eye(n) + (1 - alpha) * np.outer(q, q)
    assert_close(K @ K.T, target, rtol=100 * n * EPS, atol=0)


def test_printed_beta_does_not_satisfy_10():
    """Errata QNG-1: read literally, the printed β_t = (√α + (1 − α)‖q‖² − √α)/‖q‖² = 1 − α, and
    K Kᵀ − (αI + (1 − α)qqᵀ) = (1 − α)(2√α − 1 + (1 − α)‖q‖²) q qᵀ ≠ 0 (e.g. α = 1/2, ‖q‖ = 1:
    0.457…·qqᵀ); the square-root reading is the corrected β."""
    alpha, q = 0.5, np.array([0.6, 0.8])
    s = float(q @ q)
    printed = (math.sqrt(alpha) + (1 - alpha) * s - math.sqrt(alpha)) / s
    Kp = _K(alpha, q, printed)
    miss = Kp @ Kp.T - (alpha * np.eye(2) + (1 - alpha) * np.outer(q, q))
    assert_close(miss, (1 - alpha) * (2 * math.sqrt(alpha) - 1 + (1 - alpha) * s) * np.outer(q, q), rtol=1e-14)
    assert np.linalg.norm(miss) > 0.4
    root = (math.sqrt(alpha + (1 - alpha) * s) - math.sqrt(alpha)) / s
    assert E.qng_beta(alpha, s) == pytest.approx(root, rel=1e-14)


def test_beta_printed_root_form_equals_rationalized_form():
    """(√(α + (1−α)s) − √α)/s = (1 − α)/(√α + √(α + (1−α)s)). The difference form cancels:
    its relative error is ≈ eps·√α/(√(α + (1−α)s) − √α), the tolerance used."""
    for alpha in (0.1, 0.5, 0.9, 0.999):
        for s in (1e-2, 1.0, 1e3):
            diff = math.sqrt(alpha + (1 - alpha) * s) - math.sqrt(alpha)
            direct = diff / s
            assert abs(E.qng_beta(alpha, s) - direct) <= 10 * EPS * (1 + math.sqrt(alpha) / diff) * direct
    assert E.qng_beta(0.81, 0.0) == pytest.approx(0.19 / 1.8, rel=1e-15)  # q = 0: K = √α I


# ------------------------------------------------------------------ (9)–(11): the product form
@given(st.integers(1, 6), alphas, st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_qng_update_dense_is_a_literal_replay_of_11(n, alpha, tau, seed):
    """(11) written out here: Â_t = K̂_{t−τ} ⋯ K̂_{t−1} (explicit matrices of the last τ factors),
    q̂_t = Â_t⁻¹ d_t, β_t from the root form of (10); qng_update_dense keeps exactly those τ
    newest (q̂, β), qng_A / qng_G are their product and Â Âᵀ, qng_solve_dense solves with it."""
    T = tau + 4
    ds = _ds(seed, T, n)
    Ks, qs, bs, q, b = [], [], [], (), ()
    assert np.array_equal(E.qng_A(q, b, alpha, n), np.eye(n))
    for t in range(T):
        A = np.eye(n)
        for K in Ks[-tau:]:
            A = A @ K
        qt = np.linalg.solve(A, ds[t])
        bt = (math.sqrt(alpha + (1 - alpha) * (qt @ qt)) - math.sqrt(alpha)) / (qt @ qt)
        Ks.append(_K(alpha, qt, bt))
        qs.append(qt)
        bs.append(bt)
        q, b = E.qng_update_dense(q, b, ds[t], alpha, tau)
        A_next = np.eye(n)
        for K in Ks[-tau:]:
            A_next = A_next @ K
        kappa = np.linalg.cond(A_next) ** 2
        tol = forward_tol(n * (t + 1), kappa)
        assert len(q) == len(b) == min(tau, t + 1)
        for qk, qe in zip(q, qs[-tau:]):
            assert_close(qk, qe, rtol=tol, atol=0)
        for bk, be, qe in zip(b, bs[-tau:], qs[-tau:]):
            # |dlogβ/dlog s| ≤ 1, so q's error moves β by ≤ 2·tol; the root form written out
            # above cancels: relative error ≈ eps·√α/(√(α + (1−α)s) − √α)
            diff = math.sqrt(alpha + (1 - alpha) * (qe @ qe)) - math.sqrt(alpha)
            assert abs(bk - be) <= (2 * tol + 10 * EPS * (1 + math.sqrt(alpha) / diff)) * be
        assert_close(E.qng_A(q, b, alpha, n), A_next, rtol=tol, atol=0)
        G = E.qng_G(q, b, alpha, n)
        assert np.array_equal(G, G.T)
        assert_close(G, A_next @ A_next.T, rtol=tol, atol=0)
        g = ds[0]
        x = E.qng_solve_dense(q, b, g, alpha)
        assert np.linalg.norm(G @ x - g) <= residual_tol(n) * np.linalg.norm(G, 2) * np.linalg.norm(x)
    with pytest.raises(ShapeError):
        E.qng_A(q, b[:-1], alpha, n)
    for bad in [dict(alpha=1.0, tau=2), dict(alpha=0.5, tau=0), dict(alpha=0.5, tau=True)]:
        with pytest.raises(HyperParameterError):
            E.qng_update_dense((), (), ds[0], **bad)


def test_qng_update_dense_is_pure_and_float64():
    d = np.arange(1.0, 4.0, dtype=np.float32)
    q0, b0 = (), ()
    q, b = E.qng_update_dense(q0, b0, d, 0.5)
    assert q0 == () and b0 == () and q[0].dtype == np.float64 and np.array_equal(q[0], d)  # Â_1 = I
    assert np.array_equal(d, np.arange(1.0, 4.0, dtype=np.float32))


# ------------------------------------------------------------------ Ginger (14), (16), (18)
def test_ginger_sigma_clip_policy():
    """(18) with K clipped to [0, (1 − 4eps)/γ]: rounding-negative K → σ = 0; K ≥ 1/γ (where
    (18) would give ∞ or σ < 0, and Algorithm 1's (1 − γK)^† would give σ = 0 or σ < 0) →
    the cap γ(1 − δ)/δ; interior values by (18) exactly (K = 1/(2γ) ↔ σ = γ)."""
    gamma = 0.3
    delta = 4 * EPS
    cap = gamma * (1 - delta) / delta
    K = np.array([-1e-17, 0.0, 0.5 / gamma, 1 / gamma, np.nextafter(1 / gamma, 1.0), 2 / gamma])
    s = E.ginger_sigma(K, gamma)
    assert s[0] == 0 and s[1] == 0
    assert abs(s[2] - gamma) <= 4 * EPS * gamma
    assert np.all(np.abs(s[3:] - cap) <= 1e-6 * cap) and np.all(np.isfinite(s))
    with np.errstate(divide="ignore"):
        raw = gamma**2 * K / (1 - gamma * K)  # (18) unclipped
    assert not np.all(np.isfinite(raw[3:]) & (raw[3:] >= 0))
    # float32: δ from the float32 eps
    s32 = E.ginger_sigma(np.array([2 / gamma], dtype=np.float32), gamma)
    d32 = 4 * float(np.finfo(np.float32).eps)
    assert s32.dtype == np.float32 and abs(float(s32[0]) - gamma * (1 - d32) / d32) <= 1e-5 * gamma / d32


@given(st.floats(-3, 1), st.lists(st.floats(-6, 6), min_size=1, max_size=6))
def test_ginger_K_and_sigma_are_inverse_and_give_the_woodbury_inverse(log_gamma, log_sigma):
    """(16) and (18) are inverse maps on σ ≥ 0 (relative error ≤ C·eps·(1 + σ/γ), the
    conditioning of 1 − γK = γ/(γ + σ)), and γ⁻¹I − U diag(K) Uᵀ is the inverse of (14)."""
    gamma = 10.0**log_gamma
    sigma = np.sort(10.0 ** np.array(log_sigma))[::-1]
    tau = sigma.size
    K = E.ginger_K(sigma, gamma)
    assert np.all((K >= 0) & (K < 1 / gamma))
    back = E.ginger_sigma(K, gamma)
    assert np.all(np.abs(back - sigma) <= 100 * EPS * (1 + sigma / gamma) * sigma)
    n = tau + 2
    U = np.linalg.qr(np.random.default_rng(tau).standard_normal((n, tau)))[0]
    G = E.ginger_matrix(U, sigma, gamma)
    assert_close(G, gamma * np.eye(n) + U @ np.diag(sigma) @ U.T, rtol=100 * n * EPS, atol=0)
    Ginv = np.eye(n) / gamma - (U * K) @ U.T
    kap = 1 + sigma.max() / gamma
    assert np.linalg.norm(Ginv @ G - np.eye(n)) <= forward_tol(n, kap)


@given(st.integers(2, 8), st.data(), st.floats(0.05, 0.99), st.floats(-2, 1), st.integers(0, 2**31 - 1))
def test_ginger_update_dense_is_the_truncated_ema_of_the_undamped_part(n, data, alpha, log_gamma, seed):
    """One dense update from (U, σ) against the definition written out here with numpy.linalg.inv:
    G̃ = γI + α U diag(σ) Uᵀ + (1−α) d dᵀ (errata GIN-2), Corr = γ⁻¹I − G̃⁻¹, its τ largest
    eigenpairs (U', K') and σ' from (18): U' diag(K') U'ᵀ matches (subspaces compared through
    the projected matrix, never raw U), σ' through dσ/dK; U' orthonormal; ginger_solve_dense
    has a backward-stable residual."""
    tau = data.draw(st.integers(1, n))
    gamma = 10.0**log_gamma
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, tau)))[0]
    sigma = np.sort(10 ** rng.uniform(-2, 2, tau) * gamma)[::-1]
    d = rng.standard_normal(n)
    Gt = gamma * np.eye(n) + alpha * (U * sigma) @ U.T + (1 - alpha) * np.outer(d, d)
    Corr = np.eye(n) / gamma - np.linalg.inv(Gt)
    w, V = np.linalg.eigh((Corr + Corr.T) / 2)
    w, V = w[::-1][:tau], V[:, ::-1][:, :tau]
    U2, s2 = E.ginger_update_dense(U, sigma, d, alpha, gamma)
    assert U2.shape == (n, tau) and U2.dtype == s2.dtype == np.float64
    assert np.abs(U2.T @ U2 - np.eye(tau)).max() <= 100 * n * EPS
    lam = np.linalg.eigvalsh(Gt)
    c = np.sort(1 / gamma - 1 / lam)[::-1]
    gapf = 1.0 if tau == n else 1 + 2 * c[tau - 1] / max(c[tau - 1] - c[tau], 1e-300)
    tol = forward_tol(n, lam[-1] / gamma) / gamma * gapf
    K2 = E.ginger_K(s2, gamma)
    assert np.linalg.norm((U2 * K2) @ U2.T - (V * w) @ V.T) <= tol
    Kmax = np.maximum(K2, w)
    assert np.all(np.abs(s2 - E.ginger_sigma(w, gamma)) <= gamma**2 * tol / (1 - gamma * Kmax) ** 2)
    g = rng.standard_normal(n)
    x = E.ginger_solve_dense(U2, s2, g, gamma)
    G2 = E.ginger_matrix(U2, s2, gamma)
    assert np.linalg.norm(G2 @ x - g) <= residual_tol(n) * np.linalg.norm(G2, 2) * np.linalg.norm(x)


def test_ginger_dense_kernels_check_arguments():
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 2)))[0]
    s = np.zeros(2)
    with pytest.raises(HyperParameterError, match="alpha"):
        E.ginger_update_dense(U, s, np.ones(4), 1.0, 0.1)
    with pytest.raises(HyperParameterError, match="gamma"):
        E.ginger_update_dense(U, s, np.ones(4), 0.5, 0.0)
    with pytest.raises(HyperParameterError, match="sigma"):
        E.ginger_update_dense(U, -np.ones(2), np.ones(4), 0.5, 0.1)
    with pytest.raises(ShapeError):
        E.ginger_update_dense(U.T, s, np.ones(4), 0.5, 0.1)
    with pytest.raises(ShapeError):
        E.ginger_update_dense(U, s, np.ones(3), 0.5, 0.1)
