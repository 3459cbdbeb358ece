"""Pieces shared by QNG and Ginger ([QNG-Ginger]): the sampled Fisher vector ``d_t`` of (8) and
the block layouts of θ.

* (8): ``d_t = (1/√|B|) Σ_{x∈B} ∇_θ log p_θ(ŷ|x) = −(1/√|B|) Σ_x ∇ψ(x, ŷ)`` with one label
  ``ŷ ~ p_θ(·|x)`` per input, so that ``E[d_t d_tᵀ]`` is the mini-batch Fisher (6).
* The sampled labels are made once per step (:func:`sampled_labels`, ``Draws.labels`` of
  shape ``(1, N, …)``) and consumed exactly: the fast forms compute ``d_t`` from them by
  :func:`fisher_vector`, the dense forms by :func:`fisher_vector_dense`.
* Blocks of refcurv's row-major flat θ: ``"full"`` (one block, the paper's θ ∈ R^d),
  ``"layer"`` (one per layer matrix ``W_l``, bias column included), ``"tensor"`` (weight and
  bias of each layer separately, as the authors' Ginger code does per parameter tensor).
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import to_numpy, xp_of
from ..errors import DrawsError
from ..vec import flatten, layer_slices

BLOCKS = ("full", "layer", "tensor")


def sampled_labels(net, params, batch, rng):
    """One label per input drawn from the model, ``ŷ ~ p_θ(·|x)`` (8), with the host generator:
    a host array of shape ``(1, N, …)`` (``Draws.labels``, ``n_samples = 1``)."""
    return to_numpy(batch.loss.sample(net.forward(params, batch.x), n_samples=1, seed=rng))


def check_labels(method, labels, batch):
    """``Draws.labels`` of QNG/Ginger: an array of shape ``(1, N) + y.shape[1:]`` (one sampled
    target per input, shaped like the batch's targets), else :class:`DrawsError` naming the
    method and the field."""
    want = (1,) + tuple(np.shape(batch.y))
    shape = getattr(labels, "shape", None)
    if shape is None or tuple(shape) != want:
        raise DrawsError(f"{method}: draws.labels must have shape {want} (n_samples = 1, N, …), "
                         f"got {tuple(shape) if shape is not None else type(labels).__name__}")
    return labels


def fisher_vector(net, params, batch, y_hat):
    """``d_t`` of (8), flat in refcurv's order, from the per-sample gradients at the sampled
    labels ``y_hat`` (shape ``(N, …)``): ``d_t = −(1/√N) Σ_i ∇ψ_i(ŷ_i)`` (the fast forms). The
    scale ``1/√N`` is a Python float, so a float32 network gives a float32 ``d_t``."""
    u = net.per_sample_grads(params, batch.x, y_hat, batch.loss)
    return flatten([-ui.sum(axis=0) / math.sqrt(ui.shape[0]) for ui in u])


def fisher_vector_dense(net, params, batch, y_hat):
    """``d_t`` of (8) rearranged for the dense forms: ``(1/√N) Σ_x ∇log p_θ(ŷ|x) =
    −√N ∇Ψ(ŷ)`` with ``Ψ(ŷ)`` the mean loss at the sampled labels (:meth:`Sequential.grad`),
    independent of :func:`fisher_vector`'s per-sample sum."""
    N = np.shape(batch.x)[0]
    return -math.sqrt(N) * flatten(net.grad(params, batch.x, y_hat, batch.loss))


def block_indices(net, blocks):  # host: index metadata (the block layout of θ), not array data
    """Index arrays into the flat θ, one per block (see the module docstring); host NumPy
    arrays (``SampledLabelsMixin._check_blocks`` moves them to the data's backend)."""
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


class SampledLabelsMixin:
    """``draw`` / ``check_draws`` / block check shared by QNG and Ginger: one label per input
    from the model (``labels`` of shape ``(1, N, …)``) for d_t of (8), and per-block state
    lists that must match ``block_indices(net, self.blocks)``."""

    def draw(self, rng, state, net, params, batch):
        """One label per input, ``ŷ ~ p_θ(·|x)`` (8), drawn with the host generator:
        ``labels`` of shape ``(1, N, …)``."""
        from .base import Draws

        return Draws(method=self.name, labels=sampled_labels(net, params, batch, rng))

    def check_draws(self, draws, state, net, params, batch):
        super().check_draws(draws, state, net, params, batch)
        check_labels(self.name, draws.labels, batch)
        return draws

    def _check_blocks(self, net, *per_block, like=None):
        """The block index sets, after checking that every per-block state list has one entry
        per block; on the backend of ``like`` (CuPy fancy indexing then takes device indices)."""
        from ..errors import HyperParameterError

        idx = block_indices(net, self.blocks)
        if any(len(x) != len(idx) for x in per_block):
            raise HyperParameterError(f"state has {len(per_block[0])} blocks, blocks={self.blocks!r} "
                                      f"on this network needs {len(idx)}")
        xp = xp_of(like)
        return idx if xp is np else [xp.asarray(i) for i in idx]
