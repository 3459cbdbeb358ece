"""Parameter tensors of a layer, as TNT ([Ren-thesis] Ch.4) and Shampoo (Algorithm 16) see them.

A refcurv layer matrix ``W ∈ R^{out × (fan_in + 1)}`` (bias last column) is split into

* Linear: the weight ``(out, in)`` (order 2) and the bias ``(out,)`` (order 1);
* Conv2d: the kernel ``(out, c_in, kh, kw)`` (order 4, ``conv_modes=4``, the PyTorch layout)
  or ``(out, c_in, kh·kw)`` (order 3, ``conv_modes=3``, the TNT authors' layout), and the
  bias ``(out,)``.

A layer without bias has one tensor. Each tensor gets its own Kronecker / mode-product
preconditioner, so the bias is a separate 1-mode tensor (as in the TNT code); the
row-major ``vec̄`` of each tensor is the refcurv flattening restricted to its entries.

The second half of the module is what the two methods share (one code path where they do the
same thing): pure kernels (momentum, statistics EMA, refresh schedule, preconditioning with
decoupled weight decay, the tensor layout in θ), the shared state fields
(:class:`TensorState`) and the shared hyper-parameters (:class:`TensorMethod`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import xp_of
from ..errors import HyperParameterError, StateError
from ..nn.layers import Conv2d
from .base import (Method, State, check_choice, check_int, check_nonnegative, check_positive, check_unit, refresh_due,
                   state_field)


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


def tensor_index(layer, conv_modes=4):  # host: index bookkeeping on the host
    """Index maps of :func:`to_tensors`: for each parameter tensor of ``layer``, an integer
    array of the tensor's shape holding the row-major position in ``W`` of each entry."""
    out, d = layer.param_shape
    return to_tensors(layer, np.arange(out * d).reshape(out, d), conv_modes)


def batched_tensors(layer, U, conv_modes=4):
    """Stacked layer matrices ``U`` ``(…, out, d)`` → list of ``(…, *tensor shape)``, i.e.
    :func:`to_tensors` applied to every leading index (by gathering with :func:`tensor_index`)."""
    xp = xp_of(U)
    flat = U.reshape(U.shape[:-2] + (-1,))
    return [flat[..., xp.asarray(idx)] for idx in tensor_index(layer, conv_modes)]


def tensor_positions(tensor_dims):  # host: index bookkeeping on the host
    """Positions in refcurv's flat θ of every parameter tensor's row-major ``vec̄``, from the
    tensor shapes alone: ``tensor_dims[l]`` lists the shapes of layer ``l``'s tensors, the
    weight ``(out, …)`` first, then the bias ``(out,)`` if any. The weight tensor is the first
    ``fan_in = Π(shape[1:])`` columns of ``W ∈ R^{out × d}`` read row-major (every layout of
    :func:`to_tensors`), the bias the last column. Returns one index array per tensor, layers
    in order, for :class:`refcurv.operators.BlockDiagonal` (``index=``)."""
    out_idx, offset = [], 0
    for shapes in tensor_dims:
        out = int(shapes[0][0])
        fan_in = int(np.prod(shapes[0][1:]))
        d = fan_in + (len(shapes) > 1)
        W = offset + np.arange(out * d).reshape(out, d)
        out_idx.append(W[:, :fan_in].ravel())
        if len(shapes) > 1:
            out_idx.append(W[:, -1])
        offset += out * d
    return out_idx


# ------------------------------------------------------------------ shared pure kernels
MOMENTUM_FORMS = ("heavy_ball", "ema")
PHASES = ("k0", "paper")


def momentum_update(m, g, mu, form="heavy_ball"):
    """Per layer ``m ← μ m + g`` (``"heavy_ball"``: [Ren-thesis] Algorithm 15 line 10,
    Algorithm 16 line 7) or ``m ← μ m + (1−μ) g`` (``"ema"``, Adam's first moment, §4.7);
    ``m = None`` is the zero buffer ``m_0 = 0`` of line 2 (so the first heavy-ball buffer is
    ``g`` exactly and the first EMA buffer ``(1−μ) g``)."""
    if form == "heavy_ball":
        return list(g) if m is None else [mu * a + b for a, b in zip(m, g)]
    if m is None:
        return [(1 - mu) * b for b in g]
    return [mu * a + (1 - mu) * b for a, b in zip(m, g)]


def ema_update(old, new, beta):
    """``Ĝ ← β Ĝ + (1−β) Ḡ`` leaf by leaf over the per-layer / per-tensor / per-mode nesting
    ([Ren-thesis] Algorithm 15 line 12, Algorithm 16 line 9); ``old = None`` (no warm start) is
    set to ``new``."""
    if old is None:
        return new
    return map_modes(lambda s, n: beta * s + (1 - beta) * n, old, new)


def phase_due(k, T, phase="k0"):
    """Refresh test at 0-based step ``k``: ``"k0"`` is refcurv's convention
    (:func:`refcurv.methods.base.refresh_due`, ``k ≡ 0 (mod T)``: thesis ``t = 1, T+1, …``);
    ``"paper"`` is the printed ``t ≡ 0 (mod T)`` with the thesis's 1-based ``t = k + 1``
    (Algorithms 15/16 lines 6/11/14 and 8/11: ``t = T, 2T, …``)."""
    return refresh_due(k, T) if phase == "k0" else (k + 1) % T == 0


def precondition_layers(net, grads_like, params, conv_modes, apply, weight_decay=0.0):
    """Per layer: the tensors of ``grads_like`` (the momentum ``m``), each preconditioned by
    ``apply(layer_index, tensor_index, tensor)``, back to the layer layout, plus the decoupled
    weight decay ``γ W`` ([Ren-thesis] Algorithm 15 lines 18-19, Algorithm 16 lines 14-15); the
    update direction is the negative: ``d = −(P(m) + γ W)``."""
    out = []
    for j, (layer, mj, W) in enumerate(zip(net.layers_trainable, grads_like, params)):
        P = from_tensors(layer, [apply(j, q, T) for q, T in enumerate(to_tensors(layer, mj, conv_modes))])
        out.append(-(P + weight_decay * W) if weight_decay else -P)
    return out


# ------------------------------------------------------------------ shared state and base
_DOC_G_HAT = ("per layer, per parameter tensor, per mode i: the moving average Ĝ^{(i)} of the mode "
              "statistics G^{(i)} = mat_i(G) mat_i(G)ᵀ ([Ren-thesis] (4.2); Algorithm 15 line 12, "
              "Algorithm 16 line 9); None before the first refresh without warm_start")
_DOC_FACTORS = ("per layer, per parameter tensor, per mode i: the damped Kronecker factor of the last "
                "preconditioner refresh (TNT: Ũ_i + εI with Ũ_i from Ĝ by (4.10); Shampoo: Ĝ^{(i)} + εI)")


@dataclass(frozen=True, kw_only=True)
class TensorState(State):
    """Fields TNT and Shampoo share (same names, same meanings)."""

    m: Any = state_field("m")
    G_hat: Any = state_field(doc=_DOC_G_HAT)
    factors: Any = state_field(doc=_DOC_FACTORS)


@dataclass(frozen=True)
class TensorMethod(Method):
    """What TNT and Shampoo share ([Ren-thesis] Algorithms 15 and 16 differ only in the
    statistic — TNT's sampled gradients vs Shampoo's mini-batch gradient — and in how the
    statistic becomes a preconditioner, (4.10) inverses vs ``−1/(2k)`` roots): the
    hyper-parameters below, the refresh schedule, the momentum, the statistics EMA, the
    per-tensor preconditioning with decoupled weight decay, and the block layout of the
    curvature operator. Not registered."""

    damping: float = 0.01
    beta: float = 0.9
    momentum: float = 0.9
    momentum_form: str = "heavy_ball"
    weight_decay: float = 0.0
    T_stats: int = 1
    T_inv: int = 1
    phase: str = "k0"
    conv_modes: int = 4

    def _check_shared(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta")
        check_unit(self.momentum, "momentum")
        check_choice(self.momentum_form, "momentum_form", MOMENTUM_FORMS)
        check_nonnegative(self.weight_decay, "weight_decay")
        check_int(self.T_stats, "T_stats")
        check_int(self.T_inv, "T_inv")
        check_choice(self.phase, "phase", PHASES)
        check_int(self.conv_modes, "conv_modes")
        check_choice(self.conv_modes, "conv_modes", (3, 4))

    # -- schedule: a quantity that does not exist yet is computed at the step that needs it
    #    (errata TNT-2: the printed schedule leaves the inverses/roots undefined for t < T_2)
    def stats_due(self, state):
        """The statistics Ĝ are refreshed at this step (``state.k``)."""
        return state.G_hat is None or phase_due(state.k, self.T_stats, self.phase)

    def inv_due(self, state):
        """The preconditioner (factors and their inverses / roots) is refreshed at this step."""
        return state.factors is None or phase_due(state.k, self.T_inv, self.phase)

    def _momentum(self, state, g):
        return momentum_update(state.m, g, self.momentum, self.momentum_form)

    def rhs(self, state, grads):
        """The momentum buffer ``state.m`` (Algorithm 15 line 18 / Algorithm 16 line 14
        precondition ``m``, not the gradient)."""
        return state.m

    @staticmethod
    def _layout(state):
        return tensor_positions([[tuple(F.shape[0] for F in fs) for fs in layer] for layer in state.factors])

    def _check_curvature_state(self, state):
        self.check_state(state)
        if state.factors is None:
            raise StateError(f"{self.name}: state.factors is None (no step taken yet); curvature needs a state "
                             f"returned by {self.name}.step")
