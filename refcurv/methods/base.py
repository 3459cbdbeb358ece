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
import functools
import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..backend import rng_of, to_numpy, xp_of
from ..errors import ArgumentTypeError, DrawsError, HyperParameterError, NonFiniteError, ShapeError, StateError
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

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 0:
            raise StateError(f"{type(self).__name__}: k must be an int >= 0, got {self.k!r}")
        if not isinstance(self.diagnostics, Mapping):
            raise StateError(f"{type(self).__name__}: diagnostics must be a dict, got {type(self.diagnostics).__name__}")

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
      matrices. One naming scheme: ``"Omega/<layer>"`` a dense sketch matrix,
      ``"Omega/<layer>/index"`` and ``"Omega/<layer>/weight"`` a row-sampling sketch (with
      ``Omega_A``/``Omega_G`` for the two sides of an implicit layer), ``"subset"`` a sample
      subset; the method's docstring lists its keys;
    * ``seeds``: ``{name: int}`` — seeds for kernels that draw internally (e.g. a randomized
      SVD's test matrix), named as in the method's docstring.
    """

    method: str
    labels: Any = None
    sketches: Mapping = field(default_factory=dict)
    seeds: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise DrawsError(f"Draws: method must be a method's registry name (a str), got {self.method!r}")
        for f in ("sketches", "seeds"):
            if not isinstance(getattr(self, f), Mapping):
                raise DrawsError(f"Draws: {f} must be a dict {{name: value}}, got {type(getattr(self, f)).__name__}")


@dataclass(frozen=True)
class Batch:
    """A mini-batch and the loss it is scored with."""

    x: Any
    y: Any
    loss: Any

    def __post_init__(self):
        check_loss(self.loss, "batch.loss")
        for f in ("x", "y"):
            _check_data(getattr(self, f), f"batch.{f}")

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


# ---------------------------------------------------------------------- entry checks
# The input policy (README): every public method of a Method checks its arguments where they
# enter. The checks go by parameter name, one meaning per name (the names of the interface
# above); Method.__init_subclass__ applies them to every public method a subclass defines.

def check_loss(loss, name="loss"):
    """A refcurv loss (:class:`~refcurv.nn.MSE`, ``CrossEntropy``, ``BCE``), else
    :class:`~refcurv.errors.ArgumentTypeError` naming ``name``."""
    if not all(hasattr(loss, a) for a in ("grad", "hvp", "check_targets", "sample")):
        raise ArgumentTypeError(f"{name} must be a refcurv loss (refcurv.nn.MSE, CrossEntropy, BCE), "
                                f"got {type(loss).__name__}")
    return loss


def _check_data(a, name):
    """Batch data (``x`` or targets ``y``): a real, non-empty array (or nested list) with a
    batch axis. Integer data are the caller's: the network converts ``x`` to float64 and
    the loss checks ``y``; complex data are refused (the imaginary part would be dropped)."""
    if a is None or isinstance(a, (str, bytes, bool, numbers.Number, Mapping, type)):
        raise ArgumentTypeError(f"{name} must be an array with a batch axis, got "
                                f"{'the type ' + a.__name__ if isinstance(a, type) else type(a).__name__}")
    dtype, shape = getattr(a, "dtype", None), getattr(a, "shape", None)
    if dtype is None or shape is None:
        try:
            arr = np.asarray(a)  # host: a nested list (no dtype/shape) is host data; read for its dtype and shape
        except (ValueError, TypeError) as e:
            raise ArgumentTypeError(f"{name} must be an array with a batch axis, got {type(a).__name__} ({e})") from None
        dtype, shape = arr.dtype, arr.shape
    if np.dtype(dtype).kind not in "biuf":
        raise ArgumentTypeError(f"{name} must be a real numeric array, got dtype {dtype}")
    if len(shape) == 0:
        raise ShapeError(f"{name} must have a batch axis, got a 0-d array")
    if shape[0] == 0:
        from ..errors import EmptyBatchError

        raise EmptyBatchError(f"{name} is an empty batch (N = 0)")


def _check_net(self, net, where):
    from ..nn import Sequential

    if not isinstance(net, Sequential):
        raise ArgumentTypeError(f"{where}: net must be a refcurv.nn.Sequential, got {type(net).__name__}")
    _check_one_location(self, net, net.input_shape)
    return net


def _check_one_location(self, net, input_shape):
    """Methods defined for fully connected layers (``supports_conv = False``: thesis Ch.2
    K-BFGS, whose ``H_a`` pair and mean activation assume one location per sample) refuse
    Conv2d layers and Linear layers applied to sequences (``T > 1`` positions)."""
    if self.supports_conv:
        return
    if any(isinstance(m, Conv2d) for m in net.layers_trainable):
        raise ArgumentTypeError(f"{self.name} is defined for Linear layers only; the network has Conv2d layers")
    if input_shape is None:
        return
    shapes = net.feature_shapes(input_shape)
    for j, (m, s) in enumerate(zip(net.layers, shapes)):
        if getattr(m, "trainable", False) and len(s) > 1:
            raise ArgumentTypeError(
                f"{self.name} is defined for Linear layers on one location per sample; layers[{j}] is "
                f"a Linear on a sequence of feature shape {s} (use its conv version, e.g. kbfgs)")


def _check_params(params, net, where):
    if not isinstance(params, (list, tuple)):
        raise ArgumentTypeError(f"{where}: params must be a list of per-layer arrays, got {type(params).__name__}")
    for j, W in enumerate(params):
        kind = getattr(getattr(W, "dtype", None), "kind", None)
        if kind is None or kind not in "f":
            raise ArgumentTypeError(f"{where}: params[{j}] must be a floating array (float32/float64), got "
                                    f"{type(W).__name__ if kind is None else W.dtype}")
    net.check_params(params)
    return params


def _check_batch(batch, net, where, name="batch"):
    if not isinstance(batch, Batch):
        raise ArgumentTypeError(f"{where}: {name} must be a refcurv.methods.Batch, got {type(batch).__name__}")
    check_loss(batch.loss, f"{where}: {name}.loss")
    if net is not None:
        net.check_input(batch.x)
        if np.shape(batch.y)[:1] != np.shape(batch.x)[:1]:
            raise ShapeError(f"{where}: {name}.y has {np.shape(batch.y)[:1]} samples, {name}.x has "
                             f"{np.shape(batch.x)[:1]}")
    return batch


def _check_grads(grads, where):
    if not isinstance(grads, (list, tuple)) or not grads:
        raise ArgumentTypeError(f"{where}: grads must be a non-empty list of per-layer arrays, got {grads!r:.60}")
    for j, G in enumerate(grads):
        kind = getattr(getattr(G, "dtype", None), "kind", None)
        if kind is None or kind != "f" or G.ndim != 2:
            raise ArgumentTypeError(f"{where}: grads[{j}] must be a 2-d floating array (out, d), got "
                                    f"{type(G).__name__ if kind is None else f'{G.dtype} of shape {G.shape}'}")
        if not bool(xp_of(G).isfinite(G).all()):
            raise NonFiniteError(f"{where}: grads[{j}] contains NaN or Inf")
    return grads


def _check_draws_kind(self, draws, where):
    if not isinstance(draws, Draws):
        raise DrawsError(f"{where}: draws must be a refcurv.methods.Draws, got {type(draws).__name__}")
    if draws.method != self.name:
        raise DrawsError(f"{where}: draws were made by {draws.method!r}, not {self.name!r}")
    return draws


def _rng(seed, name):
    """:func:`~refcurv.backend.rng_of`, its error naming the argument."""
    try:
        return rng_of(seed)
    except (ArgumentTypeError, HyperParameterError) as e:
        raise type(e)(f"{name}: {e}") from None


def _check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _entry(fn):
    """Decorator: check the arguments of a public method ``fn`` of a :class:`Method` by name
    before it runs — ``state`` (:meth:`Method.check_state`), ``net`` (a ``Sequential`` this
    method supports), ``params`` (floating arrays of the network's shapes, finite), ``batch``
    / ``batches`` (:class:`Batch` with a refcurv loss and inputs the network takes), ``rng``
    (a seed or Generator, converted by :func:`~refcurv.backend.rng_of`), ``seed``, ``draws``
    (a :class:`Draws` of this method; ``step`` and ``check_draws`` check the rest), ``grads``,
    ``dense`` (a bool). An optional argument left at ``None`` is the method's to handle."""
    if getattr(fn, "_refcurv_entry", False):
        return fn
    sig = inspect.signature(fn)
    names = set(sig.parameters)

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as e:
            raise ArgumentTypeError(f"{self.name}.{fn.__name__}: {e}") from None
        a = bound.arguments
        where = f"{self.name}.{fn.__name__}"

        def given(n):
            return n in a and not (a[n] is None and sig.parameters[n].default is None)

        if given("state"):
            self.check_state(a["state"])
        net = None
        if given("net"):
            net = _check_net(self, a["net"], where)
        if given("params"):
            if net is None:
                raise ArgumentTypeError(f"{where}: params given without net")
            a["params"] = _check_params(a["params"], net, where)
        if given("batch"):
            _check_batch(a["batch"], net, where)
        if given("batches"):
            bs = a["batches"]
            if not isinstance(bs, (list, tuple)):
                raise ArgumentTypeError(f"{where}: batches must be a list of Batch, got {type(bs).__name__}")
            if not bs:
                raise HyperParameterError(f"{where}: batches needs at least one batch, got []")
            for i, b in enumerate(bs):
                _check_batch(b, net, where, f"batches[{i}]")
        if given("rng"):
            a["rng"] = _rng(a["rng"], f"{where}: rng")
        if given("seed"):
            _rng(a["seed"], f"{where}: seed")
        if given("draws") and fn.__name__ not in ("step", "check_draws"):
            _check_draws_kind(self, a["draws"], where)
        if a.get("grads") is not None:  # None: a method that returns its momentum buffer ignores grads
            _check_grads(a["grads"], where)
        if given("g_flat"):
            g = a["g_flat"]
            kind = getattr(getattr(g, "dtype", None), "kind", None)
            if kind != "f" or g.ndim != 1 or (net is not None and g.shape[0] != net.n_params):
                raise ArgumentTypeError(
                    f"{where}: g_flat must be a 1-d floating array of the network's {getattr(net, 'n_params', '?')} "
                    f"parameters, got {type(g).__name__ if kind is None else f'{g.dtype} of shape {g.shape}'}")
            if not bool(xp_of(g).isfinite(g).all()):
                raise NonFiniteError(f"{where}: g_flat contains NaN or Inf")
        if given("k"):
            check_int(a["k"], f"{where}: k", minimum=0)
        if given("x2"):
            _check_data(a["x2"], f"{where}: x2")
            if net is not None:
                net.check_input(a["x2"])
        if given("y2"):
            _check_data(a["y2"], f"{where}: y2")
            if np.shape(a["y2"])[:1] != np.shape(a.get("x2"))[:1]:
                raise ShapeError(f"{where}: y2 has {np.shape(a['y2'])[:1]} samples, x2 has {np.shape(a.get('x2'))[:1]}")
        if given("loss"):
            check_loss(a["loss"], f"{where}: loss")
        if given("damping"):
            check_positive(a["damping"], f"{where}: damping")
        if given("damping_lm"):
            check_positive(a["damping_lm"], f"{where}: damping_lm")
        if given("rho") and not _is_real(a["rho"]):
            raise ArgumentTypeError(f"{where}: rho must be a real number (NaN: no step taken), got {a['rho']!r}")
        if "dense" in a:
            _check_flag(a["dense"], f"{where}: dense")
        return fn(*bound.args, **bound.kwargs)

    wrapper._refcurv_entry = True
    return wrapper


entry_point = _entry


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
        refuses a state made for another network), and every public method a subclass
        defines checks its arguments where they enter (:func:`entry_point`)."""
        super().__init_subclass__(**kwargs)
        if "init" in vars(cls):
            cls.init = _recording_init(cls.init)
        for a in dir(cls):  # own methods and those of mixins (the MRO)
            v = inspect.getattr_static(cls, a)
            if (not a.startswith("_") and a != "check_state" and inspect.isfunction(v)
                    and not getattr(v, "_refcurv_entry", False)):
                setattr(cls, a, entry_point(v))

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

    @_entry
    def init(self, net, params):
        return self.State()

    @_entry
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

    @_entry
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
        if draws.labels is not None and net is not None and batch is not None:
            self._check_label_values(draws.labels, net, batch)
        return draws

    def _check_label_values(self, labels, net, batch):
        """Every sampled label is a valid target of the loss (class indices in range, real
        targets of the output's shape): DrawsError naming the method and ``draws.labels``."""
        from ..errors import LabelError, ShapeError

        try:
            xp = xp_of(labels)  # CuPy labels stay on the device (np.asarray would refuse them)
            L = xp.asarray(labels)
        except Exception:  # noqa: BLE001 - anything the array module cannot read is refused below
            L = None
        if L is None or L.ndim < 2:
            raise DrawsError(f"{self.name}: draws.labels must be an array (n_samples, N, …), got "
                             f"{type(labels).__name__} of shape {getattr(L, 'shape', None)}")
        out = tuple(net.feature_shapes(tuple(np.shape(batch.x)[1:]))[-1])
        for s_ in range(L.shape[0]):
            try:
                batch.loss.check_targets(L[s_], xp.zeros((L.shape[1],) + out))
            except (LabelError, ShapeError) as e:
                raise DrawsError(f"{self.name}: draws.labels[{s_}] is not a valid target: {e}") from None

    # ------------------------------------------------------------------ step
    @_entry
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
        _check_one_location(self, net, tuple(np.shape(batch.x)[1:]))
        if draws is None:
            draws = self.draw(rng_of(rng), state, net, params, batch)
        elif rng is not None:
            raise ArgumentTypeError(f"{self.name}.step: pass rng or draws, not both")
        self.check_draws(draws, state, net, params, batch)
        if not dense:
            d, new_state = self._fast(state, net, params, batch, draws)
        else:
            # design §3: the reference computes in float64 whatever the input dtype (the fast
            # form runs in the input dtype, so float32 behaviour can be studied against it)
            params = [_float64(W) for W in params]
            batch = Batch(_float64(batch.x), _float64(batch.y), batch.loss)
            d, new_state = self._dense(state, net, params, batch, draws)
        # a state rebuilt from scratch by a form must still say which network it belongs to,
        # or check_state could no longer refuse it for another network
        if new_state.param_shapes is None:
            new_state = new_state.replace(param_shapes=tuple(tuple(s) for s in net.param_shapes))
        return d, new_state

    def _fast(self, state, net, params, batch, draws):  # pragma: no cover - abstract
        raise NotImplementedError

    def _dense(self, state, net, params, batch, draws):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ curvature
    @_entry
    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """The curvature operator ``C`` (:mod:`refcurv.operators`) the step that returned
        ``state`` used: ``direction = −C⁻¹ rhs(state, g)``."""
        raise NotImplementedError(f"{self.name} does not expose its curvature")  # pragma: no cover

    @_entry
    def rhs(self, state, grads):
        """The vector ``v`` (per layer) that the step solved with: the mini-batch gradient
        ``grads`` by default; momentum methods return their buffer (and ignore ``grads``,
        which may then be ``None``)."""
        if grads is None:
            raise ArgumentTypeError(f"{self.name}.rhs: grads (the mini-batch gradient per layer) is None")
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
    if not _is_real(value) or not np.isfinite(value) or not value > 0:  # host: a scalar hyper-parameter
        raise HyperParameterError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(value, name):
    if not _is_real(value) or not np.isfinite(value) or value < 0:  # host: a scalar hyper-parameter
        raise HyperParameterError(f"{name} must be a finite number >= 0, got {value!r}")


def check_unit(value, name, closed_low=True, closed_high=False):
    if not _is_real(value) or not np.isfinite(value):  # host: a scalar hyper-parameter
        raise HyperParameterError(f"{name} must be a finite number, got {value!r}")
    lo_ok = value >= 0 if closed_low else value > 0
    hi_ok = value <= 1 if closed_high else value < 1
    if not (lo_ok and hi_ok):
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        raise HyperParameterError(f"{name} must lie in {lo}0, 1{hi}, got {value!r}")


def check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise HyperParameterError(f"{name} must be an int >= {minimum}, got {value!r}")


def _same_kind(value, choice):
    """``value`` is of the kind of ``choice`` (a str for a str choice, an int — not a bool —
    for an int choice), so that ``==`` is a plain comparison (no arrays, no ``True == 1``)."""
    if isinstance(choice, str):
        return isinstance(value, str)
    if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return value is choice


def check_choice(value, name, choices):
    if not any(_same_kind(value, c) and value == c for c in choices):
        raise HyperParameterError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def model_label_draws(method, net, params, batch, rng):
    """``Draws`` with ``labels`` ``(n_samples, N, …)`` drawn from the model at ``params``
    (``ŷ ~ p(·|f(x))``, host NumPy) for ``method.fisher == "mc"``, and none for the other Fisher
    kinds: the draws of the methods whose curvature is a Monte-Carlo Fisher (KFAC,
    natural_gradient)."""
    if method.fisher != "mc":
        return Draws(method=method.name)
    f = net.forward(params, batch.x)
    return Draws(method=method.name, labels=to_numpy(batch.loss.sample(f, n_samples=method.n_samples, seed=rng)))


def check_model_label_draws(method, draws, batch):
    """The shape check of :func:`model_label_draws`' draws: ``labels`` of shape
    ``(n_samples,) + y.shape`` for ``fisher="mc"``, no labels otherwise (:class:`DrawsError`)."""
    if method.fisher != "mc":
        if draws.labels is not None:
            raise DrawsError(f"{method.name}: draws.labels given, but fisher={method.fisher!r} consumes no labels")
        return draws
    want = (method.n_samples,) + tuple(np.shape(batch.y))
    got = tuple(getattr(draws.labels, "shape", ()))
    if got != want:
        raise DrawsError(f"{method.name}: draws.labels must have shape (n_samples, N, …) = {want}, got {got}")
    return draws


def layer_grads(net, params, batch):
    """``(per-layer mini-batch gradients, per-layer per-sample gradients (N, out, d))``."""
    U = net.per_sample_grads(params, batch.x, batch.y, batch.loss)
    return [u.mean(axis=0) for u in U], U
