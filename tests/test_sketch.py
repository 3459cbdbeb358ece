"""Sketches: unbiasedness E[ΩᵀΩ] = I, application without forming Ω, and SENG Lemma 5
([SENG] Appendix C) evaluated with the η, ε the drawn sketch achieves."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcurv.errors import HyperParameterError, ShapeError
from refcurv.linalg import sketch as SK
from refcurv.testing.strategies import dampings, lowrank_factors
from refcurv.testing.tolerance import assert_clt, assert_close, forward_tol

N = 7


def _probs():
    p = np.array([0.3, 0.05, 0.1, 0.2, 0.15, 0.12, 0.08])
    return p / p.sum()


MAKERS = {
    "uniform, replace": lambda q, seed: SK.row_sampling(N, q, "uniform", True, seed),
    "uniform, no replace": lambda q, seed: SK.row_sampling(N, q, "uniform", False, seed),
    "leverage, replace": lambda q, seed: SK.row_sampling(N, q, _probs(), True, seed),
    "leverage, no replace": lambda q, seed: SK.row_sampling(N, q, _probs(), False, seed),
    "ngplus (17)": lambda q, seed: SK.ngplus_sketch(N, q, seed),
    "gaussian": lambda q, seed: SK.gaussian(N, q, seed),
}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("q", [1, 3, 5])
def test_every_sketch_is_unbiased(kind, q):
    """Seeded Monte Carlo over 5000 sketches; CLT/Bonferroni check of E[ΩᵀΩ] = I."""
    rng = np.random.default_rng(0)
    draws = np.stack([MAKERS[kind](q, rng).gram() for _ in range(5000)])
    assert_clt(draws, np.eye(N))


def test_seng14_scaling_as_printed_is_biased():
    """SENG (14) prints ω = e_iᵀ/p_i: then E[ΩᵀΩ] = q·diag(1/p_i), not I (errata E4)."""
    rng = np.random.default_rng(0)
    q = 3
    draws = np.stack([SK.row_sampling(N, q, _probs(), True, rng, scaling="seng14").gram() for _ in range(4000)])
    assert_clt(draws, q * np.diag(1 / _probs()))
    with pytest.raises(AssertionError):
        assert_clt(draws, np.eye(N))


def test_without_replacement_has_distinct_rows_and_inclusion_probabilities():
    rng = np.random.default_rng(1)
    p = _probs()
    q = 4
    pi = SK.inclusion_probabilities(p, q)
    assert np.isclose(pi.sum(), q) and (pi <= 1).all()
    hits = np.zeros((5000, N))
    for k in range(5000):
        sk = SK.row_sampling(N, q, p, False, rng)
        assert len(set(sk.index.tolist())) == q
        hits[k, sk.index] = 1
    assert_clt(hits, pi)


@given(st.sampled_from(list(MAKERS)), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_apply_equals_dense_omega(kind, q, seed):
    sk = MAKERS[kind](q, seed)
    rng = np.random.default_rng(seed)
    X, v, Z = rng.standard_normal((N, 3)), rng.standard_normal(N), rng.standard_normal((2, N))
    O = sk.to_dense()
    assert_close(sk.apply(X), O @ X, rtol=1e-14)
    assert_close(sk.apply(v), O @ v, rtol=1e-14)
    assert_close(sk.apply_right(Z), Z @ O.T, rtol=1e-14)
    assert_close(sk.gram(), O.T @ O, rtol=1e-14)


@given(lowrank_factors(max_n=30, max_rho=6), dampings(-3, 1), st.integers(1, 30), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_seng_lemma5_bound_with_measured_eta_eps(U, lam, q, leverage, seed):
    """‖b − b̂‖ ≤ (√ε + η) / ((1 − η)√h₁) ‖g‖ whenever η < 1, with b = (λI + UᵀU)⁻¹Uᵀg (9),
    b̂ from the sketched problem (12), η = ‖NᵀΩᵀΩN − I‖₂, ε = ‖NᵀΩᵀΩv‖²/‖v‖² for v the part
    of g orthogonal to range(U) (A.2 as the proof uses it; Nᵀv = 0) and h₁ = λ_min(λI + UUᵀ)
    as in B.2. (The proof divides by λ_min(λI + UᵀU), which is smaller when ρ > rank U; it
    still goes through because b − b̂ lies in range(Uᵀ), where λI + UᵀU ⪰ h₁.)"""
    n = U.shape[0]
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n)
    if leverage and np.linalg.norm(U) > 0:
        sk = SK.row_sampling(n, q, SK.leverage_scores(U), replace=True, seed=rng)
    else:
        sk = SK.row_sampling(n, min(q, n), "uniform", replace=False, seed=rng)
    Nb, sv, _ = np.linalg.svd(U, full_matrices=False)
    Nb = Nb[:, sv > 1e-12 * max(sv.max(initial=0), 1e-300)]
    OmN, Omg = sk.apply(Nb), sk.apply(g)
    eta = np.linalg.norm(OmN.T @ OmN - np.eye(Nb.shape[1]), 2) if Nb.shape[1] else 0.0
    v = g - Nb @ (Nb.T @ g)
    eps = (np.linalg.norm(OmN.T @ sk.apply(v)) ** 2 / (v @ v)) if v @ v > 0 else 0.0
    rho = U.shape[1]
    b = np.linalg.solve(lam * np.eye(rho) + U.T @ U, U.T @ g)
    Xi = sk.apply(U)
    b_hat = np.linalg.solve(lam * np.eye(rho) + Xi.T @ Xi, Xi.T @ Omg)
    h1 = np.linalg.eigvalsh(lam * np.eye(n) + U @ U.T).min()
    if eta < 1:
        bound = (np.sqrt(eps) + eta) / ((1 - eta) * np.sqrt(h1)) * np.linalg.norm(g)
        # rounding floor: two solves with λI + UᵀU-type matrices of condition κ
        kappa = np.linalg.cond(lam * np.eye(rho) + U.T @ U) + np.linalg.cond(lam * np.eye(rho) + Xi.T @ Xi)
        assert np.linalg.norm(b - b_hat) <= bound * (1 + 1e-8) + forward_tol(rho, kappa) * np.linalg.norm(b)


def test_inclusion_probabilities_when_the_sample_takes_every_positive_row():
    """q = number of rows with p_i > 0: every such row is certain (π = 1), the rest π = 0 —
    no 0/0 when the capping loop has made every positive row certain."""
    p = np.array([0.7, 0.0, 0.2, 0.1, 0.0])
    pi = SK.inclusion_probabilities(p, 3)
    assert np.array_equal(pi, np.array([1.0, 0.0, 1.0, 1.0, 0.0]))
    sk = SK.row_sampling(5, 3, p, replace=False, seed=0)
    assert sorted(sk.index.tolist()) == [0, 2, 3] and np.allclose(sk.weight, 1.0)


def test_sketch_bad_input():
    with pytest.raises(HyperParameterError, match="exceeds the population"):
        SK.row_sampling(5, 6, replace=False)
    with pytest.raises(HyperParameterError, match="q must be a positive int"):
        SK.row_sampling(5, 0)
    with pytest.raises(HyperParameterError, match="sum to 1"):
        SK.row_sampling(3, 2, np.array([0.5, 0.6, 0.1]))
    with pytest.raises(HyperParameterError, match="exceeds the 1 rows"):
        SK.row_sampling(3, 2, np.array([1.0, 0.0, 0.0]), replace=False)
    with pytest.raises(ShapeError, match="X must have 5 rows"):
        SK.row_sampling(5, 2, seed=0).apply(np.ones(4))


def _lemma5_case(seed):
    rng = np.random.default_rng(seed)
    n, rho = int(rng.integers(5, 30)), int(rng.integers(1, 6))
    U, lam, g = rng.standard_normal((n, rho)), 10 ** rng.uniform(-3, -1), rng.standard_normal(n)
    sk = SK.row_sampling(n, int(rng.integers(rho, n + 1)), "uniform", replace=False, seed=rng)
    Nb = np.linalg.svd(U, full_matrices=False)[0]
    OmN = sk.apply(Nb)
    eta = np.linalg.norm(OmN.T @ OmN - np.eye(rho), 2)
    v = g - Nb @ (Nb.T @ g)
    eps = np.linalg.norm(OmN.T @ sk.apply(v)) ** 2 / (v @ v)
    b = np.linalg.solve(lam * np.eye(rho) + U.T @ U, U.T @ g)
    Xi = sk.apply(U)
    b_hat = np.linalg.solve(lam * np.eye(rho) + Xi.T @ Xi, Xi.T @ sk.apply(g))
    h1 = np.linalg.eigvalsh(lam * np.eye(n) + U @ U.T).min()
    return np.linalg.norm(b - b_hat), eta, eps, h1, np.linalg.norm(g)


def test_seng_lemma5_statement_31_is_wrong_proof_36_is_right():
    """Errata E5: (31) puts √h₁ in the numerator; the proof ends with (36), 1/√h₁. On this
    seeded case (h₁ ≈ λ < 1) the error exceeds (31)'s bound and respects (36)'s."""
    err, eta, eps, h1, ng = _lemma5_case(10)
    assert eta < 1 and h1 < 1
    assert err > (np.sqrt(eps * h1) + eta * np.sqrt(h1)) / (1 - eta) * ng  # (31) violated
    assert err <= (np.sqrt(eps) + eta) / ((1 - eta) * np.sqrt(h1)) * ng  # (36) holds
