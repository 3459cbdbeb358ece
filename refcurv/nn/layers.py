"""Layers of the model family: Linear, Conv2d (im2col), elementwise activations, Flatten.

Arrays carry arbitrary leading batch axes ``(..., *feature_shape)``, so the same code
serves the primal pass (``(N, ...)``) and batched tangents/cotangents (``(K, N, ...)``).

Trainable layers are written in one form (thesis Ch.3 (3.1)-(3.2), SENG (3)):

    h = W A(a),        W in R^{out x d},   A(a) in R^{d x T}

where ``A`` is the patch operator: for Linear, ``T = 1`` and ``A(a) = [a; 1]``; for
Conv2d, ``A(a)`` holds the im2col patches, one column per output location
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
    """Fully connected layer ``h = W [a; 1]``, ``W in R^{out x (in + 1)}`` (bias last column)."""

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

    def out_shape(self, in_shape):
        if _shape_arg(in_shape) != (self.in_features,):
            raise ShapeError(
                f"{self!r} expects inputs of feature shape ({self.in_features},), got {tuple(in_shape)}"
            )
        return (self.out_features,)

    def n_locations(self, in_shape):
        self.out_shape(in_shape)
        return 1

    def patches(self, a, in_shape, ones=True):
        """``A(a)``: ``(..., in) -> (..., d, 1)``; ``ones=False`` gives the linear part (zero row)."""
        self.out_shape(in_shape)
        a = _feature_array(a, (self.in_features,), "a", self)
        ones = check_bool(ones, "ones")
        A = a[..., :, None]
        if self.bias:
            A = _append_row(A, 1.0 if ones else 0.0)
        return A

    def patches_adjoint(self, dA, in_shape):
        """Adjoint of the linear part of ``A``: ``(..., d, 1) -> (..., in)`` (bias row dropped)."""
        self.out_shape(in_shape)
        dA = _feature_array(dA, (self.param_shape[1], 1), "dA", self)
        return dA[..., : self.in_features, 0]

    def to_output(self, h, in_shape):
        self.out_shape(in_shape)
        return _feature_array(h, (self.out_features, 1), "h", self)[..., 0]

    def from_output(self, dh, in_shape):
        self.out_shape(in_shape)
        return _feature_array(dh, (self.out_features,), "dh", self)[..., None]


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
