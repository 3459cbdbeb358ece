"""Batched dense kernels: the same small problem on every slice of a leading stack axis,
vectorized over the stack (no Python loop over the slices).

* :func:`spd_solve_batched` — ``A[w] X[w] = B[w]`` for a stack of SPD matrices ([SENG]
  (9)/(12) with the worker axis of the block-diagonal capacitance (26) as the stack axis);
  batched Cholesky, with the eigendecomposition fallback and acceptance rule of
  :func:`refcurv.linalg.woodbury.spd_solve`.
* :func:`randomized_svd_batched` — the rank-``r`` truncated SVD of each ``X[i]`` by the
  Halko–Martinsson–Tropp range finder (2011, Algorithm 4.4 with power iterations + 5.1), the
  algorithm of :func:`refcurv.linalg.lowrank.randomized_svd` run on a stack ([SENG] (15),
  footnote 1: partial SVDs of the per-sample ``Ĝ_i`` or ``Â_i``).
* :func:`truncated_svd_batched` — the rank-``r`` truncation of the exact (LAPACK) SVD of each
  ``X[i]``.
"""
from __future__ import annotations

import numpy as np

from ..backend import cho_solve, cholesky, eigh, rng_of, xp_of
from ..errors import HyperParameterError, NotSPDError, ShapeError
from . import _checks as C

__all__ = ["spd_solve_batched", "randomized_svd_batched", "truncated_svd_batched"]


def spd_solve_batched(A, B, name="A"):
    """Solve ``A[w] X[w] = B[w]`` for a stack of SPD matrices ``A`` ``(…, m, m)`` and right-hand
    sides ``B`` ``(…, m)`` or ``(…, m, k)``.

    Batched Cholesky first; if any factorization fails, the symmetric eigendecomposition of
    the symmetrized stack with :func:`~refcurv.linalg.woodbury.spd_solve`'s acceptance rule
    (every eigenvalue ``> m·eps·max|w|``, the maximum over the whole stack), else
    :class:`~refcurv.errors.NotSPDError`."""
    C.label(name, "name")
    A = C.finite(A, name)
    B = C.finite(B, "B", empty_ok=True)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ShapeError(f"{name} must be a stack of square matrices (…, m, m), got shape {A.shape}")
    vec = B.ndim == A.ndim - 1
    if B.shape[: A.ndim - 1] != A.shape[:-1]:
        raise ShapeError(f"B must be (…, {A.shape[-1]}) or (…, {A.shape[-1]}, k) matching {name} "
                         f"{A.shape}, got {B.shape}")
    Bm = B[..., None] if vec else B
    try:
        X = cho_solve(cholesky(A), Bm)
    except np.linalg.LinAlgError:
        xp = xp_of(A)
        w, V = eigh((A + A.swapaxes(-1, -2)) / 2)
        floor = A.shape[-1] * np.finfo(A.dtype).eps * float(xp.abs(w).max())
        if float(w.min()) <= floor:
            raise NotSPDError(f"{name} is not positive definite (smallest eigenvalue {float(w.min()):.3e})")
        X = V @ ((V.swapaxes(-1, -2) @ Bm) / w[..., None])
    return C.result(X[..., 0] if vec else X, f"the solution X of {name} X = B")


def _nonneg_int(value, name):
    return C.integer(value, name, minimum=0)


def randomized_svd_batched(X, rank, seed=None, oversample=10, power_iter=2, Omega=None):
    """Batched rank-``rank`` truncated SVD ``(U, s, Vt)`` — shapes ``(N, m, r)``, ``(N, r)``,
    ``(N, r, n)`` — of ``X`` ``(N, m, n)``: Halko–Martinsson–Tropp Algorithm 4.4 (Gaussian
    range finder, QR re-orthonormalization at each of ``power_iter`` power iterations) +
    Algorithm 5.1, as :func:`refcurv.linalg.lowrank.randomized_svd`, vectorized over ``N``.

    The Gaussian test matrices ``(N, n, k)``, ``k = min(rank + oversample, m, n)``, are
    ``Omega`` or drawn on the host from ``numpy.random.default_rng(seed)``."""
    X = C.finite(X, "X")
    if X.ndim != 3:
        raise ShapeError(f"X must be a stack of matrices (N, m, n), got shape {X.shape}")
    N, m, n = X.shape
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(m, n):
        raise HyperParameterError(f"rank must be an int in [1, {min(m, n)}], got {rank!r}")
    oversample, power_iter = _nonneg_int(oversample, "oversample"), _nonneg_int(power_iter, "power_iter")
    k = min(rank + oversample, m, n)
    if Omega is None:
        Omega = rng_of(seed).standard_normal((N, n, k))
    elif tuple((Omega := C.finite(Omega, "Omega")).shape) != (N, n, k):
        raise ShapeError(f"Omega must have shape {(N, n, k)}, got {tuple(Omega.shape)}")
    xp = xp_of(X)
    Omega = xp.asarray(Omega, dtype=X.dtype)
    Q, _ = xp.linalg.qr(X @ Omega)
    Xt = X.swapaxes(-1, -2)
    for _ in range(power_iter):
        Q, _ = xp.linalg.qr(Xt @ Q)
        Q, _ = xp.linalg.qr(X @ Q)
    Ub, s, Vt = xp.linalg.svd(Q.swapaxes(-1, -2) @ X, full_matrices=False)
    return C.result(((Q @ Ub)[..., :rank], s[..., :rank], Vt[..., :rank, :]), "the truncated SVDs (U, s, Vt)")


def truncated_svd_batched(X, rank):
    """The ``rank`` leading singular triplets ``(U, s, Vt)`` of the exact SVD of each ``X[i]``
    (``X`` ``(N, m, n)``, ``1 ≤ rank ≤ min(m, n)``)."""
    X = C.finite(X, "X")
    if X.ndim != 3:
        raise ShapeError(f"X must be a stack of matrices (N, m, n), got shape {X.shape}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(X.shape[1:]):
        raise HyperParameterError(f"rank must be an int in [1, {min(X.shape[1:])}], got {rank!r}")
    U, s, Vt = xp_of(X).linalg.svd(X, full_matrices=False)
    return U[..., :rank], s[..., :rank], Vt[..., :rank, :]
