"""Declared conventions (refcurv.testing.Conventions) and compare: each conversion checked
against an independent construction (PyTorch's own layout and losses where torch is there,
explicit index arithmetic and Kronecker algebra otherwise)."""
import json

import numpy as np
import pytest

from refcurv import curvature as cv
from refcurv.errors import RefcurvError, ShapeError
from refcurv.nn import BCE, MSE, Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing import Conventions, ConventionsError, Verdict, compare
from refcurv.testing.tolerance import tolerance


def _net(bias=True):
    return Sequential([Conv2d(2, 3, 2, stride=1, padding=1, bias=bias), Tanh(), Flatten(),
                       Linear(3 * 4 * 4, 2, bias=not bias), Tanh(), Linear(2, 3)], input_shape=(2, 3, 3))


# ------------------------------------------------------------------ fields and errors
def test_default_is_refcurv_and_roundtrips_through_json():
    c = Conventions()
    d = c.asdict()
    assert d["order"] == "refcurv" and d["bias"] == "joint" and d["sign"] == "direction" and d["conv"] == "expand"
    assert Conventions.from_dict(json.loads(json.dumps(d))) == c
    t = Conventions(order="torch", loss_scale="torch", reduction="sum", damping="exact")
    assert Conventions.from_dict(json.loads(json.dumps(t.asdict()))) == t


@pytest.mark.parametrize("fields, words", [
    (dict(order="fortran"), "order"),
    (dict(bias="none"), "bias"),
    (dict(reduction="max"), "reduction"),
    (dict(loss_scale=-2.0), "loss_scale"),
    (dict(loss_scale=0.0), "loss_scale"),
    (dict(loss_scale=float("nan")), "loss_scale"),
    (dict(loss_scale="keras"), "loss_scale"),
    (dict(loss_scale=True), "loss_scale"),
    (dict(per_sample_scale=-1), "per_sample_scale"),
    (dict(sign="+"), "sign"),
    (dict(kronecker="A_G"), "contradicts order"),
    (dict(order="column_major", kronecker="G_A"), "contradicts order"),
    (dict(conv="kflr"), "conv"),
    (dict(damping="tikhonov"), "damping"),
])
def test_bad_conventions_one_line(fields, words):
    with pytest.raises(ConventionsError) as e:
        Conventions(**fields)
    assert isinstance(e.value, RefcurvError) and words in str(e.value) and "\n" not in str(e.value)


def test_from_dict_unknown_field():
    with pytest.raises(ConventionsError, match="unknown field"):
        Conventions.from_dict({"order": "torch", "layout": "x"})


@pytest.mark.parametrize("quantity", ["per_sample_grads", "grad", "ggn", "hessian", "fisher"])
def test_bias_separate_needs_a_split_quantity(quantity):
    with pytest.raises(ConventionsError, match="no bias split"):
        Conventions(bias="separate").check_quantity(quantity)
    Conventions(bias="separate").check_quantity("kfac_factors")
    Conventions(bias="separate").check_quantity("blocks")


def test_conv_convention_needs_kfac_factors():
    with pytest.raises(ConventionsError, match="no conv factors"):
        Conventions(conv="backpack").check_quantity("ggn")
    Conventions(conv="backpack").check_quantity("kfac_factors")


# ------------------------------------------------------------------ order
def test_orders_by_index_arithmetic():
    net = _net()
    theta = np.arange(net.n_params, dtype=float)
    from refcurv.vec import flatten, unflatten
    Ws = unflatten(theta, net)
    # torch: weight row-major then bias, per layer; column_major: columns of W stacked
    torch_ref = np.concatenate([np.concatenate([W[:, :-1].ravel(), W[:, -1]]) if m.bias else W.ravel()
                                for W, m in zip(Ws, net.layers_trainable)])
    col_ref = np.concatenate([W.ravel(order="F") for W in Ws])
    np.testing.assert_array_equal(Conventions(order="torch").vector(theta, net), torch_ref)
    np.testing.assert_array_equal(Conventions(order="column_major").vector(Ws, net), col_ref)
    np.testing.assert_array_equal(Conventions().vector(theta, net), flatten(Ws))
    M = np.outer(theta, theta + 1)
    P = Conventions(order="torch").permutation(net)
    np.testing.assert_array_equal(Conventions(order="torch").matrix(M, net), np.outer(torch_ref, torch_ref + 1))
    assert sorted(P) == list(range(net.n_params))


@pytest.mark.parametrize("bias", [True, False])
def test_torch_order_is_parameters_to_vector(bias):
    torch = pytest.importorskip("torch")
    net = _net(bias)
    params = net.init(seed=3)
    layers = []
    for m, W in zip(net.layers_trainable, params):
        if isinstance(m, Conv2d):
            t = torch.nn.Conv2d(m.c_in, m.c_out, m.kernel_size, m.stride, m.padding, bias=m.bias).double()
            w = W[:, :-1] if m.bias else W
            t.weight.data = torch.tensor(w.reshape(t.weight.shape))
        else:
            t = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias).double()
            t.weight.data = torch.tensor(W[:, :-1] if m.bias else W)
        if m.bias:
            t.bias.data = torch.tensor(W[:, -1])
        layers.append(t)
    theta_torch = torch.nn.utils.parameters_to_vector([p for t in layers for p in t.parameters()]).detach().numpy()
    from refcurv.vec import flatten
    np.testing.assert_array_equal(Conventions(order="torch").vector(flatten(params), net), theta_torch)
    try:  # the bridge engineer's permutation must agree (once refcurv.torch exists)
        from refcurv.torch import permutation as bridge_perm
    except ImportError:
        return
    np.testing.assert_array_equal(bridge_perm(net), Conventions(order="torch").permutation(net))


# ------------------------------------------------------------------ loss scales
@pytest.mark.parametrize("name, reduction", [(n, r) for n in ("mse", "cross_entropy", "bce") for r in ("mean", "sum")])
def test_torch_loss_scales_against_torch(name, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    N, C = 4, 3
    f = rng.standard_normal((N, C))
    loss, mod = {"mse": (MSE(), torch.nn.MSELoss(reduction=reduction)),
                 "cross_entropy": (CrossEntropy(), torch.nn.CrossEntropyLoss(reduction=reduction)),
                 "bce": (BCE(), torch.nn.BCEWithLogitsLoss(reduction=reduction))}[name]
    y = rng.integers(0, C, N) if name == "cross_entropy" else rng.random((N, C))
    psi = np.asarray(loss.value(f, y))  # per-sample ψ_n
    tf, ty = torch.tensor(f), torch.tensor(y)
    c = Conventions.for_torch_loss(mod, C)
    s, p = c.scales(loss, C, N)
    assert float(mod(tf, ty)) == pytest.approx(s * psi.mean(), rel=1e-14)
    # the default per-sample scale: the loss applied to a batch of one
    for n in range(N):
        assert float(mod(tf[n:n + 1], ty[n:n + 1])) == pytest.approx(p * psi[n], rel=1e-14)


def test_for_torch_loss_refuses_other_modules():
    torch = pytest.importorskip("torch")
    with pytest.raises(ConventionsError, match="loss_module"):
        Conventions.for_torch_loss(torch.nn.L1Loss(), 3)
    with pytest.raises(ConventionsError, match="n_outputs"):
        Conventions.for_torch_loss(torch.nn.MSELoss(), 0)


def test_explicit_per_sample_scale():
    s, p = Conventions(loss_scale=2 / 3, per_sample_scale=2.0).scales("mse", 3, 5)
    assert (s, p) == (2 / 3, 2.0)
    s, p = Conventions(loss_scale=10.0, reduction="sum").scales("bce", 3, 5)
    assert (s, p) == (10.0, 2.0)


# ------------------------------------------------------------------ blocks, bias split, Kronecker order
@pytest.mark.parametrize("order", ["refcurv", "torch", "column_major"])
def test_separate_bias_blocks_are_the_kronecker_blocks(order):
    """With joint factors (A, G), the weight block of G ⊗ A in any order is G ⊗ A_ww (or A_ww ⊗ G
    column-major) and the bias block G · A_bb: the split of Conventions.kfac_factors."""
    net = Sequential([Linear(3, 2), Tanh(), Linear(2, 2)])
    params = net.init(seed=1)
    x = np.random.default_rng(2).standard_normal((5, 3))
    y = np.random.default_rng(3).standard_normal((5, 2))
    F = cv.kfac_factors(net, params, x, y, MSE())
    M = np.zeros((net.n_params, net.n_params))
    start = 0
    for A, G in F:
        k = A.shape[0] * G.shape[0]
        M[start:start + k, start:start + k] = np.kron(G, A)
        start += k
    c = Conventions(order=order, bias="separate")
    blocks = c.blocks(M, net)
    pairs = c.kfac_factors(F, F, net, [1, 1])
    assert len(blocks) == len(pairs) == 4
    for B, (A, G) in zip(blocks, pairs):
        np.testing.assert_allclose(B, c.kron(A, G), rtol=0, atol=1e-15)
    # joint blocks in the user's order are the user's Kronecker products (in torch's order the
    # joint block is G ⊗ A with the bias row/column moved last: weight entries, then bias)
    cj = Conventions(order=order)
    for B, (A, G) in zip(cj.blocks(M, net), cj.kfac_factors(F, F, net, [1, 1])):
        K = cj.kron(A, G)
        if order == "torch":
            idx = np.arange(K.shape[0]).reshape(G.shape[0], A.shape[0])
            p = np.concatenate([idx[:, :-1].ravel(), idx[:, -1]])
            K = K[np.ix_(p, p)]
        np.testing.assert_allclose(B, K, rtol=0, atol=1e-15)


def test_backpack_conv_factors():
    net = Sequential([Conv2d(1, 2, 2), Flatten(), Linear(2 * 2 * 2, 2)], input_shape=(1, 3, 3))
    params = net.init(seed=0)
    x = np.random.default_rng(0).standard_normal((3, 1, 3, 3))
    y = np.array([0, 1, 1])
    Fe = cv.kfac_factors(net, params, x, y, CrossEntropy(), conv="expand")
    Fr = cv.kfac_factors(net, params, x, y, CrossEntropy(), conv="reduce")
    out = Conventions(conv="backpack").kfac_factors(Fe, Fr, net, [4, 1], g_scale=2.0)
    np.testing.assert_array_equal(out[0][0], Fe[0][0])
    np.testing.assert_allclose(out[0][1], 2.0 * 4 * Fr[0][1], rtol=1e-15)
    np.testing.assert_allclose(out[1][1], 2.0 * Fe[1][1], rtol=1e-15)  # Linear: T = 1, all agree


# ------------------------------------------------------------------ compare
def test_compare_float32_at_float32_tolerance():
    e = np.linspace(1, 2, 50)
    a32 = e.astype(np.float32)
    v = compare(a32, e, n=50)
    assert isinstance(v, Verdict) and v.ok and v.dtype == "float32"
    assert v.tolerance == tolerance(50, 1.0, np.float32, "forward")
    # the same float32 rounding is far outside float64's tolerance
    assert not compare(a32.astype(np.float64), e, n=50).ok
    # conditioning widens a forward tolerance, not a residual one
    assert compare(e, e, cond=1e4).tolerance == pytest.approx(1e4 * compare(e, e).tolerance)
    assert compare(e, e, kind="residual", cond=1e4).tolerance == compare(e, e, kind="residual").tolerance


def test_compare_catches_a_factor():
    e = np.random.default_rng(0).standard_normal((6, 6))
    v = compare(e / 2, e)
    assert not v and v.error == pytest.approx(0.5) and "FAIL" in str(v)


def test_compare_nan_is_a_failing_verdict():
    v = compare(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert not v.ok and v.error == np.inf


@pytest.mark.parametrize("actual, expected, err, words", [
    (np.ones(3), np.ones(4), ShapeError, "shape"),
    (None, np.ones(3), RefcurvError, "None"),
    (np.array(["a"]), np.ones(1), RefcurvError, "real"),
    (np.ones(3) + 1j, np.ones(3), RefcurvError, "real"),
    (np.ones(3), np.array([1, np.inf, 1]), RefcurvError, "NaN or Inf"),
])
def test_compare_bad_input_one_line(actual, expected, err, words):
    with pytest.raises(err) as e:
        compare(actual, expected)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [dict(n=0), dict(n=2.5), dict(cond=0.5), dict(cond=np.inf), dict(kind="backward"),
                                dict(dtype="int32")])
def test_compare_bad_options(kw):
    with pytest.raises(RefcurvError):
        compare(np.ones(3), np.ones(3), **kw)


def test_compare_torch_tensor():
    torch = pytest.importorskip("torch")
    e = np.linspace(1, 2, 7)
    assert compare(torch.tensor(e, dtype=torch.float32), e).dtype == "float32"
    assert compare([torch.tensor(e[:3]), torch.tensor(e[3:])], e).error == 0.0
