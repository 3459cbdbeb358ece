"""Exact block-diagonal natural gradient (reference for the Kronecker methods; the "exact
block-diagonal Fisher" of [Ren-thesis] Figure 4.1 and of [KFAC] §3–§4, [Amari1998] for the
natural gradient).

Per trainable layer ``l`` the exact Fisher block (thesis (1.7) restricted to the layer's
parameters, no Kronecker factorization):

    F_l = (1/N) Σ_i J_{i,l}ᵀ F_i J_{i,l}         (``fisher="exact"``; ``"mc"``: sampled labels,
                                                   ``"empirical"``: data labels)

a moving average ``F̄_l ← β F̄_l + (1 − β) F_l`` (the first step sets ``F̄_l = F_l``;
``beta=0`` is the mini-batch's own Fisher), the gradient momentum ``m`` (``momentum_form``
"heavy_ball": ``m ← μ m + g``, "ema": ``m ← μ m + (1 − μ) g``, ``m = 0`` before the first
step; ``momentum=0``: ``m = g``) and the direction

    d_l = −(F̄_l + λ I)⁻¹ m_l                     (θ ← θ + lr · d)

(row-major ``vec``). The curvature is ``C = BlockDiagonal_l[F̄_l + λI]`` and
``rhs(state, g) = m``. [Ren-thesis] §4.8 (Figure 4.1) runs this method with
``beta=0.9, momentum=0.9, momentum_form="ema"`` as the reference of its cosine study.

The two forms are separate code paths. The fast form builds each layer's block alone, in
the input dtype, without the cross-layer blocks: ``fisher="exact"``:
``(1/N) Σ_i J_{i,l}ᵀ F_i J_{i,l}`` from the layer's columns of the output Jacobian and the
output Fisher ``F_i`` (``loss.fisher_output``); ``"mc"`` / ``"empirical"``: ``U_lᵀ U_l / (S N)``
from the per-sample gradients with the sampled / data labels; then a Cholesky solve per
layer. The dense form takes the blocks of the full Fisher from
:func:`refcurv.curvature.fisher` (``blocks=True``, float64), assembles the whole ``n × n``
block-diagonal matrix on θ and solves it at once. Shared: ``net.grad``, the draws
(``loss.sample``) and :func:`~refcurv.linalg.woodbury.spd_solve` (tests/test_woodbury.py).
The blocks are ``n_l × n_l``: a reference for small networks, not a scalable method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import curvature as cv
from ..backend import _block_diag, xp_of
from ..errors import StateError
from ..linalg.woodbury import spd_solve
from ..operators import BlockDiagonal, Dense
from ..vec import flatten, unflatten
from .base import (Method, State, check_choice, check_int, check_model_label_draws, check_positive, check_unit,
                   model_label_draws, state_field)
from .registry import register
from .vocabulary import FISHER_KINDS


@dataclass(frozen=True, kw_only=True)
class NaturalGradientState(State):
    """The exact block-diagonal natural gradient's state (one entry per trainable layer)."""

    m: Any = state_field("m")
    F_bar: Any = state_field(doc="F̄_l (n_l × n_l): moving average of the layer's exact Fisher block "
                                 "(row-major vec(W_l)); None before the first step")
    damping_used: Any = state_field("damping_used")


@register
@dataclass(frozen=True)
class NaturalGradient(Method):
    """Exact block-diagonal natural gradient (module docstring). Hyper-parameters:
    ``damping`` λ, ``beta`` β (moving average of the blocks), ``fisher`` ("exact" | "mc" |
    "empirical"), ``n_samples`` (labels per input for "mc"), gradient ``momentum`` μ and
    ``momentum_form`` ("heavy_ball" | "ema"). State:
    :class:`NaturalGradientState`. Draws: ``labels`` ``(n_samples, N, …)`` for ``fisher="mc"``.
    Diagnostics: ``damping``. Curvature: ``BlockDiagonal_l[Dense(F̄_l + λI)]``; rhs: ``m``."""

    damping: float = 1e-3
    beta: float = 0.0
    fisher: str = "exact"
    n_samples: int = 1
    momentum: float = 0.0
    momentum_form: str = "heavy_ball"

    name = "natural_gradient"
    seed_ref = "[Ren-thesis] Fig. 4.1, (1.7); [KFAC] §3; [Amari1998]"
    summary = "exact block-diagonal natural gradient: −(F̄_l + λI)⁻¹ g_l per layer (reference, small nets)"
    State = NaturalGradientState

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta")
        check_choice(self.fisher, "fisher", FISHER_KINDS)
        check_int(self.n_samples, "n_samples")
        check_unit(self.momentum, "momentum")
        check_choice(self.momentum_form, "momentum_form", ("heavy_ball", "ema"))

    @property
    def draw_fields(self):
        return ("labels",) if self.fisher == "mc" else ()

    def init(self, net, params):
        return NaturalGradientState()

    def draw(self, rng, state, net, params, batch):
        """``labels`` ``(n_samples, N, …)`` from the model at ``params`` for ``fisher="mc"``."""
        return model_label_draws(self, net, params, batch, rng)

    def check_draws(self, draws, state, net, params, batch):
        draws = super().check_draws(draws, state, net, params, batch)
        return check_model_label_draws(self, draws, batch)

    def _momentum(self, m_old, g):
        mu = self.momentum
        if m_old is None:
            return g if self.momentum_form == "heavy_ball" else [(1 - mu) * gi for gi in g]
        if self.momentum_form == "heavy_ball":
            return [mu * a + b for a, b in zip(m_old, g)]
        return [mu * a + (1 - mu) * b for a, b in zip(m_old, g)]

    def _layer_blocks(self, net, params, batch, draws, dt):
        """Per layer ``F_l`` alone (no cross-layer blocks), in ``dt``: ``(1/N) Σ J_lᵀ F_i J_l``
        (exact) or ``U_lᵀ U_l / (S N)`` (sampled or data labels), on BLAS."""
        if self.fisher == "exact":
            J = net.jacobian(params, batch.x)                               # (N, C, n)
            op = cv.OutputJacobian(net, params, batch.x)
            Fo = op.output_loss(batch.loss).fisher_output(op.f)             # (N, C, C)
            FJ = xp_of(J).einsum("nab,nbp->nap", Fo, J)
            N = J.shape[0]
            out, start = [], 0
            for o, d in net.param_shapes:
                sl = slice(start, start + o * d)
                start += o * d
                Jl, FJl = J[:, :, sl].reshape(-1, o * d), FJ[:, :, sl].reshape(-1, o * d)
                B = Jl.T @ FJl / N
                # Jᵀ(FJ) is symmetric in exact arithmetic only; the solve needs it exactly
                out.append(((B + B.T) / 2).astype(dt))
            return out
        if self.fisher == "empirical":
            U = net.per_sample_grads(params, batch.x, batch.y, batch.loss)    # per layer (N, out, d)
        else:  # the S label sets stacked as S·N samples (the draws, consumed exactly)
            S = draws.labels.shape[0]
            xp = xp_of(batch.x)
            x = xp.concatenate([batch.x] * S)
            ys = xp.asarray(draws.labels).reshape((-1,) + tuple(np.shape(draws.labels)[2:]))
            U = net.per_sample_grads(params, x, ys, batch.loss)
        out = []
        for u in U:
            u = u.reshape(u.shape[0], -1)
            out.append((u.T @ u / u.shape[0]).astype(dt))
        return out

    def _fast(self, state, net, params, batch, draws):
        g = net.grad(params, batch.x, batch.y, batch.loss)
        dt = g[0].dtype
        m = self._momentum(state.m, g)
        F = self._layer_blocks(net, params, batch, draws, dt)
        if state.F_bar is not None:
            F = [self.beta * Fo + (1 - self.beta) * Fn for Fo, Fn in zip(state.F_bar, F)]
        lam = self.damping
        xp = xp_of(g[0])
        d = [-spd_solve(Fl + lam * xp.eye(Fl.shape[0], dtype=dt), mi.ravel(), "F̄_l + λI").reshape(mi.shape)
             for Fl, mi in zip(F, m)]
        return d, state.replace(k=state.k + 1, m=m, F_bar=F, damping_used=lam, diagnostics={"damping": float(lam)})

    def _dense(self, state, net, params, batch, draws):
        """The blocks of the full Fisher (refcurv.curvature.fisher), the whole block-diagonal
        ``F̄ + λI`` on θ (float64), one solve with the momentum written on the flat θ."""
        g = flatten(net.grad(params, batch.x, batch.y, batch.loss))
        mu = self.momentum
        xp = xp_of(g)
        m_old = xp.zeros_like(g) if state.m is None else flatten(state.m).astype(np.float64)
        m = mu * m_old + (g if self.momentum_form == "heavy_ball" else (1 - mu) * g)
        if self.fisher == "mc":
            F = cv.fisher(net, params, batch.x, loss=batch.loss, kind="mc", labels=draws.labels, blocks=True)
        else:
            F = cv.fisher(net, params, batch.x, batch.y, batch.loss, kind=self.fisher, blocks=True)
        if state.F_bar is not None:
            F = [self.beta * xp.asarray(Fo, dtype=np.float64) + (1 - self.beta) * Fn
                 for Fo, Fn in zip(state.F_bar, F)]
        M = _block_diag(F) + self.damping * xp.eye(g.shape[0])
        d = -spd_solve(M, m, "block-diagonal F̄ + λI")
        return unflatten(d, net), state.replace(k=state.k + 1, m=unflatten(m, net), F_bar=F,
                                                damping_used=self.damping,
                                                diagnostics={"damping": float(self.damping)})

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``BlockDiagonal_l[Dense(F̄_l + λI)]`` of the step that returned ``state``."""
        if state.F_bar is None:
            raise StateError(f"{self.name}: the state has no Fisher blocks yet (F_bar); take a step first")
        xp = xp_of(state.F_bar)
        return BlockDiagonal([Dense(xp.asarray(F, dtype=np.float64) + state.damping_used * xp.eye(F.shape[0]),
                                    "F̄_l + λI") for F in state.F_bar])

    def rhs(self, state, grads):
        """The momentum gradient ``m`` of the step (``g`` for ``momentum=0``)."""
        if state.m is None:
            raise StateError(f"{self.name}: the state has no momentum buffer yet (m); take a step first")
        return state.m
