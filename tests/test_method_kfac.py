"""KFAC (thesis 003 Algorithms 7 and 12): fast Kronecker form vs the dense damped Kronecker
solve, factor exactness, damping-split invariance, staleness, EMA, smoke training."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import HyperParameterError
from refcurv.methods.base import Batch
from refcurv.methods.kfac import KFAC, damped_factors
from refcurv.nn import CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.strategies import Problem, problems
from refcurv.testing.tolerance import EPS, assert_close, forward_tol
from refcurv.train import train


def _batch(pb, shift=0):
    params, x, y = pb.data()
    if shift:
        x = x + shift * np.random.default_rng(pb.seed + shift).standard_normal(x.shape)
    return params, Batch(x, y, pb.loss_fn)


@given(problems(), st.sampled_from(["pi", "sqrt"]), st.sampled_from(["expand", "reduce"]),
       st.sampled_from(["mc", "ggn", "empirical"]), st.floats(1e-4, 1.0), st.integers(1, 3),
       st.sampled_from([0.0, 0.9]))
def test_fast_equals_dense_kronecker_solve_step_by_step(pb, split, conv, fisher, lam, T_inv, mom):
    """Row-major: vec(H_Γ m H_Ω) = [(Γ + √λ/π I) ⊗ (Ω + π√λ I)]⁻¹ vec(m); forward error of the
    dense solve at C·n·eps·κ(Γ_d)κ(Ω_d)."""
    net = pb.net
    method = KFAC(damping=lam, split=split, conv=conv, fisher=fisher, T_inv=T_inv, momentum=mom, beta=0.5)
    params, _ = _batch(pb)
    state_f = state_d = method.init(net, params)
    for k in range(4):
        _, batch = _batch(pb, shift=k)
        df, state_f = method.step(state_f, net, params, batch, rng=k)
        dd, state_d = method.step(state_d, net, params, batch, rng=k, dense=True)
        for a, b, (Od, Gd) in zip(df, dd, state_d["damped"]):
            kappa = np.linalg.cond(Od) * np.linalg.cond(Gd)
            assert_close(a, b, rtol=forward_tol(a.size, kappa), atol=0, what=f"step {k}")


@given(problems(kind=st.just("mlp")))
def test_kronecker_identity_in_both_vec_orders(pb):
    """(H_Γ ⊗ H_Ω) vec_row(m) = vec_row(H_Γ m H_Ω) and (H_Ω ⊗ H_Γ) vec_col(m) = vec_col(H_Γ m H_Ω)
    (thesis (2.4) is the column-major statement)."""
    net = pb.net
    params, batch = _batch(pb)
    d, st_ = KFAC(fisher="ggn").step(KFAC(fisher="ggn").init(net, params), net, params, batch)
    for mi, di, (HO, HG), shape in zip(st_["m"], d, st_["inverses"], net.param_shapes):
        # two evaluation orders of the same products: error ≤ C·n·eps·‖H_Γ‖‖m‖‖H_Ω‖ (absolute;
        # relative to the result it can be large when H_Γ m H_Ω cancels)
        tol = 100 * mi.size * EPS * np.linalg.norm(HG, 2) * np.linalg.norm(mi) * np.linalg.norm(HO, 2)
        assert_close(np.kron(HG, HO) @ mi.ravel(), -di.ravel(), rtol=0, atol=tol)
        col = rc.to_order(mi.ravel(), [shape], "col")
        assert_close(np.kron(HO, HG) @ col, rc.to_order(-di.ravel(), [shape], "col"), rtol=0, atol=tol)


def _assert_factors_exact(pb):
    net = pb.net
    params, batch = _batch(pb)
    method = KFAC(fisher="ggn")
    _, state = method.step(method.init(net, params), net, params, batch)
    blocks = cv.ggn(net, params, batch.x, batch.y, pb.loss_fn, blocks=True)
    for (O, G), B in zip(state["factors"], blocks):
        assert_close(np.kron(G, O), B, rtol=1e-12, atol=1e-15)


@given(problems(kind=st.just("mlp"), max_batch=1))
def test_factors_exact_for_batch_of_one(pb):
    _assert_factors_exact(pb)


@given(st.integers(1, 3), st.integers(2, 6), st.integers(0, 2**31 - 1), st.data())
def test_factors_exact_for_deep_linear_mse(n_layers, N, seed, data):
    widths = [data.draw(st.integers(1, 5)) for _ in range(n_layers + 1)]
    spec = tuple(("linear", widths[i], widths[i + 1], data.draw(st.booleans())) for i in range(n_layers))
    _assert_factors_exact(Problem(spec, (widths[0],), widths[-1], "mse", N, seed))


@given(st.integers(1, 5), st.integers(1, 5), st.floats(1e-3, 1e3), st.floats(1e-4, 1.0), st.integers(0, 1000))
def test_pi_split_is_invariant_to_rescaling_the_factors(dA, dG, c, lam, seed):
    """With π from the traces (Alg. 12 line 19), (cΩ, Γ/c) gives the same damped Kronecker
    product — so the expand/KFC scaling conventions (which differ by T) give one direction."""
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((dA, dA + 2)), rng.standard_normal((dG, dG + 2))
    O, G = X @ X.T, Y @ Y.T
    O1, G1, _ = damped_factors(O, G, lam, "pi")
    O2, G2, _ = damped_factors(c * O, G / c, lam, "pi")
    assert_close(np.kron(G2, O2), np.kron(G1, O1), rtol=1e-12)


def test_staleness_ema_and_descent():
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    rng = np.random.default_rng(0)
    params = net.init(1)
    batches = [Batch(rng.standard_normal((5, 3)), rng.integers(0, 2, 5), CrossEntropy()) for _ in range(6)]
    method = KFAC(fisher="ggn", T_inv=3, beta=0.7)
    state = method.init(net, params)
    history = []
    for k, b in enumerate(batches):
        d, state = method.step(state, net, params, b)
        history.append(state)
        g = net.grad(params, b.x, b.y, b.loss)
        assert sum(float((gi * di).sum()) for gi, di in zip(g, d)) < 0  # descent (μ = 0)
    # EMA of the statistics: X_2 = β X_1 + (1 − β) X_batch2 (X_1 = first batch: warm start)
    F = [cv.kfac_factors(net, params, b.x, b.y, b.loss, kind="ggn") for b in batches[:2]]
    for (O, G), (O1, G1), (O2, G2) in zip(history[1]["factors"], F[0], F[1]):
        assert_close(O, 0.7 * O1 + 0.3 * O2, rtol=1e-13)
        assert_close(G, 0.7 * G1 + 0.3 * G2, rtol=1e-13)
    # inverses refreshed at k = 0, 1, 2 (k < T_inv) and 3 (k ≡ 0), reused at k = 4, 5
    same = lambda a, b: all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))  # noqa: E731
    assert not same(history[2]["inverses"], history[3]["inverses"])
    assert same(history[3]["inverses"], history[4]["inverses"]) and same(history[4]["inverses"], history[5]["inverses"])
    assert not same(history[3]["factors"], history[4]["factors"])


def test_bad_hyper_parameters():
    for kwargs, match in [({"damping": 0.0}, "damping"), ({"beta": 1.0}, "beta"), ({"T_inv": 0}, "T_inv"),
                          ({"split": "half"}, "split"), ({"conv": "sum"}, "conv"), ({"fisher": "true"}, "fisher"),
                          ({"n_samples": 0}, "n_samples"), ({"momentum": -0.1}, "momentum")]:
        with pytest.raises(HyperParameterError, match=match):
            KFAC(**kwargs)


def test_training_smoke_decreases_loss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    net = Sequential([Linear(4, 16), Tanh(), Linear(16, 3)])
    _, hist = train(KFAC(damping=1e-2, momentum=0.0), net, net.init(0), x, y, CrossEntropy(), steps=30, lr=0.2,
                    batch_size=32, seed=1)
    assert hist["loss"][-1] < 0.6 * hist["loss"][0]


def test_ngplus_13_kfac_row_with_factors_in_the_right_places():
    """NG+ (13)'s KFAC row, corrected (errata NG+-8): D = −G̃⁻¹ 𝐆 Ã⁻¹ with
    G̃ = √λI + (1/|S|)Σ g_i g_iᵀ (out×out) on the left and Ã = √λI + (1/|S|)Σ a_i a_iᵀ on the
    right — KFAC's first step with split="sqrt" (π = 1) and empirical-Fisher factors, written
    here from per-sample vectors."""
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    rng = np.random.default_rng(2)
    params = net.init(3)
    b = Batch(rng.standard_normal((7, 3)), rng.integers(0, 2, 7), CrossEntropy())
    lam = 0.3
    method = KFAC(damping=lam, split="sqrt", fisher="empirical")
    d, _ = method.step(method.init(net, params), net, params, b)
    A, G = net.factors(params, b.x, b.y, b.loss)
    grads = net.grad(params, b.x, b.y, b.loss)
    for a, g, gr, di in zip(A, G, grads, d):
        a, g = a[..., 0], g[..., 0]
        At = np.sqrt(lam) * np.eye(a.shape[1]) + a.T @ a / len(a)
        Gt = np.sqrt(lam) * np.eye(g.shape[1]) + g.T @ g / len(g)
        assert_close(di, -np.linalg.solve(Gt, gr) @ np.linalg.inv(At), rtol=1e-10)


@given(problems(kind=st.just("cnn")))
def test_conv_factors_follow_the_kfc_convention(pb):
    """Algorithm 12 line 2/14 (thesis (3.9)): Ω = (1/N)Σ_n Σ_t a aᵀ (sum over locations) and
    Γ = (1/N)Σ_n (1/T)Σ_t Dh Dhᵀ (mean over locations), written here with explicit loops
    (empirical Fisher, so Dh is the data-label pre-activation gradient)."""
    net = pb.net
    params, batch = _batch(pb)
    method = KFAC(fisher="empirical")
    _, state = method.step(method.init(net, params), net, params, batch)
    A, G = net.factors(params, batch.x, batch.y, batch.loss)
    for (O, Gm), a, g in zip(state["factors"], A, G):
        N, d, T = a.shape
        Oref, Gref = np.zeros((d, d)), np.zeros((g.shape[1],) * 2)
        for n in range(N):
            for t in range(T):
                Oref += np.outer(a[n, :, t], a[n, :, t]) / N
                Gref += np.outer(g[n, :, t], g[n, :, t]) / (N * T)
        assert_close(O, Oref, rtol=1e-13)
        assert_close(Gm, Gref, rtol=1e-13, atol=1e-16)
