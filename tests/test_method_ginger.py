"""Ginger ([QNG-Ginger] §2.3, Algorithm 1): fast (Sherman–Morrison + Brand) vs dense (d×d EMA,
Cholesky inverse, dense eigendecomposition) step by step; untruncated = exact damped EMA;
Lemma 1; σ ≥ 0 under adversarial inputs; the Sherman–Morrison β of (17) and of Algorithm 1
(errata GIN-1..3); the method on MLP/CNN in every block layout; d_t of (8); smoke training.

Tolerance model (design §5). One step from a common state: the dense form inverts
G̃ = γI + αUΣUᵀ + (1−α)ddᵀ by Cholesky, forward error ≤ C·d·eps·κ(G̃)·‖G̃⁻¹‖ with
‖G̃⁻¹‖ ≤ γ⁻¹; the fast form's core eigendecomposition errs by O(eps·‖core‖) ≤ O(eps/γ), and
the σ ↔ K conversion (16)/(18) by O(eps·κ_γ/γ) with κ_γ = λ_max/γ ≥ κ(G̃) (see _kappa): one
step errs by ≤ C·d·eps·κ_γ/γ in K. The truncation to τ eigenvalues moves U K Uᵀ by
‖E‖·(1 + 2K_τ/(K_τ − K_{τ+1})) to first order (the eigenvector of K_i rotates by
E_ij/(K_i − K_j) into the dropped space, weighted by K_i; no amplification when K_τ is at
rounding level: nothing of size is dropped). Along trajectories run independently the
one-step bounds are summed (the EMA step contracts relative errors of G: G̃ ⪰ αG).
Measured: on the ci examples every bound still holds with C = 1 (instead of 100), not with C = 0.3.
Compare U K Uᵀ (never raw U); σ through dσ/dK = γ²/(1 − γK)² of (18).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv import curvature as cv
from refcurv import flatten
from refcurv.errors import ArgumentTypeError, DrawsError, HyperParameterError, ShapeError
from refcurv.linalg.ema import ginger_matrix, ginger_solve_dense, ginger_update_dense
from refcurv.linalg.lowrank import brand_update
from refcurv.methods import Batch, Draws
from refcurv.methods import ginger as Gi
from refcurv.methods._sampled import block_indices, fisher_vector, fisher_vector_dense
from refcurv.methods.ginger import Ginger, GingerState
from refcurv.operators import BlockDiagonal, Inverse, LowRankPlusIdentity
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.strategies import problems
from refcurv.testing.tolerance import EPS, assert_clt, forward_tol, residual_tol
from refcurv.train import train


def _K(sigma, gamma):
    """(16), written out here: K_ii = σ_i/(γ² + γσ_i)."""
    return sigma / (gamma**2 + gamma * sigma)


def _UKU(U, sigma, gamma):
    return (U * _K(sigma, gamma)) @ U.T


def _ema(ds, alpha, gamma):
    """Exact damped EMA (7) from σ₀ = 0: γI + Σ_s α^{t−s}(1−α) d_s d_sᵀ."""
    t = len(ds)
    terms = (alpha ** (t - 1 - s) * (1 - alpha) * np.outer(v, v) for s, v in enumerate(ds))
    return gamma * np.eye(len(ds[0])) + sum(terms)


def _kappa(lam_max, gamma):
    """κ_γ = λ_max(G)/γ ≥ κ(G): the conditioning of the Ginger representation. Besides the
    Cholesky inverse of G̃ (κ(G̃)), (18) turns an absolute error ε in K into a relative error
    ε·λ/γ in σ, which the next EMA step hands back to K as ≈ ε·λ/γ (absolute): with τ = d,
    κ(G) can be 1 while λ/γ is large."""
    return lam_max / gamma


def _one_step_bound(U, sigma, d, alpha, gamma):
    """Absolute bound (Frobenius) on U K Uᵀ of one step from (U, σ): C·n·eps·κ_γ/γ times the
    truncation factor 1 + 2K_τ/(K_τ − K_{τ+1}) of the exact pre-truncation correction."""
    n, tau = U.shape
    Gt = gamma * np.eye(n) + alpha * (U * sigma) @ U.T + (1 - alpha) * np.outer(d, d)
    lam = np.linalg.eigvalsh(Gt)
    kappa = _kappa(lam[-1], gamma)
    base = forward_tol(n, kappa) / gamma
    c = np.sort(1 / gamma - 1 / lam)[::-1]
    A = 1.0
    if tau < n and c[tau - 1] > base:
        gap = c[tau - 1] - c[tau]
        A = 1 + 2 * c[tau - 1] / gap if gap > 0 else np.inf
    return base * A


def _assert_sigma_close(s1, s2, tolK, gamma, what=""):
    """|Δσ| ≤ γ² tolK/(1 − γK)² (derivative of (18)), K the larger of the two."""
    K = np.maximum(_K(s1, gamma), _K(s2, gamma))
    bound = gamma**2 * tolK / (1 - gamma * K) ** 2
    assert np.all(np.abs(s1 - s2) <= bound), f"{what}: σ {s1} vs {s2}"


def _stream(seed, n, steps):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n) * 10 ** rng.uniform(-1, 1) for _ in range(steps)]


# ------------------------------------------------------------------ (1) fast = dense
@given(st.integers(2, 10), st.data(), st.floats(0.02, 0.999), st.floats(-3, 1), st.integers(0, 2**31 - 1),
       st.sampled_from(["random", "eye"]))
def test_fast_equals_dense_step_by_step(n, data, alpha, log_gamma, seed, u0):
    """22 steps (truncation active from t = τ + 1 on when τ < d). At every step: (a) from the
    common dense state, one fast and one dense update agree (U K Uᵀ, σ-spectra and the query
    direction) within the one-step bound; (b) the two forms run independently agree within
    the summed bounds."""
    tau = data.draw(st.integers(1, n))
    gamma = 10.0**log_gamma
    Uf, sf = Gi.init(n, tau, u0, seed)
    Ud, sd = Uf, sf
    acc = 0.0
    g = np.random.default_rng(seed + 1).standard_normal(n)
    for t, d in enumerate(_stream(seed, n, 22)):
        tol = _one_step_bound(Ud, sd, d, alpha, gamma)
        U1, s1 = Gi.update(Ud, sd, d, alpha, gamma)
        U2, s2 = ginger_update_dense(Ud, sd, d, alpha, gamma)
        assert U1.shape == U2.shape == (n, tau)
        err = np.linalg.norm(_UKU(U1, s1, gamma) - _UKU(U2, s2, gamma))
        assert err <= tol, f"step {t}: one-step ‖ΔUKUᵀ‖ = {err:.2e} > {tol:.2e}"
        _assert_sigma_close(s1, s2, tol, gamma, f"step {t}")
        # the query direction: state error · ‖g‖ plus the dense Cholesky solve's forward error
        x1, x2 = Gi.query(U1, s1, g, gamma), ginger_solve_dense(U2, s2, g, gamma)
        kap = 1 + s2.max() / gamma
        assert np.linalg.norm(x1 - x2) <= tol * np.linalg.norm(g) + forward_tol(n, kap) * np.linalg.norm(x2)
        acc += tol
        Uf, sf = Gi.update(Uf, sf, d, alpha, gamma)
        Ud, sd = U2, s2
        err = np.linalg.norm(_UKU(Uf, sf, gamma) - _UKU(Ud, sd, gamma))
        assert err <= acc, f"step {t}: trajectories ‖ΔUKUᵀ‖ = {err:.2e} > {acc:.2e}"
        _assert_sigma_close(sf, sd, acc, gamma, f"trajectory step {t}")
        # U stays semi-orthogonal (rounding accumulates additively over the steps)
        assert np.abs(Uf.T @ Uf - np.eye(tau)).max() <= 100 * (t + 1) * n * EPS


@given(st.integers(2, 9), st.data(), st.floats(0.05, 0.99), st.floats(-2, 1), st.integers(0, 2**31 - 1))
def test_initial_basis_does_not_matter(n, data, alpha, log_gamma, seed):
    """σ₀ = 0: U₀ only fixes the basis of a zero eigenspace, so eye(d, τ) (the authors' code)
    and a random semi-orthogonal U₀ give the same U_t K_t U_tᵀ (summed one-step bounds)."""
    tau = data.draw(st.integers(1, n))
    gamma = 10.0**log_gamma
    Ua, sa = Gi.init(n, tau, "random", seed)
    Ub, sb = Gi.init(n, tau, "eye")
    assert not np.allclose(Ua, Ub)
    acc = 0.0
    for d in _stream(seed, n, 12):
        acc += _one_step_bound(Ub, sb, d, alpha, gamma)
        Ua, sa = Gi.update(Ua, sa, d, alpha, gamma)
        Ub, sb = Gi.update(Ub, sb, d, alpha, gamma)
        assert np.linalg.norm(_UKU(Ua, sa, gamma) - _UKU(Ub, sb, gamma)) <= acc


# --------------------------------------------------- (2) no truncation = exact EMA
@given(st.integers(1, 10), st.data(), st.floats(0.02, 0.999), st.floats(-3, 1), st.integers(0, 2**31 - 1))
def test_untruncated_equals_exact_damped_ema(n, data, alpha, log_gamma, seed):
    """While t ≤ τ the rank-τ form loses nothing: G_{t,γ}⁻¹ = γ⁻¹I − U K Uᵀ (15) equals the
    inverse of γI + Σ_s α^{t−s}(1−α) d_s d_sᵀ — G₀ contributes nothing since σ₀ = 0 (not the
    identity of §2.1). With τ = d this holds for every t. Both forms; error ≤ Σ_s C n eps κ_s/γ."""
    tau = data.draw(st.integers(1, n))
    gamma = 10.0**log_gamma
    steps = 12 if tau == n else tau
    U, s = Gi.init(n, tau, "random", seed)
    Ud, sd = U, s
    ds, acc = [], 0.0
    for d in _stream(seed, n, steps):
        ds.append(d)
        G = _ema(ds, alpha, gamma)
        acc += forward_tol(n, _kappa(np.linalg.eigvalsh(G)[-1], gamma)) / gamma
        ref = np.linalg.inv(G)
        U, s = Gi.update(U, s, d, alpha, gamma)
        Ud, sd = ginger_update_dense(Ud, sd, d, alpha, gamma)
        for V, sig in ((U, s), (Ud, sd)):
            Ginv = np.eye(n) / gamma - _UKU(V, sig, gamma)
            assert np.linalg.norm(Ginv - ref) <= acc, f"t = {len(ds)}"
            # the O(dτ) query (15) applied to the basis is the same inverse
            assert np.linalg.norm(Gi.query(V, sig, np.eye(n), gamma) - ref) <= acc + forward_tol(n, 1) / gamma


# --------------------------------------------------------------------- (3) Lemma 1
@given(st.integers(2, 10), st.data(), st.floats(0.05, 0.999), st.floats(-3, 1), st.integers(0, 2**31 - 1))
def test_lemma1_eigenvalues_of_the_inverse(n, data, alpha, log_gamma, seed):
    """Lemma 1 (τ < d): 0 < λ_min(G_{t,γ}⁻¹) ≤ λ_max(G_{t,γ}⁻¹) = γ⁻¹ for every t, for the
    operator the fast form applies (the query (15) on the basis). λ_min = 1/(γ + σ_max) when U
    is semi-orthogonal. And the equality needs τ < d: with τ = d, λ_max(G⁻¹) = 1/(γ + σ_min)
    < γ⁻¹ once every direction has curvature."""
    tau = data.draw(st.integers(1, n - 1))
    gamma = 10.0**log_gamma
    U, s = Gi.init(n, tau, "random", seed)
    for t, d in enumerate(_stream(seed, n, 3 * n)):
        U, s = Gi.update(U, s, d, alpha, gamma)
        Q = Gi.query(U, s, np.eye(n), gamma)
        lam = np.linalg.eigvalsh((Q + Q.T) / 2)
        tol = 100 * n * EPS / gamma * (t + 1)
        assert abs(lam[-1] - 1 / gamma) <= tol, f"λ_max = {lam[-1]} ≠ γ⁻¹ = {1 / gamma}"
        assert lam[0] > 0
        assert abs(lam[0] - 1 / (gamma + s.max())) <= tol
    # τ = d, α = 1/2, d_s = the columns of an orthogonal matrix: σ_min ≥ 2^{-d}
    Uf, sf = Gi.init(n, n, "random", seed)
    for v in np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0].T:
        Uf, sf = Gi.update(Uf, sf, v, 0.5, gamma)
    assert sf.min() >= 0.9 * 2.0**-n
    Qf = Gi.query(Uf, sf, np.eye(n), gamma)
    lam_max = np.linalg.eigvalsh((Qf + Qf.T) / 2)[-1]
    tol = 100 * n * EPS / gamma * n
    assert abs(lam_max - 1 / (gamma + sf.min())) <= tol
    assert lam_max < 1 / gamma - 0.1 * 2.0**-n / (gamma * (gamma + 1))


# ------------------------------------------------------------------- (4) σ ≥ 0 always
@given(st.integers(2, 8), st.data(), st.sampled_from([1e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-12]),
       st.floats(-4, 2), st.floats(-8, 12), st.integers(0, 2**31 - 1))
def test_sigma_nonnegative_finite_under_adversarial_inputs(n, data, alpha, log_gamma, log_scale, seed):
    """Huge or tiny d_t, α near 0 or 1: σ stays finite and ≥ 0, U semi-orthogonal, and the
    query operator keeps its eigenvalues in [0, γ⁻¹] up to the rounding of γ⁻¹I − UKUᵀ
    (its smallest eigenvalue 1/(γ + σ_max) can lie below that rounding level)."""
    tau = data.draw(st.integers(1, n))
    gamma = 10.0**log_gamma
    rng = np.random.default_rng(seed)
    U, s = Gi.init(n, tau, "random", seed)
    for t in range(10):
        d = rng.standard_normal(n) * 10 ** (log_scale + rng.uniform(-1, 1))
        U, s = Gi.update(U, s, d, alpha, gamma)
        assert np.all(np.isfinite(U)) and np.all(np.isfinite(s)) and np.all(s >= 0)
        assert np.abs(U.T @ U - np.eye(tau)).max() <= 100 * (t + 1) * n * EPS
        Q = Gi.query(U, s, np.eye(n), gamma)
        lam = np.linalg.eigvalsh((Q + Q.T) / 2)
        assert lam[-1] <= (1 + 100 * n * (t + 1) * EPS) / gamma
        assert lam[0] >= -100 * n * (t + 1) * EPS / gamma  # > 0 up to the rounding of γ⁻¹I − UKUᵀ


def test_clip_is_what_keeps_sigma_finite():
    """‖d‖²(1−α)/γ ≈ 5e30: the Brand core returns K > (1 − 4eps)/γ ((19) fails in floating
    point: 1/λ ≈ 2e-31 is below the rounding of γ⁻¹), where unclipped (18) gives σ = ∞, σ < 0
    or a value carrying no correct digit; both forms return the finite cap γ(1 − δ)/δ."""
    n, tau, alpha, gamma = 5, 2, 0.5, 1e-3
    U, s = Gi.init(n, tau, "random", 0)
    d = np.zeros(n)
    d[0] = 1e14
    q = Gi.query(U, alpha * s, d, gamma)
    _, K_raw = brand_update(U, _K(alpha * s, gamma), q, Gi.sm_coefficient(q, d, alpha), rank=tau)
    assert K_raw.max() > (1 - 4 * EPS) / gamma
    cap = gamma * (1 - 4 * EPS) / (4 * EPS)
    for upd in (Gi.update, ginger_update_dense):
        U2, s2 = upd(U, s, d, alpha, gamma)
        assert abs(s2.max() - cap) <= 1e-6 * cap and s2.min() >= 0
        assert np.all(np.isfinite(Gi.query(U2, s2, np.ones(n), gamma)))


# -------------------------------------------------------- (5) the β of (17), Alg. 1
@given(st.integers(2, 8), st.data(), st.floats(0.05, 0.95), st.floats(-2, 1), st.integers(0, 2**31 - 1))
def test_sherman_morrison_beta_of_17_and_algorithm_1(n, data, alpha, log_gamma, seed):
    """Exact G̃⁻¹ = (γI + αUΣUᵀ + (1−α)ddᵀ)⁻¹ (Cholesky) against
    * (17) with h = G_{t−1,γ/α}⁻¹ d and the derived β = (1−α)α⁻¹/(α + (1−α)hᵀd): exact;
    * (17) with the printed β = α⁻¹/(α + (1−α)hᵀd): off by (β_printed − β) hhᵀ;
    * Algorithm 1's `upd` as printed (h ← drt(U, ασ, d) with damping γ, β = (α⁻¹ − 1)/(α +
      (1−α)hᵀd), r1u(U, K_{γ/α}, √β h)): wrong; its two corrected readings exact;
    * the first line of (17) with the damped G_{t−1,γ}: counts γ twice."""
    tau = data.draw(st.integers(1, n))
    gamma = 10.0**log_gamma
    rng = np.random.default_rng(seed)
    U, s = Gi.init(n, tau, "random", seed)
    s = 10 ** rng.uniform(-2, 2, tau) * gamma
    d = rng.standard_normal(n)
    I = np.eye(n)
    Gt = gamma * I + alpha * (U * s) @ U.T + (1 - alpha) * np.outer(d, d)
    exact = np.linalg.inv(Gt)
    tol = forward_tol(n, np.linalg.cond(Gt)) * np.linalg.norm(exact)
    # (17): M = G_{t−1,γ/α}, h = M⁻¹d
    M = (gamma / alpha) * I + (U * s) @ U.T
    Minv = np.linalg.inv(M)
    h = Minv @ d
    beta = (1 - alpha) / alpha / (alpha + (1 - alpha) * h @ d)
    beta_printed = (1 / alpha) / (alpha + (1 - alpha) * h @ d)
    assert np.linalg.norm(Minv / alpha - beta * np.outer(h, h) - exact) <= tol
    wrong = np.linalg.norm(Minv / alpha - beta_printed * np.outer(h, h) - exact)
    assert wrong >= 0.5 * (beta_printed - beta) * (h @ h) > 100 * tol
    # last line of (17): γ⁻¹I − (U α⁻¹K_{t−1,γ/α} Uᵀ + β hhᵀ), and the library's q form
    corr = (U * _K(s, gamma / alpha) / alpha) @ U.T + beta * np.outer(h, h)
    assert np.linalg.norm(I / gamma - corr - exact) <= tol
    q = Gi.query(U, alpha * s, d, gamma)
    assert np.linalg.norm(q - h / alpha) <= tol * np.linalg.norm(d)
    kappa = Gi.sm_coefficient(q, d, alpha)
    assert abs(kappa - (1 - alpha) / (1 + (1 - alpha) * q @ d)) <= 4 * EPS * kappa  # authors' κ = b/(1 + b qᵀd)
    assert np.linalg.norm(kappa * np.outer(q, q) - beta * np.outer(h, h)) <= tol
    # Algorithm 1 as printed
    h_alg = q  # drt(U, ασ, d) with the global damping γ
    b_alg = (1 / alpha - 1) / (alpha + (1 - alpha) * h_alg @ d)
    corr_alg = (U * _K(s, gamma / alpha)) @ U.T + b_alg * np.outer(h_alg, h_alg)
    assert np.linalg.norm(I / gamma - corr_alg - exact) > 100 * tol
    # reading (a): h ← drt with damping γ/α on σ, and α⁻¹K_{γ/α}
    h_a = I @ d * alpha / gamma - U @ (_K(s, gamma / alpha) * (U.T @ d))
    assert np.linalg.norm(h_a - h) <= tol * np.linalg.norm(d)
    # first line of (17) with the damped G_{t−1,γ} = γI + UΣUᵀ
    first = gamma * I + alpha * (gamma * I + (U * s) @ U.T) + (1 - alpha) * np.outer(d, d)
    assert np.allclose(first - Gt, alpha * gamma * I)


# --------------------------------------------------------------- (6) the method
def _batches(pb, steps):
    params, x, y = pb.data()
    rng = np.random.default_rng(pb.seed + 7)
    return params, [Batch(x + (k > 0) * rng.standard_normal(x.shape), y, pb.loss_fn) for k in range(steps)]


@given(problems(), st.sampled_from(["full", "layer", "tensor"]), st.integers(1, 6), st.floats(0.1, 0.99),
       st.floats(-2, 0), st.sampled_from(["random", "eye"]))
def test_method_fast_equals_dense(pb, blocks, tau, alpha, log_gamma, u0):
    """MLP and CNN, every block layout: per block U K Uᵀ and σ agree within the summed
    one-step bounds (the bound recomputed from the dense state and the same d_t of (8)), and
    the directions within that bound · ‖∇L‖ plus the dense solve's forward error."""
    net = pb.net
    gamma = 10.0**log_gamma
    method = Ginger(beta=alpha, damping=gamma, rank=tau, blocks=blocks, u0=u0)
    params, batches = _batches(pb, 4)
    sf = sd = method.init(net, params)
    idxs = block_indices(net, blocks)
    assert sorted(np.concatenate(idxs).tolist()) == list(range(net.n_params))
    acc = np.zeros(len(idxs))
    for k, b in enumerate(batches):
        y_hat = method.draw(np.random.default_rng(k), sd, net, params, b).labels[0]
        d = fisher_vector(net, params, b, y_hat)
        acc += [_one_step_bound(U, s, d[i], alpha, gamma) for i, U, s in zip(idxs, sd.U, sd.sigma)]
        df, sf = method.step(sf, net, params, b, rng=k)
        dd, sd = method.step(sd, net, params, b, rng=k, dense=True)
        assert sf.k == sd.k == k + 1 and type(sf) is type(sd) is GingerState
        g = flatten(net.grad(params, b.x, b.y, b.loss))
        df, dd = flatten(df), flatten(dd)
        for j, i in enumerate(idxs):
            Uf, s1, Ud, s2 = sf.U[j], sf.sigma[j], sd.U[j], sd.sigma[j]
            assert Uf.shape == Ud.shape == (len(i), min(tau, len(i)))
            assert np.linalg.norm(_UKU(Uf, s1, gamma) - _UKU(Ud, s2, gamma)) <= acc[j]
            _assert_sigma_close(s1, s2, acc[j], gamma, f"block {j} step {k}")
            kap = 1 + s2.max() / gamma
            bound = acc[j] * np.linalg.norm(g[i]) + forward_tol(len(i), kap) * np.linalg.norm(dd[i])
            assert np.linalg.norm(df[i] - dd[i]) <= bound
            # definition of the direction: −G_{t+1,γ}⁻¹ ∇L with the dense state
            G = gamma * np.eye(len(i)) + (Ud * s2) @ Ud.T
            res = residual_tol(len(i)) * np.linalg.norm(G, 2) * np.linalg.norm(dd[i])
            assert np.linalg.norm(G @ dd[i] + g[i]) <= res


def test_block_layouts_reduce_to_each_other():
    """One layer with bias: "layer" = "full"; one layer without bias: "tensor" = "layer"; with
    τ ≥ d a block is never truncated and its state is the exact damped EMA of the d_t's."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    for net, a, b in [(Sequential([Linear(3, 2)]), "full", "layer"),
                      (Sequential([Linear(3, 2, bias=False)]), "layer", "tensor")]:
        params = net.init(1)
        ma, mb = Ginger(blocks=a, rank=3), Ginger(blocks=b, rank=3)
        sa, sb = ma.init(net, params), mb.init(net, params)
        for k in range(6):
            batch = Batch(x + k, y, CrossEntropy())
            da, sa = ma.step(sa, net, params, batch, rng=k)
            db, sb = mb.step(sb, net, params, batch, rng=k)
            np.testing.assert_array_equal(flatten(da), flatten(db))
    # τ ≥ n: the full block is the exact damped EMA for every t (here t = 8 > n = 6)
    net = Sequential([Linear(2, 2)])
    params = net.init(2)
    m = Ginger(rank=50, damping=0.1, beta=0.7)
    st_ = m.init(net, params)
    assert st_.U[0].shape == (6, 6)
    ds = []
    for k in range(8):
        batch = Batch(rng.standard_normal((3, 2)), rng.standard_normal((3, 2)), MSE())
        ds.append(fisher_vector(net, params, batch, m.draw(np.random.default_rng(k), st_, net, params, batch).labels[0]))
        _, st_ = m.step(st_, net, params, batch, rng=k)
        G = _ema(ds, 0.7, 0.1)
        U, s = st_.U[0], st_.sigma[0]
        bound = (k + 1) * forward_tol(6, _kappa(np.linalg.eigvalsh(G)[-1], 0.1)) / 0.1
        assert np.linalg.norm(np.eye(6) / 0.1 - _UKU(U, s, 0.1) - np.linalg.inv(G)) <= bound


def test_tensor_blocks_split_weight_and_bias():
    """The block index sets written out: W_1 ∈ R^{2×(3+1)} (row-major, bias = last column) and
    W_2 ∈ R^{2×2} without bias. "tensor" separates W_1's weight from its bias column."""
    net = Sequential([Linear(3, 2), Tanh(), Linear(2, 2, bias=False)])
    want = {"full": [list(range(12))],
            "layer": [list(range(8)), [8, 9, 10, 11]],
            "tensor": [[0, 1, 2, 4, 5, 6], [3, 7], [8, 9, 10, 11]]}
    for blocks, idx in want.items():
        assert [i.tolist() for i in block_indices(net, blocks)] == idx, blocks
    m = Ginger(blocks="tensor", rank=4)
    assert [U.shape for U in m.init(net, net.init(0)).U] == [(6, 4), (2, 2), (4, 4)]


@pytest.mark.parametrize("blocks", ["full", "tensor"])
def test_float32_fast_form_runs_in_float32_dense_form_in_float64(blocks):
    """design §3 precision: the fast form runs in the input dtype (state, d_t of (8) and the
    direction stay float32 — np.sqrt(N) is a float64 scalar that would promote d_t), the dense
    form computes in float64 even from a float32 state. The float32 direction solves its own
    state's (14) to float32 rounding: ‖Gx + g‖ ≤ C·n·eps₃₂·(t+1)·κ_γ·‖g‖ (Woodbury (15) with
    ‖UᵀU − I‖ = O(n·eps₃₂) per step leaves the residual UΣ(UᵀU − I)KUᵀg)."""
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)])
    params = [W.astype(np.float32) for W in net.init(0)]
    rng = np.random.default_rng(0)
    gamma = 0.1
    m = Ginger(beta=0.9, damping=gamma, rank=3, blocks=blocks)
    s = m.init(net, params)
    eps32 = float(np.finfo(np.float32).eps)
    for k in range(4):
        b = Batch(rng.standard_normal((5, 3)).astype(np.float32), rng.integers(0, 3, 5), CrossEntropy())
        y_hat = m.draw(np.random.default_rng(k), s, net, params, b).labels[0]
        assert fisher_vector(net, params, b, y_hat).dtype == np.float32
        dd, sd = m.step(s, net, params, b, rng=k, dense=True)
        assert all(x.dtype == np.float64 for x in dd + sd.U + sd.sigma)
        df, s = m.step(s, net, params, b, rng=k)
        assert all(x.dtype == np.float32 for x in df + s.U + s.sigma)
        g, x = flatten(net.grad(params, b.x, b.y, b.loss)).astype(np.float64), flatten(df).astype(np.float64)
        for i, U, sig in zip(block_indices(net, blocks), s.U, s.sigma):
            U, sig = U.astype(np.float64), sig.astype(np.float64)
            G = gamma * np.eye(len(i)) + (U * sig) @ U.T
            bound = 100 * len(i) * eps32 * (k + 1) * (1 + sig.max() / gamma) * np.linalg.norm(g[i])
            assert np.linalg.norm(G @ x[i] + g[i]) <= bound
    # the dense kernels alone, fed float32
    U, sg = Gi.init(6, 2, "random", 0, np.float32)
    v = np.ones(6, np.float32)
    U1, s1 = Gi.update(U, sg, v, 0.9, gamma)
    assert U1.dtype == s1.dtype == Gi.query(U1, s1, v, np.float64(gamma)).dtype == np.float32
    U2, s2 = ginger_update_dense(U, sg, v, 0.9, gamma)
    assert U2.dtype == s2.dtype == ginger_solve_dense(U, sg, v, gamma).dtype == np.float64


def test_d_t_second_moment_is_the_batch_fisher():
    """(8): with one label per input drawn from the model, E[d_t d_tᵀ] = (1/|B|) Σ_x F(x), the
    exact Fisher (6) of the batch (the 1/√|B| scaling; cross terms vanish because the score
    has mean zero). Monte-Carlo with a CLT tolerance."""
    net = Sequential([Linear(2, 3), Tanh(), Linear(3, 3)])
    params = net.init(4)
    x = np.random.default_rng(5).standard_normal((4, 2))
    batch = Batch(x, np.zeros(4, dtype=int), CrossEntropy())
    m = Ginger()
    rng = np.random.default_rng(6)
    S = 3000
    D = np.stack([fisher_vector(net, params, batch, m.draw(rng, m.init(net, params), net, params, batch).labels[0]) for _ in range(S)])
    iu = np.triu_indices(net.n_params)
    X = (D[:, :, None] * D[:, None, :])[:, iu[0], iu[1]]
    F = cv.fisher(net, params, x, None, CrossEntropy(), kind="exact")
    assert_clt(X, F[iu])


# --------------------------------------------------------------- (7) hyper-parameters
def test_bad_hyper_parameters():
    for kwargs, match in [({"beta": 0.0}, "beta"), ({"beta": 1.0}, "beta"), ({"beta": float("nan")}, "beta"),
                          ({"damping": 0.0}, "damping"), ({"damping": -1.0}, "damping"),
                          ({"damping": float("inf")}, "damping"),
                          ({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"rank": True}, "rank"),
                          ({"blocks": "diag"}, "blocks"), ({"u0": "zeros"}, "u0"), ({"seed": -1}, "seed")]:
        with pytest.raises(HyperParameterError, match=match):
            Ginger(**kwargs)
    for retired in ("alpha", "gamma", "tau"):  # renamed: beta (α of (7)), damping (γ of (14)), rank (τ)
        with pytest.raises(TypeError):
            Ginger(**{retired: 0.5})
    with pytest.raises(HyperParameterError, match="tau must be ≤ d"):
        Gi.init(3, 4)
    U, s = Gi.init(4, 2)
    with pytest.raises(HyperParameterError, match="alpha"):
        Gi.update(U, s, np.ones(4), 1.0, 0.1)
    with pytest.raises(HyperParameterError, match="gamma"):
        ginger_update_dense(U, s, np.ones(4), 0.5, 0.0)
    with pytest.raises(HyperParameterError, match="sigma"):
        Gi.update(U, -np.ones(2), np.ones(4), 0.5, 0.1)
    with pytest.raises(ShapeError):
        Gi.update(U.T, s, np.ones(4), 0.5, 0.1)
    with pytest.raises(ShapeError):
        Gi.update(U, s, np.ones(3), 0.5, 0.1)


# --------------------------------------------------------------- (8) smoke training
@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_training_smoke_decreases_loss(blocks):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    net = Sequential([Linear(4, 16), Tanh(), Linear(16, 3)])
    _, hist = train(Ginger(beta=0.9, damping=1e-2, rank=8, blocks=blocks), net, net.init(0), x, y, CrossEntropy(),
                    steps=30, lr=0.01, batch_size=32, seed=1)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]


# --------------------------------------------------------------- (9) draws and curvature
def _mlp_batch(seed=0):
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)])
    rng = np.random.default_rng(seed)
    return net, net.init(seed), Batch(rng.standard_normal((5, 3)), rng.integers(0, 3, 5), CrossEntropy())


@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_injected_labels_are_consumed_exactly(dense):
    """Labels drawn elsewhere (all equal to 1) are what d_t (8) is computed from: with τ ≥ d
    and one step, G_{1,γ} = γI + (1−α) d dᵀ exactly, d = −√N ∇Ψ(ŷ) at those labels."""
    net = Sequential([Linear(2, 2)])
    params = net.init(0)
    rng = np.random.default_rng(0)
    b = Batch(rng.standard_normal((4, 2)), rng.integers(0, 2, 4), CrossEntropy())
    m = Ginger(rank=6, damping=0.1, beta=0.7)
    y_hat = np.ones((1, 4), dtype=np.int64)
    _, s = m.step(m.init(net, params), net, params, b, draws=Draws(method="ginger", labels=y_hat), dense=dense)
    d = -2.0 * flatten(net.grad(params, b.x, y_hat[0], b.loss))
    G = 0.1 * np.eye(6) + 0.3 * np.outer(d, d)
    bound = forward_tol(6, _kappa(np.linalg.eigvalsh(G)[-1], 0.1)) / 0.1
    assert np.linalg.norm(np.eye(6) / 0.1 - _UKU(s.U[0], s.sigma[0], 0.1) - np.linalg.inv(G)) <= bound
    assert m.draw(np.random.default_rng(0), s, net, params, b).labels.shape == (1, 4)


def test_fisher_vector_dense_equals_fisher_vector():
    """The two computations of d_t (8) — the fast forms' −(1/√N) Σ_i ∇ψ_i(ŷ_i) and the dense
    forms' −√N ∇Ψ(ŷ) — agree to rounding (MSE: sampled targets (1, N, C))."""
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params = net.init(1)
    rng = np.random.default_rng(1)
    b = Batch(rng.standard_normal((7, 3)), rng.standard_normal((7, 2)), MSE())
    draws = Ginger().draw(np.random.default_rng(2), Ginger().init(net, params), net, params, b)
    assert draws.labels.shape == (1, 7, 2)
    d1 = fisher_vector(net, params, b, draws.labels[0])
    d2 = fisher_vector_dense(net, params, b, draws.labels[0])
    assert np.linalg.norm(d1 - d2) <= residual_tol(net.n_params) * np.linalg.norm(d2)
    per_sample = net.per_sample_grads(params, b.x, draws.labels[0], b.loss)
    want = -flatten([u.sum(axis=0) for u in per_sample]) / np.sqrt(7)
    assert np.linalg.norm(d1 - want) <= residual_tol(net.n_params) * np.linalg.norm(want)


def test_draws_of_the_wrong_shape_are_refused():
    net, params, b = _mlp_batch()
    m = Ginger()
    s = m.init(net, params)
    for labels in (np.zeros(5, dtype=int), np.zeros((3, 5), dtype=int), np.zeros((1, 4), dtype=int), None):
        with pytest.raises(DrawsError, match="ginger.*labels"):
            m.step(s, net, params, b, draws=Draws(method="ginger", labels=labels))


@pytest.mark.parametrize("blocks", ["full", "layer", "tensor"])
def test_curvature_is_the_damped_low_rank_form(blocks):
    """curvature(state) = BlockDiagonal(Inverse(LowRankPlusIdentity(1/γ, U, −K_γ(σ)))) on the
    blocks' index sets (tensor blocks are not contiguous in θ): its dense matrix is (14)
    γI + U diag(σ) Uᵀ per block (U semi-orthogonal), −C⁻¹g is the fast direction (the same
    O(dτ) query (15)), and its eigenvalues are γ + σ and γ."""
    net = Sequential([Linear(3, 2), Tanh(), Linear(2, 2, bias=False)])
    params = net.init(0)
    rng = np.random.default_rng(0)
    gamma = 0.05
    m = Ginger(beta=0.8, damping=gamma, rank=2, blocks=blocks)
    s = m.init(net, params)
    for k in range(4):
        b = Batch(rng.standard_normal((5, 3)), rng.integers(0, 2, 5), CrossEntropy())
        d, s = m.step(s, net, params, b, rng=k)
    C = m.curvature(s, net)
    assert isinstance(C, BlockDiagonal) and C.shape == (net.n_params,) * 2
    assert all(isinstance(blk, Inverse) and isinstance(blk.B, LowRankPlusIdentity) for blk in C.blocks)
    g = flatten(net.grad(params, b.x, b.y, b.loss))
    assert np.linalg.norm(-C.solve(g) - flatten(d)) <= residual_tol(net.n_params) * np.linalg.norm(flatten(d))
    M = C.todense()
    want = np.zeros_like(M)
    for i, U, sig in zip(block_indices(net, blocks), s.U, s.sigma):
        want[np.ix_(i, i)] = ginger_matrix(U, sig, gamma)
    kap = 1 + max(sig.max() for sig in s.sigma) / gamma
    assert np.linalg.norm(M - want) <= forward_tol(net.n_params, kap) * np.linalg.norm(want)
    ev = np.sort(np.concatenate([np.r_[gamma + sig, np.full(U.shape[0] - U.shape[1], gamma)]
                                 for U, sig in zip(s.U, s.sigma)]))
    assert np.allclose(C.eigvalsh(), ev, rtol=forward_tol(net.n_params, kap), atol=0)
    with pytest.raises(ArgumentTypeError, match="net"):
        m.curvature(s)
    with pytest.raises(HyperParameterError, match="blocks"):
        Ginger(blocks="full" if blocks != "full" else "layer").curvature(s, net)
