"""Low-rank factorizations.

* :func:`brand_update`: eigendecomposition of ``U diag(K) Uᵀ + c h hᵀ`` from that of
  ``U diag(K) Uᵀ`` (``U`` semi-orthogonal), truncated to the ``rank`` largest
  eigenvalues — Brand (2006) specialised to symmetric matrices, the step Ginger ([QNG-Ginger] §2.3)
  calls ``r1u``: with ``r = ‖(I − UUᵀ)h‖``, ``p = (I − UUᵀ)h / r``,
  ``[U h] = [U p] [[I, Uᵀh], [0, r]]`` and the ``(τ+1)×(τ+1)`` core
  ``C = [[I, Uᵀh],[0, r]] diag(K, c) [[I, Uᵀh],[0, r]]ᵀ = V diag(K') Vᵀ``, the update is
  ``U' = [U p] V``, ``K'``. Cost ``O(dτ² + τ³)``. The projection ``(I − UUᵀ)h`` is done
  twice (classical Gram–Schmidt with one reorthogonalization) so that ``[U p]`` stays
  orthonormal to rounding when ``h`` lies nearly in ``range(U)``.
* :func:`randomized_svd`: Halko, Martinsson & Tropp (2011) Algorithm 4.4 (with ``n_iter``
  power iterations) + 5.1, for SENG's rank-``r`` factors of ``G_i``, ``A_i``.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import asarray_like, eigh, rng_of, xp_of
from ..errors import HyperParameterError, ShapeError
from . import _checks as C


def _rank(rank, name="rank"):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise HyperParameterError(f"{name} must be a positive int, got {rank!r}")
    return int(rank)


def brand_update(U, K, h, c=1.0, rank=None):
    """``(U', K')`` with ``U' diag(K') U'ᵀ`` the best rank-``rank`` approximation (largest
    eigenvalues, sorted descending) of ``U diag(K) Uᵀ + c h hᵀ``. ``rank=None`` keeps all
    ``τ + 1`` (or ``τ`` when ``h ∈ range(U)``) directions.

    Precondition, checked: ``U`` has orthonormal columns, ``max|UᵀU − I| ≤ 100·√eps`` of its
    dtype (``1.5e-6`` in float64; loose enough for the rounding drift of many updates, tight
    enough to catch a ``U`` that is not orthonormal at all). The check costs ``O(dτ²)``, the
    order of the update itself; a violation is :class:`~refcurv.errors.HyperParameterError`
    (the result would silently be wrong). ``τ = 0`` (``U`` of shape ``(d, 0)``) is allowed."""
    U = C.finite(U, "U", empty_ok=True)
    if U.ndim != 2 or U.shape[0] < 1:
        raise ShapeError(f"U must be a (d, τ) matrix with d ≥ 1, got shape {U.shape}")
    d, tau = U.shape
    K = C.finite(K, "K", empty_ok=tau == 0)
    if K.shape != (tau,):
        raise ShapeError(f"K must be a vector of length {tau}, got shape {K.shape}")
    h = C.vector(h, "h", d)
    c = C.real(c, "c")
    if rank is not None:
        rank = _rank(rank)
    xp = xp_of(U)
    if tau:
        dev = float(xp.abs(U.T @ U - xp.eye(tau, dtype=U.dtype)).max())
        tol = 100 * float(math.sqrt(np.finfo(U.dtype).eps))
        if not dev <= tol:
            raise HyperParameterError(f"U must have orthonormal columns (max|UᵀU − I| ≤ {tol:.1e}), "
                                      f"got max|UᵀU − I| = {dev:.3e}")
    m = U.T @ h
    resid = h - U @ m
    # second classical Gram–Schmidt pass ("twice is enough"): without it p = resid/r loses
    # orthogonality to U by O(eps‖h‖/r) when h lies nearly in range(U)
    m2 = U.T @ resid
    resid = resid - U @ m2
    m = m + m2
    r = float(xp.linalg.norm(resid))
    # h numerically inside range(U): no new direction
    tiny = r <= 10 * d * np.finfo(U.dtype).eps * max(float(xp.linalg.norm(h)), 1e-300)
    if tiny:
        basis, R = U, xp.eye(tau, dtype=U.dtype)
        core = (R * K) @ R.T + c * xp.outer(m, m)
    else:
        basis = xp.concatenate([U, (resid / r)[:, None]], axis=1)
        R = xp.zeros((tau + 1, tau + 1), dtype=U.dtype)
        R[:tau, :tau] = xp.eye(tau, dtype=U.dtype)
        R[:tau, tau] = m
        R[tau, tau] = r
        core = (R * xp.concatenate([K, xp.asarray([c], dtype=U.dtype)])) @ R.T
    w, V = eigh((core + core.T) / 2)
    order = xp.argsort(-w)
    if rank is not None:
        order = order[:rank]
    return C.result((basis @ V[:, order], w[order]), "the updated eigenpairs (U', K')")


def randomized_svd(X, rank, oversample=10, n_iter=2, seed=None):
    """Rank-``rank`` truncated SVD ``(U, s, Vt)`` of ``X`` by a Gaussian range finder with
    ``oversample`` extra columns and ``n_iter`` power iterations (re-orthonormalized by QR
    each time); the test matrix is drawn on the host with ``numpy.random.default_rng(seed)``."""
    X = C.matrix(X, "X")
    rank = _rank(rank)
    if rank > min(X.shape):
        raise HyperParameterError(f"rank must be ≤ min(X.shape) = {min(X.shape)}, got {rank}")
    if isinstance(oversample, bool) or not isinstance(oversample, (int, np.integer)) or oversample < 0:
        raise HyperParameterError(f"oversample must be a non-negative int, got {oversample!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
        raise HyperParameterError(f"n_iter must be a non-negative int, got {n_iter!r}")
    xp = xp_of(X)
    k = min(rank + oversample, min(X.shape))
    Omega = asarray_like(rng_of(seed).standard_normal((X.shape[1], k)), X, dtype=X.dtype)
    Q, _ = xp.linalg.qr(X @ Omega)
    for _ in range(n_iter):
        Q, _ = xp.linalg.qr(X.T @ Q)
        Q, _ = xp.linalg.qr(X @ Q)
    Ub, s, Vt = xp.linalg.svd(Q.T @ X, full_matrices=False)
    return C.result(((Q @ Ub)[:, :rank], s[:rank], Vt[:rank]), "the truncated SVD (U, s, Vt)")
