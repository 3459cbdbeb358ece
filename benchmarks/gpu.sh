#!/usr/bin/env bash
# One prepared script for a session with a GPU (issue 15): the GPU tests, `refcurv verify
# --backend cupy`, and the benchmark's GPU section (the fast forms on CuPy vs NumPy). Run from
# the repository root:  bash benchmarks/gpu.sh  [python]   (default python: python3)
# Writes benchmarks/gpu_results.json and benchmarks/gpu_log.txt; nothing is asserted about speed.
# Needs CuPy matching the CUDA driver (e.g. `pip install cupy-cuda12x`); without a device every
# step reports that and the script exits non-zero.
set -u -o pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
LOG=benchmarks/gpu_log.txt
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "== $*" | tee -a "$LOG"; }
status=0

say "device and versions"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG" || status=1
import cupy, numpy, sys
assert cupy.is_available(), "cupy imports but no CUDA device is available"
p = cupy.cuda.runtime.getDeviceProperties(0)
print("device:", p["name"].decode(), "| memory GiB:", round(p["totalGlobalMem"] / 2**30, 1))
print("cupy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "| numpy", numpy.__version__,
      "| python", sys.version.split()[0])
PYEOF
[ "$status" -ne 0 ] && { say "no usable GPU: stopping"; exit 1; }

say "GPU tests (pytest -m gpu)"
timeout 900 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -n 30 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1

say "refcurv verify --backend cupy --quick"
timeout 900 "$PY" -m refcurv verify --backend cupy --quick --json benchmarks/gpu_verify.json 2>&1 | tail -n 30 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1

say "benchmark GPU section (fast forms, CuPy vs NumPy)"
timeout 900 "$PY" benchmarks/run.py --only gpu,kernels --out benchmarks/gpu_results.json --no-readme 2>&1 | tail -n 40 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1

say "done (status $status); copy the device, versions and figures above into benchmarks/README.md"
exit $status
