"""train(): typed errors for bad arguments, DivergenceError naming the step; rng_of and
REGISTRY refuse bad seeds and names clearly; step refuses a non-network and a foreign loss."""
import numpy as np
import pytest

import refcurv as rc
from refcurv.backend import rng_of
from refcurv.methods import REGISTRY, Batch
from refcurv.nn import MSE, CrossEntropy, Linear, Sequential, Tanh
from refcurv.train import train

NET = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)])
X = np.random.default_rng(0).standard_normal((8, 3))
Y = np.arange(8) % 3


def _kw(**over):
    kw = dict(method=REGISTRY["sgd"](), net=NET, params=NET.init(0), x=X, y=Y, loss=CrossEntropy(), steps=2, lr=0.1)
    kw.update(over)
    return kw


def test_train_decreases_the_loss_and_records_it():
    _, hist = train(**_kw(steps=5, lr=0.5))
    assert len(hist["loss"]) == 6 and hist["loss"][-1] < hist["loss"][0]


@pytest.mark.parametrize("over,err,match", [
    (dict(lr=-1.0), rc.HyperParameterError, "lr"),
    (dict(lr=float("nan")), rc.HyperParameterError, "lr"),
    (dict(lr="0.1"), rc.HyperParameterError, "lr"),
    (dict(lr=True), rc.HyperParameterError, "lr"),
    (dict(lr=lambda k: float("inf")), rc.HyperParameterError, r"lr\(0\)"),
    (dict(batch_size=9), rc.HyperParameterError, "batch_size"),
    (dict(batch_size=0), rc.HyperParameterError, "batch_size"),
    (dict(steps=-1), rc.HyperParameterError, "steps"),
    (dict(method=REGISTRY["sgd"]), rc.ArgumentTypeError, "method"),
    (dict(method="kfac"), rc.ArgumentTypeError, "method"),
    (dict(y=Y[:5]), rc.HyperParameterError, "same number"),
    (dict(seed=-3), rc.HyperParameterError, "seed"),
    (dict(seed=1.5), rc.ArgumentTypeError, "seed"),
])
def test_train_refuses_bad_arguments(over, err, match):
    with pytest.raises(err, match=match):
        train(**_kw(**over))


def test_train_accepts_lists():
    _, hist = train(**_kw(x=X.tolist(), y=Y.tolist()))
    assert np.isfinite(hist["loss"]).all()


def test_divergence_names_the_step():
    y = np.random.default_rng(1).standard_normal((8, 3))
    with pytest.raises(rc.DivergenceError, match=r"sgd diverged at step \d+"):
        train(**_kw(x=X * 1e3, y=y * 1e3, loss=MSE(), steps=60, lr=1e6))


@pytest.mark.parametrize("seed,err", [(-1, rc.HyperParameterError), (1.5, rc.ArgumentTypeError),
                                      ("0", rc.ArgumentTypeError), ([1, 2], rc.ArgumentTypeError),
                                      (True, rc.ArgumentTypeError)])
def test_rng_of_refuses_bad_seeds(seed, err):
    with pytest.raises(err, match="seed"):
        rng_of(seed)


def test_rng_of_accepts_seeds_generators_and_sequences():
    g = np.random.default_rng(3)
    assert rng_of(g) is g
    assert rng_of(np.int64(3)).integers(100) == np.random.default_rng(3).integers(100)
    assert isinstance(rng_of(np.random.SeedSequence(1)), np.random.Generator)
    assert isinstance(rng_of(None), np.random.Generator)


def test_unknown_method_lists_the_names():
    with pytest.raises(rc.UnknownMethodError, match="registered: .*kfac") as e:
        REGISTRY["kfca"]
    assert isinstance(e.value, KeyError)


def test_step_refuses_a_non_network_and_a_foreign_loss():
    m = REGISTRY["sgd"]()
    s = m.init(NET, NET.init(0))
    with pytest.raises(rc.ArgumentTypeError, match="net"):
        m.step(s, None, NET.init(0), Batch(X, Y, CrossEntropy()), rng=0)
    with pytest.raises(rc.ArgumentTypeError, match="loss"):
        m.step(s, NET, NET.init(0), Batch(X, Y, lambda f, y: 0.0), rng=0)


def test_every_exception_class_is_reachable_from_the_package():
    import inspect

    from refcurv import errors

    for name, obj in vars(errors).items():
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert getattr(rc, name) is obj, name
    for mod in ("curvature", "methods", "linalg", "operators", "train"):
        assert hasattr(rc, mod)
