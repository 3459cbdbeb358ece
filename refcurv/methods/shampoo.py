"""Shampoo as [Ren-thesis] implements it (Algorithm 16, line 2142; Gupta et al. 2018 with the
moving average and coupled-Newton roots of Anil et al. 2020).

``rhs`` is the momentum buffer ``state.m`` and the curvature ``C`` is, per parameter tensor
of order ``k``, ``(⊗_i R_i)^{-1}`` with ``R_i = (Ĝ^{(i)} + εI)^{-1/(2k)}`` the roots the step
used (:meth:`Shampoo.curvature`: ``BlockDiagonal([Inverse(Kronecker(R_1, …, R_k))])``), so
``d = −C⁻¹ m − γ θ``; the curvature contract holds for the default ``weight_decay = 0``
(weight decay is added outside the solve).

Each layer matrix is viewed as parameter tensors by :func:`._tensors.to_tensors` — Linear:
weight ``(out, in)`` (order 2) and bias ``(out,)`` (order 1); Conv2d: kernel
``(out, c_in, kh, kw)`` (order 4, ``conv_modes=4``) or ``(out, c_in, kh·kw)`` (order 3,
``conv_modes=3``, the thesis's CNN setting, line 2249) and bias. Every tensor ``W`` of order
``k`` gets its own preconditioner. Per step (0-based counter ``k_step``, see below):

* momentum (line 7):        ``m̂ ← μ m̂ + ∇_W L``  (``m̂ = 0`` before the first step; no 1−μ;
  ``momentum_form="ema"`` gives ``m̂ ← μ m̂ + (1−μ) ∇_W L`` instead);
* statistics (line 9), when ``k_step ≡ 0 (mod T_stats)`` (``phase="k0"``; see below):
  ``Ĝ^{(i)} ← β Ĝ^{(i)} + (1 − β) Ḡ^{(i)}``, ``i = 1..k``, with ``Ḡ = ∇_W L`` the *mini-batch
  gradient* (empirical-Fisher statistics; not the momentum) and
  ``Ḡ^{(i)} = mat_i(Ḡ) mat_i(Ḡ)ᵀ`` the contraction of §4.2.1. The first refresh *sets*
  ``Ĝ^{(i)} = Ḡ^{(i)}`` unless :meth:`Shampoo.warm_start` has set them (line 2);
* inverse roots (line 12), when ``k_step ≡ 0 (mod T_inv)``:
  ``R_i = (Ĝ^{(i)} + εI)^{−1/(2k)}`` — ε added to each factor *before* the root — by the
  coupled Newton iteration (``root_method="newton"``, tolerance 1e-6 and 100 iterations as in the
  thesis, line 2140) or by ``eigh`` (``root_method="eigh"``); between refreshes the stale roots
  are reused;
* direction (lines 14–16):  ``p = m̂ ×_1 R_1 ×_2 ⋯ ×_k R_k``, ``p ← p + γ W`` (decoupled
  weight decay, on every tensor including biases), and the update direction is ``−p``
  (refcurv steps ``θ ← θ + lr · direction``).

Vectorization: tensor row-major ``vec̄`` (§4.2.1), which is refcurv's row-major flattening
restricted to the tensor's entries. By Proposition 1 (4.3)/(4.9) the fast form's mode
products equal ``(R_1 ⊗ ⋯ ⊗ R_k) vec̄(m̂)``; the dense form forms that Kronecker product
explicitly, with every root computed by ``eigh`` from the damped factors
``Ĝ^{(i)} + εI`` stored at the last refresh. For ``k = 2`` this is Gupta et al.'s two-sided
update ``L^{−1/4} m̂ R^{−1/4}``, ``L = Ĝ^{(1)} + εI``, ``R = Ĝ^{(2)} + εI``.

The two forms. The fast form contracts the gradient's tensors (:func:`tensor_statistics`),
computes roots by the chosen ``roots`` method and applies them by mode products. The dense
form computes the statistics from the definition — the outer product
``vec̄(Ḡ) vec̄(Ḡ)ᵀ`` of the tensor's block of ``refcurv.curvature.grad``, reduced by the partial
trace :func:`refcurv.linalg.kronecker.mode_marginal` — and its roots by ``eigh``
(``state.newton`` is ``None`` per mode), and forms the Kronecker product. The states agree
to rounding (roots: within the Newton stopping rule); the directions agree with
``root_method="eigh"`` to rounding, with ``root_method="newton"`` within the bound implied by the Newton
stopping rule (``max|M − I| ≤ tol``, see :mod:`refcurv.linalg.roots` and
``tests/test_method_shampoo.py``).
Shared by both forms: the refresh schedule (:meth:`~._tensors.TensorMethod.stats_due` /
``inv_due``, :func:`~._tensors.phase_due`), :func:`~._tensors.momentum_update`,
:func:`~._tensors.ema_update`, :func:`refcurv.linalg.kronecker.add_damping`,
:func:`~._tensors.precondition_layers` (tensor views and weight decay). Each has its own test.

Coupled-Newton failure (``NewtonReport.converged`` false, e.g. the iteration cap or a rounding
plateau above ``newton_tol``): ``on_newton_failure="eigh"`` (default) replaces that root by
the ``eigh`` root, emits a ``RuntimeWarning`` and counts it;
``"raise"`` raises :class:`NewtonConvergenceError`. The Newton reports of the last refresh
are kept in ``state.newton``; the count so far in ``state.newton_fallbacks`` and in
``diagnostics["newton_fallbacks"]``.

Deviations from / choices where the pseudo-code is silent (docs/errata.md):

* The step counter is 0-based: statistics and roots are refreshed at ``k_step ≡ 0`` (i.e.
  thesis ``t ≡ 1``), so that the first step has roots; read literally (``t ≡ 0 mod T_2``,
  ``t ≥ 1``) line 12 leaves the roots undefined for ``t < T_2``. The authors' code counts
  from 0 the same way. ``phase="paper"`` refreshes at the printed ``t ≡ 0 (mod T)``,
  ``t = k_step + 1``; in both phases statistics or roots that do not exist yet are computed
  at the first step that needs them.
* ``μ = β = 0.9`` are fixed in line 1; here they are hyper-parameters with those defaults.
* Line 2 initializes ``\\overline{∇_W L} = 0``: that is the momentum ``\\widehat{∇_W L}``
  (as Algorithm 15 line 2 writes it).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import reduce
from typing import Any

import math


from .. import curvature as cv
from .. import curvature as _curv
from ..backend import xp_of
from ..errors import HyperParameterError, NewtonConvergenceError
from ..linalg.kronecker import add_damping, mode_marginal
from ..linalg.roots import inv_root_eigh, inv_root_newton
from ..linalg.tensor import contraction, kron_apply
from ..operators import BlockDiagonal, Inverse, Kronecker
from ..vec import unflatten
from ._tensors import (TensorMethod, TensorState, ema_update, map_modes, precondition_layers, tensor_index,
                       to_tensors)
from .base import check_choice, check_int, check_positive, state_field
from .registry import register


def tensor_statistics(layer, g, conv_modes):
    """Per tensor of the layer gradient ``g`` (layer layout): ``[Ḡ^{(1)}, …, Ḡ^{(k)}]`` with
    ``Ḡ^{(i)} = mat_i(Ḡ) mat_i(Ḡ)ᵀ`` (thesis §4.2.1, contraction; Algorithm 16 line 9)."""
    return [[contraction(T, i) for i in range(T.ndim)] for T in to_tensors(layer, g, conv_modes)]


@dataclass(frozen=True, kw_only=True)
class ShampooState(TensorState):
    """Shampoo's state: ``k``, ``m`` (momentum ``\\widehat{∇_W L}``), ``G_hat`` (Ĝ^{(i)}),
    ``factors`` (Ĝ^{(i)} + εI at the last refresh), ``roots``, ``newton``,
    ``newton_fallbacks``, ``diagnostics`` (``refreshed``, ``stats_refreshed``,
    ``newton_fallbacks``)."""

    roots: Any = state_field(doc="per layer, per parameter tensor, per mode i: R_i = (Ĝ^{(i)} + εI)^{-1/(2k)} of the "
                                 "last refresh (Algorithm 16 line 12), k the tensor's order")
    newton: Any = state_field(doc="per layer, per parameter tensor, per mode: the NewtonReport of the coupled-Newton "
                                  "root of the last refresh (None for eigh roots)")
    newton_fallbacks: int = state_field(doc="coupled-Newton roots replaced by eigh roots so far", default=0)


@register
@dataclass(frozen=True)
class Shampoo(TensorMethod):
    """Shampoo ([Ren-thesis] Algorithm 16). Hyper-parameters: ``damping`` ε (added to every
    factor before its root), EMA ``beta`` β, gradient ``momentum`` μ with ``momentum_form``
    (``"heavy_ball"`` as line 7 prints | ``"ema"``), decoupled ``weight_decay`` γ, statistics /
    root intervals ``T_stats`` (T₁) / ``T_inv`` (T₂) with ``phase`` (``"k0"`` | ``"paper"``),
    ``conv_modes`` (4: ``(out, c_in, kh, kw)``, 3: ``(out, c_in, kh·kw)``), ``roots``
    ("newton" | "eigh"), ``newton_tol`` / ``newton_max_iter`` (thesis: 1e-6 / 100),
    ``on_newton_failure`` ("eigh" | "raise").

    ``rhs`` is the momentum buffer ``state.m``; ``C`` per parameter tensor is
    ``(⊗_i R_i)^{-1}``, ``R_i = (Ĝ^{(i)} + εI)^{-1/(2k)}`` (direction ``−C⁻¹ m − γ θ``; the
    curvature contract holds for the default ``weight_decay = 0``). No draws. Diagnostics:
    ``refreshed``, ``stats_refreshed``, ``newton_fallbacks``.

    Shared by both forms: refresh schedule, momentum, statistics EMA,
    :func:`~refcurv.linalg.kronecker.add_damping`, tensor views and weight decay (module
    docstring)."""

    root_method: str = "newton"
    newton_tol: float = 1e-6
    newton_max_iter: int = 100
    on_newton_failure: str = "eigh"

    name = "shampoo"
    seed_ref = "[Ren-thesis] Alg. 16; Prop. 1 (4.3)"
    summary = "per-tensor Kronecker preconditioner ⊗(Ĝ⁽ⁱ⁾ + εI)^(−1/2k) of EMA gradient contractions, by mode products"
    State = ShampooState

    def __post_init__(self):
        self._check_shared()
        check_choice(self.root_method, "root_method", ("newton", "eigh"))
        check_positive(self.newton_tol, "newton_tol")
        check_int(self.newton_max_iter, "newton_max_iter")
        check_choice(self.on_newton_failure, "on_newton_failure", ("eigh", "raise"))

    def init(self, net, params):
        return ShampooState()

    def warm_start(self, state, net, params, batches):
        """Line 2: ``Ĝ^{(i)} = E[Ḡ^{(i)}]`` estimated as the mean over ``batches`` (a Batch or a
        sequence of them, e.g. one pass over the data set) of the mini-batch-gradient
        contractions."""
        batches = [batches] if not isinstance(batches, (list, tuple)) else list(batches)
        if not batches:
            raise HyperParameterError("warm_start needs at least one batch")
        self.check_state(state)
        layers = net.layers_trainable
        total = None
        for b in batches:
            g = cv._mean_layer_grads(net, params, b.x, b.y, b.loss)
            s = [tensor_statistics(lay, gl, self.conv_modes) for lay, gl in zip(layers, g)]
            total = s if total is None else map_modes(lambda a, c: a + c, total, s)
        n = len(batches)
        return state.replace(G_hat=map_modes(lambda a: a / n, total))

    def _root(self, D, p, where):
        """``D^{−1/p}`` by the chosen method; returns ``(root, NewtonReport or None, fell_back)``."""
        if self.root_method == "eigh":
            return inv_root_eigh(D, p), None, False
        X, rep = inv_root_newton(D, p, max_iter=self.newton_max_iter, tol=self.newton_tol)
        if rep.converged:
            return X, rep, False
        msg = (f"coupled Newton for {where} (p = {p}) stopped after {rep.iterations} iterations with "
               f"max|M − I| = {rep.error:.3e} > newton_tol = {self.newton_tol:.1e}")
        if self.on_newton_failure == "raise":
            raise NewtonConvergenceError(msg)
        warnings.warn(msg + "; using the eigh root", RuntimeWarning, stacklevel=5)
        return inv_root_eigh(D, p), rep, True

    def dense_statistics(self, net, params, g_flat):
        """Per layer, per tensor, ``[Ḡ^{(i)}]`` by the definition: the partial traces
        (:func:`~refcurv.linalg.kronecker.mode_marginal`) of ``vec̄(Ḡ) vec̄(Ḡ)ᵀ`` for the
        tensor's entries of the mini-batch gradient ``g_flat`` (refcurv's flat θ)."""
        out, off = [], 0
        for layer in net.layers_trainable:
            n = int(math.prod(layer.param_shape))
            gl = g_flat[off:off + n]
            off += n
            tensors = []
            for idx in tensor_index(layer, self.conv_modes):
                v = gl[idx.ravel()]
                tensors.append([mode_marginal(xp_of(v).outer(v, v), idx.shape, i) for i in range(idx.ndim)])
            out.append(tensors)
        return out

    def _step(self, state, g, new_stats, roots_of):
        """Lines 7, 9, 12: momentum, statistics, refreshed roots (``roots_of(factors)`` →
        nested ``(root, report, fell_back)``)."""
        m = self._momentum(state, g)
        stats_ref, refreshed = self.stats_due(state), self.inv_due(state)
        G_hat = ema_update(state.G_hat, new_stats(), self.beta) if stats_ref else state.G_hat
        factors, roots, newton, fallbacks = state.factors, state.roots, state.newton, state.newton_fallbacks
        if refreshed:
            factors = [[add_damping(S, self.damping) for S in layer] for layer in G_hat]
            out = roots_of(factors)
            roots, newton = map_modes(lambda o: o[0], out), map_modes(lambda o: o[1], out)
            fallbacks = fallbacks + sum(o[2] for lay in out for t in lay for o in t)
        return state.replace(k=state.k + 1, m=m, G_hat=G_hat, factors=factors, roots=roots, newton=newton,
                             newton_fallbacks=fallbacks,
                             diagnostics={"refreshed": bool(refreshed), "stats_refreshed": bool(stats_ref),
                                          "newton_fallbacks": int(fallbacks)})

    def _fast(self, state, net, params, batch, draws):
        layers = net.layers_trainable
        g = cv._mean_layer_grads(net, params, batch.x, batch.y, batch.loss)

        def roots_of(factors):
            # (Ĝ^{(i)} + εI)^{−1/(2k)}, k = the tensor's order = its number of factors
            return [[[self._root(D, 2 * len(fs), f"layer {li}, tensor {ti}, mode {i}") for i, D in enumerate(fs)]
                     for ti, fs in enumerate(lay)] for li, lay in enumerate(factors)]

        new = self._step(state, g, lambda: [tensor_statistics(lay, gl, self.conv_modes)
                                            for lay, gl in zip(layers, g)], roots_of)
        R = new.roots
        # Proposition 1: m̂ ×_1 R_1 ⋯ ×_k R_k = (R_1 ⊗ ⋯ ⊗ R_k) vec̄(m̂)
        d = precondition_layers(net, new.m, params, self.conv_modes, lambda j, q, M: kron_apply(R[j][q], M),
                                self.weight_decay)
        return d, new

    def _dense(self, state, net, params, batch, draws):
        g_flat = _curv.grad(net, params, batch.x, batch.y, batch.loss)
        g = unflatten(g_flat, net)
        # roots by eigh of the damped factors (no Newton reports), then ⊗_i R_i formed
        new = self._step(state, g, lambda: self.dense_statistics(net, params, g_flat),
                         lambda factors: [[[(inv_root_eigh(D, 2 * len(fs)), None, False) for D in fs] for fs in lay]
                                          for lay in factors])
        R = new.roots

        def apply(j, q, M):  # (⊗_i R_i) vec̄(m), row-major vec̄ (Proposition 1)
            K = reduce(xp_of(M).kron, R[j][q])
            return (K @ M.reshape(-1)).reshape(M.shape)

        return precondition_layers(net, new.m, params, self.conv_modes, apply, self.weight_decay), new

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``C = BlockDiagonal([Inverse(R_1 ⊗ ⋯ ⊗ R_k) per parameter tensor])`` over θ (weight and
        bias separate blocks), from the state alone: ``C⁻¹ m`` applies the roots."""
        self._check_curvature_state(state)
        blocks = [Inverse(Kronecker(*Rs)) for layer in state.roots for Rs in layer]
        return BlockDiagonal(blocks, index=self._layout(state))
