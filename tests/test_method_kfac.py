"""KFAC ([Ren-thesis] Algorithms 7 and 12): the fast form against the independent dense form
(a literal replay solving the dense damped Kronecker matrix), factor exactness, the refresh
phases against a literal replay of the printed schedule, typed draws (labels consumed
exactly), the curvature operator, momentum forms, smoke training."""
import dataclasses

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import ArgumentTypeError, DrawsError, HyperParameterError, ShapeError, StateError
from refcurv.methods.base import Batch, Draws
from refcurv.methods.diagnostics import SCHEMA
from refcurv.methods.kfac import KFAC, KFACState
from refcurv.methods.vocabulary import FISHER_KINDS
from refcurv.nn import MSE, Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.operators import BlockDiagonal, Kronecker
from refcurv.testing.strategies import Problem, problems
from refcurv.testing.tolerance import EPS, assert_close, forward_tol, residual_tol
from refcurv.train import train


def _batch(pb, shift=0):
    params, x, y = pb.data()
    if shift:
        x = x + shift * np.random.default_rng(pb.seed + shift).standard_normal(x.shape)
    return params, Batch(x, y, pb.loss_fn)


def _mlp_batches(n, N=5, seed=0, loss=None):
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    rng = np.random.default_rng(seed)
    loss = loss or CrossEntropy()
    if isinstance(loss, MSE):
        return net, [Batch(rng.standard_normal((N, 3)), rng.standard_normal((N, 2)), loss) for _ in range(n)]
    return net, [Batch(rng.standard_normal((N, 3)), rng.integers(0, 2, N), loss) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- fast vs dense


@given(problems(), st.sampled_from(["pi", "sqrt"]), st.sampled_from(["expand", "reduce"]),
       st.sampled_from(FISHER_KINDS), st.floats(1e-4, 1.0), st.integers(2, 3), st.integers(2, 3),
       st.sampled_from([0.0, 0.9]), st.sampled_from(["heavy_ball", "ema"]), st.sampled_from(["k0", "paper"]))
def test_fast_equals_dense_kronecker_solve_step_by_step(pb, split, conv, fisher, lam, T_stats, T_inv, mom, form,
                                                        phase):
    """The fast form (EMA, damped_split, explicit inverses, −H_Γ m H_Ω) against the dense
    form, a separate literal replay (its own EMA, trace split, refresh decisions, momentum;
    the Cholesky solve of [(Γ + √λ/π I) ⊗ (Ω + π√λ I)] in row-major vec), over 6 steps with
    T_stats, T_inv > 1 (stale statistics and stale inverses), β = 0.7 ≠ ½ and the trace split
    π ≠ 1. Directions at the forward error of the dense solve, C·n·eps·κ(Γ_d)κ(Ω_d);
    statistics and splits (the same float64 arithmetic in another order) at C·n·eps."""
    net = pb.net
    method = KFAC(damping=lam, split=split, conv=conv, fisher=fisher, T_stats=T_stats, T_inv=T_inv, momentum=mom,
                  momentum_form=form, phase=phase, beta=0.7, n_samples=2)
    params, _ = _batch(pb)
    state_f = state_d = method.init(net, params)
    for k in range(6):
        _, batch = _batch(pb, shift=k)
        draws = method.draw(np.random.default_rng(k), state_f, net, params, batch)
        df, state_f = method.step(state_f, net, params, batch, draws=draws)
        dd, state_d = method.step(state_d, net, params, batch, draws=draws, dense=True)
        assert state_f.diagnostics == state_d.diagnostics, f"step {k}"
        for O, G, Od_, Gd_ in zip(state_f.Omega, state_f.Gamma, state_d.Omega, state_d.Gamma):
            assert_close(O, Od_, rtol=residual_tol(O.shape[0]), atol=0, what=f"Ω step {k}")
            assert_close(G, Gd_, rtol=residual_tol(G.shape[0]), atol=0, what=f"Γ step {k}")
        assert_close(state_f.pi, state_d.pi, rtol=residual_tol(1), atol=0, what=f"π step {k}")
        for a, b, Od, Gd in zip(df, dd, state_d.Omega_damped, state_d.Gamma_damped):
            kappa = np.linalg.cond(Od) * np.linalg.cond(Gd)
            assert_close(a, b, rtol=forward_tol(a.size, kappa), atol=0, what=f"step {k}")


def test_dense_form_does_not_use_the_fast_update_code():
    """Issue 9: the dense form is rebuilt from curvature.kfac_factors and a literal replay; its
    source calls none of the fast form's helpers."""
    import inspect

    from refcurv.methods import kfac

    src = inspect.getsource(kfac.KFAC._dense)
    for name in ("_fast", "kfc_factors(", "damped_split", "self.schedule(", "refresh_due", "split_pi", "_locations"):
        assert name not in src.replace("cv.kfac_factors(", ""), name


def test_states_cross_between_forms():
    """The dense state carries no inverses; the fast form continuing from it computes them
    from the stored damped factors (not a refresh) and agrees with the dense form continuing."""
    net, batches = _mlp_batches(4)
    params = net.init(0)
    method = KFAC(fisher="exact", T_inv=3, T_stats=2, beta=0.7, momentum=0.9)
    s = method.init(net, params)
    _, s = method.step(s, net, params, batches[0], dense=True)
    assert s.H_Omega is None and s.H_Gamma is None
    sf, sd = s, s
    for b in batches[1:3]:  # k = 1, 2: no refresh of the inverses
        df, sf = method.step(sf, net, params, b)
        dd, sd = method.step(sd, net, params, b, dense=True)
        assert not sf.diagnostics["refreshed"] and sf.diagnostics == sd.diagnostics
        for a, c, Od, Gd in zip(df, dd, sd.Omega_damped, sd.Gamma_damped):
            assert_close(a, c, rtol=forward_tol(a.size, np.linalg.cond(Od) * np.linalg.cond(Gd)), atol=0)


@given(problems(kind=st.just("mlp")))
def test_kronecker_identity_in_both_vec_orders(pb):
    """(H_Γ ⊗ H_Ω) vec_row(m) = vec_row(H_Γ m H_Ω) and (H_Ω ⊗ H_Γ) vec_col(m) = vec_col(H_Γ m H_Ω)
    (thesis (2.4) is the column-major statement)."""
    net = pb.net
    params, batch = _batch(pb)
    d, st_ = KFAC(fisher="exact").step(KFAC(fisher="exact").init(net, params), net, params, batch)
    for mi, di, HO, HG, shape in zip(st_.m, d, st_.H_Omega, st_.H_Gamma, net.param_shapes):
        # two evaluation orders of the same products: error ≤ C·n·eps·‖H_Γ‖‖m‖‖H_Ω‖ (absolute;
        # relative to the result it can be large when H_Γ m H_Ω cancels)
        tol = 100 * mi.size * EPS * np.linalg.norm(HG, 2) * np.linalg.norm(mi) * np.linalg.norm(HO, 2)
        assert_close(np.kron(HG, HO) @ mi.ravel(), -di.ravel(), rtol=0, atol=tol)
        col = rc.to_order(mi.ravel(), [shape], "col")
        assert_close(np.kron(HO, HG) @ col, rc.to_order(-di.ravel(), [shape], "col"), rtol=0, atol=tol)


# ----------------------------------------------------------------------------- factors


def _assert_factors_exact(pb):
    net = pb.net
    params, batch = _batch(pb)
    method = KFAC(fisher="exact")
    _, state = method.step(method.init(net, params), net, params, batch)
    blocks = cv.ggn(net, params, batch.x, batch.y, pb.loss_fn, blocks=True)
    for O, G, B in zip(state.Omega, state.Gamma, blocks):
        assert_close(np.kron(G, O), B, rtol=1e-12, atol=1e-15)


@given(problems(kind=st.just("mlp"), max_batch=1))
def test_factors_exact_for_batch_of_one(pb):
    _assert_factors_exact(pb)


@given(st.integers(1, 3), st.integers(2, 6), st.integers(0, 2**31 - 1), st.data())
def test_factors_exact_for_deep_linear_mse(n_layers, N, seed, data):
    widths = [data.draw(st.integers(1, 5)) for _ in range(n_layers + 1)]
    spec = tuple(("linear", widths[i], widths[i + 1], data.draw(st.booleans())) for i in range(n_layers))
    _assert_factors_exact(Problem(spec, (widths[0],), widths[-1], "mse", N, seed))


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
    for O, Gm, a, g in zip(state.Omega, state.Gamma, A, G):
        N, d, T = a.shape
        Oref, Gref = np.zeros((d, d)), np.zeros((g.shape[1],) * 2)
        for n in range(N):
            for t in range(T):
                Oref += np.outer(a[n, :, t], a[n, :, t]) / N
                Gref += np.outer(g[n, :, t], g[n, :, t]) / (N * T)
        assert_close(O, Oref, rtol=1e-13)
        assert_close(Gm, Gref, rtol=1e-13, atol=1e-16)


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


# ----------------------------------------------------------------------------- schedule


def test_k0_phase_staleness_ema_and_descent():
    """phase="k0": statistics at k ≡ 0 (mod T_stats), inverses at k ≡ 0 (mod T_inv), 0-based;
    the EMA X_2 = β X_1 + (1 − β) X_batch; descent for μ = 0."""
    net, batches = _mlp_batches(7)
    params = net.init(1)
    method = KFAC(fisher="exact", T_inv=3, T_stats=2, beta=0.7)
    state = method.init(net, params)
    history = []
    for k, b in enumerate(batches):
        d, state = method.step(state, net, params, b)
        history.append(state)
        assert state.diagnostics == {"refreshed": k % 3 == 0, "stats_refreshed": k % 2 == 0}
        assert set(state.diagnostics) <= set(SCHEMA)
        g = net.grad(params, b.x, b.y, b.loss)
        assert sum(float((gi * di).sum()) for gi, di in zip(g, d)) < 0  # descent (μ = 0)
    # EMA of the statistics: X after step 2 = β X_batch0 + (1 − β) X_batch2 (step 0 sets them)
    F = [cv.kfac_factors(net, params, b.x, b.y, b.loss, kind="exact") for b in (batches[0], batches[2])]
    for O, G, (O0, G0), (O2, G2) in zip(history[2].Omega, history[2].Gamma, F[0], F[1]):
        assert_close(O, 0.7 * O0 + 0.3 * O2, rtol=1e-13)
        assert_close(G, 0.7 * G0 + 0.3 * G2, rtol=1e-13)
    assert _same(history[1].Omega, history[0].Omega)  # k = 1: stale statistics
    # inverses recomputed at k = 0, 3, 6 only
    for k in range(1, 7):
        assert _same(history[k].H_Omega, history[k - 1].H_Omega) == (k % 3 != 0), k
        assert _same(history[k].Omega_damped, history[k - 1].Omega_damped) == (k % 3 != 0), k


def _literal_replay(method, net, params, batches, labels, warm=None):
    """Thesis Algorithm 7 / 12 written out with the 1-based iteration k of the text:
    statistics updated "if k ≡ 0 (mod T_1)" (Alg. 12 line 11), inverses recomputed "if k ≤ T
    or k ≡ 0 (mod T)" (Alg. 7 line 10), H_Ω = (Ω + π√λI)⁻¹, H_Γ = (Γ + (1/π)√λI)⁻¹ (Alg. 12
    line 19), p = H_Γ m H_Ω with m = βm + g (line 7, μ for β). Refresh before the direction:
    refcurv's documented deviation (the step does not know the learning rate). Ω, Γ start at
    the warm start (line 2) or, without one, at the first iteration's mini-batch."""
    T1, T, lam, beta, mu = method.T_stats, method.T_inv, method.damping, method.beta, method.momentum
    Omega, Gamma = warm if warm is not None else (None, None)
    m = [np.zeros(s) for s in net.param_shapes]
    H_O = H_G = None
    out = []
    for k in range(1, len(batches) + 1):
        b = batches[k - 1]
        g = net.grad(params, b.x, b.y, b.loss)
        m = [mu * mi + gi for mi, gi in zip(m, g)]
        stats = k % T1 == 0 or Omega is None
        if stats:
            F = cv.kfac_factors(net, params, b.x, b.y, b.loss, kind="mc", labels=labels[k - 1])
            if Omega is None:
                Omega, Gamma = [A for A, _ in F], [G for _, G in F]  # Linear layers: T = 1
            else:
                Omega = [beta * O + (1 - beta) * A for O, (A, _) in zip(Omega, F)]
                Gamma = [beta * G_ + (1 - beta) * G for G_, (_, G) in zip(Gamma, F)]
        inv = k <= T or k % T == 0
        if inv:
            H_O, H_G = [], []
            for O, G in zip(Omega, Gamma):
                pi = np.sqrt((np.trace(O) / len(O)) / (np.trace(G) / len(G)))
                H_O.append(np.linalg.inv(O + pi * np.sqrt(lam) * np.eye(len(O))))
                H_G.append(np.linalg.inv(G + np.sqrt(lam) / pi * np.eye(len(G))))
        out.append(([-(hg @ mi @ ho) for hg, mi, ho in zip(H_G, m, H_O)], stats, inv))
    return out


@pytest.mark.parametrize("T_stats,T_inv", [(1, 3), (2, 3), (3, 2), (2, 1)])
@pytest.mark.parametrize("warm", [False, True])
def test_paper_phase_is_the_printed_schedule(T_stats, T_inv, warm):
    """phase="paper" against a literal replay of Algorithm 7 line 10 / Algorithm 12 line 11
    (1-based k), with and without the warm start of Algorithm 12 line 2; directions at the
    forward error of the inverses."""
    net, batches = _mlp_batches(8, seed=3)
    params = net.init(2)
    method = KFAC(phase="paper", T_stats=T_stats, T_inv=T_inv, beta=0.8, momentum=0.5, damping=0.05, n_samples=2)
    state = method.init(net, params)
    warm_factors = None
    if warm:
        wb = Batch(np.random.default_rng(9).standard_normal((11, 3)), np.zeros(11, dtype=int), CrossEntropy())
        wd = method.draw(np.random.default_rng(99), state, net, params, wb)
        state = method.warm_start(state, net, params, wb, draws=wd)
        warm_factors = (state.Omega, state.Gamma)
    labels, got = [], []
    for k, b in enumerate(batches):
        draws = method.draw(np.random.default_rng(k), state, net, params, b)
        labels.append(draws.labels)
        d, state = method.step(state, net, params, b, draws=draws)
        got.append((d, state.diagnostics["stats_refreshed"], state.diagnostics["refreshed"], state))
    want = _literal_replay(method, net, params, batches, labels, warm_factors)
    for k, ((d, s, r, st_), (dw, sw, rw)) in enumerate(zip(got, want)):
        assert (s, r) == (sw, rw), f"iteration {k + 1}"
        kappa = max(np.linalg.cond(O) * np.linalg.cond(G) for O, G in zip(st_.Omega_damped, st_.Gamma_damped))
        for a, b in zip(d, dw):
            assert_close(a, b, rtol=forward_tol(a.size, kappa), atol=0, what=f"iteration {k + 1}")
    # the printed schedule differs from k0: inverses at each of the first T_inv iterations
    flags = [r for _, _, r, _ in got]
    assert flags[:T_inv] == [True] * T_inv


def test_schedule_formulas():
    for T1, T2 in [(1, 1), (2, 3), (4, 2)]:
        k0 = KFAC(T_stats=T1, T_inv=T2)
        paper = KFAC(T_stats=T1, T_inv=T2, phase="paper")
        for k in range(20):
            assert k0.schedule(k) == (k % T1 == 0, k % T2 == 0)
            assert paper.schedule(k) == ((k + 1) % T1 == 0, k + 1 <= T2 or (k + 1) % T2 == 0)


# ----------------------------------------------------------------------------- draws


@pytest.mark.parametrize("loss", [CrossEntropy(), MSE()], ids=["ce", "mse"])
def test_draws_are_labels_from_the_model_and_consumed_exactly(loss):
    """draw() samples labels (n_samples, N, …) from the predictive distribution; the MC
    statistics of a step are those of the injected labels: the mean over s of the
    empirical-kind factors at y = labels[s] (so a foreign implementation's labels replay)."""
    net, batches = _mlp_batches(1, N=6, loss=loss)
    params = net.init(0)
    b = batches[0]
    method = KFAC(n_samples=3)
    state = method.init(net, params)
    draws = method.draw(np.random.default_rng(5), state, net, params, b)
    assert draws.method == "kfac" and isinstance(draws.labels, np.ndarray)
    assert draws.labels.shape == (3,) + b.y.shape
    f = net.forward(params, b.x)
    assert np.array_equal(draws.labels, loss.sample(f, n_samples=3, seed=np.random.default_rng(5)))
    # hand-made labels, injected
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (3, 6)) if isinstance(loss, CrossEntropy) else rng.standard_normal((3, 6, 2))
    for dense in (False, True):
        _, s = method.step(state, net, params, b, draws=Draws(method="kfac", labels=labels), dense=dense)
        emp = [cv.kfac_factors(net, params, b.x, y, loss, kind="empirical") for y in labels]
        for layer, (O, G) in enumerate(zip(s.Omega, s.Gamma)):
            assert_close(O, emp[0][layer][0], rtol=1e-14)
            assert_close(G, np.mean([e[layer][1] for e in emp], axis=0), rtol=1e-13)


def test_draws_shape_errors_and_kinds_without_draws():
    net, batches = _mlp_batches(1)
    params = net.init(0)
    b = batches[0]
    method = KFAC(n_samples=2)
    state = method.init(net, params)
    assert method.draw_fields == ("labels",)
    for bad in (np.zeros((1, 5), dtype=int), np.zeros((2, 4), dtype=int), np.zeros((2, 5, 1), dtype=int),
                np.zeros(5, dtype=int)):
        with pytest.raises(DrawsError, match="kfac.*labels"):
            method.step(state, net, params, b, draws=Draws(method="kfac", labels=bad))
    with pytest.raises(DrawsError, match="labels"):
        method.step(state, net, params, b, draws=Draws(method="kfac"))
    for fisher in ("exact", "empirical"):
        m2 = KFAC(fisher=fisher)
        assert m2.draw_fields == ()
        assert m2.draw(np.random.default_rng(0), state, net, params, b) == Draws(method="kfac")
        with pytest.raises(DrawsError, match=f"kfac.*labels.*{fisher}"):
            m2.step(state, net, params, b, draws=Draws(method="kfac", labels=np.zeros((1, 5), dtype=int)))


def test_labels_are_drawn_at_every_step():
    """The stream of draws does not depend on the schedule: labels at every step (consumed
    on the steps that refresh the statistics)."""
    net, batches = _mlp_batches(3)
    params = net.init(0)
    method = KFAC(T_stats=5)
    state = method.init(net, params)
    for k, b in enumerate(batches):
        draws = method.draw(np.random.default_rng(k), state, net, params, b)
        assert draws.labels.shape == (1, 5)
        _, state = method.step(state, net, params, b, draws=draws)


def test_warm_start_sets_the_statistics_from_any_data():
    net, batches = _mlp_batches(2)
    params = net.init(0)
    method = KFAC(fisher="exact", beta=0.6)
    wb = Batch(np.random.default_rng(3).standard_normal((13, 3)), np.zeros(13, dtype=int), CrossEntropy())
    state = method.warm_start(method.init(net, params), net, params, wb)
    F = cv.kfac_factors(net, params, wb.x, wb.y, wb.loss, kind="exact")
    assert all(np.allclose(O, A, rtol=0, atol=0) for O, (A, _) in zip(state.Omega, F))
    _, s1 = method.step(state, net, params, batches[0])
    F1 = cv.kfac_factors(net, params, batches[0].x, batches[0].y, batches[0].loss, kind="exact")
    for O, (A0, _), (A1, _) in zip(s1.Omega, F, F1):
        assert_close(O, 0.6 * A0 + 0.4 * A1, rtol=1e-13)
    with pytest.raises(StateError, match="kfac"):
        method.warm_start({}, net, params, wb)


# ----------------------------------------------------------------------------- curvature


def test_curvature_operator_is_the_damped_kronecker_blocks_of_the_last_refresh():
    """C = BlockDiagonal_l[(Γ + √λ/π I) ⊗ (Ω + π√λ I)] with the factors of the last inverse
    refresh (stale in between), rhs = m; −C⁻¹ m is the fast form's direction."""
    net, batches = _mlp_batches(5)
    params = net.init(0)
    method = KFAC(fisher="exact", T_inv=2, momentum=0.9, damping=0.1)
    state = method.init(net, params)
    with pytest.raises(StateError, match="kfac"):
        method.curvature(state)
    for k, b in enumerate(batches):
        d, state = method.step(state, net, params, b)
        C = method.curvature(state)
        assert isinstance(C, BlockDiagonal) and all(isinstance(B, Kronecker) for B in C.blocks)
        dense = scipy.linalg.block_diag(*[np.kron(Gd, Od) for Od, Gd in zip(state.Omega_damped, state.Gamma_damped)])
        assert np.array_equal(C.todense(), dense)
        # Ω + π√λ I from the stored statistics at refresh steps
        if state.diagnostics["refreshed"]:
            for O, Od, p in zip(state.Omega, state.Omega_damped, state.pi):
                assert_close(Od, O + p * np.sqrt(0.1) * np.eye(len(O)), rtol=1e-15)
        g = net.grad(params, b.x, b.y, b.loss)
        v = rc.flatten(method.rhs(state, g))
        assert np.array_equal(v, rc.flatten(state.m))
        ev = C.eigvalsh()
        assert_close(-C.solve(v), rc.flatten(d), rtol=forward_tol(v.size, ev[-1] / ev[0]), atol=0)


# ----------------------------------------------------------------------------- momentum


def test_momentum_forms():
    """heavy_ball (Alg. 12 line 7): m ← μ m + g; ema: m ← μ m + (1 − μ) g; both from m = 0."""
    net, batches = _mlp_batches(3)
    params = net.init(0)
    for form, c in (("heavy_ball", 1.0), ("ema", 0.25)):
        method = KFAC(fisher="exact", momentum=0.75, momentum_form=form)
        state, m = method.init(net, params), None
        for b in batches:
            g = net.grad(params, b.x, b.y, b.loss)
            m = [c * gi for gi in g] if m is None else [0.75 * mi + c * gi for mi, gi in zip(m, g)]
            _, state = method.step(state, net, params, b)
            for a, w in zip(state.m, m):
                assert_close(a, w, rtol=1e-15)


# ----------------------------------------------------------------------------- state, hyper-parameters


def test_state_fields_are_documented_and_frozen():
    docs = KFACState.field_docs()
    for f in ("k", "m", "Omega", "Gamma", "pi", "Omega_damped", "Gamma_damped", "H_Omega", "H_Gamma", "diagnostics"):
        assert docs[f]
    with pytest.raises(dataclasses.FrozenInstanceError):
        KFACState().Omega = 1
    assert KFAC.State is KFACState


def test_bad_hyper_parameters():
    for kwargs, match in [({"damping": 0.0}, "damping"), ({"beta": 1.0}, "beta"), ({"T_inv": 0}, "T_inv"),
                          ({"T_stats": 0}, "T_stats"), ({"split": "half"}, "split"), ({"conv": "sum"}, "conv"),
                          ({"fisher": "true"}, "fisher"), ({"fisher": "ggn"}, "fisher"),
                          ({"n_samples": 0}, "n_samples"), ({"momentum": -0.1}, "momentum"),
                          ({"momentum_form": "nesterov"}, "momentum_form"), ({"phase": "k1"}, "phase")]:
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


# ----------------------------------------------------------------------------- refcurv.curvature with labels


def test_curvature_fisher_words_are_the_vocabulary():
    assert cv.FISHER_KINDS == FISHER_KINDS
    net, batches = _mlp_batches(1)
    params, b = net.init(0), batches[0]
    with pytest.raises(HyperParameterError, match="'ggn' is now 'exact'"):
        cv.kfac_factors(net, params, b.x, b.y, b.loss, kind="ggn")
    for kind in FISHER_KINDS:
        assert len(cv.kfac_factors(net, params, b.x, b.y, b.loss, kind=kind, seed=0 if kind == "mc" else None)) == 2
    for kind in FISHER_KINDS:  # every word is accepted by curvature.fisher too
        F = cv.fisher(net, params, b.x, b.y, b.loss, kind=kind, seed=0 if kind == "mc" else None)
        assert F.shape == (net.n_params, net.n_params)


@pytest.mark.parametrize("loss", [CrossEntropy(), MSE()], ids=["ce", "mse"])
def test_curvature_mc_from_given_labels(loss):
    """kind="mc" with labels=: the labels drawn from the seed give the seeded result bit for
    bit; kfac_factors' G and fisher are the means over s of the data-label quantities at
    y = labels[s]; wrong labels are refused."""
    net, batches = _mlp_batches(1, N=4, loss=loss)
    params, b = net.init(0), batches[0]
    f = net.forward(params, b.x)
    L = loss.sample(f, n_samples=3, seed=np.random.default_rng(7))
    seeded = cv.kfac_factors(net, params, b.x, b.y, loss, kind="mc", n_samples=3, seed=7)
    given_ = cv.kfac_factors(net, params, b.x, b.y, loss, kind="mc", labels=L)
    assert all(np.array_equal(G1, G2) for (_, G1), (_, G2) in zip(seeded, given_))
    emp = [cv.kfac_factors(net, params, b.x, y, loss, kind="empirical") for y in L]
    for layer, (_, G) in enumerate(given_):
        assert_close(G, np.mean([e[layer][1] for e in emp], axis=0), rtol=1e-13)
    F = cv.fisher(net, params, b.x, loss=loss, kind="mc", labels=L)
    assert np.array_equal(F, cv.fisher(net, params, b.x, loss=loss, kind="mc", n_samples=3, seed=7))
    assert_close(F, np.mean([cv.empirical_fisher(net, params, b.x, y, loss) for y in L], axis=0), rtol=1e-13)
    with pytest.raises(ShapeError, match="n_samples"):
        cv.kfac_factors(net, params, b.x, b.y, loss, kind="mc", labels=L, n_samples=2)
    with pytest.raises(ShapeError, match="labels"):
        cv.kfac_factors(net, params, b.x, b.y, loss, kind="mc", labels=L[:, :3])
    with pytest.raises(ArgumentTypeError, match="seed or labels"):
        cv.kfac_factors(net, params, b.x, b.y, loss, kind="mc", labels=L, seed=1)
    with pytest.raises(ArgumentTypeError, match="kind='mc'"):
        cv.kfac_factors(net, params, b.x, b.y, loss, kind="exact", labels=L)
    with pytest.raises(ArgumentTypeError, match="kind='mc'"):
        cv.fisher(net, params, b.x, loss=loss, kind="exact", labels=L)


def test_curvature_mc_labels_are_checked_by_the_loss():
    from refcurv.errors import LabelError

    net, batches = _mlp_batches(1, N=4)
    params, b = net.init(0), batches[0]
    with pytest.raises(LabelError):
        cv.kfac_factors(net, params, b.x, b.y, b.loss, kind="mc", labels=np.full((2, 4), 7))


def test_conv_net_steps_in_both_forms_with_paper_phase():
    net = Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)])
    rng = np.random.default_rng(0)
    params = net.init(0)
    method = KFAC(phase="paper", T_stats=2, T_inv=2, conv="reduce", beta=0.7)
    sf = sd = method.init(net, params)
    for k in range(4):
        b = Batch(rng.standard_normal((4, 1, 3, 3)), rng.integers(0, 3, 4), CrossEntropy())
        draws = method.draw(np.random.default_rng(k), sf, net, params, b)
        df, sf = method.step(sf, net, params, b, draws=draws)
        dd, sd = method.step(sd, net, params, b, draws=draws, dense=True)
        for a, c, Od, Gd in zip(df, dd, sd.Omega_damped, sd.Gamma_damped):
            assert_close(a, c, rtol=forward_tol(a.size, np.linalg.cond(Od) * np.linalg.cond(Gd)), atol=0)
