"""Backend selection (design §6) and, on a GPU, CPU/GPU parity of the foundation."""
import numpy as np
import pytest

import refcurv as rc
from refcurv import backend
from refcurv import curvature as cv
from refcurv.errors import HyperParameterError
from refcurv.testing.strategies import Problem


def test_numpy_default_and_helpers():
    a = np.ones(3)
    assert backend.xp_of(a) is np and backend.xp_of([a, a]) is np and backend.xp_of() is np
    assert backend.to_numpy(a) is not None and backend.asarray_like([1, 2], a).dtype.kind == "i"
    assert backend.get_xp("numpy") is np
    g = np.random.default_rng(0)
    assert backend.rng_of(g) is g
    assert backend.rng_of(5).random() == np.random.default_rng(5).random()
    with pytest.raises(HyperParameterError, match="backend must be"):
        backend.get_xp("torch")


def test_float32_runs_in_float32_and_curvature_in_float64():
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 2, True)), (3,), 2, "mse", 3, 0)
    net = pb.net
    params, x, y = pb.data()
    p32, x32 = [W.astype(np.float32) for W in params], x.astype(np.float32)
    assert net.forward(p32, x32).dtype == np.float32
    assert cv.ggn(net, p32, x32, y, pb.loss_fn).dtype == np.float64


@pytest.mark.gpu
def test_cupy_parity_float64():
    import cupy

    pb = Problem(
        (("conv", 2, 3, 3, 2, 1, True), ("act", "tanh"), ("flatten",), ("linear", 12, 3, True)),
        (2, 4, 4), 3, "cross_entropy", 4, 0,
    )
    net = pb.net
    params, x, y = pb.data()
    gp, gx, gy = [cupy.asarray(W) for W in params], cupy.asarray(x), cupy.asarray(y)
    for fn in (cv.per_sample_grads, cv.hessian, cv.ggn, cv.empirical_fisher):
        ref = fn(net, params, x, y, pb.loss_fn)
        out = fn(net, gp, gx, gy, pb.loss_fn)
        assert backend.xp_of(out) is cupy
        np.testing.assert_allclose(backend.to_numpy(out), ref, rtol=1e-10, atol=1e-13)
    for (A, G), (gA, gG) in zip(
        cv.kfac_factors(net, params, x, y, pb.loss_fn), cv.kfac_factors(net, gp, gx, gy, pb.loss_fn)
    ):
        np.testing.assert_allclose(backend.to_numpy(gA), A, rtol=1e-10)
        np.testing.assert_allclose(backend.to_numpy(gG), G, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(
        backend.to_numpy(cv.fisher(net, gp, gx, loss=pb.loss_fn, kind="mc", n_samples=7, seed=3)),
        cv.fisher(net, params, x, loss=pb.loss_fn, kind="mc", n_samples=7, seed=3), rtol=1e-10, atol=1e-13,
    )
    assert rc.flatten(gp).shape == (net.n_params,)
