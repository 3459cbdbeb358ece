"""K-BFGS and K-BFGS(L) for Linear and Conv2d layers ([Ren-thesis] Chapter 3: Theorem 3,
(3.9)-(3.16), Algorithms 8-11, Lemmas 4-7).

**Kronecker model** (Theorem 3, (3.4)-(3.9)). Per layer ``l`` with patches ``a_t(n)`` (ones
row included; ``t`` runs over the layer's ``|T|`` output locations, ``|T| = 1`` for Linear)
and pre-activation gradients ``Dh_t(n) = ∂f(n)/∂h_t(n)`` of the per-sample loss, the block
``∂²f/∂vec(W)²`` is approximated by ``A ⊗ G`` (column-major vec; ``G ⊗ A`` in refcurv's
row-major vec) with

    A = E_n[ Σ_t a_t(n) a_t(n)ᵀ ]            (sum over locations)   (3.9)
    G = E_n[ (1/|T|) Σ_t G_tt(n) ]           (mean over locations)  (3.9)

**Scaling of A, stated once.** ``A`` *sums* over locations and *averages* over samples:
``A = (1/N) Σ_n Σ_t a_t(n) a_t(n)ᵀ``. This is KFAC's ``Ω`` (the KFC convention of
:mod:`refcurv.methods.kfac`, thesis Algorithm 12 line 2) and ``|T|`` times the ``A`` of
:func:`refcurv.curvature.kfac_factors` (``conv="expand"``, which averages over locations).
Lemma 7 (i) (``Â ≤ (J|Δ|φ² + 1)|T| I``) is stated for this scaling.

**Update.** ``W ← W − α H_G m H_A`` (3.10), i.e. the direction returned is
``−H_G m H_A = −vec⁻¹((H_G ⊗ H_A) vec(m))`` in row-major vec (``(H_A ⊗ H_G)`` in the
thesis' column-major vec; ``H_A`` symmetric). ``m`` is the momentum gradient
``m ← μ m + g`` (Algorithm 9 line 8 read with §3.4.2's notation, where the thesis calls the
decay β; errata KBFGS-2; hyper-parameter ``momentum`` = μ = 0.9, separate from the ``beta``
of the ``(s_G, y_G)`` moving averages; ``momentum_form="ema"`` gives Chapter 2's
``m ← μ m + (1−μ) g``, which is the same trajectory with the learning rate divided by
``1−μ``); Algorithm 10 uses ``m = g`` (stored as ``state.m``).

**Curvature operator.** ``curvature(state)`` is ``C = BlockDiagonal_l[(H_G ⊗ H_A)⁻¹]``
(:class:`~refcurv.operators.Inverse` of :class:`~refcurv.operators.Kronecker`, row-major,
``H_A = state.H_a_used``: the one the step's direction used, before the step's ``H_A``
update; ``H_G`` dense — for K-BFGS(L) the L-BFGS recursion (3.16)), and
``rhs(state, g) = state.m``: the step's direction is ``−C⁻¹ m``.

**Damping split** (Algorithm 9 line 2, §3.4.3): ``λ_A = √|T| √λ``, ``λ_G = √λ / √|T|``
per layer (so ``λ_A λ_G = λ``; ``√λ`` each for Linear layers).

**H_A** (Algorithm 9 lines 3, 16-17; (3.14)-(3.15)): initialized ``(A + λ_A I)⁻¹`` from data
(:meth:`warm_start`; without a warm start, from the first mini-batch at the first step).
At curvature steps "minibatched" Hessian-action BFGS with the current mini-batch:

    s_A = H_A â,   â = E_n[(1/|T|) Σ_t a_t(n)],     y_A = A s_A + λ_A s_A        (3.14)
    A s_A = E_n[ Σ_t (a_t(n)ᵀ s_A) a_t(n) ]                                      (3.15)

then ``H_A ← BFGS(H_A; s_A, y_A)`` (3.11). The fast form evaluates (3.15) from the patches
``(N, d, |T|)`` by two einsums, never forming ``A``; the dense form forms ``A`` (3.9) and
multiplies.
``algorithm="alg10"`` (Algorithm 10 line 12) instead sets ``H_A = (Â + λ_A I)⁻¹`` with ``Â``
the mini-batch ``A`` (exact inversion, Cholesky).

**H_G** (Algorithm 9 lines 19-21; (3.12)-(3.13)). With ``X̄ = (1/|T|) Σ_t X_t`` and the
mini-batch mean, the moving-average pair is

    s_G ← β s_G + (1−β)(h̄⁺ − h̄),   y_G ← β y_G + (1−β)(Dh̄⁺ − Dh̄)

where ``+`` is the second forward-backward pass at the *new* weights on the *same* mini-batch.
``(s_G, y_G)`` is kept undamped; the pair used is ``D_P D_LM(s_G, y_G)`` (Algorithm 8, Powell
on ``H = H_G`` with ``μ₁`` then ``ỹ = y + μ₂ s̃``, ``μ₂ = λ_G``) for ``"alg9"``, or
``D_P(I) D_LM`` (Algorithm 11, ``H = μ₂⁻¹ I``) for ``"alg10"``. ``"kbfgs"`` updates a dense
``H_G`` by BFGS (3.11) from ``H_G = λ_G⁻¹ I``; ``"kbfgs-l"`` keeps the last ``memory`` (the thesis's ``p``) pairs and
applies L-BFGS (3.16) from ``H_0 = λ_G⁻¹ I`` in the compact ("non-loop", Byrd et al.) form
(:func:`~refcurv.linalg.quasi_newton.lbfgs_compact_apply`); its dense form builds the matrix
by the recursion (:func:`~refcurv.linalg.quasi_newton.lbfgs_dense`).

**Curvature frequency** ``T_inv`` (the thesis' ``T``, §3.4.3) and its phase: with the
library convention (``phase="k0"``, the default; :func:`~refcurv.methods.base.refresh_due`)
the 0-based step ``k = state.k`` is a curvature step iff ``k ≡ 0 (mod T_inv)`` — the first
step is one. ``phase="paper"`` is Algorithm 9 line 12 as printed: with the 1-based counter,
``k ≡ 0 (mod T)``, i.e. 0-based ``(k + 1) ≡ 0 (mod T_inv)`` (tested against a literal replay
of Algorithm 9). With ``T_inv = 1`` both are every step.

**Deferred second pass (deviation from the pseudo-code forced by the interface; exactly
equivalent).** ``step`` does not know the learning rate, so it cannot form ``θ_{k+1}`` itself.
Algorithm 9 at iteration ``k`` is: (a) direction from ``H_G^{(k)}, H_A^{(k)}``; (b)
``θ_{k+1} = θ_k + α p``; (c) on a curvature step, ``H_A`` update from ``M_k`` (first-pass
patches at ``θ_k``) and ``H_G`` update from the second pass at ``θ_{k+1}`` on ``M_k``. Here,
step ``k`` (called with ``θ_k`` and ``M_k``) does: (1) if the state holds a pending curvature
batch ``M_{k−1}`` with its first-pass ``h̄, Dh̄``, run the second pass on it at ``θ_k`` (which
*is* ``θ_{k−1} + α p_{k−1}``) and update ``H_G``; (2) the direction; (3) on a curvature step
the ``H_A`` update from ``M_k`` and stash ``M_k``, ``h̄, Dh̄`` for step ``k+1``. The ``H_A`` and
``H_G`` updates of one iteration do not read each other, so moving the ``H_G`` update to the
start of the next call changes nothing that any direction uses: the parameters are identical
(``tests/test_method_kbfgs.py::test_deferred_equals_explicit_algorithm_9``). Only the
``H_G`` update after the very last step is never made (it is never used).

The pending batch is a private copy of ``x`` and ``y`` (a caller may refill its batch buffer
in place before the next call).

State: :class:`KBFGSState` / :class:`KBFGSLState` (frozen; the same fields as Chapter 2's
states, :mod:`refcurv.methods.kbfgs_mlp`, except ``A``, which Chapter 3 does not keep):
``k``; ``m``; ``H_a`` (``d × d``), ``H_a_used``; ``H_g`` (``out × out``, K-BFGS) or ``S``,
``Y`` (``(≤p, out)``, oldest first, K-BFGS(L)); ``s_g``, ``y_g`` (undamped moving averages);
``lambda_A``, ``lambda_G``; ``pending`` (:class:`PendingPass`); ``last_pairs``
(:class:`PairRecord` per layer). Both forms return the same state type.

Diagnostics (``state.diagnostics``, per-layer counts since the first step, the same keys in
the four K-BFGS methods): ``pairs`` (H_G pairs seen), ``pairs_used``, ``pairs_skipped`` (Ch.3
skips none), ``pairs_degenerate`` (``s̃ᵀỹ ≤ 0``: only ``s_G = y_G = 0``), ``ratio_le_1`` /
``ratio_le_2`` (``ỹᵀ H ỹ / s̃ᵀỹ ≤ 1/μ₁`` resp. ``2/μ₁``, ``H = H_G`` before the update; the
quantity of thesis Figure 2.1, §2.3.1: Powell's step guarantees ``≤ 1/μ₁`` for ``(s̃, y)``,
not for ``(s̃, ỹ)``), ``ha_skipped`` (Hessian-action pairs with ``s_Aᵀy_A ≤ 0``, unused).
See ``docs/errata.md``.

**The two forms are two code paths.** The fast form is :class:`KBFGSCore`'s step (one
skeleton for both chapters, chapter hooks): input dtype, the minibatched Hessian action
(3.15) without ``A``, the gradient from the factors (:func:`layer_gradient`), the two-sided
product ``H_G (m H_A)``, the compact L-BFGS form (:func:`~refcurv.linalg.quasi_newton.lbfgs_compact`),
Cholesky inverses. The dense form (:meth:`_KBFGSBase._dense`) is its own literal replay of
one iteration of Algorithm 9/10 in float64 with dense matrices and calls none of the
skeleton's update code: the damping split and the schedule (line 12, both phases) written
out, ``A`` formed from its definition (:func:`A_definition`), the gradient from
:meth:`~refcurv.nn.Sequential.grad`, ``H_G ⊗ H_A`` formed, ``H_G`` of K-BFGS(L) as the dense
L-BFGS matrix of its pairs (:func:`hg_matrix`, the recursion (3.16)), LU inverses. Both
forms are checked against the tests' own replay of the printed Algorithm 9/10
(``test_deferred_equals_explicit_algorithm_9[...-fast|dense]``) and against each other step
by step (``test_fast_equals_dense_*``).

Shared by both forms (each kernel tested on its own): ``net.factors`` (patches and
pre-activation gradients, ``tests/test_curvature_grams.py``, ``tests/test_identities.py``);
:func:`refcurv.linalg.kronecker.mean_patch` (``â``, so that ``h̄ = W â`` and the pair
difference ``h̄⁺ − h̄`` round identically in both forms; ``tests/test_linalg_kronecker_kbfgs.py``);
:func:`refcurv.linalg.damping.dp_dlm`, ``dpi_dlm`` (``tests/test_damping.py``);
:func:`refcurv.linalg.quasi_newton.bfgs_update_H` (``tests/test_quasi_newton.py``);
the records :class:`PendingPass` / :class:`PairRecord`. The fast form alone uses
``damping_split``, ``factor_A``, ``hessian_action_pair``, ``layer_gradient``,
``lbfgs_compact`` and its own inline pair counting; the dense form alone ``A_definition``,
``inverse_definition``, ``hg_matrix`` / ``lbfgs_dense`` (the last also gives
``curvature(state)``'s ``H_G``) and :func:`count_pair` (all four tested in
``tests/test_method_kbfgs.py::test_dense_definitions``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import math

import numpy as np

from ..backend import xp_of
from ..errors import ArgumentTypeError, StateError
from ..linalg.damping import dp_dlm, dpi_dlm
from ..linalg.kronecker import damping_split, factor_A, hessian_action_pair, mean_patch
from ..linalg.quasi_newton import bfgs_update_H, lbfgs_compact, lbfgs_dense
from ..linalg.woodbury import spd_solve
from ..operators import BlockDiagonal, Inverse, Kronecker
from .base import (
    Batch, Method, State, check_choice, check_int, check_positive, check_unit, refresh_due, state_field,
)
from .registry import register

#: ``state.diagnostics`` keys of every K-BFGS method (all per-layer counts since the first step)
DIAGNOSTICS = ("pairs", "pairs_used", "pairs_skipped", "pairs_degenerate", "ratio_le_1", "ratio_le_2",
               "ha_skipped")


# ======================================================= shared by Chapters 2 and 3
@dataclass(frozen=True)
class PendingPass:
    """What the deferred second pass of a curvature step needs (module docstring)."""

    batch: Any  #: a private copy of the curvature step's mini-batch ``M_k``
    h_bar: Any  #: per layer ``h̄ = W_k â`` (first pass at ``θ_k``; (2.5) / (3.12))
    g_bar: Any  #: per layer ``ḡ = Dh̄`` (mean pre-activation gradient of the first pass)


@dataclass(frozen=True)
class PairRecord:
    """The ``H_g`` curvature pair of one layer at one (deferred) update."""

    k: int          #: the step whose call made the update (0-based; the second pass runs at its start)
    s: Any          #: undamped moving-average ``s_g``
    y: Any          #: undamped moving-average ``y_g``
    s_t: Any        #: damped ``s̃``
    y_t: Any        #: damped ``ỹ``
    theta1: float   #: Powell's θ on ``H`` (Algorithms 3, 8, 11)
    theta2: Any     #: θ of the ``B = I`` Powell step of DD (Algorithm 3); None for ``D_LM``
    ratio: float    #: ``ỹᵀHỹ / s̃ᵀỹ`` with ``H = H_g`` before the update (inf if ``s̃ᵀỹ ≤ 0``)
    used: bool      #: the pair updated ``H_g``


@dataclass(frozen=True, kw_only=True)
class KBFGSStateBase(State):
    """Fields shared by every K-BFGS state ([Ren-thesis] Ch.2 and Ch.3; Ch.3 writes ``H_A``,
    ``H_G`` for ``H_a``, ``H_g``)."""

    m: Any = state_field("m")
    H_a: Any = state_field(doc="H_a ≈ (A + λ_A I)⁻¹ per layer (d × d), after the last step's update "
                               "(Ch.2 Alg. 4 lines 21-23; Ch.3 Alg. 9 lines 16-17); None before the first step")
    H_a_used: Any = state_field(doc="the H_a the last step's direction −H_g m H_a used (before that step's "
                                    "update); what curvature(state) reads")
    s_g: Any = state_field(doc="undamped moving-average pair s_g per layer (Alg. 4 line 16 / Alg. 9 line 19)")
    y_g: Any = state_field(doc="undamped moving-average pair y_g per layer (Alg. 4 line 16 / Alg. 9 line 19)")
    lambda_A: Any = state_field(doc="λ_A per layer (Alg. 9 line 2: √|T|√λ; Alg. 4 line 2: √λ)")
    lambda_G: Any = state_field(doc="λ_G per layer (Alg. 9 line 2: √λ/√|T|; Alg. 4 line 2: √λ); μ₂ of the damping")
    pending: Any = state_field(doc="PendingPass of the last curvature step (batch copy, h̄, ḡ) whose second "
                                   "pass and H_g update run at the start of the next step; None if none")
    last_pairs: Any = state_field(doc="per layer the PairRecord of the last H_g update (None before the first)")


_H_G_DOC = "dense BFGS H_g per layer (out × out)"
_S_DOC = "L-BFGS memory: damped s̃ per layer, (≤ memory, out), oldest first"
_Y_DOC = "L-BFGS memory: damped ỹ per layer, (≤ memory, out), oldest first"


@dataclass(frozen=True, kw_only=True)
class KBFGSState(KBFGSStateBase):
    """State of ``"kbfgs"`` ([Ren-thesis] Algorithm 9/10 with BFGS ``H_G``)."""

    H_g: Any = state_field(doc=_H_G_DOC + ", from λ_G⁻¹ I (Alg. 9 line 3)")


@dataclass(frozen=True, kw_only=True)
class KBFGSLState(KBFGSStateBase):
    """State of ``"kbfgs-l"`` ([Ren-thesis] Algorithm 9/10 with L-BFGS ``H_G`` from ``λ_G⁻¹ I``)."""

    S: Any = state_field(doc=_S_DOC)
    Y: Any = state_field(doc=_Y_DOC)


def _inverse_spd(M, name):
    """``M⁻¹`` by Cholesky, symmetrized (so that ``H_g ⊗ H_a`` and BFGS keep exact symmetry)."""
    X = spd_solve(M, xp_of(M).eye(M.shape[0], dtype=M.dtype), name)
    return (X + X.T) / 2


def layer_gradient(patches, G):
    """``∇W = (1/N) Σ_n Σ_t Dh_t(n) a_t(n)ᵀ`` (Theorem 3 (i); (2.1) for ``|T| = 1``) from the
    first pass's patches ``(N, d, |T|)`` and pre-activation gradients ``(N, out, |T|)``."""
    N = patches.shape[0]
    if patches.shape[-1] == 1:
        return G[..., 0].T @ patches[..., 0] / N
    from ..linalg.gemm import factor_sum as _factor_sum

    return _factor_sum(G, patches) / N  # one GEMM over the folded (n, t) axes


def ratio_fraction(state):
    """Per layer, the fraction of non-degenerate ``H_g`` pairs with ``ỹᵀHỹ / s̃ᵀỹ ≤ 2/μ₁``
    (thesis §2.3.1, Figure 2.1; None if none)."""
    d = state.diagnostics
    return [w / (n - z) if n - z else None for n, z, w in zip(d["pairs"], d["pairs_degenerate"], d["ratio_le_2"])]


def lemma6_bounds(lam_G, mu1, n_pairs):
    """Lemma 6 eigenvalue bounds ``(κ_lower, κ_upper)`` for an L-BFGS/BFGS matrix built from
    ``H_0 = λ_G⁻¹ I`` and ``n_pairs`` pairs that satisfy Lemma 4 (``D_P(I) D_LM`` with
    ``μ₂ = λ_G``): ``κ_lower = (λ_G + n/μ₃)⁻¹``, ``κ_upper = λ_G⁻¹ μ̂ⁿ + (μ̂ⁿ − 1)/(μ̂ − 1)/μ₂``,
    ``μ₃ = μ₁/(μ₂(1 + 2μ₁))``, ``μ̂ = (1 + 1/√(μ₂μ₃))²``."""
    mu2 = lam_G
    mu3 = mu1 / (mu2 * (1 + 2 * mu1))
    mu_hat = (1 + 1 / math.sqrt(mu2 * mu3)) ** 2
    lower = 1.0 / (lam_G + n_pairs / mu3)
    upper = mu_hat**n_pairs / lam_G + (mu_hat**n_pairs - 1) / (mu_hat - 1) / mu2
    return lower, upper


def _apply(H, v):
    return H(v) if callable(H) else H @ v


# ======================================================= the dense forms' own definitions
# Each chapter's dense form (``_KBFGSBase._dense``: Algorithm 9/10, below;
# ``kbfgs_mlp._KBFGSMLPBase._dense``: Algorithm 4/5) is its own literal replay with dense
# float64 matrices and calls none of :class:`KBFGSCore`'s update code. These helpers are the
# definitions the two dense replays read (tested against loops / the fast kernels in
# tests/test_method_kbfgs.py::test_dense_definitions).
def hg_matrix(H_g, S, Y, gamma):
    """``H_g`` of one layer as a matrix: the BFGS matrix ``H_g`` itself or, for L-BFGS
    (``H_g is None``), the matrix of the stored pairs by the recursion (2.12)/(3.16) from
    ``H_0 = γI`` (:func:`~refcurv.linalg.quasi_newton.lbfgs_dense`; ``γI`` with no pairs)."""
    if H_g is not None:
        return H_g
    if S.shape[0] == 0:
        return gamma * xp_of(S).eye(S.shape[1], dtype=S.dtype)
    return lbfgs_dense(S, Y, gamma)


def A_definition(patches):
    """``A = (1/N) Σ_n Σ_t a_t(n) a_t(n)ᵀ`` ((3.9); (2.3) for ``|T| = 1``) as the Gram matrix
    of the ``N|T|`` stacked patch vectors — one product, not the fast forms' einsum
    (:func:`~refcurv.linalg.kronecker.factor_A`) nor their Hessian action (3.15)."""
    N, d, T = patches.shape
    X = patches.transpose(0, 2, 1).reshape(N * T, d)
    return X.T @ X / N


def inverse_definition(M):
    """``M⁻¹`` by LU (``linalg.inv``), symmetrized (the fast forms use Cholesky)."""
    X = xp_of(M).linalg.inv(M)
    return (X + X.T) / 2


def count_pair(diag, l, ratio, used, mu1, dtype):
    """Per-layer counts of one ``H_g`` pair (module docstring, "Diagnostics"): ``pairs``;
    ``pairs_degenerate`` (``ratio = inf``: ``s̃ᵀỹ ≤ 0``) or ``ratio_le_1``/``ratio_le_2``
    (``ratio ≤ 1/μ₁``, ``2/μ₁`` with a relative slack √eps: equality is the common case when
    Powell on ``H`` acts and DD's ``B = I`` step does not) and ``pairs_used``/``pairs_skipped``."""
    diag["pairs"][l] += 1
    if ratio == float("inf"):
        diag["pairs_degenerate"][l] += 1
        return
    slack = 1 + math.sqrt(np.finfo(dtype).eps)
    diag["ratio_le_1"][l] += int(ratio <= slack / mu1)
    diag["ratio_le_2"][l] += int(ratio <= 2 * slack / mu1)
    diag["pairs_used" if used else "pairs_skipped"][l] += 1


class KBFGSCore(Method):
    """The FAST step both chapters share ([Ren-thesis] Algorithms 4/5 and 9/10 have the same
    skeleton): deferred second pass → damped (L-)BFGS update of ``H_g``; first pass →
    momentum → direction ``−H_g (m H_a)``; on a curvature step the ``H_a`` update and the stash
    of the batch for the next second pass. Each chapter's dense form (``_dense``) is a
    separate literal replay that does not use this class's update code. Chapter hooks: ``_h0_scale`` (``H_0`` of ``H_g``),
    ``_damp`` (DD or ``D_P D_LM``), ``_accept`` / ``_accept_Ha`` (skip rules),
    ``_curvature_due`` (schedule), ``_A_next`` (Ch.2's moving average of ``A``),
    ``_gradient`` (the authors' weight decay).

    ``curvature(state)`` is ``BlockDiagonal`` over layers of ``Inverse(Kronecker(H_g, H_a))``
    (row-major ``vec``: ``(H_g ⊗ H_a) vec(m) = vec(H_g m H_a)``) with ``H_a = state.H_a_used``
    and ``H_g`` as a dense matrix (the L-BFGS recursion (3.16) for the L variants);
    ``rhs(state, g) = state.m``."""

    limited = False       # True: H_g by L-BFGS
    exact_algorithms = ()  # algorithms with exact H_a = (A + λ_A I)⁻¹ and no gradient momentum

    # ------------------------------------------------------------ hooks (chapter)
    def _h0_scale(self, lambda_G):  # pragma: no cover - abstract
        raise NotImplementedError

    def _damp(self, s, y, H, lambda_G):  # pragma: no cover - abstract
        raise NotImplementedError

    def _accept(self, ratio, s_t, y_t, g_bar):
        return True

    def _accept_Ha(self, s, y, abar):
        return float(s @ y) > 0

    def _curvature_due(self, k):
        return True

    def _A_next(self, state, l, P):
        """The ``A`` the ``H_a`` update uses, if the method keeps one (Ch.2); None (Ch.3)."""
        return None

    def _gradient(self, g, W):
        return g

    @property
    def _exact(self):
        return self.algorithm in self.exact_algorithms

    # ------------------------------------------------------------ state
    def init(self, net, params):
        return self.State(diagnostics={key: [0] * len(params) for key in DIAGNOSTICS})

    def _has(self, name):
        return name in {f.name for f in fields(self.State)}

    def _initial(self, patches, lambda_A):
        """``A = (1/N) Σ_n Σ_t a aᵀ`` and ``H_a = (A + λ_A I)⁻¹`` (Alg. 4/9 line 3) per layer."""
        A = [factor_A(P) for P in patches]
        H = [_inverse_spd(Al + lA * xp_of(Al).eye(Al.shape[0], dtype=Al.dtype), "A + λ_A I")
             for Al, lA in zip(A, lambda_A)]
        return A, H

    def warm_start(self, state, net, params, batch):
        """``A`` from ``batch`` (e.g. the whole data set; Alg. 4 line 3, §2.8.2; Alg. 9 line 3,
        §3.4.3) and ``H_a = (A + λ_A I)⁻¹``."""
        self.check_state(state)
        if not isinstance(batch, Batch):
            raise ArgumentTypeError(f"batch must be a refcurv.methods.Batch, got {type(batch).__name__}")
        patches, _ = net.factors(params, batch.x, batch.y, batch.loss)
        lam = [damping_split(self.damping, P.shape[-1]) for P in patches]
        lambda_A, lambda_G = [a for a, _ in lam], [g for _, g in lam]
        A, H = self._initial(patches, lambda_A)
        extra = {"A": A} if self._has("A") else {}
        return state.replace(lambda_A=lambda_A, lambda_G=lambda_G, H_a=H, **extra)

    def _first_state(self, state, patches, params):
        """What the first step creates if missing: λ's, ``A`` and ``H_a`` (no warm start),
        ``H_g = H_0``, the zero pair ``(s_g, y_g)``."""
        ch = {}
        if state.lambda_A is None:
            lam = [damping_split(self.damping, P.shape[-1]) for P in patches]
            ch["lambda_A"], ch["lambda_G"] = [a for a, _ in lam], [g for _, g in lam]
        lambda_A = ch.get("lambda_A", state.lambda_A)
        lambda_G = ch.get("lambda_G", state.lambda_G)
        if state.H_a is None:
            A, ch["H_a"] = self._initial(patches, lambda_A)
            if self._has("A") and state.A is None:
                ch["A"] = A
        if state.s_g is None:
            xp, dt = xp_of(params[0]), params[0].dtype
            outs = [W.shape[0] for W in params]
            ch["s_g"] = [xp.zeros(o, dtype=dt) for o in outs]
            ch["y_g"] = [xp.zeros(o, dtype=dt) for o in outs]
            if self.limited:
                ch["S"] = [xp.zeros((0, o), dtype=dt) for o in outs]
                ch["Y"] = [xp.zeros((0, o), dtype=dt) for o in outs]
            else:
                ch["H_g"] = [self._h0_scale(lG) * xp.eye(o, dtype=dt) for o, lG in zip(outs, lambda_G)]
        return state.replace(**ch) if ch else state

    # ------------------------------------------------------------ H_g
    def _hg_dense(self, state, l):
        """``H_g`` of layer ``l`` as a matrix (:func:`hg_matrix`; what ``curvature`` reads)."""
        if not self.limited:
            return hg_matrix(state.H_g[l], None, None, None)
        return hg_matrix(None, state.S[l], state.Y[l], self._h0_scale(state.lambda_G[l]))

    def _hg_fast(self, state, l):
        """``H_g`` of layer ``l``: the BFGS matrix, or (L-BFGS) the compact "non-loop" form
        ``v ↦ γv + W(M(Wᵀv))`` (Byrd et al.; (W, M) built once per step)."""
        if not self.limited:
            return state.H_g[l]
        S, Y = state.S[l], state.Y[l]
        gamma = self._h0_scale(state.lambda_G[l])
        if S.shape[0] == 0:
            return lambda v: gamma * v
        Wc, Mc = lbfgs_compact(S, Y, gamma)
        return lambda v: gamma * v + Wc @ (Mc @ (Wc.T @ v))

    def _second_pass(self, state, net, params):
        """Second pass on the pending batch at the current parameters, then the moving-average
        pair, its damping and the (L-)BFGS update of every ``H_g`` (Alg. 4 lines 13-18 / Alg. 5
        lines 12-19; Alg. 9 lines 13, 19-21 / Alg. 10 lines 14-16)."""
        pend, b = state.pending, self.beta
        patches, G = net.factors(params, pend.batch.x, pend.batch.y, pend.batch.loss)
        s_g, y_g, last = list(state.s_g), list(state.y_g), list(state.last_pairs or [None] * len(params))
        H_g = None if self.limited else list(state.H_g)
        S, Y = (list(state.S), list(state.Y)) if self.limited else (None, None)
        diag = {key: list(v) for key, v in state.diagnostics.items()}
        for l, (W, P, Gp) in enumerate(zip(params, patches, G)):
            h_plus = W @ mean_patch(P)                                          # h̄⁺ = W⁺ â⁺
            g_plus = Gp.mean(axis=(0, 2))                                       # ḡ⁺ = Dh̄⁺
            s_g[l] = b * s_g[l] + (1 - b) * (h_plus - pend.h_bar[l])            # (2.5), Alg. 9 l. 19
            y_g[l] = b * y_g[l] + (1 - b) * (g_plus - pend.g_bar[l])
            H = self._hg_fast(state, l)
            s_t, y_t, th1, th2 = self._damp(s_g[l], y_g[l], H, state.lambda_G[l])
            sty = float(s_t @ y_t)
            diag["pairs"][l] += 1
            if sty > 0:
                ratio = float(y_t @ _apply(H, y_t)) / sty
                # ratio = 1/μ₁ holds with equality whenever Powell's damping on H acts and DD's
                # B = I step does not (θ₁ < 1, θ₂ = 1): compare with a rounding slack
                slack = 1 + math.sqrt(np.finfo(s_t.dtype).eps)
                diag["ratio_le_1"][l] += int(ratio <= slack / self.mu1)
                diag["ratio_le_2"][l] += int(ratio <= 2 * slack / self.mu1)
                used = bool(self._accept(ratio, s_t, y_t, pend.g_bar[l]))
                diag["pairs_used" if used else "pairs_skipped"][l] += 1
            else:  # only s̃ = 0 (s_g = y_g = 0: the layer did not move): no information
                ratio, used = float("inf"), False
                diag["pairs_degenerate"][l] += 1
            if used:
                if self.limited:
                    xp = xp_of(s_t)
                    S[l] = xp.concatenate([S[l], s_t[None]])[-self.memory:]
                    Y[l] = xp.concatenate([Y[l], y_t[None]])[-self.memory:]
                else:
                    H_g[l] = bfgs_update_H(H_g[l], s_t, y_t)
            last[l] = PairRecord(k=state.k, s=s_g[l], y=y_g[l], s_t=s_t, y_t=y_t, theta1=th1, theta2=th2,
                                 ratio=ratio, used=used)
        ch = {"S": S, "Y": Y} if self.limited else {"H_g": H_g}
        return state.replace(s_g=s_g, y_g=y_g, last_pairs=last, diagnostics=diag, pending=None, **ch)

    # ------------------------------------------------------------ one step
    def _momentum(self, state, g, params):
        """Alg. 4 line 8 (``"ema"``: ``m ← μm + (1−μ)g``) / Alg. 9 line 8 (``"heavy_ball"``:
        ``m ← μm + g``); ``m = g`` for Algorithms 5 and 10."""
        g = [self._gradient(gi, W) for gi, W in zip(g, params)]
        if self._exact:
            return g
        c = 1.0 if self.momentum_form == "heavy_ball" else 1 - self.momentum
        prev = state.m if state.m is not None else [0 * gi for gi in g]
        return [self.momentum * a + c * gi for a, gi in zip(prev, g)]

    def _fast(self, state, net, params, batch, draws):
        # (1) the deferred second pass of the previous curvature step
        if state.pending is not None:
            state = self._second_pass(state, net, params)
        # (2) first forward-backward pass on M_k, momentum, direction −H_g (m H_a)
        patches, G = net.factors(params, batch.x, batch.y, batch.loss)
        state = self._first_state(state, patches, params)
        g = [layer_gradient(P, Gl) for P, Gl in zip(patches, G)]
        m = self._momentum(state, g, params)
        direction = [-_apply(self._hg_fast(state, l), ml @ state.H_a[l]) for l, ml in enumerate(m)]
        # (3) curvature step: A (Ch.2), H_a from this pass's patches; stash M_k
        ch = {"pending": None}
        if self._curvature_due(state.k):
            ch = self._curvature_update(state, patches, G, params, batch)
        new = state.replace(k=state.k + 1, m=m, H_a_used=state.H_a, **ch)
        return direction, new

    def _curvature_update(self, state, patches, G, params, batch):
        H_a, A = [], []
        diag = {key: list(v) for key, v in state.diagnostics.items()}
        for l, P in enumerate(patches):
            lam_A, Hl = state.lambda_A[l], state.H_a[l]
            A_l = self._A_next(state, l, P)
            A.append(A_l)
            if self._exact:  # Alg. 5 line 23 / Alg. 10 line 12: H_a = (A + λ_A I)⁻¹
                M = A_l if A_l is not None else factor_A(P)
                H_a.append(_inverse_spd(M + lam_A * xp_of(M).eye(M.shape[0], dtype=M.dtype), "A + λ_A I"))
                continue
            # Hessian-action BFGS (§2.4; (3.14)-(3.15)): Ch.3 never forms A (patches' action)
            M = A_l if A_l is not None else P
            abar = mean_patch(P)
            s_a, y_a = hessian_action_pair(Hl, abar, M, lam_A)
            if self._accept_Ha(s_a, y_a, abar):
                H_a.append(bfgs_update_H(Hl, s_a, y_a))
            else:
                H_a.append(Hl)
                diag["ha_skipped"][l] += 1
        ch = {"H_a": H_a, "diagnostics": diag,
              "pending": PendingPass(batch=batch.own_copy(),
                                     h_bar=[W @ mean_patch(P) for W, P in zip(params, patches)],  # h̄ = W â
                                     g_bar=[Gl.mean(axis=(0, 2)) for Gl in G])}                   # ḡ = Dh̄
        if self._has("A"):
            ch["A"] = A
        return ch

    # ------------------------------------------------------------ curvature
    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        self.check_state(state)
        if state.H_a_used is None:
            raise StateError(f"{self.name}.curvature: the state has made no step yet (H_a_used is None)")
        return BlockDiagonal([Inverse(Kronecker(self._hg_dense(state, l), Ha))
                              for l, Ha in enumerate(state.H_a_used)])

    def rhs(self, state, grads):
        """The momentum buffer ``m`` (the mini-batch gradient for Algorithms 5 and 10)."""
        return state.m


# ============================================================== Chapter 3 (conv)
@dataclass(frozen=True)
class _KBFGSBase(KBFGSCore):
    damping: float = 0.3
    momentum: float = 0.9
    beta: float = 0.9
    mu1: float = 0.2
    T_inv: int = 1
    phase: str = "k0"
    algorithm: str = "alg9"
    momentum_form: str = "heavy_ball"

    exact_algorithms = ("alg10",)

    def _check(self):
        check_positive(self.damping, "damping")
        check_unit(self.momentum, "momentum")
        check_unit(self.beta, "beta", closed_low=False)
        check_unit(self.mu1, "mu1", closed_low=False)
        check_int(self.T_inv, "T_inv")
        check_choice(self.phase, "phase", ("k0", "paper"))
        check_choice(self.algorithm, "algorithm", ("alg9", "alg10"))
        check_choice(self.momentum_form, "momentum_form", ("heavy_ball", "ema"))

    def __post_init__(self):
        self._check()

    def _h0_scale(self, lambda_G):
        return 1.0 / lambda_G  # Alg. 9 line 3: H_G = λ_G⁻¹ I (also L-BFGS's H_0, line 9)

    def _damp(self, s, y, H, lambda_G):
        if self.algorithm == "alg9":
            s_t, y_t, th = dp_dlm(s, y, H, self.mu1, lambda_G)   # Algorithm 8
        else:
            s_t, y_t, th = dpi_dlm(s, y, self.mu1, lambda_G)     # Algorithm 11
        return s_t, y_t, th, None

    def _curvature_due(self, k):
        """``phase="k0"``: 0-based ``k ≡ 0 (mod T_inv)`` (:func:`refresh_due`); ``"paper"``:
        Algorithm 9 line 12, 1-based ``k ≡ 0 (mod T)``, i.e. 0-based ``k ≡ T_inv − 1``."""
        if self.phase == "paper":
            return (k + 1) % self.T_inv == 0
        return refresh_due(k, self.T_inv)

    # ------------------------------------------------------------ dense form
    def _dense(self, state, net, params, batch, draws):
        """Algorithm 9 (``"alg9"``) / 10 (``"alg10"``), iteration ``k = state.k``, replayed
        literally with dense float64 matrices (``H_A``, ``H_G``, ``A``, ``H_G ⊗ H_A``), the
        ``H_G`` update deferred to the next call (module docstring). Independent of
        :class:`KBFGSCore`'s update code; shares only the kernels listed in the class docstring."""
        xp, L, k, b = xp_of(params[0]), len(params), state.k, self.beta
        limited, alg9 = self.limited, self.algorithm == "alg9"
        P, Dh = net.factors(params, batch.x, batch.y, batch.loss)  # line 6: first pass on M_k at θ_k
        A = [A_definition(Pl) for Pl in P]                          # (3.9), this mini-batch
        eye = [xp.eye(Al.shape[0]) for Al in A]
        # lines 2-3 (before the first iteration, unless warm-started): λ_A = √|T|√λ,
        # λ_G = √λ/√|T|; H_A = (A + λ_A I)⁻¹ (here from M_0); H_G = λ_G⁻¹ I, (s_G, y_G) = 0
        lambda_A, lambda_G = state.lambda_A, state.lambda_G
        if lambda_A is None:
            T = [Pl.shape[-1] for Pl in P]
            lambda_A = [float(math.sqrt(t) * math.sqrt(self.damping)) for t in T]
            lambda_G = [float(math.sqrt(self.damping) / math.sqrt(t)) for t in T]
        H_A = state.H_a
        if H_A is None:
            H_A = [inverse_definition(A[l] + lambda_A[l] * eye[l]) for l in range(L)]
        outs = [W.shape[0] for W in params]
        fresh = state.s_g is None
        s_G = [xp.zeros(o) for o in outs] if fresh else list(state.s_g)
        y_G = [xp.zeros(o) for o in outs] if fresh else list(state.y_g)
        if limited:  # K-BFGS(L): the last `memory` damped pairs, H_0 = λ_G⁻¹ I (line 9)
            S = [xp.zeros((0, o)) for o in outs] if fresh else list(state.S)
            Y = [xp.zeros((0, o)) for o in outs] if fresh else list(state.Y)
            H_G = [hg_matrix(None, S[l], Y[l], 1 / lambda_G[l]) for l in range(L)]
        else:
            H_G = [xp.eye(o) / lambda_G[l] for l, o in enumerate(outs)] if fresh else list(state.H_g)
        diag = {key: list(v) for key, v in state.diagnostics.items()}
        last = list(state.last_pairs or [None] * L)

        # lines 13, 19-21 of iteration k−1 (deferred): second pass on M_{k−1} at θ_k
        pend = state.pending
        if pend is not None:
            P2, Dh2 = net.factors(params, pend.batch.x, pend.batch.y, pend.batch.loss)
            for l in range(L):
                h_plus, g_plus = params[l] @ mean_patch(P2[l]), Dh2[l].mean(axis=(0, 2))  # h̄⁺ = W⁺â⁺
                s_G[l] = b * s_G[l] + (1 - b) * (h_plus - pend.h_bar[l])     # line 19
                y_G[l] = b * y_G[l] + (1 - b) * (g_plus - pend.g_bar[l])
                if alg9:   # line 20: D_P D_LM (Algorithm 8) with H = H_G, μ₂ = λ_G
                    s_t, y_t, th = dp_dlm(s_G[l], y_G[l], H_G[l], self.mu1, lambda_G[l])
                else:      # Algorithm 10 line 15: D_P(I) D_LM (Algorithm 11)
                    s_t, y_t, th = dpi_dlm(s_G[l], y_G[l], self.mu1, lambda_G[l])
                sty = float(s_t @ y_t)
                used = sty > 0   # Ch.3 skips no pair; s̃ᵀỹ ≤ 0 only when s_G = y_G = 0
                ratio = float(y_t @ H_G[l] @ y_t) / sty if used else float("inf")
                count_pair(diag, l, ratio, used, self.mu1, s_t.dtype)
                last[l] = PairRecord(k=k, s=s_G[l], y=y_G[l], s_t=s_t, y_t=y_t, theta1=th, theta2=None,
                                     ratio=ratio, used=used)
                if used and limited:   # line 21: newest pair into the L-BFGS memory (3.16)
                    S[l] = xp.concatenate([S[l], s_t[None]])[-self.memory:]
                    Y[l] = xp.concatenate([Y[l], y_t[None]])[-self.memory:]
                    H_G[l] = hg_matrix(None, S[l], Y[l], 1 / lambda_G[l])
                elif used:             # line 21: BFGS (3.11)
                    H_G[l] = bfgs_update_H(H_G[l], s_t, y_t)

        # line 7-8: gradient and momentum (Algorithm 10: m = g)
        g = net.grad(params, batch.x, batch.y, batch.loss)
        if self.algorithm == "alg10":
            m = g
        else:
            prev = state.m if state.m is not None else [xp.zeros_like(gl) for gl in g]
            if self.momentum_form == "heavy_ball":  # m ← μm + g (Ch.3's form)
                m = [self.momentum * ml + gl for ml, gl in zip(prev, g)]
            else:                                   # m ← μm + (1−μ)g (Ch.2's form, §2.5.2)
                m = [self.momentum * ml + (1 - self.momentum) * gl for ml, gl in zip(prev, g)]
        # lines 9-10: p = −(H_G ⊗ H_A) vec(m) (row-major vec; (3.10))
        direction = [-(xp.kron(H_G[l], H_A[l]) @ m[l].ravel()).reshape(m[l].shape) for l in range(L)]

        # line 12: curvature step? (printed: 1-based k ≡ 0 mod T; library: 0-based k ≡ 0 mod T)
        due = (k + 1) % self.T_inv == 0 if self.phase == "paper" else refresh_due(k, self.T_inv)
        H_A_new, pending = H_A, None
        if due:
            H_A_new = []
            for l in range(L):
                M = A[l] + lambda_A[l] * eye[l]
                if not alg9:   # Algorithm 10 line 12: H_A = (Â + λ_A I)⁻¹
                    H_A_new.append(inverse_definition(M))
                    continue
                s_A = H_A[l] @ mean_patch(P[l])         # lines 16-17, (3.14): s_A = H_A â,
                y_A = M @ s_A                           # y_A = (A + λ_A I) s_A with A formed
                if float(s_A @ y_A) > 0:
                    H_A_new.append(bfgs_update_H(H_A[l], s_A, y_A))
                else:
                    H_A_new.append(H_A[l])
                    diag["ha_skipped"][l] += 1
            pending = PendingPass(batch=batch.own_copy(), h_bar=[W @ mean_patch(Pl) for W, Pl in zip(params, P)],
                                  g_bar=[Dl.mean(axis=(0, 2)) for Dl in Dh])   # h̄ = W â, ḡ = Dh̄
        hg = {"S": S, "Y": Y} if limited else {"H_g": H_G}
        new = state.replace(k=k + 1, m=m, H_a=H_A_new, H_a_used=H_A, s_g=s_G, y_g=y_G, lambda_A=lambda_A,
                            lambda_G=lambda_G, pending=pending, last_pairs=last, diagnostics=diag, **hg)
        return direction, new


@register
@dataclass(frozen=True)
class KBFGS(_KBFGSBase):
    """K-BFGS ([Ren-thesis] Algorithm 9; Algorithm 10's variant with ``algorithm="alg10"``):
    ``H_g`` a dense ``out × out`` BFGS matrix. Hyper-parameters: ``damping`` λ, ``momentum``
    μ (Alg. 9 line 8's β), ``beta`` (moving average of ``(s_g, y_g)``, line 19), ``mu1``
    (Powell), ``T_inv`` (curvature frequency T), ``phase`` ("k0" | "paper"), ``algorithm``
    ("alg9" | "alg10"), ``momentum_form`` ("heavy_ball" | "ema").

    Curvature: ``C = ⊕_l (H_g ⊗ H_a)⁻¹`` (3.10), ``rhs = m`` (module docstring).

    Fast form: :class:`KBFGSCore`; dense form: :meth:`_KBFGSBase._dense` (literal Algorithm 9/10
    with dense matrices). Shared by both forms: ``net.factors``, ``linalg.kronecker.mean_patch``,
    ``linalg.damping.dp_dlm``/``dpi_dlm``, ``linalg.quasi_newton.bfgs_update_H`` (each tested
    on its own; module docstring)."""

    name = "kbfgs"
    seed_ref = "[Ren-thesis] Ch.3 Alg. 8-11, (3.9)-(3.16)"
    summary = "Kronecker-factored BFGS (H_G by damped BFGS, H_A by minibatched Hessian action), conv + linear"
    State = KBFGSState


@register
@dataclass(frozen=True)
class KBFGSL(_KBFGSBase):
    """K-BFGS(L) ([Ren-thesis] Algorithms 9 and 10): ``H_g`` by L-BFGS with the last ``memory``
    (thesis: ``p``) pairs from ``H_0 = λ_G⁻¹ I``, applied in compact form. Hyper-parameters as
    :class:`KBFGS`, plus the ``memory``. Curvature: as :class:`KBFGS` with ``H_g`` the dense
    L-BFGS matrix (3.16).

    Fast form: compact L-BFGS (:class:`KBFGSCore`); dense form: :meth:`_KBFGSBase._dense` with
    ``H_g`` the dense L-BFGS matrix of the stored pairs (:func:`hg_matrix`). Shared by both
    forms: as :class:`KBFGS` (module docstring)."""

    memory: int = 100

    name = "kbfgs-l"
    limited = True
    seed_ref = "[Ren-thesis] Ch.3 Alg. 8-11, (3.9)-(3.16)"
    summary = "Kronecker-factored L-BFGS (H_G by damped L-BFGS, compact form), conv + linear"
    State = KBFGSLState

    def __post_init__(self):
        self._check()
        check_int(self.memory, "memory")
