"""Hessian-free: CG on GGN-vector products with LM damping ([Ren-thesis], §5.1.2, §5.7,
LM rule §5.2.3 / (5.5); design §4 row "Hessian-free": converges to the dense solve).

Tolerances
----------
* GGN-vector product ``B v = (1/N₂) Σ J_iᵀ H_i J_i v`` (forward pass, ``loss.hvp``, backward
  pass; :class:`refcurv.curvature.GGNOperator`, tested on its own in
  tests/test_curvature_grams.py) vs the dense ``B`` from per-sample Jacobians: each is a sum
  of products of the same exact quantities in another order, so
  ``‖ΔBv‖ ≤ C (n + m) eps (‖J‖_F² ‖H‖ / N₂) ‖v‖`` (``m = N₂C``).
* CG (``A = B + λI``, ``b = −g``, ``x₀ = 0``). CG stops on its *recursive* residual
  ``‖r_k‖ ≤ tol‖b‖``. In floating point the true residual drifts from the recursive one by at
  most ``c k eps (‖b‖ + ‖A‖ max_j ‖x_j‖)`` (Greenbaum 1997, "Estimating the attainable
  accuracy of recursive residual methods"), and ``‖x_j‖`` increases monotonically for CG
  from ``x₀ = 0`` (Hestenes & Stiefel 1952, Thm 6:3), so ``max_j ‖x_j‖ = ‖x_k‖``. The operator
  and right-hand side CG sees differ from the dense ones by the product error above and
  by the gradient rounding ``c n eps γ ‖g‖`` (``γ = mean_i‖u_i‖/‖g‖``, the cancellation factor
  of a mean of per-sample gradients). Hence the true residual of the returned ``p``

      ‖A p + g‖ ≤ tol‖g‖ + C (n + m + k) eps (γ‖g‖ + (‖A‖ + ‖J‖_F²‖H‖/N₂) ‖p‖),

  and the forward error ``‖p − p*‖ ≤ ‖A⁻¹‖ · (that) = (that)/λ_min(A)``.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import HyperParameterError
from refcurv.methods.base import Batch
from refcurv.methods.hessian_free import HessianFree, HessianFreeState, conjugate_gradient
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.strategies import Problem, dampings, problems
from refcurv.testing.tolerance import residual_tol
from refcurv.train import train


def _gamma(U):
    g = U.mean(axis=0)
    num = np.linalg.norm(U, axis=1).mean()
    return 1.0 if num == 0 else num / max(np.linalg.norm(g), 1e-300)


def _dense_parts(net, params, x, y, loss, idx):
    """Dense float64 ``B`` (GGN on S₂), ``‖J‖_F² ‖H‖ / N₂``, per-sample grads on S₁."""
    x2, y2 = x[idx], y[idx]
    B = cv.ggn(net, params, x2, y2, loss)
    J = cv.jacobian(net, params, x2)
    H = loss.hessian(net.forward(params, x2))
    jh = np.linalg.norm(J) ** 2 * max(np.linalg.norm(Hi, 2) for Hi in H) / len(idx)
    return B, jh, cv.per_sample_grads(net, params, x, y, loss)


@given(problems(), dampings(-2, 1), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_cg_converges_to_dense_solve(pb, lam, n2, seed):
    """With enough iterations (tol = 1e-10, ``max_iter`` = 2000) CG's ``p`` solves the dense
    ``(B + λI) p = −g``: true residual and forward error within the bounds of the module
    docstring; the fast and dense forms then agree."""
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    n2 = min(n2, x.shape[0])
    M = HessianFree(damping=lam / 2, damping_floor=lam / 2, n2=n2, cg_max_iter=2000, cg_tol=1e-10)
    state = M.init(net, params)
    batch = Batch(x, y, loss)
    d, s = M.step(state, net, params, batch, rng=seed)
    d_dense, s_dense = M.step(state, net, params, batch, rng=seed, dense=True)
    dg = s.diagnostics
    assert dg["cg_converged"] and dg["cg_residual"] <= 1e-10 and 0 <= dg["cg_iters"] <= 2000
    assert type(s) is type(s_dense) is HessianFreeState and set(dg) == set(s_dense.diagnostics)
    idx = M.draw(np.random.default_rng(seed), state, net, params, batch).sketches["subset"]
    B, jh, U1 = _dense_parts(net, params, x, y, loss, idx)
    lam = state.damping
    A = B + lam * np.eye(net.n_params)
    g = U1.mean(axis=0)
    p = rc.flatten(d)
    res_bound = 1e-10 * np.linalg.norm(g) + residual_tol(net.n_params + n2 * pb.n_out + dg["cg_iters"]) * (
        _gamma(U1) * np.linalg.norm(g) + (np.linalg.norm(A, 2) + jh) * np.linalg.norm(p))
    assert np.linalg.norm(A @ p + g) <= res_bound
    p_star = rc.flatten(d_dense)
    assert np.linalg.norm(p - p_star) <= res_bound / np.linalg.eigvalsh(A)[0]


def test_cg_terminates_in_number_of_distinct_eigenvalues():
    """CG terminates (exact arithmetic) after as many iterations as ``A = B + λI`` has distinct
    eigenvalues with a component of ``g``: ``rank(B)`` ones ``> λ`` plus ``λ`` itself if ``g``
    leaves ``range(B)``. ``rank(B) = N₂C`` for MSE/BCE (``H_i ≻ 0``), ``N₂(C − 1)`` for softmax
    CE (``H_i 1 = 0``). With ``S₂ = S₁``, ``g = (1/N) Jᵀ ∇_fℓ ∈ range(B)`` (for CE because
    ``∇_fℓ = p − e_y ⊥ 1``): at most ``rank(B)`` iterations; with ``S₂ ⊊ S₁``: ``rank(B) + 1``.
    Seeded and well conditioned (λ ≈ 1) so that rounding does not delay termination. The
    bound is attained for MSE and CE here (well separated spectra); for BCE, small ``σ'``
    put eigenvalues of ``B + λI`` within the tolerance of λ and CG stops earlier."""
    for loss_name, C_eff in (("mse", 3), ("bce", 3), ("cross_entropy", 2)):
        pb = Problem((("linear", 3, 6, True), ("act", "tanh"), ("linear", 6, 3, True)), (3,), 3, loss_name, 5, 11)
        params, x, y = pb.data()
        net, loss = pb.net, pb.loss_fn
        for n2, extra in ((5, 0), (3, 1)):
            M = HessianFree(n2=n2, cg_max_iter=500, cg_tol=1e-12)
            state = M.init(net, params)
            idx = M.draw(np.random.default_rng(0), state, net, params, Batch(x, y, loss)).sketches["subset"]
            B = cv.ggn(net, params, x[idx], y[idx], loss)
            assert np.linalg.matrix_rank(B) == n2 * C_eff
            _, s = M.step(state, net, params, Batch(x, y, loss), rng=0)
            s = s.diagnostics
            assert s["cg_converged"] and s["cg_iters"] <= n2 * C_eff + extra, (loss_name, n2, s["cg_iters"])
            if loss_name != "bce":
                assert s["cg_iters"] == n2 * C_eff + extra, (loss_name, n2, s["cg_iters"])


@given(problems(), st.integers(0, 2**31 - 1))
def test_one_cg_iteration_is_the_cauchy_step(pb, seed):
    """``max_iter = 1``: ``p₁ = −(gᵀg / gᵀ(B + λI)g) g``, the minimizer of the damped model along
    ``−g`` (a fixed formula, checked to ``C n eps κ``-free relative accuracy: only sums)."""
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    M = HessianFree(cg_max_iter=1, cg_tol=0.0)
    state = M.init(net, params)
    d, s = M.step(state, net, params, Batch(x, y, loss), rng=seed)
    s = s.diagnostics
    B, jh, U1 = _dense_parts(net, params, x, y, loss, np.arange(x.shape[0]))
    g = U1.mean(axis=0)
    if not np.any(g):  # e.g. dead ReLUs without biases: CG returns p = 0 after 0 iterations
        assert s["cg_iters"] == 0 and not np.any(rc.flatten(d))
        return
    gAg = g @ B @ g + state.damping * g @ g
    ref = -(g @ g) / gAg * g
    tol = residual_tol(net.n_params + x.shape[0] * pb.n_out) * (
        _gamma(U1) + (jh + state.damping) * (g @ g) / gAg)
    assert s["cg_iters"] == 1
    assert np.linalg.norm(rc.flatten(d) - ref) <= tol * np.linalg.norm(ref) + 1e-300


@given(problems(), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_every_cg_iterate_is_a_descent_direction(pb, max_iter, n2, seed):
    """Truncated CG from ``p₀ = 0``: ``gᵀp_k < 0`` for any ``k ≥ 1`` (``p_k`` minimizes the damped
    model over the Krylov space containing ``−g``); λ stays ≥ τ over chained steps; the state
    is not mutated."""
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    M = HessianFree(cg_max_iter=max_iter, cg_tol=0.0, n2=min(n2, x.shape[0]))
    state = M.init(net, params)
    rng = np.random.default_rng(seed)
    for t in range(1, 4):
        before = repr(state)
        d, new = M.step(state, net, params, Batch(x, y, loss), rng=rng)
        assert repr(state) == before
        g = cv.grad(net, params, x, y, loss)
        assert g @ rc.flatten(d) < 0 or not np.any(g)
        assert new.damping >= M.damping_floor and new.diagnostics["cg_iters"] <= max_iter
        params = [W + 0.5 * D for W, D in zip(params, d)]
        state = new


@given(problems(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_step_rho_is_55_and_lambda_follows_rule(pb, n2, seed):
    """ρ in the state is (5.5) with the undamped GGN model (Lemma 11), recomputed densely from
    the returned (truncated-CG) direction; then the §5.2.3 rule with §5.8's defaults and
    ``λ = λ_LM + τ``. Tolerance on ρ as in test_method_smw (``pred`` formed two ways)."""
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    M = HessianFree(cg_max_iter=3, n2=min(n2, x.shape[0]))
    state = M.init(net, params)
    batch = Batch(x, y, loss)
    idx = M.draw(np.random.default_rng(seed), state, net, params, batch).sketches["subset"]
    B, jh, U1 = _dense_parts(net, params, x, y, loss, idx)
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
        slack = residual_tol(net.n_params + x.shape[0] * pb.n_out) * (
            _gamma(U1) * np.linalg.norm(g) * np.linalg.norm(p) + abs(g @ p) + (p @ B @ p + jh * p @ p))
        r = s.diagnostics["rho"]
        assert abs(r - rho) <= abs(rho) * slack / pred + 1e-300
        want = 1.01 if r < 0.25 else 0.99 if r > 0.75 else 1.0
        assert s.damping_lm == want and s.damping == want + 1e-3 and s.damping_used == state.damping


def test_conjugate_gradient_kernel():
    """The CG kernel alone on a constructed SPD matrix (κ = 100, distinct eigenvalues 1…100):
    converges to ``A⁻¹b`` within ``κ · tol``; ``b = 0`` returns 0 in 0 iterations; ``max_iter``
    is respected and reported as not converged."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    A = (Q * np.linspace(1, 100, 30)) @ Q.T
    b = rng.standard_normal(30)
    x, k, res, conv = conjugate_gradient(lambda v: A @ v, b, 200, 1e-12)
    assert conv and res <= 1e-12 and k <= 200
    ref = np.linalg.solve(A, b)
    assert np.linalg.norm(x - ref) <= 100 * (1e-12 + residual_tol(30 + k) * 100) * np.linalg.norm(ref)
    assert conjugate_gradient(lambda v: A @ v, 0 * b, 10, 1e-6)[1:] == (0, 0.0, True)
    _, k3, res3, conv3 = conjugate_gradient(lambda v: A @ v, b, 3, 0.0)
    assert k3 == 3 and not conv3 and res3 > 0


@pytest.mark.parametrize("arg,value", [("cg_max_iter", 0), ("cg_max_iter", 1.5), ("cg_max_iter", True),
                                       ("cg_max_iter", -3), ("cg_tol", -1e-6), ("cg_tol", np.nan),
                                       ("cg_tol", np.inf), ("cg_tol", "1e-6"), ("cg_tol", True), ("damping", 0.0),
                                       ("boost", 0.9), ("drop", 1.01), ("lm_threshold", 0.5),
                                       ("damping_floor", 0.0), ("n2", 0), ("accept_threshold", 0.3)])
def test_bad_hyper_parameters(arg, value):
    with pytest.raises(HyperParameterError, match=arg):
        HessianFree(**{arg: value})


def test_defaults():
    hp = HessianFree.hyper_parameters()
    assert (hp["damping"], hp["boost"], hp["drop"], hp["lm_threshold"], hp["damping_floor"]) == (
        1.0, 1.01, 0.99, 0.25, 1e-3)
    assert hp["cg_max_iter"] == 100 and hp["cg_tol"] == 1e-5


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_smoke_training_decreases_loss(loss_name):
    """Seeded teacher problem, N₁ = 32, N₂ = 16, 20 CG iterations per step, lr = 1: the
    full-data loss drops below a quarter of its initial value in 20 steps."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4))
    W = rng.standard_normal((4, 3))
    y, loss = (np.tanh(x @ W), MSE()) if loss_name == "mse" else (np.argmax(x @ W, axis=1), CrossEntropy())
    net = Sequential([Linear(4, 8), Tanh(), Linear(8, 3)])
    M = HessianFree(n2=16, cg_max_iter=20)
    _, hist = train(M, net, net.init(seed=1), x, y, loss, steps=20, lr=1.0, batch_size=32, seed=0)
    assert hist["loss"][-1] < 0.25 * hist["loss"][0], hist["loss"]
