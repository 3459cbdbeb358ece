"""Kronecker-factor kernels shared by the Kronecker methods and public for users: damping
splits between factors, factor statistics, the minibatched Hessian action. Each function
names its seed and equation; each has its own test.

Vectorization: refcurv's row-major ``vec`` of ``W ∈ R^{out×d}``, so a layer block is
``G ⊗ A`` (``G`` on the output side, ``A`` on the input side) with
``(G ⊗ A) vec(W) = vec(G W Aᵀ)``; the papers' column-major ``vec`` reads ``A ⊗ G``.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..errors import HyperParameterError
from . import _checks as C

# ---------------------------------------------------------------- KFAC (kfac)

#: the damping splits of :func:`damped_split`
SPLITS = ("pi", "sqrt")


def split_pi(Omega, Gamma):
    """The factored-Tikhonov split ``π = √( (tr Ω / dim Ω) / (tr Γ / dim Γ) )`` (seed 003,
    Algorithm 12 line 19: ``π_l = √(trace(Ω_l ⊗ I) / trace(I ⊗ Γ_l))``, whose identity
    factors have the other factor's size, so the ratio is the ratio of the mean
    eigenvalues; Martens & Grosse 2015 §6.3). ``1.0`` when either trace is not positive
    (an all-zero factor, e.g. a dead layer), where the ratio is undefined. A Python float."""
    xp = xp_of(Omega)
    a = float(xp.trace(Omega)) / Omega.shape[0]
    g = float(xp.trace(Gamma)) / Gamma.shape[0]
    return float(np.sqrt(a / g)) if a > 0 and g > 0 else 1.0


def damped_split(Omega, Gamma, damping, split="pi"):
    """The damped Kronecker factors ``(Ω + π√λ I, Γ + (√λ/π) I, π)`` of KFAC (seed 003,
    Algorithm 12 line 19 for ``split="pi"`` with ``π`` from :func:`split_pi`; Algorithm 7
    line 11 for ``split="sqrt"``, ``π = 1``).

    The damping terms multiply to ``λ`` whatever ``π``: ``(Γ + (√λ/π)I) ⊗ (Ω + π√λI) =
    Γ ⊗ Ω + π√λ (Γ ⊗ I) + (√λ/π)(I ⊗ Ω) + λ I`` (row-major block ``G ⊗ A``). With the trace
    split the damped product is invariant to rescaling the factors ``(cΩ, Γ/c)`` (``π``
    scales by ``c``), so KFAC's expand and KFC scaling conventions, which differ by the
    number of locations, damp alike. ``Omega`` ``(d, d)`` and ``Gamma`` ``(o, o)`` are
    symmetric PSD; the result keeps their dtype (``π`` and ``√λ`` enter as Python floats)."""
    Omega = C.symmetric(Omega, "Omega")
    Gamma = C.symmetric(Gamma, "Gamma")
    C.positive(damping, "damping")
    if split not in SPLITS:
        raise HyperParameterError(f"split must be one of {SPLITS}, got {split!r}")
    xp = xp_of(Omega)
    pi = split_pi(Omega, Gamma) if split == "pi" else 1.0
    r = float(np.sqrt(damping))  # Python floats: a NumPy float64 would promote float32 factors
    return (Omega + pi * r * xp.eye(Omega.shape[0], dtype=Omega.dtype),
            Gamma + (r / pi) * xp.eye(Gamma.shape[0], dtype=Gamma.dtype), pi)


# ---------------------------------------------------------------- K-BFGS (kbfgs)

# ---------------------------------------------------------------- TNT / Shampoo (tntsh)
