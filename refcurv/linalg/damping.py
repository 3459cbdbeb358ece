"""Damping of curvature pairs ``(s, y)`` ([Ren-thesis]).

Each function returns the damped pair and the θ's it used.

* :func:`powell_B` (§2.3.1, Powell 1978): ``ỹ = θy + (1−θ)Bs``, guarantees ``sᵀỹ ≥ μ sᵀBs``.
* :func:`powell_H` (§2.3.1): ``s̃ = θs + (1−θ)Hy``, guarantees ``s̃ᵀy ≥ μ yᵀHy``.
* :func:`double_damping` (Algorithm 3, DD): Powell on H (μ₁), then Powell with ``B = I``
  (μ₂ ∈ (0, 1]), guaranteeing ``s̃ᵀỹ ≥ μ₂ s̃ᵀs̃``.
* :func:`dp_dlm` (Algorithm 8, ``D_P D_LM``): Powell on H, then ``ỹ = y + μ₂ s̃``;
  ``s̃ᵀỹ ≥ μ₂‖s̃‖²`` for any μ₂ > 0.
* :func:`dpi_dlm` (Algorithm 11, ``D_{P(I)} D_LM``): as D_P D_LM with ``H = μ₂⁻¹ I``;
  Lemma 4: ``s̃ᵀs̃/s̃ᵀỹ ≤ 1/μ₂`` and ``ỹᵀỹ/s̃ᵀỹ ≤ 1/μ₃``, ``μ₃ = μ₁/(μ₂(1 + 2μ₁))``.
"""
from __future__ import annotations

from ..errors import HyperParameterError, ShapeError
from . import _checks as C


def _sy(s, y, n=None):
    s = C.vector(s, "s", n)
    return s, C.vector(y, "y", s.shape[0])


def _theta(a, b, mu):
    """Powell's θ for the requirement ``b ≥ μ a`` (``a`` the reference curvature ≥ 0):
    ``θ = (1−μ)a / (a − b)`` if ``b < μ a`` else ``1``."""
    return (1 - mu) * a / (a - b) if b < mu * a else 1.0


def powell_B(s, y, B, mu):
    """Powell's damping on B: returns ``(ỹ, θ)`` with ``sᵀỹ ≥ μ sᵀBs``."""
    C.in_open_unit(mu, "mu")
    B = C.square(B, "B")
    s, y = _sy(s, y, B.shape[0])
    Bs = B @ s
    theta = _theta(float(s @ Bs), float(s @ y), mu)
    return C.result((theta * y + (1 - theta) * Bs, theta), "the damped pair (ỹ, θ)")


def _apply_H(H, y):
    """``H y`` for ``H`` a square matrix or a callable ``v -> H v`` (an L-BFGS matrix kept
    in compact or two-loop form, never formed)."""
    if callable(H):
        return C.vector(H(y), "H(y)", y.shape[0])
    H = C.square(H, "H")
    if H.shape[0] != y.shape[0]:
        raise ShapeError(f"H must be {y.shape[0]}×{y.shape[0]} to match y, got {H.shape}")
    return H @ y


def powell_H(s, y, H, mu):
    """Powell's damping on H: returns ``(s̃, θ)`` with ``s̃ᵀy ≥ μ yᵀHy``. ``H`` is a matrix
    or a callable ``v -> H v``."""
    C.in_open_unit(mu, "mu")
    s, y = _sy(s, y)
    Hy = _apply_H(H, y)
    theta = _theta(float(y @ Hy), float(s @ y), mu)
    return C.result((theta * s + (1 - theta) * Hy, theta), "the damped pair (s̃, θ)")


def _powell_identity(s, y, mu):
    """Powell's damping with ``B = I`` (§2.3.1): ``ỹ = θy + (1−θ)s``, ``sᵀỹ ≥ μ sᵀs``."""
    theta = _theta(float(s @ s), float(s @ y), mu)
    return theta * y + (1 - theta) * s, theta


def double_damping(s, y, H, mu1, mu2):
    """Algorithm 3 (DD). Returns ``(s̃, ỹ, θ₁, θ₂)``; μ₁ ∈ (0, 1), μ₂ ∈ (0, 1]."""
    if not 0 < C.real(mu2, "mu2", "a finite number in (0, 1]") <= 1:
        raise HyperParameterError(f"mu2 must lie in (0, 1] for double damping, got {mu2!r}")
    s_t, theta1 = powell_H(s, y, H, mu1)
    y = C.vector(y, "y")
    y_t, theta2 = _powell_identity(s_t, y, mu2)
    return C.result((s_t, y_t, theta1, theta2), "the double-damped pair (s̃, ỹ, θ₁, θ₂)")


def dp_dlm(s, y, H, mu1, mu2):
    """Algorithm 8 (``D_P D_LM``). Returns ``(s̃, ỹ, θ₁)``; μ₁ ∈ (0, 1), μ₂ > 0."""
    C.positive(mu2, "mu2")
    s_t, theta1 = powell_H(s, y, H, mu1)
    return C.result((s_t, C.vector(y, "y") + mu2 * s_t, theta1), "the damped pair (s̃, ỹ, θ₁)")


def dpi_dlm(s, y, mu1, mu2):
    """Algorithm 11 (``D_{P(I)} D_LM``): Algorithm 8 with ``H = μ₂⁻¹ I``. Returns ``(s̃, ỹ, θ₁)``."""
    C.in_open_unit(mu1, "mu1")
    C.positive(mu2, "mu2")
    s, y = _sy(s, y)
    theta1 = _theta(float(y @ y) / mu2, float(s @ y), mu1)
    s_t = theta1 * s + (1 - theta1) * y / mu2
    return C.result((s_t, y + mu2 * s_t, theta1), "the damped pair (s̃, ỹ, θ₁)")


def mu3(mu1, mu2):
    """Lemma 4's constant ``μ₃ = μ₁ / (μ₂ (1 + 2μ₁))`` (μ₁ ∈ (0, 1), μ₂ > 0)."""
    C.in_open_unit(mu1, "mu1")
    C.positive(mu2, "mu2")
    return mu1 / (mu2 * (1 + 2 * mu1))
