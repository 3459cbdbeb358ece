"""Input policy of refcurv.methods (issue 14): every registered method's constructor (every
hyper-parameter, generated from ``REGISTRY`` and ``hyper_parameters()``) and every public
method of every registered method class (``init``, ``draw``, ``step``, ``curvature``,
``rhs``, ``warm_start``, …), plus ``Batch``, ``Draws``, ``State``, ``REGISTRY`` and
``describe``, given one malformed argument, either return a finite result or raise a
``RefcurvError``; and one explicit test per class of bad input of the issue."""
import copy
import dataclasses
import functools
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refcurv.methods as methods
from refcurv.errors import (
    ArgumentTypeError,
    DrawsError,
    HyperParameterError,
    NonFiniteError,
    RefcurvError,
    ShapeError,
    StateError,
    UnknownMethodError,
)
from refcurv.methods import REGISTRY, Batch, Draws, Method, State, describe
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.fuzz import check_call, fuzz_one, fuzzable, public_callables

N = 6


@functools.lru_cache(maxsize=None)
def _problem():
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)])
    rng = np.random.default_rng(0)
    params = net.init(0)
    batch = Batch(rng.standard_normal((N, 3)), rng.integers(0, 3, N), CrossEntropy())
    batch2 = Batch(rng.standard_normal((N, 3)), rng.integers(0, 3, N), CrossEntropy())
    return net, params, batch, batch2


@functools.lru_cache(maxsize=None)
def _fixture(name):
    """``(method, state0, draws0, state1, draws1)``: the init state and the draws of the first
    step, the state after it and the draws of the second step (the curvature of ``state1`` is
    built with ``draws0``, the step that made it)."""
    net, params, batch, batch2 = _problem()
    method = REGISTRY[name]()
    state0 = method.init(net, params)
    draws0 = method.draw(np.random.default_rng(1), state0, net, params, batch)
    _, state1 = method.step(state0, net, params, batch, draws=draws0)
    draws1 = method.draw(np.random.default_rng(2), state1, net, params, batch2)
    return method, state0, draws0, state1, draws1


def _fresh(name):
    net, params, batch, batch2 = _problem()
    method, s0, d0, s1, d1 = copy.deepcopy(_fixture(name))
    return method, net, copy.deepcopy(params), copy.deepcopy(batch), copy.deepcopy(batch2), s0, d0, s1, d1


def _construct_and_step(cls, **hyper):
    """A constructor call followed by ``init`` and one fast and one dense step: a malformed
    hyper-parameter the constructor accepts must not fail later with a raw error."""
    net, params, batch, _ = _problem()
    method = cls(**hyper)
    state = method.init(net, params)
    d, state = method.step(state, net, params, batch, rng=1)
    dd, _ = method.step(method.init(net, params), net, params, batch, rng=1, dense=True)
    return d + dd


def _method_examples(name):
    """``{key: factory}`` for the constructor and every public method of ``REGISTRY[name]``."""
    cls = REGISTRY[name]
    pre = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
    ex = {pre: lambda: (functools.partial(_construct_and_step, cls), (), dict(cls.hyper_parameters()))}

    def add(meth, make):
        ex[f"{pre}.{meth}"] = make

    def f(meth, build):
        def make():
            method, net, params, batch, batch2, s0, d0, s1, d1 = _fresh(name)
            args, kwargs = build(method, net, params, batch, batch2, s0, d0, s1, d1)
            return getattr(method, meth), args, kwargs
        return make

    add("init", f("init", lambda m, net, p, b, b2, s0, d0, s1, d1: ((net, p), {})))
    add("draw", f("draw", lambda m, net, p, b, b2, s0, d0, s1, d1: ((3, s1, net, p, b2), {})))
    add("step", f("step", lambda m, net, p, b, b2, s0, d0, s1, d1: ((s1, net, p, b2), {"rng": 3, "dense": False})))
    ex[f"{pre}.step(draws)"] = f("step", lambda m, net, p, b, b2, s0, d0, s1, d1:
                                 ((s1, net, p, b2), {"draws": d1, "dense": True}))
    add("curvature", f("curvature", lambda m, net, p, b, b2, s0, d0, s1, d1:
                       ((s1,), {"net": net, "params": p, "batch": b, "draws": d0})))
    add("rhs", f("rhs", lambda m, net, p, b, b2, s0, d0, s1, d1: ((s1, net.grad(p, b.x, b.y, b.loss)), {})))
    add("check_state", f("check_state", lambda m, net, p, b, b2, s0, d0, s1, d1: ((s1,), {})))
    add("check_draws", f("check_draws", lambda m, net, p, b, b2, s0, d0, s1, d1: ((d1, s1, net, p, b2), {})))
    # defaults such as SENG's threshold=inf are by design: the check looks at the names
    ex[f"{pre}.hyper_parameters"] = lambda: (lambda: sorted(cls.hyper_parameters()), (), {})
    if hasattr(cls, "warm_start"):
        many = "batches" in inspect.signature(cls.warm_start).parameters
        extra = {"seed": 4} if "seed" in inspect.signature(cls.warm_start).parameters else {}
        add("warm_start", f("warm_start", lambda m, net, p, b, b2, s0, d0, s1, d1:
                            ((s0, net, p, [b, b2] if many else b), extra)))
        if name == "kfac":
            ex[f"{pre}.warm_start(draws)"] = f("warm_start", lambda m, net, p, b, b2, s0, d0, s1, d1:
                                               ((s0, net, p, b), {"draws": d0}))
    if hasattr(cls, "schedule"):
        add("schedule", f("schedule", lambda *a: ((3,), {})))
    if hasattr(cls, "lm"):
        add("lm", f("lm", lambda *a: ((1.0, 0.5), {})))
    if hasattr(cls, "capacitance"):
        add("capacitance", f("capacitance", lambda m, net, p, b, *a: ((net, p, b.x, b.y, b.loss, 0.5), {})))
    if hasattr(cls, "n_blocks"):
        add("n_blocks", f("n_blocks", lambda m, net, *a: ((net,), {})))
    if hasattr(cls, "curvature_factors"):
        add("curvature_factors", f("curvature_factors", lambda m, net, p, b, b2, s0, d0, s1, d1:
                                   ((s1, net, p, b2, d1), {})))
    if hasattr(cls, "stats_due"):
        add("stats_due", f("stats_due", lambda m, net, p, b, b2, s0, d0, s1, d1: ((s1,), {})))
        add("inv_due", f("inv_due", lambda m, net, p, b, b2, s0, d0, s1, d1: ((s1,), {})))
    if hasattr(cls, "dense_statistics"):
        if "g_flat" in inspect.signature(cls.dense_statistics).parameters:
            add("dense_statistics", f("dense_statistics", lambda m, net, p, b, *a:
                                      ((net, p, np.ravel(np.concatenate([g.ravel() for g in net.grad(p, b.x, b.y, b.loss)]))), {})))
        else:
            add("dense_statistics", f("dense_statistics", lambda m, net, p, b, b2, s0, d0, s1, d1:
                                      ((net, p, b, d0.labels), {})))
    if hasattr(cls, "batch_statistics"):
        add("batch_statistics", f("batch_statistics", lambda m, net, p, b, b2, s0, d0, s1, d1:
                                  ((net, p, b, d0.labels), {})))
    return ex


def _public_methods(cls):
    out = []
    for a in dir(cls):
        if a.startswith("_"):
            continue
        v = inspect.getattr_static(cls, a)
        if isinstance(v, (staticmethod, classmethod)) or inspect.isfunction(v):
            out.append(a)
    return out


EXAMPLES = {
    "methods.Batch": lambda: (Batch, (_problem()[2].x.copy(), _problem()[2].y.copy(), CrossEntropy()), {}),
    "methods.Draws": lambda: (Draws, (), {"method": "kfac", "labels": np.zeros((1, N), dtype=int),
                                          "sketches": {}, "seeds": {}}),
    "methods.State": lambda: (State, (), {"k": 0, "diagnostics": {}}),
    "methods.Method": lambda: (Method, (), {}),
    # describe()'s rows hold defaults such as SENG's threshold=inf (by design): the check
    # looks at the names, references and summaries
    "methods.describe": lambda: (lambda: [row[:3] for row in describe()], (), {}),
    "methods.REGISTRY": lambda: (REGISTRY.__getitem__, ("kfac",), {}),
}
for _name in sorted(REGISTRY):
    EXAMPLES.update(_method_examples(_name))

MODULES = [methods]


def test_every_public_callable_has_an_example():
    for mod in MODULES:
        for name in public_callables(mod):
            assert f"{mod.__name__.rsplit('.', 1)[-1]}.{name}" in EXAMPLES, name


def test_every_registered_method_and_public_method_has_an_example():
    for name, cls in REGISTRY.items():
        pre = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        assert pre in EXAMPLES
        for meth in _public_methods(cls):
            assert f"{pre}.{meth}" in EXAMPLES, (name, meth)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_valid_example_is_accepted(key):
    fn, args, kwargs = EXAMPLES[key]()
    assert check_call(key, fn, args, kwargs) == "accepted"


@pytest.mark.parametrize("key", fuzzable(EXAMPLES))
@given(data=st.data())
def test_malformed_argument_is_refused_clearly(key, data):
    fuzz_one(EXAMPLES, key, data)


# ---------------------------------------------------------------- one test per class of bad input


def _hyper_cases():
    """``(method, hyper-parameter, bad value)`` generated from ``REGISTRY`` and
    ``hyper_parameters()``: non-numeric, ``None`` (unless ``None`` is a documented setting) and
    ``True`` for numbers; numbers, ``None`` and truthy strings for choices; truthy strings and
    ints for bools."""
    out = []
    for name, cls in sorted(REGISTRY.items()):
        optional = {f.name for f in dataclasses.fields(cls) if "None" in str(f.type) or "Optional" in str(f.type)}
        for hp, default in cls.hyper_parameters().items():
            if isinstance(default, bool):
                bad = ["no", 1, None]
            elif isinstance(default, str):
                bad = [1, None, True, "yes"]
            else:  # a number, or None for an optional number
                bad = ["a", True, [1.0]] + ([] if default is None or hp in optional else [None])
            out += [(name, hp, b) for b in bad]
    return out


@pytest.mark.parametrize("name,hp,bad", _hyper_cases(), ids=lambda v: repr(v)[:20])
def test_non_numeric_or_none_hyper_parameters_are_refused(name, hp, bad):
    with pytest.raises(HyperParameterError, match=hp):
        REGISTRY[name](**{hp: bad})


@pytest.mark.parametrize("name,kw", [("ginger", {"blocks": "yes"}), ("qng", {"blocks": "yes"}),
                                     ("seng", {"replace": "no"}), ("seng_distributed", {"delayed": 1}),
                                     ("seng_distributed", {"sync_cu": "False"}), ("tnt", {"conv_modes": True}),
                                     ("tnt", {"conv_modes": 4.0})])
def test_truthiness_where_a_bool_or_choice_is_meant_is_refused(name, kw):
    with pytest.raises(HyperParameterError, match=next(iter(kw))):
        REGISTRY[name](**kw)


def test_dense_must_be_a_bool():
    method, net, params, batch, _, s0, *_ = _fresh("kfac")
    with pytest.raises(ArgumentTypeError, match="dense"):
        method.step(s0, net, params, batch, rng=0, dense="no")


def _state_entry_points(name):
    """``{public method: call(state)}`` of every public method that takes a state."""
    method, net, params, batch, batch2, s0, d0, s1, d1 = _fresh(name)
    calls = {
        "step": lambda s: method.step(s, net, params, batch, rng=0),
        "draw": lambda s: method.draw(0, s, net, params, batch),
        "curvature": lambda s: method.curvature(s, net, params, batch, d0),
        "rhs": lambda s: method.rhs(s, net.grad(params, batch.x, batch.y, batch.loss)),
        "check_draws": lambda s: method.check_draws(d1, s, net, params, batch2),
    }
    if hasattr(method, "warm_start"):
        many = "batches" in inspect.signature(method.warm_start).parameters
        calls["warm_start"] = lambda s: method.warm_start(s, net, params, [batch] if many else batch)
    if hasattr(method, "curvature_factors"):
        calls["curvature_factors"] = lambda s: method.curvature_factors(s, net, params, batch2, d1)
    if hasattr(method, "stats_due"):
        calls["stats_due"] = method.stats_due
        calls["inv_due"] = method.inv_due
    return calls


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_state_from_another_method_an_empty_or_none_state_is_refused(name):
    net, params, *_ = _problem()
    other = next(n for n in sorted(REGISTRY) if REGISTRY[n].State is not REGISTRY[name].State)
    bad = [None, {}, State(), REGISTRY[other]().init(net, params)]
    for entry, call in _state_entry_points(name).items():
        for state in bad:
            if type(state) is method_state(name):
                continue
            with pytest.raises(StateError, match=name):
                call(state)


def method_state(name):
    return REGISTRY[name].State


class _NotALoss:
    def value(self, f, y):
        return 0.0


def test_a_batch_whose_loss_is_not_a_refcurv_loss_is_refused():
    net, params, batch, _ = _problem()
    with pytest.raises(ArgumentTypeError, match="loss"):
        Batch(batch.x, batch.y, _NotALoss())
    with pytest.raises(ArgumentTypeError, match="loss"):
        Batch(batch.x, batch.y, "cross_entropy")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_batch_like_object_is_refused_by_every_entry_point(name):
    class FakeBatch:  # x, y, loss, but not a Batch
        x, y, loss = _problem()[2].x, _problem()[2].y, CrossEntropy()

    method, net, params, batch, batch2, s0, d0, s1, d1 = _fresh(name)
    for call in (lambda: method.step(s0, net, params, FakeBatch(), rng=0),
                 lambda: method.draw(0, s0, net, params, FakeBatch()),
                 lambda: method.curvature(s1, net, params, FakeBatch(), d0)):
        with pytest.raises(ArgumentTypeError, match="batch"):
            call()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_net_none_is_refused(name):
    method, net, params, batch, batch2, s0, d0, s1, d1 = _fresh(name)
    for call in (lambda: method.init(None, params), lambda: method.step(s0, None, params, batch, rng=0),
                 lambda: method.draw(0, s0, None, params, batch),
                 lambda: method.check_draws(d1, s1, None, params, batch2)):
        with pytest.raises(ArgumentTypeError, match="net"):
            call()
    # curvature: net is optional (methods that read C from the state); without it a method that
    # needs the step's net/params/batch/draws says so
    try:
        method.curvature(s1)
    except RefcurvError:
        pass


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_draws_of_the_wrong_kind_or_shape_are_refused(name):
    method, net, params, batch, batch2, s0, d0, s1, d1 = _fresh(name)
    other = "sgd" if name != "sgd" else "kfac"
    with pytest.raises(DrawsError, match=name):
        method.curvature(s1, net, params, batch, Draws(method=other))
    with pytest.raises(DrawsError, match="draws"):
        method.curvature(s1, net, params, batch, {"labels": None})
    with pytest.raises(DrawsError, match=name):
        method.step(s1, net, params, batch2, draws=Draws(method=other))
    if d1.labels is not None:  # labels of the wrong shape
        bad = Draws(method=name, labels=np.concatenate([d1.labels, d1.labels], axis=-1),
                    sketches=d1.sketches, seeds=d1.seeds)
        with pytest.raises(DrawsError, match="labels"):
            method.step(s1, net, params, batch2, draws=bad)
    with pytest.raises(DrawsError, match="method"):
        Draws(method=None)
    with pytest.raises(DrawsError, match="sketches"):
        Draws(method=name, sketches=[1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_params_of_the_wrong_shape_for_the_net_are_refused(name, dtype):
    method, net, params, batch, batch2, s0, d0, s1, d1 = _fresh(name)
    bad = [W.T.astype(dtype) for W in params]
    short = [params[0].astype(dtype)]
    for p in (bad, short):
        for call in (lambda: method.init(net, p), lambda: method.step(s0, net, p, batch, rng=0),
                     lambda: method.draw(0, s0, net, p, batch), lambda: method.curvature(s1, net, p, batch, d0)):
            with pytest.raises(ShapeError, match="params"):
                call()


@pytest.mark.parametrize("kind", [np.complex128, np.int64, bool])
def test_complex_integer_and_bool_params_are_refused(kind):
    method, net, params, batch, *_ = _fresh("kfac")
    with pytest.raises(ArgumentTypeError, match=r"params\[0\]"):
        method.init(net, [params[0].astype(kind)] + params[1:])


def test_complex_batch_data_are_refused():
    _, _, batch, _ = _problem()
    with pytest.raises(ArgumentTypeError, match="batch.x"):
        Batch(batch.x.astype(complex), batch.y, CrossEntropy())
    with pytest.raises(ArgumentTypeError, match="batch.y"):
        Batch(batch.x, batch.y.astype(complex), MSE())


def test_registry_unknown_and_non_str_names_list_the_registered_methods():
    for bad in ("unknown", None, ["kfac"], np.zeros(0)):
        with pytest.raises(UnknownMethodError, match="registered: .*kfac"):
            REGISTRY[bad]


def test_lm_damping_overflow_is_a_non_finite_error():
    m = REGISTRY["smw_gn"]()
    with pytest.raises(NonFiniteError, match="λ_LM"):
        m.lm(1.79e308, -1.0)
    with pytest.raises(HyperParameterError, match="damping_lm"):
        m.lm(float("nan"), 0.5)


def test_rng_and_seed_that_are_not_seeds_are_refused():
    method, net, params, batch, batch2, s0, d0, s1, d1 = _fresh("kfac")
    for bad in (-1, 1.5, "a", np.zeros(3)):
        with pytest.raises(RefcurvError, match="rng"):
            method.step(s0, net, params, batch, rng=bad)
        with pytest.raises(RefcurvError, match="seed"):
            method.warm_start(s0, net, params, batch, seed=bad)
