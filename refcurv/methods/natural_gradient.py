"""Exact block-diagonal natural gradient (reference for the Kronecker methods; the "exact
block-diagonal Fisher" of [Ren-thesis] Figure 4.1 and of [KFAC] §3–§4, [Amari1998] for the
natural gradient).

Per trainable layer ``l`` the exact Fisher block (thesis (1.7) restricted to the layer's
parameters, no Kronecker factorization):

    F_l = (1/N) Σ_i J_{i,l}ᵀ F_i J_{i,l}         (``fisher="exact"``; ``"mc"``: sampled labels,
                                                   ``"empirical"``: data labels)

from :func:`refcurv.curvature.fisher` (``blocks=True``), a moving average
``F̄_l ← β F̄_l + (1 − β) F_l`` (the first step sets ``F̄_l = F_l``; ``beta=0`` is the
mini-batch's own Fisher) and the direction

    d_l = −(F̄_l + λ I)⁻¹ g_l                     (θ ← θ + lr · d)

with the mini-batch gradient ``g_l`` (row-major ``vec``). The curvature is
``C = BlockDiagonal_l[F̄_l + λI]`` and ``rhs(state, g) = g``.

The fast form solves each layer's block by Cholesky in the input dtype; the dense form
assembles the whole ``n × n`` block-diagonal matrix on θ in float64 and solves it at once.
Shared: :func:`refcurv.curvature.fisher` (tests/test_identities.py), ``net.grad``, the draws
(``loss.sample``) and :func:`~refcurv.linalg.woodbury.spd_solve` (tests/test_woodbury.py).
The blocks are ``n_l × n_l``: a reference for small networks, not a scalable method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import block_diag

from .. import curvature as cv
from ..backend import to_numpy
from ..errors import DrawsError, StateError
from ..linalg.woodbury import spd_solve
from ..operators import BlockDiagonal, Dense
from ..vec import flatten, unflatten
from .base import Draws, Method, State, check_choice, check_int, check_positive, check_unit, state_field
from .registry import register
from .vocabulary import FISHER_KINDS


@dataclass(frozen=True, kw_only=True)
class NaturalGradientState(State):
    """The exact block-diagonal natural gradient's state (one entry per trainable layer)."""

    F_bar: Any = state_field(doc="F̄_l (n_l × n_l): moving average of the layer's exact Fisher block "
                                 "(row-major vec(W_l)); None before the first step")
    damping_used: Any = state_field("damping_used")


@register
@dataclass(frozen=True)
class NaturalGradient(Method):
    """Exact block-diagonal natural gradient (module docstring). Hyper-parameters:
    ``damping`` λ, ``beta`` β (moving average of the blocks), ``fisher`` ("exact" | "mc" |
    "empirical"), ``n_samples`` (labels per input for "mc"). State:
    :class:`NaturalGradientState`. Draws: ``labels`` ``(n_samples, N, …)`` for ``fisher="mc"``.
    Diagnostics: ``damping``. Curvature: ``BlockDiagonal_l[Dense(F̄_l + λI)]``; rhs: ``g``."""

    damping: float = 1e-3
    beta: float = 0.0
    fisher: str = "exact"
    n_samples: int = 1

    name = "natural_gradient"
    seed_ref = "[Ren-thesis] Fig. 4.1, (1.7); [KFAC] §3; [Amari1998]"
    summary = "exact block-diagonal natural gradient: −(F̄_l + λI)⁻¹ g_l per layer (reference, small nets)"
    State = NaturalGradientState

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta")
        check_choice(self.fisher, "fisher", FISHER_KINDS)
        check_int(self.n_samples, "n_samples")

    @property
    def draw_fields(self):
        return ("labels",) if self.fisher == "mc" else ()

    def init(self, net, params):
        return NaturalGradientState()

    def draw(self, rng, state, net, params, batch):
        """``labels`` ``(n_samples, N, …)`` from the model at ``params`` for ``fisher="mc"``."""
        if self.fisher != "mc":
            return Draws(method=self.name)
        f = net.forward(params, batch.x)
        return Draws(method=self.name, labels=to_numpy(batch.loss.sample(f, n_samples=self.n_samples, seed=rng)))

    def check_draws(self, draws, state, net, params, batch):
        draws = super().check_draws(draws, state, net, params, batch)
        if self.fisher != "mc":
            if draws.labels is not None:
                raise DrawsError(f"{self.name}: draws.labels given, but fisher={self.fisher!r} consumes no labels")
            return draws
        want = (self.n_samples,) + tuple(np.shape(batch.y))
        got = tuple(getattr(draws.labels, "shape", ()))
        if got != want:
            raise DrawsError(f"{self.name}: draws.labels must have shape (n_samples, N, …) = {want}, got {got}")
        return draws

    def _blocks(self, net, params, batch, draws):
        """The mini-batch's per-layer Fisher blocks (float64, refcurv.curvature)."""
        if self.fisher == "mc":
            return cv.fisher(net, params, batch.x, loss=batch.loss, kind="mc", labels=draws.labels, blocks=True)
        return cv.fisher(net, params, batch.x, batch.y, batch.loss, kind=self.fisher, blocks=True)

    def _average(self, state, F):
        if state.F_bar is None:
            return F
        return [self.beta * Fo + (1 - self.beta) * Fn for Fo, Fn in zip(state.F_bar, F)]

    def _fast(self, state, net, params, batch, draws):
        g = net.grad(params, batch.x, batch.y, batch.loss)
        dt = g[0].dtype
        F = self._average(state, [Fl.astype(dt) for Fl in self._blocks(net, params, batch, draws)])
        lam = self.damping
        d = [-spd_solve(Fl + lam * np.eye(Fl.shape[0], dtype=dt), gl.ravel(), "F̄_l + λI").reshape(gl.shape)
             for Fl, gl in zip(F, g)]
        return d, state.replace(k=state.k + 1, F_bar=F, damping_used=lam, diagnostics={"damping": float(lam)})

    def _dense(self, state, net, params, batch, draws):
        """The whole block-diagonal ``F̄ + λI`` on θ (float64), one solve."""
        g = flatten(net.grad(params, batch.x, batch.y, batch.loss))
        F = self._blocks(net, params, batch, draws)
        if state.F_bar is not None:
            F = [self.beta * np.asarray(Fo, dtype=np.float64) + (1 - self.beta) * Fn
                 for Fo, Fn in zip(state.F_bar, F)]
        M = block_diag(*F) + self.damping * np.eye(g.shape[0])
        d = -spd_solve(M, g, "block-diagonal F̄ + λI")
        return unflatten(d, net), state.replace(k=state.k + 1, F_bar=F, damping_used=self.damping,
                                                diagnostics={"damping": float(self.damping)})

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``BlockDiagonal_l[Dense(F̄_l + λI)]`` of the step that returned ``state``."""
        if state.F_bar is None:
            raise StateError(f"{self.name}: the state has no Fisher blocks yet (F_bar); take a step first")
        return BlockDiagonal([Dense(np.asarray(F, dtype=np.float64) + state.damping_used * np.eye(F.shape[0]),
                                    "F̄_l + λI") for F in state.F_bar])
