"""The golden files stand on their own (issue 12): the README's reader, executed where
refcurv cannot be imported, reads and hash-checks the whole shipped set, and quantities
computed by PyTorch — ``torch.func`` per-sample gradients and KFAC's Kronecker factors —
agree with the vectors within the manifest's tolerances (skipped without torch)."""
import builtins
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from refcurv.golden import DATA_DIR

README = Path(__file__).resolve().parents[1] / "README.md"


def _reader():
    """The README block defining ``read_golden``, run in a namespace whose ``import`` of
    refcurv fails."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    code = [b for b in blocks if "def read_golden" in b]
    assert len(code) == 1, "README must hold exactly one block defining read_golden"
    assert "refcurv" not in code[0].replace("refcurv golden", "")
    assert len(code[0].splitlines()) <= 45

    real_import = builtins.__import__

    def no_refcurv(name, *args, **kwargs):
        if name == "refcurv" or name.startswith("refcurv."):
            raise ImportError("the golden reader must not need refcurv")
        return real_import(name, *args, **kwargs)

    ns = {"__builtins__": {**vars(builtins), "__import__": no_refcurv}, "__name__": "golden_reader"}
    exec(compile(code[0], "README golden reader", "exec"), ns)
    return ns["read_golden"], ns["agrees"]


def test_reader_reads_the_shipped_set_without_refcurv():
    import json

    read_golden, agrees = _reader()
    cases = read_golden(DATA_DIR)
    with open(Path(DATA_DIR) / "manifest.json") as fh:
        assert len(cases) == len(json.load(fh)["cases"])
    case, arrays = cases["hessian.mlp-ce"]
    H = arrays["out"]
    assert agrees(H, case, arrays, "out") and not agrees(H * (1 + 1e-8), case, arrays, "out")


def test_reader_refuses_a_tampered_array(tmp_path):
    read_golden, _ = _reader()
    d = tmp_path / "g"
    shutil.copytree(DATA_DIR, d)
    from refcurv.golden.format import write_npz

    path = d / "grad.mlp-ce.npz"
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["out"] = arrays["out"] + 1e-15
    write_npz(path, arrays)
    with pytest.raises(ValueError, match="grad.mlp-ce: array out does not match its sha256"):
        read_golden(str(d), "grad.mlp-ce")


def _torch_mlp(torch, params):
    """The shipped 'mlp' (Linear(3, 4), Tanh, Linear(4, 3)) as torch functions of
    (weight, bias) pairs, from refcurv's [W | b] matrices."""
    return [(torch.tensor(W[:, :-1]), torch.tensor(W[:, -1])) for W in params]


def _forward(torch, layers, x):
    (W0, b0), (W1, b1) = layers
    a1 = torch.tanh(x @ W0.T + b0)
    return a1, a1 @ W1.T + b1


def test_torch_per_sample_gradients_and_kronecker_factors_agree():
    torch = pytest.importorskip("torch")
    from torch.func import grad, vmap

    read_golden, agrees = _reader()
    case, arrays = read_golden(DATA_DIR, "per_sample_grads.mlp-ce")["per_sample_grads.mlp-ce"]
    assert case["network"]["layers"][0] == {"type": "Linear", "in_features": 3, "out_features": 4, "bias": True}
    layers = _torch_mlp(torch, [arrays["params/0"], arrays["params/1"]])
    x, y = torch.tensor(arrays["x"]), torch.tensor(arrays["y"])
    flat = [t for pair in layers for t in pair]

    def psi(ps, xi, yi):  # one sample's cross-entropy (refcurv's ψ_i)
        _, f = _forward(torch, [(ps[0], ps[1]), (ps[2], ps[3])], xi[None])
        return torch.nn.functional.cross_entropy(f, yi[None])

    g = vmap(grad(psi), in_dims=(None, 0, 0))(flat, x, y)  # per-sample (weight, bias, weight, bias)
    # refcurv order: per layer the rows of [W | b], row-major
    U = torch.cat([torch.cat([g[0], g[1][..., None]], -1).flatten(1),
                   torch.cat([g[2], g[3][..., None]], -1).flatten(1)], 1)
    assert agrees(U.numpy(), case, arrays, "out")
    assert not agrees(U.numpy()[:, np.r_[12:16, 0:12, 16:31]], case, arrays, "out")  # order matters

    # KFAC's factors: A = (1/N) Σ a aᵀ of the layer inputs with the ones row (expand, T = 1),
    # G = (1/N) Σ g gᵀ of the pre-activation gradients (empirical kind: data labels) — the
    # per-sample bias gradients
    for qid in ("kfac_factors_expand.mlp-ce", "kfac_factors_empirical.mlp-ce"):
        case, arrays = read_golden(DATA_DIR, qid)[qid]
        a1, _ = _forward(torch, layers, x)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
        for l, a in enumerate((x, a1)):
            a = torch.cat([a, ones], 1)
            assert agrees((a.T @ a / x.shape[0]).numpy(), case, arrays, f"out/{l}/A"), (qid, l)
        if case["hyper_parameters"]["kind"] == "empirical":
            for l, gb in enumerate((g[1], g[3])):
                assert agrees((gb.T @ gb / x.shape[0]).numpy(), case, arrays, f"out/{l}/G"), (qid, l)
