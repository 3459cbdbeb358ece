"""KFAC for Linear and Conv2d layers (thesis 003 Algorithm 7 (MLP) and Algorithm 12 (CNN);
Martens & Grosse 2015; Grosse & Martens 2016 (KFC)).

Per layer, the curvature block is approximated by a Kronecker product of two factors

    Ω = (1/N) Σ_n Σ_t a_{n,t} a_{n,t}ᵀ,     Γ = (1/N) Σ_n (1/T) Σ_t Dh_{n,t} Dh_{n,t}ᵀ

(Algorithm 12 line 2/14; thesis (3.6)/(3.9); ``T = 1`` for Linear), with ``Dh`` the
pre-activation gradient of the per-sample loss at labels sampled from the model
(``fisher="mc"``, as Algorithms 7/12 line 8/12), at the exact output-Hessian square root
(``fisher="ggn"``) or at the data labels (``fisher="empirical"``). ``conv="reduce"``
replaces the factors by the KFAC-reduce ones of :func:`refcurv.curvature.kfac_factors`
(scaled to the same ``Ω``/``Γ`` convention).

Statistics are exponential moving averages ``X ← βX + (1−β)X_batch`` refreshed every
``T_stats`` steps; the first refresh sets them (a warm start on the first mini-batch;
:meth:`KFAC.warm_start` warm-starts on any data, as Algorithm 12 line 2 does on the whole
set). Inverses are recomputed every ``T_inv`` steps (and at each of the first ``T_inv``
steps, Algorithm 7 line 10):

    H_Ω = (Ω + π√λ I)⁻¹,   H_Γ = (Γ + (√λ/π) I)⁻¹,
    π = √( (tr Ω / dim Ω) / (tr Γ / dim Γ) )     (Algorithm 12 line 19, ``split="pi"``)
    π = 1                                          (Algorithm 7 line 11, ``split="sqrt"``)

and the direction is ``−H_Γ m H_Ω`` with ``m`` the (momentum) gradient
``m ← μ m + g`` (Algorithm 12 line 7; ``momentum=0`` gives ``m = g``, Algorithm 7).

Vectorization: with refcurv's row-major ``vec`` of ``W ∈ R^{out×d}``,
``vec(H_Γ m H_Ω) = (H_Γ ⊗ H_Ω) vec(m)`` and the damped curvature block is
``(Γ + (√λ/π)I) ⊗ (Ω + π√λ I)``; in the papers' column-major ``vec`` it reads
``(Ω + π√λ I) ⊗ (Γ + (√λ/π)I)``. The dense form solves exactly that Kronecker matrix.

Deviation from the pseudo-code, forced by the step interface (the step does not know the
learning rate): statistics are computed on the current mini-batch at the current
parameters *before* the direction, not after the weight update (Algorithm 7 line 8,
Algorithm 12 line 12) — the same statistics one step earlier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import xp_of
from ..linalg.woodbury import spd_solve
from .base import Method, check_choice, check_int, check_positive, check_unit, layer_grads
from .registry import register


def _factors(net, params, batch, fisher, conv, n_samples, seed):
    """Per layer ``(Ω, Γ)`` in the KFC convention (sum over locations in Ω, mean in Γ)."""
    kind = {"mc": "mc", "ggn": "ggn", "empirical": "empirical"}[fisher]
    out = []
    facs = cv.kfac_factors(net, params, batch.x, batch.y, batch.loss, kind=kind, conv=conv,
                           n_samples=n_samples, seed=seed)
    A_list, _ = net.factors(params, batch.x, batch.y, batch.loss)
    for (A, G), patches in zip(facs, A_list):
        T = patches.shape[-1]
        # expand/reduce scaling → KFC convention (same product); refcurv.curvature builds in
        # float64, the method keeps its statistics in the input dtype (design §3)
        out.append(((T * A).astype(patches.dtype), (G / T).astype(patches.dtype)))
    return out


def damped_factors(Omega, Gamma, damping, split):
    """``(Ω + π√λ I, Γ + (√λ/π) I, π)`` (Algorithm 12 line 19 / Algorithm 7 line 11)."""
    xp = xp_of(Omega)
    if split == "pi":
        a = float(xp.trace(Omega)) / Omega.shape[0]
        g = float(xp.trace(Gamma)) / Gamma.shape[0]
        pi = float(np.sqrt(a / g)) if a > 0 and g > 0 else 1.0
    else:
        pi = 1.0
    r = float(np.sqrt(damping))  # Python floats: a NumPy float64 would promote float32 factors
    return (Omega + pi * r * xp.eye(Omega.shape[0], dtype=Omega.dtype),
            Gamma + (r / pi) * xp.eye(Gamma.shape[0], dtype=Gamma.dtype), pi)


@register
@dataclass(frozen=True)
class KFAC(Method):
    """KFAC (thesis Algorithms 7 and 12). Hyper-parameters: ``damping`` λ, EMA ``beta``,
    statistics / inverse frequencies ``T_stats`` / ``T_inv``, ``split`` ("pi" | "sqrt"),
    ``conv`` ("expand" = KFC | "reduce"), ``fisher`` ("mc" | "ggn" | "empirical"),
    ``n_samples`` (sampled labels per input for "mc"), gradient ``momentum`` μ."""

    damping: float = 1e-3
    beta: float = 0.9
    T_stats: int = 1
    T_inv: int = 1
    split: str = "pi"
    conv: str = "expand"
    fisher: str = "mc"
    n_samples: int = 1
    momentum: float = 0.0

    name = "kfac"
    seed_ref = "003 Alg. 7, 12; (3.6)"
    summary = "Kronecker-factored curvature (G ⊗ A per layer), damped split, inverted every T_inv steps"

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta")
        check_int(self.T_stats, "T_stats")
        check_int(self.T_inv, "T_inv")
        check_choice(self.split, "split", ("pi", "sqrt"))
        check_choice(self.conv, "conv", ("expand", "reduce"))
        check_choice(self.fisher, "fisher", ("mc", "ggn", "empirical"))
        check_int(self.n_samples, "n_samples")
        check_unit(self.momentum, "momentum")

    def init(self, net, params):
        return {"k": 0, "m": None, "factors": None, "damped": None, "inverses": None}

    def draw(self, rng, state, net, params, batch):
        # one seed for the label sampling of this step, drawn whether or not it is used,
        # so that the stream of draws does not depend on the step counter
        return int(rng.integers(2**63 - 1))

    def warm_start(self, state, net, params, batch, seed=0):
        """Set Ω, Γ from ``batch`` (e.g. the whole data set, Algorithm 12 line 2)."""
        return {**state, "factors": _factors(net, params, batch, self.fisher, self.conv, self.n_samples, seed)}

    def _update(self, state, net, params, batch, seed):
        """Shared by both forms: momentum gradient, statistics, damped factors (and, for the
        fast form, their inverses)."""
        k = state["k"]
        g, _ = layer_grads(net, params, batch)
        m = g if state["m"] is None or self.momentum == 0 else [self.momentum * a + b for a, b in zip(state["m"], g)]
        factors = state["factors"]
        if k % self.T_stats == 0:
            new = _factors(net, params, batch, self.fisher, self.conv, self.n_samples, seed)
            if factors is None:
                factors = new
            else:
                b = self.beta
                factors = [(b * O + (1 - b) * On, b * G + (1 - b) * Gn) for (O, G), (On, Gn) in zip(factors, new)]
        damped = state["damped"]
        refresh = damped is None or k < self.T_inv or k % self.T_inv == 0
        if refresh:
            damped = [damped_factors(O, G, self.damping, self.split)[:2] for O, G in factors]
        new_state = {"k": k + 1, "m": m, "factors": factors, "damped": damped, "inverses": state["inverses"]}
        return m, new_state, refresh

    def _fast(self, state, net, params, batch, seed):
        m, new_state, refresh = self._update(state, net, params, batch, seed)
        if refresh or new_state["inverses"] is None:
            new_state["inverses"] = [
                (spd_solve(Od, xp_of(Od).eye(Od.shape[0], dtype=Od.dtype), "Ω + π√λI"),
                 spd_solve(Gd, xp_of(Gd).eye(Gd.shape[0], dtype=Gd.dtype), "Γ + √λ/π I"))
                for Od, Gd in new_state["damped"]
            ]
        direction = [-(HG @ mi @ HO) for mi, (HO, HG) in zip(m, new_state["inverses"])]
        return direction, new_state

    def _dense(self, state, net, params, batch, seed):
        m, new_state, _ = self._update(state, net, params, batch, seed)
        xp = xp_of(m[0])
        direction = []
        for mi, (Od, Gd) in zip(m, new_state["damped"]):
            K = xp.kron(Gd, Od)  # row-major vec: damped block (Γ + √λ/π I) ⊗ (Ω + π√λ I)
            direction.append(-spd_solve(K, mi.ravel(), "damped Kronecker block").reshape(mi.shape))
        new_state["inverses"] = state["inverses"]
        return direction, new_state
