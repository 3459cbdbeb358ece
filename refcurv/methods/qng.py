"""QNG, the quasi-natural gradient of He et al. (2022), as restated in seed 004 (Ginger) §2.1–2.2,
(4)–(13) and Observation 1.

Curvature (seed 004 (6)–(8)). The Fisher ``G = E[∇log p ∇log pᵀ]`` (= the GGN (4) for the
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
small ``‖q‖`` and defined at ``q = 0`` (then ``K_t = √α I``).

Truncation (11). Only the last τ factors are kept: ``Â_t = K̂_{t−τ} ⋯ K̂_{t−1}`` with
``q̂_t = Â_t⁻¹ d_t`` computed from the τ factors stored *before* the update; then ``K̂_t`` is
appended and the oldest factor dropped, so that ``Ĝ_t = Â_{t+1} Â_{t+1}ᵀ`` is a product of
``min(τ, t)`` factors (errata QNG-S1). ``tau=None`` keeps every factor (exactly (9)).
Each factor is symmetric with eigenvalues ``√α`` (``d − 1`` times) and ``√(α + (1 − α)‖q‖²)``,
so ``Ĝ_t ⪰ α^{min(τ,t)} I``, and ``Ĝ_t − α^{min(τ,t)} I`` has rank ``≤ min(τ, t)`` — half of
Observation 1's ``2 min(τ, t)`` (errata QNG-3).

Fast form (the paper's O(dτ) algorithm). Each factor is inverted by Sherman–Morrison,

    K⁻¹ v = (v − (β / r) q (qᵀv)) / √α,    r = √α + β‖q‖² = √(α + (1 − α)‖q‖²),

so ``Â``, ``Â⁻¹``, ``Âᵀ``, ``Â⁻ᵀ`` are products of τ O(d) operations, and the direction is
``−Ĝ_t⁻¹ g = −Â_{t+1}⁻ᵀ Â_{t+1}⁻¹ g``.

Dense form (the definition). ``Â`` is formed as the explicit ``d × d`` product (9)/(11) of the
stored factors, ``q̂_t`` is solved from it by LU with partial pivoting, and the direction solves
``Â Âᵀ p = −g`` by Cholesky (:func:`refcurv.linalg.woodbury.spd_solve`); in float64. The exact
EMA (7) is :func:`ema_dense`. The two forms return states of the same structure (the list of
``(q, β)`` factors per block; the dense form recomputes ``Â`` from them each step, which is
what (11) defines once the oldest factor is dropped); the fast and dense ``q``, ``β`` and
directions agree to rounding, forward errors growing with ``κ(Ĝ)``.

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
with ``tau=None`` this grows without bound as ``t → ∞`` (``Ĝ_t ⪰ α^t I`` only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy, xp_of
from ..errors import HyperParameterError
from ..linalg.woodbury import spd_solve
from ..vec import flatten, unflatten
from ._sampled import BLOCKS, block_indices, fisher_vector, sampled_labels
from .base import Method, check_choice, check_int, check_unit
from .registry import register

F64 = np.float64


# ====================================================================== kernels
# A QNG state on one vector space R^d: {"t": number of updates, "factors": ((q, β), …)}, oldest
# factor first, at most τ of them. The kernels are pure: they never modify their arguments.


def init():
    """State before the first update: no factor, ``t = 0``, so ``Â_1 = A_1 = I`` and ``G_0 = I``."""
    return {"t": 0, "factors": ()}


def beta_of(alpha, s):
    """``β`` of (10) for ``s = ‖q‖²``: the positive root of ``s β² + 2√α β − (1 − α) = 0``,
    ``β = (√(α + (1−α)s) − √α)/s = (1 − α)/(√α + √(α + (1−α)s))`` (errata QNG-1; the second form
    is evaluated). A Python float (a NumPy float64 β would promote float32 states, NEP 50)."""
    alpha, s = float(alpha), float(s)
    return (1.0 - alpha) / (math.sqrt(alpha) + math.sqrt(alpha + (1.0 - alpha) * s))


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


def apply_A(state, v, alpha):
    """``Â v`` with ``Â = K_oldest ⋯ K_newest`` (9)/(11): newest factor applied first."""
    for q, b in reversed(state["factors"]):
        v = factor_apply(alpha, q, b, v)
    return v


def apply_At(state, v, alpha):
    """``Âᵀ v = K_newest ⋯ K_oldest v`` (each ``K`` symmetric): oldest factor applied first."""
    for q, b in state["factors"]:
        v = factor_apply(alpha, q, b, v)
    return v


def apply_A_inv(state, v, alpha):
    """``Â⁻¹ v = K_newest⁻¹ ⋯ K_oldest⁻¹ v``: oldest inverse applied first; O(dτ)."""
    for q, b in state["factors"]:
        v = factor_solve(alpha, q, b, v)
    return v


def apply_At_inv(state, v, alpha):
    """``Â⁻ᵀ v = K_oldest⁻¹ ⋯ K_newest⁻¹ v``: newest inverse applied first; O(dτ)."""
    for q, b in reversed(state["factors"]):
        v = factor_solve(alpha, q, b, v)
    return v


def _append(state, q, beta, tau):
    factors = state["factors"] + ((q, beta),)
    if tau is not None:
        factors = factors[-tau:]
    return {"t": state["t"] + 1, "factors": factors}


def _check_alpha_tau(alpha, tau):
    check_unit(alpha, "alpha", closed_low=False)
    if tau is not None:
        check_int(tau, "tau", 1)


def update(state, d, alpha, tau=None):
    """One update (9)–(11) with ``d_t``: ``q̂_t = Â_t⁻¹ d_t`` (Sherman–Morrison, O(dτ)),
    ``β_t`` from (10), append ``K̂_t``, keep the last ``τ`` factors (``tau=None``: all)."""
    _check_alpha_tau(alpha, tau)
    q = apply_A_inv(state, d, alpha)
    return _append(state, q, beta_of(alpha, q @ q), tau)


def direction(state, g, alpha):
    """``−Ĝ⁻¹ g = −Â⁻ᵀ Â⁻¹ g`` with ``Ĝ = Â Âᵀ`` the state's curvature (``Ĝ_t`` after ``t``
    updates: ``Ĝ_t = Â_{t+1} Â_{t+1}ᵀ``); O(dτ)."""
    return -apply_At_inv(state, apply_A_inv(state, g, alpha), alpha)


# ---------------------------------------------------------------- dense (the definition)
def dense_A(state, alpha, n):
    """The explicit ``n × n`` product ``Â = K_oldest ⋯ K_newest`` (9)/(11), ``K = √α I + β q qᵀ``,
    in float64 (``I`` when no factor is stored)."""
    A = np.eye(n, dtype=F64)
    for q, b in state["factors"]:
        q = np.asarray(to_numpy(q), dtype=F64)
        A = A @ (math.sqrt(alpha) * np.eye(n, dtype=F64) + b * np.outer(q, q))
    return A


def dense_G(state, alpha, n):
    """``Ĝ = Â Âᵀ`` (the curvature the state represents), float64, symmetrized."""
    A = dense_A(state, alpha, n)
    G = A @ A.T
    return (G + G.T) / 2


def dense_update(state, d, alpha, tau=None):
    """:func:`update` by the definition: ``q̂_t`` solved from the dense ``Â_t`` by LU with
    partial pivoting (float64)."""
    _check_alpha_tau(alpha, tau)
    d = np.asarray(to_numpy(d), dtype=F64)
    q = np.linalg.solve(dense_A(state, alpha, d.shape[0]), d)
    return _append(state, q, beta_of(alpha, q @ q), tau)


def dense_direction(state, g, alpha):
    """``−Ĝ⁻¹ g`` with ``Ĝ = Â Âᵀ`` formed densely and solved by Cholesky (float64)."""
    g = np.asarray(to_numpy(g), dtype=F64)
    return -spd_solve(dense_G(state, alpha, g.shape[0]), g, "Â Âᵀ")


def ema_dense(ds, alpha, G0=None):
    """The exact EMA (7): ``G_t = α G_{t−1} + (1 − α) d_t d_tᵀ`` over the rows of ``ds``
    ``(t, n)``, from ``G_0 = I`` (or ``G0``); float64."""
    ds = np.asarray(to_numpy(ds), dtype=F64)
    G = np.eye(ds.shape[1], dtype=F64) if G0 is None else np.array(G0, dtype=F64)
    for d in ds:
        G = alpha * G + (1.0 - alpha) * np.outer(d, d)
    return G


# ====================================================================== the method
@register
@dataclass(frozen=True)
class QNG(Method):
    """QNG (seed 004 §2.2, (7)–(11)): the EMA Fisher (7) kept in the product form
    ``Ĝ = Â Âᵀ``, ``Â`` the product of the last ``τ`` factors ``√α I + β q qᵀ``; the direction
    is ``−Ĝ_t⁻¹ g`` after updating with ``d_t`` (8) from labels sampled from the model.

    Hyper-parameters: ``alpha`` decay ∈ (0, 1) (default 0.99, the "second moment" coefficient of
    the seed's §4 training details), ``tau`` number of factors kept (int ≥ 1, or ``None`` =
    untruncated (9)), ``blocks`` = ``"full"`` (one QNG on θ ∈ R^n, the paper) | ``"layer"`` (one
    per layer matrix) | ``"tensor"`` (weight and bias separately).

    State: ``{"k": steps, "blocks": [kernel state per block]}``; a kernel state is
    ``{"t", "factors": ((q, β), …)}`` (oldest first), the same in both forms.
    """

    alpha: float = 0.99
    tau: int | None = 8
    blocks: str = "full"

    name = "qng"
    seed_ref = "004 §2.2 (7)-(11), Obs. 1"
    summary = "quasi-natural gradient: EMA Fisher as a product of τ rank-one-corrected scalings, O(nτ)"

    def __post_init__(self):
        check_unit(self.alpha, "alpha", closed_low=False)
        if self.tau is not None:
            check_int(self.tau, "tau", 1)
        check_choice(self.blocks, "blocks", BLOCKS)

    def n_blocks(self, net):
        return len(block_indices(net, self.blocks))

    def init(self, net, params):
        return {"k": 0, "blocks": [init() for _ in range(self.n_blocks(net))]}

    def draw(self, rng, state, net, params, batch):
        """One label per input, ``ŷ ~ p_θ(·|x)`` (8), drawn with the host generator."""
        return {"y_hat": sampled_labels(net, params, batch, rng)}

    def _step(self, state, net, params, batch, draws, dense):
        if len(state["blocks"]) != self.n_blocks(net):
            raise HyperParameterError(f"state has {len(state['blocks'])} blocks, blocks={self.blocks!r} "
                                      f"on this network needs {self.n_blocks(net)}")
        if dense:
            params = [np.asarray(to_numpy(W), dtype=F64) for W in net.check_params(params)]
        d = fisher_vector(net, params, batch, draws["y_hat"])           # (8)
        g = flatten(net.grad(params, batch.x, batch.y, batch.loss))     # mini-batch gradient
        upd, drt = (dense_update, dense_direction) if dense else (update, direction)
        out = xp_of(g).zeros_like(g)
        new_blocks = []
        for s, idx in zip(state["blocks"], block_indices(net, self.blocks)):
            s = upd(s, d[idx], self.alpha, self.tau)
            out[idx] = drt(s, g[idx], self.alpha)
            new_blocks.append(s)
        return unflatten(out, net), {"k": state["k"] + 1, "blocks": new_blocks}

    def _fast(self, state, net, params, batch, draws):
        return self._step(state, net, params, batch, draws, dense=False)

    def _dense(self, state, net, params, batch, draws):
        return self._step(state, net, params, batch, draws, dense=True)
