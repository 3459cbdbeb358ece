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
