"""``compare(actual, expected)``: one verdict with the tolerance model.

The error is the relative Frobenius error ``‖a − e‖ / ‖e‖`` (``‖a − e‖`` when ``e = 0``),
judged against :func:`refcurv.testing.tolerance.tolerance` ``(n, cond, dtype, kind)``:
``C · n · u · κ`` (``kind="forward"``) or ``C · n · u`` (``"residual"``) with ``u`` the unit
roundoff of the implementation's dtype (float32 results are judged at float32 accuracy),
``n`` the number of accumulated terms and ``κ`` the condition number of the problem (for
solves and directions; 1 for products and sums).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentTypeError, HyperParameterError, NonFiniteError, ShapeError
from .tolerance import tolerance


@dataclass(frozen=True)
class Verdict:
    """Result of :func:`compare`: ``ok`` iff ``error <= tolerance``."""

    ok: bool
    error: float
    tolerance: float
    dtype: str
    n: int
    cond: float
    kind: str

    def __bool__(self):
        return bool(self.ok)

    def __str__(self):
        return (f"{'ok' if self.ok else 'FAIL'}: relative error {self.error:.3e} "
                f"{'<=' if self.ok else '>'} tolerance {self.tolerance:.3e} "
                f"({self.kind}, dtype {self.dtype}, n = {self.n}, cond = {self.cond:.3g})")


def as_numpy(a, name):
    """A NumPy array from an array, a torch tensor (detached, on the host) or a number;
    a list/tuple of those is flattened and concatenated (per-layer or per-tensor results)."""
    if isinstance(a, (list, tuple)):
        if len(a) == 0:
            raise ShapeError(f"{name} is an empty list")
        parts = [as_numpy(b, f"{name}[{j}]") for j, b in enumerate(a)]
        dts = {p.dtype for p in parts}
        if len(dts) > 1:
            raise ArgumentTypeError(f"{name} mixes dtypes {sorted(map(str, dts))}")
        return np.concatenate([p.ravel() for p in parts])
    if a is None:
        raise ArgumentTypeError(f"{name} is None, expected an array")
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except Exception as e:  # noqa: BLE001 - one line instead of NumPy's traceback
        raise ArgumentTypeError(f"{name} is not an array: {type(a).__name__} ({e})") from None
    if arr.dtype.kind not in "fiu":
        raise ArgumentTypeError(f"{name} must be a real array, got dtype {arr.dtype} ({type(a).__name__})")
    return arr


def compare(actual, expected, *, dtype=None, n=None, cond=1.0, kind="forward"):
    """:class:`Verdict` of ``actual`` (the implementation's result) against ``expected``
    (refcurv's float64 reference), same shape. ``dtype``: the implementation's precision
    (default: ``actual``'s dtype; integers count as float64); ``n``: the number of accumulated
    terms (default: the longest axis of ``expected``); ``cond``: the condition number (≥ 1);
    ``kind``: ``"forward"`` or ``"residual"``. A NaN/Inf in ``actual`` is a failing verdict
    (error ``inf``), in ``expected`` an error."""
    a = as_numpy(actual, "actual")
    e = as_numpy(expected, "expected")
    if a.shape != e.shape:
        raise ShapeError(f"actual has shape {a.shape}, expected {e.shape}")
    if not np.all(np.isfinite(e)):
        raise NonFiniteError("expected contains NaN or Inf")
    if dtype is None:
        dtype = a.dtype if a.dtype.kind == "f" else np.float64
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ArgumentTypeError(f"dtype must be a NumPy floating dtype, got {dtype!r}") from None
    if dt.kind != "f":
        raise ArgumentTypeError(f"dtype must be a floating dtype, got {dt}")
    if n is None:
        n = max(e.shape) if e.ndim else 1
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise HyperParameterError(f"n must be a positive int (the number of accumulated terms), got {n!r}")
    if isinstance(cond, (bool, np.bool_)) or not isinstance(cond, (int, float, np.integer, np.floating)) \
            or not np.isfinite(cond) or cond < 1:
        raise HyperParameterError(f"cond must be a finite number >= 1, got {cond!r}")
    if kind not in ("forward", "residual"):
        raise HyperParameterError(f"kind must be 'forward' or 'residual', got {kind!r}")
    tol = float(tolerance(int(n), float(cond), dt, kind))
    if not np.all(np.isfinite(a)):
        return Verdict(False, float("inf"), tol, str(dt), int(n), float(cond), kind)
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    diff = float(np.linalg.norm((a64 - e64).ravel()))
    ref = float(np.linalg.norm(e64.ravel()))
    err = diff / ref if ref > 0 else diff
    return Verdict(bool(err <= tol), err, tol, str(dt), int(n), float(cond), kind)
