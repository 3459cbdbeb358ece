"""Sketching matrices ``Ω ∈ R^{q×n}``, applied without forming ``Ω`` densely.

Row sampling (SENG 001 (14), NG+ 002 (17)) keeps ``q`` rows ``Ω_k = w_k e_{i_k}ᵀ``; it is
stored as indices and weights. Weights make every sketch unbiased, ``E[ΩᵀΩ] = I``:

* with replacement, i.i.d. ``i_k ~ p``: ``w_k = 1/√(q p_{i_k})``. Uniform ``p = 1/n`` gives
  ``√(n/q)``, exactly NG+ (17).
* without replacement, inclusion probabilities ``π_i``: ``w_k = 1/√π_{i_k}``
  (Horvitz–Thompson). Uniform: simple random sampling, ``π_i = q/n`` (weight ``√(n/q)``).
  Non-uniform (leverage scores): systematic πps sampling with ``π_i = min(1, c p_i)``,
  ``Σπ_i = q`` — exactly ``q`` distinct rows with known ``π``.

SENG (14) as printed, ``ω = e_iᵀ/p_i``, gives ``E[ΩᵀΩ] = q diag(1/p_i) ≠ I``; it is
available as ``scaling="seng14"`` for comparison only (see docs/errata.md).
Gaussian sketches have i.i.d. ``N(0, 1/q)`` entries. All random draws happen on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import asarray_like, rng_of, to_numpy
from ..errors import HyperParameterError, ShapeError
from . import _checks as C


@dataclass(frozen=True)
class RowSketch:
    """``Ω ∈ R^{q×n}`` with rows ``weight[k] · e_{index[k]}ᵀ`` (host arrays)."""

    n: int
    index: np.ndarray
    weight: np.ndarray

    @property
    def q(self):
        return int(self.index.shape[0])

    def apply(self, X):
        """``Ω X`` for ``X`` of shape ``(n,)`` or ``(n, k)``."""
        X = C.rows_match(X, self.n, "X")
        w = asarray_like(self.weight, X, dtype=X.dtype)
        idx = asarray_like(self.index, X)
        return X[idx] * (w[:, None] if X.ndim == 2 else w)

    def apply_right(self, X):
        """``X Ωᵀ`` for ``X`` of shape ``(m, n)`` (NG+ (17) writes ``𝒢 Ω`` with ``Ω = Ω_ourᵀ``)."""
        X = C.finite(X, "X")
        if X.ndim != 2 or X.shape[1] != self.n:
            raise ShapeError(f"X must be (m, {self.n}), got {X.shape}")
        return X[:, asarray_like(self.index, X)] * asarray_like(self.weight, X, dtype=X.dtype)

    def gram(self):
        """``ΩᵀΩ`` as a dense ``(n, n)`` host array (diagonal for row sampling)."""
        d = np.zeros(self.n)
        np.add.at(d, self.index, self.weight**2)
        return np.diag(d)

    def to_dense(self):
        O = np.zeros((self.q, self.n))
        O[np.arange(self.q), self.index] = self.weight
        return O


@dataclass(frozen=True)
class GaussianSketch:
    """Dense ``Ω`` with i.i.d. ``N(0, 1/q)`` entries."""

    omega: np.ndarray

    @property
    def n(self):
        return int(self.omega.shape[1])

    @property
    def q(self):
        return int(self.omega.shape[0])

    def apply(self, X):
        X = C.rows_match(X, self.n, "X")
        return asarray_like(self.omega, X, dtype=X.dtype) @ X

    def apply_right(self, X):
        X = C.finite(X, "X")
        return X @ asarray_like(self.omega, X, dtype=X.dtype).T

    def gram(self):
        return self.omega.T @ self.omega

    def to_dense(self):
        return self.omega.copy()


def _sizes(n, q):
    for v, name in ((n, "n"), (q, "q")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise HyperParameterError(f"{name} must be a positive int, got {v!r}")
    return int(n), int(q)


def leverage_scores(U):
    """Row-norm-squared probabilities ``p_i = ‖U_{i,:}‖² / ‖U‖_F²`` (SENG §3.2), on the host."""
    U = to_numpy(C.finite(U, "U"))
    if U.ndim != 2:
        raise ShapeError(f"U must be a matrix, got shape {U.shape}")
    r = (U * U).sum(axis=1)
    total = r.sum()
    if not total > 0:
        raise HyperParameterError("U is zero: leverage scores are undefined")
    return r / total


def _probs(n, probs):
    if isinstance(probs, str):
        if probs != "uniform":
            raise HyperParameterError(f"probs must be 'uniform' or an array, got {probs!r}")
        return np.full(n, 1.0 / n)
    p = np.asarray(to_numpy(probs), dtype=np.float64)
    if p.shape != (n,):
        raise ShapeError(f"probs must have shape ({n},), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not abs(p.sum() - 1) <= 1e-10:
        raise HyperParameterError("probs must be finite, non-negative and sum to 1")
    return p


def inclusion_probabilities(p, q):
    """``π_i = min(1, c p_i)`` with ``Σ π_i = q`` (units capped at 1 are taken surely)."""
    p = np.asarray(p, dtype=np.float64)
    if np.count_nonzero(p) < q:
        raise HyperParameterError(f"q = {q} exceeds the {np.count_nonzero(p)} rows with positive probability")
    certain = np.zeros(p.shape, dtype=bool)
    while True:
        rest = q - certain.sum()
        free = p[~certain].sum()
        if rest == 0 or free == 0:  # every draw is certain: the sample is fixed
            return certain.astype(np.float64)
        pi = np.where(certain, 1.0, rest * p / free)
        new = (pi > 1) & ~certain
        if not new.any():
            return np.minimum(pi, 1.0)
        certain |= new


def row_sampling(n, q, probs="uniform", replace=True, seed=None, scaling="unbiased"):
    """Row-sampling sketch (SENG (14); NG+ (17) for ``probs="uniform", replace=True``)."""
    n, q = _sizes(n, q)
    if scaling not in ("unbiased", "seng14"):
        raise HyperParameterError(f"scaling must be 'unbiased' or 'seng14', got {scaling!r}")
    p = _probs(n, probs)
    rng = rng_of(seed)
    if replace:
        idx = rng.choice(n, size=q, replace=True, p=p)
        w = 1.0 / np.sqrt(q * p[idx])
    else:
        if q > n:
            raise HyperParameterError(f"sample size q = {q} exceeds the population n = {n} without replacement")
        if isinstance(probs, str):
            idx = rng.choice(n, size=q, replace=False)
            pi = np.full(n, q / n)
        else:
            pi = inclusion_probabilities(p, q)
            c = np.cumsum(pi)
            idx = np.minimum(np.searchsorted(c, rng.random() + np.arange(q), side="right"), n - 1)
        w = 1.0 / np.sqrt(pi[idx])
    if scaling == "seng14":
        w = 1.0 / p[idx]
    return RowSketch(n=n, index=np.asarray(idx, dtype=np.int64), weight=w)


def ngplus_sketch(n, q, seed=None):
    """NG+ (17): columns ``√(n/q) e_i`` drawn uniformly with replacement (as a RowSketch)."""
    return row_sampling(n, q, "uniform", replace=True, seed=seed)


def gaussian(n, q, seed=None):
    n, q = _sizes(n, q)
    return GaussianSketch(omega=rng_of(seed).standard_normal((q, n)) / np.sqrt(q))
