"""BFGS / Broyden-family updates and L-BFGS (two-loop, dense recursion, compact form).

[Ren-thesis] Ch.2 (2.6), (2.11); Ch.3 (3.11), (3.16); Nocedal & Wright Alg. 7.4 (two-loop);
Byrd, Nocedal & Schnabel (1994) compact representation (the "non-loop" L-BFGS of
thesis §2.3 / §3.4.3).

L-BFGS memories are arrays ``S, Y ∈ R^{p×n}`` with rows ``s_1 … s_p`` oldest first, and
the initial matrix ``H_0 = γ I``; an empty memory (``p = 0``, shape ``(0, n)``) is allowed.

Preconditions: the curvature pairs' ``sᵀy > 0`` is checked (O(n), it decides whether the
update stays positive definite). That ``H`` (``B``) passed to the BFGS/Broyden updates is
symmetric positive definite is the **caller's duty**: the updates cost O(n²) and a check
would cost an O(n³) Cholesky each, while ``H`` is SPD by construction wherever it comes from
a previous update with ``sᵀy > 0`` (or from ``γI``). With ``REFCURV_DEBUG=1`` (debug mode,
:data:`refcurv.linalg._checks.DEBUG`) it is checked and a violation raises
:class:`~refcurv.errors.NotSPDError`; ``H`` is always checked to be a finite square matrix.
"""
from __future__ import annotations

from ..backend import solve_triangular, xp_of
from ..errors import NotSPDError, ShapeError
from . import _checks as C


def _pair(s, y, n=None):
    s = C.vector(s, "s", n)
    y = C.vector(y, "y", s.shape[0])
    sy = float(s @ y)
    if not sy > 0:
        raise NotSPDError(f"curvature pair has sᵀy = {sy:.3e} ≤ 0: the update would not stay positive definite")
    return s, y, sy


def bfgs_update_H(H, s, y):
    """Inverse BFGS (2.6)/(3.11): ``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ``, ``ρ = 1/sᵀy``.
    Satisfies the secant condition ``H⁺ y = s``; keeps ``H`` SPD when ``sᵀy > 0``."""
    H = C.debug_spd(C.square(H, "H"), "H")
    s, y, sy = _pair(s, y, H.shape[0])
    xp = xp_of(H)
    rho = 1.0 / sy
    Hy = H @ y
    # expanded form of (I − ρsyᵀ)H(I − ρysᵀ) for symmetric H
    return C.result(H - rho * (xp.outer(s, Hy) + xp.outer(Hy, s)) + (rho * rho * float(y @ Hy) + rho) * xp.outer(s, s),
                    "the BFGS update H⁺")


def bfgs_update_B(B, s, y):
    """Direct BFGS (2.6): ``B⁺ = B − B s sᵀ B / sᵀBs + ρ y yᵀ``. Satisfies ``B⁺ s = y``."""
    B = C.debug_spd(C.square(B, "B"), "B")
    s, y, sy = _pair(s, y, B.shape[0])
    xp = xp_of(B)
    Bs = B @ s
    sBs = float(s @ Bs)
    if not sBs > 0:
        raise NotSPDError(f"sᵀBs = {sBs:.3e} ≤ 0: B must be positive definite")
    return C.result(B - xp.outer(Bs, Bs) / sBs + xp.outer(y, y) / sy, "the BFGS update B⁺")


def broyden_update_H(H, s, y, phi):
    """Broyden family (2.11): ``H⁺ = H − σ H y yᵀ H + ρ s sᵀ + φ (yᵀHy) h hᵀ`` with
    ``ρ = 1/sᵀy``, ``σ = 1/yᵀHy``, ``h = ρ s − σ H y``; ``φ = 1`` is BFGS, ``φ = 0`` DFP."""
    H = C.debug_spd(C.square(H, "H"), "H")
    s, y, sy = _pair(s, y, H.shape[0])
    phi = C.real(phi, "phi")
    xp = xp_of(H)
    Hy = H @ y
    yHy = float(y @ Hy)
    if not yHy > 0:
        raise NotSPDError("yᵀHy ≤ 0: H must be positive definite")
    rho, sigma = 1.0 / sy, 1.0 / yHy
    h = rho * s - sigma * Hy
    return C.result(H - sigma * xp.outer(Hy, Hy) + rho * xp.outer(s, s) + phi * yHy * xp.outer(h, h),
                    "the Broyden update H⁺")


def _memory(S, Y, gamma):
    C.positive(gamma, "gamma")
    S, Y = C.finite(S, "S", empty_ok=True), C.finite(Y, "Y", empty_ok=True)
    if S.ndim != 2 or S.shape != Y.shape or S.shape[1] < 1:
        raise ShapeError(f"S and Y must both be (p, n) with n ≥ 1, got {S.shape} and {Y.shape}")
    sy = (S * Y).sum(axis=1)
    if S.shape[0] and not bool((sy > 0).all()):
        raise NotSPDError("every stored pair needs sᵢᵀyᵢ > 0")
    return S, Y, sy


def lbfgs_dense(S, Y, gamma=1.0):
    """Dense L-BFGS matrix by the recursion (3.16) from ``H_0 = γI``: the definition."""
    S, Y, _ = _memory(S, Y, gamma)
    H = gamma * xp_of(S).eye(S.shape[1], dtype=S.dtype)
    for s, y in zip(S, Y):
        H = bfgs_update_H(H, s, y)
    return C.result(H, "the L-BFGS matrix H")


def lbfgs_two_loop(S, Y, G, gamma=1.0):
    """``H G`` by the two-loop recursion (Nocedal & Wright Alg. 7.4); ``G`` is ``(n,)`` or
    ``(n, k)`` (columns handled together). The loops run over the ``p`` stored pairs."""
    S, Y, sy = _memory(S, Y, gamma)
    q = C.rows_match(G, S.shape[1], "G").copy()
    p = S.shape[0]
    alpha = [None] * p
    for i in reversed(range(p)):
        alpha[i] = (S[i] @ q) / sy[i]
        q = q - (Y[i][:, None] * alpha[i] if q.ndim == 2 else alpha[i] * Y[i])
    r = gamma * q
    for i in range(p):
        beta = (Y[i] @ r) / sy[i]
        r = r + (S[i][:, None] * (alpha[i] - beta) if r.ndim == 2 else (alpha[i] - beta) * S[i])
    return C.result(r, "the L-BFGS product H G")


def lbfgs_compact(S, Y, gamma=1.0):
    """Compact (Byrd–Nocedal–Schnabel) form ``H = γI + W M Wᵀ`` with ``W = [S, γY]ᵀ``-columns:

    ``W = [Sᵀ  γYᵀ] ∈ R^{n×2p}``, ``M = [[R^{-T}(D + γYᵀY)R^{-1}, −R^{-T}], [−R^{-1}, 0]]``,
    ``R`` the upper triangle of ``S Yᵀ`` (``R_ij = s_iᵀy_j``, ``i ≤ j``), ``D = diag(s_iᵀy_i)``.
    Returns ``(W, M)``; apply with :func:`lbfgs_compact_apply`.
    """
    S, Y, sy = _memory(S, Y, gamma)
    xp = xp_of(S)
    p = S.shape[0]
    R = xp.triu(S @ Y.T)

    Rinv = solve_triangular(R, xp.eye(p, dtype=S.dtype), lower=False)  # p×p, triangular
    top_left = Rinv.T @ (xp.diag(sy) + gamma * (Y @ Y.T)) @ Rinv
    M = xp.concatenate(
        [xp.concatenate([top_left, -Rinv.T], axis=1),
         xp.concatenate([-Rinv, xp.zeros((p, p), dtype=S.dtype)], axis=1)], axis=0
    )  # xp.block is not in CuPy
    W = xp.concatenate([S.T, gamma * Y.T], axis=1)
    return C.result((W, M), "the compact L-BFGS form (W, M)")


def lbfgs_compact_apply(S, Y, G, gamma=1.0):
    """``H G = γG + W (M (Wᵀ G))`` — two products with the ``n × 2p`` matrix ``W``, which is
    what makes it cheap for matrix right-hand sides (K-BFGS(L) applies it to ``∇W``)."""
    W, M = lbfgs_compact(S, Y, gamma)
    G = C.rows_match(G, W.shape[0], "G")
    return C.result(gamma * G + W @ (M @ (W.T @ G)), "the L-BFGS product H G")
