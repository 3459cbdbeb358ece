"""A small training loop for demos, notebooks and smoke tests."""
from __future__ import annotations

import math
import numbers
import time

import numpy as np

from .backend import rng_of, xp_of
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
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr <= 0:  # host: a scalar
        raise HyperParameterError(f"lr must be a finite number > 0 or a callable k -> lr_k, got {lr!r}")
    return lambda k: lr


def _samples(a, name):
    """``a`` (an array, or a list converted with ``numpy.asarray``) with a sample axis."""
    if isinstance(a, list):
        try:
            a = np.asarray(a)  # host: a Python list is host data
        except ValueError:
            raise ArgumentTypeError(f"{name} must be an array of samples, got a ragged list") from None
    if not hasattr(a, "shape") or not hasattr(a, "ndim") or a.ndim == 0:
        raise ArgumentTypeError(f"{name} must be an array (or list) of samples, got {describe(a)}")
    return a


def _check_reference(reference):
    """``None``, a registry name, a :class:`Method` instance, or a callable
    ``(net, params, batch) -> direction``; returned as ``(method or None, callable or None)``."""
    if reference is None:
        return None, None
    if isinstance(reference, str):
        from .methods import REGISTRY

        return REGISTRY[reference](), None
    if isinstance(reference, Method):
        return reference, None
    if callable(reference) and not isinstance(reference, type):
        return None, reference
    raise ArgumentTypeError("reference must be None, a method name such as 'natural_gradient', a method instance "
                            f"or a callable (net, params, batch) -> direction, got {describe(reference)}")


def _cosine(d, r):
    """cos∠(d, r) of two flat vectors; NaN when either is zero (no direction to compare)."""
    xp = xp_of(d, r)
    nd, nr = float(xp.linalg.norm(d)), float(xp.linalg.norm(r))
    return float(d @ r) / (nd * nr) if nd > 0 and nr > 0 else float("nan")


def _all_finite(arrays):
    """Every entry of every array finite (on each array's own backend; one bool per array)."""
    return all(bool(xp_of(W).isfinite(W).all()) for W in arrays)


def _flat64(arrays):
    """The per-layer arrays as one flat float64 vector on their backend (a list from a user's
    reference callable is read as host data)."""
    xp = xp_of(arrays)
    return xp.concatenate([xp.ravel(xp.asarray(D)) for D in arrays]).astype(np.float64)


def _check_run(net, params, x, y, loss, steps, lr, batch_size):
    """The arguments every training loop takes, checked in one place: ``(schedule, params, x,
    y, loss, N)``."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise HyperParameterError(f"steps must be a non-negative int, got {steps!r}")
    schedule = _check_lr(lr)
    if not isinstance(net, Sequential):
        raise ArgumentTypeError(f"net must be a refcurv.nn.Sequential, got {describe(net)}")
    loss = check_loss(loss)
    params = net.check_params(params)
    x, y = _samples(x, "x"), _samples(y, "y")
    N = len(x)
    if len(y) != N:
        raise HyperParameterError(f"x and y must have the same number of samples, got {N} and {len(y)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or not 1 <= batch_size <= N):
        raise HyperParameterError(f"batch_size must be None or an int in [1, {N}], got {batch_size!r}")
    return schedule, params, x, y, loss, N


def train(method, net, params, x, y, loss, steps, lr, batch_size=None, seed=0, dense=False, reference=None):
    """Run ``steps`` updates ``θ ← θ + lr_k · direction_k`` on mini-batches of ``(x, y)``.

    ``lr`` is a finite positive number or a callable ``k -> lr_k``; ``batch_size=None`` uses
    the full data. One ``numpy.random.Generator(seed)`` drives both the batch sampling
    (without replacement) and the method's draws. Returns ``(params, history)``:

    * ``history["loss"]``: the full-data objective before each step and after the last
      (``steps + 1`` values);
    * ``history["time"]``: cumulative wall-clock seconds spent in the method's steps and
      updates (``steps + 1`` values from 0; loss evaluations and the reference excluded);
    * ``history["direction_norm"]``: ``‖direction_k‖`` (flat θ) per step;
    * ``history["lr"]``: the learning rate used per step;
    * ``history["cosine"]`` (only with ``reference``): ``cos∠(direction_k, r_k)`` per step,
      with ``r_k`` the reference direction at the same parameters and mini-batch.

    ``reference``: a registry name (e.g. ``"natural_gradient"``, default hyper-parameters), a
    method instance (e.g. ``REGISTRY["natural_gradient"](damping=1e-3)``, to match the
    damping) or a callable ``(net, params, batch) -> direction`` (per-layer list). A reference
    method keeps its own state along the trained trajectory and draws from a generator
    spawned from the run's, so adding a reference does not change the run.

    A run whose loss, step or parameters become non-finite stops with
    :class:`~refcurv.errors.DivergenceError` naming the step; its ``history`` attribute holds
    the history up to that step. ``x``/``y`` may be arrays or
    lists; ``net`` a :class:`~refcurv.nn.Sequential`, ``loss`` a refcurv loss instance,
    ``dense`` a bool.
    """
    if not isinstance(method, Method):
        what = method.__name__ if isinstance(method, type) else repr(method)
        raise ArgumentTypeError(
            f"method must be a method instance such as REGISTRY['kfac'](), got {what}")
    schedule, params, x, y, loss, N = _check_run(net, params, x, y, loss, steps, lr, batch_size)
    dense = check_bool(dense, "dense")
    ref_method, ref_fn = _check_reference(reference)
    rng = rng_of(seed)
    history = {"loss": [float(net.loss(params, x, y, loss))], "time": [0.0], "direction_norm": [], "lr": []}
    if reference is not None:
        history["cosine"] = []
        # its own stream: spawning does not advance the run's generator
        ref_rng = rng.spawn(1)[0]
        ref_state = ref_method.init(net, params) if ref_method is not None else None
    state = method.init(net, params)
    elapsed = 0.0
    try:
        for k in range(steps):
            idx = slice(None) if batch_size is None else rng.choice(N, size=batch_size, replace=False)
            batch = Batch(x[idx], y[idx], loss)
            t0 = time.perf_counter()
            try:
                direction, state = method.step(state, net, params, batch, rng, dense=dense)
            except NonFiniteError as e:
                raise DivergenceError(f"{method.name} diverged at step {k}: {e}") from e
            a = schedule(k)
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not np.isfinite(a):  # host: lr_k, a scalar
                raise HyperParameterError(f"lr({k}) must be a finite number, got {a!r}")
            with np.errstate(over="ignore", invalid="ignore"):
                new = [W + a * D for W, D in zip(params, direction)]
            if not _all_finite(new):
                raise DivergenceError(f"{method.name} diverged at step {k}: parameters not finite (lr = {a:g})")
            elapsed += time.perf_counter() - t0
            flat = _flat64(direction)
            history["direction_norm"].append(float(xp_of(flat).linalg.norm(flat)))
            history["lr"].append(float(a))
            if reference is not None:
                r, ref_state = _reference_direction(ref_method, ref_fn, ref_state, net, params, batch, ref_rng, k)
                history["cosine"].append(_cosine(flat, r))
            params = new
            try:
                value = float(net.loss(params, x, y, loss))
            except NonFiniteError as e:
                raise DivergenceError(f"{method.name} diverged at step {k}: {e} (lr = {a:g})") from e
            if not math.isfinite(value):
                raise DivergenceError(f"{method.name} diverged at step {k}: loss {value} (lr = {a:g})")
            history["loss"].append(value)
            history["time"].append(elapsed)
    except DivergenceError as e:
        e.history = history  # the run up to the step that diverged, for plotting
        raise
    return params, history


def _reference_direction(ref_method, ref_fn, ref_state, net, params, batch, rng, k):
    """``(flat float64 reference direction at params on batch, the reference's new state)``."""
    if ref_method is not None:
        r, ref_state = ref_method.step(ref_state, net, params, batch, rng)
    else:
        r = ref_fn(net, params, batch)
        shapes = [tuple(np.shape(D)) for D in r] if isinstance(r, (list, tuple)) else None
        if shapes != [tuple(s) for s in net.param_shapes]:
            raise ArgumentTypeError(f"reference returned {describe(r)}, not a per-layer list of the parameter "
                                    f"shapes {[tuple(s) for s in net.param_shapes]} (step {k})")
    return _flat64(r), ref_state


def compare_directions(reference, methods, net, params, x, y, loss, steps, lr, batch_size=None, seed=0):
    """Cosine similarity, per layer, of each method's direction to ``reference``'s along the
    reference's own trajectory ([Ren-thesis] §4.8, Figure 4.1: "we always followed the
    trajectory produced by the block Fisher method").

    ``reference``: a method instance (e.g. ``REGISTRY["natural_gradient"](beta=0.9,
    momentum=0.9, momentum_form="ema")``) whose directions move the parameters,
    ``θ ← θ + lr·r_k``; ``methods``: ``{label: method instance}``, each stepped at the same
    parameters on the same mini-batch and keeping its own state (its statistics are computed
    at the reference's points, as in the thesis). Each method draws from its own generator
    spawned from ``seed``'s, so the trajectory does not depend on which methods are compared.

    Returns ``{"loss": [steps + 1 full-data losses], "cosine": {label: (steps, L) array}}``
    with ``cosine[label][k, l] = cos∠(d_{k,l}, r_{k,l})`` on the flattened layer-``l``
    parameters (NaN where a direction is zero). Divergence of the reference is a
    :class:`~refcurv.errors.DivergenceError` naming the step, as in :func:`train`.
    """
    if not isinstance(reference, Method):
        raise ArgumentTypeError(f"reference must be a method instance such as REGISTRY['natural_gradient'](), "
                                f"got {describe(reference)}")
    if not isinstance(methods, dict) or not methods:
        raise ArgumentTypeError(f"methods must be a non-empty dict {{label: method instance}}, got {describe(methods)}")
    for label, m in methods.items():
        if not isinstance(m, Method):
            raise ArgumentTypeError(f"methods[{label!r}] must be a method instance, got {describe(m)}")
    schedule, params, x, y, loss, N = _check_run(net, params, x, y, loss, steps, lr, batch_size)
    rng = rng_of(seed)
    rngs = dict(zip(methods, rng.spawn(len(methods))))
    states = {label: m.init(net, params) for label, m in methods.items()}
    ref_state = reference.init(net, params)
    cos = {label: np.full((steps, len(net.param_shapes)), np.nan) for label in methods}  # host: the report (floats)
    losses = [float(net.loss(params, x, y, loss))]
    for k in range(steps):
        idx = slice(None) if batch_size is None else rng.choice(N, size=batch_size, replace=False)
        batch = Batch(x[idx], y[idx], loss)
        try:
            r, ref_state = reference.step(ref_state, net, params, batch, rng)
        except NonFiniteError as e:
            raise DivergenceError(f"{reference.name} diverged at step {k}: {e}") from e
        for label, m in methods.items():
            d, states[label] = m.step(states[label], net, params, batch, rngs[label])
            cos[label][k] = [_cosine(a.ravel().astype(np.float64), b.ravel().astype(np.float64))
                             for a, b in zip(d, r)]
        a = schedule(k)
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not np.isfinite(a):  # host: lr_k, a scalar
            raise HyperParameterError(f"lr({k}) must be a finite number, got {a!r}")
        with np.errstate(over="ignore", invalid="ignore"):
            params = [W + a * D for W, D in zip(params, r)]
        value = float(net.loss(params, x, y, loss)) if _all_finite(params) else float("nan")
        if not math.isfinite(value):
            raise DivergenceError(f"{reference.name} diverged at step {k}: loss {value} (lr = {a:g})")
        losses.append(value)
    return {"loss": losses, "cosine": cos}


def _check_grid(values, name):
    """A non-empty list/tuple of finite numbers > 0 (learning rates, dampings)."""
    if not isinstance(values, (list, tuple)) or not values:
        raise HyperParameterError(f"{name} must be a non-empty list of numbers > 0, got {describe(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v <= 0:  # host: a scalar
            raise HyperParameterError(f"{name} must hold finite numbers > 0, got {v!r}")
    return [float(v) for v in values]


#: the failures a sweep records as data: the run diverged, or a solve / root failed on the way
SWEEP_FAILURES = ("DivergenceError", "NotSPDError", "NewtonConvergenceError", "NonFiniteError")


def sweep(name, net, params, x, y, loss, steps, lrs, dampings=None, batch_size=None, seed=0, **hyper):
    """Train registry method ``name`` for every learning rate in ``lrs`` and every damping in
    ``dampings`` (``None``: the method's default damping, or none for a method without one),
    other hyper-parameters ``hyper``; same data, seed and initial parameters for every run.

    Returns a list of records ``{"lr", "damping", "loss" (final full-data loss; None when the
    run failed), "initial", "time" (seconds in the steps; None when it failed), "error" (the
    one-line error of a failed run, else None), "history" (:func:`train`'s; up to the failure
    for a diverged run, None for a failed solve)}``. A run that diverges or whose solve or
    root fails (:data:`SWEEP_FAILURES`) is data here, not an exception: that is what a sweep
    measures; bad arguments are refused before any run. :func:`worked_ranges` summarizes it.
    """
    from . import errors
    from .methods import REGISTRY

    cls = REGISTRY[name]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise HyperParameterError(f"steps must be a non-negative int, got {steps!r}")
    lrs = _check_grid(lrs, "lrs")
    has_damping = "damping" in cls.hyper_parameters()
    grid = [None] if dampings is None or not has_damping else _check_grid(dampings, "dampings")
    methods = [(lam, cls(**dict(hyper, **({} if lam is None else {"damping": lam})))) for lam in grid]
    failures = tuple(getattr(errors, e) for e in SWEEP_FAILURES)
    # every argument checked once, by a run of no steps (it evaluates the initial loss)
    _, h0 = train(methods[0][1], net, params, x, y, loss, 0, lrs[0], batch_size=batch_size, seed=seed)
    initial = h0["loss"][0]
    out = []
    for lam, method in methods:
        for a in lrs:
            rec = {"lr": a, "damping": None if not has_damping else float(method.damping), "initial": initial,
                   "error": None}
            try:
                _, h = train(method, net, params, x, y, loss, steps, a, batch_size=batch_size, seed=seed)
                rec.update(loss=h["loss"][-1], time=h["time"][-1], history=h)
            except failures as e:
                rec.update(loss=None, time=None, error=f"{type(e).__name__}: {e}", history=getattr(e, "history", None))
            out.append(rec)
    return out


def worked_ranges(records, fraction=0.5):
    """Summarize a :func:`sweep`: a run "worked" when it finished and its final loss is at most
    ``fraction`` × the initial loss. ``best`` is the run that worked with the lowest final
    loss; ``lr`` is the (min, max) of the learning rates that worked *at the best run's
    damping*, ``damping`` the (min, max) of the dampings that worked *at the best run's
    learning rate* (a cross through the best point: the set that worked need not be a
    rectangle), ``None`` where nothing worked or the method has no damping; ``worked`` /
    ``runs`` count the runs. The ranges cannot reach past the sweep's grid."""
    if not isinstance(records, (list, tuple)) or not records:
        raise HyperParameterError(f"records must be a non-empty list of sweep records, got {describe(records)}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {"lr", "damping", "loss", "initial"} <= set(r):
            raise ArgumentTypeError(f"records[{i}] must be a sweep record (a dict with lr, damping, loss, initial), "
                                    f"got {describe(r)}")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise HyperParameterError(f"fraction must be a number in (0, 1], got {fraction!r}")
    ok = [r for r in records  # host: the records hold host floats (the sweep's report)
          if r["loss"] is not None and np.isfinite(r["loss"]) and r["loss"] <= fraction * r["initial"]]  # host: floats
    if not ok:
        return {"lr": None, "damping": None, "best": None, "worked": 0, "runs": len(records)}
    best = min(ok, key=lambda r: r["loss"])
    lrs = [r["lr"] for r in ok if r["damping"] == best["damping"]]
    lams = [r["damping"] for r in ok if r["lr"] == best["lr"] and r["damping"] is not None]
    return {"lr": (min(lrs), max(lrs)), "damping": (min(lams), max(lams)) if lams else None,
            "best": best, "worked": len(ok), "runs": len(records)}
