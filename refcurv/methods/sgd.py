"""Mini-batch SGD with optional momentum, heavy ball or Nesterov (baseline; PyTorch's
``torch.optim.SGD`` conventions, Sutskever et al. 2013 [Sutskever2013] for the Nesterov form).

With the mini-batch gradient ``g_k``, momentum ``μ`` and the buffer ``m`` (``m = 0`` before
the first step; PyTorch sets ``m_0 = g_0``, which is the same thing for the heavy-ball
recursion below):

    m_k = μ m_{k−1} + g_k                              (heavy ball, ``nesterov=False``)
    d_k = −m_k                                         (θ ← θ + lr · d_k)

    m_k = μ m_{k−1} + g_k,   d_k = −(g_k + μ m_k)      (``nesterov=True``, PyTorch's form)

``momentum=0`` is plain gradient descent, ``d_k = −g_k``. PyTorch's ``dampening`` is 0 and
its ``weight_decay`` 0 here (refcurv's ``weight_decay`` is the decoupled one of the thesis;
plain SGD has none). The curvature is the identity, ``C = I``, and ``rhs(state, g)`` is
``m_k`` (heavy ball) or ``g_k + μ m_k`` (Nesterov), so ``d = −C⁻¹ rhs``.

The fast form works on the per-layer matrices in the input dtype; the dense form is an
independent replay on the flat parameter vector θ (refcurv order, :func:`refcurv.flatten`)
in float64. Shared: the mini-batch gradient ``net.grad`` (tests/test_autodiff_oracle.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import xp_of
from ..errors import HyperParameterError
from ..operators import ScaledIdentity
from ..vec import flatten, unflatten
from .base import Method, State, check_unit, state_field
from .registry import register


@dataclass(frozen=True, kw_only=True)
class SGDState(State):
    """SGD's state: the momentum buffer (``None`` before the first step, and always ``None``
    for ``momentum=0``)."""

    m: Any = state_field("m")


@register
@dataclass(frozen=True)
class SGD(Method):
    """Gradient descent with optional heavy-ball or Nesterov momentum (module docstring).

    Hyper-parameters: ``momentum`` μ ∈ [0, 1) and ``nesterov`` (a bool; needs ``momentum > 0``,
    as in PyTorch). State: :class:`SGDState`. Draws: none. Diagnostics: none.
    Curvature: ``I``; ``rhs``: ``m`` (heavy ball), ``g + μ m`` (Nesterov), ``g`` (μ = 0)."""

    momentum: float = 0.0
    nesterov: bool = False

    name = "sgd"
    seed_ref = "baseline; [Sutskever2013] (Nesterov), PyTorch SGD"
    summary = "mini-batch gradient descent, optional heavy-ball or Nesterov momentum"
    State = SGDState

    def __post_init__(self):
        check_unit(self.momentum, "momentum")
        if not isinstance(self.nesterov, (bool, np.bool_)):
            raise HyperParameterError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise HyperParameterError("nesterov=True needs momentum > 0 (as torch.optim.SGD)")

    def init(self, net, params):
        return SGDState()

    def _fast(self, state, net, params, batch, draws):
        g = net.grad(params, batch.x, batch.y, batch.loss)
        mu = self.momentum
        if mu == 0:
            return [-gi for gi in g], state.replace(k=state.k + 1)
        m = g if state.m is None else [mu * mi + gi for mi, gi in zip(state.m, g)]
        v = [gi + mu * mi for gi, mi in zip(g, m)] if self.nesterov else m
        return [-vi for vi in v], state.replace(k=state.k + 1, m=m)

    def _dense(self, state, net, params, batch, draws):
        """Replay on the flat θ (float64): ``m ← μ m + g``, ``d = −m`` or ``−(g + μ m)``."""
        g = flatten(net.grad(params, batch.x, batch.y, batch.loss))
        mu = self.momentum
        if mu == 0:
            return unflatten(-g, net), state.replace(k=state.k + 1)
        m_old = xp_of(g).zeros_like(g) if state.m is None else flatten(state.m).astype(np.float64)
        m = mu * m_old + g
        d = -(g + mu * m) if self.nesterov else -m
        return unflatten(d, net), state.replace(k=state.k + 1, m=unflatten(m, net))

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        if net is None:
            from ..errors import ArgumentTypeError

            raise ArgumentTypeError("sgd.curvature needs net (for the number of parameters)")
        return ScaledIdentity(net.n_params, like=params)  # todense on the parameters' backend

    def rhs(self, state, grads):
        """``g`` (μ = 0 or before the first step), the buffer ``m`` (heavy ball) or ``g + μ m``
        (Nesterov; needs ``grads``)."""
        if self.momentum != 0 and state.m is not None and not self.nesterov:
            return state.m
        if grads is None:
            from ..errors import ArgumentTypeError

            raise ArgumentTypeError(f"{self.name}.rhs: grads (the mini-batch gradient per layer) is None")
        if self.momentum == 0 or state.m is None:
            return grads
        return [gi + self.momentum * mi for gi, mi in zip(grads, state.m)]
