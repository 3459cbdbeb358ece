"""K-BFGS-20 / K-BFGS(L)-20 for MLPs ([Ren-thesis] Ch.2, Algorithms 3, 4, 5; (2.4)–(2.12);
Theorem 1): dense vs fast forms along runs, compact = dense = two-loop L-BFGS, DD invariants
and the bounds (2.7)–(2.10), Theorem 1 and its momentum caveat inside the method, Algorithm 5
(skip, exact H_a), the deferred second pass = an explicit Algorithm 4, scaling of g,
hyper-parameters, smoke training."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import HyperParameterError
from refcurv.linalg.damping import double_damping
from refcurv.linalg.quasi_newton import (
    bfgs_update_B, bfgs_update_H, lbfgs_compact_apply, lbfgs_dense, lbfgs_two_loop,
)
from refcurv.methods import REGISTRY
from refcurv.methods.base import Batch
from refcurv.methods.kbfgs_mlp import KBFGSLMLP, KBFGSMLP, layer_statistics
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.strategies import problems
from refcurv.testing.tolerance import EPS, assert_close, forward_tol, rel_err
from refcurv.train import train

VARIANTS = {"kbfgs-mlp": KBFGSMLP, "kbfgs-l-mlp": KBFGSLMLP}


def _method(variant, **kw):
    if variant == "kbfgs-mlp":
        kw.pop("memory", None)
    return VARIANTS[variant](**kw)


def _batches(pb, n):
    """``n`` mini-batches of the problem's data, shifted by seeded noise per step."""
    params, x, y = pb.data()
    rng = np.random.default_rng(pb.seed + 1)
    return params, [Batch(x + 0.3 * k * rng.standard_normal(x.shape), y, pb.loss_fn) for k in range(n)]


def _Hg(method, state, j):
    """Dense H_g of layer j from a state (L-BFGS: the recursion from H_0 = I)."""
    if method.limited:
        S, Y = state.S[j], state.Y[j]
        return np.eye(S.shape[1]) if S.shape[0] == 0 else lbfgs_dense(S, Y)
    return state.H_g[j]


def _cond(M):
    return float(np.linalg.cond(M))


def _classification(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    return x, y


# ------------------------------------------------------------------ (1) dense vs fast
@given(problems(kind=st.just("mlp")), st.sampled_from(sorted(VARIANTS)), st.sampled_from(["alg4", "alg5"]),
       st.sampled_from([1, 3, 100]), st.floats(1e-3, 1.0))
def test_fast_equals_dense_direction_and_state_over_a_run(pb, variant, algorithm, memory, lam):
    """Both forms, driven along the same parameter path for 10 steps: the direction
    −H_g (m H_a) (KBFGSCore: compact L-BFGS, A by einsum, gradient from the factors) equals the
    dense form's −(H_g ⊗ H_a) vec(m) (its own replay of Algorithm 4/5: dense L-BFGS recursion,
    A from its definition, net.grad, LU inverses), and so does every state entry. Forward error of
    products/recursions with these SPD factors: C·n·eps·κ(H_g)κ(H_a) relative."""
    net = pb.net
    method = _method(variant, damping=lam, algorithm=algorithm, memory=memory)
    params, batches = _batches(pb, 10)
    sf = sd = method.init(net, params)
    for k, batch in enumerate(batches):
        df, sf = method.step(sf, net, params, batch)
        dd, sd = method.step(sd, net, params, batch, dense=True)
        for j, (a, b) in enumerate(zip(df, dd)):
            kappa = _cond(_Hg(method, sd, j)) * _cond(sd.H_a[j])
            tol = forward_tol(sum(W.size for W in params), kappa)
            assert_close(a, b, rtol=tol, atol=1e-13, what=f"direction step {k} layer {j}")
            assert_close(sf.H_a[j], sd.H_a[j], rtol=tol, what=f"H_a step {k}")
            assert_close(_Hg(method, sf, j), _Hg(method, sd, j), rtol=tol, what=f"H_g step {k}")
            for key in ("A", "m", "s_g", "y_g"):
                assert_close(getattr(sf, key)[j], getattr(sd, key)[j], rtol=tol, what=f"{key} step {k}")
        assert sf.diagnostics == sd.diagnostics
        params = [W + 0.05 * D for W, D in zip(params, df)]


def test_lbfgs_with_all_pairs_kept_equals_bfgs():
    """K-BFGS(L) keeping every pair, from H_0 = I, builds the same H_g as K-BFGS's BFGS from
    H_g = I (same DD inputs at every step), hence the same run."""
    x, y = _classification()
    net = Sequential([Linear(4, 6), Tanh(), Linear(6, 3)])
    runs = [train(M, net, net.init(0), x, y, CrossEntropy(), steps=12, lr=0.5, batch_size=16, seed=3)[0]
            for M in (KBFGSMLP(), KBFGSLMLP(memory=100))]
    for a, b in zip(*runs):
        assert_close(a, b, rtol=1e-11)


# -------------------------------------------------- (2) compact = dense = two-loop
def test_compact_lbfgs_equals_dense_recursion_and_two_loop_in_the_method():
    """After a run whose memory window has slid (12 pairs, p = 4), the method's direction is
    −H_g (m H_a) with H_g = compact form = dense recursion (2.12) = two-loop, at forward error
    C·n·eps·κ(H_g)·κ(H_a)."""
    x, y = _classification()
    net = Sequential([Linear(4, 5), Tanh(), Linear(5, 3)])
    method = KBFGSLMLP(memory=4)
    params = net.init(0)
    rng = np.random.default_rng(0)
    state = method.init(net, params)
    for k in range(13):
        prev = state
        idx = rng.choice(len(x), 16, replace=False)
        d, state = method.step(state, net, params, Batch(x[idx], y[idx], CrossEntropy()))
        params = [W + 0.5 * D for W, D in zip(params, d)]
    for j, dj in enumerate(d):
        S, Y = state.S[j], state.Y[j]
        assert S.shape[0] == 4  # the window slid
        V = state.m[j] @ prev.H_a[j]  # direction at step k uses H_a before its update
        H = lbfgs_dense(S, Y)
        tol = forward_tol(V.size, _cond(H) * _cond(prev.H_a[j]))
        for HV in (lbfgs_compact_apply(S, Y, V), lbfgs_two_loop(S, Y, V)):
            assert_close(HV, H @ V, rtol=tol)
        assert_close(-dj, H @ V, rtol=tol)


# --------------------------------------------------------- (3) damping invariants
def _check_damping_along_a_run(method, net, params, batches, lr):
    """Every DD-damped pair of a run: s̃ᵀy ≥ μ₁ yᵀHy (Powell on H) and s̃ᵀỹ ≥ μ₂ s̃ᵀs̃
    (Powell with B = I), μ₂ = √λ, with H the H_g used; θ₁ ∈ (0, 1], θ₂ ∈ [0, 1]; H_g stays SPD;
    s̃ᵀs̃/s̃ᵀỹ ≤ 1/μ₂. For K-BFGS's BFGS update, (2.8) ‖B⁺‖ ≤ ‖B‖(1 + r₁) and (2.10)
    ‖H⁺‖ ≤ (‖H‖^{1/2} + (r₁r₂)^{1/2})² + r₂ with r₁ = ỹᵀHỹ/s̃ᵀỹ, r₂ = s̃ᵀs̃/s̃ᵀỹ, and their
    μ-forms ‖B‖(1 + 1/μ₁), (‖H‖^{1/2} + 1/√(μ₁μ₂))² + 1/μ₂ whenever r₁ ≤ 1/μ₁.
    Returns how often each damping step was active and how often the μ-forms were checked."""
    mu1, mu2 = method.mu1, np.sqrt(method.damping)
    state = method.init(net, params)
    counts = {"theta1<1": 0, "theta2<1": 0, "mu_bounds": 0}
    for batch in batches:
        prev = state
        d, state = method.step(state, net, params, batch)
        params = [W + lr * D for W, D in zip(params, d)]
        for j, rec in enumerate(state.last_pairs or []):
            H = _Hg(method, prev, j)
            s, y, s_t, y_t = rec.s, rec.y, rec.s_t, rec.y_t
            yHy, nH = float(y @ H @ y), np.linalg.norm(H, 2)
            # rounding scale of s̃ᵀy = θ₁sᵀy + (1−θ₁)yᵀHy and of Hy; the compact form computes
            # Hy = y + W M Wᵀ y, whose rounding is eps·(1 + ‖H‖)‖y‖ even when ‖H‖ ≪ 1
            nHc = 1 + nH
            slack = 100 * len(s) * EPS
            ny = np.linalg.norm(y)
            assert float(s_t @ y) >= mu1 * yHy - slack * ny * (np.linalg.norm(s) + nHc * ny)
            assert float(s_t @ y_t) >= mu2 * float(s_t @ s_t) - slack * (
                np.linalg.norm(s_t) * np.linalg.norm(y_t) + float(s_t @ s_t))
            assert 0 < rec.theta1 <= 1 and 0 <= rec.theta2 <= 1
            counts["theta1<1"] += rec.theta1 < 1
            counts["theta2<1"] += rec.theta2 < 1
            Hn = _Hg(method, state, j)
            assert np.linalg.eigvalsh(Hn).min() > 0
            if not rec.used:
                assert float(s_t @ y_t) <= 0 or method.algorithm == "alg5"
                continue
            sty = float(s_t @ y_t)
            r1, r2 = float(y_t @ H @ y_t) / sty, float(s_t @ s_t) / sty
            # the method applies its own H (compact form for L-BFGS): error ~ eps(1 + ‖H‖)‖ỹ‖²
            assert abs(rec.ratio - r1) <= 1e-9 * r1 + slack * nHc * float(y_t @ y_t) / sty
            assert r2 <= 1 / mu2 * (1 + 1e-9)
            if method.limited:
                continue
            nB, nBp = 1 / np.linalg.eigvalsh(H).min(), 1 / np.linalg.eigvalsh(Hn).min()
            nHp = np.linalg.norm(Hn, 2)
            tol = 1 + 1e-9
            assert nBp <= nB * (1 + r1) * tol  # (2.8)
            assert nHp <= ((np.sqrt(nH) + np.sqrt(r1 * r2)) ** 2 + r2) * tol  # (2.10)
            if r1 <= (1 + 1e-9) / mu1:
                counts["mu_bounds"] += 1
                assert nBp <= nB * (1 + 1 / mu1) * tol
                assert nHp <= ((np.sqrt(nH) + 1 / np.sqrt(mu1 * mu2)) ** 2 + 1 / mu2) * tol
    return counts


@given(problems(kind=st.just("mlp")), st.sampled_from(sorted(VARIANTS)), st.floats(1e-3, 1.0),
       st.sampled_from([0.1, 0.2, 0.5]))
def test_double_damping_invariants_and_bounds_along_a_run(pb, variant, lam, mu1):
    """DD invariants, SPD H_g and (2.7)–(2.10) along 8 steps (see _check_damping_along_a_run)."""
    method = _method(variant, damping=lam, mu1=mu1, memory=3)
    params, batches = _batches(pb, 8)
    _check_damping_along_a_run(method, pb.net, params, batches, lr=0.1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_double_damping_invariants_with_both_damping_steps_active(variant):
    """The same invariants on a training run where both Powell steps fire (small λ)."""
    x, y = _classification()
    net = Sequential([Linear(4, 8), Tanh(), Linear(8, 3)])
    rng = np.random.default_rng(2)
    batches = [Batch(x[i], y[i], CrossEntropy()) for i in (rng.choice(len(x), 16, replace=False) for _ in range(25))]
    counts = _check_damping_along_a_run(_method(variant, damping=0.01, memory=5), net, net.init(0), batches, lr=0.3)
    assert counts["theta1<1"] > 0 and counts["theta2<1"] > 0
    assert variant == "kbfgs-l-mlp" or counts["mu_bounds"] > 0


# --------------------------------------------------------- (4) Theorem 1 in the method
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_theorem1_hessian_action_bfgs_inverts_a_rank_one_update(variant, beta):
    """Theorem 1 inside the method: if H_a = (A^{LM})⁻¹ and the moving average changes A by a
    rank-one term along ā — A⁺ = A + (1−β) ā āᵀ, which is what A⁺ = βA + (1−β)·mean(a aᵀ) gives
    when A = mean(a aᵀ) − ā āᵀ (the batch covariance) — then Hessian-action BFGS with
    s = H_a ā, y = (A⁺ + λ_A I) s returns exactly (A⁺ + λ_A I)⁻¹. Caveat (text after Theorem 1):
    with momentum and a generic A the update is not the inverse."""
    rng = np.random.default_rng(4)
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params = net.init(1)
    batch = Batch(rng.standard_normal((6, 3)), rng.integers(0, 2, 6), CrossEntropy())
    method = _method(variant, momentum=beta, beta=beta, damping=0.09)
    lam = np.sqrt(method.damping)
    stats = layer_statistics(net, params, batch)
    cov = [a.T @ a / len(a) - np.outer(a.mean(0), a.mean(0)) for a, _ in stats]
    state = method.init(net, params).replace(A=cov, H_a=[np.linalg.inv(C + lam * np.eye(len(C))) for C in cov])
    _, new = method.step(state, net, params, batch)
    for (a, _), C, A1, H1 in zip(stats, cov, new.A, new.H_a):
        abar = a.mean(0)
        assert_close(A1, C + (1 - beta) * np.outer(abar, abar), rtol=1e-13)
        ALM = A1 + lam * np.eye(len(A1))
        assert_close(H1, np.linalg.inv(ALM), rtol=forward_tol(ALM.size, _cond(ALM)))
    # caveat: a generic A (here 2I) with momentum → H_a⁺ ≠ (A⁺ + λ_A I)⁻¹
    if beta > 0:
        state = method.init(net, params).replace(A=[2 * np.eye(len(C)) for C in cov],
                                                 H_a=[np.eye(len(C)) / (2 + lam) for C in cov])
        _, new = method.step(state, net, params, batch)
        gaps = [rel_err(H1, np.linalg.inv(A1 + lam * np.eye(len(A1)))) for A1, H1 in zip(new.A, new.H_a)]
        assert min(gaps) > 1e-2


def test_hessian_action_keeps_the_exact_inverse_while_A_is_unchanged():
    """Same mini-batch every step: the first layer's inputs do not move, so A is unchanged by
    the moving average (the c = 0 case of Theorem 1) and H_a stays (A + λ_A I)⁻¹ with
    momentum on — while deeper layers, whose inputs move with θ, drift away from it."""
    rng = np.random.default_rng(5)
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params = net.init(2)
    batch = Batch(rng.standard_normal((7, 3)), rng.integers(0, 2, 7), CrossEntropy())
    method = KBFGSMLP(damping=0.04)
    state = method.init(net, params)
    for _ in range(6):
        d, state = method.step(state, net, params, batch)
        params = [W + 0.5 * D for W, D in zip(params, d)]
    a = np.concatenate([batch.x, np.ones((7, 1))], axis=1)
    A = a.T @ a / 7
    assert_close(state.A[0], A, rtol=1e-13)
    ALM = A + np.sqrt(method.damping) * np.eye(4)
    assert_close(state.H_a[0], np.linalg.inv(ALM), rtol=forward_tol(16, _cond(ALM)) * 6)
    ALM1 = state.A[1] + np.sqrt(method.damping) * np.eye(5)
    assert rel_err(state.H_a[1], np.linalg.inv(ALM1)) > 1e-4


def test_momentum_caveat_scaling_by_one_over_beta_is_exact_only_without_lm_damping():
    """Text after Theorem 1: with A⁺ = βA + (1−β)aaᵀ, scaling H = A⁻¹ by 1/β restores
    Theorem 1. With the LM term (A^{LM} = A + λ_A I, A⁺^{LM} = βA + (1−β)aaᵀ + λ_A I) the scalar
    scaling no longer works; the exact pre-image is (βA + λ_A I)⁻¹ (specification note)."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((4, 6))
    A, a, beta, lam = X @ X.T / 6, rng.standard_normal(4), 0.9, 0.3
    I = np.eye(4)

    def ha(H, Aplus):
        s = H @ a
        return bfgs_update_H(H, s, Aplus @ s)

    Ap = beta * A + (1 - beta) * np.outer(a, a)
    assert_close(ha(np.linalg.inv(A) / beta, Ap), np.linalg.inv(Ap), rtol=1e-10)
    ApLM = Ap + lam * I
    assert rel_err(ha(np.linalg.inv(A + lam * I) / beta, ApLM), np.linalg.inv(ApLM)) > 1e-3
    assert_close(ha(np.linalg.inv(beta * A + lam * I), ApLM), np.linalg.inv(ApLM), rtol=1e-10)


# ----------------------------------------------------------------- (5) Algorithm 5
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_algorithm5_skips_pairs_and_inverts_A_exactly(variant):
    """Algorithm 5: H_a = (A^{LM})⁻¹ at every step; a DD output is used iff
    ỹᵀHỹ/s̃ᵀỹ ≤ 1/μ₁ (line 17), a skipped pair leaves H_g unchanged; the counters add up;
    the run is chosen so that skips do occur (small λ)."""
    x, y = _classification()
    net = Sequential([Linear(4, 16), Tanh(), Linear(16, 3)])
    method = _method(variant, damping=0.01, algorithm="alg5", memory=100)
    params = net.init(0)
    rng = np.random.default_rng(1)
    state = method.init(net, params)
    for k in range(60):
        prev = state
        idx = rng.choice(len(x), 32, replace=False)
        g = net.grad(params, x[idx], y[idx], CrossEntropy())
        d, state = method.step(state, net, params, Batch(x[idx], y[idx], CrossEntropy()))
        params = [W + 0.1 * D for W, D in zip(params, d)]
        for j in range(len(params)):
            ALM = state.A[j] + np.sqrt(method.damping) * np.eye(len(state.A[j]))
            assert_close(state.H_a[j], np.linalg.inv(ALM), rtol=forward_tol(ALM.size, _cond(ALM)))
            assert_close(state.m[j], g[j], rtol=1e-12)  # line 8: m = ∇f̄
        for j, rec in enumerate(state.last_pairs or []):
            H = _Hg(method, prev, j)
            sty = float(rec.s_t @ rec.y_t)
            ratio = float(rec.y_t @ H @ rec.y_t) / sty
            # ratio = 1/μ₁ exactly whenever Powell on H acts and the B = I step does not:
            # equality means "use" (line 17 is ≥); compare with a rounding slack
            if ratio <= (1 + 1e-10) / method.mu1:
                assert rec.used
            elif ratio > (1 + 1e-6) / method.mu1:
                assert not rec.used
            if not rec.used:
                assert_close(_Hg(method, state, j), H, rtol=0, atol=0)
    diag = state.diagnostics
    for j in range(len(params)):
        assert diag["pairs"][j] == 59 == diag["pairs_used"][j] + diag["pairs_skipped"][j] + diag["pairs_degenerate"][j]
        assert diag["pairs_used"][j] == diag["ratio_le_1"][j]
    assert sum(diag["pairs_skipped"]) > 0


def test_algorithm5_uses_the_mini_batch_gradient():
    """Algorithm 5 line 8: p = H_g ∇f̄ H_a (no momentum): first step with H_g = I is
    −∇f̄ (A + λ_A I)⁻¹, where Algorithm 4 gives −(1−β)∇f̄ H_a."""
    rng = np.random.default_rng(2)
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params = net.init(0)
    b = Batch(rng.standard_normal((5, 3)), rng.integers(0, 2, 5), CrossEntropy())
    g = net.grad(params, b.x, b.y, b.loss)
    for alg, scale in (("alg5", 1.0), ("alg4", 0.1)):
        method = KBFGSMLP(algorithm=alg)
        d, st_ = method.step(method.init(net, params), net, params, b)
        for gj, dj, (a, _) in zip(g, d, layer_statistics(net, params, b)):
            A = a.T @ a / len(a)
            assert_close(dj, -scale * gj @ np.linalg.inv(A + np.sqrt(method.damping) * np.eye(len(A))), rtol=1e-10)


# ------------------------------------------------ (6) deferred pass = Algorithm 4
def _explicit_algorithm(method, net, params, x, y, loss, steps, lr, batch_size, seed):
    """Algorithm 4 (Algorithm 5 if method.algorithm == "alg5") of [Ren-thesis] as printed, with
    a known learning rate: the second forward/backward pass (line 13) runs right after the
    weight update (line 11). Written independently of the module: h̄ as the mean of the
    per-sample h_i = W a_i, ∇f̄ from net.grad, H_g of K-BFGS(L) by the two-loop recursion."""
    lam, b, mu1, mu = np.sqrt(method.damping), method.beta, method.mu1, method.momentum
    alg5 = method.algorithm == "alg5"
    rng = np.random.default_rng(seed)  # the same stream train() draws its batches from
    L = len(params)
    outs = [W.shape[0] for W in params]
    m = [np.zeros_like(W) for W in params]
    sg, yg = [np.zeros(o) for o in outs], [np.zeros(o) for o in outs]
    Hg, S, Y = [np.eye(o) for o in outs], [[] for _ in outs], [[] for _ in outs]
    A = Ha = None

    def Hg_apply(l, v):
        if not method.limited:
            return Hg[l] @ v
        return v if not S[l] else lbfgs_two_loop(np.array(S[l]), np.array(Y[l]), v)

    def pass_(theta, xb, yb):
        Af, Gf = net.factors(theta, xb, yb, loss)
        a = [t[..., 0] for t in Af]
        return a, [t[..., 0] for t in Gf], [(ai @ W.T).mean(0) for ai, W in zip(a, theta)]

    for k in range(steps):
        idx = rng.choice(len(x), size=batch_size, replace=False)
        xb, yb = x[idx], y[idx]
        a, g, hbar = pass_(params, xb, yb)  # line 6
        grad = net.grad(params, xb, yb, loss)
        if A is None:  # line 3 on the first mini-batch
            A = [ai.T @ ai / len(ai) for ai in a]
            Ha = [np.linalg.inv(Al + lam * np.eye(len(Al))) for Al in A]
        new = []
        for l in range(L):
            m[l] = grad[l] if alg5 else mu * m[l] + (1 - mu) * grad[l]  # line 8 (errata)
            p = Hg_apply(l, m[l] @ Ha[l])  # lines 9–10
            new.append(params[l] - lr * p)  # line 11
        _, gp, hbar_p = pass_(new, xb, yb)  # line 13
        for l in range(L):
            sg[l] = b * sg[l] + (1 - b) * (hbar_p[l] - hbar[l])  # line 16
            yg[l] = b * yg[l] + (1 - b) * (gp[l].mean(0) - g[l].mean(0))
            H = (lambda v, l=l: Hg_apply(l, v))
            s_t, y_t, _, _ = double_damping(sg[l], yg[l], H, mu1, lam)  # line 17
            # Algorithm 5 line 17; equality (the common case θ₁ < 1, θ₂ = 1) up to rounding
            if not alg5 or s_t @ y_t >= mu1 * (y_t @ H(y_t)) * (1 - 1e-10):
                if method.limited:  # line 18
                    S[l] = (S[l] + [s_t])[-method.memory:]
                    Y[l] = (Y[l] + [y_t])[-method.memory:]
                else:
                    Hg[l] = bfgs_update_H(Hg[l], s_t, y_t)
            A[l] = b * A[l] + (1 - b) * a[l].T @ a[l] / len(a[l])  # line 20
            ALM = A[l] + lam * np.eye(len(A[l]))  # line 21
            if alg5:
                Ha[l] = np.linalg.inv(ALM)
            else:
                s_a = Ha[l] @ a[l].mean(0)  # line 22
                Ha[l] = bfgs_update_H(Ha[l], s_a, ALM @ s_a)  # line 23
        params = new
    return params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("algorithm", ["alg4", "alg5"])
@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_deferred_second_pass_reproduces_explicit_algorithm4(variant, algorithm, dense):
    """train() with the deferred method gives the parameters of Algorithm 4 (5) run with the
    learning rate known and the second pass done immediately — 8 steps, float64. The only
    differences are evaluation orders (W ā vs mean W a_i, compact vs two-loop, inv vs
    Cholesky): relative 1e-10. Both forms (the dense form is its own replay of Algorithm 4/5)."""
    x, y = _classification(64, seed=3)
    net = Sequential([Linear(4, 5), Tanh(), Linear(5, 3)])
    method = _method(variant, damping=0.05, algorithm=algorithm, memory=3)
    p0 = net.init(4)
    got, _ = train(method, net, p0, x, y, CrossEntropy(), steps=8, lr=0.4, batch_size=16, seed=11, dense=dense)
    want = _explicit_algorithm(method, net, p0, x, y, CrossEntropy(), steps=8, lr=0.4, batch_size=16, seed=11)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10)
    assert max(rel_err(a, b) for a, b in zip(got, p0)) > 1e-2  # the parameters did move


# ------------------------------------------------------------ scaling / init / momentum
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_per_sample_g_makes_yg_equal_sg_for_linear_mse(variant):
    """g_l(i) = ∂f(i)/∂h_l(i) of the per-sample loss ((2.2), (2.5)): for one Linear layer with
    MSE, G_l(i) = I, so y_g = s_g exactly and H_g stays I = G_l⁻¹. (With the gradient of the
    mini-batch mean, y_g = s_g/m and H_g would drift towards m·I.)"""
    rng = np.random.default_rng(0)
    net = Sequential([Linear(3, 2)])
    params = net.init(0)
    method = _method(variant, memory=2)
    state = method.init(net, params)
    for _ in range(5):
        b = Batch(rng.standard_normal((8, 3)), rng.standard_normal((8, 2)), MSE())
        d, state = method.step(state, net, params, b)
        params = [W + 0.3 * D for W, D in zip(params, d)]
    assert_close(state.y_g[0], state.s_g[0], rtol=1e-12)
    assert np.linalg.norm(state.s_g[0]) > 1e-3
    assert state.diagnostics["pairs_used"] == [4]
    assert_close(_Hg(method, state, 0), np.eye(2), rtol=0, atol=1e-12)


def test_warm_start_initializes_A_and_Ha_and_momentum_follows_section_2_5_2():
    """Algorithm 4 line 3: A = mean a aᵀ over the warm-start data, H_a = (A + √λ I)⁻¹ (not I,
    as §2.8.2's prose says), H_g = I, m = 0; then m ← βm + (1−β)∇f̄ (line 8 as §2.5.2 states
    it), and the first direction is −(1−β)∇f̄ H_a."""
    rng = np.random.default_rng(1)
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params = net.init(0)
    data = Batch(rng.standard_normal((20, 3)), rng.integers(0, 2, 20), CrossEntropy())
    method = KBFGSLMLP(damping=0.1, momentum=0.8, beta=0.8)
    state = method.warm_start(method.init(net, params), net, params, data)
    Hw = []
    for (a, _), A, Ha in zip(layer_statistics(net, params, data), state.A, state.H_a):
        assert_close(A, a.T @ a / 20, rtol=1e-14)
        Hw.append(np.linalg.inv(A + np.sqrt(0.1) * np.eye(len(A))))
        assert_close(Ha, Hw[-1], rtol=1e-12)
    ms = []
    for k in range(2):
        b = Batch(rng.standard_normal((5, 3)), rng.integers(0, 2, 5), CrossEntropy())
        g = net.grad(params, b.x, b.y, b.loss)
        d, state = method.step(state, net, params, b)
        ms = [0.8 * mj + 0.2 * gj for mj, gj in zip(ms, g)] if ms else [0.2 * gj for gj in g]
        for mj, sm in zip(ms, state.m):
            assert_close(sm, mj, rtol=1e-12)
        if k == 0:
            for dj, mj, H in zip(d, ms, Hw):
                assert_close(dj, -mj @ H, rtol=1e-11)
        params = [W + 0.5 * D for W, D in zip(params, d)]


# ----------------------------------------------------------- errata: Lemma 2's step
def test_lemma2_bound_step_does_not_follow_from_the_stored_ratio():
    """Lemma 2 applies (2.8), ‖B_i‖ ≤ ‖B_{i−1}‖(1 + 1/μ₁), to a pair that satisfies
    yᵀH̄y/sᵀy ≤ 1/μ₁ for the H̄ in use when the pair was made — but (2.8) needs the ratio with
    H_{i−1} = B_{i−1}⁻¹ of the recursion. Counterexample: B_0 = I, H̄ = I/(μ₁t), s = e₁,
    y = t e₁ meet both DD bounds (ratio 1/μ₁, sᵀs/sᵀy = 1/t ≤ 1/μ₂), yet ‖B_1‖ = t."""
    mu1, t = 0.2, 50.0
    s, y = np.eye(3)[0], t * np.eye(3)[0]
    Hbar = np.eye(3) / (mu1 * t)
    assert np.isclose(y @ Hbar @ y / (s @ y), 1 / mu1) and s @ s / (s @ y) <= 1
    B1 = bfgs_update_B(np.eye(3), s, y)
    assert np.linalg.norm(B1, 2) > (1 + 1 / mu1) * 5


# ------------------------------------------------------------ (7) hyper-parameters
def test_bad_hyper_parameters():
    for cls in (KBFGSMLP, KBFGSLMLP):
        for kwargs, match in [({"damping": 0.0}, "damping"), ({"damping": 1.5}, "damping"),
                              ({"damping": float("nan")}, "damping"), ({"beta": 1.0}, "beta"),
                              ({"beta": -0.1}, "beta"), ({"mu1": 0.0}, "mu1"), ({"mu1": 1.0}, "mu1"),
                              ({"algorithm": "alg6"}, "algorithm"), ({"skip_factor": 0.0}, "skip_factor"),
                              ({"damping": True}, "damping")]:
            with pytest.raises(HyperParameterError, match=match):
                cls(**kwargs)
    for bad in (0, 2.5, -1, True):
        with pytest.raises(HyperParameterError, match="memory"):
            KBFGSLMLP(memory=bad)
    assert KBFGSMLP(damping=1.0).damping == 1.0  # λ = 1 allowed: μ₂ = 1 is the edge of DD's (0, 1]


def test_registered_for_linear_layers_only():
    for name in VARIANTS:
        assert name in REGISTRY and REGISTRY[name].supports_conv is False
    assert KBFGSLMLP.hyper_parameters()["memory"] == 100 and KBFGSMLP.hyper_parameters()["damping"] == 0.3


# ------------------------------------------------------------ (8) smoke training
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("algorithm", ["alg4", "alg5"])
def test_training_smoke_decreases_loss(variant, algorithm):
    x, y = _classification()
    net = Sequential([Linear(4, 16), Tanh(), Linear(16, 3)])
    method = _method(variant, algorithm=algorithm, memory=10)
    _, hist = train(method, net, net.init(0), x, y, CrossEntropy(), steps=30, lr=0.3, batch_size=32, seed=1)
    assert hist["loss"][-1] < 0.6 * hist["loss"][0]


# ------------------------------------------------ (9) variant="authors" (design §8)
# The authors' code (renyiryry/kbfgs_neurips2020_public: training_function.py,
# training_utils.py, kbfgs_utils.py): momentum of ∇f̄ + τW; no moving average of A at k = 0;
# H_g and H_a updates skipped unless sᵀy > 1e-4·sᵀs·‖v‖ (v = ḡ, resp. (mean input, 1)).
def _make(name, **kw):
    """A registered method by name with hyper-parameters ``kw`` (K-BFGS ignores ``memory``)."""
    if name == "kbfgs-mlp":
        kw.pop("memory", None)
    return VARIANTS[name](**kw)


def _offset_regression():
    """MSE regression whose targets are offset by 3e4: ‖ḡ‖ is of order 1e4, so the authors'
    test sᵀy > 1e-4·sᵀs·‖ḡ‖ rejects some pairs (about half, in both layers) and accepts others."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3))
    y = np.sin(x[:, :2]) + 3e4 * np.array([0.6, -0.8])
    return x, y, Sequential([Linear(3, 5), Tanh(), Linear(5, 2)])


def _gbar(net, params, batch):
    """Mean per-sample pre-activation gradient of each layer, ḡ = mean_i ∂f(i)/∂h(i)."""
    _, G = net.factors(params, batch.x, batch.y, batch.loss)
    return [t[..., 0].mean(0) for t in G]


@given(problems(kind=st.just("mlp")), st.sampled_from(sorted(VARIANTS)), st.sampled_from([1, 3, 100]),
       st.floats(1e-3, 1.0), st.sampled_from([0.0, 1e-5, 0.1]))
def test_authors_fast_equals_dense_over_a_run(pb, variant, memory, lam, tau):
    """variant="authors": the fast form (KBFGSCore: compact L-BFGS, two-sided product) equals
    the dense form (its own replay: L-BFGS recursion, H_g ⊗ H_a, skip rules written out) along 8 steps:
    directions, every state entry and the diagnostics. Tolerance as for the paper variant."""
    net = pb.net
    method = _make(variant, damping=lam, memory=memory, variant="authors", l2=tau)
    params, batches = _batches(pb, 8)
    sf = sd = method.init(net, params)
    for k, batch in enumerate(batches):
        df, sf = method.step(sf, net, params, batch)
        dd, sd = method.step(sd, net, params, batch, dense=True)
        for j, (a, b) in enumerate(zip(df, dd)):
            tol = forward_tol(sum(W.size for W in params), _cond(_Hg(method, sd, j)) * _cond(sd.H_a[j]))
            assert_close(a, b, rtol=tol, atol=1e-13, what=f"direction step {k} layer {j}")
            assert_close(sf.H_a[j], sd.H_a[j], rtol=tol)
            assert_close(_Hg(method, sf, j), _Hg(method, sd, j), rtol=tol)
            for key in ("A", "m", "s_g", "y_g"):
                assert_close(getattr(sf, key)[j], getattr(sd, key)[j], rtol=tol, what=f"{key} step {k}")
        assert sf.diagnostics == sd.diagnostics
        params = [W + 0.05 * D for W, D in zip(params, df)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_authors_fast_equals_dense_with_skipped_pairs(variant):
    """The same, on a run where the authors' test skips H_g pairs (both forms skip the same)."""
    x, y, net = _offset_regression()
    method = _make(variant, damping=0.01, memory=3, variant="authors")
    params, rng = net.init(0), np.random.default_rng(2)
    sf = sd = method.init(net, params)
    for k in range(10):
        idx = rng.choice(len(x), 16, replace=False)
        batch = Batch(x[idx], y[idx], MSE())
        df, sf = method.step(sf, net, params, batch)
        dd, sd = method.step(sd, net, params, batch, dense=True)
        for j, (a, b) in enumerate(zip(df, dd)):
            tol = forward_tol(sum(W.size for W in params), _cond(_Hg(method, sd, j)) * _cond(sd.H_a[j]))
            assert_close(a, b, rtol=tol, atol=1e-13, what=f"direction step {k} layer {j}")
            assert_close(_Hg(method, sf, j), _Hg(method, sd, j), rtol=tol)
            assert_close(sf.H_a[j], sd.H_a[j], rtol=tol)
        assert sf.diagnostics == sd.diagnostics
        params = [W + 0.3 * D for W, D in zip(params, df)]
    assert min(sf.diagnostics["pairs_skipped"]) > 0 and min(sf.diagnostics["pairs_used"]) > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_authors_Hg_skip_rule_and_damping(variant):
    """Every H_g pair of an authors' run: DD (Powell on H with the current H_g, μ₁ = 0.2; then
    B = I with μ₂ = √λ) gives s̃ᵀy ≥ μ₁ yᵀHy and s̃ᵀỹ ≥ μ₂‖s̃‖²; the pair is used iff
    s̃ᵀỹ > 1e-4·s̃ᵀs̃·‖ḡ‖ with ḡ the layer's mean pre-activation gradient at θ_k on M_k
    (recomputed here); a used pair updates H_g by BFGS (appends to the L-BFGS memory), a
    skipped one leaves it unchanged. The run has both outcomes in both layers."""
    x, y, net = _offset_regression()
    method = _make(variant, damping=0.01, memory=100, variant="authors")
    mu1, mu2 = method.mu1, np.sqrt(method.damping)
    params, rng = net.init(0), np.random.default_rng(2)
    state = method.init(net, params)
    seen = {(j, u): 0 for j in range(2) for u in (True, False)}
    last = None
    for k in range(12):
        idx = rng.choice(len(x), 16, replace=False)
        batch = Batch(x[idx], y[idx], MSE())
        prev = state
        d, state = method.step(state, net, params, batch)
        for j, rec in enumerate(state.last_pairs or []):
            gbar = _gbar(net, *last)[j]
            H = _Hg(method, prev, j)
            yv, s_t, y_t = rec.y, rec.s_t, rec.y_t
            sy_t, ss_t = float(s_t @ y_t), float(s_t @ s_t)
            assert float(s_t @ yv) >= mu1 * float(yv @ H @ yv) * (1 - 1e-10)
            assert sy_t >= mu2 * ss_t * (1 - 1e-10)
            thr = 1e-4 * ss_t * np.linalg.norm(gbar)
            assert abs(sy_t - thr) > 1e-8 * thr  # decisive: not a rounding tie
            assert rec.used == (sy_t > thr)
            seen[j, rec.used] += 1
            if method.limited:
                n = prev.S[j].shape[0]
                if rec.used:
                    assert_close(state.S[j][-1], s_t, rtol=0, atol=0)
                    assert state.S[j].shape[0] == n + 1
                else:
                    assert_close(state.S[j], prev.S[j], rtol=0, atol=0)
            else:
                want = bfgs_update_H(H, s_t, y_t) if rec.used else H
                assert_close(state.H_g[j], want, rtol=1e-12 if rec.used else 0, atol=0)
        last = (params, batch)
        params = [W + 0.3 * D for W, D in zip(params, d)]
    assert min(seen.values()) > 0, seen
    diag = state.diagnostics
    assert [diag["pairs_used"][j] + diag["pairs_skipped"][j] for j in range(2)] == [11, 11]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_authors_Ha_skip_rule_and_its_vector(variant):
    """H_a's Hessian-action pair in the authors' code: v = (mean input, 1) (last entry set to
    1), s_a = H_a v, y_a = A^{LM} s_a with A^{LM} = A + √λ I; used iff
    s_aᵀy_a > 1e-4·s_aᵀs_a·‖v‖. With A = cI (kept at k = 0) s_aᵀy_a/s_aᵀs_a = c + √λ, so c
    just below / above 1e-4‖v‖ − √λ flips the decision; the expected H_a⁺ is written from
    (2.6) with v built here from the inputs."""
    rng = np.random.default_rng(6)
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params = net.init(3)
    batch = Batch(5.0 + rng.standard_normal((6, 3)), rng.integers(0, 2, 6), CrossEntropy())
    method = _make(variant, damping=1e-10, variant="authors")
    lam = np.sqrt(method.damping)
    h1 = np.tanh(batch.x @ params[0][:, :-1].T + params[0][:, -1])
    vs = [np.append(batch.x.mean(0), 1.0), np.append(h1.mean(0), 1.0)]
    Ms = []
    for n in (4, 5):
        X = rng.standard_normal((n, n))
        Ms.append(X @ X.T + np.eye(n))
    for factor in (0.99, 1.01):
        cs = [factor * 1e-4 * np.linalg.norm(v) - lam for v in vs]
        assert min(cs) > 0
        state = method.init(net, params).replace(A=[c * np.eye(len(v)) for c, v in zip(cs, vs)], H_a=list(Ms))
        _, new = method.step(state, net, params, batch)
        for j, (c, v, M) in enumerate(zip(cs, vs, Ms)):
            assert_close(new.A[j], c * np.eye(len(v)), rtol=0, atol=0)  # no moving average at k = 0
            s = M @ v
            want = bfgs_update_H(M, s, (c + lam) * s) if factor > 1 else M
            assert_close(new.H_a[j], want, rtol=1e-12, atol=0)
        assert new.diagnostics["ha_skipped"] == ([0, 0] if factor > 1 else [1, 1])
        assert rel_err(want, M) > 1e-3 or factor < 1


def test_authors_momentum_includes_weight_decay():
    """m ← βm + (1−β)(∇f̄ + τW), W with its bias column (the gradient of f̄ + (τ/2)‖θ‖²);
    with a warm start and H_g = I the first direction is −(1−β)(∇f̄ + τW)H_a; τ defaults to
    the authors' 1e-5."""
    assert KBFGSMLP(variant="authors").effective_l2 == 1e-5 and KBFGSMLP().effective_l2 == 0.0
    rng = np.random.default_rng(8)
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params = net.init(0)
    data = Batch(rng.standard_normal((20, 3)), rng.integers(0, 2, 20), CrossEntropy())
    method = KBFGSLMLP(variant="authors", l2=0.05, momentum=0.7, beta=0.7, damping=0.2)
    state = method.warm_start(method.init(net, params), net, params, data)
    H0 = [np.linalg.inv(A + np.sqrt(0.2) * np.eye(len(A))) for A in state.A]
    ms = [np.zeros_like(W) for W in params]
    for k in range(4):
        b = Batch(rng.standard_normal((5, 3)), rng.integers(0, 2, 5), CrossEntropy())
        g = net.grad(params, b.x, b.y, b.loss)
        d, state = method.step(state, net, params, b)
        ms = [0.7 * mj + 0.3 * (gj + 0.05 * W) for mj, gj, W in zip(ms, g, params)]
        for mj, sm in zip(ms, state.m):
            assert_close(sm, mj, rtol=1e-12)
        if k == 0:
            for dj, mj, H in zip(d, ms, H0):
                assert_close(dj, -mj @ H, rtol=1e-11)
        params = [W + 0.5 * D for W, D in zip(params, d)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_authors_keep_the_warm_start_A_at_the_first_step_and_directions_differ(variant):
    """After warm_start, the authors' first step leaves A at the warm-start value (the paper
    averages it with the batch: A = βA₀ + (1−β)mean aaᵀ); later steps average. At step 0 the
    two directions differ by exactly −(1−β)τW H_a (H_g = I); from step 1 on they differ
    substantially (generic problem, default hyper-parameters)."""
    x, y = _classification()
    net = Sequential([Linear(4, 6), Tanh(), Linear(6, 3)])
    params = net.init(1)
    warm = Batch(x[:64], y[:64], CrossEntropy())
    methods = {v: _make(variant, variant=v) for v in ("paper", "authors")}
    states = {v: M.warm_start(M.init(net, params), net, params, warm) for v, M in methods.items()}
    A0 = states["authors"].A
    rng = np.random.default_rng(4)
    for k in range(3):
        idx = rng.choice(len(x), 16, replace=False)
        b = Batch(x[idx], y[idx], CrossEntropy())
        prev = states["authors"]
        out = {v: M.step(states[v], net, params, b) for v, M in methods.items()}
        states = {v: o[1] for v, o in out.items()}
        da, dp = out["authors"][0], out["paper"][0]
        for j, (a, _) in enumerate(layer_statistics(net, params, b)):
            batch_A = a.T @ a / len(a)
            want = A0[j] if k == 0 else 0.9 * prev.A[j] + 0.1 * batch_A
            assert_close(states["authors"].A[j], want, rtol=1e-14 if k else 0, atol=0)
            if k == 0:
                assert_close(states["paper"].A[j], 0.9 * A0[j] + 0.1 * batch_A, rtol=1e-14)
                assert_close(da[j] - dp[j], -0.1 * 1e-5 * params[j] @ prev.H_a[j], rtol=1e-6, atol=1e-20)
        if k >= 1:
            assert max(rel_err(a, p) for a, p in zip(da, dp)) > 1e-3
        params = [W + 0.3 * D for W, D in zip(params, dp)]


def _explicit_authors(method, net, params, x, y, loss, steps, lr, batch_size, seed, warm=None):
    """The authors' K-BFGS / K-BFGS(L) (kbfgs_utils.py::Kron_BFGS_update; training_function.py)
    with a known learning rate, second pass right after the step, written from the code's
    formulas: A warm-started (else from the first mini-batch) and not averaged at k = 0;
    m ← βm + (1−β)(∇f̄ + τW); p = −H_g m H_a; θ⁺ = θ + αp; (s, y) = (h̄ − h̄⁺, ḡ − ḡ⁺) (the
    code's sign) averaged with β; Powell on H: θ₁ = 1 if sᵀy/yᵀHy > μ₁ else
    (1−μ₁)yᵀHy/(yᵀHy − sᵀy), s̃ = θ₁s + (1−θ₁)Hy; then θ₂ = 1 if s̃ᵀy/s̃ᵀs̃ > μ₂ else
    (1−μ₂)s̃ᵀs̃/(s̃ᵀs̃ − s̃ᵀy), ỹ = θ₂y + (1−θ₂)s̃; used iff s̃ᵀỹ > max(0, 1e-4 s̃ᵀs̃‖ḡ‖); L-BFGS by
    the two-loop recursion from H_0 = I; H_a by BFGS on (H_a v, A^{LM} H_a v), v = (mean
    input, 1), used iff s_aᵀy_a > 1e-4 s_aᵀs_a‖v‖. Returns (params, number of skipped pairs)."""
    lam, b, mu1, tau = np.sqrt(method.damping), method.beta, method.mu1, method.effective_l2
    mu = method.momentum
    rng = np.random.default_rng(seed)
    outs = [W.shape[0] for W in params]
    m = [np.zeros_like(W) for W in params]
    ms, my = [np.zeros(o) for o in outs], [np.zeros(o) for o in outs]
    Hg, S, Y = [np.eye(o) for o in outs], [[] for _ in outs], [[] for _ in outs]
    skipped = 0

    def Hg_apply(l, v):
        if not method.limited:
            return Hg[l] @ v
        return v if not S[l] else lbfgs_two_loop(np.array(S[l]), np.array(Y[l]), v)

    def pass_(theta, xb, yb):
        Af, Gf = net.factors(theta, xb, yb, loss)
        a, g = [t[..., 0] for t in Af], [t[..., 0] for t in Gf]
        return a, [gi.mean(0) for gi in g], [(ai @ W.T).mean(0) for ai, W in zip(a, theta)]

    A = None
    if warm is not None:
        A = [ai.T @ ai / len(ai) for ai in pass_(params, *warm)[0]]
    for k in range(steps):
        idx = rng.choice(len(x), size=batch_size, replace=False)
        xb, yb = x[idx], y[idx]
        a, gbar, hbar = pass_(params, xb, yb)
        grad = net.grad(params, xb, yb, loss)
        if A is None:
            A = [ai.T @ ai / len(ai) for ai in a]
        if k == 0:
            Ha = [np.linalg.inv(Al + lam * np.eye(len(Al))) for Al in A]
        else:
            A = [b * Al + (1 - b) * ai.T @ ai / len(ai) for Al, ai in zip(A, a)]
        new = []
        for l, W in enumerate(params):
            m[l] = mu * m[l] + (1 - mu) * (grad[l] + tau * W)
            new.append(W - lr * Hg_apply(l, m[l] @ Ha[l]))
        _, gbar_p, hbar_p = pass_(new, xb, yb)
        for l in range(len(params)):
            ms[l] = b * ms[l] + (1 - b) * (hbar[l] - hbar_p[l])
            my[l] = b * my[l] + (1 - b) * (gbar[l] - gbar_p[l])
            s, yv = ms[l], my[l]
            Hy = Hg_apply(l, yv)
            sy, yHy = s @ yv, yv @ Hy
            if not sy / yHy > mu1:
                th = (1 - mu1) * yHy / (yHy - sy)
                s = th * s + (1 - th) * Hy
            ss, sy = s @ s, s @ yv
            if not sy / ss > lam:
                th = (1 - lam) * ss / (ss - sy)
                yv = th * yv + (1 - th) * s
            if s @ yv > max(0.0, 1e-4 * (s @ s) * np.linalg.norm(gbar[l])):
                if method.limited:
                    S[l], Y[l] = (S[l] + [s])[-method.memory:], (Y[l] + [yv])[-method.memory:]
                else:
                    Hg[l] = bfgs_update_H(Hg[l], s, yv)
            else:
                skipped += 1
            v = np.append(a[l][:, :-1].mean(0), 1.0)
            s_a = Ha[l] @ v
            y_a = (A[l] + lam * np.eye(len(v))) @ s_a
            if s_a @ y_a > 1e-4 * (s_a @ s_a) * np.linalg.norm(v):
                Ha[l] = bfgs_update_H(Ha[l], s_a, y_a)
        params = new
    return params, skipped


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_authors_deferred_second_pass_reproduces_explicit_authors_algorithm(variant, dense):
    """train() with variant="authors" gives the parameters of the explicit authors' algorithm
    (learning rate known, second pass immediately), 8 steps, on a run where the skip rule
    fires; and, driven by hand after warm_start, the same with the warm-start A. Differences are
    evaluation orders only: relative 1e-10. Both forms."""
    x, y, net = _offset_regression()
    method = _make(variant, damping=0.01, memory=3, variant="authors", l2=1e-3)
    p0 = net.init(4)
    got, _ = train(method, net, p0, x, y, MSE(), steps=8, lr=0.3, batch_size=16, seed=11, dense=dense)
    want, skipped = _explicit_authors(method, net, p0, x, y, MSE(), steps=8, lr=0.3, batch_size=16, seed=11)
    assert skipped > 0
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10)
    assert max(rel_err(a, b) for a, b in zip(got, p0)) > 1e-2
    # warm start (on other data), then the same loop as train()
    xc, yc = _classification(64, seed=3)
    net = Sequential([Linear(4, 5), Tanh(), Linear(5, 3)])
    method = _make(variant, damping=0.05, memory=3, variant="authors", l2=1e-3)
    params = p0 = net.init(4)
    warm = (xc[:40] + 0.5, yc[:40])
    state = method.warm_start(method.init(net, params), net, params, Batch(*warm, CrossEntropy()))
    rng = np.random.default_rng(5)
    for _ in range(6):
        idx = rng.choice(len(xc), size=16, replace=False)
        d, state = method.step(state, net, params, Batch(xc[idx], yc[idx], CrossEntropy()), dense=dense)
        params = [W + 0.4 * D for W, D in zip(params, d)]
    want, _ = _explicit_authors(method, net, p0, xc, yc, CrossEntropy(), steps=6, lr=0.4, batch_size=16,
                                seed=5, warm=warm)
    for a, b in zip(params, want):
        assert_close(a, b, rtol=1e-10)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_authors_training_smoke_decreases_loss(variant):
    x, y = _classification()
    net = Sequential([Linear(4, 16), Tanh(), Linear(16, 3)])
    method = _make(variant, memory=10, variant="authors")
    _, hist = train(method, net, net.init(0), x, y, CrossEntropy(), steps=30, lr=0.3, batch_size=32, seed=1)
    assert hist["loss"][-1] < 0.6 * hist["loss"][0]


def test_authors_bad_hyper_parameters():
    for cls in (KBFGSMLP, KBFGSLMLP):
        for kwargs, match in [({"variant": "code"}, "variant"), ({"variant": "authors", "algorithm": "alg5"}, "alg4"),
                              ({"variant": "authors", "l2": -1e-5}, "l2"),
                              ({"variant": "authors", "l2": float("nan")}, "l2"),
                              ({"variant": "authors", "l2": True}, "l2"),
                              ({"l2": 1e-5}, "l2")]:
            with pytest.raises(HyperParameterError, match=match):
                cls(**kwargs)
    assert KBFGSMLP(variant="authors", l2=0.0).effective_l2 == 0.0 and KBFGSMLP(l2=0.0).effective_l2 == 0.0


# ------------------------------------------ (10) shared vocabulary with Chapter 3
def test_momentum_is_separate_from_beta_and_its_forms_differ_by_a_learning_rate_factor():
    """momentum μ only enters m (line 8): with m₀ = 0, "ema" (m ← μm + (1−μ)g, the default as
    §2.5.2 prints) is (1−μ) times "heavy_ball" (m ← μm + g, Chapter 3), so "heavy_ball" with
    lr·(1−μ) reproduces "ema" with lr; changing μ alone changes the run, and beta (A, s_g,
    y_g) is untouched by it."""
    x, y = _classification()
    net = Sequential([Linear(4, 5), Tanh(), Linear(5, 3)])
    mu = 0.8
    runs = [train(KBFGSMLP(momentum=mu, momentum_form=f), net, net.init(0), x, y, CrossEntropy(), steps=6,
                  lr=lr, batch_size=16, seed=2)[0] for f, lr in (("ema", 0.3), ("heavy_ball", 0.3 * (1 - mu)))]
    for a, b in zip(*runs):
        assert_close(a, b, rtol=1e-10)
    assert KBFGSMLP.hyper_parameters()["momentum_form"] == "ema"
    other = train(KBFGSMLP(momentum=0.5), net, net.init(0), x, y, CrossEntropy(), steps=6, lr=0.3, batch_size=16,
                  seed=2)[0]
    assert max(rel_err(a, b) for a, b in zip(other, runs[0])) > 1e-3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("algorithm", ["alg4", "alg5"])
def test_curvature_operator_and_rhs_reproduce_the_direction(variant, algorithm):
    """curvature(state) = ⊕_l (H_g ⊗ H_a)⁻¹ with H_a = state.H_a_used (before the step's H_a
    update) and H_g dense (the recursion (2.12) for L-BFGS); rhs(state) = m (= ∇f̄ for alg5).
    −C⁻¹ m equals the fast form's direction at forward error C·n·eps·κ(H_g)κ(H_a)."""
    import refcurv as rc

    x, y = _classification()
    net = Sequential([Linear(4, 5), Tanh(), Linear(5, 3)])
    method = _method(variant, algorithm=algorithm, memory=2, damping=0.05)
    params, rng = net.init(0), np.random.default_rng(3)
    state = method.init(net, params)
    for k in range(4):
        idx = rng.choice(len(x), 16, replace=False)
        prev = state
        d, state = method.step(state, net, params, Batch(x[idx], y[idx], CrossEntropy()))
        assert all(a is b for a, b in zip(state.H_a_used, prev.H_a if k else state.H_a_used))
        C = method.curvature(state)
        n = net.n_params
        kappa = max(_cond(_Hg(method, state, j)) * _cond(state.H_a_used[j]) for j in range(len(params)))
        got = -C.solve(rc.flatten(method.rhs(state, None)))
        assert_close(got, rc.flatten(d), rtol=forward_tol(n, kappa))
        o = 0
        for j, W in enumerate(params):
            K = np.kron(_Hg(method, state, j), state.H_a_used[j])
            assert_close(C.todense()[o:o + W.size, o:o + W.size], np.linalg.inv(K), rtol=forward_tol(W.size, _cond(K)))
            o += W.size
        params = [W + 0.3 * D for W, D in zip(params, d)]
