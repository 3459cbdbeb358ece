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
# # 1. Autodiff from scratch
#
# Every curvature matrix in refcurv is built from four passes over the network, written once
# in `refcurv.nn.autodiff` as pure functions of arrays and batched over the samples:
#
# | pass | equation | function |
# |---|---|---|
# | forward | `A_l = A(a_{l−1})`, `h_l = W_l A_l`, `a_l = φ(h_l)` ([Ren-thesis] Alg. 1, Alg. 17) | `forward_trace` |
# | backward | `G_L = ∂ψ/∂f`, `G_{l−1} = φ'(h) ⊙ A*(W_lᵀ G_l)` ([Ren-thesis] Alg. 1, Alg. 18) | `pull_cotangents` |
# | per-sample gradient | `∇_{W_l} ψ_i = G_{l,i} A_{l,i}ᵀ` ([Ren-thesis] (2.1), Theorem 3 i; [SENG] (3)) | `weight_grads` |
# | R-op (forward tangents) | `R{h_l} = W_l A(R{a_{l−1}}) + R{W_l} A_l` ([Ren-thesis] (5.11), Alg. 19) | `push_tangents`, `jvp` |
#
# and the R-operator of the backward pass (Pearlmutter) for Hessian-vector products. This
# notebook runs each pass on a small MLP and a small CNN and checks it against HIPS
# `autograd`, which differentiates a transcription of the same network written in
# `autograd.numpy` (the only code defined here: the reference, not an algorithm).
#
# **Conventions** (README "Conventions"): one matrix `W_l ∈ R^{out × (fan_in+1)}` per layer with
# the bias as last column; θ is the row-major concatenation of the `W_l`; per-sample losses
# ψ_i, objective their mean; conv patches ordered `(c_in, kh, kw)` with the ones row last.

# %%
import time

import autograd.numpy as anp
import matplotlib.pyplot as plt
import numpy as np
from autograd import hessian, jacobian, make_jvp

import refcurv as rc
from refcurv import curvature as cv
from refcurv.nn import Conv2d, CrossEntropy, Flatten, Linear, Sequential, Softplus, Tanh
from refcurv.nn import autodiff as ad
from refcurv.testing.tolerance import rel_err, tolerance

rng = np.random.default_rng(0)
loss = CrossEntropy()

# %% [markdown]
# ## The networks
#
# A 4-6-5-3 tanh MLP and a CNN `conv(2→3, 3×3, pad 1) – softplus – conv(3→2, 3×3, stride 2) –
# tanh – flatten – linear(8→3)` on 5×5 inputs, both with softmax cross-entropy, N = 7.

# %%
mlp = Sequential([Linear(4, 6), Tanh(), Linear(6, 5), Tanh(), Linear(5, 3)])
cnn = Sequential([Conv2d(2, 3, 3, padding=1), Softplus(), Conv2d(3, 2, 3, stride=2), Tanh(), Flatten(),
                  Linear(8, 3)])
N = 7
problems = {
    "MLP": (mlp, mlp.init(seed=1), rng.standard_normal((N, 4))),
    "CNN": (cnn, cnn.init(seed=2), rng.standard_normal((N, 2, 5, 5))),
}
y = rng.integers(0, 3, N)
for name, (net, params, x) in problems.items():
    print(f"{name}: n = {net.n_params} parameters, layer matrices {[W.shape for W in params]}")

# %% [markdown]
# ## The independent reference: the same networks in `autograd.numpy`
#
# Written from the conventions above, not from refcurv's code: a dense layer is
# `z Wᵀ + b`, a convolution is the direct sum `h[n,o,p,q] = Σ_{c,i,j} w[o,c,i,j] x[n,c,sp+i,sq+j] + b[o]`
# (PyTorch's cross-correlation, zero padding), Flatten is row-major over `(C, H, W)`, and the
# per-sample loss is `logsumexp(f) − f_y`.

# %%
def reference_unflatten(net, theta):
    shapes, out, start = net.param_shapes, [], 0
    for o, d in shapes:
        out.append(anp.reshape(theta[start:start + o * d], (o, d)))
        start += o * d
    return out


def reference_conv(x, W, c_in, k, stride, pad):
    c_out = W.shape[0]
    w = anp.reshape(W[:, :-1], (c_out, c_in, k, k))
    x = anp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="constant")
    Ho, Wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    h = 0.0
    for i in range(k):
        for j in range(k):
            xs = x[:, :, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]
            h = h + anp.einsum("oc,ncpq->nopq", w[:, :, i, j], xs)
    return h + anp.reshape(W[:, -1], (1, c_out, 1, 1))


def reference_forward(name, theta, x):
    if name == "MLP":
        W1, W2, W3 = reference_unflatten(mlp, theta)
        z = anp.tanh(anp.dot(x, W1[:, :-1].T) + W1[:, -1])
        z = anp.tanh(anp.dot(z, W2[:, :-1].T) + W2[:, -1])
        return anp.dot(z, W3[:, :-1].T) + W3[:, -1]
    W1, W2, W3 = reference_unflatten(cnn, theta)
    z = anp.logaddexp(0.0, reference_conv(x, W1, 2, 3, 1, 1))
    z = anp.tanh(reference_conv(z, W2, 3, 3, 2, 0))
    z = anp.reshape(z, (z.shape[0], -1))
    return anp.dot(z, W3[:, :-1].T) + W3[:, -1]


def reference_losses(name, theta, x, y):
    f = reference_forward(name, theta, x)
    fmax = anp.max(f, axis=1, keepdims=True)
    lse = anp.log(anp.sum(anp.exp(f - fmax), axis=1)) + fmax[:, 0]
    return lse - f[anp.arange(f.shape[0]), y]


# %% [markdown]
# ## Forward and backward pass, per-sample gradients `G_i A_iᵀ`
#
# `forward_trace` keeps each trainable layer's patches `A_l` `(N, d, T)` (for a Linear layer
# `T = 1`; for a conv layer `T` = output locations, the im2col columns with a ones row).
# `pull_cotangents` pulls the per-sample output gradient `∂ψ_i/∂f_i` back to every
# pre-activation: `G_l` `(N, out, T)`. The per-sample gradient of a layer is then one batched
# matrix product, `G_{l,i} A_{l,i}ᵀ` — for a conv layer the sum over locations
# `Σ_t g_t a_tᵀ` of [Ren-thesis] Theorem 3 (i), no loop over samples.

# %%
results = {}
for name, (net, params, x) in problems.items():
    tr = ad.forward_trace(net.layers, params, x)
    G = ad.pull_cotangents(net.layers, params, tr, loss.grad(tr.out, y))
    U = ad.flatten_layers(ad.weight_grads(tr.patches, G))          # (N, n), row-major θ
    theta = rc.flatten(params)
    U_ref = jacobian(lambda th: reference_losses(name, th, x, y))(theta)   # (N, n): ∂ψ_i/∂θ
    results[name] = dict(net=net, params=params, x=x, tr=tr, G=G, U=U, U_ref=U_ref, theta=theta)
    print(name, "A shapes", [a.shape for a in tr.patches], " G shapes", [g.shape for g in G])

# %% [markdown]
# ### How close must two float64 autodiff results be?
#
# refcurv and autograd evaluate the same exact formulas in a different order, so they differ
# only by rounding. Each entry is a sum of at most `n` (the parameter count) products of
# O(1) factors, and no quantity here is a solve, so the comparison is a *residual* in the
# tolerance model: `C · n · u` with `u` = float64 roundoff and `C = 100`
# (`refcurv.testing.tolerance.tolerance(n, kind="residual")`). A wrong term (a missing
# `φ'`, a transposed patch, a bias in the wrong column) shows up at O(1), some 12 orders of
# magnitude above it.

# %%
errors = {}
for name, r in results.items():
    n = r["net"].n_params
    tol = tolerance(n, kind="residual")
    errors[(name, "f(x)")] = (rel_err(r["tr"].out, reference_forward(name, r["theta"], r["x"])), tol)
    errors[(name, "per-sample ∇ψ_i = G_i A_iᵀ")] = (rel_err(r["U"], r["U_ref"]), tol)
    errors[(name, "mean ∇Ψ")] = (rel_err(rc.flatten(r["net"].grad(r["params"], r["x"], y, loss)),
                                         r["U_ref"].mean(axis=0)), tol)
for (name, what), (e, tol) in errors.items():
    print(f"{name:4s} {what:28s} rel. error {e:.1e}   tolerance {tol:.1e}")

# %% [markdown]
# ### One conv sample, drawn
#
# The first conv layer's gradient for sample 0 is the product of `G_0` (3 channels × 25
# output locations) and the transpose of `A_0` (2·3·3 + 1 = 19 patch rows × 25 locations).

# %%
def plot_outer_product(r, i=0, layer=0):
    A, G = r["tr"].patches[layer][i], r["G"][layer][i]
    grad = G @ A.T
    n0 = grad.size
    ref = r["U_ref"][i, :n0].reshape(grad.shape)
    fig, ax = plt.subplots(1, 4, figsize=(13, 2.8), gridspec_kw=dict(width_ratios=[25, 25, 19, 19]))
    for a, M, title in zip(ax, [G, A, grad, ref], [f"G_{i}  (out × T)", f"A_{i}  (d × T)",
                                                   f"G_{i} A_{i}ᵀ  (refcurv)", "∂ψ_i/∂W  (autograd)"]):
        im = a.imshow(M, cmap="RdBu_r", aspect="auto", vmin=-abs(M).max(), vmax=abs(M).max())
        a.set_title(title)
        fig.colorbar(im, ax=a, fraction=0.05)
    fig.tight_layout()
    return fig


plot_outer_product(results["CNN"]);

# %% [markdown]
# ## R-op: Jacobian-vector products and Hessian-vector products
#
# `push_tangents` carries `R{·}` forward: with a tangent `V_l` per layer it returns `J_i v`
# for every sample at once (`jvp`, [Ren-thesis] Alg. 19 with the erratum E2: the weight
# tangent multiplies the *primal* input). Differentiating the backward pass along the same
# tangent (`pull_cotangents(..., rop=...)`, inside `Sequential.hvp_per_sample`) gives the exact
# per-sample Hessian-vector products `∇²ψ_i v` — second-order backprop, no finite
# differences. autograd's counterparts: `make_jvp` on the network (forward mode) and on its
# per-sample gradients (forward-over-reverse), and `hessian` of the mean loss.

# %%
K = 3   # tangents at once
for name, r in results.items():
    net, params, x, theta = r["net"], r["params"], r["x"], r["theta"]
    V = [rng.standard_normal((K,) + W.shape) for W in params]
    Vflat = ad.flatten_layers(V)                                              # (K, n)
    Jv = ad.jvp(net.layers, params, r["tr"], V)                               # (K, N, C)
    Jv_ref = np.stack([make_jvp(lambda th: reference_forward(name, th, x))(theta)(v)[1] for v in Vflat])
    Hv = ad.flatten_layers(net.hvp_per_sample(params, x, y, loss, V))         # (K, N, n)
    per_sample_grad = jacobian(lambda th: reference_losses(name, th, x, y))          # θ ↦ (N, n)
    Hv_ref = np.stack([make_jvp(per_sample_grad)(theta)(v)[1] for v in Vflat])      # forward over reverse
    H_ref = hessian(lambda th: anp.mean(reference_losses(name, th, x, y)))(theta)
    tol = tolerance(net.n_params, kind="residual")
    errors[(name, "R-op  J_i v")] = (rel_err(Jv, Jv_ref), tol)
    errors[(name, "R-op  ∇²ψ_i v")] = (rel_err(Hv, Hv_ref), tol)
    errors[(name, "Hessian ∇²Ψ (n × n)")] = (rel_err(cv.hessian(net, params, x, y, loss), H_ref), tol)
for (name, what), (e, tol) in errors.items():
    if what.startswith(("R-op", "Hessian")):
        print(f"{name:4s} {what:28s} rel. error {e:.1e}   tolerance {tol:.1e}")

# %% [markdown]
# ## Every quantity against autograd

# %%
def plot_errors(errors):
    labels = [f"{name}: {what}" for name, what in errors]
    errs = np.array([max(e, 1e-18) for e, _ in errors.values()])
    tols = np.array([t for _, t in errors.values()])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1))
    yy = np.arange(len(labels))
    ax.barh(yy, errs, color="tab:blue", label="‖refcurv − autograd‖ / ‖autograd‖")
    ax.scatter(tols, yy, marker="|", s=200, color="tab:red", label="tolerance C·n·u")
    ax.set_xscale("log")
    ax.set_yticks(yy, labels)
    ax.invert_yaxis()
    ax.set_xlim(1e-18, 1e-8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


plot_errors(errors);

# %% [markdown]
# **Claim** ([Ren-thesis] (2.1), Theorem 3 i; [SENG] (3)): the per-sample gradient of a layer
# is `G_i A_iᵀ`, and the R-operator gives exact Jacobian- and Hessian-vector products.
# **Holds**: every quantity above agrees with autograd within the residual tolerance
# `C · n · u` (the largest measured error is printed below), for the MLP and the strided,
# padded CNN.

# %%
worst = max(e / tol for e, tol in errors.values())
print(f"largest error / tolerance: {worst:.1e}")
assert all(e <= tol for e, tol in errors.values()), {k: v for k, v in errors.items() if v[0] > v[1]}

# %% [markdown]
# ## Why batch over samples
#
# The per-sample gradients come from one backward pass over the batch; a loop of one
# backward pass per sample computes the same numbers N times slower in Python overhead. On a
# larger batch (N = 512, same CNN):

# %%
net, params = cnn, results["CNN"]["params"]
xb, yb = rng.standard_normal((512, 2, 5, 5)), rng.integers(0, 3, 512)
t0 = time.perf_counter()
U_batched = ad.flatten_layers(net.per_sample_grads(params, xb, yb, loss))
t_batched = time.perf_counter() - t0
t0 = time.perf_counter()
U_loop = np.concatenate([ad.flatten_layers(net.per_sample_grads(params, xb[i:i + 1], yb[i:i + 1], loss))
                         for i in range(len(xb))])
t_loop = time.perf_counter() - t0
print(f"batched: {t_batched * 1e3:.1f} ms, one sample at a time: {t_loop * 1e3:.1f} ms "
      f"({t_loop / t_batched:.0f}× slower), same result: rel. error {rel_err(U_batched, U_loop):.1e}")
assert rel_err(U_batched, U_loop) <= tolerance(net.n_params, kind="residual")
