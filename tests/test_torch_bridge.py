"""The PyTorch bridge (refcurv.torch) against PyTorch itself.

Ground truth is PyTorch's own forward pass, its autograd and ``torch.func`` (never a third-party
library): a network is built in PyTorch by this file from a spec, independently of
``refcurv.torch``; ``from_torch`` converts it, and outputs, losses (times the stated scale),
gradients, per-sample gradients and GGN matrices (in PyTorch's parameter order) must agree to
the rounding of the tolerance model (``refcurv.testing.tolerance``).
"""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func internals
nn = torch.nn

import refcurv as rc
from refcurv import curvature as cv
from refcurv import torch as rt
from refcurv.errors import (
    ArgumentTypeError,
    HyperParameterError,
    NonFiniteError,
    ShapeError,
    UnsupportedLayerError,
)
from refcurv.testing.strategies import build, cnn_specs, mlp_specs
from refcurv.testing.tolerance import rel_err, tolerance

TORCH_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}
LOSS_CLASSES = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


# ----------------------------------------------------------------------------- helpers
def torch_from_spec(spec, seed, bias=None):
    """A float64 torch Sequential from a refcurv.testing.strategies spec, written with torch's
    own constructors and initialized by torch (weights ×2, so the non-linearities bend).
    ``bias``: None keeps the spec's flags, True/False overrides every layer."""
    layers = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for s in spec:
            if s[0] == "linear":
                layers.append(nn.Linear(s[1], s[2], bias=s[3] if bias is None else bias, dtype=torch.float64))
            elif s[0] == "conv":
                layers.append(nn.Conv2d(s[1], s[2], s[3], stride=s[4], padding=s[5],
                                        bias=s[6] if bias is None else bias, dtype=torch.float64))
            elif s[0] == "act":
                layers.append(TORCH_ACT[s[1]]())
            else:
                layers.append(nn.Flatten())
        m = nn.Sequential(*layers)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(2.0)
    return m


def data(loss_name, N, input_shape, C, seed):
    """``(x, y_numpy, y_torch)``: the same arrays for both libraries (int64 class indices for
    cross-entropy, reals for MSE, [0, 1] targets for BCE)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N,) + tuple(input_shape))
    if loss_name == "cross_entropy":
        y = rng.integers(0, C, size=N)
    elif loss_name == "mse":
        y = rng.standard_normal((N, C))
    else:
        y = rng.random((N, C))
    return x, y, torch.from_numpy(y)


def flat_torch(tensors):
    """Tensors (or their leading-axis stacks) concatenated entry by entry, in list order."""
    return np.concatenate([t.detach().numpy().reshape(-1) for t in tensors])


def torch_grad(m, loss_module, x, yt):
    m.zero_grad()
    value = loss_module(m(torch.from_numpy(x)), yt)
    value.backward()
    return float(value.detach()), [p.grad.detach().clone() for p in m.parameters()]


def grad_cond(U):
    """Condition number of the mean of per-sample gradients ``U`` (N, n): Σ‖u_i‖ / ‖Σ u_i‖ (the
    cancellation the sum suffers; 1 without cancellation)."""
    return float(np.linalg.norm(U, axis=1).sum() / max(np.linalg.norm(U.sum(axis=0)), 1e-300))


def torch_ggn(m, loss_module, x, yt):
    """GGN of the torch loss in torch's parameter order by torch.func: ``Jᵀ H J`` with ``J`` the
    Jacobian of the flattened outputs (N·C, or N·T·C) in the flat parameters and ``H`` the
    Hessian of the loss in the flattened outputs. ``loss_module(out, yt)`` takes the outputs in
    the model's shape."""
    from torch.func import functional_call, hessian, jacrev

    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    xt = torch.from_numpy(x)

    def f(th):
        d, k = {}, 0
        for n, s in zip(names, shapes):
            size = int(np.prod(s))
            d[n] = th[k:k + size].reshape(s)
            k += size
        return functional_call(m, d, (xt,)).reshape(-1)

    out = f(theta).detach()
    J = jacrev(f)(theta)
    shape = m(xt).shape
    H = hessian(lambda o: loss_module(o.reshape(shape), yt))(out)
    return (J.T @ H @ J).detach().numpy()


# ----------------------------------------------------------------------------- strategies
@st.composite
def torch_cases(draw, loss_name=None, kind=None):
    """(spec, input_shape, C, bias override, loss name, N, seed)."""
    lname = loss_name or draw(st.sampled_from(sorted(LOSS_CLASSES)))
    n_out = draw(st.integers(2, 4)) if lname == "cross_entropy" else None
    k = kind or draw(st.sampled_from(["mlp", "cnn"]))
    spec, shape, C = draw(mlp_specs(n_out=n_out) if k == "mlp" else cnn_specs(n_out=n_out))
    bias = draw(st.sampled_from([None, True, False]))
    return spec, shape, C, bias, lname, draw(st.integers(1, 5)), draw(st.integers(0, 2**31 - 1))


# ----------------------------------------------------------------------------- the network
@given(torch_cases())
def test_from_torch_builds_the_same_network_and_outputs(case):
    spec, shape, C, bias, lname, N, seed = case
    m = torch_from_spec(spec, seed % 1000, bias)
    net, params = rt.from_torch(m, shape)
    want = build(tuple(s[:3] + ((s[3] if bias is None else bias),) if s[0] == "linear" else
                       s[:6] + ((s[6] if bias is None else bias),) if s[0] == "conv" else s for s in spec), shape)
    assert repr(net) == repr(want)
    assert all(W.dtype == np.float64 for W in params)
    x, _, _ = data(lname, N, shape, C, seed)
    f_ref = net.forward(params, x)
    f_torch = m(torch.from_numpy(x)).detach().numpy()
    # two summation orders of the same forward pass: a residual, n = the parameters summed over
    assert rel_err(f_ref, f_torch) <= tolerance(net.n_params, kind="residual")


@given(torch_cases())
def test_round_trips_are_exact(case):
    spec, shape, C, bias, lname, N, seed = case
    m = torch_from_spec(spec, seed % 1000, bias)
    net, params = rt.from_torch(m, shape)
    m2 = rt.torch_module(net, params)
    assert [type(a) for a in m2] == [type(a) for a in m]
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and p2.dtype == torch.float64 and torch.equal(p1, p2)
    x, _, _ = data(lname, N, shape, C, seed)
    xt = torch.from_numpy(x)
    assert torch.equal(m(xt), m2(xt))  # same modules, same weights: bit for bit
    net2, params2 = rt.from_torch(m2, shape)
    assert repr(net2) == repr(net)
    assert all(np.array_equal(a, b) for a, b in zip(params, params2))
    # parameters -> torch tensors -> parameters, as a list, as named pairs and as a dict
    ts = rt.to_torch(net, params)
    assert [tuple(t.shape) for t in ts] == [tuple(p.shape) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ts, m.parameters()))
    for form in (list(m.parameters()), list(m.named_parameters()), dict(m.named_parameters()),
                 m.named_parameters()):
        back = rt.from_torch_tensors(net, form)
        assert all(np.array_equal(a, b) for a, b in zip(back, params))


def test_from_torch_copies_and_casts():
    m = nn.Sequential(nn.Linear(3, 2))
    net, params = rt.from_torch(m, (3,))
    assert params[0].dtype == np.float64
    w32 = m[0].weight.detach().numpy().copy()
    assert np.array_equal(params[0][:, :3], w32.astype(np.float64))  # float32 → float64 is exact
    assert np.array_equal(params[0][:, 3], m[0].bias.detach().numpy().astype(np.float64))
    with torch.no_grad():
        m[0].weight.add_(1.0)
    assert np.array_equal(params[0][:, :3], w32.astype(np.float64))  # a copy, not a view
    _, p32 = rt.from_torch(m, (3,), dtype=np.float32)
    assert p32[0].dtype == np.float32
    m32 = rt.torch_module(net, params, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m32.parameters())


def test_torch_module_leaves_the_global_rng_alone():
    net = rc.nn.Sequential([rc.nn.Conv2d(1, 2, 2), rc.nn.ReLU(), rc.nn.Flatten(), rc.nn.Linear(8, 2)])
    params = net.init(0)
    state = torch.get_rng_state()
    rt.torch_module(net, params)
    assert torch.equal(state, torch.get_rng_state())


def test_nested_sequential_identity_and_tuple_kernels():
    m = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, (2, 3), stride=(2, 2), padding=(1, 1)), nn.Identity()),
                      nn.Sequential(nn.Softplus(), nn.Sequential(nn.Flatten())), nn.Linear(3 * 3 * 3, 2)).double()
    net, params = rt.from_torch(m, (2, 4, 5))
    assert repr(net) == repr(rc.nn.Sequential([rc.nn.Conv2d(2, 3, (2, 3), stride=2, padding=1), rc.nn.Softplus(),
                                               rc.nn.Flatten(), rc.nn.Linear(27, 2)]))
    x = np.random.default_rng(0).standard_normal((4, 2, 4, 5))
    assert rel_err(net.forward(params, x), m(torch.from_numpy(x)).detach().numpy()) <= tolerance(
        net.n_params, kind="residual")
    # names of nested parameters ('0.0.weight', '2.bias') are accepted
    back = rt.from_torch_tensors(net, dict(m.named_parameters()))
    assert all(np.array_equal(a, b) for a, b in zip(back, params))


# ----------------------------------------------------------------------------- the order
def test_permutation_by_hand():
    # Linear(2, 2) with bias: refcurv θ = [w00 w01 b0 w10 w11 b1], torch θ = [w00 w01 w10 w11 b0 b1];
    # then Linear(2, 1) without bias: [v0 v1] in both.
    net = rc.nn.Sequential([rc.nn.Linear(2, 2), rc.nn.Tanh(), rc.nn.Linear(2, 1, bias=False)])
    assert rt.permutation(net).tolist() == [0, 1, 3, 4, 2, 5, 6, 7]
    # Conv2d(1, 2, 1) with bias: W = [[k0, b0], [k1, b1]] → torch [k0 k1 b0 b1]
    net = rc.nn.Sequential([rc.nn.Conv2d(1, 2, 1), rc.nn.Flatten(), rc.nn.Linear(2, 1)])
    assert rt.permutation(net).tolist()[:4] == [0, 2, 1, 3]


@given(torch_cases())
def test_permutation_is_torchs_parameter_order(case):
    spec, shape, _, bias, *_ = case
    m = torch_from_spec(spec, 0, bias)
    n = sum(p.numel() for p in m.parameters())
    # label every torch parameter entry by its position in torch's own flat order
    nn.utils.vector_to_parameters(torch.arange(n, dtype=torch.float64), m.parameters())
    net, params = rt.from_torch(m, shape)
    theta = rc.flatten(params)
    p = rt.permutation(net)
    assert np.array_equal(theta[p], np.arange(n))
    assert np.array_equal(nn.utils.parameters_to_vector(rt.to_torch(net, params)).numpy(), np.arange(n))
    assert sorted(p.tolist()) == list(range(n))


# ----------------------------------------------------------------------------- losses
def _check_loss_and_grad(spec, shape, C, bias, lname, reduction, N, seed):
    m = torch_from_spec(spec, seed % 1000, bias)
    net, params = rt.from_torch(m, shape)
    lm = rt.loss_from_torch(LOSS_CLASSES[lname](reduction=reduction), C, batch_size=N)
    assert lm.reduction == reduction
    assert lm.scale == (lm.per_sample_scale if reduction == "mean" else lm.per_sample_scale * N)
    x, y, yt = data(lname, N, shape, C, seed)
    value_t, grads_t = torch_grad(m, LOSS_CLASSES[lname](reduction=reduction), x, yt)
    value_r = net.loss(params, x, y, lm.loss)
    tol = tolerance(net.n_params + N * C, kind="residual")
    assert abs(value_t - lm.scale * value_r) <= tol * abs(value_t)
    g = net.grad(params, x, y, lm.loss)
    U = np.concatenate([u.reshape(N, -1) for u in net.per_sample_grads(params, x, y, lm.loss)], axis=1)
    want = [lm.scale * t for t in rt.to_torch(net, g)]
    err = rel_err(flat_torch(grads_t), flat_torch(want))
    # the gradient is a mean of per-sample gradients: its forward error grows with their cancellation
    assert err <= tolerance(net.n_params + N * C, cond=grad_cond(U), kind="forward"), err
    back = rt.from_torch_tensors(net, grads_t)
    assert rel_err(rc.flatten(back), lm.scale * rc.flatten(g)) <= tolerance(
        net.n_params + N * C, cond=grad_cond(U), kind="forward")


EXPLICIT = {
    "mlp": ((("linear", 3, 5, True), ("act", "tanh"), ("linear", 5, 4, True), ("act", "softplus"),
             ("linear", 4, 3, True)), (3,)),
    "cnn": ((("conv", 2, 3, 3, 2, 1, True), ("act", "relu"), ("conv", 3, 2, 2, 1, 0, True), ("act", "sigmoid"),
             ("flatten",), ("linear", 8, 3, True)), (2, 5, 5)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lname", sorted(LOSS_CLASSES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_loss_scale_and_gradient_every_combination(kind, bias, lname, reduction):
    spec, shape = EXPLICIT[kind]
    _check_loss_and_grad(spec, shape, 3, bias, lname, reduction, 4, 7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@given(case=torch_cases())
def test_loss_scale_and_gradient_random_nets(case, reduction):
    spec, shape, C, bias, lname, N, seed = case
    _check_loss_and_grad(spec, shape, C, bias, lname, reduction, N, seed)


def test_loss_scales_as_stated():
    assert rt.loss_from_torch(nn.MSELoss(), 4).scale == 0.5
    assert rt.loss_from_torch(nn.MSELoss(reduction="sum"), 4, batch_size=3).scale == 6.0
    assert rt.loss_from_torch(nn.CrossEntropyLoss(), 4).scale == 1.0
    assert rt.loss_from_torch(nn.CrossEntropyLoss(reduction="sum"), 4, batch_size=3).scale == 3.0
    assert rt.loss_from_torch(nn.BCEWithLogitsLoss(), 4).scale == 0.25
    assert rt.loss_from_torch(nn.BCEWithLogitsLoss(reduction="sum"), 4, batch_size=3).scale == 3.0
    lm = rt.loss_from_torch(nn.MSELoss(reduction="sum"), 4, batch_size=3)
    assert (lm.reduction, lm.per_sample_scale) == ("sum", 2.0) and isinstance(lm.loss, rc.nn.MSE)
    loss, _, formula, *_ = rt.loss_from_torch(nn.CrossEntropyLoss(), 4)
    assert isinstance(loss, rc.nn.CrossEntropy) and formula.endswith("scale 1 = 1")
    assert rt.loss_from_torch(nn.MSELoss(), 4).formula.endswith("scale 2/C = 0.5")
    # sequence outputs (T, C): PyTorch's mean also runs over the T positions
    assert rt.loss_from_torch(nn.MSELoss(), (5, 4)).scale == 2 / 20
    assert rt.loss_from_torch(nn.CrossEntropyLoss(), (5, 4)).scale == 1 / 5
    assert rt.loss_from_torch(nn.BCEWithLogitsLoss(), (5, 4)).scale == 1 / 20
    assert rt.loss_from_torch(nn.MSELoss(reduction="sum"), (5, 4), batch_size=3).scale == 6.0
    assert rt.loss_from_torch(nn.CrossEntropyLoss(), (5, 4)).formula.endswith("scale 1/T = 0.2")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lname", sorted(LOSS_CLASSES))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_sample_gradients_keep_the_leading_axis(kind, lname, reduction):
    """torch.func per-sample gradients (vmap of grad on one sample) equal refcurv's per-sample
    gradients through to_torch, times the factor for a batch of one; and back."""
    from torch.func import functional_call, grad, vmap

    spec, shape = EXPLICIT[kind]
    m = torch_from_spec(spec, 3, bias=(reduction == "mean"))
    net, params = rt.from_torch(m, shape)
    N, C = 4, 3
    lm = rt.loss_from_torch(LOSS_CLASSES[lname](reduction=reduction), C, batch_size=1)
    x, y, yt = data(lname, N, shape, C, 11)
    loss_module = LOSS_CLASSES[lname](reduction=reduction)
    named = {k: v.detach() for k, v in m.named_parameters()}

    def one(p, xi, yi):
        return loss_module(functional_call(m, p, (xi[None],)), yi[None])

    ps = vmap(grad(one), in_dims=(None, 0, 0))(named, torch.from_numpy(x), yt)
    U = net.per_sample_grads(params, x, y, lm.loss)
    mine = rt.to_torch(net, U)
    assert [tuple(t.shape) for t in mine] == [(N,) + tuple(p.shape) for p in m.parameters()]
    tol = tolerance(net.n_params, kind="residual")
    assert rel_err(flat_torch(ps.values()), lm.scale * flat_torch(mine)) <= tol
    back = rt.from_torch_tensors(net, ps)  # the dict torch.func returns
    assert all(b.shape == u.shape for b, u in zip(back, U))
    assert rel_err(rc.flatten([b.reshape(-1) for b in back]), lm.scale * rc.flatten([u.reshape(-1) for u in U])) <= tol
    # a flat θ with a leading axis converts too
    theta = np.concatenate([u.reshape(N, -1) for u in U], axis=1)
    assert all(torch.equal(a, b) for a, b in zip(rt.to_torch(net, theta), mine))


# ----------------------------------------------------------------------------- GGN
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lname", sorted(LOSS_CLASSES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ggn_in_torch_order(kind, bias, lname, reduction):
    spec, shape = EXPLICIT[kind]
    m = torch_from_spec(spec, 5, bias)
    net, params = rt.from_torch(m, shape)
    N, C = 3, 3
    x, y, yt = data(lname, N, shape, C, 2)
    lm = rt.loss_from_torch(LOSS_CLASSES[lname](reduction=reduction), C, batch_size=N)
    G_t = torch_ggn(m, LOSS_CLASSES[lname](reduction=reduction), x, yt)
    M = cv.ggn(net, params, x, y, lm.loss)
    p = rt.permutation(net)
    # sums of products of Jacobian entries: a residual, n = parameters · outputs accumulated
    assert rel_err(G_t, lm.scale * M[np.ix_(p, p)]) <= tolerance(net.n_params * N * C, kind="residual")
    # and back: argsort(p) undoes it
    q = np.argsort(p)
    assert np.array_equal(M[np.ix_(p, p)][np.ix_(q, q)], M)


@given(torch_cases())
def test_ggn_in_torch_order_random_nets(case):
    spec, shape, C, bias, lname, N, seed = case
    m = torch_from_spec(spec, seed % 1000, bias)
    net, params = rt.from_torch(m, shape)
    x, y, yt = data(lname, N, shape, C, seed)
    lm = rt.loss_from_torch(LOSS_CLASSES[lname](), C)
    G_t = torch_ggn(m, LOSS_CLASSES[lname](), x, yt)
    M = cv.ggn(net, params, x, y, lm.loss)
    p = rt.permutation(net)
    assert rel_err(G_t, lm.scale * M[np.ix_(p, p)]) <= tolerance(net.n_params * N * C, kind="residual")


def test_kronecker_block_in_torch_order():
    """The module docstring's statement: refcurv's layer block G ⊗ A (joint A, ones row last)
    in torch's [weight.ravel(), bias] order is [[G⊗A_ww, G⊗a_wb], [G⊗a_wbᵀ, a_bb G]]."""
    rng = np.random.default_rng(0)
    net = rc.nn.Sequential([rc.nn.Linear(3, 2)])
    x = rng.standard_normal((6, 3))
    y = rng.integers(0, 2, size=6)
    (A, G), = cv.kfac_factors(net, net.init(0), x, y, rc.nn.CrossEntropy())
    assert A[-1, -1] == 1.0  # the mean of the ones row
    p = rt.permutation(net)
    B = np.kron(G, A)[np.ix_(p, p)]
    d = 3
    want = np.block([[np.kron(G, A[:d, :d]), np.kron(G, A[:d, d:])],
                     [np.kron(G, A[d:, :d]), A[d, d] * G]])
    assert np.array_equal(B, want)


# ----------------------------------------------------------------------------- bad input
def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize("module, match", [
    (nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Dropout())), r"'1\.1' \(Dropout\).*supported: Linear"),
    (nn.Sequential(nn.Linear(3, 3), nn.GELU()), r"'1' \(GELU\) is not supported"),
    (nn.Sequential(type("MyLinear", (nn.Linear,), {})(3, 3)), r"subclass of Linear"),
    (nn.Sequential(nn.Conv2d(1, 1, 2, dilation=2)), r"'0' \(Conv2d\).*dilation=\(2, 2\)"),
    (nn.Sequential(nn.Conv2d(2, 2, 2, groups=2)), r"groups=2"),
    (nn.Sequential(nn.Conv2d(1, 1, 3, padding="same")), r"string padding 'same'"),
    (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), r"padding_mode='reflect'"),
    (nn.Sequential(nn.Conv2d(1, 1, 3, stride=(1, 2))), r"stride=\(1, 2\)"),
    (nn.Sequential(nn.Conv2d(1, 1, 3, padding=(0, 1))), r"padding=\(0, 1\)"),
    (nn.Sequential(nn.Linear(3, 3), nn.Softplus(beta=2)), r"beta=2"),
    (nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(3, 3)), r"start_dim=0"),
    (nn.Linear(3, 3), r"must be a torch.nn.Sequential, got Linear"),
])
def test_unsupported_layers_are_one_line(module, match):
    with pytest.raises(UnsupportedLayerError, match=match) as e:
        rt.from_torch(module, (3,))
    _one_line(e)
    assert isinstance(e.value, rc.RefcurvError)


def test_from_torch_bad_arguments():
    with pytest.raises(ArgumentTypeError, match="module must be a torch.nn.Sequential, got list"):
        rt.from_torch([nn.Linear(3, 3)], (3,))
    with pytest.raises(ShapeError, match="module has no layers"):
        rt.from_torch(nn.Sequential(), (3,))
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ShapeError, match=r"layers\[2\].*module layer '2' \(Linear\)") as e:
        rt.from_torch(m, (3,))
    _one_line(e)
    with pytest.raises(ShapeError, match=r"input_shape \(4,\)") as e:
        rt.from_torch(nn.Sequential(nn.Linear(3, 2)), (4,))
    with pytest.raises(ArgumentTypeError, match="input_shape"):
        rt.from_torch(nn.Sequential(nn.Linear(3, 2)), "3")
    with pytest.raises(HyperParameterError, match="dtype"):
        rt.from_torch(nn.Sequential(nn.Linear(3, 2)), (3,), dtype=np.int64)
    bad = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        bad[0].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"module layer '0' \(Linear\) bias contains NaN"):
        rt.from_torch(bad, (3,))


def torch_sequence_loss(lname, reduction):
    """The PyTorch loss on sequence outputs (N, T, C) as people write it: cross-entropy on the
    (N·T, C) reshaped logits and (N·T,) labels; MSE and BCE elementwise on (N, T, C)."""
    module = LOSS_CLASSES[lname](reduction=reduction)
    if lname == "cross_entropy":
        return lambda out, y: module(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return module


SEQ_HEADS = {
    # per-position outputs (N, T, C): the loss sums over positions
    "positions": lambda d, h, T, C: [nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C)],
    # flatten the positions, then a classifier
    "flatten": lambda d, h, T, C: [nn.Linear(d, h), nn.Softplus(), nn.Flatten(), nn.Linear(T * h, C)],
    # mean over positions (the reduce setting), then a classifier
    "mean": lambda d, h, T, C: [nn.Linear(d, h), nn.Sigmoid(), rt.SequenceMean(), nn.Linear(h, C, bias=False)],
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lname", sorted(LOSS_CLASSES))
@pytest.mark.parametrize("head", sorted(SEQ_HEADS))
def test_sequence_models(head, lname, reduction):
    """Linear layers on (N, T, d) inputs: outputs, loss × scale (PyTorch's mean also over T for
    per-position outputs), gradients and the GGN in torch order, against PyTorch / torch.func."""
    N, T, d, h, C = 3, 4, 3, 5, 3
    with torch.random.fork_rng():
        torch.manual_seed(1)
        m = nn.Sequential(*SEQ_HEADS[head](d, h, T, C)).double()
    net, params = rt.from_torch(m, (T, d))
    out_shape = (T, C) if head == "positions" else C
    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, T, d))
    lead = (N, T) if head == "positions" else (N,)
    y = {"cross_entropy": rng.integers(0, C, size=lead), "mse": rng.standard_normal(lead + (C,)),
         "bce": rng.random(lead + (C,))}[lname]
    yt = torch.from_numpy(y)
    f_t = m(torch.from_numpy(x))
    f_r = net.forward(params, x)
    assert f_r.shape == tuple(f_t.shape)
    assert rel_err(f_r, f_t.detach().numpy()) <= tolerance(net.n_params, kind="residual")
    lm = rt.loss_from_torch(LOSS_CLASSES[lname](reduction=reduction), out_shape, batch_size=N)
    loss_t = torch_sequence_loss(lname, reduction)
    m.zero_grad()
    value = loss_t(f_t, yt)
    value.backward()
    tol = tolerance(net.n_params * T * C, kind="residual")
    assert abs(float(value.detach()) - lm.scale * net.loss(params, x, y, lm.loss)) <= tol * abs(float(value.detach()))
    U = np.concatenate([u.reshape(N, -1) for u in net.per_sample_grads(params, x, y, lm.loss)], axis=1)
    mine = [lm.scale * t for t in rt.to_torch(net, net.grad(params, x, y, lm.loss))]
    assert rel_err(flat_torch([p.grad for p in m.parameters()]), flat_torch(mine)) <= tolerance(
        net.n_params * T * C, cond=grad_cond(U), kind="forward")
    G_t = torch_ggn(m, loss_t, x, yt)
    M = cv.ggn(net, params, x, y, lm.loss)
    p = rt.permutation(net)
    assert rel_err(G_t, lm.scale * M[np.ix_(p, p)]) <= tol
    # and the round trip keeps the positions' modules
    m2 = rt.torch_module(net, params)
    assert [type(a) for a in m2] == [type(a) for a in m]
    assert torch.equal(m2(torch.from_numpy(x)), f_t)


def test_tensor_converters_bad_input():
    net = rc.nn.Sequential([rc.nn.Linear(3, 2), rc.nn.Tanh(), rc.nn.Linear(2, 1, bias=False)])
    params = net.init(0)
    ts = rt.to_torch(net, params)
    with pytest.raises(ShapeError, match="tensors has 2 entries, the network has 3") as e:
        rt.from_torch_tensors(net, ts[:2])
    _one_line(e)
    with pytest.raises(ShapeError, match=r"tensors\[1\] has shape \(3,\), the bias of Linear\(3, 2"):
        rt.from_torch_tensors(net, [ts[0], torch.zeros(3), ts[2]])
    with pytest.raises(ShapeError, match=r"tensors\['0.bias'\] is where the network expects the weight"):
        rt.from_torch_tensors(net, [("0.bias", ts[1]), ("0.weight", ts[0]), ("2.weight", ts[2])])
    with pytest.raises(ShapeError, match=r"tensors\['1.bias'\] does not belong to the layer of '0.weight'"):
        rt.from_torch_tensors(net, {"0.weight": ts[0], "1.bias": ts[1], "2.weight": ts[2]})
    with pytest.raises(ArgumentTypeError, match=r"tensors\['0.weight'\] is None"):
        rt.from_torch_tensors(net, {"0.weight": None, "0.bias": ts[1], "2.weight": ts[2]})
    with pytest.raises(ShapeError, match="leading axes"):
        rt.from_torch_tensors(net, [ts[0][None], ts[1], ts[2]])
    with pytest.raises(ArgumentTypeError, match="pass module.named_parameters"):
        rt.from_torch_tensors(net, rt.torch_module(net, params))
    with pytest.raises(ArgumentTypeError, match="tensors must be a list"):
        rt.from_torch_tensors(net, ts[0])
    with pytest.raises(NonFiniteError, match=r"tensors\[2\] contains NaN"):
        rt.from_torch_tensors(net, [ts[0], ts[1], torch.full((1, 2), float("inf"))])
    with pytest.raises(ArgumentTypeError, match=r"tensors\[0\] must be a real tensor"):
        rt.from_torch_tensors(net, [ts[0].to(torch.complex128), ts[1], ts[2]])
    with pytest.raises(ShapeError, match="mats has 1 arrays"):
        rt.to_torch(net, params[:1])
    with pytest.raises(ShapeError, match=r"mats\[1\] has shape \(2, 1\)"):
        rt.to_torch(net, [params[0], params[1].T])
    with pytest.raises(NonFiniteError, match=r"mats\[0\] contains NaN"):
        rt.to_torch(net, [np.full_like(params[0], np.nan), params[1]])
    with pytest.raises(ShapeError, match="flat theta"):
        rt.to_torch(net, np.zeros(5))
    with pytest.raises(ArgumentTypeError, match="net must be a refcurv.nn.Sequential"):
        rt.permutation(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ArgumentTypeError, match="dtype must be a torch floating dtype"):
        rt.torch_module(net, params, dtype=np.float64)
    with pytest.raises(HyperParameterError, match="dtype must be a torch floating dtype"):
        rt.torch_module(net, params, dtype=torch.int64)
    # float32 tensors stay float32 (judged at float32 tolerance downstream) unless dtype= says otherwise
    f32 = rt.from_torch_tensors(net, [t.float() for t in ts])
    assert all(a.dtype == np.float32 for a in f32)
    assert all(a.dtype == np.float64 for a in rt.from_torch_tensors(net, [t.float() for t in ts], dtype=np.float64))


@pytest.mark.parametrize("module, kwargs, exc, match", [
    (nn.MSELoss(reduction="none"), {}, HyperParameterError, r"reduction='none'"),
    (nn.CrossEntropyLoss(weight=torch.ones(3)), {}, HyperParameterError, r"has a weight"),
    (nn.CrossEntropyLoss(label_smoothing=0.1), {}, HyperParameterError, r"label_smoothing=0.1"),
    (nn.CrossEntropyLoss(ignore_index=1), {}, HyperParameterError, r"ignore_index=1, a class index"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), {}, HyperParameterError, r"pos_weight"),
    (nn.BCEWithLogitsLoss(weight=torch.ones(3)), {}, HyperParameterError, r"has a weight"),
    (nn.L1Loss(), {}, UnsupportedLayerError, r"L1Loss is not supported"),
    (nn.MSELoss(reduction="sum"), {}, HyperParameterError, r"pass batch_size=N"),
    (nn.MSELoss(), {"batch_size": 0}, HyperParameterError, r"batch_size must be >= 1"),
    ("mse", {}, ArgumentTypeError, r"loss_module must be a torch loss module"),
])
def test_loss_from_torch_refusals(module, kwargs, exc, match):
    with pytest.raises(exc, match=match) as e:
        rt.loss_from_torch(module, 3, **kwargs)
    _one_line(e)


def test_loss_from_torch_bad_n_outputs():
    with pytest.raises(ArgumentTypeError, match="n_outputs must be an int"):
        rt.loss_from_torch(nn.MSELoss(), 2.0)
    with pytest.raises(HyperParameterError, match="n_outputs must be >= 1"):
        rt.loss_from_torch(nn.MSELoss(), 0)
    with pytest.raises(ShapeError, match=r"n_outputs must be C or a sequence output's shape \(T, C\)"):
        rt.loss_from_torch(nn.MSELoss(), (2, 3, 4))
    with pytest.raises(HyperParameterError, match=r"n_outputs\[0\] \(T\) must be >= 1"):
        rt.loss_from_torch(nn.MSELoss(), (0, 3))
    # the default ignore_index (-100) is never a class: accepted
    assert rt.loss_from_torch(nn.CrossEntropyLoss(), 3).scale == 1.0


def test_import_needs_no_torch_and_a_call_says_what_to_install(monkeypatch):
    code = ("import sys; sys.modules['torch'] = None; import refcurv, refcurv.torch as rt\n"
            "try:\n    rt.from_torch(None, (3,))\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "refcurv.torch needs PyTorch: pip install 'refcurv[torch]'"
    out = subprocess.run([sys.executable, "-c", "import sys, refcurv, refcurv.torch; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("conv", ["expand", "reduce"])
def test_kronecker_to_torch_is_the_separate_weight_bias_part(conv):
    """Per torch parameter, G ⊗ A_p equals the joint block permuted to torch order with the
    weight–bias cross blocks removed; shapes match the parameters'."""
    from scipy.linalg import block_diag

    m = nn.Sequential(nn.Conv2d(2, 3, 2, stride=2, bias=True), nn.Tanh(), nn.Flatten(),
                      nn.Linear(12, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3)).double()
    net, params = rt.from_torch(m, (2, 4, 4))
    x, y, _ = data("cross_entropy", 5, (2, 4, 4), 3, 0)
    fac = cv.kfac_factors(net, params, x, y, rc.nn.CrossEntropy(), conv=conv)
    pairs = rt.kronecker_to_torch(net, fac)
    assert [np.prod([G.shape[0], A.shape[0]]) for G, A in pairs] == [p.numel() for p in m.parameters()]
    mine = block_diag(*[np.kron(G.numpy(), A.numpy()) for G, A in pairs])
    joint = block_diag(*[np.kron(G, A) for A, G in fac])
    p = rt.permutation(net)
    want = joint[np.ix_(p, p)]
    owner = np.repeat(np.arange(len(pairs)), [p.numel() for p in m.parameters()])
    want[owner[:, None] != owner[None, :]] = 0.0  # keep the per-tensor diagonal blocks
    assert np.array_equal(mine, want)
    with pytest.raises(ShapeError, match=r"factors\[1\]\[0\] \(A\) has shape \(13, 13\)"):
        rt.kronecker_to_torch(net, [fac[0], (np.eye(13), fac[1][1]), fac[2]])
    with pytest.raises(ShapeError, match="factors must be a list of 3"):
        rt.kronecker_to_torch(net, fac[:2])


# ----------------------------------------------------------------------------- input-policy fuzz
def _fuzz_net():
    return rc.nn.Sequential([rc.nn.Conv2d(1, 2, 2), rc.nn.Tanh(), rc.nn.Flatten(), rc.nn.Linear(8, 2)])


def _fuzz_examples():
    """A valid call per public callable of refcurv.torch (the fuzz test corrupts one argument)."""
    net = _fuzz_net()
    params = net.init(0)
    m = rt.torch_module(net, params)
    x = np.random.default_rng(0).standard_normal((3, 1, 3, 3))
    fac = cv.kfac_factors(net, params, x, np.array([0, 1, 1]), rc.nn.CrossEntropy())
    return {
        "from_torch": lambda: (rt.from_torch, (m, (1, 3, 3)), {"dtype": np.float64}),
        "torch_module": lambda: (rt.torch_module, (net, params), {"dtype": torch.float32}),
        "to_torch": lambda: (rt.to_torch, (net, params), {}),
        "from_torch_tensors": lambda: (rt.from_torch_tensors, (net, list(m.parameters())), {"dtype": np.float64}),
        "permutation": lambda: (rt.permutation, (net,), {}),
        "kronecker_to_torch": lambda: (rt.kronecker_to_torch, (net, fac), {}),
        "loss_from_torch": lambda: (rt.loss_from_torch, (nn.MSELoss(reduction="sum"), 2), {"batch_size": 3}),
        "LossMap": lambda: (rt.LossMap, (rc.nn.MSE(), 1.0, "f", "mean", 1.0), {}),
    }


def test_fuzz_examples_cover_every_public_callable():
    from refcurv.testing.fuzz import public_callables

    assert set(public_callables(rt)) == set(_fuzz_examples())


@pytest.mark.parametrize("key", sorted(_fuzz_examples()))
@given(data=st.data())
def test_fuzz_refcurv_torch(key, data):
    from refcurv.testing.fuzz import fuzz_one

    fuzz_one(_fuzz_examples(), key, data)


def test_kronecker_to_torch_of_kfacs_curvature_operator():
    """KFAC's curvature operator (BlockDiagonal of Kronecker(Γ̃, Ω̃)) converts as its factors do."""
    from refcurv.methods import REGISTRY, Batch

    net = rc.nn.Sequential([rc.nn.Linear(3, 4), rc.nn.Tanh(), rc.nn.Linear(4, 2, bias=False)])
    params = net.init(0)
    x, y, _ = data("cross_entropy", 5, (3,), 2, 1)
    batch = Batch(x, y, rc.nn.CrossEntropy())
    method = REGISTRY["kfac"](damping=1e-2)
    state0 = method.init(net, params)
    _, state = method.step(state0, net, params, batch, rng=0)
    C = method.curvature(state, net, params, batch, None)
    pairs = rt.kronecker_to_torch(net, C)
    assert [tuple(G.shape) + tuple(A.shape) for G, A in pairs] == [(4, 4, 3, 3), (4, 4, 1, 1), (2, 2, 4, 4)]
    assert np.array_equal(pairs[0][0].numpy(), C.blocks[0].factors[0])
    assert np.array_equal(pairs[1][1].numpy(), C.blocks[0].factors[1][3:, 3:])
    assert np.array_equal(pairs[2][1].numpy(), C.blocks[1].factors[1])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_float32_model_is_judged_at_float32(kind):
    """A float32 PyTorch model: its weights widen exactly to refcurv's float64, its gradient stays
    float32 through from_torch_tensors and agrees with refcurv's float64 gradient at float32's
    tolerance (and, being float32, not at float64's)."""
    spec, shape = EXPLICIT[kind]
    m = torch_from_spec(spec, 9).float()
    net, params = rt.from_torch(m, shape)
    assert all(np.array_equal(W.astype(np.float32), W) for W in params)  # exact widening
    N, C = 6, 3
    x, y, yt = data("cross_entropy", N, shape, C, 3)
    m.zero_grad()
    nn.CrossEntropyLoss()(m(torch.from_numpy(x).float()), yt).backward()
    g32 = rt.from_torch_tensors(net, [p.grad for p in m.parameters()])
    assert all(g.dtype == np.float32 for g in g32)
    lm = rt.loss_from_torch(nn.CrossEntropyLoss(), C)
    g = net.grad(params, x, y, lm.loss)
    U = np.concatenate([u.reshape(N, -1) for u in net.per_sample_grads(params, x, y, lm.loss)], axis=1)
    err = rel_err(rc.flatten(g32), lm.scale * rc.flatten(g))
    n = net.n_params + N * C
    assert err <= tolerance(n, cond=grad_cond(U), dtype=np.float32, kind="forward")
    assert err > tolerance(n, cond=grad_cond(U), dtype=np.float64, kind="forward")
