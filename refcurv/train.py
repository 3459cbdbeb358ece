"""A small training loop for demos, notebooks and smoke tests."""
from __future__ import annotations

import numpy as np

from .backend import rng_of
from .errors import HyperParameterError
from .methods.base import Batch


def train(method, net, params, x, y, loss, steps, lr, batch_size=None, seed=0, dense=False):
    """Run ``steps`` updates ``θ ← θ + lr_k · direction_k`` on mini-batches of ``(x, y)``.

    ``lr`` is a number or a callable ``k -> lr_k``; ``batch_size=None`` uses the full data.
    One ``numpy.random.Generator(seed)`` drives both the batch sampling and the method's
    draws. Returns ``(params, history)`` with ``history["loss"]`` the full-data objective
    before each step and after the last.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise HyperParameterError(f"steps must be a non-negative int, got {steps!r}")
    schedule = lr if callable(lr) else (lambda k: lr)
    rng = rng_of(seed)
    N = len(x)
    state = method.init(net, params)
    history = {"loss": [float(net.loss(params, x, y, loss))]}
    for k in range(steps):
        idx = slice(None) if batch_size is None else rng.choice(N, size=batch_size, replace=False)
        direction, state = method.step(state, net, params, Batch(x[idx], y[idx], loss), rng, dense=dense)
        a = schedule(k)
        params = [W + a * D for W, D in zip(params, direction)]
        history["loss"].append(float(net.loss(params, x, y, loss)))
    return params, history
