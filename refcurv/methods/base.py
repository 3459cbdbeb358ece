"""The method interface shared by every optimizer in refcurv (in the spirit of optax).

A method object holds hyper-parameters only (validated in ``__post_init__``). State is
explicit and never mutated:

    state = method.init(net, params)
    direction, state = method.step(state, net, params, batch, rng)             # fast form
    direction, _     = method.step(state, net, params, batch, rng, dense=True)  # dense form

* ``batch`` is a :class:`Batch` ``(x, y, loss)``.
* ``direction`` is in the parameter layout (a list of per-layer ``(out, d)`` matrices) and is
  the *update* direction of the papers: the step is ``θ ← θ + lr · direction`` (so it is a
  descent direction, e.g. ``−(M + λI)^{-1} g``). :func:`refcurv.flatten` flattens it.
* ``rng`` is a seed or ``numpy.random.Generator``. All random draws of a step are made once,
  up front, by :meth:`Method.draw`, and handed to both forms, so that the fast and the dense
  form consume the same draws and can be compared call by call.
* The dense form builds the matrix the paper defines and solves it with a stable
  factorization, in float64 whatever the input dtype (``step`` casts the parameters and
  the batch); the fast form is the paper's algorithm, in the input dtype. Both return the same new state
  structure; where a paper's fast form *approximates* its dense definition, the method's
  docstring says which bound relates them.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import rng_of, xp_of
from ..errors import ArgumentTypeError, HyperParameterError
from ..nn.layers import Conv2d


@dataclass(frozen=True)
class Batch:
    """A mini-batch and the loss it is scored with."""

    x: Any
    y: Any
    loss: Any

    def own_copy(self):
        """A copy of ``x`` and ``y``, for a method that keeps the batch for a later step
        (a caller may refill its buffers in place)."""
        return Batch(copy.deepcopy(self.x), copy.deepcopy(self.y), self.loss)


class Method:
    """Base class. Subclasses are frozen dataclasses of hyper-parameters that implement
    ``init``, ``draw`` (optional), ``_fast`` and ``_dense``."""

    #: registry name, seed reference (file and equations), one-line description
    name: str = ""
    seed_ref: str = ""
    summary: str = ""
    #: False for methods defined for fully connected layers only (thesis Ch.2 K-BFGS)
    supports_conv: bool = True

    def init(self, net, params):
        return {"k": 0}

    def draw(self, rng, state, net, params, batch):
        """All random numbers this step needs (default: none)."""
        return None

    def step(self, state, net, params, batch, rng=None, dense=False):
        if not isinstance(batch, Batch):
            raise ArgumentTypeError(f"batch must be a refcurv.methods.Batch, got {type(batch).__name__}")
        if not self.supports_conv and any(isinstance(m, Conv2d) for m in net.layers_trainable):
            raise ArgumentTypeError(f"{self.name} is defined for Linear layers only; the network has Conv2d layers")
        draws = self.draw(rng_of(rng), state, net, params, batch)
        if not dense:
            return self._fast(state, net, params, batch, draws)
        # design §3: the reference computes in float64 whatever the input dtype (the fast
        # form runs in the input dtype, so float32 behaviour can be studied against it)
        params = [_float64(W) for W in params]
        batch = Batch(_float64(batch.x), _float64(batch.y), batch.loss)
        return self._dense(state, net, params, batch, draws)

    def _fast(self, state, net, params, batch, draws):  # pragma: no cover - abstract
        raise NotImplementedError

    def _dense(self, state, net, params, batch, draws):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def hyper_parameters(cls):
        """``{name: default}`` of the method's hyper-parameters."""
        return {f.name: f.default for f in dataclasses.fields(cls)}


def _float64(a):
    """Floating arrays to float64 (integer labels are left alone)."""
    xp = xp_of(a)
    a = xp.asarray(a)
    return a.astype(np.float64) if a.dtype.kind == "f" and a.dtype != np.float64 else a


def _is_real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_positive(value, name):
    if not _is_real(value) or not np.isfinite(value) or not value > 0:
        raise HyperParameterError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(value, name):
    if not _is_real(value) or not np.isfinite(value) or value < 0:
        raise HyperParameterError(f"{name} must be a finite number >= 0, got {value!r}")


def check_unit(value, name, closed_low=True, closed_high=False):
    if not _is_real(value) or not np.isfinite(value):
        raise HyperParameterError(f"{name} must be a finite number, got {value!r}")
    lo_ok = value >= 0 if closed_low else value > 0
    hi_ok = value <= 1 if closed_high else value < 1
    if not (lo_ok and hi_ok):
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        raise HyperParameterError(f"{name} must lie in {lo}0, 1{hi}, got {value!r}")


def check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise HyperParameterError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_choice(value, name, choices):
    if value not in choices:
        raise HyperParameterError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def layer_grads(net, params, batch):
    """``(per-layer mini-batch gradients, per-layer per-sample gradients (N, out, d))``."""
    U = net.per_sample_grads(params, batch.x, batch.y, batch.loss)
    return [u.mean(axis=0) for u in U], U
