"""Layers of the model family: Linear, Conv2d (im2col), elementwise activations, Flatten.

Arrays carry arbitrary leading batch axes ``(..., *feature_shape)``, so the same code
serves the primal pass (``(N, ...)``) and batched tangents/cotangents (``(K, N, ...)``).

Trainable layers are written in one form (thesis Ch.3 (3.1)-(3.2), SENG (3)):

    h = W A(a),        W in R^{out x d},   A(a) in R^{d x T}

where ``A`` is the patch operator: for Linear, ``T = 1`` and ``A(a) = [a; 1]`` (or, on a
sequence ``(T, in)`` with the weight shared over the positions, one column ``[a_t; 1]`` per
position); for Conv2d, ``A(a)`` holds the im2col patches, one column per output location
(``T = H_out W_out``, row-major over ``(H_out, W_out)``), rows ordered ``(c_in, kh, kw)``
-- the row order of ``weight.reshape(out, -1)`` for a PyTorch ``(out, c_in, kh, kw)``
kernel -- and a final ones row when the layer has a bias (homogeneous coordinate).
The per-sample weight gradient is then ``G Aᵀ`` with ``G = ∂ψ/∂h`` of shape ``(out, T)``.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import xp_of
from ..errors import ArgumentTypeError, HyperParameterError, ShapeError
from ._checks import check_bool, real_array


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise HyperParameterError(f"{name} must be >= 1, got {value}")
    return int(value)


def _nonnegative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise HyperParameterError(f"{name} must be >= 0, got {value}")
    return int(value)


def _pair(value, name):
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim == 1 else value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise HyperParameterError(f"{name} must be an int or a pair, got {value!r}")
        return _positive_int(value[0], name), _positive_int(value[1], name)
    v = _positive_int(value, name)
    return v, v


def _shape_arg(in_shape, name="in_shape"):
    """A feature shape: a tuple/list of positive ints."""
    if isinstance(in_shape, np.ndarray) and in_shape.ndim == 1 and in_shape.dtype.kind in "iu":
        in_shape = in_shape.tolist()
    if not isinstance(in_shape, (tuple, list)):
        raise ArgumentTypeError(f"{name} must be a tuple of positive ints, got {type(in_shape).__name__}")
    return tuple(_positive_int(s, f"{name}[{k}]") for k, s in enumerate(in_shape))


def _feature_array(a, in_shape, name, layer):
    """``a`` of shape ``(..., *in_shape)``: a real array (ints → float64)."""
    a = real_array(a, name, int_dtype=None)
    n = len(in_shape)
    if a.ndim < n or tuple(a.shape[a.ndim - n:]) != tuple(in_shape):
        raise ShapeError(f"{name} for {layer!r} must have shape (..., *{tuple(in_shape)}), got {tuple(a.shape)}")
    return a


def _append_row(A, value):
    """Append a constant row along axis -2 (the homogeneous coordinate)."""
    xp = xp_of(A)
    row = xp.full(A.shape[:-2] + (1, A.shape[-1]), value, dtype=A.dtype)
    return xp.concatenate([A, row], axis=-2)


class Linear:
    """Fully connected layer ``h = W [a; 1]``, ``W in R^{out x (in + 1)}`` (bias last column).

    Inputs of feature shape ``(in,)`` (one location, ``T = 1``) or ``(T, in)``: a sequence of
    ``T`` positions sharing the weight, as ``torch.nn.Linear`` on ``(N, T, in)``; the output is
    then ``(T, out)``, ``n_locations = T``, and the patches ``A(a) = [aᵀ; 1ᵀ] in R^{(in+1) x T}``
    hold one position per column, so the per-sample gradient ``G Aᵀ = Σ_t g_t [a_t; 1]ᵀ`` sums
    over positions exactly as for Conv2d (Eschenhagen et al. 2023, §2: a linear layer with
    weight sharing).

    The map and its adjoints run as one GEMM over every leading axis (batch, positions,
    tangents), ``h = [a, 1] @ Wᵀ`` on the ``(N·T, in+1)`` rows (:meth:`_apply`,
    :meth:`_apply_adjoint`), never as ``N`` mat-vecs: the patches are stored as contiguous
    rows ``(…, T, in+1)`` and :meth:`patches` returns their transposed view.
    """

    trainable = True

    def __init__(self, in_features, out_features, bias=True):
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.bias = check_bool(bias, "bias")

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias})"

    @property
    def fan_in(self):
        return self.in_features

    @property
    def param_shape(self):
        return (self.out_features, self.in_features + int(self.bias))

    def split(self, W):
        """``W -> (weight (out, in), bias (out,) or None)``, the PyTorch layout."""
        W = self._check_W(W)
        return (W[:, :-1], W[:, -1]) if self.bias else (W, None)

    def _check_W(self, W):
        W = real_array(W, "W", int_dtype=None)
        if tuple(W.shape) != self.param_shape:
            raise ShapeError(f"W for {self!r} must have shape {self.param_shape}, got {tuple(W.shape)}")
        return W

    def join(self, weight, bias=None):
        """Inverse of :meth:`split`: PyTorch ``(weight, bias)`` to refcurv's ``W``."""
        xp = xp_of(weight)
        weight = real_array(weight, "weight", int_dtype=None)
        if weight.size != self.out_features * self.fan_in or weight.ndim < 1 or weight.shape[0] != self.out_features:
            raise ShapeError(f"weight for {self!r} must have {self.out_features} outputs of {self.fan_in} inputs, "
                             f"got shape {tuple(weight.shape)}")
        weight = weight.reshape(self.out_features, -1)
        if self.bias != (bias is not None):
            raise ShapeError(f"bias must be {'given' if self.bias else 'None'} for {self!r}")
        if bias is None:
            return weight
        bias = real_array(bias, "bias", int_dtype=None)
        if bias.size != self.out_features or bias.ndim != 1:
            raise ShapeError(f"bias for {self!r} must have shape ({self.out_features},), got {tuple(bias.shape)}")
        dt = np.result_type(weight.dtype, bias.dtype)
        return xp.concatenate([weight.astype(dt, copy=False), bias.astype(dt, copy=False).reshape(-1, 1)], axis=1)

    # ------------------------------------------------------------ shapes
    def _is_sequence(self, in_shape):
        """``False`` for ``(in,)``, ``True`` for ``(T, in)``; anything else is a ShapeError."""
        in_shape = _shape_arg(in_shape)
        if in_shape[-1:] != (self.in_features,) or len(in_shape) > 2:
            raise ShapeError(
                f"{self!r} expects inputs of feature shape ({self.in_features},) or, for a sequence, "
                f"(T, {self.in_features}), got {tuple(in_shape)}"
            )
        return len(in_shape) == 2

    def out_shape(self, in_shape):
        in_shape = _shape_arg(in_shape)
        return in_shape[:-1] + (self.out_features,) if self._is_sequence(in_shape) else (self.out_features,)

    def n_locations(self, in_shape):
        in_shape = _shape_arg(in_shape)
        return in_shape[0] if self._is_sequence(in_shape) else 1

    # ------------------------------------------------------------ patches
    def _rows(self, a, in_shape, ones=True):
        """The patches as contiguous rows: ``(…, in) -> (…, 1, d)``, ``(…, T, in) -> (…, T, d)``
        (``d = in + 1`` with the bias column of ones, or zeros with ``ones=False``: the linear
        part, for tangents)."""
        seq = self._is_sequence(in_shape)
        a = _feature_array(a, _shape_arg(in_shape), "a", self)
        ones = check_bool(ones, "ones")
        if not seq:
            a = a[..., None, :]
        if not self.bias:
            return a
        xp = xp_of(a)
        col = xp.full(a.shape[:-1] + (1,), 1.0 if ones else 0.0, dtype=a.dtype)
        return xp.concatenate([a, col], axis=-1)

    def patches(self, a, in_shape, ones=True):
        """``A(a)``: ``(…, in) -> (…, d, 1)``, ``(…, T, in) -> (…, d, T)`` (a transposed view of
        :meth:`_rows`); ``ones=False`` gives the linear part (zero row)."""
        return self._rows(a, in_shape, ones).swapaxes(-1, -2)

    def patches_adjoint(self, dA, in_shape):
        """Adjoint of the linear part of ``A``: ``(…, d, T) -> (…, [T,] in)`` (bias row dropped)."""
        seq = self._is_sequence(in_shape)
        T = _shape_arg(in_shape)[0] if seq else 1
        dA = _feature_array(dA, (self.param_shape[1], T), "dA", self)
        dA = dA[..., : self.in_features, :].swapaxes(-1, -2)
        return dA if seq else dA[..., 0, :]

    def to_output(self, h, in_shape):
        """``(…, out, T) -> (…, T, out)`` (``(…, out)`` without positions)."""
        seq = self._is_sequence(in_shape)
        T = _shape_arg(in_shape)[0] if seq else 1
        h = _feature_array(h, (self.out_features, T), "h", self).swapaxes(-1, -2)
        return h if seq else h[..., 0, :]

    def from_output(self, dh, in_shape):
        """``(…, [T,] out) -> (…, out, T)``, a view."""
        dh = _feature_array(dh, self.out_shape(in_shape), "dh", self)
        if not self._is_sequence(in_shape):
            dh = dh[..., None, :]
        return dh.swapaxes(-1, -2)

    # ------------------------------------------------------------ the map as one GEMM
    @staticmethod
    def _gemm(rows, W, rows_batched=False):
        """``rows @ Wᵀ`` with every leading axis of ``rows`` folded into the GEMM's row count:
        ``(…, k) @ (k, m)`` runs as one ``(Π…, k) @ (k, m)`` BLAS call (NumPy's broadcasting
        matmul would loop over the leading axes with small products). ``W`` ``(m, k)``, or
        ``K`` of them ``(K, m, k)``: then one GEMM per ``k``-tangent, on ``rows`` ``(K, …, k)``
        (``rows_batched``) or on the same ``rows`` ``(…, k)`` for all ``K`` (broadcast, no copy)."""
        k = rows.shape[-1]
        if W.ndim == 2:
            lead = rows.shape[:-1]
            return (rows.reshape(-1, k) @ W.T).reshape(lead + (W.shape[0],))
        K, m = W.shape[0], W.shape[1]
        lead = rows.shape[1:-1] if rows_batched else rows.shape[:-1]
        r = rows.reshape((K, -1, k) if rows_batched else (-1, k))
        return (r @ W.swapaxes(-1, -2)).reshape((K,) + lead + (m,))

    def _apply(self, W, a, in_shape, ones=True, A=None):
        """``h = W A(a)`` in the output layout ``(…, [T,] out)``: ``[a, 1] @ Wᵀ``, one GEMM over
        the batch and the positions (tangents too: ``ones=False`` drops the bias column,
        ``h = a @ W[:, :in]ᵀ``). ``A``: the patches of ``a`` if already formed (the forward
        pass stores them), used instead of forming them again."""
        seq = self._is_sequence(in_shape)
        if A is not None:
            R = A.swapaxes(-1, -2)
        elif check_bool(ones, "ones") or not self.bias:
            R = self._rows(a, in_shape, ones)
        else:  # linear part only: the zero bias column contributes nothing
            R = _feature_array(a, _shape_arg(in_shape), "a", self)
            R = R if seq else R[..., None, :]
            W = W[:, : self.in_features]
        h = self._gemm(R, W)
        return h if seq else h[..., 0, :]

    def _apply_weights(self, dW, A, in_shape):
        """``dW A`` for ``K`` weight tangents ``dW`` ``(K, out, d)`` and the patches ``A``
        ``(N, d, T)`` of the trace: ``(K, N, [T,] out)``, one GEMM per tangent."""
        h = self._gemm(A.swapaxes(-1, -2), dW)
        return h if self._is_sequence(in_shape) else h[..., 0, :]

    def _apply_adjoint(self, W, dh, in_shape, batched=False):
        """``A*(Wᵀ G)``, the input cotangent ``(…, [T,] in)`` from the output cotangent ``dh``
        ``(…, [T,] out)``: ``dh @ W[:, :in]``, one GEMM (the bias column has no input). ``W``
        ``(out, d)``, or ``K`` of them ``(K, out, d)``: one GEMM each, on ``dh`` ``(K, …)``
        (``batched``) or on the same ``dh`` for all ``K``."""
        Win = W[..., : self.in_features]
        return self._gemm(dh, Win.swapaxes(-1, -2), rows_batched=batched)


class Conv2d:
    """2-D convolution (cross-correlation, as PyTorch) on ``(..., C, H, W)`` via im2col.

    ``h[o, p, q] = Σ_{c,i,j} w[o, c, i, j] a_pad[c, s p + i, s q + j] + b[o]``; the weight
    matrix is ``W = [w.reshape(out, -1), b] in R^{out x (C kh kw + 1)}``.
    """

    trainable = True

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, bias=True):
        self.c_in = _positive_int(c_in, "c_in")
        self.c_out = _positive_int(c_out, "c_out")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _positive_int(stride, "stride")
        self.padding = _nonnegative_int(padding, "padding")
        self.bias = check_bool(bias, "bias")

    def __repr__(self):
        return (
            f"Conv2d({self.c_in}, {self.c_out}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias})"
        )

    @property
    def out_features(self):
        return self.c_out

    @property
    def fan_in(self):
        kh, kw = self.kernel_size
        return self.c_in * kh * kw

    @property
    def param_shape(self):
        return (self.c_out, self.fan_in + int(self.bias))

    def split(self, W):
        """``W -> (weight (out, c_in, kh, kw), bias (out,) or None)``, the PyTorch layout."""
        W = self._check_W(W)
        w = W[:, : self.fan_in].reshape((self.c_out, self.c_in) + self.kernel_size)
        return (w, W[:, -1]) if self.bias else (w, None)

    join = Linear.join
    _check_W = Linear._check_W

    def _spatial_out(self, in_shape):
        in_shape = _shape_arg(in_shape)
        if len(in_shape) != 3 or in_shape[0] != self.c_in:
            raise ShapeError(
                f"{self!r} expects inputs of feature shape ({self.c_in}, H, W), got {tuple(in_shape)}"
            )
        _, H, W = in_shape
        kh, kw = self.kernel_size
        s, p = self.stride, self.padding
        Ho = (H + 2 * p - kh) // s + 1
        Wo = (W + 2 * p - kw) // s + 1
        if Ho < 1 or Wo < 1:
            raise ShapeError(
                f"{self!r}: kernel larger than the padded input {(H + 2 * p, W + 2 * p)}"
            )
        return Ho, Wo

    def out_shape(self, in_shape):
        return (self.c_out,) + self._spatial_out(in_shape)

    def n_locations(self, in_shape):
        Ho, Wo = self._spatial_out(in_shape)
        return Ho * Wo

    def _offsets(self, in_shape):
        """Slices of the padded input seen by kernel offset ``(i, j)``; a loop over
        ``kh*kw`` offsets (never over samples or parameters)."""
        Ho, Wo = self._spatial_out(in_shape)
        kh, kw = self.kernel_size
        s = self.stride
        for i in range(kh):
            for j in range(kw):
                yield i, j, slice(i, i + s * (Ho - 1) + 1, s), slice(j, j + s * (Wo - 1) + 1, s)

    def patches(self, a, in_shape, ones=True):
        """im2col: ``(..., C, H, W) -> (..., C kh kw [+1], Ho Wo)``, rows ordered ``(c, i, j)``."""
        self._spatial_out(in_shape)
        a = _feature_array(a, _shape_arg(in_shape), "a", self)
        ones = check_bool(ones, "ones")
        xp = xp_of(a)
        p = self.padding
        lead = a.shape[:-3]
        if p:
            a = xp.pad(a, [(0, 0)] * (a.ndim - 2) + [(p, p), (p, p)])
        cols = [a[..., :, si, sj] for _, _, si, sj in self._offsets(in_shape)]
        cols = xp.stack(cols, axis=-3)  # (..., C, kh*kw, Ho, Wo)
        A = cols.reshape(lead + (self.fan_in, -1))
        if self.bias:
            A = _append_row(A, 1.0 if ones else 0.0)
        return A

    def patches_adjoint(self, dA, in_shape):
        """col2im, the adjoint of the linear part of :meth:`patches`."""
        Ho, Wo = self._spatial_out(in_shape)
        dA = _feature_array(dA, (self.param_shape[1], Ho * Wo), "dA", self)
        xp = xp_of(dA)
        C, H, W = in_shape
        p = self.padding
        kh, kw = self.kernel_size
        Ho, Wo = self._spatial_out(in_shape)
        lead = dA.shape[:-2]
        cols = dA[..., : self.fan_in, :].reshape(lead + (C, kh, kw, Ho, Wo))
        out = xp.zeros(lead + (C, H + 2 * p, W + 2 * p), dtype=dA.dtype)
        for i, j, si, sj in self._offsets(in_shape):
            out[..., :, si, sj] += cols[..., :, i, j, :, :]
        return out[..., :, p : p + H, p : p + W]

    def _apply(self, W, a, in_shape, ones=True, A=None):
        """``h = W A(a)`` in the output layout ``(…, out, Ho, Wo)`` (a batched GEMM over the
        samples, each ``(out, d) @ (d, Ho Wo)``)."""
        A = self.patches(a, in_shape, ones) if A is None else A
        return self.to_output(W @ A, in_shape)

    def _apply_weights(self, dW, A, in_shape):
        """``dW A`` for ``K`` weight tangents ``(K, out, d)``: ``(K, N, out, Ho, Wo)``."""
        return self.to_output(dW[:, None] @ A, in_shape)

    def _apply_adjoint(self, W, dh, in_shape, batched=False):
        """``A*(Wᵀ G)`` (col2im of ``Wᵀ G``) from the output cotangent ``dh``; ``W`` ``(out, d)``
        or ``(K, out, d)`` (with ``dh`` ``(K, …)`` if ``batched``, else shared by all ``K``)."""
        g = self.from_output(dh, in_shape)
        Wt = W.swapaxes(-1, -2)
        if W.ndim == 3 and not batched:
            Wt = Wt[:, None]
        elif W.ndim == 3:
            Wt = Wt.reshape((W.shape[0],) + (1,) * (g.ndim - 3) + Wt.shape[1:])
        return self.patches_adjoint(Wt @ g, in_shape)

    def to_output(self, h, in_shape):
        Ho, Wo = self._spatial_out(in_shape)
        h = _feature_array(h, (self.c_out, Ho * Wo), "h", self)
        return h.reshape(h.shape[:-1] + (Ho, Wo))

    def from_output(self, dh, in_shape):
        dh = _feature_array(dh, (self.c_out,) + self._spatial_out(in_shape), "dh", self)
        return dh.reshape(dh.shape[:-2] + (-1,))


class _Elementwise:
    """Elementwise activation ``a = φ(h)`` with ``φ'`` and ``φ''`` (needed by the R-op)."""

    trainable = False

    def __repr__(self):
        return f"{type(self).__name__}()"

    def out_shape(self, in_shape):
        return _shape_arg(in_shape)


class ReLU(_Elementwise):
    def f(self, h):
        h = real_array(h, "h")
        return xp_of(h).maximum(h, 0)

    def d1(self, h):
        h = real_array(h, "h")
        return (h > 0).astype(h.dtype)

    def d2(self, h):
        h = real_array(h, "h")
        return xp_of(h).zeros_like(h)


def sigmoid(h):
    """Logistic ``σ(h)``, accurate to a few ulps for every ``h``: ``1/(1+e)`` or
    ``e/(1+e)`` with ``e = exp(−|h|)`` (never ``1 − σ`` of a number near 1)."""
    h = real_array(h, "h")
    xp = xp_of(h)
    e = xp.exp(-xp.abs(h))
    return xp.where(h >= 0, 1, e) / (1 + e)


def sigmoid_d1(h):
    """``σ'(h) = σ(h) σ(−h) = e/(1+e)²``, ``e = exp(−|h|)``, free of cancellation."""
    h = real_array(h, "h")
    e = xp_of(h).exp(-xp_of(h).abs(h))
    return e / (1 + e) ** 2


def _sech2(h):
    """``1 − tanh²(h) = 4e/(1+e)²`` with ``e = exp(−2|h|)``, free of cancellation."""
    e = xp_of(h).exp(-2 * xp_of(h).abs(h))
    return 4 * e / (1 + e) ** 2


class Tanh(_Elementwise):
    def f(self, h):
        h = real_array(h, "h")
        return xp_of(h).tanh(h)

    def d1(self, h):
        h = real_array(h, "h")
        return _sech2(h)

    def d2(self, h):
        h = real_array(h, "h")
        return -2 * xp_of(h).tanh(h) * _sech2(h)


class Sigmoid(_Elementwise):
    def f(self, h):
        h = real_array(h, "h")
        return sigmoid(h)

    def d1(self, h):
        h = real_array(h, "h")
        return sigmoid_d1(h)

    def d2(self, h):
        h = real_array(h, "h")
        # σ'' = σ'(1 − 2σ) and 1 − 2σ(h) = −tanh(h/2)
        return -sigmoid_d1(h) * xp_of(h).tanh(0.5 * h)


class Softplus(_Elementwise):
    def f(self, h):
        h = real_array(h, "h")
        return xp_of(h).logaddexp(0, h)

    def d1(self, h):
        h = real_array(h, "h")
        return sigmoid(h)

    def d2(self, h):
        h = real_array(h, "h")
        return sigmoid_d1(h)


class Flatten:
    """Row-major flattening of the feature axes ``(C, H, W) -> (C H W,)``, as PyTorch."""

    trainable = False

    def __repr__(self):
        return "Flatten()"

    def out_shape(self, in_shape):
        return (int(math.prod(_shape_arg(in_shape))),)

    def f(self, a, in_shape):
        a = _feature_array(a, _shape_arg(in_shape), "a", self)
        return a.reshape(a.shape[: a.ndim - len(in_shape)] + (-1,))

    def adjoint(self, da, in_shape):
        da = _feature_array(da, self.out_shape(in_shape), "da", self)
        return da.reshape(da.shape[:-1] + tuple(in_shape))


class SequenceMean:
    """Mean over the positions of a sequence, ``(T, d) -> (d,)``: ``a ↦ (1/T) Σ_t a_t``.

    The aggregation of Eschenhagen et al. 2023's *reduce* setting (§2, e.g. the mean pooling
    of a vision transformer before its classifier head): the weight-sharing axis is reduced
    inside the network, before the loss, so the loss sees one output per sample. Linear and
    not trainable; its adjoint spreads a cotangent evenly, ``da ↦ (da/T, …, da/T)``.
    """

    trainable = False

    def __repr__(self):
        return "SequenceMean()"

    def out_shape(self, in_shape):
        in_shape = _shape_arg(in_shape)
        if len(in_shape) != 2:
            raise ShapeError(f"SequenceMean() expects inputs of feature shape (T, d), got {tuple(in_shape)}")
        return in_shape[1:]

    def f(self, a, in_shape):
        self.out_shape(in_shape)
        a = _feature_array(a, _shape_arg(in_shape), "a", self)
        return a.mean(axis=-2)

    def adjoint(self, da, in_shape):
        self.out_shape(in_shape)
        T, d = _shape_arg(in_shape)
        da = _feature_array(da, (d,), "da", self)
        xp = xp_of(da)
        return xp.broadcast_to(da[..., None, :] / T, da.shape[:-1] + (T, d))


#: the linear, non-trainable modules: ``f(a, in_shape)`` and ``adjoint(da, in_shape)``
LINEAR_MAPS = (Flatten, SequenceMean)
