"""TNT ([Ren-thesis] Ch.4, Algorithm 15): fast mode-product form vs the dense F_TNT solve, the
whole pipeline vs a loop-built reference, Proposition 1 for orders 1-4, the (4.10)
normalization, Lemma 10, T_1/T_2 staleness, label draws, the batch-mean statistic's 1/N
scaling (errata TNT-1), hyper-parameters, smoke training."""
import itertools
from functools import reduce

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import HyperParameterError
from refcurv.linalg.tensor import kron_apply
from refcurv.methods._tensors import to_tensors
from refcurv.methods.base import Batch
from refcurv.linalg.kronecker import damped_factors, f_tnt, normalized_factors as normalize
from refcurv.methods.tnt import TNT, sample_statistics
from refcurv.nn import MSE, Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing.strategies import problems
from refcurv.testing.tolerance import EPS, assert_close, forward_tol, rel_err, residual_tol
from refcurv.train import train


def _batch(pb, shift=0):
    params, x, y = pb.data()
    if shift:
        x = x + shift * np.random.default_rng(pb.seed + shift).standard_normal(x.shape)
    return params, Batch(x, y, pb.loss_fn)


def _leaves(nested):
    return [a for layer in nested for tensor in layer for a in tensor]


def _same_state(a, b, n_terms):
    """Fast and dense states: the same schedule, the same momentum (bit for bit: both are means
    of the same per-sample gradients); statistics and factors equal to rounding. The dense form
    computes them by an independent route (partial traces of the tensor's second moment from
    refcurv.curvature), so each entry is the same sum of ``n_terms`` products (≤ N·S·n) in
    another order: a backward error of C·n_terms·eps relative to the PSD sum's norm (the
    (4.10) scaling and +εI add O(eps))."""
    assert type(a) is type(b) and a.k == b.k and a.diagnostics == b.diagnostics
    for key in ("G_hat", "factors"):
        for x, y in zip(_leaves(getattr(a, key)), _leaves(getattr(b, key))):
            assert_close(x, y, rtol=residual_tol(n_terms), atol=0, what=key)
    for x, y in zip(a.m, b.m):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ independent reference
def _mat(T, i):
    """mat_i by the slice definition of §4.2.1: row j = vec̄ of the j-th slice along mode i."""
    return np.stack([np.take(T, j, axis=i).ravel() for j in range(T.shape[i])])


def _ref_stats(net, params, batch, labels, conv_modes, statistics):
    """Per layer / tensor / mode Ḡ^{(i)}, with explicit loops over samples."""
    U = net.per_sample_grads(params, batch.x, labels, batch.loss)
    out = []
    for layer, u in zip(net.layers_trainable, U):
        per_sample = [to_tensors(layer, u[n], conv_modes) for n in range(len(u))]
        tensors = []
        for q in range(len(per_sample[0])):
            Ts = [ts[q] for ts in per_sample]
            if statistics == "batch_mean":
                Ts = [sum(Ts) / len(Ts)]
            tensors.append([sum(_mat(T, i) @ _mat(T, i).T for T in Ts) / len(Ts) for i in range(Ts[0].ndim)])
        out.append(tensors)
    return out


def _ref_normalize(S):
    """(4.10) written out: c_0 = (tr S_i / Π d)^{1/k}, Ũ_i = S_i / (c_0^{k−1} Π_{j≠i} d_j)."""
    k, dims = len(S), [s.shape[0] for s in S]
    c0 = (np.trace(S[0]) / np.prod(dims)) ** (1 / k)
    return [S[i] / (c0 ** (k - 1) * np.prod([dims[j] for j in range(k) if j != i])) for i in range(k)]


# ------------------------------------------------------------------------ (1) dense = fast
@given(problems(), st.sampled_from([3, 4]), st.sampled_from(["per_sample", "batch_mean"]),
       st.floats(1e-2, 1.0), st.integers(1, 3), st.integers(1, 2), st.sampled_from([0.0, 0.9]),
       st.sampled_from([0.0, 0.3]))
def test_fast_equals_dense_F_TNT_solve_step_by_step(pb, conv_modes, statistics, eps, T_inv, T_stats, mom, wd):
    """p = m ×_1 (Ũ_1+εI)⁻¹ ⋯ ×_k (Ũ_k+εI)⁻¹ (4.8) equals F_TNT⁻¹ vec̄(m) with F_TNT = ⊗(Ũ_i+εI)
    formed and solved densely; both forms return the same state. Forward error of the dense
    Cholesky solve at C·n·eps·κ(F_TNT), κ(F_TNT) = Π_i κ(Ũ_i+εI), relative to ‖p‖."""
    net = pb.net
    method = TNT(damping=eps, conv_modes=conv_modes, statistics=statistics, T_inv=T_inv, T_stats=T_stats,
                 momentum=mom, weight_decay=wd, beta=0.5)
    params, _ = _batch(pb)
    state_f = state_d = method.init(net, params)
    for k in range(4):
        _, batch = _batch(pb, shift=k)
        df, state_f = method.step(state_f, net, params, batch, rng=k)
        dd, state_d = method.step(state_d, net, params, batch, rng=k, dense=True)
        _same_state(state_f, state_d, batch.x.shape[0] * net.n_params)
        for a, b, W, facs in zip(df, dd, params, state_d.factors):
            kappa = max(np.prod([np.linalg.cond(F) for F in fs]) for fs in facs)
            p = -b - wd * W
            assert_close(a, b, rtol=0, atol=forward_tol(a.size, kappa) * np.linalg.norm(p), what=f"step {k}")


@pytest.mark.parametrize("conv_modes", [3, 4])
@pytest.mark.parametrize("statistics", ["per_sample", "batch_mean"])
def test_first_direction_equals_loop_built_definition(conv_modes, statistics):
    """The whole pipeline against a reference written from the definitions: per-sample
    sampled gradients split by explicit loops, mat_i by slices (§4.2.1), (4.10) written out,
    F_TNT = ⊗(Ũ_i+εI) by np.kron, np.linalg.solve; labels are those of the step's draws."""
    net = Sequential([Conv2d(2, 3, (2, 3)), Tanh(), Flatten(), Linear(12, 3), Tanh(), Linear(3, 3)])
    rng = np.random.default_rng(5)
    params = [2 * W for W in net.init(1)]
    batch = Batch(rng.standard_normal((6, 2, 3, 4)), rng.integers(0, 3, 6), CrossEntropy())
    eps = 0.05
    method = TNT(damping=eps, conv_modes=conv_modes, statistics=statistics)
    d, state = method.step(method.init(net, params), net, params, batch, rng=11)
    draws = method.draw(np.random.default_rng(11), method.init(net, params), net, params, batch)
    S_ref = _ref_stats(net, params, batch, draws.labels[0], conv_modes, statistics)
    for S, R in zip(_leaves(state.G_hat), _leaves(S_ref)):
        assert_close(S, R, rtol=1e-12, atol=0)
    g = net.grad(params, batch.x, batch.y, batch.loss)
    for layer, gl, dl, S_layer in zip(net.layers_trainable, g, d, S_ref):
        for G, D, S in zip(to_tensors(layer, gl, conv_modes), to_tensors(layer, dl, conv_modes), S_layer):
            F = reduce(np.kron, [U + eps * np.eye(len(U)) for U in _ref_normalize(S)])
            ref = -np.linalg.solve(F, G.ravel())
            assert_close(D.ravel(), ref, rtol=forward_tol(F.shape[0], np.linalg.cond(F)), atol=0)


# --------------------------------------------------------------- (2) Proposition 1, k = 1..4
NETS = {
    3: Sequential([Conv2d(2, 3, (2, 2)), Tanh(), Flatten(), Linear(18, 2)]),
    4: Sequential([Conv2d(2, 3, (2, 3)), Tanh(), Flatten(), Linear(12, 2)]),
}


@pytest.mark.parametrize("conv_modes", [3, 4])
@given(seed=st.integers(0, 2**31 - 1), mom=st.sampled_from([0.0, 0.9]))
def test_proposition_1_in_method_context(conv_modes, seed, mom):
    """(⊗_i H_i) vec̄(M) = vec̄(M ×_1 H_1 ⋯ ×_k H_k) (4.3)/(4.9) for the state's inverses
    H_i = (Ũ_i+εI)⁻¹ applied to the momentum tensors and to random tensors, for tensors of
    order 1 (biases), 2 (Linear), 3 or 4 (Conv2d); and (⊗_i(Ũ_i+εI))(⊗_i H_i) = I."""
    net = NETS[conv_modes]
    rng = np.random.default_rng(seed)
    params = net.init(seed)
    method = TNT(damping=0.1, conv_modes=conv_modes, momentum=mom)
    state = method.init(net, params)
    for k in range(2):
        b = Batch(rng.standard_normal((5, 2, 3, 4)), rng.integers(0, 2, 5), CrossEntropy())
        _, state = method.step(state, net, params, b, rng=rng)
    orders = set()
    for layer, m, invs, facs in zip(net.layers_trainable, state.m, state.inverses, state.factors):
        for M, H, F in zip(to_tensors(layer, m, conv_modes), invs, facs):
            orders.add(M.ndim)
            K = reduce(np.kron, H)
            for X in (M, rng.standard_normal(M.shape)):
                # two evaluation orders of the same products: ≤ C·n·eps·Π‖H_i‖·‖X‖ absolute
                tol = 100 * X.size * EPS * np.prod([np.linalg.norm(h, 2) for h in H]) * np.linalg.norm(X)
                assert_close(kron_apply(H, X).ravel(), K @ X.ravel(), rtol=0, atol=tol)
            kappa = np.prod([np.linalg.cond(f) for f in F])
            n = K.shape[0]
            assert_close(f_tnt(F) @ K, np.eye(n), rtol=0, atol=forward_tol(n, kappa) * np.sqrt(n))
    assert orders == {1, 2, conv_modes}


# --------------------------------------------------------------- (3) normalization (4.10)
@st.composite
def stacked_gradients(draw):
    k = draw(st.integers(1, 4))
    dims = tuple(draw(st.integers(1, 4)) for _ in range(k))
    N = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scale = 10 ** draw(st.floats(-3, 3))
    return scale * rng.standard_normal((N,) + dims)


@given(stacked_gradients(), st.sampled_from(["per_sample", "batch_mean"]), st.floats(1e-3, 1e3), st.floats(1e-3, 1.0))
def test_normalization_4_10(Gs, statistics, s, eps):
    """What (4.10) guarantees: tr(Ũ_i)/d_i = c_0 for every mode i (equal average eigenvalues);
    (4.2) holds exactly with c = 1: Ĝ^{(i)} = Ũ_i Π_{j≠i} tr(Ũ_j); hence tr(⊗Ũ_i) = tr Ĝ.
    Homogeneity Ũ(sS) = s^{1/k} Ũ(S) gives ⊗(Ũ(S/N)+εI) = N⁻¹⊗(Ũ(S)+N^{1/k}εI) (errata TNT-1),
    and a permutation of the modes permutes the direction (order of the conv modes is moot)."""
    S = sample_statistics(Gs[None], statistics)
    U = normalize(S)
    k, dims = len(S), [len(a) for a in S]
    c0 = (np.trace(S[0]) / np.prod(dims)) ** (1 / k)
    for i in range(k):
        assert abs(np.trace(U[i]) / dims[i] - c0) <= 1e-13 * c0
        assert_close(U[i] * np.prod([np.trace(U[j]) for j in range(k) if j != i]), S[i], rtol=1e-13, atol=0)
    assert abs(np.prod([np.trace(u) for u in U]) - np.trace(S[0])) <= 1e-13 * np.trace(S[0])
    for a, b in zip(normalize([s * x for x in S]), U):
        assert_close(a, s ** (1 / k) * b, rtol=1e-13, atol=0)
    N = 7.0
    lhs = f_tnt(damped_factors([x / N for x in S], eps))
    rhs = f_tnt([u + N ** (1 / k) * eps * np.eye(len(u)) for u in U]) / N
    assert_close(lhs, rhs, rtol=1e-12, atol=0)
    perm = np.random.default_rng(k).permutation(k)
    Gp = Gs.transpose((0,) + tuple(1 + perm))
    M = Gs[0]
    H = [np.linalg.inv(F) for F in damped_factors(S, eps)]
    Hp = [np.linalg.inv(F) for F in damped_factors(sample_statistics(Gp[None], statistics), eps)]
    assert_close(kron_apply(Hp, M.transpose(perm)), kron_apply(H, M).transpose(perm), rtol=1e-10, atol=0)


def test_normalization_in_method_state_and_zero_gradient_tensor():
    """After a step, the state's factors minus εI have equal tr/d over modes; a tensor whose
    gradient is zero (conv layer behind a zero last layer) gets Ũ_i = 0 (the limit of (4.10)
    as tr Ĝ → 0), F_TNT = ε^k I, inverses I/ε, and only the weight decay moves it."""
    net = Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)])
    rng = np.random.default_rng(0)
    params = net.init(0)
    eps = 0.3
    method = TNT(damping=eps, momentum=0.0, conv_modes=4)
    b = Batch(rng.standard_normal((4, 1, 3, 3)), rng.integers(0, 3, 4), CrossEntropy())
    _, state = method.step(method.init(net, params), net, params, b, rng=0)
    for fs in [f for layer in state.factors for f in layer]:
        avg = [np.trace(F - eps * np.eye(len(F))) / len(F) for F in fs]
        assert np.ptp(avg) <= 1e-13 * max(avg)
    dead = [params[0], np.zeros_like(params[1])]  # zero last layer ⇒ no gradient reaches the conv layer
    method = TNT(damping=eps, momentum=0.0, weight_decay=0.1)
    d, state = method.step(method.init(net, dead), net, dead, b, rng=0)
    assert np.all(net.grad(dead, b.x, b.y, b.loss)[0] == 0)
    for fs, invs in zip(state.factors[0], state.inverses[0]):
        for F, H in zip(fs, invs):
            np.testing.assert_array_equal(F, eps * np.eye(len(F)))
            assert_close(H, np.eye(len(H)) / eps, rtol=1e-15)
    assert_close(d[0], -0.1 * dead[0], rtol=1e-15)  # −(F_TNT⁻¹·0 + γW)
    assert np.all(np.isfinite(d[1])) and np.any(d[1] != 0)


# --------------------------------------------------------------------------- (4) Lemma 10
@given(problems(), st.sampled_from([3, 4]), st.sampled_from(["per_sample", "batch_mean"]),
       st.floats(1e-3, 1.0), st.floats(0.0, 0.95))
def test_lemma_9_and_10_bounds(pb, conv_modes, statistics, eps, beta):
    """With Ĝ^{(i)} the EMA statistics (an expectation over the weighted sampled gradients)
    and Σ the matching EMA of vec̄(G)vec̄(G)ᵀ (built here from the step's label draws):
    Lemma 9 ‖Ĝ^{(i)}‖ ≤ (Π d / d_i)‖Σ‖; ‖Ũ_i‖ ≤ d_i ‖Ĝ^{(i)}‖^{1/k} / (Π d)^{1/k};
    ε^k ≤ λ_min(F_TNT) and ‖F_TNT‖ ≤ Π_i (d_i^{1−1/k} ‖Σ‖^{1/k} + ε) (Lemma 10)."""
    net = pb.net
    method = TNT(damping=eps, conv_modes=conv_modes, statistics=statistics, beta=beta)
    params, _ = _batch(pb)
    state = method.init(net, params)
    Sigma = None
    for k in range(3):
        _, batch = _batch(pb, shift=k)
        draws = method.draw(np.random.default_rng(k), state, net, params, batch)
        U = net.per_sample_grads(params, batch.x, draws.labels[0], batch.loss)
        new = []
        for layer, u in zip(net.layers_trainable, U):
            per = [to_tensors(layer, u[n], conv_modes) for n in range(len(u))]
            for q in range(len(per[0])):
                V = np.stack([p[q].ravel() for p in per])
                V = V.mean(axis=0, keepdims=True) if statistics == "batch_mean" else V
                new.append(V.T @ V / len(V))
        Sigma = new if Sigma is None else [beta * a + (1 - beta) * b for a, b in zip(Sigma, new)]
        _, state = method.step(state, net, params, batch, rng=k)
        tensors = [(S, F) for Sl, Fl in zip(state.G_hat, state.factors) for S, F in zip(Sl, Fl)]
        for (S, F), Sig in zip(tensors, Sigma):
            kk, dims = len(S), [len(a) for a in S]
            D = np.prod(dims)
            nS = np.linalg.norm(Sig, 2)
            slack = 1 + 1e-10
            for Si, Fi, di in zip(S, F, dims):
                assert np.linalg.norm(Si, 2) <= (D / di) * nS * slack + 1e-300
                Ui = Fi - eps * np.eye(di)
                assert np.linalg.norm(Ui, 2) <= di * np.linalg.norm(Si, 2) ** (1 / kk) / D ** (1 / kk) * slack + 1e-300
            w = np.linalg.eigvalsh(f_tnt(F))  # eigenvalues to ± C·n·eps·‖F_TNT‖ (absolute)
            assert w.min() >= eps**kk - 100 * len(w) * EPS * w.max()
            assert w.max() <= np.prod([d ** (1 - 1 / kk) * nS ** (1 / kk) + eps for d in dims]) * slack


# ------------------------------------------------------------------ (5) T_1 / T_2, EMA, warm start
def test_statistics_and_inverses_refresh_exactly_at_T1_T2():
    """Algorithm 15 lines 6-17 with T_1 = 2, T_2 = 3 and refcurv's 0-based counter
    (k = 0, 1, …): Ĝ set at k = 0 (no warm start), EMA-updated at k = 2, 4, 6 only;
    factors/inverses computed at k = 0, 3, 6 only, from the statistics of that step, and
    reused (stale) in between; the direction always equals the dense solve with the stale
    factors."""
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    rng = np.random.default_rng(0)
    params = net.init(1)
    batches = [Batch(rng.standard_normal((5, 3)), rng.integers(0, 2, 5), CrossEntropy()) for _ in range(7)]
    beta, eps = 0.7, 0.2
    method = TNT(damping=eps, T_stats=2, T_inv=3, beta=beta, momentum=0.0)
    state = method.init(net, params)
    hist, refreshed_at = [], None
    for t, b in enumerate(batches):
        draws = method.draw(np.random.default_rng(t), state, net, params, b)
        assert (draws.labels is not None) == (t % 2 == 0)
        assert state.diagnostics == {} if t == 0 else True
        prev = state
        d, state = method.step(state, net, params, b, rng=t)
        if t % 2 == 0:
            new = _ref_stats(net, params, b, draws.labels[0], 4, "per_sample")
            want = new if t == 0 else [[[beta * s + (1 - beta) * n for s, n in zip(a, c)] for a, c in zip(A, C)]
                                       for A, C in zip(prev.G_hat, new)]
            for x, y in zip(_leaves(state.G_hat), _leaves(want)):
                assert_close(x, y, rtol=1e-12, atol=0)
        else:
            assert all(x is y for x, y in zip(_leaves(state.G_hat), _leaves(prev.G_hat)))
        if t in (0, 3, 6):
            refreshed_at = state.G_hat
            if t > 0:
                pairs = zip(_leaves(state.inverses), _leaves(prev.inverses))
                assert not any(np.array_equal(x, y) for x, y in pairs)
        else:
            assert all(x is y for x, y in zip(_leaves(state.inverses), _leaves(prev.inverses)))
        for layer_f, layer_S in zip(state.factors, refreshed_at):
            for fs, S in zip(layer_f, layer_S):
                for F, U in zip(fs, _ref_normalize(S)):
                    assert_close(F, U + eps * np.eye(len(U)), rtol=1e-13, atol=0)
        dd, _ = method.step(prev, net, params, b, rng=t, dense=True)
        for a, c in zip(d, dd):
            assert_close(a, c, rtol=1e-9)
        hist.append(state)


def test_warm_start_and_momentum_and_weight_decay():
    """Line 2: warm start = mean statistics over the given batches; with T_1 = 2 the first
    step (k = 0) EMA-updates them and computes the inverses, the second keeps them. Line 10: m_t = μ m_{t−1}
    + ∇̄L_t. Line 19: weight decay adds exactly −γW to the direction (same draws)."""
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    rng = np.random.default_rng(1)
    params = net.init(2)
    bs = [Batch(rng.standard_normal((5, 3)), rng.standard_normal((5, 2)), MSE()) for _ in range(3)]
    method = TNT(T_stats=2, momentum=0.8)
    st0 = method.warm_start(method.init(net, params), net, params, bs[:2], seed=3)
    gen = np.random.default_rng(3)
    refs = [_ref_stats(net, params, b, b.loss.sample(net.forward(params, b.x), 1, seed=gen)[0], 4, "per_sample")
            for b in bs[:2]]
    for x, a, c in zip(_leaves(st0.G_hat), _leaves(refs[0]), _leaves(refs[1])):
        assert_close(x, (a + c) / 2, rtol=1e-12, atol=0)
    draws = method.draw(np.random.default_rng(0), st0, net, params, bs[2])
    _, s1 = method.step(st0, net, params, bs[2], rng=0)
    new = _ref_stats(net, params, bs[2], draws.labels[0], 4, "per_sample")
    for x, a, c in zip(_leaves(s1.G_hat), _leaves(st0.G_hat), _leaves(new)):
        assert_close(x, method.beta * a + (1 - method.beta) * c, rtol=1e-12, atol=0)
    assert s1.inverses is not None
    _, s2 = method.step(s1, net, params, bs[0], rng=1)
    assert all(x is y for x, y in zip(_leaves(s2.G_hat), _leaves(s1.G_hat)))
    g1, g2 = (net.grad(params, b.x, b.y, b.loss) for b in (bs[2], bs[0]))
    for m, a, c in zip(s2.m, g1, g2):
        assert_close(m, 0.8 * a + c, rtol=1e-14)
    wd = TNT(T_stats=2, momentum=0.8, weight_decay=0.3)
    d0, _ = method.step(s1, net, params, bs[0], rng=1)
    d1, _ = wd.step(s1, net, params, bs[0], rng=1)
    for a, c, W in zip(d1, d0, params):
        assert_close(a, c - 0.3 * W, rtol=1e-14)


# ---------------------------------------------------------------------------- (6) draws
def test_sampled_labels_reproducible_and_shared_by_both_forms():
    """Labels come from loss.sample with the step's seed: the same rng seed gives the same
    labels and statistics; fast and dense consume the same draws (identical states); another
    seed gives other labels; fisher="empirical" draws none and uses the data labels."""
    net = Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)])
    rng = np.random.default_rng(0)
    params = net.init(0)
    b = Batch(rng.standard_normal((30, 1, 3, 3)), rng.integers(0, 3, 30), CrossEntropy())
    method = TNT()
    s0 = method.init(net, params)
    d1 = method.draw(np.random.default_rng(42), s0, net, params, b)
    d2 = method.draw(np.random.default_rng(42), s0, net, params, b)
    np.testing.assert_array_equal(d1.labels[0], d2.labels[0])
    seed = int(np.random.default_rng(42).integers(2**63 - 1))  # the step's seed, then the labels
    want = b.loss.sample(net.forward(params, b.x), n_samples=1, seed=seed)
    assert d1.labels.shape == (1, 30)
    np.testing.assert_array_equal(d1.labels, want)
    d3 = method.draw(np.random.default_rng(43), s0, net, params, b)
    assert not np.array_equal(d1.labels[0], d3.labels[0])
    _, sf = method.step(s0, net, params, b, rng=42)
    _, sd = method.step(s0, net, params, b, rng=42, dense=True)
    _same_state(sf, sd, b.x.shape[0] * net.n_params)
    for x, y in zip(_leaves(sf.G_hat), _leaves(_ref_stats(net, params, b, d1.labels[0], 4, "per_sample"))):
        assert_close(x, y, rtol=1e-12, atol=0)
    emp = TNT(fisher="empirical")
    assert emp.draw(np.random.default_rng(42), s0, net, params, b).labels is None
    _, se = emp.step(s0, net, params, b, rng=42)
    for x, y in zip(_leaves(se.G_hat), _leaves(_ref_stats(net, params, b, b.y, 4, "per_sample"))):
        assert_close(x, y, rtol=1e-12, atol=0)


# ------------------------------------------------------- batch-mean statistic (errata TNT-1)
@pytest.mark.parametrize("conv", [False, True])
def test_batch_mean_statistic_estimates_E_G_over_N(conv):
    """Exact expectation over the sampled labels (enumerating all C^N label vectors with
    their model probabilities): E[mat_i(D̄W)mat_i(D̄W)ᵀ] = (1/N)·E[(1/N)Σ_n mat_i(DW_n)mat_i(DW_n)ᵀ]
    — Algorithm 15 line 7 estimates E[G^{(i)}]/N, not E[G^{(i)}] (4.2). For N = 1 the two
    statistics coincide."""
    if conv:
        net = Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)])
        x = np.random.default_rng(0).standard_normal((3, 1, 3, 3))
    else:
        net = Sequential([Linear(3, 2), Tanh(), Linear(2, 3)])
        x = np.random.default_rng(0).standard_normal((3, 3))
    params = [2 * W for W in net.init(4)]
    loss = CrossEntropy()
    b = Batch(x, np.zeros(3, int), loss)
    P = loss.probs(net.forward(params, x))
    ps, bm = TNT(statistics="per_sample"), TNT(statistics="batch_mean")
    def flat(method, batch, y):
        return np.concatenate([a.ravel() for a in _leaves(method.batch_statistics(net, params, batch, y))])

    E_ps = E_bm = 0
    for y in itertools.product(range(3), repeat=3):
        w = np.prod(P[np.arange(3), list(y)])
        E_ps = E_ps + w * flat(ps, b, np.array(y))
        E_bm = E_bm + w * flat(bm, b, np.array(y))
    assert_close(E_bm, E_ps / 3, rtol=1e-12)
    assert rel_err(E_bm, E_ps) > 0.5
    b1 = Batch(x[:1], np.zeros(1, int), loss)
    y1 = np.array([2])
    assert_close(flat(bm, b1, y1), flat(ps, b1, y1), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- (7) (8)
def test_bad_hyper_parameters():
    for kwargs, match in [({"damping": 0.0}, "damping"), ({"damping": np.inf}, "damping"), ({"beta": 1.0}, "beta"),
                          ({"momentum": -0.1}, "momentum"), ({"weight_decay": -1.0}, "weight_decay"),
                          ({"weight_decay": np.nan}, "weight_decay"), ({"T_stats": 0}, "T_stats"),
                          ({"T_inv": 1.5}, "T_inv"), ({"statistics": "sum"}, "statistics"),
                          ({"fisher": "ggn"}, "fisher"), ({"conv_modes": 2}, "conv_modes"),
                          ({"conv_modes": 3.0}, "conv_modes")]:
        with pytest.raises(HyperParameterError, match=match):
            TNT(**kwargs)


def test_warm_start_needs_a_batch():
    net = Sequential([Linear(3, 2)])
    params = net.init(0)
    with pytest.raises(HyperParameterError, match="at least one batch"):
        TNT().warm_start(TNT().init(net, params), net, params, [])


@pytest.mark.parametrize("conv_modes", [3, 4])
def test_tnt_ef_batch_mean_statistics_are_shampoo_statistics(conv_modes):
    """§4.3.4/§4.7.3: TNT-EF (data labels, mini-batch-mean gradient) and Shampoo (Algorithm 16
    line 9) keep the same statistics Ĝ^{(i)} — the EMA of the contractions of the mini-batch
    gradient — and differ only in how they turn them into a preconditioner. Pins the scale of
    both (refcurv's mean loss) against each other, step by step."""
    from refcurv.methods.shampoo import Shampoo

    net = Sequential([Conv2d(2, 3, (2, 3)), Tanh(), Flatten(), Linear(12, 3)])
    rng = np.random.default_rng(7)
    params = net.init(3)
    tnt = TNT(fisher="empirical", statistics="batch_mean", conv_modes=conv_modes, beta=0.6)
    sh = Shampoo(conv_modes=conv_modes, beta=0.6, root_method="eigh")
    st_t, st_s = tnt.init(net, params), sh.init(net, params)
    for k in range(3):
        b = Batch(rng.standard_normal((5, 2, 3, 4)), rng.integers(0, 3, 5), CrossEntropy())
        _, st_t = tnt.step(st_t, net, params, b, rng=k)
        _, st_s = sh.step(st_s, net, params, b)
        for x, y in zip(_leaves(st_t.G_hat), _leaves(st_s.G_hat)):
            assert_close(x, y, rtol=1e-12, atol=0, what=f"step {k}")


@pytest.mark.parametrize("conv_modes", [3, 4])
def test_training_smoke_cnn_decreases_loss(conv_modes):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 5, 5))
    y = (x[:, 0, 1:4, 1:4].sum((1, 2)) > 0).astype(int) + (x[:, 0, 0, :].sum(1) > 1).astype(int)
    net = Sequential([Conv2d(1, 3, 3), Tanh(), Flatten(), Linear(27, 3)])
    _, hist = train(TNT(damping=0.1, conv_modes=conv_modes, momentum=0.5, T_inv=2), net, net.init(0), x, y,
                    CrossEntropy(), steps=30, lr=0.1, batch_size=16, seed=1)
    assert hist["loss"][-1] < 0.4 * hist["loss"][0]


# ------------------------------------------------ issue 9: typed state, draws, phase, curvature
from refcurv.errors import DrawsError  # noqa: E402
from refcurv.methods import Draws  # noqa: E402
from refcurv.methods.tnt import TNTState  # noqa: E402


def _mlp_setup(seed=0, n=6):
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    rng = np.random.default_rng(seed)
    params = net.init(seed)
    return net, params, [Batch(rng.standard_normal((5, 3)), rng.integers(0, 2, 5), CrossEntropy()) for _ in range(n)]


def test_phase_paper_is_a_literal_replay_of_algorithm_15():
    """phase="paper": lines 6/11 (statistics) and 14 (inverses) at the printed t ≡ 0 (mod T),
    t = k + 1, after the warm start of line 2; the inverses that line 18 needs before
    t = T_2 are computed once from the warm-start statistics at t = 1 (errata TNT-2).
    Replayed literally: Ĝ, m and the direction at every t from the printed lines."""
    net, params, bs = _mlp_setup(3, 7)
    T1, T2, beta, mu, eps = 2, 3, 0.6, 0.5, 0.2
    method = TNT(damping=eps, T_stats=T1, T_inv=T2, beta=beta, momentum=mu, phase="paper")
    state = method.warm_start(method.init(net, params), net, params, bs[:2], seed=9)
    G_hat, m, inv = state.G_hat, None, None
    for t, b in enumerate(bs, start=1):
        draws = method.draw(np.random.default_rng(t), state, net, params, b)
        d, state = method.step(state, net, params, b, draws=draws)
        g = net.grad(params, b.x, b.y, b.loss)
        m = g if m is None else [mu * a + c for a, c in zip(m, g)]                      # line 10
        if t % T1 == 0:                                                                    # lines 6, 11-12
            new = _ref_stats(net, params, b, draws.labels[0], 4, "per_sample")
            G_hat = [[[beta * s + (1 - beta) * n for s, n in zip(A, C)] for A, C in zip(LA, LC)]
                     for LA, LC in zip(G_hat, new)]
        else:
            assert draws.labels is None
        if t % T2 == 0 or inv is None:                                                     # lines 14-16
            inv = [[[np.linalg.inv(U + eps * np.eye(len(U))) for U in _ref_normalize(S)] for S in L] for L in G_hat]
        assert state.diagnostics == {"refreshed": t % T2 == 0 or t == 1, "stats_refreshed": t % T1 == 0}
        for x, y in zip(_leaves(state.G_hat), _leaves(G_hat)):
            assert_close(x, y, rtol=1e-12, atol=0, what=f"t = {t}")
        for layer, ml, dl, Hs in zip(net.layers_trainable, m, d, inv):                    # line 18
            for M, D, H in zip(to_tensors(layer, ml), to_tensors(layer, dl), Hs):
                ref = -reduce(np.kron, H) @ M.ravel()
                kappa = np.prod([np.linalg.cond(h) for h in H])
                assert_close(D.ravel(), ref, rtol=forward_tol(ref.size, kappa), atol=0, what=f"t = {t}")


def test_phase_k0_and_paper_differ_only_in_the_schedule():
    net, params, bs = _mlp_setup(1, 5)
    for phase, want in (("k0", [0, 3]), ("paper", [0, 2])):  # paper: t = 3 (k = 2); k = 0 builds the missing inverses
        method = TNT(T_inv=3, phase=phase)
        state, got = method.init(net, params), []
        for k, b in enumerate(bs):
            _, state = method.step(state, net, params, b, rng=k)
            if state.diagnostics["refreshed"]:
                got.append(k)
        assert got == want, phase


def test_draws_labels_are_consumed_exactly_and_checked():
    """Labels drawn elsewhere (here: all class 1, shape (n_samples, N)) are what the statistic
    is computed from; wrong shapes, missing labels and labels at a step that samples none are
    DrawsErrors naming the field."""
    net, params, bs = _mlp_setup(2, 2)
    b = bs[0]
    for S in (1, 3):
        method = TNT(n_samples=S, momentum=0.0)
        s0 = method.init(net, params)
        labels = np.stack([np.full(5, s % 2) for s in range(S)])
        _, st = method.step(s0, net, params, b, draws=Draws(method="tnt", labels=labels))
        refs = [_ref_stats(net, params, b, y, 4, "per_sample") for y in labels]
        for x, *r in zip(_leaves(st.G_hat), *[_leaves(q) for q in refs]):
            assert_close(x, sum(r) / S, rtol=1e-12, atol=0)
        for bad in (labels[0], np.zeros((S + 1, 5), int), np.zeros((S, 4), int)):
            with pytest.raises(DrawsError, match="labels"):
                method.step(s0, net, params, b, draws=Draws(method="tnt", labels=bad))
        with pytest.raises(DrawsError, match="labels"):
            method.step(s0, net, params, b, draws=Draws(method="tnt"))
    method = TNT(T_stats=2)
    _, s1 = method.step(method.init(net, params), net, params, b, rng=0)
    assert method.draw(np.random.default_rng(0), s1, net, params, bs[1]).labels is None
    with pytest.raises(DrawsError, match="labels"):
        method.step(s1, net, params, bs[1], draws=Draws(method="tnt", labels=np.zeros((1, 5), int)))
    for fisher in ("empirical", "exact"):
        m = TNT(fisher=fisher)
        assert m.draw_fields == () and m.draw(np.random.default_rng(0), m.init(net, params), net, params, b).labels is None


@pytest.mark.parametrize("statistics", ["per_sample", "batch_mean"])
def test_fisher_exact_is_the_expectation_over_labels(statistics):
    """fisher="exact": the statistic equals the expectation of the "mc" statistic over the
    model's labels, computed by enumerating all C^N label vectors with their probabilities
    (independent of the B_n B_nᵀ = F_n route of the fast form and of curvature.fisher of the
    dense form); both forms agree."""
    net = Sequential([Linear(3, 2), Tanh(), Linear(2, 3)])
    x = np.random.default_rng(0).standard_normal((3, 3))
    params = [2 * W for W in net.init(4)]
    loss = CrossEntropy()
    b = Batch(x, np.zeros(3, int), loss)
    P = loss.probs(net.forward(params, x))
    mc, ex = TNT(statistics=statistics), TNT(statistics=statistics, fisher="exact")
    E = 0
    for y in itertools.product(range(3), repeat=3):
        w = np.prod(P[np.arange(3), list(y)])
        E = E + w * np.concatenate([a.ravel() for a in _leaves(mc.batch_statistics(net, params, b, np.array([y])))])
    got = np.concatenate([a.ravel() for a in _leaves(ex.batch_statistics(net, params, b, None))])
    dense = np.concatenate([a.ravel() for a in _leaves(ex.dense_statistics(net, params, b, None))])
    assert_close(got, E, rtol=1e-12)
    assert_close(dense, E, rtol=1e-12)


def test_state_fields_curvature_and_momentum_form():
    """TNTState fields; curvature = BlockDiagonal of ⊗(Ũ_i+εI) per tensor at the tensors'
    positions in θ: its todense equals the per-tensor F_TNT scattered by tensor_index, and
    −C⁻¹m is the fast direction; momentum_form="ema" gives m = (1−μ)g at the first step."""
    from refcurv.methods._tensors import tensor_index

    net = Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)])
    rng = np.random.default_rng(0)
    params = net.init(0)
    b = Batch(rng.standard_normal((4, 1, 3, 3)), rng.integers(0, 3, 4), CrossEntropy())
    method = TNT(conv_modes=3)
    d, st = method.step(method.init(net, params), net, params, b, rng=0)
    assert type(st) is TNTState and set(TNTState.field_docs()) >= {"k", "m", "G_hat", "factors", "inverses",
                                                                     "diagnostics"}
    C = method.curvature(st)
    want, off = np.zeros((net.n_params,) * 2), 0
    for layer, fl in zip(net.layers_trainable, st.factors):
        for idx, fs in zip(tensor_index(layer, 3), fl):
            pos = off + idx.ravel()
            want[np.ix_(pos, pos)] = reduce(np.kron, fs)
        off += int(np.prod(layer.param_shape))
    np.testing.assert_array_equal(C.todense(), want)
    from refcurv import flatten
    got = -C.solve(flatten(st.m))
    assert_close(got, flatten(d), rtol=forward_tol(net.n_params, np.linalg.cond(want)))
    ema = TNT(momentum_form="ema", momentum=0.8)
    _, se = ema.step(ema.init(net, params), net, params, b, rng=0)
    for a, g in zip(se.m, net.grad(params, b.x, b.y, b.loss)):
        assert_close(a, 0.2 * g, rtol=1e-15)
    with pytest.raises(HyperParameterError, match="momentum_form"):
        TNT(momentum_form="nesterov")
    with pytest.raises(HyperParameterError, match="phase"):
        TNT(phase="t1")
    with pytest.raises(HyperParameterError, match="n_samples"):
        TNT(n_samples=0)
