"""Adam (Kingma & Ba 2015 [Adam], Algorithm 1, with its bias correction), as a diagonal
preconditioner (baseline).

With the mini-batch gradient ``g_t`` at the 1-based step ``t = k + 1`` (``m_0 = v_0 = 0``):

    m_t = β₁ m_{t−1} + (1 − β₁) g_t,        v_t = β₂ v_{t−1} + (1 − β₂) g_t ⊙ g_t
    m̂_t = m_t / (1 − β₁ᵗ),                 v̂_t = v_t / (1 − β₂ᵗ)
    d_t = −m̂_t / (√v̂_t + ε)                 (θ ← θ + lr · d_t)

([Adam] Algorithm 1; ε outside the square root, as in the paper and ``torch.optim.Adam``).
In refcurv's vocabulary ``momentum`` is β₁ (the decay of the gradient buffer ``m``, in the
EMA form), ``beta`` is β₂ (the decay of the moving average of the curvature statistic
``g ⊙ g``), and ``damping`` is ε. The curvature is the diagonal matrix
``C = diag(√v̂_t) + ε I`` and ``rhs(state, g) = m̂_t``, so ``d = −C⁻¹ rhs``.

The fast form is elementwise on the per-layer matrices in the input dtype; the dense form
builds ``C`` as a dense diagonal matrix on the flat θ (float64) and solves it.
Shared: the mini-batch gradient ``net.grad`` (tests/test_autodiff_oracle.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import xp_of
from ..errors import StateError
from ..linalg.woodbury import spd_solve
from ..operators import Diagonal
from ..vec import flatten, unflatten
from .base import Method, State, check_positive, check_unit, state_field
from .registry import register


@dataclass(frozen=True, kw_only=True)
class AdamState(State):
    """Adam's state ([Adam] Algorithm 1's symbols; lists have one entry per layer)."""

    m: Any = state_field("m")
    v: Any = state_field(doc="v_t: moving average of the squared gradient g ⊙ g per layer ([Adam] Alg. 1); "
                             "None before the first step")


@register
@dataclass(frozen=True)
class Adam(Method):
    """Adam (module docstring). Hyper-parameters: ``damping`` ε, ``momentum`` β₁, ``beta`` β₂
    (defaults: [Adam]'s 1e-8, 0.9, 0.999). State: :class:`AdamState`. Draws: none.
    Diagnostics: none. Curvature: ``Diagonal(√v̂ + ε)`` on θ; ``rhs``: ``m̂``."""

    damping: float = 1e-8
    momentum: float = 0.9
    beta: float = 0.999

    name = "adam"
    seed_ref = "[Adam] Alg. 1"
    summary = "Adam: diagonal preconditioner diag(√v̂) + ε on the bias-corrected first moment m̂"
    State = AdamState

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_unit(self.momentum, "momentum")
        check_unit(self.beta, "beta")

    def init(self, net, params):
        return AdamState()

    def _moments(self, state, g):
        b1, b2 = self.momentum, self.beta
        if state.m is None:
            return [(1 - b1) * gi for gi in g], [(1 - b2) * gi * gi for gi in g]
        return ([b1 * mi + (1 - b1) * gi for mi, gi in zip(state.m, g)],
                [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(state.v, g)])

    def _corrections(self, t):
        return 1 - self.momentum ** t, 1 - self.beta ** t

    def _fast(self, state, net, params, batch, draws):
        g = net.grad(params, batch.x, batch.y, batch.loss)
        m, v = self._moments(state, g)
        c1, c2 = self._corrections(state.k + 1)
        xp = xp_of(g)
        d = [-(mi / c1) / (xp.sqrt(vi / c2) + self.damping) for mi, vi in zip(m, v)]
        return d, state.replace(k=state.k + 1, m=m, v=v)

    def _dense(self, state, net, params, batch, draws):
        """On the flat θ in float64: the moments, then a solve with ``diag(√v̂) + εI``."""
        g = flatten(net.grad(params, batch.x, batch.y, batch.loss))
        b1, b2, t = self.momentum, self.beta, state.k + 1
        xp = xp_of(g)
        m_old = xp.zeros_like(g) if state.m is None else flatten(state.m).astype(np.float64)
        v_old = xp.zeros_like(g) if state.v is None else flatten(state.v).astype(np.float64)
        m = b1 * m_old + (1 - b1) * g
        v = b2 * v_old + (1 - b2) * g ** 2
        C = xp.diag(xp.sqrt(v / (1 - b2 ** t)) + self.damping)
        d = -spd_solve(C, m / (1 - b1 ** t), "diag(√v̂) + εI")
        return unflatten(d, net), state.replace(k=t, m=unflatten(m, net), v=unflatten(v, net))

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``Diagonal(√v̂_t + ε)`` (flat θ, refcurv order) of the step that returned ``state``."""
        if state.v is None:
            raise StateError(f"{self.name}: the state has no second moment yet (v); take a step first")
        xp = xp_of(state.v)
        v = xp.concatenate([xp.asarray(vi, dtype=np.float64).ravel() for vi in state.v])
        return Diagonal(xp.sqrt(v / (1 - self.beta ** state.k)) + self.damping, "diag(√v̂) + εI")

    def rhs(self, state, grads):
        """``m̂_t = m_t / (1 − β₁ᵗ)`` (``grads`` is not used)."""
        if state.m is None:
            raise StateError(f"{self.name}: the state has no first moment yet (m); take a step first")
        c1 = 1 - self.momentum ** state.k
        return [mi / c1 for mi in state.m]
