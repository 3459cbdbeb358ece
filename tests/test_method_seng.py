"""SENG ([SENG] §2–§4, [SENG-conf] §3.4): the fast forms against the definition (7) and against the
dense matrices of their approximations; Lemma 5 with the drawn sketch; the Kronecker-sketch
remark after (24); low-rank factors; C_U; distributed SENG (25)–(28); history buffers
([SENG-conf] (24)–(25)); staleness; errata pins (SENG-1..5); hyper-parameter errors; training.

Tolerance model (refcurv.testing.tolerance): backward-stable solves give forward errors
C·n·eps·κ times the solution size; SMW assembles d = (U b − g)/λ, so the terms that cancel
(‖g‖/λ, ‖U‖‖b‖/λ) enter at C·n·eps; C_U's √|c| is Hölder-½, so δc moves it by O(√δc)
(bounded explicitly in `_cu_bound`). C = 100 throughout."""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import HyperParameterError
from refcurv.methods.base import Batch
from refcurv.methods.seng import (
    SENG,
    SENGDistributed,
    cu,
    lowrank_factors,
    sketch_from_draws,
    sketched_UtU,
    sketched_Utz,
    uc_exact,
)
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.strategies import Problem, dampings, problems
from refcurv.testing.tolerance import EPS, assert_close, forward_tol
from refcurv.train import train

C = 100.0
CONV = Problem(spec=(("conv", 2, 3, 3, 1, 1, True), ("act", "tanh"), ("flatten",), ("linear", 48, 3, True)),
               input_shape=(2, 4, 4), n_out=3, loss="cross_entropy", N=4, seed=3)


def _batch(pb, shift=0):
    params, x, y = pb.data()
    if shift:
        x = x + 0.5 * np.random.default_rng(pb.seed + 17 * shift).standard_normal(x.shape)
    return params, Batch(x, y, pb.loss_fn)


def _efim_blocks(net, params, batch):
    return cv.empirical_fisher(net, params, batch.x, batch.y, batch.loss, blocks=True)


def _grads(net, params, batch):
    return [gi.ravel() for gi in net.grad(params, batch.x, batch.y, batch.loss)]


def _definition(M, g, lam):
    """(7) by an eigendecomposition of the SPD λI + M (independent of the method's solves)."""
    w, V = np.linalg.eigh(M)
    return -(V @ ((V.T @ g) / (lam + w)))


def _kappa(M, lam):
    return (lam + max(np.linalg.eigvalsh(M).max(), 0.0)) / lam


def _assert_definition(d, M, g, lam, n_extra=0, what=""):
    """d = −(M + λI)⁻¹g at C·n·eps·κ, κ = (λ + ‖M‖)/λ (also the SMW cancellation factor)."""
    assert_close(d.ravel(), _definition(M, g, lam), rtol=forward_tol(M.shape[0] + n_extra, _kappa(M, lam)),
                 atol=0, what=what)


# ------------------------------------------------------------------ definition (7), (8)-(9)


@given(problems(), dampings(-3, 1))
def test_U_is_the_scaled_efim_factor(pb, lam):
    """(4)–(5): the state keeps U (columns ϱ^{-1/2}u_i), so U Uᵀ = M^l, the EF block of refcurv.curvature."""
    params, batch = _batch(pb)
    net = pb.net
    _, state = SENG(damping=lam).step(SENG(damping=lam).init(net, params), net, params, batch)
    for U, M in zip(state.U, _efim_blocks(net, params, batch)):
        assert U.shape == (M.shape[0], pb.N)
        assert_close(U @ U.T, M, rtol=1e-12, atol=1e-15 * max(np.abs(M).max(), 1))


@given(problems(), dampings(-4, 2))
def test_smw_equals_dense_definition(pb, lam):
    """(8)–(9) fast form = −(M^l + λI)⁻¹ g^l with M^l the EF block of refcurv.curvature; the
    method's own dense form too."""
    params, batch = _batch(pb)
    net = pb.net
    m = SENG(damping=lam)
    state = m.init(net, params)
    df, _ = m.step(state, net, params, batch)
    dd, _ = m.step(state, net, params, batch, dense=True)
    for a, b, M, g in zip(df, dd, _efim_blocks(net, params, batch), _grads(net, params, batch)):
        _assert_definition(a, M, g, lam, pb.N, "SMW")
        _assert_definition(b, M, g, lam, pb.N, "dense")


# ---------------------------------------------------------- fast = dense, every configuration


def _cu_bound(c, G, A, delta, workers):
    """Bound on ‖cu(c') − cu(c)‖_F over all c' with |c'_i − c_i| ≤ delta (see cu / (23), (28)):
    |√|c'| − √|c|| ≤ √δ; per worker the A-weights c_i/s_w move by ≤ δ/s'_w + |c_i|δs_w/(s_w s'_w)
    (s'_w ≥ s_w − mδ_s), or, when that is not positive, by at most the two weights' sizes
    (|c_i/s_w| ≤ √|c_i|)."""
    rho = c.shape[0]
    m = rho // workers
    ds = math.sqrt(delta)
    Gn = np.linalg.norm(G, axis=(1, 2))
    An = np.linalg.norm(A, axis=(1, 2)).reshape(workers, m)
    cw = c.reshape(workers, m)
    s = np.sqrt(np.abs(cw))
    sw = s.sum(axis=1)
    Gbar = np.einsum("i,igr->gr", s.ravel(), G)
    coef = np.where(sw[:, None] > 0, cw / np.where(sw > 0, sw, 1)[:, None], 0.0)
    Abar = np.einsum("i,iar->ar", coef.ravel(), A)
    dG = ds * Gn.sum()
    dA = 0.0
    for w in range(workers):  # test-side loop over workers
        lo = sw[w] - m * ds
        if lo > 0:
            dA += ((delta / lo) + np.abs(cw[w]) * (m * ds) / (sw[w] * lo)) @ An[w]
        else:
            dA += (2 * s[w] + ds) @ An[w]
    return dG * (np.linalg.norm(Abar) + dA) + np.linalg.norm(Gbar) * dA


def _sv_extremes(lam, U, V, c):
    """Largest and smallest singular values of A = λI + c U Vᵀ (n × n) without an n × n SVD:
    span(U, V) and its complement are invariant under A and Aᵀ (A = λI on the complement),
    so σ(A) = σ(λI + c (QᵀU)(QᵀV)ᵀ) ∪ {λ if rank[U V] < n}, Q an orthonormal basis of
    span(U, V)."""
    n = U.shape[0]
    Qf, s, _ = np.linalg.svd(np.hstack([U, V]), full_matrices=False)
    Q = Qf[:, s > n * EPS * max(s.max(initial=0), 1e-300)]
    k = Q.shape[1]
    sv = np.linalg.svd(lam * np.eye(k) + c * (Q.T @ U) @ (Q.T @ V).T, compute_uv=False) if k else np.array([lam])
    if k < n:
        sv = np.r_[sv, lam]
    return sv.max(), sv.min()


def _tolerance(lam, Ut, S, g, gp, blocks, b_fast, uc=None, factors=None, cu_workers=1, c=1):
    """Absolute bound on ‖d_fast − d_dense‖ for one layer (module docstring, 'Tolerances').

    fast: b̂ from λI + cΞᵀΞ (κ_cap ≤ (λ + c‖Ξ‖²)/λ, ‖(λI + cΞᵀΞ)⁻¹‖ ≤ 1/λ) has
    ‖δb‖ ≤ C n eps (2κ_cap‖b‖ + ‖Ξ‖‖ξ‖/λ); d = (Ub − g)/λ adds (‖U‖‖δb‖ + C n eps(‖U‖‖b‖ + ‖g‖))/λ.
    dense: each (λI + cM̂_w)x = g' is solved with error C n eps κ_w ‖g'‖/σ_min,w (weight 1/c);
    the sum Σ x_w and (𝓜g'/c − g)/λ add C eps (𝓜‖g'‖ + ‖g‖)/λ."""
    rho, n = Ut.shape
    U = Ut.T
    Sm = np.eye(n) if S is None else S
    UtSU = U.T @ Sm @ U
    nXi = math.sqrt(max(np.linalg.norm(UtSU, 2), 0.0))
    nxi = math.sqrt(max(float(gp @ Sm @ gp), 0.0))
    kcap = (lam + c * nXi**2) / lam
    size = n + rho + (factors[0].shape[2] * rho if factors is not None else 0)
    nb = np.linalg.norm(b_fast)
    db = C * size * EPS * (2 * kcap * nb + nXi * nxi / lam)
    nU = np.linalg.norm(U, 2)
    if uc == "cu":
        Gf, Af = factors
        err = _cu_bound(b_fast, Gf, Af, 2 * db, cu_workers) / math.sqrt(rho) / lam
        err += C * size * EPS * (nU * nb + np.linalg.norm(g)) / lam
        return err + C * size * EPS * (nU * nb * math.sqrt(rho) + np.linalg.norm(g)) / lam
    err = (nU * db + C * size * EPS * (nU * nb + np.linalg.norm(g))) / lam
    for Uw in Ut.reshape(blocks, -1, n):
        smax, smin = _sv_extremes(lam, Uw.T, Sm @ Uw.T, c)
        err += C * n * EPS * (smax / smin) * np.linalg.norm(gp) / smin / c
    return err + C * EPS * (blocks * np.linalg.norm(gp) + np.linalg.norm(g)) / lam


def _even_batch(pb):
    return dataclasses.replace(pb, N=2 * pb.N)


def _divisors(n):
    return [w for w in range(1, n + 1) if n % w == 0]


@st.composite
def configs(draw):
    pb = draw(problems(max_batch=4))
    opt = lambda s: st.one_of(st.none(), s)  # noqa: E731
    kw = dict(
        damping=draw(dampings(-3, 1)),
        sketch=draw(st.sampled_from(["uniform", "leverage"])),
        sketch_size=draw(opt(st.integers(1, 40))),
        replace=draw(st.booleans()),
        threshold=draw(st.sampled_from([math.inf, 0.0, 30.0])),
        rank=draw(opt(st.integers(1, 3))),
        svd=draw(st.sampled_from(["exact", "randomized"])),
        svd_of=draw(st.sampled_from(["auto", "G", "A"])),
        sketch_size_A=draw(opt(st.integers(1, 8))),
        sketch_size_G=draw(opt(st.integers(1, 4))),
        uc=draw(st.sampled_from(["cu", "exact"])),
        T_inv=draw(st.integers(1, 2)),
        phase=draw(st.sampled_from(["k0", "paper"])),
        workers=draw(st.sampled_from(_divisors(pb.N))),
        normalization=draw(st.sampled_from(["global", "worker"])),
        block_capacitance=draw(st.booleans()),
        delayed=draw(st.booleans()),
        sync_cu=draw(st.booleans()),
    )
    return pb, kw


@given(configs())
def test_fast_equals_dense_every_configuration(cfg):
    """For every drawn configuration (explicit/implicit paths, sketches, ranks, C_U or (22),
    workers with or without (26), (27), (28), staleness), three consecutive steps: the fast
    form equals the dense matrix of its approximation — (λI + UUᵀΩᵀΩ)⁻¹ (explicit;
    block-diagonal formula for 𝓜 > 1), the same with Ũ and Ω = Ω_G ⊗ Ω_A (implicit, (22)),
    or the dense capacitance + C_U (implicit, (23)/(28)) — at the derived tolerance."""
    pb, kw = cfg
    net = pb.net
    m = SENG(**kw)
    params, _ = _batch(pb)
    state = m.init(net, params)
    lam = kw["damping"]
    blocks = kw["workers"] if kw["block_capacitance"] else 1
    cu_workers = kw["workers"] if (kw["sync_cu"] and kw["workers"] > 1) else 1
    c = kw["workers"] if (kw["normalization"] == "worker" and kw["block_capacitance"]) else 1
    for k in range(3):
        _, batch = _batch(pb, shift=k)
        draws = m.draw(np.random.default_rng(k), state, net, params, batch)
        df, sf = m.step(state, net, params, batch, draws=draws)
        dd, sd = m.step(state, net, params, batch, draws=draws, dense=True)
        g = _grads(net, params, batch)
        gp = g if (not kw["delayed"] or state.g is None) else [x.ravel() for x in state.g]
        assert sf.diagnostics["storage"] == sd.diagnostics["storage"]
        assert sf.diagnostics["refreshed"] == sd.diagnostics["refreshed"]
        for j, (a, b) in enumerate(zip(df, dd)):
            path, b_fast = sd.diagnostics["storage"][j], np.asarray(sf.diagnostics["b_hat"][j])
            if path == "explicit":
                Ut = sd.U[j].T
                sk = sketch_from_draws(draws, "Omega", j, Ut.shape[1])
                S = None if sk is None else sk.gram()
                tol = _tolerance(lam, Ut, S, g[j], gp[j], blocks, b_fast, c=c)
            else:
                Gf, Af = sd.lowrank_factors[j]
                rho, nG, nA = Gf.shape[0], Gf.shape[1], Af.shape[1]
                Ut = np.einsum("igr,iar->iga", Gf, Af).reshape(rho, -1) / math.sqrt(rho)
                skG, skA = sketch_from_draws(draws, "Omega_G", j, nG), sketch_from_draws(draws, "Omega_A", j, nA)
                SG = np.eye(nG) if skG is None else skG.gram()
                SA = np.eye(nA) if skA is None else skA.gram()
                tol = _tolerance(lam, Ut, np.kron(SG, SA), g[j], gp[j], blocks, b_fast,
                                 uc=kw["uc"], factors=(Gf, Af), cu_workers=cu_workers, c=c)
            err = np.linalg.norm(a - b)
            assert err <= tol, f"step {k} layer {j} ({path}): ‖fast − dense‖ = {err:.3e} > {tol:.3e}"
        state = sf


# -------------------------------------------------------------------- sketches: Ω = I, Lemma 5


@given(problems(), dampings(-3, 1), st.booleans())
def test_identity_sketch_is_exact(pb, lam, leverage):
    """Uniform sampling without replacement with q ≥ n keeps every row once with weight
    √(n/n) = 1 (Ω a permutation, ΩᵀΩ = I), so (11)–(13) give (7) exactly. (Leverage scores
    without replacement with q ≥ #non-zero rows give weights 1 on the rows of U that are
    non-zero, and ΩᵀΩ = I on range(U) ∪ supp(g): also exact.)"""
    params, batch = _batch(pb)
    net = pb.net
    m = SENG(damping=lam, sketch="leverage" if leverage else "uniform", sketch_size=10**6, replace=False)
    state = m.init(net, params)
    draws = m.draw(np.random.default_rng(0), state, net, params, batch)
    d, state = m.step(state, net, params, batch, draws=draws)
    for j, (dj, M, g) in enumerate(zip(d, _efim_blocks(net, params, batch), _grads(net, params, batch))):
        sk = sketch_from_draws(draws, "Omega", j, M.shape[0])
        assert np.allclose(sk.weight, 1.0, rtol=1e-12, atol=0)
        if not leverage:
            assert sorted(sk.index.tolist()) == list(range(M.shape[0]))
        _assert_definition(dj, M, g, lam, pb.N, "Ω = I")


def _eta_eps(Om, U, g):
    """η = ‖NᵀΩᵀΩN − I‖₂ (A.1) and ε = ‖NᵀΩᵀΩv‖²/‖v‖² for v = g − NNᵀg (A.2 as the proof of
    Lemma 5 uses it, Nᵀv = 0), N an orthonormal basis of range(U)."""
    Nb, sv, _ = np.linalg.svd(U, full_matrices=False)
    Nb = Nb[:, sv > 1e-12 * max(sv.max(initial=0), 1e-300)]
    ON = Om @ Nb
    eta = np.linalg.norm(ON.T @ ON - np.eye(Nb.shape[1]), 2) if Nb.shape[1] else 0.0
    v = g - Nb @ (Nb.T @ g)
    eps = np.linalg.norm(ON.T @ (Om @ v)) ** 2 / (v @ v) if v @ v > 0 else 0.0
    return eta, eps


def _check_lemma5(pb, lam, q, leverage, replace):
    params, batch = _batch(pb)
    net = pb.net
    m = SENG(damping=lam, sketch="leverage" if leverage else "uniform", sketch_size=q, replace=replace)
    state = m.init(net, params)
    draws = m.draw(np.random.default_rng(pb.seed), state, net, params, batch)
    d_hat, state = m.step(state, net, params, batch, draws=draws)
    d_ex, _ = SENG(damping=lam).step(SENG(damping=lam).init(net, params), net, params, batch)
    checked = 0
    for j, g in enumerate(_grads(net, params, batch)):
        U = state.U[j]
        rho, n = U.shape[1], U.shape[0]
        Om = sketch_from_draws(draws, "Omega", j, n).to_dense()
        b_hat = np.asarray(state.diagnostics["b_hat"][j])
        eta, eps = _eta_eps(Om, U, g)
        if not eta < 1:
            continue
        checked += 1
        b = np.linalg.solve(lam * np.eye(rho) + U.T @ U, U.T @ g)  # (9)
        h1 = np.linalg.eigvalsh(lam * np.eye(n) + U @ U.T).min()  # B.2
        bound = (np.sqrt(eps) + eta) / ((1 - eta) * np.sqrt(h1)) * np.linalg.norm(g)  # (36)
        Xi = Om @ U
        kappa = np.linalg.cond(lam * np.eye(rho) + U.T @ U) + np.linalg.cond(lam * np.eye(rho) + Xi.T @ Xi)
        floor = forward_tol(n + rho, kappa) * (np.linalg.norm(b) + np.linalg.norm(b_hat))
        assert np.linalg.norm(b - b_hat) <= bound * (1 + 1e-8) + floor
        # direction: d̂ − d = U(b̂ − b)/λ (proof of Theorem 3) ⇒ ‖d̂ − d‖ ≤ ‖U‖₂ · bound / λ
        nd = np.linalg.norm(d_ex[j])
        assert np.linalg.norm(d_hat[j] - d_ex[j]) <= np.linalg.norm(U, 2) * bound / lam * (1 + 1e-8) \
            + forward_tol(n + rho, kappa) * (nd + np.linalg.norm(g) / lam)
    return checked


@given(problems(), dampings(-3, 1), st.integers(1, 60), st.booleans(), st.booleans())
def test_lemma5_bound_at_method_level(pb, lam, q, leverage, replace):
    """Lemma 5 (36) (errata E5) for the method's own b̂ and Ω: ‖b − b̂‖ ≤ (√ε + η)/((1−η)√h₁)‖g‖
    with η, ε measured on the drawn sketch (whenever η < 1), and the direction bound."""
    _check_lemma5(pb, lam, q, leverage, replace)


def test_lemma5_bound_is_exercised():
    """Seeded cases where η < 1 does occur (so the property above is not vacuous)."""
    pb = Problem((("linear", 6, 5, True), ("act", "tanh"), ("linear", 5, 3, True)), (6,), 3, "mse", 3, 11)
    assert _check_lemma5(pb, 0.05, 28, False, False) >= 1
    assert _check_lemma5(pb, 0.05, 30, True, True) >= 1


@pytest.mark.parametrize("replace", [True, False])
def test_leverage_scores_are_row_norms(replace):
    """§3.2: leverage-score sampling uses p_i = ‖U_{i,:}‖²/‖U‖_F² (explicit), and the row norms
    of Ã, G̃ (16) for Ω_A, Ω_G (implicit); the sketch weights are the unbiased
    1/√(q p_i) (with replacement) or 1/√π_i with π = min(1, c p) (without, errata E4)."""
    from refcurv.linalg.sketch import inclusion_probabilities

    net = CONV.net
    params, batch = _batch(CONV)
    m = SENG(sketch="leverage", sketch_size=7, replace=replace, threshold=60.0, rank=2,
             sketch_size_A=5, sketch_size_G=2)
    state = m.init(net, params)
    draws = m.draw(np.random.default_rng(3), state, net, params, batch)
    _, state = m.step(state, net, params, batch, draws=draws)

    def check(sk, X):
        rows = (X.reshape(X.shape[0], -1) ** 2).sum(axis=1)
        p = rows / rows.sum()
        if replace:
            assert_close(sk.weight, 1 / np.sqrt(sk.q * p[sk.index]), rtol=1e-12)
        else:
            pi = inclusion_probabilities(p, sk.q)
            assert_close(sk.weight, 1 / np.sqrt(pi[sk.index]), rtol=1e-12)
        assert np.all(p[sk.index] > 0)

    assert state.diagnostics["storage"] == ["explicit", "implicit"]  # n^l = 57 < 𝒯 = 60 ≤ 147
    Gf, Af = state.lowrank_factors[1]
    check(sketch_from_draws(draws, "Omega_A", 1, Af.shape[1]), Af.swapaxes(0, 1))
    check(sketch_from_draws(draws, "Omega_G", 1, Gf.shape[1]), Gf.swapaxes(0, 1))
    check(sketch_from_draws(draws, "Omega", 0, state.U[0].shape[0]), state.U[0])


# ------------------------------------------------------- implicit storage (15)–(24), (19)/(21)


def _implicit_state(pb, **kw):
    params, batch = _batch(pb)
    net = pb.net
    m = SENG(threshold=0.0, **kw)
    state = m.init(net, params)
    draws = m.draw(np.random.default_rng(pb.seed), state, net, params, batch)
    d, state = m.step(state, net, params, batch, draws=draws)
    return net, params, batch, d, state, draws


@pytest.mark.parametrize("kind", ["uniform", "leverage"])
@pytest.mark.parametrize("replace", [False, True])
def test_19_21_equal_the_kronecker_sketch(kind, replace):
    """Remark after (24): (19) = ((Ω_A ⊗ Ω_G)u_i)ᵀ((Ω_A ⊗ Ω_G)z), (21) = ((Ω_A ⊗ Ω_G)u_i)ᵀ((Ω_A ⊗
    Ω_G)u_j) with the papers' column-major vec — refcurv's row-major vec needs Ω_G ⊗ Ω_A — and
    the method's b̂ is (12) with Ω = Ω_A ⊗ Ω_G and U = ϱ^{-1/2}[vec(G_i A_iᵀ)]."""
    lam = 0.3
    net, params, batch, _, state, draws = _implicit_state(CONV, damping=lam, rank=2, sketch=kind, replace=replace,
                                                   sketch_size_A=9, sketch_size_G=2)
    rng = np.random.default_rng(0)
    for j, (o, dd) in enumerate(net.param_shapes):
        Gf, Af = state.lowrank_factors[j]
        OA = sketch_from_draws(draws, "Omega_A", j, Af.shape[1]).to_dense()
        OG = sketch_from_draws(draws, "Omega_G", j, Gf.shape[1]).to_dense()
        K_col, K_row = np.kron(OA, OG), np.kron(OG, OA)
        Z = rng.standard_normal((o, dd))
        XiA, XiG = np.einsum("za,iar->izr", OA, Af), np.einsum("zg,igr->izr", OG, Gf)  # (17)
        XiZ = OG @ Z @ OA.T
        ui = np.einsum("igr,iar->iga", Gf, Af)  # mat(u_i)
        u_col = ui.transpose(0, 2, 1).reshape(len(ui), -1)  # vec_col = column-major
        z_col = Z.T.ravel()
        ref_z = (u_col @ K_col.T) @ (K_col @ z_col)
        ref_zz = (u_col @ K_col.T) @ (K_col @ u_col.T)
        sz = np.linalg.norm(u_col @ K_col.T, axis=1) * np.linalg.norm(K_col @ z_col)
        got_z = sketched_Utz(XiA, XiG, XiZ)
        assert np.all(np.abs(got_z - ref_z) <= C * Z.size * EPS * sz)
        u_row = ui.reshape(len(ui), -1)  # refcurv's row-major vec
        assert_close((u_row @ K_row.T) @ (K_row @ Z.ravel()), ref_z, rtol=0, atol=C * Z.size * EPS * sz.max())
        wrong = (u_row @ K_col.T) @ (K_col @ Z.ravel())  # the paper's Kronecker order on row-major vec
        assert np.linalg.norm(wrong - ref_z) > 1e-6 * np.linalg.norm(ref_z)
        su = np.linalg.norm(u_col @ K_col.T, axis=1)
        assert np.all(np.abs(sketched_UtU(XiA, XiG) - ref_zz) <= C * Z.size * EPS * np.outer(su, su))
        # method level: b̂ = (λI + ŨᵀΩᵀΩŨ)⁻¹ŨᵀΩᵀΩg, Ω = Ω_A ⊗ Ω_G (col-major)
        g = rc.to_order(_grads(net, params, batch)[j], [(o, dd)], "col")
        Ucol = u_col.T / math.sqrt(len(ui))
        Xi, xi = K_col @ Ucol, K_col @ g
        cap = lam * np.eye(len(ui)) + Xi.T @ Xi
        b12 = np.linalg.solve(cap, Xi.T @ xi)
        cancel = 1 + np.linalg.norm(Xi) * np.linalg.norm(xi) / (lam * np.linalg.norm(b12))
        assert_close(np.asarray(state.diagnostics["b_hat"][j]), b12, rtol=forward_tol(Z.size, np.linalg.cond(cap)) * cancel, atol=0)


def test_implicit_state_stores_low_rank_factors():
    """Memory of the implicit storage ([SENG-conf] Table 1 / [SENG] Table 2, SENG-4): the state holds
    G̃, Ã with (n_A + n_G)·r·ϱ numbers instead of U's ϱ·n."""
    net, params, batch, _, state, _draws = _implicit_state(CONV, rank=2)
    for (o, d), (Gf, Af), U in zip(net.param_shapes, state.lowrank_factors, state.U):
        r = Gf.shape[2]
        assert U is None and Gf.shape == (CONV.N, o, r) and Af.shape == (CONV.N, d, r) and r <= 2
        assert Gf.size + Af.size == (o + d) * r * CONV.N


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("svd_of", ["auto", "G", "A"])
def test_rank_kappa_factors_are_exact(svd, svd_of):
    """(15) with r = κ (partial SVD of Ĝ_i or Â_i, footnote 1): G_i A_iᵀ = Ĝ_i Â_iᵀ. A smaller r
    is not exact here (the check can fail)."""
    net = CONV.net
    params, batch = _batch(CONV)
    A_hat, G_hat = net.factors(params, batch.x, batch.y, batch.loss)
    for Ah, Gh in zip(A_hat, G_hat):
        kappa = Gh.shape[2]
        ref = Gh @ Ah.swapaxes(1, 2)
        Gf, Af = lowrank_factors(Ah, Gh, rank=kappa, svd=svd, svd_of=svd_of, seed=5)
        assert_close(Gf @ Af.swapaxes(1, 2), ref, rtol=1e-12, atol=0)
        if kappa > 1:
            Gf, Af = lowrank_factors(Ah, Gh, rank=1, svd=svd, svd_of="G", seed=5)
            assert np.linalg.norm(Gf @ Af.swapaxes(1, 2) - ref) > 1e-6 * np.linalg.norm(ref)
            # "auto" factors the one with fewer rows: r = min(n_G, n_A) < κ is then already exact
            r = min(Gh.shape[1], Ah.shape[1])
            Gf, Af = lowrank_factors(Ah, Gh, rank=r, svd=svd, svd_of="auto", seed=5)
            assert Gf.shape[2] == r and r < kappa
            assert_close(Gf @ Af.swapaxes(1, 2), ref, rtol=1e-12, atol=0)


def test_cu_23_and_28():
    """C_U (23): exact when one c_i ≠ 0; C_U(0) = 0; positively homogeneous; (28) with 𝓜 = 1
    is (23), with 𝓜 > 1 equals its definition (written here with loops), and is exact for
    one non-zero c_i too."""
    rng = np.random.default_rng(1)
    rho, nG, nA, r = 6, 3, 5, 2
    G, A = rng.standard_normal((rho, nG, r)), rng.standard_normal((rho, nA, r))
    for i in range(rho):
        c = np.zeros(rho)
        c[i] = rng.standard_normal()
        for M in (1, 2, 3):
            assert_close(cu(c, G, A, M), c[i] * G[i] @ A[i].T, rtol=1e-14)
        assert_close(uc_exact(c, G, A), c[i] * G[i] @ A[i].T, rtol=1e-14)
    assert np.array_equal(cu(np.zeros(rho), G, A), np.zeros((nG, nA)))
    c = rng.standard_normal(rho)
    assert_close(cu(3.0 * c, G, A), 3.0 * cu(c, G, A), rtol=1e-14)
    ref23 = sum(np.sqrt(abs(ci)) * Gi for ci, Gi in zip(c, G)) @ \
        sum(ci / np.sqrt(np.abs(c)).sum() * Ai for ci, Ai in zip(c, A)).T
    assert_close(cu(c, G, A, 1), ref23, rtol=1e-13)
    M = 3
    Gc = sum(sum(np.sqrt(abs(c[j])) * G[j] for j in range(w * 2, w * 2 + 2)) for w in range(M))
    Ac = sum(sum(c[j] / sum(np.sqrt(abs(c[t])) for t in range(w * 2, w * 2 + 2)) * A[j]
                 for j in range(w * 2, w * 2 + 2)) for w in range(M))
    assert_close(cu(c, G, A, M), Gc @ Ac.T, rtol=1e-13)
    assert_close(uc_exact(c, G, A), sum(ci * Gi @ Ai.T for ci, Gi, Ai in zip(c, G, A)), rtol=1e-13)
    assert np.linalg.norm(cu(c, G, A) - uc_exact(c, G, A)) > 1e-3 * np.linalg.norm(uc_exact(c, G, A))


@pytest.mark.parametrize("rank", [None, "kappa"])
def test_implicit_with_full_sketches_and_exact_uc_is_the_definition(rank):
    """Ω_A, Ω_G permutations (ζ = n, uniform, no replacement), r = κ and Uc by (22): (24)
    (with a = 1/λ) and the ϱ-scalings of SENG-2 give (7) exactly, for ϱ > 1."""
    lam = 0.2
    net = CONV.net
    params, batch = _batch(CONV)
    kw = dict(damping=lam, uc="exact", sketch_size_A=10**6, sketch_size_G=10**6, svd_of="A",
              rank=None if rank is None else 16)  # κ = 16 (conv), clamped to κ = 1 (linear)
    _, _, _, d, state, _draws = _implicit_state(CONV, **kw)
    assert [f[0].shape[2] for f in state.lowrank_factors] == [16, 1]
    for dj, M, g in zip(d, _efim_blocks(net, params, batch), _grads(net, params, batch)):
        _assert_definition(dj, M, g, lam, CONV.N, "implicit exact")


# ---------------------------------------------------------------- errata pins (SENG-1, -2, -3)


def test_seng1_24_needs_a_on_C_U():
    """SENG-1: with one sample (C_U = Uc exactly), full sketches and r = κ, the corrected
    (24) −a g + a C_U(b̂) is (7); the printed −(1/λ)g + C_U(b̂) is not (λ ≠ 1)."""
    lam = 0.1
    pb = Problem(CONV.spec, CONV.input_shape, 3, "cross_entropy", 1, 4)
    net, params, batch, d, state, _draws = _implicit_state(pb, damping=lam, sketch_size_A=10**6, sketch_size_G=10**6)
    for j, (M, g) in enumerate(zip(_efim_blocks(net, params, batch), _grads(net, params, batch))):
        _assert_definition(d[j], M, g, lam, 1, "(24) corrected")
        Gf, Af = state.lowrank_factors[j]
        printed = -g / lam + cu(np.asarray(state.diagnostics["b_hat"][j]), Gf, Af).ravel()
        assert np.linalg.norm(printed - _definition(M, g, lam)) > 1e-2 * np.linalg.norm(_definition(M, g, lam))


def test_seng2_printed_19_21_23_scalings_give_the_summed_efim():
    """SENG-2: (19), (21), (22) are per-sample quantities (u_iᵀz, u_iᵀu_j, Σc_iu_i); used
    unscaled as Uᵀz, UᵀU, Uc they give −(Σ_i u_iu_iᵀ + λI)⁻¹g = −(ϱM + λI)⁻¹g, not (7)."""
    lam = 0.2
    net, params, batch, d, state, _draws = _implicit_state(CONV, damping=lam, uc="exact")
    for j, (M, g) in enumerate(zip(_efim_blocks(net, params, batch), _grads(net, params, batch))):
        Gf, Af = state.lowrank_factors[j]
        _assert_definition(d[j], M, g, lam, CONV.N, "scaled")
        o, dd = net.param_shapes[j]
        Zg = g.reshape(o, dd)
        b_pr = np.linalg.solve(lam * np.eye(CONV.N) + sketched_UtU(Af, Gf), sketched_Utz(Af, Gf, Zg))
        printed = (uc_exact(b_pr, Gf, Af).ravel() - g) / lam
        _assert_definition(printed, CONV.N * M, g, lam, CONV.N, "printed = summed EFIM")
        assert np.linalg.norm(printed - _definition(M, g, lam)) > 1e-2 * np.linalg.norm(_definition(M, g, lam))


def _worker_efims(net, params, batch, M):
    m = len(batch.x) // M
    return [[Mb / M for Mb in _efim_blocks(net, params, Batch(batch.x[w * m:(w + 1) * m], batch.y[w * m:(w + 1) * m],
                                                               batch.loss))] for w in range(M)]


def _block_formula(Ms, g, gp, lam, c=1):
    """(26)/(27) dense: (𝓜g'/c − g)/λ − (1/c)Σ_w (λI + cM_w)⁻¹ g' with M_w = (worker w's
    EFIM)/𝓜; c = 1 ("global"): −g/λ + Σ_w [g'/λ − (λI + M_w)⁻¹g']; c = 𝓜 ("worker")."""
    return (len(Ms) * gp / c - g) / lam + sum(_definition(c * Mw, gp, lam) for Mw in Ms) / c


@pytest.mark.parametrize("M", [1, 2, 4])
def test_distributed_full_coupling_is_seng_and_one_worker_is_seng(M):
    """SENG-3: with U = [U^{(1)} … U^{(𝓜)}], U^{(w)} = ϱ^{-1/2}[u_j]_{j∈S_w}, (8) is
    −a g + a Σ_w U^{(w)}b_w (a sum). block=False gives (7) for any 𝓜; 𝓜 = 1 with block=True
    is SENG; the printed (1/𝓜)Σ_w is not (7) for 𝓜 > 1."""
    lam = 0.05
    pb = Problem(CONV.spec, CONV.input_shape, 3, "cross_entropy", 4, 9)
    params, batch = _batch(pb)
    net = pb.net
    for thr in (math.inf, 0.0):
        d_full, state = SENGDistributed(damping=lam, workers=M, block_capacitance=False, threshold=thr, uc="exact").step(
            SENGDistributed(workers=M).init(net, params), net, params, batch)
        for j, (Mb, g) in enumerate(zip(_efim_blocks(net, params, batch), _grads(net, params, batch))):
            _assert_definition(d_full[j], Mb, g, lam, pb.N, f"full coupling, 𝓜={M}")
            if thr == math.inf and M > 1:
                U = state.U[j]
                b = np.linalg.solve(lam * np.eye(pb.N) + U.T @ U, U.T @ g)
                printed = -g / lam + (U @ b) / (lam * M)  # (25) as printed, global blocks
                Uw = math.sqrt(M) * U  # per-worker normalized U_{S_w} (5)
                bw = np.linalg.solve(lam * np.eye(pb.N) + Uw.T @ Uw, Uw.T @ g)
                printed_w = -g / lam + (Uw @ bw) / (lam * M)
                ref = _definition(Mb, g, lam)
                for p in (printed, printed_w):
                    assert np.linalg.norm(p - ref) > 1e-3 * np.linalg.norm(ref)
    if M == 1:
        d1, _ = SENG(damping=lam).step(SENG().init(net, params), net, params, batch)
        dD, _ = SENGDistributed(damping=lam, workers=1).step(SENG().init(net, params), net, params, batch)
        for a, b in zip(d1, dD):
            assert np.array_equal(a, b)


@given(problems(max_batch=2).map(_even_batch), dampings(-3, 1))
def test_block_diagonal_26_equals_dense_block_formula(pb, lam):
    """(26) fast (worker axis) = −Σ_w(λI + M_w)⁻¹g + ((𝓜−1)/λ)g with M_w from each worker's
    own sub-batch EFIM (refcurv.curvature) divided by 𝓜."""
    params, batch = _batch(pb)
    net = pb.net
    m = SENGDistributed(damping=lam, workers=2, normalization="global")
    d, _ = m.step(m.init(net, params), net, params, batch)
    dd, _ = m.step(m.init(net, params), net, params, batch, dense=True)
    Ws = _worker_efims(net, params, batch, 2)
    for j, g in enumerate(_grads(net, params, batch)):
        Ms = [W[j] for W in Ws]
        ref = _block_formula(Ms, g, g, lam)
        kap = max(_kappa(Mw, lam) for Mw in Ms)
        tol = forward_tol(g.size + pb.N, kap) * (np.linalg.norm(ref) + 2 * np.linalg.norm(g) / lam)
        assert np.linalg.norm(d[j].ravel() - ref) <= tol
        assert np.linalg.norm(dd[j].ravel() - ref) <= tol


def test_block_diagonal_26_is_exact_for_orthogonal_workers():
    """If the workers' per-sample gradients are mutually orthogonal, UᵀU is block diagonal
    and (26) = (7) — with the sum over workers (SENG-3); the printed average is not (7)."""
    lam = 0.1
    net = Sequential([Linear(4, 2, bias=False)])
    params = net.init(0)
    rng = np.random.default_rng(2)
    x = np.zeros((4, 4))
    x[:2, :2] = rng.standard_normal((2, 2))  # worker 1 in span(e1, e2)
    x[2:, 2:] = rng.standard_normal((2, 2))  # worker 2 in span(e3, e4)
    batch = Batch(x, rng.standard_normal((4, 2)), MSE())
    d, state = SENGDistributed(damping=lam, workers=2, normalization="global").step(
        SENGDistributed().init(net, params), net, params, batch)
    M, g = _efim_blocks(net, params, batch)[0], _grads(net, params, batch)[0]
    _assert_definition(d[0], M, g, lam, 4, "(26), orthogonal workers")
    U = state.U[0]
    b = np.concatenate([np.linalg.solve(lam * np.eye(2) + Uw.T @ Uw, Uw.T @ g) for Uw in (U[:, :2], U[:, 2:])])
    printed = -g / lam + (U @ b) / (2 * lam)
    assert np.linalg.norm(printed - _definition(M, g, lam)) > 1e-2 * np.linalg.norm(_definition(M, g, lam))


@given(problems(max_batch=2).map(_even_batch), dampings(-3, 1))
def test_worker_normalization_is_the_average_of_worker_directions(pb, lam):
    """normalization="worker" (the printed (25)–(26) with (5)'s U_{S_w}):
    d = −(1/𝓜)Σ_w (λI + M_{S_w})⁻¹ g with M_{S_w} worker w's own EFIM (refcurv.curvature)."""
    params, batch = _batch(pb)
    net = pb.net
    m = SENGDistributed(damping=lam, workers=2)  # normalization="worker" is the default
    d, _ = m.step(m.init(net, params), net, params, batch)
    dd, _ = m.step(m.init(net, params), net, params, batch, dense=True)
    Ws = _worker_efims(net, params, batch, 2)
    for j, g in enumerate(_grads(net, params, batch)):
        Ms = [2 * W[j] for W in Ws]  # M_{S_w} = 𝓜 M_w
        ref = sum(_definition(Mw, g, lam) for Mw in Ms) / 2
        kap = max(_kappa(Mw, lam) for Mw in Ms)
        tol = forward_tol(g.size + pb.N, kap) * (np.linalg.norm(ref) + 2 * np.linalg.norm(g) / lam)
        assert np.linalg.norm(d[j].ravel() - ref) <= tol
        assert np.linalg.norm(dd[j].ravel() - ref) <= tol


def test_global_blocks_can_ascend_worker_average_cannot():
    """Two workers holding the same samples (identical EFIMs M_w = M/2, spans not orthogonal):
    "global" (26) gives −2(λI + M/2)⁻¹g + g/λ, an ascent direction when σ(M) > 2λ along g;
    "worker" gives −(λI + M)⁻¹g = (7) exactly (the workers' EFIMs coincide)."""
    lam = 0.01
    net = Sequential([Linear(3, 1, bias=False)])
    params = net.init(0)
    rng = np.random.default_rng(4)
    x1 = rng.standard_normal((1, 3)) * 3
    batch = Batch(np.concatenate([x1, x1]), np.array([[5.0], [5.0]]), MSE())
    M, g = _efim_blocks(net, params, batch)[0], _grads(net, params, batch)[0]
    d_glob, _ = SENGDistributed(damping=lam, normalization="global").step(
        SENGDistributed().init(net, params), net, params, batch)
    d_work, _ = SENGDistributed(damping=lam, normalization="worker").step(
        SENGDistributed().init(net, params), net, params, batch)
    assert float(g @ d_glob[0].ravel()) > 0  # ascent
    ref_glob = -2 * np.linalg.solve(lam * np.eye(3) + M / 2, g) + g / lam
    assert_close(d_glob[0].ravel(), ref_glob, rtol=forward_tol(5, _kappa(M, lam)), atol=0)
    assert float(g @ d_work[0].ravel()) < 0
    _assert_definition(d_work[0], M, g, lam, 2, "worker, identical workers")


@pytest.mark.parametrize("sync_cu", [True, False])
def test_distributed_implicit_C_U_is_28(sync_cu):
    """Implicit layers on 𝓜 = 2 workers (block (26)): Uc is (28) (sync_cu=True) or (23),
    i.e. d = (ϱ^{-1/2}·(28 or 23)(b̂) − g)/λ with (28) written out here per worker."""
    lam = 0.3
    net, params, batch, d, state, _draws = _implicit_state(CONV, damping=lam, workers=2, sync_cu=sync_cu)
    for j, g in enumerate(_grads(net, params, batch)):
        Gf, Af = state.lowrank_factors[j]
        b = np.asarray(state.diagnostics["b_hat"][j])
        rho = len(b)
        if sync_cu:
            parts = [(b[w * 2:w * 2 + 2], Gf[w * 2:w * 2 + 2], Af[w * 2:w * 2 + 2])
                     for w in range(2)]
            Gc = sum(np.einsum("i,igr->gr", np.sqrt(np.abs(c)), G) for c, G, _ in parts)
            Ac = sum(np.einsum("i,iar->ar", c / np.sqrt(np.abs(c)).sum(), A) for c, _, A in parts)
        else:
            Gc = np.einsum("i,igr->gr", np.sqrt(np.abs(b)), Gf)
            Ac = np.einsum("i,iar->ar", b / np.sqrt(np.abs(b)).sum(), Af)
        ref = ((Gc @ Ac.T).ravel() / math.sqrt(rho) - g) / lam
        assert_close(d[j].ravel(), ref, rtol=1e-12, atol=1e-14 * np.linalg.norm(g) / lam)


@pytest.mark.parametrize("normalization", ["global", "worker"])
def test_delayed_gradient_27(normalization):
    """(27): b̃ from g_{k−1} (the current g at k = 0): d_k = (𝓜g_{k−1}/c − g_k)/λ −
    (1/c)Σ_w (λI + cM_w)⁻¹g_{k−1}, against refcurv.curvature built densely at each step."""
    lam = 0.1
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "mse", 4, 5)
    net = pb.net
    params, b0 = _batch(pb)
    _, b1 = _batch(pb, shift=1)
    params1 = [1.1 * W for W in params]
    m = SENGDistributed(damping=lam, workers=2, delayed=True, normalization=normalization)
    c = 2 if normalization == "worker" else 1
    d0, s = m.step(m.init(net, params), net, params, b0)
    d1, _ = m.step(s, net, params1, b1)
    e0, _ = m.step(m.init(net, params), net, params, b0, dense=True)
    e1, _ = m.step(s, net, params1, b1, dense=True)
    g0, g1 = _grads(net, params, b0), _grads(net, params1, b1)
    for (dk, ek, gk, gp, prm, bt) in ((d0, e0, g0, g0, params, b0), (d1, e1, g1, g0, params1, b1)):
        Ws = _worker_efims(net, prm, bt, 2)
        for j in range(2):
            ref = _block_formula([W[j] for W in Ws], gk[j], gp[j], lam, c)
            kap = max(_kappa(c * W[j], lam) for W in Ws)
            scale = np.linalg.norm(ref) + 3 * np.linalg.norm(np.r_[gk[j], gp[j]]) / lam
            tol = forward_tol(gk[j].size + 4, kap) * scale
            assert np.linalg.norm(dk[j].ravel() - ref) <= tol
            assert np.linalg.norm(ek[j].ravel() - ref) <= tol
    assert np.linalg.norm(d1[0].ravel() - _block_formula([W[0] for W in _worker_efims(net, params1, b1, 2)],
                                                          g1[0], g1[0], lam, c)) > 1e-6


# ------------------------------------------------------------ staleness (T) and history buffers


@pytest.mark.parametrize("threshold", [math.inf, 0.0])
def test_update_frequency_reuses_stale_U(threshold):
    """Algorithm 1: U (explicit) or Ã, G̃ (implicit; with Ω = I, r = κ and (22) the implicit
    direction is (7)) are rebuilt when k mod T = 0 and reused otherwise; g is always fresh."""
    lam, T = 0.1, 3
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "cross_entropy", 5, 6)
    net = pb.net
    params, _ = _batch(pb)
    m = SENG(damping=lam, T_inv=T, threshold=threshold, uc="exact")
    state = m.init(net, params)
    Ms = None
    for k in range(5):
        prm = [(1 + 0.1 * k) * W for W in params]
        _, batch = _batch(pb, shift=k)
        d, state = m.step(state, net, prm, batch)
        if k % T == 0:
            Ms = _efim_blocks(net, prm, batch)
        for dj, M, g in zip(d, Ms, _grads(net, prm, batch)):
            _assert_definition(dj, M, g, lam, pb.N, f"step {k}")
    for j in range(2):  # the stale M differs from the fresh one (the check can fail)
        fresh = _definition(_efim_blocks(net, prm, batch)[j], _grads(net, prm, batch)[j], lam)
        assert np.linalg.norm(d[j].ravel() - fresh) > 1e-6 * np.linalg.norm(fresh)


def _layer_slices(net):
    return rc.vec.layer_slices(net)


@given(st.integers(2, 4), st.floats(0.3, 1.0), dampings(-2, 0))
def test_history_decay_000_24_equals_definition(p, zeta, lam):
    """[SENG-conf] (24): U_k = p^{-1/2}[ζ^{p−1}g_{k−p+1}, …, ζ^0 g_k] (missing columns zero);
    d = −(U_kU_kᵀ + λI)⁻¹g_k. Fast and dense forms, 6 steps."""
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "mse", 3, 8)
    m = SENG(damping=lam, history="decay", memory=p, beta=zeta)
    gs = []
    net = pb.net
    params, _ = _batch(pb)
    state = m.init(net, params)
    for k in range(6):
        prm = [(1 + 0.05 * k) * W for W in params]
        _, batch = _batch(pb, shift=k)
        d, new = m.step(state, net, prm, batch, rng=k)
        dd, _ = m.step(state, net, prm, batch, rng=k, dense=True)
        state = new
        gs.append(_grads(net, prm, batch))
        for j in range(2):
            cols = [zeta ** (p - 1 - t) * gs[k - p + 1 + t][j] if k - p + 1 + t >= 0 else 0 * gs[k][j]
                    for t in range(p)]
            U = np.stack(cols, axis=1) / math.sqrt(p)
            _assert_definition(d[j], U @ U.T, gs[k][j], lam, p, f"decay step {k}")
            _assert_definition(dd[j], U @ U.T, gs[k][j], lam, p, f"decay dense step {k}")


@given(st.integers(3, 5), st.data(), dampings(-2, 0))
def test_history_hybrid_000_25_equals_definition(p, data, lam):
    """[SENG-conf] (25): U_k = p^{-1/2}[g_{k−v}, …, g_{k−1}, ∇ψ_{i_1}(θ_k), …, ∇ψ_{i_{p−v}}(θ_k)] with the
    indices drawn in draw(); fast and dense forms, 5 steps."""
    v = data.draw(st.integers(2, p - 1))
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "cross_entropy", 5, 9)
    m = SENG(damping=lam, history="hybrid", memory=p, hybrid_v=v)
    net = pb.net
    sl = _layer_slices(net)
    params, _ = _batch(pb)
    state = m.init(net, params)
    gs = []
    for k in range(5):
        prm = [(1 + 0.05 * k) * W for W in params]
        _, batch = _batch(pb, shift=k)
        idx = m.draw(np.random.default_rng(k), state, net, prm, batch).sketches["hybrid"]
        d, new = m.step(state, net, prm, batch, rng=k)
        dd, _ = m.step(state, net, prm, batch, rng=k, dense=True)
        state = new
        g = _grads(net, prm, batch)
        Ups = cv.per_sample_grads(net, prm, batch.x, batch.y, batch.loss)
        for j in range(2):
            old = [gs[k - v + t][j] if k - v + t >= 0 else 0 * g[j] for t in range(v)]
            U = np.stack(old + [Ups[i, sl[j]] for i in idx], axis=1) / math.sqrt(p)
            assert U.shape[1] == p
            _assert_definition(d[j], U @ U.T, g[j], lam, p, f"hybrid step {k}")
            _assert_definition(dd[j], U @ U.T, g[j], lam, p, f"hybrid dense step {k}")
        gs.append(g)


# ---------------------------------------------------------------------- errors and training


def test_bad_hyper_parameters():
    for kwargs, match in [({"damping": 0.0}, "damping"), ({"sketch": "gaussian"}, "sketch"),
                          ({"sketch_size": 0}, "sketch_size"), ({"replace": "yes"}, "replace"),
                          ({"threshold": -1.0}, "threshold"), ({"rank": 0}, "rank"), ({"svd": "qr"}, "svd"),
                          ({"svd_of": "both"}, "svd_of"), ({"sketch_size_A": 0}, "sketch_size_A"),
                          ({"sketch_size_G": 1.5}, "sketch_size_G"), ({"uc": "sum"}, "uc"),
                          ({"T_inv": 0}, "T_inv"), ({"history": "all"}, "history"),
                          ({"beta": 0.0}, "beta"), ({"beta": 1.5}, "beta"), ({"phase": "k1"}, "phase"),
                          ({"power_iter": -1}, "power_iter"),
                          ({"history": "hybrid", "memory": 3, "hybrid_v": 3}, "hybrid_v"),
                          ({"history": "hybrid", "memory": 3, "hybrid_v": 1}, "hybrid_v"),
                          ({"workers": 0}, "workers"), ({"workers": 2, "history": "decay"}, "workers"),
                          ({"block_capacitance": 1}, "block_capacitance"), ({"oversample": -1}, "oversample"),
                          ({"normalization": "local"}, "normalization")]:
        with pytest.raises(HyperParameterError, match=match):
            SENG(**kwargs)
    net = Sequential([Linear(3, 2)])
    params = net.init(0)
    with pytest.raises(HyperParameterError, match="history"):
        SENG(history="decay", threshold=0.0).init(net, params)
    batch = Batch(np.ones((4, 3)), np.zeros((4, 2)), MSE())
    with pytest.raises(HyperParameterError, match="workers"):
        SENGDistributed(workers=3).step(SENGDistributed(workers=3).init(net, params), net, params, batch)
    with pytest.raises(HyperParameterError, match="hybrid_v"):
        m = SENG(history="hybrid", memory=8, hybrid_v=2)
        m.step(m.init(net, params), net, params, batch)


SMOKE = {
    "smw": SENG(damping=0.05),
    "sketched leverage": SENG(damping=0.05, sketch="leverage", sketch_size=24, replace=True),
    "implicit C_U": SENG(damping=0.05, threshold=40, rank=1, sketch_size_A=6),
    "distributed (26)": SENGDistributed(damping=0.05, workers=4),
    "distributed (27), T = 2": SENGDistributed(damping=0.05, workers=4, delayed=True, T_inv=2),
    "history (24)": SENG(damping=0.05, history="decay", memory=4, beta=0.9),
}


def _smoke(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    net = Sequential([Linear(4, 16), Tanh(), Linear(16, 3)])
    _, hist = train(method, net, net.init(0), x, y, CrossEntropy(), steps=30, lr=0.2, batch_size=32, seed=1)
    return hist["loss"]


@pytest.mark.parametrize("name", list(SMOKE))
def test_training_smoke_decreases_loss(name):
    loss = _smoke(SMOKE[name])
    assert loss[-1] < 0.6 * loss[0], loss


def test_global_block_normalization_diverges_on_the_smoke_problem():
    """The hazard documented for normalization="global" (26): same problem, λ = 0.5, the loss
    grows (ascent directions along the workers' shared gradient direction)."""
    loss = _smoke(SENGDistributed(damping=0.5, workers=4, normalization="global"))
    assert loss[-1] > 10 * loss[0], loss


# ------------------------------------------------------------- refresh phase (Algorithm 1, 2)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_phase_paper_is_a_literal_replay_of_algorithms_1_and_2(T):
    """phase="paper": Algorithm 2 loops k = 1, 2, … and Algorithm 1 constructs U_k iff
    k mod T = 0, else U_k = U_{k−1} — replayed literally here (U_0 does not exist, so the first
    step constructs it). phase="k0" (default) refreshes at 0-based k ≡ 0 (mod T); both are (7)
    with the U of their schedule."""
    lam, K = 0.1, 7
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "cross_entropy", 5, 6)
    net = pb.net
    params, _ = _batch(pb)
    for phase in ("paper", "k0"):
        m = SENG(damping=lam, T_inv=T, phase=phase)
        state = m.init(net, params)
        Ms = None
        for k in range(1, K + 1):  # Algorithm 2's 1-based k
            prm = [(1 + 0.1 * k) * W for W in params]
            _, batch = _batch(pb, shift=k)
            construct = (k % T == 0 or Ms is None) if phase == "paper" else ((k - 1) % T == 0)
            if construct:
                Ms = _efim_blocks(net, prm, batch)
            d, state = m.step(state, net, prm, batch)
            assert state.diagnostics["refreshed"] == construct, (phase, k)
            for dj, M, g in zip(d, Ms, _grads(net, prm, batch)):
                _assert_definition(dj, M, g, lam, pb.N, f"{phase} step {k}")
    if T > 1:  # the two schedules differ (the replay can tell them apart)
        sched = {ph: [SENG(T_inv=T, phase=ph)._due(k) for k in range(K)] for ph in ("paper", "k0")}
        assert sched["paper"] != sched["k0"]


def test_refresh_step_schedules():
    from refcurv.methods.seng import refresh_step

    assert [refresh_step(k, 3) for k in range(7)] == [True, False, False, True, False, False, True]
    assert [refresh_step(k, 3, "paper") for k in range(7)] == [False, False, True, False, False, True, False]
    assert all(refresh_step(k, 1, ph) for k in range(4) for ph in ("k0", "paper"))


# ----------------------------------------------------------------------- draws: injection, errors


def _two_layer():
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "mse", 5, 12)
    params, batch = _batch(pb)
    return pb, pb.net, params, batch


def test_injected_explicit_sketch_is_consumed_exactly():
    """A sketch drawn elsewhere (hand-written rows, repeated index, arbitrary weights) is the Ω
    of (10)–(13): d = −(λI + M ΩᵀΩ)⁻¹g with M the EFIM block of refcurv.curvature."""
    from refcurv.methods import Draws

    lam = 0.2
    pb, net, params, batch = _two_layer()
    m = SENG(damping=lam, sketch_size=4)
    idx = [np.array([0, 2, 2, 5]), np.array([1, 3, 7, 9])]
    wts = [np.array([1.5, 0.5, 0.7, 2.0]), np.array([0.3, 1.0, 1.2, 0.9])]
    sk = {}
    for j in range(2):
        sk[f"Omega/{j}/index"], sk[f"Omega/{j}/weight"] = idx[j], wts[j]
    draws = Draws(method="seng", sketches=sk)
    for dense in (False, True):
        d, state = m.step(m.init(net, params), net, params, batch, draws=draws, dense=dense)
        for j, (M, g) in enumerate(zip(_efim_blocks(net, params, batch), _grads(net, params, batch))):
            Om = np.zeros((4, M.shape[0]))
            Om[np.arange(4), idx[j]] = wts[j]
            A = lam * np.eye(M.shape[0]) + M @ Om.T @ Om
            ref = -np.linalg.solve(A, g)
            assert_close(d[j].ravel(), ref, rtol=forward_tol(M.shape[0] + pb.N, np.linalg.cond(A)) *
                         (1 + np.linalg.norm(g) / (lam * np.linalg.norm(ref))), atol=0)


def test_injected_implicit_sketches_and_hybrid_indices_are_consumed_exactly():
    """Ω_A, Ω_G injected into an implicit layer give implicit_direction with those sketches
    bit for bit; injected hybrid indices are the ∇ψ_i columns of [SENG-conf] (25)."""
    from refcurv.linalg.sketch import RowSketch
    from refcurv.methods import Draws
    from refcurv.methods.base import layer_grads
    from refcurv.methods.seng import implicit_direction

    lam = 0.3
    net = CONV.net
    params, batch = _batch(CONV)
    m = SENG(damping=lam, threshold=0.0, rank=2, sketch_size_A=3, sketch_size_G=2)
    sk = {}
    for j, (o, d_in) in enumerate(net.param_shapes):
        sk[f"Omega_A/{j}/index"], sk[f"Omega_A/{j}/weight"] = np.array([d_in - 1, 0, 1]), np.array([1.0, 2.0, 0.5])
        sk[f"Omega_G/{j}/index"], sk[f"Omega_G/{j}/weight"] = np.array([o - 1, 0]), np.array([0.7, 1.1])
    draws = Draws(method="seng", sketches=sk)
    d, state = m.step(m.init(net, params), net, params, batch, draws=draws)
    # SENG's fast form has the per-sample gradients U anyway and takes g as their mean
    # (base.layer_grads): the same g, so that the replay is bit for bit
    g, _ = layer_grads(net, params, batch)
    for j, (o, d_in) in enumerate(net.param_shapes):
        Gf, Af = state.lowrank_factors[j]
        skA = RowSketch(n=d_in, index=sk[f"Omega_A/{j}/index"], weight=sk[f"Omega_A/{j}/weight"])
        skG = RowSketch(n=o, index=sk[f"Omega_G/{j}/index"], weight=sk[f"Omega_G/{j}/weight"])
        ref, _ = implicit_direction(Gf, Af, g[j], g[j], lam, skA, skG)
        assert np.array_equal(d[j], ref)
    # hybrid: p = 4, v = 2, indices (4, 1) chosen by the caller
    pb, net, params, batch = _two_layer()
    m = SENG(damping=lam, history="hybrid", memory=4, hybrid_v=2)
    idx = np.array([4, 1])
    for dense in (False, True):
        d, _ = m.step(m.init(net, params), net, params, batch, draws=Draws(method="seng", sketches={"hybrid": idx}),
                      dense=dense)
        Ups = cv.per_sample_grads(net, params, batch.x, batch.y, batch.loss)
        for j, (sl, g) in enumerate(zip(_layer_slices(net), _grads(net, params, batch))):
            U = np.stack([0 * g, 0 * g] + [Ups[i, sl] for i in idx], axis=1) / 2.0
            _assert_definition(d[j], U @ U.T, g, lam, 4, f"hybrid injected, dense={dense}")


def test_wrong_draws_are_refused_with_the_field_named():
    from refcurv.errors import DrawsError
    from refcurv.methods import Draws

    pb, net, params, batch = _two_layer()
    m = SENG(sketch_size=3)
    state = m.init(net, params)
    good = m.draw(np.random.default_rng(0), state, net, params, batch)

    def bad(**changes):
        sk = dict(good.sketches)
        for k, v in changes.items():
            if v is None:
                sk.pop(k)
            else:
                sk[k] = v
        return Draws(method="seng", sketches=sk, seeds=dict(good.seeds))

    cases = [({"Omega/1/index": None}, "Omega/1/index"), ({"Omega/0/weight": None}, "Omega/0/weight"),
             ({"Omega/0/index": np.array([0.0, 1.0, 2.0])}, "Omega/0/index"),
             ({"Omega/0/index": np.array([0, 1, 16])}, r"Omega/0/index.*\[0, 16\)"),
             ({"Omega/0/index": np.array([[0, 1, 2]])}, "Omega/0/index"),
             ({"Omega/1/weight": np.array([1.0, 1.0])}, "Omega/1/weight"),
             ({"Omega/1/weight": np.array([1.0, -1.0, 1.0])}, "Omega/1/weight")]
    for change, match in cases:
        with pytest.raises(DrawsError, match="seng") as e:
            m.step(state, net, params, batch, draws=bad(**change))
        assert e.match(match)
    mh = SENG(history="hybrid", memory=4, hybrid_v=2)
    sh = mh.init(net, params)
    for h in (np.array([1]), np.array([1, 1]), np.array([0, 5]), np.array([0.0, 1.0])):
        with pytest.raises(DrawsError, match="hybrid"):
            mh.step(sh, net, params, batch, draws=Draws(method="seng", sketches={"hybrid": h}))
    mr = SENG(threshold=0.0, rank=1, svd="randomized")
    assert mr.draw_fields == ("seeds",)
    with pytest.raises(DrawsError, match="seeds"):
        mr.step(mr.init(net, params), net, params, batch, draws=Draws(method="seng"))
    with pytest.raises(DrawsError, match="svd/1"):
        mr.step(mr.init(net, params), net, params, batch, draws=Draws(method="seng", seeds={"svd/0": 3}))


def test_draw_fields_and_sketch_arrays():
    """draw() returns the sketches as arrays (not seeds): explicit Ω per explicit layer,
    Ω_A / Ω_G per implicit layer, the hybrid indices; seeds only for the randomized SVD."""
    net = CONV.net
    params, batch = _batch(CONV)
    m = SENG(sketch_size=5, threshold=60.0, rank=2, svd="randomized", sketch_size_A=4)
    dr = m.draw(np.random.default_rng(0), m.init(net, params), net, params, batch)
    assert sorted(dr.sketches) == ["Omega/0/index", "Omega/0/weight", "Omega_A/1/index", "Omega_A/1/weight"]
    assert list(dr.seeds) == ["svd/1"] and isinstance(dr.seeds["svd/1"], int)
    assert dr.sketches["Omega/0/index"].shape == (5,) and dr.sketches["Omega_A/1/index"].max() < net.param_shapes[1][1] == 49
    assert SENG().draw_fields == () and SENG(sketch_size=3).draw_fields == ("sketches",)
    assert SENG(sketch_size=3, threshold=10.0).draw_fields == ()  # depends on the network: check_draws


def test_float32_leverage_sketch_runs_and_matches_float64_shape():
    """Leverage probabilities are normalized in float64 on the host (float32 used to miss
    Σp = 1 and be rejected by row_sampling)."""
    pb, net, params, batch = _two_layer()
    m = SENG(damping=0.1, sketch="leverage", sketch_size=7, replace=True)
    p32 = [W.astype(np.float32) for W in params]
    b32 = Batch(batch.x.astype(np.float32), batch.y.astype(np.float32), batch.loss)
    d, state = m.step(m.init(net, p32), net, p32, b32, rng=0)
    assert all(x.dtype == np.float32 for x in d) and all(np.isfinite(x).all() for x in d)


# ------------------------------------------------------------------- pure functions, one by one


def test_capacitance_solve_is_the_block_diagonal_12_26():
    from refcurv.methods.seng import capacitance_solve

    rng = np.random.default_rng(3)
    Xi, xi, lam = rng.standard_normal((7, 6)), rng.standard_normal(7), 0.3
    for blocks, scale in ((1, 1), (2, 1), (3, 3), (2, 2)):
        m = 6 // blocks
        ref = np.concatenate([np.linalg.solve(lam * np.eye(m) + scale * Xi[:, w * m:(w + 1) * m].T @
                                              Xi[:, w * m:(w + 1) * m], Xi[:, w * m:(w + 1) * m].T @ xi)
                              for w in range(blocks)])
        assert_close(capacitance_solve(lam, Xi, xi, blocks, scale), ref, rtol=forward_tol(7, 1e3))


def test_smw_direction_is_7():
    """(8): with b = (λI + UᵀU)⁻¹Uᵀg, (Ub − g)/λ = −(λI + UUᵀ)⁻¹g."""
    from refcurv.methods.seng import smw_direction

    rng = np.random.default_rng(4)
    U, g, lam = rng.standard_normal((6, 3)), rng.standard_normal((2, 3)), 0.5
    b = np.linalg.solve(lam * np.eye(3) + U.T @ U, U.T @ g.ravel())
    d = smw_direction(U, b, g, lam)
    assert d.shape == g.shape
    _assert_definition(d, U @ U.T, g.ravel(), lam, 3, "smw")


def test_apply_sketch_and_row_sketch():
    from refcurv.methods.seng import apply_sketch, row_sketch

    rng = np.random.default_rng(5)
    X = rng.standard_normal((6, 4, 2))
    sk = row_sketch(4, 3, "uniform", False, None, 7)
    assert sk.q == 3 and np.allclose(sk.weight, math.sqrt(4 / 3))
    Om = sk.to_dense()
    assert np.array_equal(apply_sketch(sk, X, 1), np.einsum("qa,iar->iqr", Om, X))
    assert apply_sketch(None, X, 1) is X and row_sketch(4, None, "uniform", False, None, 0) is None
    lev = row_sketch(4, 10, "leverage", False, np.array([[1.0], [0.0], [2.0], [0.0]]), 0)
    assert lev.index.tolist() == [0, 2] and np.array_equal(lev.weight, [1.0, 1.0])  # every non-zero row, weight 1


def test_history_kernels_are_000_24_25():
    from refcurv.methods.seng import history_decay, history_hybrid

    rng = np.random.default_rng(6)
    buf, g = rng.standard_normal((3, 2, 2)), rng.standard_normal((2, 2))
    nb, U = history_decay(buf, g, 0.5)
    assert np.array_equal(nb, np.stack([buf[1], buf[2], g]))
    assert_close(U, np.stack([0.25 * buf[1].ravel(), 0.5 * buf[2].ravel(), g.ravel()], axis=1) / math.sqrt(3),
                 rtol=1e-15)
    us = rng.standard_normal((2, 2, 2))
    nb, U = history_hybrid(buf[:2], g, us, 4)
    assert np.array_equal(nb, np.stack([buf[1], g]))
    assert_close(U, np.stack([buf[0].ravel(), buf[1].ravel(), us[0].ravel(), us[1].ravel()], axis=1) / 2,
                 rtol=1e-15)


def test_dense_block_direction_formula():
    """(𝓜_b g'/c − g)/λ − (1/c)Σ_w(λI + cM_w S)⁻¹g' against its terms; one block, S = I,
    g' = g: (7)."""
    from refcurv.methods.seng import dense_block_direction

    rng = np.random.default_rng(7)
    n, lam = 4, 0.2
    Ms = [(lambda B: B @ B.T)(rng.standard_normal((n, 2))) for _ in range(3)]
    g, gp = rng.standard_normal(n), rng.standard_normal(n)
    S = np.diag(rng.uniform(0.5, 2, n))
    for c in (1, 3):
        ref = (3 * gp / c - g) / lam - sum(np.linalg.solve(lam * np.eye(n) + c * M @ S, gp) for M in Ms) / c
        assert_close(dense_block_direction(Ms, S, g, gp, lam, c), ref, rtol=1e-10)
    _assert_definition(dense_block_direction(Ms[:1], None, g, g, lam), Ms[0], g, lam, 2, "one block")


def test_implicit_direction_with_exact_factors_and_uc_is_7():
    """(16)–(24) with r = κ, no sketches, (22): the implicit kernel is (7) on the EFIM block."""
    from refcurv.methods.seng import implicit_direction

    net = CONV.net
    params, batch = _batch(CONV)
    A_hat, G_hat = net.factors(params, batch.x, batch.y, batch.loss)
    lam = 0.4
    for Ah, Gh, M, g in zip(A_hat, G_hat, _efim_blocks(net, params, batch), _grads(net, params, batch)):
        d, b = implicit_direction(Gh, Ah, g.reshape(Gh.shape[1], Ah.shape[1]), g.reshape(Gh.shape[1], -1), lam,
                                  uc="exact")
        assert b.shape == (CONV.N,)
        _assert_definition(d, M, g, lam, CONV.N, "implicit kernel")


# ------------------------------------------------------------------------ curvature operator


def _curvature_case(m, net, params, batch, steps=2):
    """Run ``steps`` dense steps; at each, −C⁻¹g = d (C from the returned state)."""
    from refcurv.operators import Operator

    state, p = m.init(net, params), params
    for k in range(steps):
        _, b = _batch_like(batch, k)
        draws = m.draw(np.random.default_rng(k), state, net, p, b)
        d, state = m.step(state, net, p, b, draws=draws, dense=True)
        C = m.curvature(state, net, p, b, draws)
        assert isinstance(C, Operator) and C.shape == (net.n_params,) * 2
        g = rc.flatten(net.grad(p, b.x, b.y, b.loss))
        want = rc.flatten(d)
        got = -C.solve(g)
        ev = np.abs(np.asarray(C.eigvalsh()))
        tol = forward_tol(net.n_params, ev.max() / ev.min())
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), (m, k)
        p = [W + 0.1 * D for W, D in zip(p, d)]
    return C, state


def _batch_like(batch, k):
    x = batch.x + 0.3 * k * np.sin(np.arange(batch.x.size)).reshape(batch.x.shape)
    return None, Batch(x, batch.y, batch.loss)


def test_curvature_is_lambda_I_plus_UUt_explicit():
    """C = blockdiag_l(λI + M_l) (7), M_l the EFIM block of refcurv.curvature (T_inv = 1)."""
    from refcurv.operators import BlockDiagonal, LowRankPlusIdentity

    pb, net, params, batch = _two_layer()
    lam = 0.3
    C, state = _curvature_case(SENG(damping=lam), net, params, batch, steps=1)
    assert isinstance(C, BlockDiagonal) and all(isinstance(B, LowRankPlusIdentity) for B in C.blocks)
    ref = [lam * np.eye(M.shape[0]) + M for M in _efim_blocks(net, params, _batch_like(batch, 0)[1])]
    for B, R in zip(C.blocks, ref):
        assert_close(B.todense(), R, rtol=1e-12, atol=1e-14 * np.abs(R).max())


@pytest.mark.parametrize("kw", [dict(T_inv=2), dict(history="decay", memory=3, beta=0.8),
                                dict(history="hybrid", memory=4, hybrid_v=2),
                                dict(threshold=0.0, uc="exact"), dict(threshold=0.0, uc="exact", rank=1),
                                dict(workers=5, block_capacitance=False)])
def test_curvature_reproduces_the_dense_direction(kw):
    pb, net, params, batch = _two_layer()
    _curvature_case(SENG(damping=0.2, **kw), net, params, batch, steps=3)


@pytest.mark.parametrize("normalization", ["worker", "global"])
def test_curvature_of_the_block_capacitance_26(normalization):
    """(26): C = H⁻¹, H = (1/λ)(I − U B⁻¹Uᵀ), B = blockdiag_w(λI + cU_wᵀU_w); for "worker"
    H = (1/𝓜)Σ_w(λI + M_{S_w})⁻¹ (the worker average, SPD)."""
    from refcurv.operators import Inverse

    pb = _even_batch(Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "mse", 3, 2))
    params, batch = _batch(pb)
    net = pb.net
    lam = 0.5 if normalization == "worker" else 5.0  # "global" is SPD only for λ large enough here
    C, state = _curvature_case(SENGDistributed(damping=lam, workers=2, normalization=normalization),
                               net, params, batch, steps=2)
    assert all(isinstance(B, Inverse) for B in C.blocks)
    if normalization == "worker":
        for B, U in zip(C.blocks, state.U):
            Us = [math.sqrt(2) * U[:, :3], math.sqrt(2) * U[:, 3:]]  # U_{S_w} (5)
            H = sum(np.linalg.inv(lam * np.eye(U.shape[0]) + W @ W.T) for W in Us) / 2
            assert_close(B.todense(), np.linalg.inv(H), rtol=1e-10)


def test_curvature_refused_where_there_is_no_symmetric_matrix():
    pb, net, params, batch = _two_layer()
    with pytest.raises(rc.errors.StateError, match="seng"):
        SENG().curvature(SENG().init(net, params))
    for m, match in [(SENG(sketch_size=3), "sketch_size"), (SENGDistributed(delayed=True), "delayed"),
                     (SENG(threshold=0.0), "uc"), (SENG(threshold=0.0, uc="exact", sketch_size_G=1), "sketch_size_A/G")]:
        b = Batch(batch.x[:4], batch.y[:4], batch.loss)
        _, s = m.step(m.init(net, params), net, params, b, rng=0)
        with pytest.raises(HyperParameterError, match=match):
            m.curvature(s, net, params, b)
