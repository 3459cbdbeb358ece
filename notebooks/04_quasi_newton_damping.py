# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Quasi-Newton and damping (K-BFGS)
#
# K-BFGS ([Ren-thesis] Ch. 2) preconditions each layer's gradient as `−H_g ∇W H_a`, with two
# small matrices maintained by BFGS:
#
# * `H_a ≈ (A + λ_A I)⁻¹` by **"Hessian-action" BFGS** (§2.4): `s = H_a ā`, `y = A^{LM} s`.
#   Theorem 1 says why this is sound: for `s = Ha`, `y = A⁺s` with `A⁺ = A + c aaᵀ` and
#   `H = A⁻¹`, *every* Broyden-family update returns `(A⁺)⁻¹` — it is Sherman–Morrison.
# * `H_g ≈ G⁻¹` by BFGS on pairs `(s, y)` from two passes over the same mini-batch. Nothing
#   makes `sᵀy > 0` on a non-convex loss, so the pair is **double-damped** (Algorithm 3):
#   Powell's damping on `H` (guarantees `s̃ᵀy ≥ μ₁ yᵀHy`), then Powell with `B = I` (an LM
#   damping: `s̃ᵀỹ ≥ μ₂ s̃ᵀs̃`). The convergence argument also wants
#   `ỹᵀHỹ / s̃ᵀỹ ≤ 2/μ₁`, which DD does not guarantee; §2.3 reports that "at least 90 % of
#   the iterations" satisfy it (Figure 2.1).
#
# This notebook checks Theorem 1 (and its momentum caveat), runs K-BFGS on an autoencoder of
# scikit-learn's bundled digits, checks the two DD invariants at every update, and measures
# the 2/μ₁ fraction. (Errata KM2: Algorithm 5's skip test uses `1/μ₁`, the prose `2/μ₁`;
# both fractions are shown.)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

from refcurv.linalg.quasi_newton import broyden_update_H
from refcurv.linalg.woodbury import sherman_morrison
from refcurv.methods import REGISTRY, Batch
from refcurv.methods.kbfgs import ratio_fraction
from refcurv.nn import BCE, Linear, ReLU, Sequential
from refcurv.testing.tolerance import rel_err, tolerance

rng = np.random.default_rng(0)

# %% [markdown]
# ## Theorem 1: Hessian-action BFGS = Sherman–Morrison
#
# An SPD `A` with condition number 10³ (constructed: `Q diag(λ) Qᵀ`, so κ is known), a vector
# `a`, `c = 0.7`; `H = A⁻¹`, `s = Ha`, `y = A⁺s`. For φ ∈ [0, 1] (φ = 1 BFGS, φ = 0 DFP) the
# update (2.11) must equal `SM = (A + c aaᵀ)⁻¹`. Both sides are computed from `H` in float64:
# the forward error of inverting `A⁺`, tolerance `C · n · u · κ(A⁺) · κ(A)` (the error
# already in `H = A⁻¹` is amplified once more), as in `refcurv verify`'s check.

# %%
n, c = 12, 0.7
Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
A = Q @ np.diag(np.logspace(0, 3, n)) @ Q.T
a = rng.standard_normal(n)
H = np.linalg.inv(A)
A_plus = A + c * np.outer(a, a)
s, yv = H @ a, A_plus @ (H @ a)
SM = sherman_morrison(H, np.sqrt(c) * a)
tol_thm1 = tolerance(n, np.linalg.cond(A_plus) * np.linalg.cond(A))
phis = np.linspace(0, 1, 11)
thm1_err = [rel_err(broyden_update_H(H, s, yv, phi), SM) for phi in phis]

# %% [markdown]
# **The momentum caveat** (after Theorem 1): with a moving average `A⁺ = βA + (1 − β)aaᵀ` the
# theorem needs `H/β` in place of `H` (`(βA)⁻¹ = H/β`); refcurv, like the thesis's
# implementation, uses the unscaled `H` — so `H_a` is then *not* the exact inverse. Both:

# %%
beta = 0.9
A_ema = beta * A + (1 - beta) * np.outer(a, a)
exact_ema = np.linalg.inv(A_ema)
s_ema = H @ a
unscaled = broyden_update_H(H, s_ema, A_ema @ s_ema, 1.0)
s_sc = (H / beta) @ a
scaled = broyden_update_H(H / beta, s_sc, A_ema @ s_sc, 1.0)
caveat = {"H scaled by 1/β": rel_err(scaled, exact_ema), "H unscaled (as used)": rel_err(unscaled, exact_ema)}


def plot_theorem1(phis, thm1_err, tol, caveat):
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw=dict(width_ratios=[3, 2]))
    ax[0].semilogy(phis, np.maximum(thm1_err, 1e-18), "o-", label="‖Broyden(φ) − SM‖ / ‖SM‖")
    ax[0].axhline(tol, color="tab:red", ls="--", label="tolerance C·n·u·κ(A⁺)κ(A)")
    ax[0].set_xlabel("φ  (0: DFP, 1: BFGS)")
    ax[0].legend(fontsize=8)
    ax[0].set_title("Theorem 1: every Broyden update is Sherman–Morrison", fontsize=9)
    ax[1].bar(list(caveat), list(caveat.values()), color=["tab:green", "tab:orange"])
    ax[1].set_yscale("log")
    ax[1].set_title("moving average A⁺ = βA + (1−β)aaᵀ: error vs (A⁺)⁻¹", fontsize=9)
    fig.tight_layout()
    return fig


plot_theorem1(phis, thm1_err, tol_thm1, caveat);
print(f"Theorem 1: worst error {max(thm1_err):.1e} (tolerance {tol_thm1:.1e});  momentum: "
      + ", ".join(f"{k}: {v:.1e}" for k, v in caveat.items()))

# %% [markdown]
# **Claim** ([Ren-thesis] Theorem 1): for `s = Ha`, `y = A⁺s`, every Broyden update with
# φ ∈ [0, 1] equals `(A⁺)⁻¹`. **Holds** to the forward-error tolerance for all 11 φ. The
# caveat also holds: with the moving average, only the `1/β`-scaled `H` gives the exact
# inverse; the unscaled update used in practice is off by O(10⁻¹).

# %%
assert max(thm1_err) <= tol_thm1
assert caveat["H scaled by 1/β"] <= tolerance(n, np.linalg.cond(A_ema) * np.linalg.cond(A))
assert caveat["H unscaled (as used)"] > 1e3 * tolerance(n, np.linalg.cond(A_ema) * np.linalg.cond(A))

# %% [markdown]
# ## K-BFGS on a digits autoencoder
#
# Figure 2.1 is measured on autoencoders (MNIST, FACES, CURVES). At notebook scale:
# scikit-learn's 8 × 8 digits (1797 images, pixels scaled to [0, 1]), a 64-32-8-32-64 ReLU
# autoencoder with sigmoid-BCE, mini-batches of 64, 250 steps, learning rate 0.1, and the
# thesis's hyper-parameters (refcurv's defaults: λ = 0.3, so `λ_A = λ_G = μ₂ = √λ`; μ₁ = 0.2;
# momentum and moving averages 0.9; Algorithm 4, no skipping). `kbfgs-mlp` keeps `H_g` as a
# dense BFGS matrix, `kbfgs-l-mlp` as L-BFGS (the variant of Figure 2.1). The loop is written
# out so that the state can be read after every step.

# %%
X = load_digits().data / 16.0
net = Sequential([Linear(64, 32), ReLU(), Linear(32, 8), ReLU(), Linear(8, 32), ReLU(), Linear(32, 64)])
loss = BCE()
STEPS, BATCH, LR = 250, 64, 0.1


def show_run(name):
    method = REGISTRY[name]()
    params = net.init(seed=0)
    state = method.init(net, params)
    state = method.warm_start(state, net, params, Batch(X, X, loss))   # A from the whole set (§2.8.2)
    data_rng = np.random.default_rng(1)
    records, losses = [], [float(net.loss(params, X, X, loss))]
    t0 = time.perf_counter()
    for k in range(STEPS):
        idx = data_rng.choice(len(X), BATCH, replace=False)
        H_before = state.H_g if name == "kbfgs-mlp" else None
        d, state = method.step(state, net, params, Batch(X[idx], X[idx], loss), rng=data_rng)
        params = [W + LR * D for W, D in zip(params, d)]
        for layer, rec in enumerate(state.last_pairs or []):   # None before the first update
            if rec is not None and rec.k == k:          # an H_g update made during this step's call
                records.append((k, layer, rec, None if H_before is None else H_before[layer],
                                np.linalg.eigvalsh(state.H_g[layer]).min() if name == "kbfgs-mlp" else np.nan))
        losses.append(float(net.loss(params, X, X, loss)))
    return dict(state=state, records=records, losses=losses, seconds=time.perf_counter() - t0,
                lambda_G=state.lambda_G, mu1=method.mu1)


runs = {name: show_run(name) for name in ("kbfgs-mlp", "kbfgs-l-mlp")}
for name, r in runs.items():
    print(f"{name}: loss {r['losses'][0]:.2f} → {r['losses'][-1]:.2f} in {r['seconds']:.1f} s, "
          f"{len(r['records'])} H_g pair records")

# %% [markdown]
# ### Built fast, checked against the dense form
#
# Each K-BFGS step has a dense form: a literal float64 replay of Algorithm 4 that forms
# `H_g ⊗ H_a` and solves with it (`step(..., dense=True)`). On a 64-4-64 autoencoder (small
# enough to form the Kronecker products) both forms are run from the same state at each of 30
# steps, the trajectory driven by the fast form; a direction is a solve, so the tolerance is
# `C · n · u · κ` with κ the condition number of the step's curvature operator
# (`method.curvature(state)`).

# %%
small = Sequential([Linear(64, 4), ReLU(), Linear(4, 64)])
fd = {}
for name in ("kbfgs-mlp", "kbfgs-l-mlp"):
    method, p_s = REGISTRY[name](), small.init(seed=0)
    st = method.warm_start(method.init(small, p_s), small, p_s, Batch(X, X, loss))
    data_rng, worst = np.random.default_rng(2), 0.0
    for k in range(30):
        idx = data_rng.choice(len(X), BATCH, replace=False)
        b = Batch(X[idx], X[idx], loss)
        d_fast, st_next = method.step(st, small, p_s, b)
        d_dense, _ = method.step(st, small, p_s, b, dense=True)
        ev = method.curvature(st_next).eigvalsh()
        err = rel_err(np.concatenate([D.ravel() for D in d_fast]), np.concatenate([D.ravel() for D in d_dense]))
        worst = max(worst, err / tolerance(small.n_params, ev.max() / ev.min()))
        p_s, st = [W + LR * D for W, D in zip(p_s, d_fast)], st_next
    fd[name] = worst
print("worst ‖d_fast − d_dense‖/‖d_dense‖ ÷ tolerance over 30 steps:", {k: f"{v:.1e}" for k, v in fd.items()})
assert all(v <= 1 for v in fd.values())

# %% [markdown]
# ## The damping invariants along the run
#
# For every `H_g` update of `kbfgs-mlp`, with `H` the `H_g` before the update (read from the
# state the step was given):
#
# * Powell on H: `s̃ᵀy / yᵀHy ≥ μ₁` (with equality when the damping acts, θ₁ < 1);
# * Powell with B = I: `s̃ᵀỹ / s̃ᵀs̃ ≥ μ₂ = λ_G`;
# * hence `s̃ᵀỹ > 0` and BFGS keeps `H_g` positive definite: `λ_min(H_g) > 0`.
#
# Each ratio is a quotient of inner products of length `d ≤ 65`; Powell's equality case is
# computed, not exact, so the invariants are checked with the residual slack `C · d · u`.

# %%
r = runs["kbfgs-mlp"]
mu1 = r["mu1"]
inv = []
for k, layer, rec, Hb, lmin in r["records"]:
    if not rec.used:
        continue
    powell_H = (rec.s_t @ rec.y) / (rec.y @ Hb @ rec.y)
    powell_I = (rec.s_t @ rec.y_t) / (rec.s_t @ rec.s_t)
    inv.append((k, layer, powell_H, powell_I, r["lambda_G"][layer], rec.theta1, rec.ratio, lmin))
inv = np.array(inv)
slack = tolerance(65, kind="residual")


def plot_invariants(inv, mu1):
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    for layer in np.unique(inv[:, 1]).astype(int):
        sel = inv[:, 1] == layer
        ax[0].semilogy(inv[sel, 0], inv[sel, 2], ".", ms=3, label=f"layer {layer}")
        ax[1].semilogy(inv[sel, 0], inv[sel, 3] / inv[sel, 4], ".", ms=3, label=f"layer {layer}")
        ax[2].semilogy(inv[sel, 0], inv[sel, 6], ".", ms=3, label=f"layer {layer}")
    ax[0].axhline(mu1, color="k", ls="--", lw=0.8)
    ax[0].set_title("Powell on H:  s̃ᵀy / yᵀHy  ≥ μ₁ (dashed)", fontsize=9)
    ax[1].axhline(1.0, color="k", ls="--", lw=0.8)
    ax[1].set_title("Powell with B = I:  (s̃ᵀỹ / s̃ᵀs̃) / μ₂  ≥ 1", fontsize=9)
    ax[2].axhline(1 / mu1, color="tab:orange", ls="--", lw=0.8, label="1/μ₁")
    ax[2].axhline(2 / mu1, color="tab:red", ls="--", lw=0.8, label="2/μ₁")
    ax[2].set_title("ỹᵀHỹ / s̃ᵀỹ", fontsize=9)
    for a in ax:
        a.set_xlabel("step")
    ax[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


plot_invariants(inv, mu1);
active = inv[:, 5] < 1
print(f"{len(inv)} updates; Powell on H active in {active.mean():.0%}; "
      f"min s̃ᵀy/(μ₁ yᵀHy) = {(inv[:, 2] / mu1).min():.6f}, min s̃ᵀỹ/(μ₂ s̃ᵀs̃) = {(inv[:, 3] / inv[:, 4]).min():.6f}, "
      f"min λ_min(H_g) = {inv[:, 7].min():.2e}")

# %% [markdown]
# **Claim** ([Ren-thesis] Algorithm 3, §2.3.1): after DD, `s̃ᵀy ≥ μ₁ yᵀHy` and
# `s̃ᵀỹ ≥ μ₂ s̃ᵀs̃`, so `H_g` stays positive definite. **Holds** at every update of the run
# (the minima printed above are ≥ 1 − C·d·u; where Powell on H is active the first holds
# with equality, as the flat floor of the left panel shows).

# %%
assert np.all(inv[:, 2] >= mu1 * (1 - slack))
assert np.all(inv[:, 3] >= inv[:, 4] * (1 - slack))
assert np.all(inv[:, 7] > 0)
assert np.allclose(inv[active, 2], mu1, rtol=slack, atol=0)   # equality when θ₁ < 1

# %% [markdown]
# ## How often is `ỹᵀHỹ / s̃ᵀỹ ≤ 2/μ₁`?
#
# Per layer, the fraction of (non-degenerate) `H_g` pairs with the ratio below 2/μ₁, from
# the run's `state.diagnostics` (`refcurv.methods.kbfgs.ratio_fraction`) — the statistic of
# Figure 2.1, here over the whole run instead of per epoch — and below 1/μ₁ (Algorithm 5's
# threshold). The per-pair records above count the same thing; they must agree.

# %%
fractions = {}
for name, rr in runs.items():
    st = rr["state"]
    d = st.diagnostics
    f2 = ratio_fraction(st)
    f1 = [w / (p - z) for p, z, w in zip(d["pairs"], d["pairs_degenerate"], d["ratio_le_1"])]
    fractions[name] = (f2, f1)
    print(f"{name}: ≤ 2/μ₁ per layer {np.round(f2, 3).tolist()},  ≤ 1/μ₁ {np.round(f1, 3).tolist()}")
rec_frac = [np.mean(inv[inv[:, 1] == layer, 6] <= (2 / mu1) * (1 + slack)) for layer in range(4)]


def plot_fractions(fractions):
    fig, ax = plt.subplots(figsize=(7, 3.4))
    w = 0.2
    for j, (name, (f2, f1)) in enumerate(fractions.items()):
        xs = np.arange(len(f2)) + (2 * j - 1.5) * w
        ax.bar(xs, f2, w, label=f"{name}: ≤ 2/μ₁")
        ax.bar(xs + w, f1, w, label=f"{name}: ≤ 1/μ₁", alpha=0.6)
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.text(-0.45, 0.905, "thesis: ≥ 90 %", fontsize=8)
    ax.set_xticks(range(4), [f"layer {i}" for i in range(4)])
    ax.set_ylim(0.5, 1.02)
    ax.set_ylabel("fraction of H_g pairs")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


plot_fractions(fractions);

# %% [markdown]
# **Claim** ([Ren-thesis] §2.3, Figure 2.1): at least 90 % of the iterations satisfy
# `yᵀHy/sᵀy ≤ 2/μ₁` without skipping. **Holds at this scale** for every layer of both
# K-BFGS and K-BFGS(L) (printed above; the run is deterministic, so the assertion below is a
# regression check of the whole pipeline — data, damping, BFGS — not a statistical test).
# Against the stricter 1/μ₁ of Algorithm 5 (errata KM2) the fractions are lower but still
# above 90 % here; note that pairs sit exactly *at* 1/μ₁ whenever Powell on H acts and the
# LM step does not, so that test is decided by rounding unless it carries a slack (refcurv
# uses √eps). And K-BFGS trains: the loss falls (first/last printed above).

# %%
assert np.allclose(rec_frac, fractions["kbfgs-mlp"][0], atol=0), (rec_frac, fractions["kbfgs-mlp"][0])
for name, (f2, f1) in fractions.items():
    assert min(f2) >= 0.9, (name, f2)
    assert all(b <= a for a, b in zip(f2, f1))
    assert runs[name]["losses"][-1] < 0.8 * runs[name]["losses"][0]
