"""Kernels moved onto BLAS in issue 15, each against an independent definition: the
per-sample path or an ``einsum`` of the formula. Tolerances from the tolerance model,
with the summation's condition number ``Σ‖term‖ / ‖Σ term‖`` where terms can cancel."""
import tracemalloc

import numpy as np
import pytest

from refcurv import curvature as cv
from refcurv.linalg import gemm, roots
from refcurv.methods import seng
from refcurv.testing.strategies import Problem
from refcurv.testing.tolerance import rel_err, tolerance

MLP = Problem((("linear", 3, 5, True), ("act", "tanh"), ("linear", 5, 4, True), ("act", "sigmoid"),
               ("linear", 4, 3, True)), (3,), 3, "cross_entropy", 7, 0)
CNN = Problem((("conv", 2, 3, 3, 1, 1, True), ("act", "tanh"), ("flatten",), ("linear", 48, 3, True)),
              (2, 4, 4), 3, "mse", 5, 1)


def _sum_tol(terms, n):
    """Tolerance of a float64 sum of ``terms`` (axis 0) reordered: ``n`` the inner length."""
    cond = float(sum(np.linalg.norm(t) for t in terms) / max(np.linalg.norm(terms.sum(axis=0)), 1e-300))
    return tolerance(n, cond=cond)


@pytest.mark.parametrize("pb", [MLP, CNN], ids=["mlp", "cnn"])
@pytest.mark.parametrize("chunk", [1, 1 << 23], ids=["tiny_chunks", "default_chunks"])
def test_summed_hessian_equals_mean_of_per_sample_hessians(pb, chunk, monkeypatch):
    monkeypatch.setattr(cv, "_HESSIAN_CHUNK_DOUBLES", chunk)
    net, (params, x, y), loss = pb.net, pb.data(), pb.loss_fn
    Hi = cv.hessian(net, params, x, y, loss, per_sample=True)  # the untouched per-sample path
    ref = Hi.mean(axis=0)
    tol = _sum_tol(Hi, pb.N * net.n_params)
    H = cv.hessian(net, params, x, y, loss)
    assert rel_err(H, ref) <= tol
    assert rel_err(H, H.T) <= tol  # symmetric to rounding, not symmetrized
    for B, sl in zip(cv.hessian(net, params, x, y, loss, blocks=True), cv.layer_slices(net)):
        assert rel_err(B, ref[sl, sl]) <= _sum_tol(Hi[:, sl, sl], pb.N * net.n_params)
    # the residual term: hessian = ggn + residual, with the residual summed the same way
    R = cv.hessian_residual(net, params, x, y, loss)
    G = cv.ggn(net, params, x, y, loss)
    assert rel_err(G + R, ref) <= tol * 10


def test_hessian_memory_is_not_n_squared_times_N():
    """n ≈ 1,300, N = 64: the per-sample Hessians would be 64·n² doubles (≈ 0.9 GB); the
    summed R-op needs O(n² + N·n) — asserted below a tenth of that."""
    pb = Problem((("linear", 20, 50, True), ("act", "tanh"), ("linear", 50, 4, True)), (20,), 4, "mse", 64, 2)
    net, (params, x, y), loss = pb.net, pb.data(), pb.loss_fn
    n = net.n_params
    tracemalloc.start()
    H = cv.hessian(net, params, x, y, loss)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert H.shape == (n, n)
    assert peak < 0.1 * pb.N * n * n * 8, (peak, n)


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("d,o", [(4, 3), (2, 30), (8, 8)])  # (8, 8), T = 6: the location-Gram form
def test_kron_gram_both_forms_equal_the_per_sample_gram(T, d, o):
    rng = np.random.default_rng(T * d)
    N = 5
    a, g = rng.standard_normal((N, d, T)), rng.standard_normal((N, o, T))
    U = np.einsum("iot,idt->iod", g, a).reshape(N, -1)
    terms = np.einsum("ip,jp->pij", U, U)
    assert rel_err(gemm.kron_gram(a, g), U @ U.T) <= _sum_tol(terms, o * d * T)
    location_form = N * T * T * (d + o) <= N * o * d * (T + N)  # the branch kron_gram takes
    assert location_form == ((d, o) == (8, 8) or T == 1)


def test_factor_sum_and_outer_sum_match_their_einsum_definitions():
    rng = np.random.default_rng(3)
    g, a = rng.standard_normal((2, 6, 3, 4)), rng.standard_normal((6, 5, 4))
    ref = np.einsum("knot,ndt->kod", g, a)
    assert rel_err(gemm.factor_sum(g, a), ref) <= _sum_tol(np.einsum("knot,ndt->ntkod", g, a).reshape(24, 2, 3, 5), 24)
    ref = np.einsum("knot,knpt->op", g, g)
    assert rel_err(gemm.outer_sum(g), ref) <= tolerance(48)  # a sum of PSD terms: cond 1
    b = rng.standard_normal((6, 5, 4))
    assert rel_err(gemm.outer_sum(a, b), np.einsum("ndt,net->de", a, b)) <= _sum_tol(
        np.einsum("ndt,net->ntde", a, b).reshape(24, 5, 5), 24)


def test_seng_sketched_gram_and_utz_match_the_einsum_definitions():
    rng = np.random.default_rng(4)
    XiA, XiG = rng.standard_normal((3, 6, 4, 5)), rng.standard_normal((3, 6, 2, 5))  # workers, ϱ, ζ, r
    KA = np.einsum("...iar,...jas->...ijrs", XiA, XiA)
    KG = np.einsum("...igr,...jgs->...ijrs", XiG, XiG)
    ref = (KA * KG).sum(axis=(-2, -1))
    U = np.einsum("wigr,wiar->wiga", XiG, XiA).reshape(3, 6, -1)
    assert rel_err(seng.sketched_UtU(XiA, XiG), ref) <= _sum_tol(np.einsum("wip,wjp->pwij", U, U), 8 * 25)
    assert rel_err(seng.sketched_UtU(XiA[0], XiG[0]), ref[0]) <= _sum_tol(np.einsum("ip,jp->pij", U[0], U[0]), 200)
    Z = rng.standard_normal((2, 4))
    ref = (np.einsum("ga,igr->iar", Z, XiG[0]) * XiA[0]).sum(axis=(1, 2))
    assert rel_err(seng.sketched_Utz(XiA[0], XiG[0], Z), ref) <= tolerance(40, cond=float(
        np.abs(U[0] * Z.ravel()).sum() / np.abs(ref).sum()))


def test_newton_root_lambda_max_and_spd_check():
    rng = np.random.default_rng(5)
    B = rng.standard_normal((30, 30))
    A = B @ B.T + 0.1 * np.eye(30)
    w = np.linalg.eigvalsh(A)
    assert abs(roots._lambda_max(A) - w[-1]) <= tolerance(30) * w[-1]
    X, rep = roots.inv_root_newton(A, 4, tol=1e-10)
    assert rep.converged
    ref = roots.inv_root_eigh(A, 4)
    # the stopping rule max|M − I| ≤ tol bounds the relative error by about tol/p (module docs)
    assert rel_err(X, ref) <= 1e-8
    from refcurv.errors import NotSPDError

    with pytest.raises(NotSPDError, match="A must be positive definite"):
        roots.inv_root_newton(-A, 2)


def test_spd_inverse_by_potri_and_its_fallbacks():
    from refcurv.errors import NotSPDError
    from refcurv.linalg.woodbury import _spd_inverse

    rng = np.random.default_rng(6)
    B = rng.standard_normal((40, 40))
    A = B @ B.T + 0.5 * np.eye(40)
    cond = float(np.linalg.cond(A))
    X = _spd_inverse(A)
    assert np.array_equal(X, X.T)
    assert rel_err(X, np.linalg.inv(A)) <= tolerance(40, cond=cond)
    X32 = _spd_inverse(A.astype(np.float32))
    assert X32.dtype == np.float32 and rel_err(X32, np.linalg.inv(A)) <= tolerance(40, cond=cond, dtype=np.float32)
    with pytest.raises(NotSPDError, match="M is not positive definite"):
        _spd_inverse(-A, "M")


@pytest.mark.parametrize("pb", [MLP, CNN], ids=["mlp", "cnn"])
def test_flat_per_sample_grads_equal_the_per_layer_ones(pb):
    """The flat (N, n) array is written in place by layer; it must hold exactly the per-layer
    products (the same arithmetic, so equal to the last bit), also with sampled-label axes."""
    net, (params, x, y), loss = pb.net, pb.data(), pb.loss_fn
    ref = np.concatenate([u.reshape(pb.N, -1) for u in net.per_sample_grads(params, x, y, loss)], axis=1)
    assert np.array_equal(cv.per_sample_grads(net, params, x, y, loss), ref)
    F = cv.fisher(net, params, x, loss=loss, kind="mc", n_samples=3, seed=1)
    labels = loss.sample(net.forward(params, x), n_samples=3, seed=np.random.default_rng(1))
    U = np.stack([np.concatenate([u.reshape(pb.N, -1) for u in net.per_sample_grads(params, x, yl, loss)], axis=1)
                  for yl in labels])
    terms = np.einsum("snp,snq->snpq", U, U).reshape(3 * pb.N, net.n_params, net.n_params)
    assert rel_err(F, terms.mean(axis=0)) <= _sum_tol(terms, 3 * pb.N)
