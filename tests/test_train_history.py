"""train()'s history: loss, time, direction norm, lr, and the cosine to a reference direction
(a registry name, a method instance, or a callable); adding a reference does not change the
run; a diverging run's error carries the history up to the step it names."""
import numpy as np
import pytest

import refcurv as rc
from refcurv.methods import REGISTRY
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.testing.tolerance import residual_tol
from refcurv.train import train

NET = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)])
X = np.random.default_rng(0).standard_normal((16, 3))
Y = np.arange(16) % 3


def test_history_records_loss_time_norm_and_lr():
    p, h = train(REGISTRY["adam"](), NET, NET.init(0), X, Y, CrossEntropy(), 5, lambda k: 0.1 / (k + 1),
                 batch_size=8)
    assert len(h["loss"]) == len(h["time"]) == 6 and len(h["direction_norm"]) == len(h["lr"]) == 5
    assert "cosine" not in h
    assert h["time"][0] == 0.0 and np.all(np.diff(h["time"]) > 0)
    assert h["lr"] == [0.1 / (k + 1) for k in range(5)]
    # the first direction norm, written out: Adam's first step is −g/(|g| + ε) elementwise
    p0 = NET.init(0)
    rng = np.random.default_rng(0)
    idx = rng.choice(16, size=8, replace=False)
    g = rc.flatten(NET.grad(p0, X[idx], Y[idx], CrossEntropy()))
    want = np.linalg.norm(g / (np.abs(g) + 1e-8))
    assert abs(h["direction_norm"][0] - want) <= residual_tol(NET.n_params) * want


@pytest.mark.parametrize("reference", ["sgd", "instance", "callable"])
def test_cosine_to_a_reference(reference):
    """Training natural_gradient against −g: the cosine is ⟨d, −g⟩/(‖d‖‖g‖) with d the
    direction the run took, recomputed here from the parameters along the run."""
    method = REGISTRY["natural_gradient"](damping=0.1)
    ref = {"sgd": "sgd", "instance": REGISTRY["sgd"](),
           "callable": lambda net, params, batch: [-G for G in net.grad(params, batch.x, batch.y, batch.loss)]}[reference]
    _, h = train(method, NET, NET.init(0), X, Y, CrossEntropy(), 4, 0.5, reference=ref)
    assert len(h["cosine"]) == 4
    # replay the run by hand
    params, state = NET.init(0), method.init(NET, NET.init(0))
    for k in range(4):
        b = rc.methods.Batch(X, Y, CrossEntropy())
        d, state = method.step(state, NET, params, b, rng=0)
        d, g = rc.flatten(d), rc.flatten(NET.grad(params, X, Y, CrossEntropy()))
        want = -(d @ g) / (np.linalg.norm(d) * np.linalg.norm(g))
        assert abs(h["cosine"][k] - want) <= residual_tol(NET.n_params), (k, h["cosine"][k], want)
        assert 0 < want < 1  # a descent direction, not the gradient's: the check can fail
        params = [W + 0.5 * D for W, D in zip(params, rc.unflatten(d, NET))]


def test_the_same_method_as_reference_gives_cosine_one_and_the_run_is_unchanged():
    """A sampled method against itself with its own draws: cosine < 1 (another label draw);
    the deterministic sgd against sgd: cosine 1. Adding a reference leaves the parameters
    bit-identical (its draws come from a spawned generator)."""
    kw = dict(net=NET, params=NET.init(0), x=X, y=Y, loss=CrossEntropy(), steps=4, lr=0.2, batch_size=8, seed=3)
    p_a, _ = train(REGISTRY["kfac"](damping=0.1), **kw)
    p_b, h = train(REGISTRY["kfac"](damping=0.1), reference=REGISTRY["kfac"](damping=0.1), **kw)
    assert all(np.array_equal(a, b) for a, b in zip(p_a, p_b))
    assert min(h["cosine"]) < 1 - 1e-6
    _, h = train(REGISTRY["sgd"](), reference="sgd", **kw)
    assert np.allclose(h["cosine"], 1.0, rtol=0, atol=residual_tol(NET.n_params))


@pytest.mark.parametrize("ref,err,match", [
    (3, rc.ArgumentTypeError, "reference must be"),
    (REGISTRY["sgd"], rc.ArgumentTypeError, "reference must be"),
    ("sgdd", rc.UnknownMethodError, "unknown method 'sgdd'"),
    (lambda net, params, batch: [np.zeros(3)], rc.ArgumentTypeError, r"reference returned .* \(step 0\)"),
])
def test_bad_references_are_refused(ref, err, match):
    with pytest.raises(err, match=match):
        train(REGISTRY["sgd"](), NET, NET.init(0), X, Y, CrossEntropy(), 2, 0.1, reference=ref)


def test_divergence_carries_the_history():
    y = np.random.default_rng(1).standard_normal((16, 3))
    with pytest.raises(rc.DivergenceError, match=r"sgd diverged at step (\d+)") as e:
        train(REGISTRY["sgd"](), NET, NET.init(0), X * 1e3, y * 1e3, MSE(), 60, 1e6)
    k = int(__import__("re").search(r"step (\d+)", str(e.value)).group(1))
    assert len(e.value.history["loss"]) == k + 1 and np.isfinite(e.value.history["loss"]).all()
