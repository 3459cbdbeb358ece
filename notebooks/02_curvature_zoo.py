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
# # 2. The curvature zoo
#
# Five matrices on one network, all `n × n` and computed exactly in float64 by
# `refcurv.curvature` ([Ren-thesis] §1.2):
#
# | matrix | definition | function |
# |---|---|---|
# | Hessian `H` | `∇²Ψ = GGN + (1/N) Σ_i Σ_c [∂ℓ/∂f_i]_c ∇²f_{i,c}` ([Ren-thesis] (1.4)) | `hessian` |
# | GGN | `(1/N) Σ_i J_iᵀ H_ℓ(f_i) J_i` | `ggn` |
# | Fisher, exact | `(1/N) Σ_i J_iᵀ E_{y∼p(·|f_i)}[∇_f ℓ ∇_f ℓᵀ] J_i` ([Ren-thesis] (1.7)) | `fisher(kind="exact")` |
# | Fisher, Monte Carlo | `(1/(SN)) Σ_{s,i} ∇ψ_i(ŷ_{s,i}) ∇ψ_i(ŷ_{s,i})ᵀ`, `ŷ ∼ p(·|f_i)` | `fisher(kind="mc")` |
# | empirical Fisher (EF, EFIM) | `(1/N) Σ_i u_i u_iᵀ`, `u_i = ∇ψ_i(y_i)` at the data labels ([SENG] (2)) | `empirical_fisher` |
#
# and where they differ, and why. At the end, [NG+] Figure 1: the EFIM against the
# Kronecker approximation `I ⊗ GFIM` ([NG+] (9)–(10)), with the factor `1/n` that errata
# NG+-5 derives.

# %%
import matplotlib.pyplot as plt
import numpy as np

import refcurv as rc
from refcurv import curvature as cv
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.tolerance import assert_clt, rel_err, tolerance

rng = np.random.default_rng(0)

# %% [markdown]
# ## One network, one batch
#
# A 5-8-4 tanh MLP (n = 84 parameters) with softmax cross-entropy on N = 10 samples: fewer
# samples than parameters, as in any mini-batch, so the ranks below are visible.

# %%
net = Sequential([Linear(5, 8), Tanh(), Linear(8, 4)])
params = net.init(seed=3)
N, C, n = 10, 4, net.n_params
x = rng.standard_normal((N, 5))
y = rng.integers(0, C, N)
ce = CrossEntropy()

H = cv.hessian(net, params, x, y, ce)
GGN = cv.ggn(net, params, x, y, ce)
F = cv.fisher(net, params, x, loss=ce, kind="exact")
F_mc = cv.fisher(net, params, x, loss=ce, kind="mc", n_samples=1, seed=0)
EF = cv.empirical_fisher(net, params, x, y, ce)
R = cv.hessian_residual(net, params, x, y, ce)
zoo = {"Hessian": H, "GGN": GGN, "Fisher (exact)": F, "Fisher (MC, S = 1)": F_mc, "empirical Fisher": EF}
eigs = {k: np.linalg.eigvalsh(M)[::-1] for k, M in zoo.items()}

# %% [markdown]
# ## Their spectra
#
# Eigenvalues sorted by size; a negative eigenvalue is drawn by its magnitude, hollow.

# %%
def plot_spectra(eigs, floor):
    fig, ax = plt.subplots(figsize=(8, 4))
    for (name, ev), m in zip(eigs.items(), "os^vD"):
        k = np.arange(1, len(ev) + 1)
        pos = ev > 0
        line, = ax.plot(k[pos], ev[pos], m, ms=4, label=name)
        ax.plot(k[~pos], -ev[~pos], m, ms=5, mfc="none", color=line.get_color())
    ax.axhline(floor, color="gray", lw=0.8, ls=":")
    ax.text(1, floor * 2, "numerical rank threshold C·n·u·λ_max", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_ylim(floor / 100, None)
    ax.set_xlabel("index")
    ax.set_ylabel("|eigenvalue|  (hollow: negative)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


thr = tolerance(n, kind="residual")   # relative numerical-rank threshold C·n·u
plot_spectra(eigs, thr * eigs["Hessian"].max());

# %% [markdown]
# What the picture says, each statement measured below:
#
# * **GGN = exact Fisher.** For a loss that is the negative log-likelihood of an exponential
#   family in its natural parameters (softmax CE, MSE = Gaussian, sigmoid BCE), the output
#   Hessian `∂²ℓ/∂f²` equals the Fisher of the predictive distribution and does not depend on
#   the label; so the two matrices are the same sum. Their curves coincide.
# * **Ranks.** `H_ℓ = diag(p) − ppᵀ` of softmax has rank `C − 1`, so rank(GGN) ≤ N(C − 1) =
#   30; the EF is a sum of N outer products, rank ≤ N = 10; one MC label per input gives
#   rank ≤ N too. Below the rank the eigenvalues are rounding noise.
# * **The Hessian is indefinite.** The residual term of (1.4) weights the output curvatures
#   `∇²f_c` by the residuals `∂ℓ/∂f_c`, which have both signs: `H` has negative eigenvalues
#   where GGN and Fisher are PSD by construction.
#
# The numerical rank counts eigenvalues above `C · n · u · λ_max` (the tolerance model's
# residual level: what rounding can put into an exactly-zero eigenvalue).

# %%
ranks = {k: int((np.abs(ev) > thr * np.abs(ev).max()).sum()) for k, ev in eigs.items()}
ggn_vs_fisher = rel_err(GGN, F)
split = rel_err(GGN + R, H)
print("numerical ranks:", ranks)
print(f"‖GGN − F‖/‖F‖ = {ggn_vs_fisher:.1e},  ‖GGN + residual − H‖/‖H‖ = {split:.1e}  (tolerance {thr:.1e})")
print(f"smallest eigenvalue: Hessian {eigs['Hessian'].min():.3e}, GGN {eigs['GGN'].min():.1e}")

# %% [markdown]
# **Claims** ([Ren-thesis] (1.4), §1.2.2): `H = GGN + residual`; GGN = exact Fisher for CE;
# GGN, Fisher, EF are PSD while `H` need not be; rank(EF) ≤ N, rank(GGN) ≤ N(C − 1).
# **Hold** (numbers above): the identities to the residual tolerance `C·n·u` (both sides are
# sums of `≤ n`-term products), the ranks exactly, and the Hessian's most negative
# eigenvalue is far below `−C·n·u·λ_max` (a real negative direction, not rounding).

# %%
assert ggn_vs_fisher <= thr and split <= thr
assert ranks["empirical Fisher"] <= N and ranks["Fisher (MC, S = 1)"] <= N and ranks["GGN"] <= N * (C - 1)
assert ranks["Fisher (exact)"] == ranks["GGN"] == N * (C - 1)   # generic inputs attain the bound
for k in ("GGN", "Fisher (exact)", "empirical Fisher"):
    assert eigs[k].min() >= -thr * eigs[k].max(), k
assert eigs["Hessian"].min() < -thr * eigs["Hessian"].max()

# %% [markdown]
# ### Same for MSE
#
# With `½‖f − y‖²` the output Hessian is `I` and the predictive distribution `N(f, I)`:
# again GGN = exact Fisher.

# %%
y_mse = rng.standard_normal((N, C))
mse_err = rel_err(cv.ggn(net, params, x, y_mse, MSE()), cv.fisher(net, params, x, loss=MSE(), kind="exact"))
print(f"MSE: ‖GGN − F‖/‖F‖ = {mse_err:.1e}")
assert mse_err <= thr

# %% [markdown]
# ## Monte-Carlo Fisher: unbiased, with error `∝ S^{−1/2}`
#
# Sampling labels from the model gives an unbiased estimate of the Fisher; its error falls
# like `1/√S` with the number of label samples S per input. Unbiasedness is checked as a
# Monte-Carlo claim: 400 independent one-sample estimates, every entry of their mean within
# the Bonferroni-corrected normal bound of the exact Fisher (family-wise level 10⁻³,
# `refcurv.testing.tolerance.assert_clt`).

# %%
S_grid = [1, 4, 16, 64, 256, 1024]
mc_err = [np.mean([rel_err(cv.fisher(net, params, x, loss=ce, kind="mc", n_samples=S, seed=s), F)
                   for s in range(5)]) for S in S_grid]
draws = np.stack([cv.fisher(net, params, x, loss=ce, kind="mc", n_samples=1, seed=100 + s) for s in range(400)])
slope = np.polyfit(np.log(S_grid), np.log(mc_err), 1)[0]


def plot_mc(S_grid, mc_err):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(S_grid, mc_err, "o-", label="‖F_mc − F‖/‖F‖ (mean of 5 seeds)")
    ax.loglog(S_grid, mc_err[0] / np.sqrt(S_grid), "k--", lw=0.8, label="S^{-1/2}")
    ax.set_xlabel("label samples per input S")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


plot_mc(S_grid, mc_err);
print(f"fitted slope {slope:.2f} (theory −0.5)")
assert_clt(draws, F)

# %% [markdown]
# ## Empirical Fisher ≠ Fisher away from the optimum
#
# The EF uses the *data* labels. Only when the data are distributed as the model predicts
# (at the optimum of a well-specified model) is `u_i u_iᵀ` an unbiased estimate of
# `J_iᵀ F_i J_i`; elsewhere the two matrices differ by O(1) — they can even point the
# preconditioner in different directions (Kunstner, Hennig & Balles, "Limitations of the
# empirical Fisher approximation for natural gradient descent", NeurIPS 2019). We make a well-specified
# problem: a teacher with parameters θ* labels N = 2000 inputs by sampling from its own
# predictive distribution. Per sample, `X_i = u_i u_iᵀ − J_iᵀ F_i J_i` has mean zero at θ*,
# and not at a random θ₀.

# %%
teacher = [3 * W for W in net.init(seed=7)]     # a confident teacher: informative labels
theta0 = net.init(seed=8)
Nb = 2000
xb = rng.standard_normal((Nb, 5))
yb = ce.sample(net.forward(teacher, xb), seed=1)[0]


def show_ef_vs_fisher(p):
    U = cv.per_sample_grads(net, p, xb, yb, ce)                         # (N, n)
    J = cv.jacobian(net, p, xb)                                         # (N, C, n)
    Fi = ce.fisher_output(net.forward(p, xb))                           # (N, C, C)
    X = np.einsum("ip,iq->ipq", U, U) - np.einsum("icp,icd,idq->ipq", J, Fi, J, optimize=True)
    Fp = cv.fisher(net, p, xb, loss=ce, kind="exact")
    return X, rel_err(cv.empirical_fisher(net, p, xb, yb, ce), Fp)


def plot_ef_vs_fisher(sizes, curves):
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for where, e in curves.items():
        ax.loglog(sizes, e, "o-", label=f"at {where}")
    ax.loglog(sizes, curves["θ*"][0] * np.sqrt(sizes[0] / np.array(sizes)), "k--", lw=0.8, label="N^{-1/2}")
    ax.set_xlabel("data points N")
    ax.set_ylabel("‖EF − F‖ / ‖F‖")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


X_star, ef_err_star = show_ef_vs_fisher(teacher)
X_0, ef_err_0 = show_ef_vs_fisher(theta0)
sizes = [62, 125, 250, 500, 1000, 2000]
curves = {w: [rel_err(cv.empirical_fisher(net, p, xb[:m], yb[:m], ce), cv.fisher(net, p, xb[:m], loss=ce, kind="exact"))
              for m in sizes] for w, p in (("θ*", teacher), ("θ₀", theta0))}
plot_ef_vs_fisher(sizes, curves);
print(f"‖EF − F‖/‖F‖ at the teacher θ*: {ef_err_star:.3f};  at a random θ₀: {ef_err_0:.3f}")

# %% [markdown]
# **Claim** ([Ren-thesis] §1.2.2; Kunstner et al. 2019): EF = Fisher in expectation at the optimum
# of a well-specified model, not elsewhere. **Holds**: at θ* the per-sample differences have
# mean zero within the CLT bound — what is left (printed above) is sampling noise, falling
# like `1/√N` in the figure — while at θ₀ the CLT check rejects and the relative difference
# stays O(1) however much data is used.

# %%
assert_clt(X_star, np.zeros((n, n)))
try:
    assert_clt(X_0, np.zeros((n, n)))
    raise RuntimeError("EF = Fisher at θ₀ would contradict the claim")
except AssertionError:
    pass

# %% [markdown]
# ## [NG+] Figure 1: EFIM vs `I ⊗ GFIM`
#
# NG+ approximates the EFIM of an `m × n` layer gradient `𝒢` by a Kronecker product with
# the GFIM `L = E[𝒢𝒢ᵀ]` ((9)–(10)) and states (line 96) that for i.i.d. columns "the EFIM and
# `I ⊗ GFIM` are equivalent in expectation", illustrated by 2000 Gaussian 200 × 200 matrices
# (Figure 1: a diagonal block of EFIM minus that of `I ⊗ GFIM`).
#
# Errata NG+-5: for columns i.i.d. `N(0, Σ)`, a diagonal block of `E[vec 𝒢 vec 𝒢ᵀ]` (paper's
# column-major vec) is `Σ`, while `E[𝒢𝒢ᵀ] = n Σ`. So `EFIM = I_n ⊗ GFIM / n` in expectation:
# the printed version is off by the factor `n`. The trace-preserving form of (9) is
# `a aᵀ ≈ (‖a‖²/n) I`.
#
# Here: S = 2000 Gaussian `m × n` matrices with m = n = 20 (400 × 400 EFIM) and a
# correlated Σ; the block is the first `m × m` diagonal block.

# %%
m, ncol, S = 20, 20, 2000
Lc = np.linalg.cholesky(0.5 * np.eye(m) + 0.5 * np.full((m, m), 0.3) + 0.2 * np.diag(rng.random(m)))
Gs = np.einsum("ab,sbn->san", Lc, rng.standard_normal((S, m, ncol)))     # columns i.i.d. N(0, Σ)
vec_col = Gs.transpose(0, 2, 1).reshape(S, m * ncol)                    # column-major vec (paper)
EFIM = vec_col.T @ vec_col / S
GFIM = np.einsum("sab,scb->ac", Gs, Gs) / S
block = EFIM[:m, :m]
printed_err = rel_err(GFIM, block)
corrected_err = rel_err(GFIM / ncol, block)
print(f"first diagonal block: ‖GFIM − block‖/‖block‖ = {printed_err:.2f} (printed);  "
      f"‖GFIM/n − block‖/‖block‖ = {corrected_err:.3f} (with 1/n)")


def plot_ngplus_figure1(block, GFIM, n):
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    vmax = abs(block).max()
    for a, M, t in zip(ax, [block, block - GFIM, block - GFIM / n],
                       ["EFIM diagonal block", "block − GFIM  (NG+ (10) as printed)", "block − GFIM / n  (errata NG+-5)"]):
        im = a.imshow(M, cmap="RdBu_r", vmin=-vmax * (n if "printed" in t else 1), vmax=vmax * (n if "printed" in t else 1))
        a.set_title(t, fontsize=9)
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.tight_layout()
    return fig


plot_ngplus_figure1(block, GFIM, ncol);

# %% [markdown]
# **Claim** ([NG+] line 96, Figure 1): EFIM and `I ⊗ GFIM` are equivalent in expectation.
# **Does not hold as printed**: the block differs from GFIM by the factor n = 20 (relative
# difference ≈ n − 1, printed above; the middle panel's colour scale is n times wider).
# **Holds with 1/n**: `I ⊗ GFIM/n` matches in expectation — the per-matrix differences
# `g₁g₁ᵀ − 𝒢𝒢ᵀ/n` (g₁ the first column) pass the CLT check, the printed ones are rejected.

# %%
first_col = Gs[:, :, 0]
D_corrected = np.einsum("sa,sb->sab", first_col, first_col) - np.einsum("sab,scb->sac", Gs, Gs) / ncol
D_printed = np.einsum("sa,sb->sab", first_col, first_col) - np.einsum("sab,scb->sac", Gs, Gs)
assert_clt(D_corrected, np.zeros((m, m)))
try:
    assert_clt(D_printed, np.zeros((m, m)))
    raise RuntimeError("the printed (10) would hold in expectation")
except AssertionError:
    pass
# Size of the sampling noise: for Gaussian x, Var(x_a x_b) = Σ_aa Σ_bb + Σ_ab², so the block (S
# columns) has E‖block − Σ‖²_F = (tr(Σ)² + ‖Σ‖²_F)/S and GFIM/n (S·n columns) 1/n of that; the
# relative error is ≈ rms/‖Σ‖_F. Both measured numbers must lie within 3 rms of their expectation.
Sigma = Lc @ Lc.T
rms = np.sqrt((np.trace(Sigma) ** 2 + np.sum(Sigma ** 2)) * (1 + 1 / ncol) / S) / np.linalg.norm(Sigma)
print(f"expected sampling error (rms) {rms:.3f}")
assert corrected_err <= 3 * rms
assert abs(printed_err - (ncol - 1)) <= 3 * ncol * rms
