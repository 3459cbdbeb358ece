"""Ginger ([QNG-Ginger] §2.3, Algorithm 1): an EMA of the Fisher/GGN kept as a damped
"identity plus rank-τ" matrix whose inverse is updated directly.

Form (14): ``G_{t,γ} = γI + U_t diag(σ_t) U_tᵀ`` with ``U_t ∈ R^{d×τ}`` semi-orthogonal and
``σ_t ≥ 0``. Query (15)–(16): ``G_{t,γ}⁻¹ g = γ⁻¹g − U_t K_{t,γ} U_tᵀ g`` with
``K_{t,γ} = diag(σ/(γ² + γσ))``, ``O(dτ)``. Update (7) + (17), corrected (docs/errata.md,
GIN-1..3): the undamped part follows the EMA (7),

    G̃_{t,γ} = γI + α U_{t−1}Σ_{t−1}U_{t−1}ᵀ + (1−α) d_t d_tᵀ,

and Sherman–Morrison gives ``G̃_{t,γ}⁻¹ = γ⁻¹I − (U_{t−1} K^α_{t−1} U_{t−1}ᵀ + κ_t q_t q_tᵀ)`` with

    q_t = (γI + α U_{t−1}Σ_{t−1}U_{t−1}ᵀ)⁻¹ d_t      (= drt(U, ασ, d) of Algorithm 1, damping γ)
    K^α_{t−1} = diag(ασ/(γ² + γασ)) = α⁻¹ K_{t−1,γ/α}
    κ_t = (1−α) / (1 + (1−α) q_tᵀd_t).

This is (17) with ``h_t = G_{t−1,γ/α}⁻¹ d_t = α q_t`` and ``β_t = (1−α)α⁻¹/(α + (1−α)h_tᵀd_t)``
(the printed β lacks the factor ``1−α``), and the authors' code form ``κ = b/(1 + b qᵀd)``.
The correction is then truncated to its ``τ`` largest eigenvalues by the symmetric Brand
update (:func:`refcurv.linalg.lowrank.brand_update`, Algorithm 1's ``r1u``) and ``σ`` is
recovered by (18) ``σ = γ²K/(1 − γK)`` (:func:`refcurv.linalg.ema.ginger_sigma`).

Floating-point policy for (18)–(19): in exact arithmetic ``0 ⪯ K ≺ γ⁻¹`` (19); in floating
point an eigenvalue of the correction can come out ``< 0`` (a direction with no curvature,
rounding) or ``≥ γ⁻¹`` (curvature beyond ``γ/eps``). Before (18), ``K`` is clipped to
``[0, (1 − δ)/γ]`` with ``δ = 4·eps`` of the dtype, so ``0 ≤ σ ≤ γ(1 − δ)/δ`` is finite.
(Algorithm 1's ``(1 − γK)^†`` would map ``1 − γK = 0`` to ``σ = 0`` and ``1 − γK < 0`` to
``σ < 0``; the authors' code clips ``K ≤ 1/γ`` and zeroes tiny σ: errata GIN-4.)

Dense form (the definition, :mod:`refcurv.linalg.ema`): ``d_t = −√N ∇Ψ(ŷ)`` from the mean
loss at the same sampled labels (:func:`~refcurv.methods._sampled.fisher_vector_dense`); the
same EMA step with d×d matrices, ``G̃ = γI + α(G_{t−1,γ} − γI) + (1−α)ddᵀ`` formed densely,
inverted by Cholesky (:func:`~refcurv.linalg.woodbury.spd_solve`), the correction
``C = γ⁻¹I − G̃⁻¹`` truncated by a dense eigendecomposition to its ``τ`` largest eigenvalues
``U K Uᵀ``, ``σ`` from (18) with the same clip (:func:`~refcurv.linalg.ema.ginger_update_dense`);
the direction solves ``G_{t,γ} x = g`` by Cholesky (:func:`~refcurv.linalg.ema.ginger_solve_dense`);
all in float64 (parameters and state cast, design §3), while the fast form runs in the input
dtype. Fast and dense agree to rounding step by step (truncated or not); with ``t ≤ τ`` (no
truncation yet) ``G_{t,γ}`` equals the exact damped EMA ``γI + Σ_s α^{t−s}(1−α) d_s d_sᵀ``
(``σ₀ = 0``).

Shared by both forms: the sampled labels ``ŷ`` (``Draws.labels``, made once by
:meth:`Ginger.draw`), the block layout (:func:`~refcurv.methods._sampled.block_indices`), the
initial state ``(U₀, σ₀)`` (:func:`init`), and (18) with its clip
(:func:`~refcurv.linalg.ema.ginger_sigma`; tested in ``tests/test_linalg_ema.py``). Not
shared: ``d_t`` (per-sample sum vs mean gradient), the update (Sherman–Morrison + Brand vs
dense inverse + eigendecomposition), the query ((15) vs Cholesky of (14)).

Curvature (:meth:`Ginger.curvature`): the stored inverse (15) per block is
``G_{t,γ}⁻¹ = γ⁻¹I − U_t diag(K_{t,γ}) U_tᵀ`` (``K`` of (16)), so
``C = Inverse(LowRankPlusIdentity(1/γ, U_t, −K_{t,γ}))`` (= ``γI + U_t diag(σ_t) U_tᵀ`` (14)
while ``U_tᵀU_t = I``), block-diagonal over the blocks' index sets into θ; the direction is
``−C⁻¹ g`` (``C.solve`` is the O(dτ) query (15)), ``g`` the mini-batch gradient.

The method (Algorithm 1): ``d_t`` from (8), ``d_t = (1/√|B|) Σ_{x∈B} ∇_θ log p_θ(ŷ|x) =
−(1/√|B|) Σ_x ∇ψ(x, ŷ)`` with one label ŷ per input drawn from the model in :meth:`draw`
(so ``E[d_t d_tᵀ]`` is the batch Fisher (6)); the state is updated with ``d_t`` first, then
the direction is ``−G_{t+1,γ}⁻¹ ∇L`` with ``∇L`` the mini-batch gradient at the data
labels. No momentum (Algorithm 1 has none).

Blocks and vectorization: θ in refcurv's row-major order (:mod:`refcurv.vec`).
``blocks="full"``: one Ginger on all of θ (the paper's θ ∈ R^d); ``"layer"``: one per
layer matrix ``W_l`` (row-major ``vec``, bias column included); ``"tensor"``: one per
parameter tensor, weight and bias separate (the authors' code, design §8). Per block the
rank is ``min(τ, d_block)``: with ``τ ≥ d_block`` nothing is ever truncated and the block is
the exact damped EMA (Lemma 1's equality ``λ_max(G⁻¹) = γ⁻¹`` then no longer holds).

Initialization (Algorithm 1): ``σ₀ = 0``, so ``G_{0,γ} = γI`` (the undamped EMA starts at 0,
not at the identity of §2.1); ``U₀`` is a random semi-orthogonal matrix (``u0="random"``,
QR of a Gaussian drawn on the host from ``seed``) or ``eye(d, τ)`` (``u0="eye"``, the
authors' code). With ``σ₀ = 0`` the choice of ``U₀`` does not change ``U_t K_t U_tᵀ`` in exact
arithmetic (only the basis of the zero eigenspace).

Names: the hyper-parameter ``beta`` is the EMA decay α of (7), ``damping`` is γ of (14) and
``rank`` is τ (refcurv.methods.vocabulary); the kernels below keep ``alpha``, ``gamma``, ``tau``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import eigh, rng_of, xp_of
from ..errors import ArgumentTypeError, HyperParameterError
from ..linalg import _checks as C
from ..linalg.ema import (
    check_alpha_gamma,
    check_ginger,
    ginger_K,
    ginger_sigma,
    ginger_solve_dense,
    ginger_update_dense,
)
from ..linalg.lowrank import brand_update
from ..operators import BlockDiagonal, Inverse, LowRankPlusIdentity
from ..vec import flatten, unflatten
from ._sampled import BLOCKS, SampledLabelsMixin, block_indices, fisher_vector, fisher_vector_dense
from .base import Method, State, check_choice, check_int, check_positive, check_unit, state_field
from .registry import register


# ----------------------------------------------------------------- kernels (one block)
def init(d, tau, u0="random", seed=None, dtype=np.float64):  # host: U₀ is drawn on the host (design §6), Ginger.init moves it
    """``(U₀, σ₀)`` of Algorithm 1: ``σ₀ = 0`` and ``U₀`` random semi-orthogonal (QR of a
    ``d×τ`` Gaussian drawn on the host from ``seed``, signs fixed by ``diag(R) > 0``) or
    ``eye(d, τ)`` (``u0="eye"``, the authors' code); ``1 ≤ τ ≤ d``."""
    check_int(d, "d")
    check_int(tau, "tau")
    if tau > d:
        raise HyperParameterError(f"tau must be ≤ d = {d} (U is d×τ semi-orthogonal), got {tau}")
    check_choice(u0, "u0", ("random", "eye"))
    if u0 == "eye":
        U = np.eye(d, tau, dtype=dtype)
    else:
        Q, R = np.linalg.qr(rng_of(seed).standard_normal((d, tau)))
        U = (Q * np.where(np.diag(R) < 0, -1.0, 1.0)).astype(dtype)
    return U, np.zeros(tau, dtype=dtype)


def query(U, sigma, g, gamma):
    """(15)–(16), Algorithm 1's ``drt``: ``(γI + U diag(σ) Uᵀ)⁻¹ g = γ⁻¹g − U K_γ Uᵀ g`` in
    ``O(dτ)`` (``g`` a vector ``(d,)`` or a matrix ``(d, k)``; needs ``UᵀU = I``)."""
    gamma = float(gamma)  # a NumPy float64 scalar would promote float32 arrays (NEP 50)
    K = ginger_K(sigma, gamma)
    UtG = U.T @ g
    return g / gamma - U @ (K[:, None] * UtG if UtG.ndim == 2 else K * UtG)


def sm_coefficient(q, d, alpha):
    """Sherman–Morrison coefficient of the corrected (17) in the ``q`` form:
    ``κ = (1−α)/(1 + (1−α)qᵀd)`` with ``q = (γI + αUΣUᵀ)⁻¹d``, so that
    ``(γI + αUΣUᵀ + (1−α)ddᵀ)⁻¹ = (γI + αUΣUᵀ)⁻¹ − κ q qᵀ``. Equal to
    ``β_t h_t h_tᵀ`` of (17) with ``h_t = α q`` and ``β_t = (1−α)α⁻¹/(α + (1−α)h_tᵀd)``."""
    b = 1.0 - alpha
    return b / (1.0 + b * float(q @ d))


def update(U, sigma, d, alpha, gamma):
    """Fast update (Algorithm 1 ``upd``, corrected): EMA (7) of the undamped part with ``d``
    through Sherman–Morrison (17), then the rank-one eigen update (``r1u``, Brand) truncated
    to ``τ`` and σ from (18). Returns ``(U_t, σ_t)``; ``O(dτ² + τ³)``."""
    check_alpha_gamma(alpha, gamma)
    alpha, gamma = float(alpha), float(gamma)  # keep the input dtype (NEP 50)
    U, sigma = check_ginger(U, sigma)
    d = C.vector(d, "d", U.shape[0])
    n, tau = U.shape
    q = query(U, alpha * sigma, d, gamma)  # (γI + αUΣUᵀ)⁻¹ d = α⁻¹ h_t
    kappa = sm_coefficient(q, d, alpha)  # κ q qᵀ = β_t h_t h_tᵀ
    K_prev = ginger_K(alpha * sigma, gamma)  # = α⁻¹ K_{t−1,γ/α}
    if tau < n:
        U2, K2 = brand_update(U, K_prev, q, kappa, rank=tau)
    else:  # τ = d: q ∈ range(U); the core is diag(K) + κ mmᵀ, m = Uᵀq (no truncation)
        m = U.T @ q
        w, V = eigh(xp_of(U).diag(K_prev) + kappa * xp_of(U).outer(m, m))
        order = xp_of(w).argsort(-w)
        U2, K2 = U @ V[:, order], w[order]
    return U2, ginger_sigma(K2, gamma)


# ----------------------------------------------------------------------- the method
@dataclass(frozen=True, kw_only=True)
class GingerState(State):
    """Ginger's state: the form (14) ``G_{t,γ} = γI + U_t diag(σ_t) U_tᵀ`` per block, the same
    in both forms (float64 from the dense form)."""

    U: list = state_field(doc="per block, U_t of (14): a (d_b, min(τ, d_b)) semi-orthogonal basis of the "
                              "low-rank EMA of d_t d_tᵀ (columns ordered as sigma)")
    sigma: list = state_field(doc="per block, σ_t of (14): the eigenvalues ≥ 0 (descending) of the "
                                  "undamped EMA approximation U_t diag(σ_t) U_tᵀ, from (18)")


@register
@dataclass(frozen=True)
class Ginger(SampledLabelsMixin, Method):
    """Ginger ([QNG-Ginger] Algorithm 1, with the corrections of docs/errata.md).
    Hyper-parameters: ``beta`` = α of (7), the EMA decay ∈ (0, 1); ``damping`` = γ > 0 of
    (14); ``rank`` = τ ≥ 1 (per block ``min(τ, d_block)``); ``blocks`` ("full" | "layer" |
    "tensor"); ``u0`` ("random" | "eye") and ``seed`` (for ``u0="random"``, used by ``init``).

    State: :class:`GingerState` (``U``, ``sigma`` per block). Draws: ``labels`` ``(1, N, …)``,
    one ``ŷ ~ p_θ(·|x)`` per input; ``d_t`` of (8) is computed from them.

    ``rhs`` is the mini-batch gradient ``g``; the curvature is the damped EMA approximation
    (14) per block, stored through its inverse (15):
    ``C = Inverse(LowRankPlusIdentity(1/γ, U_t, −K_{t,γ}))``, ``K`` of (16); the direction is
    ``−C⁻¹ g``.

    Shared by both forms: the labels ``ŷ``, :func:`~refcurv.methods._sampled.block_indices`,
    :func:`init`, :func:`~refcurv.linalg.ema.ginger_sigma` (18) with its clip. The fast form:
    :func:`fisher_vector`, :func:`update`, :func:`query`; the dense form:
    :func:`fisher_vector_dense`, :func:`~refcurv.linalg.ema.ginger_update_dense`,
    :func:`~refcurv.linalg.ema.ginger_solve_dense`."""

    beta: float = 0.99
    damping: float = 1e-2
    rank: int = 4
    blocks: str = "full"
    u0: str = "random"
    seed: int = 0

    name = "ginger"
    seed_ref = "[QNG-Ginger] §2.3 (14)–(18), Alg. 1"
    summary = "damped EMA Fisher as γI + rank-τ eigendecomposition; inverse updated by Sherman–Morrison + Brand"
    State = GingerState
    draw_fields = ("labels",)

    def __post_init__(self):
        check_unit(self.beta, "beta", closed_low=False)
        check_positive(self.damping, "damping")
        check_int(self.rank, "rank")
        check_choice(self.blocks, "blocks", BLOCKS)
        check_choice(self.u0, "u0", ("random", "eye"))
        check_int(self.seed, "seed", minimum=0)

    def init(self, net, params):
        rng = np.random.default_rng(self.seed)
        dtype = params[0].dtype
        Us, sigmas = [], []
        for idx in block_indices(net, self.blocks):
            U, s = init(len(idx), min(self.rank, len(idx)), self.u0, rng, dtype)
            Us.append(xp_of(params[0]).asarray(U))
            sigmas.append(xp_of(params[0]).asarray(s))
        return GingerState(U=Us, sigma=sigmas)

    def _blocks(self, state, net, like=None):
        return self._check_blocks(net, state.U, state.sigma, like=like)

    def _step(self, state, net, params, batch, d, upd, qry):
        g = flatten(cv._mean_layer_grads(net, params, batch.x, batch.y, batch.loss))
        direction = xp_of(g).zeros_like(g)
        Us, sigmas = [], []
        for idx, U, s in zip(self._blocks(state, net, like=g), state.U, state.sigma):
            U, s = upd(U, s, d[idx], self.beta, self.damping)            # Algorithm 1 upd
            direction[idx] = -qry(U, s, g[idx], self.damping)           # −G_{t+1,γ}⁻¹ ∇L
            Us.append(U)
            sigmas.append(s)
        return unflatten(direction, net), state.replace(k=state.k + 1, U=Us, sigma=sigmas, diagnostics={})

    def _fast(self, state, net, params, batch, draws):
        self._blocks(state, net)
        d = fisher_vector(net, params, batch, draws.labels[0])          # (8), per-sample sum
        return self._step(state, net, params, batch, d, update, query)

    def _dense(self, state, net, params, batch, draws):
        self._blocks(state, net)
        d = fisher_vector_dense(net, params, batch, draws.labels[0])    # (8) = −√N ∇Ψ(ŷ)
        return self._step(state, net, params, batch, d, ginger_update_dense, ginger_solve_dense)

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``C = Inverse(LowRankPlusIdentity(1/γ, U, −K_γ(σ)))`` per block ((15)–(16): the
        stored inverse of (14)), block-diagonal over the blocks' index sets into θ; needs
        ``net`` (the block layout)."""
        self.check_state(state)
        if net is None:
            raise ArgumentTypeError("ginger.curvature needs net (for the block layout of θ)")
        idx = self._blocks(state, net)
        gamma = float(self.damping)
        # (15): G_{t,γ}⁻¹ = γ⁻¹I − U diag(K_γ(σ)) Uᵀ is what the fast form applies; C is its inverse
        blocks = [Inverse(LowRankPlusIdentity(1.0 / gamma, U, -ginger_K(s, gamma)))
                  for U, s in zip(state.U, state.sigma)]
        return BlockDiagonal(blocks, index=idx)
