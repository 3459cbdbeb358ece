"""KFAC for Linear and Conv2d layers ([Ren-thesis] Algorithm 7 (MLP) and Algorithm 12 (CNN);
Martens & Grosse 2015; Grosse & Martens 2016 (KFC)).

**Factors.** Per layer, the curvature block is approximated by a Kronecker product of two
factors in the KFC convention (Algorithm 12 lines 2/14; thesis (3.6)–(3.9), sum over the
locations ``t`` in ``Ω``, mean in ``Γ``; ``T = 1`` for Linear):

    Ω = (1/N) Σ_n Σ_t a_{n,t} a_{n,t}ᵀ,     Γ = (1/N) Σ_n (1/T) Σ_t Dh_{n,t} Dh_{n,t}ᵀ,

that is ``T·A`` and ``G/T`` of :func:`refcurv.curvature.kfac_factors` (``conv="expand"``);
``conv="reduce"`` scales the KFAC-reduce factors the same way. A Linear layer on a sequence
``(T, d)`` (weight shared over ``T`` positions) is treated as a convolution with ``T``
locations: ``conv="expand"`` / ``"reduce"`` are Eschenhagen et al. 2023's K-FAC-expand /
K-FAC-reduce (README "Sequences"). ``Dh`` is the pre-activation
gradient of the per-sample loss at ``fisher="mc"``: labels sampled from the model's
predictive distribution (Algorithms 7/12 line 8/12; ``n_samples`` per input, averaged), at
``"exact"``: the closed-form expectation over those labels (the columns of the output-Hessian
square root), or at ``"empirical"``: the data labels. The sampled labels are the step's
:class:`~refcurv.methods.base.Draws` ``labels`` ``(n_samples, N, …)``, drawn for every step
(whether or not it refreshes the statistics, so the stream of draws does not depend on the
schedule) and consumed exactly by the steps that refresh them.

**Statistics** are moving averages ``X ← βX + (1−β)X_batch`` (Algorithm 7 line 9, Algorithm 12
line 14); the first refresh *sets* them (Algorithm 12 line 2's initialization, on the first
mini-batch; :meth:`KFAC.warm_start` sets them from any data, e.g. the whole set).

**Inverses** (Algorithm 12 line 19; Algorithm 7 line 11 is ``split="sqrt"``):

    H_Ω = (Ω + π√λ I)⁻¹,   H_Γ = (Γ + (√λ/π) I)⁻¹,
    π = √( (tr Ω / dim Ω) / (tr Γ / dim Γ) )     (``split="pi"``; ``π = 1`` for ``"sqrt"``)

(:func:`refcurv.linalg.kronecker.damped_split`), and the direction is ``−H_Γ m H_Ω`` (line 8)
with the momentum ``m ← μ m + g`` (line 7, ``momentum_form="heavy_ball"``; ``"ema"``:
``m ← μ m + (1−μ) g``; ``m = 0`` before the first step, so ``momentum=0`` gives ``m = g``,
Algorithm 7).

**Refresh phase** (0-based ``k = state.k``; :func:`~refcurv.methods.base.refresh_due`):
``phase="k0"`` refreshes the statistics iff ``k ≡ 0 (mod T_stats)`` and the inverses iff
``k ≡ 0 (mod T_inv)`` — the first step always does both. ``phase="paper"`` is the printed
schedule, with the 1-based iteration number ``j = k + 1`` of the algorithms: statistics iff
``j ≡ 0 (mod T_stats)`` (Algorithm 12 line 11; Algorithm 7 line 9 refreshes them every
iteration, ``T_stats = 1``), inverses iff ``j ≤ T_inv or j ≡ 0 (mod T_inv)`` (Algorithm 7
line 10). Under either phase a step that finds no statistics (no warm start) computes them,
and one that finds no damped factors computes them.

**Vectorization.** With refcurv's row-major ``vec`` of ``W ∈ R^{out×d}``,
``vec(H_Γ m H_Ω) = (H_Γ ⊗ H_Ω) vec(m)`` and the damped curvature block is
``(Γ + (√λ/π)I) ⊗ (Ω + π√λ I)``; in the papers' column-major ``vec`` it reads
``(Ω + π√λ I) ⊗ (Γ + (√λ/π)I)``.

**Deviation from the pseudo-code**, forced by the step interface (the step does not know
the learning rate): statistics and inverses are refreshed on the current mini-batch at the
current parameters *before* the direction, not after the weight update (Algorithm 7
lines 8–11, Algorithm 12 lines 11–21) — the same statistics one step earlier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import numpy as np

from .. import curvature as cv
from ..backend import rng_of, xp_of
from ..errors import StateError
from ..linalg.kronecker import SPLITS, damped_split
from ..linalg.woodbury import _spd_inverse, spd_solve
from ..operators import BlockDiagonal, Kronecker
from .base import (Method, State, check_choice, check_int, check_model_label_draws, check_positive, check_unit,
                   model_label_draws, refresh_due, state_field)
from .registry import register
from .vocabulary import FISHER_KINDS

PHASES = ("k0", "paper")
MOMENTUM_FORMS = ("heavy_ball", "ema")


@dataclass(frozen=True, kw_only=True)
class KFACState(State):
    """KFAC's state (thesis Algorithm 12's symbols; lists have one entry per trainable layer).
    Both forms return it; the dense form leaves ``H_Omega``/``H_Gamma`` at ``None``."""

    m: Any = state_field("m")
    Omega: Any = state_field(doc="Ω_l (d × d): moving average of the input-side statistics Σ_t a_t a_tᵀ "
                                 "(KFC convention, Alg. 12 lines 2/14, thesis (3.9)); None before the first refresh")
    Gamma: Any = state_field(doc="Γ_l (out × out): moving average of the pre-activation-gradient statistics "
                                 "(1/T) Σ_t Dh_t Dh_tᵀ (Alg. 12 lines 2/14, thesis (3.9)); "
                                 "None before the first refresh")
    pi: Any = state_field(doc="π_l (Python floats): damping split of the last inverse refresh "
                              "(Alg. 12 line 19; 1 for split='sqrt')")
    Omega_damped: Any = state_field(doc="Ω_l + π_l √λ I at the last inverse refresh (the factor the steps since "
                                        "then preconditioned with)")
    Gamma_damped: Any = state_field(doc="Γ_l + (√λ/π_l) I at the last inverse refresh")
    H_Omega: Any = state_field(doc="H_Ω = (Ω_l + π_l √λ I)⁻¹ (Alg. 12 line 19), fast form; None in the dense "
                                   "form's state (it solves the Kronecker matrix)")
    H_Gamma: Any = state_field(doc="H_Γ = (Γ_l + (√λ/π_l) I)⁻¹ (Alg. 12 line 19), fast form; None in the dense "
                                   "form's state")


def _locations(net, x):
    """``T_l``, the number of output locations of each trainable layer (1 for Linear on
    vectors, ``H_out W_out`` for Conv2d, ``T`` for Linear on a sequence ``(T, d)``)."""
    shapes = net.feature_shapes(tuple(x.shape[1:]))
    return [m.n_locations(shapes[k]) if hasattr(m, "n_locations") else 1
            for k, m in zip(net.trainable_index, net.layers_trainable)]


def kfc_factors(net, params, batch, fisher="mc", conv="expand", labels=None):
    """Per layer ``(Ω, Γ)`` of one mini-batch in the KFC convention (``T·A``, ``G/T`` of
    :func:`refcurv.curvature.kfac_factors`; thesis (3.9)), in the dtype of the network's
    computation (refcurv.curvature builds in float64; design §3). ``labels``: the sampled
    labels ``(n_samples, N, …)`` for ``fisher="mc"``."""
    facs = cv.kfac_factors(net, params, batch.x, batch.y, batch.loss, kind=fisher, conv=conv,
                           labels=labels if fisher == "mc" else None)
    dt = np.result_type(batch.x.dtype, *(W.dtype for W in params))
    out = []
    for (A, G), T in zip(facs, _locations(net, batch.x)):
        out.append(((T * A).astype(dt), (G / T).astype(dt)))
    return out


@register
@dataclass(frozen=True)
class KFAC(Method):
    """KFAC (thesis Algorithms 7 and 12; see the module docstring for the formulas).

    Hyper-parameters: ``damping`` λ; ``beta`` β (EMA of the statistics); ``T_stats`` /
    ``T_inv`` (refresh intervals of the statistics / the inverses); ``split`` ("pi" |
    "sqrt"); ``conv`` ("expand" = KFC | "reduce"); ``fisher`` ("exact" | "mc" | "empirical");
    ``n_samples`` (sampled labels per input for "mc"); gradient ``momentum`` μ and
    ``momentum_form`` ("heavy_ball", Alg. 12 line 7 | "ema"); ``phase`` ("k0" | "paper").

    State: :class:`KFACState`. Draws: ``labels`` ``(n_samples, N, …)`` sampled from the model
    (``loss.sample``) for ``fisher="mc"``; nothing otherwise. Diagnostics: ``refreshed``
    (inverses), ``stats_refreshed``.

    Curvature and rhs: ``rhs(state, g) = state.m`` (the momentum gradient of the step) and
    ``C = BlockDiagonal_l[(Γ_l + (√λ/π_l) I) ⊗ (Ω_l + π_l√λ I)]`` (row-major ``G ⊗ A``;
    Alg. 12 lines 8 and 19) with the damped factors of the last inverse refresh
    (``state.Gamma_damped``, ``state.Omega_damped``), so ``direction = −C⁻¹ m``.

    The two forms are separate code paths. The fast form: :func:`kfc_factors`, the EMA,
    :func:`refcurv.linalg.kronecker.damped_split`, the explicit inverses ``H_Ω``, ``H_Γ`` and
    ``−H_Γ m H_Ω``, on the schedule of :meth:`schedule`. The dense form (:meth:`_dense`) is
    a literal replay of the algorithm in float64: the factors from
    :func:`refcurv.curvature.kfac_factors` scaled to (3.9) by the patches' ``T``, the EMA,
    the trace split and the refresh decisions written out from the text, and the direction
    by a Cholesky solve with the dense ``(Γ + (√λ/π)I) ⊗ (Ω + π√λI)``.
    Shared by both forms: the draws (:meth:`draw`: ``loss.sample``, tests/test_losses.py);
    :func:`refcurv.curvature.kfac_factors` (tests/test_identities.py); the mini-batch
    gradient ``net.grad`` (tests/test_autodiff_oracle.py); :func:`~refcurv.linalg.woodbury.spd_solve`
    (tests/test_woodbury.py).
    """

    damping: float = 1e-3
    beta: float = 0.9
    T_stats: int = 1
    T_inv: int = 1
    split: str = "pi"
    conv: str = "expand"
    fisher: str = "mc"
    n_samples: int = 1
    momentum: float = 0.0
    momentum_form: str = "heavy_ball"
    phase: str = "k0"

    name = "kfac"
    seed_ref = "[Ren-thesis] Alg. 7, 12; (3.6)-(3.9)"
    summary = "Kronecker-factored curvature (G ⊗ A per layer), damped split, inverted every T_inv steps"
    State = KFACState

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta")
        check_int(self.T_stats, "T_stats")
        check_int(self.T_inv, "T_inv")
        check_choice(self.split, "split", SPLITS)
        check_choice(self.conv, "conv", cv.KFAC_CONV)
        check_choice(self.fisher, "fisher", FISHER_KINDS)
        check_int(self.n_samples, "n_samples")
        check_unit(self.momentum, "momentum")
        check_choice(self.momentum_form, "momentum_form", MOMENTUM_FORMS)
        check_choice(self.phase, "phase", PHASES)

    @property
    def draw_fields(self):
        return ("labels",) if self.fisher == "mc" else ()

    def init(self, net, params):
        return KFACState()

    # ------------------------------------------------------------------ draws
    def draw(self, rng, state, net, params, batch):
        """``labels`` ``(n_samples, N, …)`` drawn from the model at ``params`` (``fisher="mc"``;
        host NumPy), at every step; no draws for the other Fisher kinds."""
        return model_label_draws(self, net, params, batch, rng)

    def check_draws(self, draws, state, net, params, batch):
        draws = super().check_draws(draws, state, net, params, batch)
        return check_model_label_draws(self, draws, batch)

    # ------------------------------------------------------------------ schedule
    def schedule(self, k):
        """``(statistics due, inverses due)`` at the 0-based step ``k`` (module docstring)."""
        if self.phase == "k0":
            return refresh_due(k, self.T_stats), refresh_due(k, self.T_inv)
        j = k + 1  # Algorithms 7 and 12 count iterations from 1
        return j % self.T_stats == 0, j <= self.T_inv or j % self.T_inv == 0

    def warm_start(self, state, net, params, batch, seed=0, draws=None):
        """Set ``Ω``, ``Γ`` from ``batch`` (e.g. the whole data set, Algorithm 12 line 2), with
        the labels of ``draws`` (``fisher="mc"``; drawn from ``seed`` if not given)."""
        self.check_state(state)
        if draws is None:
            draws = self.draw(rng_of(seed), state, net, params, batch)
        self.check_draws(draws, state, net, params, batch)
        facs = kfc_factors(net, params, batch, self.fisher, self.conv, draws.labels)
        return state.replace(Omega=[O for O, _ in facs], Gamma=[G for _, G in facs])

    # ------------------------------------------------------------------ fast form
    def _fast(self, state, net, params, batch, draws):
        stats_due, inv_due = self.schedule(state.k)
        g = cv._mean_layer_grads(net, params, batch.x, batch.y, batch.loss)
        # momentum gradient (Alg. 12 line 7) from m = 0
        mu, heavy_ball = self.momentum, self.momentum_form == "heavy_ball"
        if state.m is None:
            m = g if heavy_ball else [(1 - mu) * gi for gi in g]
        elif heavy_ball:
            m = [mu * a + b for a, b in zip(state.m, g)]
        else:
            m = [mu * a + (1 - mu) * b for a, b in zip(state.m, g)]
        # statistics (Alg. 12 lines 11–16; the first refresh sets them, line 2)
        Omega, Gamma = state.Omega, state.Gamma
        stats_refreshed = stats_due or Omega is None
        if stats_refreshed:
            new = kfc_factors(net, params, batch, self.fisher, self.conv, draws.labels)
            if Omega is None:
                pairs = new
            else:
                b = self.beta
                pairs = [(b * O + (1 - b) * On, b * G + (1 - b) * Gn) for O, G, (On, Gn) in zip(Omega, Gamma, new)]
            Omega, Gamma = [O for O, _ in pairs], [G for _, G in pairs]
        # inverses (Alg. 12 lines 17–21)
        refreshed = inv_due or state.Omega_damped is None
        if refreshed:
            split = [damped_split(O, G, self.damping, self.split) for O, G in zip(Omega, Gamma)]
            Od, Gd, pi = [s[0] for s in split], [s[1] for s in split], [s[2] for s in split]
        else:
            Od, Gd, pi = state.Omega_damped, state.Gamma_damped, state.pi
        HO, HG = state.H_Omega, state.H_Gamma
        if refreshed or HO is None:  # (a state from the dense form carries no inverses)
            HO = [_spd_inverse(O, "Ω + π√λI") for O in Od]  # potrf + potri: the inverse is the definition's
            HG = [_spd_inverse(G, "Γ + √λ/π I") for G in Gd]
        # Alg. 12 line 8: p = H_Γ m H_Ω
        direction = [-(HG @ mi @ HO) for mi, HO, HG in zip(m, HO, HG)]
        new_state = state.replace(
            k=state.k + 1, m=m, Omega=Omega, Gamma=Gamma, pi=pi, Omega_damped=Od, Gamma_damped=Gd,
            H_Omega=HO, H_Gamma=HG,
            diagnostics={"refreshed": bool(refreshed), "stats_refreshed": bool(stats_refreshed)})
        return direction, new_state

    # ------------------------------------------------------------------ dense form
    def _dense(self, state, net, params, batch, draws):
        """A literal replay of Algorithm 12 (with Algorithm 7's schedule for ``phase="paper"``)
        in float64, independent of the fast form's update code."""
        k, lam, beta, mu = state.k, self.damping, self.beta, self.momentum
        # refresh decisions, from the text
        if self.phase == "k0":
            stats_now, inv_now = k % self.T_stats == 0, k % self.T_inv == 0
        else:  # iteration number j = k + 1: Alg. 12 line 11 and Alg. 7 line 10
            j = k + 1
            stats_now = j % self.T_stats == 0
            inv_now = j <= self.T_inv or j % self.T_inv == 0
        stats_now = stats_now or state.Omega is None
        inv_now = inv_now or state.Omega_damped is None
        # momentum gradient (Alg. 12 line 7), from m = 0
        grads = net.grad(params, batch.x, batch.y, batch.loss)
        xp = xp_of(grads[0])
        m_old = state.m if state.m is not None else [xp.zeros_like(gi) for gi in grads]
        if self.momentum_form == "heavy_ball":
            m = [mu * mo + gi for mo, gi in zip(m_old, grads)]
        else:
            m = [mu * mo + (1.0 - mu) * gi for mo, gi in zip(m_old, grads)]
        # statistics (Alg. 12 lines 2 and 14, thesis (3.9)): Ω = T·A, Γ = G/T with T the number
        # of columns of the layer's patches
        Omega, Gamma = state.Omega, state.Gamma
        if stats_now:
            facs = cv.kfac_factors(net, params, batch.x, batch.y, batch.loss, kind=self.fisher, conv=self.conv,
                                   labels=draws.labels)
            patches, _ = net.factors(params, batch.x, batch.y, batch.loss)
            Omega_batch = [P.shape[-1] * A for (A, _), P in zip(facs, patches)]
            Gamma_batch = [G / P.shape[-1] for (_, G), P in zip(facs, patches)]
            if Omega is None:
                Omega, Gamma = Omega_batch, Gamma_batch
            else:
                Omega = [beta * Om + (1.0 - beta) * Ob for Om, Ob in zip(Omega, Omega_batch)]
                Gamma = [beta * Gm + (1.0 - beta) * Gb for Gm, Gb in zip(Gamma, Gamma_batch)]
        # damping split (Alg. 12 line 19: π = √(trace(Ω ⊗ I) / trace(I ⊗ Γ)); Alg. 7 line 11: π = 1)
        if inv_now:
            pi, Omega_damped, Gamma_damped = [], [], []
            for Om, Gm in zip(Omega, Gamma):
                dO, dG = Om.shape[0], Gm.shape[0]
                trace_O_I = float(xp.trace(Om)) * dG  # trace(Ω ⊗ I_dG)
                trace_I_G = dO * float(xp.trace(Gm))  # trace(I_dO ⊗ Γ)
                p = 1.0
                if self.split == "pi" and trace_O_I > 0 and trace_I_G > 0:
                    p = float(math.sqrt(trace_O_I / trace_I_G))
                pi.append(p)
                Omega_damped.append(Om + p * float(math.sqrt(lam)) * xp.eye(dO, dtype=Om.dtype))
                Gamma_damped.append(Gm + (float(math.sqrt(lam)) / p) * xp.eye(dG, dtype=Gm.dtype))
        else:
            pi, Omega_damped, Gamma_damped = state.pi, state.Omega_damped, state.Gamma_damped
        # direction: the dense damped Kronecker block, row-major vec (Alg. 12 line 8)
        direction = []
        for mi, Od, Gd in zip(m, Omega_damped, Gamma_damped):
            K = xp.kron(Gd, Od)  # (Γ + √λ/π I) ⊗ (Ω + π√λ I)
            direction.append(-spd_solve(K, mi.ravel(), "damped Kronecker block").reshape(mi.shape))
        new_state = KFACState(
            k=k + 1, m=m, Omega=Omega, Gamma=Gamma, pi=pi, Omega_damped=Omega_damped, Gamma_damped=Gamma_damped,
            H_Omega=None, H_Gamma=None,
            diagnostics={"refreshed": bool(inv_now), "stats_refreshed": bool(stats_now)})
        return direction, new_state

    # ------------------------------------------------------------------ curvature
    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``BlockDiagonal_l[Kronecker(Γ_l + (√λ/π_l) I, Ω_l + π_l√λ I)]`` from the damped
        factors of the state (row-major ``G ⊗ A`` blocks); ``direction = −C⁻¹ state.m``."""
        self.check_state(state)
        if state.Omega_damped is None:
            raise StateError(f"{self.name}: the state has no damped factors yet (Omega_damped); take a step first")
        return BlockDiagonal([Kronecker(Gd, Od) for Od, Gd in zip(state.Omega_damped, state.Gamma_damped)])

    def rhs(self, state, grads):
        """The momentum gradient ``m`` of the step (Alg. 12 line 7)."""
        return state.m
