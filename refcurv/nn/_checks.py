"""Argument checks shared by :mod:`refcurv.nn`, :mod:`refcurv.vec`, :mod:`refcurv.backend`
and :mod:`refcurv.train` (the input policy of the README): every refusal is a
:class:`~refcurv.errors.RefcurvError` whose one-line message names the argument, what was
expected and what was given.

Kept free of imports from :mod:`refcurv.nn` modules so that :mod:`refcurv.backend` can use it.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings

import numpy as np

from ..errors import ArgumentTypeError, HyperParameterError, NonFiniteError


def describe(value):
    """A short description of ``value`` for an error message (arrays by dtype and shape)."""
    if isinstance(value, type):  # a class such as numpy.float64 has dtype/shape descriptors
        return f"the type {value.__module__}.{value.__qualname__}"
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    if isinstance(value, (bool, np.bool_, numbers.Number, str, bytes)) or value is None:
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _xp(a):
    from ..backend import xp_of

    return xp_of(a)


def real_array(a, name, xp=None, int_dtype=np.float64, kinds="fiu"):
    """``a`` as a real floating array of the backend ``xp`` (default: ``a``'s own).

    Accepted: floating arrays (kept), integer arrays (converted to ``int_dtype``, float64 by
    default; kept if ``None``) and nested lists/scalars of those (dtype kinds ``kinds``). Refused (:class:`ArgumentTypeError`):
    ``None``, strings, bytes, non-numeric objects, bool and complex arrays (a complex array's
    imaginary part would be dropped)."""
    if a is None or isinstance(a, (str, bytes, dict, set, bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a real numeric array, got {describe(a)}")
    xp = xp or _xp(a)
    try:
        arr = xp.asarray(a)
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"{name} must be a real numeric array, got {describe(a)} ({e})") from None
    kind = arr.dtype.kind
    if kind == "c" and "c" not in kinds:
        raise ArgumentTypeError(
            f"{name} must be real, got complex dtype {arr.dtype} (the imaginary part would be dropped)")
    if kind not in kinds:
        raise ArgumentTypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if kind in "iu" and int_dtype is not None:
        arr = arr.astype(int_dtype)
    return arr


def check_finite(a, name):
    """Raise :class:`NonFiniteError` if the array ``a`` holds NaN or Inf."""
    if not bool(_xp(a).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return a


def finite_array(a, name, xp=None, ndim=None, min_ndim=None):
    """:func:`real_array`, finite, with ``ndim`` dimensions (or at least ``min_ndim``)."""
    from ..errors import ShapeError

    arr = real_array(a, name, xp=xp)
    if ndim is not None and arr.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
    if min_ndim is not None and arr.ndim < min_ndim:
        raise ShapeError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(arr.shape)}")
    return check_finite(arr, name)


def check_bool(value, name):
    """``value`` as a bool; only ``True``/``False`` (and NumPy bools) are accepted, never a
    truthy string such as ``'no'``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {describe(value)}")


def check_int(value, name, minimum=None):
    """``value`` as an int (bools refused), ``>= minimum`` if given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {describe(value)}")
    if minimum is not None and value < minimum:
        raise HyperParameterError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_callable(value, name, allow_none=False):
    if (value is None and allow_none) or callable(value):
        return value
    raise ArgumentTypeError(f"{name} must be {'None or ' if allow_none else ''}a callable, got {describe(value)}")


def _leaves(out):
    if isinstance(out, (list, tuple)):
        for v in out:
            yield from _leaves(v)
    elif isinstance(out, dict):
        for v in out.values():
            yield from _leaves(v)
    elif hasattr(out, "dtype") and hasattr(out, "shape"):
        yield out


def finite_result(out, what):
    """Return ``out`` (an array or nested lists/tuples/dicts of arrays) if every floating
    array in it is finite; else raise :class:`NonFiniteError` naming ``what`` (the result of a
    computation on finite input that overflowed)."""
    for a in _leaves(out):
        if a.dtype.kind in "fc" and not bool(_xp(a).isfinite(a).all()):
            raise NonFiniteError(
                f"{what} is not finite (overflow from finite input: scale the inputs or parameters down)")
    return out


@contextlib.contextmanager
def quiet():
    """Silence NumPy's overflow/invalid warnings: an overflow is reported by
    :func:`finite_result` as a :class:`NonFiniteError` instead."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        yield


def check_dtype(dtype, name, kinds="f"):
    """``dtype`` as a NumPy dtype of one of ``kinds`` (default: floating)."""
    if dtype is None or isinstance(dtype, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a floating dtype such as numpy.float64, got {describe(dtype)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # np.dtype("a")
            dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"{name} must be a floating dtype such as numpy.float64, got {describe(dtype)}") from None
    if dt.kind not in kinds:
        raise HyperParameterError(
            f"{name} must be a floating dtype such as numpy.float64 or numpy.float32, got {dt}")
    return dt
