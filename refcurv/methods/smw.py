"""Subsampled Gauss-Newton / natural gradient with Levenberg-Marquardt damping, inverted by
Sherman-Morrison-Woodbury: SMW-GN, SMW-NG, SMW-NG-BD (thesis = seed 003, Chapter 5).

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
computed from ``Sequential.factors`` without forming a per-sample gradient. ``J g``,
``Jᵀ w`` and ``pᵀBp`` are forward/backward passes (Algorithms 19-21), also without per-sample
gradients. NG-BD applies the NG formulas to each layer's block (§5.8).

Dense forms (the definition): ``B`` from :mod:`refcurv.curvature` in float64
(``ggn``, ``empirical_fisher``), ``(B + λI) p = −g`` solved by Cholesky
(:func:`refcurv.linalg.woodbury.spd_solve`).

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
line 6) at the full step ``p``; then :func:`lm_update`, and ``λ_{t+1} = λ_LM^{(t+1)} + τ``.
Optionally (``accept_threshold = η``, Theorem 6) a step with ``ρ < η`` is rejected (zero
direction); Theorem 6 needs ``0 < η < ε``, ``N₁ = N`` and ``α = 1``.

Where the authors' code differs (design §8): it samples labels for the Fisher — offered as
``fisher="mc"`` (one label per sample drawn from the model in :meth:`draw`); it uses
``drop = 1/1.01`` (pass ``drop=1/1.01``) and ``ρ`` with the denominator ``−½ gᵀp`` (not
offered: for the exact ``p``, ``−½gᵀp = ½pᵀBp + ½λ‖p‖²`` while (5.5)'s is
``½pᵀBp + λ‖p‖²``). Its Gram matrix is reported to be built class-major while ``H`` is
sample-major; Algorithm 22 (``V ⊗ 1_{m×m}``, ``Ĥ₂ = (Ĥ_{i,2})_{i∈S}``) and (5.7) are both
sample-major, as here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import curvature as cv
from ..backend import to_numpy, xp_of
from ..errors import HyperParameterError
from ..linalg.woodbury import spd_solve
from ..vec import flatten, unflatten
from .base import Method, check_choice, check_int, check_positive
from .registry import register

F64 = np.float64

#: losses whose output Hessian is SPD (diagonal with positive entries): (5.6) applies
SPD_OUTPUT_HESSIAN = ("mse", "bce")


# ------------------------------------------------------------------ LM rule
def lm_update(lam_lm, rho, boost=1.01, drop=0.99, eps=0.25):
    """One step of the LM rule of thesis §5.2.3 (defaults of §5.8), a pure function:

    * ``ρ < ε``       → ``λ_LM ← boost · λ_LM``;
    * ``ρ > 1 − ε``   → ``λ_LM ← drop · λ_LM``;
    * otherwise (``ε ≤ ρ ≤ 1 − ε``, and ``ρ`` = NaN, i.e. no step was taken) → unchanged.

    The damping used is ``λ = λ_LM + τ`` (the caller adds ``τ``).
    """
    rho = float(rho)
    if rho < eps:
        return boost * lam_lm
    if rho > 1.0 - eps:
        return drop * lam_lm
    return lam_lm


def _inner(a, b):
    """``Σ_l <a_l, b_l>`` over per-layer arrays, as a Python float."""
    return float(sum(float((x * y).sum()) for x, y in zip(a, b)))


def grad_from_factors(A, G):
    """Mini-batch gradient ``(1/N) Σ_i G_i A_iᵀ`` per layer (thesis (2.1), Algorithm 18)
    from the factors, without forming per-sample gradients."""
    xp = xp_of(*A)
    return [xp.einsum("not,ndt->od", g, a) / a.shape[0] for a, g in zip(A, G)]


def ef_gram(A, G, blocks=False):
    """``(∇ψ_iᵀ ∇ψ_j)_{i,j}`` (thesis §5.3.3) from the factors ``A_l (N,d,T)``, ``G_l (N,out,T)``:
    ``Σ_l Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'}) (g_{i,t}ᵀ g_{j,t'})`` — ``(g_iᵀg_j)(v_iᵀv_j)`` per layer
    for Linear (``T = 1``, bias in the ones row of ``a``). ``blocks=True``: per-layer list."""
    xp = xp_of(*A)
    out = []
    for a, g in zip(A, G):
        KA = xp.einsum("idt,jds->ijts", a, a)
        KG = xp.einsum("iot,jos->ijts", g, g)
        out.append((KA * KG).sum(axis=(-2, -1)))
    return out if blocks else sum(out)


def _ef_capacitance(K, lam):
    """``D = λI + K/N₂`` (5.6) with ``H = I`` from the Gram ``K = (∇ψ_iᵀ∇ψ_j)``, symmetrized."""
    N = K.shape[0]
    D = lam * xp_of(K).eye(N, dtype=K.dtype) + K / N
    return (D + D.T) / 2


def ef_products(A, G, v):
    """``(∇ψ_iᵀ v)_i`` per layer: list of ``(N,)``, ``∇ψ_iᵀ v = Σ_t g_{i,t}ᵀ V a_{i,t}``."""
    xp = xp_of(*A)
    return [xp.einsum("iot,od,idt->i", g, w, a) for a, g, w in zip(A, G, v)]


def ef_transpose(A, G, z):
    """``Σ_i z_i ∇ψ_i = Σ_i z_i G_i A_iᵀ`` per layer (``z`` ``(N,)`` or a per-layer list)."""
    xp = xp_of(*A)
    zs = z if isinstance(z, (list, tuple)) else [z] * len(A)
    return [xp.einsum("i,iot,idt->od", zi, g, a) for a, g, zi in zip(A, G, zs)]


class OutputOperator:
    """``J v`` and ``Jᵀ w`` on one batch (``f`` = the network output), sharing one forward pass
    (Algorithms 17, 19, 21). ``Jᵀ w = Σ_i J_iᵀ w_i`` is summed over samples by contracting
    the backpropagated ``G_i(w)`` with the patches, without per-sample gradients."""

    def __init__(self, net, params, x):
        self.net = net
        self.params, x = net._prepare(params, x)
        self.tr = net._forward(self.params, x)
        self.f = self.tr.out

    def jvp(self, v):
        """``v``: per-layer ``(out, d)`` → ``J v`` ``(N, C)``."""
        _, df = self.net._push(self.params, self.tr, [t[None] for t in v])
        return df[0]

    def vjp(self, w):
        """``w`` ``(N, C)`` → ``Σ_i J_iᵀ w_i`` per layer ``(out, d)``."""
        xp = xp_of(w)
        G = self.net._pull(self.params, self.tr, w)
        return [xp.einsum("not,ndt->od", g, self.tr.A[k]) for k, g in zip(self.net.trainable_index, G)]


# ------------------------------------------------------------------ base class
@dataclass(frozen=True)
class LMMethod(Method):
    """Hyper-parameters and step logic shared by the LM-damped methods of thesis Ch.5.

    ``lam_init``: initial ``λ_LM`` (§5.8: 1); ``boost`` > 1, ``drop`` ∈ (0, 1), ``eps`` ∈ (0, ½)
    (§5.2.3; §5.8: 1.01, 0.99, ¼); ``tau`` > 0 (§5.8: 0.001); ``n2``: ``N₂ = |S₂|`` (``None``:
    ``S₂ = S₁``); ``accept_threshold``: ``η`` of Theorem 6 (``None``: every step taken, as in
    Algorithm 23).

    State: ``k``, ``lam_lm`` (``λ_LM``), ``lam`` (``λ = λ_LM + τ``, the damping of the *next*
    step), ``rho`` (``ρ`` of the last step, NaN before the first), ``accepted``.
    """

    lam_init: float = 1.0
    boost: float = 1.01
    drop: float = 0.99
    eps: float = 0.25
    tau: float = 1e-3
    n2: int | None = None
    accept_threshold: float | None = None

    def __post_init__(self):
        check_positive(self.lam_init, "lam_init")
        check_positive(self.boost, "boost")
        if not self.boost > 1:
            raise HyperParameterError(f"boost must be > 1 (thesis §5.2.3: drop < 1 < boost), got {self.boost!r}")
        check_positive(self.drop, "drop")
        if not self.drop < 1:
            raise HyperParameterError(f"drop must lie in (0, 1) (thesis §5.2.3: drop < 1 < boost), got {self.drop!r}")
        if isinstance(self.eps, bool) or not np.isfinite(self.eps) or not 0 < self.eps < 0.5:
            raise HyperParameterError(f"eps must lie in (0, 1/2) (thesis §5.2.3), got {self.eps!r}")
        check_positive(self.tau, "tau")
        if self.n2 is not None:
            check_int(self.n2, "n2")
        if self.accept_threshold is not None:
            eta = self.accept_threshold
            if isinstance(eta, bool) or not np.isfinite(eta) or not 0 < eta < self.eps:
                raise HyperParameterError(
                    f"accept_threshold must lie in (0, eps) = (0, {self.eps}) (Theorem 6), got {eta!r}"
                )

    # -------------------------------------------------------------- LM
    def lm(self, lam_lm, rho):
        """:func:`lm_update` with this method's ``boost``, ``drop``, ``eps``."""
        return lm_update(lam_lm, rho, self.boost, self.drop, self.eps)

    def init(self, net, params):
        return {"k": 0, "lam_lm": float(self.lam_init), "lam": float(self.lam_init) + self.tau,
                "rho": float("nan"), "accepted": True}

    # -------------------------------------------------------------- draws
    def draw(self, rng, state, net, params, batch):
        """``S₂ ⊆ S₁`` (Algorithm 23 line 3): ``N₂`` distinct indices into the batch, sorted."""
        N1 = int(np.shape(batch.x)[0])
        if self.n2 is None or self.n2 == N1:
            return {"idx2": np.arange(N1)}
        if self.n2 > N1:
            raise HyperParameterError(f"n2 = {self.n2} exceeds the batch size N1 = {N1} (S2 must be a subset of S1)")
        return {"idx2": np.sort(rng.choice(N1, size=self.n2, replace=False))}

    # -------------------------------------------------------------- step
    def _fast(self, state, net, params, batch, draws):
        return self._step(state, net, params, batch, draws, dense=False)

    def _dense(self, state, net, params, batch, draws):
        return self._step(state, net, params, batch, draws, dense=True)

    def _solve(self, lam, net, params, batch, draws, dense):
        """Return ``(p, g, pBp, extra_state)``: direction ``p = −(B + λI)⁻¹ g`` (per layer), the
        gradient ``g`` on ``S₁``, ``pᵀBp`` with the undamped ``B`` on ``S₂``, extra state."""
        raise NotImplementedError  # pragma: no cover

    def _step(self, state, net, params, batch, draws, dense):
        lam = float(state["lam"])
        if dense:
            params = [np.asarray(to_numpy(W), dtype=F64) for W in net.check_params(params)]
        p, g, pBp, extra = self._solve(lam, net, params, batch, draws, dense)
        x1 = batch.x.astype(F64) if dense else batch.x
        f0 = float(net.loss(params, x1, batch.y, batch.loss))
        gTp = _inner(g, p)
        pred = -gTp - 0.5 * pBp  # m(0) − m(p), (5.5)'s denominator
        trial = [W + P for W, P in zip(params, p)]
        f1 = float(net.loss(trial, x1, batch.y, batch.loss)) if all(
            bool(xp_of(P).isfinite(P).all()) for P in trial) else float("inf")
        if not math.isfinite(f1):
            rho = -math.inf
        elif pred > 0:
            rho = (f0 - f1) / pred
        else:  # pred = ½pᵀBp + λ‖p‖² (Lemma 11) vanishes only for p = 0 (g = 0): λ kept
            rho = float("nan")
        lam_lm = self.lm(float(state["lam_lm"]), rho)
        accepted = self.accept_threshold is None or rho >= self.accept_threshold
        direction = p if accepted else [xp_of(P).zeros_like(P) for P in p]
        new_state = {"k": state["k"] + 1, "lam_lm": lam_lm, "lam": lam_lm + self.tau, "rho": rho,
                     "accepted": bool(accepted)}
        new_state.update(extra)
        return direction, new_state

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _subset(batch, draws):
        idx = draws["idx2"]
        return batch.x[idx], batch.y[idx]

    def _dense_grad(self, net, params, batch):
        return unflatten(cv.grad(net, params, batch.x, batch.y, batch.loss), net)

    @staticmethod
    def _dense_solve(B, g, lam, net):
        """``p = −(B + λI)⁻¹ g`` by Cholesky, ``B`` dense ``(n, n)``: ``(p flat, p per layer)``."""
        gf = flatten(g)
        M = B + lam * np.eye(B.shape[0])
        p = -spd_solve((M + M.T) / 2, gf, name="B + λI")
        return p, unflatten(p, net)


def _fisher_labels(method, draws, batch, idx):
    """Labels for NG's ``B``: the data labels (thesis (5.3)) or the drawn model labels."""
    return draws["y2"] if method.fisher == "mc" else batch.y[idx]


def _draw_fisher_labels(method, rng, net, params, batch, draws):
    """``fisher="mc"``: one label per sample of ``S₂`` from the model, ``y ~ p(·|f(x))``."""
    if method.fisher == "mc":
        x2 = batch.x[draws["idx2"]]
        f2 = net.forward(params, x2)
        draws["y2"] = batch.loss.sample(f2, n_samples=1, seed=rng)[0]
    return draws


# ------------------------------------------------------------------ SMW-GN
@register
@dataclass(frozen=True)
class SMWGN(LMMethod):
    """SMW-GN (thesis Ch.5): ``p = −(B + λI)⁻¹ g`` with the subsampled GGN (5.2), inverted by
    (5.6) or (5.7) with ``J Jᵀ`` from Algorithm 22.

    ``form``: ``"symmetric"`` = (5.6) (needs SPD output Hessians: MSE, BCE), ``"general"`` =
    (5.7), ``"auto"`` = (5.6) when the loss's output Hessians are SPD (MSE; BCE with every
    ``σ'(f) > 0`` numerically), else (5.7) (softmax CE, whose ``H_i`` is singular).

    Extra state: ``form`` (the SMW form used in the last fast step).
    """

    name = "smw_gn"
    seed_ref = "003 Ch.5 (5.2), (5.4)-(5.7), Alg. 17-23"
    summary = "subsampled Gauss-Newton + LM damping, SMW inverse (5.6)/(5.7)"

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

    def capacitance(self, net, params, x2, y2, loss, lam):
        """``D_t`` of (5.6) or (5.7) on the batch ``x2`` (``S₂``), ``(N₂C, N₂C)`` sample-major
        (row ``(i, c)``), built from the Gram blocks of Algorithm 22. Returns ``(D, form)``."""
        K = net.jacobian_gram(params, x2)  # (N, C, N, C)
        xp = xp_of(K)
        N, C = K.shape[:2]
        f = net.forward(params, x2)
        H = loss.hessian(f)  # (N, C, C)
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

    def _solve(self, lam, net, params, batch, draws, dense):
        x2, y2 = self._subset(batch, draws)
        loss = batch.loss
        if dense:
            g = self._dense_grad(net, params, batch)
            B = cv.ggn(net, params, x2, y2, loss)
            pf, p = self._dense_solve(B, g, lam, net)
            return p, g, float(pf @ B @ pf), {"form": "dense"}
        A, G = net.factors(params, batch.x, batch.y, loss)
        g = grad_from_factors(A, G)
        D, form = self.capacitance(net, params, x2, y2, loss, lam)
        op = OutputOperator(net, params, x2)
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
        return p, g, pBp, {"form": form}


# ------------------------------------------------------------------ SMW-NG
@dataclass(frozen=True)
class _FisherLM(LMMethod):
    """Shared by SMW-NG and SMW-NG-BD: the ``fisher`` option and its label draws."""

    fisher: str = "empirical"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.fisher, "fisher", ("empirical", "mc"))

    def draw(self, rng, state, net, params, batch):
        return _draw_fisher_labels(self, rng, net, params, batch, super().draw(rng, state, net, params, batch))


@register
@dataclass(frozen=True)
class SMWNG(_FisherLM):
    """SMW-NG (thesis Ch.5): ``p = −(F + λI)⁻¹ g`` with the subsampled Fisher (5.3), inverted
    by (5.6) with ``H = I``: ``D = λI + (1/N₂) J Jᵀ`` (``N₂ × N₂``, Cholesky), ``J Jᵀ`` from the
    Kronecker structure of §5.3.3.

    ``fisher``: ``"empirical"`` (thesis (5.3): gradients with the data labels) or ``"mc"``
    (one label per sample of ``S₂`` drawn from the model's predictive distribution in
    :meth:`draw`: the authors' code, design §8).
    """

    name = "smw_ng"
    seed_ref = "003 Ch.5 (5.3)-(5.6), §5.3.3, Alg. 23"
    summary = "subsampled (empirical) Fisher natural gradient + LM damping, SMW inverse (5.6)"

    def capacitance(self, net, params, x2, y2, loss, lam):
        """``D_t = λI + (1/N₂) (∇ψ_iᵀ∇ψ_j)_{i,j}`` (5.6) with ``H = I``: ``(N₂, N₂)``."""
        return self._capacitance(*net.factors(params, x2, y2, loss), lam)

    @staticmethod
    def _capacitance(A, G, lam):
        return _ef_capacitance(ef_gram(A, G), lam)

    def _solve(self, lam, net, params, batch, draws, dense):
        idx = draws["idx2"]
        x2, y2 = batch.x[idx], _fisher_labels(self, draws, batch, idx)
        loss = batch.loss
        if dense:
            g = self._dense_grad(net, params, batch)
            B = cv.empirical_fisher(net, params, x2, y2, loss)
            pf, p = self._dense_solve(B, g, lam, net)
            return p, g, float(pf @ B @ pf), {}
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
    (``N₂ × N₂``), ``J_l`` the rows ``∇_{W_l}ψ_iᵀ``. ``fisher`` as in :class:`SMWNG`.
    """

    name = "smw_ng_bd"
    seed_ref = "003 Ch.5 §5.8 (block-diagonal (5.3)), (5.6)"
    summary = "block-diagonal (per layer) SMW-NG + LM damping"

    def capacitance(self, net, params, x2, y2, loss, lam):
        """Per layer ``D_l = λI + (1/N₂) (∇_{W_l}ψ_iᵀ ∇_{W_l}ψ_j)_{i,j}``: list of ``(N₂, N₂)``."""
        return self._capacitance(*net.factors(params, x2, y2, loss), lam)

    @staticmethod
    def _capacitance(A, G, lam):
        return [_ef_capacitance(K, lam) for K in ef_gram(A, G, blocks=True)]

    def _solve(self, lam, net, params, batch, draws, dense):
        idx = draws["idx2"]
        x2, y2 = batch.x[idx], _fisher_labels(self, draws, batch, idx)
        loss = batch.loss
        if dense:
            g = self._dense_grad(net, params, batch)
            blocks = cv.empirical_fisher(net, params, x2, y2, loss, blocks=True)
            p, pBp = [], 0.0
            for Bl, gl in zip(blocks, g):
                M = Bl + lam * np.eye(Bl.shape[0])
                pl = -spd_solve((M + M.T) / 2, gl.ravel(), name="B_l + λI")
                pBp += float(pl @ Bl @ pl)
                p.append(pl.reshape(gl.shape))
            return p, g, pBp, {}
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


__all__ = ["SMWGN", "SMWNG", "SMWNGBD", "SPD_OUTPUT_HESSIAN", "LMMethod", "OutputOperator", "ef_gram",
           "ef_products", "ef_transpose", "grad_from_factors", "lm_update"]
