"""Inverse p-th roots of SPD matrices (Shampoo, [Ren-thesis] Algorithm 16).

* :func:`inv_root_eigh`: ``A^{-1/p} = V diag(w^{-1/p}) Vᵀ`` — the reference.
* :func:`inv_root_newton`: the coupled Newton iteration (Guo & Higham 2006; Anil et al.
  2020, as Algorithm 16 line 12 uses it): with ``z = (p+1) / (2‖A‖₂)``,
  ``X₀ = z^{1/p} I``, ``M₀ = zA`` and ``T_k = ((p+1)I − M_k)/p``,
  ``X_{k+1} = X_k T_k``, ``M_{k+1} = T_k^p M_k``. The invariant ``M_k = X_k^p A`` gives
  ``X_k → A^{-1/p}`` as ``M_k → I``. Stops when ``max|M_k − I| ≤ tol`` (thesis: 1e-6) or
  after ``max_iter`` (thesis: 100) iterations, or when ``‖M_k − I‖_F`` grows. In exact
  arithmetic every eigenvalue error ``|1 − μ|`` of ``M_k`` shrinks each step, so the
  Frobenius norm (unlike the entrywise maximum, which can rise while converging) is
  monotone and its growth means rounding dominates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import eigh, xp_of
from ..errors import HyperParameterError, NotSPDError
from . import _checks as C


def _p(p):
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
        raise HyperParameterError(f"p must be a positive int, got {p!r}")
    return int(p)


def _spd_eig(A, name="A"):
    A = C.symmetric(A, name)
    w, V = eigh((A + A.T) / 2)
    if float(w.min()) <= 0:
        raise NotSPDError(f"{name} must be positive definite (smallest eigenvalue {float(w.min()):.3e})")
    return w, V


def _spd_chol(A, name="A"):
    """Symmetric ``A`` (symmetrized) that is numerically positive definite: Cholesky
    succeeds — ``n³/3`` flops instead of the full ``eigh`` (≈ 9n³ with vectors)."""
    from ..backend import cholesky

    A = C.symmetric(A, name)
    A = (A + A.T) / 2
    try:
        cholesky(A)
    except NotSPDError:
        raise NotSPDError(f"{name} must be positive definite (Cholesky failed)") from None
    return A


def _lambda_max(A):
    """Largest eigenvalue of a symmetric ``A`` to rounding: LAPACK ``dsyevr`` restricted to
    the top index (``scipy.linalg.eigvalsh(subset_by_index=…)``: a tridiagonal reduction
    and one eigenvalue, no eigenvectors). CuPy has no index subset: there the eigenvalues
    alone are computed on the device (``cupy.linalg.eigvalsh``), still without vectors.
    Not a power iteration: its error (≈ its tolerance) would move ``z`` in
    :func:`inv_root_newton` and so change the iterates beyond rounding."""
    xp = xp_of(A)
    n = A.shape[0]
    if xp is np:
        import scipy.linalg

        return float(scipy.linalg.eigvalsh(A, subset_by_index=[n - 1, n - 1], check_finite=False)[0])
    return float(xp.linalg.eigvalsh(A)[-1])  # pragma: no cover - CuPy


def inv_root_eigh(A, p):
    """``A^{-1/p}`` for SPD ``A`` by the symmetric eigendecomposition."""
    p = _p(p)
    w, V = _spd_eig(A)
    return (V * w ** (-1.0 / p)) @ V.T


@dataclass
class NewtonReport:
    iterations: int
    error: float  # final max|M − I|
    converged: bool


def inv_root_newton(A, p, max_iter=100, tol=1e-6):
    """``(A^{-1/p}, NewtonReport)`` by the coupled Newton iteration (see module docstring)."""
    p = _p(p)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise HyperParameterError(f"max_iter must be a non-negative int, got {max_iter!r}")
    C.positive(tol, "tol")
    A = _spd_chol(A)  # SPD check by Cholesky (issue 15: no full eigh for it)
    xp = xp_of(A)
    n = A.shape[0]
    eye = xp.eye(n, dtype=A.dtype)
    z = (p + 1) / (2 * _lambda_max(A))  # ‖A‖₂ = λ_max for SPD A
    X, M = z ** (1.0 / p) * eye, z * A
    err, fro = float(xp.abs(M - eye).max()), float(xp.linalg.norm(M - eye))
    k = 0
    while err > tol and k < max_iter:
        T = ((p + 1) * eye - M) / p
        M_new = xp.linalg.matrix_power(T, p) @ M
        fro_new = float(xp.linalg.norm(M_new - eye))
        if fro_new > fro:  # rounding dominates: keep the last iterate
            break
        X, M, fro, k = X @ T, M_new, fro_new, k + 1
        err = float(xp.abs(M - eye).max())
    return X, NewtonReport(iterations=k, error=err, converged=err <= tol)
