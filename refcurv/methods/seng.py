"""SENG — Sketchy Empirical Natural Gradient (journal version, seed 001 §2–§4; conference
version, seed 000 §3.4 for the historical buffers). Equation numbers are 001's unless
marked "000".

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
  once, weight ``√(n/n) = 1``) gives (8) exactly. Without replacement ``q`` is clamped to the
  number of rows with positive probability; a zero ``U`` makes ``Ξ = 0``, ``b̂ = 0`` for any
  ``Ω`` (uniform is then used).
  *Dense matrix of the approximation.* By the push-through identity,
  ``(λI + U UᵀS)^{-1} = (1/λ)(I − U(λI + UᵀSU)^{-1}UᵀS)`` for ``S = ΩᵀΩ``, so (13) is exactly
  ``d̂ = −(λI + M̂)^{-1} g`` with the non-symmetric ``M̂ = U Uᵀ ΩᵀΩ`` (its non-zero
  eigenvalues are those of ``ΞᵀΞ ⪰ 0``, so ``λI + M̂`` is invertible). The dense form builds
  ``Ω`` densely, forms ``M̂`` and solves by LU with partial pivoting.
* **Implicit storage (15)–(24)** for layers with ``n^l ≥ threshold`` (Algorithm 1's test
  ``n^l < 𝒯`` picks the explicit path): rank-``r`` factors ``u_i ≈ vec(G_i A_iᵀ)`` (15) from a
  partial SVD of ``Ĝ_i`` or ``Â_i`` (footnote 1; 000 §3.3: ``Ĝ_i ≈ N Σ V``, ``G_i = NΣ``,
  ``A_i = Â_i Vᵀ``) — ``svd="exact"`` (batched LAPACK SVD) or ``"randomized"`` (batched
  Halko–Martinsson–Tropp range finder, :func:`randomized_svd_batched`, Gaussian test matrix
  seeded from :meth:`SENG.draw`); ``svd_of="auto"`` factors the one with fewer rows (its
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
* **Curvature update frequency** ``update_freq = T`` (Algorithm 1): ``U`` (explicit) or the
  factors ``Ã, G̃`` (implicit) are rebuilt when ``k mod T = 0`` and otherwise reused from
  the state (stale); the gradient and the sketches are new every step.
* **Historical buffers** (000 §3.4; explicit layers only):
  ``history="decay"``: ``U_k = p^{-1/2}[ζ^{p−1} g_{k−p+1}, …, ζ^0 g_k]`` (000 (24),
  ``memory = p``, ``decay = ζ ∈ (0, 1]``); ``history="hybrid"``:
  ``U_k = p^{-1/2}[g_{k−v}, …, g_{k−1}, ∇ψ_{i_1}(θ_k), …, ∇ψ_{i_{p−v}}(θ_k)]`` (000 (25),
  ``hybrid_v = v``, ``1 < v < p``; the ``p − v`` distinct indices drawn uniformly from the
  batch in :meth:`SENG.draw`). Before ``p`` (resp. ``v``) gradients exist the missing
  columns are zero (they do not change ``UUᵀ``). The buffer is updated every step.
* **Distributed SENG** (§4) with ``workers = 𝓜`` simulated workers on an array axis; the
  batch (size divisible by ``𝓜``) is split evenly in order, ``S = [S_1, …, S_𝓜]``. With the
  definition (5), ``U = [U^{(1)}, …, U^{(𝓜)}]`` where ``U^{(w)} = ϱ^{-1/2}[u_j]_{j∈S_w}``
  ``= 𝓜^{-1/2} U_{S_w}`` (``U_{S_w}`` normalized as in (5) by its own ``|S_w|``), and (8) is

      d = −a g + a Σ_w U^{(w)} b_w                                        (25) corrected

  (a sum over workers — (25) prints ``(1/𝓜) Σ_w U_{S_w} b_w``, and ``[U_{S_1}, …, U_{S_𝓜}]``
  is ``√𝓜 U``, not ``U``: errata SENG-3). ``block=False`` couples all workers: (8) for any 𝓜
  (``normalization`` is then irrelevant).
  ``block=True``: (26), the capacitance replaced by its block diagonal, solved with the
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
  U^{(w)}b̃_w`` with ``c = 𝓜`` resp. ``1`` (``info["b"]`` holds ``b̃``; the per-worker
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
from typing import Optional

import numpy as np

from .. import curvature as cv
from ..backend import cho_solve, cholesky, eigh, rng_of, to_numpy, xp_of
from ..errors import HyperParameterError, NotSPDError
from ..linalg import sketch as SK
from ..linalg.woodbury import spd_solve
from .base import Method, check_choice, check_int, check_positive, check_unit, layer_grads
from .registry import register

# ----------------------------------------------------------------------------- helpers


def spd_solve_batched(A, B, name="A"):
    """Solve ``A[w] X[w] = B[w]`` for a stack of SPD matrices ``A`` ``(W, m, m)``, ``B``
    ``(W, m)`` or ``(W, m, k)``: batched Cholesky; if it fails, the symmetric
    eigendecomposition with the same acceptance rule as :func:`~refcurv.linalg.woodbury.spd_solve`."""
    vec = B.ndim == A.ndim - 1
    Bm = B[..., None] if vec else B
    try:
        X = cho_solve(cholesky(A), Bm)
    except np.linalg.LinAlgError:
        xp = xp_of(A)
        w, V = eigh((A + A.swapaxes(-1, -2)) / 2)
        floor = A.shape[-1] * np.finfo(A.dtype).eps * float(xp.abs(w).max())
        if float(w.min()) <= floor:
            raise NotSPDError(f"{name} is not positive definite (smallest eigenvalue {float(w.min()):.3e})")
        X = V @ ((V.swapaxes(-1, -2) @ Bm) / w[..., None])
    return X[..., 0] if vec else X


def randomized_svd_batched(X, rank, seed=None, oversample=10, n_iter=2, Omega=None):
    """Batched rank-``rank`` truncated SVD ``(U, s, Vt)`` of ``X`` ``(N, m, n)``: the algorithm
    of :func:`refcurv.linalg.lowrank.randomized_svd` (Halko–Martinsson–Tropp 4.4 + 5.1, QR
    re-orthonormalization at each of ``n_iter`` power iterations) on a stack, vectorized over
    ``N``. The Gaussian test matrices ``(N, n, k)``, ``k = min(rank + oversample, m, n)``, are
    ``Omega`` or drawn on the host from ``numpy.random.default_rng(seed)``."""
    N, m, n = X.shape
    k = min(rank + oversample, m, n)
    if Omega is None:
        Omega = rng_of(seed).standard_normal((N, n, k))
    xp = xp_of(X)
    Omega = xp.asarray(Omega, dtype=X.dtype)
    Q, _ = xp.linalg.qr(X @ Omega)
    Xt = X.swapaxes(-1, -2)
    for _ in range(n_iter):
        Q, _ = xp.linalg.qr(Xt @ Q)
        Q, _ = xp.linalg.qr(X @ Q)
    Ub, s, Vt = xp.linalg.svd(Q.swapaxes(-1, -2) @ X, full_matrices=False)
    return (Q @ Ub)[..., :rank], s[..., :rank], Vt[..., :rank, :]


def lowrank_factors(A_hat, G_hat, rank=None, svd="exact", svd_of="auto", seed=None, oversample=10, n_iter=2):
    """Rank-``r`` factors ``(G, A)`` ``(N, n_G, r)``, ``(N, n_A, r)`` with
    ``G_i A_iᵀ ≈ Ĝ_i Â_iᵀ`` (15), from a partial SVD of ``Ĝ_i`` (``svd_of="G"``) or ``Â_i``
    (``"A"``; ``"auto"``: the one with fewer rows, ties → G) — 000 §3.3:
    ``X_i ≈ N Σ V`` gives ``X_i ← NΣ``, ``Y_i ← Ŷ_i Vᵀ``. ``r = min(rank, rows of X, κ)``.
    ``rank=None``: no SVD, ``(Ĝ, Â)`` themselves (``r = κ``)."""
    if rank is None:
        return G_hat, A_hat
    nG, nA, kappa = G_hat.shape[1], A_hat.shape[1], G_hat.shape[2]
    use_G = svd_of == "G" or (svd_of == "auto" and nG <= nA)
    X, Y = (G_hat, A_hat) if use_G else (A_hat, G_hat)
    r = min(int(rank), X.shape[1], kappa)
    if svd == "exact":
        Un, s, Vt = xp_of(X).linalg.svd(X, full_matrices=False)
        Un, s, Vt = Un[..., :r], s[..., :r], Vt[..., :r, :]
    else:
        Un, s, Vt = randomized_svd_batched(X, r, seed=seed, oversample=oversample, n_iter=n_iter)
    Xr = Un * s[..., None, :]
    Yr = Y @ Vt.swapaxes(-1, -2)
    return (Xr, Yr) if use_G else (Yr, Xr)


def sketched_Utz(XiA, XiG, XiZ):
    """(19): ``elesum((Ξ_zᵀ Ξ_{G_i}) ⊙ Ξ_{A_i})`` for every sample ``i`` — the sketched
    ``u_iᵀ z`` (per-sample, *unnormalized*; ``Uᵀz ≈ ϱ^{-1/2}·`` this). ``XiA`` ``(ϱ, ζ_A, r)``,
    ``XiG`` ``(ϱ, ζ_G, r)``, ``XiZ = Ω_G mat(z) Ω_Aᵀ`` ``(ζ_G, ζ_A)``. Returns ``(ϱ,)``."""
    xp = xp_of(XiA)
    T = xp.einsum("ga,igr->iar", XiZ, XiG)  # Ξ_zᵀ Ξ_{G_i}, (ϱ, ζ_A, r)
    return (T * XiA).sum(axis=(1, 2))


def sketched_UtU(XiA, XiG):
    """(21): ``elesum((Ξ_{A_i}ᵀ Ξ_{A_j}) ⊙ (Ξ_{G_i}ᵀ Ξ_{G_j}))`` — the sketched ``u_iᵀ u_j``
    (``UᵀU ≈ ϱ^{-1}·`` this). Leading batch axes (e.g. workers) are allowed:
    ``(…, ϱ, ζ, r)`` → ``(…, ϱ, ϱ)``."""
    xp = xp_of(XiA)
    KA = xp.einsum("...iar,...jas->...ijrs", XiA, XiA)
    KG = xp.einsum("...igr,...jgs->...ijrs", XiG, XiG)
    return (KA * KG).sum(axis=(-2, -1))


def cu(c, G, A, workers=1):
    """``Σ_i c_i G_i A_iᵀ`` approximated by (23) (``workers=1``) or by (28) (``workers = 𝓜``,
    samples split evenly in order): ``(Σ_w Σ_{j∈S_w} √|c_j| G_j)(Σ_w Σ_{j∈S_w} c_j A_j / s_w)ᵀ``
    with ``s_w = Σ_{j∈S_w} √|c_j|`` (a worker with ``s_w = 0`` contributes 0). Returns
    ``mat`` of the result, ``(n_G, n_A)``. Exact when at most one ``c_i ≠ 0``."""
    xp = xp_of(G)
    rho = c.shape[0]
    m = rho // workers
    cw = c.reshape(workers, m)
    s = xp.sqrt(xp.abs(cw))
    tot = s.sum(axis=1)
    safe = xp.where(tot > 0, tot, 1.0)
    coef = xp.where((tot > 0)[:, None], cw / safe[:, None], 0.0)
    Gc = xp.einsum("wm,wmgr->gr", s, G.reshape((workers, m) + G.shape[1:]))
    Ac = xp.einsum("wm,wmar->ar", coef, A.reshape((workers, m) + A.shape[1:]))
    return Gc @ Ac.T


def uc_exact(c, G, A):
    """(22): ``Σ_i c_i vec(G_i A_iᵀ)`` (as ``mat``, ``(n_G, n_A)``)."""
    return xp_of(G).einsum("i,igr,iar->ga", c, G, A)


def _rows(sk, X, axis):
    """``Ω`` applied along ``axis`` of ``X`` (``sk=None``: identity)."""
    if sk is None:
        return X
    xp = xp_of(X)
    idx = xp.asarray(sk.index)
    w = xp.asarray(sk.weight, dtype=X.dtype)
    shape = [1] * X.ndim
    shape[axis] = -1
    return xp.take(X, idx, axis=axis) * w.reshape(shape)


def _row_sketch(n, q, kind, replace, X, seed):
    """Row sketch of the ``n`` rows of ``X`` (``(n, …)``; leverage scores from its row norms)."""
    if q is None:
        return None
    probs = "uniform"
    if kind == "leverage":
        Xh = to_numpy(X).reshape(n, -1)
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


def _block_solve(lam, Xi, xi, workers, scale=1):
    """``b̂`` with ``λI + c ΞᵀΞ`` (``c = scale``) replaced by its ``workers`` diagonal blocks
    (``workers=1``, ``c=1``: (12)). ``Xi`` ``(q, ϱ)``, ``xi`` ``(q,)``. Worker blocks on an
    array axis."""
    xp = xp_of(Xi)
    q, rho = Xi.shape
    m = rho // workers
    Xw = Xi.reshape(q, workers, m)
    cap = scale * xp.einsum("qwi,qwj->wij", Xw, Xw) + lam * xp.eye(m, dtype=Xi.dtype)
    rhs = xp.einsum("qwi,q->wi", Xw, xi)
    return spd_solve_batched(cap, rhs, "λI + ΞᵀΞ").reshape(rho)


# ------------------------------------------------------------------------------ method


def _opt_int(value, name, minimum=1):
    if value is not None:
        check_int(value, name, minimum)


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise HyperParameterError(f"{name} must be a bool, got {value!r}")


@register
@dataclass(frozen=True)
class SENG(Method):
    """SENG (001 (7)–(24), Algorithms 1–2; 000 §3.4; distributed §4 (25)–(28)).

    Hyper-parameters (defaults): ``damping`` λ (1.0); explicit sketch ``sketch`` ("uniform" |
    "leverage"), ``sketch_size`` q (None: no sketch, the SMW (8)–(9)), ``replace`` (False);
    ``threshold`` 𝒯 (inf: every layer explicit; a layer with ``n^l ≥ 𝒯`` is implicit);
    implicit ``rank`` r (None: r = κ, no SVD), ``svd`` ("exact" | "randomized"), ``svd_of``
    ("auto" | "G" | "A"), ``oversample`` (10), ``n_iter`` (2), ``sketch_size_A`` ζ_A and
    ``sketch_size_G`` ζ_G (None: no sketch), ``uc`` ("cu": (23) | "exact": (22));
    ``update_freq`` T (1); ``history`` ("none" | "decay": 000 (24) | "hybrid": 000 (25)),
    ``memory`` p (4), ``decay`` ζ (1.0), ``hybrid_v`` v (2); ``workers`` 𝓜 (1),
    ``normalization`` ("worker" | "global", see the module docstring), ``block`` ((26), True),
    ``delayed`` ((27), False), ``sync_cu`` ((28), True).

    State: ``k``; per layer ``U`` (explicit: the ``(ρ', n^l)`` matrix ``Uᵀ`` in use, rows
    ``ρ^{-1/2}u_iᵀ`` or the buffer columns; ``None`` for implicit layers), ``factors``
    (implicit: ``(G̃, Ã)`` as ``(ϱ, n_G, r)``, ``(ϱ, n_A, r)``), ``g`` (this step's gradient,
    the ``g_{k−1}`` of (27) at the next step), ``buffer`` (history: ``(p or v, out, d)``, oldest
    first), and ``info`` (diagnostics of the last step, per layer: ``path``, the sketches
    ``omega``/``omega_A``/``omega_G`` as :class:`~refcurv.linalg.sketch.RowSketch`, ``b`` = b̂;
    not read by later steps).
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
    n_iter: int = 2
    sketch_size_A: Optional[int] = None
    sketch_size_G: Optional[int] = None
    uc: str = "cu"
    update_freq: int = 1
    history: str = "none"
    memory: int = 4
    decay: float = 1.0
    hybrid_v: int = 2
    workers: int = 1
    normalization: str = "worker"
    block: bool = True
    delayed: bool = False
    sync_cu: bool = True

    name = "seng"
    seed_ref = "001 (2)-(24), Alg. 1-2; 000 §3.4 (24)-(25)"
    summary = "per-layer damped empirical Fisher by SMW, sketched LS, implicit low-rank storage"

    def __post_init__(self):
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
        check_int(self.n_iter, "n_iter", 0)
        _opt_int(self.sketch_size_A, "sketch_size_A")
        _opt_int(self.sketch_size_G, "sketch_size_G")
        check_choice(self.uc, "uc", ("cu", "exact"))
        check_int(self.update_freq, "update_freq")
        check_choice(self.history, "history", ("none", "decay", "hybrid"))
        check_int(self.memory, "memory")
        check_unit(self.decay, "decay", closed_low=False, closed_high=True)
        check_int(self.hybrid_v, "hybrid_v")
        if self.history == "hybrid" and not 1 < self.hybrid_v < self.memory:
            raise HyperParameterError(
                f"hybrid_v must satisfy 1 < hybrid_v < memory (000 (25)), "
                f"got hybrid_v={self.hybrid_v}, memory={self.memory}")
        check_int(self.workers, "workers")
        check_choice(self.normalization, "normalization", ("global", "worker"))
        _flag(self.block, "block")
        _flag(self.delayed, "delayed")
        _flag(self.sync_cu, "sync_cu")
        if self.history != "none" and self.workers > 1:
            raise HyperParameterError(
                f"workers must be 1 with history={self.history!r} (buffer columns belong to no worker)")

    # ------------------------------------------------------------------ set-up
    def _paths(self, net):
        return ["explicit" if o * d < self.threshold else "implicit" for o, d in net.param_shapes]

    def init(self, net, params):
        paths = self._paths(net)
        if self.history != "none" and "implicit" in paths:
            raise HyperParameterError(
                f"history={self.history!r} needs every layer explicit; threshold={self.threshold!r} makes "
                f"layers {[j for j, p in enumerate(paths) if p == 'implicit']} implicit")
        L = len(paths)
        return {"k": 0, "U": [None] * L, "factors": [None] * L, "g": None, "buffer": None, "info": None}

    def draw(self, rng, state, net, params, batch):
        """Per layer four seeds (explicit Ω, Ω_A, Ω_G, randomized-SVD test matrix), drawn
        whether used or not; the sketches themselves are built from them inside the forms,
        because leverage-score probabilities depend on ``U``. ``hybrid``: the ``p − v``
        per-sample indices of 000 (25)."""
        L = len(net.param_shapes)
        seeds = rng.integers(2**63 - 1, size=(L, 4))
        hybrid = None
        if self.history == "hybrid":
            N, need = len(batch.x), self.memory - self.hybrid_v
            if N < need:
                raise HyperParameterError(
                    f"memory - hybrid_v = {need} per-sample gradients need a batch of >= {need}, got {N}")
            hybrid = np.sort(rng.choice(N, size=need, replace=False))
        return {"seeds": seeds, "hybrid": hybrid}

    def _check_workers(self, rho):
        if rho % self.workers:
            raise HyperParameterError(f"workers = {self.workers} must divide the number of samples {rho}")

    def _blocks(self):
        return self.workers if self.block else 1

    def _gram_scale(self):
        """``c`` multiplying the Gram blocks: 𝓜 for (26) with ``normalization="worker"``
        (``U_{S_w} = √𝓜 U^{(w)}`` normalized by its own ``|S_w|`` as (5) defines it, the printed
        (25)–(26)); 1 for ``"global"`` (blocks of (9)'s ``λI + UᵀU``) and for ``block=False``
        (full coupling is (8) whatever the normalization)."""
        return self.workers if (self.normalization == "worker" and self.block) else 1

    # -------------------------------------------------------- shared preparation
    def _prepare(self, state, net, params, batch, draws, dense):
        """Gradients, ``U`` or factors (fresh / stale / from the buffer), the new state."""
        if dense:
            P = [np.asarray(to_numpy(W), dtype=np.float64) for W in net.check_params(params)]
            x = np.asarray(to_numpy(batch.x), dtype=np.float64)
            flat = cv.per_sample_grads(net, P, x, batch.y, batch.loss)  # (N, n) float64
            U_ps, start = [], 0
            for o, d in net.param_shapes:
                U_ps.append(flat[:, start : start + o * d].reshape(-1, o, d))
                start += o * d
            g = [u.mean(axis=0) for u in U_ps]
        else:
            P, x = params, batch.x
            g, U_ps = layer_grads(net, params, batch)
        N = U_ps[0].shape[0]
        k = state["k"]
        paths = self._paths(net)
        refresh = k % self.update_freq == 0
        seeds = draws["seeds"]
        Us, facs = list(state["U"]), list(state["factors"])
        buffer = None
        if self.history != "none":
            Us, buffer = self._history(state, g, U_ps, draws, refresh)
        else:
            need_f = [j for j, p in enumerate(paths) if p == "implicit" and (refresh or facs[j] is None)]
            if need_f:
                A_hat, G_hat = net.factors(P, x, batch.y, batch.loss)
            for j, path in enumerate(paths):
                if path == "explicit" and (refresh or Us[j] is None):
                    self._check_workers(N)
                    Us[j] = U_ps[j].reshape(N, -1) / math.sqrt(N)
                elif j in need_f:
                    self._check_workers(N)
                    facs[j] = lowrank_factors(A_hat[j], G_hat[j], self.rank, self.svd, self.svd_of,
                                              seed=int(seeds[j, 3]), oversample=self.oversample, n_iter=self.n_iter)
        g_prev = g if (not self.delayed or state["g"] is None) else [
            xp_of(gi).asarray(gp, dtype=gi.dtype) for gi, gp in zip(g, state["g"])]
        new_state = {"k": k + 1, "U": Us, "factors": facs, "g": g, "buffer": buffer, "info": None}
        return paths, g, g_prev, new_state

    def _history(self, state, g, U_ps, draws, refresh):
        """000 (24) / (25): the buffer ``U`` of this step and the updated buffer."""
        xp = xp_of(g[0])
        p = self.memory
        length = p if self.history == "decay" else self.hybrid_v
        old = state["buffer"] or [xp.zeros((length,) + gi.shape, dtype=gi.dtype) for gi in g]
        Us, new_buf = list(state["U"]), []
        for j, (gi, bj) in enumerate(zip(g, old)):
            bj = xp.asarray(bj, dtype=gi.dtype)
            if self.history == "decay":
                nb = xp.concatenate([bj[1:], gi[None]], axis=0)  # g_{k−p+1} … g_k
                w = xp.asarray(self.decay ** np.arange(p - 1, -1, -1.0), dtype=gi.dtype)
                cols = nb * w[:, None, None]
                new_buf.append(nb)
            else:
                per = U_ps[j][xp.asarray(draws["hybrid"])]
                cols = xp.concatenate([bj, per], axis=0)  # g_{k−v} … g_{k−1}, ∇ψ_{i}(θ_k)
                new_buf.append(xp.concatenate([bj[1:], gi[None]], axis=0))
            if refresh or Us[j] is None:
                Us[j] = cols.reshape(cols.shape[0], -1) / math.sqrt(p)
        return Us, new_buf

    # ------------------------------------------------------------------ forms
    def _explicit_sketch(self, Ut, seed):
        n = Ut.shape[1]
        return _row_sketch(n, self.sketch_size, self.sketch, self.replace, Ut.T, int(seed))

    def _implicit_sketches(self, fac, seeds):
        Gf, Af = fac
        nG, nA = Gf.shape[1], Af.shape[1]
        skA = _row_sketch(nA, self.sketch_size_A, self.sketch, self.replace, Af.swapaxes(0, 1), int(seeds[1]))
        skG = _row_sketch(nG, self.sketch_size_G, self.sketch, self.replace, Gf.swapaxes(0, 1), int(seeds[2]))
        return skA, skG

    def _cu_workers(self):
        return self.workers if (self.sync_cu and self.workers > 1) else 1

    def _fast(self, state, net, params, batch, draws):
        paths, g, g_prev, new_state = self._prepare(state, net, params, batch, draws, dense=False)
        lam, M = self.damping, self._blocks()
        direction, info = [], []
        for j, path in enumerate(paths):
            gj, gp = g[j], g_prev[j]
            if path == "explicit":
                Ut = new_state["U"][j]
                Ut = xp_of(gj).asarray(Ut, dtype=gj.dtype)
                sk = self._explicit_sketch(Ut, draws["seeds"][j, 0])
                Xi = _rows(sk, Ut.T, 0)  # ΩU, (q, ρ')
                xi = _rows(sk, gp.ravel(), 0)  # Ω g'
                b = _block_solve(lam, Xi, xi, M, self._gram_scale())  # (12) / (26) / (27)
                d = (Ut.T @ b - gj.ravel()).reshape(gj.shape) / lam  # (8) / (13) / (25)
                info.append({"path": path, "omega": sk, "omega_A": None, "omega_G": None, "b": b})
            else:
                Gf, Af = (xp_of(gj).asarray(F, dtype=gj.dtype) for F in new_state["factors"][j])
                rho = Gf.shape[0]
                skA, skG = self._implicit_sketches((Gf, Af), draws["seeds"][j])
                XiA, XiG = _rows(skA, Af, 1), _rows(skG, Gf, 1)  # (17)
                XiZ = _rows(skA, _rows(skG, gp, 0), 1)  # Ω_G mat(g') Ω_Aᵀ
                a = sketched_Utz(XiA, XiG, XiZ) / math.sqrt(rho)  # 𝒜(g') = ϱ^{-1/2}(19)
                m = rho // M
                Bw = sketched_UtU(XiA.reshape((M, m) + XiA.shape[1:]), XiG.reshape((M, m) + XiG.shape[1:])) \
                    * (self._gram_scale() / rho)
                cap = Bw + lam * xp_of(gj).eye(m, dtype=gj.dtype)  # ℬ + λI (block diagonal)
                b = spd_solve_batched(cap, a.reshape(M, m), "ℬ + λI").reshape(rho)
                if self.uc == "cu":
                    Uc = cu(b, Gf, Af, self._cu_workers()) / math.sqrt(rho)  # (23) / (28)
                else:
                    Uc = uc_exact(b, Gf, Af) / math.sqrt(rho)  # (22)
                d = (Uc - gj) / lam  # (24), with a = 1/λ on C_U (errata SENG-1)
                info.append({"path": path, "omega": None, "omega_A": skA, "omega_G": skG, "b": b})
            direction.append(d)
        new_state["info"] = info
        return direction, new_state

    def _dense_solve(self, Ut, S, g, gp):
        """``(𝓜_b g'/c − g)/λ − (1/c) Σ_w (λI + c M̂_w)^{-1} g'`` with ``M̂_w = U_wU_wᵀS``
        (``S = ΩᵀΩ``, or ``None`` for ``I``), ``𝓜_b`` blocks and Gram scale ``c`` — for
        ``c = 1`` the block formula ``−g/λ + Σ_w [g'/λ − (λI + M̂_w)^{-1}g']``, arranged so that
        one block without delay is exactly ``−(λI + M̂)^{-1} g``. Cholesky for ``S = None``
        (SPD), LU otherwise."""
        lam, M, c = self.damping, self._blocks(), self._gram_scale()
        n = Ut.shape[1]
        Uw = Ut.reshape(M, -1, n)
        X = 0.0
        for w in range(M):  # loop over workers (dense reference)
            Mw = c * (Uw[w].T @ Uw[w])
            if S is None:
                X = X + spd_solve(lam * np.eye(n) + Mw, gp, "λI + M_w")
            else:
                X = X + np.linalg.solve(lam * np.eye(n) + Mw @ S, gp)
        if c == 1:
            return -X + (M * gp - g) / lam
        return -X / c + (M * gp / c - g) / lam

    def _dense(self, state, net, params, batch, draws):
        paths, g, g_prev, new_state = self._prepare(state, net, params, batch, draws, dense=True)
        lam, M = self.damping, self._blocks()
        direction, info = [], []
        for j, path in enumerate(paths):
            gj, gp = g[j].ravel(), np.asarray(to_numpy(g_prev[j]), dtype=np.float64).ravel()
            if path == "explicit":
                Ut = np.asarray(to_numpy(new_state["U"][j]), dtype=np.float64)
                sk = self._explicit_sketch(Ut, draws["seeds"][j, 0])
                S = None
                if sk is not None:
                    Om = sk.to_dense()
                    S = Om.T @ Om
                d = self._dense_solve(Ut, S, gj, gp)
                info.append({"path": path, "omega": sk, "omega_A": None, "omega_G": None, "b": None})
            else:
                Gf, Af = (np.asarray(to_numpy(F), dtype=np.float64) for F in new_state["factors"][j])
                rho, nG, nA = Gf.shape[0], Gf.shape[1], Af.shape[1]
                skA, skG = self._implicit_sketches((Gf, Af), draws["seeds"][j])
                OmG = np.eye(nG) if skG is None else skG.to_dense()
                OmA = np.eye(nA) if skA is None else skA.to_dense()
                Om = np.kron(OmG, OmA)  # row-major vec: Ω_G ⊗ Ω_A (= Ω_A ⊗ Ω_G column-major)
                S = Om.T @ Om
                Ut = np.einsum("igr,iar->iga", Gf, Af).reshape(rho, nG * nA) / math.sqrt(rho)  # Ũᵀ
                b = None
                if self.uc == "exact":
                    d = self._dense_solve(Ut, S, gj, gp)
                else:
                    m = rho // M
                    c = self._gram_scale()
                    b = np.concatenate([
                        spd_solve(lam * np.eye(m) + c * (Uw @ S @ Uw.T), Uw @ (S @ gp), "λI + ŨᵀΩᵀΩŨ")
                        for Uw in Ut.reshape(M, m, -1)])
                    d = (cu(b, Gf, Af, self._cu_workers()).ravel() / math.sqrt(rho) - gj) / lam
                info.append({"path": path, "omega": None, "omega_A": skA, "omega_G": skG, "b": b})
            direction.append(d.reshape(g[j].shape))
        new_state["info"] = info
        return direction, new_state


@register
@dataclass(frozen=True)
class SENGDistributed(SENG):
    """Distributed SENG (001 §4): :class:`SENG` with ``workers = 2`` simulated workers by
    default, the block-diagonal approximation (26) (``block=True``), optionally the delayed
    gradient (27) (``delayed=True``) and the synchronized ``C_U`` (28) (``sync_cu=True``)."""

    workers: int = 2

    name = "seng_distributed"
    seed_ref = "001 §4 (25)-(28)"
    summary = "SENG on simulated workers: block-diagonal UᵀU (26), delayed gradient (27), synced C_U (28)"
