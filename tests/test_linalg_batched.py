"""refcurv.linalg.batched: each stacked kernel equals its one-matrix counterpart slice by slice
(test-side loops over the stack), with the documented errors."""
import numpy as np
import pytest

from refcurv.errors import HyperParameterError, NotSPDError, ShapeError
from refcurv.linalg.batched import randomized_svd_batched, spd_solve_batched, truncated_svd_batched
from refcurv.linalg.lowrank import randomized_svd
from refcurv.linalg.woodbury import spd_solve
from refcurv.testing.tolerance import assert_close, forward_tol


def _spd_stack(rng, W, m, cond=1e3):
    Q = np.linalg.qr(rng.standard_normal((W, m, m)))[0]
    w = np.geomspace(1, cond, m)
    return (Q * w) @ Q.swapaxes(1, 2)


@pytest.mark.parametrize("rhs", ["vector", "matrix"])
def test_spd_solve_batched_equals_spd_solve_per_slice(rhs):
    rng = np.random.default_rng(0)
    A = _spd_stack(rng, 3, 5)
    B = rng.standard_normal((3, 5) if rhs == "vector" else (3, 5, 2))
    X = spd_solve_batched(A, B)
    assert X.shape == B.shape
    for w in range(3):  # test-side loop over the stack
        ref = spd_solve(A[w], B[w])
        assert_close(X[w], ref, rtol=forward_tol(5, 1e3))
        assert_close(A[w] @ X[w], B[w], rtol=forward_tol(5, 1e3), atol=0)


def test_spd_solve_batched_eigh_fallback_and_refusal():
    """A PD slice Cholesky rejects in floating point takes the eigh path; an indefinite one is
    refused with NotSPDError naming the matrix."""
    rng = np.random.default_rng(1)
    A = _spd_stack(rng, 2, 4)
    A[1] = np.diag([1.0, 1.0, 1.0, -1e-3])
    with pytest.raises(NotSPDError, match="cap"):
        spd_solve_batched(A, rng.standard_normal((2, 4)), "cap")
    with pytest.raises(ShapeError):
        spd_solve_batched(A, rng.standard_normal((3, 4)))
    with pytest.raises(ShapeError):
        spd_solve_batched(rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3)))


def test_spd_solve_batched_fallback_path(monkeypatch):
    """When Cholesky fails, the eigendecomposition solves the (PD) stack."""
    import refcurv.linalg.batched as B

    def boom(A):
        raise np.linalg.LinAlgError("forced")

    monkeypatch.setattr(B, "cholesky", boom)
    rng = np.random.default_rng(2)
    A = _spd_stack(rng, 3, 4)
    b = rng.standard_normal((3, 4))
    X = B.spd_solve_batched(A, b)
    for w in range(3):
        assert_close(X[w], np.linalg.solve(A[w], b[w]), rtol=forward_tol(4, 1e3))


def test_randomized_svd_batched_equals_lowrank_randomized_svd():
    """The batched kernel runs refcurv.linalg.lowrank.randomized_svd's algorithm on a stack."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 7, 9))
    seeds = [11, 12, 13, 14]
    k = min(3 + 2, 7, 9)
    Om = np.stack([np.random.default_rng(s).standard_normal((9, k)) for s in seeds])
    U, s, Vt = randomized_svd_batched(X, 3, oversample=2, power_iter=1, Omega=Om)
    for i, sd in enumerate(seeds):  # test-side loop over the stack
        U1, s1, Vt1 = randomized_svd(X[i], 3, oversample=2, n_iter=1, seed=sd)
        assert_close(s[i], s1, rtol=1e-12)
        assert_close((U[i] * s[i]) @ Vt[i], (U1 * s1) @ Vt1, rtol=1e-12)
    # seeded: the same seed gives the same factors
    a = randomized_svd_batched(X, 2, seed=5)
    b = randomized_svd_batched(X, 2, seed=5)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_randomized_svd_batched_is_exact_at_full_rank():
    """rank + oversample ≥ rank(X): the range finder captures range(X) and the factors are X."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3, 5, 2)) @ rng.standard_normal((3, 2, 6))  # rank 2
    U, s, Vt = randomized_svd_batched(X, 2, seed=0, oversample=1)
    assert_close((U * s[:, None, :]) @ Vt, X, rtol=1e-12)


def test_truncated_svd_batched():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((3, 4, 6))
    U, s, Vt = truncated_svd_batched(X, 2)
    assert U.shape == (3, 4, 2) and s.shape == (3, 2) and Vt.shape == (3, 2, 6)
    for i in range(3):
        s1 = np.linalg.svd(X[i], compute_uv=False)
        assert_close(s[i], s1[:2], rtol=1e-13)
    U, s, Vt = truncated_svd_batched(X, 4)
    assert_close((U * s[:, None, :]) @ Vt, X, rtol=1e-12)


def test_batched_argument_errors():
    X = np.ones((2, 3, 4))
    for bad in (0, 4, 1.5, True):
        with pytest.raises(HyperParameterError, match="rank"):
            randomized_svd_batched(X, bad)
        with pytest.raises(HyperParameterError, match="rank"):
            truncated_svd_batched(X, bad)
    with pytest.raises(HyperParameterError, match="power_iter"):
        randomized_svd_batched(X, 1, power_iter=-1)
    with pytest.raises(HyperParameterError, match="oversample"):
        randomized_svd_batched(X, 1, oversample=-1)
    with pytest.raises(ShapeError, match="Omega"):
        randomized_svd_batched(X, 1, oversample=0, Omega=np.ones((2, 4, 2)))
    with pytest.raises(ShapeError):
        randomized_svd_batched(np.ones((3, 4)), 1)
