"""Array-module selection: NumPy by default, CuPy when inputs are CuPy arrays.

Numerical code obtains its array module with :func:`xp_of` and never calls
``numpy.`` on array data directly. Random numbers are always drawn on the host
with ``numpy.random.default_rng`` and moved with :func:`asarray_like`, so CPU and
GPU runs see identical inputs (design §6).
"""
from __future__ import annotations

import numpy as np

from .errors import NotSPDError

try:  # pragma: no cover - exercised only where CuPy is installed
    import cupy as _cupy
except Exception:  # ImportError, or CUDA libraries missing
    _cupy = None


def get_xp(name: str):
    """Return the array module called ``name`` ("numpy" or "cupy")."""
    if not isinstance(name, str):
        from .errors import ArgumentTypeError

        raise ArgumentTypeError(f"backend name must be 'numpy' or 'cupy', got {type(name).__name__}")
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
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as e:
        from .errors import ArgumentTypeError

        raise ArgumentTypeError(f"a must be array-like, got {type(a).__name__} ({e})") from None


def asarray_like(a, like, dtype=None):
    """Move ``a`` onto the backend of ``like`` (optionally as ``dtype``). Refused with
    :class:`~refcurv.errors.ArgumentTypeError`: a ``dtype`` NumPy does not know, an ``a``
    that cannot be converted to it, and a complex ``a`` cast to a real ``dtype`` (its
    imaginary part would be dropped)."""
    from .errors import ArgumentTypeError

    if dtype is not None:
        if isinstance(dtype, (bool, np.bool_)):
            raise ArgumentTypeError(f"dtype must be None or a NumPy dtype, got {dtype!r}")
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # np.dtype("a")
                dtype = np.dtype(dtype)
        except (TypeError, ValueError):
            raise ArgumentTypeError(f"dtype must be None or a NumPy dtype, got {type(dtype).__name__} {dtype!r}") from None
    if a is None:
        raise ArgumentTypeError("a must be array-like, got None")
    xp = xp_of(like)
    try:
        if dtype is not None and dtype.kind != "c" and np.iscomplexobj(a):
            raise ArgumentTypeError(f"a is complex and dtype {dtype} is not: the imaginary part would be dropped")
        with np.errstate(over="ignore", invalid="ignore"):
            out = xp.asarray(a, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"a cannot be converted to an array of dtype {dtype}: {type(a).__name__} ({e})") from None
    if out.dtype.kind in "fc" and not bool(xp.isfinite(out).all()):
        src = to_numpy(a) if is_cupy_array(a) else np.asarray(a)
        if src.dtype.kind in "fciu" and bool(np.isfinite(src).all()):
            from .errors import NonFiniteError

            raise NonFiniteError(f"a overflows dtype {out.dtype}: its values are out of that dtype's range")
    return out


def default_float(a):
    """The float dtype computations on ``a`` run in: its own if floating, else float64 (for
    integer and bool arrays). Complex and non-numeric ``a`` are refused."""
    from .errors import ArgumentTypeError

    dt = None if isinstance(a, type) else getattr(a, "dtype", None)  # a class has a dtype descriptor
    if dt is None:
        try:
            dt = np.asarray(a).dtype
        except (TypeError, ValueError):
            dt = np.dtype(object)
    dt = np.dtype(dt)
    if dt.kind not in "fiub":
        raise ArgumentTypeError(f"a must be a real numeric array, got dtype {dt}")
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


class FactorizationError(NotSPDError, np.linalg.LinAlgError):
    """A factorization or triangular solve failed (the matrix is not numerically positive
    definite, or is singular): both a refcurv :class:`~refcurv.errors.NotSPDError` and the
    ``numpy.linalg.LinAlgError`` that callers of :func:`cholesky` have always caught."""


def _fail(msg):
    return FactorizationError(msg)


def _square_stack(A, name, empty_ok=False):
    """``A`` a finite real (…, n, n) stack with ``n >= 1`` (``n = 0`` too if ``empty_ok``;
    ints → float64)."""
    from .errors import ShapeError
    from .nn._checks import finite_array

    A = finite_array(A, name, xp=xp_of(A), min_ndim=2)
    if A.shape[-1] != A.shape[-2] or (A.size == 0 and not empty_ok):
        raise ShapeError(f"{name} must be a non-empty square matrix (or a stack (…, n, n)), got shape {A.shape}")
    return A


def _rhs(B, L, name="B"):
    from .errors import ShapeError
    from .nn._checks import finite_array

    B = finite_array(B, name, xp=xp_of(L, B), min_ndim=1)
    if B.shape[: L.ndim - 1] != L.shape[:-1] or B.ndim > L.ndim:
        raise ShapeError(f"{name} must be (…, {L.shape[-1]}) or (…, {L.shape[-1]}, k) matching {L.shape}, got {B.shape}")
    return B


def _finite_out(X, what):
    from .nn._checks import finite_result

    return finite_result(X, what)


def cholesky(A):
    """Lower Cholesky factor of a finite real (stack of) square matrix ``A``; a matrix that is
    not numerically positive definite raises a :class:`~refcurv.errors.NotSPDError` that is
    also a ``numpy.linalg.LinAlgError`` (which callers have always caught)."""
    A = _square_stack(A, "A")
    xp = xp_of(A)
    try:
        with _linalg_guard(xp):
            L = xp.linalg.cholesky(A)
    except np.linalg.LinAlgError as e:
        raise _fail(f"A is not numerically positive definite (cholesky failed: {e})") from None
    if xp is not np and not bool(xp.isfinite(L).all()):  # pragma: no cover
        raise _fail("A is not numerically positive definite (cholesky failed)")
    return L


def solve_triangular(L, B, lower=True, trans=False):
    """Solve ``L X = B`` (``Lᵀ X = B`` with ``trans``) for triangular ``L``: ``L`` finite
    real square, ``B`` ``(n,)``/``(n, k)`` (or stacks matching ``L``), ``lower``/``trans``
    bools; a singular ``L`` raises a :class:`~refcurv.errors.NotSPDError` (also a
    ``LinAlgError``), an overflowing solution :class:`~refcurv.errors.NonFiniteError`."""
    from .nn._checks import check_bool, quiet

    lower, trans = check_bool(lower, "lower"), check_bool(trans, "trans")
    L = _square_stack(L, "L", empty_ok=True)
    B = _rhs(B, L)
    with quiet():
        X = _solve_triangular(L, B, lower, trans)
    return _finite_out(X, "solve_triangular: the solution X")


def _solve_triangular(L, B, lower=True, trans=False):
    xp = xp_of(L, B)
    if xp is np:
        import scipy.linalg

        try:
            return scipy.linalg.solve_triangular(L, B, lower=lower, trans=1 if trans else 0)
        except np.linalg.LinAlgError as e:
            raise _fail(f"L is singular ({e})") from None
    import cupyx.scipy.linalg  # pragma: no cover

    return cupyx.scipy.linalg.solve_triangular(L, B, lower=lower, trans=1 if trans else 0)  # pragma: no cover


def cho_solve(L, B):
    """Solve ``(L Lᵀ) X = B`` from the lower factor (CuPy has no ``cho_solve``); arguments as
    :func:`solve_triangular`."""
    from .nn._checks import quiet

    L = _square_stack(L, "L", empty_ok=True)
    B = _rhs(B, L)
    with quiet():
        X = _solve_triangular(L, _solve_triangular(L, B, lower=True), lower=True, trans=True)
    return _finite_out(X, "cho_solve: the solution X")


def eigh(A):
    """Eigen-decomposition ``(w, V)`` of a finite real symmetric (stack of) matrix ``A``
    (only its lower triangle is read); a failure to converge raises a
    :class:`~refcurv.errors.NotSPDError` that is also a ``LinAlgError``."""
    A = _square_stack(A, "A")
    xp = xp_of(A)
    try:
        with _linalg_guard(xp):
            return xp.linalg.eigh(A)
    except np.linalg.LinAlgError as e:
        raise _fail(f"eigh of A did not converge ({e})") from None


def _block_diag(blocks):
    """The block-diagonal matrix of the 2-d ``blocks`` (``scipy.linalg.block_diag``) on their
    backend, in their common dtype: SciPy's would copy CuPy blocks to the host (or fail)."""
    xp = xp_of(blocks)
    rows, cols = sum(B.shape[0] for B in blocks), sum(B.shape[1] for B in blocks)
    out = xp.zeros((rows, cols), dtype=np.result_type(*[B.dtype for B in blocks]))
    r = c = 0
    for B in blocks:  # a loop over blocks (layers), not over samples
        out[r:r + B.shape[0], c:c + B.shape[1]] = B
        r, c = r + B.shape[0], c + B.shape[1]
    return out
