"""SENG — Sketchy Empirical Natural Gradient (journal version, [SENG] §2–§4; conference
version, [SENG-conf] §3.4 for the historical buffers). Equation numbers are [SENG]'s unless
marked "[SENG-conf]".

Definition (the dense form)
---------------------------
Per layer ``l`` (layer index dropped below), with the mini-batch ``S`` of ``ϱ`` samples,
per-sample gradients ``u_i = vec(Ĝ_i Â_iᵀ)`` (3) and

    U = ϱ^{-1/2} [u_1, …, u_ϱ],   M = U Uᵀ = (1/ϱ) Σ_i u_i u_iᵀ          (4)–(5)
    d = −(M + λI)^{-1} g                                                  (7)

(``g`` the mini-batch gradient, the step ``θ ← θ + α d``; refcurv's ``direction`` is ``d``).
refcurv vectorizes row-major (``vec_row(G Aᵀ) = Σ_t g_t ⊗ a_t``); the papers' ``vec`` is
column-major (``a ⊗ g``). Everything here is written with ``mat(z)`` — the ``(out, d)``
matrix, identical in both orders — so the only place the order shows is the Kronecker
sketch: the paper's ``Ω_A ⊗ Ω_G`` on ``vec_col`` is ``Ω_G ⊗ Ω_A`` on refcurv's ``vec_row``.

Fast forms
----------
* **SMW (8)–(9)**: ``d = −a g + a U b``, ``a = 1/λ``, ``b = (λI + UᵀU)^{-1} Uᵀ g`` (a
  ``ϱ × ϱ`` Cholesky solve).
* **Sketched LS (10)–(13)** (``sketch_size = q``): ``Ξ = ΩU``, ``ξ = Ωg``,
  ``b̂ = (λI + ΞᵀΞ)^{-1} Ξᵀ ξ`` (12), ``d̂ = −a g + a U b̂`` (13). ``Ω`` is a row-sampling
  sketch (14) — ``sketch="uniform"`` or ``"leverage"`` (``p_i ∝ ‖U_{i,:}‖²``), with or without
  replacement — with refcurv's *unbiased* weights (``E[ΩᵀΩ] = I``; errata E4 explains why
  (14)'s ``e_iᵀ/p_i`` is not). ``Ω = I`` (``q ≥ n``, uniform, without replacement: every row
  once, weight ``√(n/n) = 1``) gives (8) exactly. ``sketch_size`` is one number for the whole
  network, so a layer with fewer rows than ``q`` takes every row it can (without replacement:
  all rows with positive probability; ``Ω = I`` for uniform) — SENG's documented reading of a
  network-wide ``q``. The kernel :func:`refcurv.linalg.sketch.row_sampling`, which samples one
  matrix, refuses ``q`` larger than its rows instead (the README's input policy). A zero
  ``U`` makes ``Ξ = 0``, ``b̂ = 0`` for any ``Ω`` (uniform is then used).
  *Dense matrix of the approximation.* By the push-through identity,
  ``(λI + U UᵀS)^{-1} = (1/λ)(I − U(λI + UᵀSU)^{-1}UᵀS)`` for ``S = ΩᵀΩ``, so (13) is exactly
  ``d̂ = −(λI + M̂)^{-1} g`` with the non-symmetric ``M̂ = U Uᵀ ΩᵀΩ`` (its non-zero
  eigenvalues are those of ``ΞᵀΞ ⪰ 0``, so ``λI + M̂`` is invertible). The dense form builds
  ``Ω`` densely, forms ``M̂`` and solves by LU with partial pivoting.
* **Implicit storage (15)–(24)** for layers with ``n^l ≥ threshold`` (Algorithm 1's test
  ``n^l < 𝒯`` picks the explicit path): rank-``r`` factors ``u_i ≈ vec(G_i A_iᵀ)`` (15) from a
  partial SVD of ``Ĝ_i`` or ``Â_i`` (footnote 1; [SENG-conf] §3.3: ``Ĝ_i ≈ N Σ V``, ``G_i = NΣ``,
  ``A_i = Â_i Vᵀ``) — ``svd="exact"`` (batched LAPACK SVD) or ``"randomized"`` (batched
  Halko–Martinsson–Tropp range finder,
  :func:`refcurv.linalg.batched.randomized_svd_batched`, Gaussian test matrix seeded by
  ``Draws.seeds["svd/<layer>"]``); ``svd_of="auto"`` factors the one with fewer rows (its
  rank is the smaller), ``rank=None`` keeps ``G_i = Ĝ_i``, ``A_i = Â_i`` (``r = κ``).
  With ``r ≥ rank`` of the factored matrix (in particular ``r = κ``) the factors are exact:
  ``G_i A_iᵀ = Ĝ_i V_rᵀV_r Â_iᵀ = Ĝ_i Â_iᵀ``. Row sketches ``Ω_A`` (``sketch_size_A = ζ_A``)
  and ``Ω_G`` (``ζ_G``) of ``Ã``, ``G̃`` (16)–(17) (``None``: ``Ξ = Ã`` resp. ``G̃``; leverage
  scores from the row norms of ``Ã``, ``G̃``; same weights and clamping as above), then
  :func:`sketched_Utz` (19), :func:`sketched_UtU` (21) and :func:`cu` (23) / :func:`uc_exact`
  (22) (``uc="cu" | "exact"``). Scalings — the printed (19), (21), (22)–(23) approximate
  ``u_iᵀz``, ``u_iᵀu_j`` and ``Σ c_i u_i``, the columns of ``√ϱ U`` (errata SENG-2):

      𝒜(z) = ϱ^{-1/2}·(19),   ℬ = ϱ^{-1}·(21),   C_U(c) = ϱ^{-1/2}·(23) ≈ U c
      b̂ = (ℬ + λI)^{-1} 𝒜(g),   d̂ = −a g + a C_U(b̂)                  (24) corrected

  ((24) prints ``−(1/λ)g + C_U(b̂)``, without the ``a = 1/λ`` on the second term that (8) and
  (13) have — errata SENG-1). (19) and (21) equal ``((Ω_A ⊗ Ω_G)u_i)ᵀ((Ω_A ⊗ Ω_G)z)`` and
  ``((Ω_A ⊗ Ω_G)u_i)ᵀ((Ω_A ⊗ Ω_G)u_j)`` (column-major; the remark after (24)), so ``b̂`` is
  (12) with ``Ω = Ω_A ⊗ Ω_G`` and ``U`` replaced by the low-rank ``Ũ``. *Dense form:*
  ``Ũ`` formed from the factors, ``Ω = Ω_G ⊗ Ω_A`` (row-major) formed densely; with
  ``uc="exact"`` ``d̂ = −(λI + ŨŨᵀΩᵀΩ)^{-1}g`` (LU); with ``uc="cu"`` — ``C_U`` is not linear
  in ``c`` (it is positively homogeneous: ``C_U(tc) = t C_U(c)`` for ``t ≥ 0``) so there is no
  matrix — ``b̂`` is solved from the dense ``ŨᵀΩᵀΩŨ + λI`` (Cholesky) and (23) applied.
  ``C_U(c) = Uc`` exactly when at most one ``c_i ≠ 0``; ``C_U(0) = 0`` (the ``0/0`` of (23)
  read as 0).
* **Curvature update frequency** ``T_inv = T`` (Algorithm 1): ``U`` (explicit) or the
  factors ``Ã, G̃`` (implicit) are rebuilt at the refresh steps and otherwise reused from
  the state (stale); the gradient and the sketches are new every step. ``phase="k0"``
  (default, refcurv's convention :func:`~refcurv.methods.base.refresh_due`): refresh at the
  0-based step ``k`` iff ``k ≡ 0 (mod T)``. ``phase="paper"``: Algorithm 1's test
  ``k mod T = 0`` with Algorithm 2's 1-based ``k = 1, 2, …`` — refresh iff
  ``k + 1 ≡ 0 (mod T)`` (0-based ``k``); at the first step, where the printed
  ``U_k = U_{k−1}`` has no ``U_0`` to read, ``U`` is built (as at every step where the state
  holds none).
* **Historical buffers** ([SENG-conf] §3.4; explicit layers only):
  ``history="decay"``: ``U_k = p^{-1/2}[ζ^{p−1} g_{k−p+1}, …, ζ^0 g_k]`` ([SENG-conf] (24),
  ``memory = p``, ``beta = ζ ∈ (0, 1]``); ``history="hybrid"``:
  ``U_k = p^{-1/2}[g_{k−v}, …, g_{k−1}, ∇ψ_{i_1}(θ_k), …, ∇ψ_{i_{p−v}}(θ_k)]`` ([SENG-conf] (25),
  ``hybrid_v = v``, ``1 < v < p``; the ``p − v`` distinct indices drawn uniformly from the
  batch in :meth:`SENG.draw`, ``Draws.sketches["hybrid"]``). Before ``p`` (resp. ``v``) gradients exist the missing
  columns are zero (they do not change ``UUᵀ``). The buffer is updated every step.
* **Distributed SENG** (§4) with ``workers = 𝓜`` simulated workers on an array axis; the
  batch (size divisible by ``𝓜``) is split evenly in order, ``S = [S_1, …, S_𝓜]``. With the
  definition (5), ``U = [U^{(1)}, …, U^{(𝓜)}]`` where ``U^{(w)} = ϱ^{-1/2}[u_j]_{j∈S_w}``
  ``= 𝓜^{-1/2} U_{S_w}`` (``U_{S_w}`` normalized as in (5) by its own ``|S_w|``), and (8) is

      d = −a g + a Σ_w U^{(w)} b_w                                        (25) corrected

  (a sum over workers — (25) prints ``(1/𝓜) Σ_w U_{S_w} b_w``, and ``[U_{S_1}, …, U_{S_𝓜}]``
  is ``√𝓜 U``, not ``U``: errata SENG-3). ``block_capacitance=False`` couples all workers: (8) for any 𝓜
  (``normalization`` is then irrelevant).
  ``block_capacitance=True``: (26), the capacitance replaced by its block diagonal, solved with the
  worker axis as a batch axis; ``b̂_w`` depends only on worker ``w``'s samples and ``g`` (as
  the text requires, so "block-approx{(λI + UᵀU)^{-1}}" is the inverse of the block diagonal,
  not the block diagonal of the inverse). Which ``U`` the blocks come from is
  ``normalization``:

  - ``"worker"`` (default; the printed (25)–(26) read with (5)'s per-worker ``U_{S_w}``):
    ``b̂_w = (λI + U_{S_w}ᵀU_{S_w})^{-1}U_{S_w}ᵀg``, ``d = −a g + (a/𝓜)Σ_w U_{S_w}b̂_w``
    ``= −(1/𝓜) Σ_w (λI + M_{S_w})^{-1} g`` — the average of the workers' own SENG directions
    (``M_{S_w} = 𝓜 M_w``, worker ``w``'s own EFIM): always a descent direction, (7) when
    ``𝓜 = 1`` or when the workers' EFIMs coincide.
  - ``"global"`` (the block diagonal of (9)'s ``λI + UᵀU``, built from the definition (7)):
    ``b̂_w = (λI + U^{(w)ᵀ}U^{(w)})^{-1}U^{(w)ᵀ}g``. With ``M_w = U^{(w)}U^{(w)ᵀ}`` (worker
    ``w``'s own EFIM / 𝓜) and ``U^{(w)}b̂_w = g − λ(λI + M_w)^{-1}g``, the *dense block-diagonal
    formula* is

        d = −Σ_w (λI + M_w)^{-1} g + ((𝓜 − 1)/λ) g                        (26) dense

    exact (= (7)) when the workers' gradient spans are mutually orthogonal; **not always a
    descent direction**: along a direction all workers share with curvature ``σ_w ≫ λ``,
    ``gᵀd ≈ (𝓜 − 1)‖g‖²/λ > 0`` (in the smoke problem of the tests it diverges).

  In code both are ``b̃_w = (λI + c U^{(w)ᵀ}U^{(w)})^{-1}U^{(w)ᵀ}g'``, ``d = −a g + a Σ_w
  U^{(w)}b̃_w`` with ``c = 𝓜`` resp. ``1`` (``diagnostics["b_hat"]`` holds ``b̃``; the per-worker
  ``b̂_w`` of "worker" is ``√𝓜 b̃_w``); dense: ``(𝓜_b g'/c − g)/λ − (1/c)Σ_w(λI +
  c M̂_w)^{-1}g'`` (``𝓜_b`` blocks). ``delayed=True``: (27), ``b̃`` from ``g_{k−1}`` (kept in the
  state; the current ``g`` at ``k = 0``) with ``d = −a g_k + a Σ_w U^{(w)} b̃_w``. Sketches
  apply per worker with a common ``Ω`` (``M̂_w = U^{(w)}U^{(w)ᵀ}ΩᵀΩ``). Implicit layers use the
  block diagonal of (21); with ``uc="cu"`` and ``sync_cu=True`` (and ``𝓜 > 1``) ``Uc`` is (28):
  ``ϱ^{-1/2} vec((Σ_w (G^c)_w)(Σ_w (A^c)_w)ᵀ)``, ``(G^c)_w = Σ_{j∈S_w} √|c_j| G_j``,
  ``(A^c)_w = Σ_{j∈S_w} c_j A_j / Σ_{j∈S_w} √|c_j|`` (the printed denominator's index is
  garbled — errata SENG-5; the per-worker sum is meant), otherwise (23).

Tolerances relating the forms (used by ``tests/test_method_seng.py``): both are backward
stable, so they differ by ``C·(n+ϱ)·eps`` times the condition numbers of the matrices
solved (``λI + ΞᵀΞ``: ``κ ≤ (λ + ‖Ξ‖₂²)/λ``; ``λI + M̂``: computed) times the size of the
terms that cancel (``g/λ`` and ``U b̂/λ`` — SMW forms ``(Ub − g)/λ``, so the relative error of
``d`` scales with ``‖g‖/(λ‖d‖)``, up to ``(λ + ‖M‖)/λ``). For ``uc="cu"``, ``√|c_i|`` is only
Hölder-½ continuous, so a perturbation ``δc`` moves ``C_U`` by ``O(√‖δc‖)``; the test
bounds it accordingly. Fast and dense agree to those bounds; the fast sketched/implicit
directions *approximate* (7), related by Lemma 5 (36) (errata E5):
``‖b − b̂‖ ≤ (√ε + η)/((1 − η)√h₁) ‖g‖`` and ``‖d − d̂‖ ≤ ‖U‖₂‖b − b̂‖/λ`` with ``η``, ``ε`` of
the drawn sketch.

Not implemented: the authors' code variant (design §8: ``D/s`` sample scaling, conv
gradients summed — refcurv's per-sample gradients are already the true sums over
positions); a separate curvature sample set ``S̃_k`` (the same batch is used).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import curvature as cv
from ..backend import to_numpy, xp_of
from ..errors import DrawsError, HyperParameterError
from ..linalg import sketch as SK
from ..linalg.batched import randomized_svd_batched, spd_solve_batched, truncated_svd_batched
from ..linalg.woodbury import spd_solve
from ..operators import BlockDiagonal, Inverse, LowRankPlusIdentity
from ..vec import layer_slices
from .base import (
    Draws,
    Method,
    State,
    check_choice,
    check_int,
    check_positive,
    check_unit,
    layer_grads,
    refresh_due,
    state_field,
)
from .registry import register

__all__ = [
    "SENG", "SENGDistributed", "SENGState",
    "efim_factor", "lowrank_factors", "row_sketch", "apply_sketch", "capacitance_solve", "smw_direction",
    "sketched_Utz", "sketched_UtU", "cu", "uc_exact", "implicit_direction", "history_decay", "history_hybrid",
    "dense_block_direction", "refresh_step", "sketch_from_draws",
    # re-exported from refcurv.linalg.batched (their home since issue 9)
    "spd_solve_batched", "randomized_svd_batched",
]

# ============================================================ pure functions, one per equation


def efim_factor(u):
    """(4)–(5): ``U = ϱ^{-1/2}[u_1, …, u_ϱ]`` ``(n, ϱ)`` from the per-sample gradients ``u``
    ``(ϱ, out, d)`` of one layer (``u_i = vec_row(∇_{W}ψ_i)``), so that ``U Uᵀ = M`` is the
    layer's EFIM block. (Returned as the transpose of the row-stacked ``(ϱ, n)`` array.)"""
    N = u.shape[0]
    return (u.reshape(N, -1) / math.sqrt(N)).T


def refresh_step(k, T, phase="k0"):
    """Algorithm 1's ``k mod T = 0`` test at the 0-based step ``k``: ``phase="k0"`` is
    refcurv's convention :func:`~refcurv.methods.base.refresh_due` (``k ≡ 0 (mod T)``);
    ``phase="paper"`` reads Algorithm 2's 1-based ``k`` (``k + 1 ≡ 0 (mod T)``)."""
    return refresh_due(k, T) if phase == "k0" else refresh_due(k + 1, T)


def lowrank_factors(A_hat, G_hat, rank=None, svd="exact", svd_of="auto", seed=None, oversample=10, power_iter=2):
    """(15): rank-``r`` factors ``(G, A)`` ``(N, n_G, r)``, ``(N, n_A, r)`` with
    ``G_i A_iᵀ ≈ Ĝ_i Â_iᵀ``, from a partial SVD of ``Ĝ_i`` (``svd_of="G"``) or ``Â_i``
    (``"A"``; ``"auto"``: the one with fewer rows, ties → G) — footnote 1, [SENG-conf] §3.3:
    ``X_i ≈ N Σ V`` gives ``X_i ← NΣ``, ``Y_i ← Ŷ_i Vᵀ``. ``r = min(rank, rows of X, κ)``.
    ``svd="exact"``: :func:`~refcurv.linalg.batched.truncated_svd_batched`; ``"randomized"``:
    :func:`~refcurv.linalg.batched.randomized_svd_batched` (test matrices from ``seed``).
    ``rank=None``: no SVD, ``(Ĝ, Â)`` themselves (``r = κ``)."""
    if rank is None:
        return G_hat, A_hat
    nG, nA, kappa = G_hat.shape[1], A_hat.shape[1], G_hat.shape[2]
    use_G = svd_of == "G" or (svd_of == "auto" and nG <= nA)
    X, Y = (G_hat, A_hat) if use_G else (A_hat, G_hat)
    r = min(int(rank), X.shape[1], kappa)
    if svd == "exact":
        Un, s, Vt = truncated_svd_batched(X, r)
    else:
        Un, s, Vt = randomized_svd_batched(X, r, seed=seed, oversample=oversample, power_iter=power_iter)
    Xr = Un * s[..., None, :]
    Yr = Y @ Vt.swapaxes(-1, -2)
    return (Xr, Yr) if use_G else (Yr, Xr)


def row_sketch(n, q, kind, replace, X, seed):  # host: the sketch is drawn on the host (design §6)
    """(14): the row-sampling sketch ``Ω`` ``(q, n)`` of the ``n`` rows of ``X`` (``(n, …)``),
    a :class:`~refcurv.linalg.sketch.RowSketch` with refcurv's unbiased weights (errata E4);
    ``q=None``: no sketch (``None``). ``kind="leverage"``: ``p_i ∝ ‖X_{i,:}‖²`` (§3.2; uniform
    if ``X = 0``). Without replacement ``q`` is clamped to ``n``, and to the number of rows
    with ``p_i > 0``, which are then all taken with weight 1 (a permutation on them)."""
    if q is None:
        return None
    probs = "uniform"
    if kind == "leverage":
        # host float64: float32 row norms normalized in float32 miss Σp = 1 by ~1e-7, which
        # row_sampling rejects (the float32 fast form used to fail here)
        Xh = np.asarray(to_numpy(X), dtype=np.float64).reshape(n, -1)
        if np.any(Xh != 0):
            probs = SK.leverage_scores(Xh)
    if not replace and not isinstance(probs, str):
        support = np.flatnonzero(probs)
        if q >= support.size:
            # every row with p_i > 0 is taken surely (π_i = 1, weight 1); built here rather than by
            # systematic πps sampling, whose capping loop can meet 0/0 on the zero rows then
            return SK.RowSketch(n=n, index=support.astype(np.int64), weight=np.ones(support.size))
    if not replace:
        q = min(q, n)
    return SK.row_sampling(n, int(q), probs, replace=replace, seed=seed)


def apply_sketch(sk, X, axis):
    """``Ω`` applied along ``axis`` of ``X`` (rows ``weight[k]·e_{index[k]}ᵀ``; ``sk=None``: the
    identity) — ``ΩU``, ``Ωg`` (10)–(11), ``Ω_A Ã_i``, ``Ω_G G̃_i`` (17)."""
    if sk is None:
        return X
    xp = xp_of(X)
    idx = xp.asarray(sk.index)
    w = xp.asarray(sk.weight, dtype=X.dtype)
    shape = [1] * X.ndim
    shape[axis] = -1
    return xp.take(X, idx, axis=axis) * w.reshape(shape)


def capacitance_solve(lam, Xi, xi, blocks=1, scale=1):
    """(12): ``b̂ = (λI + ΞᵀΞ)^{-1} Ξᵀ ξ`` (``Ξ = ΩU``, ``ξ = Ωg``; ``Ω = I``: (9)), with the
    capacitance ``λI + c ΞᵀΞ`` (``c = scale``) replaced by its ``blocks`` diagonal blocks
    (26) — the worker axis as a batch axis of :func:`~refcurv.linalg.batched.spd_solve_batched`.
    ``Xi`` ``(q, ϱ)``, ``xi`` ``(q,)``; returns ``(ϱ,)``."""
    xp = xp_of(Xi)
    q, rho = Xi.shape
    m = rho // blocks
    Xw = Xi.reshape(q, blocks, m)
    Xb = xp.moveaxis(Xw, 1, 0)  # (blocks, q, m): the Gram ΞᵀΞ per block as a batched GEMM
    cap = scale * (xp.swapaxes(Xb, 1, 2) @ Xb) + lam * xp.eye(m, dtype=Xi.dtype)
    rhs = (xi @ Xi).reshape(blocks, m)
    return spd_solve_batched(cap, rhs, "λI + ΞᵀΞ").reshape(rho)


def smw_direction(U, b, g, lam):
    """(8) / (13) / (25): ``d = −a g + a U b`` with ``a = 1/λ`` (as ``(U b − g)/λ``), ``U``
    ``(n, ϱ)``, ``b`` ``(ϱ,)``, ``g`` the layer's gradient ``(out, d)``."""
    return (U @ b - g.ravel()).reshape(g.shape) / lam


def sketched_Utz(XiA, XiG, XiZ):
    """(19): ``elesum((Ξ_zᵀ Ξ_{G_i}) ⊙ Ξ_{A_i})`` for every sample ``i`` — the sketched
    ``u_iᵀ z`` (per-sample, *unnormalized*; ``Uᵀz ≈ ϱ^{-1/2}·`` this, errata SENG-2). ``XiA``
    ``(ϱ, ζ_A, r)``, ``XiG`` ``(ϱ, ζ_G, r)``, ``XiZ = Ω_G mat(z) Ω_Aᵀ`` ``(ζ_G, ζ_A)``.
    Returns ``(ϱ,)``."""
    xp = xp_of(XiA)
    T = XiZ.T @ XiG  # Ξ_zᵀ Ξ_{G_i}, (ϱ, ζ_A, r): one GEMM broadcast over i
    return (T * XiA).sum(axis=(1, 2))


def sketched_UtU(XiA, XiG):
    """(21): ``elesum((Ξ_{A_i}ᵀ Ξ_{A_j}) ⊙ (Ξ_{G_i}ᵀ Ξ_{G_j}))`` — the sketched ``u_iᵀ u_j``
    (``UᵀU ≈ ϱ^{-1}·`` this, errata SENG-2). Leading batch axes (e.g. workers) are allowed:
    ``(…, ϱ, ζ, r)`` → ``(…, ϱ, ϱ)``."""
    from ..linalg.gemm import kron_gram as _kron_gram

    # on BLAS (issue 15: the einsum here ran at ~2% of GEMM speed): the ϱ·r stacked
    # sketched factors' Grams by GEMM, or the sketched gradients' Gram (syrk), whichever
    # needs fewer flops (refcurv.curvature._kron_gram; exact either way)
    lead = XiA.shape[:-3]
    if not lead:
        return _kron_gram(XiA, XiG)
    xp = xp_of(XiA)
    A2 = XiA.reshape((-1,) + XiA.shape[-3:])
    G2 = XiG.reshape((-1,) + XiG.shape[-3:])
    return xp.stack([_kron_gram(a, g) for a, g in zip(A2, G2)]).reshape(lead + (XiA.shape[-3],) * 2)


def cu(c, G, A, workers=1):
    """``Σ_i c_i G_i A_iᵀ`` approximated by (23) (``workers=1``) or by (28) (``workers = 𝓜``,
    samples split evenly in order): ``(Σ_w Σ_{j∈S_w} √|c_j| G_j)(Σ_w Σ_{j∈S_w} c_j A_j / s_w)ᵀ``
    with ``s_w = Σ_{j∈S_w} √|c_j|`` (a worker with ``s_w = 0`` contributes 0; errata SENG-5).
    Returns ``mat`` of the result, ``(n_G, n_A)``. Exact when at most one ``c_i ≠ 0``."""
    xp = xp_of(G)
    rho = c.shape[0]
    m = rho // workers
    cw = c.reshape(workers, m)
    s = xp.sqrt(xp.abs(cw))
    tot = s.sum(axis=1)
    safe = xp.where(tot > 0, tot, 1.0)
    coef = xp.where((tot > 0)[:, None], cw / safe[:, None], 0.0)
    # Σ_{w,m} s_{wm} G_{wm}: a GEMV over the ϱ stacked factors (BLAS, no einsum loop)
    Gc = (s.reshape(-1) @ G.reshape(rho, -1)).reshape(G.shape[1:])
    Ac = (coef.reshape(-1) @ A.reshape(rho, -1)).reshape(A.shape[1:])
    return Gc @ Ac.T


def uc_exact(c, G, A):
    """(22): ``Σ_i c_i vec(G_i A_iᵀ)`` (as ``mat``, ``(n_G, n_A)``)."""
    from ..linalg.gemm import factor_sum as _factor_sum

    return _factor_sum(G * c[:, None, None], A)  # one GEMM over the folded (i, r) axes


def implicit_direction(G, A, g, gp, lam, skA=None, skG=None, blocks=1, scale=1, uc="cu", cu_workers=1):
    """(16)–(24) for one implicit layer, with the ϱ-scalings of errata SENG-2 and ``a = 1/λ``
    on ``C_U`` (SENG-1): ``Ξ_{A_i} = Ω_A Ã_i``, ``Ξ_{G_i} = Ω_G G̃_i`` (17);
    ``𝒜(g') = ϱ^{-1/2}·(19)``; ``ℬ = ϱ^{-1}·(21)``, block diagonal over ``blocks`` workers and
    scaled by ``c = scale`` (26); ``b̂ = (ℬ + λI)^{-1}𝒜(g')``; ``C_U(b̂) = ϱ^{-1/2}·(23)`` (or
    (28) with ``cu_workers > 1``; ``uc="exact"``: (22)); ``d̂ = (C_U(b̂) − g)/λ`` (24).
    ``G`` ``(ϱ, n_G, r)``, ``A`` ``(ϱ, n_A, r)``, ``g``, ``gp`` (``g'``: the gradient the
    capacitance is applied to, ``g_{k−1}`` for (27)) ``(n_G, n_A)``. Returns ``(d̂, b̂)``."""
    xp = xp_of(g)
    rho = G.shape[0]
    XiA, XiG = apply_sketch(skA, A, 1), apply_sketch(skG, G, 1)  # (17)
    XiZ = apply_sketch(skA, apply_sketch(skG, gp, 0), 1)  # Ω_G mat(g') Ω_Aᵀ
    a = sketched_Utz(XiA, XiG, XiZ) / math.sqrt(rho)  # 𝒜(g') = ϱ^{-1/2}(19)
    m = rho // blocks
    Bw = sketched_UtU(XiA.reshape((blocks, m) + XiA.shape[1:]), XiG.reshape((blocks, m) + XiG.shape[1:])) \
        * (scale / rho)
    cap = Bw + lam * xp.eye(m, dtype=g.dtype)  # ℬ + λI (block diagonal)
    b = spd_solve_batched(cap, a.reshape(blocks, m), "ℬ + λI").reshape(rho)
    if uc == "cu":
        Uc = cu(b, G, A, cu_workers) / math.sqrt(rho)  # (23) / (28)
    else:
        Uc = uc_exact(b, G, A) / math.sqrt(rho)  # (22)
    return (Uc - g) / lam, b  # (24), with a = 1/λ on C_U (errata SENG-1)


def history_decay(buffer, g, beta):  # host: p host scalars (the decay weights)
    """[SENG-conf] (24): the buffer of the last ``p`` gradients ``(p, out, d)`` (oldest first) shifted by
    ``g = g_k``, and ``U_k = p^{-1/2}[β^{p−1}g_{k−p+1}, …, β^0 g_k]`` ``(n, p)`` ([SENG-conf]'s decay
    ``ζ`` is refcurv's ``beta``). Returns ``(new_buffer, U_k)``."""
    xp = xp_of(g)
    p = buffer.shape[0]
    nb = xp.concatenate([buffer[1:], g[None]], axis=0)  # g_{k−p+1} … g_k
    w = xp.asarray(beta ** np.arange(p - 1, -1, -1.0), dtype=g.dtype)
    cols = nb * w[:, None, None]
    return nb, (cols.reshape(p, -1) / math.sqrt(p)).T


def history_hybrid(buffer, g, u_sampled, p):
    """[SENG-conf] (25): ``U_k = p^{-1/2}[g_{k−v}, …, g_{k−1}, ∇ψ_{i_1}(θ_k), …, ∇ψ_{i_{p−v}}(θ_k)]``
    ``(n, p)`` from the buffer of the last ``v`` gradients ``(v, out, d)`` (oldest first) and the
    sampled per-sample gradients ``u_sampled`` ``(p − v, out, d)``; the buffer then shifts by
    ``g = g_k``. Returns ``(new_buffer, U_k)``."""
    xp = xp_of(g)
    cols = xp.concatenate([buffer, u_sampled], axis=0)  # g_{k−v} … g_{k−1}, ∇ψ_{i}(θ_k)
    nb = xp.concatenate([buffer[1:], g[None]], axis=0)
    return nb, (cols.reshape(cols.shape[0], -1) / math.sqrt(p)).T


def dense_block_direction(M_blocks, S, g, gp, lam, scale=1):  # host: float64 reference on the host
    """The dense reference of (7) / (13) / (26) / (27): ``(𝓜_b g'/c − g)/λ − (1/c) Σ_w (λI +
    c M̂_w)^{-1} g'`` with ``M̂_w = M_w S`` (``S = ΩᵀΩ``, or ``None`` for ``I``), ``𝓜_b =
    len(M_blocks)`` blocks and Gram scale ``c = scale``; for ``c = 1`` arranged as ``−g/λ +
    Σ_w [g'/λ − (λI + M̂_w)^{-1}g']``, so that one block without delay is exactly
    ``−(λI + M̂)^{-1} g``. Cholesky for ``S = None`` (SPD), LU with partial pivoting otherwise.
    Vectors flat ``(n,)``."""
    n = g.shape[0]
    X = 0.0
    for Mw in M_blocks:  # loop over workers (dense reference)
        Mw = scale * Mw
        if S is None:
            X = X + spd_solve(lam * np.eye(n) + Mw, gp, "λI + M_w")
        else:
            X = X + np.linalg.solve(lam * np.eye(n) + Mw @ S, gp)
    nb = len(M_blocks)
    if scale == 1:
        return -X + (nb * gp - g) / lam
    return -X / scale + (nb * gp / scale - g) / lam


# ============================================================================ state and draws


@dataclass(frozen=True, kw_only=True)
class SENGState(State):
    """SENG's state ([SENG] (4)–(5), (15)–(17); [SENG-conf] (24)–(25)); per-layer lists."""

    U: list = state_field(doc="per layer: the U of (4)-(5) the last step used, (n^l, ρ') with columns "
                              "ϱ^{-1/2}u_i (or the history columns of [SENG-conf] (24)/(25)); U Uᵀ = M^l. Kept for the "
                              "stale steps between refreshes (Algorithm 1). None for implicit layers", default=[])
    lowrank_factors: list = state_field(doc="per layer: the low-rank factors (G̃, Ã) of (15)-(16), shapes (ϱ, n_G, r) and "
                                    "(ϱ, n_A, r) with u_i ≈ vec(G̃_i Ã_iᵀ); None for explicit layers", default=[])
    g: Any = state_field("g", default=None)
    buffer: Any = state_field(doc="history buffer per layer (history != 'none'): the last p (decay, [SENG-conf] (24)) "
                                  "or v (hybrid, [SENG-conf] (25)) mini-batch gradients, (p or v, out, d), oldest first; "
                                  "None otherwise", default=None)


def _sketch_key(name, j, part):
    return f"{name}/{j}/{part}"


def sketch_from_draws(draws, name, j, n):  # host: draws are host arrays
    """The :class:`~refcurv.linalg.sketch.RowSketch` ``name`` (``"Omega"``, ``"Omega_A"`` or
    ``"Omega_G"``) of layer ``j`` in ``draws`` (``n`` rows sketched), or ``None`` if absent."""
    ix = _sketch_key(name, j, "index")
    if ix not in draws.sketches:
        return None
    return SK.RowSketch(n=n, index=np.asarray(draws.sketches[ix], dtype=np.int64),
                        weight=np.asarray(draws.sketches[_sketch_key(name, j, "weight")], dtype=np.float64))


# ===================================================================================== method


def _opt_int(value, name, minimum=1):
    if value is not None:
        check_int(value, name, minimum)


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise HyperParameterError(f"{name} must be a bool, got {value!r}")


@register
@dataclass(frozen=True)
class SENG(Method):
    """SENG ([SENG] (7)–(24), Algorithms 1–2; [SENG-conf] §3.4; distributed §4 (25)–(28)); the module
    docstring derives every form.

    Hyper-parameters (defaults): ``damping`` λ (1.0); explicit sketch ``sketch`` ("uniform" |
    "leverage"), ``sketch_size`` q (None: no sketch, the SMW (8)–(9)), ``replace`` (False);
    ``threshold`` 𝒯 (inf: every layer explicit; a layer with ``n^l ≥ 𝒯`` is implicit);
    implicit ``rank`` r (None: r = κ, no SVD), ``svd`` ("exact" | "randomized"), ``svd_of``
    ("auto" | "G" | "A"), ``oversample`` (10), ``power_iter`` (2), ``sketch_size_A`` ζ_A and
    ``sketch_size_G`` ζ_G (None: no sketch), ``uc`` ("cu": (23) | "exact": (22));
    ``T_inv`` T (1), ``phase`` ("k0" | "paper", Algorithm 1's 1-based schedule);
    ``history`` ("none" | "decay": [SENG-conf] (24) | "hybrid": [SENG-conf] (25)), ``memory`` p (4),
    ``beta`` ζ (1.0), ``hybrid_v`` v (2); ``workers`` 𝓜 (1), ``normalization`` ("worker" |
    "global"), ``block_capacitance`` ((26), True), ``delayed`` ((27), False), ``sync_cu``
    ((28), True).

    State: :class:`SENGState` (``k``, ``U``, ``lowrank_factors``, ``g``, ``buffer``, ``diagnostics``).
    Diagnostics: ``refreshed`` (``U`` or the factors rebuilt this step), ``damping``,
    ``storage`` (per layer "explicit" | "implicit") and ``b_hat`` (per layer the capacitance
    solution ``b̂`` of (9)/(12)/(24)/(26) as a list, ``None`` where the dense form solves the
    ``n × n`` system instead).

    Draws (:meth:`draw`): ``sketches["Omega/<j>/index"]``, ``["Omega/<j>/weight"]`` — the
    explicit row sketch (14) of layer ``j`` (``q`` row indices into ``U``'s ``n^l`` rows and
    their weights); ``"Omega_A/<j>/…"``, ``"Omega_G/<j>/…"`` — the implicit layer's ``Ω_A``
    (rows of ``Ã_i``, ``n_A = d``) and ``Ω_G`` (rows of ``G̃_i``, ``n_G = out``) (17);
    ``"hybrid"`` — the ``p − v`` distinct per-sample indices of [SENG-conf] (25); ``seeds["svd/<j>"]``
    — the seed of the randomized SVD's Gaussian test matrices (15) (kept a seed: the matrices
    are ``(ϱ, n, k)`` per refresh and a caller that replays them can pass its own factors
    through the state instead). Leverage-score sketches (``p_i ∝`` row norms of the ``U`` or
    ``Ã, G̃`` this step uses) need ``U``: :meth:`draw` then computes it with the fast form's
    kernels (:meth:`curvature_factors`). An injected sketch is consumed as given.

    Curvature (:meth:`curvature`, ``direction = −C⁻¹ g``): per layer ``C_l = λI + U_lU_lᵀ``
    (7) with the ``U`` of the state (``LowRankPlusIdentity(λ, U_l, 1)``; implicit layers with
    ``uc="exact"`` and no sketch: ``Ũ`` formed from the factors); with the block capacitance
    (26) (``𝓜_b`` blocks, scale ``c``) ``C_l = H_l^{-1}``, ``H_l = (1/λ)(I − U B^{-1}Uᵀ)``,
    ``B = blockdiag_w(λI + c U_wᵀU_w)`` (``Inverse`` of a ``LowRankPlusIdentity``). Not a
    symmetric operator, hence refused: a row sketch (``λI + UUᵀΩᵀΩ``), ``C_U`` (23)/(28)
    (not linear), the delayed gradient (27) (the direction is not ``−C⁻¹v``).

    Shared by both forms: the draws (sketches, hybrid indices, SVD seeds), the refresh test
    :func:`refresh_step`, the per-sample factors ``net.factors`` and :func:`lowrank_factors`
    (15) of the implicit path, :func:`cu` (23)/(28) (``C_U`` has no matrix), and the stale
    ``U`` / factors / buffer read from the state. The fast form: :func:`efim_factor`,
    :func:`apply_sketch`, :func:`capacitance_solve`, :func:`smw_direction`,
    :func:`implicit_direction` (:func:`sketched_Utz`, :func:`sketched_UtU`, :func:`uc_exact`),
    :func:`history_decay` / :func:`history_hybrid`. The dense form: the EFIM blocks (per worker)
    from :func:`refcurv.curvature.empirical_fisher`, the per-sample gradients from
    :func:`refcurv.curvature.per_sample_grads`, the history columns written out literally,
    dense ``Ω`` and ``Ω_G ⊗ Ω_A``, and :func:`dense_block_direction`.
    """

    damping: float = 1.0
    sketch: str = "uniform"
    sketch_size: Optional[int] = None
    replace: bool = False
    threshold: float = math.inf
    rank: Optional[int] = None
    svd: str = "exact"
    svd_of: str = "auto"
    oversample: int = 10
    power_iter: int = 2
    sketch_size_A: Optional[int] = None
    sketch_size_G: Optional[int] = None
    uc: str = "cu"
    T_inv: int = 1
    phase: str = "k0"
    history: str = "none"
    memory: int = 4
    beta: float = 1.0
    hybrid_v: int = 2
    workers: int = 1
    normalization: str = "worker"
    block_capacitance: bool = True
    delayed: bool = False
    sync_cu: bool = True

    name = "seng"
    seed_ref = "[SENG] (2)-(24), Alg. 1-2; [SENG-conf] §3.4 (24)-(25)"
    summary = "per-layer damped empirical Fisher by SMW, sketched LS, implicit low-rank storage"
    State = SENGState

    def __post_init__(self):  # host: scalar hyper-parameter checks
        check_positive(self.damping, "damping")
        check_choice(self.sketch, "sketch", ("uniform", "leverage"))
        _opt_int(self.sketch_size, "sketch_size")
        _flag(self.replace, "replace")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float, np.integer, np.floating)) \
                or np.isnan(self.threshold) or self.threshold < 0:
            raise HyperParameterError(f"threshold must be a number >= 0 (inf allowed), got {self.threshold!r}")
        _opt_int(self.rank, "rank")
        check_choice(self.svd, "svd", ("exact", "randomized"))
        check_choice(self.svd_of, "svd_of", ("auto", "G", "A"))
        check_int(self.oversample, "oversample", 0)
        check_int(self.power_iter, "power_iter", 0)
        _opt_int(self.sketch_size_A, "sketch_size_A")
        _opt_int(self.sketch_size_G, "sketch_size_G")
        check_choice(self.uc, "uc", ("cu", "exact"))
        check_int(self.T_inv, "T_inv")
        check_choice(self.phase, "phase", ("k0", "paper"))
        check_choice(self.history, "history", ("none", "decay", "hybrid"))
        check_int(self.memory, "memory")
        check_unit(self.beta, "beta", closed_low=False, closed_high=True)
        check_int(self.hybrid_v, "hybrid_v")
        if self.history == "hybrid" and not 1 < self.hybrid_v < self.memory:
            raise HyperParameterError(
                f"hybrid_v must satisfy 1 < hybrid_v < memory ([SENG-conf] (25)), "
                f"got hybrid_v={self.hybrid_v}, memory={self.memory}")
        check_int(self.workers, "workers")
        check_choice(self.normalization, "normalization", ("global", "worker"))
        _flag(self.block_capacitance, "block_capacitance")
        _flag(self.delayed, "delayed")
        _flag(self.sync_cu, "sync_cu")
        if self.history != "none" and self.workers > 1:
            raise HyperParameterError(
                f"workers must be 1 with history={self.history!r} (buffer columns belong to no worker)")

    # ------------------------------------------------------------------ set-up
    def _paths(self, net):
        """Algorithm 1's test: ``n^l < 𝒯`` explicit, else implicit."""
        return ["explicit" if o * d < self.threshold else "implicit" for o, d in net.param_shapes]

    def init(self, net, params):
        paths = self._paths(net)
        if self.history != "none" and "implicit" in paths:
            raise HyperParameterError(
                f"history={self.history!r} needs every layer explicit; threshold={self.threshold!r} makes "
                f"layers {[j for j, p in enumerate(paths) if p == 'implicit']} implicit")
        L = len(paths)
        return SENGState(U=[None] * L, lowrank_factors=[None] * L)

    def _check_workers(self, rho):
        if rho % self.workers:
            raise HyperParameterError(f"workers = {self.workers} must divide the number of samples {rho}")

    def _blocks(self):
        return self.workers if self.block_capacitance else 1

    def _gram_scale(self):
        """``c`` multiplying the Gram blocks: 𝓜 for (26) with ``normalization="worker"``
        (``U_{S_w} = √𝓜 U^{(w)}`` normalized by its own ``|S_w|`` as (5) defines it, the printed
        (25)–(26)); 1 for ``"global"`` (blocks of (9)'s ``λI + UᵀU``) and for
        ``block_capacitance=False`` (full coupling is (8) whatever the normalization)."""
        return self.workers if (self.normalization == "worker" and self.block_capacitance) else 1

    def _cu_workers(self):
        return self.workers if (self.sync_cu and self.workers > 1) else 1

    def _due(self, k):
        return refresh_step(k, self.T_inv, self.phase)

    # ------------------------------------------------------------------ draws
    @property
    def draw_fields(self):
        """The :class:`Draws` fields this configuration consumes on *every* network (the
        per-network keys are checked by :meth:`check_draws`)."""
        explicit_only, implicit_only = self.threshold == math.inf, self.threshold == 0
        implicit_sk = self.sketch_size_A is not None or self.sketch_size_G is not None
        sketches = (self.history == "hybrid" or (self.sketch_size is not None and (explicit_only or implicit_sk))
                    or (implicit_sk and implicit_only))
        seeds = implicit_only and self.svd == "randomized" and self.rank is not None
        return (("sketches",) if sketches else ()) + (("seeds",) if seeds else ())

    def _draw_keys(self, net):
        """``(sketch names per layer, seed names)`` this step consumes on ``net``."""
        names, seeds = {}, []
        for j, path in enumerate(self._paths(net)):
            if path == "explicit":
                names[j] = ["Omega"] if self.sketch_size is not None else []
            else:
                names[j] = [n for n, q in (("Omega_A", self.sketch_size_A), ("Omega_G", self.sketch_size_G))
                            if q is not None]
                if self.svd == "randomized" and self.rank is not None:
                    seeds.append(f"svd/{j}")
        return names, seeds

    @staticmethod
    def _sketch_rows(net, j, name):
        o, d = net.param_shapes[j]
        return {"Omega": o * d, "Omega_A": d, "Omega_G": o}[name]

    def draw(self, rng, state, net, params, batch):  # host: draws are made on the host (design §6)
        """The step's random numbers as arrays: per layer four seeds are drawn (explicit Ω,
        Ω_A, Ω_G, randomized-SVD test matrices; this order keeps refcurv's earlier streams),
        then the hybrid indices of [SENG-conf] (25); the sketches are then built from their seeds —
        leverage scores from the ``U`` / factors of this step (:meth:`curvature_factors`)."""
        L = len(net.param_shapes)
        seeds = rng.integers(2**63 - 1, size=(L, 4))
        sketches = {}
        if self.history == "hybrid":
            N, need = len(batch.x), self.memory - self.hybrid_v
            if N < need:
                raise HyperParameterError(
                    f"memory - hybrid_v = {need} per-sample gradients need a batch of >= {need}, got {N}")
            sketches["hybrid"] = np.sort(rng.choice(N, size=need, replace=False))
        names, seed_names = self._draw_keys(net)
        out_seeds = {s: int(seeds[int(s.split("/")[1]), 3]) for s in seed_names}
        Us = facs = None
        if self.sketch == "leverage" and any(names.values()):
            partial = Draws(method=self.name, sketches=dict(sketches), seeds=out_seeds)
            _, g, Us, facs, _, _ = self.curvature_factors(state, net, params, batch, partial)
        col = {"Omega": 0, "Omega_A": 1, "Omega_G": 2}
        size = {"Omega": self.sketch_size, "Omega_A": self.sketch_size_A, "Omega_G": self.sketch_size_G}
        for j, layer_names in names.items():
            for name in layer_names:
                X = None
                if Us is not None:
                    gj = g[j]
                    if name == "Omega":
                        X = xp_of(gj).asarray(Us[j], dtype=gj.dtype)  # rows of U
                    else:
                        F = facs[j][0] if name == "Omega_G" else facs[j][1]
                        X = xp_of(gj).asarray(F, dtype=gj.dtype).swapaxes(0, 1)  # rows of G̃_i / Ã_i
                sk = row_sketch(self._sketch_rows(net, j, name), size[name], self.sketch, self.replace, X,
                                int(seeds[j, col[name]]))
                sketches[_sketch_key(name, j, "index")] = sk.index
                sketches[_sketch_key(name, j, "weight")] = np.asarray(sk.weight, dtype=np.float64)
        return Draws(method=self.name, sketches=sketches, seeds=out_seeds)

    def check_draws(self, draws, state, net, params, batch):  # host: draws are host arrays
        """Beyond the base checks: every sketch and seed this network's layers consume is
        present; sketch indices are 1-D integer arrays into the sketched rows, weights finite
        and positive of the same length; the hybrid indices are ``p − v`` distinct sample
        indices ([SENG-conf] (25))."""
        super().check_draws(draws, state, net, params, batch)
        names, seed_names = self._draw_keys(net)
        for j, layer_names in names.items():
            for name in layer_names:
                n = self._sketch_rows(net, j, name)
                ki, kw = _sketch_key(name, j, "index"), _sketch_key(name, j, "weight")
                for key in (ki, kw):
                    if key not in draws.sketches:
                        raise DrawsError(f"{self.name}: draws.sketches[{key!r}] is missing (layer {j} "
                                         f"consumes the row sketch {name})")
                idx, w = np.asarray(draws.sketches[ki]), np.asarray(draws.sketches[kw])
                if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= n:
                    raise DrawsError(f"{self.name}: draws.sketches[{ki!r}] must be a non-empty 1-D integer array "
                                     f"of row indices in [0, {n}), got shape {idx.shape}, dtype {idx.dtype}")
                if w.shape != idx.shape or w.dtype.kind != "f" or not np.all(np.isfinite(w)) or not np.all(w > 0):
                    raise DrawsError(f"{self.name}: draws.sketches[{kw!r}] must be finite positive weights of "
                                     f"shape {idx.shape}, got shape {w.shape}")
        if self.history == "hybrid":
            N, need = len(batch.x), self.memory - self.hybrid_v
            h = draws.sketches.get("hybrid")
            if h is None:
                raise DrawsError(f"{self.name}: draws.sketches['hybrid'] is missing ([SENG-conf] (25) per-sample indices)")
            h = np.asarray(h)
            if h.shape != (need,) or h.dtype.kind not in "iu" or np.unique(h).size != need \
                    or h.min() < 0 or h.max() >= N:
                raise DrawsError(f"{self.name}: draws.sketches['hybrid'] must be {need} distinct sample indices "
                                 f"in [0, {N}), got {h!r}")
        for s in seed_names:
            v = draws.seeds.get(s)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise DrawsError(f"{self.name}: draws.seeds[{s!r}] must be an int (randomized SVD seed), got {v!r}")
        return draws

    # ------------------------------------------------------------- fast form
    def curvature_factors(self, state, net, params, batch, draws):
        """The fast form's ``U`` (explicit) or ``(G̃, Ã)`` (implicit) of this step — fresh at a
        refresh step (:func:`efim_factor` (4)–(5), :func:`lowrank_factors` (15), the history
        :func:`history_decay` / :func:`history_hybrid`), else the state's. Returns
        ``(paths, g, U, factors, buffer, refreshed)`` (``g`` per layer)."""
        g, U_ps = layer_grads(net, params, batch)
        N = U_ps[0].shape[0]
        paths = self._paths(net)
        due = self._due(state.k)
        Us, facs = list(state.U), list(state.lowrank_factors)
        buffer, refreshed = None, False
        if self.history != "none":
            xp = xp_of(g[0])
            length = self.memory if self.history == "decay" else self.hybrid_v
            old = state.buffer or [xp.zeros((length,) + gi.shape, dtype=gi.dtype) for gi in g]
            buffer = []
            for j, (gi, bj) in enumerate(zip(g, old)):
                bj = xp.asarray(bj, dtype=gi.dtype)
                if self.history == "decay":
                    nb, U = history_decay(bj, gi, self.beta)
                else:
                    nb, U = history_hybrid(bj, gi, U_ps[j][xp.asarray(draws.sketches["hybrid"])], self.memory)
                buffer.append(nb)
                if due or Us[j] is None:
                    Us[j], refreshed = U, True
            return paths, g, Us, facs, buffer, refreshed
        need_f = [j for j, p in enumerate(paths) if p == "implicit" and (due or facs[j] is None)]
        if need_f:
            A_hat, G_hat = net.factors(params, batch.x, batch.y, batch.loss)
        for j, path in enumerate(paths):
            if path == "explicit" and (due or Us[j] is None):
                self._check_workers(N)
                Us[j], refreshed = efim_factor(U_ps[j]), True
            elif j in need_f:
                self._check_workers(N)
                facs[j] = lowrank_factors(A_hat[j], G_hat[j], self.rank, self.svd, self.svd_of,
                                          seed=draws.seeds.get(f"svd/{j}"), oversample=self.oversample,
                                          power_iter=self.power_iter)
                refreshed = True
        return paths, g, Us, facs, buffer, refreshed

    def _g_prev(self, state, g):
        """``g'``: the gradient the capacitance sees — ``g_{k−1}`` for (27) (``g`` at ``k = 0``)."""
        if not self.delayed or state.g is None:
            return g
        return [xp_of(gi).asarray(gp, dtype=gi.dtype) for gi, gp in zip(g, state.g)]

    def _diagnostics(self, refreshed, paths, bs):
        return {"refreshed": bool(refreshed), "damping": float(self.damping), "storage": list(paths),
                "b_hat": [None if b is None else [float(v) for v in to_numpy(b)] for b in bs]}

    def _fast(self, state, net, params, batch, draws):
        paths, g, Us, facs, buffer, refreshed = self.curvature_factors(state, net, params, batch, draws)
        g_prev = self._g_prev(state, g)
        lam, M, c = self.damping, self._blocks(), self._gram_scale()
        direction, bs = [], []
        for j, path in enumerate(paths):
            gj, gp = g[j], g_prev[j]
            xp = xp_of(gj)
            if path == "explicit":
                U = xp.asarray(Us[j], dtype=gj.dtype)
                sk = sketch_from_draws(draws, "Omega", j, U.shape[0])
                Xi = apply_sketch(sk, U, 0)  # ΩU, (q, ρ')
                xi = apply_sketch(sk, gp.ravel(), 0)  # Ω g'
                b = capacitance_solve(lam, Xi, xi, M, c)  # (9) / (12) / (26) / (27)
                d = smw_direction(U, b, gj, lam)  # (8) / (13) / (25)
            else:
                Gf, Af = (xp.asarray(F, dtype=gj.dtype) for F in facs[j])
                skA = sketch_from_draws(draws, "Omega_A", j, Af.shape[1])
                skG = sketch_from_draws(draws, "Omega_G", j, Gf.shape[1])
                d, b = implicit_direction(Gf, Af, gj, gp, lam, skA, skG, M, c, self.uc, self._cu_workers())
            direction.append(d)
            bs.append(b)
        new = state.replace(k=state.k + 1, U=Us, lowrank_factors=facs, g=g, buffer=buffer,
                            diagnostics=self._diagnostics(refreshed, paths, bs))
        return direction, new

    # ------------------------------------------------------------ dense form
    def _dense_efims(self, net, P, batch):
        """Per layer the ``𝓜_b`` blocks ``M_w`` (worker ``w``'s share of (5): its own EFIM
        divided by ``𝓜_b``) from :func:`refcurv.curvature.empirical_fisher` (float64)."""
        nb = self._blocks()
        N = len(batch.x)
        m = N // nb
        per_worker = [cv.empirical_fisher(net, P, batch.x[w * m:(w + 1) * m], batch.y[w * m:(w + 1) * m],
                                          batch.loss, blocks=True) for w in range(nb)]  # loop over workers
        return [[Mw[j] / nb for Mw in per_worker] for j in range(len(net.param_shapes))]

    def _dense_history(self, state, g, u_flat, sl, draws):  # host: float64 reference on the host (to_numpy)
        """[SENG-conf] (24) / (25) written out column by column (the dense reference's own copy)."""
        p = self.memory
        cols_all, new_buf = [], []
        for j, gj in enumerate(g):
            past = state.buffer[j] if state.buffer is not None else None
            if self.history == "decay":
                past = [np.zeros_like(gj)] * p if past is None else [np.asarray(to_numpy(b), np.float64) for b in past]
                nb = past[1:] + [gj]  # g_{k−p+1}, …, g_k
                cols = [self.beta ** (p - 1 - t) * nb[t].ravel() for t in range(p)]
            else:
                v = self.hybrid_v
                past = [np.zeros_like(gj)] * v if past is None else [np.asarray(to_numpy(b), np.float64) for b in past]
                cols = [b.ravel() for b in past] + [u_flat[i, sl[j]] for i in np.asarray(draws.sketches["hybrid"])]
                nb = past[1:] + [gj]
            cols_all.append(np.stack(cols, axis=1) / math.sqrt(p))
            new_buf.append(np.stack(nb))
        return cols_all, new_buf

    def _dense(self, state, net, params, batch, draws):  # host: float64 reference on the host (to_numpy)
        P = net.check_params(params)
        u_flat = cv.per_sample_grads(net, P, batch.x, batch.y, batch.loss)  # (N, n), float64
        N = u_flat.shape[0]
        sl = layer_slices(net)
        g = [u_flat[:, s].mean(axis=0).reshape(shape) for s, shape in zip(sl, net.param_shapes)]
        gprev = self._g_prev(state, g)
        paths = self._paths(net)
        due = self._due(state.k)
        lam, c = self.damping, self._gram_scale()
        Us, facs = list(state.U), list(state.lowrank_factors)
        buffer, refreshed, efims = None, False, None
        if self.history != "none":
            hist, buffer = self._dense_history(state, g, u_flat, sl, draws)
        need_f = [j for j, p in enumerate(paths) if p == "implicit" and (due or facs[j] is None)]
        if need_f:
            self._check_workers(N)
            A_hat, G_hat = net.factors(P, batch.x, batch.y, batch.loss)
        direction, bs = [], []
        for j, path in enumerate(paths):
            gj, gp = g[j].ravel(), np.asarray(to_numpy(gprev[j]), dtype=np.float64).ravel()
            o, d_in = net.param_shapes[j]
            b = None
            if path == "explicit":
                fresh = due or Us[j] is None
                if self.history != "none":
                    if fresh:
                        Us[j] = hist[j]
                    U = np.asarray(to_numpy(Us[j]), dtype=np.float64)
                    Ms = [U @ U.T]
                elif fresh:
                    self._check_workers(N)
                    if efims is None:
                        efims = self._dense_efims(net, P, batch)
                    Ms = efims[j]  # (4)–(5) by refcurv.curvature
                    Us[j] = u_flat[:, sl[j]].T / math.sqrt(N)  # U of (4), for the stale steps
                else:
                    U = np.asarray(to_numpy(Us[j]), dtype=np.float64)
                    Ms = [Uw.T @ Uw for Uw in U.T.reshape(self._blocks(), -1, U.shape[0])]
                refreshed |= fresh
                sk = sketch_from_draws(draws, "Omega", j, o * d_in)
                S = None
                if sk is not None:
                    Om = sk.to_dense()
                    S = Om.T @ Om
                d = dense_block_direction(Ms, S, gj, gp, lam, c)
            else:
                if j in need_f:
                    facs[j] = lowrank_factors(A_hat[j], G_hat[j], self.rank, self.svd, self.svd_of,
                                              seed=draws.seeds.get(f"svd/{j}"), oversample=self.oversample,
                                              power_iter=self.power_iter)
                    refreshed = True
                Gf, Af = (np.asarray(to_numpy(F), dtype=np.float64) for F in facs[j])
                rho, nG, nA = Gf.shape[0], Gf.shape[1], Af.shape[1]
                skA, skG = sketch_from_draws(draws, "Omega_A", j, nA), sketch_from_draws(draws, "Omega_G", j, nG)
                OmG = np.eye(nG) if skG is None else skG.to_dense()
                OmA = np.eye(nA) if skA is None else skA.to_dense()
                Om = np.kron(OmG, OmA)  # row-major vec: Ω_G ⊗ Ω_A (= Ω_A ⊗ Ω_G column-major)
                S = Om.T @ Om
                Ut = np.einsum("igr,iar->iga", Gf, Af).reshape(rho, nG * nA) / math.sqrt(rho)  # Ũᵀ
                Uw = Ut.reshape(self._blocks(), rho // self._blocks(), -1)
                if self.uc == "exact":
                    d = dense_block_direction([W.T @ W for W in Uw], S, gj, gp, lam, c)
                else:  # C_U (23)/(28) is not linear: dense capacitance, then C_U
                    b = np.concatenate([spd_solve(lam * np.eye(W.shape[0]) + c * (W @ S @ W.T), W @ (S @ gp),
                                                  "λI + ŨᵀΩᵀΩŨ") for W in Uw])
                    d = (cu(b, Gf, Af, self._cu_workers()).ravel() / math.sqrt(rho) - gj) / lam
            direction.append(d.reshape(g[j].shape))
            bs.append(b)
        new = state.replace(k=state.k + 1, U=Us, lowrank_factors=facs, g=g, buffer=buffer,
                            diagnostics=self._diagnostics(refreshed, paths, bs))
        return direction, new

    # ------------------------------------------------------------ curvature
    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``C = blockdiag_l C_l`` (see the class docstring) from the ``U`` / factors of
        ``state`` (the state a step returned); ``direction = −C⁻¹ g``."""
        self.check_state(state)
        if state.k == 0:
            from ..errors import StateError

            raise StateError(f"{self.name}: curvature needs the state a step returned (state.k = 0 holds no U)")
        for flag, why in ((self.delayed, "delayed=True: (27) applies the capacitance to g_{k−1}, so the "
                                         "direction is not −C⁻¹v for one vector v"),
                          (self.sketch_size is not None and "explicit" in _storage(state),
                           "sketch_size is set: λI + UUᵀΩᵀΩ is not symmetric"),
                          ((self.sketch_size_A is not None or self.sketch_size_G is not None)
                           and "implicit" in _storage(state), "sketch_size_A/G set: λI + ŨŨᵀΩᵀΩ is not symmetric"),
                          (self.uc == "cu" and "implicit" in _storage(state),
                           "uc='cu': C_U (23)/(28) is not linear, the direction has no matrix")):
            if flag:
                raise HyperParameterError(f"{self.name}: no curvature operator with {why}")
        lam, nb, c = self.damping, self._blocks(), self._gram_scale()
        blocks = []
        for U, fac in zip(state.U, state.lowrank_factors):
            if U is None:
                Gf, Af = fac
                rho = Gf.shape[0]
                U = ((Gf @ xp_of(Gf).swapaxes(Af, 1, 2)).reshape(rho, -1) / math.sqrt(rho)).T  # Ũ (batched GEMM)
            xp = xp_of(U)
            if nb == 1 and c == 1:
                blocks.append(LowRankPlusIdentity(lam, U, xp.ones(U.shape[1], dtype=U.dtype)))  # λI + UUᵀ (7)
                continue
            # (26): H = (1/λ)(I − U B⁻¹Uᵀ), B = blockdiag_w(λI + c U_wᵀU_w) = V diag(β) Vᵀ blockwise
            n, rho = U.shape
            Uw = U.reshape(n, nb, rho // nb).swapaxes(0, 1)  # (𝓜_b, n, m)
            B = c * (Uw.swapaxes(1, 2) @ Uw) + lam * xp.eye(rho // nb, dtype=U.dtype)
            beta, V = xp.linalg.eigh(B)
            P = (Uw @ V).swapaxes(0, 1).reshape(n, rho)
            blocks.append(Inverse(LowRankPlusIdentity(1.0 / lam, P, -(1.0 / (lam * beta)).reshape(rho))))
        return BlockDiagonal(blocks)


def _storage(state):
    return ["explicit" if U is not None else "implicit" for U in state.U]


@register
@dataclass(frozen=True)
class SENGDistributed(SENG):
    """Distributed SENG ([SENG] §4): :class:`SENG` with ``workers = 2`` simulated workers by
    default, the block-diagonal approximation (26) (``block_capacitance=True``), optionally the
    delayed gradient (27) (``delayed=True``) and the synchronized ``C_U`` (28)
    (``sync_cu=True``). State, draws, curvature and shared kernels: :class:`SENG`."""

    workers: int = 2

    name = "seng_distributed"
    seed_ref = "[SENG] §4 (25)-(28)"
    summary = "SENG on simulated workers: block-diagonal UᵀU (26), delayed gradient (27), synced C_U (28)"
