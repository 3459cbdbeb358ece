"""K-BFGS and K-BFGS(L) for Linear and Conv2d layers (thesis 003 Chapter 3: Theorem 3,
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
``m ← β m + g`` (Algorithm 9 line 8 read with §3.4.2's notation; errata KBFGS-2;
``momentum_form="ema"`` gives Chapter 2's ``m ← β m + (1−β) g``, which is the same
trajectory with the learning rate divided by ``1−β``); Algorithm 10 uses ``m = g``.

**Damping split** (Algorithm 9 line 2, §3.4.3): ``λ_A = √|T| √λ``, ``λ_G = √λ / √|T|``
per layer (so ``λ_A λ_G = λ``; ``√λ`` each for Linear layers).

**H_A** (Algorithm 9 lines 3, 16-17; (3.14)-(3.15)): initialized ``(A + λ_A I)⁻¹`` from data
(:meth:`warm_start`; without a warm start, from the first mini-batch at the first step).
At curvature steps "minibatched" Hessian-action BFGS with the current mini-batch:

    s_A = H_A â,   â = E_n[(1/|T|) Σ_t a_t(n)],     y_A = A s_A + λ_A s_A        (3.14)
    A s_A = E_n[ Σ_t (a_t(n)ᵀ s_A) a_t(n) ]                                      (3.15)

then ``H_A ← BFGS(H_A; s_A, y_A)`` (3.11). The fast form evaluates (3.15) from the patches
``(N, d, |T|)`` by two einsums, never forming ``A``; the dense form forms ``A`` and multiplies.
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

**Curvature frequency** ``T_update`` (§3.4.3): with the thesis' 1-based counter ``k``, lines
12-23 of Algorithm 9 run only when ``k ≡ 0 (mod T_update)``; here the 0-based ``state["k"]``
is a curvature step when ``(k + 1) % T_update == 0``.

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

State (same structure from both forms): ``k``; ``m`` (momentum, per layer); ``lambdas``
(``(λ_A, λ_G)`` per layer); ``HA`` (dense ``d × d``); ``HG`` (dense ``out × out``, K-BFGS) or
``memory`` (``(S, Y)``, ``(≤p, out)`` rows oldest first, K-BFGS(L)); ``sG``, ``yG`` (undamped
moving averages); ``pending`` (batch, ``h̄``, ``Dh̄`` of the last curvature step, or None).

Diagnostics: ``state["diagnostics"]`` counts, per layer, the ``H_G`` pairs used and those with
``ỹᵀ H ỹ / s̃ᵀỹ ≤ 2/μ₁`` (``H = H_G`` before the update; the quantity of thesis Figure 2.1,
§2.3.1: Powell's step guarantees ``≤ 1/μ₁`` for ``(s̃, y)``, not for ``(s̃, ỹ)``);
``state["last_pairs"]`` keeps the last pair of each layer. See ``docs/errata.md``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import xp_of
from ..errors import ArgumentTypeError
from ..linalg.damping import dp_dlm, dpi_dlm
from ..linalg.quasi_newton import bfgs_update_H, lbfgs_compact_apply, lbfgs_dense
from ..linalg.woodbury import spd_solve
from .base import Batch, Method, check_choice, check_int, check_positive, check_unit
from .registry import register


# ----------------------------------------------------------------- building blocks
def damping_split(damping, n_locations):
    """``(λ_A, λ_G) = (√|T| √λ, √λ / √|T|)`` (Algorithm 9 line 2, §3.4.3)."""
    r, t = np.sqrt(damping), np.sqrt(n_locations)
    return float(t * r), float(r / t)


def factor_A(patches):
    """Dense ``A = (1/N) Σ_n Σ_t a_t(n) a_t(n)ᵀ`` (3.9) from patches ``(N, d, |T|)``."""
    xp = xp_of(patches)
    return xp.einsum("ndt,net->de", patches, patches) / patches.shape[0]


def hessian_action(patches, s):
    """``A s = (1/N) Σ_n Σ_t (a_t(n)ᵀ s) a_t(n)`` (3.15) without forming ``A``: two einsums
    over the patches ``(N, d, |T|)``, ``O(N d |T|)``."""
    xp = xp_of(patches, s)
    c = xp.einsum("ndt,d->nt", patches, s)
    return xp.einsum("ndt,nt->d", patches, c) / patches.shape[0]


def mean_patch(patches):
    """``â = E_n[(1/|T|) Σ_t a_t(n)]`` (3.14)."""
    return patches.mean(axis=(0, 2))


def _inverse_spd(M, name):
    """``M⁻¹`` by Cholesky, symmetrized (so that ``H ⊗ H_A`` and BFGS keep exact symmetry)."""
    X = spd_solve(M, xp_of(M).eye(M.shape[0], dtype=M.dtype), name)
    return (X + X.T) / 2


def _lbfgs_apply(S, Y, X, gamma):
    """``H X`` with ``H`` the L-BFGS matrix of the memory, compact form (``γX`` if empty)."""
    return gamma * X if S.shape[0] == 0 else lbfgs_compact_apply(S, Y, X, gamma)


def _lbfgs_matrix(S, Y, gamma):
    """Dense L-BFGS matrix by the recursion (3.16) from ``γI``."""
    if S.shape[0] == 0:
        return gamma * xp_of(S).eye(S.shape[1], dtype=S.dtype)
    return lbfgs_dense(S, Y, gamma)


def lemma6_bounds(lam_G, mu1, n_pairs):
    """Lemma 6 eigenvalue bounds ``(κ_lower, κ_upper)`` for an L-BFGS/BFGS matrix built from
    ``H_0 = λ_G⁻¹ I`` and ``n_pairs`` pairs that satisfy Lemma 4 (``D_P(I) D_LM`` with
    ``μ₂ = λ_G``): ``κ_lower = (λ_G + n/μ₃)⁻¹``, ``κ_upper = λ_G⁻¹ μ̂ⁿ + (μ̂ⁿ − 1)/(μ̂ − 1)/μ₂``,
    ``μ₃ = μ₁/(μ₂(1 + 2μ₁))``, ``μ̂ = (1 + 1/√(μ₂μ₃))²``."""
    mu2 = lam_G
    mu3 = mu1 / (mu2 * (1 + 2 * mu1))
    mu_hat = (1 + 1 / np.sqrt(mu2 * mu3)) ** 2
    lower = 1.0 / (lam_G + n_pairs / mu3)
    upper = mu_hat**n_pairs / lam_G + (mu_hat**n_pairs - 1) / (mu_hat - 1) / mu2
    return lower, upper


def ratio_fraction(state):
    """Per layer, the fraction of ``H_G`` pairs with ``ỹᵀHỹ / s̃ᵀỹ ≤ 2/μ₁`` (None if none)."""
    d = state["diagnostics"]
    return [w / n if n else None for n, w in zip(d["pairs"], d["ratio_le_2"])]


# ----------------------------------------------------------------------- method
@dataclass(frozen=True)
class _KBFGSBase(Method):
    damping: float = 0.3
    beta: float = 0.9
    mu1: float = 0.2
    T_update: int = 1
    algorithm: str = "alg9"
    momentum_form: str = "heavy_ball"

    limited = False

    def _check(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta", closed_low=False)
        check_unit(self.mu1, "mu1", closed_low=False)
        check_int(self.T_update, "T_update")
        check_choice(self.algorithm, "algorithm", ("alg9", "alg10"))
        check_choice(self.momentum_form, "momentum_form", ("heavy_ball", "ema"))

    def __post_init__(self):
        self._check()

    def init(self, net, params):
        return {"k": 0, "m": None, "lambdas": None, "HA": None, "HG": None, "memory": None,
                "sG": None, "yG": None, "pending": None, "last_pairs": None,
                "diagnostics": {"pairs": None, "ratio_le_2": None}}

    def warm_start(self, state, net, params, batch):
        """``A_l`` from ``batch`` (e.g. the whole data set, §3.4.3 / Algorithm 9 line 3) and
        ``H_A = (A_l + λ_A I)⁻¹``."""
        if not isinstance(batch, Batch):
            raise ArgumentTypeError(f"batch must be a refcurv.methods.Batch, got {type(batch).__name__}")
        A_list, _ = net.factors(params, batch.x, batch.y, batch.loss)
        lambdas = [damping_split(self.damping, P.shape[-1]) for P in A_list]
        return {**state, "lambdas": lambdas, "HA": self._initial_HA(A_list, lambdas)}

    # ---- pieces
    @staticmethod
    def _initial_HA(A_list, lambdas):
        out = []
        for P, (lA, _) in zip(A_list, lambdas):
            A = factor_A(P)
            out.append(_inverse_spd(A + lA * xp_of(A).eye(A.shape[0], dtype=A.dtype), "A + λ_A I"))
        return out

    def _first_state(self, state, A_list, params):
        """Fill what the first step creates: λ's, H_A (no warm start), H_G, EMAs, counters."""
        state = dict(state)
        if state["lambdas"] is None:
            state["lambdas"] = [damping_split(self.damping, P.shape[-1]) for P in A_list]
        if state["HA"] is None:
            state["HA"] = self._initial_HA(A_list, state["lambdas"])
        if state["sG"] is None:
            xp = xp_of(params[0])
            outs = [W.shape[0] for W in params]
            dt = params[0].dtype
            state["sG"] = [xp.zeros(o, dtype=dt) for o in outs]
            state["yG"] = [xp.zeros(o, dtype=dt) for o in outs]
            if self.limited:
                state["memory"] = [(xp.zeros((0, o), dtype=dt), xp.zeros((0, o), dtype=dt)) for o in outs]
            else:
                state["HG"] = [xp.eye(o, dtype=dt) / lG for o, (_, lG) in zip(outs, state["lambdas"])]
            state["last_pairs"] = [None] * len(params)
            state["diagnostics"] = {"pairs": [0] * len(params), "ratio_le_2": [0] * len(params)}
        return state

    def _HG_operator(self, state, l, dense):
        """``H_G`` of layer ``l`` as a matrix (BFGS; dense L-BFGS) or a callable (compact)."""
        if not self.limited:
            return state["HG"][l]
        S, Y = state["memory"][l]
        gamma = 1.0 / state["lambdas"][l][1]
        if dense:
            return _lbfgs_matrix(S, Y, gamma)
        return lambda v: _lbfgs_apply(S, Y, v, gamma)

    @staticmethod
    def _apply(H, v):
        return H(v) if callable(H) else H @ v

    def _update_HG(self, state, net, params, dense):
        """Second pass on the pending batch at the current parameters, then the damped
        (L-)BFGS update of every ``H_G`` (Algorithm 9 lines 13, 19-21 / Algorithm 10 14-16)."""
        pend = state["pending"]
        b = pend["batch"]
        A_plus, G_plus = net.factors(params, b.x, b.y, b.loss)
        beta = self.beta
        sG, yG, HG, mem = list(state["sG"]), list(state["yG"]), state["HG"], state["memory"]
        HG = None if HG is None else list(HG)
        mem = None if mem is None else list(mem)
        last = list(state["last_pairs"])
        diag = {k: list(v) for k, v in state["diagnostics"].items()}
        for l, (W, P, Gp) in enumerate(zip(params, A_plus, G_plus)):
            h_plus = W @ mean_patch(P)                      # h̄⁺ = W⁺ â⁺ (mean over n and t)
            dh_plus = Gp.mean(axis=(0, 2))                  # Dh̄⁺
            sG[l] = beta * sG[l] + (1 - beta) * (h_plus - pend["h"][l])
            yG[l] = beta * yG[l] + (1 - beta) * (dh_plus - pend["dh"][l])
            lam_G = state["lambdas"][l][1]
            H = self._HG_operator(state, l, dense)
            if self.algorithm == "alg9":
                s_t, y_t, theta = dp_dlm(sG[l], yG[l], H, self.mu1, lam_G)      # Algorithm 8
            else:
                s_t, y_t, theta = dpi_dlm(sG[l], yG[l], self.mu1, lam_G)        # Algorithm 11
            sy = float(s_t @ y_t)
            if not sy > 0:  # only s̃ = 0 (s_G = y_G = 0): no information, no update
                last[l] = None
                continue
            ratio = float(y_t @ self._apply(H, y_t)) / sy
            diag["pairs"][l] += 1
            diag["ratio_le_2"][l] += int(ratio <= 2 / self.mu1)
            last[l] = {"s": sG[l], "y": yG[l], "s_damped": s_t, "y_damped": y_t, "theta": theta,
                       "ratio": ratio, "k": state["k"]}
            if self.limited:
                S, Y = mem[l]
                xp = xp_of(S)
                mem[l] = (xp.concatenate([S, s_t[None]])[-self.memory:], xp.concatenate([Y, y_t[None]])[-self.memory:])
            else:
                HG[l] = bfgs_update_H(HG[l], s_t, y_t)                            # (3.11)
        return {**state, "sG": sG, "yG": yG, "HG": HG, "memory": mem, "last_pairs": last,
                "diagnostics": diag, "pending": None}

    def _step(self, state, net, params, batch, dense):
        # (1) deferred H_G update with the second pass of the previous curvature step
        if state["pending"] is not None:
            state = self._update_HG(state, net, params, dense)
        # first forward-backward pass on M_k
        A_list, G_list = net.factors(params, batch.x, batch.y, batch.loss)
        state = self._first_state(state, A_list, params)
        xp = xp_of(params[0])
        N = A_list[0].shape[0]
        g = [xp.einsum("not,ndt->od", G, P) / N for G, P in zip(G_list, A_list)]  # Theorem 3 i
        # momentum (Algorithm 9 line 8; §3.4.2) — Algorithm 10 uses the mini-batch gradient
        if self.algorithm == "alg10":
            m = g
        else:
            c = 1.0 if self.momentum_form == "heavy_ball" else 1 - self.beta
            prev = state["m"] if state["m"] is not None else [0 * gi for gi in g]
            m = [self.beta * a + c * b for a, b in zip(prev, g)]
        # (2) direction −H_G m H_A
        direction = []
        for l, mi in enumerate(m):
            HA = state["HA"][l]
            H = self._HG_operator(state, l, dense)
            if dense:
                K = xp.kron(H, HA)  # row-major vec: (H_G ⊗ H_A) vec(m) = vec(H_G m H_A), H_A = H_Aᵀ
                direction.append(-(K @ mi.ravel()).reshape(mi.shape))
            else:
                direction.append(-self._apply(H, mi @ HA))
        # (3) curvature step: H_A update from M_k, stash M_k for the deferred H_G update
        k = state["k"]
        HA_new, pending = state["HA"], None
        if (k + 1) % self.T_update == 0:
            HA_new = []
            for l, (P, HA) in enumerate(zip(A_list, state["HA"])):
                lam_A = state["lambdas"][l][0]
                eye = xp.eye(HA.shape[0], dtype=HA.dtype)
                if self.algorithm == "alg10":
                    HA_new.append(_inverse_spd(factor_A(P) + lam_A * eye, "Â + λ_A I"))  # Alg. 10 line 12
                    continue
                s_A = HA @ mean_patch(P)                                                 # (3.14)
                As = factor_A(P) @ s_A if dense else hessian_action(P, s_A)              # (3.15)
                y_A = As + lam_A * s_A
                HA_new.append(bfgs_update_H(HA, s_A, y_A) if float(s_A @ y_A) > 0 else HA)
            pending = {"batch": batch.own_copy(),
                       "h": [W @ mean_patch(P) for W, P in zip(params, A_list)],         # h̄ = W â
                       "dh": [G.mean(axis=(0, 2)) for G in G_list]}                       # Dh̄
        new_state = {**state, "k": k + 1, "m": m if self.algorithm == "alg9" else None,
                     "HA": HA_new, "pending": pending}
        return direction, new_state

    def _fast(self, state, net, params, batch, draws):
        return self._step(state, net, params, batch, dense=False)

    def _dense(self, state, net, params, batch, draws):
        return self._step(state, net, params, batch, dense=True)


@register
@dataclass(frozen=True)
class KBFGS(_KBFGSBase):
    """K-BFGS (thesis 003 Algorithm 9; Algorithm 10's variant with ``algorithm="alg10"``):
    ``H_G`` a dense ``out × out`` BFGS matrix. Hyper-parameters: ``damping`` λ, ``beta``
    (momentum and ``(s_G, y_G)`` averages), ``mu1`` (Powell), ``T_update`` (curvature
    frequency), ``algorithm`` ("alg9" | "alg10"), ``momentum_form`` ("heavy_ball" | "ema")."""

    name = "kbfgs"
    seed_ref = "003 Ch.3 Alg. 8-11, (3.9)-(3.16)"
    summary = "Kronecker-factored BFGS (H_G by damped BFGS, H_A by minibatched Hessian action), conv + linear"


@register
@dataclass(frozen=True)
class KBFGSL(_KBFGSBase):
    """K-BFGS(L) (thesis 003 Algorithms 9 and 10): ``H_G`` by L-BFGS with the last ``memory`` (thesis: ``p``) pairs
    from ``H_0 = λ_G⁻¹ I``, applied in compact form. Hyper-parameters as :class:`KBFGS`, plus
    the ``memory``."""

    memory: int = 100

    name = "kbfgs-l"
    limited = True
    seed_ref = "003 Ch.3 Alg. 8-11, (3.9)-(3.16)"
    summary = "Kronecker-factored L-BFGS (H_G by damped L-BFGS, compact form), conv + linear"

    def __post_init__(self):
        self._check()
        check_int(self.memory, "memory")
