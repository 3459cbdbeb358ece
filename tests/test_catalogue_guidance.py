"""The catalogue's guidance (learning-rate and damping ranges measured in notebook 7): every
registered method has an entry, each entry is consistent with the grid it was measured on,
the stored best runs reproduce, and sweep / worked_ranges summarize as documented."""
import numpy as np
import pytest

from refcurv.catalogue import GUIDANCE, GUIDANCE_PROBLEM, _entry, digits_problem, render
from refcurv.errors import HyperParameterError
from refcurv.methods import REGISTRY
from refcurv.train import sweep, worked_ranges


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_has_guidance(name):
    assert name in GUIDANCE, f"{name} has no GUIDANCE entry (run notebooks/07_training.py with REFCURV_FULL_SWEEP=1)"
    g = GUIDANCE[name]
    lrs, lams = GUIDANCE_PROBLEM["lrs"], GUIDANCE_PROBLEM["dampings"]
    has_damping = "damping" in REGISTRY[name].hyper_parameters()
    worked, runs = g["worked"]
    assert runs == len(lrs) * (len(lams) if has_damping else 1) and 0 <= worked <= runs
    if worked == 0:
        assert g["lr"] is None and g["damping"] is None and g["best"] is None
        return
    lo, hi = g["lr"]
    assert lo in lrs and hi in lrs and lo <= hi
    lr_best, lam_best, loss_best = g["best"]
    assert lo <= lr_best <= hi
    assert loss_best <= 0.5 * 2.31  # "worked": at most half the initial loss (ln 10 ≈ 2.30)
    if has_damping:
        dlo, dhi = g["damping"]
        assert dlo in lams and dhi in lams and dlo <= lam_best <= dhi
    else:
        assert g["damping"] is None and lam_best is None


def test_no_guidance_for_unregistered_methods():
    assert set(GUIDANCE) == set(REGISTRY)


@pytest.mark.parametrize("name", ["sgd", "adam", "kfac"])
def test_stored_best_runs_reproduce(name):
    """The best run of three cheap methods, re-run: its final loss is the stored one (stored
    rounded to 3 decimals; the runs are deterministic up to BLAS rounding, far below that)."""
    pytest.importorskip("sklearn")
    P = GUIDANCE_PROBLEM
    net, params, x, y, loss = digits_problem()
    lr, lam, want = GUIDANCE[name]["best"]
    recs = sweep(name, net, params, x, y, loss, P["steps"], [lr], None if lam is None else [lam],
                 batch_size=P["batch_size"], seed=P["seed"])
    assert len(recs) == 1 and recs[0]["error"] is None
    assert abs(recs[0]["loss"] - want) <= 5e-4 + 1e-6
    assert abs(recs[0]["initial"] - np.log(10)) < 0.05  # the untrained net is near chance


def _rec(lr, lam, loss, initial=2.0):
    return {"lr": lr, "damping": lam, "loss": loss, "initial": initial, "error": None}


def test_worked_ranges_is_a_cross_through_the_best_run():
    """Worked = final ≤ ½ initial. Best (0.1, 0.01). lr range at damping 0.01: {0.1, 0.3} (0.03 at
    0.01 failed); damping range at lr 0.1: {0.01, 0.1}; the run (1.0, 0.1) worked but lies
    off the cross, so it widens neither range."""
    recs = [_rec(0.03, 0.01, 1.5), _rec(0.1, 0.01, 0.2), _rec(0.3, 0.01, 0.9),
            _rec(0.1, 0.1, 0.5), _rec(0.1, 1.0, None), _rec(1.0, 0.1, 0.4), _rec(1.0, 0.01, 3.0)]
    w = worked_ranges(recs)
    assert w["lr"] == (0.1, 0.3) and w["damping"] == (0.01, 0.1)
    assert w["best"]["lr"] == 0.1 and w["worked"] == 4 and w["runs"] == 7
    assert _entry(w) == {"lr": (0.1, 0.3), "damping": (0.01, 0.1), "best": (0.1, 0.01, 0.2), "worked": (4, 7)}
    none = worked_ranges([_rec(0.1, None, 1.9), _rec(1.0, None, None)])
    assert none["lr"] is None and none["damping"] is None and none["best"] is None and none["worked"] == 0
    with pytest.raises(HyperParameterError, match="records"):
        worked_ranges([])


def test_sweep_records_failures_as_data():
    """A learning rate that diverges is a record with loss None and the error's one line, not
    an exception; a method without damping ignores the damping grid."""
    from refcurv.nn import MSE, Linear, Sequential

    net = Sequential([Linear(2, 2)])
    x = np.random.default_rng(0).standard_normal((8, 2)) * 100
    recs = sweep("sgd", net, net.init(0), x, x, MSE(), 30, [1e-6, 10.0], dampings=[0.1, 1.0])
    assert [r["damping"] for r in recs] == [None, None]
    assert recs[0]["error"] is None and recs[0]["loss"] < recs[0]["initial"]
    assert recs[1]["loss"] is None and recs[1]["error"].startswith("DivergenceError: sgd diverged at step")
    assert recs[1]["history"] is not None and len(recs[1]["history"]["loss"]) >= 1


def test_render_lists_the_guidance():
    text = render()
    for name in REGISTRY:
        assert f"  {name} " in text.split("Guidance:")[1]
