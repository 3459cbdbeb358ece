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
from .errors import HyperParameterError, ShapeError

ORDERS = ("row", "col", "torch")


def _shapes_and_bias(net_or_shapes, bias=None):
    if hasattr(net_or_shapes, "param_shapes"):
        shapes = net_or_shapes.param_shapes
        bias = [m.bias for m in net_or_shapes.layers_trainable]
    else:
        shapes = [tuple(int(v) for v in s) for s in net_or_shapes]
        if bias is None:
            bias = [True] * len(shapes)
    return shapes, list(bias)


def layer_slices(net_or_shapes):
    """Per-layer slices of θ (refcurv order): ``θ[slices[l]] == params[l].ravel()``."""
    shapes, _ = _shapes_and_bias(net_or_shapes)
    out, start = [], 0
    for o, d in shapes:
        out.append(slice(start, start + o * d))
        start += o * d
    return out


def flatten(params):
    """Concatenate per-layer matrices row-major into one vector θ (refcurv order)."""
    xp = xp_of(*params)
    return xp.concatenate([xp.asarray(W).ravel() for W in params])


def unflatten(theta, net_or_shapes):
    """Inverse of :func:`flatten`; ``net_or_shapes`` is a ``Sequential`` or a list of shapes.
    A leading batch axis ``(K, n)`` gives ``(K, out, d)`` matrices."""
    shapes, _ = _shapes_and_bias(net_or_shapes)
    n = sum(o * d for o, d in shapes)
    if theta.shape[-1] != n:
        raise ShapeError(f"theta has {theta.shape[-1]} entries, the shapes need {n}")
    out, start = [], 0
    for o, d in shapes:
        out.append(theta[..., start : start + o * d].reshape(theta.shape[:-1] + (o, d)))
        start += o * d
    return out


def permutation(net_or_shapes, order, bias=None):
    """Index array ``p`` mapping refcurv's row-major θ to ``order``: ``θ_order = θ[p]``."""
    if order not in ORDERS:
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
    p = permutation(net_or_shapes, order, bias)
    return a[p][:, p] if matrix else a[..., p]


def from_order(a, net_or_shapes, order, matrix=False, bias=None):
    """Inverse of :func:`to_order`."""
    p = np.argsort(permutation(net_or_shapes, order, bias))
    return a[p][:, p] if matrix else a[..., p]
