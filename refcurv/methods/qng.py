"""QNG, the quasi-natural gradient of He et al. (2022), as restated in [QNG-Ginger] §2.1–2.2,
(4)–(13) and Observation 1.

Curvature ([QNG-Ginger] (6)–(8)). The Fisher ``G = E[∇log p ∇log pᵀ]`` (= the GGN (4) for the
exponential-family losses of refcurv) is tracked by the exponential moving average (7)

    G_t = α G_{t−1} + (1 − α) d_t d_tᵀ,    G_0 = I,
    d_t = (1/√|B|) Σ_{x∈B} ∇_θ log p_θ(ŷ|x),   ŷ ~ p_θ(·|x)          (8)

with one label ``ŷ`` per input drawn from the model (:meth:`QNG.draw`). In refcurv
``log p_θ(ŷ|x) = −ψ(ŷ) + const`` (ψ the per-sample loss: CE, BCE, or MSE = ½‖f − y‖², the
Gaussian of unit variance), so ``d_t = −(1/√N) Σ_i ∇ψ_i(ŷ_i)``. The sign is immaterial to
``d dᵀ``; it is kept as printed.

Product form (9)–(10). ``G_t = A_{t+1} A_{t+1}ᵀ`` (the index is shifted by one: the factor
after ``t`` updates is ``A_{t+1}``), ``A_1 = I`` (so ``G_0 = I``) and

    A_{t+1} = A_t K_t,   K_t = √α I + β_t q_t q_tᵀ,   q_t = A_t⁻¹ d_t,
    β_t = (√(α + (1 − α)‖q_t‖²) − √α) / ‖q_t‖² = (1 − α) / (√α + √(α + (1 − α)‖q_t‖²)),

the positive root of ``‖q‖² β² + 2√α β − (1 − α) = 0``, which is what (10)
``A_t K_t K_tᵀ A_tᵀ = α G_{t−1} + (1 − α) d_t d_tᵀ`` requires (the printed β has lost the square
root: errata QNG-1). The second, rationalized form is the one evaluated: no cancellation for
small ``‖q‖`` and defined at ``q = 0`` (then ``K_t = √α I``); it is
:func:`refcurv.linalg.ema.qng_beta`.

Truncation (11). Only the last τ factors are kept: ``Â_t = K̂_{t−τ} ⋯ K̂_{t−1}`` with
``q̂_t = Â_t⁻¹ d_t`` computed from the τ factors stored *before* the update; then ``K̂_t`` is
appended and the oldest factor dropped, so that ``Ĝ_t = Â_{t+1} Â_{t+1}ᵀ`` is a product of
``min(τ, t)`` factors (errata QNG-S1). ``rank=None`` keeps every factor (exactly (9)).
Each factor is symmetric with eigenvalues ``√α`` (``d − 1`` times) and ``√(α + (1 − α)‖q‖²)``,
so ``Ĝ_t ⪰ α^{min(τ,t)} I``, and ``Ĝ_t − α^{min(τ,t)} I`` has rank ``≤ min(τ, t)`` — half of
Observation 1's ``2 min(τ, t)`` (errata QNG-3).

Fast form (the paper's O(dτ) algorithm). Each factor is inverted by Sherman–Morrison,

    K⁻¹ v = (v − (β / r) q (qᵀv)) / √α,    r = √α + β‖q‖² = √(α + (1 − α)‖q‖²),

so ``Â``, ``Â⁻¹``, ``Âᵀ``, ``Â⁻ᵀ`` are products of τ O(d) operations, and the direction is
``−Ĝ_t⁻¹ g = −Â_{t+1}⁻ᵀ Â_{t+1}⁻¹ g``.

Dense form (the definition, :mod:`refcurv.linalg.ema`). ``d_t`` is computed as ``−√N ∇Ψ(ŷ)``
from the mean loss at the same sampled labels
(:func:`~refcurv.methods._sampled.fisher_vector_dense`), ``Â`` is formed as the explicit
``d × d`` product (9)/(11) of the stored factors (:func:`~refcurv.linalg.ema.qng_A`), ``q̂_t``
is solved from it by LU with partial pivoting (:func:`~refcurv.linalg.ema.qng_update_dense`),
and the direction solves ``Â Âᵀ p = −g`` by Cholesky
(:func:`~refcurv.linalg.ema.qng_solve_dense`); in float64. The exact EMA (7) is
:func:`~refcurv.linalg.ema.ema_matrix`. The two forms return a :class:`QNGState` of the same
structure (the factors ``(q̂_i, β_i)`` per block; the dense form recomputes ``Â`` from them each
step, which is what (11) defines once the oldest factor is dropped); the fast and dense ``q``,
``β`` and directions agree to rounding, forward errors growing with ``κ(Ĝ)``.

Shared by both forms: the sampled labels ``ŷ`` (``Draws.labels``, made once by :meth:`QNG.draw`),
the block layout (:func:`~refcurv.methods._sampled.block_indices`, tested by
``tests/test_method_ginger.py::test_tensor_blocks_split_weight_and_bias``) and β of (10)
(:func:`~refcurv.linalg.ema.qng_beta`, tested in ``tests/test_linalg_ema.py``). Not shared:
``d_t`` (per-sample sum vs mean gradient), ``q̂_t`` (Sherman–Morrison vs LU on the explicit
``Â``), the direction (factor-wise vs Cholesky of the explicit ``Ĝ``).

Curvature (:meth:`QNG.curvature`): ``C = Ĝ_t = Â_{t+1} Â_{t+1}ᵀ`` per block, a
:class:`ProductForm` operator (``matvec``/``solve`` by the O(dτ) factor products, ``todense``
by :func:`~refcurv.linalg.ema.qng_G`), block-diagonal over the blocks
(:class:`~refcurv.operators.BlockDiagonal` with the blocks' index sets into θ); the direction
is ``−C⁻¹ g`` with ``g`` the mini-batch gradient (no momentum).

Order of operations per step: update the factors with ``d_t`` first, then the direction from
the updated ``Ĝ_t`` applied to the mini-batch gradient — the order of Ginger's Algorithm 1
("update the optimizer state first"), which the seed compares QNG against. It makes the current
batch's curvature enter the current step (at the first step ``G_1 = αI + (1 − α) d_1 d_1ᵀ``
rather than ``G_0 = I``, i.e. not plain gradient descent).

Blocks. ``blocks="full"``: one QNG on the whole vector θ ∈ R^n (refcurv's row-major flatten,
:func:`refcurv.flatten`) — the paper. ``blocks="layer"``: one independent QNG per layer matrix
``W_l ∈ R^{out×d}`` (row-major vec); ``blocks="tensor"``: weight and bias of each layer
separately, as implementations do per parameter tensor (design §8: there is no official QNG
code). The blocks and ``d_t`` are shared with Ginger (:mod:`._sampled`). Scaling: ``d_t`` is as printed in (8), ``1/√N`` times the sum
(so ``d dᵀ`` is a mini-batch Fisher sample of the *mean* loss's scale); the gradient ``g`` is
the gradient of the mean loss (refcurv's objective).

Without damping, directions outside the span of the stored ``q`` are scaled by ``α^{−min(τ,t)}``;
with ``rank=None`` this grows without bound as ``t → ∞`` (``Ĝ_t ⪰ α^t I`` only).

Names: the hyper-parameter ``beta`` is the EMA decay α of (7) and ``rank`` is τ of (11)
(refcurv.methods.vocabulary); the kernels below keep the paper's ``alpha`` and ``tau``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import xp_of
from ..errors import ArgumentTypeError
from ..linalg.ema import check_alpha, check_tau, qng_beta, qng_G, qng_solve_dense, qng_update_dense
from ..operators import BlockDiagonal, Operator
from ..vec import flatten, unflatten
from ._sampled import BLOCKS, SampledLabelsMixin, block_indices, fisher_vector, fisher_vector_dense
from .base import Method, State, check_choice, check_int, check_unit, state_field
from .registry import register


# ====================================================================== kernels (one block)
# A block's product form is two aligned tuples, oldest factor first, at most τ of each:
# ``q`` (the vectors q̂_i) and ``beta_t`` (the coefficients β_i of (10), Python floats);
# empty before the first update (Â_1 = I, G_0 = I). The kernels are pure.


def _outer_apply(q, qv, v):
    """``q (qᵀv)`` for ``v`` a vector ``(d,)`` or a matrix ``(d, k)`` (``qv = qᵀv``)."""
    return q.reshape((-1,) + (1,) * (v.ndim - 1)) * qv


def factor_apply(alpha, q, beta, v):
    """``K v = √α v + β q (qᵀv)`` (9)."""
    return math.sqrt(alpha) * v + beta * _outer_apply(q, q @ v, v)


def factor_solve(alpha, q, beta, v):
    """``K⁻¹ v`` by Sherman–Morrison: ``(v − (β/r) q (qᵀv)) / √α``, ``r = √α + β‖q‖²``; O(d)."""
    r = math.sqrt(alpha) + beta * float(q @ q)
    return (v - (beta / r) * _outer_apply(q, q @ v, v)) / math.sqrt(alpha)


# The four products below run over the ≤ τ stored factors in the order the matrix product
# (9)/(11) fixes (a recursion over factors, not a loop over samples).
def apply_A(q, beta_t, v, alpha):
    """``Â v`` with ``Â = K_oldest ⋯ K_newest`` (9)/(11): newest factor applied first."""
    for qi, bi in zip(reversed(q), reversed(beta_t)):
        v = factor_apply(alpha, qi, bi, v)
    return v


def apply_At(q, beta_t, v, alpha):
    """``Âᵀ v = K_newest ⋯ K_oldest v`` (each ``K`` symmetric): oldest factor applied first."""
    for qi, bi in zip(q, beta_t):
        v = factor_apply(alpha, qi, bi, v)
    return v


def apply_A_inv(q, beta_t, v, alpha):
    """``Â⁻¹ v = K_newest⁻¹ ⋯ K_oldest⁻¹ v``: oldest inverse applied first; O(dτ)."""
    for qi, bi in zip(q, beta_t):
        v = factor_solve(alpha, qi, bi, v)
    return v


def apply_At_inv(q, beta_t, v, alpha):
    """``Â⁻ᵀ v = K_oldest⁻¹ ⋯ K_newest⁻¹ v``: newest inverse applied first; O(dτ)."""
    for qi, bi in zip(reversed(q), reversed(beta_t)):
        v = factor_solve(alpha, qi, bi, v)
    return v


def update(q, beta_t, d, alpha, tau=None):
    """One update (9)–(11) with ``d_t``: ``q̂_t = Â_t⁻¹ d_t`` (Sherman–Morrison, O(dτ)),
    ``β_t`` from (10) (:func:`~refcurv.linalg.ema.qng_beta`), the factor appended and only the
    newest ``τ`` kept (``tau=None``: all). Returns the new ``(q, beta_t)``."""
    check_alpha(alpha)
    check_tau(tau)
    qt = apply_A_inv(q, beta_t, d, alpha)
    q, beta_t = tuple(q) + (qt,), tuple(beta_t) + (qng_beta(alpha, qt @ qt),)
    if tau is not None:
        q, beta_t = q[-tau:], beta_t[-tau:]
    return q, beta_t


def solve(q, beta_t, g, alpha):
    """``Ĝ⁻¹ g = Â⁻ᵀ Â⁻¹ g`` with ``Ĝ = Â Âᵀ`` the factors' curvature (``Ĝ_t`` after ``t``
    updates: ``Ĝ_t = Â_{t+1} Â_{t+1}ᵀ``); O(dτ)."""
    return apply_At_inv(q, beta_t, apply_A_inv(q, beta_t, g, alpha), alpha)


class ProductForm(Operator):
    """QNG's curvature on one block, ``Ĝ = Â Âᵀ`` with ``Â = K_oldest ⋯ K_newest``,
    ``K_i = √α I + β_i q_i q_iᵀ`` (9)/(11): ``matvec`` ``Â Âᵀ v`` and ``solve`` ``Â⁻ᵀ Â⁻¹ v``
    (Sherman–Morrison per factor) in O(nτ); ``todense`` the explicit product
    (:func:`~refcurv.linalg.ema.qng_G`, float64)."""

    def __init__(self, q, beta_t, alpha, n):
        if len(q) != len(beta_t):
            raise ArgumentTypeError(f"q and beta_t must be aligned, got {len(q)} and {len(beta_t)} factors")
        self.q, self.beta_t, self.alpha, self.n = tuple(q), tuple(beta_t), float(alpha), int(n)
        self.dtype = q[0].dtype if q else np.dtype(np.float64)

    def _matvec(self, v):
        return apply_A(self.q, self.beta_t, apply_At(self.q, self.beta_t, v, self.alpha), self.alpha)

    def _solve(self, v):
        return solve(self.q, self.beta_t, v, self.alpha)

    def todense(self):
        return qng_G(self.q, self.beta_t, self.alpha, self.n)


# ====================================================================== the method
@dataclass(frozen=True, kw_only=True)
class QNGState(State):
    """QNG's state: the product form (9)/(11) of ``Ĝ_t`` per block, the same in both forms."""

    q: list = state_field(doc="per block, the vectors q̂_i = Â_i⁻¹ d_i of the stored factors "
                              "K̂_i = √α I + β_i q̂_i q̂_iᵀ (9)/(11), a tuple oldest first, at most τ = rank "
                              "(empty before the first step: Â_1 = I)")
    beta_t: list = state_field(doc="per block, the coefficients β_i of (10) of the stored factors (Python "
                                   "floats), a tuple aligned with q")


@register
@dataclass(frozen=True)
class QNG(SampledLabelsMixin, Method):
    """QNG ([QNG-Ginger] §2.2, (7)–(11)): the EMA Fisher (7) kept in the product form
    ``Ĝ = Â Âᵀ``, ``Â`` the product of the last ``τ`` factors ``√α I + β q qᵀ``; the direction
    is ``−Ĝ_t⁻¹ g`` after updating with ``d_t`` (8) from labels sampled from the model.

    Hyper-parameters: ``beta`` = α of (7), the EMA decay ∈ (0, 1) (default 0.99, the "second
    moment" coefficient of the seed's §4 training details), ``rank`` = τ of (11), the number of
    factors kept (int ≥ 1, or ``None`` = untruncated (9)), ``blocks`` = ``"full"`` (one QNG on
    θ ∈ R^n, the paper) | ``"layer"`` (one per layer matrix) | ``"tensor"`` (weight and bias
    separately).

    State: :class:`QNGState` (``q``, ``beta_t`` per block). Draws: ``labels`` ``(1, N, …)``,
    one ``ŷ ~ p_θ(·|x)`` per input; ``d_t`` of (8) is computed from them.

    ``rhs`` is the mini-batch gradient ``g``; the curvature is ``C = Ĝ_t = Â_{t+1}Â_{t+1}ᵀ``
    per block ((9)–(11), :class:`ProductForm`), block-diagonal over the blocks; the direction
    is ``−C⁻¹ g``.

    Shared by both forms: the labels ``ŷ``, :func:`~refcurv.methods._sampled.block_indices`,
    :func:`~refcurv.linalg.ema.qng_beta` (10). The fast form: :func:`fisher_vector`,
    :func:`update`, :func:`solve`; the dense form: :func:`fisher_vector_dense`,
    :func:`~refcurv.linalg.ema.qng_update_dense`, :func:`~refcurv.linalg.ema.qng_solve_dense`.
    """

    beta: float = 0.99
    rank: int | None = 8
    blocks: str = "full"

    name = "qng"
    seed_ref = "[QNG-Ginger] §2.2 (7)-(11), Obs. 1"
    summary = "quasi-natural gradient: EMA Fisher as a product of τ rank-one-corrected scalings, O(nτ)"
    State = QNGState
    draw_fields = ("labels",)

    def __post_init__(self):
        check_unit(self.beta, "beta", closed_low=False)
        if self.rank is not None:
            check_int(self.rank, "rank", 1)
        check_choice(self.blocks, "blocks", BLOCKS)

    def n_blocks(self, net):
        return len(block_indices(net, self.blocks))

    def init(self, net, params):
        n = self.n_blocks(net)
        return QNGState(q=[()] * n, beta_t=[()] * n)

    def _blocks(self, state, net, like=None):
        return self._check_blocks(net, state.q, state.beta_t, like=like)

    def _step(self, state, net, params, batch, d, upd, slv):
        g = flatten(cv._mean_layer_grads(net, params, batch.x, batch.y, batch.loss))     # mini-batch gradient
        out = xp_of(g).zeros_like(g)
        qs, bs = [], []
        for q, b, idx in zip(state.q, state.beta_t, self._blocks(state, net, like=g)):
            q, b = upd(q, b, d[idx], self.beta, self.rank)               # (9)–(11) with d_t
            out[idx] = -slv(q, b, g[idx], self.beta)                     # −Ĝ_t⁻¹ g
            qs.append(q)
            bs.append(b)
        return unflatten(out, net), state.replace(k=state.k + 1, q=qs, beta_t=bs, diagnostics={})

    def _fast(self, state, net, params, batch, draws):
        self._blocks(state, net)
        d = fisher_vector(net, params, batch, draws.labels[0])          # (8), per-sample sum
        return self._step(state, net, params, batch, d, update, solve)

    def _dense(self, state, net, params, batch, draws):
        self._blocks(state, net)
        d = fisher_vector_dense(net, params, batch, draws.labels[0])    # (8) = −√N ∇Ψ(ŷ)
        return self._step(state, net, params, batch, d, qng_update_dense, qng_solve_dense)

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``C = Ĝ_t`` per block (:class:`ProductForm`), block-diagonal over the blocks' index
        sets into θ; needs ``net`` (the block layout)."""
        self.check_state(state)
        if net is None:
            raise ArgumentTypeError("qng.curvature needs net (for the block layout of θ)")
        idx = self._blocks(state, net)
        return BlockDiagonal([ProductForm(q, b, self.beta, len(i)) for q, b, i in zip(state.q, state.beta_t, idx)],
                             index=idx)
