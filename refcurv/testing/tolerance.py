"""Tolerance model for comparisons with a float64 reference (used by the tests and the
method contract; :func:`tolerance` is the one formula).

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


def tolerance(n, cond=1.0, dtype=np.float64, kind="forward", C=100.0):
    """Relative tolerance for a quantity computed in ``dtype`` against a float64 reference.

    ``u`` is the unit roundoff of ``dtype`` (``finfo(dtype).eps``, the float64 value for
    integer types), ``n`` the size of the system (the number of terms accumulated), ``κ``
    ``cond`` its condition number:

    * ``kind="forward"``: the forward error of a backward-stable algorithm (a solve, an
      inverse, an inverse root, a direction ``−C⁻¹g``), ``C · n · u · κ`` relative to the
      reference's norm (Higham, *Accuracy and Stability*, §7.1: backward error ``O(n u)``
      times the condition number);
    * ``kind="residual"``: a backward error or residual, ``C · n · u`` relative to the size of
      the terms that cancel (``‖A‖ ‖x‖`` for ``Ax − b``), independent of κ.

    ``C = 100`` absorbs the algorithm's constant (the bounds' ``γ_n = n u / (1 − n u)`` and
    small-integer factors); ``u`` is never taken below float64's (the reference is computed
    in float64), so a float32 input is judged at float32 accuracy and a float64 one at float64.
    """
    dt = np.dtype(dtype)
    u = max(np.finfo(dt).eps, EPS) if dt.kind in "fc" else EPS
    if kind == "forward":
        return C * n * u * cond
    if kind == "residual":
        return C * n * u
    raise ValueError(f"kind must be 'forward' or 'residual', got {kind!r}")


def forward_tol(n, cond, C=100.0):
    """:func:`tolerance` of a float64 forward error: ``C · n · eps · κ``."""
    return tolerance(n, cond, np.float64, "forward", C)


def residual_tol(n, C=100.0):
    """:func:`tolerance` of a float64 residual/backward error: ``C · n · eps`` relative to
    ``‖A‖ ‖x‖``."""
    return tolerance(n, 1.0, np.float64, "residual", C)


def assert_clt(X, truth, level=1e-3):
    """Monte-Carlo check of ``E[X_s] = truth`` from i.i.d. draws ``X`` ``(S, ...)``: every
    entry of the sample mean lies within the Bonferroni-corrected normal bound (family-wise
    level ``level``) of ``truth``, using the standard error estimated from the draws.
    Entries whose draws do not vary must equal ``truth`` to rounding."""
    from scipy.stats import norm

    X = np.asarray(X, dtype=float)
    truth = np.asarray(truth, dtype=float)
    S = X.shape[0]
    mean = X.mean(axis=0)
    se = X.std(axis=0, ddof=1) / np.sqrt(S)
    scale = max(float(np.abs(truth).max()), float(np.abs(X).max()), 1e-300)
    varies = se > 1e-12 * scale
    if varies.any():
        z = np.abs(mean - truth)[varies] / se[varies]
        bound = norm.ppf(1 - level / (2 * varies.sum()))
        assert z.max() <= bound, f"max standardized error {z.max():.2f} > {bound:.2f}"
    assert np.all(np.abs(mean - truth)[~varies] <= 1e-10 * scale), "non-varying entries differ"
