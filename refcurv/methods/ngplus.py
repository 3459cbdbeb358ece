"""NG+: the multi-step matrix-product natural gradient ([NG+], Yang, Xu, Cui, Wen, Xu).

Equation numbers refer to ``shared/seeds/002_6132dcc897dbc987.txt``. One layer's weight
``Θ ∈ R^{m×n}`` is refcurv's ``(out, d)`` matrix (bias last column): NG+ works on that
matrix, and its curvature acts on refcurv's row-major ``vec(Θ)`` (:meth:`NGPlus.curvature`).
Per-sample gradients are unscaled, ``𝒢_i = G_i A_iᵀ`` (8) with refcurv's factors
``G_i ∈ R^{m×κ}``, ``A_i ∈ R^{n×κ}`` (κ = 1 for Linear, the output locations for Conv2d);
the mini-batch gradient is their mean ``𝐆 = (1/N) Σ 𝒢_i``.

GFIM (2), (4)-(5) on the batch: ``L = (1/N) Σ 𝒢_i 𝒢_iᵀ`` (``m × m``, used when ``m ≤ n``) and
``R = (1/N) Σ 𝒢_iᵀ 𝒢_i`` (``n × n``, ``m > n``). Direction (6), a descent direction
(step ``Θ ← Θ + lr·D``)::

    D = −(λI + L)^{-1} 𝐆          (side "left")
    D = −𝐆 (λI + R)^{-1}          (side "right")

A "right" layer is handled as a "left" layer of the transposed problem (``𝒢_iᵀ = A_i G_iᵀ``,
``𝐆ᵀ``): the kernels (:mod:`refcurv.linalg.gfim`, one pure function per equation, each
tested on its own) are written for the left side.

:class:`NGPlus` (``"ngplus"``) — options, freely combined except where noted:

* ``side``: ``"auto"`` (per layer, (4) if ``m ≤ n`` else (5), as
  :func:`refcurv.curvature.gfim_side`), or ``"left"``/``"right"`` forced.
* ``T_inv`` = 𝒯 (Algorithm 1): the statistic is rebuilt and refactorized at the 0-based
  steps ``k ≡ 0 (mod 𝒯)`` (:func:`~refcurv.methods.base.refresh_due`: Algorithm 1 prints
  ``for k = 0, 1, …: if k mod 𝒯 = 0``, the same phase, so there is no ``phase`` option); in
  between the stored matrix and its factorization are reused (``L_k = L_{k−1}``) with the
  current gradient.
* ``statistics``: ``"batch"`` (4)-(5); ``"momentum"`` (11), ``L̄_k = β L̄_{k−1} + (1−β) L_k``,
  ``L̄_0 = L_0`` (the bars the text lost, errata NG+-1); ``"minibatch"`` (12),
  ``L̃_k = β L̃_{k−1} + γ 𝐆_k 𝐆_kᵀ`` from ``L̃ = λ₀I`` (``γ = stats_weight``,
  ``λ₀ = stats_init``). (11) and (12) never apply together, so one ``beta`` is the decay of
  either (``[0, 1)`` for (11), where β = 1 would freeze ``L̄ = L_0``; ``[0, 1]`` for (12), where
  β = γ = 1 is Shampoo's sum). Both averages advance at refresh steps only.
* ``gram="sketch"``: sketched products (17), ``𝒢_i𝒢_iᵀ ≈ (𝒢_iΩᵀ)(𝒢_iΩᵀ)ᵀ`` with NG+'s
  uniform row sampling ``Ω ∈ R^{q×n}`` (rows ``√(n/q) e_jᵀ``, ``E[ΩᵀΩ] = I_n``; the paper's
  ``n×q`` Ω transposed), one draw per layer per refresh, ``q = sketch_size``, over the long
  dimension. Fast form: rows of ``A_i`` are sampled, ``𝒢_iΩᵀ = G_i (Ω A_i)ᵀ``; no extra cost.
* ``block_size`` = p: block-diagonal approximation (18), ``s = ⌈m/p⌉`` diagonal blocks
  ``(1/N) Σ 𝒢_i^{j,p} (𝒢_i^{j,p})ᵀ``, stored as one ``(s, p, p)`` array and factorized by one
  batched Cholesky (no loop over blocks). When ``p`` does not divide ``m`` the last block
  has ``m − (s−1)p`` rows; it is padded with zero gradient rows (its padded part of
  ``λI + L`` is ``λI``, decoupled, so the solution there is exactly zero).
* ``solver``: ``"cholesky"`` (factorize ``λI + L``); ``"smw"``, the SMW form (14)
  corrected (errata NG+-2), ``(λI + UUᵀ)^{-1} = λ^{-1}[I − U(λI + UᵀU)^{-1}Uᵀ]`` with
  ``U = N^{-1/2}[√c_1 g_1, …, √c_N g_N]``, ``c_i = a_iᵀa_i`` for κ = 1 (for κ > 1 the same
  identity holds with the columns ``G_i (A_iᵀA_i)^{1/2}``, N·κ of them); ``"ls"``, the
  regularized least squares (15) with its dimensions corrected (errata NG+-3),
  ``D* = argmin_{D ∈ R^{r×n}} ‖U D − 𝐆‖² + λ‖D‖²``, direction ``−(𝐆 − U D*)/λ``, solved by a
  QR factorization of ``[U; √λ I]``; ``"sketch_ls"``, the sketched LS (16) with
  ``Ω ∈ R^{q×m}`` (uniform row sampling of U's rows, unbiased weights), whose direction
  is ``−(𝐆 − U D̂)/λ = −(λI + UUᵀΩᵀΩ)^{-1} 𝐆`` (push-through identity). The low-rank
  solvers need ``statistics="batch"``, ``gram="exact"`` and no ``block_size``.
* ``variant="authors"`` (design §8, the authors' ``NGPlus.py``): left factor only,
  damping ``√λ`` added instead of λ, and a Conv2d layer's statistic scaled by ``1/√κ``
  (the code's ``1/(B·√(H_out·W_out))``); everything else as the paper.

Draws (:class:`~refcurv.methods.Draws`): at refresh steps of a sketched configuration
(``gram="sketch"`` or ``solver="sketch_ls"``), ``sketches["Omega/<j>"]`` is layer ``j``'s
sketch *matrix* ``Ω ∈ R^{q×dim}`` (``q = sketch_size`` when drawn by :meth:`NGPlus.draw`; an injected sketch may use any
``q``; ``dim`` the long side ``n`` of the oriented layer for (17), the short side ``m`` for
(16)); nothing is drawn otherwise. Both
forms consume exactly the matrices given (a row-sampling matrix is applied by indexing, any
other matrix densely; :func:`refcurv.linalg.gfim.as_sketch`).

Dense form: the matrix the paper defines, formed densely from refcurv's float64 per-sample
gradients — ``refcurv.curvature.gfim`` for (4)-(5); ``(1/N) Σ 𝒢_i ΩᵀΩ 𝒢_iᵀ`` from the drawn
Ω matrix for (17); ``𝐆ΩᵀΩ𝐆ᵀ`` for (12); the ``m × m`` matrix with its off-block entries
zeroed for (18); (11)/(12) written out as recurrences on those matrices; ``λI + UUᵀΩᵀΩ``,
non-symmetric, for (16) — solved by ``spd_solve`` (LU for (16)). It does not call the fast
form's statistic, accumulation, factorization or solve kernels.

Shared by both forms: the per-layer sides (:func:`~refcurv.linalg.gfim.sides`), the
orientation (:func:`~refcurv.linalg.gfim.orient`), the refresh schedule
(:func:`~refcurv.methods.base.refresh_due`), the draws, and the state's storage formats —
the (18) blocks (:func:`~refcurv.linalg.gfim.dense_to_blocks`,
:func:`~refcurv.linalg.gfim.blocks_to_dense`) and the low-rank factor U of (14)
(:func:`~refcurv.linalg.gfim.lowrank_factor`, which the dense form stores but does not solve
with at the refresh step). Each has its own test in tests/test_linalg_gfim.py. Both forms
return an :class:`NGPlusState`; the dense form stores ``factorization = None`` and the fast
form then refactorizes, so states are interchangeable.

Agreement (tests/test_method_ngplus.py): fast = dense per layer to a relative error
``C·n_eff·eps·κ`` with ``κ = (λ + ‖L‖₂)/λ`` (the condition number of ``λI + L``, blockwise
maximum for (18)), ``n_eff = m + n + N·κ_conv`` (the longest reductions: forming ``L`` over
``n`` or ``N·κ_conv`` terms, the ``m × m`` solve) and C = 100 — the model of
:mod:`refcurv.testing.tolerance`: forward error of a backward-stable solve at ``C·n·eps·κ``.
The SMW (14) and LS (15) answers are formed as ``(𝐆 − correction)/λ``; the correction has
norm ``≤ ‖𝐆‖`` (``U(λI + UᵀU)^{-1}Uᵀ ⪯ I``) and the answer norm is ``≥ ‖𝐆‖/(λ + ‖L‖)``, so
the rounding of that subtraction is amplified by at most ``(λ + ‖L‖)/λ = κ`` — the same
factor (the cancellation factor ``‖G‖/λ`` of the tolerance model). (A worst-case analysis
that lets the capacitance solve's backward error align with the data gives up to
``κ^{3/2}``; the tests keep the model's κ, and the errors measured over the ``thorough``
profile stay below 1% of it.) For the sketched LS (16) the dense matrix is non-symmetric
and solved by LU, the fast form by a QR of ``[ΩU; √λI]``:
``κ = max(cond₂(λI + UUᵀΩᵀΩ), (λ + ‖ΩU‖₂²)/λ)``.

:class:`NGPlusOnlineNewton` (``"ngplus_online_newton"``): the online-Newton iteration (19)
with ``L_t = L_{t−1} + 𝐆_t𝐆_tᵀ`` (errata NG+-4; ``L_0 = λI``, the paper's ε) and the
projection onto the Frobenius ball ``K = {‖Θ‖_F ≤ radius}`` (per layer) in the ``L_t``-norm
that Lemma 6 needs (errata NG+-6).

EFIM vs GFIM (9)-(10), errata NG+-5: for i.i.d. zero-mean columns,
``E[vec(𝒢)vec(𝒢)ᵀ] = I_n ⊗ E[𝒢𝒢ᵀ]/n`` (paper's column-major vec), i.e.
``E[𝒢𝒢ᵀ]/n ⊗ I_n`` in refcurv's row-major vec — the 1/n the text drops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import asarray_like, to_numpy, xp_of
from ..errors import DrawsError, HyperParameterError, StateError
from ..linalg import gfim as GF
from ..linalg import sketch as SK
from ..linalg.woodbury import spd_solve
from ..nn.layers import Conv2d
from ..operators import BlockDiagonal
from ..vec import unflatten
from .base import (
    Draws,
    Method,
    State,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    check_unit,
    refresh_due,
    state_field,
)
from .registry import register

SIDES = ("auto", "left", "right")
STATISTICS = ("batch", "momentum", "minibatch")
GRAMS = ("exact", "sketch")
SOLVERS = ("cholesky", "smw", "ls", "sketch_ls")
VARIANTS = ("paper", "authors")
PROJECTIONS = ("L", "euclidean")
LOWRANK = ("smw", "ls", "sketch_ls")
F64 = np.float64


# ------------------------------------------------------------------ states
@dataclass(frozen=True, kw_only=True)
class NGPlusState(State):
    """State of :class:`NGPlus` (never mutated; per-layer tuples in the network's order)."""

    sides: tuple = state_field(doc="per layer 'left' (GFIM L, NG+ (4)) or 'right' (R, (5)): the side the layer uses")
    shapes: tuple = state_field(doc="per layer the shape (m, n) of Θ: refcurv's (out, d) weight, bias last column")
    L: tuple = state_field(doc="per 'left' layer the m×m statistic of the last refresh: L_k (4), L̄_k (11) or "
                               "L̃_k (12), sketched (17), as (s, p, p) diagonal blocks for (18) (last block "
                               "zero-padded); None for 'right' layers, for the low-rank solvers and before "
                               "the first step")
    R: tuple = state_field(doc="per 'right' layer the n×n statistic R_k (5) / R̄_k (11) / R̃_k (12), stored as L "
                               "is; None for 'left' layers, for the low-rank solvers and before the first step")
    U: tuple = state_field(doc="per layer the low-rank factor U of (14) with UUᵀ = L (m×Nκ; n×Nκ, of 𝒢ᵢᵀ, for "
                               "'right' layers) for solver 'smw' | 'ls' | 'sketch_ls'; None otherwise")
    Omega_sketch: tuple = state_field(doc="per layer the (16) sketch matrix Ω (q×m, host) drawn with U and reused until "
                                   "the next refresh (solver 'sketch_ls'); None otherwise")
    factorization: tuple = state_field(
        doc="per layer the fast form's factorization of the last refresh: lower Cholesky factor of λI + L (or "
            "of the (18) blocks, batched), of the capacitance λI + UᵀU (14), or (Q₁, R) of the QR of "
            "[ΩU; √λI] (15)/(16); None when the dense form made the state (the fast form refactorizes)")


@dataclass(frozen=True, kw_only=True)
class NGPlusOnlineNewtonState(State):
    """State of :class:`NGPlusOnlineNewton` (never mutated; per-layer tuples)."""

    sides: tuple = state_field(doc="per layer 'left' (L_t, m×m) or 'right' (R_t, n×n)")
    shapes: tuple = state_field(doc="per layer the shape (m, n) of Θ: refcurv's (out, d) weight, bias last column")
    L: tuple = state_field(doc="per 'left' layer L_t = L_{t−1} + 𝐆_t𝐆_tᵀ, L_0 = λI (NG+ (19), errata NG+-4); "
                               "None for 'right' layers")
    R: tuple = state_field(doc="per 'right' layer R_t = R_{t−1} + 𝐆_tᵀ𝐆_t, R_0 = λI; None for 'left' layers")


def _stat(state, j):
    """Layer ``j``'s stored oriented statistic (``L`` for a left layer, ``R`` for a right one)."""
    return state.L[j] if state.sides[j] == "left" else state.R[j]


def _split(sides, stats):
    """Per-layer oriented statistics → the ``(L, R)`` fields."""
    L = tuple(s if side == "left" else None for side, s in zip(sides, stats))
    R = tuple(s if side == "right" else None for side, s in zip(sides, stats))
    return L, R


# ------------------------------------------------------------------ equations (fast form)
def statistic(P, Q, X, statistics, sketch=None, block_size=None):
    """The statistic one refresh computes, oriented: (4)/(5) ``(1/N) Σ 𝒢_i𝒢_iᵀ`` from the
    factors, or for ``statistics="minibatch"`` the (12) term ``𝐆𝐆ᵀ`` of the mini-batch gradient
    ``X``; sketched by (17) with ``sketch`` and as (18) blocks with ``block_size``
    (:func:`~refcurv.linalg.gfim.gram_from_factors`, :func:`~refcurv.linalg.gfim.gram_of_matrix`)."""
    if statistics == "minibatch":
        return GF.gram_of_matrix(X, sketch, block_size)
    return GF.gram_from_factors(P, Q, sketch, block_size)


def accumulate(statistics, prev, new, beta, stats_weight, stats_init):
    """The stored statistic after a refresh: ``new`` (4)-(5), the momentum average (11) or
    the mini-batch accumulation (12) (:func:`~refcurv.linalg.gfim.momentum_11`,
    :func:`~refcurv.linalg.gfim.minibatch_12`)."""
    if statistics == "momentum":
        return GF.momentum_11(prev, new, beta)
    if statistics == "minibatch":
        return GF.minibatch_12(prev, new, beta, stats_weight, stats_init)
    return new


def factorize(solver, C, lam, sketch=None):
    """The factorization the solve reuses until the next refresh: of ``λI + L`` (``C = L``,
    full or (18) blocks), of ``λI + UᵀU`` (14), or the QR of ``[ΩU; √λI]`` (15)/(16) (``C = U``)."""
    if solver == "cholesky":
        return GF.cholesky_factor(C, lam)
    if solver == "smw":
        return GF.smw_factor(C, lam)
    return GF.ls_factor(C, lam, sketch if solver == "sketch_ls" else None)


def solve(solver, C, fac, lam, X, sketch=None):
    """``(λI + L)⁻¹ X`` (6) by the configured solver ((14)-(16): ``(λI + UUᵀ[ΩᵀΩ])⁻¹ X``)."""
    if solver == "cholesky":
        return GF.cholesky_solve(fac, X)
    if solver == "smw":
        return GF.smw_solve(C, fac, lam, X)
    return GF.ls_solve(C, fac, lam, X, sketch if solver == "sketch_ls" else None)


# ------------------------------------------------------------------ dense-form inputs
def _host64(params, batch):
    """Host float64 copies of the parameters and the batch (the dense forms are references)."""
    from .base import Batch

    y = to_numpy(batch.y)
    return ([to_numpy(W).astype(F64) for W in params],
            Batch(to_numpy(batch.x).astype(F64), y.astype(F64) if y.dtype.kind == "f" else y, batch.loss))


def _dense_inputs(net, params, batch):
    """Float64 per-sample gradients (list of ``(N, out, d)``) from refcurv.curvature."""
    U = cv.per_sample_grads(net, params, batch.x, batch.y, batch.loss)
    return unflatten(U, net)


def _conv_T(net, x):  # host: shape arithmetic
    """κ = T of each trainable layer (output locations of a Conv2d, 1 for Linear)."""
    shapes = net.feature_shapes(tuple(x.shape[1:]))
    out = []
    for k in net.trainable_index:
        s = shapes[k + 1]
        out.append(int(np.prod(s[1:])) if isinstance(net.layers[k], Conv2d) else 1)
    return out


def _host(a):
    return None if a is None else to_numpy(a).astype(F64)


def sketch_key(j):
    """The :attr:`Draws.sketches` key of layer ``j``'s sketch matrix."""
    return f"Omega/{j}"


def _curvature_of(state, method_name):
    if not state.sides or all(_stat(state, j) is None and (not state.U or state.U[j] is None)
                              for j in range(len(state.sides))):
        raise StateError(f"{method_name}: the state holds no curvature yet (it is from init(); "
                         "curvature(state) is the one the step that returned state used)")


# ------------------------------------------------------------------ NG+
@register
@dataclass(frozen=True)
class NGPlus(Method):
    """NG+ Algorithm 1 with (4)-(6) and the options of §2.3 and §3 (see the module docstring).

    Hyper-parameters (defaults): ``damping`` λ = 0.1 (6); ``side`` = "auto" (4)-(5);
    ``T_inv`` 𝒯 = 1 (Algorithm 1); ``statistics`` = "batch" ("momentum" (11), "minibatch"
    (12)); ``beta`` = 0.9, the β of (11) or of (12); ``stats_weight`` γ = 1.0 and
    ``stats_init`` λ₀ = 0.0 (12); ``gram`` = "exact" ("sketch": (17)); ``block_size`` = None
    (18); ``solver`` = "cholesky" ("smw" (14), "ls" (15), "sketch_ls" (16)); ``sketch_size``
    q = 8 for (16)/(17); ``variant`` = "paper" ("authors": design §8).

    State: :class:`NGPlusState`. Diagnostics: ``refreshed`` and ``stats_refreshed`` (both
    true at the refresh steps ``k ≡ 0 (mod T_inv)``). Draws: ``sketches["Omega/<j>"]`` at
    refresh steps of a sketched configuration (module docstring).

    ``rhs(state, g)`` is the mini-batch gradient ``g``. ``curvature(state)`` is, per layer,
    the damped GFIM side as it acts on refcurv's row-major ``vec(Θ)`` (``Θ`` the ``(out, d)``
    weight, bias last column): ``(λI + L) Θ`` is ``Kronecker(λI + L, I_n)`` and
    ``Θ (λI + R)`` is ``Kronecker(I_m, λI + R)`` (6); with (18) a :class:`BlockDiagonal` of
    those Kronecker blocks over the rows (left) or columns (right) of ``Θ``; for the low-rank
    solvers (14)-(15) ``L = UUᵀ``. ``λ`` is ``√damping`` for ``variant="authors"``. The sketched
    LS (16) preconditions with the non-symmetric ``λI + UUᵀΩᵀΩ``, which has no symmetric
    operator form: ``curvature`` refuses it (HyperParameterError).

    Shared by both forms: sides, orientation, the refresh schedule, the draws and the state's
    storage formats ((18) blocks, the U of (14)); see the module docstring.
    """

    name = "ngplus"
    seed_ref = "[NG+] (2), (4)-(6), Alg. 1, (11)-(12), (14)-(18)"
    summary = "NG+: damped GFIM L or R per layer, multi-step, SMW/LS/sketch/block variants"
    State = NGPlusState

    damping: float = 0.1
    side: str = "auto"
    T_inv: int = 1
    statistics: str = "batch"
    beta: float = 0.9
    stats_weight: float = 1.0
    stats_init: float = 0.0
    gram: str = "exact"
    block_size: int | None = None
    solver: str = "cholesky"
    sketch_size: int = 8
    variant: str = "paper"

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_choice(self.side, "side", SIDES)
        check_int(self.T_inv, "T_inv")
        check_choice(self.statistics, "statistics", STATISTICS)
        # (11) with β = 1 would never move L̄ from L_0; (12) with β = γ = 1 is Shampoo's sum
        check_unit(self.beta, "beta", closed_high=self.statistics == "minibatch")
        check_positive(self.stats_weight, "stats_weight")
        check_nonnegative(self.stats_init, "stats_init")
        check_choice(self.gram, "gram", GRAMS)
        if self.block_size is not None:
            check_int(self.block_size, "block_size")
        check_choice(self.solver, "solver", SOLVERS)
        check_int(self.sketch_size, "sketch_size")
        check_choice(self.variant, "variant", VARIANTS)
        if self.variant == "authors" and self.side == "right":
            raise HyperParameterError("side='right' is not available with variant='authors' (left factor only)")
        if self.solver in LOWRANK:
            if self.statistics != "batch":
                raise HyperParameterError(
                    f"solver={self.solver!r} needs statistics='batch' (the low-rank U of (14) is one batch's)")
            if self.gram != "exact":
                raise HyperParameterError(f"solver={self.solver!r} needs gram='exact' ((17) builds L, not U)")
            if self.block_size is not None:
                raise HyperParameterError(f"solver={self.solver!r} cannot be combined with block_size (18)")
            if self.variant != "paper":
                raise HyperParameterError(f"solver={self.solver!r} needs variant='paper'")

    # -------------------------------------------------------------- bookkeeping
    @property
    def damping_applied(self):
        """The damping added to the curvature: λ (paper (6)) or √λ (authors' code)."""
        return math.sqrt(self.damping) if self.variant == "authors" else self.damping

    @property
    def sketched(self):
        """Whether the configuration draws sketches ((17) or (16))."""
        return self.gram == "sketch" or self.solver == "sketch_ls"

    @property
    def draw_fields(self):
        return ("sketches",) if self.sketched else ()

    def init(self, net, params):
        sides = tuple(GF.sides(net.param_shapes, "left" if self.variant == "authors" else self.side))
        none = (None,) * len(sides)
        return NGPlusState(sides=sides, shapes=tuple(tuple(s) for s in net.param_shapes), L=none, R=none,
                           U=none, Omega_sketch=none, factorization=none)

    def _sketch_dims(self, state):
        """``{key: dim}`` of the sketches a refresh step consumes: (17) over the long side of
        the oriented layer (n for left, m for right), (16) over U's rows (m for left, n for right)."""
        if not self.sketched:
            return {}
        out = {}
        for j, ((m, n), side) in enumerate(zip(state.shapes, state.sides)):
            mo, no = (m, n) if side == "left" else (n, m)
            out[sketch_key(j)] = no if self.gram == "sketch" else mo
        return out

    def draw(self, rng, state, net, params, batch):
        """Per layer the sketch matrix of this step, drawn only at refresh steps (NG+'s
        uniform row sampling with weights √(dim/q), :func:`~refcurv.linalg.sketch.ngplus_sketch`)."""
        if not refresh_due(state.k, self.T_inv):
            return Draws(method=self.name)
        return Draws(method=self.name, sketches={
            key: SK.ngplus_sketch(dim, self.sketch_size, seed=rng).to_dense()
            for key, dim in self._sketch_dims(state).items()})

    def check_draws(self, draws, state, net, params, batch):  # host: draws are host arrays
        due = refresh_due(state.k, self.T_inv)
        if due or not isinstance(draws, Draws) or draws.method != self.name:
            super().check_draws(draws, state, net, params, batch)  # type, maker, fields consumed
        if draws.labels is not None or draws.seeds:
            raise DrawsError(f"{self.name}: draws.labels / draws.seeds are not consumed by NG+ (empirical statistics)")
        want = self._sketch_dims(state) if due else {}
        have = dict(draws.sketches or {})
        extra = sorted(set(have) - set(want))
        if extra:
            why = "nothing is drawn between refreshes" if not due else f"expected keys {sorted(want)}"
            raise DrawsError(f"{self.name}: draws.sketches has keys {extra} that this step does not consume ({why})")
        for key, dim in want.items():
            if key not in have:
                raise DrawsError(f"{self.name}: draws.sketches[{key!r}] is missing (expected keys {sorted(want)})")
            O = np.asarray(to_numpy(have[key]))
            # q is free (sketch_size when drawn here; a replayed sketch may use another q)
            if O.ndim != 2 or O.shape[0] < 1 or O.shape[1] != dim:
                raise DrawsError(f"{self.name}: draws.sketches[{key!r}] must be a (q, {dim}) matrix "
                                 f"(layer {key[6:]}'s sketch over dim = {dim}), got shape {O.shape}")
            if O.dtype.kind not in "fi" or not np.isfinite(O).all():
                raise DrawsError(f"{self.name}: draws.sketches[{key!r}] must be a finite real matrix")
        return draws

    def _diagnostics(self, due):
        return {"refreshed": bool(due), "stats_refreshed": bool(due)}

    # -------------------------------------------------------------- fast form
    def _fast(self, state, net, params, batch, draws):
        A, G = net.factors(params, batch.x, batch.y, batch.loss)
        due = refresh_due(state.k, self.T_inv)
        lam = self.damping_applied
        stats, Us, Omegas, facs, direction = [], [], [], [], []
        for j, (a, g, side) in enumerate(zip(A, G, state.sides)):
            P, Q = GF.oriented_factors(side, g, a)
            X = GF.mean_gradient(P, Q)  # oriented 𝐆 (6)
            if due:
                Omega = draws.sketches.get(sketch_key(j))
                sk = GF.as_sketch(Omega)
                if self.solver in LOWRANK:
                    stat, U = None, GF.lowrank_factor(P, Q)  # (14)
                else:
                    new = statistic(P, Q, X, self.statistics, sk if self.gram == "sketch" else None,
                                    self.block_size)
                    if self.variant == "authors" and isinstance(net.layers_trainable[j], Conv2d):
                        new = new / math.sqrt(P.shape[2])  # the authors' 1/√(H_out·W_out)
                    stat, U = accumulate(self.statistics, _stat(state, j), new, self.beta, self.stats_weight,
                                         self.stats_init), None
                Omega = xp_of(Omega).array(Omega) if self.solver == "sketch_ls" else None
                fac = factorize(self.solver, stat if U is None else U, lam, GF.as_sketch(Omega))
            else:  # Algorithm 1: L_k = L_{k−1}, with its factorization
                stat, U, Omega, fac = _stat(state, j), state.U[j], state.Omega_sketch[j], state.factorization[j]
                if fac is None:  # a state from the dense form
                    fac = factorize(self.solver, stat if U is None else U, lam, GF.as_sketch(Omega))
            Y = solve(self.solver, stat if U is None else U, fac, lam, X, GF.as_sketch(Omega))
            stats.append(stat)
            Us.append(U)
            Omegas.append(Omega)
            facs.append(fac)
            direction.append(-GF.orient(side, Y))
        L, R = _split(state.sides, stats)
        return direction, state.replace(k=state.k + 1, L=L, R=R, U=tuple(Us), Omega_sketch=tuple(Omegas),
                                        factorization=tuple(facs), diagnostics=self._diagnostics(due))

    # -------------------------------------------------------------- dense form
    def _dense(self, state, net, params, batch, draws):  # host: float64 reference on the host (_host64)
        like = params[0]
        params, batch = _host64(params, batch)
        due = refresh_due(state.k, self.T_inv)
        lam = self.damping_applied
        psg = _dense_inputs(net, params, batch)  # float64 (N, m, n) per layer
        sides, p = state.sides, self.block_size
        Ts = _conv_T(net, batch.x) if self.variant == "authors" else None
        if due and self.statistics != "minibatch" and self.gram == "exact":
            gf = {s: cv.gfim(net, params, batch.x, batch.y, batch.loss, side=s) for s in set(sides)}
        if due and self.solver in LOWRANK:
            A64, G64 = net.factors(params, batch.x, batch.y, batch.loss)
        stats, Us, Omegas, direction = [], [], [], []
        for j, (u, side) in enumerate(zip(psg, sides)):
            g = GF.orient(side, u)  # oriented per-sample gradients (N, m, n)
            X = g.mean(axis=0)
            m = X.shape[0]
            U = stat = None
            if due:
                Omega = _host(draws.sketches.get(sketch_key(j)))
                # the matrix the paper defines, formed densely
                if self.statistics == "minibatch":
                    Xs = X if self.gram == "exact" else X @ Omega.T
                    L = Xs @ Xs.T  # (12): 𝐆𝐆ᵀ (sketched (17): 𝐆ΩᵀΩ𝐆ᵀ)
                elif self.gram == "exact":
                    L = gf[side][j]  # (4)-(5) = refcurv.curvature.gfim
                else:
                    L = np.einsum("nab,bc,ndc->ad", g, Omega.T @ Omega, g) / g.shape[0]  # (17)
                if self.variant == "authors" and isinstance(net.layers_trainable[j], Conv2d):
                    L = L / math.sqrt(Ts[j])
                if p is not None:  # (18): the off-block entries zeroed
                    b = np.arange(m) // p
                    L = np.where(b[:, None] == b[None, :], L, 0.0)
                if self.solver in LOWRANK:
                    # stored for the fast form's later steps; this step solves with L itself
                    U = GF.lowrank_factor(*GF.oriented_factors(side, G64[j], A64[j]))
                else:
                    prev = _host(_stat(state, j))
                    if prev is not None and p is not None:
                        prev = GF.blocks_to_dense(prev, m)
                    if self.statistics == "momentum":  # (11), L̄_0 = L_0
                        L = L if prev is None else self.beta * prev + (1 - self.beta) * L
                    elif self.statistics == "minibatch":  # (12), L̃_{−1} = λ₀I
                        prev = self.stats_init * np.eye(m) if prev is None else prev
                        L = self.beta * prev + self.stats_weight * L
                    stat = L if p is None else GF.dense_to_blocks(L, p)
                Omega = Omega if self.solver == "sketch_ls" else None
            else:
                stat, U, Omega = _stat(state, j), state.U[j], _host(state.Omega_sketch[j])
                if U is not None:
                    Uh = _host(U)
                    L = Uh @ Uh.T
                else:
                    L = _host(stat) if p is None else GF.blocks_to_dense(_host(stat), m)
            if self.solver == "sketch_ls":
                M = lam * np.eye(m) + L @ (Omega.T @ Omega)  # (16) = (λI + UUᵀΩᵀΩ)^{-1}
                Y = np.linalg.solve(M, X)
            else:
                M = lam * np.eye(m) + L
                Y = spd_solve((M + M.T) / 2, X, name="λI + L")
            stats.append(None if stat is None else asarray_like(stat, like))
            Us.append(None if U is None else asarray_like(U, like))
            Omegas.append(Omega)
            direction.append(asarray_like(-GF.orient(side, Y), like))
        L, R = _split(sides, stats)
        return direction, state.replace(k=state.k + 1, L=L, R=R, U=tuple(Us), Omega_sketch=tuple(Omegas),
                                        factorization=(None,) * len(sides), diagnostics=self._diagnostics(due))

    # -------------------------------------------------------------- curvature
    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``C`` with ``direction = −C⁻¹ g`` (class docstring): per layer the damped GFIM side
        as a Kronecker operator on row-major ``vec(Θ)``, block-diagonal over layers."""
        self.check_state(state)
        if self.solver == "sketch_ls":
            raise HyperParameterError(
                f"{self.name}: solver='sketch_ls' preconditions with λI + UUᵀΩᵀΩ (16), which is not "
                "symmetric and has no refcurv.operators form")
        _curvature_of(state, self.name)
        lam = self.damping_applied
        blocks = []
        for j, (side, shape) in enumerate(zip(state.sides, state.shapes)):
            if state.U[j] is not None:
                U = state.U[j]
                blocks.append(GF.damped_operator(side, shape, U @ U.T, lam))
            else:
                blocks.append(GF.damped_operator(side, shape, _stat(state, j), lam))
        return BlockDiagonal(blocks)


# ------------------------------------------------------------------ online Newton (19)
@register
@dataclass(frozen=True)
class NGPlusOnlineNewton(Method):
    """NG+ online-Newton iteration (19), as the regret analysis (Lemmas 6-7) uses it::

        L_t = L_{t−1} + 𝐆_t 𝐆_tᵀ,   L_0 = λI  (the paper's εI),
        Θ_{t+1} = Π^{L_t}_K(Θ_t − α^{-1} L_t^{-1} 𝐆_t)

    per layer, ``𝐆_t`` the mini-batch gradient (``m × m`` L; the text's ``∇ψᵀ∇ψ`` is
    ``n × n`` and cannot multiply ``L_t^{-1}𝐆_t``, errata NG+-4), ``K = {‖Θ‖_F ≤ radius}``
    and ``Π^{L_t}`` the projection in the norm ``‖Z‖²_{L_t} = tr(ZᵀL_tZ)`` (Lemma 6's first
    inequality is the non-expansiveness of exactly this projection, errata NG+-6).
    ``projection="euclidean"`` projects in the Frobenius norm instead (not covered by the
    proof). A "right" layer uses ``R_t = R_{t−1} + 𝐆_tᵀ𝐆_t`` and ``Θ − α^{-1}𝐆 R_t^{-1}``.

    The returned direction is ``Θ_{t+1} − Θ_t``: train with ``lr = 1`` to follow (19).

    Hyper-parameters (defaults): ``alpha`` = 1.0 (step 1/α; the exp-concavity α of
    Assumption 4), ``damping`` = 1.0 (``L_0 = λI``, the paper's ε; Theorem 5 takes
    ``ε = 2/(α𝒟²)``), ``radius`` = 10.0, ``side`` = "auto", ``projection`` = "L".
    State: :class:`NGPlusOnlineNewtonState`. Diagnostics: ``refreshed``, ``stats_refreshed``
    (always true: ``L_t`` grows every step) and ``projected`` (per layer: the projection was
    active).

    ``curvature(state)`` is ``L_t`` (``R_t``) per layer, as ``Kronecker(L_t, I_n)``
    (``Kronecker(I_m, R_t)``) on row-major ``vec(Θ)``, block-diagonal over layers; ``rhs`` is
    the mini-batch gradient. The direction is **not** ``−C⁻¹ g`` in general: it is
    ``Π^{L_t}_K(Θ − α⁻¹ C⁻¹ g) − Θ`` — it additionally applies the step ``1/α`` and the
    projection (a nonlinear map that needs Θ). It equals ``−C⁻¹ g`` exactly when ``α = 1``
    and the projection is inactive (``projected`` false for every layer).

    Shared by both forms: sides, orientation, the state. Dense form: ``L_t`` from refcurv's
    float64 gradient, ``spd_solve``, and the projection by bisection with Cholesky solves
    (:func:`~refcurv.linalg.gfim.project_ball_dense`); the fast form uses Cholesky and the
    eigenbasis/Brent projection (:func:`~refcurv.linalg.gfim.project_ball`).
    """

    name = "ngplus_online_newton"
    seed_ref = "[NG+] (19), Lemmas 6-7"
    summary = "NG+ online Newton: L_t = L_{t-1} + G Gᵀ, L_t-norm projection onto a Frobenius ball"
    State = NGPlusOnlineNewtonState

    alpha: float = 1.0
    damping: float = 1.0
    radius: float = 10.0
    side: str = "auto"
    projection: str = "L"

    def __post_init__(self):
        check_positive(self.alpha, "alpha")
        check_positive(self.damping, "damping")
        check_positive(self.radius, "radius")
        check_choice(self.side, "side", SIDES)
        check_choice(self.projection, "projection", PROJECTIONS)

    def init(self, net, params):
        sides = tuple(GF.sides(net.param_shapes, self.side))
        xp = xp_of(*params)
        Ls = []
        for W, (m, n), s in zip(params, net.param_shapes, sides):
            dt = W.dtype if getattr(W, "dtype", np.dtype(F64)).kind == "f" else F64
            Ls.append(self.damping * xp.eye(m if s == "left" else n, dtype=dt))  # L_0 = λI
        L, R = _split(sides, Ls)
        return NGPlusOnlineNewtonState(sides=sides, shapes=tuple(tuple(s) for s in net.param_shapes), L=L, R=R)

    def _new_state(self, state, Ls, projected):
        L, R = _split(state.sides, Ls)
        return state.replace(k=state.k + 1, L=L, R=R, diagnostics={
            "refreshed": True, "stats_refreshed": True, "projected": [bool(p) for p in projected]})

    def _fast(self, state, net, params, batch, draws):
        A, G = net.factors(params, batch.x, batch.y, batch.loss)
        Ls, direction, projected = [], [], []
        for j, (W, a, g, side) in enumerate(zip(params, A, G, state.sides)):
            P, Q = GF.oriented_factors(side, g, a)
            X = GF.mean_gradient(P, Q)
            L = _stat(state, j) + X @ X.T  # (19), errata NG+-4
            Y = GF.orient(side, W) - GF.cholesky_solve(GF.cholesky_factor(L, 0.0), X) / self.alpha
            Z, _ = GF.project_ball(Y, self.radius, L if self.projection == "L" else None)
            Ls.append(L)
            projected.append(Z is not Y)
            direction.append(GF.orient(side, Z) - W)
        return direction, self._new_state(state, Ls, projected)

    def _dense(self, state, net, params, batch, draws):  # host: float64 reference on the host (_host64)
        like = params[0]
        params, batch = _host64(params, batch)
        psg = _dense_inputs(net, params, batch)
        Ls, direction, projected = [], [], []
        for j, (W, u, side) in enumerate(zip(params, psg, state.sides)):
            X = GF.orient(side, u.mean(axis=0))
            L = _host(_stat(state, j)) + X @ X.T
            Y = GF.orient(side, W) - spd_solve(L, X, name="L_t") / self.alpha
            if self.projection == "L":
                Z, _ = GF.project_ball_dense(Y, self.radius, L)
            else:
                nY = np.linalg.norm(Y)
                Z = Y if nY <= self.radius else Y * (self.radius / nY)
            Ls.append(asarray_like(L, like))
            projected.append(Z is not Y)
            direction.append(asarray_like(GF.orient(side, Z) - W, like))
        return direction, self._new_state(state, Ls, projected)

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``α L_t`` per layer, so that an unprojected step is ``−C⁻¹ g`` (19); a projected
        step (``diagnostics["projected"]``) is ``Π(Θ − C⁻¹g) − Θ`` instead."""
        self.check_state(state)
        return BlockDiagonal([GF.damped_operator(side, shape, self.alpha * _stat(state, j), 0.0)
                              for j, (side, shape) in enumerate(zip(state.sides, state.shapes))])
