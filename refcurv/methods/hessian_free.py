"""Hessian-free (Martens 2010; the comparison method of thesis Ch.5, §5.1.2, §5.7): the
LM-damped Gauss-Newton system ``(B + λI) p = −g`` solved by linear conjugate gradients on
GGN-vector products, with the same LM rule and mini-batches as Algorithm 23.

* ``g = (1/N₁) Σ_{i∈S₁} ∇ψ_i``; ``B = (1/N₂) Σ_{i∈S₂} J_iᵀ H_i J_i`` (thesis (5.2)), ``S₂ ⊆ S₁``.
* Fast form: CG from ``p₀ = 0`` on ``v ↦ B v + λ v``, where ``B v = (1/N₂) Jᵀ(H (J v))`` is one
  forward-mode pass (Algorithm 19, ``J v``), the output Hessian-vector product
  (``loss.hvp``) and one backward pass (Algorithm 21, ``Jᵀ w``) — no matrix is formed.
  Stops when the recursively updated residual satisfies ``‖r_k‖ ≤ tol · ‖g‖`` or after
  ``max_iter`` iterations (Martens' HF adds warm starts, preconditioning and a
  relative-progress stopping rule; refcurv's reference is the plain CG they build on).
* Dense form: ``B`` from :func:`refcurv.curvature.ggn` in float64, Cholesky solve — the
  point CG converges to (in exact arithmetic, in at most ``rank(B) + 1 ≤ N₂C + 1``
  iterations, the number of distinct eigenvalues of ``B + λI``).

Every CG iterate from ``p₀ = 0`` is a descent direction: ``p_k`` minimizes the damped
model ``q(p) = gᵀp + ½pᵀ(B + λI)p`` over the Krylov space ``K_k(B + λI, g)``, so
``q(p_k) ≤ q(p_1) < 0`` and ``gᵀp_k < −½ p_kᵀ(B + λI)p_k < 0`` (for ``g ≠ 0``).

LM damping: exactly as :mod:`refcurv.methods.smw` (§5.2.3, (5.5), defaults of §5.8), with
``pᵀBp`` from one more GGN-vector product.

State: ``k``, ``lam_lm``, ``lam``, ``rho``, ``accepted`` (see :class:`~.smw.LMMethod`) and
``cg_iters`` (iterations run in the last step), ``cg_residual`` (final recursive relative
residual ``‖r‖/‖g‖``), ``cg_converged``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import xp_of
from ..errors import HyperParameterError
from ..vec import flatten, unflatten
from .base import check_int
from .registry import register
from .smw import LMMethod, OutputOperator, grad_from_factors


class GGNOperator:
    """``v ↦ B v = (1/N) Σ_i J_iᵀ H_i J_i v`` on one batch (flat θ vectors), one shared
    forward pass; ``v`` may be ``(n,)`` or batched ``(K, n)``."""

    def __init__(self, net, params, x, loss):
        self.net = net
        self.op = OutputOperator(net, params, x)
        self.loss = loss
        self.N = x.shape[0]

    def __call__(self, v):
        single = v.ndim == 1
        V = unflatten(v[None] if single else v, self.net)  # list of (K, out, d)
        _, df = self.net._push(self.op.params, self.op.tr, V)  # (K, N, C)
        w = self.loss.hvp(self.op.f, df)
        G = self.net._pull(self.op.params, self.op.tr, w)  # list of (K, N, out, T)
        xp = xp_of(df)
        out = self.net._flat([xp.einsum("knot,ndt->kod", g, self.op.tr.A[k])
                              for k, g in zip(self.net.trainable_index, G)]) / self.N
        return out[0] if single else out


def conjugate_gradient(matvec, b, max_iter, tol):
    """Plain CG (Hestenes-Stiefel) for SPD ``A x = b`` from ``x₀ = 0``.

    Stops when ``‖r_k‖ ≤ tol · ‖b‖`` (recursive residual) or after ``max_iter`` iterations.
    Returns ``(x, iterations, ‖r‖/‖b‖, converged)``.
    """
    x = 0 * b
    bnorm = float(np.sqrt((b * b).sum()))
    if bnorm == 0.0:
        return x, 0, 0.0, True
    r = b.copy()
    d = r.copy()
    rs = float((r * r).sum())
    k = 0
    while k < max_iter and np.sqrt(rs) > tol * bnorm:
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
    res = float(np.sqrt(rs)) / bnorm
    return x, k, res, res <= tol


@register
@dataclass(frozen=True)
class HessianFree(LMMethod):
    """Hessian-free: CG on ``(B + λI) p = −g`` with GGN-vector products and the LM rule of
    thesis §5.2.3. ``max_iter`` (≥ 1) and ``tol`` (≥ 0, relative residual) bound the CG;
    the LM hyper-parameters, ``n2`` and ``accept_threshold`` are those of
    :class:`~.smw.LMMethod` (thesis §5.8 defaults)."""

    name = "hessian_free"
    seed_ref = "003 Ch.5 §5.1.2, §5.7 (Martens 2010); LM rule §5.2.3, (5.5)"
    summary = "CG on GGN-vector products + LM damping"

    max_iter: int = 100
    tol: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        check_int(self.max_iter, "max_iter")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float, np.floating)) \
                or not np.isfinite(self.tol) or self.tol < 0:
            raise HyperParameterError(f"tol must be a finite number >= 0, got {self.tol!r}")

    def init(self, net, params):
        state = super().init(net, params)
        state.update({"cg_iters": 0, "cg_residual": float("nan"), "cg_converged": True})
        return state

    def _solve(self, lam, net, params, batch, draws, dense):
        x2, y2 = self._subset(batch, draws)
        loss = batch.loss
        if dense:
            g = self._dense_grad(net, params, batch)
            B = cv.ggn(net, params, x2, y2, loss)
            pf, p = self._dense_solve(B, g, lam, net)
            gf = flatten(g)
            res = float(np.linalg.norm(B @ pf + lam * pf + gf) / max(np.linalg.norm(gf), 1e-300))
            return p, g, float(pf @ B @ pf), {"cg_iters": 0, "cg_residual": res, "cg_converged": True}
        A, G = net.factors(params, batch.x, batch.y, loss)
        g = grad_from_factors(A, G)
        Bop = GGNOperator(net, params, x2, loss)
        gf = flatten(g)
        pf, iters, res, conv = conjugate_gradient(lambda v: Bop(v) + lam * v, -gf, self.max_iter, self.tol)
        pBp = float((pf * Bop(pf)).sum())
        return unflatten(pf, net), g, pBp, {"cg_iters": iters, "cg_residual": res, "cg_converged": bool(conv)}


__all__ = ["GGNOperator", "HessianFree", "conjugate_gradient"]
