"""Parameter-tensor views used by TNT and Shampoo: shapes and exact round trip."""
import numpy as np
import pytest

from refcurv.errors import HyperParameterError
from refcurv.methods._tensors import from_tensors, to_tensors
from refcurv.nn import Conv2d, Linear

LAYERS = [Linear(3, 4), Linear(3, 4, bias=False), Conv2d(2, 3, (2, 3)), Conv2d(2, 3, 2, bias=False)]


@pytest.mark.parametrize("layer", LAYERS, ids=repr)
@pytest.mark.parametrize("conv_modes", [3, 4])
def test_round_trip_and_shapes(layer, conv_modes):
    W = np.random.default_rng(0).standard_normal(layer.param_shape)
    T = to_tensors(layer, W, conv_modes)
    assert len(T) == 1 + int(layer.bias)
    if isinstance(layer, Conv2d):
        kh, kw = layer.kernel_size
        want = (3, 2, kh, kw) if conv_modes == 4 else (3, 2, kh * kw)
    else:
        want = (4, 3)
    assert T[0].shape == want
    if layer.bias:
        np.testing.assert_array_equal(T[1], W[:, -1])
    # row-major vec̄ of the weight tensor = the weight part of the refcurv row
    np.testing.assert_array_equal(T[0].reshape(T[0].shape[0], -1), W[:, : layer.fan_in])
    np.testing.assert_array_equal(from_tensors(layer, T), W)


def test_bad_conv_modes():
    with pytest.raises(HyperParameterError, match="conv_modes"):
        to_tensors(Linear(2, 2), np.zeros((2, 3)), conv_modes=2)
