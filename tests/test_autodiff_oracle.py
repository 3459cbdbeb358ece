"""refcurv's autodiff vs the independent autograd oracle (issue: foundation).

Each hypothesis example draws an MLP or CNN (1-3 layers, widths 1-6, conv stride 1/2,
padding 0/1, 1-3 channels, every activation, every loss, batch 1-5, with and without
bias) and compares in float64 at ≤ 1e-10 relative (see tolerance.py).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import Oracle
from refcurv.testing.tolerance import assert_close

import refcurv as rc
from refcurv import curvature as cv
from refcurv.testing.strategies import Problem, problems


def _setup(pb):
    net = pb.net
    params, x, y = pb.data()
    return net, params, x, y, Oracle(pb.spec, pb.loss, x, y), rc.flatten(params)


@given(problems())
def test_first_order_quantities_match_autograd(pb):
    net, params, x, y, orc, theta = _setup(pb)
    loss = pb.loss_fn
    assert_close(net.forward(params, x), orc.f(theta), what="forward")
    assert_close(net.loss(params, x, y, loss), orc.objective(theta), what="loss")
    assert_close(rc.flatten(net.grad(params, x, y, loss)), orc.grad(theta), what="grad")
    assert_close(cv.per_sample_grads(net, params, x, y, loss), orc.per_sample_grads(theta), what="per-sample")
    J = orc.jacobian(theta)
    assert_close(cv.jacobian(net, params, x), J, what="jacobian")
    rng = np.random.default_rng(pb.seed + 1)
    v = rng.standard_normal(theta.size)
    assert_close(net.jvp(params, x, rc.unflatten(v, net)), np.einsum("ncp,p->nc", J, v), what="jvp")
    w = rng.standard_normal(J.shape[:2])
    assert_close(rc.flatten(net.vjp(params, x, w)), np.einsum("ncp,nc->p", J, w), what="vjp")
    # batched tangents/cotangents
    V = rng.standard_normal((3, theta.size))
    assert_close(net.jvp(params, x, rc.unflatten(V, net)), np.einsum("ncp,kp->knc", J, V), what="jvp batched")


@given(problems())
def test_hessian_and_residual_match_autograd(pb):
    net, params, x, y, orc, theta = _setup(pb)
    loss = pb.loss_fn
    H = cv.hessian(net, params, x, y, loss)
    assert_close(H, orc.hessian(theta), what="hessian")
    R = orc.residual(theta)
    assert_close(cv.hessian_residual(net, params, x, y, loss), R, what="residual")
    # thesis (1.4): Hessian − GGN is the residual term
    assert_close(H - cv.ggn(net, params, x, y, loss), R, atol=1e-12, what="H − GGN")


@given(problems(max_batch=3), st.data())
def test_preactivation_hessians_match_autograd(pb, data):
    net, params, x, y, orc, theta = _setup(pb)
    Hs = cv.preactivation_hessians(net, params, x, y, pb.loss_fn)
    layer = data.draw(st.integers(0, len(Hs) - 1))
    assert_close(Hs[layer], orc.preactivation_hessian(theta, layer), what=f"pre-activation Hessian {layer}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
def test_conv_grid_hessian_and_jacobian(stride, padding, act, loss):
    """The whole conv grid of the issue, independent of what hypothesis happens to draw:
    two conv layers (2→3→1 channels, 3×3 and 2×2 kernels), bias on one of them."""
    spec = (
        ("conv", 2, 3, 3, stride, padding, True), ("act", act),
        ("conv", 3, 1, 2, 1, padding, False), ("act", act), ("flatten",),
    )
    H = (5 + 2 * padding - 3) // stride + 1
    H2 = H + 2 * padding - 1
    spec = spec + (("linear", H2 * H2, 3, True),)
    pb = Problem(spec, (2, 5, 5), 3, loss, 3, stride * 100 + padding * 10 + len(act))
    net, params, x, y, orc, theta = _setup(pb)
    assert_close(cv.jacobian(net, params, x), orc.jacobian(theta), what="jacobian")
    assert_close(cv.per_sample_grads(net, params, x, y, pb.loss_fn), orc.per_sample_grads(theta), what="per-sample")
    assert_close(cv.hessian(net, params, x, y, pb.loss_fn), orc.hessian(theta), what="hessian")
