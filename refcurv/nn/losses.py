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
from ..errors import (
    ArgumentTypeError,
    EmptyBatchError,
    HyperParameterError,
    LabelError,
    NonFiniteError,
    ShapeError,
)
from ._checks import describe, finite_array, finite_result, quiet
from .layers import sigmoid, sigmoid_d1


def _outputs(f, exact_2d=False):
    """Network outputs ``f``: a finite real array ``(..., N, C)`` (exactly ``(N, C)`` or, for a
    sequence, ``(N, T, C)`` if ``exact_2d``) with ``N, C >= 1``; integer arrays are converted
    to float64."""
    f = finite_array(f, "f")
    if (f.ndim not in (2, 3)) if exact_2d else (f.ndim < 2):
        want = "(N, C) or (N, T, C)" if exact_2d else "at least 2-D (N, C)"
        raise ShapeError(f"network output f must be {want}, got shape {f.shape}")
    if f.shape[-2] == 0:
        raise EmptyBatchError(f"network output f is an empty batch (N = 0), shape {f.shape}")
    if f.shape[-1] == 0:
        raise ShapeError(f"network output f has no outputs (C = 0), shape {f.shape}")
    return f


def _asarray(y, f, name):
    try:
        return xp_of(f).asarray(y)
    except (TypeError, ValueError):
        raise LabelError(f"{name} must be a numeric array, got {describe(y)}") from None


def _check_outputs(f):
    _outputs(f, exact_2d=True)


def _check_finite(a, name):
    if not bool(xp_of(a).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")


def _broadcastable(a, shape, name, want):
    try:
        np.broadcast_shapes(tuple(a.shape), tuple(shape))
    except ValueError:
        raise ShapeError(f"{name} must broadcast against {want} {tuple(shape)}, got shape {tuple(a.shape)}") from None


def _real_targets(y, f, loss_name, kinds):
    """Targets of the output's shape, numeric of a dtype kind in ``kinds``, finite; cast to ``f``'s dtype."""
    _check_outputs(f)
    y = _asarray(y, f, "y")
    if y.shape != f.shape:
        raise ShapeError(f"y for {loss_name} must have the output shape {f.shape}, got {y.shape}")
    if y.dtype.kind not in kinds:
        raise LabelError(f"y for {loss_name} must be real-valued, got dtype {y.dtype}")
    y = y.astype(f.dtype)
    _check_finite(y, "y")
    return y


class _Loss:
    """The public methods of every loss: each validates its arguments (finite real outputs
    ``f`` of shape ``(..., N, C)``, targets, tangents), runs the loss's formula (the
    underscored method) and refuses a non-finite result with
    :class:`~refcurv.errors.NonFiniteError` naming the quantity."""

    name = ""

    def _targets_like(self, y, f):  # pragma: no cover - every loss defines it
        raise NotImplementedError

    def _run(self, what, fn, *args):
        with quiet():
            out = fn(*args)
        return finite_result(out, f"{type(self).__name__}.{what}")

    def value(self, f, y):
        """Per-sample losses ``ψ`` of shape ``(..., N)``."""
        f = _outputs(f)
        return self._run("value", self._value, f, self._targets_like(y, f))

    def grad(self, f, y):
        """``∂ℓ/∂f``, the shape of ``f``."""
        f = _outputs(f)
        return self._run("grad", self._grad, f, self._targets_like(y, f))

    def hessian(self, f):
        """``∂²ℓ/∂f²`` of shape ``(..., N, C, C)``."""
        return self._run("hessian", self._hessian, _outputs(f))

    def hessian_sqrt(self, f):
        """``B`` with ``B Bᵀ = ∂²ℓ/∂f²``, ``(..., N, C, C)``."""
        return self._run("hessian_sqrt", self._hessian_sqrt, _outputs(f))

    def hvp(self, f, v):
        """``∂²ℓ/∂f² v`` for tangents ``v`` of shape ``(..., N, C)`` (broadcast against ``f``)."""
        f = _outputs(f)
        v = finite_array(v, "v", min_ndim=1)
        _broadcastable(v, f.shape, "v", "the output shape")
        return self._run("hvp", self._hvp, f, v)

    def sample(self, f, n_samples=1, seed=None):
        """Targets drawn from ``p(y | f)``, ``(n_samples, N, …)``; for a sequence output
        ``f`` ``(N, T, C)`` one target per position, ``(n_samples, N, T, …)``, drawn as for
        ``N·T`` outputs in row-major ``(N, T)`` order."""
        f = _outputs(f, exact_2d=True)
        _check_n_samples(n_samples)
        if f.ndim == 3:
            N, T, C = f.shape
            ys = self._run("sample", self._sample, f.reshape(N * T, C), n_samples, seed)
            return ys.reshape((n_samples, N, T) + tuple(ys.shape[2:]))
        return self._run("sample", self._sample, f, n_samples, seed)

    def fisher_output(self, f):
        """``E_{y ~ p(·|f)}[∇_f ℓ ∇_f ℓᵀ]``, ``(N, C, C)``; per position ``(N, T, C, C)`` for
        a sequence output ``(N, T, C)``."""
        f = _outputs(f, exact_2d=True)
        if f.ndim == 3:
            N, T, C = f.shape
            F = self._run("fisher_output", self._fisher_output, f.reshape(N * T, C))
            return F.reshape(N, T, C, C)
        return self._run("fisher_output", self._fisher_output, f)


def _real_targets_like(y, f, loss_name, kinds):
    """Targets for :meth:`value`/:meth:`grad`: real of a kind in ``kinds``, finite,
    broadcasting against ``f``; non-floating targets are cast to ``f``'s dtype."""
    y = _asarray(y, f, "y")
    if y.dtype.kind not in kinds:
        raise LabelError(f"y for {loss_name} must be real-valued, got dtype {y.dtype}")
    if y.dtype.kind != "f":
        y = y.astype(f.dtype)
    _check_finite(y, "y")
    _broadcastable(y, f.shape, "y", "the output shape")
    return y


def check_loss(loss, name="loss"):
    """Refuse anything but a refcurv loss instance (:class:`MSE`, :class:`CrossEntropy`,
    :class:`BCE`, or an object with their interface) with :class:`ArgumentTypeError`."""
    if isinstance(loss, type):
        raise ArgumentTypeError(f"{name} must be a loss instance such as refcurv.nn.MSE(), got the class {loss.__name__}")
    if isinstance(loss, _Loss) or all(
            callable(getattr(loss, a, None)) for a in ("value", "grad", "hvp", "check_targets", "sample")):
        return loss
    raise ArgumentTypeError(
        f"{name} must be a refcurv loss (refcurv.nn.MSE, CrossEntropy, BCE), got {describe(loss)}")


def _check_n_samples(n_samples):
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise HyperParameterError(f"n_samples must be a positive int, got {n_samples!r}")


class MSE(_Loss):
    """``ψ = ½‖f − y‖²`` per sample (sum over outputs, no 1/C); output Hessian ``I``."""

    name = "mse"

    def check_targets(self, y, f):
        return _real_targets(y, f, "MSE", "fiu")

    def _targets_like(self, y, f):
        return _real_targets_like(y, f, "MSE", "fiu")

    def _value(self, f, y):
        r = f - y
        return 0.5 * (r * r).sum(axis=-1)

    def _grad(self, f, y):
        return f - y

    def _hessian(self, f):
        xp = xp_of(f)
        return xp.broadcast_to(xp.eye(f.shape[-1], dtype=f.dtype), f.shape + (f.shape[-1],)).copy()

    def _hessian_sqrt(self, f):
        return self._hessian(f)

    def _hvp(self, f, v):
        return v + 0 * f

    def _sample(self, f, n_samples=1, seed=None):
        """``y = f + ε``, ``ε ~ N(0, I)`` drawn on the host: returns ``(n_samples, N, C)``."""
        eps = rng_of(seed).standard_normal((n_samples,) + tuple(f.shape))
        return f + asarray_like(eps, f, dtype=f.dtype)

    def _fisher_output(self, f):
        """``E[(f − y)(f − y)ᵀ] = Cov(ε) = I`` for ``y ~ N(f, I)``."""
        return self._hessian(f)


class CrossEntropy(_Loss):
    """Softmax cross-entropy with integer labels: ``ψ = logsumexp(f) − f_y``.

    Output Hessian ``diag(p) − p pᵀ``, ``p = softmax(f)`` (thesis (1.6), sign fixed:
    see docs/errata.md).
    """

    name = "cross_entropy"

    def check_targets(self, y, f):
        f = _outputs(f, exact_2d=True)
        y = _asarray(y, f, "y")
        C = f.shape[-1]
        if y.shape != f.shape[:-1]:
            raise ShapeError(f"y for CrossEntropy must be integer labels of shape {tuple(f.shape[:-1])}, got {y.shape}")
        N = y.size
        if y.dtype.kind not in "iu":
            raise LabelError(f"y for CrossEntropy must have an integer dtype, got {y.dtype}")
        if N and (int(y.min()) < 0 or int(y.max()) >= C):
            raise LabelError(f"y labels must lie in [0, {C}), got range [{int(y.min())}, {int(y.max())}]")
        return y

    def _targets_like(self, y, f):
        y = _asarray(y, f, "y")
        C = f.shape[-1]
        if y.dtype.kind not in "iu":
            raise LabelError(f"y for CrossEntropy must have an integer dtype, got {y.dtype}")
        _broadcastable(y, f.shape[:-1], "y", "the batch shape of f")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= C):
            raise LabelError(f"y labels must lie in [0, {C}), got range [{int(y.min())}, {int(y.max())}]")
        return y

    @staticmethod
    def probs(f):
        """``softmax(f)`` over the last axis."""
        f = _outputs(f)
        with quiet():
            out = CrossEntropy._probs(f)
        return finite_result(out, "CrossEntropy.probs")

    @staticmethod
    def _probs(f):
        xp = xp_of(f)
        z = f - f.max(axis=-1, keepdims=True)
        e = xp.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    @staticmethod
    def _onehot(y, f):
        xp = xp_of(f)
        return (y[..., None] == xp.arange(f.shape[-1])).astype(f.dtype)

    def _value(self, f, y):
        xp = xp_of(f)
        m = f.max(axis=-1)
        lse = m + xp.log(xp.exp(f - m[..., None]).sum(axis=-1))
        return lse - (f * self._onehot(y, f)).sum(axis=-1)

    def _grad(self, f, y):
        return self._probs(f) - self._onehot(y, f)

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

    def _hessian(self, f):
        xp = xp_of(f)
        p, q = self._probs_and_complements(f)
        H = -p[..., :, None] * p[..., None, :]
        idx = xp.arange(f.shape[-1])
        H[..., idx, idx] = p * q
        return H

    def _hessian_sqrt(self, f):
        """``B = diag(√p) − p √pᵀ`` (diagonal ``√p_i q_i``); ``B Bᵀ = diag(p) − p pᵀ`` because ``Σ p = 1``."""
        xp = xp_of(f)
        p, q = self._probs_and_complements(f)
        r = xp.sqrt(p)
        B = -p[..., :, None] * r[..., None, :]
        idx = xp.arange(f.shape[-1])
        B[..., idx, idx] = r * q
        return B

    def _hvp(self, f, v):
        """``(diag(p) − p pᵀ) v = p ⊙ (v − pᵀv)`` with ``v_i − pᵀv = Σ_j p_j (v_i − v_j)``
        (no cancellation when one ``p_i ≈ 1``)."""
        p = self._probs(f)
        diff = v[..., :, None] - v[..., None, :]
        return p * (diff * p[..., None, :]).sum(axis=-1)

    def _sample(self, f, n_samples=1, seed=None):  # host: labels are drawn on the host (design §6)
        """Labels ``y ~ Categorical(softmax(f))`` by inverse CDF of host uniforms: ``(n_samples, N)``
        (drawn on the host so CPU and GPU runs see the same labels, design §6; moved to ``f``'s
        backend)."""
        p = to_numpy(self._probs(f)).astype(np.float64)
        u = rng_of(seed).random((n_samples, p.shape[0]))
        cdf = np.cumsum(p, axis=-1)
        labels = np.minimum((u[..., None] >= cdf).sum(axis=-1), p.shape[-1] - 1)
        return asarray_like(labels.astype(np.int64), f)

    def _fisher_output(self, f):
        """``Σ_y p_y (p − e_y)(p − e_y)ᵀ``, enumerating the ``C`` labels (with
        ``p_y − 1 = −q_y`` taken from the accurate complement)."""
        xp = xp_of(f)
        C = f.shape[-1]
        p, q = self._probs_and_complements(f)
        r = xp.broadcast_to(p[:, None, :], (p.shape[0], C, C)).copy()  # (N, y, C): ∇ℓ for label y
        idx = xp.arange(C)
        r[:, idx, idx] = -q
        return xp.einsum("ny,nyc,nyd->ncd", p, r, r)


class BCE(_Loss):
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

    def _targets_like(self, y, f):
        y = _real_targets_like(y, f, "BCE", "fiub")
        if y.size and (float(y.min()) < 0 or float(y.max()) > 1):
            raise LabelError("y for BCE must lie in [0, 1]")
        return y

    def _value(self, f, y):
        return (xp_of(f).logaddexp(0, f) - y * f).sum(axis=-1)

    def _grad(self, f, y):
        return sigmoid(f) - y

    def _hessian(self, f):
        xp = xp_of(f)
        return sigmoid_d1(f)[..., :, None] * xp.eye(f.shape[-1], dtype=f.dtype)

    def _hessian_sqrt(self, f):
        xp = xp_of(f)
        return xp.sqrt(sigmoid_d1(f))[..., :, None] * xp.eye(f.shape[-1], dtype=f.dtype)

    def _hvp(self, f, v):
        return sigmoid_d1(f) * v

    def _sample(self, f, n_samples=1, seed=None):
        """``y_j ~ Bernoulli(σ(f_j))`` independently: ``(n_samples, N, C)`` of 0/1 floats."""
        s = to_numpy(sigmoid(f)).astype(np.float64)
        u = rng_of(seed).random((n_samples,) + s.shape)
        return asarray_like((u < s).astype(np.float64), f, dtype=f.dtype)

    def _fisher_output(self, f):
        """``E[(σ − y)(σ − y)ᵀ]`` over ``y ~ Bernoulli(σ)^C``: by enumerating all ``2^C``
        label vectors when ``C <= max_enumerated_outputs``, otherwise from independence
        (zero off-diagonal, ``σ(1 − σ)`` on the diagonal)."""
        xp = xp_of(f)
        C = f.shape[-1]
        if C > self.max_enumerated_outputs:
            return sigmoid_d1(f)[..., :, None] * xp.eye(C, dtype=f.dtype)
        s, sm = sigmoid(f)[:, None, :], sigmoid(-f)[:, None, :]  # σ(f), 1 − σ(f) = σ(−f)
        Y = asarray_like(list(itertools.product((0.0, 1.0), repeat=C)), f, dtype=f.dtype)[None]
        prob = xp.prod(xp.where(Y > 0, s, sm), axis=-1)  # (N, 2^C)
        r = xp.where(Y > 0, -sm, s)  # σ − y
        return xp.einsum("nk,nkc,nkd->ncd", prob, r, r)


LOSSES = {"mse": MSE, "cross_entropy": CrossEntropy, "bce": BCE}


# ------------------------------------------------------------------ sequence outputs
def _over_positions(loss, out_shape):
    """The loss of a network whose output has feature shape ``out_shape``: ``loss`` itself for
    ``(C,)``; for a sequence output ``(T, C)`` the per-sample loss summed over positions,

        ψ_i = Σ_t ℓ(f_{i,t}, y_{i,t}),         Ψ = (1/N) Σ_i ψ_i,

    acting on the outputs flattened to ``(…, N, T·C)`` (:class:`_PositionSum`). This is
    refcurv's sequence convention; PyTorch's ``CrossEntropyLoss()`` on the ``(N·T, C)``
    reshaped logits (mean reduction) divides by ``N·T``, so it equals ``Ψ / T``."""
    out_shape = tuple(out_shape)
    if len(out_shape) == 1 or isinstance(loss, _PositionSum):
        return loss
    if len(out_shape) != 2:
        raise ShapeError(f"a loss takes network outputs of feature shape (C,) or (T, C), got {out_shape}: "
                         "insert Flatten()")
    return _PositionSum(loss, *out_shape)


class _PositionSum:
    """A per-position loss summed over the ``T`` positions of a sequence output, on outputs
    flattened row-major to ``(…, N, T·C)`` (what :class:`refcurv.nn.autodiff.Trace` keeps).
    Built by :func:`_over_positions`; offers the loss interface, so the dense curvature
    (Jacobians ``(N, T·C, n)``) and the passes run unchanged:

    * ``value`` ``Σ_t ℓ(f_t, y_t)`` ``(…, N)``; ``grad`` and ``hvp`` the per-position ones;
    * ``hessian``, ``hessian_sqrt``, ``fisher_output``: block diagonal ``(…, N, T·C, T·C)``
      with the per-position ``C × C`` blocks (positions do not interact in the loss);
    * targets ``(N, T)`` (cross-entropy) or ``(N, T, C)``; ``sample`` ``(n_samples, N, T, …)``.
    """

    def __init__(self, loss, T, C):
        self.loss, self.T, self.C = loss, int(T), int(C)
        self.name = getattr(loss, "name", "")

    def __repr__(self):
        return f"_PositionSum({self.loss!r}, T={self.T}, C={self.C})"

    def _positions(self, f):
        return f.reshape(f.shape[:-1] + (self.T, self.C))

    def _flat(self, g):
        return g.reshape(g.shape[:-2] + (self.T * self.C,))

    def _block_diagonal(self, H):
        """``(…, T, C, C)`` per-position blocks → ``(…, T·C, T·C)`` block diagonal."""
        xp = xp_of(H)
        E = xp.eye(self.T, dtype=H.dtype)
        B = H[..., :, :, None, :] * E[:, None, :, None]  # (…, T, C, T, C)
        return B.reshape(H.shape[:-3] + (self.T * self.C, self.T * self.C))

    def check_targets(self, y, f):
        return self.loss.check_targets(y, self._positions(f))

    def value(self, f, y):
        return self.loss.value(self._positions(f), y).sum(axis=-1)

    def grad(self, f, y):
        return self._flat(self.loss.grad(self._positions(f), y))

    def hvp(self, f, v):
        return self._flat(self.loss.hvp(self._positions(f), self._positions(v)))

    def hessian(self, f):
        return self._block_diagonal(self.loss.hessian(self._positions(f)))

    def hessian_sqrt(self, f):
        return self._block_diagonal(self.loss.hessian_sqrt(self._positions(f)))

    def fisher_output(self, f):
        return self._block_diagonal(self.loss.fisher_output(self._positions(f)))

    def sample(self, f, n_samples=1, seed=None):
        return self.loss.sample(self._positions(f), n_samples=n_samples, seed=seed)
