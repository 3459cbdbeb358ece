"""Hessian-free (Martens 2010; the comparison method of thesis Ch.5, §5.1.2, §5.7): the
LM-damped Gauss-Newton system ``(B + λI) p = −g`` solved by linear conjugate gradients on
GGN-vector products, with the same LM rule and mini-batches as Algorithm 23.

* ``g = (1/N₁) Σ_{i∈S₁} ∇ψ_i``; ``B = (1/N₂) Σ_{i∈S₂} J_iᵀ H_i J_i`` (thesis (5.2)), ``S₂ ⊆ S₁``.
* Fast form: CG from ``p₀ = 0`` on ``v ↦ B v + λ v``
  (:class:`refcurv.curvature.GGNOperator`), where ``B v = (1/N₂) Jᵀ(H (J v))`` is one
  forward-mode pass (Algorithm 19, ``J v``), the output Hessian-vector product
  (``loss.hvp``) and one backward pass (Algorithm 21, ``Jᵀ w``) — no matrix is formed.
  Stops when the recursively updated residual satisfies ``‖r_k‖ ≤ cg_tol · ‖g‖`` or after
  ``cg_max_iter`` iterations (Martens' HF adds warm starts, preconditioning and a
  relative-progress stopping rule; refcurv's reference is the plain CG they build on).
* Dense form: ``B`` from :func:`refcurv.curvature.ggn` in float64, Cholesky solve — the
  point CG converges to (in exact arithmetic, in at most ``rank(B) + 1 ≤ N₂C + 1``
  iterations, the number of distinct eigenvalues of ``B + λI``).

Every CG iterate from ``p₀ = 0`` is a descent direction: ``p_k`` minimizes the damped
model ``q(p) = gᵀp + ½pᵀ(B + λI)p`` over the Krylov space ``K_k(B + λI, g)``, so
``q(p_k) ≤ q(p_1) < 0`` and ``gᵀp_k < −½ p_kᵀ(B + λI)p_k < 0`` (for ``g ≠ 0``).

LM damping: exactly as :mod:`refcurv.methods.smw` (§5.2.3, (5.5), defaults of §5.8), with
``pᵀBp`` from one more GGN-vector product.

State: :class:`HessianFreeState` (the fields of :class:`~.smw.LMState`: ``k``, ``damping``,
``damping_used``, ``damping_lm``, ``diagnostics``). Diagnostics: ``damping``, ``rho``,
``accepted`` and ``cg_iters`` (iterations run in the step), ``cg_residual`` (final recursive
relative residual ``‖r‖/‖g‖``; the dense form: the true residual of its solve),
``cg_converged``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import xp_of
from ..curvature import GGNOperator, grad_from_factors
from ..errors import HyperParameterError
from ..vec import flatten, unflatten
from .base import check_int
from .registry import register
from .smw import LMMethod, LMState


def conjugate_gradient(matvec, b, max_iter, tol):
    """Plain CG (Hestenes-Stiefel) for SPD ``A x = b`` from ``x₀ = 0``.

    Stops when ``‖r_k‖ ≤ tol · ‖b‖`` (recursive residual) or after ``max_iter`` iterations.
    Returns ``(x, iterations, ‖r‖/‖b‖, converged)``.
    """
    x = 0 * b
    bnorm = float(xp_of(b).sqrt((b * b).sum()))  # in b's dtype, on b's backend; a host float after
    if bnorm == 0.0:
        return x, 0, 0.0, True
    r = b.copy()
    d = r.copy()
    rs = float((r * r).sum())
    k = 0
    while k < max_iter and math.sqrt(rs) > tol * bnorm:  # rs is a host float
        Ad = matvec(d)
        dAd = float((d * Ad).sum())
        if not dAd > 0:  # breakdown (A not numerically SPD on d): stop with the iterate so far
            break
        alpha = rs / dAd
        x = x + alpha * d
        r = r - alpha * Ad
        rs_new = float((r * r).sum())
        d = r + (rs_new / rs) * d
        rs = rs_new
        k += 1
    res = math.sqrt(rs) / bnorm
    return x, k, res, res <= tol


@dataclass(frozen=True, kw_only=True)
class HessianFreeState(LMState):
    """State of :class:`HessianFree` (the fields of :class:`~.smw.LMState`)."""


@register
@dataclass(frozen=True)
class HessianFree(LMMethod):
    """Hessian-free: CG on ``(B + λI) p = −g`` with GGN-vector products and the LM rule of
    thesis §5.2.3. ``cg_max_iter`` (≥ 1) and ``cg_tol`` (≥ 0, relative residual) bound the
    CG; the LM hyper-parameters (``damping``, ``boost``, ``drop``, ``lm_threshold``,
    ``damping_floor``), ``n2`` and ``accept_threshold`` are those of :class:`~.smw.LMMethod`
    (thesis §5.8 defaults).

    rhs: the mini-batch gradient ``g`` on ``S₁``. Curvature: ``C = B + λI`` (5.4) with ``B`` the
    GGN (5.2) on ``S₂`` (:func:`refcurv.curvature.ggn`), ``λ = state.damping_used``: the
    dense form solves it exactly; the fast form's CG converges to the same point (to
    ``cg_tol``; truncated CG stops short of it).

    Shared by both forms: the draws (``S₂``), :func:`~.smw.reduction_ratio` (5.5) and
    :func:`~.smw.lm_update` (§5.2.3). The fast form's kernels (:func:`conjugate_gradient`,
    :class:`~refcurv.curvature.GGNOperator`, :func:`~refcurv.curvature.grad_from_factors`) are
    not used by the dense form.
    """

    name = "hessian_free"
    seed_ref = "[Ren-thesis] Ch.5 §5.1.2, §5.7 (Martens 2010); LM rule §5.2.3, (5.5)"
    summary = "CG on GGN-vector products + LM damping"
    State = HessianFreeState

    cg_max_iter: int = 100
    cg_tol: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        check_int(self.cg_max_iter, "cg_max_iter")
        if isinstance(self.cg_tol, bool) or not isinstance(self.cg_tol, (int, float, np.floating)) \
                or not np.isfinite(self.cg_tol) or self.cg_tol < 0:  # host: a scalar hyper-parameter
            raise HyperParameterError(f"cg_tol must be a finite number >= 0, got {self.cg_tol!r}")

    def _dense_B(self, net, params, x2, y2, loss):
        return cv.ggn(net, params, x2, y2, loss)

    def _dense_diagnostics(self, B, lam, pf, gf):
        xp = xp_of(B, pf, gf)  # the residual is reported as a host float (a diagnostic)
        res = float(xp.linalg.norm(B @ pf + lam * pf + gf)) / max(float(xp.linalg.norm(gf)), 1e-300)
        return {"cg_iters": 0, "cg_residual": res, "cg_converged": True}

    def _fast_solve(self, lam, net, params, batch, draws):
        x2, _ = self._curvature_batch(batch, draws)
        loss = batch.loss
        A, G = net.factors(params, batch.x, batch.y, loss)
        g = grad_from_factors(A, G)
        B = GGNOperator(net, params, x2, loss)
        gf = flatten(g)
        pf, iters, res, conv = conjugate_gradient(lambda v: B.ggn(v) + lam * v, -gf, self.cg_max_iter, self.cg_tol)
        pBp = float((pf * B.ggn(pf)).sum())
        return unflatten(pf, net), g, pBp, {"cg_iters": iters, "cg_residual": res, "cg_converged": bool(conv)}


__all__ = ["HessianFree", "HessianFreeState", "conjugate_gradient"]
