"""Parameter tensors of a layer, as TNT (thesis 003 Ch.4) and Shampoo (Algorithm 16) see them.

A refcurv layer matrix ``W ∈ R^{out × (fan_in + 1)}`` (bias last column) is split into

* Linear: the weight ``(out, in)`` (order 2) and the bias ``(out,)`` (order 1);
* Conv2d: the kernel ``(out, c_in, kh, kw)`` (order 4, ``conv_modes=4``, the PyTorch layout)
  or ``(out, c_in, kh·kw)`` (order 3, ``conv_modes=3``, the TNT authors' layout), and the
  bias ``(out,)``.

A layer without bias has one tensor. Each tensor gets its own Kronecker / mode-product
preconditioner, so the bias is a separate 1-mode tensor (as in the TNT code); the
row-major ``vec̄`` of each tensor is the refcurv flattening restricted to its entries.
"""
from __future__ import annotations

from ..backend import xp_of
from ..errors import HyperParameterError
from ..nn.layers import Conv2d


def _check_modes(conv_modes):
    if conv_modes not in (3, 4):
        raise HyperParameterError(f"conv_modes must be 3 or 4, got {conv_modes!r}")


def to_tensors(layer, W, conv_modes=4):
    """``W -> [weight tensor, bias (out,)]`` (or ``[weight tensor]`` without bias)."""
    _check_modes(conv_modes)
    weight, bias = layer.split(W)
    if isinstance(layer, Conv2d) and conv_modes == 3:
        weight = weight.reshape(weight.shape[0], weight.shape[1], -1)
    return [weight] if bias is None else [weight, bias]


def from_tensors(layer, tensors):
    """Inverse of :func:`to_tensors`: the tensors back to the layer matrix ``W``."""
    weight = tensors[0]
    bias = tensors[1] if len(tensors) > 1 else None
    return layer.join(xp_of(weight).reshape(weight, (weight.shape[0], -1)), bias)


def map_modes(f, *nested):
    """Apply ``f`` to matching leaves of per-layer / per-tensor / per-mode nested lists (the
    layout of TNT's and Shampoo's statistics, factors and inverses)."""
    return [[[f(*leaf) for leaf in zip(*modes)] for modes in zip(*tensors)] for tensors in zip(*nested)]
