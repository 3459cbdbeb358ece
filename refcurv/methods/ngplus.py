"""NG+: the multi-step matrix-product natural gradient (seed 002, Yang, Xu, Cui, Wen, Xu).

Equation numbers refer to ``shared/seeds/002_6132dcc897dbc987.txt``. One layer's weight
``Θ ∈ R^{m×n}`` is refcurv's ``(out, d)`` matrix (bias last column); NG+ works on the
matrix itself, so no vec order enters the method (it enters only the EFIM comparison
(9)-(10), see below). Per-sample gradients are unscaled, ``𝒢_i = G_i A_iᵀ`` (8) with
refcurv's factors ``G_i ∈ R^{m×κ}``, ``A_i ∈ R^{n×κ}`` (``κ = T``: 1 for Linear, the output
locations for Conv2d); the mini-batch gradient is their mean ``𝐆 = (1/N) Σ 𝒢_i``.

GFIM (2), (4)-(5) on the batch: ``L = (1/N) Σ 𝒢_i 𝒢_iᵀ`` (``m × m``, used when ``m ≤ n``) and
``R = (1/N) Σ 𝒢_iᵀ 𝒢_i`` (``n × n``, ``m > n``). Direction (6), a descent direction
(step ``Θ ← Θ + lr·D``)::

    D = −(λI + L)^{-1} 𝐆          (side "left")
    D = −𝐆 (λI + R)^{-1}          (side "right")

Internally a "right" layer is handled as a "left" layer of the transposed problem
(``𝒢_iᵀ = A_i G_iᵀ``, ``𝐆ᵀ``): every formula below is written for the left side.

:class:`NGPlus` (``"ngplus"``) — options, freely combined except where noted:

* ``side``: ``"auto"`` (per layer, (4) if ``m ≤ n`` else (5), as
  :func:`refcurv.curvature.gfim_side`), or ``"left"``/``"right"`` forced.
* ``update_freq`` = 𝒯 (Algorithm 1): the curvature statistic is rebuilt and refactorized
  when ``k mod 𝒯 = 0``; in between the stored matrix and its factorization are reused
  (``L_k = L_{k−1}``) with the current gradient.
* ``statistics``: ``"batch"`` (4)-(5); ``"momentum"`` (11), ``L̄_k = β L̄_{k−1} + (1−β) L_k``,
  ``L̄_0 = L_0`` (the bars the text lost, errata NG+-1); ``"minibatch"`` (12),
  ``L̃_k = β̃ L̃_{k−1} + γ 𝐆_k 𝐆_kᵀ`` from ``L̃ = λ₀I`` in the initial state (its own
  ``mb_beta``, ``mb_gamma``, ``mb_lambda0``). Both averages advance at refresh steps only.
* ``curvature="sketch"``: sketched products (17), ``𝒢_i𝒢_iᵀ ≈ (𝒢_iΩ)(𝒢_iΩ)ᵀ`` with NG+'s
  uniform row sampling ``Ω`` (columns ``√(n/q) e_j``, ``E[ΩΩᵀ] = I_n``, one draw per layer
  per refresh, ``q = sketch_size``) over the long dimension. Fast form: rows of ``A_i`` are
  sampled, ``𝒢_iΩ = G_i (Ω_r A_i)ᵀ`` with refcurv's row sketch ``Ω_r = Ωᵀ``; no extra cost.
* ``block_size`` = p: block-diagonal approximation (18), ``s = ⌈m/p⌉`` diagonal blocks
  ``(1/N) Σ 𝒢_i^{j,p} (𝒢_i^{j,p})ᵀ``, stored as one ``(s, p, p)`` array and factorized by one
  batched Cholesky (no loop over blocks). When ``p`` does not divide ``m`` the last block
  has ``m − (s−1)p`` rows; it is padded with zero gradient rows (its padded part of
  ``λI + L`` is ``λI``, decoupled, so the solution there is exactly zero).
* ``solver``: ``"cholesky"`` (factorize ``λI + L``); ``"smw"``, the SMW form (14)
  corrected (errata NG+-2), ``(λI + UUᵀ)^{-1} = λ^{-1}[I − U(λI + UᵀU)^{-1}Uᵀ]`` with
  ``U = N^{-1/2}[√c_1 g_1, …, √c_N g_N]``, ``c_i = a_iᵀa_i`` for κ = 1 (for κ > 1 the same
  identity holds with the columns ``G_i (A_iᵀA_i)^{1/2}``, N·κ of them); ``"ls"``, the
  regularized least squares (15) with its dimensions corrected (errata NG+-3),
  ``D* = argmin_{D ∈ R^{r×n}} ‖U D − 𝐆‖² + λ‖D‖²``, direction ``−(𝐆 − U D*)/λ``, solved by a
  QR factorization of ``[U; √λ I]``; ``"sketch_ls"``, the sketched LS (16) with
  ``Ω ∈ R^{q×m}`` (uniform row sampling of U's rows, unbiased weights), whose direction
  is ``−(𝐆 − U D̂)/λ = −(λI + UUᵀΩᵀΩ)^{-1} 𝐆`` (push-through identity). The low-rank
  solvers need ``statistics="batch"``, ``curvature="exact"`` and no ``block_size``.
* ``variant="authors"`` (design §8, the authors' ``NGPlus.py``): left factor only,
  damping ``√λ`` added instead of λ, and a Conv2d layer's statistic scaled by ``1/√κ``
  (the code's ``1/(B·√(H_out·W_out))``); everything else as the paper.

Dense form: the matrix the paper defines, formed densely from refcurv's per-sample
gradients (``refcurv.curvature.gfim`` for (4)-(5); ``(1/N) Σ 𝒢_i Ω Ωᵀ 𝒢_iᵀ`` with the drawn
``Ω`` formed as a matrix for (17); the ``m × m`` matrix with its off-block entries zeroed for
(18); ``λI + UUᵀΩᵀΩ``, non-symmetric, for (16)), solved by Cholesky (``spd_solve``; LU for
(16)). Both forms consume the same draws and return the same state keys; the dense form
stores ``fac = None`` and the fast form then refactorizes, so states are interchangeable.

State (never mutated): ``k``; ``sides`` (per layer ``"left"``/``"right"``); ``curv`` (per
layer the stored statistic: the ``m × m`` matrix, the ``(s, p, p)`` blocks, or ``U`` for the
low-rank solvers); ``fac`` (its factorization: Cholesky factor of ``λI + L`` or of the blocks,
of ``λI + UᵀU`` for SMW, ``(Q₁, R)`` of the LS QR); ``sketch`` (the ``Ω`` of (16), reused with
the stored U).

Agreement (tests/test_method_ngplus.py): fast = dense per layer to a relative error
``C·n_eff·eps·κ`` with ``κ = (λ + ‖L‖₂)/λ`` (the condition number of ``λI + L``, blockwise
maximum for (18)), ``n_eff = m + n + N·κ_conv`` (the longest reductions: forming ``L`` over
``n`` or ``N·κ_conv`` terms, the ``m × m`` solve) and C = 100 — the model of
:mod:`refcurv.testing.tolerance`: forward error of a backward-stable solve at ``C·n·eps·κ``.
The SMW (14) and LS (15) answers are formed as ``(𝐆 − correction)/λ``; the correction has
norm ``≤ ‖𝐆‖`` (``U(λI + UᵀU)^{-1}Uᵀ ⪯ I``) and the answer norm is ``≥ ‖𝐆‖/(λ + ‖L‖)``, so
the rounding of that subtraction is amplified by at most ``(λ + ‖L‖)/λ = κ`` — the same
factor (the cancellation factor ``‖G‖/λ`` of the tolerance model). (A worst-case analysis
that lets the capacitance solve's backward error align with the data gives up to
``κ^{3/2}``; the tests keep the model's κ, and the errors measured over the ``thorough``
profile stay below 1% of it.) For the sketched LS (16) the dense matrix is non-symmetric
and solved by LU, the fast form by a QR of ``[ΩU; √λI]``:
``κ = max(cond₂(λI + UUᵀΩᵀΩ), (λ + ‖ΩU‖₂²)/λ)``.

:class:`NGPlusOnlineNewton` (``"ngplus_online_newton"``): the online-Newton iteration (19)
with ``L_t = L_{t−1} + 𝐆_t𝐆_tᵀ`` (errata NG+-4; ``L_0 = εI``) and the projection onto the
Frobenius ball ``K = {‖Θ‖_F ≤ radius}`` (per layer) in the ``L_t``-norm that Lemma 6 needs.

EFIM vs GFIM (9)-(10), errata NG+-5: for i.i.d. zero-mean columns,
``E[vec(𝒢)vec(𝒢)ᵀ] = I_n ⊗ E[𝒢𝒢ᵀ]/n`` (paper's column-major vec), i.e.
``E[𝒢𝒢ᵀ]/n ⊗ I_n`` in refcurv's row-major vec — the 1/n the text drops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import asarray_like, cho_solve, cholesky, eigh, solve_triangular, to_numpy, xp_of
from ..errors import HyperParameterError, NotSPDError
from ..linalg import sketch as SK
from ..linalg.woodbury import spd_solve
from ..nn.layers import Conv2d
from ..vec import unflatten
from .base import Method, check_choice, check_int, check_positive, check_unit
from .registry import register

SIDES = ("auto", "left", "right")
STATISTICS = ("batch", "momentum", "minibatch")
CURVATURES = ("exact", "sketch")
SOLVERS = ("cholesky", "smw", "ls", "sketch_ls")
VARIANTS = ("paper", "authors")
PROJECTIONS = ("L", "euclidean")
LOWRANK = ("smw", "ls", "sketch_ls")
F64 = np.float64


# ------------------------------------------------------------------ generic helpers
def layer_sides(net, side):
    """Per layer ``"left"``/``"right"``: NG+ (4)-(5) by shape for ``"auto"``, else forced."""
    return [cv.gfim_side(s) if side == "auto" else side for s in net.param_shapes]


def _orient(side, G, A):
    """``(P, Q)`` with ``𝒢_i = P_i Q_iᵀ`` for ``"left"`` and ``𝒢_iᵀ = P_i Q_iᵀ`` for ``"right"``."""
    return (G, A) if side == "left" else (A, G)


def _o(side, X):
    """Orient a layer matrix (or a stack ``(…, m, n)``): identity for left, transpose for right."""
    return X if side == "left" else X.swapaxes(-1, -2)


def _sketch_rows(Q, sk):
    """``Ω_r Q_i`` for every sample: ``Q`` ``(N, n, κ)`` → ``(N, q, κ)`` (row sampling)."""
    idx = asarray_like(sk.index, Q)
    w = asarray_like(sk.weight, Q, dtype=Q.dtype)
    return Q[:, idx, :] * w[None, :, None]


def _pad_rows(X, p, axis):
    """Zero-pad ``axis`` up to a multiple of ``p``."""
    xp = xp_of(X)
    m = X.shape[axis]
    extra = (-m) % p
    if extra == 0:
        return X
    widths = [(0, 0)] * X.ndim
    widths[axis] = (0, extra)
    return xp.pad(X, widths)


def blocks_to_dense(B, m):
    """``(s, p, p)`` diagonal blocks → the ``m × m`` block-diagonal matrix (padding trimmed)."""
    xp = xp_of(B)
    s, p, _ = B.shape
    D = xp.zeros((s, p, s, p), dtype=B.dtype)
    ar = xp.arange(s)
    D[ar, :, ar, :] = B
    return D.reshape(s * p, s * p)[:m, :m]


def dense_to_blocks(M, p):
    """The ``(s, p, p)`` diagonal blocks of an ``m × m`` matrix (zero-padded to ``s·p``)."""
    Mp = _pad_rows(_pad_rows(M, p, 0), p, 1)
    s = Mp.shape[0] // p
    M4 = Mp.reshape(s, p, s, p)
    ar = xp_of(M).arange(s)
    return M4[ar, :, ar, :].copy()


def block_mask(m, p):
    """0/1 mask of the (18) block-diagonal pattern on ``m × m`` (blocks of size p)."""
    b = np.arange(m) // p
    return (b[:, None] == b[None, :]).astype(F64)


def gram_from_factors(P, Q, sketch=None, block_size=None):
    """``(1/N) Σ_i P_i Q_iᵀ Ω_rᵀΩ_r Q_i P_iᵀ`` (NG+ (4), (17) when ``sketch`` is given) from the
    factors ``P`` ``(N, m, κ)``, ``Q`` ``(N, n, κ)``, via the ``κ × κ`` Gram ``K_i = Q_iᵀQ_i``;
    with ``block_size`` p only the (18) diagonal blocks, as ``(s, p, p)``."""
    xp = xp_of(P, Q)
    if sketch is not None:
        Q = _sketch_rows(Q, sketch)
    K = xp.einsum("nit,nis->nts", Q, Q)
    N = P.shape[0]
    if block_size is None:
        return xp.einsum("nat,nts,nbs->ab", P, K, P, optimize=True) / N
    Pp = _pad_rows(P, block_size, 1)
    Pb = Pp.reshape(N, Pp.shape[1] // block_size, block_size, P.shape[2])
    return xp.einsum("nkat,nts,nkbs->kab", Pb, K, Pb, optimize=True) / N


def gram_of_matrix(X, sketch=None, block_size=None):
    """``X Ω_rᵀΩ_r Xᵀ`` (the (12) statistic ``𝐆𝐆ᵀ``, sketched by (17) if ``sketch``), full or
    as (18) blocks ``(s, p, p)``."""
    xp = xp_of(X)
    if sketch is not None:
        X = sketch.apply_right(X)
    if block_size is None:
        return X @ X.T
    Xb = _pad_rows(X, block_size, 0)
    Xb = Xb.reshape(Xb.shape[0] // block_size, block_size, X.shape[1])
    return xp.einsum("kaq,kbq->kab", Xb, Xb)


def lowrank_factor(P, Q):
    """``U ∈ R^{m × Nκ}`` with ``UUᵀ = (1/N) Σ_i P_i Q_iᵀ Q_i P_iᵀ`` (NG+ (14)).

    κ = 1 (fully connected): column ``i`` is ``√(c_i/N) g_i`` with ``c_i = a_iᵀa_i`` — (14)'s
    ``U_k``. κ > 1: columns ``N^{-1/2} P_i K_i^{1/2}``, ``K_i = Q_iᵀQ_i`` (batched ``eigh``)."""
    xp = xp_of(P, Q)
    N, m, T = P.shape
    if T == 1:
        c = (Q[:, :, 0] ** 2).sum(axis=1)
        return (P[:, :, 0] * xp.sqrt(c)[:, None]).T / math.sqrt(N)
    K = xp.einsum("nit,nis->nts", Q, Q)
    w, V = eigh(K)
    root = (V * xp.sqrt(xp.maximum(w, 0))[:, None, :]) @ V.swapaxes(-1, -2)
    PR = P @ root  # (N, m, T)
    return xp.moveaxis(PR, 0, 1).reshape(m, N * T) / math.sqrt(N)


def _chol(M, what):
    try:
        return cholesky(M)
    except np.linalg.LinAlgError:
        raise NotSPDError(f"{what} is not numerically positive definite; increase damping") from None


def _eye_like(X, n, batch=None):
    xp = xp_of(X)
    I = xp.eye(n, dtype=X.dtype)
    return I if batch is None else xp.broadcast_to(I, (batch, n, n))


def _solve_blocks(fac, X, p):
    """Solve the (18) block system from the batched Cholesky factors ``fac`` ``(s, p, p)``:
    two batched triangular solves on ``X`` ``(m, n)`` reshaped to ``(s, p, n)``."""
    xp = xp_of(fac, X)
    m = X.shape[0]
    Xb = _pad_rows(X, p, 0)
    Xb = Xb.reshape(fac.shape[0], p, X.shape[1])
    Y = xp.linalg.solve(fac, Xb)
    Z = xp.linalg.solve(fac.swapaxes(-1, -2), Y)
    return Z.reshape(-1, X.shape[1])[:m]


def project_ball(Y, radius, L=None):
    """Projection onto ``{X: ‖X‖_F ≤ radius}``.

    ``L is None``: Euclidean (``L = I``), ``Y·min(1, r/‖Y‖_F)``. Otherwise in the ``L``-norm
    ``‖Z‖²_L = tr(ZᵀLZ)`` (Lemma 6 of NG+): KKT ``L(X − Y) + μX = 0``, ``μ ≥ 0``, so
    ``X(μ) = (L + μI)^{-1} L Y``. With ``L = V diag(w) Vᵀ`` and ``Z = VᵀY``,
    ``‖X(μ)‖²_F = Σ_i (w_i/(w_i+μ))² ‖Z_{i,:}‖²`` decreases monotonically in μ; μ is the root
    of ``‖X(μ)‖_F = r`` in ``[0, w_max(‖Y‖_F/r − 1)]`` (at the right end every factor is
    ``≤ r/‖Y‖``), found by Brent's method to full precision. Returns ``(X, μ)``; a final
    rescale by ``min(1, r/‖X‖_F)`` removes rounding excursions outside the ball.
    """
    from scipy.optimize import brentq

    xp = xp_of(Y)
    nY = float(xp.linalg.norm(Y))
    if nY <= radius:
        return Y, 0.0
    if L is None:  # L = I: X = Y/(1 + μ), μ = ‖Y‖_F/r − 1
        return Y * (radius / nY), nY / radius - 1.0
    w, V = eigh(L)
    Z = V.T @ Y
    w_h = np.maximum(to_numpy(w).astype(F64), 0.0)
    z2 = to_numpy((Z * Z).sum(axis=1)).astype(F64)

    def phi(mu):
        return float(np.sum((w_h / (w_h + mu)) ** 2 * z2)) - radius**2

    hi = float(w_h.max()) * (nY / radius - 1.0)
    mu = hi if phi(hi) >= 0 else brentq(phi, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(F64).eps, maxiter=500)
    f = asarray_like(w_h / (w_h + mu), Y, dtype=Y.dtype)
    X = V @ (f[:, None] * Z)
    nX = float(xp.linalg.norm(X))
    if nX > radius:
        X = X * (radius / nX)
    return X, mu


def project_ball_dense(Y, radius, L):
    """Dense reference of the ``L``-norm projection: bisection on μ of ``‖X(μ)‖_F = r`` with
    ``X(μ) = (L + μI)^{-1} L Y`` by Cholesky solves (no eigendecomposition)."""
    nY = float(np.linalg.norm(Y))
    if nY <= radius:
        return Y, 0.0
    I = np.eye(L.shape[0])
    LY = L @ Y

    def X_of(mu):
        return spd_solve(L + mu * I, LY)

    lo, hi = 0.0, float(np.linalg.eigvalsh(L).max()) * (nY / radius - 1.0)
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if np.linalg.norm(X_of(mid)) > radius:
            lo = mid
        else:
            hi = mid
    X = X_of(hi)
    nX = float(np.linalg.norm(X))
    return (X * (radius / nX) if nX > radius else X), hi


def _host64(params, batch):
    """Host float64 copies of the parameters and the batch (the dense forms are references)."""
    from .base import Batch

    y = to_numpy(batch.y)
    return ([to_numpy(W).astype(F64) for W in params],
            Batch(to_numpy(batch.x).astype(F64), y.astype(F64) if y.dtype.kind == "f" else y, batch.loss))


def _dense_inputs(net, params, batch):
    """Float64 per-sample gradients (list of ``(N, out, d)``) from refcurv.curvature."""
    U = cv.per_sample_grads(net, params, batch.x, batch.y, batch.loss)
    return unflatten(U, net)


def _conv_T(net, x):
    """κ = T of each trainable layer (output locations of a Conv2d, 1 for Linear)."""
    shapes = net.feature_shapes(tuple(x.shape[1:]))
    out = []
    for k in net.trainable_index:
        s = shapes[k + 1]
        out.append(int(np.prod(s[1:])) if isinstance(net.layers[k], Conv2d) else 1)
    return out


# ------------------------------------------------------------------ NG+
@register
@dataclass(frozen=True)
class NGPlus(Method):
    """NG+ Algorithm 1 with (4)-(6) and the options of §2.3 and §3 (see the module docstring).

    Hyper-parameters (defaults): ``damping`` λ = 0.1 (6); ``side`` = "auto" (4)-(5);
    ``update_freq`` 𝒯 = 1; ``statistics`` = "batch" ("momentum" (11), "minibatch" (12));
    ``beta`` = 0.9 (11); ``mb_beta`` = 0.9, ``mb_gamma`` = 1.0, ``mb_lambda0`` = 0.0 (12);
    ``curvature`` = "exact" ("sketch": (17)); ``block_size`` = None (18);
    ``solver`` = "cholesky" ("smw" (14), "ls" (15), "sketch_ls" (16)); ``sketch_size`` q = 8
    for (16)/(17); ``variant`` = "paper" ("authors": design §8).
    """

    name = "ngplus"
    seed_ref = "002 (2), (4)-(6), Alg. 1, (11)-(12), (14)-(18)"
    summary = "NG+: damped GFIM L or R per layer, multi-step, SMW/LS/sketch/block variants"

    damping: float = 0.1
    side: str = "auto"
    update_freq: int = 1
    statistics: str = "batch"
    beta: float = 0.9
    mb_beta: float = 0.9
    mb_gamma: float = 1.0
    mb_lambda0: float = 0.0
    curvature: str = "exact"
    block_size: int | None = None
    solver: str = "cholesky"
    sketch_size: int = 8
    variant: str = "paper"

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_choice(self.side, "side", SIDES)
        check_int(self.update_freq, "update_freq")
        check_choice(self.statistics, "statistics", STATISTICS)
        check_unit(self.beta, "beta")
        check_unit(self.mb_beta, "mb_beta", closed_high=True)
        check_positive(self.mb_gamma, "mb_gamma")
        if isinstance(self.mb_lambda0, bool) or not np.isfinite(self.mb_lambda0) or self.mb_lambda0 < 0:
            raise HyperParameterError(f"mb_lambda0 must be a finite number >= 0, got {self.mb_lambda0!r}")
        check_choice(self.curvature, "curvature", CURVATURES)
        if self.block_size is not None:
            check_int(self.block_size, "block_size")
        check_choice(self.solver, "solver", SOLVERS)
        check_int(self.sketch_size, "sketch_size")
        check_choice(self.variant, "variant", VARIANTS)
        if self.variant == "authors" and self.side == "right":
            raise HyperParameterError("side='right' is not available with variant='authors' (left factor only)")
        if self.solver in LOWRANK:
            if self.statistics != "batch":
                raise HyperParameterError(
                    f"solver={self.solver!r} needs statistics='batch' (the low-rank U of (14) is one batch's)")
            if self.curvature != "exact":
                raise HyperParameterError(f"solver={self.solver!r} needs curvature='exact' ((17) builds L, not U)")
            if self.block_size is not None:
                raise HyperParameterError(f"solver={self.solver!r} cannot be combined with block_size (18)")
            if self.variant != "paper":
                raise HyperParameterError(f"solver={self.solver!r} needs variant='paper'")

    # -------------------------------------------------------------- bookkeeping
    @property
    def lam(self):
        """The damping added to the curvature: λ (paper (6)) or √λ (authors' code)."""
        return math.sqrt(self.damping) if self.variant == "authors" else self.damping

    def _side_arg(self):
        return "left" if self.variant == "authors" else self.side

    def init(self, net, params):
        n = len(net.param_shapes)
        return {"k": 0, "sides": layer_sides(net, self._side_arg()), "curv": [None] * n,
                "fac": [None] * n, "sketch": [None] * n}

    def refresh(self, state):
        """Whether step ``state["k"]`` rebuilds the curvature (``k mod 𝒯 = 0``, Algorithm 1)."""
        return state["k"] % self.update_freq == 0

    def draw(self, rng, state, net, params, batch):
        """Per layer the sketch of this step, drawn only at refresh steps: (17) over the long
        dimension (n for left, m for right) or (16) over U's rows (m for left, n for right),
        both NG+'s uniform row sampling with weights √(dim/q)."""
        if not self.refresh(state) or (self.curvature != "sketch" and self.solver != "sketch_ls"):
            return None
        out = []
        for (m, n), side in zip(net.param_shapes, state["sides"]):
            mo, no = (m, n) if side == "left" else (n, m)
            dim = no if self.curvature == "sketch" else mo
            out.append(SK.ngplus_sketch(dim, self.sketch_size, seed=rng))
        return out

    def _combine(self, prev, new):
        """Momentum (11) / mini-batch (12) accumulation on the stored representation."""
        if self.statistics == "batch":
            return new
        if self.statistics == "momentum":
            return new if prev is None else self.beta * prev + (1 - self.beta) * new
        if prev is None:  # (12): L̃_0 = λ₀ I (blockwise for (18))
            n = new.shape[-1]
            prev = self.mb_lambda0 * _eye_like(new, n, None if new.ndim == 2 else new.shape[0])
        return self.mb_beta * prev + self.mb_gamma * new

    def _factorize(self, curv, sk):
        lam = self.lam
        if self.solver == "cholesky":
            n = curv.shape[-1]
            return _chol(curv + lam * _eye_like(curv, n, None if curv.ndim == 2 else curv.shape[0]), "λI + L")
        U = curv
        xp = xp_of(U)
        r = U.shape[1]
        if self.solver == "smw":
            return _chol(lam * xp.eye(r, dtype=U.dtype) + U.T @ U, "λI + UᵀU")
        top = U if self.solver == "ls" else sk.apply(U)
        Q, R = xp.linalg.qr(xp.concatenate([top, math.sqrt(lam) * xp.eye(r, dtype=U.dtype)], axis=0))
        return Q[: top.shape[0]], R

    def _apply_inverse(self, curv, fac, sk, X):
        """``(λI + L)^{-1} X`` from the stored factorization (fast form)."""
        lam = self.lam
        if self.solver == "cholesky":
            if curv.ndim == 3:
                return _solve_blocks(fac, X, self.block_size)
            return cho_solve(fac, X)
        U = curv
        if self.solver == "smw":  # (14), corrected: λ^{-1}[X − U (λI + UᵀU)^{-1} UᵀX]
            return (X - U @ cho_solve(fac, U.T @ X)) / lam
        Q1, R = fac
        rhs = X if self.solver == "ls" else sk.apply(X)
        D = solve_triangular(R, Q1.T @ rhs, lower=False)  # (15) / (16): D ∈ R^{r×n}
        return (X - U @ D) / lam

    # -------------------------------------------------------------- fast form
    def _fast(self, state, net, params, batch, draws):
        A, G = net.factors(params, batch.x, batch.y, batch.loss)
        refresh = self.refresh(state)
        curvs, facs, sks, direction = [], [], [], []
        for j, (a, g, side) in enumerate(zip(A, G, state["sides"])):
            P, Q = _orient(side, g, a)
            N = P.shape[0]
            X = xp_of(P).einsum("nat,nbt->ab", P, Q) / N  # oriented mini-batch gradient 𝐆
            if refresh:
                sk = draws[j] if draws is not None else None
                if self.solver in LOWRANK:
                    curv = lowrank_factor(P, Q)
                else:
                    skp = sk if self.curvature == "sketch" else None
                    if self.statistics == "minibatch":
                        new = gram_of_matrix(X, skp, self.block_size)
                    else:
                        new = gram_from_factors(P, Q, skp, self.block_size)
                    if self.variant == "authors" and isinstance(net.layers_trainable[j], Conv2d):
                        new = new / math.sqrt(P.shape[2])
                    curv = self._combine(state["curv"][j], new)
                sk_keep = sk if self.solver == "sketch_ls" else None
                fac = self._factorize(curv, sk_keep)
            else:
                curv, sk_keep, fac = state["curv"][j], state["sketch"][j], state["fac"][j]
                if fac is None:
                    fac = self._factorize(curv, sk_keep)
            curvs.append(curv)
            facs.append(fac)
            sks.append(sk_keep)
            direction.append(-_o(side, self._apply_inverse(curv, fac, sk_keep, X)))
        new_state = {"k": state["k"] + 1, "sides": list(state["sides"]), "curv": curvs, "fac": facs, "sketch": sks}
        return direction, new_state

    # -------------------------------------------------------------- dense form
    def _dense(self, state, net, params, batch, draws):
        like = params[0]
        params, batch = _host64(params, batch)
        refresh = self.refresh(state)
        psg = _dense_inputs(net, params, batch)  # float64 (N, m, n) per layer
        sides = state["sides"]
        Ts = _conv_T(net, batch.x) if self.variant == "authors" else None
        if refresh and self.statistics != "minibatch" and self.curvature == "exact":
            gf = {s: cv.gfim(net, params, batch.x, batch.y, batch.loss, side=s) for s in set(sides)}
        curvs, sks, direction = [], [], []
        if refresh and self.solver in LOWRANK:
            A64, G64 = net.factors(params, batch.x, batch.y, batch.loss)
        for j, (u, side) in enumerate(zip(psg, sides)):
            g = _o(side, u)  # oriented per-sample gradients (N, m, n)
            X = g.mean(axis=0)
            m = X.shape[0]
            if refresh:
                sk = draws[j] if draws is not None else None
                # the matrix the paper defines, formed densely
                if self.statistics == "minibatch":
                    S = np.eye(X.shape[1]) if self.curvature == "exact" else sk.gram()
                    L = X @ S @ X.T  # (12): 𝐆𝐆ᵀ (sketched: 𝐆ΩΩᵀ𝐆ᵀ)
                elif self.curvature == "exact":
                    L = gf[side][j]  # (4)-(5) = refcurv.curvature.gfim
                else:
                    L = np.einsum("nab,bc,ndc->ad", g, sk.gram(), g) / g.shape[0]  # (17)
                if self.variant == "authors" and isinstance(net.layers_trainable[j], Conv2d):
                    L = L / math.sqrt(Ts[j])
                if self.block_size is not None:
                    L = L * block_mask(m, self.block_size)  # (18) as a dense matrix
                if self.solver in LOWRANK:
                    P, Q = _orient(side, G64[j], A64[j])
                    curv = lowrank_factor(P, Q)
                    Lfull = L
                else:
                    new = L if self.block_size is None else dense_to_blocks(L, self.block_size)
                    prev = state["curv"][j]
                    curv = self._combine(None if prev is None else to_numpy(prev).astype(F64), new)
                    Lfull = curv if self.block_size is None else blocks_to_dense(curv, m)
                sk_keep = sk if self.solver == "sketch_ls" else None
            else:
                curv, sk_keep = state["curv"][j], state["sketch"][j]
                C = to_numpy(curv).astype(F64)
                if self.solver in LOWRANK:
                    Lfull = C @ C.T
                else:
                    Lfull = C if C.ndim == 2 else blocks_to_dense(C, m)
            if self.solver == "sketch_ls":
                M = self.lam * np.eye(m) + Lfull @ sk_keep.gram()  # (16) = (λI + UUᵀΩᵀΩ)^{-1}
                Y = np.linalg.solve(M, X)
            else:
                M = self.lam * np.eye(m) + Lfull
                Y = spd_solve((M + M.T) / 2, X, name="λI + L")
            curvs.append(asarray_like(curv, like))
            sks.append(sk_keep)
            direction.append(asarray_like(-_o(side, Y), like))
        new_state = {"k": state["k"] + 1, "sides": list(sides), "curv": curvs, "fac": [None] * len(curvs),
                     "sketch": sks}
        return direction, new_state


# ------------------------------------------------------------------ online Newton (19)
@register
@dataclass(frozen=True)
class NGPlusOnlineNewton(Method):
    """NG+ online-Newton iteration (19), as the regret analysis (Lemmas 6-7) uses it::

        L_t = L_{t−1} + 𝐆_t 𝐆_tᵀ,   L_0 = εI,
        Θ_{t+1} = Π^{L_t}_K(Θ_t − α^{-1} L_t^{-1} 𝐆_t)

    per layer, ``𝐆_t`` the mini-batch gradient (``m × m`` L; the text's ``∇ψᵀ∇ψ`` is
    ``n × n`` and cannot multiply ``L_t^{-1}𝐆_t``, errata NG+-4), ``K = {‖Θ‖_F ≤ radius}``
    and ``Π^{L_t}`` the projection in the norm ``‖Z‖²_{L_t} = tr(ZᵀL_tZ)`` (Lemma 6's first
    inequality is the non-expansiveness of exactly this projection). ``projection=
    "euclidean"`` projects in the Frobenius norm instead (not covered by the proof).
    A "right" layer uses ``R_t = R_{t−1} + 𝐆_tᵀ𝐆_t`` and ``Θ − α^{-1}𝐆 R_t^{-1}``.

    The returned direction is ``Θ_{t+1} − Θ_t``: train with ``lr = 1`` to follow (19).

    Hyper-parameters (defaults): ``alpha`` = 1.0 (step 1/α; the exp-concavity α of
    Assumption 4), ``epsilon`` = 1.0 (``L_0 = εI``; Theorem 5 takes ``ε = 2/(α𝒟²)``),
    ``radius`` = 10.0, ``side`` = "auto", ``projection`` = "L".
    State: ``k``, ``sides``, ``L`` (per layer ``L_{t}``).
    Dense form: ``L_t`` from refcurv's float64 gradient, ``spd_solve``, and the projection by
    bisection with Cholesky solves (:func:`project_ball_dense`).
    """

    name = "ngplus_online_newton"
    seed_ref = "002 (19), Lemmas 6-7"
    summary = "NG+ online Newton: L_t = L_{t-1} + G Gᵀ, L_t-norm projection onto a Frobenius ball"

    alpha: float = 1.0
    epsilon: float = 1.0
    radius: float = 10.0
    side: str = "auto"
    projection: str = "L"

    def __post_init__(self):
        check_positive(self.alpha, "alpha")
        check_positive(self.epsilon, "epsilon")
        check_positive(self.radius, "radius")
        check_choice(self.side, "side", SIDES)
        check_choice(self.projection, "projection", PROJECTIONS)

    def init(self, net, params):
        sides = layer_sides(net, self.side)
        xp = xp_of(*params)
        Ls = []
        for W, (m, n), s in zip(params, net.param_shapes, sides):
            dt = W.dtype if getattr(W, "dtype", np.dtype(F64)).kind == "f" else F64
            Ls.append(self.epsilon * xp.eye(m if s == "left" else n, dtype=dt))  # L_0 = εI
        return {"k": 0, "sides": sides, "L": Ls}

    def _fast(self, state, net, params, batch, draws):
        A, G = net.factors(params, batch.x, batch.y, batch.loss)
        Ls, direction = [], []
        for W, a, g, side, Lp in zip(params, A, G, state["sides"], state["L"]):
            P, Q = _orient(side, g, a)
            xp = xp_of(P)
            X = xp.einsum("nat,nbt->ab", P, Q) / P.shape[0]
            L = Lp + X @ X.T
            Y = _o(side, W) - cho_solve(_chol(L, "L_t"), X) / self.alpha
            Z, _ = project_ball(Y, self.radius, L if self.projection == "L" else None)
            Ls.append(L)
            direction.append(_o(side, Z) - W)
        return direction, {"k": state["k"] + 1, "sides": list(state["sides"]), "L": Ls}

    def _dense(self, state, net, params, batch, draws):
        like = params[0]
        params, batch = _host64(params, batch)
        psg = _dense_inputs(net, params, batch)
        Ls, direction = [], []
        for W, u, side, Lp in zip(params, psg, state["sides"], state["L"]):
            X = _o(side, u.mean(axis=0))
            L = to_numpy(Lp).astype(F64) + X @ X.T
            Y = _o(side, W) - spd_solve(L, X, name="L_t") / self.alpha
            if self.projection == "L":
                Z, _ = project_ball_dense(Y, self.radius, L)
            else:
                nY = np.linalg.norm(Y)
                Z = Y if nY <= self.radius else Y * (self.radius / nY)
            Ls.append(asarray_like(L, like))
            direction.append(asarray_like(_o(side, Z) - W, like))
        return direction, {"k": state["k"] + 1, "sides": list(state["sides"]), "L": Ls}
