"""Input-policy fuzz test (issue 14) for refcurv.nn (layers, losses, Sequential, autodiff),
refcurv.vec, refcurv.backend and refcurv.train: every public callable and every public method
of a public class, given a valid call with one argument replaced by a malformed value, either
returns a finite result or raises a RefcurvError; plus one explicit test per class of bad
input of the issue that falls in this area."""
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import backend, vec
from refcurv import train as train_mod
from refcurv.methods import REGISTRY
from refcurv.nn import (
    BCE,
    MSE,
    Conv2d,
    CrossEntropy,
    Flatten,
    Linear,
    ReLU,
    Sequential,
    SequenceMean,
    Sigmoid,
    Softplus,
    Tanh,
    layers,
    losses,
    model,
)
from refcurv.nn import autodiff as ad
from refcurv.testing.fuzz import (
    check_call,
    fuzz_one,
    fuzzable,
    public_callables,
)

MODULES = [layers, losses, model, ad, vec, backend, train_mod]


def _short(mod):
    return mod.__name__.rsplit(".", 1)[-1]


def _spd(n=3):
    A = np.random.default_rng(0).standard_normal((n, n))
    return A @ A.T + n * np.eye(n)


def _mlp():
    return Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])


def _cnn():
    return Sequential([Conv2d(1, 2, 2), ReLU(), Flatten(), Linear(8, 2)], input_shape=(1, 3, 3))


X = np.random.default_rng(1).standard_normal((5, 3))
XC = np.random.default_rng(2).standard_normal((4, 1, 3, 3))
F = np.random.default_rng(3).standard_normal((5, 2))
Y = {"mse": np.random.default_rng(4).standard_normal((5, 2)), "cross_entropy": np.arange(5) % 2,
     "bce": np.random.default_rng(5).random((5, 2))}
LOSS = {"mse": MSE, "cross_entropy": CrossEntropy, "bce": BCE}
ACTS = {"ReLU": ReLU, "Tanh": Tanh, "Sigmoid": Sigmoid, "Softplus": Softplus}


def _ad():
    net = _mlp()
    p = net.init(0)
    return net.layers, p, ad.forward_trace(net.layers, p, X)


def _V(params, K=2):
    rng = np.random.default_rng(6)
    return [rng.standard_normal((K,) + W.shape) for W in params]


EXAMPLES = {
    # ----------------------------------------------------------------- layers
    "layers.Linear": lambda: (Linear, (3, 4), {"bias": True}),
    "layers.Conv2d": lambda: (Conv2d, (1, 2, 2), {"stride": 1, "padding": 0, "bias": False}),
    "layers.Flatten": lambda: (Flatten, (), {}),
    "layers.sigmoid": lambda: (layers.sigmoid, (F,), {}),
    "layers.sigmoid_d1": lambda: (layers.sigmoid_d1, (F,), {}),
    "layers.Linear.split": lambda: (Linear(3, 4).split, (np.ones((4, 4)),), {}),
    "layers.Linear.join": lambda: (Linear(3, 4).join, (np.ones((4, 3)),), {"bias": np.ones(4)}),
    "layers.Linear.out_shape": lambda: (Linear(3, 4).out_shape, ((3,),), {}),
    "layers.Linear.n_locations": lambda: (Linear(3, 4).n_locations, ((3,),), {}),
    "layers.Linear.patches": lambda: (Linear(3, 4).patches, (X, (3,)), {"ones": True}),
    "layers.Linear.patches_adjoint": lambda: (Linear(3, 4).patches_adjoint, (np.ones((5, 4, 1)), (3,)), {}),
    "layers.Linear.to_output": lambda: (Linear(3, 4).to_output, (np.ones((5, 4, 1)), (3,)), {}),
    "layers.Linear.from_output": lambda: (Linear(3, 4).from_output, (np.ones((5, 4)), (3,)), {}),
    "layers.Conv2d.split": lambda: (Conv2d(1, 2, 2).split, (np.ones((2, 5)),), {}),
    "layers.Conv2d.join": lambda: (Conv2d(1, 2, 2).join, (np.ones((2, 1, 2, 2)),), {"bias": np.ones(2)}),
    "layers.Conv2d.out_shape": lambda: (Conv2d(1, 2, 2).out_shape, ((1, 3, 3),), {}),
    "layers.Conv2d.n_locations": lambda: (Conv2d(1, 2, 2).n_locations, ((1, 3, 3),), {}),
    "layers.Conv2d.patches": lambda: (Conv2d(1, 2, 2).patches, (XC, (1, 3, 3)), {"ones": False}),
    "layers.Conv2d.patches_adjoint": lambda: (Conv2d(1, 2, 2).patches_adjoint, (np.ones((4, 5, 4)), (1, 3, 3)), {}),
    "layers.Conv2d.to_output": lambda: (Conv2d(1, 2, 2).to_output, (np.ones((4, 2, 4)), (1, 3, 3)), {}),
    "layers.Conv2d.from_output": lambda: (Conv2d(1, 2, 2).from_output, (np.ones((4, 2, 2, 2)), (1, 3, 3)), {}),
    "layers.Flatten.out_shape": lambda: (Flatten().out_shape, ((1, 3, 3),), {}),
    "layers.Flatten.f": lambda: (Flatten().f, (XC, (1, 3, 3)), {}),
    "layers.Flatten.adjoint": lambda: (Flatten().adjoint, (np.ones((4, 9)), (1, 3, 3)), {}),
    "layers.SequenceMean": lambda: (SequenceMean, (), {}),
    "layers.SequenceMean.out_shape": lambda: (SequenceMean().out_shape, ((5, 3),), {}),
    "layers.SequenceMean.f": lambda: (SequenceMean().f, (np.ones((4, 5, 3)), (5, 3)), {}),
    "layers.SequenceMean.adjoint": lambda: (SequenceMean().adjoint, (np.ones((4, 3)), (5, 3)), {}),
    # ----------------------------------------------------------------- losses
    "losses.check_loss": lambda: (losses.check_loss, (MSE(),), {"name": "loss"}),
    "losses.CrossEntropy.probs": lambda: (CrossEntropy.probs, (F,), {}),
    # ----------------------------------------------------------------- model
    "model.Sequential": lambda: (Sequential, ([Linear(3, 4), Tanh(), Linear(4, 2)],), {"input_shape": (3,)}),
    "model.Sequential.feature_shapes": lambda: (_mlp().feature_shapes, ((3,),), {}),
    "model.Sequential.init": lambda: (_mlp().init, (), {"seed": 0, "dtype": np.float32}),
    "model.Sequential.check_params": lambda: (_mlp().check_params, (_mlp().init(0),), {}),
    "model.Sequential.check_input": lambda: (_mlp().check_input, (X,), {"xp": np}),
    "model.Sequential.forward": lambda: (_mlp().forward, (_mlp().init(0), X), {}),
    "model.Sequential.factors": lambda: (_mlp().factors, (_mlp().init(0), X, Y["mse"], MSE()), {}),
    "model.Sequential.per_sample_grads": lambda: (
        _cnn().per_sample_grads, (_cnn().init(0), XC, np.arange(4) % 2, CrossEntropy()), {}),
    "model.Sequential.loss": lambda: (_mlp().loss, (_mlp().init(0), X, Y["bce"], BCE()), {}),
    "model.Sequential.grad": lambda: (_mlp().grad, (_mlp().init(0), X, Y["mse"], MSE()), {}),
    "model.Sequential.jvp": lambda: (_mlp().jvp, (_mlp().init(0), X, _V(_mlp().init(0))), {}),
    "model.Sequential.vjp": lambda: (_mlp().vjp, (_mlp().init(0), X, F), {"per_sample": True}),
    "model.Sequential.jacobian": lambda: (_cnn().jacobian, (_cnn().init(0), XC), {}),
    "model.Sequential.jacobian_gram": lambda: (_mlp().jacobian_gram, (_mlp().init(0), X), {}),
    "model.Sequential.hvp_per_sample": lambda: (
        _mlp().hvp_per_sample, (_mlp().init(0), X, Y["cross_entropy"], CrossEntropy(), _V(_mlp().init(0))),
        {"output_hessian": True}),
    "model.Sequential.preactivation_hessians": lambda: (
        _mlp().preactivation_hessians, (_mlp().init(0), X, Y["mse"], MSE()), {}),
    # ----------------------------------------------------------------- autodiff
    "autodiff.Trace": lambda: (ad.Trace, ([X], [(3,)]), {"A": {}, "out": F}),
    "autodiff.trainable_index": lambda: (ad.trainable_index, (_mlp().layers,), {}),
    "autodiff.feature_shapes": lambda: (ad.feature_shapes, (_cnn().layers, (1, 3, 3)), {}),
    "autodiff.forward_trace": lambda: (ad.forward_trace, (_mlp().layers, _mlp().init(0), X), {}),
    "autodiff.push_tangents": lambda: (lambda L, p, t: (
        ad.push_tangents, (L, p, t), {"dparams": _V(p), "inject": (1, np.ones((2, 5, 4)))}))(*_ad()),
    "autodiff.pull_cotangents": lambda: (lambda L, p, t: (
        ad.pull_cotangents, (L, p, t, F),
        {"rop": (ad.push_tangents(L, p, t, _V(p))[0], _V(p), np.ones((2, 5, 2)))}))(*_ad()),
    "autodiff.weight_grads": lambda: (lambda L, p, t: (
        ad.weight_grads, (t.patches, ad.pull_cotangents(L, p, t, F)), {}))(*_ad()),
    "autodiff.flatten_layers": lambda: (ad.flatten_layers, ([np.ones((2, 3)), np.ones((4, 1))],), {}),
    "autodiff.output_basis": lambda: (ad.output_basis, (F,), {}),
    "autodiff.jvp": lambda: (lambda L, p, t: (ad.jvp, (L, p, t, _V(p)), {}))(*_ad()),
    "autodiff.vjp": lambda: (lambda L, p, t: (ad.vjp, (L, p, t, F), {"per_sample": False}))(*_ad()),
    "autodiff.jacobian": lambda: (ad.jacobian, _ad(), {}),
    "autodiff.jacobian_gram": lambda: (ad.jacobian_gram, _ad(), {}),
    "autodiff.hvp_per_sample": lambda: (lambda L, p, t: (
        ad.hvp_per_sample, (L, p, t, MSE().grad(t.out, Y["mse"]), _V(p)),
        {"output_hvp": lambda v: MSE().hvp(t.out, v)}))(*_ad()),
    "autodiff.preactivation_hessians": lambda: (lambda L, p, t: (
        ad.preactivation_hessians, (L, p, t, MSE().grad(t.out, Y["mse"]), lambda v: MSE().hvp(t.out, v)), {}))(*_ad()),
    # ----------------------------------------------------------------- vec
    "vec.layer_slices": lambda: (vec.layer_slices, ([(4, 4), (2, 5)],), {}),
    "vec.flatten": lambda: (vec.flatten, (_mlp().init(0),), {}),
    "vec.unflatten": lambda: (vec.unflatten, (np.ones(26), _mlp()), {}),
    "vec.permutation": lambda: (vec.permutation, ([(4, 4), (2, 5)], "torch"), {"bias": [True, False]}),
    "vec.to_order": lambda: (vec.to_order, (np.ones((26, 26)), _mlp(), "col"), {"matrix": True, "bias": None}),
    "vec.from_order": lambda: (vec.from_order, (np.ones(26), [(4, 4), (2, 5)], "torch"),
                               {"matrix": False, "bias": [True, True]}),
    # ----------------------------------------------------------------- backend
    "backend.get_xp": lambda: (backend.get_xp, ("numpy",), {}),
    "backend.is_cupy_array": lambda: (backend.is_cupy_array, (X,), {}),
    "backend.xp_of": lambda: (backend.xp_of, (X, [X]), {}),
    "backend.to_numpy": lambda: (backend.to_numpy, (X,), {}),
    "backend.asarray_like": lambda: (backend.asarray_like, (X, F), {"dtype": np.float32}),
    "backend.default_float": lambda: (backend.default_float, (X,), {}),
    "backend.rng_of": lambda: (backend.rng_of, (3,), {}),
    "backend.cholesky": lambda: (backend.cholesky, (_spd(),), {}),
    "backend.solve_triangular": lambda: (backend.solve_triangular, (np.linalg.cholesky(_spd()), np.ones(3)),
                                         {"lower": True, "trans": True}),
    "backend.cho_solve": lambda: (backend.cho_solve, (np.linalg.cholesky(_spd()), np.ones((3, 2))), {}),
    "backend.eigh": lambda: (backend.eigh, (_spd(),), {}),
    # ----------------------------------------------------------------- train
    "train.train": lambda: (train_mod.train, (REGISTRY["sgd"](), _mlp(), _mlp().init(0), X, Y["cross_entropy"],
                                              CrossEntropy(), 2, 0.1),
                            {"batch_size": 3, "seed": 0, "dense": False}),
    "train.train#reference": lambda: (train_mod.train, (REGISTRY["sgd"](), _mlp(), _mlp().init(0), X,
                                                        Y["cross_entropy"], CrossEntropy(), 2, 0.1),
                                      {"reference": REGISTRY["adam"]()}),
    "train.compare_directions": lambda: (train_mod.compare_directions,
                                         (REGISTRY["sgd"](), {"adam": REGISTRY["adam"]()}, _mlp(), _mlp().init(0), X,
                                          Y["cross_entropy"], CrossEntropy(), 2, 0.1), {"batch_size": 3, "seed": 0}),
    "train.sweep": lambda: (train_mod.sweep, ("adam", _mlp(), _mlp().init(0), X, Y["cross_entropy"], CrossEntropy(),
                                              2, [0.1]), {"dampings": [1e-3], "batch_size": 3, "seed": 0}),
    "train.worked_ranges": lambda: (train_mod.worked_ranges,
                                    ([{"lr": 0.1, "damping": 0.01, "loss": 0.5, "initial": 2.0}],), {"fraction": 0.5}),
}

for _name, _cls in ACTS.items():
    EXAMPLES[f"layers.{_name}"] = (lambda c: lambda: (c, (), {}))(_cls)
    EXAMPLES[f"layers.{_name}.out_shape"] = (lambda c: lambda: (c().out_shape, ((3,),), {}))(_cls)
    for _m in ("f", "d1", "d2"):
        EXAMPLES[f"layers.{_name}.{_m}"] = (lambda c, m: lambda: (getattr(c(), m), (F,), {}))(_cls, _m)

for _name, _cls in LOSS.items():
    _c = _cls.__name__
    _y = Y[_name]
    EXAMPLES[f"losses.{_c}"] = (lambda c: lambda: (c, (), {}))(_cls)
    EXAMPLES[f"losses.{_c}.value"] = (lambda c, y: lambda: (c().value, (F, y), {}))(_cls, _y)
    EXAMPLES[f"losses.{_c}.grad"] = (lambda c, y: lambda: (c().grad, (F, y), {}))(_cls, _y)
    EXAMPLES[f"losses.{_c}.check_targets"] = (lambda c, y: lambda: (c().check_targets, (y, F), {}))(_cls, _y)
    for _m in ("hessian", "hessian_sqrt", "fisher_output"):
        EXAMPLES[f"losses.{_c}.{_m}"] = (lambda c, m: lambda: (getattr(c(), m), (F,), {}))(_cls, _m)
    EXAMPLES[f"losses.{_c}.hvp"] = (lambda c: lambda: (c().hvp, (F, np.ones((3, 5, 2))), {}))(_cls)
    EXAMPLES[f"losses.{_c}.sample"] = (lambda c: lambda: (c().sample, (F,), {"n_samples": 2, "seed": 1}))(_cls)


def _public_methods(cls):
    return [n for n, v in vars(cls).items() if not n.startswith("_") and callable(v) and not inspect.isclass(v)] + [
        n for base in cls.__mro__[1:] if base.__module__.startswith("refcurv.")
        for n, v in vars(base).items() if not n.startswith("_") and callable(v) and n not in vars(cls)]


def test_every_public_callable_has_an_example():
    for mod in MODULES:
        for name, obj in public_callables(mod).items():
            assert f"{_short(mod)}.{name}" in EXAMPLES, f"{_short(mod)}.{name}"
            if inspect.isclass(obj) and obj is not ad.Trace:
                for meth in _public_methods(obj):
                    assert f"{_short(mod)}.{name}.{meth}" in EXAMPLES, f"{_short(mod)}.{name}.{meth}"


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_valid_example_is_accepted(key):
    fn, args, kwargs = EXAMPLES[key]()
    assert check_call(key, fn, args, kwargs) == "accepted"


FUZZED = fuzzable(EXAMPLES)


@pytest.mark.parametrize("key", FUZZED)
@given(data=st.data())
def test_malformed_argument_is_refused_clearly(key, data):
    fuzz_one(EXAMPLES, key, data)


# --------------------------------------------------------------- one test per class of bad input
@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, [1, 2], np.ones(2)])
def test_bad_seeds_are_refused_by_init_sample_and_train(seed):
    net = _mlp()
    with pytest.raises((rc.HyperParameterError, rc.ArgumentTypeError), match="seed"):
        net.init(seed)
    with pytest.raises((rc.HyperParameterError, rc.ArgumentTypeError), match="seed"):
        MSE().sample(F, seed=seed)
    with pytest.raises((rc.HyperParameterError, rc.ArgumentTypeError), match="seed"):
        train_mod.train(REGISTRY["sgd"](), net, net.init(0), X, Y["mse"], MSE(), 1, 0.1, seed=seed)


@pytest.mark.parametrize("bias", ["no", "yes", 0, 1, None, np.array([True])])
def test_truthiness_where_a_bool_is_meant_is_refused(bias):
    with pytest.raises(rc.ArgumentTypeError, match="bias"):
        Linear(3, 4, bias=bias)
    with pytest.raises(rc.ArgumentTypeError, match="bias"):
        Conv2d(1, 2, 2, bias=bias)
    net = _mlp()
    with pytest.raises(rc.ArgumentTypeError, match="per_sample"):
        net.vjp(net.init(0), X, F, per_sample="no")
    with pytest.raises(rc.ArgumentTypeError, match="dense"):
        train_mod.train(REGISTRY["sgd"](), net, net.init(0), X, Y["mse"], MSE(), 1, 0.1, dense="no")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, int, bool, np.complex128, "a"])
def test_integer_and_other_non_float_init_dtypes_are_refused(dtype):
    with pytest.raises((rc.HyperParameterError, rc.ArgumentTypeError), match="dtype"):
        _mlp().init(0, dtype=dtype)
    assert _mlp().init(0, dtype=np.float32)[0].dtype == np.float32


def test_complex_inputs_are_refused():
    net = _mlp()
    p = net.init(0)
    with pytest.raises(rc.ArgumentTypeError, match=r"x must be real"):
        net.forward(p, X + 1j)
    with pytest.raises(rc.ArgumentTypeError, match=r"params\[1\] must be real"):
        net.forward([p[0], p[1] + 0j], X)
    with pytest.raises(rc.ArgumentTypeError, match=r"v\[0\] must be real"):
        net.jvp(p, X, [t + 1j for t in p])
    with pytest.raises(rc.ArgumentTypeError, match="f must be real"):
        MSE().value(F + 1j, Y["mse"])
    with pytest.raises(rc.ArgumentTypeError, match="a is complex"):
        backend.asarray_like(np.ones(2) + 1j, X, dtype=np.float64)


class _no_warnings:
    """RuntimeWarnings (overflow) become errors: an overflow must be reported, not warned."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_overflow_raises_nonfinite_error_naming_the_quantity():
    net = Sequential([Linear(3, 4), ReLU(), Linear(4, 2)])
    p = net.init(0)
    x = np.full((5, 3), 1e200)
    with _no_warnings():
        with pytest.raises(rc.NonFiniteError, match="Sequential.loss: the mini-batch loss|MSE.value"):
            net.loss(p, x, np.zeros((5, 2)), MSE())
        with pytest.raises(rc.NonFiniteError, match="Sequential.forward: the network output"):
            net.forward([W * 1e200 for W in p], x)
        with pytest.raises(rc.NonFiniteError, match="grad"):
            net.grad(p, x, np.zeros((5, 2)), MSE())
        with pytest.raises(rc.NonFiniteError, match="MSE.value"):
            MSE().value(np.full((2, 2), 1e200), np.zeros((2, 2)))


def test_a_loss_that_is_not_a_refcurv_loss_is_refused():
    net = _mlp()
    p = net.init(0)
    for bad in (lambda f, y: 0.0, "mse", MSE, None):
        with pytest.raises(rc.ArgumentTypeError, match="loss"):
            net.loss(p, X, Y["mse"], bad)
        with pytest.raises(rc.ArgumentTypeError, match="loss"):
            net.grad(p, X, Y["mse"], bad)
        with pytest.raises(rc.ArgumentTypeError, match="loss"):
            train_mod.train(REGISTRY["sgd"](), net, p, X, Y["mse"], bad, 1, 0.1)


def test_empty_parameter_lists_and_empty_inputs_are_refused():
    net = _mlp()
    with pytest.raises(rc.ShapeError, match="params has 0 arrays"):
        net.forward([], X)
    with pytest.raises(rc.ArgumentTypeError, match="params must be a non-empty list"):
        vec.flatten([])
    with pytest.raises(rc.ArgumentTypeError, match="net_or_shapes"):
        vec.unflatten(np.ones(0), [])
    with pytest.raises(rc.EmptyBatchError, match="x"):
        net.forward(net.init(0), np.zeros((0, 3)))
    with pytest.raises(rc.ShapeError, match="A must be a non-empty square"):
        backend.cholesky(np.zeros((0, 0)))
    with pytest.raises(rc.ArgumentTypeError, match="layers"):
        ad.forward_trace([], [], X)


def test_train_refuses_bad_arguments_clearly():
    net = _mlp()
    p = net.init(0)
    sgd = REGISTRY["sgd"]()
    with pytest.raises(rc.ArgumentTypeError, match="net"):
        train_mod.train(sgd, None, p, X, Y["mse"], MSE(), 1, 0.1)
    with pytest.raises(rc.ArgumentTypeError, match="x must be an array"):
        train_mod.train(sgd, net, p, 1e200, Y["mse"], MSE(), 1, 0.1)
    with pytest.raises(rc.ArgumentTypeError, match=r"params\[0\]"):
        train_mod.train(sgd, net, ["a", p[1]], X, Y["mse"], MSE(), 1, 0.1)


def test_factorization_failure_is_a_refcurv_error_and_still_a_linalg_error():
    with pytest.raises(rc.NotSPDError, match="A is not numerically positive definite") as e:
        backend.cholesky(-np.eye(3))
    assert isinstance(e.value, np.linalg.LinAlgError)
    with pytest.raises(rc.NotSPDError, match="L is singular"):
        backend.solve_triangular(np.zeros((2, 2)), np.ones(2))


def test_valid_numbers_are_unchanged_by_the_checks():
    """The checked autodiff functions give exactly Sequential's numbers."""
    net = _mlp()
    p = net.init(0)
    L, _, tr = _ad()
    assert np.array_equal(ad.jacobian(L, p, tr), net.jacobian(p, X))
    assert np.array_equal(tr.out, net.forward(p, X))
