"""Bad input is refused with a typed exception that names the argument."""
import numpy as np
import pytest

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import (
    ArgumentTypeError,
    EmptyBatchError,
    HyperParameterError,
    LabelError,
    NonFiniteError,
    ShapeError,
)
from refcurv.nn import BCE, MSE, Conv2d, CrossEntropy, Flatten, Linear, ReLU, Sequential


@pytest.fixture
def mlp():
    net = Sequential([Linear(3, 4), ReLU(), Linear(4, 2)])
    rng = np.random.default_rng(0)
    return net, net.init(0), rng.standard_normal((5, 3)), np.array([0, 1, 1, 0, 1])


def test_layer_width_mismatch():
    with pytest.raises(ShapeError, match=r"layers\[1\].*expects 5 input features.*gives 4"):
        Sequential([Linear(3, 4), Linear(5, 2)])


def test_conv_channel_mismatch_and_missing_flatten():
    with pytest.raises(ShapeError, match=r"layers\[1\].*2 input channels"):
        Sequential([Conv2d(1, 3, 2), Conv2d(2, 1, 2)])
    with pytest.raises(ShapeError, match=r"Flatten"):
        Sequential([Conv2d(1, 3, 2), Linear(12, 2)])


def test_flatten_width_mismatch_detected_with_input_shape():
    net = Sequential([Conv2d(1, 2, 2), Flatten(), Linear(7, 2)])
    with pytest.raises(ShapeError, match=r"layers\[2\].*expects inputs of feature shape \(7,\)"):
        net.forward(net.init(0), np.zeros((1, 1, 3, 3)))
    with pytest.raises(ShapeError, match=r"layers\[2\]"):
        Sequential([Conv2d(1, 2, 2), Flatten(), Linear(7, 2)], input_shape=(1, 3, 3))


def test_kernel_larger_than_input():
    net = Sequential([Conv2d(1, 1, 3), Flatten(), Linear(1, 1)])
    with pytest.raises(ShapeError, match="kernel larger"):
        net.forward(net.init(0), np.zeros((1, 1, 2, 2)))


def test_params_count_shape_and_type(mlp):
    net, params, x, _ = mlp
    with pytest.raises(ShapeError, match="params has 1 arrays"):
        net.forward(params[:1], x)
    with pytest.raises(ShapeError, match=r"params\[1\] has shape \(2, 4\)"):
        net.forward([params[0], params[1][:, :4]], x)
    with pytest.raises(ArgumentTypeError, match="params must be a list"):
        net.forward(np.zeros(10), x)


def test_input_feature_shape(mlp):
    net, params, _, _ = mlp
    with pytest.raises(ShapeError, match=r"x"):
        net.forward(params, np.zeros((2, 4)))
    with pytest.raises(ShapeError, match=r"x must have 2 dimensions"):
        net.forward(params, np.zeros(3))


def test_nan_inf_in_inputs_params_targets(mlp):
    net, params, x, y = mlp
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="^x contains"):
        net.forward(params, bad)
    badp = [params[0].copy(), params[1]]
    badp[0][0, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"params\[0\]"):
        net.forward(badp, x)
    with pytest.raises(NonFiniteError, match="^y contains"):
        net.loss(params, x, np.full((5, 2), np.nan), MSE())
    with pytest.raises(NonFiniteError, match=r"v\[0\]"):
        net.jvp(params, x, [np.full_like(params[0], np.nan), params[1]])


def test_empty_batch(mlp):
    net, params, _, _ = mlp
    with pytest.raises(EmptyBatchError, match="x is an empty batch"):
        net.forward(params, np.zeros((0, 3)))


def test_cross_entropy_labels(mlp):
    net, params, x, y = mlp
    with pytest.raises(LabelError, match=r"y labels must lie in \[0, 2\)"):
        net.loss(params, x, np.array([0, 1, 2, 0, 1]), CrossEntropy())
    with pytest.raises(LabelError, match=r"y labels must lie"):
        net.loss(params, x, np.array([0, -1, 1, 0, 1]), CrossEntropy())
    with pytest.raises(LabelError, match="integer dtype"):
        net.loss(params, x, y.astype(float), CrossEntropy())
    with pytest.raises(ShapeError, match=r"y for CrossEntropy"):
        net.loss(params, x, y[:3], CrossEntropy())


def test_bce_and_mse_targets(mlp):
    net, params, x, _ = mlp
    with pytest.raises(LabelError, match=r"y for BCE must lie in \[0, 1\]"):
        net.loss(params, x, np.full((5, 2), 1.5), BCE())
    with pytest.raises(ShapeError, match="y for MSE"):
        net.loss(params, x, np.zeros((5, 3)), MSE())


def test_layer_hyper_parameters():
    with pytest.raises(HyperParameterError, match="out_features must be >= 1"):
        Linear(3, 0)
    with pytest.raises(ArgumentTypeError, match="in_features must be an int"):
        Linear(2.5, 3)
    with pytest.raises(HyperParameterError, match="padding must be >= 0"):
        Conv2d(1, 1, 3, padding=-1)
    with pytest.raises(ArgumentTypeError, match=r"layers\[1\] is not a refcurv layer"):
        Sequential([Linear(2, 2), "relu"])


def test_curvature_arguments(mlp):
    net, params, x, y = mlp
    with pytest.raises(HyperParameterError, match="kind must be 'exact', 'mc' or 'empirical'"):
        cv.fisher(net, params, x, loss=CrossEntropy(), kind="ggn")
    with pytest.raises(ArgumentTypeError, match="needs the data labels y"):
        cv.fisher(net, params, x, loss=CrossEntropy(), kind="empirical")
    np.testing.assert_array_equal(cv.fisher(net, params, x, y, CrossEntropy(), kind="empirical"),
                                  cv.empirical_fisher(net, params, x, y, CrossEntropy()))
    with pytest.raises(HyperParameterError, match="n_samples must be a positive int"):
        cv.fisher(net, params, x, loss=CrossEntropy(), kind="mc", n_samples=0)
    with pytest.raises(HyperParameterError, match="conv must be one of"):
        cv.kfac_factors(net, params, x, y, CrossEntropy(), conv="sum")
    with pytest.raises(HyperParameterError, match="side must be"):
        cv.gfim(net, params, x, y, CrossEntropy(), side="both")
    with pytest.raises(ArgumentTypeError, match="loss must be a refcurv loss"):
        cv.ggn(net, params, x, y, "mse")
    with pytest.raises(HyperParameterError, match="order must be one of"):
        rc.permutation(net, "fortran")
    with pytest.raises(ShapeError, match="theta has 3 entries"):
        rc.unflatten(np.zeros(3), net)
