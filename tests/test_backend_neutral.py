"""Backend neutrality without a GPU (design §6, issue 15): numerical modules obtain their array
module from :func:`refcurv.backend.xp_of` and must not call ``numpy.`` functions on array data
(on CuPy input such a call would copy to the host, or fail). An AST scan of every ``np.…(…)``
call in the numerical modules; allowed are the names in :data:`ALLOW` (they never take array
data, or are host-side by design) and lines marked ``# host:`` with the reason (a documented,
visible host fallback; a ``def`` line so marked covers its whole function). The remaining calls are counted per file in :data:`BASELINE`, a
ratchet: a file may not gain any (the test fails), and when a file loses some the baseline
must be lowered (the test fails too, so the figure stays true). The GPU parity tests are
marked ``gpu`` and skip cleanly where CuPy or a device is missing."""
import ast
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: numerical modules (backend.py is the backend itself; cli/catalogue/verify/testing are host tools)
MODULES = sorted(str(p.relative_to(ROOT)) for p in
                 [*(ROOT / "refcurv" / "linalg").glob("*.py"), *(ROOT / "refcurv" / "methods").glob("*.py"),
                  *(ROOT / "refcurv" / "nn").glob("*.py"), ROOT / "refcurv" / "curvature.py",
                  ROOT / "refcurv" / "operators.py", ROOT / "refcurv" / "vec.py", ROOT / "refcurv" / "train.py"]
                 if p.name != "__init__.py")

#: ``np.<name>(…)`` calls that never touch array data, or are host-side by design
ALLOW = {
    # dtypes and their properties: metadata, identical on NumPy and CuPy (CuPy uses NumPy dtypes)
    "dtype", "finfo", "iinfo", "result_type", "promote_types", "issubdtype", "can_cast",
    "float64", "float32", "int64", "intp",
    # floating-point error state of NumPy itself (CuPy has its own, cupyx.errstate)
    "errstate",
    # shape arithmetic on tuples; np.shape/np.ndim read the .shape attribute first (no copy)
    "broadcast_shapes", "shape", "ndim",
    # random numbers are drawn on the host, always (design §6: identical CPU/GPU inputs)
    "random.default_rng", "random.SeedSequence",
}

#: remaining unannotated calls per file (a ratchet; see the module docstring). Files owned by
#: the nn engineer (refcurv/nn/*) and the lead (methods/base.py, train.py, …) are listed as found.
BASELINE = {
    "refcurv/curvature.py": 0,
    "refcurv/linalg/_checks.py": 2,
    "refcurv/linalg/batched.py": 0,
    "refcurv/linalg/damping.py": 0,
    "refcurv/linalg/ema.py": 6,
    "refcurv/linalg/gemm.py": 0,
    "refcurv/linalg/gfim.py": 8,
    "refcurv/linalg/kronecker.py": 0,
    "refcurv/linalg/lowrank.py": 0,
    "refcurv/linalg/quasi_newton.py": 0,
    "refcurv/linalg/roots.py": 0,
    "refcurv/linalg/sketch.py": 0,
    "refcurv/linalg/tensor.py": 0,
    "refcurv/linalg/woodbury.py": 0,
    "refcurv/methods/_sampled.py": 3,
    "refcurv/methods/_tensors.py": 0,
    "refcurv/methods/adam.py": 9,
    "refcurv/methods/base.py": 6,
    "refcurv/methods/diagnostics.py": 0,
    "refcurv/methods/ginger.py": 5,
    "refcurv/methods/hessian_free.py": 6,
    "refcurv/methods/kbfgs.py": 0,
    "refcurv/methods/kbfgs_mlp.py": 0,
    "refcurv/methods/kfac.py": 0,
    "refcurv/methods/natural_gradient.py": 5,
    "refcurv/methods/ngplus.py": 1,
    "refcurv/methods/qng.py": 0,
    "refcurv/methods/registry.py": 0,
    "refcurv/methods/seng.py": 0,
    "refcurv/methods/sgd.py": 1,
    "refcurv/methods/shampoo.py": 0,
    "refcurv/methods/smw.py": 1,
    "refcurv/methods/tnt.py": 0,
    "refcurv/methods/vocabulary.py": 0,
    "refcurv/nn/_checks.py": 0,
    "refcurv/nn/autodiff.py": 2,
    "refcurv/nn/layers.py": 0,
    "refcurv/nn/losses.py": 3,
    "refcurv/nn/model.py": 1,
    "refcurv/operators.py": 10,
    "refcurv/train.py": 20,
    "refcurv/vec.py": 3,
}


def _dotted(f):
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name) and f.id in ("np", "numpy"):
        return ".".join(reversed(parts))
    return None


def violations(path):
    """``(line, name)`` of each ``np.<name>(…)`` call in ``path`` not in :data:`ALLOW` and not
    on a line marked ``# host:``."""
    src = (ROOT / path).read_text()
    lines = src.splitlines()
    out = []
    tree = ast.parse(src)
    # a function whose ``def`` line is marked ``# host:`` is host-side as a whole (a float64
    # reference computed on the host after ``to_numpy``, host-drawn sketches, scalar checks)
    host_lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            header = lines[fn.lineno - 1:fn.body[0].lineno - 1]
            if any("# host:" in line for line in header):
                host_lines.update(range(fn.lineno, (fn.end_lineno or fn.lineno) + 1))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.lineno not in host_lines:
            name = _dotted(node.func)
            if name is None or name in ALLOW:
                continue
            span = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
            if any("# host:" in line for line in span):
                continue
            out.append((node.lineno, name))
    return sorted(out)


def test_scan_finds_a_numpy_call_on_array_data(tmp_path, monkeypatch):
    """The scanner itself: a plain np call is found, an allowed one and a marked one are not."""
    p = tmp_path / "m.py"
    p.write_text("import numpy as np\n"
                 "def f(x):\n"
                 "    a = np.linalg.norm(x)\n"
                 "    b = np.finfo(x.dtype).eps\n"
                 "    c = np.asarray(x)  # host: the sketch indices live on the host\n"
                 "    return np.sum(x) + a + b + c\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations("m.py") == [(3, "linalg.norm"), (6, "sum")]


def test_every_numerical_module_is_in_the_baseline():
    assert sorted(BASELINE) == MODULES, set(MODULES) ^ set(BASELINE)


@pytest.mark.parametrize("path", MODULES)
def test_no_new_numpy_calls_on_array_data(path):
    found = violations(path)
    allowed = BASELINE[path]
    listing = ", ".join(f"{ln}:np.{name}" for ln, name in found)
    assert len(found) <= allowed, (f"{path}: {len(found)} numpy calls on array data (baseline {allowed}): {listing}. "
                                   "Use xp = refcurv.backend.xp_of(...) and xp.<name>, or mark a deliberate host "
                                   "fallback with '# host: <reason>'")
    assert len(found) == allowed, f"{path}: {len(found)} < baseline {allowed}: lower BASELINE[{path!r}] to {len(found)}"


@pytest.mark.gpu
def test_fast_forms_run_on_cupy_and_match_numpy():
    """On a GPU: the BLAS kernels of issue 15 and one step of KFAC, Shampoo, SENG and TNT run
    on CuPy arrays unchanged and agree with NumPy in float64."""
    cupy = pytest.importorskip("cupy")
    from refcurv import backend
    from refcurv import curvature as cv
    from refcurv.linalg import gemm
    from refcurv.methods import REGISTRY, Batch
    from refcurv.nn import CrossEntropy, Linear, Sequential, Tanh
    from refcurv.testing.tolerance import rel_err, tolerance

    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((6, 5, 3)), rng.standard_normal((6, 4, 3))
    for fn in (gemm.factor_sum, gemm.kron_gram):
        out = fn(cupy.asarray(g), cupy.asarray(a)) if fn is gemm.factor_sum else fn(cupy.asarray(a), cupy.asarray(g))
        ref = fn(g, a) if fn is gemm.factor_sum else fn(a, g)
        assert backend.xp_of(out) is cupy and rel_err(backend.to_numpy(out), ref) <= tolerance(50, cond=10)
    net = Sequential([Linear(5, 6), Tanh(), Linear(6, 3)])
    params = net.init(0)
    x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    H = cv.hessian(net, [cupy.asarray(W) for W in params], cupy.asarray(x), cupy.asarray(y), CrossEntropy())
    assert rel_err(backend.to_numpy(H), cv.hessian(net, params, x, y, CrossEntropy())) <= tolerance(net.n_params, cond=100)
    for name in ("kfac", "shampoo", "seng", "tnt"):
        m = REGISTRY[name]()
        d_np, _ = m.step(m.init(net, params), net, params, Batch(x, y, CrossEntropy()), rng=np.random.default_rng(1))
        gp = [cupy.asarray(W) for W in params]
        d_cp, _ = m.step(m.init(net, gp), net, gp, Batch(cupy.asarray(x), cupy.asarray(y), CrossEntropy()),
                         rng=np.random.default_rng(1))
        for u, v in zip(d_cp, d_np):
            assert backend.xp_of(u) is cupy, name
            assert rel_err(backend.to_numpy(u), v) <= tolerance(net.n_params, cond=1e4), name
