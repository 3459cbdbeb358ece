"""Sherman–Morrison–Woodbury solves and stable SPD factorizations.

* ``spd_solve``: Cholesky, with a documented fallback.
* ``lowrank_solve`` / ``lowrank_inverse``: ``(λI + U Uᵀ)^{-1}`` through the ``ρ × ρ``
  capacitance matrix ``λI + UᵀU`` (SENG (8)-(9), NG+ (14)).
* ``gn_solve``: ``(λI + s Jᵀ H J)^{-1}`` by thesis (5.6) (``H`` invertible, symmetric
  ``D = λH^{-1} + s J Jᵀ``) or (5.7) (any ``H``, e.g. singular softmax ``H``; non-symmetric
  ``D = λI + s J Jᵀ H``).
* ``sherman_morrison``: ``(A + u vᵀ)^{-1}`` from ``A^{-1}``.

Never ``inv`` where a solve will do.
"""
from __future__ import annotations

import numpy as np

from ..backend import cho_solve, cholesky, eigh, xp_of
from ..errors import NotSPDError, ShapeError
from . import _checks as C


def spd_solve(A, B, name="A"):
    """Solve ``A X = B`` for symmetric positive definite ``A``.

    Cholesky first. If it fails (``A`` PD in exact arithmetic but not numerically
    factorizable), fall back to the symmetric eigendecomposition ``A = V diag(w) Vᵀ`` and
    ``X = V diag(1/w) Vᵀ B`` provided every ``w > n·eps·max|w|``; otherwise raise
    :class:`NotSPDError`. A result that overflows (finite ``A``, ``B`` too large or too
    ill-conditioned) is :class:`~refcurv.errors.NonFiniteError`.
    """
    C.label(name, "name")
    A = C.symmetric(A, name)
    B = C.rows_match(B, A.shape[0], "B")
    try:
        return C.result(cho_solve(cholesky(A), B), f"the solution X of {name} X = B")
    except np.linalg.LinAlgError:
        pass
    xp = xp_of(A)
    w, V = eigh(A)
    floor = A.shape[0] * np.finfo(A.dtype).eps * float(xp.abs(w).max())
    if float(w.min()) <= floor:
        raise NotSPDError(f"{name} is not positive definite (smallest eigenvalue {float(w.min()):.3e})")
    VtB = V.T @ B
    return C.result(V @ (VtB / (w[:, None] if B.ndim == 2 else w)), f"the solution X of {name} X = B")


def _spd_inverse(A, name="A"):
    """``A⁻¹`` for symmetric positive definite ``A``, for the methods whose definition stores
    the inverse (KFAC's ``H_Ω``, ``H_Γ``, Algorithm 12 line 19; TNT's factor inverses): LAPACK
    ``potrf`` + ``potri`` (≈ n³ flops) rather than two triangular solves against ``I``
    (≈ 2n³ after the factorization), symmetrized from its lower triangle. A matrix Cholesky
    refuses, and CuPy input (no ``potri`` in ``cupyx.scipy``), go through :func:`spd_solve`
    with the identity (its eigendecomposition fallback and errors included)."""
    C.label(name, "name")
    A = C.symmetric(A, name)
    xp = xp_of(A)
    if xp is np and A.dtype in (np.float32, np.float64):
        from scipy.linalg import lapack

        potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (A,))
        L, info = potrf(A, lower=True, clean=True)
        if info == 0:
            X, info = potri(L, lower=True)
            if info == 0:
                X = xp.tril(X) + xp.tril(X, -1).T  # potri fills the lower triangle only
                return C.result(X, f"the inverse of {name}")
    return spd_solve(A, xp.eye(A.shape[0], dtype=A.dtype), name)


def _lam_U(lam, U):
    C.positive(lam, "lam")
    return C.matrix(U, "U", "a matrix (n, ρ)")


def lowrank_solve(lam, U, B):
    """``(λI + U Uᵀ)^{-1} B = (B − U (λI + UᵀU)^{-1} Uᵀ B) / λ`` (SMW; SENG (8)-(9))."""
    U = _lam_U(lam, U)
    B = C.rows_match(B, U.shape[0], "B")
    xp = xp_of(U, B)
    cap = lam * xp.eye(U.shape[1], dtype=U.dtype) + U.T @ U
    return C.result((B - U @ spd_solve(cap, U.T @ B, name="λI + UᵀU")) / lam, "(λI + UUᵀ)⁻¹B")


def lowrank_inverse(lam, U):
    """Dense ``(λI + U Uᵀ)^{-1}`` by SMW (for tests and small problems)."""
    U = _lam_U(lam, U)
    return lowrank_solve(lam, U, xp_of(U).eye(U.shape[0], dtype=U.dtype))


def gn_solve(lam, J, H, B, scale=1.0, symmetric=True):
    """``(λI + s Jᵀ H J)^{-1} B`` with ``J ∈ R^{m×n}``, ``H ∈ R^{m×m}``, ``s = scale``.

    ``symmetric=True``: thesis (5.6), ``G^{-1} = λ^{-1}(I − s Jᵀ D^{-1} J)`` with
    ``D = λH^{-1} + s J Jᵀ``; needs ``H`` SPD (``D`` is then SPD and solved by Cholesky;
    ``H^{-1}`` enters only through a solve).
    ``symmetric=False``: thesis (5.7), ``G^{-1} = λ^{-1}(I − s Jᵀ H D^{-1} J)`` with
    ``D = λI + s J Jᵀ H``; valid for any ``H`` with ``D`` invertible (singular ``H``), solved by LU.
    """
    C.positive(lam, "lam")
    C.positive(scale, "scale")
    symmetric = C.flag(symmetric, "symmetric")
    J = C.matrix(J, "J", "a matrix (m, n)")
    m = J.shape[0]
    H = C.square(H, "H")
    if H.shape[0] != m:
        raise ShapeError(f"H must be ({m}, {m}) to match J, got {H.shape}")
    B = C.rows_match(B, J.shape[1], "B")
    xp = xp_of(J, H, B)
    JB = J @ B
    if symmetric:
        C.symmetric(H, "H")
        D = lam * spd_solve(H, xp.eye(m, dtype=J.dtype), name="H") + scale * (J @ J.T)
        D = (D + D.T) / 2
        return C.result((B - scale * (J.T @ spd_solve(D, JB, name="D"))) / lam, "(λI + s JᵀHJ)⁻¹B")
    D = C.finite(lam * xp.eye(m, dtype=J.dtype) + scale * (J @ J.T) @ H, "D = λI + s J Jᵀ H")
    try:
        DJB = xp.linalg.solve(D, JB)
    except np.linalg.LinAlgError:
        raise NotSPDError("D = λI + s J Jᵀ H is singular: (5.7) needs D invertible") from None
    return C.result((B - scale * (J.T @ (H @ DJB))) / lam, "(λI + s JᵀHJ)⁻¹B")


def sherman_morrison(A_inv, u, v=None):
    """``(A + u vᵀ)^{-1} = A^{-1} − A^{-1}u vᵀA^{-1} / (1 + vᵀA^{-1}u)`` (``v = u`` by default)."""
    A_inv = C.square(A_inv, "A_inv")
    n = A_inv.shape[0]
    u = C.vector(u, "u", n)
    v = u if v is None else C.vector(v, "v", n)
    Au, vA = A_inv @ u, v @ A_inv
    denom = 1.0 + float(v @ Au)
    if denom == 0.0:
        raise NotSPDError("A + u vᵀ is singular (1 + vᵀA⁻¹u = 0)")
    return C.result(A_inv - xp_of(A_inv).outer(Au, vA) / denom, "(A + u vᵀ)⁻¹")
