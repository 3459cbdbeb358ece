"""``refcurv verify``: run the registered checks (:mod:`refcurv.verify.checks`) and report.

    from refcurv.verify import run, select
    results = run(select(quick=True), seed=0, jobs=1)
    all(r.passed for r in results)

Each check runs on built-in problems with seeded data; ``jobs > 1`` runs them in a local
process pool whose workers use one BLAS thread each (small matrices are slower and far
noisier with multithreaded OpenBLAS on a shared machine).

Arguments are checked on entry (README input policy): ``checks`` a non-empty list of
:class:`~refcurv.verify.checks.Check`, ``seed`` a non-negative int, ``jobs`` an int ``>= 1``,
``backend`` ``"numpy"`` or ``"cupy"``, ``progress`` a callable or ``None``, ``dask`` ``None``, a
scheduler address ``"host:port"`` or a ``distributed.Client``; filters of :func:`select` are
strings (or ``None``) and ``quick`` a bool. Bad input raises a :class:`refcurv.RefcurvError`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ArgumentTypeError, HyperParameterError
from .checks import Check, all_checks

__all__ = ["Result", "run", "select", "environment"]

#: environment variables that pin BLAS/OpenMP to one thread in worker processes
ONE_THREAD = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}


@dataclass(frozen=True)
class Result:
    id: str
    area: str
    method: str
    check: str
    problem: str
    error: float
    tolerance: float
    passed: bool
    detail: str
    seconds: float

    def asdict(self):
        return asdict(self)


AREAS = ("foundation", "linalg", "method")


def _describe(v):
    return f"{type(v).__name__} {v!r}" if isinstance(v, (int, float, str, bytes)) else type(v).__name__


def _check_seed(seed):
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ArgumentTypeError(f"seed must be a non-negative int, got {_describe(seed)}")
    if seed < 0:
        raise HyperParameterError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_backend(backend):
    if not isinstance(backend, str) or backend not in ("numpy", "cupy"):
        raise HyperParameterError(f"backend must be 'numpy' or 'cupy', got {_describe(backend)}")
    from ..backend import get_xp

    get_xp(backend)  # refuses 'cupy' where CuPy cannot be imported
    return backend


def _check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def select(method=None, check=None, quick=False, area=None):
    """The checks to run: all, or those whose method / check name contains the given
    substrings (case-insensitive) and whose area is ``area`` (one of :data:`AREAS`);
    ``quick`` keeps the quick tier. An empty selection is an empty list."""
    for name, value in (("method", method), ("check", check)):
        if value is not None and not isinstance(value, str):
            raise ArgumentTypeError(f"{name} must be a substring (str) or None, got {_describe(value)}")
    quick = _check_flag(quick, "quick")
    if area is not None and (not isinstance(area, str) or area not in AREAS):
        raise HyperParameterError(f"area must be None or one of {AREAS}, got {_describe(area)}")
    out = []
    for c in all_checks():
        if quick and not c.quick:
            continue
        if method and method.lower() not in c.method.lower():
            continue
        if check and check.lower() not in c.name.lower():
            continue
        if area and area != c.area:
            continue
        out.append(c)
    return out


def _threadpoolctl():
    import importlib.util

    return importlib.util.find_spec("threadpoolctl") is not None


def _one_thread_env():
    return all(os.environ.get(k) == "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"))


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the worker's environment (ONE_THREAD) is the fallback
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def run_one(check_id, seed, backend="numpy", one_thread=False):
    """Run the check with this id (looked up in the registry, so that it can be sent to a
    worker process or a Dask worker by name); ``one_thread`` limits BLAS to one thread.
    A check that raises has failed (the :class:`Result` says why); bad arguments of
    ``run_one`` itself are refused."""
    if not isinstance(check_id, str):
        raise ArgumentTypeError(f"check_id must be a check id (str, Check.id), got {_describe(check_id)}")
    seed, backend = _check_seed(seed), _check_backend(backend)
    if _check_flag(one_thread, "one_thread"):
        with _one_blas_thread():
            return run_one(check_id, seed, backend)
    check = next((c for c in all_checks() if c.id == check_id), None)
    if check is None:
        raise HyperParameterError(f"check_id {check_id!r} is not a registered check (see refcurv.verify.select())")
    t0 = time.perf_counter()
    try:
        err, tol, detail = check.fn(check.problem, seed, backend)
        err, tol = float(err), float(tol)
        passed = bool(err <= tol)
    except Exception as e:  # a check that raises has failed; say why
        err, tol, passed, detail = float("nan"), float("nan"), False, f"raised {type(e).__name__}: {e}"
    return Result(check.id, check.area, check.method, check.name, check.problem, err, tol, passed,
                  detail, time.perf_counter() - t0)


def run(checks, seed=0, jobs=1, progress=None, backend="numpy", dask=None):
    """Run ``checks``; ``progress(result)`` is called as each finishes. Returns the results in
    the order of ``checks``. ``jobs > 1``: a local process pool; ``dask``: the address of an
    existing Dask scheduler (or a ``distributed.Client``), each check one task."""
    if not isinstance(checks, (list, tuple)) or not all(isinstance(c, Check) for c in checks):
        raise ArgumentTypeError(f"checks must be a list of refcurv.verify.checks.Check (from select()), "
                                f"got {_describe(checks)}")
    if not checks:
        raise HyperParameterError("checks is empty: nothing to run (did select() match nothing?)")
    seed, backend = _check_seed(seed), _check_backend(backend)
    if isinstance(jobs, (bool, np.bool_)) or not isinstance(jobs, (int, np.integer)) or jobs < 1:
        raise HyperParameterError(f"jobs must be an int >= 1, got {_describe(jobs)}")
    if progress is not None and not callable(progress):
        raise ArgumentTypeError(f"progress must be a callable or None, got {_describe(progress)}")
    if dask is not None:
        _check_dask(dask)
    ids = [c.id for c in checks]
    if dask is not None:
        return _run_dask(ids, seed, backend, dask, progress)
    if (jobs <= 1 or len(ids) <= 1) and not _threadpoolctl() and not _one_thread_env():
        jobs = 1  # BLAS threads cannot be limited in this process: one single-threaded worker
    elif jobs <= 1 or len(ids) <= 1:
        results = []
        for i in ids:
            r = run_one(i, seed, backend, True)
            results.append(r)
            if progress:
                progress(r)
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    saved = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)  # inherited by the spawned workers before they import NumPy
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(ids)), mp_context=multiprocessing.get_context("spawn")) as pool:
            done = _collect(as_completed([pool.submit(run_one, i, seed, backend, True) for i in ids]), progress)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [done[i] for i in ids]


def _client(Client, address):
    """A Dask client for ``address``; a malformed address is an ArgumentTypeError (one line),
    an unreachable one an OSError after 10 s."""
    try:
        return Client(address, timeout="10s")
    except (ValueError, TypeError) as e:
        from ..errors import ArgumentTypeError

        raise ArgumentTypeError(f"--dask: {address!r} is not a scheduler address ({e})") from None


def _collect(finished, progress):
    """``{id: Result}`` from futures in completion order, reporting each."""
    done = {}
    for f in finished:
        r = f.result()
        done[r.id] = r
        if progress:
            progress(r)
    return done


def _check_dask(dask):
    """``dask``: a ``distributed.Client`` or a scheduler address ``[scheme://]host:port``."""
    if isinstance(dask, str):
        addr = dask.split("://", 1)[-1]
        host, _, port = addr.rpartition(":")
        if host and port.isdigit():
            return dask
        raise HyperParameterError(f"dask must be a scheduler address 'host:port' (or a distributed.Client), got {dask!r}")
    try:
        from distributed import Client
    except ImportError:
        Client = ()
    if Client and isinstance(dask, Client):
        return dask
    raise ArgumentTypeError(f"dask must be None, a scheduler address 'host:port' or a distributed.Client, "
                            f"got {_describe(dask)}")


def _run_dask(ids, seed, backend, dask, progress):
    try:
        from distributed import Client, as_completed
    except ImportError:
        from ..errors import ArgumentTypeError

        raise ArgumentTypeError("--dask needs the 'distributed' extra: pip install 'refcurv[distributed]'") from None
    client = dask if isinstance(dask, Client) else _client(Client, dask)
    try:
        futures = [client.submit(run_one, i, seed, backend, True, key=f"refcurv-verify-{seed}-{i}", pure=False)
                   for i in ids]
        done = _collect(as_completed(futures), progress)
    finally:
        if client is not dask:
            client.close()
    return [done[i] for i in ids]


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def environment(seed=None, backend="numpy", jobs=1):
    """Versions, BLAS and its threads, CPU/GPU and the seed, for the JSON report."""
    import platform
    import sys

    import numpy as np
    import scipy

    from .. import __version__

    env = {
        "refcurv": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
        "scipy": scipy.__version__, "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "seed": seed, "backend": backend, "jobs": jobs,
        "cpu": _cpu_model(),
        "thread_env": {k: os.environ.get(k) for k in ONE_THREAD if os.environ.get(k) is not None},
    }
    try:
        cfg = np.show_config(mode="dicts")
        env["blas"] = cfg.get("Build Dependencies", {}).get("blas", {})
    except Exception:  # older NumPy
        env["blas"] = None
    try:
        from threadpoolctl import threadpool_info

        env["threadpools"] = [{k: d.get(k) for k in ("internal_api", "num_threads", "version")}
                              for d in threadpool_info()]
    except ImportError:
        env["threadpools"] = None
    try:
        import cupy

        env["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode() if cupy.is_available() else None
    except Exception:
        env["gpu"] = None
    return env
