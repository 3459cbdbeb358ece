"""Input-policy fuzzing (requires ``hypothesis``): every public callable, given a valid call
with one argument replaced by a malformed value, either returns a finite result or raises a
:class:`~refcurv.errors.RefcurvError` — never a raw NumPy/Python error, and never a non-finite
result from finite input (the README's input policy).

A test module lists, per public callable, a *valid example* ``(args, kwargs)``; the
``public_callables`` listing of each module is checked against those examples so that no
public entry point escapes the fuzz test.
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np
from hypothesis import strategies as st

from ..errors import RefcurvError

#: malformed values, by name (the name appears in a failure message)
MALFORMED = {
    "None": None,
    "str": "a",
    "bytes": b"x",
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "-1": -1,
    "0": 0,
    "-0.5": -0.5,
    "1e200": 1e200,
    "True": True,
    "False": False,
    "empty list": [],
    "list": [1.0, 2.0],
    "dict": {},
    "object": object(),
    "empty array": np.zeros(0),
    "0x0 array": np.zeros((0, 0)),
    "scalar array": np.array(1.5),
    "complex array": np.ones((3, 3), dtype=complex),
    "int array": np.ones((3, 3), dtype=np.int64),
    "bool array": np.ones((3, 3), dtype=bool),
    "nan array": np.full((3, 3), np.nan),
    "huge array": np.full((3, 3), 1e200),
    "3-d array": np.ones((2, 2, 2)),
    "a type": np.float64,
}


def malformed():
    """Hypothesis strategy over ``(name, value)`` of :data:`MALFORMED`."""
    return st.sampled_from(sorted(MALFORMED.items(), key=lambda kv: kv[0]))


def public_callables(module):
    """``{name: object}`` of the public functions and classes *defined in* ``module`` (or
    listed in its ``__all__``)."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    out = {}
    for n in names:
        obj = getattr(module, n)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            if getattr(obj, "__module__", "").startswith(module.__name__) or names is getattr(module, "__all__", None):
                if inspect.isclass(obj) and issubclass(obj, BaseException):
                    continue
                out[n] = obj
    return out


def _finite(x):
    """True if every floating array / number inside ``x`` is finite (non-numeric leaves are
    ignored)."""
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (float, complex, np.floating, np.complexfloating)):
        return bool(np.isfinite(x))
    if isinstance(x, np.ndarray) and x.dtype.kind in "fc":
        return bool(np.isfinite(x).all())
    return True


def corrupt(args, kwargs, position, value):
    """``(args, kwargs)`` with argument ``position`` (an int index into ``args`` or a keyword
    name) replaced by ``value``."""
    args, kwargs = list(args), dict(kwargs)
    if isinstance(position, int):
        args[position] = value
    else:
        kwargs[position] = value
    return args, kwargs


def positions(args, kwargs):
    return list(range(len(args))) + sorted(kwargs)


def check_call(name, fn, args, kwargs, what=""):
    """Call ``fn(*args, **kwargs)``: a :class:`RefcurvError` passes (refused), any other
    exception fails, and a result that is not finite although every input is fails.
    Returns ``"refused"`` or ``"accepted"``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            try:
                out = fn(*args, **kwargs)
            except RefcurvError:
                return "refused"
            except Exception as e:  # the policy: every refusal is a RefcurvError
                raise AssertionError(f"{name}({what}) raised {type(e).__name__}: {e}") from e
    if _finite(list(args) + list(kwargs.values())) and not _finite(out):
        raise AssertionError(f"{name}({what}) returned a non-finite result from finite input")
    return "accepted"


def fuzzable(examples):
    """The keys of ``examples`` whose valid call has at least one argument to corrupt."""
    return sorted(k for k in examples if positions(*examples[k]()[1:]))


def fuzz_one(examples, key, data):
    """One hypothesis example: the valid call of ``key`` with one argument (drawn) replaced by
    one malformed value (drawn), checked by :func:`check_call`."""
    fn, args, kwargs = examples[key]()
    pos = data.draw(st.sampled_from(positions(args, kwargs)))
    name, value = data.draw(malformed())
    args, kwargs = corrupt(args, kwargs, pos, value)
    return check_call(key, fn, args, kwargs, f"{pos}={name}")
