"""The method interface shared by every optimizer in refcurv (in the spirit of optax).

A method object holds hyper-parameters only (validated in ``__post_init__``). State is an
explicit, frozen, typed object (a :class:`State` subclass per method) and is never mutated:

    state = method.init(net, params)                                         # -> KFACState …
    direction, state = method.step(state, net, params, batch, rng)             # fast form
    direction, _     = method.step(state, net, params, batch, rng, dense=True)  # dense form
    draws = method.draw(rng, state, net, params, batch)                         # -> Draws
    direction, state = method.step(state, net, params, batch, draws=draws)      # replay
    C = method.curvature(state, net, params, batch, draws)  # refcurv.operators.Operator

* ``batch`` is a :class:`Batch` ``(x, y, loss)``.
* ``direction`` is in the parameter layout (a list of per-layer ``(out, d)`` matrices) and is
  the *update* direction of the papers: the step is ``θ ← θ + lr · direction`` (so it is a
  descent direction, e.g. ``−(M + λI)^{-1} g``). :func:`refcurv.flatten` flattens it.
* ``rng`` is a seed or ``numpy.random.Generator``. All random draws of a step are made once,
  up front, by :meth:`Method.draw`, into one typed :class:`Draws`, and handed to both forms,
  so that the fast and the dense form consume the same draws and can be compared call by
  call. A caller may pass ``draws=`` instead of ``rng`` to replay labels or sketches drawn
  elsewhere (e.g. by the implementation under test); the result is bit-identical to the
  draws being made inside.
* The dense form builds the matrix the paper defines and solves it with a stable
  factorization, in float64 whatever the input dtype (``step`` casts the parameters and
  the batch); the fast form is the paper's algorithm, in the input dtype. Both return the
  same state type; where a paper's fast form *approximates* its dense definition, the
  method's docstring says which bound relates them.
* ``curvature(state, …)`` is the curvature ``C`` (damping included) the step that returned
  ``state`` preconditioned with: ``direction = −C⁻¹ v`` with ``v = method.rhs(state, g)``
  (the mini-batch gradient ``g``, or the momentum buffer where the method's docstring says
  so). Methods whose ``C`` is built from the mini-batch (SMW, Hessian-free, …) need
  ``net, params, batch, draws`` of that step; the others read it from the state alone.
* Refresh phase (one convention for every method): a statistic or inverse refreshed every
  ``T`` steps is refreshed at step ``k`` (0-based, ``k = state.k`` before the step) iff
  ``k ≡ 0 (mod T)`` — the first step always refreshes (:func:`refresh_due`). Where a paper
  prints another phase, the method offers it as ``phase="paper"``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..backend import rng_of, xp_of
from ..errors import ArgumentTypeError, DrawsError, HyperParameterError, StateError
from ..nn.layers import Conv2d

#: State fields shared by several methods: one name, one meaning (tests/test_vocabulary.py
#: checks that a field name means the same thing in every method that uses it).
COMMON_FIELDS = {
    "k": "steps taken so far (0-based index of the next step)",
    "diagnostics": "per-step diagnostics of the last step, keys from refcurv.methods.diagnostics.SCHEMA",
    "m": "momentum buffer per layer (None before the first step)",
    "g": "mini-batch gradient of the last step per layer",
    "damping": "damping λ the next step will use (adaptive methods)",
    "damping_used": "damping λ the last step used",
    "param_shapes": "the parameter shapes of the network the state was made for (set by init)",
}


def state_field(name=None, doc=None, default=None):
    """A state field with its meaning in ``metadata["doc"]``: the common meaning for a name in
    :data:`COMMON_FIELDS`, else ``doc``."""
    if name is not None:
        doc = COMMON_FIELDS[name]
    if not doc:
        raise ValueError("a state field needs a doc string")
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, kw_only=True)
class State:
    """Base of every method's state: a frozen dataclass; subclasses add fields named after the
    paper's symbols, each documented in ``metadata["doc"]``. Update with
    :func:`dataclasses.replace` (``state.replace(k=…)``)."""

    k: int = state_field("k", default=0)
    diagnostics: Mapping = state_field("diagnostics", default={})
    param_shapes: tuple = state_field("param_shapes", default=None)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_docs(cls):
        """``{field: meaning}``."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


@dataclass(frozen=True, kw_only=True)
class Draws:
    """Every random number one step consumes, made by :meth:`Method.draw` (host NumPy arrays).

    * ``method``: the registry name of the method that made them (checked by ``step``);
    * ``labels``: targets sampled from the model's predictive distribution (Monte-Carlo
      Fisher), shape ``(n_samples, N, …)`` with ``…`` the shape of one target of the loss
      (``()`` for cross-entropy class indices, ``(C,)`` for MSE/BCE); ``None`` if unused;
    * ``sketches``: ``{name: array}`` — sampled row indices, sketch weights or sketch
      matrices, named as in the method's docstring;
    * ``seeds``: ``{name: int}`` — seeds for kernels that draw internally (e.g. a randomized
      SVD's test matrix), named as in the method's docstring.
    """

    method: str
    labels: Any = None
    sketches: Mapping = field(default_factory=dict)
    seeds: Mapping = field(default_factory=dict)


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


def _recording_init(init):
    import functools

    @functools.wraps(init)
    def wrapper(self, net, params, *args, **kwargs):
        from ..nn import Sequential

        if net is None:  # a method whose init needs no network (step checks the network)
            return init(self, net, params, *args, **kwargs)
        if not isinstance(net, Sequential):
            raise ArgumentTypeError(f"{self.name}: net must be a refcurv.nn.Sequential, got {type(net).__name__}")
        params = net.check_params(params)
        state = init(self, net, params, *args, **kwargs)
        if state.param_shapes is None:
            state = state.replace(param_shapes=tuple(tuple(s) for s in net.param_shapes))
        return state

    return wrapper


def refresh_due(k, T):
    """The one refresh-phase convention: refresh at 0-based step ``k`` iff ``k ≡ 0 (mod T)``."""
    return k % T == 0


class Method:
    """Base class. Subclasses are frozen dataclasses of hyper-parameters that set ``State``
    (their :class:`State` subclass) and implement ``init``, ``draw`` (optional), ``_fast``,
    ``_dense``, ``curvature`` and, where the direction is not ``−C⁻¹ g``, ``rhs``.

    Each subclass's docstring lists what its two forms share (kernels tested on their own)."""

    #: registry name, seed reference (file and equations), one-line description
    name: str = ""
    seed_ref: str = ""
    summary: str = ""
    #: False for methods defined for fully connected layers only (thesis Ch.2 K-BFGS)
    supports_conv: bool = True
    #: the method's state type
    State = State
    #: the fields of :class:`Draws` this method consumes (``"labels"``, ``"sketches"``, ``"seeds"``)
    draw_fields: tuple = ()

    def __init_subclass__(cls, **kwargs):
        """Every ``init`` records the network's parameter shapes in the state (``step``
        refuses a state made for another network) and validates its arguments."""
        super().__init_subclass__(**kwargs)
        if "init" in vars(cls):
            cls.init = _recording_init(cls.init)

    def __new__(cls, *args, **kwargs):
        # an unknown or retired hyper-parameter: one line naming it (the dataclass __init__
        # would raise a bare TypeError)
        if kwargs and dataclasses.is_dataclass(cls):
            names = {f.name for f in dataclasses.fields(cls)}
            for k in kwargs:
                if k not in names:
                    from .vocabulary import RETIRED

                    hint = f"; it was renamed: {RETIRED[k]}" if k in RETIRED else ""
                    raise ArgumentTypeError(
                        f"{cls.name or cls.__name__} has no hyper-parameter {k!r}{hint} "
                        f"(hyper-parameters: {', '.join(sorted(names)) or 'none'})")
        return super().__new__(cls)

    def init(self, net, params):
        return self.State()

    def draw(self, rng, state, net, params, batch):
        """All random numbers this step needs, as one :class:`Draws` (default: none)."""
        return Draws(method=self.name)

    # ------------------------------------------------------------------ checks
    def check_state(self, state, net=None):
        """Refuse a state this method did not make, or made for another network
        (:class:`~refcurv.errors.StateError`)."""
        want = self.State
        if type(state) is want:
            if net is not None and state.param_shapes is not None and \
                    tuple(map(tuple, state.param_shapes)) != tuple(map(tuple, net.param_shapes)):
                raise StateError(f"{self.name}: the state was made for a network with parameter shapes "
                                 f"{list(map(tuple, state.param_shapes))}, this one has "
                                 f"{list(map(tuple, net.param_shapes))}")
            return state
        fields = [f.name for f in dataclasses.fields(want)]
        if state is None:
            raise StateError(f"{self.name}: state is None; expected a {want.__name__} from {self.name}.init()")
        have = (set(state) if isinstance(state, Mapping)
                else {f.name for f in dataclasses.fields(state)} if dataclasses.is_dataclass(state) else set())
        missing = [f for f in fields if f not in have]
        raise StateError(
            f"{self.name}: state must be a {want.__name__} (from {self.name}.init()), got "
            f"{type(state).__name__}{' (empty)' if not have else ''}; missing fields: {', '.join(missing) or 'none'}")

    def check_draws(self, draws, state, net, params, batch):
        """Refuse draws made for another method or missing a field this method consumes
        (:class:`~refcurv.errors.DrawsError`). Subclasses extend it with shape checks."""
        if not isinstance(draws, Draws):
            raise DrawsError(f"{self.name}: draws must be a refcurv.methods.Draws, got {type(draws).__name__}")
        if draws.method != self.name:
            raise DrawsError(f"{self.name}: draws were made by {draws.method!r}, not {self.name!r}")
        for f in self.draw_fields:
            v = getattr(draws, f)
            if v is None or (isinstance(v, Mapping) and not v):
                raise DrawsError(f"{self.name}: draws.{f} is missing (this method consumes {', '.join(self.draw_fields)})")
        return draws

    # ------------------------------------------------------------------ step
    def step(self, state, net, params, batch, rng=None, dense=False, draws=None):
        """One step: ``(direction, new_state)``. Pass either ``rng`` (the draws are made by
        :meth:`draw`) or ``draws`` (replayed exactly), not both."""
        from ..nn import Sequential

        if not isinstance(net, Sequential):
            raise ArgumentTypeError(f"{self.name}: net must be a refcurv.nn.Sequential, got {type(net).__name__}")
        self.check_state(state, net)
        if not isinstance(batch, Batch):
            raise ArgumentTypeError(f"batch must be a refcurv.methods.Batch, got {type(batch).__name__}")
        if not all(hasattr(batch.loss, a) for a in ("grad", "hvp", "check_targets", "sample")):
            raise ArgumentTypeError(
                f"{self.name}: batch.loss must be a refcurv loss (refcurv.nn.MSE, CrossEntropy, BCE), "
                f"got {type(batch.loss).__name__}")
        if not self.supports_conv and any(isinstance(m, Conv2d) for m in net.layers_trainable):
            raise ArgumentTypeError(f"{self.name} is defined for Linear layers only; the network has Conv2d layers")
        if draws is None:
            draws = self.draw(rng_of(rng), state, net, params, batch)
        elif rng is not None:
            raise ArgumentTypeError(f"{self.name}.step: pass rng or draws, not both")
        self.check_draws(draws, state, net, params, batch)
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

    # ------------------------------------------------------------------ curvature
    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """The curvature operator ``C`` (:mod:`refcurv.operators`) the step that returned
        ``state`` used: ``direction = −C⁻¹ rhs(state, g)``."""
        raise NotImplementedError(f"{self.name} does not expose its curvature")  # pragma: no cover

    def rhs(self, state, grads):
        """The vector ``v`` (per layer) that the step solved with: the mini-batch gradient
        ``grads`` by default; momentum methods return their buffer."""
        return grads

    @classmethod
    def hyper_parameters(cls):
        """``{name: default}`` of the method's hyper-parameters."""
        return {f.name: f.default for f in dataclasses.fields(cls)}


Method.init = _recording_init(Method.init)


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
