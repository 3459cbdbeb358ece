"""Shampoo as thesis 003 implements it (Algorithm 16, line 2142; Gupta et al. 2018 with the
moving average and coupled-Newton roots of Anil et al. 2020).

Each layer matrix is viewed as parameter tensors by :func:`._tensors.to_tensors` — Linear:
weight ``(out, in)`` (order 2) and bias ``(out,)`` (order 1); Conv2d: kernel
``(out, c_in, kh, kw)`` (order 4, ``conv_modes=4``) or ``(out, c_in, kh·kw)`` (order 3,
``conv_modes=3``, the thesis's CNN setting, line 2249) and bias. Every tensor ``W`` of order
``k`` gets its own preconditioner. Per step (0-based counter ``k_step``, see below):

* momentum (line 7):        ``m̂ ← μ m̂ + ∇_W L``  (``m̂ = 0`` before the first step; no 1−μ);
* statistics (line 9), when ``k_step ≡ 0 (mod T_stats)``:
  ``Ĝ^{(i)} ← β Ĝ^{(i)} + (1 − β) Ḡ^{(i)}``, ``i = 1..k``, with ``Ḡ = ∇_W L`` the *mini-batch
  gradient* (empirical-Fisher statistics; not the momentum) and
  ``Ḡ^{(i)} = mat_i(Ḡ) mat_i(Ḡ)ᵀ`` the contraction of §4.2.1. The first refresh *sets*
  ``Ĝ^{(i)} = Ḡ^{(i)}`` unless :meth:`Shampoo.warm_start` has set them (line 2);
* inverse roots (line 12), when ``k_step ≡ 0 (mod T_inv)``:
  ``R_i = (Ĝ^{(i)} + εI)^{−1/(2k)}`` — ε added to each factor *before* the root — by the
  coupled Newton iteration (``roots="newton"``, tolerance 1e-6 and 100 iterations as in the
  thesis, line 2140) or by ``eigh`` (``roots="eigh"``); between refreshes the stale roots
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

Both forms run the same state update (statistics, refresh, and the roots by the chosen
``roots`` method), so they return identical states; only the direction differs: with
``roots="eigh"`` the two agree to rounding, with ``roots="newton"`` within the bound implied
by the Newton stopping rule (``max|M − I| ≤ tol``, see :mod:`refcurv.linalg.roots` and
``tests/test_method_shampoo.py``).

Coupled-Newton failure (``NewtonReport.converged`` false, e.g. the iteration cap or a rounding
plateau above ``newton_tol``): ``on_newton_failure="eigh"`` (default) replaces that root by
the ``eigh`` root, emits a ``RuntimeWarning`` and counts it in ``state["fallbacks"]``;
``"raise"`` raises :class:`NewtonConvergenceError`. The Newton reports of the last refresh
are kept in ``state["newton"]``.

Deviations from / choices where the pseudo-code is silent (docs/errata.md):

* The step counter is 0-based: statistics and roots are refreshed at ``k_step ≡ 0`` (i.e.
  thesis ``t ≡ 1``), so that the first step has roots; read literally (``t ≡ 0 mod T_2``,
  ``t ≥ 1``) line 12 leaves the roots undefined for ``t < T_2``. The authors' code counts
  from 0 the same way.
* ``μ = β = 0.9`` are fixed in line 1; here they are hyper-parameters with those defaults.
* Line 2 initializes ``\\overline{∇_W L} = 0``: that is the momentum ``\\widehat{∇_W L}``
  (as Algorithm 15 line 2 writes it).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import reduce


from ..backend import xp_of
from ..errors import HyperParameterError, NewtonConvergenceError
from ..linalg.roots import inv_root_eigh, inv_root_newton
from ..linalg.tensor import contraction, kron_apply
from ._tensors import from_tensors, map_modes, to_tensors
from .base import Method, check_choice, check_int, check_nonnegative, check_positive, check_unit
from .registry import register


def tensor_statistics(layer, g, conv_modes):
    """Per tensor of the layer gradient ``g`` (layer layout): ``[Ḡ^{(1)}, …, Ḡ^{(k)}]`` with
    ``Ḡ^{(i)} = mat_i(Ḡ) mat_i(Ḡ)ᵀ`` (thesis §4.2.1, contraction; Algorithm 16 line 9)."""
    return [[contraction(T, i) for i in range(T.ndim)] for T in to_tensors(layer, g, conv_modes)]


@register
@dataclass(frozen=True)
class Shampoo(Method):
    """Shampoo (thesis 003 Algorithm 16). Hyper-parameters: ``damping`` ε (added to every
    factor before its root), EMA ``beta`` β, gradient ``momentum`` μ, decoupled
    ``weight_decay`` γ, statistics / root frequencies ``T_stats`` (T₁) / ``T_inv`` (T₂),
    ``conv_modes`` (4: ``(out, c_in, kh, kw)``, 3: ``(out, c_in, kh·kw)``), ``roots``
    ("newton" | "eigh"), ``newton_tol`` / ``newton_max_iter`` (thesis: 1e-6 / 100),
    ``on_newton_failure`` ("eigh" | "raise")."""

    damping: float = 0.01
    beta: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 0.0
    T_stats: int = 1
    T_inv: int = 1
    conv_modes: int = 4
    roots: str = "newton"
    newton_tol: float = 1e-6
    newton_max_iter: int = 100
    on_newton_failure: str = "eigh"

    name = "shampoo"
    seed_ref = "003 Alg. 16; Prop. 1 (4.3)"
    summary = "per-tensor Kronecker preconditioner ⊗(Ĝ⁽ⁱ⁾ + εI)^(−1/2k) of EMA gradient contractions, by mode products"

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta")
        check_unit(self.momentum, "momentum")
        check_nonnegative(self.weight_decay, "weight_decay")
        check_int(self.T_stats, "T_stats")
        check_int(self.T_inv, "T_inv")
        check_int(self.conv_modes, "conv_modes")
        check_choice(self.conv_modes, "conv_modes", (3, 4))
        check_choice(self.roots, "roots", ("newton", "eigh"))
        check_positive(self.newton_tol, "newton_tol")
        check_int(self.newton_max_iter, "newton_max_iter")
        check_choice(self.on_newton_failure, "on_newton_failure", ("eigh", "raise"))

    def init(self, net, params):
        return {"k": 0, "m": None, "stats": None, "damped": None, "roots": None, "newton": None, "fallbacks": 0}

    def warm_start(self, state, net, params, batches):
        """Line 2: ``Ĝ^{(i)} = E[Ḡ^{(i)}]`` estimated as the mean over ``batches`` (a Batch or a
        sequence of them, e.g. one pass over the data set) of the mini-batch-gradient
        contractions."""
        batches = [batches] if not isinstance(batches, (list, tuple)) else list(batches)
        if not batches:
            raise HyperParameterError("warm_start needs at least one batch")
        layers = net.layers_trainable
        total = None
        for b in batches:
            g = net.grad(params, b.x, b.y, b.loss)
            s = [tensor_statistics(lay, gl, self.conv_modes) for lay, gl in zip(layers, g)]
            total = s if total is None else map_modes(lambda a, c: a + c, total, s)
        n = len(batches)
        return {**state, "stats": map_modes(lambda a: a / n, total)}

    def _root(self, D, p, where):
        """``D^{−1/p}`` by the chosen method; returns ``(root, NewtonReport or None, fell_back)``."""
        if self.roots == "eigh":
            return inv_root_eigh(D, p), None, False
        X, rep = inv_root_newton(D, p, max_iter=self.newton_max_iter, tol=self.newton_tol)
        if rep.converged:
            return X, rep, False
        msg = (f"coupled Newton for {where} (p = {p}) stopped after {rep.iterations} iterations with "
               f"max|M − I| = {rep.error:.3e} > newton_tol = {self.newton_tol:.1e}")
        if self.on_newton_failure == "raise":
            raise NewtonConvergenceError(msg)
        warnings.warn(msg + "; using the eigh root", RuntimeWarning, stacklevel=4)
        return inv_root_eigh(D, p), rep, True

    def _update(self, state, net, params, batch):
        """Lines 7, 9, 12 (shared by both forms): momentum, statistics, refreshed roots."""
        k = state["k"]
        layers = net.layers_trainable
        g = net.grad(params, batch.x, batch.y, batch.loss)
        m = g if state["m"] is None else [self.momentum * a + b for a, b in zip(state["m"], g)]
        stats = state["stats"]
        if k % self.T_stats == 0:
            new = [tensor_statistics(lay, gl, self.conv_modes) for lay, gl in zip(layers, g)]
            b = self.beta
            stats = new if stats is None else map_modes(lambda S, Sn: b * S + (1 - b) * Sn, stats, new)
        new_state = {**state, "k": k + 1, "m": m, "stats": stats}
        if k % self.T_inv == 0 or state["roots"] is None:
            damped = map_modes(lambda S: S + self.damping * xp_of(S).eye(S.shape[0], dtype=S.dtype), stats)
            # (Ĝ^{(i)} + εI)^{−1/(2k)}, k = the tensor's order = its number of factors
            out = [[[self._root(D, 2 * len(factors), f"layer {li}, tensor {ti}, mode {i}")
                     for i, D in enumerate(factors)] for ti, factors in enumerate(lay)]
                   for li, lay in enumerate(damped)]
            new_state.update(damped=damped, roots=map_modes(lambda o: o[0], out), newton=map_modes(lambda o: o[1], out),
                             fallbacks=state["fallbacks"] + sum(o[2] for lay in out for t in lay for o in t))
        return m, new_state

    def _finish(self, layer, p_tensors, W):
        """Lines 15–16: ``−(p + γ W)`` in the layer layout."""
        P = from_tensors(layer, p_tensors)
        return -(P + self.weight_decay * W) if self.weight_decay else -P

    def _fast(self, state, net, params, batch, draws):
        m, new_state = self._update(state, net, params, batch)
        direction = []
        for lay, ml, R, W in zip(net.layers_trainable, m, new_state["roots"], params):
            # Proposition 1: m̂ ×_1 R_1 ⋯ ×_k R_k = (R_1 ⊗ ⋯ ⊗ R_k) vec̄(m̂)
            p = [kron_apply(Rs, T) for Rs, T in zip(R, to_tensors(lay, ml, self.conv_modes))]
            direction.append(self._finish(lay, p, W))
        return direction, new_state

    def _dense(self, state, net, params, batch, draws):
        m, new_state = self._update(state, net, params, batch)
        direction = []
        for lay, ml, D, W in zip(net.layers_trainable, m, new_state["damped"], params):
            p = []
            for Ds, T in zip(D, to_tensors(lay, ml, self.conv_modes)):
                xp = xp_of(T)
                # ⊗_i (Ĝ^{(i)} + εI)^{−1/(2k)}, dense, roots by eigh, row-major vec̄ (Prop. 1)
                K = reduce(xp.kron, [inv_root_eigh(Di, 2 * T.ndim) for Di in Ds])
                p.append((K @ T.reshape(-1)).reshape(T.shape))
            direction.append(self._finish(lay, p, W))
        return direction, new_state
