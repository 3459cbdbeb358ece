"""A small training loop for demos, notebooks and smoke tests."""
from __future__ import annotations

import numbers

import numpy as np

from .backend import rng_of
from .errors import ArgumentTypeError, DivergenceError, HyperParameterError
from .methods.base import Batch, Method


def _check_lr(lr):
    if callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr <= 0:
        raise HyperParameterError(f"lr must be a finite number > 0 or a callable k -> lr_k, got {lr!r}")
    return lambda k: lr


def train(method, net, params, x, y, loss, steps, lr, batch_size=None, seed=0, dense=False):
    """Run ``steps`` updates ``θ ← θ + lr_k · direction_k`` on mini-batches of ``(x, y)``.

    ``lr`` is a finite positive number or a callable ``k -> lr_k``; ``batch_size=None`` uses
    the full data. One ``numpy.random.Generator(seed)`` drives both the batch sampling
    (without replacement) and the method's draws. Returns ``(params, history)`` with
    ``history["loss"]`` the full-data objective before each step and after the last. A run
    whose loss or parameters become non-finite stops with
    :class:`~refcurv.errors.DivergenceError` naming the step.
    """
    if not isinstance(method, Method):
        what = method.__name__ if isinstance(method, type) else repr(method)
        raise ArgumentTypeError(
            f"method must be a method instance such as REGISTRY['kfac'](), got {what}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise HyperParameterError(f"steps must be a non-negative int, got {steps!r}")
    schedule = _check_lr(lr)
    x, y = np.asarray(x) if isinstance(x, list) else x, np.asarray(y) if isinstance(y, list) else y
    N = len(x)
    if len(y) != N:
        raise HyperParameterError(f"x and y must have the same number of samples, got {N} and {len(y)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or not 1 <= batch_size <= N):
        raise HyperParameterError(f"batch_size must be None or an int in [1, {N}], got {batch_size!r}")
    rng = rng_of(seed)
    state = method.init(net, params)
    history = {"loss": [float(net.loss(params, x, y, loss))]}
    for k in range(steps):
        idx = slice(None) if batch_size is None else rng.choice(N, size=batch_size, replace=False)
        direction, state = method.step(state, net, params, Batch(x[idx], y[idx], loss), rng, dense=dense)
        a = schedule(k)
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not np.isfinite(a):
            raise HyperParameterError(f"lr({k}) must be a finite number, got {a!r}")
        with np.errstate(over="ignore", invalid="ignore"):
            new = [W + a * D for W, D in zip(params, direction)]
        if not all(np.isfinite(W).all() for W in new):
            raise DivergenceError(f"{method.name} diverged at step {k}: parameters not finite (lr = {a:g})")
        params = new
        with np.errstate(over="ignore", invalid="ignore"):
            value = float(net.loss(params, x, y, loss))
        if not np.isfinite(value):
            raise DivergenceError(f"{method.name} diverged at step {k}: loss {value} (lr = {a:g})")
        history["loss"].append(value)
    return params, history
