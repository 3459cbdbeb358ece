"""``refcurv verify``: the test suite runs the same registry of checks (quick tier), a broken
formula turns the verdict red, parallel and Dask runs agree with the serial one, and the CLI
behaves (help, version, bad usage)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from refcurv.cli import main
from refcurv.verify import run, run_one, select
from refcurv.verify.checks import all_checks

QUICK = [c.id for c in select(quick=True)]


@pytest.mark.parametrize("check_id", QUICK)
def test_quick_tier_holds(check_id):
    """The suite and `verify` share one registry: every quick check holds here."""
    r = run_one(check_id, seed=0)
    assert r.passed, f"{r.id}: error {r.error:.3e} > tolerance {r.tolerance:.3e} ({r.detail})"


def test_registry_covers_every_method_and_area():
    from refcurv.methods import REGISTRY

    checks = all_checks()
    assert {c.area for c in checks} == {"foundation", "linalg", "method"}
    assert {c.method for c in checks if c.area == "method"} == set(REGISTRY)
    assert len({c.id for c in checks}) == len(checks)


def test_a_broken_formula_turns_the_verdict_red(monkeypatch, tmp_path, capsys):
    """Scale the cross-entropy output Fisher by 1 + 1e-6: 'GGN = exact Fisher' must fail,
    the exit status be 1 and the JSON report name the failing check."""
    from refcurv.nn.losses import CrossEntropy

    orig = CrossEntropy.fisher_output
    monkeypatch.setattr(CrossEntropy, "fisher_output", lambda self, f: orig(self, f) * (1 + 1e-6))
    out = tmp_path / "report.json"
    assert main(["verify", "--quick", "--check", "GGN = exact Fisher", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["passed"] is False
    failed = [r["id"] for r in report["results"] if not r["passed"]]
    assert failed == ["foundation/-/GGN = exact Fisher/mlp-ce"]
    assert "numpy" in report["environment"] and report["environment"]["seed"] == 0
    assert "FAILED foundation/-/GGN = exact Fisher/mlp-ce" in capsys.readouterr().out


def test_a_gradient_off_by_1e_8_fails_the_finite_difference_check(monkeypatch):
    import refcurv.nn.model as M

    orig = M.Sequential.grad
    monkeypatch.setattr(M.Sequential, "grad", lambda self, *a: [g * (1 + 1e-8) for g in orig(self, *a)])
    results = run(select(check="gradient = finite differences"), seed=0)
    assert results and not any(r.passed for r in results)


def test_a_wrong_powell_step_fails(monkeypatch):
    import refcurv.linalg.damping as D

    monkeypatch.setattr(D, "powell_H", lambda s, y, H, mu: (H @ y, 0.0))
    assert not run_one("linalg/-/Powell damping on H/-", seed=0).passed


def test_a_raising_check_fails_with_its_reason(monkeypatch):
    import refcurv.linalg.woodbury as W

    def boom(*a, **k):
        raise RuntimeError("broken")

    monkeypatch.setattr(W, "lowrank_solve", boom)
    r = run_one("linalg/-/Woodbury (SENG (8)-(9))/-", seed=0)
    assert not r.passed and "RuntimeError: broken" in r.detail


def _verdicts(results):
    return [(r.id, r.passed, None if r.error != r.error else r.error) for r in results]


SAMPLE = [c for c in select(quick=True) if c.area != "method" or c.method in ("sgd", "kfac")]


def test_jobs_gives_the_serial_verdicts():
    serial = run(SAMPLE, seed=3)
    parallel = run(SAMPLE, seed=3, jobs=2)
    assert _verdicts(parallel) == _verdicts(serial)


def test_dask_local_cluster_gives_the_serial_verdicts():
    distributed = pytest.importorskip("distributed")
    serial = run(SAMPLE, seed=3)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = run(SAMPLE, seed=3, dask=client)
    assert _verdicts(remote) == _verdicts(serial)


def test_sweep_shards_by_seed_on_dask(tmp_path):
    distributed = pytest.importorskip("distributed")
    from pathlib import Path

    from refcurv.verify.sweep import sweep

    root = Path(__file__).resolve().parents[1]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        shards = sweep(2, seed=5, pytest_args=["tests/test_operators.py", "-k", "kron2"], cwd=root,
                       dask=client, profile="dev")
    assert [s.seed for s in shards] == [5, 6]
    assert all(s.passed for s in shards), [s.summary for s in shards]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "refcurv", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [[], ["verify"], ["sweep"], ["catalogue"]])
def test_help_is_plain_text(args):
    r = _cli(*args, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert "\x1b[" not in r.stdout


def test_version():
    from refcurv import __version__

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"refcurv {__version__}"


@pytest.mark.parametrize("args", [["bogus"], ["verify", "--jobs", "0"], ["verify", "--seed", "-1"],
                                  ["verify", "--backend", "tpu"], ["verify", "--method", "nonexistent"],
                                  ["verify", "--quick", "--thorough"], ["sweep", "--shards", "x"],
                                  ["verify", "--json", "/nonexistent-dir/r.json"],
                                  ["verify", "--quick", "--check", "Woodbury", "--dask", "tcp://127.0.0.1:9"]])
def test_bad_usage_is_one_line_and_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2, (args, r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_catalogue_command():
    r = _cli("catalogue")
    assert r.returncode == 0 and "Conventions:" in r.stdout and "KFAC" in r.stdout


def test_verify_json_environment(tmp_path):
    out = tmp_path / "r.json"
    assert main(["verify", "--check", "Woodbury", "--seed", "4", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    env = rep["environment"]
    for key in ("refcurv", "python", "numpy", "scipy", "cpu_count", "seed", "backend", "blas", "threadpools"):
        assert key in env
    assert env["seed"] == 4 and rep["passed"] is True
    assert np.isfinite(rep["results"][0]["error"])
