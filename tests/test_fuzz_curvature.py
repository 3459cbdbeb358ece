"""Input-policy fuzz test of refcurv.curvature, refcurv.operators, refcurv.catalogue and
refcurv.verify (run / select / run_one / environment): every public callable, given a valid
call with one argument replaced by a malformed value (:data:`refcurv.testing.fuzz.MALFORMED`),
returns a finite result or raises a :class:`refcurv.RefcurvError` (issue 14). Below the fuzz
test: one explicit test per class of bad input of the issue that falls in this area."""
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv import catalogue, curvature, operators, verify
from refcurv.errors import (
    ArgumentTypeError,
    EmptyBatchError,
    HyperParameterError,
    LabelError,
    NonFiniteError,
    NotSPDError,
    ShapeError,
)
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.operators import (
    BlockDiagonal,
    Dense,
    Inverse,
    Kronecker,
    KroneckerSum,
    LowRankPlusIdentity,
    Operator,
    Diagonal,
    ScaledIdentity,
)
from refcurv.testing.fuzz import check_call, fuzz_one, fuzzable, public_callables


# ----------------------------------------------------------------------------- data
def _spd(n=3, seed=0):
    B = np.random.default_rng(seed).standard_normal((n, n))
    return B @ B.T + n * np.eye(n)


def _net():
    return Sequential([Linear(3, 4), Tanh(), Linear(4, 3)])


def _problem(loss="mse"):
    """A valid (net, params, x, y, loss) with N = 3 samples, 3 inputs, 3 outputs (so that the
    3×3 malformed arrays reach the deeper checks)."""
    rng = np.random.default_rng(1)
    net = _net()
    params = net.init(0)
    x = rng.standard_normal((3, 3))
    if loss == "mse":
        return net, params, x, rng.standard_normal((3, 3)), MSE()
    return net, params, x, np.array([0, 2, 1]), CrossEntropy()


def _factors():
    net, params, x, y, loss = _problem()
    return net.factors(params, x, y, loss)


def _layer_vectors():
    net, params, *_ = _problem()
    return [np.ones_like(W) for W in params]


def _curv(name, **kw):
    def make():
        net, params, x, y, loss = _problem()
        return getattr(curvature, name), (net, params, x, y, loss), kw
    return make


def _ojac():
    net, params, x, _, _ = _problem()
    return curvature.OutputJacobian(net, params, x)


def _ggnop():
    net, params, x, _, loss = _problem()
    return curvature.GGNOperator(net, params, x, loss, damping=0.5)


# one valid instance per concrete operator class (their methods are fuzzed on these)
OPERATORS = {
    "ScaledIdentity": lambda: ScaledIdentity(5, 2.0),
    "Diagonal": lambda: Diagonal(np.arange(1.0, 6.0)),
    "Dense": lambda: Dense(_spd(5)),
    "Kronecker": lambda: Kronecker(_spd(2), _spd(3, 1)),
    "KroneckerSum": lambda: KroneckerSum(_spd(2), _spd(3, 1)),
    "LowRankPlusIdentity": lambda: LowRankPlusIdentity(1.0, np.arange(10.0).reshape(5, 2) / 10, np.array([0.5, -0.2])),
    "BlockDiagonal": lambda: BlockDiagonal([Dense(_spd(2)), ScaledIdentity(3)], index=[np.array([0, 2]), np.array([1, 3, 4])]),
    "Inverse": lambda: Inverse(Dense(_spd(5))),
    "GGNOperator": _ggnop,
}
OPERATOR_METHODS = ("matvec", "solve", "todense", "eigvalsh", "inverse", "aslinearoperator")


def _opmethod(cls, meth):
    def make():
        op = OPERATORS[cls]()
        args = (np.linspace(0.5, 1.5, op.n),) if meth in ("matvec", "solve") else ()
        return getattr(op, meth), args, {}
    return make


_CHECK = "foundation/-/JVP = finite differences/mlp-ce"

EXAMPLES = {
    # ---- curvature: dense ground truth
    "curvature.per_sample_grads": _curv("per_sample_grads"),
    "curvature.grad": _curv("grad"),
    "curvature.jacobian": lambda: (curvature.jacobian, _problem()[:3], {"y": _problem()[3], "loss": MSE()}),
    "curvature.hessian": _curv("hessian", blocks=False, per_sample=False),
    "curvature.hessian_residual": _curv("hessian_residual", blocks=True),
    "curvature.ggn": _curv("ggn", blocks=False),
    "curvature.fisher": _curv("fisher", kind="mc", n_samples=2, seed=0, blocks=False),
    "curvature.fisher#labels": _curv("fisher", kind="mc", labels=np.zeros((2, 3, 3))),
    "curvature.empirical_fisher": _curv("empirical_fisher", blocks=True),
    "curvature.preactivation_hessians": _curv("preactivation_hessians"),
    "curvature.kfac_factors": _curv("kfac_factors", kind="mc", conv="reduce", n_samples=2, seed=0),
    "curvature.kfac_factors#labels": _curv("kfac_factors", kind="mc", labels=np.zeros((2, 3, 3))),
    "curvature.gfim_side": lambda: (curvature.gfim_side, ((3, 4),), {}),
    "curvature.gfim": _curv("gfim", side="auto"),
    # ---- curvature: factor kernels and matrix-free products
    "curvature.grad_from_factors": lambda: (curvature.grad_from_factors, _factors(), {}),
    "curvature.ef_gram": lambda: (curvature.ef_gram, _factors(), {"blocks": False}),
    "curvature.ef_products": lambda: (curvature.ef_products, (*_factors(), _layer_vectors()), {}),
    "curvature.ef_transpose": lambda: (curvature.ef_transpose, (*_factors(), np.ones(3)), {}),
    "curvature.OutputJacobian": lambda: (curvature.OutputJacobian, _problem()[:3], {}),
    "curvature.OutputJacobian.jvp": lambda: (_ojac().jvp, (_layer_vectors(),), {}),
    "curvature.OutputJacobian.vjp": lambda: (_ojac().vjp, (np.ones((3, 3)),), {}),
    "curvature.OutputJacobian.output_loss": lambda: (_ojac().output_loss, (CrossEntropy(),), {}),
    "curvature.GGNOperator": lambda: (curvature.GGNOperator, (*_problem()[:3], MSE()), {"damping": 0.5}),
    "curvature.GGNOperator.ggn": lambda: (_ggnop().ggn, (np.ones(_net().n_params),), {}),
    # ---- operators
    "operators.Operator": lambda: (Operator, (), {}),
    "operators.ScaledIdentity": lambda: (ScaledIdentity, (3,), {"c": 2.0, "dtype": np.float64}),
    "operators.Diagonal": lambda: (Diagonal, (np.arange(1.0, 4.0),), {"name": "d"}),
    "operators.Dense": lambda: (Dense, (_spd(),), {"name": "M"}),
    "operators.Kronecker": lambda: (Kronecker, (_spd(2), _spd(3, 1)), {}),
    "operators.KroneckerSum": lambda: (KroneckerSum, (_spd(2), _spd(3, 1)), {}),
    "operators.LowRankPlusIdentity": lambda: (LowRankPlusIdentity, (1.0, np.ones((3, 2)), np.array([0.5, 1.0])), {}),
    "operators.BlockDiagonal": lambda: (BlockDiagonal, ([Dense(_spd(2)), ScaledIdentity(3)],),
                                        {"index": [np.array([0, 2]), np.array([1, 3, 4])]}),
    "operators.Inverse": lambda: (Inverse, (Dense(_spd()),), {}),
    # ---- catalogue
    "catalogue.render": lambda: (catalogue.render, (), {}),
    "catalogue.digits_problem": lambda: (pytest.importorskip("sklearn") and catalogue.digits_problem, (),
                                         {"hidden": (3,), "n": 20, "seed": 0}),
    "catalogue.measure_guidance": lambda: (pytest.importorskip("sklearn") and catalogue.measure_guidance, (),
                                           {"names": ["qng"], "fraction": 0.5}),
    # ---- verify
    "verify.Result": lambda: (verify.Result, ("id", "area", "-", "check", "-", 0.0, 1.0, True, "", 0.1), {}),
    "verify.select": lambda: (verify.select, (), {"method": "sgd", "check": "fast", "quick": True, "area": "method"}),
    "verify.run": lambda: (verify.run, ([c for c in verify.select() if c.id == _CHECK],),
                           {"seed": 0, "jobs": 1, "progress": lambda r: None, "backend": "numpy", "dask": None}),
    "verify.run_one": lambda: (verify.run_one, (_CHECK,), {"seed": 0, "backend": "numpy", "one_thread": False}),
    "verify.environment": lambda: (verify.environment, (), {"seed": 0, "backend": "numpy", "jobs": 1}),
}
for _cls in OPERATORS:
    for _m in OPERATOR_METHODS:
        EXAMPLES[f"{'curvature' if _cls == 'GGNOperator' else 'operators'}.{_cls}.{_m}"] = _opmethod(_cls, _m)

MODULES = [curvature, operators, catalogue, verify]


def _public_methods(cls):
    return [n for n, v in inspect.getmembers(cls) if not n.startswith("_") and inspect.isfunction(v)]


def test_every_public_callable_has_an_example():
    for mod in MODULES:
        short = mod.__name__.rsplit(".", 1)[-1]
        for name, obj in public_callables(mod).items():
            assert f"{short}.{name}" in EXAMPLES, name
            if inspect.isclass(obj) and obj is not Operator and obj is not verify.Result:
                for meth in _public_methods(obj):
                    assert f"{short}.{name}.{meth}" in EXAMPLES, f"{name}.{meth}"
    assert "verify.run_one" in EXAMPLES


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_valid_example_is_accepted(key):
    fn, args, kwargs = EXAMPLES[key]()
    assert check_call(key, fn, args, kwargs) == "accepted"


FUZZED = fuzzable(EXAMPLES)


@pytest.mark.parametrize("key", FUZZED)
@given(data=st.data())
def test_malformed_argument_is_refused_clearly(key, data):
    fuzz_one(EXAMPLES, key, data)


# ----------------------------------------------------------------------------- explicit classes
def _raises(exc, name, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` with a one-line message naming ``name``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert name.lower() in msg.lower() and "\n" not in msg, msg
    return msg


def test_net_none_is_refused():
    _, params, x, y, loss = _problem()
    for f in (curvature.ggn, curvature.hessian, curvature.per_sample_grads, curvature.kfac_factors):
        _raises(ArgumentTypeError, "net", f, None, params, x, y, loss)
    _raises(ArgumentTypeError, "net", curvature.OutputJacobian, None, params, x)
    _raises(ArgumentTypeError, "net", curvature.GGNOperator, None, params, x, loss)


def test_non_refcurv_loss_is_refused():
    net, params, x, y, _ = _problem()
    for bad in (None, "mse", object(), MSE):  # MSE: the class, not an instance
        _raises(ArgumentTypeError, "loss", curvature.ggn, net, params, x, y, bad)
        _raises(ArgumentTypeError, "loss", curvature.fisher, net, params, x, loss=bad)
        _raises(ArgumentTypeError, "loss", curvature.kfac_factors, net, params, x, y, bad)
        _raises(ArgumentTypeError, "loss", curvature.GGNOperator, net, params, x, bad)


def test_bad_seeds_are_refused():
    net, params, x, y, loss = _problem()
    _raises(HyperParameterError, "seed", curvature.fisher, net, params, x, loss=loss, kind="mc", seed=-1)
    for bad in (1.5, True, "0", np.zeros(2)):
        _raises(ArgumentTypeError, "seed", curvature.fisher, net, params, x, loss=loss, kind="mc", seed=bad)
        _raises(ArgumentTypeError, "seed", curvature.kfac_factors, net, params, x, y, loss, kind="mc", seed=bad)
        # refused even where the kind does not draw
        _raises(ArgumentTypeError, "seed", curvature.fisher, net, params, x, loss=loss, seed=bad)
    _raises(HyperParameterError, "n_samples", curvature.fisher, net, params, x, loss=loss, kind="mc", n_samples=0)
    _raises(HyperParameterError, "seed", verify.run_one, _CHECK, seed=-1)
    _raises(ArgumentTypeError, "seed", verify.run, verify.select(check="JVP", quick=True), seed=2.0)


def test_bad_kinds_are_refused():
    net, params, x, y, loss = _problem()
    msg = _raises(HyperParameterError, "kind", curvature.kfac_factors, net, params, x, y, loss, kind="ggn")
    assert "'exact'" in msg
    _raises(HyperParameterError, "kind", curvature.fisher, net, params, x, loss=loss, kind="ggn")
    _raises(ArgumentTypeError, "y", curvature.fisher, net, params, x, loss=loss, kind="empirical")
    for bad in (None, 1, np.array(["exact"]), ["mc"]):
        _raises(HyperParameterError, "kind", curvature.fisher, net, params, x, loss=loss, kind=bad)
        _raises(HyperParameterError, "kind", curvature.kfac_factors, net, params, x, y, loss, kind=bad)
    _raises(HyperParameterError, "conv", curvature.kfac_factors, net, params, x, y, loss, conv=np.ones(2))
    _raises(HyperParameterError, "side", curvature.gfim, net, params, x, y, loss, side=None)
    _raises(HyperParameterError, "area", verify.select, area="linalg2")


def test_truthy_strings_are_refused_where_a_bool_is_meant():
    net, params, x, y, loss = _problem()
    for bad in ("yes", "no", 1, np.ones(3, dtype=bool), None):
        for f in (curvature.hessian, curvature.ggn, curvature.hessian_residual, curvature.empirical_fisher):
            _raises(ArgumentTypeError, "blocks", f, net, params, x, y, loss, blocks=bad)
        _raises(ArgumentTypeError, "blocks", curvature.fisher, net, params, x, loss=loss, blocks=bad)
        _raises(ArgumentTypeError, "per_sample", curvature.hessian, net, params, x, y, loss, per_sample=bad)
        _raises(ArgumentTypeError, "blocks", curvature.ef_gram, *_factors(), blocks=bad)
        _raises(ArgumentTypeError, "quick", verify.select, quick=bad)
        _raises(ArgumentTypeError, "one_thread", verify.run_one, _CHECK, 0, one_thread=bad)
    # np.bool_ is a bool
    assert len(curvature.ggn(net, params, x, y, loss, blocks=np.bool_(True))) == 2


def test_complex_inputs_are_refused():
    net, params, x, y, loss = _problem()
    _raises(ArgumentTypeError, "x", curvature.ggn, net, params, x + 1j, y, loss)
    _raises(ArgumentTypeError, "params[1]", curvature.ggn, net, [params[0], params[1] + 0j], x, y, loss)
    _raises(LabelError, "y", curvature.ggn, net, params, x, y + 0j, loss)
    _raises(ArgumentTypeError, "M", Dense, _spd() + 0j)
    _raises(ArgumentTypeError, "factor 1", Kronecker, _spd(2), _spd(2) + 0j)
    _raises(ArgumentTypeError, "v", Dense(_spd()).solve, np.ones(3) + 1j)
    _raises(ArgumentTypeError, "U", LowRankPlusIdentity, 1.0, np.ones((3, 1)) + 0j, np.ones(1))
    A, G = _factors()
    _raises(ArgumentTypeError, "A[0]", curvature.ef_gram, [A[0] + 0j, A[1]], G)
    _raises(ArgumentTypeError, "w", _ojac().vjp, np.ones((3, 3)) + 0j)


def test_integer_inputs_are_converted_to_float64():
    net, params, _, y, loss = _problem()
    xi = np.arange(9).reshape(3, 3) - 4
    np.testing.assert_array_equal(curvature.ggn(net, params, xi, y, loss), curvature.ggn(net, params, xi.astype(float), y, loss))
    M = np.array([[2, 1], [1, 2]])
    assert Dense(M).dtype == np.float64
    np.testing.assert_array_equal(Dense(M).solve(np.array([1, 0])), Dense(M.astype(float)).solve(np.array([1.0, 0.0])))
    for bad in (np.ones((2, 2), dtype=bool), "ab", [[1, 2], [3]]):  # booleans, strings, ragged lists
        _raises(ArgumentTypeError, "M", Dense, bad)
    _raises(ArgumentTypeError, "dtype", ScaledIdentity, 3, dtype=np.int64)
    _raises(ArgumentTypeError, "dtype", ScaledIdentity, 3, dtype=None)


def test_overflow_raises_nonfinite_naming_the_quantity():
    net = Sequential([Linear(3, 3)])  # no saturating activation: x = 1e200 overflows
    params = net.init(0)
    x, y = np.full((2, 3), 1e200), np.zeros((2, 3))
    for name in ("per_sample_grads", "grad", "ggn", "hessian", "empirical_fisher", "kfac_factors", "gfim"):
        with np.errstate(all="ignore"):
            msg = _raises(NonFiniteError, name, getattr(curvature, name), net, params, x, y, MSE())
        assert "overflow" in msg
    with np.errstate(all="ignore"):
        _raises(NonFiniteError, "fisher", curvature.fisher, net, params, x, loss=MSE())
        _raises(NonFiniteError, "todense", Kronecker(np.full((2, 2), 1e200), np.full((2, 2), 1e200)).todense)
        _raises(NonFiniteError, "matvec", Dense(np.full((2, 2), 1e200)).matvec, np.full(2, 1e200))
        _raises(NonFiniteError, "ef_gram", curvature.ef_gram, [np.full((2, 2, 1), 1e200)], [np.full((2, 2, 1), 1e200)])


def test_empty_inputs_are_refused():
    net, params, x, y, loss = _problem()
    _raises(EmptyBatchError, "x", curvature.ggn, net, params, np.zeros((0, 3)), np.zeros((0, 3)), loss)
    _raises(ShapeError, "params", curvature.ggn, net, [], x, y, loss)
    _raises(ShapeError, "M", Dense, np.zeros((0, 0)))
    _raises(ShapeError, "factor 0", Kronecker, np.zeros((0, 0)))
    _raises(ArgumentTypeError, "Kronecker", Kronecker)
    _raises(ShapeError, "factor 1", KroneckerSum, _spd(2), np.zeros((0, 0)))
    _raises(ShapeError, "U", LowRankPlusIdentity, 1.0, np.zeros((0, 2)), np.ones(2))
    _raises(ArgumentTypeError, "blocks", BlockDiagonal, [])
    _raises(ShapeError, "v", Dense(_spd()).matvec, np.zeros((3, 0)))
    _raises(ArgumentTypeError, "A", curvature.ef_gram, [], [])
    _raises(ShapeError, "A[0]", curvature.ef_gram, [np.zeros((0, 2, 1))], [np.zeros((0, 2, 1))])
    _raises(HyperParameterError, "checks", verify.run, [])
    assert verify.select(method="no such method") == []  # a filter that matches nothing is not an error


def test_operator_factors_are_checked():
    _raises(ShapeError, "factor 0", Kronecker, np.ones((2, 3)))                       # non-square
    _raises(NotSPDError, "factor 1", Kronecker, _spd(2), np.array([[1.0, 2.0], [0.0, 1.0]]))  # non-symmetric
    _raises(NonFiniteError, "factor 0", KroneckerSum, np.full((2, 2), np.nan), _spd(2))  # non-finite
    _raises(NonFiniteError, "M", Dense, np.full((2, 2), np.inf))
    _raises(ShapeError, "M", Dense, np.ones((2, 2, 2)))


def test_operator_vectors_of_the_wrong_length_are_refused():
    for name, make in OPERATORS.items():
        op = make()
        for meth in (op.matvec, op.solve):
            _raises(ShapeError, "v", meth, np.ones(op.n + 1))
            _raises(ShapeError, "v", meth, np.ones((op.n, 2, 1)))
            _raises(NonFiniteError, "v", meth, np.full(op.n, np.nan))
    _raises(ShapeError, "v", _ggnop().ggn, np.ones(2))
    _raises(ShapeError, "w", _ojac().vjp, np.ones((3, 2)))
    _raises(ShapeError, "v[0]", _ojac().jvp, [np.ones((4, 3)), np.ones((3, 5))])
    A, G = _factors()
    _raises(ShapeError, "z", curvature.ef_transpose, A, G, np.ones(4))
    _raises(ArgumentTypeError, "v", curvature.ef_products, A, G, [np.ones((4, 4))])


def test_nonpositive_scale_is_refused():
    for bad in (0, -1.0, np.nan, np.inf):
        _raises(HyperParameterError, "c", ScaledIdentity, 3, bad)
        _raises(HyperParameterError, "c", LowRankPlusIdentity, bad, np.ones((3, 1)), np.ones(1))
    for bad in (None, "1", True, np.ones(2)):
        _raises(HyperParameterError, "c", ScaledIdentity, 3, bad)
    _raises(HyperParameterError, "damping", curvature.GGNOperator, *_problem()[:3], MSE(), damping=-1.0)
    _raises(HyperParameterError, "damping", curvature.GGNOperator, *_problem()[:3], MSE(), damping=None)


def test_K_of_the_wrong_length_is_refused():
    _raises(ShapeError, "K", LowRankPlusIdentity, 1.0, np.ones((4, 2)), np.ones(3))
    _raises(ShapeError, "K", LowRankPlusIdentity, 1.0, np.ones((4, 2)), np.ones((2, 1)))


def test_index_arrays_that_do_not_partition_are_refused():
    blocks = [Dense(_spd(2)), ScaledIdentity(3)]
    _raises(ShapeError, "index", BlockDiagonal, blocks, index=[np.array([0, 1]), np.array([1, 2, 3])])  # duplicate
    _raises(ShapeError, "index", BlockDiagonal, blocks, index=[np.array([0, 1]), np.array([2, 3, 7])])  # out of range
    _raises(ShapeError, "index[1]", BlockDiagonal, blocks, index=[np.array([0, 1]), np.array([2, 3])])  # wrong length
    _raises(ShapeError, "index", BlockDiagonal, blocks, index=[np.array([0, 1, 2, 3, 4])])  # one array for two blocks
    _raises(ArgumentTypeError, "index[0]", BlockDiagonal, blocks, index=[np.array([0.0, 1.0]), np.array([2, 3, 4])])
    _raises(ArgumentTypeError, "index[0]", BlockDiagonal, blocks, index=[np.array([True, True]), np.array([2, 3, 4])])
    _raises(ArgumentTypeError, "index", BlockDiagonal, blocks, index="yes")
    _raises(ArgumentTypeError, "blocks", BlockDiagonal, [Dense(_spd(2)), _spd(2)])


def test_inverse_of_a_non_operator_is_refused():
    for bad in (_spd(), None, "B", [Dense(_spd())]):
        _raises(ArgumentTypeError, "B", Inverse, bad)


def test_verify_arguments_are_refused_clearly():
    _raises(HyperParameterError, "check_id", verify.run_one, "no/such/check/-", 0)
    _raises(ArgumentTypeError, "check_id", verify.run_one, 3, 0)
    _raises(HyperParameterError, "backend", verify.run_one, _CHECK, 0, backend="torch")
    checks = verify.select(check="JVP", quick=True)
    _raises(HyperParameterError, "jobs", verify.run, checks, jobs=0)
    _raises(ArgumentTypeError, "progress", verify.run, checks, progress=True)
    _raises(HyperParameterError, "dask", verify.run, checks, dask="a")
    _raises(ArgumentTypeError, "checks", verify.run, [c.id for c in checks])
    _raises(ArgumentTypeError, "method", verify.select, method=1)


def test_gfim_side_refuses_a_bad_shape():
    for bad in ((3,), (0, 2), (2.0, 3), "ab", None, (True, 2)):
        _raises(ShapeError, "shape", curvature.gfim_side, bad)

