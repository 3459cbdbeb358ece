"""Shampoo ([Ren-thesis] Algorithm 16): mode products vs the dense Kronecker product of inverse
roots (Proposition 1), coupled-Newton roots vs eigh within the Newton stopping rule, EMA
statistics and stale roots, Gupta et al.'s two-sided form, the Newton-failure policy,
hyper-parameter validation, smoke training."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import fractional_matrix_power

from refcurv.errors import HyperParameterError, NewtonConvergenceError
from refcurv.linalg.roots import inv_root_eigh
from refcurv.methods._tensors import to_tensors
from refcurv.methods.base import Batch
from refcurv.methods.shampoo import Shampoo
from refcurv.nn import Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing.strategies import problems
from refcurv.testing.tolerance import assert_close, forward_tol, residual_tol
from refcurv.train import train


def _batch(pb, shift=0):
    params, x, y = pb.data()
    if shift:
        x = x + shift * np.random.default_rng(pb.seed + shift).standard_normal(x.shape)
    return params, Batch(x, y, pb.loss_fn)


def _contractions(T):
    """Independent of refcurv.linalg.tensor: G^{(i)} = Σ over all indices but i of T·T
    (tensordot over the other axes, as the authors' code writes it)."""
    out = []
    for i in range(T.ndim):
        others = [j for j in range(T.ndim) if j != i]
        out.append(np.tensordot(T, T, axes=(others, others)))
    return out


def _root_rtol(D, rep, p):
    """Relative error bound ‖X_newton − D^{−1/p}‖ ≤ ρ ‖D^{−1/p}‖ (spectral or Frobenius) of a
    root the coupled Newton iteration accepted with max|M − I| = e after j iterations
    (tests/test_roots_lowrank_tensor.py::test_coupled_newton_within_its_tolerance):
    X = D^{−1/p} M^{1/p} (invariant M = X^p D, X a polynomial in D), ‖M − I‖₂ ≤ n e =: δ, and
    |μ^{1/p} − 1| ≤ δ/(p(1 − δ)) for |μ − 1| ≤ δ; plus the rounding drift of the invariant,
    one forward error C·n·eps·κ(D) per iteration (which also covers the eigh root's own
    forward error). ``rep`` None (root_method="eigh") or not converged (fell back to eigh): the
    fast root *is* the eigh root, ρ = 0."""
    if rep is None or not rep.converged:
        return 0.0
    n = D.shape[0]
    delta = n * rep.error
    return delta / (p * (1 - delta)) + forward_tol(n, np.linalg.cond(D)) * (rep.iterations + 1)


def _leaves(x):
    if isinstance(x, list):
        for y in x:
            yield from _leaves(y)
    else:
        yield x


def _leaves_tensors(nested):
    """Per-layer/per-tensor/per-mode nesting → the per-tensor lists of factors."""
    return [t for lay in nested for t in lay]


def _assert_same_state(a, b, n_terms):
    """Fast and dense states: the same schedule and momentum (bit for bit); statistics and
    damped factors equal to rounding — the dense form computes them independently (partial
    traces of vec̄(g)vec̄(g)ᵀ from refcurv.curvature.grad), each entry the same sum of ≤ n_terms
    products in another order, C·n_terms·eps relative. The roots differ by construction
    (dense: eigh, no Newton reports) and are compared by the direction bound."""
    assert type(a) is type(b) and a.k == b.k and a.diagnostics == b.diagnostics
    for key in ("G_hat", "factors"):
        la, lb = list(_leaves(getattr(a, key))), list(_leaves(getattr(b, key)))
        assert len(la) == len(lb), key
        for u, v in zip(la, lb):
            assert_close(u, v, rtol=residual_tol(n_terms), atol=0, what=key)
    for u, v in zip(a.m, b.m):
        np.testing.assert_array_equal(u, v)
    assert all(r is None for r in _leaves(b.newton))


@given(problems(), st.sampled_from([3, 4]), st.sampled_from(["newton", "eigh"]), st.floats(-4, 0),
       st.integers(1, 3), st.integers(1, 2), st.sampled_from([0.0, 0.9]), st.sampled_from([0.0, 0.1]))
def test_mode_products_equal_dense_kronecker_of_roots(pb, conv_modes, roots, log_eps, T_inv, T_stats, mu, gamma):
    """Fast ``m̂ ×_1 R_1 ⋯ ×_k R_k`` (R_i Newton or eigh roots) vs dense
    ``(⊗_i (Ĝ^{(i)} + εI)^{−1/(2k)}) vec̄(m̂)`` with eigh roots, per tensor, over 4 steps.

    Tolerance, derived (not tuned): let X̂_i be the eigh roots and X_i = X̂_i + E_i the fast
    form's roots, ‖E_i‖₂ ≤ ρ_i ‖X̂_i‖₂ (``_root_rtol``). Telescoping
    ``⊗X_i − ⊗X̂_i = Σ_j X̂_1⊗⋯⊗X̂_{j−1}⊗E_j⊗X_{j+1}⊗⋯⊗X_k`` and ‖A⊗B‖₂ = ‖A‖₂‖B‖₂ give
    ``‖⊗X_i − ⊗X̂_i‖₂ ≤ Π‖X̂_i‖₂ (Π(1 + ρ_i) − 1)``; applying either product to vec̄(m̂) and adding
    γW rounds at C·N·eps·(Π‖X̂_i‖₂‖m̂‖ + γ‖W‖) per form (N = tensor size). The dense form
    computes its statistics independently (rounding-level different damped factors D̂_i), which
    adds the forward error of a root of a perturbed factor, C·n·eps·κ(D_i), to each ρ_i. With
    root_method="eigh" only rounding remains."""
    net = pb.net
    method = Shampoo(conv_modes=conv_modes, root_method=roots, damping=10.0**log_eps, T_inv=T_inv, T_stats=T_stats,
                     momentum=mu, weight_decay=gamma, beta=0.5)
    params, _ = _batch(pb)
    state_f = state_d = method.init(net, params)
    for k in range(4):
        _, batch = _batch(pb, shift=k)
        df, state_f = method.step(state_f, net, params, batch)
        dd, state_d = method.step(state_d, net, params, batch, dense=True)
        _assert_same_state(state_f, state_d, net.n_params)
        assert state_f.newton_fallbacks == 0  # the Newton path is the one exercised
        for lay, a, b, m, W, damped, reps in zip(net.layers_trainable, df, dd, state_f.m, params,
                                                 state_f.factors, state_f.newton):
            parts = zip(to_tensors(lay, a, conv_modes), to_tensors(lay, b, conv_modes),
                        to_tensors(lay, m, conv_modes), to_tensors(lay, W, conv_modes), damped, reps)
            for ta, tb, tm, tw, Ds, rs in parts:
                p = 2 * tm.ndim
                scale = np.prod([np.linalg.norm(inv_root_eigh(D, p), 2) for D in Ds]) * np.linalg.norm(tm)
                # + the dense form's own statistics: ‖δD‖ ≤ C·n·eps‖D‖ (``_assert_same_state``) moves
                # D^{−1/p} by ≤ c·|f'(λ_min)|·‖δD‖ = (c/p)·κ(D)·C·n·eps·‖D^{−1/p}‖
                rho = [_root_rtol(D, r, p) + forward_tol(net.n_params, np.linalg.cond(D)) for D, r in zip(Ds, rs)]
                bound = (scale * (np.prod([1 + r for r in rho]) - 1)
                         + 2 * residual_tol(tm.size) * (scale + gamma * np.linalg.norm(tw)))
                err = np.linalg.norm(ta - tb)
                assert err <= bound, f"step {k}, order {tm.ndim}: {err:.3e} > {bound:.3e}"


def _cnn():
    return Sequential([Conv2d(2, 3, 3, padding=1), Tanh(), Conv2d(3, 2, 2, stride=2, bias=False), Tanh(), Flatten(),
                       Linear(2 * 2 * 2, 3)], input_shape=(2, 5, 5))


def _cnn_batches(n, seed=0, N=6):
    rng = np.random.default_rng(seed)
    return [Batch(rng.standard_normal((N, 2, 5, 5)), rng.integers(0, 3, N), CrossEntropy()) for _ in range(n)]


@pytest.mark.parametrize("conv_modes", [3, 4])
@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_newton_roots_equal_eigh_roots_along_a_run(conv_modes, eps):
    """Every coupled-Newton root (p = 2k, k = 1..4) accepted along a training run equals the
    eigh root of the same damped factor within the stopping-rule bound (``_root_rtol``)."""
    net = _cnn()
    params = [2 * W for W in net.init(0)]
    method = Shampoo(conv_modes=conv_modes, damping=eps, T_inv=2)
    state = method.init(net, params)
    orders, checked = set(), 0
    for k, b in enumerate(_cnn_batches(6, seed=conv_modes)):
        d, state = method.step(state, net, params, b)
        params = [W + 0.1 * D for W, D in zip(params, d)]
        for Xs, Ds, Rs in zip(_leaves_tensors(state.roots), _leaves_tensors(state.factors),
                              _leaves_tensors(state.newton)):
            orders.add(len(Xs))
            for X, D, r in zip(Xs, Ds, Rs):
                assert r.converged and r.iterations <= 100 and r.error <= 1e-6
                p = 2 * len(Xs)
                assert_close(X, inv_root_eigh(D, p), rtol=_root_rtol(D, r, p), atol=0, what=f"step {k}")
                checked += 1
    assert orders == {1, 2, conv_modes} and checked > 0
    assert state.newton_fallbacks == 0


def test_statistics_ema_frequencies_and_stale_roots():
    """Lines 7, 9, 12 with T₁ = 2, T₂ = 3 (0-based step k): Ĝ set at k = 0 and
    Ĝ ← βĜ + (1 − β)Ḡ^{(i)} at k = 2, 4, 6 from the *mini-batch gradient* (not the momentum);
    roots (Ĝ + εI)^{−1/(2k)} refreshed at k = 0, 3, 6 from the statistics of that step and
    reused unchanged in between; m̂ ← μm̂ + g."""
    net = _cnn()
    params = net.init(1)
    beta, mu, eps = 0.7, 0.5, 0.03
    method = Shampoo(T_stats=2, T_inv=3, beta=beta, momentum=mu, damping=eps, root_method="eigh")
    batches = _cnn_batches(7, seed=3)
    state = method.init(net, params)
    history, stats, m = [], None, None
    for k, b in enumerate(batches):
        _, state = method.step(state, net, params, b)
        history.append(state)
        g = net.grad(params, b.x, b.y, b.loss)
        m = g if m is None else [mu * a + c for a, c in zip(m, g)]
        if k % 2 == 0:
            new = [[_contractions(T) for T in to_tensors(lay, gl)] for lay, gl in zip(net.layers_trainable, g)]
            stats = new if stats is None else [[[beta * S + (1 - beta) * Sn for S, Sn in zip(t, tn)]
                                                for t, tn in zip(lay, ln)] for lay, ln in zip(stats, new)]
        for a, c in zip(state.m, m):
            assert_close(a, c, rtol=1e-14)
        for S, Sref in zip(_leaves(state.G_hat), _leaves(stats)):
            assert_close(S, Sref, rtol=1e-13, atol=0, what=f"statistics at step {k}")
        if k % 3 == 0:  # refreshed from this step's statistics
            for Xs, Srefs in zip(_leaves_tensors(state.roots), _leaves_tensors(stats)):
                for X, Sref in zip(Xs, Srefs):
                    ref = np.real(fractional_matrix_power(Sref + eps * np.eye(len(Sref)), -1.0 / (2 * len(Xs))))
                    assert_close(X, ref, rtol=forward_tol(len(Sref), np.linalg.cond(Sref + eps * np.eye(len(Sref)))),
                                 atol=0, what=f"root at step {k}")

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))

    R = [h.roots for h in history]
    assert same(R[0], R[1]) and same(R[1], R[2]) and same(R[3], R[4]) and same(R[4], R[5])
    assert not same(R[2], R[3]) and not same(R[5], R[6])
    S = [h.G_hat for h in history]
    assert same(S[0], S[1]) and same(S[2], S[3]) and not same(S[1], S[2]) and not same(S[3], S[4])
    # stale: at k = 4 the statistics have moved but the damped snapshot is the k = 3 one
    assert same(history[4].factors, history[3].factors)
    assert not same(history[4].factors, [[[Si + eps * np.eye(len(Si)) for Si in t] for t in lay] for lay in S[4]])


def test_warm_start_and_first_ema():
    """Line 2: Ĝ^{(i)} = mean over the warm-start batches of Ḡ^{(i)}; the first step then
    applies the EMA to it (instead of setting Ĝ from the first mini-batch)."""
    net = _cnn()
    params = net.init(2)
    warm, (b0,) = _cnn_batches(3, seed=5), _cnn_batches(1, seed=6)
    method = Shampoo(beta=0.8, conv_modes=3)
    state = method.warm_start(method.init(net, params), net, params, warm)
    C = [[[_contractions(T) for T in to_tensors(lay, gl, 3)] for lay, gl in
          zip(net.layers_trainable, net.grad(params, b.x, b.y, b.loss))] for b in warm + [b0]]
    for leaf, *refs in zip(_leaves(state.G_hat), *[_leaves(c) for c in C[:3]]):
        assert_close(leaf, sum(refs) / 3, rtol=1e-13, atol=0)
    _, state = method.step(state, net, params, b0)
    for leaf, *refs in zip(_leaves(state.G_hat), *[_leaves(c) for c in C]):
        assert_close(leaf, 0.8 * sum(refs[:3]) / 3 + 0.2 * refs[3], rtol=1e-13, atol=0)


def test_two_sided_form_of_gupta_et_al_and_descent():
    """k = 2: the direction of a Linear weight is −L^{−1/4} g R^{−1/4} with L = ggᵀ + εI,
    R = gᵀg + εI (Gupta et al. 2018, Algorithm 1), written with numpy products and scipy's
    fractional power; the bias (k = 1) gets (bbᵀ + εI)^{−1/2} b = b/√(‖b‖² + ε) (b is an
    eigenvector). One step, so Ĝ is the first mini-batch's statistics and m̂ = g. Newton roots
    are within ρ_i (``_root_rtol``) of the exact ones, so
    ‖L_N g R_N − L̂ g R̂‖_F ≤ ‖L̂‖₂‖g‖_F‖R̂‖₂((1 + ρ_L)(1 + ρ_R) − 1) (+ rounding, C·n·eps);
    ρ = C·n·eps·κ for eigh and scipy. SPD preconditioner: ⟨g, d⟩ < 0."""
    net = Sequential([Linear(4, 5), Tanh(), Linear(5, 3)])
    rng = np.random.default_rng(4)
    params = [2 * W for W in net.init(4)]
    b = Batch(rng.standard_normal((7, 4)), rng.integers(0, 3, 7), CrossEntropy())
    g = net.grad(params, b.x, b.y, b.loss)
    for roots in ("newton", "eigh"):
        for eps in (1e-3, 0.3):
            method = Shampoo(damping=eps, root_method=roots)
            d, state = method.step(method.init(net, params), net, params, b)
            for gl, dl, reps in zip(g, d, state.newton):
                G, gb = gl[:, :-1], gl[:, -1]
                L, R = G @ G.T + eps * np.eye(len(G)), G.T @ G + eps * np.eye(G.shape[1])
                Lr = np.real(fractional_matrix_power(L, -0.25))
                Rr = np.real(fractional_matrix_power(R, -0.25))
                (rL, rR), (rb,) = reps
                rho = [_root_rtol(A, r, 4) + forward_tol(len(A), np.linalg.cond(A)) for A, r in ((L, rL), (R, rR))]
                tol = np.linalg.norm(Lr, 2) * np.linalg.norm(G) * np.linalg.norm(Rr, 2) * (
                    (1 + rho[0]) * (1 + rho[1]) - 1 + residual_tol(G.size))
                assert_close(dl[:, :-1], -Lr @ G @ Rr, rtol=0, atol=tol)
                B = np.outer(gb, gb) + eps * np.eye(len(gb))
                rho_b = _root_rtol(B, rb, 2) + forward_tol(len(gb), np.linalg.cond(B))
                tol_b = np.linalg.norm(gb) / np.sqrt(eps) * rho_b  # ‖(bbᵀ + εI)^{−1/2}‖₂ = ε^{−1/2}
                assert_close(dl[:, -1], -gb / np.sqrt(gb @ gb + eps), rtol=0, atol=tol_b)
                assert float((gl * dl).sum()) < 0


def test_weight_decay_is_decoupled_and_applies_to_every_tensor():
    """Line 15: p ← p + γW on weights and biases, after (not inside) the momentum and the
    preconditioner: d(γ) = d(0) − γW."""
    net = _cnn()
    params = net.init(3)
    (b,) = _cnn_batches(1, seed=7)
    d0, s0 = Shampoo(root_method="eigh").step(Shampoo().init(net, params), net, params, b)
    d1, s1 = Shampoo(root_method="eigh", weight_decay=0.25).step(Shampoo().init(net, params), net, params, b)
    for a, c, W in zip(d1, d0, params):
        assert_close(a, c - 0.25 * W, rtol=1e-14, atol=1e-15)
    for a, c in zip(s1.m, s0.m):
        assert np.array_equal(a, c)


def test_newton_failure_policy():
    """``newton_max_iter=1`` cannot meet the 1e-6 stopping rule: "eigh" falls back to the eigh
    root (RuntimeWarning, counted in state.newton_fallbacks, report kept); "raise" raises."""
    net = _cnn()
    params = net.init(0)
    (b,) = _cnn_batches(1)
    method = Shampoo(newton_max_iter=1)
    with pytest.warns(RuntimeWarning, match="coupled Newton .* stopped after 1 iterations"):
        _, state = method.step(method.init(net, params), net, params, b)
    reps = list(_leaves(state.newton))
    n_failed = sum(not r.converged for r in reps)
    assert n_failed > 0 and state.newton_fallbacks == n_failed
    for Xs, Ds, Rs in zip(_leaves_tensors(state.roots), _leaves_tensors(state.factors),
                          _leaves_tensors(state.newton)):
        for X, D, r in zip(Xs, Ds, Rs):
            if not r.converged:
                assert np.array_equal(X, inv_root_eigh(D, 2 * len(Xs)))
    with pytest.raises(NewtonConvergenceError, match="max\\|M − I\\|"):
        Shampoo(newton_max_iter=1, on_newton_failure="raise").step(method.init(net, params), net, params, b)


def test_bad_hyper_parameters():
    for kwargs, match in [({"damping": 0.0}, "damping"), ({"beta": 1.0}, "beta"), ({"momentum": -0.1}, "momentum"),
                          ({"weight_decay": -1e-3}, "weight_decay"), ({"weight_decay": float("nan")}, "weight_decay"),
                          ({"T_stats": 0}, "T_stats"), ({"T_inv": 1.5}, "T_inv"), ({"conv_modes": 2}, "conv_modes"),
                          ({"conv_modes": 3.0}, "conv_modes"),
                          ({"root_method": "svd"}, "root_method"), ({"newton_tol": 0.0}, "newton_tol"),
                          ({"newton_max_iter": 0}, "newton_max_iter"), ({"on_newton_failure": "ignore"}, "on_newton")]:
        with pytest.raises(HyperParameterError, match=match):
            Shampoo(**kwargs)
    with pytest.raises(HyperParameterError, match="at least one batch"):
        Shampoo().warm_start(Shampoo().init(_cnn(), _cnn().init(0)), _cnn(), _cnn().init(0), [])


def test_training_smoke_decreases_loss_on_a_cnn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 1, 6, 6))
    y = (x[:, 0, :3].mean(axis=(1, 2)) > x[:, 0, 3:].mean(axis=(1, 2))).astype(int)
    net = Sequential([Conv2d(1, 3, 3), Tanh(), Flatten(), Linear(3 * 4 * 4, 2)], input_shape=(1, 6, 6))
    _, hist = train(Shampoo(damping=1e-2, conv_modes=3, T_inv=3), net, net.init(0), x, y, CrossEntropy(), steps=30,
                    lr=0.02, batch_size=32, seed=1)
    assert hist["loss"][-1] < 0.6 * hist["loss"][0]


# ------------------------------------------------ issue 9: typed state, phase, curvature
from refcurv.methods.shampoo import ShampooState  # noqa: E402


def test_phase_paper_is_a_literal_replay_of_algorithm_16():
    """phase="paper": line 8 (statistics) and line 11 (roots) at the printed t ≡ 0 (mod T),
    t = k + 1, after the warm start of line 2; the roots line 14 needs before t = T_2 are
    computed once at t = 1 from the warm-start statistics. Replayed: Ĝ, m̂, the roots and the
    direction (eigh roots, so to rounding) at every t."""
    net = _cnn()
    params = net.init(1)
    T1, T2, beta, mu, eps = 2, 3, 0.7, 0.5, 0.03
    method = Shampoo(T_stats=T1, T_inv=T2, beta=beta, momentum=mu, damping=eps, root_method="eigh", phase="paper")
    warm, batches = _cnn_batches(2, seed=1), _cnn_batches(7, seed=3)
    state = method.warm_start(method.init(net, params), net, params, warm)
    G = [[[sum(c) / 2 for c in zip(*[_contractions(T) for T in ts])] for ts in zip(*[to_tensors(lay, gl) for gl in gls])]
         for lay, gls in zip(net.layers_trainable, zip(*[net.grad(params, b.x, b.y, b.loss) for b in warm]))]
    m, R = None, None
    for t, b in enumerate(batches, start=1):
        d, state = method.step(state, net, params, b)
        g = net.grad(params, b.x, b.y, b.loss)
        m = g if m is None else [mu * a + c for a, c in zip(m, g)]                           # line 7
        if t % T1 == 0:                                                                         # lines 8-9
            new = [[_contractions(T) for T in to_tensors(lay, gl)] for lay, gl in zip(net.layers_trainable, g)]
            G = [[[beta * S + (1 - beta) * Sn for S, Sn in zip(a, c)] for a, c in zip(A, C)] for A, C in zip(G, new)]
        if t % T2 == 0 or R is None:                                                            # lines 11-12
            R = [[[np.real(fractional_matrix_power(S + eps * np.eye(len(S)), -1 / (2 * len(ts)))) for S in ts]
                  for ts in lay] for lay in G]
        assert state.diagnostics == {"refreshed": t % T2 == 0 or t == 1, "stats_refreshed": t % T1 == 0,
                                     "newton_fallbacks": 0}
        for S, Sref in zip(_leaves(state.G_hat), _leaves(G)):
            assert_close(S, Sref, rtol=1e-13, atol=0, what=f"t = {t}")
        for lay, ml, dl, Rl in zip(net.layers_trainable, m, d, R):                              # line 14
            for M, D, Rs in zip(to_tensors(lay, ml), to_tensors(lay, dl), Rl):
                ref = -(reduce_kron(Rs) @ M.ravel())
                kappa = max(np.linalg.cond(r) for r in Rs) ** len(Rs)
                assert_close(D.ravel(), ref, rtol=forward_tol(ref.size, kappa), atol=0, what=f"t = {t}")


def reduce_kron(Rs):
    out = Rs[0]
    for r in Rs[1:]:
        out = np.kron(out, r)
    return out


def test_state_curvature_and_momentum_form():
    """ShampooState fields; curvature = BlockDiagonal of Inverse(⊗R_i) per tensor: −C⁻¹m is the
    fast direction; newton_fallbacks in the state and diagnostics; momentum_form="ema"."""
    net = _cnn()
    params = net.init(3)
    (b,) = _cnn_batches(1, seed=7)
    method = Shampoo(root_method="eigh")
    d, st = method.step(method.init(net, params), net, params, b)
    assert type(st) is ShampooState and st.newton_fallbacks == 0 and st.diagnostics["newton_fallbacks"] == 0
    from refcurv import flatten
    C = method.curvature(st)
    assert_close(-C.solve(flatten(st.m)), flatten(d), rtol=residual_tol(net.n_params))
    P = np.linalg.inv(C.todense())
    assert_close(-P @ flatten(st.m), flatten(d), rtol=forward_tol(net.n_params, np.linalg.cond(P)))
    ema = Shampoo(momentum_form="ema", momentum=0.8, root_method="eigh")
    _, se = ema.step(ema.init(net, params), net, params, b)
    for a, g in zip(se.m, net.grad(params, b.x, b.y, b.loss)):
        assert_close(a, 0.2 * g, rtol=1e-15)
    with pytest.raises(HyperParameterError, match="phase"):
        Shampoo(phase="t1")
