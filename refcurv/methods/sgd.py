"""Plain SGD (baseline): ``direction = −g``. Dense and fast forms coincide; the curvature is
the identity."""
from __future__ import annotations

from dataclasses import dataclass

from ..operators import ScaledIdentity
from .base import Method, layer_grads
from .registry import register


@register
@dataclass(frozen=True)
class SGD(Method):
    """Gradient descent. State: :class:`~refcurv.methods.base.State` (``k``, ``diagnostics``).
    Curvature: ``I``."""

    name = "sgd"
    seed_ref = "baseline"
    summary = "mini-batch gradient descent"

    def _fast(self, state, net, params, batch, draws):
        g, _ = layer_grads(net, params, batch)
        return [-gi for gi in g], state.replace(k=state.k + 1)

    _dense = _fast

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        if net is None:
            from ..errors import ArgumentTypeError

            raise ArgumentTypeError("sgd.curvature needs net (for the number of parameters)")
        return ScaledIdentity(net.n_params)
