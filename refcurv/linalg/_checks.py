"""Argument checks shared by the linear-algebra kernels (the README's input policy).

Every check raises a :class:`~refcurv.errors.RefcurvError` subclass whose one-line message
names the argument, what was expected and what was given:

* scalars (:func:`real`, :func:`positive`, :func:`nonnegative`, :func:`in_open_unit`,
  :func:`integer`): a real Python/NumPy number (or a 0-d real array), never a ``bool``,
  ``None``, string or complex number — checked *before* NumPy sees the value; a bad scalar is
  :class:`HyperParameterError` whatever is wrong with it; flags (:func:`flag`) must be real
  bools and labels (:func:`label`) strings, else :class:`ArgumentTypeError`;
* arrays (:func:`finite` and the shape checks built on it): real arrays (or nested lists of
  numbers). Integer arrays are converted to float64 (documented); complex arrays are refused
  (the imaginary part would be dropped), as are boolean, string and object arrays; NaN/Inf
  is refused; zero-size arrays are refused unless the caller says otherwise;
* results (:func:`result`): a non-finite result from finite input (overflow) raises
  :class:`~refcurv.errors.NonFiniteError` naming the quantity.
"""
from __future__ import annotations

import os

import math

import numpy as np

from ..backend import is_cupy_array, xp_of
from ..errors import ArgumentTypeError, HyperParameterError, NonFiniteError, NotSPDError, ShapeError

_REAL = (int, float, np.integer, np.floating)

#: debug mode: preconditions that are the caller's duty because checking them would cost more
#: than the kernel (e.g. ``H`` SPD in the O(n²) BFGS updates: an O(n³) Cholesky) are checked
#: too. On when the environment variable ``REFCURV_DEBUG`` is set (not ``""``/``"0"``) at import;
#: tests may set ``refcurv.linalg._checks.DEBUG`` directly.
DEBUG = os.environ.get("REFCURV_DEBUG", "").strip() not in ("", "0")


def _given(value):
    """A short description of ``value`` for an error message."""
    if isinstance(value, (np.ndarray,)) or is_cupy_array(value):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    if isinstance(value, (bool, int, float, complex, np.number, str, bytes)) or value is None:
        r = repr(value)
        return r if len(r) <= 40 else r[:37] + "..."
    return type(value).__name__


# ------------------------------------------------------------------ scalars
def real(value, name, what="a finite real number"):
    """``value`` as a finite Python float; anything else — bools, ``None``, strings, complex
    numbers, non-scalar arrays, NaN/Inf — is :class:`HyperParameterError` (as the methods'
    ``check_*`` helpers: a scalar hyper-parameter with a bad value or type)."""
    if (isinstance(value, np.ndarray) or is_cupy_array(value)) and value.ndim == 0 and value.dtype.kind in "fiu":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, _REAL):
        raise HyperParameterError(f"{name} must be {what}, got {_given(value)}")
    if not np.isfinite(value):  # host: value is a Python/NumPy scalar hyper-parameter here, not array data
        raise HyperParameterError(f"{name} must be {what}, got {value!r}")
    return float(value)


def positive(value, name):
    v = real(value, name, "a finite number > 0")
    if not v > 0:
        raise HyperParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def nonnegative(value, name):
    v = real(value, name, "a finite number >= 0")
    if not v >= 0:
        raise HyperParameterError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def in_open_unit(value, name):
    v = real(value, name, "a finite number in (0, 1)")
    if not 0 < v < 1:
        raise HyperParameterError(f"{name} must lie in (0, 1), got {value!r}")
    return value


def integer(value, name, minimum=0):
    """``value`` as a Python int ``>= minimum`` (bools and floats are refused)."""
    what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise HyperParameterError(f"{name} must be {what}, got {_given(value)}")
    if value < minimum:
        raise HyperParameterError(f"{name} must be {what}, got {value!r}")
    return int(value)


def flag(value, name):
    """A real ``bool`` (truthy strings such as ``'no'`` are refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {_given(value)}")
    return bool(value)


def label(value, name):
    """A string label (used in messages only)."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a str, got {_given(value)}")
    return value


def choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise HyperParameterError(f"{name} must be one of {tuple(choices)}, got {_given(value)}")
    return value


# ------------------------------------------------------------------ arrays
def finite(a, name, empty_ok=False):
    """``a`` as a finite real array on its backend. Integer arrays (and nested lists of
    numbers) become float64; complex, boolean, string and object arrays are refused
    (:class:`ArgumentTypeError`), NaN/Inf is :class:`NonFiniteError`, and a zero-size array is
    :class:`ShapeError` unless ``empty_ok``."""
    if a is None or isinstance(a, (str, bytes, dict, set, bool, np.bool_, complex)):
        raise ArgumentTypeError(f"{name} must be a real array, got {_given(a)}")
    xp = xp_of(a)
    try:
        a = xp.asarray(a)
    except (TypeError, ValueError) as e:  # ragged lists, objects NumPy cannot read
        raise ArgumentTypeError(f"{name} must be a real array, got {_given(a)} ({e})") from None
    kind = a.dtype.kind
    if kind == "c":
        raise ArgumentTypeError(f"{name} must be a real array, got complex dtype {a.dtype} "
                                "(the imaginary part would be dropped)")
    if kind not in "fiu":
        raise ArgumentTypeError(f"{name} must be a real array, got dtype {a.dtype}")
    if kind != "f":
        a = a.astype(np.float64)
    if a.size == 0 and not empty_ok:
        raise ShapeError(f"{name} must not be empty, got shape {tuple(a.shape)}")
    if not bool(xp.isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return a


def array(a, name, ndim, empty_ok=False, what=None):
    """A finite real array of exactly ``ndim`` dimensions."""
    a = finite(a, name, empty_ok=empty_ok)
    if a.ndim != ndim:
        raise ShapeError(f"{name} must be {what or f'a {ndim}-d array'}, got shape {tuple(a.shape)}")
    return a


def matrix(A, name, what="a matrix"):
    return array(A, name, 2, what=what)


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


def spd(A, name):
    """Symmetric (:func:`symmetric`) and numerically positive definite (Cholesky succeeds)."""
    from ..backend import cholesky

    A = symmetric(A, name)
    try:
        cholesky(A)
    except np.linalg.LinAlgError:
        raise NotSPDError(f"{name} must be symmetric positive definite (Cholesky failed)") from None
    return A


def debug_spd(A, name):
    """:func:`spd` in debug mode (:data:`DEBUG`), else nothing: a precondition that is the
    caller's duty."""
    if DEBUG:
        spd(A, name)
    return A


def vector(v, name, n=None):
    v = finite(v, name)
    if v.ndim != 1 or (n is not None and v.shape[0] != n):
        raise ShapeError(f"{name} must be a vector of length {n if n is not None else 'n'}, got shape {v.shape}")
    return v


def rows_match(B, n, name):
    """A right-hand side with ``n ≥ 1`` rows: vector ``(n,)`` or matrix ``(n, k)``; ``k = 0``
    columns is allowed (no right-hand sides: an empty result)."""
    B = finite(B, name, empty_ok=True)
    if B.ndim not in (1, 2) or B.shape[0] != n:
        raise ShapeError(f"{name} must have {n} rows (shape (n,) or (n, k)), got shape {B.shape}")
    return B


# ------------------------------------------------------------------ results
def _all_finite(x):
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v) for v in x)
    if isinstance(x, (float, np.floating)):
        return math.isfinite(x)  # a host scalar (Python or NumPy float)
    if (isinstance(x, np.ndarray) or is_cupy_array(x)) and x.dtype.kind in "fc":
        return bool(xp_of(x).isfinite(x).all())
    return True


def result(x, what):
    """``x`` (an array, a float, or a tuple/list of them) if finite, else
    :class:`NonFiniteError` naming ``what``: finite inputs whose result overflowed."""
    if not _all_finite(x):
        raise NonFiniteError(f"{what} is not finite (overflow: the inputs are finite but too large)")
    return x
