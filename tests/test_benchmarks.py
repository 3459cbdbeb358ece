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
