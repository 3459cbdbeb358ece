"""K-BFGS-20 and K-BFGS(L)-20 for multi-layer perceptrons ([Ren-thesis] Chapter 2:
Algorithm 1, (2.1)–(2.11), Algorithm 3 (double damping, DD), Theorem 1, Algorithm 4 and
Algorithm 5). Registered as ``"kbfgs-mlp"`` (``H_g`` by damped BFGS, a dense
``d_o × d_o`` matrix) and ``"kbfgs-l-mlp"`` (``H_g`` by damped L-BFGS with ``p = memory``
stored pairs, applied in the compact "non-loop" form with ``H_0 = I``, Algorithm 4 line 10).
Linear layers only (``supports_conv = False``); the conv version of Chapter 3 is a different
module.

Per layer ``l`` with weight ``W ∈ R^{d_o × d_i}`` (bias = last column, ``a = (a_{l−1}, 1)``):

* ``A_l = E_i[a aᵀ]`` (2.3), estimated by the moving average
  ``A ← βA + (1−β)·mean_i(a_i a_iᵀ)`` (Algorithm 4 line 20, §2.5.2 item 2), and
  ``H_a ≈ (A + λ_A I)⁻¹`` updated by "Hessian-action" BFGS (§2.4, Algorithm 4 lines 21–23):
  ``s_a = H_a ā``, ``y_a = A^{LM} s_a``, BFGS (2.6) with ``(s_a, y_a)``. ``ā`` is the
  mini-batch mean of ``a`` (its last entry is 1, the ones row; the authors' code sets it so).
  ``algorithm="alg5"`` replaces it by the exact ``H_a = (A + λ_A I)⁻¹`` (Algorithm 5 line 23).
* ``H_g ≈ G_l⁻¹`` by damped BFGS / L-BFGS (§2.3) on the moving-average pair (Algorithm 4
  line 16, (2.5))

      s_g ← β s_g + (1−β)(h̄⁺ − h̄),     y_g ← β y_g + (1−β)(ḡ⁺ − ḡ),

  double-damped (Algorithm 3) with ``H = H_g``, ``μ₁``, ``μ₂ = λ_G``, then used in BFGS (2.6)
  (or stored as the newest L-BFGS pair). ``s_g = y_g = 0`` initially.
* direction ``−H_g m H_a`` (2.4, Algorithm 4 line 9) with the momentum gradient
  ``m ← μm + (1−μ)∇f̄`` (``momentum_form="ema"``, the default: Algorithm 4 line 8 as §2.5.2
  item 1 states it; the printed line is garbled, see errata; ``momentum`` μ = 0.9 is the β
  of that line, separate from the ``beta`` of the moving averages of ``A`` and
  ``(s_g, y_g)``), ``m = 0`` initially; ``momentum_form="heavy_ball"`` is Chapter 3's
  ``m ← μm + ∇f̄``; ``algorithm="alg5"`` uses ``m = ∇f̄`` (Algorithm 5 line 8).
* damping split ``λ_A = λ_G = √λ`` (Algorithm 4 line 2); ``λ ∈ (0, 1]`` so that
  ``μ₂ = √λ ∈ (0, 1]`` as DD requires (§2.3.1: ỹ is then a convex combination of y and s̃).

Scaling. ``h̄``, ``ḡ`` are mini-batch means of the pre-activations ``h_i = W a_i`` and of the
pre-activation gradients ``g_i = ∂f(i)/∂h(i)`` of the *per-sample* loss — the thesis'
definition ((2.1)–(2.2): ``g_l(i) = ∂f(i)/∂h_l(i)``; (2.5): ``E_i[g⁺(i)] − E_i[g(i)]``), which is
what :meth:`Sequential.factors` returns. With it ``y_g ≈ E_i[G_l(i)] s_g``, so ``H_g``
approximates ``G_l⁻¹`` with ``G_l = E_i[∂²f(i)/∂h(i)²]`` and ``A_l ⊗ G_l ≈ E_i[∇²f_l(i)]`` is the
Hessian block of the *mean* objective (2.3). (Backpropagating the mean loss instead gives
``g_i/m``, ``y_g/m`` and an ``H_g`` about ``m`` times too large, a batch-size dependent scale.)
The gradient is ``∇f̄ = mean_i g_i a_iᵀ`` (2.1), from the same pass. A single linear layer with
MSE has ``G_l(i) = I``: then ``y_g = s_g`` and ``H_g`` stays ``I`` (tested).

Vectorization. Row-major ``vec`` (refcurv): ``vec(H_g m H_a) = (H_g ⊗ H_a) vec(m)`` (``H_a``
symmetric); the thesis (2.4) writes the column-major ``(H_a ⊗ H_g) vec(∇f̂)``. The dense form
forms ``H_g ⊗ H_a`` explicitly, with ``H_g`` the dense L-BFGS matrix (recursion (2.12), from the
stored pairs) for K-BFGS(L); the fast form uses the two-sided product and the compact L-BFGS
representation. The two agree to rounding (the paper says they are equal).

Deferred second pass (the step does not know the learning rate). Algorithm 4 iteration ``k``
runs a forward/backward pass on ``M_k`` at ``θ_k`` (line 6), steps ``θ_{k+1} = θ_k − α p_k``
(line 11), then a second pass on ``M_k`` at ``θ_{k+1}`` (line 13) to update ``H_g`` (lines
16–18), and updates ``A``, ``H_a`` from line 6's ``a`` (lines 20–23). Here step ``k`` (called
with ``θ_k``, ``M_k``) does, in order:

1. if the state holds ``(M_{k−1}, h̄, ḡ)`` from step ``k−1`` (a private copy of the batch
   arrays, so that a caller may refill its batch buffer in place): the second pass of iteration
   ``k−1`` — on ``M_{k−1}`` at ``θ_k = θ_{k−1} + lr·direction_{k−1}`` — giving ``h̄⁺, ḡ⁺``,
   then lines 16–18 (EMA pair, DD, ``H_g`` update);
2. the first pass on ``M_k`` at ``θ_k`` (line 6), momentum (line 8), direction
   ``−H_g m H_a`` (line 9);
3. lines 20–23 (``A``, ``H_a``) with this pass's ``a``; stash ``(M_k, h̄, ḡ)``.

Iteration ``k−1``'s ``H_g`` update only needs ``θ_k`` and is used first by iteration ``k``'s
direction, and ``H_a``'s update needs nothing from the second pass, so the sequence of
parameters is exactly that of Algorithm 4 with the same learning rates (tested against an
explicit Algorithm 4 driven with a known learning rate). The last iteration's ``H_g`` update is
never performed (it would not change any parameter).

Initialization (Algorithm 4 line 3): :meth:`warm_start` sets ``A`` from a forward pass over any
data (the thesis uses the whole training set, §2.8.2) and ``H_a = (A + λ_A I)⁻¹``; without it
the first step's mini-batch does. ``H_g = I``. Chapter 2 prints no curvature interval (every
iteration updates ``A``, ``H_a`` and ``H_g``), so these methods have no ``T_inv``.

Guards where the thesis is silent: a DD output with ``s̃ᵀỹ ≤ 0`` (only when
``s_g = y_g = 0``, e.g. a layer whose parameters did not move) is not used (counted as
"degenerate"); the Hessian-action pair is not used when ``s_aᵀy_a ≤ 0`` (only when ``ā = 0``).

State: :class:`KBFGSMLPState` / :class:`KBFGSLMLPState` (frozen), the fields of the
Chapter 3 states (:class:`refcurv.methods.kbfgs.KBFGSStateBase`: ``m``, ``H_a``,
``H_a_used``, ``s_g``, ``y_g``, ``lambda_A``, ``lambda_G``, ``pending``, ``last_pairs``; ``H_g``
or ``S``, ``Y``) plus ``A``, the moving average of (2.3).

Diagnostics. ``state.last_pairs`` holds, per layer, the last DD record
(:class:`~refcurv.methods.kbfgs.PairRecord`: ``s, y`` before and ``s_t, y_t`` after damping,
``θ₁, θ₂``, ``ratio = ỹᵀHỹ/s̃ᵀỹ`` with the ``H_g`` used by DD, ``used``; None before the first
update); ``state.diagnostics`` counts per layer (keys shared with Chapter 3) the pairs seen
(``pairs``), ``pairs_used``, ``pairs_skipped`` (``algorithm="alg5"``: ``ratio > skip_factor/μ₁``,
Algorithm 5 line 17; the authors' test), ``pairs_degenerate``, and those with
``ratio ≤ 1/μ₁`` and ``≤ 2/μ₁`` (``ratio_le_1``, ``ratio_le_2``; the statistic of Figure 2.1).
These comparisons carry a relative slack ``√eps``: when Powell's damping on H acts and the
``B = I`` step does not (``θ₁ < 1``, ``θ₂ = 1``), ``ratio = 1/μ₁`` holds with equality, and
line 17's ``≥`` accepts it. ``ha_skipped`` counts the Hessian-action pairs not used.

Curvature operator: as for Chapter 3, ``C = BlockDiagonal_l[(H_g ⊗ H_a)⁻¹]`` with
``H_a = state.H_a_used`` and ``H_g`` dense (L-BFGS recursion (2.12)); ``rhs(state, g) =
state.m``.

The two forms are two code paths. The fast form is the step skeleton shared with Chapter 3
(:class:`refcurv.methods.kbfgs.KBFGSCore`, with this module's hooks): input dtype, the gradient
from the factors, ``A`` by :func:`~refcurv.linalg.kronecker.factor_A`, the Hessian-action pair by
:func:`~refcurv.linalg.kronecker.hessian_action_pair`, the compact L-BFGS form, Cholesky
inverses, :func:`authors_accepts`. The dense form (:meth:`_KBFGSMLPBase._dense`) is its own
literal replay of one iteration of Algorithm 4/5 (and the authors' departures) in float64 with
dense matrices, calling none of the skeleton's update code: ``λ_A = λ_G = √λ`` written out,
``A`` from its definition (:func:`~refcurv.methods.kbfgs.A_definition`), the gradient from
:meth:`~refcurv.nn.Sequential.grad`, ``y_a = (A + λ_A I) s_a`` with ``A`` formed, ``H_g ⊗ H_a``
formed, the dense L-BFGS matrix (:func:`~refcurv.methods.kbfgs.hg_matrix`, recursion (2.12)),
LU inverses, the skip rules written out. Both forms are checked against the tests' own
replays of Algorithm 4/5 and of the authors' code (``..._explicit_...[fast|dense]``) and
against each other along runs (``test_fast_equals_dense_*``, ``test_authors_fast_equals_dense_*``).

Shared by both forms (each tested on its own): ``net.factors``;
:func:`refcurv.linalg.kronecker.mean_patch` (``ā``; ``h̄ = W ā`` rounds identically in both, so
the pair difference ``h̄⁺ − h̄`` does); :func:`refcurv.linalg.damping.double_damping`;
:func:`refcurv.linalg.quasi_newton.bfgs_update_H`; the constant :data:`AUTHORS_SKIP`; the
records ``PendingPass`` / ``PairRecord``. The dense form's counting of the pairs
(:func:`~refcurv.methods.kbfgs.count_pair`) is not the fast form's (inline in the skeleton).

Authors' variant (``variant="authors"``, design §8; Algorithm 4 only). The authors' published
code (github.com/renyiryry/kbfgs_neurips2020_public: ``training_function.py``,
``training_utils.py::train_initialization``, ``kbfgs_utils.py`` at commit cd1d01e) departs from
the thesis in four places that change numbers; everything else (DD = Powell on ``H`` with the
current ``H_g`` and μ₁ = 0.2, then Powell with ``B = I`` and μ₂ = √λ, on copies of the
undamped moving-average pair; ``A^{LM} = A + √λ I``; 0.9 for every moving average, no bias
correction; L-BFGS with ``p = 100`` pairs in compact form with ``H_0 = γI``, γ = 1; the second
pass on the same mini-batch) is what the paper variant already does. The four departures:

1. weight decay in the momentum: ``m ← μm + (1−μ)(∇f̄ + τW)``, ``τ = l2``
   (default ``1e-5``), ``W`` including the bias column (the gradient of
   ``f̄ + (τ/2)‖θ‖²``; the (s, y) passes use the unregularized loss);
2. no moving average of ``A`` at the first iteration (``k = 0``): ``A`` stays at its warm-start
   value (without :meth:`warm_start`, the first mini-batch's ``mean_i a aᵀ``), so the first
   Hessian-action update uses ``A^{LM} = A_0 + √λ I``;
3. ``H_g`` (BFGS, or appending to the L-BFGS memory) is updated only if
   ``s̃ᵀỹ > 10⁻⁴ · s̃ᵀs̃ · ‖ḡ‖₂`` with ``(s̃, ỹ)`` the DD output and ``ḡ = mean_i g_i`` the
   layer's mean per-sample pre-activation gradient of the first pass (at ``θ_k``); a pair
   failing it is counted as "skipped";
4. ``H_a`` is updated only if ``s_aᵀy_a > 10⁻⁴ · s_aᵀs_a · ‖v‖₂`` with ``v = (ā_{1:d−1}, 1)``
   the vector of ``s_a = H_a v`` (mean input, last entry set to 1, which is refcurv's ``ā``
   for a layer with bias; a bias-free layer uses its mean input).

Not modelled: the code's full-batch branch (batch = whole training set: no warm start, (s, y)
decay 0), and its rejection of an update whose result contains ``inf``. The code's
``(s, y) = (h̄ − h̄⁺, ḡ − ḡ⁺)`` is the negated pair; DD, BFGS and the test in 3 are invariant
under ``(s, y) → (−s, −y)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import numpy as np

from ..backend import xp_of
from ..errors import HyperParameterError
from ..linalg.damping import double_damping
from ..linalg.kronecker import factor_A, mean_patch
from ..linalg.quasi_newton import bfgs_update_H
from .base import check_choice, check_int, check_nonnegative, check_positive, check_unit, state_field
from .kbfgs import (
    _H_G_DOC, _S_DOC, _Y_DOC, A_definition, KBFGSCore, KBFGSStateBase, PairRecord, PendingPass, count_pair,
    hg_matrix, inverse_definition,
)
from .registry import register

#: the authors' code (``kbfgs_utils.py::get_BFGS_formula``, ``Kron_LBFGS_append_s_y``): a pair
#: ``(s, y)`` is used only if ``sᵀy > AUTHORS_SKIP · sᵀs · ‖v‖``
AUTHORS_SKIP = 1e-4
#: ``τ`` of the authors' code (``training_function.py``: ``args['tau'] = 10**(-5)``)
AUTHORS_WEIGHT_DECAY = 1e-5

_A_DOC = "A ≈ E[a aᵀ] per layer (d × d), moving average with beta (Alg. 4 line 20, (2.3))"


@dataclass(frozen=True, kw_only=True)
class KBFGSMLPState(KBFGSStateBase):
    """State of ``"kbfgs-mlp"`` ([Ren-thesis] Algorithm 4/5 with BFGS ``H_g``)."""

    A: Any = state_field(doc=_A_DOC)
    H_g: Any = state_field(doc=_H_G_DOC + ", from I (Alg. 4 line 3)")


@dataclass(frozen=True, kw_only=True)
class KBFGSLMLPState(KBFGSStateBase):
    """State of ``"kbfgs-l-mlp"`` ([Ren-thesis] Algorithm 4/5 with L-BFGS ``H_g`` from ``H_0 = I``)."""

    A: Any = state_field(doc=_A_DOC)
    S: Any = state_field(doc=_S_DOC)
    Y: Any = state_field(doc=_Y_DOC)


# ----------------------------------------------------------------- helpers
def layer_statistics(net, params, batch):
    """One forward/backward pass (Algorithm 1) on ``batch``: per layer ``(a, g)`` with
    ``a`` ``(N, d_i)`` the inputs incl. the ones entry and ``g`` ``(N, d_o)`` the pre-activation
    gradients of the per-sample losses (thesis (2.1)–(2.2))."""
    A, G = net.factors(params, batch.x, batch.y, batch.loss)
    return [(a[..., 0], g[..., 0]) for a, g in zip(A, G)]


def authors_accepts(s, y, v):
    """The authors' curvature test (``kbfgs_utils.py::get_BFGS_formula`` and
    ``Kron_LBFGS_append_s_y``): use ``(s, y)`` iff ``sᵀy > 0`` and
    ``sᵀy > 10⁻⁴ · sᵀs · ‖v‖₂`` (``v = ḡ`` for ``H_g``, ``v = (ā_{1:d−1}, 1)`` for ``H_a``)."""
    sty = float(s @ y)
    return sty > 0 and sty > AUTHORS_SKIP * float(s @ s) * float(xp_of(v).linalg.norm(v))


# ----------------------------------------------------------------- the method
@dataclass(frozen=True)
class _KBFGSMLPBase(KBFGSCore):
    """Shared implementation of K-BFGS-20 / K-BFGS(L)-20 ([Ren-thesis] Algorithms 4 and 5).

    Hyper-parameters: ``damping`` λ ∈ (0, 1] (``λ_A = λ_G = √λ``; default 0.3, the best value
    in Table 2.5 for MNIST (both methods) and CURVES (K-BFGS(L))), ``momentum`` μ (decay of
    the gradient momentum, Alg. 4 line 8; 0.9), ``beta`` (moving averages of A and
    (s_g, y_g); 0.9), ``mu1`` (Powell damping on H in DD; 0.2), ``momentum_form`` ("ema" |
    "heavy_ball"; "ema" as §2.5.2 prints), ``algorithm`` ("alg4" | "alg5": DD-skip, exact
    ``H_a = (A^{LM})⁻¹`` and no gradient momentum), ``skip_factor`` c (alg5 skips a pair when
    ``ỹᵀHỹ/s̃ᵀỹ > c/μ₁``; c = 1 is Algorithm 5 line 17, c = 2 the "2/μ₁" of §2.3 — see
    errata), ``variant`` ("paper" | "authors": the authors' code, module docstring — with
    ``algorithm="alg4"`` only), ``l2`` τ ≥ 0 of the authors' momentum
    ``m ← μm + (1−μ)(∇f̄ + τW)`` (``None``: ``1e-5`` for "authors"; "paper" has none)."""

    damping: float = 0.3
    momentum: float = 0.9
    beta: float = 0.9
    mu1: float = 0.2
    momentum_form: str = "ema"
    algorithm: str = "alg4"
    skip_factor: float = 1.0
    variant: str = "paper"
    l2: float | None = None

    supports_conv = False
    exact_algorithms = ("alg5",)

    def __post_init__(self):
        check_unit(self.damping, "damping", closed_low=False, closed_high=True)
        check_unit(self.momentum, "momentum")
        check_unit(self.beta, "beta")
        check_unit(self.mu1, "mu1", closed_low=False)
        check_choice(self.momentum_form, "momentum_form", ("heavy_ball", "ema"))
        check_choice(self.algorithm, "algorithm", ("alg4", "alg5"))
        check_positive(self.skip_factor, "skip_factor")
        check_choice(self.variant, "variant", ("paper", "authors"))
        if self.variant == "authors" and self.algorithm != "alg4":
            raise HyperParameterError("variant='authors' is the authors' Algorithm 4; it needs algorithm='alg4'")
        if self.l2 is not None:
            check_nonnegative(self.l2, "l2")
            if self.variant == "paper" and self.l2 != 0:
                raise HyperParameterError("l2 is part of variant='authors' (the paper's algorithm has none)")

    @property
    def effective_l2(self):
        """Weight decay τ of the momentum gradient (0 for "paper")."""
        if self.variant == "paper":
            return 0.0
        return AUTHORS_WEIGHT_DECAY if self.l2 is None else float(self.l2)

    # -------------------------------------------------------------- hooks
    def _h0_scale(self, lambda_G):
        return 1.0  # Alg. 4 line 3: H_g = I; line 10: L-BFGS from H_0 = I

    def _damp(self, s, y, H, lambda_G):
        return double_damping(s, y, H, self.mu1, lambda_G)  # line 17, Algorithm 3 (μ₂ = √λ)

    def _accept(self, ratio, s_t, y_t, g_bar):
        if self.variant == "authors":  # departure 3: s̃ᵀỹ > 1e-4·s̃ᵀs̃·‖ḡ‖, ḡ of θ_k
            return authors_accepts(s_t, y_t, g_bar)
        if self.algorithm == "alg5":  # Algorithm 5 line 17: skip unless s̃ᵀỹ ≥ (μ₁/c) ỹᵀHỹ
            slack = 1 + math.sqrt(np.finfo(s_t.dtype).eps)
            return ratio <= self.skip_factor * slack / self.mu1
        return True

    def _accept_Ha(self, s, y, abar):
        # departure 4 (authors): s_aᵀy_a > 1e-4·s_aᵀs_a·‖v‖ with v the mean input with its last
        # entry set to 1 — refcurv's ā (the mean of the ones row is exactly 1; a bias-free layer
        # has no such entry and keeps its mean input)
        if self.variant == "authors":
            return authors_accepts(s, y, abar)
        return float(s @ y) > 0

    def _A_next(self, state, l, P):
        """Line 20: ``A ← βA + (1−β) mean_i a aᵀ`` (the authors keep ``A`` at ``k = 0``)."""
        if self.variant == "authors" and state.k == 0:  # departure 2
            return state.A[l]
        return self.beta * state.A[l] + (1 - self.beta) * factor_A(P)

    def _gradient(self, g, W):
        if self.variant == "authors":  # departure 1: gradient of f̄ + (τ/2)‖θ‖² (bias column included)
            return g + self.effective_l2 * W
        return g

    # ------------------------------------------------------------ dense form
    def _dense(self, state, net, params, batch, draws):
        """Algorithm 4 (``"alg4"``) / 5 (``"alg5"``), iteration ``k = state.k``, replayed
        literally with dense float64 matrices (``A``, ``H_a``, ``H_g``, ``H_g ⊗ H_a``), the
        authors' four departures where ``variant="authors"``, the second pass (lines 13-18)
        deferred to the next call (module docstring). Independent of :class:`KBFGSCore`'s
        update code; shares only the kernels listed in the class docstring."""
        xp, L, k, b, mu1 = xp_of(params[0]), len(params), state.k, self.beta, self.mu1
        authors, alg5 = self.variant == "authors", self.algorithm == "alg5"
        P, Dh = net.factors(params, batch.x, batch.y, batch.loss)  # line 6: a_i, g_i at θ_k on M_k
        A_batch = [A_definition(Pl) for Pl in P]                   # mean_i a_i a_iᵀ
        eye = [xp.eye(Ab.shape[0]) for Ab in A_batch]
        # lines 2-3 (before the first iteration, unless warm-started): λ_A = λ_G = √λ;
        # A = mean a aᵀ (here from M_0), H_a = (A + λ_A I)⁻¹; H_g = I, (s_g, y_g) = 0, m = 0
        lambda_A = state.lambda_A or [float(math.sqrt(self.damping))] * L
        lambda_G = state.lambda_G or [float(math.sqrt(self.damping))] * L
        A = list(state.A) if state.A is not None else A_batch
        H_a = state.H_a
        if H_a is None:
            H_a = [inverse_definition(A_batch[l] + lambda_A[l] * eye[l]) for l in range(L)]
        outs = [W.shape[0] for W in params]
        fresh = state.s_g is None
        s_g = [xp.zeros(o) for o in outs] if fresh else list(state.s_g)
        y_g = [xp.zeros(o) for o in outs] if fresh else list(state.y_g)
        if self.limited:  # K-BFGS(L): the last `memory` pairs, H_0 = I (line 10)
            S = [xp.zeros((0, o)) for o in outs] if fresh else list(state.S)
            Y = [xp.zeros((0, o)) for o in outs] if fresh else list(state.Y)
            H_g = [hg_matrix(None, S[l], Y[l], 1.0) for l in range(L)]
        else:
            H_g = [xp.eye(o) for o in outs] if fresh else list(state.H_g)
        diag = {key: list(v) for key, v in state.diagnostics.items()}
        last = list(state.last_pairs or [None] * L)

        # lines 13-18 of iteration k−1 (deferred): second pass on M_{k−1} at θ_k
        pend = state.pending
        if pend is not None:
            P2, Dh2 = net.factors(params, pend.batch.x, pend.batch.y, pend.batch.loss)
            for l in range(L):
                h_plus, g_plus = params[l] @ mean_patch(P2[l]), Dh2[l].mean(axis=(0, 2))  # h̄⁺ = W⁺ā⁺, ḡ⁺
                s_g[l] = b * s_g[l] + (1 - b) * (h_plus - pend.h_bar[l])                  # line 16, (2.5)
                y_g[l] = b * y_g[l] + (1 - b) * (g_plus - pend.g_bar[l])
                s_t, y_t, th1, th2 = double_damping(s_g[l], y_g[l], H_g[l], mu1, lambda_G[l])  # line 17
                sty = float(s_t @ y_t)
                if sty > 0:
                    ratio = float(y_t @ H_g[l] @ y_t) / sty
                    if authors:   # departure 3: s̃ᵀỹ > 10⁻⁴ s̃ᵀs̃ ‖ḡ‖ (ḡ of the first pass)
                        used = sty > AUTHORS_SKIP * float(s_t @ s_t) * float(xp.linalg.norm(pend.g_bar[l]))
                    elif alg5:    # Algorithm 5 line 17: use iff s̃ᵀỹ ≥ (μ₁/c) ỹᵀHỹ (√eps slack on ties)
                        used = ratio <= self.skip_factor * (1 + math.sqrt(np.finfo(s_t.dtype).eps)) / mu1
                    else:
                        used = True
                else:             # only s_g = y_g = 0: no information
                    ratio, used = float("inf"), False
                count_pair(diag, l, ratio, used, mu1, s_t.dtype)
                last[l] = PairRecord(k=k, s=s_g[l], y=y_g[l], s_t=s_t, y_t=y_t, theta1=th1, theta2=th2,
                                     ratio=ratio, used=used)
                if used and self.limited:   # line 18: newest pair into the memory, (2.12)
                    S[l] = xp.concatenate([S[l], s_t[None]])[-self.memory:]
                    Y[l] = xp.concatenate([Y[l], y_t[None]])[-self.memory:]
                    H_g[l] = hg_matrix(None, S[l], Y[l], 1.0)
                elif used:                  # line 18: BFGS (2.6)
                    H_g[l] = bfgs_update_H(H_g[l], s_t, y_t)

        # line 8: m ← μm + (1−μ)∇f̄ ("ema") or μm + ∇f̄ ("heavy_ball"); Algorithm 5: m = ∇f̄
        g = net.grad(params, batch.x, batch.y, batch.loss)
        if authors:  # departure 1: the gradient of f̄ + (τ/2)‖θ‖²
            g = [gl + self.effective_l2 * W for gl, W in zip(g, params)]
        if alg5:
            m = g
        else:
            prev = state.m if state.m is not None else [xp.zeros_like(gl) for gl in g]
            if self.momentum_form == "heavy_ball":  # m ← μm + g (Ch.3's form)
                m = [self.momentum * ml + gl for ml, gl in zip(prev, g)]
            else:                                   # m ← μm + (1−μ)g (Ch.2's form, §2.5.2)
                m = [self.momentum * ml + (1 - self.momentum) * gl for ml, gl in zip(prev, g)]
        # line 9: p = −(H_g ⊗ H_a) vec(m) (row-major vec; (2.4))
        direction = [-(xp.kron(H_g[l], H_a[l]) @ m[l].ravel()).reshape(m[l].shape) for l in range(L)]

        # lines 20-23 (every iteration): A, then H_a
        H_a_new = []
        for l in range(L):
            if not (authors and k == 0):   # line 20 (departure 2: the authors keep A at k = 0)
                A[l] = b * A[l] + (1 - b) * A_batch[l]
            M = A[l] + lambda_A[l] * eye[l]  # line 21: A^{LM}
            if alg5:                          # Algorithm 5 line 23: H_a = (A^{LM})⁻¹
                H_a_new.append(inverse_definition(M))
                continue
            abar = mean_patch(P[l])
            s_a = H_a[l] @ abar               # line 22: s_a = H_a ā, y_a = A^{LM} s_a
            y_a = M @ s_a
            sty = float(s_a @ y_a)
            ok = sty > 0
            if authors:   # departure 4: s_aᵀy_a > 10⁻⁴ s_aᵀs_a ‖ā‖ (ā = (mean input, 1))
                ok = ok and sty > AUTHORS_SKIP * float(s_a @ s_a) * float(xp.linalg.norm(abar))
            if ok:
                H_a_new.append(bfgs_update_H(H_a[l], s_a, y_a))   # line 23, (2.6)
            else:
                H_a_new.append(H_a[l])
                diag["ha_skipped"][l] += 1
        pending = PendingPass(batch=batch.own_copy(), h_bar=[W @ mean_patch(Pl) for W, Pl in zip(params, P)],
                              g_bar=[Dl.mean(axis=(0, 2)) for Dl in Dh])   # h̄ = W ā, ḡ: line 6's pass
        hg = {"S": S, "Y": Y} if self.limited else {"H_g": H_g}
        new = state.replace(k=k + 1, m=m, A=A, H_a=H_a_new, H_a_used=H_a, s_g=s_g, y_g=y_g, lambda_A=lambda_A,
                            lambda_G=lambda_G, pending=pending, last_pairs=last, diagnostics=diag, **hg)
        return direction, new


@register
@dataclass(frozen=True)
class KBFGSMLP(_KBFGSMLPBase):
    """K-BFGS-20: ``H_g`` by damped BFGS ([Ren-thesis] Algorithm 4, or 5 with ``algorithm="alg5"``).
    Curvature ``C = ⊕_l (H_g ⊗ H_a)⁻¹`` (2.4), ``rhs = m``.

    Fast form: :class:`~refcurv.methods.kbfgs.KBFGSCore`; dense form:
    :meth:`_KBFGSMLPBase._dense` (literal Algorithm 4/5). Shared by both forms: ``net.factors``,
    ``linalg.kronecker.mean_patch``, ``linalg.damping.double_damping``,
    ``linalg.quasi_newton.bfgs_update_H``, ``AUTHORS_SKIP`` (module docstring)."""

    name = "kbfgs-mlp"
    seed_ref = "[Ren-thesis] Ch.2 Alg. 3, 4, 5; (2.4)-(2.6); Thm 1"
    summary = "K-BFGS-20 (MLP): H_g by double-damped BFGS, H_a by Hessian-action BFGS, direction −H_g m H_a"
    State = KBFGSMLPState


@register
@dataclass(frozen=True)
class KBFGSLMLP(_KBFGSMLPBase):
    """K-BFGS(L)-20: ``H_g`` by damped L-BFGS with ``memory`` pairs, compact form, ``H_0 = I``
    ([Ren-thesis] Algorithm 4, or 5 with ``algorithm="alg5"``; ``p = 100`` in §2.8.2). Curvature
    as :class:`KBFGSMLP` with ``H_g`` the dense L-BFGS matrix (2.12).

    Fast form: compact L-BFGS (:class:`~refcurv.methods.kbfgs.KBFGSCore`); dense form:
    :meth:`_KBFGSMLPBase._dense` with ``H_g`` the dense L-BFGS matrix of the stored pairs.
    Shared by both forms: as :class:`KBFGSMLP`."""

    memory: int = 100

    name = "kbfgs-l-mlp"
    seed_ref = "[Ren-thesis] Ch.2 Alg. 3, 4, 5; (2.4)-(2.6), (2.12); Thm 1"
    summary = "K-BFGS(L)-20 (MLP): H_g by double-damped L-BFGS (compact form), H_a by Hessian-action BFGS"
    limited = True
    State = KBFGSLMLPState

    def __post_init__(self):
        super().__post_init__()
        check_int(self.memory, "memory")
