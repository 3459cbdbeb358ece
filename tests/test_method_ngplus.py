"""NG+ ([NG+]; refcurv.methods.ngplus): fast form = dense form for every option, the
corrected SMW (14) and LS (15)/(16) forms, (17) unbiasedness, the (18) block-diagonal
formula, the (11)/(12) statistics, multi-step reuse, EFIM vs I⊗GFIM (9)-(10), the
online-Newton iteration (19) with its L_t-norm projection, bad hyper-parameters and a
training smoke run.

Tolerance (module docstring of refcurv.methods.ngplus): per layer, relative error
``C·n_eff·eps·κ`` (C = 100, ``forward_tol``) with ``n_eff = m + n + N·κ_conv`` and
``κ = (λ + ‖L‖₂)/λ`` the condition number of ``λI + L`` — which is also the cancellation
factor of the SMW/LS answers ``(𝐆 − correction)/λ``. For the sketched LS (16) the dense
matrix ``λI + UUᵀΩᵀΩ`` is non-symmetric (LU) and its QR-solved fast form conditions on
``[ΩU; √λI]``: κ = max(cond₂(λI + UUᵀΩᵀΩ), (λ + ‖ΩU‖₂²)/λ).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import DrawsError, HyperParameterError, StateError
from refcurv.linalg import sketch as SK
from refcurv.methods.base import Batch, Draws
from refcurv.linalg.gfim import (
    block_mask,
    blocks_to_dense,
    dense_to_blocks,
    lowrank_factor,
    project_ball,
    project_ball_dense,
)
from refcurv.methods.ngplus import NGPlus, NGPlusOnlineNewton, _conv_T, _stat
from refcurv.operators import BlockDiagonal, Kronecker
from refcurv.nn import MSE, Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing.strategies import dampings, problems, spd_matrices
from refcurv.testing.tolerance import EPS, assert_clt, assert_close, forward_tol, rel_err
from refcurv.train import train

CONFIGS = [
    dict(),
    dict(side="left"),
    dict(side="right"),
    dict(statistics="momentum", beta=0.7),
    dict(statistics="minibatch", beta=0.8, stats_weight=0.5, stats_init=0.3),
    dict(statistics="minibatch", gram="sketch", sketch_size=3),
    dict(gram="sketch", sketch_size=3),
    dict(block_size=2),
    dict(block_size=3, side="right"),
    dict(block_size=2, gram="sketch", sketch_size=4, statistics="momentum"),
    dict(solver="smw"),
    dict(solver="smw", side="right"),
    dict(solver="ls"),
    dict(solver="sketch_ls", sketch_size=3),
    dict(variant="authors"),
    dict(variant="authors", statistics="momentum", T_inv=2),
    dict(T_inv=2, statistics="minibatch", block_size=2),
    dict(T_inv=2, solver="sketch_ls", sketch_size=2),
]


def _mlp():
    return Sequential([Linear(5, 7), Tanh(), Linear(7, 3)])  # sides: right (7 > 6), left (3 ≤ 8)


def _cnn():
    return Sequential([Conv2d(2, 3, 3, padding=1), Tanh(), Flatten(), Linear(48, 3)])


def _data(net, N, seed, loss="ce"):
    rng = np.random.default_rng(seed)
    shape = (N, 5) if isinstance(net.layers[0], Linear) else (N, 2, 4, 4)
    x = rng.standard_normal(shape)
    if loss == "ce":
        return x, rng.integers(0, 3, size=N), CrossEntropy()
    return x, rng.standard_normal((N, 3)), MSE()


def _curv(state, j):
    """Layer j's stored curvature: U (low-rank solvers) or the oriented statistic."""
    return state.U[j] if state.U[j] is not None else _stat(state, j)


def _kappa(method, curv, Omega):
    """Condition number κ of the layer's solve (see the module docstring)."""
    lam = method.damping_applied
    if method.solver in ("smw", "ls"):
        return (lam + np.linalg.norm(curv, 2) ** 2) / lam
    if method.solver == "sketch_ls":
        m = curv.shape[0]
        M = lam * np.eye(m) + curv @ curv.T @ Omega.T @ Omega
        return max(np.linalg.cond(M), (lam + np.linalg.norm(Omega @ curv, 2) ** 2) / lam)
    return (lam + max(float(np.linalg.eigvalsh(curv).max()), 0.0)) / lam


def _assert_fast_equals_dense(method, net, params, batch, fast_state, dense_state, seed):
    d_fast, s_fast = method.step(fast_state, net, params, batch, rng=seed)
    d_dense, s_dense = method.step(dense_state, net, params, batch, rng=seed, dense=True)
    N = len(batch.x)
    for j, ((m, n), T) in enumerate(zip(net.param_shapes, _conv_T(net, batch.x))):
        kappa = _kappa(method, _curv(s_dense, j), s_dense.Omega_sketch[j])
        tol = forward_tol(m + n + N * T, kappa)
        assert_close(d_fast[j], d_dense[j], rtol=tol, atol=1e-300, what=f"layer {j} {method}")
    return d_fast, s_fast, s_dense


@given(problems(max_batch=4), st.sampled_from(range(len(CONFIGS))), dampings(-3, 1), st.integers(0, 2**31 - 1))
def test_fast_equals_dense(pb, ci, lam, seed):
    """Every option, two steps (the second at moved parameters, so that reuse (𝒯 = 2),
    momentum and the (12) accumulation are exercised), on drawn MLPs/CNNs and losses."""
    net, loss = pb.net, pb.loss_fn
    params, x, y = pb.data()
    method = NGPlus(damping=lam, **CONFIGS[ci])
    batch = Batch(x, y, loss)
    st_f = st_d = method.init(net, params)
    for k in range(2):
        d, st_f, st_d = _assert_fast_equals_dense(method, net, params, batch, st_f, st_d, seed + k)
        params = [W + 0.3 * D for W, D in zip(params, d)]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_every_option_fast_equals_dense_along_a_run(kind, ci):
    """Three steps on changing parameters and batches; the fast run continues from its own
    state, the dense run from its own; at the end the fast form also continues from the
    dense state (states are interchangeable: the dense form stores ``factorization = None``)."""
    net = _mlp() if kind == "mlp" else _cnn()
    params = net.init(3)
    method = NGPlus(damping=0.05, **CONFIGS[ci])
    st_f = st_d = method.init(net, params)
    for k in range(3):
        batch = Batch(*_data(net, 6, 10 + k))
        d, st_f, st_d = _assert_fast_equals_dense(method, net, params, batch, st_f, st_d, k)
        params = [W + 0.5 * D for W, D in zip(params, d)]
    batch = Batch(*_data(net, 6, 20))
    d1, _ = method.step(st_f, net, params, batch, rng=5)
    d2, _ = method.step(st_d, net, params, batch, rng=5)
    for a, b in zip(d1, d2):
        assert_close(a, b, rtol=1e-10, atol=1e-300)


def test_default_is_damped_gfim_direction_6():
    """(6) against refcurv.curvature.gfim and the mini-batch gradient directly."""
    for net in (_mlp(), _cnn()):
        params = net.init(0)
        x, y, loss = _data(net, 5, 1)
        lam = 0.2
        d, _ = NGPlus(damping=lam).step(NGPlus().init(net, params), net, params, Batch(x, y, loss))
        g = net.grad(params, x, y, loss)
        for s in ("left", "right"):
            Ls = cv.gfim(net, params, x, y, loss, side=s)
            for j, W in enumerate(params):
                if cv.gfim_side(W.shape) != s:
                    continue
                M = lam * np.eye(Ls[j].shape[0]) + Ls[j]
                ref = -np.linalg.solve(M, g[j]) if s == "left" else -np.linalg.solve(M, g[j].T).T
                assert_close(d[j], ref, rtol=forward_tol(sum(W.shape) + 5 * 16, np.linalg.cond(M)))


# ------------------------------------------------------------------ SMW (14), LS (15), (16)
@given(problems(kind=st.just("mlp"), max_batch=5), dampings(-4, 1), st.sampled_from(["left", "right"]))
def test_smw_14_equals_dense(pb, lam, side):
    """SMW (14), corrected, with U = N^{-1/2}[√c_i g_i], c_i = a_iᵀa_i (fully connected, κ = 1):
    UUᵀ = L and the SMW direction equals the dense Cholesky solve of λI + L to
    C·n_eff·eps·κ, κ = (λ + ‖U‖₂²)/λ."""
    net, loss = pb.net, pb.loss_fn
    params, x, y = pb.data()
    method = NGPlus(damping=lam, solver="smw", side=side)
    batch = Batch(x, y, loss)
    _, s_fast, _ = _assert_fast_equals_dense(method, net, params, batch, method.init(net, params),
                                              method.init(net, params), 0)
    Ls = cv.gfim(net, params, x, y, loss, side=side)
    for U, L in zip(s_fast.U, Ls):
        assert U.shape == (L.shape[0], len(x))
        assert_close(U @ U.T, L, rtol=100 * sum(U.shape) * EPS, atol=1e-300)


def test_smw_14_as_printed_misses_1_over_lambda():
    """Errata NG+-2: (λI + UUᵀ)^{-1} = λ^{-1}[I − U(λI + UᵀU)^{-1}Uᵀ]; the printed
    λ^{-1}I − U(λI + UᵀU)^{-1}Uᵀ is wrong unless λ = 1."""
    rng = np.random.default_rng(0)
    U = rng.standard_normal((5, 3))
    for lam in (0.1, 1.0, 10.0):
        M = lam * np.eye(5) + U @ U.T
        C = np.linalg.inv(lam * np.eye(3) + U.T @ U)
        right = (np.eye(5) - U @ C @ U.T) / lam
        printed = np.eye(5) / lam - U @ C @ U.T
        assert np.linalg.norm(right @ M - np.eye(5)) < 1e-12
        if lam == 1.0:
            assert np.linalg.norm(printed @ M - np.eye(5)) < 1e-12
        else:
            assert np.linalg.norm(printed @ M - np.eye(5)) > 0.1


def test_ls_15_unknown_is_r_by_n_and_direction_is_residual_over_lambda():
    """Errata NG+-3: in (15) the unknown is D ∈ R^{N×n} (U is m×N), and the direction is
    (𝐆 − U D*)/λ, which equals (λI + L)^{-1}𝐆 (SENG (9))."""
    net = _mlp()
    params = net.init(0)
    x, y, loss = _data(net, 4, 0)
    lam = 0.3
    method = NGPlus(damping=lam, solver="ls", side="left")
    d, s = method.step(method.init(net, params), net, params, Batch(x, y, loss))
    g = net.grad(params, x, y, loss)
    for j, (U, L) in enumerate(zip(s.U, cv.gfim(net, params, x, y, loss, side="left"))):
        m, n = params[j].shape
        stacked = np.vstack([U, np.sqrt(lam) * np.eye(U.shape[1])])
        D = np.linalg.lstsq(stacked, np.vstack([g[j], np.zeros((U.shape[1], n))]), rcond=None)[0]
        assert D.shape == (len(x), n) and U.shape == (m, len(x))
        kappa = (lam + np.linalg.norm(L, 2)) / lam
        assert_close(-(g[j] - U @ D) / lam, d[j], rtol=forward_tol(m + n + 4, kappa))
        assert_close(d[j], -np.linalg.solve(lam * np.eye(m) + L, g[j]), rtol=forward_tol(m + n + 4, kappa))


def test_sketched_ls_16_with_identity_sketch_is_exact_and_is_push_through_form():
    """(16) with Ω = I (injected through draws=) reduces to (15); for a drawn Ω its direction
    is −(λI + UUᵀΩᵀΩ)^{-1}𝐆 (the push-through identity), not −(λI + UUᵀ)^{-1}𝐆."""
    net = _mlp()
    params = net.init(1)
    x, y, loss = _data(net, 5, 2)
    batch = Batch(x, y, loss)
    lam = 0.1
    method = NGPlus(damping=lam, solver="sketch_ls", side="left")
    exact, _ = NGPlus(damping=lam, solver="smw", side="left").step(method.init(net, params), net, params, batch)
    ident = Draws(method="ngplus", sketches={f"Omega/{j}": np.eye(m) for j, (m, _) in enumerate(net.param_shapes)})
    for dense in (False, True):
        d_id, _ = method.step(method.init(net, params), net, params, batch, draws=ident, dense=dense)
        for a, b in zip(d_id, exact):
            assert_close(a, b, rtol=1e-12)
    d, s = method.step(method.init(net, params), net, params, batch, rng=0)
    g = net.grad(params, x, y, loss)
    for j, (U, Om) in enumerate(zip(s.U, s.Omega_sketch)):
        assert Om.shape == (method.sketch_size, U.shape[0])
        M = lam * np.eye(U.shape[0]) + U @ U.T @ Om.T @ Om
        assert_close(d[j], -np.linalg.solve(M, g[j]), rtol=forward_tol(20, np.linalg.cond(M)))
        assert rel_err(d[j], exact[j]) > 1e-3  # the sketch changes the answer


def test_lowrank_factor_for_conv_layers():
    """κ > 1: columns G_i (A_iᵀA_i)^{1/2} still give UUᵀ = L exactly (the SMW identity holds;
    the paper only calls it uneconomical)."""
    net = _cnn()
    params = net.init(0)
    x, y, loss = _data(net, 3, 0)
    A, G = net.factors(params, x, y, loss)
    U = lowrank_factor(G[0], A[0])
    assert U.shape == (3, 3 * 16)
    assert_close(U @ U.T, cv.gfim(net, params, x, y, loss, side="left")[0], rtol=1e-13)


# ------------------------------------------------------------------ (17) sketched products
def test_sketch_17_is_unbiased():
    """Seeded Monte Carlo (CLT/Bonferroni, assert_clt) over 3000 draws of the method's own
    draw(): E[ΩᵀΩ] = I over the long dimension of each layer, and the sketched statistic is
    unbiased, E[(1/N) Σ 𝒢_iΩᵀΩ𝒢_iᵀ] = L (R for the right layer). The statistic is evaluated
    for all draws at once from the drawn Ω matrices; the first draw is also checked against
    the state the fast form stores (the one-draw wiring is checked against the dense Ω-matrix
    formula in test_fast_equals_dense)."""
    net = _mlp()
    params = net.init(0)
    x, y, loss = _data(net, 4, 0)
    batch = Batch(x, y, loss)
    method = NGPlus(gram="sketch", sketch_size=2)
    st0 = method.init(net, params)
    assert st0.sides == ("right", "left")
    rng = np.random.default_rng(0)
    S = 3000
    draws = [method.draw(rng, st0, net, params, batch) for _ in range(S)]
    A, G = net.factors(params, x, y, loss)
    dims = [7, 8]  # right layer (7, 6): sketch over m = 7; left layer (3, 8): over n = 8
    for j, side in enumerate(st0.sides):
        P, Q = (G[j], A[j]) if side == "left" else (A[j], G[j])
        Om = np.stack([d.sketches[f"Omega/{j}"] for d in draws])  # (S, q, dim)
        assert Om.shape == (S, 2, dims[j])
        assert np.all((Om != 0).sum(axis=2) == 1)  # row sampling: one entry per row
        assert_clt(np.einsum("sqa,sqb->sab", Om, Om), np.eye(dims[j]))
        Qs = np.einsum("sqi,nit->nsqt", Om, Q)  # (N, S, q, κ): Ω Q_i for every draw
        K = np.einsum("nsit,nsiu->nstu", Qs, Qs)
        Lhat = np.einsum("nat,nstu,nbu->sab", P, K, P) / P.shape[0]
        _, s1 = method.step(st0, net, params, batch, draws=draws[0])
        assert_close(Lhat[0], _stat(s1, j), rtol=1e-13)
        assert_clt(Lhat, cv.gfim(net, params, x, y, loss, side=side)[j])


def test_sketch_17_biased_weights_are_detected():
    """The Monte-Carlo check has power: weights n/q (SENG-code-like, not √(n/q)) are rejected."""
    rng = np.random.default_rng(1)
    n, q = 8, 2
    grams = []
    for _ in range(3000):
        sk = SK.ngplus_sketch(n, q, seed=rng)
        grams.append(SK.RowSketch(n=n, index=sk.index, weight=sk.weight**2).gram())
    with pytest.raises(AssertionError):
        assert_clt(np.stack(grams), np.eye(n))


# ------------------------------------------------------------------ (18) block diagonal
@pytest.mark.parametrize("p", [1, 2, 3, 7, 10])
def test_block_diagonal_18_equals_dense_formula(p):
    """The stored (s, p, p) blocks are the diagonal blocks of GFIM (p ∤ m included: the last
    block is padded); the direction solves λI + mask⊙L densely; p = 1 is the diagonal
    (elementwise division), p ≥ m the full method."""
    net = _mlp()
    params = net.init(2)
    x, y, loss = _data(net, 6, 3, loss="mse")
    batch = Batch(x, y, loss)
    lam = 0.07
    method = NGPlus(damping=lam, block_size=p)
    d, s = method.step(method.init(net, params), net, params, batch)
    full, _ = NGPlus(damping=lam).step(NGPlus().init(net, params), net, params, batch)
    g = net.grad(params, x, y, loss)
    for j, side in enumerate(s.sides):
        L = cv.gfim(net, params, x, y, loss, side=side)[j]
        m = L.shape[0]
        blocks = _stat(s, j)
        assert blocks.shape == (-(-m // p), p, p)
        assert_close(blocks_to_dense(blocks, m), L * block_mask(m, p), rtol=1e-13, atol=1e-300)
        assert_close(dense_to_blocks(L * block_mask(m, p), p), blocks, rtol=1e-13, atol=1e-300)
        Xo = g[j] if side == "left" else g[j].T
        M = lam * np.eye(m) + L * block_mask(m, p)
        ref = -np.linalg.solve(M, Xo)
        ref = ref if side == "left" else ref.T
        tol = forward_tol(sum(params[j].shape) + 6, np.linalg.cond(M))
        assert_close(d[j], ref, rtol=tol)
        if p == 1:  # diagonal: elementwise division by λ + diag(L)
            diag = -Xo / (lam + np.diag(L))[:, None]
            assert_close(d[j], diag if side == "left" else diag.T, rtol=tol)
        if p >= m:
            assert_close(d[j], full[j], rtol=tol)


# ------------------------------------------------------------------ (11), (12), multi-step
def _param_path(net, k, seed=0):
    rng = np.random.default_rng(seed)
    base = net.init(seed)
    return [[W + 0.2 * t * rng.standard_normal(W.shape) for W in base] for t in range(k)]


@pytest.mark.parametrize("dense", [False, True])
def test_momentum_11_has_the_bars(dense):
    """Errata NG+-1: L̄_k = βL̄_{k−1} + (1−β)L_k with L̄_0 = L_0 (read as printed,
    L_k = βL_{k−1} + (1−β)L_k forces L_k = L_{k−1}: the statistic would never move).
    After three refreshes the state is β²L_0 + β(1−β)L_1 + (1−β)L_2."""
    net = _mlp()
    path = _param_path(net, 3)
    batches = [_data(net, 5, 30 + t) for t in range(3)]
    beta = 0.6
    method = NGPlus(statistics="momentum", beta=beta)
    state = method.init(net, path[0])
    for P, (x, y, loss) in zip(path, batches):
        _, state = method.step(state, net, P, Batch(x, y, loss), dense=dense)
    for j, side in enumerate(state.sides):
        Ls = [cv.gfim(net, P, x, y, loss, side=side)[j] for P, (x, y, loss) in zip(path, batches)]
        want = beta**2 * Ls[0] + beta * (1 - beta) * Ls[1] + (1 - beta) * Ls[2]
        assert_close(_stat(state, j), want, rtol=1e-12)
        assert rel_err(_stat(state, j), Ls[0]) > 1e-2 and rel_err(_stat(state, j), Ls[2]) > 1e-2


@pytest.mark.parametrize("dense", [False, True])
def test_minibatch_12_accumulates_from_lambda0(dense):
    """(12): L̃ = β̃^k λ₀I + γ Σ_t β̃^{k−1−t} 𝐆_t𝐆_tᵀ after k steps (𝐆_t: mini-batch gradient),
    and with β̃ = γ = 1 Shampoo's unweighted sum λ₀I + Σ 𝐆_t𝐆_tᵀ (§2.4)."""
    net = _mlp()
    path = _param_path(net, 3, seed=1)
    batches = [_data(net, 5, 40 + t) for t in range(3)]
    for b, gam in ((0.7, 0.4), (1.0, 1.0)):
        lam0 = 0.25
        method = NGPlus(statistics="minibatch", beta=b, stats_weight=gam, stats_init=lam0)
        state = method.init(net, path[0])
        for P, (x, y, loss) in zip(path, batches):
            _, state = method.step(state, net, P, Batch(x, y, loss), dense=dense)
        for j, side in enumerate(state.sides):
            Gs = [net.grad(P, x, y, loss)[j] for P, (x, y, loss) in zip(path, batches)]
            Gs = [G if side == "left" else G.T for G in Gs]
            m = Gs[0].shape[0]
            want = b**3 * lam0 * np.eye(m) + gam * sum(b ** (2 - t) * G @ G.T for t, G in enumerate(Gs))
            assert_close(_stat(state, j), want, rtol=1e-12)


def test_multi_step_reuses_the_stored_matrix():
    """𝒯 = 3 against 𝒯 = 1 on the same parameter path and batches: at k = 1, 2 the 𝒯 = 3 run
    uses L_0 (the very factorization object stored at k = 0) with the current gradient,
    which differs from the recomputing run; at k = 3 both recompute and agree."""
    net = _cnn()
    path = _param_path(net, 4, seed=2)
    batches = [Batch(*_data(net, 5, 50 + t)) for t in range(4)]
    lam = 0.1
    reuse, fresh = NGPlus(damping=lam, T_inv=3), NGPlus(damping=lam, T_inv=1)
    s_r, s_f = reuse.init(net, path[0]), fresh.init(net, path[0])
    L0 = None
    for t, (P, b) in enumerate(zip(path, batches)):
        d_r, s_r_new = reuse.step(s_r, net, P, b)
        d_f, s_f = fresh.step(s_f, net, P, b)
        if t == 0:
            L0 = [cv.gfim(net, P, b.x, b.y, b.loss, side=s)[j] for j, s in enumerate(s_r_new.sides)]
            fac0 = s_r_new.factorization
        g = net.grad(P, b.x, b.y, b.loss)
        for j, side in enumerate(s_r_new.sides):
            tol = forward_tol(100, (lam + np.linalg.norm(L0[j], 2)) / lam)
            if t in (1, 2):
                assert s_r_new.factorization[j] is fac0[j] and _stat(s_r_new, j) is _stat(s_r, j)
                Xo = g[j] if side == "left" else g[j].T
                ref = -np.linalg.solve(lam * np.eye(L0[j].shape[0]) + L0[j], Xo)
                assert_close(d_r[j], ref if side == "left" else ref.T, rtol=tol)
                assert rel_err(d_r[j], d_f[j]) > 1e-3
            else:
                assert_close(d_r[j], d_f[j], rtol=1e-12)
        s_r = s_r_new
    assert s_r.k == 4


def test_authors_variant_sqrt_damping_and_conv_scale():
    """design §8: the authors' code factorizes √λ I + L/√κ_conv (left factor only)."""
    net = _cnn()
    params = net.init(4)
    x, y, loss = _data(net, 4, 4)
    lam = 0.09
    d, s = NGPlus(damping=lam, variant="authors").step(NGPlus().init(net, params), net, params, Batch(x, y, loss))
    assert s.sides == ("left", "left")
    Ls = cv.gfim(net, params, x, y, loss, side="left")
    g = net.grad(params, x, y, loss)
    for j, scale in enumerate([1 / np.sqrt(16), 1.0]):
        M = np.sqrt(lam) * np.eye(Ls[j].shape[0]) + scale * Ls[j]
        assert_close(d[j], -np.linalg.solve(M, g[j]), rtol=forward_tol(100, np.linalg.cond(M)))


# ------------------------------------------------------------------ (9)-(10)
def test_efim_vs_identity_kron_gfim_9_10():
    """Errata NG+-5. Columns of 𝒢 ∈ R^{m×n} i.i.d. N(0, Σ): E[vec(𝒢)vec(𝒢)ᵀ] = I_n ⊗ Σ
    (paper's column-major vec) while E[𝒢𝒢ᵀ] = nΣ, so EFIM ≈ I_n ⊗ GFIM/n in expectation,
    not I_n ⊗ GFIM; in refcurv's row-major vec the same statement reads GFIM/n ⊗ I_n.
    Seeded Monte Carlo with CLT/Bonferroni bounds; the printed factor and the wrong Kronecker
    order for the row-major vec are both rejected."""
    rng = np.random.default_rng(0)
    m, n, S = 3, 4, 4000
    C = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.4, 0.5]])  # Σ = CCᵀ, not diagonal
    Gs = np.einsum("ab,sbn->san", C, rng.standard_normal((S, m, n)))
    vr = Gs.reshape(S, m * n)  # row-major vec (refcurv)
    E = np.einsum("si,sj->sij", vr, vr)
    Lg = np.einsum("sab,scb->sac", Gs, Gs)
    I = np.eye(n)
    corrected = E - np.einsum("sab,ij->saibj", Lg / n, I).reshape(S, m * n, m * n)  # Σ ⊗ I_n
    assert_clt(corrected, np.zeros((m * n, m * n)))
    printed = E - np.einsum("sab,ij->saibj", Lg, I).reshape(S, m * n, m * n)
    with pytest.raises(AssertionError):
        assert_clt(printed, np.zeros((m * n, m * n)))
    wrong_order = E - np.einsum("ij,sab->siajb", I, Lg / n).reshape(S, m * n, m * n)
    with pytest.raises(AssertionError):
        assert_clt(wrong_order, np.zeros((m * n, m * n)))
    # column-major (the paper's vec): I_n ⊗ GFIM/n
    p = rc.permutation([(m, n)], "col", bias=[False])
    Ecol = E[:, p][:, :, p]
    col = Ecol - np.einsum("ij,sab->siajb", I, Lg / n).reshape(S, m * n, m * n)
    assert_clt(col, np.zeros((m * n, m * n)))


def test_efim_equals_identity_kron_gfim_for_n_equal_one():
    """(9) is exact when n = 1 (aaᵀ = ‖a‖²): a sanity anchor for the orientation."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((5, 4, 1))
    E = np.einsum("si,sj->ij", g[:, :, 0], g[:, :, 0]) / 5
    assert_close(E, np.einsum("sab,scb->ac", g, g) / 5, rtol=1e-15)


# ------------------------------------------------------------------ online Newton (19)
@given(spd_matrices(max_n=6, max_log10_cond=4), st.integers(1, 3), st.floats(0.05, 2.0),
       st.floats(0.1, 10.0), st.integers(0, 2**31 - 1))
def test_L_norm_projection_is_optimal(spd, k, r, spread, seed):
    """X = Π^L(Y) onto {‖X‖_F ≤ r}: feasibility; KKT L(X − Y) + μX = 0 with μ ≥ 0 and ‖X‖_F = r
    when ‖Y‖_F > r (residual ≤ C·m·eps·‖L‖₂‖Y‖_F, the size of the terms that cancel); the
    variational inequality ⟨L(Y − X), Z − X⟩ ≤ 0 for Z in the ball (hence ‖X − Z‖_L ≤ ‖Y − Z‖_L,
    Lemma 6's first step); and agreement with the bisection/Cholesky reference."""
    L = spd.A
    m = L.shape[0]
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((m, k)) * spread
    X, mu = project_ball(Y, r, L)
    nY, nX = np.linalg.norm(Y), np.linalg.norm(X)
    assert nX <= r * (1 + 4 * EPS)
    if nY <= r:
        assert X is Y and mu == 0.0
        return
    scale = np.linalg.norm(L, 2) * nY
    tol = 100 * m * EPS
    assert mu >= 0 and abs(nX - r) <= tol * r
    assert np.linalg.norm(L @ (X - Y) + mu * X) <= tol * scale
    Z = rng.standard_normal((50, m, k))
    Z *= (r * rng.random(50) ** (1 / (m * k)) / np.linalg.norm(Z, axis=(1, 2)))[:, None, None]
    vi = np.einsum("ij,zij->z", L @ (Y - X), Z - X[None])
    assert vi.max() <= tol * scale * 2 * r
    nL = lambda D: np.sqrt(np.einsum("zij,ik,zkj->z", D, L, D))  # noqa: E731
    assert np.all(nL(X[None] - Z) <= nL(Y[None] - Z) * (1 + tol * spd.cond))
    Xd, _ = project_ball_dense(Y, r, L)
    assert_close(X, Xd, rtol=forward_tol(m, spd.cond), atol=0)


def test_euclidean_projection_breaks_lemma_6():
    """The regret proof needs ‖Π(Y) − Θ*‖_{L_t} ≤ ‖Y − Θ*‖_{L_t} for Θ* ∈ K: true for the
    L_t-norm projection, false for the Euclidean one (seeded 2-D example, L = diag(1, 100))."""
    L = np.diag([1.0, 100.0])
    Y = np.array([[3.0], [0.5]])
    th = np.linspace(0, 2 * np.pi, 721)
    T = np.stack([np.cos(th), np.sin(th)], 1)[:, :, None]
    nL = lambda D: np.einsum("kij,il,klj->k", D, L, D)  # noqa: E731
    XL, _ = project_ball(Y, 1.0, L)
    Xe, _ = project_ball(Y, 1.0)
    assert_close(Xe, Y / np.linalg.norm(Y), rtol=1e-15)
    assert (nL(XL[None] - T) - nL(Y[None] - T)).max() <= 0
    assert (nL(Xe[None] - T) - nL(Y[None] - T)).max() > 10


def test_online_newton_19_accumulates_G_Gt_and_stays_in_the_ball():
    """Errata NG+-4: L_t = εI + Σ_s 𝐆_s𝐆_sᵀ is m×m (𝐆 = mini-batch gradient; ∇ψᵀ∇ψ would be
    n×n and cannot multiply L_t^{-1}𝐆_t); with lr = 1 the iterates are the projected points and
    stay in the ball; the direction is Π(Θ − α^{-1}L_t^{-1}𝐆) − Θ; fast = dense (KKT/bisection)."""
    net = _mlp()
    eps_, alpha, r = 0.1, 0.5, 0.8
    params = [0.95 * r * W / np.linalg.norm(W) for W in net.init(0)]  # inside, near the sphere
    for projection in ("L", "euclidean"):
        method = NGPlusOnlineNewton(alpha=alpha, damping=eps_, radius=r, side="left", projection=projection)
        state = dense_state = method.init(net, params)
        P = params
        Gsum = [np.zeros((W.shape[0],) * 2) for W in P]
        projected = 0
        for t in range(6):
            x, y, loss = _data(net, 8, 60 + t)
            b = Batch(x, y, loss)
            g = net.grad(P, x, y, loss)
            d, state = method.step(state, net, P, b)
            dd, dense_state = method.step(dense_state, net, P, b, dense=True)
            for j, W in enumerate(P):
                Gsum[j] = Gsum[j] + g[j] @ g[j].T
                Lt = eps_ * np.eye(W.shape[0]) + Gsum[j]
                assert state.L[j].shape == (W.shape[0], W.shape[0])
                assert_close(state.L[j], Lt, rtol=1e-13)
                Y = W - np.linalg.solve(Lt, g[j]) / alpha
                projected += np.linalg.norm(Y) > r
                X = project_ball_dense(Y, r, Lt)[0] if projection == "L" else Y * min(1, r / np.linalg.norm(Y))
                tol = forward_tol(20, np.linalg.cond(Lt))
                assert_close(W + d[j], X, rtol=tol)
                assert_close(d[j], dd[j], rtol=tol * np.linalg.norm(X) / np.linalg.norm(dd[j]) + tol)
            P = [W + D for W, D in zip(P, d)]
            assert all(np.linalg.norm(W) <= r * (1 + 1e-14) for W in P)
        assert projected >= 3  # the projection was active


def test_lemma7_elliptical_potential_with_the_inverse():
    """Errata NG+-7. Along an online-Newton run (the method's own L_t, which includes 𝐆_t):
    Σ_t tr(𝐆_tᵀ L_t^{-1} 𝐆_t) ≤ log(det L_T / det L_0) ≤ m log((T·L_G² + ε)/ε), by
    ⟨A − B, A^{-1}⟩ ≤ log(|A|/|B|) for A ⪰ B ≻ 0. The printed step ⟨A − B, B⟩ ≥ log(|A|/|B|)
    fails (here with A = L_1, B = L_0 = εI, ε small)."""
    net = _mlp()
    eps_ = 1e-3
    method = NGPlusOnlineNewton(alpha=1.0, damping=eps_, radius=5.0, side="left")
    P = net.init(0)
    state = method.init(net, P)
    Ls, Gs = [[L] for L in state.L], [[] for _ in P]
    for t in range(8):
        x, y, loss = _data(net, 8, 70 + t)
        g = net.grad(P, x, y, loss)
        d, state = method.step(state, net, P, Batch(x, y, loss))
        for j in range(len(P)):
            Gs[j].append(g[j])
            Ls[j].append(state.L[j])
        P = [W + D for W, D in zip(P, d)]
    for L, G in zip(Ls, Gs):
        m, T = L[0].shape[0], len(G)
        lhs = sum(np.trace(Gt.T @ np.linalg.solve(Lt, Gt)) for Gt, Lt in zip(G, L[1:]))
        logdet = np.linalg.slogdet(L[-1])[1] - np.linalg.slogdet(L[0])[1]
        LG2 = max(np.linalg.norm(Gt, 2) ** 2 for Gt in G)
        assert lhs <= logdet * (1 + 1e-12) and logdet <= m * np.log((T * LG2 + eps_) / eps_) * (1 + 1e-12)
        A, B = L[1], L[0]
        assert np.trace((A - B) @ np.linalg.inv(A)) <= np.linalg.slogdet(A)[1] - np.linalg.slogdet(B)[1]
        assert np.trace((A - B) @ B) < np.linalg.slogdet(A)[1] - np.linalg.slogdet(B)[1]  # printed: ≥


# ------------------------------------------------------------------ API: refresh phase, draws, state, curvature
SKETCHED = [dict(gram="sketch", sketch_size=3, T_inv=2), dict(solver="sketch_ls", sketch_size=2, T_inv=2),
            dict(gram="sketch", statistics="minibatch", block_size=2, sketch_size=4)]


def test_refresh_schedule_is_algorithm_1_literally():
    """Algorithm 1 prints ``for k = 0, 1, …: if k mod 𝒯 = 0 then construct L_k else L_k = L_{k−1}``:
    a literal replay of that loop gives the refresh steps, and they are refresh_due's (phase
    k0; no 'paper' phase option is needed). The stored statistic changes exactly there."""
    net = _mlp()
    path = _param_path(net, 8, seed=3)
    for T in (1, 2, 3):
        printed = []
        k = 0
        while k < 8:  # Algorithm 1, line by line
            printed.append(k % T == 0)
            k = k + 1
        method = NGPlus(T_inv=T)
        state = method.init(net, path[0])
        for t, P in enumerate(path):
            prev = state
            _, state = method.step(state, net, P, Batch(*_data(net, 5, 80 + t)))
            assert state.diagnostics == {"refreshed": printed[t], "stats_refreshed": printed[t]}
            assert all(k in rc.methods.diagnostics.SCHEMA for k in state.diagnostics)
            for j in range(2):
                assert (_stat(state, j) is _stat(prev, j)) == (not printed[t])


@pytest.mark.parametrize("cfg", SKETCHED, ids=["17", "16", "12+17+18"])
@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_injected_sketches_are_bit_identical_and_drawn_only_at_refreshes(cfg, dense):
    """draw() returns the sketch matrices (one per layer, q × dim) at refresh steps and nothing
    in between; stepping with them injected equals stepping with the rng, bit for bit."""
    net = _cnn()
    method = NGPlus(damping=0.05, **cfg)
    runs = []
    for inject in (False, True):
        params = net.init(1)
        state, out = method.init(net, params), []
        for k in range(4):
            b = Batch(*_data(net, 5, 90 + k))
            if inject:
                draws = method.draw(np.random.default_rng(k), state, net, params, b)
                dims = method._sketch_dims(state)
                if k % method.T_inv == 0:
                    assert sorted(draws.sketches) == sorted(dims) == [f"Omega/{j}" for j in range(2)]
                    assert all(draws.sketches[key].shape == (method.sketch_size, dims[key]) for key in dims)
                else:
                    assert draws.sketches == {} and draws.labels is None
                d, state = method.step(state, net, params, b, draws=draws, dense=dense)
            else:
                d, state = method.step(state, net, params, b, rng=k, dense=dense)
            out.append(d)
            params = [W + 0.3 * D for W, D in zip(params, d)]
        runs.append(out)
    for da, db in zip(*runs):
        for a, b in zip(da, db):
            assert np.array_equal(a, b)


def test_a_non_row_sampling_sketch_is_consumed_as_given():
    """Draws from another implementation may carry any Ω (here Gaussian, and a different q):
    both forms use exactly that matrix — the fast form equals the dense (17) formula with it."""
    net = _mlp()
    params = net.init(2)
    batch = Batch(*_data(net, 6, 5))
    method = NGPlus(damping=0.1, gram="sketch")
    state = method.init(net, params)
    dims = method._sketch_dims(state)
    rng = np.random.default_rng(3)
    draws = Draws(method="ngplus", sketches={k: rng.standard_normal((5, d)) / np.sqrt(5) for k, d in dims.items()})
    d_f, s_f = method.step(state, net, params, batch, draws=draws)
    d_d, s_d = method.step(state, net, params, batch, draws=draws, dense=True)
    psg = net.per_sample_grads(params, batch.x, batch.y, batch.loss)
    for j, side in enumerate(state.sides):
        g = psg[j] if side == "left" else psg[j].swapaxes(1, 2)
        O = draws.sketches[f"Omega/{j}"]
        L = np.einsum("nab,bc,ndc->ad", g, O.T @ O, g) / len(g)
        assert_close(_stat(s_f, j), L, rtol=1e-12)
        kappa = _kappa(method, L, None)
        assert_close(d_f[j], d_d[j], rtol=forward_tol(sum(params[j].shape) + 6, kappa))


def test_wrong_sketches_are_refused_naming_the_field():
    net = _mlp()
    params = net.init(0)
    batch = Batch(*_data(net, 4, 0))
    method = NGPlus(gram="sketch", sketch_size=2, T_inv=2)
    state = method.init(net, params)
    good = method.draw(np.random.default_rng(0), state, net, params, batch)
    bad = {
        "is missing": {"Omega/0": good.sketches["Omega/0"]},
        r"\(q, 8\) matrix": {**good.sketches, "Omega/1": np.ones((2, 7))},
        "matrix": {**good.sketches, "Omega/0": np.ones(7)},
        "finite": {**good.sketches, "Omega/0": np.full((2, 7), np.nan)},
        "does not consume": {**good.sketches, "Omega/2": np.ones((2, 3))},
    }
    for msg, sk in bad.items():
        with pytest.raises(DrawsError, match=msg):
            method.step(state, net, params, batch, draws=Draws(method="ngplus", sketches=sk))
    with pytest.raises(DrawsError, match="sketches"):
        method.step(state, net, params, batch, draws=Draws(method="ngplus"))
    with pytest.raises(DrawsError, match="labels"):
        method.step(state, net, params, batch, draws=Draws(method="ngplus", sketches=good.sketches,
                                                            labels=np.zeros((1, 4), dtype=int)))
    _, s1 = method.step(state, net, params, batch, draws=good)
    with pytest.raises(DrawsError, match="between refreshes"):  # k = 1: nothing is drawn
        method.step(s1, net, params, batch, draws=good)
    with pytest.raises(DrawsError, match="ngplus"):
        method.step(s1, net, params, batch, draws=Draws(method="kfac"))
    method.step(s1, net, params, batch, draws=Draws(method="ngplus"))


def test_both_forms_return_the_typed_state():
    net = _cnn()
    params = net.init(0)
    batch = Batch(*_data(net, 4, 1))
    for method in (NGPlus(), NGPlus(solver="smw", side="right"), NGPlusOnlineNewton()):
        state = method.init(net, params)
        for dense in (False, True):
            _, s = method.step(state, net, params, batch, dense=dense)
            assert type(s) is method.State and s.k == 1
            assert all(k in rc.methods.diagnostics.SCHEMA for k in s.diagnostics)
            lowrank = getattr(method, "solver", "cholesky") != "cholesky"
            for j, side in enumerate(s.sides):  # L for left layers, R for right ones, U for (14)
                assert (s.L[j] is not None) == (side == "left" and not lowrank)
                assert (s.R[j] is not None) == (side == "right" and not lowrank)
    s = NGPlus(solver="smw").step(NGPlus(solver="smw").init(net, params), net, params, batch)[1]
    assert all(L is None for L in s.L + s.R) and all(U is not None for U in s.U)


CURVATURE_CONFIGS = [c for c in CONFIGS if c.get("solver") != "sketch_ls"]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("ci", range(len(CURVATURE_CONFIGS)))
def test_curvature_operator_reproduces_both_directions(kind, ci):
    """curvature(new_state) is C with direction = −C⁻¹ vec(g), for the dense and the fast
    direction, at refresh and at reuse steps (T_inv = 2), every option except (16)."""
    net = _mlp() if kind == "mlp" else _cnn()
    params = net.init(4)
    method = NGPlus(damping=0.05, **CURVATURE_CONFIGS[ci])
    st_f = st_d = method.init(net, params)
    for k in range(3):
        batch = Batch(*_data(net, 6, 100 + k))
        d_d, st_d = method.step(st_d, net, params, batch, rng=k, dense=True)
        d_f, st_f = method.step(st_f, net, params, batch, rng=k)
        g = rc.flatten(net.grad(params, batch.x, batch.y, batch.loss))
        for d, s in ((d_d, st_d), (d_f, st_f)):
            C = method.curvature(s)
            assert isinstance(C, BlockDiagonal) and C.shape == (net.n_params,) * 2
            ev = C.eigvalsh()
            tol = forward_tol(net.n_params + 6 * 16, ev.max() / ev.min())
            assert_close(-C.solve(g), rc.flatten(d), rtol=tol, what=f"step {k}")
        params = [W + 0.3 * D for W, D in zip(params, d_d)]


def test_curvature_is_the_kronecker_form_of_the_damped_gfim():
    """Per layer: left Kronecker(λI + L, I_n), right Kronecker(I_m, λI + R), from
    refcurv.curvature.gfim directly; the authors' variant adds √λ."""
    net = _mlp()  # layer 0 right (7 × 6), layer 1 left (3 × 8)
    params = net.init(0)
    x, y, loss = _data(net, 5, 7)
    for method, lam in ((NGPlus(damping=0.3), 0.3), (NGPlus(damping=0.09, variant="authors"), 0.3)):
        _, s = method.step(method.init(net, params), net, params, Batch(x, y, loss))
        C = method.curvature(s)
        for j, (side, (m, n)) in enumerate(zip(s.sides, net.param_shapes)):
            Lg = cv.gfim(net, params, x, y, loss, side=side)[j]
            D = lam * np.eye(Lg.shape[0]) + Lg
            want = np.kron(D, np.eye(n)) if side == "left" else np.kron(np.eye(m), D)
            assert isinstance(C.blocks[j], Kronecker)
            assert_close(C.blocks[j].todense(), want, rtol=1e-12)


def test_curvature_refuses_init_state_and_the_nonsymmetric_16():
    net = _mlp()
    params = net.init(0)
    with pytest.raises(StateError, match="ngplus"):
        NGPlus().curvature(NGPlus().init(net, params))
    with pytest.raises(StateError, match="ngplus"):
        NGPlus().curvature(NGPlusOnlineNewton().init(net, params))
    m = NGPlus(solver="sketch_ls")
    _, s = m.step(m.init(net, params), net, params, Batch(*_data(net, 4, 0)), rng=0)
    with pytest.raises(HyperParameterError, match="not symmetric"):
        m.curvature(s)


def test_online_newton_curvature_is_alpha_L_t_and_the_direction_adds_the_projection():
    """curvature(state) = α L_t (Kronecker(α L_t, I_n) per layer); the direction is
    Π^{L_t}(Θ − C⁻¹g) − Θ: −C⁻¹g when the projection is inactive (the contract), and the
    projected point otherwise."""
    net = _mlp()
    P = net.init(0)
    for radius, alpha in ((100.0, 0.5), (0.5, 0.5)):
        method = NGPlusOnlineNewton(alpha=alpha, damping=0.1, radius=radius, side="left")
        state = method.init(net, P)
        batch = Batch(*_data(net, 8, 11))
        d, s = method.step(state, net, P, batch)
        C = method.curvature(s)
        for j, (m, n) in enumerate(net.param_shapes):
            assert_close(C.blocks[j].todense(), np.kron(alpha * s.L[j], np.eye(n)), rtol=0, atol=0)
        g = net.grad(P, batch.x, batch.y, batch.loss)
        step = -C.solve(rc.flatten(g))
        tol = forward_tol(net.n_params, np.linalg.cond(C.todense()))
        if radius == 100.0:
            assert s.diagnostics["projected"] == [False, False]
            assert_close(rc.flatten(d), step, rtol=tol)
        else:
            assert s.diagnostics["projected"] == [True, True]
            Y = rc.unflatten(rc.flatten(P) + step, net)
            for j, W in enumerate(P):
                assert_close(W + d[j], project_ball_dense(Y[j], radius, s.L[j])[0], rtol=tol)


def test_beta_is_one_name_for_11_and_12_with_the_same_default():
    """``beta`` (was ``beta`` for (11) and ``mb_beta`` for (12), both 0.9): one default, 0.9;
    β = 1 is allowed for (12) (Shampoo's sum, §2.4) and refused for (11) (L̄ would stay L_0)."""
    assert NGPlus.hyper_parameters()["beta"] == 0.9
    NGPlus(statistics="minibatch", beta=1.0)
    with pytest.raises(HyperParameterError, match="beta"):
        NGPlus(statistics="momentum", beta=1.0)


@pytest.mark.parametrize("cls, old", [(NGPlus, "update_freq"), (NGPlus, "mb_beta"), (NGPlus, "mb_gamma"),
                                      (NGPlus, "mb_lambda0"), (NGPlus, "curvature"),
                                      (NGPlusOnlineNewton, "epsilon")])
def test_retired_names_are_not_hyper_parameters(cls, old):
    from refcurv.methods.vocabulary import HYPER_PARAMETERS, RETIRED

    assert old in RETIRED and old not in cls.hyper_parameters()
    assert set(cls.hyper_parameters()) <= set(HYPER_PARAMETERS)
    with pytest.raises(TypeError):
        cls(**{old: 1})


# ------------------------------------------------------------------ hyper-parameters
@pytest.mark.parametrize("cls, kwargs, arg", [
    (NGPlus, dict(damping=0.0), "damping"),
    (NGPlus, dict(damping=float("nan")), "damping"),
    (NGPlus, dict(side="middle"), "side"),
    (NGPlus, dict(T_inv=0), "T_inv"),
    (NGPlus, dict(T_inv=2.0), "T_inv"),
    (NGPlus, dict(statistics="ema"), "statistics"),
    (NGPlus, dict(beta=1.0), "beta"),
    (NGPlus, dict(beta=1.0, statistics="momentum"), "beta"),
    (NGPlus, dict(beta=1.5, statistics="minibatch"), "beta"),
    (NGPlus, dict(beta=-0.1, statistics="minibatch"), "beta"),
    (NGPlus, dict(stats_weight=0.0), "stats_weight"),
    (NGPlus, dict(stats_init=-1.0), "stats_init"),
    (NGPlus, dict(stats_init=float("nan")), "stats_init"),
    (NGPlus, dict(gram="random"), "gram"),
    (NGPlus, dict(block_size=0), "block_size"),
    (NGPlus, dict(solver="inv"), "solver"),
    (NGPlus, dict(sketch_size=0), "sketch_size"),
    (NGPlus, dict(variant="pytorch"), "variant"),
    (NGPlus, dict(variant="authors", side="right"), "side"),
    (NGPlus, dict(solver="smw", statistics="momentum"), "solver"),
    (NGPlus, dict(solver="ls", block_size=2), "solver"),
    (NGPlus, dict(solver="sketch_ls", gram="sketch"), "solver"),
    (NGPlusOnlineNewton, dict(alpha=-1.0), "alpha"),
    (NGPlusOnlineNewton, dict(damping=0.0), "damping"),
    (NGPlusOnlineNewton, dict(radius=float("inf")), "radius"),
    (NGPlusOnlineNewton, dict(projection="frobenius"), "projection"),
    (NGPlusOnlineNewton, dict(side=None), "side"),
])
def test_bad_hyper_parameters(cls, kwargs, arg):
    with pytest.raises(HyperParameterError, match=arg):
        cls(**kwargs)


def test_registered():
    from refcurv.methods.registry import REGISTRY

    assert REGISTRY["ngplus"] is NGPlus and REGISTRY["ngplus_online_newton"] is NGPlusOnlineNewton
    assert NGPlus.hyper_parameters()["damping"] == 0.1


# ------------------------------------------------------------------ training smoke
def _teacher_problem():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 5))
    teacher = Sequential([Linear(5, 6), Tanh(), Linear(6, 3)])
    logits = teacher.forward([2 * W for W in teacher.init(8)], x)
    return x, logits.argmax(axis=1)


@pytest.mark.parametrize("method, lr", [
    (NGPlus(damping=0.1), 0.5),
    (NGPlus(damping=0.1, T_inv=5, statistics="momentum"), 0.5),
    (NGPlus(damping=0.1, solver="smw"), 0.5),
    (NGPlus(damping=0.1, block_size=2, gram="sketch", sketch_size=4), 0.5),
    (NGPlus(damping=0.05, statistics="minibatch", beta=0.9, stats_weight=0.1, stats_init=0.1), 0.5),
    (NGPlusOnlineNewton(alpha=0.5, damping=0.1, radius=20.0), 1.0),
])
def test_training_decreases_the_loss(method, lr):
    """Seeded smoke run of refcurv.train.train (mini-batches of 16, 40 steps): the full-data
    loss ends below 60% of its start (ln 3 ≈ 1.10 at init)."""
    x, y = _teacher_problem()
    net = Sequential([Linear(5, 8), Tanh(), Linear(8, 3)])
    _, hist = train(method, net, net.init(0), x, y, CrossEntropy(), steps=40, lr=lr, batch_size=16, seed=0)
    assert np.isfinite(hist["loss"]).all()
    assert hist["loss"][-1] < 0.6 * hist["loss"][0], hist["loss"][::8]
