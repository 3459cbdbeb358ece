"""SMW-GN / SMW-NG / SMW-NG-BD ([Ren-thesis], Chapter 5: (5.2)-(5.7), §5.2.3 LM rule,
Algorithms 22-23, §5.8; design §4 row "SMW-GN / SMW-NG / SMW-NG-BD").

Tolerance for fast (SMW) vs dense (Cholesky on ``B + λI``), both float64
------------------------------------------------------------------------
Write ``G = λI + s JᵀHJ`` (``s = 1/N₂``; NG: ``J`` = rows ``∇ψ_iᵀ``, ``H = I``) and
``κ̂ = 1 + s‖J‖₂²‖H‖₂/λ`` (``= ‖G‖/λ`` when ``H = I``; ``≥ ‖G‖/λ ≥ κ(G)`` always). SMW
solves ``D z = J g`` and returns ``p = −(g − sJᵀ(·)z)/λ``. Two identities make the error
analysis exact: ``D⁻¹J = HJG⁻¹`` for (5.6) and ``D⁻¹J = JG⁻¹`` for (5.7), so ``z = ∓HJp`` (resp.
``−Jp``), and ``sJᵀHD⁻¹ = G⁻¹sJᵀH``. A backward error ``E`` of the solve with ``D``
(``‖E‖ ≤ c·m·eps·ρ_g·‖D‖``; LU growth factor ``ρ_g``, ``= 1`` for Cholesky, where by
van der Sluis the diagonal scaling ``H^{±1/2}`` of (5.6) costs nothing) changes ``p`` by
``Δp = G⁻¹ sJᵀH E z / λ``. With ``‖G⁻¹√s JᵀH^{1/2}‖ ≤ 1/(2√λ)`` (``max σ/(λ + σ²)``),
``‖D‖ ≤ λκ̂`` and ``‖z‖ ≤ ‖H^{1/2}‖ ‖H^{1/2}J‖ ‖p‖``:

    ‖Δp‖/‖p‖ ≤ ½ c m eps ρ_g κ̂^{3/2}.

Rounding in forming ``J Jᵀ`` (Kronecker Gram vs dense ``J``; ``|ΔK| ≤ c n eps |J||J|ᵀ``) is
an ``E`` of the same form (an extra ``rank ≤ m`` factor from ``‖J‖_F² ≤ m‖J‖²``). The
inputs differ between the two forms only by rounding: the Jacobian (relative ``c n eps``,
amplified by ``κ(G) ≤ κ̂``) and the gradient, a mean of per-sample gradients whose relative
error is ``c n eps γ`` with the cancellation factor ``γ = mean_i‖u_i‖/‖g‖``, amplified by
``κ(G) ≤ κ̂``. The dense reference itself is accurate to ``c n eps κ(G)``. Hence

    rel. error ≤ C (m + n) eps (ρ_g κ̂^{3/2} + γ κ̂)      (C = 100, as forward_tol)

— a bound, not a fit: the ``3/2`` power comes from the cancellation ``(g − correction)/λ``.
"""
import dataclasses
import itertools

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import ArgumentTypeError, DrawsError, HyperParameterError, StateError
from refcurv.methods import Draws
from refcurv.methods.base import Batch
from refcurv.methods.diagnostics import SCHEMA
from refcurv.methods.hessian_free import HessianFree
from refcurv.methods.smw import SMWGN, SMWNG, SMWNGBD, LMMethod, LMState, lm_update, reduction_ratio
from refcurv.operators import BlockDiagonal, Dense
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.strategies import Problem, dampings, problems
from refcurv.testing.tolerance import EPS, forward_tol, residual_tol
from refcurv.train import train

TAU = 1e-3


# ------------------------------------------------------------------ helpers
def _layer_slices(net):
    return rc.vec.layer_slices(net)


def _setup(pb, n2, method_cls, lam=None, **kw):
    """Method, initial state and data; ``lam`` given: ``λ_LM⁰ = τ = λ/2`` so the first step
    uses ``λ``; otherwise the §5.8 defaults."""
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    if lam is not None:
        kw.update(damping=lam / 2, damping_floor=lam / 2)
    M = method_cls(n2=min(n2, x.shape[0]), **kw)
    state = M.init(net, params)
    return M, state, net, params, x, y, loss


def _s2(M, draws, x, y):
    """``(x₂, y₂)`` the curvature is built from, rebuilt from the draws here: ``S₂`` with its
    data labels, or for ``fisher="mc"`` the ``S N₂`` pairs ``(x_i, ŷ_is)`` ordered ``(s, i)``."""
    idx = draws.sketches["subset"]
    if getattr(M, "fisher", "empirical") != "mc":
        return x[idx], y[idx]
    S, N2 = draws.labels.shape[:2]
    return np.concatenate([x[idx]] * S), draws.labels.reshape((S * N2,) + draws.labels.shape[2:])


def _gamma(U):
    """Cancellation factor of a mean of per-sample gradients: mean_i ‖u_i‖ / ‖mean_i u_i‖."""
    g = U.mean(axis=0)
    gn = np.linalg.norm(g)
    num = np.linalg.norm(U, axis=1).mean()
    return 1.0 if num == 0 else num / max(gn, 1e-300)


def _smw_tol(M, net, params, x, y, loss, draws, lam):
    """C (m + n) eps (ρ_g κ̂^{3/2} + γ κ̂) of the module docstring, from dense quantities."""
    x2, y2 = _s2(M, draws, x, y)
    N2 = x2.shape[0]
    n = net.n_params
    U1 = cv.per_sample_grads(net, params, x, y, loss)
    if isinstance(M, SMWGN):
        J = cv.jacobian(net, params, x2)
        C = J.shape[1]
        Jm = J.reshape(N2 * C, n)
        H = loss.hessian(net.forward(params, x2))
        hmax = max(np.linalg.norm(Hi, 2) for Hi in H)
        kappa = 1 + np.linalg.norm(Jm, 2) ** 2 * hmax / (N2 * lam)
        growth = 1.0
        if M.form == "general" or (M.form == "auto" and loss.name == "cross_entropy"):
            D = lam * np.eye(N2 * C) + Jm @ Jm.T @ scipy.linalg.block_diag(*H) / N2
            _, _, Uf = scipy.linalg.lu(D)
            growth = max(1.0, np.abs(Uf).max() / np.abs(D).max())
        return forward_tol(N2 * C + n, growth * kappa**1.5 + _gamma(U1) * kappa)
    U2 = cv.per_sample_grads(net, params, x2, y2, loss)
    if isinstance(M, SMWNG):
        kappa = 1 + np.linalg.norm(U2, 2) ** 2 / (N2 * lam)
        return forward_tol(N2 + n, kappa**1.5 + _gamma(U1) * kappa)
    worst = 0.0
    for sl in _layer_slices(net):  # SMW-NG-BD: every block obeys the bound, hence the whole
        kappa = 1 + np.linalg.norm(U2[:, sl], 2) ** 2 / (N2 * lam)
        worst = max(worst, kappa**1.5 + _gamma(U1[:, sl]) * kappa)
    return forward_tol(N2 + n, worst)


def _dense_B(M, net, params, x2, y2, loss):
    if isinstance(M, SMWGN):
        return cv.ggn(net, params, x2, y2, loss)
    if isinstance(M, SMWNG):
        return cv.empirical_fisher(net, params, x2, y2, loss)
    return scipy.linalg.block_diag(*cv.empirical_fisher(net, params, x2, y2, loss, blocks=True))


def _method_cases(pb):
    """(class, kwargs) for every method/variant valid on this problem's loss."""
    cases = [(SMWGN, {"form": "auto"}), (SMWGN, {"form": "general"}),
             (SMWNG, {"fisher": "empirical"}), (SMWNG, {"fisher": "mc"}),
             (SMWNGBD, {"fisher": "empirical"}), (SMWNGBD, {"fisher": "mc"})]
    if pb.loss != "cross_entropy":
        cases.append((SMWGN, {"form": "symmetric"}))
    return cases


def _expected_lm(lam_lm, rho):
    """The rule of thesis §5.2.3 with the §5.8 defaults, written out (ε = 1/4)."""
    if rho < 0.25:
        return lam_lm * 1.01
    if rho > 0.75:
        return lam_lm * 0.99
    return lam_lm


# ------------------------------------------------------------------ fast = dense
@given(problems(), dampings(-3, 1), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_fast_equals_dense(pb, lam, n2, seed):
    """(5.6)/(5.7) with Algorithm-22 Gram blocks = the dense ``−(B + λI)⁻¹ g`` (Cholesky), for
    GN (both forms where valid), NG and NG-BD (data and sampled labels), MLPs and CNNs, all
    three losses, ``S₂ ⊊ S₁`` included; tolerance derived in the module docstring."""
    for cls, kw in _method_cases(pb):
        M, state, net, params, x, y, loss = _setup(pb, n2, cls, lam=lam, **kw)
        batch = Batch(x, y, loss)
        d_fast, s_fast = M.step(state, net, params, batch, rng=seed)
        d_dense, s_dense = M.step(state, net, params, batch, rng=seed, dense=True)
        a, b = rc.flatten(d_fast), rc.flatten(d_dense)
        draws = M.draw(np.random.default_rng(seed), state, net, params, batch)
        tol = _smw_tol(M, net, params, x, y, loss, draws, state.damping)
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)
        assert err <= tol, f"{M.name} {kw}: rel. error {err:.3e} > {tol:.3e}"
        assert type(s_fast) is type(s_dense) is M.State
        assert set(s_fast.diagnostics) == set(s_dense.diagnostics)


@given(problems(), dampings(-3, 1), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_capacitance_D_equals_dense_J_Jt(pb, lam, n2, seed):
    """``D_t`` built from the Kronecker/Gram structure (§5.3.3, Algorithm 22) equals the matrix
    of (5.6)/(5.7) formed from the dense per-sample Jacobians, stacked **sample-major**
    (row ``(i, c)``, the order of ``H = diag(H_1, …, H_N₂)``); NG's ``D`` is ``N₂ × N₂``
    (erratum SMW-1). Error of a Gram entry: ``c n eps |J_i||J_j|ᵀ``, so
    ``‖ΔD‖ ≤ C (n + m) eps (‖J‖_F² ‖H‖ / N₂ + λ ‖H⁻¹‖ κ(H))``."""
    for cls, kw in _method_cases(pb):
        M, state, net, params, x, y, loss = _setup(pb, n2, cls, lam=lam, **kw)
        lam = state.damping
        draws = M.draw(np.random.default_rng(seed), state, net, params, Batch(x, y, loss))
        x2, y2 = _s2(M, draws, x, y)
        N2, n = x2.shape[0], net.n_params
        D = M.capacitance(net, params, x2, y2, loss, lam)
        if cls is SMWGN:
            D, form = D
            J = cv.jacobian(net, params, x2)
            C = J.shape[1]
            Jm = J.reshape(N2 * C, n)  # sample-major rows (i, c)
            H = loss.hessian(net.forward(params, x2))
            hmax = max(np.linalg.norm(Hi, 2) for Hi in H)
            assert form == kw["form"] if kw["form"] != "auto" else form == (
                "general" if pb.loss == "cross_entropy" else "symmetric")
            if form == "symmetric":
                Hinv = [np.linalg.inv(Hi) for Hi in H]
                ref = lam * scipy.linalg.block_diag(*Hinv) + Jm @ Jm.T / N2
                extra = lam * max(np.linalg.norm(Hi, 2) * np.linalg.cond(H_) for Hi, H_ in zip(Hinv, H))
            else:
                ref = lam * np.eye(N2 * C) + Jm @ Jm.T @ scipy.linalg.block_diag(*H) / N2
                extra = 0.0
            bound = residual_tol(n + N2 * C) * (np.linalg.norm(Jm) ** 2 * hmax / N2 + extra)
            assert D.shape == (N2 * C, N2 * C)
            assert np.linalg.norm(D - ref) <= bound
            continue
        U2 = cv.per_sample_grads(net, params, x2, y2, loss)
        blocks = [U2] if cls is SMWNG else [U2[:, sl] for sl in _layer_slices(net)]
        Ds = [D] if cls is SMWNG else D
        assert len(Ds) == len(blocks)
        for Dl, Ul in zip(Ds, blocks):
            ref = lam * np.eye(N2) + Ul @ Ul.T / N2
            assert Dl.shape == (N2, N2)
            bound = residual_tol(n + N2) * np.linalg.norm(Ul) ** 2 / N2
            assert np.linalg.norm(Dl - ref) <= bound


def test_sample_major_order_matters():
    """The class-major Gram (the order design §8 suspects in the authors' code) paired with
    the sample-major ``H = diag(H_i)`` of (5.7) gives a different — wrong — direction; the
    module's (sample-major) one equals the dense solve. (Softmax CE, C = 3, N₂ = 4.)"""
    pb = Problem((("linear", 3, 5, True), ("act", "tanh"), ("linear", 5, 3, True)), (3,), 3, "cross_entropy", 4, 7)
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    lam = 0.1
    J = cv.jacobian(net, params, x)
    N, C, n = J.shape
    g = cv.grad(net, params, x, y, loss)
    H = scipy.linalg.block_diag(*loss.hessian(net.forward(params, x)))
    Js = J.reshape(N * C, n)  # sample-major
    Jc = J.transpose(1, 0, 2).reshape(N * C, n)  # class-major
    dense = -np.linalg.solve(cv.ggn(net, params, x, y, loss) + lam * np.eye(n), g)

    def smw57(Jrows_D, Jrows):  # (5.7) with the Gram from Jrows_D and J g, Jᵀ from Jrows
        D = lam * np.eye(N * C) + Jrows_D @ Jrows_D.T @ H / N
        return -(g - Jrows.T @ (H @ np.linalg.solve(D, Jrows @ g)) / N) / lam

    assert np.linalg.norm(smw57(Js, Js) - dense) <= 1e-10 * np.linalg.norm(dense)
    mixed = smw57(Jc, Js)  # class-major Gram, sample-major everything else
    assert np.linalg.norm(mixed - dense) > 1e-3 * np.linalg.norm(dense)
    M = SMWGN(damping=lam - TAU)
    d, _ = M.step(M.init(net, params), net, params, Batch(x, y, loss), rng=0)
    assert np.linalg.norm(rc.flatten(d) - dense) <= 1e-10 * np.linalg.norm(dense)


# ------------------------------------------------------------------ LM rule
def test_lm_rule_scripted_trajectory():
    """λ_LM under the rule of thesis §5.2.3 with §5.8's defaults (λ_LM⁰ = 1, boost 1.01,
    drop 0.99, ε = ¼, τ = 0.001), including both boundaries (ρ = ε and ρ = 1 − ε keep λ),
    negative ρ, ρ > 1 and ρ = −∞ (a step to a non-finite loss); trajectory by hand."""
    rhos = [0.1, 0.9, 0.5, 0.25, 0.75, -3.0, 0.76, 0.2499, 1.7, -np.inf, float("nan")]
    expected_lm = [1.0, 1.01, 0.9999, 0.9999, 0.9999, 0.9999, 1.009899, 0.99980001,
                   1.0097980101, 0.999700029999, 1.00969703029899, 1.00969703029899]
    lam_lm = 1.0
    got = [lam_lm]
    for rho in rhos:
        lam_lm = lm_update(lam_lm, rho)
        got.append(lam_lm)
    np.testing.assert_allclose(got, expected_lm, rtol=16 * EPS, atol=0)
    # the method's copy of the rule, and λ = λ_LM + τ in the state
    M = SMWNG()
    net = Sequential([Linear(2, 1)])
    s0 = M.init(net, net.init(0))
    lam_lm = s0.damping_lm
    assert s0.damping == 1.0 + 0.001 and s0.damping_used is None
    for rho, want in zip(rhos, expected_lm[1:]):
        lam_lm = M.lm(lam_lm, rho)
        assert abs(lam_lm - want) <= 16 * EPS * want
    # non-default hyper-parameters are used, not the defaults
    M2 = SMWGN(boost=2.0, drop=0.5, lm_threshold=0.1)
    assert [M2.lm(1.0, r) for r in (0.05, 0.1, 0.5, 0.9, 0.95)] == [2.0, 1.0, 1.0, 1.0, 0.5]


@given(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.floats(1e-4, 1.0), st.floats(1.001, 3.0),
       st.floats(0.3, 0.999), st.floats(0.01, 0.49), st.integers(0, 2**31 - 1))
def test_lm_bound_of_theorem6(Lam, lam0, tau, boost, drop, eps, seed):
    """Theorem 6's proof: if ``ρ ≥ 1 − ε`` whenever ``λ_t ≥ Λ``, then λ is bounded. The
    printed bound ``λ_t ≤ boost·Λ + τ`` ignores ``λ_0`` (erratum SMW-3); the bound that
    holds is ``max(λ_0, boost·Λ + τ)``, and ``λ_t ≥ τ`` always. Adversarial ρ: the worst
    value below Λ (boost), any value in ``[1 − ε, 1 + ε]`` above."""
    rng = np.random.default_rng(seed)
    lam_lm = lam0
    bound = max(lam0 + tau, boost * Lam + tau)
    for _ in range(300):
        lam = lam_lm + tau
        assert tau <= lam <= bound * (1 + 4 * EPS)
        rho = -1.0 if lam < Lam else rng.uniform(1 - eps, 1 + eps)
        lam_lm = lm_update(lam_lm, rho, boost, drop, eps)


def test_theorem6_printed_lambda_bound_ignores_lambda0():
    """Erratum SMW-3, concretely: Λ = 1, λ_LM⁰ = 10 (§5.8 boost/drop/ε/τ), ρ = 1 (a perfect
    model) whenever λ ≥ Λ: λ_t > boost·Λ + τ for the first 200 steps, so "for all t,
    λ_t ≤ boost·Λ + τ" is false; max(λ_0, boost·Λ + τ) holds throughout."""
    lam_lm, tau, Lam = 10.0, 1e-3, 1.0
    for t in range(400):
        lam = lam_lm + tau
        if t < 200:
            assert lam > 1.01 * Lam + tau
        assert lam <= max(10.0 + tau, 1.01 * Lam + tau)
        lam_lm = lm_update(lam_lm, 1.0 if lam >= Lam else -1.0)


# ------------------------------------------------------------------ the step
@given(problems(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_step_rho_is_55_and_lambda_follows_rule(pb, n2, seed):
    """The state's ρ is (5.5) on S₁ with the *undamped* model ``m(p) = Ψ + gᵀp + ½pᵀBp``
    (Lemma 11), recomputed here densely from the returned direction; the new
    ``λ_LM`` is the rule applied to that ρ and ``λ = λ_LM + τ``. Tolerance on ρ: the losses
    are evaluated by the same code on the same arrays (identical), the model reduction
    ``pred`` differs by ``C n eps (γ‖g‖‖p‖ + |gᵀp| + pᵀBp)`` (gradient rounding amplified
    by the cancellation factor γ, and the two ways of forming ``pᵀBp``)."""
    for cls, kw in _method_cases(pb):
        M, state, net, params, x, y, loss = _setup(pb, n2, cls, **kw)
        batch = Batch(x, y, loss)
        draws = M.draw(np.random.default_rng(seed), state, net, params, batch)
        x2, y2 = _s2(M, draws, x, y)
        B = _dense_B(M, net, params, x2, y2, loss)
        U1 = cv.per_sample_grads(net, params, x, y, loss)
        g = U1.mean(axis=0)
        for dense in (False, True):
            d, s = M.step(state, net, params, batch, rng=seed, dense=dense)
            p = rc.flatten(d)
            if not np.any(g):  # e.g. dead ReLUs without biases: p = 0, no information, λ kept
                assert not np.any(p) and np.isnan(s.diagnostics["rho"]) and s.damping_lm == 1.0
                continue
            f0 = float(net.loss(params, x, y, loss))
            f1 = float(net.loss([W + P for W, P in zip(params, d)], x, y, loss))
            pred = -g @ p - 0.5 * p @ B @ p
            rho = (f0 - f1) / pred
            slack = residual_tol(net.n_params + x.shape[0]) * (
                _gamma(U1) * np.linalg.norm(g) * np.linalg.norm(p) + abs(g @ p) + p @ B @ p)
            assert abs(s.diagnostics["rho"] - rho) <= abs(rho) * slack / pred + 1e-300, (M.name, dense)
            assert s.damping_lm == _expected_lm(1.0, s.diagnostics["rho"])
            assert s.damping == s.damping_lm + TAU
            assert s.damping_used == state.damping == s.diagnostics["damping"]
            assert s.k == 1 and s.diagnostics["accepted"] is True


@given(problems(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_direction_is_descent_and_lambda_stays_in_bounds(pb, n2, seed):
    """Three chained steps of each method: ``gᵀp < 0`` (``p = −G⁻¹g``, ``G ≻ 0``; thesis §5.2.2),
    ``λ_t ≥ τ`` and ``λ_LM`` within ``[λ⁰ drop^t, λ⁰ boost^t]``; the state is not mutated."""
    for cls, kw in _method_cases(pb):
        M, state, net, params, x, y, loss = _setup(pb, n2, cls, **kw)
        rng = np.random.default_rng(seed)
        for t in range(1, 4):
            before = repr(state)
            d, new = M.step(state, net, params, Batch(x, y, loss), rng=rng)
            assert repr(state) == before
            g = cv.grad(net, params, x, y, loss)
            assert g @ rc.flatten(d) < 0 or not np.any(g)
            assert new.damping >= M.damping_floor
            lo, hi = M.damping * M.drop**t, M.damping * M.boost**t
            assert lo * (1 - 8 * EPS) <= new.damping_lm <= hi * (1 + 8 * EPS)
            params = [W + 0.5 * D for W, D in zip(params, d)]
            state = new


def test_draw_s2_subset_of_s1():
    """Algorithm 23 line 3: ``S₂ ⊆ S₁`` of size ``N₂``, drawn once in ``draw()`` and shared by
    the two forms (same seed, same subset); ``n2 > N₁`` is refused naming ``n2``."""
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "mse", 10, 3)
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    M = SMWNG(n2=4)
    st0 = M.init(net, params)
    idx = M.draw(np.random.default_rng(5), st0, net, params, Batch(x, y, loss)).sketches["subset"]
    assert len(idx) == 4 and len(set(idx.tolist())) == 4 and idx.min() >= 0 and idx.max() < 10
    assert np.array_equal(idx, M.draw(np.random.default_rng(5), st0, net, params, Batch(x, y, loss)).sketches["subset"])
    assert np.array_equal(SMWNG().draw(np.random.default_rng(5), st0, net, params, Batch(x, y, loss)).sketches["subset"],
                          np.arange(10))
    # the direction depends on S₂ only through the subset drawn: reproduce it by hand
    d, _ = M.step(st0, net, params, Batch(x, y, loss), rng=5)
    B = cv.empirical_fisher(net, params, x[idx], y[idx], loss)
    g = cv.grad(net, params, x, y, loss)
    ref = -np.linalg.solve(B + st0.damping * np.eye(net.n_params), g)
    assert np.linalg.norm(rc.flatten(d) - ref) <= 1e-10 * np.linalg.norm(ref)
    with pytest.raises(HyperParameterError, match="n2"):
        SMWNG(n2=11).step(st0, net, params, Batch(x, y, loss), rng=0)


def test_theorem6_variant_never_increases_the_loss():
    """Theorem 6's variant (``N₁ = N``, ``α = 1``, a step taken only when ``ρ ≥ η``, ``0 < η < ε``):
    the full-data loss never increases — an accepted step has ``Ψ(θ) − Ψ(θ + p) ≥ η·pred > 0``
    (Lemma 11: ``pred ≥ λ‖p‖² > 0``) — and a small initial λ makes some steps rejected."""
    rng = np.random.default_rng(0)
    net = Sequential([Linear(3, 6), Tanh(), Linear(6, 2)])
    params = [3.0 * W for W in net.init(seed=2)]
    x = rng.standard_normal((16, 3))
    y = rng.standard_normal((16, 2))
    loss = MSE()
    for cls in (SMWGN, SMWNG, SMWNGBD):
        M = cls(damping=1e-4, accept_threshold=0.1, boost=3.0, drop=0.5)
        state, p = M.init(net, params), params
        losses, rejected = [float(net.loss(p, x, y, loss))], 0
        for _ in range(25):
            d, state = M.step(state, net, p, Batch(x, y, loss), rng=0)
            rejected += not state.diagnostics["accepted"]
            if not state.diagnostics["accepted"]:
                assert all(not np.any(D) for D in d) and state.diagnostics["rho"] < 0.1
            p = [W + D for W, D in zip(p, d)]
            losses.append(float(net.loss(p, x, y, loss)))
        assert all(b <= a for a, b in itertools.pairwise(losses)), cls.name
        assert rejected >= 1 and losses[-1] < 0.5 * losses[0], (cls.name, rejected, losses[-1] / losses[0])


# ------------------------------------------------------------------ hyper-parameters
_COMMON_BAD = [("damping", 0.0), ("damping", -1.0), ("damping", np.nan), ("boost", 1.0), ("boost", 0.5),
               ("drop", 1.0), ("drop", 0.0), ("drop", 1.5), ("lm_threshold", 0.0), ("lm_threshold", 0.5),
               ("lm_threshold", 0.7), ("lm_threshold", "0.25"), ("damping_floor", 0.0), ("damping_floor", -1e-3), ("n2", 0), ("n2", 2.5), ("n2", True),
               ("accept_threshold", 0.0), ("accept_threshold", 0.25), ("accept_threshold", 0.4)]


@pytest.mark.parametrize("cls,extra", [(SMWGN, [("form", "cholesky"), ("form", None)]),
                                       (SMWNG, [("fisher", "exact"), ("fisher", "sampled"), ("n_samples", 0),
                                                ("n_samples", 2)]),
                                       (SMWNGBD, [("fisher", "exact"), ("fisher", 1), ("n_samples", 1.5)])])
def test_bad_hyper_parameters(cls, extra):
    for arg, value in _COMMON_BAD + extra:
        with pytest.raises(HyperParameterError, match=arg):
            cls(**{arg: value})
    assert issubclass(cls, LMMethod)
    defaults = cls.hyper_parameters()
    assert (defaults["damping"], defaults["boost"], defaults["drop"], defaults["lm_threshold"],
            defaults["damping_floor"]) == (
        1.0, 1.01, 0.99, 0.25, 1e-3)  # thesis §5.8


def test_symmetric_form_refuses_singular_output_hessian():
    """(5.6) needs ``H⁻¹``; softmax CE's ``H_i = diag(p) − ppᵀ`` is singular (1 in its null space)."""
    pb = Problem((("linear", 3, 3, True),), (3,), 3, "cross_entropy", 4, 0)
    params, x, y = pb.data()
    M = SMWGN(form="symmetric")
    with pytest.raises(HyperParameterError, match="form"):
        M.step(M.init(pb.net, params), pb.net, params, Batch(x, y, pb.loss_fn), rng=0)


# ------------------------------------------------------------------ smoke
@pytest.mark.parametrize("cls", [SMWGN, SMWNG, SMWNGBD])
@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_smoke_training_decreases_loss(cls, loss_name):
    """Algorithm 23 with α = 1 (lr), N₁ = 32, N₂ = 16 on a seeded teacher problem: 20 steps cut
    the full-data loss to below a quarter of its initial value (first run: ≈ 1/20–1/6)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4))
    W = rng.standard_normal((4, 3))
    y, loss = (np.tanh(x @ W), MSE()) if loss_name == "mse" else (np.argmax(x @ W, axis=1), CrossEntropy())
    net = Sequential([Linear(4, 8), Tanh(), Linear(8, 3)])
    _, hist = train(cls(n2=16), net, net.init(seed=1), x, y, loss, steps=20, lr=1.0, batch_size=32, seed=0)
    assert hist["loss"][-1] < 0.25 * hist["loss"][0], hist["loss"]


# ------------------------------------------------------------------ typed state, draws, curvature


def test_reduction_ratio_kernel():
    """(5.5) with the undamped model: ``ρ = (f0 − f1)/(−gᵀp − ½pᵀBp)``; a non-finite trial loss
    gives −∞, a non-positive model reduction NaN (the LM rule then keeps λ)."""
    assert reduction_ratio(2.0, 1.0, -3.0, 2.0) == 1.0 / 2.0
    assert reduction_ratio(1.0, 1.5, -1.0, 1.0) == -1.0
    assert reduction_ratio(1.0, np.inf, -1.0, 1.0) == -np.inf
    assert reduction_ratio(1.0, np.nan, -1.0, 1.0) == -np.inf
    assert np.isnan(reduction_ratio(1.0, 1.0, 0.0, 0.0))
    assert np.isnan(reduction_ratio(1.0, 0.5, 1.0, 0.0))
    assert lm_update(2.0, reduction_ratio(1.0, 1.0, 0.0, 0.0)) == 2.0


def _tiny(loss_name="cross_entropy", N=6):
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 3, True)), (3,), 3, loss_name, N, 1)
    params, x, y = pb.data()
    return pb.net, params, Batch(x, y, pb.loss_fn)


@pytest.mark.parametrize("cls", [SMWGN, SMWNG, SMWNGBD, HessianFree])
def test_state_fields_and_diagnostics(cls):
    """One frozen state type per method (refused by the others), documented fields; λ of the
    next step, λ the last step used and λ_LM; diagnostics keys from the schema, the same in
    both forms."""
    net, params, batch = _tiny()
    M = cls(n2=4)
    s0 = M.init(net, params)
    assert isinstance(s0, LMState) and type(s0) is cls.State and cls.State is not LMState
    assert s0.damping_used is None and s0.damping == s0.damping_lm + M.damping_floor and s0.diagnostics == {}
    assert all(cls.State.field_docs().values())
    for dense in (False, True):
        d, s1 = M.step(s0, net, params, batch, rng=0, dense=dense)
        assert s1.damping_used == s0.damping == s1.diagnostics["damping"]
        assert s1.damping == s1.damping_lm + M.damping_floor
        assert set(s1.diagnostics) <= set(SCHEMA)
        want = {"damping", "rho", "accepted"} | ({"smw_form"} if cls is SMWGN else set()) | (
            {"cg_iters", "cg_residual", "cg_converged"} if cls is HessianFree else set())
        assert set(s1.diagnostics) == want
    for other in {SMWGN, SMWNG, SMWNGBD, HessianFree} - {cls}:
        with pytest.raises(StateError, match=other.name):
            other().step(s0, net, params, batch, rng=0)


@pytest.mark.parametrize("cls,kw", [(SMWGN, {}), (SMWNG, {}), (SMWNG, {"fisher": "mc", "n_samples": 3}),
                                    (SMWNGBD, {"fisher": "mc"}), (HessianFree, {})])
def test_draws_are_typed_and_shape_checked(cls, kw):
    """``sketches["subset"]``: N₂ distinct integer indices into S₁; ``labels`` ``(n_samples, N₂, …)``
    only for ``fisher="mc"``. Every violation is a DrawsError naming the method and the field."""
    net, params, batch = _tiny()
    M = cls(n2=4, **kw)
    s0 = M.init(net, params)
    draws = M.draw(np.random.default_rng(0), s0, net, params, batch)
    subset = draws.sketches["subset"]
    assert draws.method == M.name and subset.shape == (4,) and subset.dtype.kind == "i"
    mc = kw.get("fisher") == "mc"
    assert M.draw_fields == (("sketches", "labels") if mc else ("sketches",))
    if mc:
        assert draws.labels.shape == (kw.get("n_samples", 1), 4) and isinstance(draws.labels, np.ndarray)
    else:
        assert draws.labels is None

    def bad(**change):
        return dataclasses.replace(draws, **change)

    cases = [
        (bad(sketches={}), "sketches"),
        (bad(sketches={"S2": subset}), "subset"),
        (bad(sketches={"subset": subset[:3]}), "subset"),
        (bad(sketches={"subset": subset.astype(float)}), "subset"),
        (bad(sketches={"subset": np.array([0, 0, 1, 2])}), "subset"),
        (bad(sketches={"subset": np.array([0, 1, 2, 6])}), "subset"),
        (bad(sketches={"subset": subset[None]}), "subset"),
    ]
    if mc:
        cases += [(bad(labels=draws.labels[:, :3]), "labels"), (bad(labels=draws.labels[0]), "labels"),
                  (bad(labels=None), "labels")]
    else:
        cases += [(bad(labels=np.zeros((1, 4), dtype=int)), "labels")]
    for d, field in cases:
        with pytest.raises(DrawsError, match=rf"{M.name}.*{field}"):
            M.step(s0, net, params, batch, draws=d)


@pytest.mark.parametrize("cls", [SMWNG, SMWNGBD])
@pytest.mark.parametrize("dense", [False, True])
def test_injected_labels_are_consumed_exactly(cls, dense):
    """Labels drawn elsewhere (here: a permutation of classes nobody would sample) are the
    labels the Fisher is built from: the direction equals the dense solve with the empirical
    Fisher of those (input, label) pairs, and differs from the one with the method's own draws."""
    net, params, batch = _tiny(N=6)
    M = cls(fisher="mc", n_samples=2, n2=4)
    s0 = M.init(net, params)
    own = M.draw(np.random.default_rng(3), s0, net, params, batch)
    labels = (own.labels + 1) % 3
    d, s1 = M.step(s0, net, params, batch, draws=dataclasses.replace(own, labels=labels), dense=dense)
    idx = own.sketches["subset"]
    x2 = np.concatenate([batch.x[idx]] * 2)
    if cls is SMWNG:
        B = cv.empirical_fisher(net, params, x2, labels.reshape(-1), batch.loss)
    else:
        B = scipy.linalg.block_diag(*cv.empirical_fisher(net, params, x2, labels.reshape(-1), batch.loss, blocks=True))
    A = B + s0.damping * np.eye(net.n_params)
    g = cv.grad(net, params, batch.x, batch.y, batch.loss)
    ref = -np.linalg.solve(A, g)
    injected = dataclasses.replace(own, labels=labels)
    tol = forward_tol(net.n_params, np.linalg.cond(A)) if dense else _smw_tol(
        M, net, params, batch.x, batch.y, batch.loss, injected, s0.damping)
    assert np.linalg.norm(rc.flatten(d) - ref) <= tol * np.linalg.norm(ref)
    d_own, _ = M.step(s0, net, params, batch, draws=own, dense=dense)
    assert np.linalg.norm(rc.flatten(d_own) - ref) > 1e-6 * np.linalg.norm(ref)


@pytest.mark.parametrize("cls", [SMWNG, SMWNGBD])
def test_mc_fisher_curvature_is_the_sampled_fisher(cls):
    """With ``n2 = None`` the draws are the labels alone, drawn as
    :func:`refcurv.curvature.fisher` (``kind="mc"``) draws them: the curvature operator's
    ``B = C − λI`` equals ``cv.fisher(kind="mc", n_samples=S, seed)`` for the same seed (an
    independent construction: per-sample sampled-label gradients there, the draws here)."""
    net, params, batch = _tiny(N=5)
    M = cls(fisher="mc", n_samples=3)
    s0 = M.init(net, params)
    draws = M.draw(np.random.default_rng(11), s0, net, params, batch)
    _, s1 = M.step(s0, net, params, batch, draws=draws, dense=True)
    C = M.curvature(s1, net, params, batch, draws)
    F = cv.fisher(net, params, batch.x, loss=batch.loss, kind="mc", n_samples=3, seed=11,
                  blocks=cls is SMWNGBD)
    if cls is SMWNGBD:
        assert isinstance(C, BlockDiagonal)
        F = scipy.linalg.block_diag(*F)
    want = F + s1.damping_used * np.eye(net.n_params)
    assert np.linalg.norm(C.todense() - want) <= residual_tol(net.n_params) * np.linalg.norm(F)


@pytest.mark.parametrize("cls,kw", [(SMWGN, {"n2": 3}), (SMWGN, {"form": "general"}), (SMWNG, {"n2": 4}),
                                    (SMWNG, {"fisher": "mc", "n_samples": 2}), (SMWNGBD, {"n2": 5}),
                                    (HessianFree, {"n2": 4})])
@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_curvature_operator_reproduces_the_dense_direction(cls, kw, loss_name):
    """``C = curvature(new_state, net, params, batch, draws)`` is ``B + λI`` (5.4) with
    ``λ = new_state.damping_used`` (the λ both forms used; Dense, BlockDiagonal of per-layer
    Dense blocks for SMW-NG-BD) and ``−C⁻¹g`` is the dense direction (forward error), over
    three chained steps, for variants the contract test's defaults do not reach (``S₂ ⊊ S₁``,
    (5.7), sampled labels, MSE). The fast form equals the dense one by test_fast_equals_dense."""
    net, params, batch = _tiny(loss_name, N=6)
    M = cls(**kw)
    state, p = M.init(net, params), params
    for k in range(3):
        draws = M.draw(np.random.default_rng(k), state, net, p, batch)
        d_dense, new = M.step(state, net, p, batch, draws=draws, dense=True)
        _, new_fast = M.step(state, net, p, batch, draws=draws)
        C = M.curvature(new, net, p, batch, draws)
        assert isinstance(C, BlockDiagonal if cls is SMWNGBD else Dense)
        assert new.damping_used == new_fast.damping_used == state.damping
        g = cv.grad(net, p, batch.x, batch.y, batch.loss)
        ev = C.eigvalsh()
        assert ev.min() >= new.damping_used * (1 - 1e-12)
        got = -C.solve(g)
        want = rc.flatten(d_dense)
        assert np.linalg.norm(got - want) <= forward_tol(net.n_params, ev.max() / ev.min()) * np.linalg.norm(want)
        assert np.allclose(C.todense(), C.todense().T, rtol=0, atol=0)
        state, p = new, [W + 0.1 * D for W, D in zip(p, d_dense)]


def test_curvature_needs_the_steps_batch_and_a_stepped_state():
    """C is built from the step's mini-batch: each missing argument is named; the initial state
    (no step taken, ``damping_used`` None) and another method's state are refused."""
    net, params, batch = _tiny()
    M = SMWNG()
    s0 = M.init(net, params)
    draws = M.draw(np.random.default_rng(0), s0, net, params, batch)
    _, s1 = M.step(s0, net, params, batch, draws=draws)
    full = dict(net=net, params=params, batch=batch, draws=draws)
    for missing in full:
        with pytest.raises(ArgumentTypeError, match=missing):
            M.curvature(s1, **{k: v for k, v in full.items() if k != missing})
    with pytest.raises(StateError, match="damping_used"):
        M.curvature(s0, **full)
    with pytest.raises(StateError, match="smw_ng"):
        M.curvature(SMWGN().init(net, params), **full)
    with pytest.raises(DrawsError, match="smw_ng"):
        M.curvature(s1, net, params, batch, Draws(method="smw_gn", sketches=draws.sketches))
