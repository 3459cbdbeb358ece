"""The contract every registered method passes (in the spirit of optax's shared optimizer
tests): typed state and draws, draws injected = draws made inside (bit for bit), foreign or
empty states and wrong draws refused, and ``curvature(state)`` reproducing the dense
direction ``d = −C⁻¹ rhs(state, g)``."""
import dataclasses

import numpy as np
import pytest

import refcurv as rc
from refcurv.errors import DrawsError, StateError
from refcurv.methods import REGISTRY, Batch, Draws, State
from refcurv.nn import Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.operators import Operator
from refcurv.testing.tolerance import forward_tol

NETS = {
    "mlp": (Sequential([Linear(3, 4), Tanh(), Linear(4, 3)]), (6, 3)),
    "cnn": (Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)]), (6, 1, 3, 3)),
    # Linear layers on sequences of T = 4 positions, a loss per position (README "Sequences")
    "seq": (Sequential([Linear(3, 4), Tanh(), Linear(4, 3)]), (6, 4, 3)),
}


def _labels(kind, rng, xshape):
    return rng.integers(0, 3, xshape[:2] if kind == "seq" else xshape[0])


def _one_location_only(method, kind):
    """Methods defined for fully connected layers (thesis Ch.2 K-BFGS) take neither Conv2d
    layers nor Linear layers on sequences (test_one_location_methods_refuse_... checks the refusal)."""
    return kind in ("cnn", "seq") and not method.supports_conv
STEPS = 3


def _setup(name, kind, seed=0):
    net, xshape = NETS[kind]
    method = REGISTRY[name]()
    if _one_location_only(method, kind):
        pytest.skip(f"{name} is defined for Linear layers on one location only")
    rng = np.random.default_rng(seed)
    params = net.init(seed)
    batches = [Batch(rng.standard_normal(xshape), _labels(kind, rng, xshape), CrossEntropy())
               for _ in range(STEPS)]
    return method, net, params, batches


CASES = [(n, k) for n in sorted(REGISTRY) for k in sorted(NETS)]


@pytest.mark.parametrize("name,kind", CASES)
def test_state_is_typed_and_documented(name, kind):
    method, net, params, batches = _setup(name, kind)
    state = method.init(net, params)
    assert type(state) is method.State and issubclass(method.State, State)
    assert dataclasses.is_dataclass(state)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.k = 5
    for f, doc in method.State.field_docs().items():
        assert doc, f"{name}: state field {f!r} has no doc"
    for dense in (False, True):
        _, s = method.step(state, net, params, batches[0], rng=1, dense=dense)
        assert type(s) is method.State and s.k == 1
        assert isinstance(s.diagnostics, dict)


#: non-default configurations whose draws differ from the defaults' (more labels, sketches,
#: subsets), so that injection is checked for every kind of draw
DRAW_VARIANTS = [("kfac", dict(n_samples=2)), ("smw_ng", dict(fisher="mc", n2=4)), ("smw_ng_bd", dict(fisher="mc")),
                 ("ngplus", dict(gram="sketch")), ("ngplus", dict(solver="sketch_ls")),
                 ("seng", dict(sketch_size=3)), ("seng", dict(threshold=0, sketch_size_A=3, sketch_size_G=2)),
                 ("seng", dict(history="hybrid", memory=4, hybrid_v=2)), ("tnt", dict(n_samples=2)),
                 ("natural_gradient", dict(fisher="mc", n_samples=2)), ("sgd", dict(momentum=0.9, nesterov=True))]


@pytest.mark.parametrize("name,kind", CASES + [(f"{n}|{i}", k) for i, (n, _) in enumerate(DRAW_VARIANTS) for k in NETS])
@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_injected_draws_are_bit_identical(name, kind, dense):
    if "|" in name:
        base, i = name.split("|")
        method, net, params, batches = _setup(base, kind)
        method, name = REGISTRY[base](**DRAW_VARIANTS[int(i)][1]), base
    else:
        method, net, params, batches = _setup(name, kind)
    runs = []
    for inject in (False, True):
        state, p, out = method.init(net, params), params, []
        for k, b in enumerate(batches):
            if inject:
                draws = method.draw(np.random.default_rng(100 + k), state, net, p, b)
                assert isinstance(draws, Draws) and draws.method == name
                d, state = method.step(state, net, p, b, draws=draws, dense=dense)
            else:
                d, state = method.step(state, net, p, b, rng=100 + k, dense=dense)
            out.append(d)
            p = [W + 0.1 * D for W, D in zip(p, d)]
        runs.append(out)
    for da, db in zip(*runs):
        for a, b in zip(da, db):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("name,kind", CASES)
def test_foreign_empty_and_missing_states_are_refused(name, kind):
    method, net, params, batches = _setup(name, kind)
    other = next(n for n in sorted(REGISTRY) if REGISTRY[n].State is not method.State)
    bad = [None, {}, State(), REGISTRY[other]().init(net, params), {"k": 0}]
    for state in bad:
        if type(state) is method.State:
            continue
        with pytest.raises(StateError, match=name):
            method.step(state, net, params, batches[0], rng=0)


@pytest.mark.parametrize("name,kind", CASES)
def test_wrong_draws_are_refused(name, kind):
    method, net, params, batches = _setup(name, kind)
    state = method.init(net, params)
    with pytest.raises(DrawsError, match=name):
        method.step(state, net, params, batches[0], draws=Draws(method="not-" + name))
    with pytest.raises(DrawsError, match=name):
        method.step(state, net, params, batches[0], draws={"labels": None})
    if method.draw_fields:
        with pytest.raises(DrawsError, match=method.draw_fields[0]):
            method.step(state, net, params, batches[0], draws=Draws(method=name))
    good = method.draw(np.random.default_rng(0), state, net, params, batches[0])
    if good.labels is not None:  # class indices out of range: refused before any arithmetic
        bad = np.array(good.labels, copy=True)
        bad.flat[0] = -1
        for dense in (False, True):
            with pytest.raises(DrawsError, match=rf"{name}: draws\.labels\[0\] is not a valid target"):
                method.step(state, net, params, batches[0], dense=dense,
                            draws=Draws(method=name, labels=bad, sketches=good.sketches, seeds=good.seeds))


@pytest.mark.parametrize("name,kind", CASES)
def test_curvature_reproduces_the_dense_direction(name, kind):
    """``direction = −C⁻¹ v`` with ``C = method.curvature(new_state, …)`` and
    ``v = method.rhs(new_state, g)``, for the dense form's direction, at every step of a short
    run; tolerance: the forward error of a solve, ``C·n·eps·κ(C)``."""
    method, net, params, batches = _setup(name, kind)
    state, p = method.init(net, params), params
    for k, b in enumerate(batches):
        draws = method.draw(np.random.default_rng(100 + k), state, net, p, b)
        d, new = method.step(state, net, p, b, draws=draws, dense=True)
        C = method.curvature(new, net, p, b, draws)
        if any(new.diagnostics.get("projected", [])):
            # NG+ (19): a projected step is Π(Θ − C⁻¹g) − Θ, not −C⁻¹g (the method's docstring)
            state, p = new, [W + 0.1 * D for W, D in zip(p, d)]
            continue
        assert isinstance(C, Operator) and C.shape == (net.n_params,) * 2
        g = net.grad(p, b.x, b.y, b.loss)
        v = rc.flatten(method.rhs(new, g))
        ev = np.asarray(C.eigvalsh())
        assert ev.min() > 0, f"{name}: curvature not positive definite (λ_min = {ev.min():.3e})"
        tol = forward_tol(net.n_params, ev.max() / ev.min())
        got, want = -C.solve(v), rc.flatten(d)
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
        assert err <= tol, f"{name} step {k}: ‖−C⁻¹v − d‖/‖d‖ = {err:.2e} > {tol:.2e}"
        state, p = new, [W + 0.1 * D for W, D in zip(p, d)]


@pytest.mark.parametrize("name,kind", CASES)
def test_precision_fast_in_input_dtype_dense_in_float64(name, kind):
    """design §3: the fast form runs in the input dtype (float32 here), the dense reference in
    float64 whatever the input dtype."""
    net, xshape = NETS[kind]
    method = REGISTRY[name]()
    if _one_location_only(method, kind):
        return
    rng = np.random.default_rng(0)
    params = net.init(0, dtype=np.float32)
    batch = Batch(rng.standard_normal(xshape).astype(np.float32), _labels(kind, rng, xshape), CrossEntropy())
    for dense, want in ((False, np.float32), (True, np.float64)):
        state = method.init(net, params)
        for _ in range(2):
            d, state = method.step(state, net, params, batch, rng=1, dense=dense)
        assert [di.dtype for di in d] == [want] * len(d), (dense, [di.dtype for di in d])


@pytest.mark.parametrize("name,kind", CASES)
def test_a_state_made_for_another_network_is_refused(name, kind):
    method, net, params, batches = _setup(name, kind)
    other = Sequential([Linear(3, 5), Tanh(), Linear(5, 3)]) if kind in ("mlp", "seq") else \
        Sequential([Conv2d(1, 3, 2), Tanh(), Flatten(), Linear(12, 3)])
    state = method.init(other, other.init(0))
    assert state.param_shapes == tuple(tuple(s) for s in other.param_shapes)
    with pytest.raises(StateError, match=f"{name}: the state was made for a network"):
        method.step(state, net, params, batches[0], rng=0)


@pytest.mark.parametrize("name,kind", CASES)
@pytest.mark.parametrize("dense", [False, True])
def test_a_stepped_state_stays_bound_to_its_network(name, kind, dense):
    """After a step (either form) the state still names its network, so a later step on
    another network is refused rather than silently mixing curvature of two networks."""
    method, net, params, batches = _setup(name, kind)
    state = method.init(net, params)
    _, state = method.step(state, net, params, batches[0], rng=0, dense=dense)
    assert state.param_shapes == tuple(tuple(s) for s in net.param_shapes)
    other = Sequential([Linear(3, 5), Tanh(), Linear(5, 3)]) if kind in ("mlp", "seq") else \
        Sequential([Conv2d(1, 3, 2), Tanh(), Flatten(), Linear(12, 3)])
    with pytest.raises(StateError, match=f"{name}: the state was made for a network"):
        method.step(state, other, other.init(0), batches[0], rng=0)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unknown_and_retired_hyper_parameters_are_named(name):
    from refcurv.errors import ArgumentTypeError
    from refcurv.methods.vocabulary import RETIRED

    with pytest.raises(ArgumentTypeError, match="no hyper-parameter 'dampnig'"):
        REGISTRY[name](dampnig=1.0)
    retired = next(k for k in RETIRED if k not in REGISTRY[name].hyper_parameters())
    with pytest.raises(ArgumentTypeError, match="renamed"):
        REGISTRY[name](**{retired: 1.0})


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if not REGISTRY[n].supports_conv])
@pytest.mark.parametrize("kind", ["cnn", "seq"])
def test_one_location_methods_refuse_conv_and_sequence_nets(name, kind):
    """Thesis Ch.2 K-BFGS assumes one location per sample (its H_a pair uses the mean
    activation of a sample): on a sequence it would run and give a wrong step, so it refuses."""
    from refcurv.errors import ArgumentTypeError

    net, xshape = NETS[kind]
    method = REGISTRY[name]()
    rng = np.random.default_rng(0)
    params = net.init(0)
    batch = Batch(rng.standard_normal(xshape), _labels(kind, rng, xshape), CrossEntropy())
    state = method.init(net, params) if kind == "seq" else None
    with pytest.raises(ArgumentTypeError, match=f"{name} is defined for Linear layers"):
        if state is None:
            state = method.init(net, params)
        method.step(state, net, params, batch, rng=0)
