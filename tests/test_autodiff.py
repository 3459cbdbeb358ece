"""Direct tests of the pure functions of :mod:`refcurv.nn.autodiff`, called without
``Sequential`` (which only validates and calls them), each against the independent
autograd oracle or against its definition written out with explicit loops.

Every hypothesis example draws an MLP or CNN (tests/oracle.py, refcurv.testing.strategies);
comparisons are in float64 at the autodiff tolerance of tolerance.py (1e-10 relative).
"""
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import elementwise_grad, jacobian
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import Oracle, forward, per_sample_loss
from refcurv.testing.tolerance import assert_close

import refcurv as rc
from refcurv.errors import NonFiniteError, ShapeError
from refcurv.nn import MSE, Conv2d, Flatten, Linear, ReLU, Sequential, Tanh
from refcurv.nn import autodiff as ad
from refcurv.testing.strategies import problems


def _setup(pb):
    """``(layers, params, x, y, loss, trace, oracle, θ)``; ``pb.data()`` is float64 and
    shape-correct, which is what the pure functions assume (they validate nothing)."""
    net = pb.net
    params, x, y = pb.data()
    tr = ad.forward_trace(net.layers, params, x)
    return net.layers, params, x, y, pb.loss_fn, tr, Oracle(pb.spec, pb.loss, x, y), rc.flatten(params)


def _tangents(params, K, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((K,) + W.shape) for W in params]


def _flat_tangents(V):
    """Per-layer ``(K, out, d)`` → ``(K, n)`` in refcurv's order (independent of flatten_layers)."""
    return np.concatenate([t.reshape(t.shape[0], -1) for t in V], axis=1)


# ------------------------------------------------------------------ structure
def test_trainable_index_and_feature_shapes_by_hand():
    layers = [Conv2d(2, 3, 3, stride=2, padding=1), ReLU(), Flatten(), Linear(27, 4), Tanh(), Linear(4, 2)]
    assert ad.trainable_index(layers) == [0, 3, 5]
    # (5 + 2·1 − 3) // 2 + 1 = 3 output locations per side
    assert ad.feature_shapes(layers, (2, 5, 5)) == [(2, 5, 5), (3, 3, 3), (3, 3, 3), (27,), (4,), (4,), (2,)]
    # (3 + 2 − 3) // 2 + 1 = 2 per side: 3·2·2 = 12 features reach Linear(27, 4)
    with pytest.raises(ShapeError, match=r"layers\[3\]"):
        ad.feature_shapes(layers, (2, 3, 3))
    with pytest.raises(ShapeError, match=r"layers\[0\]"):
        ad.feature_shapes(layers, (1, 5, 5))


# ------------------------------------------------------------------ forward
@given(problems())
def test_forward_trace_outputs_preactivations_and_patches(pb):
    """Algorithm 17: out = f(x); W_l A_l = h_l (oracle's pre-activation); A_l carries the
    ones row exactly when the layer has a bias; patches lists A in trainable order."""
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    assert_close(tr.out, orc.f(theta), what="f")
    idx = ad.trainable_index(layers)
    assert [id(a) for a in tr.patches] == [id(tr.A[k]) for k in idx]
    assert len(tr.inputs) == len(tr.in_shapes) == len(layers)
    assert tr.inputs[0] is x
    for j, k in enumerate(idx):
        m = layers[k]
        h = m.to_output(params[j] @ tr.A[k], tr.in_shapes[k])
        assert_close(h, forward(pb.spec, theta, x, stop_layer=j), what=f"h_{j}")
        if m.bias:
            assert np.array_equal(tr.A[k][:, -1, :], np.ones_like(tr.A[k][:, -1, :]))


# ------------------------------------------------------------------ push / pull
def _preactivation_grad(spec, loss, x, y, theta, j):
    """∂ψ_i/∂h_j at θ (autograd through the oracle started at h_j): (N, *h_shape)."""
    h = forward(spec, theta, x, stop_layer=j)

    def total(hh):
        return anp.sum(per_sample_loss(loss, forward(spec, theta, x, start_layer=j, h_start=hh), y))

    return elementwise_grad(total)(h)


@given(problems(max_batch=3))
def test_pull_cotangents_gives_preactivation_gradients(pb):
    """Algorithm 1 line 4 / Algorithm 18: G_l = ∂ψ/∂h_l for dout = ∂ℓ/∂f (autograd), and the
    pass is linear in dout (a batched (K, N, C) cotangent = K single passes)."""
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    G = ad.pull_cotangents(layers, params, tr, loss.grad(tr.out, y))
    for j, g in enumerate(G):
        ref = _preactivation_grad(pb.spec, pb.loss, x, y, theta, j)
        assert_close(g, ref.reshape(g.shape), what=f"G_{j}")
    W = np.random.default_rng(pb.seed % 97).standard_normal((3,) + tr.out.shape)
    Gb = ad.pull_cotangents(layers, params, tr, W)
    for kk in range(3):
        for gb, g in zip(Gb, ad.pull_cotangents(layers, params, tr, W[kk])):
            assert_close(gb[kk], g, rtol=1e-14, what="batched cotangent")


@given(problems(max_batch=3), st.data())
def test_push_tangents_output_and_injected_preactivation(pb, data):
    """(5.11) / Algorithm 19: the output tangent is J v; with inject=(k, E) at trainable
    module k it is ∂f/∂h_l E (autograd); a None entry of dparams is a zero tangent."""
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    V = _tangents(params, 2, pb.seed % 89)
    tan_in, df = ad.push_tangents(layers, params, tr, V)
    assert len(tan_in) == len(layers) and tan_in[0] is None
    assert_close(df, np.einsum("ncp,kp->knc", orc.jacobian(theta), _flat_tangents(V)), what="J v")
    # None entries = zero tangents
    V0 = [None] + V[1:]
    Vz = [np.zeros_like(V[0])] + V[1:]
    df0, dfz = ad.push_tangents(layers, params, tr, V0)[1], ad.push_tangents(layers, params, tr, Vz)[1]
    if df0 is None:  # no tangent reached the output (one layer): None is the zero tangent
        assert len(ad.trainable_index(layers)) == 1 and not dfz.any()
    else:
        assert_close(df0, dfz, rtol=1e-15, atol=0, what="None tangent")
    # inject a tangent at a pre-activation
    idx = ad.trainable_index(layers)
    j = data.draw(st.integers(0, len(idx) - 1))
    k = idx[j]
    h = np.asarray(forward(pb.spec, theta, x, stop_layer=j))
    E = np.random.default_rng(pb.seed % 83).standard_normal((2,) + h.shape)
    _, df_inj = ad.push_tangents(layers, params, tr, inject=(k, E))
    Jh = jacobian(lambda hh: forward(pb.spec, theta, x, start_layer=j, h_start=hh))(h)  # (N, C, *h.shape)
    ref = np.einsum("ncm,km->knc", Jh.reshape(h.shape[0], tr.out.shape[1], -1), E.reshape(2, -1))
    assert_close(df_inj, ref, what="∂f/∂h E")


@settings(max_examples=20)
@given(problems(max_batch=3), st.data())
def test_pull_cotangents_rop_is_the_directional_derivative_of_G(pb, data):
    """The R-operator of the backward pass: R{G_l} = d/dε G_l(θ + ε v) for dout = ∂ℓ/∂f,
    with ddout = H_i J_i v; reference: autograd's Jacobian of θ ↦ ∂ψ/∂h_l(θ) applied to v."""
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    V = _tangents(params, 1, pb.seed % 79)
    tan_in, df = ad.push_tangents(layers, params, tr, V)
    _, dG = ad.pull_cotangents(layers, params, tr, loss.grad(tr.out, y), rop=(tan_in, V, loss.hvp(tr.out, df)))
    j = data.draw(st.integers(0, len(dG) - 1))
    dGdtheta = jacobian(lambda t: _preactivation_grad(pb.spec, pb.loss, x, y, t, j))(theta)
    ref = dGdtheta.reshape(-1, theta.size) @ _flat_tangents(V)[0]
    assert_close(dG[j][0], ref.reshape(dG[j][0].shape), what=f"R{{G_{j}}}")


# ---------------------------------------------------------- per-sample gradients
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_weight_grads_is_sum_over_locations_of_outer_products(N, o, d, T, seed):
    """Theorem 3 i: ∇_W ψ_i = Σ_t g_{i,t} a_{i,t}ᵀ (explicit loops), with a leading K axis."""
    rng = np.random.default_rng(seed)
    A, G = rng.standard_normal((N, d, T)), rng.standard_normal((2, N, o, T))
    (U,) = ad.weight_grads([A], [G])
    ref = np.zeros((2, N, o, d))
    for kk in range(2):
        for i in range(N):
            for t in range(T):
                ref[kk, i] += np.outer(G[kk, i, :, t], A[i, :, t])
    assert_close(U, ref, rtol=1e-14)


def test_flatten_layers_matches_refcurv_flatten_row_by_row():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 5, 1))]
    F = ad.flatten_layers(grads)
    assert F.shape == (3, 13)
    for kk in range(3):
        assert np.array_equal(F[kk], rc.flatten([g[kk] for g in grads]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_basis(dtype):
    out = np.zeros((4, 3), dtype=dtype)
    E = ad.output_basis(out)
    assert E.shape == (3, 4, 3) and E.dtype == dtype
    for c in range(3):
        assert np.array_equal(E[c], np.tile(np.eye(3)[c], (4, 1)))


# ------------------------------------------------------------ Jacobian products
@given(problems())
def test_jvp_vjp_jacobian_and_gram_match_autograd(pb):
    """Algorithms 19-22 against autograd's J (N, C, n)."""
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    J = orc.jacobian(theta)
    rng = np.random.default_rng(pb.seed % 101)
    V = _tangents(params, 3, pb.seed % 103)
    assert_close(ad.jvp(layers, params, tr, V), np.einsum("ncp,kp->knc", J, _flat_tangents(V)), what="jvp")
    w = rng.standard_normal((2,) + tr.out.shape)
    assert_close(ad.flatten_layers(ad.vjp(layers, params, tr, w)), np.einsum("ncp,knc->kp", J, w), what="vjp")
    assert_close(ad.flatten_layers(ad.vjp(layers, params, tr, w, per_sample=True)),
                 np.einsum("ncp,knc->knp", J, w), what="vjp per sample")
    assert_close(ad.jacobian(layers, params, tr), J, what="jacobian")
    assert_close(ad.jacobian_gram(layers, params, tr), np.einsum("icp,jdp->icjd", J, J), what="gram")


# ------------------------------------------------------------------ second order
def _per_sample_hessians(pb, x, y, theta):
    """∇²ψ_i (N, n, n) by autograd (ψ_i depends on sample i only)."""
    return jacobian(jacobian(lambda t: per_sample_loss(pb.loss, forward(pb.spec, t, x), y)))(theta)


@settings(max_examples=20)
@given(problems(max_batch=3))
def test_hvp_per_sample_full_residual_and_custom_output_term(pb):
    """Pearlmutter R-op: ∇²ψ_i v (autograd per-sample Hessians); output_hvp=None leaves the
    residual term of (1.4); any output operator M_i adds exactly J_iᵀ M_i J_i v."""
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    V = _tangents(params, 2, pb.seed % 107)
    v = _flat_tangents(V)
    dout = loss.grad(tr.out, y)
    H = ad.flatten_layers(ad.hvp_per_sample(layers, params, tr, dout, V, lambda t: loss.hvp(tr.out, t)))
    assert_close(H, np.einsum("npq,kq->knp", _per_sample_hessians(pb, x, y, theta), v), what="∇²ψ_i v")
    R = ad.flatten_layers(ad.hvp_per_sample(layers, params, tr, dout, V, None))
    r = np.asarray(loss.grad(tr.out, y))  # ∂ℓ/∂f_i held fixed
    Hres = jacobian(jacobian(lambda t: anp.sum(r * forward(pb.spec, t, x), axis=1)))(theta)
    assert_close(R, np.einsum("npq,kq->knp", Hres, v), what="residual term")
    B = np.random.default_rng(pb.seed % 109).standard_normal((x.shape[0],) + (tr.out.shape[1],) * 2)
    M = B + B.swapaxes(1, 2)
    Hm = ad.flatten_layers(ad.hvp_per_sample(layers, params, tr, dout, V, lambda t: np.einsum("ncd,knd->knc", M, t)))
    J = orc.jacobian(theta)
    assert_close(Hm - R, np.einsum("ncp,ncd,ndq,kq->knp", J, M, J, v), atol=1e-12, what="J_iᵀ M_i J_i v")


@settings(max_examples=20)
@given(problems(max_batch=3))
def test_preactivation_hessians_match_autograd_every_layer(pb):
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    Hs = ad.preactivation_hessians(layers, params, tr, loss.grad(tr.out, y), lambda t: loss.hvp(tr.out, t))
    for j, Hj in enumerate(Hs):
        assert_close(Hj, orc.preactivation_hessian(theta, j), what=f"pre-activation Hessian {j}")


# ------------------------------------------------------------ thin shell, dtypes
@given(problems(max_batch=3))
def test_sequential_is_a_thin_shell_over_the_pure_functions(pb):
    """Sequential's results are the pure functions' results, bit for bit."""
    net = pb.net
    layers, params, x, y, loss, tr, orc, theta = _setup(pb)
    V = _tangents(params, 2, 1)
    w = np.random.default_rng(2).standard_normal(tr.out.shape)
    same = np.testing.assert_array_equal
    same(net.forward(params, x), tr.out)
    same(net.jvp(params, x, V), ad.jvp(layers, params, tr, V))
    for a, b in zip(net.vjp(params, x, w), ad.vjp(layers, params, tr, w)):
        same(a, b)
    same(net.jacobian(params, x), ad.jacobian(layers, params, tr))
    same(net.jacobian_gram(params, x), ad.jacobian_gram(layers, params, tr))
    dout = loss.grad(tr.out, y)
    for a, b in zip(net.per_sample_grads(params, x, y, loss),
                    ad.weight_grads(tr.patches, ad.pull_cotangents(layers, params, tr, dout))):
        same(a, b)
    for a, b in zip(net.hvp_per_sample(params, x, y, loss, V),
                    ad.hvp_per_sample(layers, params, tr, dout, V, lambda t: loss.hvp(tr.out, t))):
        same(a, b)


def test_pure_functions_keep_float32():
    net = Sequential([Conv2d(1, 2, 2), Tanh(), Flatten(), Linear(8, 3)])
    params = [W.astype(np.float32) for W in net.init(0)]
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32)
    tr = ad.forward_trace(net.layers, params, x)
    V = [np.ones((1,) + W.shape, np.float32) for W in params]
    assert tr.out.dtype == np.float32
    assert ad.jvp(net.layers, params, tr, V).dtype == np.float32
    assert ad.jacobian(net.layers, params, tr).dtype == np.float32
    assert all(g.dtype == np.float32 for g in ad.vjp(net.layers, params, tr, np.ones((2, 3), np.float32)))


def test_sequential_chain_check_messages():
    """The four errors of the chain check (table-driven since the split), verbatim."""
    cases = [
        ([Linear(3, 4), Tanh(), Linear(5, 2)],
         "layers[2] Linear(5, 2, bias=True) expects 5 input features, previous layer gives 4"),
        ([Conv2d(1, 3, 2), ReLU(), Conv2d(2, 1, 2)],
         "layers[2] Conv2d(2, 1, kernel_size=(2, 2), stride=1, padding=0, bias=True) expects 2 input channels, "
         "previous layer gives 3"),
        ([Conv2d(1, 3, 2), Linear(12, 2)],
         "layers[1] Linear(12, 2, bias=True) follows an image-valued layer: insert Flatten()"),
        ([Linear(3, 4), Conv2d(4, 1, 1)],
         "layers[1] Conv2d(4, 1, kernel_size=(1, 1), stride=1, padding=0, bias=True) follows a vector-valued layer"),
    ]
    for layers, msg in cases:
        with pytest.raises(ShapeError) as e:
            Sequential(layers)
        assert str(e.value) == msg
    # Flatten resets what the chain check knows (widths are then checked with an input shape)
    Sequential([Conv2d(1, 3, 2), Flatten(), Linear(7, 2), Tanh(), Linear(2, 1)])


def test_per_sample_gradient_overflow_is_refused_in_the_input_dtype():
    """The finiteness bound on the factors (``T·max|g|·max|a|`` below the dtype's range)
    must be the dtype's: in float32 ``g a ≈ 6e19 · 3e19`` overflows although both factors
    and the output are finite, and is refused; a benign batch passes the bound unscanned."""
    net = Sequential([Linear(2, 2)])
    params = [np.ones((2, 3), dtype=np.float32)]
    x = np.full((1, 2), 3e19, dtype=np.float32)
    with pytest.raises(NonFiniteError, match="per-sample gradients"):
        net.per_sample_grads(params, x, np.zeros((1, 2), np.float32), MSE())
    U = net.per_sample_grads(params, x / 1e19, np.zeros((1, 2), np.float32), MSE())
    assert U[0].dtype == np.float32 and np.isfinite(U[0]).all()
