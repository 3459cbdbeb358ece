"""The per-layer Gram matrices and matrix-free products of ``refcurv.curvature`` ([Ren-thesis]
Ch.5 §5.3, Algorithms 17-22) against the dense definitions (per-sample gradients ``U``,
per-sample Jacobians ``J``, the GGN), each kernel on its own.

Tolerances
----------
* Factor kernels (``grad_from_factors``, ``ef_gram``, ``ef_products``, ``ef_transpose``) are sums
  of products of the same factor entries in another order than the dense reference (which
  forms ``u_i = Σ_t g_{i,t} a_{i,t}ᵀ`` first). Standard summation bound: each entry is off by at
  most ``c·m·eps`` times the same sum taken over absolute values, where ``m`` counts the terms
  (``n`` parameters, ``T`` locations, ``N`` samples). The absolute-value sums are the same
  kernels applied to ``|A|, |G|, |v|, |z|`` — an entrywise bound, ``C = 100`` as
  ``residual_tol``; it holds for the dense reference too (``|u_i| ≤ Σ_t |g_{i,t}||a_{i,t}|ᵀ``).
* ``J v``, ``Jᵀ w`` and ``B v`` (forward-mode / backward passes) against the dense Jacobian:
  normwise, ``‖Δ(Jv)‖ ≤ C (n + NC) eps ‖J‖_F ‖v‖`` and
  ``‖Δ(Bv)‖ ≤ C (n + NC) eps (‖J‖_F² ‖H‖ / N) ‖v‖`` (``m = NC`` rows of ``J``), as in
  tests/test_method_hessian_free.py. ``Sequential.jacobian_gram`` (Algorithm 22) is pinned by
  tests/test_identities.py::test_jacobian_gram_equals_J_Jt.
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import refcurv as rc
from refcurv import curvature as cv
from refcurv.curvature import GGNOperator, OutputJacobian, ef_gram, ef_products, ef_transpose, grad_from_factors
from refcurv.operators import Operator
from refcurv.testing.strategies import problems
from refcurv.testing.tolerance import residual_tol


def _setup(pb):
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    A, G = net.factors(params, x, y, loss)
    T = max(a.shape[-1] for a in A)
    return net, loss, params, x, y, A, G, T


def _abs(xs):
    return [np.abs(a) for a in xs]


@given(problems())
def test_grad_from_factors_equals_grad(pb):
    """``(1/N) Σ_i G_i A_iᵀ`` (Algorithm 18) = the dense mini-batch gradient, entrywise."""
    net, loss, params, x, y, A, G, T = _setup(pb)
    got = rc.flatten(grad_from_factors(A, G))
    want = cv.grad(net, params, x, y, loss)
    scale = rc.flatten(grad_from_factors(_abs(A), _abs(G)))
    assert np.all(np.abs(got - want) <= residual_tol(net.n_params + x.shape[0] * T) * scale)


@given(problems())
def test_ef_gram_equals_U_Ut(pb):
    """``ef_gram`` = ``U Uᵀ`` (``U`` the dense per-sample gradients, rows ``u_iᵀ``; §5.3.3,
    erratum SMW-1); ``blocks=True`` gives the per-layer ``U_l U_lᵀ`` (SMW-NG-BD's ``D_l``), which
    sum to the full Gram; symmetric to rounding."""
    net, loss, params, x, y, A, G, T = _setup(pb)
    U = cv.per_sample_grads(net, params, x, y, loss)
    tol = residual_tol(net.n_params + T * T)
    K = ef_gram(A, G)
    assert K.shape == (x.shape[0],) * 2
    assert np.all(np.abs(K - U @ U.T) <= tol * ef_gram(_abs(A), _abs(G)))
    blocks = ef_gram(A, G, blocks=True)
    scales = ef_gram(_abs(A), _abs(G), blocks=True)
    assert len(blocks) == len(rc.vec.layer_slices(net))
    for Kl, Sl, sl in zip(blocks, scales, rc.vec.layer_slices(net)):
        assert np.all(np.abs(Kl - U[:, sl] @ U[:, sl].T) <= tol * Sl)
        assert np.all(np.abs(Kl - Kl.T) <= 2 * tol * Sl)  # symmetric up to the summation order over (t, t')
    assert np.all(np.abs(sum(blocks) - K) <= tol * ef_gram(_abs(A), _abs(G)))


@given(problems(), st.integers(0, 2**31 - 1))
def test_ef_products_and_transpose_equal_U_v_and_Ut_z(pb, seed):
    """``ef_products(A, G, v)`` = per layer ``U_l v_l`` (summed: ``U v``, SMW-NG's ``J g``);
    ``ef_transpose(A, G, z)`` = ``Uᵀ z`` per layer (``z`` shared), or ``U_lᵀ z_l`` (one ``z_l`` per
    layer, SMW-NG-BD)."""
    net, loss, params, x, y, A, G, T = _setup(pb)
    rng = np.random.default_rng(seed)
    N, n = x.shape[0], net.n_params
    U = cv.per_sample_grads(net, params, x, y, loss)
    slices = rc.vec.layer_slices(net)
    v = rng.standard_normal(n)
    vl = rc.unflatten(v, net)
    tol = residual_tol(n + T)
    got = ef_products(A, G, vl)
    scale = ef_products(_abs(A), _abs(G), _abs(vl))
    for gl, sc, sl in zip(got, scale, slices):
        assert gl.shape == (N,)
        assert np.all(np.abs(gl - U[:, sl] @ v[sl]) <= tol * sc)
    assert np.all(np.abs(sum(got) - U @ v) <= tol * sum(scale))
    z = rng.standard_normal(N)
    got = rc.flatten(ef_transpose(A, G, z))
    assert np.all(np.abs(got - U.T @ z) <= residual_tol(n + N * T) * rc.flatten(ef_transpose(_abs(A), _abs(G), np.abs(z))))
    zs = [rng.standard_normal(N) for _ in slices]
    got = ef_transpose(A, G, zs)
    scale = ef_transpose(_abs(A), _abs(G), _abs(zs))
    for gl, sc, zl, sl in zip(got, scale, zs, slices):
        assert np.all(np.abs(gl.ravel() - U[:, sl].T @ zl) <= residual_tol(n + N * T) * sc.ravel())


@given(problems(), st.integers(0, 2**31 - 1))
def test_output_jacobian_products(pb, seed):
    """``J v`` (Algorithm 19, forward mode) and ``Jᵀ w = Σ_i J_iᵀ w_i`` (Algorithm 21, backward)
    against the dense per-sample Jacobians, sample-major ``(N, C)``."""
    params, x, y = pb.data()
    net = pb.net
    rng = np.random.default_rng(seed)
    J = cv.jacobian(net, params, x)  # (N, C, n)
    N, C, n = J.shape
    op = OutputJacobian(net, params, x)
    assert np.array_equal(op.f, net.forward(params, x))
    v = rng.standard_normal(n)
    w = rng.standard_normal((N, C))
    tol = residual_tol(n + N * C) * np.linalg.norm(J)
    Jv = op.jvp(rc.unflatten(v, net))
    assert Jv.shape == (N, C)
    assert np.linalg.norm(Jv - J @ v) <= tol * np.linalg.norm(v)
    Jtw = rc.flatten(op.vjp(w))
    assert np.linalg.norm(Jtw - np.einsum("icp,ic->p", J, w)) <= tol * np.linalg.norm(w)


@given(problems(), st.integers(1, 3), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_ggn_operator_equals_dense_ggn(pb, K, lam, seed):
    """``GGNOperator`` = ``B + λI`` with ``B`` = :func:`refcurv.curvature.ggn` (5.2), as a
    :class:`refcurv.operators.Operator`: ``matvec`` on ``(n,)`` and ``(n, k)``, ``ggn`` (undamped),
    ``todense``; ``solve`` (λ > 0) has a backward-stable residual. Also pins erratum E2
    (Algorithm 19's JVP)."""
    params, x, y = pb.data()
    net, loss = pb.net, pb.loss_fn
    N, n = x.shape[0], net.n_params
    B = cv.ggn(net, params, x, y, loss)
    J = cv.jacobian(net, params, x)
    H = loss.hessian(net.forward(params, x))
    jh = np.linalg.norm(J) ** 2 * max(np.linalg.norm(Hi, 2) for Hi in H) / N
    bound = residual_tol(n + N * pb.n_out) * jh
    V = np.random.default_rng(seed).standard_normal((n, K))
    op = GGNOperator(net, params, x, loss, damping=lam)
    assert isinstance(op, Operator) and op.shape == (n, n)
    out = op.matvec(V)
    assert out.shape == V.shape
    for k in range(K):
        v = V[:, k]
        assert np.linalg.norm(out[:, k] - (B @ v + lam * v)) <= bound * np.linalg.norm(v)
        assert np.linalg.norm(op.matvec(v) - (B @ v + lam * v)) <= bound * np.linalg.norm(v)
        assert np.linalg.norm(op.ggn(v) - B @ v) <= bound * np.linalg.norm(v)
    Tm = op.todense()
    assert np.array_equal(Tm, Tm.T)
    assert np.linalg.norm(Tm - B - lam * np.eye(n)) <= bound * np.sqrt(n)
    if lam > 0.1:
        b = V[:, 0]
        xs = op.solve(b)
        assert np.linalg.norm(Tm @ xs - b) <= residual_tol(n) * np.linalg.norm(Tm, 2) * np.linalg.norm(xs)
        assert np.allclose(op.aslinearoperator() @ b, op.matvec(b), rtol=0, atol=0)
