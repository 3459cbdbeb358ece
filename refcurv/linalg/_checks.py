"""Argument checks shared by the linear-algebra kernels."""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..errors import HyperParameterError, NonFiniteError, NotSPDError, ShapeError


def finite(a, name):
    a = xp_of(a).asarray(a)
    if a.dtype.kind not in "fc":
        a = a.astype(np.float64)
    if not bool(xp_of(a).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return a


def positive(value, name):
    if not np.isfinite(value) or not value > 0:
        raise HyperParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def in_open_unit(value, name):
    if not np.isfinite(value) or not 0 < value < 1:
        raise HyperParameterError(f"{name} must lie in (0, 1), got {value!r}")
    return value


def square(A, name):
    A = finite(A, name)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ShapeError(f"{name} must be a square matrix, got shape {A.shape}")
    return A


def symmetric(A, name, rtol=1e-10):
    """Square, finite and symmetric to ``rtol`` relative to its largest entry."""
    A = square(A, name)
    xp = xp_of(A)
    scale = float(xp.abs(A).max()) if A.size else 0.0
    if float(xp.abs(A - A.T).max()) > rtol * max(scale, 1e-300):
        raise NotSPDError(f"{name} must be symmetric")
    return A


def vector(v, name, n=None):
    v = finite(v, name)
    if v.ndim != 1 or (n is not None and v.shape[0] != n):
        raise ShapeError(f"{name} must be a vector of length {n if n is not None else 'n'}, got shape {v.shape}")
    return v


def rows_match(B, n, name):
    """A right-hand side with ``n`` rows: vector ``(n,)`` or matrix ``(n, k)``."""
    B = finite(B, name)
    if B.ndim not in (1, 2) or B.shape[0] != n:
        raise ShapeError(f"{name} must have {n} rows (shape (n,) or (n, k)), got shape {B.shape}")
    return B
