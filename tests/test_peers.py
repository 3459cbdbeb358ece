"""The peer-library adapters (refcurv.testing.peers) and a smoke run of
examples/check_peers.py per library (skipped cleanly when torch or the library is missing).

The NumPy-only tests pin the adapters from their definitions: the label maps turn a
library's draw into a draw from refcurv's likelihood (checked in distribution), BackPACK's
separate conv-bias block is the exact GGN's bias block, and separate-bias KFAC is the joint
block with the weight-bias cross terms dropped."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from refcurv import curvature as cv
from refcurv.errors import ArgumentTypeError, HyperParameterError, NonFiniteError, ShapeError
from refcurv.nn import MSE, Conv2d, CrossEntropy, Flatten, Linear, Sequential, Tanh
from refcurv.testing import Conventions
from refcurv.testing.peers import (PEERS, kfac_dense, labels_from_sampled_grads, labels_from_torch_samples,
                                   peer_conventions, sampled_grads_from_labels)
from refcurv.testing.tolerance import assert_clt, tolerance

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "check_peers.py"


def _softmax(f):
    p = np.exp(f - f.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ------------------------------------------------------------------ sampled labels
def test_mse_label_maps_give_refcurvs_likelihood():
    """A library's MSE draw y ~ N(f, ½I) (PyTorch's (f−y)², no ½) maps to y_rc ~ N(f, I), the
    likelihood of refcurv's ½‖f−y‖²: E[(y_rc − f)(y_rc − f)ᵀ] = I per sample (CLT bound)."""
    rng = np.random.default_rng(0)
    f = rng.standard_normal((2, 3))
    S = 4000
    y_torch = f[None] + np.sqrt(0.5) * rng.standard_normal((S, 2, 3))
    y_rc = labels_from_torch_samples(MSE(), f, y_torch)
    r = (y_rc - f[None]).reshape(S, -1)
    assert_clt(r[:, :, None] * r[:, None, :], np.eye(6))
    # the same draw seen as a sampled NLL gradient g = 2(f − y) maps to the same label
    np.testing.assert_allclose(labels_from_sampled_grads("mse", f, 2 * (f[None] - y_torch)), y_rc, rtol=0,
                               atol=1e-14)
    # unmapped, the library's draw has variance ½: the map is not the identity
    assert not np.allclose(y_rc, y_torch)


def test_classification_labels_recovered_from_sampled_grads():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((5, 4))
    labels = rng.integers(0, 4, (3, 5))
    g = _softmax(f)[None] - np.eye(4)[labels]  # BackPACK/curvlinops: σ(f) − onehot(ỹ)
    np.testing.assert_array_equal(labels_from_sampled_grads(CrossEntropy(), f, g), labels)
    yb = rng.integers(0, 2, (3, 5, 4)).astype(float)
    gb = 1 / (1 + np.exp(-f))[None] - yb
    np.testing.assert_array_equal(labels_from_sampled_grads("bce", f, gb), yb)
    np.testing.assert_array_equal(labels_from_torch_samples("cross_entropy", f, labels), labels)


def test_label_maps_refuse_bad_input():
    f = np.zeros((2, 3))
    with pytest.raises(ShapeError, match="grads must be"):
        labels_from_sampled_grads("mse", f, np.zeros((2, 3)))
    with pytest.raises(ArgumentTypeError, match="loss must be"):
        labels_from_sampled_grads("hinge", f, np.zeros((1, 2, 3)))
    with pytest.raises(NonFiniteError, match="grads"):
        labels_from_sampled_grads("mse", f, np.full((1, 2, 3), np.nan))
    with pytest.raises(ShapeError, match="f must be"):
        labels_from_torch_samples("mse", np.zeros(3), np.zeros((1, 3)))
    with pytest.raises(HyperParameterError, match="variance"):
        labels_from_torch_samples("mse", f, np.zeros((1, 2, 3)), variance=True)


# ------------------------------------------------------------------ conventions of the peers
def test_peer_conventions_fields():
    torch = pytest.importorskip("torch")
    C = 3
    cl = peer_conventions("curvlinops", torch.nn.MSELoss(), C)
    assert (cl.order, cl.bias, cl.reduction) == ("torch", "separate", "mean")
    assert cl.scales("mse", C, 4) == (2 / C, 2.0)  # EF: s·p = 4/C
    assert peer_conventions("curvlinops", torch.nn.BCEWithLogitsLoss(), C).scales("bce", C, 4) == (1 / C, 1.0)
    bp = peer_conventions("backpack", torch.nn.CrossEntropyLoss(reduction="sum"), C)
    assert (bp.conv, bp.bias) == ("backpack", "separate") and bp.scales("cross_entropy", C, 4)[0] == 4.0
    assert peer_conventions("nngeometry").bias == "joint" and peer_conventions("asdl").bias == "separate"


def test_peer_conventions_refuse_bad_input():
    with pytest.raises(HyperParameterError, match="library must be one of"):
        peer_conventions("kfac-jax")
    with pytest.raises(ArgumentTypeError, match="pass loss_module"):
        peer_conventions("curvlinops")
    assert set(PEERS) == {"curvlinops", "backpack", "asdl", "nngeometry"}


@pytest.fixture
def cnn():
    net = Sequential([Conv2d(2, 3, 3, stride=2, padding=1), Tanh(), Flatten(), Linear(12, 3)], input_shape=(2, 4, 4))
    params = net.init(seed=0)
    x = np.random.default_rng(2).standard_normal((4, 2, 4, 4))
    y = np.array([0, 1, 2, 1])
    return net, params, x, y, CrossEntropy()


def test_backpack_conv_bias_block_is_the_exact_ggn_block(cnn):
    """The conv bias gradient is Σ_t g_t, so its exact GGN block is G_reduce (no T): the
    separate bias block of Conventions(conv='backpack') must equal the GGN's bias block
    (BackPACK's KFLR agrees, examples/check_peers.py); the weight block is T·G_reduce ⊗ A_expand,
    split as BackPACK splits it."""
    net, params, x, y, loss = cnn
    Fe = cv.kfac_factors(net, params, x, y, loss, conv="expand")
    Fr = cv.kfac_factors(net, params, x, y, loss, conv="reduce")
    T = [4, 1]
    c = Conventions(order="torch", bias="separate", conv="backpack")
    pairs = c.kfac_factors(Fe, Fr, net, T)
    Gm = c.matrix(cv.ggn(net, params, x, y, loss), net)
    nw = 3 * 2 * 3 * 3
    bias = slice(nw, nw + 3)
    err = _rel(c.kron(*pairs[1]), Gm[bias, bias])
    assert err <= tolerance(Gm.shape[0], 1.0, np.float64, "residual"), err
    # the weight pair: BackPACK's split of T·G_reduce ⊗ A_expand is A = T·A_expand, G = G_reduce
    np.testing.assert_allclose(pairs[0][0], 4 * Fe[0][0][:-1, :-1], rtol=1e-15)
    np.testing.assert_array_equal(pairs[0][1], Fr[0][1])


def test_kfac_dense_separate_drops_the_cross_terms(cnn):
    net, params, x, y, loss = cnn
    Fe = cv.kfac_factors(net, params, x, y, loss, conv="expand")
    T = [4, 1]
    joint = Conventions(order="torch")
    sep = joint.replace(bias="separate")
    J = kfac_dense(joint, net, joint.kfac_factors(Fe, Fe, net, T))
    # joint, in parameters() order: the layer blocks G ⊗ A re-ordered
    from scipy.linalg import block_diag
    np.testing.assert_array_equal(J, joint.matrix(block_diag(*[np.kron(G, A) for A, G in Fe]), net))
    S = kfac_dense(sep, net, sep.kfac_factors(Fe, Fe, net, T))
    mask = block_diag(*[np.ones((k, k)) for k in (54, 3, 36, 3)])  # weight, bias, weight, bias
    np.testing.assert_allclose(S, J * mask, rtol=0, atol=1e-15 * np.abs(J).max())
    assert np.abs(J * (1 - mask)).max() > 1e-3  # the cross terms exist and are dropped


def test_kfac_dense_refuses_bad_input(cnn):
    net, params, x, y, loss = cnn
    Fe = cv.kfac_factors(net, params, x, y, loss)
    c = Conventions(order="torch")
    with pytest.raises(ArgumentTypeError, match="conventions must be"):
        kfac_dense("torch", net, Fe)
    with pytest.raises(ArgumentTypeError, match="pairs must be"):
        kfac_dense(c, net, [])
    with pytest.raises(ShapeError, match="network"):
        kfac_dense(c, net, Fe[:1])
    with pytest.raises(ShapeError, match="square"):
        kfac_dense(c, net, [(np.zeros((2, 3)), np.eye(2))])
    with pytest.raises(HyperParameterError, match="order='torch'"):
        kfac_dense(c.replace(order="refcurv", bias="separate"), net, Fe)


def test_adapters_refuse_every_malformed_argument():
    """Input policy: each argument replaced by each malformed value of the fuzz suite raises a
    RefcurvError (one line), never a raw NumPy error."""
    from refcurv.errors import RefcurvError
    from refcurv.testing import peers
    from refcurv.testing.fuzz import MALFORMED

    net = Sequential([Linear(2, 3)], input_shape=(2,))
    f = np.zeros((2, 3))
    good = {"labels_from_torch_samples": ("mse", f, np.zeros((1, 2, 3))),
            "labels_from_sampled_grads": ("mse", f, np.zeros((1, 2, 3))),
            "sampled_grads_from_labels": ("cross_entropy", f, np.zeros((1, 2), int)),
            "kfac_dense": (Conventions(order="torch"), net, [(np.eye(3), np.eye(3))]),
            "peer_conventions": ("asdl",)}
    for name, args in good.items():
        fn = getattr(peers, name)
        fn(*args)
        for i in range(len(args)):
            for label, v in MALFORMED.items():
                a = list(args)
                a[i] = v
                try:
                    fn(*a)
                except RefcurvError as e:
                    assert "\n" not in str(e), (name, i, label)
                except Exception as e:  # pragma: no cover - the failure message
                    pytest.fail(f"{name} argument {i} = {label}: raw {type(e).__name__}: {e}")


def test_sampled_grads_from_labels_inverts_the_label_map():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((4, 3))
    for loss, labels in (("mse", f[None] + rng.standard_normal((2, 4, 3))), ("cross_entropy", rng.integers(0, 3, (2, 4))),
                         ("bce", rng.integers(0, 2, (2, 4, 3)).astype(float))):
        g = sampled_grads_from_labels(loss, f, labels)
        np.testing.assert_allclose(labels_from_sampled_grads(loss, f, g), labels, rtol=0, atol=1e-13)


# ------------------------------------------------------------------ the script, per library
def _script():
    spec = importlib.util.spec_from_file_location("check_peers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("lib,module", [("backpack", "backpack"), ("curvlinops", "curvlinops"), ("asdl", "asdl"),
                                        ("asdl-methods", "asdl"), ("nngeometry", "nngeometry"),
                                        ("harness", "curvlinops")])
def test_check_peers_quick(lib, module):
    """--quick on one library: every row agrees or is a classified library bug whose fix row
    agrees; exit status 0."""
    pytest.importorskip("torch")
    pytest.importorskip(module)
    mod = _script()
    assert mod.main(["--quick", "--only", lib]) == 0
    rows = [r for r in mod.ROWS if r["verdict"] != "skip"]
    assert rows and not any(r["fail"] for r in rows)
    known = {"asdl": "fisher_mc", "asdl-methods": "SENG", "nngeometry": "PMatKFAC"}
    if lib in known:  # the known bugs are still there: the check can fail
        assert any(r["verdict"] == "BUG" and known[lib] in r["quantity"] for r in rows)


def test_check_peers_fails_on_a_wrong_convention(monkeypatch):
    """Declaring BackPACK's KFLR joint-bias (refcurv's own) instead of separate is an
    unexplained disagreement: exit status 1."""
    pytest.importorskip("torch")
    pytest.importorskip("backpack")
    mod = _script()
    real = mod.peer_conventions
    monkeypatch.setattr(mod, "peer_conventions", lambda *a, **k: real(*a, **k).replace(bias="joint"))
    assert mod.main(["--quick", "--only", "backpack"]) == 1
    assert any(r["fail"] and r["quantity"] == "KFLR" for r in mod.ROWS)
