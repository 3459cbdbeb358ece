"""Identities between the curvature matrices (issue: foundation; thesis Ch.1 §1.2,
(1.4), (2.1)-(2.3), Theorem 3; SENG (2)-(4); design §3)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import Oracle
from refcurv.testing.tolerance import EPS, assert_clt, assert_close

import refcurv as rc
from refcurv import curvature as cv
from refcurv.nn import MSE, Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing.strategies import Problem, problems


def _data(pb):
    params, x, y = pb.data()
    return pb.net, params, x, y, pb.loss_fn


@given(problems())
def test_per_sample_grads_average_to_batch_grad(pb):
    net, params, x, y, loss = _data(pb)
    U = cv.per_sample_grads(net, params, x, y, loss)
    assert U.shape == (x.shape[0], net.n_params)
    assert_close(U.mean(axis=0), rc.flatten(net.grad(params, x, y, loss)), rtol=1e-13)


@given(problems())
def test_empirical_fisher_is_mean_outer_product_of_autograd_grads(pb):
    net, params, x, y, loss = _data(pb)
    U = Oracle(pb.spec, pb.loss, x, y).per_sample_grads(rc.flatten(params))
    assert_close(cv.empirical_fisher(net, params, x, y, loss), U.T @ U / U.shape[0])


def _enumerated_fisher(pb, params, x):
    """Test-side exact Fisher: (1/N) Σ_i E_y[u_i(y) u_i(y)ᵀ] with per-sample gradients from
    autograd, the expectation taken by enumerating labels (CE: C classes; BCE: 2^C label
    vectors) or, for MSE, by the 2C-point rule y = f ± √C e_c (exact for the quadratic
    integrand of a Gaussian with covariance I)."""
    import itertools

    theta = rc.flatten(params)
    f = Oracle(pb.spec, pb.loss, x, None).f(theta)
    N, C = f.shape
    terms = []  # (weights (N,), labels)
    if pb.loss == "cross_entropy":
        p = np.exp(f - f.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        terms = [(p[:, c], np.full(N, c)) for c in range(C)]
    elif pb.loss == "bce":
        s = 1 / (1 + np.exp(-f))
        for yv in itertools.product((0.0, 1.0), repeat=C):
            yv = np.array(yv)
            terms.append((np.prod(np.where(yv > 0, s, 1 - s), axis=1), np.broadcast_to(yv, (N, C))))
    else:
        for c in range(C):
            for sign in (1, -1):
                terms.append((np.full(N, 1 / (2 * C)), f + sign * np.sqrt(C) * np.eye(C)[c]))
    F = 0
    for w, lab in terms:
        U = Oracle(pb.spec, pb.loss, x, lab).per_sample_grads(theta)
        F = F + np.einsum("n,np,nq->pq", w, U, U) / N
    return F


@given(problems(max_batch=3))
def test_ggn_equals_exact_fisher(pb):
    """GGN = Fisher for the canonical-link losses (thesis §1.2.2): refcurv's GGN (from the
    output Hessian) against refcurv's exact Fisher (from the label expectation) and against
    a Fisher enumerated in the test from autograd's per-sample gradients."""
    net, params, x, y, loss = _data(pb)
    G = cv.ggn(net, params, x, y, loss)
    assert_close(cv.fisher(net, params, x, loss=loss, kind="exact"), G, rtol=1e-12, atol=1e-14)
    assert_close(_enumerated_fisher(pb, params, x), G, atol=1e-14)


def _assert_sym_psd(M, what):
    n = M.shape[0]
    assert np.array_equal(M, M) and np.allclose(M, M.T, rtol=0, atol=8 * EPS * np.abs(M).max()), what
    # eigenvalues of a PSD matrix computed by a backward-stable eigh: ≥ −c n eps ‖M‖
    lo = np.linalg.eigvalsh((M + M.T) / 2).min()
    assert lo >= -10 * n * EPS * max(np.linalg.norm(M, 2), 1e-300), f"{what}: λ_min = {lo:.3e}"


@given(problems())
def test_ggn_fisher_ef_symmetric_psd(pb):
    net, params, x, y, loss = _data(pb)
    _assert_sym_psd(cv.ggn(net, params, x, y, loss), "GGN")
    _assert_sym_psd(cv.fisher(net, params, x, loss=loss), "Fisher")
    _assert_sym_psd(cv.fisher(net, params, x, loss=loss, kind="mc", n_samples=3, seed=0), "MC Fisher")
    _assert_sym_psd(cv.empirical_fisher(net, params, x, y, loss), "EF")


@given(problems(kind=st.just("mlp")))
def test_residual_vanishes_when_output_is_linear_in_params(pb):
    """(1.4)'s second term is Σ_c r_c ∇²f_c: zero when f is linear in θ (one Linear layer).
    It is *not* zero for deep linear networks (f is multilinear across layers), which the
    autograd comparison of the residual covers."""
    spec = (pb.spec[0],)
    pb = Problem(spec, pb.input_shape, spec[0][2], pb.loss if spec[0][2] > 1 else "mse", pb.N, pb.seed)
    net, params, x, y, loss = _data(pb)
    H = cv.hessian(net, params, x, y, loss)
    assert_close(cv.hessian_residual(net, params, x, y, loss), np.zeros_like(H), atol=1e-14)
    assert_close(H, cv.ggn(net, params, x, y, loss), rtol=1e-13, atol=1e-14)


def test_deep_linear_mse_residual_is_nonzero_in_general():
    net = Sequential([Linear(3, 4), Linear(4, 2)])
    rng = np.random.default_rng(0)
    params, x, y = net.init(1), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    R = cv.hessian_residual(net, params, x, y, MSE())
    assert np.linalg.norm(R) > 1e-2


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy", "bce"])
def test_mc_fisher_converges_to_exact_at_clt_rate(loss_name):
    """F_mc = (1/S) Σ_s Y_s with Y_s = (1/N) Σ_i u_i(ŷ_is) u_i(ŷ_is)ᵀ i.i.d. over s and
    E[Y_s] = F_exact; each entry must lie within the CLT/Bonferroni bound (S = 4000,
    seeded, so the outcome is deterministic)."""
    spec = (("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 3, True))
    pb = Problem(spec, (3,), 3, loss_name, 4, 7)
    net, params, x, y, loss = _data(pb)
    S = 4000
    tr = net._forward(params, x)
    U = cv._sampled_label_grads(net, params, tr, loss, S, 123)  # (S, N, n)
    Y = np.einsum("snp,snq->spq", U, U) / x.shape[0]
    assert_close(cv.fisher(net, params, x, loss=loss, kind="mc", n_samples=S, seed=123), Y.mean(axis=0), rtol=1e-13)
    assert_clt(Y, cv.fisher(net, params, x, loss=loss))


@given(problems(kind=st.just("cnn")))
def test_conv_per_sample_gradient_is_G_At(pb):
    """SENG (3) / thesis Theorem 3 i: vec(G_i A_iᵀ) is the per-sample gradient (autograd)."""
    net, params, x, y, loss = _data(pb)
    A, G = net.factors(params, x, y, loss)
    U = np.concatenate([(g @ a.swapaxes(1, 2)).reshape(x.shape[0], -1) for a, g in zip(A, G)], axis=1)
    assert_close(U, Oracle(pb.spec, pb.loss, x, y).per_sample_grads(rc.flatten(params)))


@given(problems())
def test_layer_hessian_has_theorem3_kronecker_structure(pb):
    """Thesis (2.2) / Theorem 3 ii: per-sample Hessian block of layer l equals
    Σ_{t,t'} G_{t,t'} ⊗ A_{t,t'} (row-major order), with G the pre-activation Hessian."""
    net, params, x, y, loss = _data(pb)
    Hps = cv.hessian(net, params, x, y, loss, per_sample=True)
    A, _ = net.factors(params, x, y, loss)
    Hpre = cv.preactivation_hessians(net, params, x, y, loss)
    start = 0
    for a, hp, (o, d) in zip(A, Hpre, net.param_shapes):
        N, _, T = a.shape
        hp = hp.reshape(N, o, T, o, T)
        block = np.einsum("natbs,ndt,nes->nadbe", hp, a, a).reshape(N, o * d, o * d)
        assert_close(block, Hps[:, start : start + o * d, start : start + o * d], rtol=1e-12)
        start += o * d


@given(problems())
def test_jacobian_gram_equals_J_Jt(pb):
    """Thesis Algorithm 22 (Kronecker-structured Gram blocks) = J Jᵀ formed densely."""
    net, params, x, _, _ = _data(pb)
    J = cv.jacobian(net, params, x)
    assert_close(net.jacobian_gram(params, x), np.einsum("icp,jdp->icjd", J, J), rtol=1e-12)


# ----------------------------------------------------------------------------- KFAC


def _kron_blocks(factors):
    return [np.kron(G, A) for A, G in factors]


@given(problems(kind=st.just("mlp"), max_batch=1))
def test_kfac_exact_for_batch_of_one(pb):
    net, params, x, y, loss = _data(pb)
    blocks = cv.ggn(net, params, x, y, loss, blocks=True)
    for K, B in zip(_kron_blocks(cv.kfac_factors(net, params, x, y, loss)), blocks):
        assert_close(K, B, rtol=1e-12, atol=1e-15)


@given(st.integers(1, 3), st.integers(1, 5), st.integers(2, 6), st.integers(0, 2**31 - 1), st.data())
def test_kfac_exact_for_deep_linear_mse(n_layers, width, N, seed, data):
    widths = [data.draw(st.integers(1, width)) for _ in range(n_layers + 1)]
    spec = tuple(("linear", widths[i], widths[i + 1], data.draw(st.booleans())) for i in range(n_layers))
    pb = Problem(spec, (widths[0],), widths[-1], "mse", N, seed)
    net, params, x, y, loss = _data(pb)
    blocks = cv.ggn(net, params, x, y, loss, blocks=True)
    for K, B in zip(_kron_blocks(cv.kfac_factors(net, params, x, y, loss)), blocks):
        assert_close(K, B, rtol=1e-12, atol=1e-15)


def test_kfac_exact_for_conv_with_one_location_and_batch_of_one():
    net = Sequential([Conv2d(2, 3, 3), Tanh(), Flatten(), Linear(3, 2)])
    rng = np.random.default_rng(3)
    params, x, y = net.init(0), rng.standard_normal((1, 2, 3, 3)), np.array([1])
    blocks = cv.ggn(net, params, x, y, CrossEntropy(), blocks=True)
    for conv in ("expand", "reduce"):
        for K, B in zip(_kron_blocks(cv.kfac_factors(net, params, x, y, CrossEntropy(), conv=conv)), blocks):
            assert_close(K, B, rtol=1e-12, atol=1e-15)


@given(problems(kind=st.just("cnn")), st.sampled_from(["exact", "empirical"]))
def test_kfac_conv_variants_match_their_definitions(pb, kind):
    """expand/reduce factors against the docstring formulas written with explicit loops over
    samples, locations and cotangents (G from autograd-checked per-layer cotangents)."""
    net, params, x, y, loss = _data(pb)
    p64 = [W.astype(np.float64) for W in params]
    tr = net._forward(p64, x)
    if kind == "exact":
        D = np.moveaxis(loss.hessian_sqrt(tr.out), 2, 0)
    else:
        D = loss.grad(tr.out, y)[None]
    Gs = net._pull(p64, tr, D)
    for conv in ("expand", "reduce"):
        facs = cv.kfac_factors(net, params, x, y, loss, kind=kind, conv=conv)
        for (Af, Gf), k, g in zip(facs, net.trainable_index, Gs):
            A = tr.A[k]
            N, d, T = A.shape
            Aref, Gref = np.zeros((d, d)), np.zeros((g.shape[2],) * 2)
            for n in range(N):
                if conv == "expand":
                    for t in range(T):
                        Aref += np.outer(A[n, :, t], A[n, :, t]) / (N * T)
                        for kk in range(g.shape[0]):
                            Gref += np.outer(g[kk, n, :, t], g[kk, n, :, t]) / N
                else:
                    a_hat = A[n].mean(axis=1)
                    Aref += np.outer(a_hat, a_hat) / N
                    for kk in range(g.shape[0]):
                        gh = g[kk, n].sum(axis=1)
                        Gref += np.outer(gh, gh) / N
            assert_close(Af, Aref, rtol=1e-13)
            assert_close(Gf, Gref, rtol=1e-13, atol=1e-15)


def test_kfac_mc_is_seeded_and_tends_to_exact_kind():
    """kind="mc" is reproducible from its seed, and for a batch of one its G factor is the
    mean of S i.i.d. draws g_s g_sᵀ whose expectation is the kind="exact" factor: checked with
    the CLT standardized-entry test (Bonferroni, family-wise level 1e-3)."""
    pb = Problem((("linear", 3, 4, True), ("act", "tanh"), ("linear", 4, 3, True)), (3,), 3, "cross_entropy", 1, 5)
    net, params, x, y, loss = _data(pb)
    a = cv.kfac_factors(net, params, x, y, loss, kind="mc", n_samples=5, seed=9)
    b = cv.kfac_factors(net, params, x, y, loss, kind="mc", n_samples=5, seed=9)
    for (A1, G1), (A2, G2) in zip(a, b):
        assert np.array_equal(A1, A2) and np.array_equal(G1, G2)
    S = 20000
    exact = cv.kfac_factors(net, params, x, y, loss, kind="exact")
    mc = cv.kfac_factors(net, params, x, y, loss, kind="mc", n_samples=S, seed=1)
    tr = net._forward(params, x)
    D = loss.grad(tr.out[None], loss.sample(tr.out, n_samples=S, seed=np.random.default_rng(1)))
    for (_, Ge), (_, Gm), g in zip(exact, mc, net._pull(params, tr, D)):
        X = np.einsum("so,sp->sop", g[:, 0, :, 0], g[:, 0, :, 0])
        assert_close(Gm, X.mean(axis=0), rtol=1e-13)
        assert_clt(X, Ge)


@given(problems())
def test_gfim_left_right(pb):
    """NG+ (4)-(5): L = (1/N) Σ 𝒢_i 𝒢_iᵀ and R = (1/N) Σ 𝒢_iᵀ 𝒢_i from autograd's gradients."""
    net, params, x, y, loss = _data(pb)
    U = Oracle(pb.spec, pb.loss, x, y).per_sample_grads(rc.flatten(params))
    Gs = rc.unflatten(U, net)
    for side in ("left", "right"):
        for M, g in zip(cv.gfim(net, params, x, y, loss, side=side), Gs):
            ref = np.einsum("nij,nkj->ik", g, g) if side == "left" else np.einsum("nji,njk->ik", g, g)
            assert_close(M, ref / x.shape[0])
    for M, (o, d) in zip(cv.gfim(net, params, x, y, loss), net.param_shapes):
        assert M.shape == ((o, o) if o <= d else (d, d))
