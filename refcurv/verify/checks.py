"""The one registry of checks that ``refcurv verify`` runs and the test suite draws on
(tests/test_verify.py runs every check of the quick tier), so the two can never disagree about
what "holds" means.

A check is a pure function ``fn(problem, seed) -> (error, tolerance, detail)`` over a
built-in problem; it holds iff ``error ≤ tolerance``. Errors are relative (the norm of the
difference over the norm of the reference) unless the check says otherwise; tolerances come
from :func:`refcurv.testing.tolerance.tolerance` (unit roundoff × size × conditioning).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backend import asarray_like
from ..testing.tolerance import EPS, tolerance

#: built-in problems: network (a Linear-Tanh-Linear MLP, a Conv-Tanh-Flatten-Linear CNN, the
#: MLP's layers on sequences of T = 4 positions with a loss per position) and loss
#: (cross-entropy, MSE, BCE); N = 6 samples, 3 outputs (per position for "seq")
PROBLEMS = ("mlp-ce", "mlp-mse", "mlp-bce", "cnn-ce", "cnn-mse", "cnn-bce", "seq-ce", "seq-mse", "seq-bce")
QUICK_PROBLEMS = ("mlp-ce", "cnn-mse")


def build_problem(problem, seed, backend="numpy", dtype=np.float64):
    """``(net, params, x, y, loss)`` for a built-in problem, seeded (drawn on the host, then
    moved to ``backend``)."""
    from ..backend import get_xp
    from ..nn import BCE, MSE, Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh

    arch, loss_name = problem.split("-")
    rng = np.random.default_rng(seed)
    if arch == "mlp":
        net, xshape = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)]), (6, 3)
    elif arch == "seq":
        net, xshape = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)]), (6, 4, 3)
    else:
        net, xshape = Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)]), (6, 1, 3, 3)
    params = [W.astype(dtype) for W in net.init(seed)]
    x = rng.standard_normal(xshape).astype(dtype)
    loss = {"ce": CrossEntropy, "mse": MSE, "bce": BCE}[loss_name]()
    lead = xshape[:2] if arch == "seq" else xshape[:1]
    if loss_name == "ce":
        y = rng.integers(0, 3, lead)
    elif loss_name == "mse":
        y = rng.standard_normal(lead + (3,))
    else:
        y = rng.integers(0, 2, lead + (3,)).astype(float)
    xp = get_xp(backend)
    return net, [xp.asarray(W) for W in params], xp.asarray(x), xp.asarray(y), loss


@dataclass(frozen=True)
class Check:
    """One verifiable claim on one problem."""

    area: str  # "foundation" | "linalg" | "method"
    method: str  # registry name, or "-"
    name: str
    problem: str
    fn: Callable
    quick: bool = False

    @property
    def id(self):
        return f"{self.area}/{self.method}/{self.name}/{self.problem}"


def _host(a):
    from ..backend import to_numpy

    return np.asarray(to_numpy(a), dtype=float)


def _rel(a, b):
    a, b = _host(a), _host(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ---------------------------------------------------------------- foundation
def _richardson(f, h):
    """Central difference with one Richardson step: error O(h⁴) (autograd's ``check_grads``
    style, on directional derivatives)."""
    d = lambda t: (f(t) - f(-t)) / (2 * t)  # noqa: E731
    return (4 * d(h / 2) - d(h)) / 3


#: step of the finite differences: ε^{1/5} balances the O(h⁴) truncation against the
#: O(ε/h) rounding; the tolerance is C·ε^{4/5} times the scale of the function. C = 10³: the
#: rounding of one evaluation of Ψ is O(n ε Σ|terms|) (a mean of N losses, each a logsumexp or
#: a sum over outputs), up to ~10² × ε|Ψ| on these problems, and Richardson's combination
#: multiplies it by ~3; the truncation O(h⁴) is negligible for these O(1) derivatives.
#: A gradient off by 1e-8 relative fails by ~3× (tests/test_verify.py).
FD_STEP = EPS ** 0.2
FD_C = 1e3


def grad_vs_fd(problem, seed, backend="numpy"):
    """``∇Ψ·v`` against finite differences of ``Ψ(θ + t v)`` (Richardson), for ``v = ∇Ψ/‖∇Ψ‖``
    (where ``∇Ψ·v`` is largest, so a relative error of the gradient shows in full) and two
    random unit directions; the error is relative to ``‖∇Ψ‖ + |Ψ|`` (the rounding of the
    differences scales with ``|Ψ|``)."""
    from .. import flatten, unflatten
    from ..backend import to_numpy

    net, params, x, y, loss = build_problem(problem, seed, backend)
    g = np.asarray(to_numpy(flatten(net.grad(params, x, y, loss))), dtype=float)
    rng = np.random.default_rng(seed + 1)
    dirs = [g / np.linalg.norm(g)] + [u / np.linalg.norm(u) for u in rng.standard_normal((2, g.size))]
    psi = float(net.loss(params, x, y, loss))
    worst = 0.0
    for u in dirs:
        v = [asarray_like(V, W) for V, W in zip(unflatten(u, net), params)]
        f = lambda t: float(net.loss([W + t * V for W, V in zip(params, v)], x, y, loss))  # noqa: E731
        worst = max(worst, abs(_richardson(f, FD_STEP) - float(g @ u)) / (np.linalg.norm(g) + abs(psi)))
    return worst, FD_C * EPS ** 0.8, "max over 3 directions |Δ| / (‖∇Ψ‖ + |Ψ|)"


def jvp_vs_fd(problem, seed, backend="numpy"):
    """``J v`` (forward mode) against finite differences of the outputs."""
    net, params, x, y, loss = build_problem(problem, seed, backend)
    v = [np.random.default_rng(seed + 1).standard_normal(W.shape) for W in params]
    v = [asarray_like(V, W) for V, W in zip(v, params)]
    exact = net.jvp(params, x, v)
    f = lambda t: net.forward([W + t * V for W, V in zip(params, v)], x)  # noqa: E731
    fd = _richardson(f, FD_STEP)
    fd, exact, f0 = _host(fd), _host(exact), _host(f(0.0))
    scale = np.linalg.norm(f0) + np.linalg.norm(exact) + 1.0
    return float(np.linalg.norm(fd - exact) / scale), FD_C * EPS ** 0.8, "‖Δ‖ / (‖f‖ + ‖Jv‖ + 1)"


def ggn_is_exact_fisher(problem, seed, backend="numpy"):
    """GGN = exact Fisher for the canonical-link losses (thesis §1.2.2): two independent
    computations (output Hessian vs expectation over labels)."""
    from .. import curvature as cv

    net, params, x, y, loss = build_problem(problem, seed, backend)
    G = cv.ggn(net, params, x, y, loss)
    F = cv.fisher(net, params, x, y, loss, kind="exact")
    return _rel(F, G), tolerance(net.n_params, kind="residual"), "‖F − GGN‖ / ‖GGN‖"


def curvature_symmetric_psd(problem, seed, backend="numpy"):
    """Hessian symmetric; GGN, exact Fisher and empirical Fisher symmetric PSD."""
    from .. import curvature as cv

    net, params, x, y, loss = build_problem(problem, seed, backend)
    n = net.n_params
    worst = 0.0
    H = _host(cv.hessian(net, params, x, y, loss))
    worst = max(worst, _rel(H, H.T))
    for M in (_host(cv.ggn(net, params, x, y, loss)), _host(cv.empirical_fisher(net, params, x, y, loss))):
        worst = max(worst, _rel(M, M.T))
        ev = np.linalg.eigvalsh((M + M.T) / 2)
        worst = max(worst, max(0.0, -ev.min()) / max(ev.max(), 1e-300))
    return worst, tolerance(n, kind="residual"), "max(asymmetry, −λ_min/λ_max)"


def kronecker_exact_batch_of_one(problem, seed, backend="numpy"):
    """KFAC is exact for one sample on a Linear layer: the GGN block of each Linear layer
    equals ``G ⊗ A`` (row-major) with the exact-Fisher factors of one input."""
    from .. import curvature as cv

    net, params, x, y, loss = build_problem(problem, seed, backend)
    x1, y1 = x[:1], y[:1]
    blocks = cv.ggn(net, params, x1, y1, loss, blocks=True)
    facs = cv.kfac_factors(net, params, x1, y1, loss, kind="exact")
    worst = 0.0
    for layer, B, (A, G) in zip(net.layers_trainable, blocks, facs):
        if type(layer).__name__ == "Linear":
            worst = max(worst, _rel(np.kron(_host(G), _host(A)), B))
    return worst, tolerance(net.n_params, kind="residual"), "‖G ⊗ A − GGN block‖ / ‖GGN block‖"


def kfac_expand_exact_deep_linear(problem, seed, backend="numpy"):
    """KFAC-expand is exact for a deep linear network with a loss per position on sequences
    (Eschenhagen et al. 2023, §3, the expand setting): each layer's GGN block equals
    ``G ⊗ A`` of ``kfac_factors(conv="expand")``. The problem's sequence batch, its
    activation-free net, MSE (output Hessian ``I``)."""
    from .. import curvature as cv
    from ..nn import MSE, Linear, Sequential

    _, _, x, _, _ = build_problem(problem, seed, backend)
    net = Sequential([Linear(3, 4), Linear(4, 3)])
    from ..backend import get_xp

    xp = get_xp(backend)
    params = [xp.asarray(W) for W in net.init(seed)]
    y = xp.asarray(np.random.default_rng(seed + 1).standard_normal(tuple(x.shape[:2]) + (3,)))
    blocks = cv.ggn(net, params, x, y, MSE(), blocks=True)
    facs = cv.kfac_factors(net, params, x, y, MSE(), kind="exact", conv="expand")
    worst = max(_rel(np.kron(_host(G), _host(A)), B) for B, (A, G) in zip(blocks, facs))
    return worst, tolerance(net.n_params, kind="residual"), "‖G ⊗ A − GGN block‖ / ‖GGN block‖ (deep linear)"


# ---------------------------------------------------------------- linalg
def _spd(rng, n, log_cond):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.logspace(0, log_cond, n)
    return (Q * w) @ Q.T, w.max() / w.min()


def woodbury(problem, seed, backend="numpy"):
    """``(λI + UUᵀ)⁻¹ B`` by SMW (SENG (8)-(9)) against a dense solve."""
    from ..linalg.woodbury import lowrank_solve

    rng = np.random.default_rng(seed)
    n, r, lam = 30, 5, 1e-2
    U, B = rng.standard_normal((n, r)), rng.standard_normal((n, 2))
    M = lam * np.eye(n) + U @ U.T
    x = np.linalg.solve(M, B)
    return _rel(lowrank_solve(lam, U, B), x), tolerance(n, np.linalg.cond(M)), "forward error"


def theorem1(problem, seed, backend="numpy"):
    """Thesis Theorem 1: Hessian-action BFGS (s = Ha, y = A⁺s) equals Sherman–Morrison."""
    from ..linalg.quasi_newton import bfgs_update_H
    from ..linalg.woodbury import sherman_morrison

    rng = np.random.default_rng(seed)
    n = 8
    A, kA = _spd(rng, n, 2)
    a = rng.standard_normal(n) * 10
    H = np.linalg.inv(A)
    Aplus = A + np.outer(a, a)
    s = H @ a
    err = _rel(bfgs_update_H(H, s, Aplus @ s), sherman_morrison(H, a))
    return err, tolerance(n, np.linalg.cond(Aplus) * kA), "‖BFGS − SM‖ / ‖SM‖"


def powell_invariant(problem, seed, backend="numpy"):
    """Powell damping on H (thesis (2.12)) on a pair that needs it: ``s̃ = θ s + (1−θ) H y``
    with ``θ = (1−μ) yᵀHy / (yᵀHy − sᵀy)``, so that ``s̃ᵀy = μ yᵀHy`` exactly (the invariant
    holds with equality when damping is active)."""
    from ..linalg.damping import powell_H

    rng = np.random.default_rng(seed)
    n, mu = 8, 0.2
    H, _ = _spd(rng, n, 2)
    y = rng.standard_normal(n)
    s = -H @ y * 0.5 + 0.01 * rng.standard_normal(n)  # a pair with sᵀy < μ yᵀHy
    s_t, theta = powell_H(s, y, H, mu)[:2]
    yHy, sy = float(y @ H @ y), float(s @ y)
    theta_ref = (1 - mu) * yHy / (yHy - sy)
    ref = theta_ref * s + (1 - theta_ref) * (H @ y)
    err = max(abs(float(s_t @ y) - mu * yHy) / yHy, _rel(s_t, ref), abs(theta - theta_ref))
    return err, tolerance(n, kind="residual"), "max(|s̃ᵀy − μ yᵀHy| / yᵀHy, ‖s̃ − s̃_ref‖/‖s̃_ref‖, |θ − θ_ref|)"


def roots_newton_vs_eigh(problem, seed, backend="numpy"):
    """Coupled-Newton inverse roots against eigh within the Newton stopping tolerance."""
    from ..linalg.roots import inv_root_eigh, inv_root_newton

    rng = np.random.default_rng(seed)
    n, p = 6, 4
    A, k = _spd(rng, n, 2)
    X, rep = inv_root_newton(A, p, tol=1e-10, max_iter=200)
    R = inv_root_eigh(A, p)
    return _rel(X, R), 10 * 1e-10 * k + tolerance(n, k), "‖Newton − eigh‖ / ‖eigh‖"


def brand_vs_eigh(problem, seed, backend="numpy"):
    """Brand rank-one update of ``U diag(K) Uᵀ`` (untruncated) against dense eigh."""
    from ..linalg.lowrank import brand_update

    rng = np.random.default_rng(seed)
    n, r = 10, 3
    U, _ = np.linalg.qr(rng.standard_normal((n, r)))
    K = np.array([3.0, 2.0, 1.0])
    h = rng.standard_normal(n)
    U2, K2 = brand_update(U, K, h, 1.0, rank=r + 1)[:2]
    M = (U * K) @ U.T + np.outer(h, h)
    return _rel((U2 * K2) @ U2.T, M), tolerance(n, kind="residual") * 10, "‖U K Uᵀ − M‖ / ‖M‖"


def sketch_unbiased_weights(problem, seed, backend="numpy"):
    """Row sampling is unbiased, ``E[ΩᵀΩ] = I`` (SENG (14) with the corrected scaling, NG+
    (17)): every drawn row's weight satisfies ``w_i² · P(row i kept) = 1`` — ``q p_i`` with
    replacement, the inclusion probability ``π_i`` without (leverage-score probabilities)."""
    from ..linalg import sketch as SK

    rng = np.random.default_rng(seed)
    n, q = 12, 5
    p = rng.random(n) + 0.05
    p /= p.sum()
    worst = 0.0
    sk = SK.row_sampling(n, q, p, replace=True, seed=rng)
    worst = max(worst, float(np.abs(sk.weight**2 * q * p[sk.index] - 1).max()))
    sk = SK.row_sampling(n, q, p, replace=False, seed=rng)
    pi = SK.inclusion_probabilities(p, q)
    worst = max(worst, float(np.abs(sk.weight**2 * pi[sk.index] - 1).max()))
    return worst, tolerance(n, kind="residual"), "max |w_i² P(i) − 1|"


def seng_lemma5(problem, seed, backend="numpy"):
    """SENG Lemma 5 ([SENG] App. C, (36)): the sketched SMW coefficients obey
    ``‖b − b̂‖ ≤ (√ε + η) / ((1 − η)√h₁) ‖g‖`` with η, ε measured on the drawn sketch
    (tests/test_sketch.py derives the statement); reported as the ratio to the bound."""
    from ..linalg import sketch as SK

    rng = np.random.default_rng(seed)
    n, rho, q, lam = 30, 4, 24, 0.1
    U, g = rng.standard_normal((n, rho)), rng.standard_normal(n)
    sk = SK.row_sampling(n, q, SK.leverage_scores(U), replace=True, seed=rng)
    Nb = np.linalg.svd(U, full_matrices=False)[0]
    OmN = sk.apply(Nb)
    eta = np.linalg.norm(OmN.T @ OmN - np.eye(rho), 2)
    v = g - Nb @ (Nb.T @ g)
    eps = np.linalg.norm(OmN.T @ sk.apply(v)) ** 2 / (v @ v)
    b = np.linalg.solve(lam * np.eye(rho) + U.T @ U, U.T @ g)
    Xi = sk.apply(U)
    b_hat = np.linalg.solve(lam * np.eye(rho) + Xi.T @ Xi, Xi.T @ sk.apply(g))
    if eta >= 1:  # the lemma says nothing; the seed is fixed so this is a property of the draw
        return 0.0, 1.0, "η ≥ 1: bound vacuous"
    h1 = np.linalg.eigvalsh(lam * np.eye(n) + U @ U.T).min()
    bound = (np.sqrt(eps) + eta) / ((1 - eta) * np.sqrt(h1)) * np.linalg.norm(g)
    return float(np.linalg.norm(b - b_hat) / bound), 1.0 + 1e-8, "‖b − b̂‖ / Lemma 5 bound"


# ---------------------------------------------------------------- methods
STEPS = 3


def _method_run(name, problem, seed, backend="numpy", hp=None):
    """Fast and dense forms over ``STEPS`` steps on the same draws (each from its own state,
    at the same parameters), and the curvature of each dense step; returns per-step
    ``(d_fast, d_dense, C, v, fast_state)``."""
    from .. import flatten
    from ..methods import REGISTRY, Batch

    net, params, x, y, loss = build_problem(problem, seed, backend)
    method = REGISTRY[name](**(hp or {}))
    batch = Batch(x, y, loss)
    s_fast = s_dense = method.init(net, params)
    p = params
    out = []
    for k in range(STEPS):
        draws = method.draw(np.random.default_rng(seed + 100 + k), s_dense, net, p, batch)
        d_fast, s_fast = method.step(s_fast, net, p, batch, draws=draws)
        d_dense, s_next = method.step(s_dense, net, p, batch, draws=draws, dense=True)
        C = method.curvature(s_next, net, p, batch, draws)
        v = flatten(method.rhs(s_next, net.grad(p, x, y, loss)))
        out.append((flatten(d_fast), flatten(d_dense), C, v, s_fast))
        s_dense, p = s_next, [W + 0.1 * D for W, D in zip(p, d_dense)]
    return net, method, out


def _cond(C):
    ev = _host(C.eigvalsh())
    return float(ev.max() / ev.min()) if ev.min() > 0 else np.inf


def _shampoo_bound(m, kappa, net, state):
    """Shampoo's fast form takes coupled-Newton roots accepted at ``max|M − I| = e`` after
    ``j`` iterations (refcurv.linalg.roots): each ``D^{−1/p}`` is off by a factor ``M^{1/p}``
    with ``‖M − I‖₂ ≤ d·e =: δ``, i.e. relatively by ``ρ ≤ δ / (p (1 − δ))`` plus one forward
    error per iteration (tests/test_method_shampoo.py::_root_rtol, from the reports the state
    keeps); a tensor's ``k`` roots by ``Π(1 + ρ_i) − 1``; the worst tensor; plus the forward
    error of the dense solve."""
    worst = 0.0
    for lay_reps, lay_factors in zip(state.newton, state.factors):
        for reps, Ds in zip(lay_reps, lay_factors):
            p = 2 * len(Ds)
            prod = 1.0
            for rep, D in zip(reps, Ds):
                D = _host(D)
                rho = tolerance(D.shape[0], np.linalg.cond(D))
                if rep is not None and rep.converged:
                    delta = D.shape[0] * rep.error
                    rho += delta / (p * (1 - delta)) + tolerance(D.shape[0], np.linalg.cond(D)) * rep.iterations
                prod *= 1 + rho
            worst = max(worst, prod - 1)
    return worst + tolerance(net.n_params, kappa)


#: fast forms that approximate their dense definition, with the bound that relates them:
#: ``name -> f(method, κ, net, fast_state) -> relative tolerance``
APPROXIMATE = {
    # CG stops at a relative residual cg_tol: forward error ≤ κ · cg_tol
    "hessian_free": lambda m, kappa, net, state: kappa * m.cg_tol,
    "shampoo": _shampoo_bound,
}


def _worst(pairs):
    """The ``(error, tolerance)`` pair closest to failing (largest error / tolerance)."""
    return max(pairs, key=lambda p: p[0] / p[1])


def fast_equals_dense(name, hp=None):
    def fn(problem, seed, backend="numpy"):
        net, method, out = _method_run(name, problem, seed, backend, hp)

        def tol(C, state):
            kappa = _cond(C)
            if name in APPROXIMATE:
                return APPROXIMATE[name](method, kappa, net, state)
            return tolerance(net.n_params, kappa)

        err, t = _worst([(_rel(d_fast, d_dense), tol(C, st)) for d_fast, d_dense, C, _, st in out])
        return err, t, f"worst of {STEPS} steps: ‖d_fast − d_dense‖ / ‖d_dense‖"

    fn.__doc__ = f"{name}: fast form = dense form over {STEPS} steps on the same draws"
    return fn


def curvature_reproduces_dense(name, hp=None):
    def fn(problem, seed, backend="numpy"):
        net, method, out = _method_run(name, problem, seed, backend, hp)
        err, t = _worst([(_rel(-C.solve(v), d_dense), tolerance(net.n_params, _cond(C)))
                         for _, d_dense, C, v, _ in out])
        return err, t, "worst step: ‖−C⁻¹v − d_dense‖ / ‖d_dense‖"

    fn.__doc__ = f"{name}: direction = −C⁻¹ rhs with C = curvature(state)"
    return fn


#: non-default configurations checked besides the defaults (each a code path of its own:
#: the implicit SENG path, NG+'s solvers and sketches, KFAC's reduce factors and refresh
#: intervals, Algorithm 5/10, the authors' variants, Monte-Carlo Fisher kinds, …)
VARIANTS = {
    "kfac": [dict(conv="reduce"), dict(T_stats=2, T_inv=3, beta=0.7), dict(fisher="exact"),
             dict(fisher="empirical", split="sqrt", momentum=0.9), dict(n_samples=3)],
    "seng": [dict(threshold=0, uc="exact"), dict(history="decay", memory=3, beta=0.8), dict(T_inv=2)],
    "seng_distributed": [dict(block_capacitance=False)],
    "ngplus": [dict(solver="smw"), dict(statistics="momentum"), dict(block_size=2), dict(gram="sketch"),
               dict(side="right")],
    "ngplus_online_newton": [dict(projection="euclidean")],
    "tnt": [dict(fisher="exact"), dict(statistics="batch_mean"), dict(T_stats=2, T_inv=2), dict(conv_modes=3)],
    "shampoo": [dict(root_method="eigh"), dict(momentum_form="ema")],
    "kbfgs": [dict(algorithm="alg10"), dict(T_inv=2)],
    "kbfgs-l": [dict(memory=2)],
    "kbfgs-mlp": [dict(algorithm="alg5"), dict(variant="authors")],
    "kbfgs-l-mlp": [dict(memory=2)],
    "smw_gn": [dict(form="general")],
    "smw_ng": [dict(fisher="mc", n2=4)],
    "smw_ng_bd": [dict(fisher="mc")],
    "hessian_free": [dict(damping=0.1)],
    "qng": [dict(blocks="layer", rank=2)],
    "ginger": [dict(blocks="tensor", rank=2)],
}


def _hp_label(hp):
    return ", ".join(f"{k}={v!r}" for k, v in hp.items())


# ---------------------------------------------------------------- the registry
FOUNDATION = [
    ("gradient = finite differences", grad_vs_fd),
    ("JVP = finite differences", jvp_vs_fd),
    ("GGN = exact Fisher", ggn_is_exact_fisher),
    ("curvature symmetric PSD", curvature_symmetric_psd),
    ("KFAC exact for one sample", kronecker_exact_batch_of_one),
]
LINALG = [
    ("Woodbury (SENG (8)-(9))", woodbury),
    ("Theorem 1: BFGS = Sherman–Morrison", theorem1),
    ("Powell damping on H", powell_invariant),
    ("coupled Newton = eigh roots", roots_newton_vs_eigh),
    ("Brand update = eigh", brand_vs_eigh),
    ("row sampling unbiased", sketch_unbiased_weights),
    ("SENG Lemma 5 sketch bound", seng_lemma5),
]


def all_checks():
    """Every registered check (recomputed so that methods registered later are included)."""
    from ..methods import REGISTRY

    checks = []
    for name, fn in FOUNDATION:
        for prob in PROBLEMS:
            if fn is kronecker_exact_batch_of_one and prob.startswith("seq"):
                continue  # one sample still has T locations: KFAC is not exact there
            checks.append(Check("foundation", "-", name, prob, fn, quick=prob in QUICK_PROBLEMS))
    checks.append(Check("foundation", "-", "KFAC-expand exact, deep linear (Eschenhagen et al.)", "seq-mse",
                        kfac_expand_exact_deep_linear, quick=True))
    for name, fn in LINALG:
        checks.append(Check("linalg", "-", name, "-", fn, quick=True))
    for m in sorted(REGISTRY):
        conv = REGISTRY[m].supports_conv
        for prob in PROBLEMS:
            if not prob.startswith("mlp") and not conv:
                continue
            quick = prob == "mlp-ce"
            checks.append(Check("method", m, "fast = dense", prob, fast_equals_dense(m), quick=quick))
            checks.append(Check("method", m, "curvature reproduces dense", prob,
                                curvature_reproduces_dense(m), quick=quick))
        for hp in VARIANTS.get(m, []):
            for prob in ("mlp-ce", "cnn-mse") if conv else ("mlp-ce",):
                tag = f" [{_hp_label(hp)}]"
                checks.append(Check("method", m, "fast = dense" + tag, prob, fast_equals_dense(m, hp)))
                checks.append(Check("method", m, "curvature reproduces dense" + tag, prob,
                                    curvature_reproduces_dense(m, hp)))
    return checks
