"""Independent reference networks in ``autograd`` (HIPS), written from refcurv's
documented conventions (README "Conventions"), never calling refcurv's forward.

Conventions transcribed here:
* θ is the concatenation over trainable layers of ``W.ravel()`` (row-major), with
  ``W = [weight.reshape(out, -1), bias]`` (bias = last column, absent with bias=False);
* conv is PyTorch's cross-correlation on ``(N, C, H, W)`` with zero padding, the weight
  read as ``(out, c_in, kh, kw)``;
* Flatten is row-major over ``(C, H, W)``;
* losses per sample: MSE ``½‖f − y‖²``, CE ``logsumexp(f) − f_y``, BCE
  ``Σ softplus(f) − y f``; the objective is their mean.
"""
import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad, grad, hessian, jacobian

ACT = {
    # ReLU'(0) = 0, PyTorch's convention (autograd's maximum would give 1/2 at the tie,
    # which matters: a dead ReLU upstream of a bias-free layer makes h exactly 0).
    "relu": lambda h: h * (h > 0),
    "tanh": anp.tanh,
    "sigmoid": lambda h: 1.0 / (1.0 + anp.exp(-h)),
    "softplus": lambda h: anp.logaddexp(0.0, h),
}


def layer_sizes(spec):
    out = []
    for s in spec:
        if s[0] == "linear":
            out.append((s[2], s[1] + int(s[3])))
        elif s[0] == "conv":
            out.append((s[2], s[1] * s[3] * s[3] + int(s[6])))
    return out


def split_theta(spec, theta):
    ws, start = [], 0
    for o, d in layer_sizes(spec):
        ws.append(anp.reshape(theta[start : start + o * d], (o, d)))
        start += o * d
    return ws


def conv2d(x, W, c_in, k, stride, pad, bias):
    """Direct transcription of h[n,o,p,q] = Σ_{c,i,j} w[o,c,i,j] x_pad[n,c,sp+i,sq+j] + b[o]."""
    out = W.shape[0]
    w = anp.reshape(W[:, : c_in * k * k], (out, c_in, k, k))
    if pad:
        x = anp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="constant")
    H, Wd = x.shape[2], x.shape[3]
    Ho, Wo = (H - k) // stride + 1, (Wd - k) // stride + 1
    h = 0.0
    for i in range(k):
        for j in range(k):
            xs = x[:, :, i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride]
            h = h + anp.einsum("oc,ncpq->nopq", w[:, :, i, j], xs)
    if bias:
        h = h + anp.reshape(W[:, -1], (1, out, 1, 1))
    return h


def forward(spec, theta, x, start_layer=None, h_start=None, stop_layer=None):
    """Network output. With ``start_layer=l`` and ``h_start``, the computation starts from
    the pre-activation of trainable layer ``l`` (used for pre-activation Hessians); with
    ``stop_layer=l`` it returns that layer's pre-activation."""
    ws = split_theta(spec, theta)
    z, j, started = x, 0, start_layer is None
    for s in spec:
        if s[0] in ("linear", "conv"):
            if started:
                if s[0] == "linear":
                    z = anp.dot(z, ws[j][:, : s[1]].T) + (ws[j][:, -1] if s[3] else 0.0)
                else:
                    z = conv2d(z, ws[j], s[1], s[3], s[4], s[5], s[6])
                if j == stop_layer:
                    return z
            elif j == start_layer:
                z, started = h_start, True
            j += 1
        elif not started:
            continue
        elif s[0] == "act":
            z = ACT[s[1]](z)
        else:
            z = anp.reshape(z, (z.shape[0], -1))
    return z


def per_sample_loss(loss, f, y):
    if loss == "mse":
        return 0.5 * anp.sum((f - y) ** 2, axis=1)
    if loss == "cross_entropy":
        m = anp.max(f, axis=1, keepdims=True)
        lse = anp.log(anp.sum(anp.exp(f - m), axis=1)) + m[:, 0]
        onehot = (y[:, None] == np.arange(f.shape[1])).astype(float)
        return lse - anp.sum(f * onehot, axis=1)
    return anp.sum(anp.logaddexp(0.0, f) - y * f, axis=1)


class Oracle:
    """autograd reference for one problem (spec, data)."""

    def __init__(self, spec, loss, x, y):
        self.spec, self.loss, self.x, self.y = spec, loss, x, y

    def f(self, theta):
        return forward(self.spec, theta, self.x)

    def psi(self, theta):
        return per_sample_loss(self.loss, self.f(theta), self.y)

    def objective(self, theta):
        return anp.mean(self.psi(theta))

    def grad(self, theta):
        return grad(self.objective)(theta)

    def per_sample_grads(self, theta):
        return jacobian(self.psi)(theta)

    def jacobian(self, theta):
        return jacobian(self.f)(theta)

    def hessian(self, theta):
        return hessian(self.objective)(theta)

    def residual(self, theta):
        """Second term of (1.4): Hessian of θ ↦ (1/N) Σ_i r_iᵀ f_i(θ), r_i = ∂ℓ/∂f fixed at θ."""
        r = elementwise_grad(lambda f: anp.sum(per_sample_loss(self.loss, f, self.y)))(self.f(theta))
        return hessian(lambda t: anp.sum(r * self.f(t)) / self.x.shape[0])(theta)

    def preactivation_hessian(self, theta, layer):
        """Per-sample ∂²ψ_i/∂h_l²: (N, m, m), h_l flattened row-major per sample."""
        h = np.asarray(forward(self.spec, theta, self.x, stop_layer=layer))
        N = h.shape[0]
        m = int(np.prod(h.shape[1:]))

        def total(hflat):
            f = forward(self.spec, theta, self.x, start_layer=layer, h_start=anp.reshape(hflat, h.shape))
            return anp.sum(per_sample_loss(self.loss, f, self.y))

        Hfull = hessian(total)(h.reshape(-1)).reshape(N, m, N, m)
        return Hfull[np.arange(N), :, np.arange(N), :]
