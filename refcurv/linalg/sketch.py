"""Sketching matrices ``Ω ∈ R^{q×n}``, applied without forming ``Ω`` densely.

Row sampling ([SENG] (14), [NG+] (17)) keeps ``q`` rows ``Ω_k = w_k e_{i_k}ᵀ``; it is
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

Sample sizes (one behaviour, refused clearly — the library's input policy): ``n`` and ``q``
are ints ``≥ 1``. Without replacement ``q`` may not exceed the population ``n`` nor, for
non-uniform ``probs``, the number of rows with ``p_i > 0``; a larger ``q`` is a
:class:`~refcurv.errors.HyperParameterError`, never silently clamped. (A caller that wants
"every row" must say so, e.g. by not sketching; ``q`` equal to the number of rows with
``p_i > 0`` takes each of them surely, ``π_i = 1``, weight 1.) With replacement any ``q ≥ 1``
is valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import asarray_like, rng_of, to_numpy
from ..errors import ArgumentTypeError, HyperParameterError, ShapeError
from . import _checks as C


@dataclass(frozen=True)
class RowSketch:
    """``Ω ∈ R^{q×n}`` with rows ``weight[k] · e_{index[k]}ᵀ`` (host arrays)."""

    n: int
    index: np.ndarray
    weight: np.ndarray

    def __post_init__(self):
        n = C.integer(self.n, "n", minimum=1)
        index = self.index
        if index is None or isinstance(index, (str, bytes, dict)):
            raise ArgumentTypeError(f"index must be an int array, got {type(index).__name__}")
        try:
            index = to_numpy(index)
        except (TypeError, ValueError):
            raise ArgumentTypeError(f"index must be an int array, got {type(self.index).__name__}") from None
        if index.dtype.kind not in "iu" or index.ndim != 1 or index.size == 0:
            raise ArgumentTypeError(f"index must be a non-empty 1-d int array, got dtype {index.dtype} "
                                    f"and shape {index.shape}")
        if bool((index < 0).any()) or bool((index >= n).any()):
            raise ShapeError(f"index must lie in [0, {n}), got values in [{index.min()}, {index.max()}]")
        weight = to_numpy(C.vector(self.weight, "weight", index.shape[0]))
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "weight", weight)

    @property
    def q(self):
        return int(self.index.shape[0])

    def apply(self, X):
        """``Ω X`` for ``X`` of shape ``(n,)`` or ``(n, k)``."""
        X = C.rows_match(X, self.n, "X")
        w = asarray_like(self.weight, X, dtype=X.dtype)
        idx = asarray_like(self.index, X)
        return C.result(X[idx] * (w[:, None] if X.ndim == 2 else w), "Ω X")

    def apply_right(self, X):
        """``X Ωᵀ`` for ``X`` of shape ``(m, n)`` (NG+ (17) writes ``𝒢 Ω`` with ``Ω = Ω_ourᵀ``)."""
        X = C.finite(X, "X")
        if X.ndim != 2 or X.shape[1] != self.n:
            raise ShapeError(f"X must be (m, {self.n}), got {X.shape}")
        return C.result(X[:, asarray_like(self.index, X)] * asarray_like(self.weight, X, dtype=X.dtype), "X Ωᵀ")

    def gram(self):  # host: sketches are host objects (drawn with a host RNG, design §6)
        """``ΩᵀΩ`` as a dense ``(n, n)`` host array (diagonal for row sampling)."""
        d = np.zeros(self.n)
        np.add.at(d, self.index, self.weight**2)
        return np.diag(d)

    def to_dense(self):  # host: sketches are host objects
        O = np.zeros((self.q, self.n))
        O[np.arange(self.q), self.index] = self.weight
        return O


@dataclass(frozen=True)
class GaussianSketch:
    """Dense ``Ω`` with i.i.d. ``N(0, 1/q)`` entries."""

    omega: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "omega", C.matrix(self.omega, "omega", "a (q, n) matrix"))

    @property
    def n(self):
        return int(self.omega.shape[1])

    @property
    def q(self):
        return int(self.omega.shape[0])

    def apply(self, X):
        """``Ω X`` for ``X`` of shape ``(n,)`` or ``(n, k)``."""
        X = C.rows_match(X, self.n, "X")
        return C.result(asarray_like(self.omega, X, dtype=X.dtype) @ X, "Ω X")

    def apply_right(self, X):
        """``X Ωᵀ`` for ``X`` of shape ``(m, n)``."""
        X = C.finite(X, "X")
        if X.ndim != 2 or X.shape[1] != self.n:
            raise ShapeError(f"X must be (m, {self.n}), got {X.shape}")
        return C.result(X @ asarray_like(self.omega, X, dtype=X.dtype).T, "X Ωᵀ")

    def gram(self):
        return C.result(self.omega.T @ self.omega, "ΩᵀΩ")

    def to_dense(self):
        return self.omega.copy()


def _sizes(n, q):
    return C.integer(n, "n", minimum=1), C.integer(q, "q", minimum=1)


def leverage_scores(U):  # host: sampling probabilities are computed on the host, where the rows are drawn
    """Row-norm-squared probabilities ``p_i = ‖U_{i,:}‖² / ‖U‖_F²`` (SENG §3.2), on the host,
    **in float64** whatever the dtype of ``U`` (float32 row norms normalized in float32 miss
    ``Σp = 1`` by ~1e-7, which :func:`row_sampling` rejects). Entries so large that the
    squares overflow are rescaled by ``max|U|`` first (the probabilities are scale-invariant)."""
    U = np.asarray(to_numpy(C.matrix(U, "U")), dtype=np.float64)
    with np.errstate(over="ignore"):
        r = (U * U).sum(axis=1)
        total = r.sum()
    if not np.isfinite(total):  # overflow of the squares: p is invariant to scaling U
        Us = U / np.abs(U).max()
        r = (Us * Us).sum(axis=1)
        total = r.sum()
    if not total > 0:
        raise HyperParameterError("U is zero: leverage scores are undefined")
    return r / total


def _probs(n, probs):  # host: host-side sampling probabilities
    if isinstance(probs, str):
        if probs != "uniform":
            raise HyperParameterError(f"probs must be 'uniform' or an array, got {probs!r}")
        return np.full(n, 1.0 / n)
    p = np.asarray(to_numpy(C.finite(probs, "probs")), dtype=np.float64)
    if p.shape != (n,):
        raise ShapeError(f"probs must have shape ({n},), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not abs(p.sum() - 1) <= 1e-10:
        raise HyperParameterError("probs must be finite, non-negative and sum to 1")
    return p


def inclusion_probabilities(p, q):  # host: host-side sampling probabilities
    """``π_i = min(1, c p_i)`` with ``Σ π_i = q`` (units capped at 1 are taken surely) for
    probabilities ``p`` (finite, ``≥ 0``, not all zero) and ``1 ≤ q ≤`` the number of rows with
    ``p_i > 0``; ``q`` equal to that number gives exactly ``π_i = 1`` on those rows."""
    p = np.asarray(to_numpy(C.vector(p, "p")), dtype=np.float64)
    q = C.integer(q, "q", minimum=1)
    if bool((p < 0).any()):
        raise HyperParameterError("p must be non-negative")
    if np.count_nonzero(p) < q:
        raise HyperParameterError(f"q = {q} exceeds the {np.count_nonzero(p)} rows with positive probability")
    if np.count_nonzero(p) == q:  # every positive row is taken surely
        return (p > 0).astype(np.float64)
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


def row_sampling(n, q, probs="uniform", replace=True, seed=None, scaling="unbiased"):  # host: rows are drawn on the host (design §6)
    """Row-sampling sketch (SENG (14); NG+ (17) for ``probs="uniform", replace=True``):
    ``probs`` is ``"uniform"`` or a probability vector of length ``n``; ``replace`` a bool.
    Without replacement ``q > n`` (or ``q`` above the number of rows with ``p_i > 0``) is
    refused (:class:`~refcurv.errors.HyperParameterError`), never clamped (module docstring)."""
    n, q = _sizes(n, q)
    replace = C.flag(replace, "replace")
    C.choice(scaling, "scaling", ("unbiased", "seng14"))
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
            # rounding can put the last point past c[-1]: the last row with π > 0, never a π = 0 row
            last = int(np.flatnonzero(pi)[-1])
            idx = np.minimum(np.searchsorted(c, rng.random() + np.arange(q), side="right"), last)
        w = 1.0 / np.sqrt(pi[idx])
    if scaling == "seng14":
        w = 1.0 / p[idx]
    return RowSketch(n=n, index=np.asarray(idx, dtype=np.int64), weight=w)


def ngplus_sketch(n, q, seed=None):
    """NG+ (17): columns ``√(n/q) e_i`` drawn uniformly with replacement (as a RowSketch)."""
    return row_sampling(n, q, "uniform", replace=True, seed=seed)


def gaussian(n, q, seed=None):  # host: drawn on the host (design §6)
    """Gaussian sketch ``Ω ∈ R^{q×n}`` with i.i.d. ``N(0, 1/q)`` entries (any ``q ≥ 1``)."""
    n, q = _sizes(n, q)
    return GaussianSketch(omega=rng_of(seed).standard_normal((q, n)) / np.sqrt(q))
