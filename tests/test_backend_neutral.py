"""Backend neutrality without a GPU (design §6, issue 15): numerical modules obtain their array
module from :func:`refcurv.backend.xp_of` and must not call ``numpy.`` functions on array data
(on CuPy input such a call would copy to the host, or fail). An AST scan of every ``np.…(…)``
call in the numerical modules; allowed are the names in :data:`ALLOW` (they never take array
data, or are host-side by design) and lines marked ``# host:`` with the reason (a documented,
visible host fallback; a ``def`` line so marked covers its whole function). No other call
is allowed: every numerical module has zero (the per-file ratchet that counted them down
reached zero everywhere and was removed). The GPU parity tests are marked ``gpu`` and skip
cleanly where CuPy or a device is missing."""
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


def test_the_scan_covers_the_numerical_modules():
    """The glob above still finds the numerical modules (a moved package would otherwise
    make the neutrality test pass vacuously)."""
    for path in ("refcurv/curvature.py", "refcurv/operators.py", "refcurv/train.py", "refcurv/vec.py",
                 "refcurv/linalg/gemm.py", "refcurv/methods/kfac.py", "refcurv/methods/base.py",
                 "refcurv/nn/autodiff.py", "refcurv/nn/losses.py"):
        assert path in MODULES, path
    assert len(MODULES) >= 40, MODULES


@pytest.mark.parametrize("path", MODULES)
def test_no_numpy_calls_on_array_data(path):
    found = violations(path)
    listing = ", ".join(f"{ln}:np.{name}" for ln, name in found)
    assert not found, (f"{path}: {len(found)} numpy calls on array data: {listing}. Use xp = "
                       "refcurv.backend.xp_of(...) and xp.<name>, or mark a deliberate host fallback "
                       "with '# host: <reason>'")


def test_block_diag_is_scipys():
    """backend._block_diag (natural_gradient's dense reference, on the blocks' backend) builds
    exactly SciPy's matrix: same entries, shape and promoted dtype, rectangular blocks too."""
    from scipy.linalg import block_diag as scipy_block_diag

    from refcurv.backend import _block_diag as block_diag

    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((2, 2)), rng.standard_normal((3, 1)).astype(np.float32), rng.standard_normal((1, 4))]
    out, ref = block_diag(blocks), scipy_block_diag(*blocks)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert np.array_equal(out, ref)


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
