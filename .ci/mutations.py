# Manual check (not run by CI): apply small mutations to the formulas and confirm the
# tests go red. Run from the repository root: python .ci/mutations.py
import subprocess, sys
M = [
 ("refcurv/nn/model.py", "new = new + dz * m.d2(a) * tan_in[k]", "new = new", "tests/test_autodiff_oracle.py"),
 ("refcurv/nn/layers.py", "cols = xp.stack(cols, axis=-3)", "cols = xp.stack(cols, axis=-4)", "tests/test_autodiff_oracle.py"),
 ("refcurv/nn/losses.py", "r[:, idx, idx] = -q", "r[:, idx, idx] = q", "tests/test_identities.py"),
 ("refcurv/curvature.py", "a_hat = A.mean(axis=-1)", "a_hat = A.sum(axis=-1)", "tests/test_identities.py"),
 ("refcurv/nn/layers.py", "return -2 * xp_of(h).tanh(h) * _sech2(h)", "return 2 * xp_of(h).tanh(h) * _sech2(h)", "tests/test_autodiff_oracle.py"),
 ("refcurv/curvature.py", 'return _ret(xp.einsum("snp,snq->pq", U, U) / (S * N), net, blocks)', 'return _ret(xp.einsum("snp,snq->pq", U, U) / (S * N + 1), net, blocks)', "tests/test_identities.py"),
 ("refcurv/nn/layers.py", "return out[..., :, p : p + H, p : p + W]", "return out[..., :, :H, :W]", "tests/test_autodiff_oracle.py"),
 ("refcurv/nn/losses.py", "return p * (diff * p[..., None, :]).sum(axis=-1)", "return p * (diff * p[..., None, :]).sum(axis=-1) * 1.000001", "tests/test_losses.py"),
 ("refcurv/curvature.py", "Gf = w * xp.einsum(\"knot,knpt->op\", g, g) / N", "Gf = w * xp.einsum(\"knot,knpt->op\", g, g) / (N * T)", "tests/test_identities.py"),
 ("refcurv/nn/model.py", "t = t + dparams[j].swapaxes(-1, -2)[:, None] @ g", "t = t", "tests/test_autodiff_oracle.py"),
]
for path, old, new, test in M:
    src = open(path).read()
    assert src.count(old) == 1, (path, old)
    open(path, "w").write(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-W", "ignore", "-p", "no:cacheprovider", test], capture_output=True, text=True)
        last = r.stdout.strip().splitlines()[-1]
        print(("CAUGHT " if r.returncode else "SURVIVED ") + f"{path}: {new[:60]!r} -> {last}")
    finally:
        open(path, "w").write(src)
