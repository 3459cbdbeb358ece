"""Per-sample losses ``ψ_i = ℓ(f_i, y_i)`` on network outputs ``f in R^{N x C}``.

Each loss is the negative log-likelihood of a predictive distribution ``p(y | f)``
(thesis Ch.1 §1.2.2), so that the output Hessian equals the Fisher of that
distribution and GGN = Fisher (a test, not an assumption):

========================  ==============================  ===============================
loss                      ``ℓ(f, y)``                     ``p(y | f)``
========================  ==============================  ===============================
``MSE``                   ``½‖f − y‖²``                   ``N(f, I)``
``CrossEntropy``          ``logsumexp(f) − f_y``          categorical, ``softmax(f)``
``BCE``                   ``Σ_j softplus(f_j) − y_j f_j`` independent Bernoulli ``σ(f_j)``
========================  ==============================  ===============================

Methods (all vectorized over the batch):
``value`` (N,), ``grad`` ``∂ℓ/∂f`` (N, C), ``hessian`` ``∂²ℓ/∂f²`` (N, C, C),
``hessian_sqrt`` ``B`` with ``B Bᵀ = ∂²ℓ/∂f²`` (N, C, C), ``hvp`` (…, N, C),
``sample(f, n_samples, seed)`` labels from ``p(y | f)``, and ``fisher_output(f)`` =
``E_{y ~ p(·|f)}[∇_f ℓ ∇_f ℓᵀ]`` computed as an expectation over labels (by
enumeration of the label space for CE and BCE, from the Gaussian's second moment
for MSE) — a route independent of ``hessian``.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..backend import asarray_like, rng_of, to_numpy, xp_of
from ..errors import HyperParameterError, LabelError, NonFiniteError, ShapeError
from .layers import sigmoid, sigmoid_d1


def _check_outputs(f):
    if f.ndim != 2:
        raise ShapeError(f"network output f must be 2-D (N, C), got shape {f.shape}")


def _check_finite(a, name):
    if not bool(xp_of(a).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")


def _real_targets(y, f, loss_name, kinds):
    """Targets of the output's shape, numeric of a dtype kind in ``kinds``, finite; cast to ``f``'s dtype."""
    y = xp_of(f).asarray(y)
    if y.shape != f.shape:
        raise ShapeError(f"y for {loss_name} must have the output shape {f.shape}, got {y.shape}")
    if y.dtype.kind not in kinds:
        raise LabelError(f"y for {loss_name} must be real-valued, got dtype {y.dtype}")
    y = y.astype(f.dtype)
    _check_finite(y, "y")
    return y


def _check_n_samples(n_samples):
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise HyperParameterError(f"n_samples must be a positive int, got {n_samples!r}")


class MSE:
    """``ψ = ½‖f − y‖²`` per sample (sum over outputs, no 1/C); output Hessian ``I``."""

    name = "mse"

    def check_targets(self, y, f):
        return _real_targets(y, f, "MSE", "fiu")

    def value(self, f, y):
        r = f - y
        return 0.5 * (r * r).sum(axis=-1)

    def grad(self, f, y):
        return f - y

    def hessian(self, f):
        xp = xp_of(f)
        return xp.broadcast_to(xp.eye(f.shape[-1], dtype=f.dtype), f.shape + (f.shape[-1],)).copy()

    def hessian_sqrt(self, f):
        return self.hessian(f)

    def hvp(self, f, v):
        return v + 0 * f

    def sample(self, f, n_samples=1, seed=None):
        """``y = f + ε``, ``ε ~ N(0, I)`` drawn on the host: returns ``(n_samples, N, C)``."""
        _check_n_samples(n_samples)
        eps = rng_of(seed).standard_normal((n_samples,) + tuple(f.shape))
        return f + asarray_like(eps, f, dtype=f.dtype)

    def fisher_output(self, f):
        """``E[(f − y)(f − y)ᵀ] = Cov(ε) = I`` for ``y ~ N(f, I)``."""
        return self.hessian(f)


class CrossEntropy:
    """Softmax cross-entropy with integer labels: ``ψ = logsumexp(f) − f_y``.

    Output Hessian ``diag(p) − p pᵀ``, ``p = softmax(f)`` (thesis (1.6), sign fixed:
    see docs/errata.md).
    """

    name = "cross_entropy"

    def check_targets(self, y, f):
        xp = xp_of(f)
        y = xp.asarray(y)
        N, C = f.shape
        if y.shape != (N,):
            raise ShapeError(f"y for CrossEntropy must be integer labels of shape ({N},), got {y.shape}")
        if y.dtype.kind not in "iu":
            raise LabelError(f"y for CrossEntropy must have an integer dtype, got {y.dtype}")
        if N and (int(y.min()) < 0 or int(y.max()) >= C):
            raise LabelError(f"y labels must lie in [0, {C}), got range [{int(y.min())}, {int(y.max())}]")
        return y

    @staticmethod
    def probs(f):
        xp = xp_of(f)
        z = f - f.max(axis=-1, keepdims=True)
        e = xp.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    @staticmethod
    def _onehot(y, f):
        xp = xp_of(f)
        return (y[..., None] == xp.arange(f.shape[-1])).astype(f.dtype)

    def value(self, f, y):
        xp = xp_of(f)
        m = f.max(axis=-1)
        lse = m + xp.log(xp.exp(f - m[..., None]).sum(axis=-1))
        return lse - (f * self._onehot(y, f)).sum(axis=-1)

    def grad(self, f, y):
        return self.probs(f) - self._onehot(y, f)

    @staticmethod
    def _probs_and_complements(f):
        """``p = softmax(f)`` and ``q = 1 − p`` computed as ``Σ_{j≠i} p_j`` (sums of
        positive terms), so ``p_i q_i`` stays accurate when ``p_i ≈ 1``."""
        xp = xp_of(f)
        e = xp.exp(f - f.max(axis=-1, keepdims=True))
        S = e.sum(axis=-1, keepdims=True)
        C = f.shape[-1]
        off = 1 - xp.eye(C, dtype=f.dtype)
        return e / S, (e @ off) / S

    def hessian(self, f):
        xp = xp_of(f)
        p, q = self._probs_and_complements(f)
        H = -p[..., :, None] * p[..., None, :]
        idx = xp.arange(f.shape[-1])
        H[..., idx, idx] = p * q
        return H

    def hessian_sqrt(self, f):
        """``B = diag(√p) − p √pᵀ`` (diagonal ``√p_i q_i``); ``B Bᵀ = diag(p) − p pᵀ`` because ``Σ p = 1``."""
        xp = xp_of(f)
        p, q = self._probs_and_complements(f)
        r = xp.sqrt(p)
        B = -p[..., :, None] * r[..., None, :]
        idx = xp.arange(f.shape[-1])
        B[..., idx, idx] = r * q
        return B

    def hvp(self, f, v):
        """``(diag(p) − p pᵀ) v = p ⊙ (v − pᵀv)`` with ``v_i − pᵀv = Σ_j p_j (v_i − v_j)``
        (no cancellation when one ``p_i ≈ 1``)."""
        p = self.probs(f)
        diff = v[..., :, None] - v[..., None, :]
        return p * (diff * p[..., None, :]).sum(axis=-1)

    def sample(self, f, n_samples=1, seed=None):
        """Labels ``y ~ Categorical(softmax(f))`` by inverse CDF of host uniforms: ``(n_samples, N)``."""
        _check_n_samples(n_samples)
        p = to_numpy(self.probs(f)).astype(np.float64)
        u = rng_of(seed).random((n_samples, p.shape[0]))
        cdf = np.cumsum(p, axis=-1)
        labels = np.minimum((u[..., None] >= cdf).sum(axis=-1), p.shape[-1] - 1)
        return asarray_like(labels.astype(np.int64), f)

    def fisher_output(self, f):
        """``Σ_y p_y (p − e_y)(p − e_y)ᵀ``, enumerating the ``C`` labels (with
        ``p_y − 1 = −q_y`` taken from the accurate complement)."""
        xp = xp_of(f)
        C = f.shape[-1]
        p, q = self._probs_and_complements(f)
        r = xp.broadcast_to(p[:, None, :], (p.shape[0], C, C)).copy()  # (N, y, C): ∇ℓ for label y
        idx = xp.arange(C)
        r[:, idx, idx] = -q
        return xp.einsum("ny,nyc,nyd->ncd", p, r, r)


class BCE:
    """Sigmoid binary cross-entropy on logits, summed over outputs:
    ``ψ = Σ_j softplus(f_j) − y_j f_j`` with targets ``y in [0, 1]^C``.

    Output Hessian ``diag(σ(f)(1 − σ(f)))`` (thesis (1.5) states ``diag(σ(f))``: see
    docs/errata.md).
    """

    name = "bce"
    #: label vectors are enumerated exactly up to this many outputs (2^C of them)
    max_enumerated_outputs = 12

    def check_targets(self, y, f):
        y = _real_targets(y, f, "BCE", "fiub")
        if y.size and (float(y.min()) < 0 or float(y.max()) > 1):
            raise LabelError("y for BCE must lie in [0, 1]")
        return y

    def value(self, f, y):
        return (xp_of(f).logaddexp(0, f) - y * f).sum(axis=-1)

    def grad(self, f, y):
        return sigmoid(f) - y

    def hessian(self, f):
        xp = xp_of(f)
        return sigmoid_d1(f)[..., :, None] * xp.eye(f.shape[-1], dtype=f.dtype)

    def hessian_sqrt(self, f):
        xp = xp_of(f)
        return xp.sqrt(sigmoid_d1(f))[..., :, None] * xp.eye(f.shape[-1], dtype=f.dtype)

    def hvp(self, f, v):
        return sigmoid_d1(f) * v

    def sample(self, f, n_samples=1, seed=None):
        """``y_j ~ Bernoulli(σ(f_j))`` independently: ``(n_samples, N, C)`` of 0/1 floats."""
        _check_n_samples(n_samples)
        s = to_numpy(sigmoid(f)).astype(np.float64)
        u = rng_of(seed).random((n_samples,) + s.shape)
        return asarray_like((u < s).astype(np.float64), f, dtype=f.dtype)

    def fisher_output(self, f):
        """``E[(σ − y)(σ − y)ᵀ]`` over ``y ~ Bernoulli(σ)^C``: by enumerating all ``2^C``
        label vectors when ``C <= max_enumerated_outputs``, otherwise from independence
        (zero off-diagonal, ``σ(1 − σ)`` on the diagonal)."""
        xp = xp_of(f)
        C = f.shape[-1]
        if C > self.max_enumerated_outputs:
            return sigmoid_d1(f)[..., :, None] * xp.eye(C, dtype=f.dtype)
        s, sm = sigmoid(f)[:, None, :], sigmoid(-f)[:, None, :]  # σ(f), 1 − σ(f) = σ(−f)
        Y = asarray_like(np.array(list(itertools.product((0.0, 1.0), repeat=C))), f, dtype=f.dtype)[None]
        prob = xp.prod(xp.where(Y > 0, s, sm), axis=-1)  # (N, 2^C)
        r = xp.where(Y > 0, -sm, s)  # σ − y
        return xp.einsum("nk,nkc,nkd->ncd", prob, r, r)


LOSSES = {"mse": MSE, "cross_entropy": CrossEntropy, "bce": BCE}
