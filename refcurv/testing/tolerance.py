"""Tolerance model for comparisons with a reference (used by the tests).

Autodiff results from two exact algorithms (refcurv's batched backprop/R-op vs autograd's
tracing) differ only by rounding: for these tiny networks (depth <= 4, widths <= 6,
|activations| = O(1)) the accumulated error is O(depth · width · eps) ~ 1e-14 relative,
so the issue's 1e-10 relative bound leaves four orders of margin and still catches any
wrong term (which shows up at O(1)).
"""
import numpy as np

AUTODIFF_RTOL = 1e-10
EPS = np.finfo(np.float64).eps


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ (Frobenius), with ‖b‖ floored at 1e-300."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_close(a, b, rtol=AUTODIFF_RTOL, atol=1e-13, what=""):
    """‖a − b‖ ≤ rtol ‖b‖ + atol; the 1e-13 absolute floor only matters when b is (near) zero,
    e.g. gradients through dead ReLUs, where both sides are exact zeros up to rounding."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    err = float(np.linalg.norm(a - b))
    bound = rtol * float(np.linalg.norm(b)) + atol
    assert err <= bound, f"{what}: ‖a − b‖ = {err:.3e} > {bound:.3e} (‖b‖ = {np.linalg.norm(b):.3e})"
