"""Pieces shared by QNG and Ginger (seed 004): the sampled Fisher vector ``d_t`` of (8) and
the block layouts of θ.

* (8): ``d_t = (1/√|B|) Σ_{x∈B} ∇_θ log p_θ(ŷ|x) = −(1/√|B|) Σ_x ∇ψ(x, ŷ)`` with one label
  ``ŷ ~ p_θ(·|x)`` per input, so that ``E[d_t d_tᵀ]`` is the mini-batch Fisher (6).
* Blocks of refcurv's row-major flat θ: ``"full"`` (one block, the paper's θ ∈ R^d),
  ``"layer"`` (one per layer matrix ``W_l``, bias column included), ``"tensor"`` (weight and
  bias of each layer separately, as the authors' Ginger code does per parameter tensor).
"""
from __future__ import annotations

import math

import numpy as np

from ..vec import flatten, layer_slices

BLOCKS = ("full", "layer", "tensor")


def sampled_labels(net, params, batch, rng):
    """One label per input drawn from the model, ``ŷ ~ p_θ(·|x)``, with the host generator."""
    return batch.loss.sample(net.forward(params, batch.x), n_samples=1, seed=rng)[0]


def fisher_vector(net, params, batch, y_hat):
    """``d_t`` of (8), flat in refcurv's order. The scale ``1/√N`` is a Python float, so a
    float32 network gives a float32 ``d_t``."""
    u = net.per_sample_grads(params, batch.x, y_hat, batch.loss)
    return flatten([-ui.sum(axis=0) / math.sqrt(ui.shape[0]) for ui in u])


def block_indices(net, blocks):
    """Index arrays into the flat θ, one per block (see the module docstring)."""
    slices = layer_slices(net)
    if blocks == "full":
        return [np.arange(net.n_params)]
    if blocks == "layer":
        return [np.arange(s.start, s.stop) for s in slices]
    out = []
    for s, layer, (o, dl) in zip(slices, net.layers_trainable, net.param_shapes):
        idx = np.arange(s.start, s.stop).reshape(o, dl)
        out += [idx[:, :-1].ravel(), idx[:, -1]] if layer.bias else [idx.ravel()]
    return out
