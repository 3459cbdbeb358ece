"""Flattening of per-layer parameter matrices and permutations between vec orders.

refcurv's order ("row"): ``θ = [W_1.ravel(), …, W_L.ravel()]``, each ``W_l`` of shape
``(out, d)`` flattened row-major (C order). Under it ``vec(G Aᵀ) = g ⊗ a`` and a
layer's Kronecker block is ``G ⊗ A``.

Other orders, all given as index arrays ``p`` with ``θ_other = θ[p]`` (and
``M_other = M[p][:, p]`` for matrices):

* ``"col"``: column-major vec per layer (the papers' ``vec``: ``vec(G Aᵀ) = a ⊗ g``,
  blocks ``A ⊗ G``);
* ``"torch"``: weight and bias separate, ``[weight_1.ravel(), bias_1, weight_2.ravel(), …]``
  -- the order of ``torch.nn.utils.parameters_to_vector`` for Linear/Conv2d layers
  (``weight`` of shape ``(out, in)`` or ``(out, c_in, kh, kw)``).
"""
from __future__ import annotations

import numpy as np

from .backend import xp_of
from .errors import ArgumentTypeError, HyperParameterError, ShapeError
from .nn._checks import check_bool, describe, real_array
from .nn.layers import _positive_int

ORDERS = ("row", "col", "torch")


def _shapes_and_bias(net_or_shapes, bias=None):
    """``(shapes, bias)`` of a ``Sequential`` or of a non-empty list of ``(out, d)`` pairs of
    positive ints (``bias``: ``None`` = every layer has one, or one bool per layer)."""
    from .nn import Sequential

    if isinstance(net_or_shapes, Sequential):
        return net_or_shapes.param_shapes, [m.bias for m in net_or_shapes.layers_trainable]
    if not isinstance(net_or_shapes, (list, tuple)) or len(net_or_shapes) == 0:
        raise ArgumentTypeError(
            f"net_or_shapes must be a Sequential or a non-empty list of (out, d) shapes, got {describe(net_or_shapes)}")
    shapes = []
    for j, s in enumerate(net_or_shapes):
        if not isinstance(s, (tuple, list, np.ndarray)) or len(s) != 2:
            raise ShapeError(f"net_or_shapes[{j}] must be a pair (out, d), got {describe(s)}")
        shapes.append(tuple(_positive_int(v, f"net_or_shapes[{j}]") for v in s))
    if bias is None:
        bias = [True] * len(shapes)
    if not isinstance(bias, (list, tuple)) or len(bias) != len(shapes):
        raise ArgumentTypeError(f"bias must be None or a list of {len(shapes)} bools, got {describe(bias)}")
    return shapes, [check_bool(b, f"bias[{j}]") for j, b in enumerate(bias)]


def _n_params(shapes):
    return sum(o * d for o, d in shapes)


def layer_slices(net_or_shapes):
    """Per-layer slices of θ (refcurv order): ``θ[slices[l]] == params[l].ravel()``."""
    shapes, _ = _shapes_and_bias(net_or_shapes)
    out, start = [], 0
    for o, d in shapes:
        out.append(slice(start, start + o * d))
        start += o * d
    return out


def flatten(params):
    """Concatenate per-layer matrices row-major into one vector θ (refcurv order). ``params``:
    a non-empty list of real arrays (integer arrays are kept as they are)."""
    if not isinstance(params, (list, tuple)) or len(params) == 0:
        raise ArgumentTypeError(f"params must be a non-empty list of arrays, got {describe(params)}")
    xp = xp_of(*params)
    return xp.concatenate([real_array(W, f"params[{j}]", xp=xp, int_dtype=None).ravel()
                           for j, W in enumerate(params)])


def unflatten(theta, net_or_shapes):
    """Inverse of :func:`flatten`; ``net_or_shapes`` is a ``Sequential`` or a list of shapes.
    A leading batch axis ``(K, n)`` gives ``(K, out, d)`` matrices."""
    shapes, _ = _shapes_and_bias(net_or_shapes)
    n = _n_params(shapes)
    theta = real_array(theta, "theta", int_dtype=None)
    if theta.ndim == 0:
        raise ShapeError(f"theta must be a vector (…, {n}), got a scalar")
    if theta.shape[-1] != n:
        raise ShapeError(f"theta has {theta.shape[-1]} entries, the shapes need {n}")
    out, start = [], 0
    for o, d in shapes:
        out.append(theta[..., start : start + o * d].reshape(theta.shape[:-1] + (o, d)))
        start += o * d
    return out


def permutation(net_or_shapes, order, bias=None):  # host: index metadata (a host int array), not array data
    """Index array ``p`` mapping refcurv's row-major θ to ``order``: ``θ_order = θ[p]``
    (a host NumPy array; :func:`to_order` moves it to the data's backend)."""
    if not isinstance(order, str) or order not in ORDERS:
        raise HyperParameterError(f"order must be one of {ORDERS}, got {order!r}")
    shapes, bias = _shapes_and_bias(net_or_shapes, bias)
    parts, start = [], 0
    for (o, d), b in zip(shapes, bias):
        idx = start + np.arange(o * d).reshape(o, d)
        if order == "row":
            parts.append(idx.ravel())
        elif order == "col":
            parts.append(idx.T.ravel())
        else:
            parts.append(idx[:, :-1].ravel() if b else idx.ravel())
            if b:
                parts.append(idx[:, -1])
        start += o * d
    return np.concatenate(parts)


def to_order(a, net_or_shapes, order, matrix=False, bias=None):
    """Re-order a vector ``(…, n)`` into ``order``; ``matrix=True`` re-orders both axes
    of an ``(n, n)`` matrix (``M[p][:, p]``)."""
    return _reorder(a, permutation(net_or_shapes, order, bias), matrix)


def _reorder(a, p, matrix):
    """``a[p][:, p]`` (``matrix``) or ``a[..., p]``, after checking ``a``'s shape. Any
    numeric dtype (complex included: a permutation drops nothing) is accepted."""
    matrix = check_bool(matrix, "matrix")
    a = real_array(a, "a", int_dtype=None, kinds="fiucb")
    n = len(p)
    if matrix and (a.ndim != 2 or a.shape != (n, n)):
        raise ShapeError(f"a must be an ({n}, {n}) matrix with matrix=True, got shape {tuple(a.shape)}")
    if not matrix and (a.ndim == 0 or a.shape[-1] != n):
        raise ShapeError(f"a must have {n} entries along its last axis, got shape {tuple(a.shape)}")
    p = xp_of(a).asarray(p)  # the host permutation on a's backend (CuPy fancy indexing)
    return a[p][:, p] if matrix else a[..., p]


def from_order(a, net_or_shapes, order, matrix=False, bias=None):
    """Inverse of :func:`to_order`."""
    return _reorder(a, np.argsort(permutation(net_or_shapes, order, bias)), matrix)  # host: index metadata
