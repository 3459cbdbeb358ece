"""Every registered method: metadata, defaults, and one fast and one dense step on a tiny
MLP and CNN with finite directions in the parameter layout."""
import numpy as np
import pytest

from refcurv.errors import ArgumentTypeError
from refcurv.methods import REGISTRY, Batch, describe
from refcurv.nn import Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh

NETS = {
    "mlp": (Sequential([Linear(3, 4), Tanh(), Linear(4, 3)]), (6, 3)),
    "cnn": (Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)]), (6, 1, 3, 3)),
}


def test_registry_metadata():
    assert "sgd" in REGISTRY and "kfac" in REGISTRY
    for name, ref, summary, hps in describe():
        assert name and ref and summary and isinstance(hps, dict)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("kind", sorted(NETS))
def test_every_method_steps_in_both_forms(name, kind):
    net, xshape = NETS[kind]
    rng = np.random.default_rng(0)
    params = net.init(0)
    batch = Batch(rng.standard_normal(xshape), rng.integers(0, 3, xshape[0]), CrossEntropy())
    method = REGISTRY[name]()
    if kind == "cnn" and not method.supports_conv:
        with pytest.raises(ArgumentTypeError, match="Linear layers only"):
            method.step(method.init(net, params), net, params, batch, rng=1)
        return
    for dense in (False, True):
        state = method.init(net, params)
        d, state = method.step(state, net, params, batch, rng=1, dense=dense)
        assert [di.shape for di in d] == net.param_shapes
        assert all(np.isfinite(di).all() for di in d)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("kind", sorted(NETS))
def test_methods_do_not_alias_the_callers_batch(name, kind):
    """A method that keeps a batch for a later step (K-BFGS's deferred second pass) must keep
    its own copy: a training loop that refills one buffer in place must get bit-identical
    parameters to one that passes fresh arrays."""
    net, xshape = NETS[kind]
    method = REGISTRY[name]()
    if kind == "cnn" and not method.supports_conv:
        return
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((24,) + xshape[1:]), rng.integers(0, 3, 24)
    order = [rng.choice(24, size=xshape[0], replace=False) for _ in range(5)]
    runs = []
    for reuse in (False, True):
        params = net.init(0)
        state = method.init(net, params)
        bx, by = np.empty(xshape), np.empty(xshape[0], dtype=y.dtype)
        for k, i in enumerate(order):
            if reuse:
                bx[:], by[:] = x[i], y[i]
                batch = Batch(bx, by, CrossEntropy())
            else:
                batch = Batch(x[i], y[i], CrossEntropy())
            d, state = method.step(state, net, params, batch, rng=k)
            params = [W + 0.05 * di for W, di in zip(params, d)]
        runs.append(params)
    for a, b in zip(*runs):
        assert np.array_equal(a, b)
