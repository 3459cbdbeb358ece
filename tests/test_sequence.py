"""Linear layers on sequences (issue 10 item 2): weight sharing over T positions.

* every curvature quantity on sequence nets against an independent HIPS-autograd reference
  written here from the documented convention (README "Sequences": per-sample loss = sum of
  the per-position losses, objective = mean over N), never calling refcurv's forward;
* the conv-1×1 equivalence: a sequence Linear on (T, d) is a Conv2d 1×1 on (d, 1, T);
* Eschenhagen et al. 2023 (NeurIPS, "Kronecker-Factored Approximate Curvature for Modern
  Neural Network Architectures", §3): KFAC-expand is exact for deep linear networks in the
  expand setting, KFAC-reduce in the reduce setting (MSE, any N) -- and neither in the
  other's setting, so the exactness tests can fail;
* the KFAC method on sequence nets, fast form = dense form, both conv settings.

Tolerances: two exact float64 algorithms (batched backprop/R-op vs autograd tracing) on
tiny nets, compared at the suite's autodiff bound (tolerance.py, ``AUTODIFF_RTOL``); the
method's fast-vs-dense comparison at ``forward_tol``/``residual_tol`` as test_method_kfac.
"""
import itertools

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad as agrad
from autograd import hessian as ahessian
from autograd import jacobian as ajacobian
from hypothesis import given
from hypothesis import strategies as st
from oracle import ACT, per_sample_loss

import refcurv as rc
from refcurv import curvature as cv
from refcurv.errors import ShapeError
from refcurv.methods.base import Batch
from refcurv.methods.kfac import KFAC
from refcurv.nn import (
    BCE,
    MSE,
    Conv2d,
    CrossEntropy,
    Flatten,
    Linear,
    ReLU,
    SequenceMean,
    Sequential,
    Sigmoid,
    Softplus,
    Tanh,
)
from refcurv.testing.tolerance import assert_close, forward_tol, rel_err, residual_tol

LOSSES = {"mse": MSE, "cross_entropy": CrossEntropy, "bce": BCE}
ACTS = {"tanh": Tanh, "relu": ReLU, "sigmoid": Sigmoid, "softplus": Softplus}


# ------------------------------------------------------------------ the autograd reference
def build(spec):
    """refcurv layers from a spec of ("linear", in, out, bias), ("act", name), ("mean",), ("flatten",)."""
    out = []
    for s in spec:
        if s[0] == "linear":
            out.append(Linear(s[1], s[2], bias=s[3]))
        elif s[0] == "act":
            out.append(ACTS[s[1]]())
        elif s[0] == "mean":
            out.append(SequenceMean())
        else:
            out.append(Flatten())
    return Sequential(out)


def sizes(spec):
    return [(s[2], s[1] + int(s[3])) for s in spec if s[0] == "linear"]


def unpack(spec, theta):
    ws, start = [], 0
    for o, d in sizes(spec):
        ws.append(anp.reshape(theta[start:start + o * d], (o, d)))
        start += o * d
    return ws


def ref_forward(spec, theta, x, start=None, h_start=None, inputs=None):
    """The network written out: ``z @ weightᵀ + bias`` on (N, T, d) arrays (position-wise),
    mean over axis 1 for ("mean",), row-major flatten. With ``start=l`` the pass starts from
    the pre-activation ``h_start`` of linear layer ``l``; ``inputs`` (a list) collects each
    linear layer's input."""
    ws = unpack(spec, theta)
    z, j, on = x, 0, start is None
    for s in spec:
        if s[0] == "linear":
            if on:
                if inputs is not None:
                    inputs.append(z)
                W = ws[j]
                z = anp.dot(z, W[:, :s[1]].T) + (W[:, -1] if s[3] else 0.0)
            elif j == start:
                z, on = h_start, True
            j += 1
        elif not on:
            continue
        elif s[0] == "act":
            z = ACT[s[1]](z)
        elif s[0] == "mean":
            z = anp.mean(z, axis=1)
        else:
            z = anp.reshape(z, (z.shape[0], -1))
    return z


def ref_psi(loss, f, y):
    """Per-sample losses: for a sequence output (N, T, C) the sum over positions."""
    if f.ndim == 2:
        return per_sample_loss(loss, f, y)
    N, T, C = f.shape
    yy = anp.reshape(y, (N * T,) + tuple(y.shape[2:]))
    return anp.sum(anp.reshape(per_sample_loss(loss, anp.reshape(f, (N * T, C)), yy), (N, T)), axis=1)


class Ref:
    def __init__(self, spec, loss, x, y):
        self.spec, self.loss, self.x, self.y = spec, loss, x, y

    def f(self, theta):
        f = ref_forward(self.spec, theta, self.x)
        return anp.reshape(f, (f.shape[0], -1))  # (N, T·C), row-major over (T, C)

    def psi(self, theta, y=None):
        return ref_psi(self.loss, ref_forward(self.spec, theta, self.x), self.y if y is None else y)

    def objective(self, theta):
        return anp.mean(self.psi(theta))

    def output_hessians(self, theta):
        """``H_n = ∂²ψ_n/∂f_n²`` ``(N, T·C, T·C)`` by autograd on the loss alone."""
        f = np.asarray(ref_forward(self.spec, theta, self.x))
        N, m = f.shape[0], f[0].size
        Hf = ahessian(lambda v: anp.sum(ref_psi(self.loss, anp.reshape(v, f.shape), self.y)))(f.ravel())
        Hf = Hf.reshape(N, m, N, m)
        return Hf[np.arange(N), :, np.arange(N), :]

    def output_grads(self, theta, y):
        """``∂ψ_n/∂f_n`` ``(N, T·C)`` for targets ``y``."""
        f = np.asarray(ref_forward(self.spec, theta, self.x))
        r = agrad(lambda v: anp.sum(ref_psi(self.loss, v, y)))(f)
        return r.reshape(f.shape[0], -1)

    def kfac(self, theta, layer, M, conv):
        """Eschenhagen et al. 2023 §3 from their definitions, with per-sample output curvature
        ``M_n`` ``(N, T·C, T·C)``: ``J_{n,t} = ∂f_n/∂h_{n,t}``,
        expand ``A = (1/(N T)) Σ_{n,t} a aᵀ``, ``G = (1/N) Σ_{n,t} J_{n,t}ᵀ M_n J_{n,t}``;
        reduce ``â_n = (1/T) Σ_t a_{n,t}``, ``Ĵ_n = Σ_t J_{n,t}``, ``A = (1/N) Σ â âᵀ``,
        ``G = (1/N) Σ Ĵ_nᵀ M_n Ĵ_n``."""
        inputs = []
        ref_forward(self.spec, theta, self.x, inputs=inputs)
        a = np.asarray(inputs[layer])
        spec_l = [s for s in self.spec if s[0] == "linear"][layer]
        N = a.shape[0]
        a = a.reshape(N, -1, spec_l[1])
        if spec_l[3]:
            a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)
        T = a.shape[1]
        W = unpack(self.spec, theta)[layer]
        h = a @ np.asarray(W).T  # (N, T, out)
        h_shape = (N, spec_l[2]) if np.asarray(inputs[layer]).ndim == 2 else h.shape

        def f_of_h(hh):
            f = ref_forward(self.spec, theta, self.x, start=layer, h_start=anp.reshape(hh, h_shape))
            return anp.reshape(f, (N, -1))

        Jh = ajacobian(f_of_h)(h)  # (N, TC, N, T, out)
        J = Jh[np.arange(N), :, np.arange(N)]  # (N, TC, T, out)
        if conv == "expand":
            A = np.einsum("ntd,nte->de", a, a) / (N * T)
            G = np.einsum("nctp,ncd,ndtq->pq", J, M, J) / N
        else:
            ah = a.mean(axis=1)
            Jh_ = J.sum(axis=2)
            A = ah.T @ ah / N
            G = np.einsum("ncp,ncd,ndq->pq", Jh_, M, Jh_) / N
        return A, G


# ------------------------------------------------------------------ problems
def spec_of(arch, act, biases, d=3, h=4, C=3, T=4):
    b1, b2 = biases
    if arch == "expand":  # per-position outputs (language modelling): loss on (N, T, C)
        return (("linear", d, h, b1), ("act", act), ("linear", h, C, b2))
    if arch == "reduce":  # positions averaged inside the net (ViT-style mean pooling)
        return (("linear", d, h, b1), ("act", act), ("mean",), ("linear", h, C, b2))
    return (("linear", d, h, b1), ("act", act), ("flatten",), ("linear", T * h, C, b2))


def data(spec, loss, N=3, T=4, seed=0):
    rng = np.random.default_rng(seed)
    net = build(spec)
    params = [rng.uniform(-1, 1, size=s) for s in sizes(spec)]
    x = rng.standard_normal((N, T, spec[0][1]))
    C = [s for s in spec if s[0] == "linear"][-1][2]
    out = (N, T) if spec[-1][0] == "linear" and not any(s[0] in ("mean", "flatten") for s in spec) else (N,)
    if loss == "cross_entropy":
        y = rng.integers(0, C, out)
    elif loss == "mse":
        y = rng.standard_normal(out + (C,))
    else:
        y = rng.uniform(0, 1, out + (C,))
    return net, params, x, y


CASES = [(arch, act, loss, biases)
         for arch, act, biases in [("expand", "tanh", (True, True)), ("expand", "softplus", (False, True)),
                                   ("reduce", "sigmoid", (True, False)), ("reduce", "relu", (True, True)),
                                   ("flatten", "tanh", (True, True))]
         for loss in LOSSES]


def _case_id(c):
    return f"{c[0]}-{c[1]}-{c[2]}-{''.join('b' if b else 'n' for b in c[3])}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sequence_nets_match_autograd(case):
    arch, act, loss_name, biases = case
    spec = spec_of(arch, act, biases)
    net, params, x, y = data(spec, loss_name, seed=len(_case_id(case)))
    loss = LOSSES[loss_name]()
    ref, theta = Ref(spec, loss_name, x, y), rc.flatten(params)
    # outputs and first order
    f_ref = np.asarray(ref_forward(spec, theta, x))
    assert_close(net.forward(params, x), f_ref, what="forward")
    assert_close(net.loss(params, x, y, loss), ref.objective(theta), what="loss")
    assert_close(cv.grad(net, params, x, y, loss), agrad(ref.objective)(theta), what="grad")
    U = ajacobian(ref.psi)(theta)
    assert_close(cv.per_sample_grads(net, params, x, y, loss), U, what="per-sample grads")
    assert_close(rc.flatten(net.grad(params, x, y, loss)), U.mean(axis=0), what="net.grad")
    J = ajacobian(ref.f)(theta)  # (N, T·C, n)
    assert_close(cv.jacobian(net, params, x), J, what="jacobian")
    rng = np.random.default_rng(1)
    v = rng.standard_normal(theta.size)
    assert_close(net.jvp(params, x, rc.unflatten(v, net)), (J @ v).reshape(f_ref.shape), what="jvp")
    w = rng.standard_normal(f_ref.shape)
    assert_close(rc.flatten(net.vjp(params, x, w)), np.einsum("ncp,nc->p", J, w.reshape(J.shape[:2])), what="vjp")
    # second order
    assert_close(cv.hessian(net, params, x, y, loss), ahessian(ref.objective)(theta), what="hessian")
    H = ref.output_hessians(theta)
    GGN = np.einsum("ncp,ncd,ndq->pq", J, H, J) / x.shape[0]
    assert_close(cv.ggn(net, params, x, y, loss), GGN, what="ggn")
    assert_close(cv.fisher(net, params, x, loss=loss), GGN, what="fisher exact = GGN (thesis (1.7))")
    assert_close(cv.empirical_fisher(net, params, x, y, loss), U.T @ U / x.shape[0], what="empirical fisher")
    # Monte-Carlo Fisher with injected sampled labels (n_samples, N, T, …) or (n_samples, N, …)
    labels = loss.sample(net.forward(params, x), n_samples=2, seed=3)
    assert labels.shape[:2] == (2, x.shape[0]) and labels.shape[2:] == np.shape(y)[1:]
    Us = [ajacobian(lambda t, s=s: ref.psi(t, labels[s]))(theta) for s in range(2)]
    Fmc = sum(u.T @ u for u in Us) / (2 * x.shape[0])
    assert_close(cv.fisher(net, params, x, loss=loss, kind="mc", labels=labels), Fmc, what="fisher mc")
    # Kronecker factors, expand and reduce, every Fisher kind, from the paper's definitions
    R = ref.output_grads(theta, y)
    Ms = {"exact": H, "empirical": np.einsum("nc,nd->ncd", R, R),
          "mc": sum(np.einsum("nc,nd->ncd", r, r) for r in (ref.output_grads(theta, lab) for lab in labels)) / 2}
    for conv in ("expand", "reduce"):
        for kind, M in Ms.items():
            got = cv.kfac_factors(net, params, x, y, loss, kind=kind, conv=conv,
                                  labels=labels if kind == "mc" else None)
            for layer, (A, G) in enumerate(got):
                A_ref, G_ref = ref.kfac(theta, layer, M, conv)
                assert_close(A, A_ref, what=f"A {conv} {kind} layer {layer}")
                assert_close(G, G_ref, what=f"G {conv} {kind} layer {layer}")


@given(st.sampled_from(["expand", "reduce", "flatten"]), st.sampled_from(sorted(ACTS)), st.sampled_from(sorted(LOSSES)),
       st.tuples(st.booleans(), st.booleans()), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_random_sequence_nets_match_autograd(arch, act, loss_name, biases, T, N, d, h, C, seed):
    """Shapes hypothesis draws (``T = 1``, one feature, one class included): outputs,
    per-sample gradients, GGN and both KFAC flavours (exact Fisher) against the reference."""
    spec = spec_of(arch, act, biases, d=d, h=h, C=C, T=T)
    net, params, x, y = data(spec, loss_name, N=N, T=T, seed=seed)
    loss = LOSSES[loss_name]()
    ref, theta = Ref(spec, loss_name, x, y), rc.flatten(params)
    assert_close(net.forward(params, x), np.asarray(ref_forward(spec, theta, x)), what="forward")
    assert_close(cv.per_sample_grads(net, params, x, y, loss), ajacobian(ref.psi)(theta), what="per-sample grads")
    J, H = ajacobian(ref.f)(theta), ref.output_hessians(theta)
    assert_close(cv.ggn(net, params, x, y, loss), np.einsum("ncp,ncd,ndq->pq", J, H, J) / N, what="ggn")
    for conv in ("expand", "reduce"):
        for layer, (A, G) in enumerate(cv.kfac_factors(net, params, x, y, loss, conv=conv)):
            A_ref, G_ref = ref.kfac(theta, layer, H, conv)
            assert_close(A, A_ref, what=f"A {conv} layer {layer}")
            assert_close(G, G_ref, what=f"G {conv} layer {layer}")


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_preactivation_hessians_of_a_sequence_layer(loss_name):
    """``∂²ψ_i/∂h_l²`` with ``h_l`` flattened row-major over ``(out, T)`` (the documented
    order, as for Conv2d), against autograd on the pass started from ``h_l``."""
    spec = spec_of("expand", "tanh", (True, True))
    net, params, x, y = data(spec, loss_name, N=2, T=3)
    theta = rc.flatten(params)
    Hs = cv.preactivation_hessians(net, params, x, y, LOSSES[loss_name]())
    for layer in range(2):
        inputs = []
        ref_forward(spec, theta, x, inputs=inputs)
        W = params[layer]
        a = inputs[layer]
        h = a @ W[:, :-1].T + W[:, -1]  # (N, T, out)
        N, T, out = h.shape

        def total(v, shape=(N, out, T), layer=layer):  # v: h in (N, out, T) order, flattened
            hh = anp.transpose(anp.reshape(v, shape), (0, 2, 1))
            return anp.sum(ref_psi(loss_name, ref_forward(spec, theta, x, start=layer, h_start=hh), y))

        Hfull = ahessian(total)(np.transpose(h, (0, 2, 1)).ravel()).reshape(N, out * T, N, out * T)
        assert_close(Hs[layer], Hfull[np.arange(N), :, np.arange(N), :], what=f"layer {layer}")


# ------------------------------------------------------------------ conv 1×1 equivalence
@pytest.mark.parametrize("loss_name", ["mse", "bce"])
@pytest.mark.parametrize("bias", [True, False])
def test_sequence_linear_is_a_1x1_convolution(loss_name, bias):
    """``Linear`` on ``(T, d)`` = ``Conv2d(kernel_size=1)`` on ``(d, 1, T)`` with the same
    ``W``: outputs (permuted), per-sample gradients, GGN, Fisher and both KFAC factors. The
    losses sum over every output, so the conv net's flattened ``(c, T)`` output with permuted
    targets has the same per-sample loss as the sequence net's ``(T, c)`` output."""
    N, T, d, h, c = 3, 5, 3, 4, 2
    seq = Sequential([Linear(d, h, bias=bias), Tanh(), Linear(h, c)])
    conv = Sequential([Conv2d(d, h, 1, bias=bias), Tanh(), Conv2d(h, c, 1), Flatten()])
    rng = np.random.default_rng(7)
    params = seq.init(1)
    x = rng.standard_normal((N, T, d))
    xc = np.transpose(x, (0, 2, 1))[:, :, None, :]  # (N, d, 1, T)
    y = rng.uniform(0, 1, (N, T, c))
    yc = np.transpose(y, (0, 2, 1)).reshape(N, c * T)
    loss = LOSSES[loss_name]()
    f_conv = conv.forward(params, xc).reshape(N, c, T)
    assert_close(seq.forward(params, x), np.transpose(f_conv, (0, 2, 1)), what="outputs")
    assert_close(seq.loss(params, x, y, loss), conv.loss(params, xc, yc, loss), what="loss")
    assert_close(cv.per_sample_grads(seq, params, x, y, loss), cv.per_sample_grads(conv, params, xc, yc, loss),
                 what="per-sample grads")
    assert_close(cv.ggn(seq, params, x, y, loss), cv.ggn(conv, params, xc, yc, loss), what="GGN")
    assert_close(cv.fisher(seq, params, x, loss=loss), cv.fisher(conv, params, xc, loss=loss), what="Fisher")
    for conv_word in ("expand", "reduce"):
        for kind in ("exact", "empirical"):
            a = cv.kfac_factors(seq, params, x, y, loss, kind=kind, conv=conv_word)
            b = cv.kfac_factors(conv, params, xc, yc, loss, kind=kind, conv=conv_word)
            for layer, ((A1, G1), (A2, G2)) in enumerate(zip(a, b)):
                assert_close(A1, A2, what=f"A {conv_word} {kind} {layer}")
                assert_close(G1, G2, what=f"G {conv_word} {kind} {layer}")


# ------------------------------------------------------------------ Eschenhagen et al. exactness
def _deep_linear(setting, widths, biases, T):
    layers = []
    for k, (i, o) in enumerate(itertools.pairwise(widths)):
        if setting == "reduce" and k == len(widths) - 2:
            layers.append(SequenceMean())  # the reduction before the last layer (a classifier head)
        layers.append(Linear(i, o, bias=biases[k]))
    return Sequential(layers)


def _kron_blocks(facs):
    return [np.kron(G, A) for A, G in facs]  # refcurv's row-major G ⊗ A


@pytest.mark.parametrize("setting", ["expand", "reduce"])
@pytest.mark.parametrize("seed", range(4))
def test_kfac_exact_for_deep_linear_nets_in_its_own_setting(setting, seed):
    """Eschenhagen et al. 2023 §3: for a deep linear network (no nonlinearity, MSE, any N),
    KFAC-expand equals the GGN's layer blocks in the expand setting (a loss per position)
    and KFAC-reduce in the reduce setting (positions averaged before the loss). The other
    flavour is *not* exact there (the A factors differ by the position correlations), which
    this test also checks: the identity is specific, not a property of any factorization."""
    rng = np.random.default_rng(seed)
    N, T = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    widths = [int(w) for w in rng.integers(1, 5, size=int(rng.integers(3, 5)))]
    biases = [bool(b) for b in rng.integers(0, 2, size=len(widths) - 1)]
    net = _deep_linear(setting, widths, biases, T)
    params = net.init(seed)
    x = rng.standard_normal((N, T, widths[0]))
    y = rng.standard_normal((N, T, widths[-1]) if setting == "expand" else (N, widths[-1]))
    loss = MSE()
    blocks = cv.ggn(net, params, x, y, loss, blocks=True)
    other = "reduce" if setting == "expand" else "expand"
    exact = _kron_blocks(cv.kfac_factors(net, params, x, y, loss, conv=setting))
    wrong = _kron_blocks(cv.kfac_factors(net, params, x, y, loss, conv=other))
    for layer, (K, B) in enumerate(zip(exact, blocks)):
        assert_close(K, B, rtol=residual_tol(B.shape[0] * N * T), atol=0, what=f"{setting} layer {layer}")
    # the layers that see the T positions (all in the expand setting, all but the head in
    # the reduce setting): the other flavour is off by O(1)
    shared = range(len(blocks)) if setting == "expand" else range(len(blocks) - 1)
    for layer in shared:
        assert rel_err(wrong[layer], blocks[layer]) > 1e-3, f"{other} is exact on layer {layer} of the {setting} setting"


def test_kfac_expand_not_exact_for_a_nonlinear_sequence_net():
    """The exactness above needs linearity: with a tanh the expand factors are an
    approximation (a control that the identity is not automatic)."""
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    rng = np.random.default_rng(0)
    params, x, y = net.init(0), rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 5, 2))
    blocks = cv.ggn(net, params, x, y, MSE(), blocks=True)
    K = _kron_blocks(cv.kfac_factors(net, params, x, y, MSE(), conv="expand"))
    assert rel_err(K[0], blocks[0]) > 1e-3


# ------------------------------------------------------------------ the KFAC method
@pytest.mark.parametrize("conv", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("arch", ["expand", "reduce"])
def test_kfac_method_fast_equals_dense_on_sequence_nets(conv, fisher, arch):
    spec = spec_of(arch, "tanh", (True, True))
    loss_name = "cross_entropy"
    net, params, _, _ = data(spec, loss_name)
    method = KFAC(damping=0.1, conv=conv, fisher=fisher, beta=0.7, n_samples=2, T_stats=2)
    sf = sd = method.init(net, params)
    for k in range(3):
        _, _, x, y = data(spec, loss_name, seed=10 + k)
        batch = Batch(x, y, CrossEntropy())
        draws = method.draw(np.random.default_rng(k), sf, net, params, batch)
        df, sf = method.step(sf, net, params, batch, draws=draws)
        dd, sd = method.step(sd, net, params, batch, draws=draws, dense=True)
        for O, G, Od_, Gd_ in zip(sf.Omega, sf.Gamma, sd.Omega, sd.Gamma):
            assert_close(O, Od_, rtol=residual_tol(O.shape[0]), atol=0, what=f"Ω step {k}")
            assert_close(G, Gd_, rtol=residual_tol(G.shape[0]), atol=0, what=f"Γ step {k}")
        for a, b, Od, Gd in zip(df, dd, sd.Omega_damped, sd.Gamma_damped):
            kappa = np.linalg.cond(Od) * np.linalg.cond(Gd)
            assert_close(a, b, rtol=forward_tol(a.size, kappa), atol=0, what=f"direction step {k}")


# ------------------------------------------------------------------ the loss convention
def test_loss_convention_against_pytorch_cross_entropy_factor():
    """refcurv's sequence objective ``(1/N) Σ_n Σ_t ℓ(f_{n,t}, y_{n,t})`` is ``T`` times the
    mean over all ``N·T`` positions (PyTorch's ``CrossEntropyLoss()`` on ``(N·T, C)``),
    written out here with NumPy's log-sum-exp."""
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 5)])
    rng = np.random.default_rng(2)
    N, T = 3, 6
    params, x, y = net.init(0), rng.standard_normal((N, T, 3)), rng.integers(0, 5, (N, T))
    f = net.forward(params, x).reshape(N * T, 5)
    lse = np.log(np.exp(f - f.max(1, keepdims=True)).sum(1)) + f.max(1)
    torch_mean = np.mean(lse - f[np.arange(N * T), y.ravel()])
    assert_close(net.loss(params, x, y, CrossEntropy()), T * torch_mean, what="Ψ = T · torch mean")


def test_sequence_shapes_and_refusals():
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)])
    params, x = net.init(0), np.ones((2, 5, 3))
    assert net.feature_shapes((5, 3))[-1] == (5, 2)
    assert net.layers[0].n_locations((5, 3)) == 5
    assert net.forward(params, x).shape == (2, 5, 2)
    A, G = net.factors(params, x, np.zeros((2, 5), dtype=int), CrossEntropy())
    assert A[0].shape == (2, 4, 5) and G[0].shape == (2, 4, 5)
    with pytest.raises(ShapeError, match="y for CrossEntropy"):
        cv.ggn(net, params, x, np.zeros((2,), dtype=int), CrossEntropy())
    with pytest.raises(ShapeError, match=r"\(T, 3\)"):
        net.forward(params, np.ones((2, 5, 4)))
    with pytest.raises(ShapeError, match="SequenceMean"):
        Sequential([Linear(3, 4), Flatten(), SequenceMean()]).feature_shapes((5, 3))
    with pytest.raises(ShapeError, match="labels"):
        cv.fisher(net, params, x, loss=CrossEntropy(), kind="mc", labels=np.zeros((1, 3, 5), dtype=int))


@pytest.mark.parametrize("name", ["smw_gn", "hessian_free", "natural_gradient"])
def test_output_space_methods_take_the_per_position_loss_on_sequences(name):
    """Methods that work in output space (the loss's Hessian or Fisher on ``f``) must use the
    per-position sum on a sequence output (``OutputJacobian.output_loss``): a softmax over all
    T·C outputs instead gives a fast form far from the dense one (0.6–1.7 relative)."""
    from refcurv.verify.checks import fast_equals_dense

    err, tol, _ = fast_equals_dense(name, {"fisher": "exact"} if name == "natural_gradient" else None)("seq-ce", 0)
    assert err <= tol, (name, err, tol)
