import os
import sys

# One BLAS thread per test process (and per pytest-xdist worker): on a shared 2-core machine,
# multithreaded OpenBLAS on these small matrices made the slowest tests ~4.5x slower and far
# noisier. The environment covers BLAS libraries loaded later; threadpoolctl the loaded ones.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

# Profiles (select with REFCURV_HYPOTHESIS_PROFILE): dev = few examples, quick feedback;
# ci (default) = deterministic, no deadline; thorough = many randomized examples.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=5, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=1000, print_blob=True, **_common)
settings.load_profile(os.environ.get("REFCURV_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    config._refcurv_blas_limit = threadpool_limits(limits=1)


def _cupy_ok():
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cupy_ok():
        return
    skip = pytest.mark.skip(reason="needs cupy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    if request.param == "numpy":
        return np
    import cupy

    return cupy
