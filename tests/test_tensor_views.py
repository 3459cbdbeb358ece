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


# ------------------------------------------------ shared kernels of TNT and Shampoo (_tensors)
from refcurv.methods._tensors import (batched_tensors, ema_update, momentum_update, phase_due,  # noqa: E402
                                      precondition_layers, tensor_index, tensor_positions)
from refcurv.nn import Flatten, Sequential, Tanh  # noqa: E402


def test_momentum_forms():
    """heavy_ball m ← μm + g (thesis Alg. 15 line 10 / Alg. 16 line 7), ema m ← μm + (1−μ)g;
    m = None is m_0 = 0."""
    g1, g2 = [np.array([1.0, 2.0])], [np.array([3.0, -1.0])]
    m = momentum_update(None, g1, 0.9)
    np.testing.assert_array_equal(m[0], g1[0])
    np.testing.assert_array_equal(momentum_update(m, g2, 0.9)[0], 0.9 * g1[0] + g2[0])
    e = momentum_update(None, g1, 0.9, "ema")
    np.testing.assert_array_equal(e[0], (1 - 0.9) * g1[0])
    np.testing.assert_array_equal(momentum_update(e, g2, 0.9, "ema")[0], 0.9 * e[0] + (1 - 0.9) * g2[0])


def test_ema_update_sets_then_averages():
    new = [[[np.eye(2)]]]
    assert ema_update(None, new, 0.7) is new
    out = ema_update([[[2 * np.eye(2)]]], new, 0.7)
    np.testing.assert_array_equal(out[0][0][0], 0.7 * 2 * np.eye(2) + (1 - 0.7) * np.eye(2))


def test_phase_due():
    """k0: 0-based k ≡ 0 (mod T); paper: t = k + 1 ≡ 0 (mod T)."""
    assert [k for k in range(9) if phase_due(k, 3)] == [0, 3, 6]
    assert [k for k in range(9) if phase_due(k, 3, "paper")] == [2, 5, 8]
    assert all(phase_due(k, 1, p) for k in range(4) for p in ("k0", "paper"))


@pytest.mark.parametrize("conv_modes", [3, 4])
def test_tensor_positions_and_batched_tensors(conv_modes):
    """Positions of each tensor's vec̄ in flat θ from the tensor shapes alone equal those of
    tensor_index (layer layout) offset by the layer; batched_tensors = to_tensors per sample."""
    net = Sequential([Conv2d(2, 3, (2, 3)), Tanh(), Conv2d(3, 2, 2, bias=False), Tanh(), Flatten(), Linear(2, 3)])
    dims, want, off = [], [], 0
    for layer in net.layers_trainable:
        idx = tensor_index(layer, conv_modes)
        dims.append([i.shape for i in idx])
        want += [off + i.ravel() for i in idx]
        off += int(np.prod(layer.param_shape))
    got = tensor_positions(dims)
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert np.array_equal(np.sort(np.concatenate(got)), np.arange(net.n_params))
    layer = net.layers_trainable[0]
    U = np.random.default_rng(0).standard_normal((2, 5) + layer.param_shape)
    for q, B in enumerate(batched_tensors(layer, U, conv_modes)):
        for s in range(2):
            for n in range(5):
                np.testing.assert_array_equal(B[s, n], to_tensors(layer, U[s, n], conv_modes)[q])


def test_precondition_layers_applies_per_tensor_and_decoupled_weight_decay():
    """d = −(P(m) + γW) in the layer layout, P applied tensor by tensor."""
    net = Sequential([Linear(3, 2)])
    rng = np.random.default_rng(1)
    m, W = [rng.standard_normal((2, 4))], [rng.standard_normal((2, 4))]
    d = precondition_layers(net, m, W, 4, lambda j, q, T: (q + 2.0) * T, 0.3)
    want = -(np.concatenate([2 * m[0][:, :3], 3 * m[0][:, 3:]], axis=1) + 0.3 * W[0])
    np.testing.assert_array_equal(d[0], want)
