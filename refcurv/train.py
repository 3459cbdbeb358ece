"""A small training loop for demos, notebooks and smoke tests."""
from __future__ import annotations

import numbers

import numpy as np

from .backend import rng_of
from .errors import (
    ArgumentTypeError,
    DivergenceError,
    HyperParameterError,
    NonFiniteError,
)
from .methods.base import Batch, Method
from .nn import Sequential
from .nn._checks import check_bool, describe
from .nn.losses import check_loss


def _check_lr(lr):
    if callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr <= 0:
        raise HyperParameterError(f"lr must be a finite number > 0 or a callable k -> lr_k, got {lr!r}")
    return lambda k: lr


def _samples(a, name):
    """``a`` (an array, or a list converted with ``numpy.asarray``) with a sample axis."""
    if isinstance(a, list):
        try:
            a = np.asarray(a)
        except ValueError:
            raise ArgumentTypeError(f"{name} must be an array of samples, got a ragged list") from None
    if not hasattr(a, "shape") or not hasattr(a, "ndim") or a.ndim == 0:
        raise ArgumentTypeError(f"{name} must be an array (or list) of samples, got {describe(a)}")
    return a


def train(method, net, params, x, y, loss, steps, lr, batch_size=None, seed=0, dense=False):
    """Run ``steps`` updates ``θ ← θ + lr_k · direction_k`` on mini-batches of ``(x, y)``.

    ``lr`` is a finite positive number or a callable ``k -> lr_k``; ``batch_size=None`` uses
    the full data. One ``numpy.random.Generator(seed)`` drives both the batch sampling
    (without replacement) and the method's draws. Returns ``(params, history)`` with
    ``history["loss"]`` the full-data objective before each step and after the last. A run
    whose loss, step or parameters become non-finite stops with
    :class:`~refcurv.errors.DivergenceError` naming the step. ``x``/``y`` may be arrays or
    lists; ``net`` a :class:`~refcurv.nn.Sequential`, ``loss`` a refcurv loss instance,
    ``dense`` a bool.
    """
    if not isinstance(method, Method):
        what = method.__name__ if isinstance(method, type) else repr(method)
        raise ArgumentTypeError(
            f"method must be a method instance such as REGISTRY['kfac'](), got {what}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise HyperParameterError(f"steps must be a non-negative int, got {steps!r}")
    schedule = _check_lr(lr)
    if not isinstance(net, Sequential):
        raise ArgumentTypeError(f"net must be a refcurv.nn.Sequential, got {describe(net)}")
    loss = check_loss(loss)
    dense = check_bool(dense, "dense")
    params = net.check_params(params)
    x, y = _samples(x, "x"), _samples(y, "y")
    N = len(x)
    if len(y) != N:
        raise HyperParameterError(f"x and y must have the same number of samples, got {N} and {len(y)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or not 1 <= batch_size <= N):
        raise HyperParameterError(f"batch_size must be None or an int in [1, {N}], got {batch_size!r}")
    rng = rng_of(seed)
    history = {"loss": [float(net.loss(params, x, y, loss))]}
    state = method.init(net, params)
    for k in range(steps):
        idx = slice(None) if batch_size is None else rng.choice(N, size=batch_size, replace=False)
        try:
            direction, state = method.step(state, net, params, Batch(x[idx], y[idx], loss), rng, dense=dense)
        except NonFiniteError as e:
            raise DivergenceError(f"{method.name} diverged at step {k}: {e}") from e
        a = schedule(k)
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not np.isfinite(a):
            raise HyperParameterError(f"lr({k}) must be a finite number, got {a!r}")
        with np.errstate(over="ignore", invalid="ignore"):
            new = [W + a * D for W, D in zip(params, direction)]
        if not all(np.isfinite(W).all() for W in new):
            raise DivergenceError(f"{method.name} diverged at step {k}: parameters not finite (lr = {a:g})")
        params = new
        try:
            value = float(net.loss(params, x, y, loss))
        except NonFiniteError as e:
            raise DivergenceError(f"{method.name} diverged at step {k}: {e} (lr = {a:g})") from e
        if not np.isfinite(value):
            raise DivergenceError(f"{method.name} diverged at step {k}: loss {value} (lr = {a:g})")
        history["loss"].append(value)
    return params, history
