"""Subsampled Gauss-Newton / natural gradient with Levenberg-Marquardt damping, inverted by
Sherman-Morrison-Woodbury: SMW-GN, SMW-NG, SMW-NG-BD ([Ren-thesis], Chapter 5).

Notation (thesis §5.2-§5.5; refcurv conventions of the README). A step sees the batch
``S₁`` (``N₁`` samples) and draws ``S₂ ⊆ S₁`` (``N₂`` samples; Algorithm 23 line 3):

* ``g = (1/N₁) Σ_{i∈S₁} ∇ψ_i`` (Algorithm 23 line 4);
* ``B`` = curvature on ``S₂``: GN (5.2) ``B = (1/N₂) Σ_{i∈S₂} J_iᵀ H_i J_i`` (``J_i`` the output
  Jacobian, ``H_i`` the output Hessian of the loss w.r.t. the network output ``f`` = logits);
  NG (5.3) ``B = (1/N₂) Σ_{i∈S₂} ∇ψ_i ∇ψ_iᵀ`` (the *empirical* Fisher: (5.3) uses
  ``∇f_i`` of (5.1), i.e. the data labels); NG-BD: the per-layer diagonal blocks of NG's ``B``;
* ``G = B + λI`` (5.4), ``λ = λ_LM + τ``, and the direction ``p = −G⁻¹ g``; the step is
  ``θ ← θ + α p`` (Algorithm 23 line 7; ``α`` is ``train``'s ``lr``).

Fast forms (the thesis's algorithm). ``G = λI + (1/N₂) Jᵀ H J`` (§5.3.1) is inverted by SMW:

* (5.6) ``G⁻¹ = λ⁻¹ (I − (1/N₂) Jᵀ D⁻¹ J)``, ``D = λ H⁻¹ + (1/N₂) J Jᵀ`` (SPD ``H``: Cholesky);
* (5.7) ``G⁻¹ = λ⁻¹ (I − (1/N₂) Jᵀ H D⁻¹ J)``, ``D = λ I + (1/N₂) J Jᵀ H`` (any ``H`` with
  ``D`` invertible, e.g. the singular softmax ``H``; LU).

For GN, ``J`` stacks the ``J_i`` **sample-major** (row ``(i, c)``), ``H = diag(H_1, …, H_{N₂})``
in the same order, and ``J Jᵀ`` is the ``N₂C × N₂C`` Gram matrix of Algorithm 22
(``Sequential.jacobian_gram``, extended to conv layers). For NG, ``J`` has the rows
``∇ψ_iᵀ`` and ``H = I``: ``D`` is ``N₂ × N₂`` with entries ``λδ_ij + (1/N₂) ∇ψ_iᵀ∇ψ_j``, and
``∇ψ_iᵀ∇ψ_j = Σ_l Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'})(g_{i,t}ᵀ g_{j,t'})`` (§5.3.3; the Kronecker
structure ``(g_iᵀg_j)(v_iᵀv_j)`` with the bias as the ones row, summed over conv locations),
computed from ``Sequential.factors`` without forming a per-sample gradient
(:func:`refcurv.curvature.ef_gram`). ``J g``,
``Jᵀ w`` and ``pᵀBp`` are forward/backward passes (Algorithms 19-21), also without per-sample
gradients. NG-BD applies the NG formulas to each layer's block (§5.8).

Dense forms (the definition): ``g`` from :func:`refcurv.curvature.grad` and ``B`` from
:mod:`refcurv.curvature` in float64 (``ggn``, ``empirical_fisher``), ``(B + λI) p = −g`` solved
by Cholesky (:meth:`refcurv.operators.Dense.solve`) — the operator ``C = B + λI`` that
:meth:`LMMethod.curvature` returns. The fast forms' kernels (:func:`refcurv.curvature.ef_gram`,
``ef_products``, ``ef_transpose``, ``grad_from_factors``, :class:`refcurv.curvature.OutputJacobian`,
``Sequential.jacobian_gram``) are public and tested against the dense definitions on their own
(tests/test_curvature_grams.py); the two forms share only the draws, the reduction ratio
:func:`reduction_ratio` (5.5) and the LM rule :func:`lm_update`.

Accuracy of the fast form against the dense one (float64): with ``m`` the size of ``D``,
``κ̂ = 1 + ‖J‖₂² ‖H‖₂ / (N₂λ)`` (``≥ ‖G‖/λ ≥ κ(G)``; ``= ‖G‖/λ`` for NG), ``ρ_g`` the LU growth
factor of (5.7) (1 for the Cholesky of (5.6)) and ``γ = mean_i‖∇ψ_i‖ / ‖g‖`` (cancellation in
the mean gradient), the relative difference is at most
``C (m + n) eps (ρ_g κ̂^{3/2} + γ κ̂)``. The ``3/2`` power is the price of forming ``p`` as
``(g − correction)/λ``: a backward error ``E`` of the ``D`` solve moves ``p`` by
``G⁻¹ sJᵀH E z / λ`` with ``z = ∓HJp`` (``D⁻¹J = HJG⁻¹`` for (5.6), ``JG⁻¹`` for (5.7)) and
``‖G⁻¹√s JᵀH^{1/2}‖ ≤ 1/(2√λ)``. Derivation in full: ``tests/test_method_smw.py``.

LM rule (§5.2.3, defaults of §5.8): with the quadratic model
``m(p) = Ψ(θ) + gᵀp + ½ pᵀBp`` (undamped ``B``, as in Lemma 11),
``ρ = (Ψ_{S₁}(θ) − Ψ_{S₁}(θ + p)) / (m(0) − m(p))`` (5.5), evaluated on ``S₁`` (Algorithm 23
line 6) at the full step ``p`` (:func:`reduction_ratio`); then :func:`lm_update`, and
``λ_{t+1} = λ_LM^{(t+1)} + τ``. Optionally (``accept_threshold = η``, Theorem 6) a step with
``ρ < η`` is rejected (zero direction); Theorem 6 needs ``0 < η < ε``, ``N₁ = N`` and ``α = 1``.

Hyper-parameter names (refcurv vocabulary → thesis §5.2.3 / §5.8): ``damping`` = initial
``λ_LM`` (1), ``damping_floor`` = ``τ`` (0.001), ``lm_threshold`` = ``ε`` (¼), ``boost`` (1.01),
``drop`` (0.99), ``n2`` = ``N₂``, ``accept_threshold`` = ``η`` (Theorem 6).

State (:class:`LMState`, one subclass per method): ``k``, ``damping`` (``λ`` of the next step),
``damping_used`` (``λ`` of the last step), ``damping_lm`` (``λ_LM``), ``diagnostics``
(``damping``, ``rho``, ``accepted``; SMW-GN ``smw_form``; Hessian-free ``cg_iters``,
``cg_residual``, ``cg_converged``).

Draws (:class:`refcurv.methods.Draws`): ``sketches["subset"]`` — the indices of ``S₂`` into the
batch (``N₂`` distinct ints; ``arange(N₁)`` when ``n2`` is None); for SMW-NG / SMW-NG-BD with
``fisher="mc"`` also ``labels`` ``(n_samples, N₂, …)``, drawn from the model at ``S₂`` and
consumed exactly (the Fisher is the empirical one of the sampled labels).

Where the authors' code differs (design §8): it samples labels for the Fisher — offered as
``fisher="mc"`` (``n_samples`` labels per sample of ``S₂`` drawn from the model in
:meth:`draw`); it uses
``drop = 1/1.01`` (pass ``drop=1/1.01``) and ``ρ`` with the denominator ``−½ gᵀp`` (not
offered: for the exact ``p``, ``−½gᵀp = ½pᵀBp + ½λ‖p‖²`` while (5.5)'s is
``½pᵀBp + λ‖p‖²``). Its Gram matrix is reported to be built class-major while ``H`` is
sample-major; Algorithm 22 (``V ⊗ 1_{m×m}``, ``Ĥ₂ = (Ĥ_{i,2})_{i∈S}``) and (5.7) are both
sample-major, as here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import asarray_like, to_numpy, xp_of
from ..curvature import OutputJacobian, ef_gram, ef_products, ef_transpose, grad_from_factors
from ..errors import ArgumentTypeError, DrawsError, HyperParameterError, NonFiniteError, StateError
from ..linalg.woodbury import spd_solve
from ..operators import BlockDiagonal, Dense
from ..vec import layer_slices, unflatten
from .base import Draws, Method, State, _is_real, check_choice, check_int, check_positive, state_field
from .registry import register

#: losses whose output Hessian is SPD (diagonal with positive entries): (5.6) applies
SPD_OUTPUT_HESSIAN = ("mse", "bce")

#: the Fisher kinds SMW-NG / SMW-NG-BD offer (refcurv.methods.vocabulary.FISHER_KINDS words):
#: (5.3) is the empirical Fisher; "mc" the authors' sampled labels. "exact" (the closed-form
#: expectation) equals the GGN for these losses: that is SMW-GN.
NG_FISHER_KINDS = ("empirical", "mc")


# ------------------------------------------------------------------ LM rule
def lm_update(damping_lm, rho, boost=1.01, drop=0.99, lm_threshold=0.25):
    """One step of the LM rule of thesis §5.2.3 (defaults of §5.8), a pure function
    (``ε`` = ``lm_threshold``):

    * ``ρ < ε``       → ``λ_LM ← boost · λ_LM``;
    * ``ρ > 1 − ε``   → ``λ_LM ← drop · λ_LM``;
    * otherwise (``ε ≤ ρ ≤ 1 − ε``, and ``ρ`` = NaN, i.e. no step was taken) → unchanged.

    The damping used is ``λ = λ_LM + τ`` (the caller adds ``τ`` = ``damping_floor``).
    """
    rho = float(rho)
    if rho < lm_threshold:
        return boost * damping_lm
    if rho > 1.0 - lm_threshold:
        return drop * damping_lm
    return damping_lm


def reduction_ratio(f0, f1, gTp, pBp):
    """ρ of thesis (5.5): ``(Ψ(θ) − Ψ(θ + p)) / (m(0) − m(p))`` with the undamped model
    ``m(p) = Ψ(θ) + gᵀp + ½ pᵀBp`` (Lemma 11), so ``m(0) − m(p) = −gᵀp − ½ pᵀBp``.

    ``f1`` not finite (a step to a non-finite loss): ``−∞`` (the LM rule boosts). A model
    reduction ``≤ 0`` (for ``p = −(B + λI)⁻¹g`` it is ``½pᵀBp + λ‖p‖²``, zero only for ``g = 0``):
    NaN (no information, the LM rule keeps λ)."""
    pred = -float(gTp) - 0.5 * float(pBp)
    if not math.isfinite(f1):
        return -math.inf
    if pred > 0:
        return (float(f0) - float(f1)) / pred
    return float("nan")


def _inner(a, b):
    """``Σ_l <a_l, b_l>`` over per-layer arrays, as a Python float."""
    return float(sum(float((x * y).sum()) for x, y in zip(a, b)))


# ------------------------------------------------------------------ state
@dataclass(frozen=True, kw_only=True)
class LMState(State):
    """State of the LM-damped methods of thesis Ch.5 (one subclass per method, so that a
    state is refused by a method that did not make it)."""

    damping: float = state_field("damping", default=None)
    damping_used: float | None = state_field("damping_used", default=None)
    damping_lm: float = state_field(
        doc="λ_LM of thesis §5.2.3 after the last step's LM update; damping = damping_lm + damping_floor (τ)",
        default=None)


@dataclass(frozen=True, kw_only=True)
class SMWGNState(LMState):
    """State of :class:`SMWGN` (the fields of :class:`LMState`)."""


@dataclass(frozen=True, kw_only=True)
class SMWNGState(LMState):
    """State of :class:`SMWNG` (the fields of :class:`LMState`)."""


@dataclass(frozen=True, kw_only=True)
class SMWNGBDState(LMState):
    """State of :class:`SMWNGBD` (the fields of :class:`LMState`)."""


# ------------------------------------------------------------------ base class
@dataclass(frozen=True)
class LMMethod(Method):
    """Hyper-parameters, draws, LM rule and curvature operator shared by the LM-damped methods
    of thesis Ch.5 (SMW-GN, SMW-NG, SMW-NG-BD, Hessian-free).

    ``damping``: initial ``λ_LM`` (§5.8: 1); ``boost`` > 1, ``drop`` ∈ (0, 1),
    ``lm_threshold`` = ``ε`` ∈ (0, ½) (§5.2.3; §5.8: 1.01, 0.99, ¼); ``damping_floor`` = ``τ``
    > 0 (§5.8: 0.001); ``n2``: ``N₂ = |S₂|`` (``None``: ``S₂ = S₁``); ``accept_threshold``: ``η``
    of Theorem 6 (``None``: every step taken, as in Algorithm 23).

    rhs and curvature: ``direction = −C⁻¹ g`` with ``g`` the mini-batch gradient on ``S₁``
    (:meth:`rhs` is the default) and ``C = B + λI`` (5.4), ``B`` the method's curvature on
    ``S₂`` (from the step's ``draws``) at the step's ``params``, ``λ = state.damping_used``.
    :meth:`curvature` builds it densely from :mod:`refcurv.curvature` (float64), so it needs
    ``net, params, batch, draws`` of the step. (A step rejected by ``accept_threshold``
    returns 0; ``C`` is then the curvature of the rejected proposal.)
    """

    damping: float = 1.0
    boost: float = 1.01
    drop: float = 0.99
    lm_threshold: float = 0.25
    damping_floor: float = 1e-3
    n2: int | None = None
    accept_threshold: float | None = None

    State = LMState
    draw_fields = ("sketches",)

    def __post_init__(self):  # host: scalar hyper-parameter checks
        check_positive(self.damping, "damping")
        check_positive(self.boost, "boost")
        if not self.boost > 1:
            raise HyperParameterError(f"boost must be > 1 (thesis §5.2.3: drop < 1 < boost), got {self.boost!r}")
        check_positive(self.drop, "drop")
        if not self.drop < 1:
            raise HyperParameterError(f"drop must lie in (0, 1) (thesis §5.2.3: drop < 1 < boost), got {self.drop!r}")
        eps = self.lm_threshold
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not np.isfinite(eps) \
                or not 0 < eps < 0.5:
            raise HyperParameterError(f"lm_threshold (ε) must lie in (0, 1/2) (thesis §5.2.3), got {eps!r}")
        check_positive(self.damping_floor, "damping_floor")
        if self.n2 is not None:
            check_int(self.n2, "n2")
        if self.accept_threshold is not None:
            eta = self.accept_threshold
            if not _is_real(eta) or not np.isfinite(eta) or not 0 < eta < eps:
                raise HyperParameterError(
                    f"accept_threshold must lie in (0, lm_threshold) = (0, {eps}) (Theorem 6), got {eta!r}"
                )

    # -------------------------------------------------------------- LM
    def lm(self, damping_lm, rho):  # host: scalar arithmetic
        """:func:`lm_update` with this method's ``boost``, ``drop``, ``lm_threshold``."""
        lam = lm_update(damping_lm, rho, self.boost, self.drop, self.lm_threshold)
        if not np.isfinite(lam):
            raise NonFiniteError(f"{self.name}: the LM damping λ_LM overflowed ({damping_lm!r} · boost = {lam!r})")
        return lam

    def init(self, net, params):
        lam_lm = float(self.damping)
        return self.State(damping_lm=lam_lm, damping=lam_lm + self.damping_floor)

    # -------------------------------------------------------------- draws
    def draw(self, rng, state, net, params, batch):  # host: draws are made on the host (design §6)
        """``S₂ ⊆ S₁`` (Algorithm 23 line 3): ``N₂`` distinct indices into the batch, sorted,
        as ``sketches["subset"]``."""
        N1 = int(np.shape(batch.x)[0])
        if self.n2 is None or self.n2 == N1:
            subset = np.arange(N1)
        elif self.n2 > N1:
            raise HyperParameterError(f"n2 = {self.n2} exceeds the batch size N1 = {N1} (S2 must be a subset of S1)")
        else:
            subset = np.sort(rng.choice(N1, size=self.n2, replace=False))
        return Draws(method=self.name, sketches={"subset": subset})

    def check_draws(self, draws, state, net, params, batch):  # host: draws are host arrays
        """The base checks, then: ``sketches["subset"]`` is ``N₂`` distinct integer indices into
        the batch; ``labels`` only where consumed (see :class:`_FisherLM`)."""
        super().check_draws(draws, state, net, params, batch)
        N1 = int(np.shape(batch.x)[0])
        if "subset" not in draws.sketches:
            raise DrawsError(f"{self.name}: draws.sketches['subset'] (the indices of S2) is missing")
        s = np.asarray(to_numpy(draws.sketches["subset"]))
        want = N1 if self.n2 is None else self.n2
        if s.ndim != 1 or s.dtype.kind not in "iu" or s.shape[0] != want:
            raise DrawsError(f"{self.name}: draws.sketches['subset'] must be {want} integer indices (N2), "
                             f"got shape {s.shape}, dtype {s.dtype}")
        if s.size and (s.min() < 0 or s.max() >= N1 or np.unique(s).size != s.size):
            raise DrawsError(f"{self.name}: draws.sketches['subset'] must be distinct indices in [0, {N1}) (S2 ⊆ S1)")
        self._check_labels(draws, batch, s.size)
        return draws

    def _check_labels(self, draws, batch, N2):
        if draws.labels is not None:
            raise DrawsError(f"{self.name}: draws.labels given, but {self.name} consumes no sampled labels")

    def _curvature_batch(self, batch, draws):
        """``(x₂, y₂)``: the inputs and targets the curvature ``B`` is built from — ``S₂`` with its
        data labels (sampled labels for ``fisher="mc"``, see :class:`_FisherLM`). Shared by both
        forms and :meth:`curvature`."""
        idx = draws.sketches["subset"]
        return batch.x[idx], batch.y[idx]

    # -------------------------------------------------------------- curvature
    def _dense_B(self, net, params, x2, y2, loss):
        """``B`` in float64 from :mod:`refcurv.curvature` (the definition): a matrix, or a list
        of per-layer blocks (SMW-NG-BD)."""
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _operator(B, lam):
        """``C = B + λI`` as a :class:`~refcurv.operators.Dense` (or :class:`BlockDiagonal` of
        per-layer :class:`Dense` blocks), symmetrized."""
        def block(M):
            M = M + lam * xp_of(M).eye(M.shape[0])
            return Dense((M + M.T) / 2, name="B + λI")
        return BlockDiagonal([block(Bl) for Bl in B]) if isinstance(B, list) else block(B)

    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``C = B + λI`` of the step that returned ``state`` (``λ = state.damping_used``),
        built densely in float64 from :mod:`refcurv.curvature` on ``S₂`` of ``draws``, at the
        step's ``params``: ``direction = −C⁻¹ g`` (the dense form's direction)."""
        self.check_state(state)
        for arg, v in (("net", net), ("params", params), ("batch", batch), ("draws", draws)):
            if v is None:
                raise ArgumentTypeError(
                    f"{self.name}.curvature needs {arg}: C = B + λI is built from the step's mini-batch "
                    "(pass net, params, batch and draws of the step)")
        if state.damping_used is None:
            raise StateError(f"{self.name}: state.damping_used is None (no step taken yet); pass the state "
                             "returned by the step whose curvature you want")
        self.check_draws(draws, state, net, params, batch)
        x2, y2 = self._curvature_batch(batch, draws)
        B = self._dense_B(net, params, x2, y2, batch.loss)
        return self._operator(B, float(state.damping_used))

    # -------------------------------------------------------------- step
    def _fast(self, state, net, params, batch, draws):
        """Return the fast form's ``(direction, state)``; subclasses implement :meth:`_fast_solve`."""
        p, g, pBp, diag = self._fast_solve(float(state.damping), net, params, batch, draws)
        return self._finish(state, net, params, batch, p, g, pBp, diag)

    def _dense(self, state, net, params, batch, draws):
        """The definition: ``g`` = :func:`refcurv.curvature.grad`, ``B`` = :meth:`_dense_B`,
        ``p = −(B + λI)⁻¹ g`` by Cholesky (:meth:`curvature`'s operator)."""
        lam = float(state.damping)
        gf = cv.grad(net, params, batch.x, batch.y, batch.loss)
        x2, y2 = self._curvature_batch(batch, draws)
        B = self._dense_B(net, params, x2, y2, batch.loss)
        pf = -self._operator(B, lam).solve(gf)
        if isinstance(B, list):  # block-diagonal: pᵀBp summed over the blocks
            pBp = sum(float(pf[sl] @ Bl @ pf[sl]) for sl, Bl in zip(layer_slices(net), B))
        else:
            pBp = float(pf @ B @ pf)
        diag = self._dense_diagnostics(B, lam, pf, gf)
        return self._finish(state, net, params, batch, unflatten(pf, net), unflatten(gf, net), pBp, diag)

    def _dense_diagnostics(self, B, lam, pf, gf):
        return {}

    def _fast_solve(self, lam, net, params, batch, draws):
        """Return ``(p, g, pBp, diagnostics)``: direction ``p = −(B + λI)⁻¹ g`` (per layer), the
        gradient ``g`` on ``S₁``, ``pᵀBp`` with the undamped ``B`` on ``S₂``, extra diagnostics."""
        raise NotImplementedError  # pragma: no cover

    def _finish(self, state, net, params, batch, p, g, pBp, diag):
        """The LM part of Algorithm 23 (shared by both forms): ρ (5.5) on ``S₁`` at the full step
        (:func:`reduction_ratio`), the rule (:func:`lm_update`), optional rejection (Theorem 6)."""
        lam = float(state.damping)
        f0 = float(net.loss(params, batch.x, batch.y, batch.loss))
        trial = [W + P for W, P in zip(params, p)]
        finite = all(bool(xp_of(P).isfinite(P).all()) for P in trial)
        f1 = float(net.loss(trial, batch.x, batch.y, batch.loss)) if finite else float("inf")
        rho = reduction_ratio(f0, f1, _inner(g, p), pBp)
        lam_lm = self.lm(float(state.damping_lm), rho)
        accepted = self.accept_threshold is None or rho >= self.accept_threshold
        direction = p if accepted else [xp_of(P).zeros_like(P) for P in p]
        diagnostics = {"damping": lam, "rho": rho, "accepted": bool(accepted), **diag}
        new_state = state.replace(k=state.k + 1, damping_lm=lam_lm, damping=lam_lm + self.damping_floor,
                                  damping_used=lam, diagnostics=diagnostics)
        return direction, new_state


# ------------------------------------------------------------------ SMW-GN
@register
@dataclass(frozen=True)
class SMWGN(LMMethod):
    """SMW-GN (thesis Ch.5): ``p = −(B + λI)⁻¹ g`` with the subsampled GGN (5.2), inverted by
    (5.6) or (5.7) with ``J Jᵀ`` from Algorithm 22.

    ``form``: ``"symmetric"`` = (5.6) (needs SPD output Hessians: MSE, BCE), ``"general"`` =
    (5.7), ``"auto"`` = (5.6) when the loss's output Hessians are SPD (MSE; BCE with every
    ``σ'(f) > 0`` numerically), else (5.7) (softmax CE, whose ``H_i`` is singular).

    rhs: the mini-batch gradient ``g`` on ``S₁``. Curvature: ``C = B + λI`` (5.4) with ``B`` the
    GGN (5.2) on ``S₂`` (:func:`refcurv.curvature.ggn`), ``λ = state.damping_used``.

    State: :class:`SMWGNState`; diagnostics ``damping``, ``rho``, ``accepted``, ``smw_form``
    (the SMW form the fast step used, ``"dense"`` for the dense form).

    Shared by both forms: the draws (``S₂``), :func:`reduction_ratio` (5.5) and
    :func:`lm_update` (§5.2.3). The fast form's kernels (``Sequential.jacobian_gram``,
    :class:`~refcurv.curvature.OutputJacobian`, :func:`~refcurv.curvature.grad_from_factors`)
    are not used by the dense form.
    """

    name = "smw_gn"
    seed_ref = "[Ren-thesis] Ch.5 (5.2), (5.4)-(5.7), Alg. 17-23"
    summary = "subsampled Gauss-Newton + LM damping, SMW inverse (5.6)/(5.7)"
    State = SMWGNState

    form: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.form, "form", ("auto", "symmetric", "general"))

    def _resolve_form(self, loss, H):
        xp = xp_of(H)
        spd = getattr(loss, "name", None) in SPD_OUTPUT_HESSIAN
        if spd:
            d = xp.diagonal(H, axis1=-2, axis2=-1)
            spd = bool((d > 0).all()) and bool(xp.isfinite(1.0 / d).all())
        if self.form == "symmetric":
            if not spd:
                raise HyperParameterError(
                    f"form='symmetric' ((5.6)) needs SPD output Hessians; {getattr(loss, 'name', loss)!r} "
                    "gives singular ones: use form='general' ((5.7)) or 'auto'"
                )
            return "symmetric"
        if self.form == "general":
            return "general"
        return "symmetric" if spd else "general"

    def capacitance(self, net, params, x2, y2, loss, damping):
        """``D_t`` of (5.6) or (5.7) on the batch ``x2`` (``S₂``) with ``λ`` = ``damping``,
        ``(N₂C, N₂C)`` sample-major (row ``(i, c)``), built from the Gram blocks of
        Algorithm 22. Returns ``(D, form)``."""
        lam = damping
        K = net.jacobian_gram(params, x2)  # (N, C, N, C)
        xp = xp_of(K)
        N, C = K.shape[:2]
        op = OutputJacobian(net, params, x2)
        H = op.output_loss(loss).hessian(op.f)  # (N, C, C), C = T·C for a sequence output
        form = self._resolve_form(loss, H)
        I_N = xp.eye(N, dtype=K.dtype)
        if form == "symmetric":
            Hinv = xp.linalg.solve(H, xp.broadcast_to(xp.eye(C, dtype=K.dtype), H.shape))
            D = lam * xp.einsum("ij,icd->icjd", I_N, Hinv) + K / N
            D = D.reshape(N * C, N * C)
            return (D + D.T) / 2, form
        KH = xp.einsum("icjf,jfe->icje", K, H)
        D = lam * xp.eye(N * C, dtype=K.dtype) + KH.reshape(N * C, N * C) / N
        return D, form

    def _dense_B(self, net, params, x2, y2, loss):
        return cv.ggn(net, params, x2, y2, loss)

    def _dense_diagnostics(self, B, lam, pf, gf):
        return {"smw_form": "dense"}

    def _fast_solve(self, lam, net, params, batch, draws):
        x2, y2 = self._curvature_batch(batch, draws)
        loss = batch.loss
        A, G = net.factors(params, batch.x, batch.y, loss)
        g = grad_from_factors(A, G)
        D, form = self.capacitance(net, params, x2, y2, loss, lam)
        op = OutputJacobian(net, params, x2)
        loss = op.output_loss(loss)
        xp = xp_of(D)
        N, C = op.f.shape
        H = loss.hessian(op.f)
        Jg = op.jvp(g).reshape(N * C)
        if form == "symmetric":  # (5.6): w = D⁻¹ J g
            w = spd_solve(D, Jg, name="D").reshape(N, C)
        else:  # (5.7): w = H D⁻¹ J g
            w = xp.einsum("icd,id->ic", H, xp.linalg.solve(D, Jg).reshape(N, C))
        corr = op.vjp(w)
        p = [-(gl - cl / N) / lam for gl, cl in zip(g, corr)]
        Jp = op.jvp(p)
        pBp = float((Jp * loss.hvp(op.f, Jp)).sum()) / N
        return p, g, pBp, {"smw_form": form}


# ------------------------------------------------------------------ SMW-NG
def _ef_capacitance(K, damping):
    """``D = λI + K/N₂`` (5.6) with ``H = I`` from the Gram ``K = (∇ψ_iᵀ∇ψ_j)``, symmetrized."""
    N = K.shape[0]
    D = damping * xp_of(K).eye(N, dtype=K.dtype) + K / N
    return (D + D.T) / 2


@dataclass(frozen=True)
class _FisherLM(LMMethod):
    """Shared by SMW-NG and SMW-NG-BD: the ``fisher`` option (``"empirical"``: (5.3), the data
    labels; ``"mc"``: ``n_samples`` labels per sample of ``S₂`` drawn from the model) and its
    label draws. With ``fisher="mc"``, ``B = (1/(S N₂)) Σ_{s,i} u_i(ŷ_is) u_i(ŷ_is)ᵀ``: the
    empirical Fisher of the ``S N₂`` (input, sampled label) pairs, computed from
    ``draws.labels`` (so labels drawn elsewhere are replayed exactly)."""

    fisher: str = "empirical"
    n_samples: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.fisher, "fisher", NG_FISHER_KINDS)
        check_int(self.n_samples, "n_samples")
        if self.fisher != "mc" and self.n_samples != 1:
            raise HyperParameterError(f"n_samples = {self.n_samples} is used by fisher='mc' only, "
                                      f"got fisher={self.fisher!r}")

    @property
    def draw_fields(self):
        return ("sketches", "labels") if self.fisher == "mc" else ("sketches",)

    def draw(self, rng, state, net, params, batch):
        """``S₂`` (:meth:`LMMethod.draw`), then for ``fisher="mc"`` the labels
        ``ŷ ~ p(·|f(x))`` at ``S₂``: ``labels`` ``(n_samples, N₂, …)``."""
        draws = super().draw(rng, state, net, params, batch)
        if self.fisher != "mc":
            return draws
        f2 = net.forward(params, batch.x[draws.sketches["subset"]])
        labels = to_numpy(batch.loss.sample(f2, n_samples=self.n_samples, seed=rng))
        return dataclasses.replace(draws, labels=labels)

    def _check_labels(self, draws, batch, N2):
        if self.fisher != "mc":
            super()._check_labels(draws, batch, N2)
            return
        want = (self.n_samples, N2) + tuple(np.shape(batch.y)[1:])
        got = np.shape(draws.labels)
        if got != want:
            raise DrawsError(f"{self.name}: draws.labels must have shape (n_samples, N2, …) = {want}, got {got}")

    def _curvature_batch(self, batch, draws):
        """``S₂`` with the data labels, or (``fisher="mc"``) the ``S N₂`` pairs
        ``(x_i, ŷ_is)`` ordered ``(s, i)``."""
        if self.fisher != "mc":
            return super()._curvature_batch(batch, draws)
        x2 = batch.x[draws.sketches["subset"]]
        labels = asarray_like(draws.labels, batch.x)
        S, N2 = labels.shape[:2]
        x2 = xp_of(x2).concatenate([x2] * S) if S > 1 else x2
        return x2, labels.reshape((S * N2,) + tuple(labels.shape[2:]))


@register
@dataclass(frozen=True)
class SMWNG(_FisherLM):
    """SMW-NG (thesis Ch.5): ``p = −(F + λI)⁻¹ g`` with the subsampled Fisher (5.3), inverted
    by (5.6) with ``H = I``: ``D = λI + (1/N₂) J Jᵀ`` (``N₂ × N₂``, Cholesky), ``J Jᵀ`` from the
    Kronecker structure of §5.3.3 (:func:`refcurv.curvature.ef_gram`).

    ``fisher``: ``"empirical"`` (thesis (5.3): gradients with the data labels) or ``"mc"``
    (``n_samples`` labels per sample of ``S₂`` drawn from the model's predictive distribution
    in :meth:`draw`: the authors' code, design §8; ``D`` is then ``S N₂ × S N₂``).

    rhs: the mini-batch gradient ``g`` on ``S₁``. Curvature: ``C = F + λI`` (5.4) with ``F`` the
    empirical Fisher (5.3) of ``S₂``'s (input, label) pairs
    (:func:`refcurv.curvature.empirical_fisher`), ``λ = state.damping_used``.

    State: :class:`SMWNGState`; diagnostics ``damping``, ``rho``, ``accepted``.

    Shared by both forms: the draws (``S₂``, labels), :func:`reduction_ratio` (5.5) and
    :func:`lm_update` (§5.2.3). The fast form's kernels (:func:`~refcurv.curvature.ef_gram`,
    ``ef_products``, ``ef_transpose``, ``grad_from_factors``) are not used by the dense form.
    """

    name = "smw_ng"
    seed_ref = "[Ren-thesis] Ch.5 (5.3)-(5.6), §5.3.3, Alg. 23"
    summary = "subsampled (empirical) Fisher natural gradient + LM damping, SMW inverse (5.6)"
    State = SMWNGState

    def capacitance(self, net, params, x2, y2, loss, damping):
        """``D_t = λI + (1/N₂) (∇ψ_iᵀ∇ψ_j)_{i,j}`` (5.6) with ``H = I``: ``(N₂, N₂)``."""
        return self._capacitance(*net.factors(params, x2, y2, loss), damping)

    @staticmethod
    def _capacitance(A, G, damping):
        return _ef_capacitance(ef_gram(A, G), damping)

    def _dense_B(self, net, params, x2, y2, loss):
        return cv.empirical_fisher(net, params, x2, y2, loss)

    def _fast_solve(self, lam, net, params, batch, draws):
        x2, y2 = self._curvature_batch(batch, draws)
        loss = batch.loss
        A1, G1 = net.factors(params, batch.x, batch.y, loss)
        g = grad_from_factors(A1, G1)
        A, G = net.factors(params, x2, y2, loss)
        N = A[0].shape[0]
        D = self._capacitance(A, G, lam)  # reuses S₂'s factors
        Jg = sum(ef_products(A, G, g))
        z = spd_solve(D, Jg, name="D")
        corr = ef_transpose(A, G, z)
        p = [-(gl - cl / N) / lam for gl, cl in zip(g, corr)]
        Jp = sum(ef_products(A, G, p))
        return p, g, float((Jp * Jp).sum()) / N, {}


# ------------------------------------------------------------------ SMW-NG-BD
@register
@dataclass(frozen=True)
class SMWNGBD(_FisherLM):
    """SMW-NG-BD (thesis §5.8): SMW-NG with the Fisher replaced by its block-diagonal part,
    one block per layer (weights and bias together, as KFAC), each block
    ``F_l + λI = λI + (1/N₂) J_lᵀ J_l`` inverted by (5.6) with ``D_l = λI + (1/N₂) J_l J_lᵀ``
    (``N₂ × N₂``), ``J_l`` the rows ``∇_{W_l}ψ_iᵀ``. ``fisher`` and ``n_samples`` as in
    :class:`SMWNG`.

    rhs: the mini-batch gradient ``g`` on ``S₁``. Curvature: ``C = ⊕_l (F_l + λI)``, a
    :class:`~refcurv.operators.BlockDiagonal` of per-layer :class:`~refcurv.operators.Dense`
    blocks (:func:`refcurv.curvature.empirical_fisher` with ``blocks=True``),
    ``λ = state.damping_used``.

    State: :class:`SMWNGBDState`; diagnostics ``damping``, ``rho``, ``accepted``.

    Shared by both forms: as :class:`SMWNG` (the per-layer Grams are
    :func:`~refcurv.curvature.ef_gram` with ``blocks=True``).
    """

    name = "smw_ng_bd"
    seed_ref = "[Ren-thesis] Ch.5 §5.8 (block-diagonal (5.3)), (5.6)"
    summary = "block-diagonal (per layer) SMW-NG + LM damping"
    State = SMWNGBDState

    def capacitance(self, net, params, x2, y2, loss, damping):
        """Per layer ``D_l = λI + (1/N₂) (∇_{W_l}ψ_iᵀ ∇_{W_l}ψ_j)_{i,j}``: list of ``(N₂, N₂)``."""
        return self._capacitance(*net.factors(params, x2, y2, loss), damping)

    @staticmethod
    def _capacitance(A, G, damping):
        return [_ef_capacitance(K, damping) for K in ef_gram(A, G, blocks=True)]

    def _dense_B(self, net, params, x2, y2, loss):
        return cv.empirical_fisher(net, params, x2, y2, loss, blocks=True)

    def _fast_solve(self, lam, net, params, batch, draws):
        x2, y2 = self._curvature_batch(batch, draws)
        loss = batch.loss
        A1, G1 = net.factors(params, batch.x, batch.y, loss)
        g = grad_from_factors(A1, G1)
        A, G = net.factors(params, x2, y2, loss)
        N = A[0].shape[0]
        Ds = self._capacitance(A, G, lam)  # reuses S₂'s factors
        Jg = ef_products(A, G, g)
        z = [spd_solve(D, v, name="D_l") for D, v in zip(Ds, Jg)]
        corr = ef_transpose(A, G, z)
        p = [-(gl - cl / N) / lam for gl, cl in zip(g, corr)]
        pBp = float(sum(float((v * v).sum()) for v in ef_products(A, G, p))) / N
        return p, g, pBp, {}


__all__ = ["SMWGN", "SMWNG", "SMWNGBD", "SPD_OUTPUT_HESSIAN", "NG_FISHER_KINDS", "LMMethod", "LMState",
           "SMWGNState", "SMWNGState", "SMWNGBDState", "lm_update", "reduction_ratio"]
