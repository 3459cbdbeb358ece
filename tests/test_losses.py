"""Losses: derivatives vs autograd, Hessian square roots, label expectation (Fisher) vs
Hessian, and sampling from the predictive distribution (CLT-bounded frequency tests)."""
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import elementwise_grad, hessian
from hypothesis import given
from hypothesis import strategies as st
from oracle import per_sample_loss
from scipy.stats import norm
from refcurv.testing.tolerance import assert_close

from refcurv.nn import BCE, MSE, CrossEntropy

LOSSES = {"mse": MSE(), "cross_entropy": CrossEntropy(), "bce": BCE()}


@st.composite
def outputs(draw, loss):
    N = draw(st.integers(1, 4))
    C = draw(st.integers(2 if loss == "cross_entropy" else 1, 5))
    # autograd's own derivatives of softplus/logsumexp lose relative accuracy like
    # eps·e^{|f|} at large logits, so the oracle comparison stays at moderate scales;
    # extreme logits are checked against 50-digit arithmetic below.
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    f = scale * rng.standard_normal((N, C))
    if loss == "mse":
        y = rng.standard_normal((N, C))
    elif loss == "cross_entropy":
        y = rng.integers(0, C, size=N)
    else:
        y = rng.random((N, C))
    return f, y


@pytest.mark.parametrize("name", list(LOSSES))
@given(data=st.data())
def test_loss_derivatives_match_autograd(name, data):
    f, y = data.draw(outputs(name))
    loss = LOSSES[name]
    y = loss.check_targets(y, f)
    total = lambda F: anp.sum(per_sample_loss(name, F, y))  # noqa: E731
    assert_close(loss.value(f, y), per_sample_loss(name, f, y), rtol=1e-13)
    assert_close(loss.grad(f, y), elementwise_grad(total)(f), rtol=1e-12)
    N, C = f.shape
    H = hessian(total)(f).reshape(N, C, N, C)[np.arange(N), :, np.arange(N), :]
    assert_close(loss.hessian(f), H, rtol=1e-12, atol=1e-15)
    B = loss.hessian_sqrt(f)
    assert_close(np.einsum("nij,nkj->nik", B, B), H, rtol=1e-12, atol=1e-15)
    v = np.random.default_rng(0).standard_normal((3, N, C))
    assert_close(loss.hvp(f, v), np.einsum("nij,knj->kni", H, v), rtol=1e-12, atol=1e-15)
    # label expectation of ∇ℓ∇ℓᵀ (computed by enumeration) equals the output Hessian
    assert_close(loss.fisher_output(f), H, rtol=1e-12, atol=1e-15)


def test_extreme_logits_match_high_precision():
    """σ'(f), the CE Hessian and the label-expectation Fisher at logits up to 40 agree with
    50-digit decimal arithmetic entry by entry to a few ulps (relative 1e-13)."""
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    f = np.array([[13.82336768, 32.86472574, -25.0, 0.3]])
    ref = np.array([[float((-Decimal(abs(v))).exp() / (1 + (-Decimal(abs(v))).exp()) ** 2) for v in f[0]]])
    for M in (BCE().hessian(f), BCE().fisher_output(f)):
        assert np.all(np.abs(np.diagonal(M, axis1=1, axis2=2) - ref) <= 1e-13 * ref)
    e = [Decimal(v).exp() for v in f[0]]
    S = sum(e)
    p = [x / S for x in e]
    Href = np.array([[float(p[i] * ((1 if i == j else 0) - p[j])) for j in range(4)] for i in range(4)])
    for M in (CrossEntropy().hessian(f)[0], CrossEntropy().fisher_output(f)[0]):
        assert np.all(np.abs(M - Href) <= 1e-13 * np.abs(Href))


def test_values_are_finite_for_extreme_logits():
    f = np.array([[800.0, -800.0, 0.0]])
    assert np.isfinite(CrossEntropy().value(f, np.array([1]))).all()
    assert np.isfinite(BCE().value(f, np.array([[0.0, 1.0, 0.5]]))).all()
    assert np.isfinite(CrossEntropy().hessian(f)).all() and np.isfinite(BCE().hessian(f)).all()


def test_bce_fisher_output_without_enumeration_matches():
    rng = np.random.default_rng(1)
    loss = BCE()
    f = rng.standard_normal((2, 14))  # above max_enumerated_outputs: independence formula
    assert_close(loss.fisher_output(f), loss.hessian(f), rtol=1e-14)


def _z_bound(k, level=1e-3):
    return norm.ppf(1 - level / (2 * k))


def test_cross_entropy_sampling_frequencies():
    f = np.array([[0.0, 1.0, -1.0, 2.0], [3.0, 0.0, 0.0, -2.0]])
    S = 20000
    ys = CrossEntropy().sample(f, n_samples=S, seed=0)
    assert ys.shape == (S, 2) and ys.dtype.kind == "i"
    p = CrossEntropy.probs(f)
    freq = (ys[..., None] == np.arange(4)).mean(axis=0)
    z = np.abs(freq - p) / np.sqrt(p * (1 - p) / S)
    assert z.max() <= _z_bound(p.size)
    assert np.array_equal(ys, CrossEntropy().sample(f, n_samples=S, seed=0))


def test_bce_sampling_frequencies():
    f = np.array([[0.0, 2.0, -1.5]])
    S = 20000
    ys = BCE().sample(f, n_samples=S, seed=1)
    s = 1 / (1 + np.exp(-f))
    z = np.abs(ys.mean(axis=0) - s) / np.sqrt(s * (1 - s) / S)
    assert set(np.unique(ys)) <= {0.0, 1.0} and z.max() <= _z_bound(s.size)


def test_mse_sampling_moments():
    f = np.array([[0.5, -1.0], [2.0, 0.0]])
    S = 20000
    ys = MSE().sample(f, n_samples=S, seed=2)
    z = np.abs(ys.mean(axis=0) - f) / np.sqrt(1.0 / S)
    assert z.max() <= _z_bound(f.size)
    # unit variance: sample variance of N(0,1) has sd ≈ sqrt(2/S)
    zv = np.abs(ys.var(axis=0, ddof=1) - 1) / np.sqrt(2.0 / S)
    assert zv.max() <= _z_bound(f.size)
