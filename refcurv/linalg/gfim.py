"""Generalized Fisher (GFIM) kernels of NG+ ([NG+], Yang, Xu, Cui, Wen, Xu), public for users.

Equation numbers refer to ``shared/seeds/002_6132dcc897dbc987.txt``. One layer's weight
``Θ ∈ R^{m×n}`` is refcurv's ``(out, d)`` matrix (bias last column). Per-sample gradients
are ``𝒢_i = G_i A_iᵀ`` (8) with ``G_i ∈ R^{m×κ}``, ``A_i ∈ R^{n×κ}`` (:meth:`Sequential.factors
<refcurv.nn.Sequential.factors>`; κ = 1 for Linear, the output locations for Conv2d).

Every kernel is written for the *left* side, ``L = (1/N) Σ 𝒢_i𝒢_iᵀ`` (4): the right side (5),
``R = (1/N) Σ 𝒢_iᵀ𝒢_i``, is the left side of the transposed problem ``𝒢_iᵀ = A_i G_iᵀ``
(:func:`orient`, :func:`oriented_factors`). In the kernels ``P_i Q_iᵀ`` is the oriented
per-sample gradient (``P = G, Q = A`` for left, ``P = A, Q = G`` for right).

=============================  ================================================================
:func:`gram_from_factors`      ``(1/N) Σ P_i Q_iᵀ Ω ᵀΩ Q_i P_iᵀ``: (4)/(5); (17) with a sketch;
                               (18) blocks with ``block_size``
:func:`gram_of_matrix`         ``X ΩᵀΩ Xᵀ``: the (12) term ``𝐆𝐆ᵀ`` (sketched, blocked)
:func:`momentum_11`            ``L̄_k = β L̄_{k−1} + (1−β) L_k``, ``L̄_0 = L_0`` (11)
:func:`minibatch_12`           ``L̃_k = β L̃_{k−1} + γ 𝐆𝐆ᵀ``, ``L̃_0 = λ₀ I`` (12)
:func:`block_mask`,            the (18) block-diagonal pattern and its ``(s, p, p)`` storage
:func:`blocks_to_dense`,
:func:`dense_to_blocks`
:func:`lowrank_factor`         ``U`` with ``UUᵀ = L`` (14)
:func:`cholesky_factor`,       ``(λI + L)⁻¹X`` by Cholesky, full or (18) blocks (6)
:func:`cholesky_solve`
:func:`smw_factor`,            ``(λI + UUᵀ)⁻¹X = λ⁻¹[X − U(λI + UᵀU)⁻¹UᵀX]`` (14), corrected
:func:`smw_solve`              (errata NG+-2)
:func:`ls_factor`,             ``(X − U D*)/λ`` with ``D*`` the regularized LS solution (15), or
:func:`ls_solve`               of the sketched LS (16) (errata NG+-3)
:func:`damped_operator`        ``λI + L`` (``λI + R``) as a Kronecker operator on ``vec(Θ)``
:func:`project_ball`,          the ``L``-norm projection onto ``{‖X‖_F ≤ r}`` of (19) / Lemma 6
:func:`project_ball_dense`     (errata NG+-6)
=============================  ================================================================

Sketches ``Ω ∈ R^{q×dim}`` are refcurv's row sketches (:mod:`refcurv.linalg.sketch`): for (17)
``Ω`` is the transpose of the paper's ``n×q`` matrix (``𝒢Ω_paper = 𝒢Ωᵀ``); for (16) it is the
paper's ``q×m`` matrix. :func:`as_sketch` turns a sketch *matrix* (as carried by
:class:`refcurv.methods.Draws`) into a kernel object without changing a single entry.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import asarray_like, cho_solve, cholesky, eigh, solve_triangular, to_numpy, xp_of
from ..errors import ArgumentTypeError, HyperParameterError, NotSPDError, ShapeError
from . import _checks as C
from .gemm import outer_sum as _outer_sum
from .sketch import GaussianSketch, RowSketch
from .woodbury import spd_solve

__all__ = [
    "sides", "orient", "oriented_factors", "mean_gradient", "as_sketch", "sketch_rows",
    "gram_from_factors", "gram_of_matrix", "momentum_11", "minibatch_12", "block_mask",
    "blocks_to_dense", "dense_to_blocks", "lowrank_factor", "cholesky_factor", "cholesky_solve",
    "smw_factor", "smw_solve", "ls_factor", "ls_solve", "damped_operator", "project_ball", "project_ball_dense",
]

F64 = np.float64


# ------------------------------------------------------------------ argument checks
def _side(side, allowed=("left", "right")):
    return C.choice(side, "side", allowed)


def _factors(P, Q):
    """Oriented factors ``P`` ``(N, m, κ)``, ``Q`` ``(N, n, κ)`` (same ``N``, ``κ``)."""
    P = C.array(P, "P", 3, what="(N, m, κ) factors")
    Q = C.array(Q, "Q", 3, what="(N, n, κ) factors")
    if P.shape[0] != Q.shape[0] or P.shape[2] != Q.shape[2]:
        raise ShapeError(f"P (N, m, κ) and Q (N, n, κ) must share N and κ, got {P.shape} and {Q.shape}")
    return P, Q


def _sketch(sk, n, name="sketch"):
    """``None`` or a sketch object over ``n`` rows."""
    if sk is None:
        return None
    if not isinstance(sk, (RowSketch, GaussianSketch)):
        raise ArgumentTypeError(f"{name} must be a RowSketch or GaussianSketch (see as_sketch), got {type(sk).__name__}")
    if sk.n != n:
        raise ShapeError(f"{name} must sketch {n} rows, got a sketch of {sk.n}")
    return sk


def _block_size(p):
    return None if p is None else C.integer(p, "block_size", minimum=1)


def _unit_closed(value, name):
    v = C.real(value, name, "a finite number in [0, 1]")
    if not 0 <= v <= 1:
        raise HyperParameterError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def _gram(L, name="L"):
    """A square matrix ``(m, m)`` or (18) blocks ``(s, p, p)``."""
    L = C.finite(L, name)
    if L.ndim not in (2, 3) or L.shape[-1] != L.shape[-2]:
        raise ShapeError(f"{name} must be (m, m) or (18) blocks (s, p, p), got shape {L.shape}")
    return L


# ------------------------------------------------------------------ orientation (4)-(5)
def sides(shapes, side="auto"):
    """Per layer ``"left"``/``"right"``: NG+ (4)-(5) by shape for ``"auto"``
    (:func:`refcurv.curvature.gfim_side`: left iff ``m ≤ n``), else forced."""
    from ..curvature import gfim_side

    _side(side, ("auto", "left", "right"))
    if not isinstance(shapes, (list, tuple)):
        raise ArgumentTypeError(f"shapes must be a list of (m, n) layer shapes, got {type(shapes).__name__}")
    for j, sh in enumerate(shapes):
        if not isinstance(sh, (list, tuple)) or len(sh) != 2:
            raise ShapeError(f"shapes[{j}] must be an (m, n) pair, got {C._given(sh)}")
        for d in sh:
            C.integer(d, f"shapes[{j}]", minimum=1)
    return [gfim_side(s) if side == "auto" else side for s in shapes]


def orient(side, X):
    """A layer matrix (or a stack ``(…, m, n)``) seen from its side: itself for ``"left"``, its
    transpose for ``"right"`` (so that ``R`` of ``X`` is ``L`` of ``Xᵀ``). Its own inverse."""
    _side(side)
    X = C.finite(X, "X")
    if X.ndim < 2:
        raise ShapeError(f"X must be a matrix or a stack (…, m, n), got shape {X.shape}")
    return X if side == "left" else X.swapaxes(-1, -2)


def oriented_factors(side, G, A):
    """``(P, Q)`` with ``P_i Q_iᵀ = 𝒢_i`` (left) or ``𝒢_iᵀ`` (right), from (8)'s ``G``, ``A``."""
    _side(side)
    G = C.array(G, "G", 3, what="(N, m, κ) factors")
    A = C.array(A, "A", 3, what="(N, n, κ) factors")
    if G.shape[0] != A.shape[0] or G.shape[2] != A.shape[2]:
        raise ShapeError(f"G (N, m, κ) and A (N, n, κ) must share N and κ, got {G.shape} and {A.shape}")
    return (G, A) if side == "left" else (A, G)


def mean_gradient(P, Q):
    """The oriented mini-batch gradient ``𝐆 = (1/N) Σ P_i Q_iᵀ`` (6)."""
    P, Q = _factors(P, Q)
    return C.result(_outer_sum(P, Q) / P.shape[0], "the mean gradient")


# ------------------------------------------------------------------ sketches (16), (17)
def as_sketch(Omega):  # host: sketches are host objects
    """A sketch *matrix* ``Ω ∈ R^{q×dim}`` as a kernel object, entry for entry: a
    :class:`~refcurv.linalg.sketch.RowSketch` when every row has exactly one nonzero (NG+'s
    row sampling (17): applied by indexing, no extra cost), else a dense sketch. ``None``
    stays ``None``."""
    if Omega is None:
        return None
    O = np.asarray(to_numpy(C.matrix(Omega, "Omega", "a sketch matrix (q, dim)")))
    nz = O != 0
    if bool((nz.sum(axis=1) == 1).all()):
        idx = nz.argmax(axis=1)
        return RowSketch(n=O.shape[1], index=idx.astype(np.int64), weight=O[np.arange(O.shape[0]), idx])
    return GaussianSketch(omega=O)


def sketch_rows(Q, sk):
    """``Ω Q_i`` for every sample: ``Q`` ``(N, dim, κ)`` → ``(N, q, κ)``."""
    Q = C.array(Q, "Q", 3, what="(N, dim, κ) factors")
    if sk is None:
        raise ArgumentTypeError("sk must be a RowSketch or GaussianSketch, got None")
    sk = _sketch(sk, Q.shape[1], "sk")
    if isinstance(sk, RowSketch):  # row sampling: pick and weight rows
        idx = asarray_like(sk.index, Q)
        w = asarray_like(sk.weight, Q, dtype=Q.dtype)
        return Q[:, idx, :] * w[None, :, None]
    O = asarray_like(sk.to_dense(), Q, dtype=Q.dtype)
    return C.result(O @ Q, "Ω Q_i")


# ------------------------------------------------------------------ statistics (4), (12), (17), (18)
def _pad_rows(X, p, axis):
    """Zero-pad ``axis`` up to a multiple of ``p``."""
    xp = xp_of(X)
    extra = (-X.shape[axis]) % p
    if extra == 0:
        return X
    widths = [(0, 0)] * X.ndim
    widths[axis] = (0, extra)
    return xp.pad(X, widths)


def gram_from_factors(P, Q, sketch=None, block_size=None):
    """NG+ (4) ``L = (1/N) Σ_i 𝒢_i𝒢_iᵀ`` from the factors ``P`` ``(N, m, κ)``, ``Q``
    ``(N, n, κ)`` of ``𝒢_i = P_i Q_iᵀ`` via the ``κ × κ`` Grams ``K_i = Q_iᵀQ_i`` (never forming
    ``𝒢_i``); with ``sketch`` the sketched products (17), ``(𝒢_iΩᵀ)(𝒢_iΩᵀ)ᵀ`` (``Ω`` over the
    long dimension n, applied to the rows of ``Q_i``); with ``block_size`` p only the (18)
    diagonal blocks, as ``(s, p, p)``, ``s = ⌈m/p⌉`` (the last block zero-padded)."""
    P, Q = _factors(P, Q)
    sketch = _sketch(sketch, Q.shape[1])
    block_size = _block_size(block_size)
    xp = xp_of(P, Q)
    if sketch is not None:
        Q = sketch_rows(Q, sketch)
    K = xp.swapaxes(Q, 1, 2) @ Q  # batched GEMM
    N = P.shape[0]
    if block_size is None:
        return C.result(xp.einsum("nat,nts,nbs->ab", P, K, P, optimize=True) / N, "the GFIM L")
    Pp = _pad_rows(P, block_size, 1)
    Pb = Pp.reshape(N, Pp.shape[1] // block_size, block_size, P.shape[2])
    return C.result(xp.einsum("nkat,nts,nkbs->kab", Pb, K, Pb, optimize=True) / N, "the GFIM blocks of L")


def gram_of_matrix(X, sketch=None, block_size=None):
    """The (12) term ``𝐆𝐆ᵀ`` of a matrix ``X`` (``X ΩᵀΩ Xᵀ`` sketched by (17)), full or as
    (18) blocks ``(s, p, p)``."""
    X = C.matrix(X, "X")
    sketch = _sketch(sketch, X.shape[1])
    block_size = _block_size(block_size)
    xp = xp_of(X)
    if sketch is not None:
        X = sketch.apply_right(X)
    if block_size is None:
        return C.result(X @ X.T, "𝐆𝐆ᵀ")
    Xb = _pad_rows(X, block_size, 0)
    Xb = Xb.reshape(Xb.shape[0] // block_size, block_size, X.shape[1])
    return C.result(Xb @ xp.swapaxes(Xb, 1, 2), "the blocks of 𝐆𝐆ᵀ")


def _eye_like(X, n, batch=None):
    xp = xp_of(X)
    I = xp.eye(n, dtype=X.dtype)
    return I if batch is None else xp.broadcast_to(I, (batch, n, n))


def momentum_11(prev, new, beta):
    """NG+ (11) with its bars restored (errata NG+-1): ``L̄_k = β L̄_{k−1} + (1−β) L_k``,
    ``L̄_0 = L_0`` (``prev is None``). Works on full matrices and on (18) blocks alike;
    ``β ∈ [0, 1]``."""
    new = _gram(new, "new")
    _unit_closed(beta, "beta")
    if prev is None:
        return new
    prev = C.finite(prev, "prev")
    if prev.shape != new.shape:
        raise ShapeError(f"prev must have the shape of new {new.shape}, got {prev.shape}")
    return C.result(beta * prev + (1 - beta) * new, "L̄_k of (11)")


def minibatch_12(prev, new, beta, weight, init):
    """NG+ (12): ``L̃_k = β L̃_{k−1} + γ 𝐆_k𝐆_kᵀ`` with ``L̃_{−1} = λ₀ I`` (``prev is None``;
    blockwise ``λ₀ I`` for (18) blocks), ``γ = weight``, ``λ₀ = init``; ``β ∈ [0, 1]``,
    ``γ, λ₀ ≥ 0``."""
    new = _gram(new, "new")
    _unit_closed(beta, "beta")
    C.nonnegative(weight, "weight")
    C.nonnegative(init, "init")
    if prev is None:
        n = new.shape[-1]
        prev = init * _eye_like(new, n, None if new.ndim == 2 else new.shape[0])
    else:
        prev = C.finite(prev, "prev")
        if prev.shape != new.shape:
            raise ShapeError(f"prev must have the shape of new {new.shape}, got {prev.shape}")
    return C.result(beta * prev + weight * new, "L̃_k of (12)")


def block_mask(m, p):  # host: a host index mask
    """0/1 mask of the (18) block-diagonal pattern on ``m × m`` (blocks of size p, the last
    one of size ``m − (s−1)p``)."""
    m, p = C.integer(m, "m", minimum=1), C.integer(p, "p", minimum=1)
    b = np.arange(m) // p
    return (b[:, None] == b[None, :]).astype(F64)


def blocks_to_dense(B, m):
    """``(s, p, p)`` diagonal blocks → the ``m × m`` block-diagonal matrix (padding trimmed),
    ``1 ≤ m ≤ s·p``."""
    B = C.array(B, "B", 3, what="(s, p, p) blocks")
    if B.shape[1] != B.shape[2]:
        raise ShapeError(f"B must be (s, p, p) blocks, got shape {B.shape}")
    m = C.integer(m, "m", minimum=1)
    if m > B.shape[0] * B.shape[1]:
        raise ShapeError(f"m must be ≤ s·p = {B.shape[0] * B.shape[1]} for blocks {B.shape}, got {m}")
    xp = xp_of(B)
    s, p, _ = B.shape
    D = xp.zeros((s, p, s, p), dtype=B.dtype)
    ar = xp.arange(s)
    D[ar, :, ar, :] = B
    return D.reshape(s * p, s * p)[:m, :m]


def dense_to_blocks(M, p):
    """The ``(s, p, p)`` diagonal blocks of an ``m × m`` matrix (zero-padded to ``s·p``)."""
    M = C.square(M, "M")
    p = C.integer(p, "p", minimum=1)
    Mp = _pad_rows(_pad_rows(M, p, 0), p, 1)
    s = Mp.shape[0] // p
    M4 = Mp.reshape(s, p, s, p)
    ar = xp_of(M).arange(s)
    return M4[ar, :, ar, :].copy()


# ------------------------------------------------------------------ low rank (14)
def lowrank_factor(P, Q):
    """``U ∈ R^{m × Nκ}`` with ``UUᵀ = (1/N) Σ_i P_i Q_iᵀ Q_i P_iᵀ`` (NG+ (14)).

    κ = 1 (fully connected): column ``i`` is ``√(c_i/N) g_i`` with ``c_i = a_iᵀa_i`` — (14)'s
    ``U_k``. κ > 1: columns ``N^{-1/2} P_i K_i^{1/2}``, ``K_i = Q_iᵀQ_i`` (batched ``eigh``)."""
    P, Q = _factors(P, Q)
    xp = xp_of(P, Q)
    N, m, T = P.shape
    if T == 1:
        c = (Q[:, :, 0] ** 2).sum(axis=1)
        return C.result((P[:, :, 0] * xp.sqrt(c)[:, None]).T / math.sqrt(N), "the low-rank factor U")
    K = xp.swapaxes(Q, 1, 2) @ Q  # batched GEMM
    w, V = eigh(K)
    root = (V * xp.sqrt(xp.maximum(w, 0))[:, None, :]) @ V.swapaxes(-1, -2)
    PR = P @ root  # (N, m, T)
    return C.result(xp.moveaxis(PR, 0, 1).reshape(m, N * T) / math.sqrt(N), "the low-rank factor U")


# ------------------------------------------------------------------ solves (6), (14)-(16), (18)
def _chol(M, what):
    M = C.finite(M, what)  # overflow of the finite inputs (NonFiniteError naming the matrix)
    try:
        return cholesky(M)
    except np.linalg.LinAlgError:
        raise NotSPDError(f"{what} is not numerically positive definite; increase damping") from None


def cholesky_factor(L, lam):
    """Lower Cholesky factor of ``λI + L`` (6): ``L`` ``m × m``, or the (18) blocks ``(s, p, p)``
    (one batched factorization, no loop over blocks); ``λ ≥ 0``."""
    L = _gram(L)
    C.nonnegative(lam, "lam")
    n = L.shape[-1]
    return _chol(L + lam * _eye_like(L, n, None if L.ndim == 2 else L.shape[0]), "λI + L")


def cholesky_solve(fac, X):
    """``(λI + L)⁻¹ X`` from :func:`cholesky_factor`. For (18) blocks ``fac`` ``(s, p, p)``:
    ``X`` ``(m, n)`` is zero-padded to ``(s, p, n)`` and solved by two batched triangular
    solves; the padded part of ``λI + L`` is ``λI``, decoupled, so its solution is exactly 0."""
    fac = _gram(fac, "fac")
    if fac.ndim == 2:
        X = C.rows_match(X, fac.shape[0], "X")
        return C.result(cho_solve(fac, X), "(λI + L)⁻¹X")
    X = C.matrix(X, "X", "an (m, n) matrix")
    if X.shape[0] > fac.shape[0] * fac.shape[1]:
        raise ShapeError(f"X must have at most s·p = {fac.shape[0] * fac.shape[1]} rows, got {X.shape}")
    xp = xp_of(fac, X)
    m, p = X.shape[0], fac.shape[-1]
    Xb = _pad_rows(X, p, 0).reshape(fac.shape[0], p, X.shape[1])
    try:
        Y = xp.linalg.solve(fac, Xb)
        Z = xp.linalg.solve(fac.swapaxes(-1, -2), Y)
    except np.linalg.LinAlgError:
        raise NotSPDError("fac is singular: not a Cholesky factor from cholesky_factor") from None
    return C.result(Z.reshape(-1, X.shape[1])[:m], "(λI + L)⁻¹X")


def smw_factor(U, lam):
    """Cholesky factor of the capacitance ``λI + UᵀU`` (``r × r``) of (14); ``λ > 0``."""
    U = C.matrix(U, "U", "an (m, r) matrix")
    C.positive(lam, "lam")
    return _chol(lam * xp_of(U).eye(U.shape[1], dtype=U.dtype) + U.T @ U, "λI + UᵀU")


def smw_solve(U, fac, lam, X):
    """NG+ (14), corrected (errata NG+-2): ``(λI + UUᵀ)⁻¹X = λ⁻¹[X − U(λI + UᵀU)⁻¹UᵀX]``."""
    U = C.matrix(U, "U", "an (m, r) matrix")
    fac = C.square(fac, "fac")
    if fac.shape[0] != U.shape[1]:
        raise ShapeError(f"fac must be ({U.shape[1]}, {U.shape[1]}) (from smw_factor(U, lam)), got {fac.shape}")
    C.positive(lam, "lam")
    X = C.rows_match(X, U.shape[0], "X")
    return C.result((X - U @ cho_solve(fac, U.T @ X)) / lam, "(λI + UUᵀ)⁻¹X")


def ls_factor(U, lam, sketch=None):
    """``(Q₁, R)``: thin QR of ``[ΩU; √λ I]`` (``Ω = I`` without ``sketch``), ``Q₁`` its top
    block: the factorization of the regularized LS (15) / sketched LS (16); ``λ > 0``."""
    U = C.matrix(U, "U", "an (m, r) matrix")
    C.positive(lam, "lam")
    sketch = _sketch(sketch, U.shape[0])
    xp = xp_of(U)
    r = U.shape[1]
    top = U if sketch is None else sketch.apply(U)
    Q, R = xp.linalg.qr(xp.concatenate([top, math.sqrt(lam) * xp.eye(r, dtype=U.dtype)], axis=0))
    return C.result((Q[: top.shape[0]], R), "the LS factorization (Q₁, R)")


def ls_solve(U, fac, lam, X, sketch=None):
    """NG+ (15) / (16) with the dimensions corrected (errata NG+-3):
    ``D* = argmin_{D ∈ R^{r×n}} ‖Ω(U D − X)‖² + λ‖D‖²`` from :func:`ls_factor`; returns the
    direction's solve ``(X − U D*)/λ`` = ``(λI + UUᵀ)⁻¹X`` for (15) and
    ``(λI + UUᵀΩᵀΩ)⁻¹X`` (push-through) for (16)."""
    U = C.matrix(U, "U", "an (m, r) matrix")
    if not isinstance(fac, (tuple, list)) or len(fac) != 2:
        raise ArgumentTypeError(f"fac must be the pair (Q₁, R) from ls_factor, got {C._given(fac)}")
    Q1, R = C.matrix(fac[0], "fac[0] (Q₁)"), C.square(fac[1], "fac[1] (R)")
    sketch = _sketch(sketch, U.shape[0])
    q = U.shape[0] if sketch is None else sketch.q
    if R.shape[0] != U.shape[1] or Q1.shape != (q, U.shape[1]):
        raise ShapeError(f"fac must be (Q₁ {(q, U.shape[1])}, R {(U.shape[1],) * 2}) from ls_factor(U, lam, sketch), "
                         f"got {Q1.shape} and {R.shape}")
    C.positive(lam, "lam")
    X = C.rows_match(X, U.shape[0], "X")
    rhs = X if sketch is None else sketch.apply(X)
    D = solve_triangular(R, Q1.T @ rhs, lower=False)  # D ∈ R^{r×n}
    return C.result((X - U @ D) / lam, "(λI + UUᵀ)⁻¹X")


# ------------------------------------------------------------------ curvature operator (6), (18)
def damped_operator(side, shape, L, lam):
    """The damped GFIM side of one layer as a :mod:`refcurv.operators` operator on refcurv's
    row-major ``vec(Θ)`` (``Θ`` of shape ``shape = (m, n)``, the ``(out, d)`` weight with the
    bias as its last column), such that NG+'s direction (6) is ``−C⁻¹ vec(𝐆)``:

    * left: ``(λI + L) Θ`` is ``Kronecker(λI + L, I_n)``;
    * right: ``Θ (λI + R)`` is ``Kronecker(I_m, λI + R)`` (``L`` given oriented, i.e. ``R``);
    * (18) blocks ``(s, p, p)``: a :class:`~refcurv.operators.BlockDiagonal` of
      ``Kronecker(λI + L_b, I_n)`` over the row bands of ``Θ`` (left; contiguous in ``vec``)
      or ``Kronecker(I_m, λI + R_b)`` over its column bands (right; strided), each block
      trimmed to its true size (the zero padding of the last block dropped).

    ``lam = 0`` gives ``L`` itself (the online-Newton ``L_t`` of (19)). The factors are
    symmetrized (``(M + Mᵀ)/2``: rounding only) for the operators' symmetry check."""
    from ..operators import BlockDiagonal, Kronecker

    _side(side)
    if not isinstance(shape, (list, tuple)) or len(shape) != 2:
        raise ShapeError(f"shape must be the layer's (m, n), got {C._given(shape)}")
    m, n = (C.integer(d, "shape", minimum=1) for d in shape)
    L = _gram(L)
    C.nonnegative(lam, "lam")
    dim = m if side == "left" else n
    if (L.ndim == 2 and L.shape[0] != dim) or (L.ndim == 3 and L.shape[0] * L.shape[1] < dim):
        raise ShapeError(f"L must be ({dim}, {dim}) or blocks covering {dim} rows for side {side!r} and shape "
                         f"{(m, n)}, got {L.shape}")
    xp = xp_of(L)

    def damped(M):
        M = (M + M.T) / 2
        return M + lam * xp.eye(M.shape[0], dtype=M.dtype) if lam else M

    def op(M):
        return Kronecker(damped(M), xp.eye(n, dtype=M.dtype)) if side == "left" \
            else Kronecker(xp.eye(m, dtype=M.dtype), damped(M))

    if L.ndim == 2:
        return op(L)
    p = L.shape[-1]
    dim = m if side == "left" else n
    blocks, index = [], []
    for b in range(L.shape[0]):  # s blocks: a loop over operator objects, not over samples
        lo, hi = b * p, min((b + 1) * p, dim)
        blocks.append(op(L[b, : hi - lo, : hi - lo]))
        if side == "left":  # rows lo..hi of Θ
            index.append((np.arange(lo, hi)[:, None] * n + np.arange(n)[None, :]).ravel())  # host: index metadata
        else:  # columns lo..hi of Θ, row-major over (row, column)
            index.append((np.arange(m)[:, None] * n + np.arange(lo, hi)[None, :]).ravel())  # host: index metadata
    return BlockDiagonal(blocks, index)


# ------------------------------------------------------------------ projection (19), Lemma 6
def _ball_args(Y, radius, L):
    Y = C.finite(Y, "Y")
    if Y.ndim not in (1, 2):
        raise ShapeError(f"Y must be an (m,) vector or (m, n) matrix, got shape {Y.shape}")
    C.positive(radius, "radius")
    if L is not None:
        L = C.symmetric(L, "L")
        if L.shape[0] != Y.shape[0]:
            raise ShapeError(f"L must be ({Y.shape[0]}, {Y.shape[0]}) to match Y, got {L.shape}")
    return Y, L


def project_ball(Y, radius, L=None):
    """Projection onto ``{X: ‖X‖_F ≤ radius}`` (NG+ (19); errata NG+-6).

    ``L is None``: Euclidean (``L = I``), ``Y·min(1, r/‖Y‖_F)``. Otherwise in the ``L``-norm
    ``‖Z‖²_L = tr(ZᵀLZ)`` (Lemma 6 of NG+): KKT ``L(X − Y) + μX = 0``, ``μ ≥ 0``, so
    ``X(μ) = (L + μI)^{-1} L Y``. With ``L = V diag(w) Vᵀ`` and ``Z = VᵀY``,
    ``‖X(μ)‖²_F = Σ_i (w_i/(w_i+μ))² ‖Z_{i,:}‖²`` decreases monotonically in μ; μ is the root
    of ``‖X(μ)‖_F = r`` in ``[0, w_max(‖Y‖_F/r − 1)]`` (at the right end every factor is
    ``≤ r/‖Y‖``), found by Brent's method to full precision. Returns ``(X, μ)``; a final
    rescale by ``min(1, r/‖X‖_F)`` removes rounding excursions outside the ball.
    ``radius > 0``; ``L`` symmetric PSD ``(m, m)`` for ``Y`` ``(m, n)``.
    """
    from scipy.optimize import brentq

    Y, L = _ball_args(Y, radius, L)
    xp = xp_of(Y)
    nY = float(C.result(xp.linalg.norm(Y), "‖Y‖_F"))
    if nY <= radius:
        return Y, 0.0
    if L is None:  # L = I: X = Y/(1 + μ), μ = ‖Y‖_F/r − 1
        return Y * (radius / nY), nY / radius - 1.0
    w, V = eigh(L)
    Z = V.T @ Y
    # μ is the root of a scalar equation (SciPy's brentq, no CuPy counterpart): the m
    # eigenvalues and row norms go to the host for it; X is formed on Y's backend below
    w_h = np.maximum(to_numpy(w).astype(F64), 0.0)  # host: the scalar root find of μ
    z2 = to_numpy((Z * Z).sum(axis=1)).astype(F64)

    def ratio(mu):  # host: w/(w + μ) on the host vector w_h, 0 on the null space of L (also at μ = 0: X = L⁺L Y there)
        return np.divide(w_h, w_h + mu, out=np.zeros_like(w_h), where=w_h > 0)

    def phi(mu):  # host: the scalar equation ‖X(μ)‖² − r² for brentq
        return float(np.sum(ratio(mu) ** 2 * z2)) - radius**2

    hi = float(w_h.max()) * (nY / radius - 1.0)
    mu = hi if phi(hi) >= 0 else brentq(phi, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(F64).eps, maxiter=500)
    f = asarray_like(ratio(mu), Y, dtype=Y.dtype)
    X = V @ (f[:, None] * Z)
    nX = float(xp.linalg.norm(X))
    if nX > radius:
        X = X * (radius / nX)
    return X, mu


def project_ball_dense(Y, radius, L):  # host: float64 reference on the host
    """Dense reference of the ``L``-norm projection (:func:`project_ball`): bisection on μ of
    ``‖X(μ)‖_F = r`` with ``X(μ) = (L + μI)^{-1} L Y`` by Cholesky solves (no
    eigendecomposition). Host float64."""
    if L is None:
        raise ArgumentTypeError("L must be an (m, m) matrix, got None (use project_ball for L = I)")
    Y, L = _ball_args(Y, radius, L)
    nY = float(C.result(np.linalg.norm(Y), "‖Y‖_F"))
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
