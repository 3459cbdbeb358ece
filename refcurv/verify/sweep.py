"""A thorough hypothesis sweep sharded by seed: the test suite (or part of it) run ``shards``
times under the ``thorough`` hypothesis profile, shard ``i`` with ``--hypothesis-seed=seed+i``,
on a local process pool or as tasks on an existing Dask cluster. Each shard is an independent
``pytest`` process with one BLAS thread (run from a source checkout: it needs ``tests/``)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from . import ONE_THREAD


@dataclass(frozen=True)
class Shard:
    seed: int
    returncode: int
    summary: str

    @property
    def passed(self):
        return self.returncode == 0


def run_shard(seed, pytest_args, cwd, profile="thorough"):
    """One ``pytest`` run with ``--hypothesis-seed=seed`` under ``profile``."""
    env = {**os.environ, **ONE_THREAD, "REFCURV_HYPOTHESIS_PROFILE": profile}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}", *pytest_args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    return Shard(seed, r.returncode, lines[-1] if lines else r.stderr.strip()[-300:])


def sweep(shards, seed=0, pytest_args=("tests",), cwd=".", jobs=1, dask=None, profile="thorough"):
    """Run ``shards`` shards; returns the :class:`Shard` results in seed order."""
    seeds = [seed + i for i in range(shards)]
    args = list(pytest_args)
    if dask is not None:
        from distributed import Client

        from . import _client

        client = dask if isinstance(dask, Client) else _client(Client, dask)
        try:
            futs = [client.submit(run_shard, s, args, os.path.abspath(cwd), profile, pure=False) for s in seeds]
            return client.gather(futs)
        finally:
            if client is not dask:
                client.close()
    if jobs <= 1:
        return [run_shard(s, args, cwd, profile) for s in seeds]
    from concurrent.futures import ThreadPoolExecutor  # each shard is its own process already

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda s: run_shard(s, args, cwd, profile), seeds))
