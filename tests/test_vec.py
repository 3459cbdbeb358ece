"""Flattening and the permutations between vec orders (design §3)."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.testing.strategies import problems


@given(problems())
def test_flatten_roundtrip_and_orders(pb):
    net = pb.net
    params, _, _ = pb.data()
    theta = rc.flatten(params)
    assert theta.shape == (net.n_params,)
    for W, V in zip(params, rc.unflatten(theta, net)):
        assert np.array_equal(W, V)
    batched = rc.unflatten(np.stack([theta, 2 * theta]), net)
    assert all(b.shape == (2,) + W.shape for b, W in zip(batched, params))
    # column-major: the papers' vec
    assert np.array_equal(rc.to_order(theta, net, "col"), np.concatenate([W.ravel(order="F") for W in params]))
    # torch: weight (in PyTorch's own shape) then bias, layer by layer
    parts = []
    for m, W in zip(net.layers_trainable, params):
        w, b = m.split(W)
        parts.append(w.ravel())
        if b is not None:
            parts.append(b)
        assert np.array_equal(m.join(w, b), W)
    assert np.array_equal(rc.to_order(theta, net, "torch"), np.concatenate(parts))
    for order in rc.vec.ORDERS:
        assert np.array_equal(rc.from_order(rc.to_order(theta, net, order), net, order), theta)


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 1000))
def test_row_major_vec_of_outer_product_is_g_kron_a(o, d, seed):
    """Row-major: vec(g aᵀ) = g ⊗ a; column-major: a ⊗ g (thesis (2.1))."""
    rng = np.random.default_rng(seed)
    g, a = rng.standard_normal(o), rng.standard_normal(d)
    W = np.outer(g, a)
    assert np.allclose(W.ravel(), np.kron(g, a), rtol=0, atol=0)
    assert np.allclose(rc.to_order(W.ravel(), [(o, d)], "col"), np.kron(a, g), rtol=0, atol=0)


@given(problems(kind=st.just("mlp")))
def test_kfac_block_is_G_kron_A_row_major_and_A_kron_G_col_major(pb):
    net = pb.net
    params, x, y = pb.data()
    for (A, G), shape in zip(cv.kfac_factors(net, params, x, y, pb.loss_fn), net.param_shapes):
        assert np.array_equal(rc.to_order(np.kron(G, A), [shape], "col", matrix=True), np.kron(A, G))
