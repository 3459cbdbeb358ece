"""QNG ([QNG-Ginger] §2.2, (7)–(13), Observation 1): the untruncated product equals the
exact EMA (7), Observation 1 (rank and PSD), fast (Sherman–Morrison, O(dτ)) = dense (explicit
product, LU/Cholesky) step by step with truncation, the method on MLPs and CNNs in both block
layouts, d_t from sampled labels (8), hyper-parameter checks, smoke training.

Tolerance model (refcurv.testing.tolerance): a forward error of a solve with G (or with Â,
κ(Â)² = κ(G)) is at most C·n·eps·κ(G) relative. Over t updates each step adds such an error
(earlier errors are carried by later factors, whose product's conditioning is again bounded by
κ(G) — we take the worst κ over the history), hence ``forward_tol(n·t, κ_max)`` for G; a
relative perturbation δ of G moves G⁻¹g by at most κ(G)·δ, hence ``κ_max²`` for directions of
two independently propagated states.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv import flatten
from refcurv.errors import ArgumentTypeError, DrawsError, HyperParameterError
from refcurv.linalg.ema import ema_matrix, qng_A, qng_beta, qng_G, qng_solve_dense, qng_update_dense
from refcurv.methods.base import Batch, Draws
from refcurv.methods.qng import (
    QNG,
    ProductForm,
    QNGState,
    apply_A,
    apply_A_inv,
    apply_At,
    apply_At_inv,
    factor_apply,
    factor_solve,
    solve,
    update,
)
from refcurv.operators import BlockDiagonal
from refcurv.nn import Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing.strategies import problems
from refcurv.testing.tolerance import EPS, assert_close, forward_tol
from refcurv.train import train

alphas = st.floats(0.2, 0.99)


def _ds(seed, T, n):
    """T vectors in R^n with norms spread over 10^{[-1, 1]} (κ(G) stays ≲ 1e8 for α ≥ 0.2)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, n)) * 10 ** rng.uniform(-1, 1, (T, 1))


def _K(alpha, q, b):
    return math.sqrt(alpha) * np.eye(q.size) + b * np.outer(q, q)


# ------------------------------------------------------------------ (7), (9), (10)
@given(st.integers(1, 8), alphas, st.integers(20, 26), st.integers(0, 2**31 - 1))
def test_untruncated_product_equals_exact_ema(n, alpha, T, seed):
    """τ = None: A_{t+1} A_{t+1}ᵀ = G_t of (7) from G_0 = I for t = 1..T (T ≥ 20), for the fast
    (Sherman–Morrison) and the dense (LU) q; also G_0 = A_1 A_1ᵀ = I."""
    ds = _ds(seed, T, n)
    s_f = s_d = ((), ())
    assert np.array_equal(qng_G(*s_f, alpha, n), np.eye(n))
    G, kmax = np.eye(n), 1.0
    for t in range(T):
        s_f, s_d = update(*s_f, ds[t], alpha), qng_update_dense(*s_d, ds[t], alpha)
        G = alpha * G + (1 - alpha) * np.outer(ds[t], ds[t])
        kmax = max(kmax, np.linalg.cond(G))
        tol = forward_tol(n * (t + 1), kmax)
        assert len(s_f[0]) == len(s_f[1]) == len(s_d[0]) == t + 1
        assert_close(qng_G(*s_f, alpha, n), G, rtol=tol, atol=0, what=f"fast t={t + 1}")
        assert_close(qng_G(*s_d, alpha, n), G, rtol=tol, atol=0, what=f"dense t={t + 1}")
    assert_close(ema_matrix(ds, alpha), G, rtol=1e-14, atol=0)


@given(st.integers(1, 6), alphas, st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_truncation_11_keeps_the_last_tau_factors(n, alpha, tau, seed):
    """(11) written out in the test: Â_t = K̂_{t−τ} ⋯ K̂_{t−1} (explicit matrices of the last τ
    factors), q̂_t = Â_t⁻¹ d_t, β_t from (10); the kernel stores exactly those τ newest (q̂, β)."""
    T = tau + 5
    ds = _ds(seed, T, n)
    Ks, qs, s = [], [], ((), ())
    for t in range(T):
        A = np.eye(n)
        for K in Ks[-tau:]:
            A = A @ K
        q = np.linalg.solve(A, ds[t])
        b = (math.sqrt(alpha + (1 - alpha) * (q @ q)) - math.sqrt(alpha)) / (q @ q)
        Ks.append(_K(alpha, q, b))
        qs.append(q)
        s = update(*s, ds[t], alpha, tau)
        A_next = np.eye(n)
        for K in Ks[-tau:]:
            A_next = A_next @ K
        kappa = np.linalg.cond(A_next) ** 2
        assert len(s[0]) == len(s[1]) == min(tau, t + 1)
        for qk, qe in zip(s[0], qs[-tau:]):
            assert_close(qk, qe, rtol=forward_tol(n * (t + 1), kappa), atol=0)
        assert_close(qng_G(*s, alpha, n), A_next @ A_next.T, rtol=forward_tol(n * (t + 1), kappa), atol=0)


# ------------------------------------------------------------------ Observation 1
@given(st.integers(1, 4), st.data(), alphas, st.integers(0, 2**31 - 1))
def test_observation_1_rank_and_psd(tau, data, alpha, seed):
    """Ĝ_t − α^{min(τ,t)} I is PSD with numerical rank ≤ min(τ, t) ≤ 2 min(τ, t) (Observation 1;
    the tighter bound: errata QNG-3), for t = 1 .. τ + 6 (truncation active after t = τ).

    PSD: each factor K = √α I + β q qᵀ is symmetric with eigenvalues √α and √(α + (1−α)‖q‖²) ≥ √α,
    so σ_min(Â) ≥ Π σ_min(K_j) ≥ α^{m/2} (m = min(τ, t) factors) and Â Âᵀ ⪰ α^m I.
    Rank: Â − α^{m/2} I and Âᵀ − α^{m/2} I both have column space in span{q_j}.

    Rounding: Ĝ is formed as a product of m explicit factors, absolute error ≤ C·n·(m+1)·eps·
    Π‖K_j‖² (‖K_j‖ = √(α + (1−α)‖q_j‖²)); singular values (and eigenvalues) of the computed
    difference are within that of the exact ones, so that is the threshold."""
    n = data.draw(st.integers(2 * tau + 1, 12))
    T = tau + 6
    ds = _ds(seed, T, n)
    s = ((), ())
    for t in range(1, T + 1):
        s = update(*s, ds[t - 1], alpha, tau)
        m = min(tau, t)
        assert len(s[0]) == m
        D = qng_G(*s, alpha, n) - alpha**m * np.eye(n)
        norm_prod = np.prod([alpha + (1 - alpha) * float(q @ q) for q in s[0]])
        thr = 100 * n * (m + 1) * EPS * norm_prod
        sv = np.linalg.svd(D, compute_uv=False)
        rank = int((sv > thr).sum())
        assert rank <= m <= 2 * m, (t, rank, sv)
        assert np.linalg.eigvalsh(D).min() >= -thr


def test_observation_1_rank_min_tau_t_is_attained():
    """Generic d_t: the rank is exactly min(τ, t) (so the tighter bound is tight), well above
    the rounding threshold of test_observation_1_rank_and_psd."""
    alpha, tau, n = 0.7, 3, 10
    ds = _ds(5, 8, n)
    s = ((), ())
    for t in range(1, 9):
        s = update(*s, ds[t - 1], alpha, tau)
        m = min(tau, t)
        sv = np.linalg.svd(qng_G(*s, alpha, n) - alpha**m * np.eye(n), compute_uv=False)
        thr = 100 * n * (m + 1) * EPS * np.prod([alpha + (1 - alpha) * float(q @ q) for q in s[0]])
        assert sv[m - 1] > 1e6 * thr and sv[m] <= thr, (t, sv, thr)


def test_13_product_of_two_factors():
    """(13) with the lost transpose restored (errata QNG-2): K_1 K_2 = αI + q_1(√αβ_1 q_1 +
    β_1β_2 (q_1ᵀq_2) q_2)ᵀ + √αβ_2 q_2 q_2ᵀ."""
    rng = np.random.default_rng(0)
    alpha, q1, q2 = 0.6, rng.standard_normal(5), rng.standard_normal(5)
    b1, b2 = qng_beta(alpha, q1 @ q1), qng_beta(alpha, q2 @ q2)
    r = math.sqrt(alpha)
    rhs = alpha * np.eye(5) + np.outer(q1, r * b1 * q1 + b1 * b2 * (q1 @ q2) * q2) + r * b2 * np.outer(q2, q2)
    assert_close(_K(alpha, q1, b1) @ _K(alpha, q2, b2), rhs, rtol=1e-14, atol=0)


# ------------------------------------------------------------------ fast vs dense kernels
@given(st.integers(1, 8), alphas, st.integers(1, 4), st.integers(20, 24), st.integers(0, 2**31 - 1))
def test_fast_equals_dense_step_by_step_with_truncation(n, alpha, tau, T, seed):
    """For ≥ 20 steps with τ < T: (a) from the same state, the fast q̂_t (Sherman–Morrison) equals
    the dense one (LU on the explicit Â_t) — forward error ≤ C·n·(m+1)·eps·Π κ(K_j) — and the
    fast direction −Â⁻ᵀÂ⁻¹g equals the Cholesky solve with Â Âᵀ; (b) two independently
    propagated trajectories give the same Ĝ_t and directions (tolerances in the module doc)."""
    ds = _ds(seed, T, n)
    gs = np.random.default_rng(seed + 1).standard_normal((T, n))
    s_f, s_d, kmax = ((), ()), ((), ()), 1.0
    for t in range(T):
        m = len(s_f[0])
        prod_kappa = np.prod([math.sqrt(1 + (1 - alpha) * float(q @ q) / alpha) for q in s_f[0]])
        one_f, one_d = update(*s_f, ds[t], alpha, tau), qng_update_dense(*s_f, ds[t], alpha, tau)
        qf, bf, qd, bd = one_f[0][-1], one_f[1][-1], one_d[0][-1], one_d[1][-1]
        assert_close(qf, qd, rtol=forward_tol(n * (m + 1), prod_kappa), atol=0, what=f"q t={t + 1}")
        assert abs(bf - bd) <= 2 * forward_tol(n * (m + 1), prod_kappa) * bd
        assert all(a is b for a, b in zip(one_f[0][:-1], one_d[0][:-1]))
        kG = np.linalg.cond(qng_G(*one_f, alpha, n))
        assert_close(solve(*one_f, gs[t], alpha), qng_solve_dense(*one_f, gs[t], alpha),
                     rtol=forward_tol(n * (m + 2), kG), atol=0, what=f"direction t={t + 1}")
        # (b) independent trajectories
        s_f, s_d = one_f, qng_update_dense(*s_d, ds[t], alpha, tau)
        assert len(s_f[0]) == len(s_d[0]) == min(tau, t + 1)
        Gd = qng_G(*s_d, alpha, n)
        kmax = max(kmax, np.linalg.cond(Gd))
        assert_close(qng_G(*s_f, alpha, n), Gd, rtol=forward_tol(n * (t + 1), kmax), atol=0)
        assert_close(solve(*s_f, gs[t], alpha), qng_solve_dense(*s_d, gs[t], alpha),
                     rtol=forward_tol(n * (t + 1), kmax**2), atol=0)


@given(st.integers(1, 8), alphas, st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_sherman_morrison_factor_inverses_equal_dense_inverses(n, alpha, m, seed):
    """K⁻¹ by Sherman–Morrison = inv(K) (forward error C·n·eps·κ(K)); Â, Âᵀ, Â⁻¹, Â⁻ᵀ applied
    factor by factor (to the identity: the explicit matrices) = the dense product, its transpose
    and inverses (relative error ≤ C·n·(m+1)·eps·Π κ(K_j), the product's amplification)."""
    ds = _ds(seed, max(m, 1), n)
    s = ((), ())
    for t in range(m):
        s = update(*s, ds[t], alpha, None)
    I = np.eye(n)
    for q, b in zip(*s):
        K = _K(alpha, q, b)
        kK = math.sqrt(1 + (1 - alpha) * float(q @ q) / alpha)
        assert_close(factor_solve(alpha, q, b, I), np.linalg.inv(K), rtol=forward_tol(n, kK), atol=0)
        assert_close(factor_apply(alpha, q, b, I), K, rtol=100 * n * EPS, atol=0)
        v = ds[0]
        assert_close(factor_solve(alpha, q, b, v), np.linalg.solve(K, v), rtol=forward_tol(n, kK), atol=0)
    A = qng_A(*s, alpha, n)
    pk = np.prod([math.sqrt(1 + (1 - alpha) * float(q @ q) / alpha) for q in s[0]])
    tol = forward_tol(n * (m + 1), pk)
    assert_close(apply_A(*s, I, alpha), A, rtol=tol, atol=0)
    assert_close(apply_At(*s, I, alpha), A.T, rtol=tol, atol=0)
    assert_close(apply_A_inv(*s, I, alpha), np.linalg.inv(A), rtol=tol, atol=0)
    assert_close(apply_At_inv(*s, I, alpha), np.linalg.inv(A.T), rtol=tol, atol=0)
    assert_close(apply_A_inv(*s, apply_A(*s, ds[0], alpha), alpha), ds[0], rtol=tol, atol=0)


def test_kernels_are_pure_and_check_arguments():
    q0, b0 = (), ()
    d = np.arange(1.0, 4.0)
    q1, b1 = update(q0, b0, d, 0.5, 2)
    assert q0 == () and b0 == () and len(q1) == len(b1) == 1
    assert np.array_equal(q1[0], d)  # A_1 = I: q_1 = d_1
    assert np.array_equal(d, np.arange(1.0, 4.0))
    for bad in [dict(alpha=1.0, tau=2), dict(alpha=0.0, tau=2), dict(alpha=0.5, tau=0), dict(alpha=0.5, tau=1.5)]:
        with pytest.raises(HyperParameterError):
            update(q0, b0, d, **bad)
        with pytest.raises(HyperParameterError):
            qng_update_dense(q0, b0, d, **bad)


# ------------------------------------------------------------------ the method
def _batches(pb, steps):
    params, x, y = pb.data()
    rng = np.random.default_rng(pb.seed + 7)
    return params, [Batch(x + 0.3 * k * rng.standard_normal(x.shape), y, pb.loss_fn) for k in range(steps)]


def _blocks_of(vs, blocks, net):
    """Per-layer matrices split into the blocks, written out by hand (bias = last column)."""
    if blocks == "full":
        return [np.concatenate([v.ravel() for v in vs])]
    if blocks == "layer":
        return [v.ravel() for v in vs]
    return [part for v, layer in zip(vs, net.layers_trainable)
            for part in ((v[:, :-1].ravel(), v[:, -1]) if layer.bias else (v.ravel(),))]


@given(problems(), st.sampled_from(["full", "layer", "tensor"]), st.floats(0.3, 0.95), st.sampled_from([1, 2, None]))
def test_method_fast_equals_dense_mlp_and_cnn(pb, blocks, alpha, rank):
    """Independent fast and dense trajectories over 4 steps (same draws): same factors' Ĝ per
    block, same directions (tolerances of the module doc, κ of each block's Ĝ)."""
    net = pb.net
    method = QNG(beta=alpha, rank=rank, blocks=blocks)
    params, batches = _batches(pb, 4)
    s_f = s_d = method.init(net, params)
    kmax = [1.0] * method.n_blocks(net)
    for k, b in enumerate(batches):
        df, s_f = method.step(s_f, net, params, b, rng=k)
        dd, s_d = method.step(s_d, net, params, b, rng=k, dense=True)
        assert s_f.k == s_d.k == k + 1 and [x.shape for x in df] == net.param_shapes
        assert type(s_f) is type(s_d) is QNGState
        pieces_f, pieces_d = _blocks_of(df, blocks, net), _blocks_of(dd, blocks, net)
        blocks_f, blocks_d = zip(s_f.q, s_f.beta_t), zip(s_d.q, s_d.beta_t)
        for i, (bf, bd, a, c) in enumerate(zip(blocks_f, blocks_d, pieces_f, pieces_d)):
            n = a.size
            Gd = qng_G(*bd, alpha, n)
            kmax[i] = max(kmax[i], np.linalg.cond(Gd))
            assert_close(qng_G(*bf, alpha, n), Gd, rtol=forward_tol(n * (k + 1), kmax[i]), atol=0)
            assert_close(a.ravel(), c.ravel(), rtol=forward_tol(n * (k + 1), kmax[i] ** 2), atol=0,
                         what=f"step {k} block {i}")


NETS = {
    "mlp": (Sequential([Linear(3, 4), Tanh(), Linear(4, 3)]), (5, 3)),
    "cnn": (Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)]), (5, 1, 3, 3)),
}


@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("blocks", ["full", "layer", "tensor"])
def test_method_d_t_from_sampled_labels_and_untruncated_direction_is_ema_natural_gradient(kind, blocks):
    """d_t (8) = −(1/√N) Σ ∇ψ_i(ŷ_i) = −√N ∇Ψ(ŷ) with ŷ the labels drawn from the model by the
    step's generator; with τ = None the direction is −G_t⁻¹ g_t with G_t the EMA (7) of those
    d_t from G_0 = I, per block (the whole θ, each layer's row-major vec, or each weight and
    bias)."""
    net, xshape = NETS[kind]
    loss = CrossEntropy()
    params = net.init(3)
    rng = np.random.default_rng(1)
    alpha = 0.8
    method = QNG(beta=alpha, rank=None, blocks=blocks)
    state = method.init(net, params)
    ds = []
    for k in range(5):
        x, y = rng.standard_normal(xshape), rng.integers(0, 3, xshape[0])
        direction_k, state = method.step(state, net, params, Batch(x, y, loss), rng=100 + k)
        y_hat = loss.sample(net.forward(params, x), 1, seed=np.random.default_rng(100 + k))[0]  # (8): one ŷ per x
        d = [-math.sqrt(len(x)) * gi for gi in net.grad(params, x, y_hat, loss)]
        g = net.grad(params, x, y, loss)
        d, g, direction_k = (_blocks_of(z, blocks, net) for z in (d, g, direction_k))
        if k == 0:  # A_1 = I: q_1 = d_1
            for q, di in zip(state.q, d):
                assert_close(q[0], di.ravel(), rtol=1e-13, atol=0)
        ds.append([di.ravel() for di in d])
        for i, (gi, pi) in enumerate(zip(g, direction_k)):
            G = ema_matrix(np.array([dk[i] for dk in ds]), alpha)
            expect = -np.linalg.solve(G, gi.ravel())
            assert_close(pi.ravel(), expect, rtol=forward_tol(G.shape[0] * (k + 1), np.linalg.cond(G)), atol=0)


def test_method_layer_blocks_are_independent_and_state_is_not_mutated():
    net, xshape = NETS["mlp"]
    params = net.init(0)
    rng = np.random.default_rng(0)
    b = Batch(rng.standard_normal(xshape), rng.integers(0, 3, xshape[0]), CrossEntropy())
    method = QNG(rank=2, blocks="layer")
    s0 = method.init(net, params)
    _, s1 = method.step(s0, net, params, b, rng=0)
    assert s0.k == 0 and s0.q == [(), ()] and s0.beta_t == [(), ()]
    assert [q[0].size for q in s1.q] == [o * d for o, d in net.param_shapes]
    with pytest.raises(HyperParameterError, match="blocks"):
        QNG(blocks="full").step(s1, net, params, b, rng=0)


@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_float32_fast_form_runs_in_float32_dense_form_in_float64(blocks):
    """design §3 precision: with float32 parameters the fast form keeps q̂ and the direction in
    float32 (also for NumPy-scalar hyper-parameters), the dense form computes in float64."""
    net, xshape = NETS["mlp"]
    params = [W.astype(np.float32) for W in net.init(0)]
    rng = np.random.default_rng(0)
    method = QNG(beta=np.float64(0.9), rank=2, blocks=blocks)
    s = method.init(net, params)
    for k in range(3):
        b = Batch(rng.standard_normal(xshape).astype(np.float32), rng.integers(0, 3, xshape[0]), CrossEntropy())
        dd, sd = method.step(s, net, params, b, rng=k, dense=True)
        df, s = method.step(s, net, params, b, rng=k)
        assert all(x.dtype == np.float32 for x in df) and all(x.dtype == np.float64 for x in dd)
        assert all(q[-1].dtype == np.float32 for q in s.q)
        assert all(q[-1].dtype == np.float64 for q in sd.q)


def test_bad_hyper_parameters():
    for kwargs, match in [({"beta": 0.0}, "beta"), ({"beta": 1.0}, "beta"), ({"beta": -0.5}, "beta"),
                          ({"beta": float("nan")}, "beta"), ({"beta": "0.9"}, "beta"),
                          ({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"rank": True}, "rank"),
                          ({"blocks": "diag"}, "blocks")]:
        with pytest.raises(HyperParameterError, match=match):
            QNG(**kwargs)
    for retired in ("alpha", "tau"):  # renamed: beta (α of (7)), rank (τ of (11))
        with pytest.raises(TypeError):
            QNG(**{retired: 0.5})
    QNG(rank=None), QNG(rank=np.int64(3)), QNG(beta=0.5, blocks="layer")  # accepted


@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_training_smoke_decreases_loss(blocks):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    net = Sequential([Linear(4, 16), Tanh(), Linear(16, 3)])
    _, hist = train(QNG(beta=0.9, rank=4, blocks=blocks), net, net.init(0), x, y, CrossEntropy(), steps=40,
                    lr=0.1, batch_size=32, seed=1)
    assert hist["loss"][-1] < 0.6 * hist["loss"][0], hist["loss"][::8]


# ------------------------------------------------------------------ draws, state, curvature
def _one_batch(kind="mlp", seed=0):
    net, xshape = NETS[kind]
    rng = np.random.default_rng(seed)
    return net, net.init(seed), Batch(rng.standard_normal(xshape), rng.integers(0, 3, xshape[0]), CrossEntropy())


@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_injected_labels_are_consumed_exactly(dense):
    """Labels drawn elsewhere (here: all equal to 2, which the model's draw would not give)
    are what d_t (8) is computed from: the first factor is q_1 = d_1 = −√N ∇Ψ(ŷ) per block."""
    net, params, b = _one_batch()
    method = QNG(rank=2, blocks="layer")
    y_hat = np.full((1, b.x.shape[0]), 2)
    _, s = method.step(method.init(net, params), net, params, b, draws=Draws(method="qng", labels=y_hat), dense=dense)
    d = [-math.sqrt(b.x.shape[0]) * gi.ravel() for gi in net.grad(params, b.x, y_hat[0], b.loss)]
    for q, di in zip(s.q, d):
        assert_close(q[0], di, rtol=1e-13, atol=0)
    own = method.draw(np.random.default_rng(0), s, net, params, b)
    assert own.labels.shape == (1, b.x.shape[0]) and own.labels.dtype.kind == "i"


def test_draws_of_the_wrong_shape_are_refused():
    net, params, b = _one_batch()
    method = QNG()
    s = method.init(net, params)
    N = b.x.shape[0]
    for labels in (np.zeros(N, dtype=int), np.zeros((2, N), dtype=int), np.zeros((1, N + 1), dtype=int),
                   np.zeros((1, N, 3)), [[0] * N]):
        with pytest.raises(DrawsError, match="qng.*labels"):
            method.step(s, net, params, b, draws=Draws(method="qng", labels=labels))


@given(st.integers(1, 7), st.floats(0.3, 0.95), st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_product_form_operator_is_the_explicit_product(n, alpha, m, seed):
    """ProductForm(q, β): todense = Â Âᵀ of the explicit factors (written out here), matvec and
    solve (vector and matrix right-hand sides) = the dense product and its inverse (forward
    error ≤ C·n·(m+1)·eps·Π κ(K_j)², the product's amplification), eigvalsh ≥ α^m (Observation 1)."""
    ds = _ds(seed, max(m, 1), n)
    q, b = (), ()
    for t in range(m):
        q, b = update(q, b, ds[t], alpha)
    A = np.eye(n)
    for qi, bi in zip(q, b):
        A = A @ _K(alpha, qi, bi)
    G = A @ A.T
    op = ProductForm(q, b, alpha, n)
    pk = np.prod([1 + (1 - alpha) * float(qi @ qi) / alpha for qi in q])
    tol = forward_tol(n * (m + 1), pk)
    assert_close(op.todense(), G, rtol=tol, atol=0)
    V = np.random.default_rng(seed + 1).standard_normal((n, 3))
    assert_close(op.matvec(V), G @ V, rtol=tol, atol=0)
    assert_close(op.matvec(V[:, 0]), G @ V[:, 0], rtol=tol, atol=0)
    assert_close(op.solve(V), np.linalg.solve(G, V), rtol=tol, atol=0)
    assert op.eigvalsh().min() >= alpha**m * (1 - tol)


@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("blocks", ["full", "layer", "tensor"])
def test_curvature_is_block_diagonal_product_form_and_reproduces_the_fast_direction(kind, blocks):
    """curvature(state) = BlockDiagonal of Ĝ per block on the blocks' index sets into θ
    (tensor blocks are not contiguous); −C⁻¹g is the fast form's direction (the same
    Sherman–Morrison products: equal to rounding) and C's dense matrix is Ĝ of each block."""
    net, xshape = NETS[kind]
    params = net.init(0)
    rng = np.random.default_rng(0)
    method = QNG(beta=0.8, rank=2, blocks=blocks)
    s = method.init(net, params)
    for k in range(3):
        b = Batch(rng.standard_normal(xshape), rng.integers(0, 3, xshape[0]), CrossEntropy())
        d, s = method.step(s, net, params, b, rng=k)
    C = method.curvature(s, net)
    assert isinstance(C, BlockDiagonal) and C.shape == (net.n_params,) * 2
    g = flatten(net.grad(params, b.x, b.y, b.loss))
    assert_close(-C.solve(g), flatten(d), rtol=1e-12, atol=0)
    M = C.todense()
    for i, q, bt in zip(C.index, s.q, s.beta_t):
        assert_close(M[np.ix_(i, i)], qng_G(q, bt, 0.8, len(i)), rtol=1e-14, atol=0)
    rest = np.ones_like(M, dtype=bool)
    for i in C.index:
        rest[np.ix_(i, i)] = False
    assert not M[rest].any()
    with pytest.raises(ArgumentTypeError, match="net"):
        method.curvature(s)
