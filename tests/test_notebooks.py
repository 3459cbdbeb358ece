"""The teaching notebooks (``notebooks/*.py``, jupytext ``py:percent``, the source of truth).

Two tiers:

* ``test_notebook_source_*`` (default run, no Jupyter needed): each notebook is a
  ``py:percent`` file with a title cell, asserts the paper claims it states (``assert``),
  defines no algorithm (a ``def`` only for small plotting/printing helpers named
  ``plot_*``/``show_*``, or ``reference_*`` for an independent reference written in another
  library, e.g. the network transcribed in HIPS autograd), and no ``.ipynb`` is committed
  (``.gitignore`` keeps converted ones local).
* ``test_notebook_executes`` (marker ``notebooks``, deselected by default): converts each
  file with jupytext and executes it top to bottom with nbclient in a fresh kernel whose
  working directory is the repository root (so the checkout's ``refcurv`` is imported),
  ``MPLBACKEND=Agg`` and one BLAS thread; any error in any cell fails the test, and so does a
  notebook over the 2-minute budget (with a margin for a loaded machine). CI runs

      pytest -m notebooks tests/test_notebooks.py

  (needs the ``notebooks`` extra: ``pip install ".[notebooks]"``).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
IDS = [p.stem for p in NOTEBOOKS]

# The budget is 2 minutes per notebook on 2 cores; the CI limit adds 50 % for a
# loaded runner so that a timing blip is not a failure, while a notebook that grew to
# several minutes is.
BUDGET_S = 120.0
LIMIT_S = 1.5 * BUDGET_S
HELPER = re.compile(r"^def (plot|show|reference)_\w+\(", re.M)


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no NN_name.py files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_source_is_thin_percent_format_and_asserts(path):
    text = path.read_text()
    assert text.startswith("# ---\n# jupyter:\n") and "format_name: percent" in text[:600], (
        f"{path.name}: must start with the jupytext py:percent header")
    first_cell = text.split("# %%", 1)[1]
    assert first_cell.startswith(" [markdown]\n# # "), f"{path.name}: the first cell must be a markdown title"
    assert re.search(r"^assert ", text, re.M), f"{path.name}: states no checked claim (no top-level assert)"
    defs = re.findall(r"^def (\w+)\(", text, re.M)
    bad = [d for d in defs if not HELPER.search(f"def {d}(")]
    assert not bad, f"{path.name}: defines {bad}; notebooks are thin (only plot_*/show_*/reference_* helpers)"


def test_no_ipynb_is_committed():
    """Converted notebooks stay local (``.gitignore``); the ``.py`` files are the source."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "notebooks"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert not [f for f in tracked if f.endswith(".ipynb")], "commit the jupytext .py, not the .ipynb"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path, monkeypatch, record_property):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    # The kernel inherits this process's environment.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=int(LIMIT_S), kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    wall = time.perf_counter() - t0
    record_property("wall_s", round(wall, 1))
    print(f"{path.name}: {wall:.1f} s")
    assert wall < LIMIT_S, f"{path.name} took {wall:.0f} s, over the {BUDGET_S:.0f} s budget (+50 %)"
