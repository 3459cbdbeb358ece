"""The benchmark/report scripts stay runnable (tiny sizes); their numbers are not asserted."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kbfgs_pair_ratio_report_runs():
    # the script imports refcurv from the checkout (it need not be installed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kbfgs_pair_ratios.py"), "--steps", "3"],
                         capture_output=True, text=True, check=True, env=env).stdout
    rows = [line for line in out.splitlines()[1:] if line.strip()]
    assert len(rows) == 10  # 2 MLP problems × 4 methods + 1 CNN × 2 conv-capable methods
    for line in rows:
        fractions = [float(f) for f in re.findall(r"(\d\.\d{3}) \(\d+\)", line)]
        assert fractions and all(0.0 <= f <= 1.0 for f in fractions)


def test_benchmark_suite_quick_smoke(tmp_path):
    """``benchmarks/run.py --quick`` runs (a few sections, tiny sizes) and writes the JSON and
    the plot with the structure benchmarks/README.md is generated from; numbers not asserted."""
    import json

    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "methods,kernels,gpu",
                    "--out", str(out), "--no-readme"], capture_output=True, text=True, check=True, env=env)
    res = json.loads(out.read_text())
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs matplotlib (optional)
        assert (tmp_path / "r.png").stat().st_size > 0
    else:
        assert not (tmp_path / "r.png").exists()
    assert res["machine"]["blas_threads_env"]["OPENBLAS_NUM_THREADS"] == "1"
    for name, m in res["methods"].items():
        assert m["rows"] and all(r["fast_s"] > 0 for r in m["rows"]), name
        assert any("dense_s" in r for r in m["rows"]), name
    for k in res["kernels"].values():
        assert 0 < k["fraction_of_gemm"] and k["gemm_gflops_same_shape"] > 0
    assert res["gpu"]["ran"] in (True, False)


def test_benchmark_suite_rejects_unknown_sections():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "nope"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "unknown sections" in out.stderr
