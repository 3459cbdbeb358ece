"""Exponential moving averages of outer products and their low-rank forms, as dense matrices
(QNG's product form, Ginger's damped inverse): the references the fast low-rank updates of
:mod:`refcurv.methods.qng` and :mod:`refcurv.methods.ginger` are checked against, public for
users. Every function names its seed ([QNG-Ginger], Ginger, §2.2–2.3) and equation; all dense results
are float64 (the reference precision, design §3).

Symbols are the paper's. ``alpha`` is the EMA decay α of (7) — the methods' hyper-parameter
``beta`` (refcurv.methods.vocabulary); ``gamma`` is the damping γ of (14) — the methods'
``damping``; ``tau`` is the rank τ (number of factors of (11), columns of ``U`` in (14)) —
the methods' ``rank``.

The EMA (7)
    :func:`ema_matrix`            ``G_t = α G_{t−1} + (1 − α) d_t d_tᵀ`` from ``G_0 = I``.

QNG's product form (9)–(11), per block a sequence of factors ``K_i = √α I + β_i q_i q_iᵀ``
(``q`` a tuple of vectors and ``beta_t`` a tuple of floats, oldest first)
    :func:`qng_beta`              β_t of (10) (errata QNG-1)
    :func:`qng_factor`            ``K_i`` as a matrix (9)
    :func:`qng_A`, :func:`qng_G`  ``Â = K_oldest ⋯ K_newest`` and ``Ĝ = Â Âᵀ``
    :func:`qng_update_dense`      (9)–(11) by the definition: ``q̂_t = Â_t⁻¹ d_t`` by LU
    :func:`qng_solve_dense`       ``Ĝ⁻¹ g`` by Cholesky

Ginger's damped form (14)–(18), per block ``(U, σ)``
    :func:`ginger_K`              ``K_{t,γ}`` of (16)
    :func:`ginger_sigma`          σ of (18) from ``K`` (with the clip of errata GIN-4)
    :func:`ginger_matrix`         ``G_{t,γ} = γI + U diag(σ) Uᵀ`` (14)
    :func:`ginger_update_dense`   (7) on the undamped part + truncation (17)–(18), by d×d
                                  Cholesky inverse and dense eigendecomposition
    :func:`ginger_solve_dense`    ``G_{t,γ}⁻¹ g`` by Cholesky
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import _linalg_guard, asarray_like, eigh, xp_of
from ..errors import ArgumentTypeError, HyperParameterError, NotSPDError, ShapeError
from . import _checks as C
from .woodbury import spd_solve

__all__ = ["ema_matrix", "qng_beta", "qng_factor", "qng_A", "qng_G", "qng_update_dense", "qng_solve_dense",
           "ginger_K", "ginger_sigma", "ginger_matrix", "ginger_update_dense", "ginger_solve_dense", "CLIP_EPS"]

F64 = np.float64

#: clip margin of (18) (errata GIN-4): ``K ≤ (1 − CLIP_EPS·eps)/γ``
CLIP_EPS = 4.0


def _f64(a):
    """``a`` in float64 on its own backend (the dense references run in float64, §3)."""
    return xp_of(a).asarray(a, dtype=F64)


def check_alpha(alpha, name="alpha"):
    """α of (7) must be a real number in (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise HyperParameterError(f"{name} must be a finite number in (0, 1), got {alpha!r}")
    return C.in_open_unit(alpha, name)


def check_tau(tau, name="tau"):
    """τ: an int ≥ 1, or ``None`` (untruncated, QNG (9))."""
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) or tau < 1):
        raise HyperParameterError(f"{name} must be an int >= 1 or None, got {tau!r}")
    return tau


# ====================================================================== (7)
def ema_matrix(ds, alpha, G0=None):
    """The exact EMA (7) ``G_t = α G_{t−1} + (1 − α) d_t d_tᵀ`` over the rows ``d_1 … d_t`` of
    ``ds`` ``(t, n)``, from ``G_0 = I`` (§2.1; or ``G0``); float64."""
    check_alpha(alpha)
    ds = _f64(C.matrix(ds, "ds", "a (t, n) matrix of vectors d_t"))
    xp = xp_of(ds)
    if G0 is None:
        G = xp.eye(ds.shape[1], dtype=F64)
    else:
        # G0 moves to ds's backend; a copy is not needed (G is rebound, never written in place)
        G = asarray_like(C.square(G0, "G0"), ds, dtype=F64)
        if G.shape[0] != ds.shape[1]:
            raise ShapeError(f"G0 must be ({ds.shape[1]}, {ds.shape[1]}) to match ds, got {G.shape}")
    for d in ds:  # a recursion in t, not a loop over samples
        G = alpha * G + (1.0 - alpha) * xp.outer(d, d)
    return C.result(G, "the EMA G_t")


# ====================================================================== QNG (9)–(11)
def qng_beta(alpha, s):
    """``β_t`` of (10) for ``s = ‖q_t‖²``: the positive root of ``s β² + 2√α β − (1 − α) = 0``
    (what ``K Kᵀ = αI + (1 − α) q qᵀ`` requires), ``β = (√(α + (1−α)s) − √α)/s
    = (1 − α)/(√α + √(α + (1−α)s))`` (errata QNG-1; the printed β has lost the square root).
    The rationalized form is evaluated: no cancellation for small ``s``, defined at ``s = 0``.
    A Python float (a NumPy float64 β would promote float32 states, NEP 50)."""
    alpha, s = float(check_alpha(alpha)), float(C.nonnegative(s, "s"))
    return (1.0 - alpha) / (math.sqrt(alpha) + math.sqrt(alpha + (1.0 - alpha) * s))


def qng_factor(q, beta_t, alpha):
    """``K = √α I + β q qᵀ`` (9) as a dense float64 matrix."""
    q = _f64(C.vector(q, "q"))
    C.real(beta_t, "beta_t")
    check_alpha(alpha)
    xp = xp_of(q)
    return C.result(math.sqrt(alpha) * xp.eye(q.shape[0], dtype=F64) + beta_t * xp.outer(q, q), "the factor K")


def _check_factors(q, beta_t, n=None):
    """``q`` a tuple/list of vectors (of length ``n``), ``beta_t`` a tuple/list of as many reals."""
    for v, name in ((q, "q"), (beta_t, "beta_t")):
        if not isinstance(v, (list, tuple)):
            raise ArgumentTypeError(f"{name} must be a tuple of per-factor entries (oldest first), got {type(v).__name__}")
    if len(q) != len(beta_t):
        raise ShapeError(f"q and beta_t must have one entry per factor, got {len(q)} and {len(beta_t)}")
    for i, (qi, bi) in enumerate(zip(q, beta_t)):
        C.vector(qi, f"q[{i}]", n)
        C.real(bi, f"beta_t[{i}]")


def qng_A(q, beta_t, alpha, n):
    """``Â = K_oldest ⋯ K_newest`` (9)/(11), the explicit ``n × n`` product of the stored factors
    ``K_i = √α I + β_i q_i q_iᵀ`` (``q``, ``beta_t`` oldest first); ``I`` when none is stored
    (``A_1 = I``). Float64."""
    n = C.integer(n, "n", minimum=1)
    _check_factors(q, beta_t, n)
    check_alpha(alpha)
    A = xp_of(q).eye(n, dtype=F64)  # on the backend of the stored q_i (NumPy when none is stored)
    for qi, bi in zip(q, beta_t):  # an ordered matrix product over ≤ τ factors
        A = A @ qng_factor(qi, bi, alpha)
    return C.result(A, "Â")


def qng_G(q, beta_t, alpha, n):
    """``Ĝ = Â Âᵀ`` (9)/(11): the curvature the factors represent (``Ĝ_t = Â_{t+1}Â_{t+1}ᵀ``
    after ``t`` updates), float64, symmetrized."""
    A = qng_A(q, beta_t, alpha, n)
    G = A @ A.T
    return C.result((G + G.T) / 2, "Ĝ = Â Âᵀ")


def qng_update_dense(q, beta_t, d, alpha, tau=None):
    """One update (9)–(11) by the definition: ``q̂_t = Â_t⁻¹ d_t`` solved from the explicit
    ``Â_t`` (:func:`qng_A`) by LU with partial pivoting, ``β_t`` from (10), the factor appended
    and only the newest ``τ`` kept (``tau=None``: all, exactly (9); errata QNG-S1). Returns the
    new ``(q, beta_t)`` tuples (the inputs are not modified); float64."""
    check_alpha(alpha)
    check_tau(tau)
    d = _f64(C.vector(d, "d"))
    _check_factors(q, beta_t, d.shape[0])
    xp = xp_of(d)
    try:
        # Â on d's backend (it is I on the host when no factor is stored yet); CuPy reports a
        # singular Â only under the guard (otherwise NaNs)
        with _linalg_guard(xp):
            qt = C.result(xp.linalg.solve(asarray_like(qng_A(q, beta_t, alpha, d.shape[0]), d), d),
                          "q̂_t = Â_t⁻¹ d_t")
    except np.linalg.LinAlgError:
        raise NotSPDError("Â_t is singular (the stored factors are degenerate)") from None
    q, beta_t = tuple(q) + (qt,), tuple(beta_t) + (qng_beta(alpha, qt @ qt),)
    if tau is not None:
        q, beta_t = q[-tau:], beta_t[-tau:]
    return q, beta_t


def qng_solve_dense(q, beta_t, g, alpha):
    """``Ĝ⁻¹ g`` with ``Ĝ = Â Âᵀ`` formed densely (:func:`qng_G`) and solved by Cholesky
    (:func:`~refcurv.linalg.woodbury.spd_solve`); float64."""
    g = _f64(C.vector(g, "g"))
    # Ĝ on g's backend (it is I on the host when no factor is stored yet)
    return spd_solve(asarray_like(qng_G(q, beta_t, alpha, g.shape[0]), g), g, "Â Âᵀ")


# ====================================================================== Ginger (14)–(18)
def check_ginger(U, sigma):
    """``U`` a ``(d, τ)`` matrix, ``1 ≤ τ ≤ d``; ``σ ≥ 0`` of length τ (form (14))."""
    U = C.finite(U, "U")
    if U.ndim != 2 or U.shape[1] > U.shape[0] or U.shape[1] < 1:
        raise ShapeError(f"U must be a (d, τ) matrix with 1 ≤ τ ≤ d, got shape {U.shape}")
    sigma = C.vector(sigma, "sigma", U.shape[1])
    if bool((sigma < 0).any()):
        raise HyperParameterError("sigma must be ≥ 0 (form (14))")
    return U, sigma


def _sigma(sigma):
    sigma = C.finite(sigma, "sigma")
    if sigma.ndim != 1:
        raise ShapeError(f"sigma must be a vector, got shape {sigma.shape}")
    if bool((sigma < 0).any()):
        raise HyperParameterError("sigma must be ≥ 0 (form (14))")
    return sigma


def check_alpha_gamma(alpha, gamma):
    C.in_open_unit(alpha, "alpha")
    C.positive(gamma, "gamma")


def ginger_K(sigma, gamma):
    """(16): ``K^{(i,i)} = σ_i / (γ² + γσ_i)``, the diagonal of ``K_{t,γ}`` in (15), so that
    ``(γI + U diag(σ) Uᵀ)⁻¹ = γ⁻¹I − U diag(K) Uᵀ`` for semi-orthogonal ``U``; ``σ ≥ 0``."""
    sigma = _sigma(sigma)
    C.positive(gamma, "gamma")
    return C.result(sigma / (gamma * (gamma + sigma)), "K of (16)")


def ginger_sigma(K, gamma):
    """(18): ``σ = γ²K / (1 − γK)``, the inverse of (16), after clipping ``K`` to
    ``[0, (1 − δ)/γ]`` with ``δ = CLIP_EPS·eps`` of ``K``'s dtype (errata GIN-4: in floating
    point the computed eigenvalues of the correction can be ``< 0`` or ``≥ γ⁻¹``, violating
    (19)), so that ``0 ≤ σ ≤ γ(1 − δ)/δ`` is finite."""
    K = C.finite(K, "K")
    if K.ndim != 1:
        raise ShapeError(f"K must be a vector, got shape {K.shape}")
    C.positive(gamma, "gamma")
    xp = xp_of(K)
    delta = CLIP_EPS * np.finfo(K.dtype).eps
    Kc = xp.clip(K, 0.0, (1.0 - delta) / gamma)
    return C.result(gamma * gamma * Kc / (1.0 - gamma * Kc), "σ of (18)")


def ginger_matrix(U, sigma, gamma):
    """(14) as a dense matrix: ``G_{t,γ} = γI + U diag(σ) Uᵀ`` (in the dtype of ``U``)."""
    U, sigma = check_ginger(U, sigma)
    C.positive(gamma, "gamma")
    xp = xp_of(U)
    return C.result(gamma * xp.eye(U.shape[0], dtype=U.dtype) + (U * sigma) @ U.T, "G_{t,γ}")


def ginger_update_dense(U, sigma, d, alpha, gamma):
    """One Ginger update by the definition, with d×d matrices: the EMA (7) of the undamped part
    of (14), ``G̃ = γI + α(G_{t−1,γ} − γI) + (1−α)ddᵀ`` (errata GIN-2), its inverse by Cholesky,
    the correction ``γ⁻¹I − G̃⁻¹`` of (17) truncated by a dense eigendecomposition to its
    ``τ`` largest eigenvalues ``U K Uᵀ``, and σ from (18) (:func:`ginger_sigma`, same clip).
    Returns ``(U_t, σ_t)`` in float64 (the inputs are cast); ``O(d³)``."""
    check_alpha_gamma(alpha, gamma)
    U, sigma = check_ginger(U, sigma)
    d = C.vector(d, "d", U.shape[0])
    U, sigma, d = U.astype(F64), sigma.astype(F64), d.astype(F64)  # on U's device
    xp = xp_of(U)
    n, tau = U.shape
    I = xp.eye(n, dtype=F64)
    G_prev = ginger_matrix(U, sigma, gamma)
    G_new = gamma * I + alpha * (G_prev - gamma * I) + (1.0 - alpha) * xp.outer(d, d)
    G_new = (G_new + G_new.T) / 2
    Corr = I / gamma - spd_solve(G_new, I, "G̃_{t,γ}")
    w, V = eigh((Corr + Corr.T) / 2)
    order = xp.argsort(-w)[:tau]
    return C.result((V[:, order], ginger_sigma(w[order], gamma)), "the update (U_t, σ_t)")


def ginger_solve_dense(U, sigma, g, gamma):
    """``G_{t,γ}⁻¹ g`` by Cholesky of the dense (14) (:func:`ginger_matrix`), in float64."""
    U, sigma = check_ginger(U, sigma)
    g = C.vector(g, "g", U.shape[0])
    C.positive(gamma, "gamma")
    return spd_solve(ginger_matrix(U.astype(F64), sigma.astype(F64), gamma), g.astype(F64), "G_{t,γ}")
