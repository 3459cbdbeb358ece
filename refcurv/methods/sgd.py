"""Plain SGD (baseline): ``direction = −g``. Dense and fast forms coincide."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, layer_grads
from .registry import register


@register
@dataclass(frozen=True)
class SGD(Method):
    name = "sgd"
    seed_ref = "baseline"
    summary = "mini-batch gradient descent"

    def _fast(self, state, net, params, batch, draws):
        g, _ = layer_grads(net, params, batch)
        return [-gi for gi in g], {"k": state["k"] + 1}

    _dense = _fast
