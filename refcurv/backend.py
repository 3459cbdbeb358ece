"""Array-module selection: NumPy by default, CuPy when inputs are CuPy arrays.

Numerical code obtains its array module with :func:`xp_of` and never calls
``numpy.`` on array data directly. Random numbers are always drawn on the host
with ``numpy.random.default_rng`` and moved with :func:`asarray_like`, so CPU and
GPU runs see identical inputs (design §6).
"""
from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised only where CuPy is installed
    import cupy as _cupy
except Exception:  # ImportError, or CUDA libraries missing
    _cupy = None


def get_xp(name: str):
    """Return the array module called ``name`` ("numpy" or "cupy")."""
    if name == "numpy":
        return np
    if name == "cupy":
        if _cupy is None:
            from .errors import HyperParameterError

            raise HyperParameterError("backend 'cupy' requested but cupy cannot be imported")
        return _cupy
    from .errors import HyperParameterError

    raise HyperParameterError(f"backend must be 'numpy' or 'cupy', got {name!r}")


def is_cupy_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def xp_of(*arrays):
    """The array module of the inputs: CuPy if any input is a CuPy array."""
    for a in arrays:
        if isinstance(a, (list, tuple)):
            if any(is_cupy_array(b) for b in a):
                return _cupy
        elif is_cupy_array(a):
            return _cupy
    return np


def to_numpy(a):
    """Copy an array (NumPy or CuPy) to a host NumPy array."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def asarray_like(a, like, dtype=None):
    """Move ``a`` onto the backend of ``like``."""
    return xp_of(like).asarray(a, dtype=dtype)


def default_float(a):
    """The float dtype computations on ``a`` run in: its own if floating, else float64."""
    dt = np.dtype(a.dtype)
    return dt if dt.kind == "f" else np.dtype(np.float64)


def rng_of(seed) -> np.random.Generator:
    """A host NumPy ``Generator`` from ``None``, a non-negative int seed, a ``SeedSequence``
    or a ``Generator``; anything else is an :class:`~refcurv.errors.ArgumentTypeError`
    (NumPy would accept arrays and floats with surprising meanings)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if seed < 0:
            from .errors import HyperParameterError

            raise HyperParameterError(f"seed must be a non-negative int, got {seed!r}")
        return np.random.default_rng(int(seed))
    from .errors import ArgumentTypeError

    raise ArgumentTypeError(
        f"seed must be None, a non-negative int, a numpy SeedSequence or Generator, got {type(seed).__name__}")


# ---------------------------------------------------------------- factorizations
# CuPy's linear-algebra failures are silent (NaNs) unless run under
# cupyx.errstate(linalg="raise"); every factorization goes through _linalg_guard.
class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _linalg_guard(xp):
    if xp is np:
        return _NullContext()
    import cupyx  # pragma: no cover

    return cupyx.errstate(linalg="raise")  # pragma: no cover


def cholesky(A):
    """Lower Cholesky factor; raises ``numpy.linalg.LinAlgError`` (or CuPy's) on failure."""
    xp = xp_of(A)
    with _linalg_guard(xp):
        L = xp.linalg.cholesky(A)
    if xp is not np and not bool(xp.isfinite(L).all()):  # pragma: no cover
        raise np.linalg.LinAlgError("cholesky failed")
    return L


def solve_triangular(L, B, lower=True, trans=False):
    xp = xp_of(L, B)
    if xp is np:
        import scipy.linalg

        return scipy.linalg.solve_triangular(L, B, lower=lower, trans=1 if trans else 0)
    import cupyx.scipy.linalg  # pragma: no cover

    return cupyx.scipy.linalg.solve_triangular(L, B, lower=lower, trans=1 if trans else 0)  # pragma: no cover


def cho_solve(L, B):
    """Solve ``(L Lᵀ) X = B`` from the lower factor (CuPy has no ``cho_solve``)."""
    return solve_triangular(L, solve_triangular(L, B, lower=True), lower=True, trans=True)


def eigh(A):
    xp = xp_of(A)
    with _linalg_guard(xp):
        return xp.linalg.eigh(A)
