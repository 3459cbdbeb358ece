"""Hypothesis strategies for small networks and problems (requires ``hypothesis``).

A network is drawn as a *spec*, a tuple of plain tuples, so that tests can build both
refcurv's :class:`~refcurv.nn.Sequential` and an independent reference from it:

* ``("linear", in, out, bias)``
* ``("conv", c_in, c_out, k, stride, padding, bias)``
* ``("act", name)`` with ``name`` in ``ACTIVATIONS``
* ``("flatten",)``
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from ..nn import BCE, MSE, Conv2d, CrossEntropy, Flatten, Linear, ReLU, Sequential, Sigmoid, Softplus, Tanh

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "softplus": Softplus}
LOSSES = {"mse": MSE, "cross_entropy": CrossEntropy, "bce": BCE}


def build(spec, input_shape=None):
    """refcurv ``Sequential`` from a spec."""
    layers = []
    for s in spec:
        if s[0] == "linear":
            layers.append(Linear(s[1], s[2], bias=s[3]))
        elif s[0] == "conv":
            layers.append(Conv2d(s[1], s[2], s[3], stride=s[4], padding=s[5], bias=s[6]))
        elif s[0] == "act":
            layers.append(ACTIVATIONS[s[1]]())
        else:
            layers.append(Flatten())
    return Sequential(layers, input_shape=input_shape)


@dataclass(frozen=True)
class Problem:
    spec: tuple
    input_shape: tuple
    n_out: int
    loss: str
    N: int
    seed: int

    @property
    def net(self):
        return build(self.spec, self.input_shape)

    def data(self):
        """Seeded ``(params, x, y)``; params scaled up from the default init so that
        non-linearities are exercised away from their linear regime."""
        rng = np.random.default_rng(self.seed)
        net = self.net
        params = [2.0 * W for W in net.init(rng)]
        x = rng.standard_normal((self.N,) + self.input_shape)
        if self.loss == "mse":
            y = rng.standard_normal((self.N, self.n_out))
        elif self.loss == "cross_entropy":
            y = rng.integers(0, self.n_out, size=self.N)
        else:
            y = rng.random((self.N, self.n_out))
        return params, x, y

    @property
    def loss_fn(self):
        return LOSSES[self.loss]()


@st.composite
def mlp_specs(draw, max_layers=3, max_width=6, n_out=None, activations=tuple(ACTIVATIONS)):
    n_layers = draw(st.integers(1, max_layers))
    widths = [draw(st.integers(1, max_width)) for _ in range(n_layers + 1)]
    if n_out is not None:
        widths[-1] = n_out
    spec = []
    for i in range(n_layers):
        spec.append(("linear", widths[i], widths[i + 1], draw(st.booleans())))
        if i < n_layers - 1:
            spec.append(("act", draw(st.sampled_from(activations))))
    return tuple(spec), (widths[0],), widths[-1]


@st.composite
def cnn_specs(draw, n_out=None, activations=tuple(ACTIVATIONS)):
    c = draw(st.integers(1, 3))
    H, W = draw(st.integers(3, 6)), draw(st.integers(3, 6))
    shape = (c, H, W)
    spec = []
    for i in range(draw(st.integers(1, 2))):
        k = draw(st.integers(1, min(3, shape[1] + 2, shape[2] + 2)))
        padding = draw(st.integers(0, 1))
        if k > min(shape[1], shape[2]) + 2 * padding:
            padding = 1
        stride = draw(st.integers(1, 2))
        c_out = draw(st.integers(1, 3))
        spec.append(("conv", shape[0], c_out, k, stride, padding, draw(st.booleans())))
        Ho = (shape[1] + 2 * padding - k) // stride + 1
        Wo = (shape[2] + 2 * padding - k) // stride + 1
        shape = (c_out, Ho, Wo)
        spec.append(("act", draw(st.sampled_from(activations))))
    spec.append(("flatten",))
    width = int(np.prod(shape))
    out = n_out if n_out is not None else draw(st.integers(1, 4))
    spec.append(("linear", width, out, draw(st.booleans())))
    return tuple(spec), (c, H, W), out


@st.composite
def problems(draw, kind=st.sampled_from(["mlp", "cnn"]), loss=st.sampled_from(list(LOSSES)), max_batch=5):
    k = draw(kind)
    lname = draw(loss)
    n_out = draw(st.integers(2, 4)) if lname == "cross_entropy" else None
    spec, shape, out = draw(mlp_specs(n_out=n_out) if k == "mlp" else cnn_specs(n_out=n_out))
    return Problem(spec, shape, out, lname, draw(st.integers(1, max_batch)), draw(st.integers(0, 2**31 - 1)))


# --------------------------------------------------------------- matrices (design §5)
# Matrices are constructed, not filtered: size, rank, log-condition number, damping and a
# seed are drawn, Q comes from a seeded QR, and the spectrum is set, so κ is known and can
# drive the tolerance.


def orthogonal(n, rng):
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


@dataclass(frozen=True)
class SPD:
    A: np.ndarray
    eigenvalues: np.ndarray

    @property
    def cond(self):
        return float(self.eigenvalues.max() / self.eigenvalues.min())


@st.composite
def spd_matrices(draw, min_n=1, max_n=8, max_log10_cond=6.0):
    """SPD ``A = Q diag(w) Qᵀ`` with ``log10 κ`` drawn in ``[0, max_log10_cond]`` and scale
    ``10^{[-3, 3]}``."""
    n = draw(st.integers(min_n, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    log_cond = draw(st.floats(0, max_log10_cond))
    scale = 10 ** draw(st.floats(-3, 3))
    w = scale * 10 ** (-log_cond * np.sort(rng.random(n)))
    if n > 1:
        w[0], w[-1] = scale, scale * 10**-log_cond  # pin the condition number
    Q = orthogonal(n, rng)
    A = (Q * w) @ Q.T
    return SPD((A + A.T) / 2, np.sort(w))


@st.composite
def lowrank_factors(draw, max_n=12, max_rho=8):
    """``U ∈ R^{n×ρ}`` of drawn rank ``r ≤ min(n, ρ)`` (rank-deficient allowed), singular values
    spread over ``10^{[-3, 2]}``; covers ``n < ρ`` and ``n ≫ ρ``."""
    n = draw(st.integers(1, max_n))
    rho = draw(st.integers(1, max_rho))
    r = draw(st.integers(0, min(n, rho)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    s = 10 ** rng.uniform(-3, 2, size=r)
    U = (orthogonal(n, rng)[:, :r] * s) @ orthogonal(rho, rng)[:r, :]
    return U


def dampings(lo=-6, hi=2):
    """λ = 10^x, x ∈ [lo, hi] (tiny λ included)."""
    return st.floats(lo, hi).map(lambda x: 10.0**x)


@st.composite
def curvature_pairs(draw, n):
    """``(s, y)`` with ``sᵀy`` of any sign (nonconvex pairs included), ‖·‖ ~ 10^{[-2, 2]}."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    s = rng.standard_normal(n) * 10 ** draw(st.floats(-2, 2))
    y = rng.standard_normal(n) * 10 ** draw(st.floats(-2, 2))
    mix = draw(st.floats(-1, 1))  # correlate y with s so both signs of sᵀy are common
    y = y + mix * s * np.linalg.norm(y) / max(np.linalg.norm(s), 1e-300)
    return s, y
