"""Kronecker-factor kernels shared by the Kronecker methods and public for users: damping
splits between factors, factor statistics, the minibatched Hessian action. Each function
names its seed and equation; each has its own test.

Vectorization: refcurv's row-major ``vec`` of ``W ∈ R^{out×d}``, so a layer block is
``G ⊗ A`` (``G`` on the output side, ``A`` on the input side) with
``(G ⊗ A) vec(W) = vec(G W Aᵀ)``; the papers' column-major ``vec`` reads ``A ⊗ G``.
"""
from __future__ import annotations

from functools import reduce

import math


from ..backend import xp_of
from ..errors import ArgumentTypeError, ShapeError
from . import _checks as C
from .gemm import outer_sum as _outer_sum

# ---------------------------------------------------------------- KFAC (kfac)

#: the damping splits of :func:`damped_split`
SPLITS = ("pi", "sqrt")


def split_pi(Omega, Gamma):
    """The factored-Tikhonov split ``π = √( (tr Ω / dim Ω) / (tr Γ / dim Γ) )`` ([Ren-thesis],
    Algorithm 12 line 19: ``π_l = √(trace(Ω_l ⊗ I) / trace(I ⊗ Γ_l))``, whose identity
    factors have the other factor's size, so the ratio is the ratio of the mean
    eigenvalues; Martens & Grosse 2015 §6.3). ``1.0`` when either trace is not positive
    (an all-zero factor, e.g. a dead layer), where the ratio is undefined. A Python float."""
    Omega, Gamma = C.square(Omega, "Omega"), C.square(Gamma, "Gamma")
    xp = xp_of(Omega)
    a = float(xp.trace(Omega)) / Omega.shape[0]
    g = float(xp.trace(Gamma)) / Gamma.shape[0]
    return C.result(float(math.sqrt(a / g)) if a > 0 and g > 0 else 1.0, "the split π")


def damped_split(Omega, Gamma, damping, split="pi"):
    """The damped Kronecker factors ``(Ω + π√λ I, Γ + (√λ/π) I, π)`` of KFAC ([Ren-thesis],
    Algorithm 12 line 19 for ``split="pi"`` with ``π`` from :func:`split_pi`; Algorithm 7
    line 11 for ``split="sqrt"``, ``π = 1``).

    The damping terms multiply to ``λ`` whatever ``π``: ``(Γ + (√λ/π)I) ⊗ (Ω + π√λI) =
    Γ ⊗ Ω + π√λ (Γ ⊗ I) + (√λ/π)(I ⊗ Ω) + λ I`` (row-major block ``G ⊗ A``). With the trace
    split the damped product is invariant to rescaling the factors ``(cΩ, Γ/c)`` (``π``
    scales by ``c``), so KFAC's expand and KFC scaling conventions, which differ by the
    number of locations, damp alike. ``Omega`` ``(d, d)`` and ``Gamma`` ``(o, o)`` are
    symmetric PSD; the result keeps their dtype (``π`` and ``√λ`` enter as Python floats)."""
    Omega = C.symmetric(Omega, "Omega")
    Gamma = C.symmetric(Gamma, "Gamma")
    C.positive(damping, "damping")
    C.choice(split, "split", SPLITS)
    xp = xp_of(Omega)
    pi = split_pi(Omega, Gamma) if split == "pi" else 1.0
    r = float(math.sqrt(damping))  # Python floats: a NumPy float64 would promote float32 factors
    return C.result((Omega + pi * r * xp.eye(Omega.shape[0], dtype=Omega.dtype),
                     Gamma + (r / pi) * xp.eye(Gamma.shape[0], dtype=Gamma.dtype), pi), "the damped factors")


# ---------------------------------------------------------------- K-BFGS (kbfgs)
# [Ren-thesis] Ch.2 (MLP, §2.4, Algorithm 4) and Ch.3 (conv, (3.9), (3.14)-(3.15), Algorithm 9).
# Patches are the (N, d, |T|) arrays of :meth:`refcurv.nn.Sequential.factors` (ones row
# included; |T| = 1 for a Linear layer).


def damping_split(damping, n_locations=1):
    """K-BFGS's damping split ``(λ_A, λ_G) = (√|T| √λ, √λ / √|T|)`` ([Ren-thesis] Algorithm 9
    line 2, §3.4.3: "rebalancing" A and G), so that ``λ_A λ_G = λ``. For a Linear layer
    (``|T| = 1``) it is Chapter 2's ``λ_A = λ_G = √λ`` (Algorithm 4 line 2)."""
    C.positive(damping, "damping")
    C.integer(n_locations, "n_locations", minimum=1)
    r, t = math.sqrt(damping), math.sqrt(n_locations)
    return float(t * r), float(r / t)


def factor_A(patches):
    """Dense ``A = (1/N) Σ_n Σ_t a_t(n) a_t(n)ᵀ`` ([Ren-thesis] (3.9); (2.3) for ``|T| = 1``)
    from patches ``(N, d, |T|)``: a *sum* over locations and a *mean* over samples (KFAC's
    ``Ω``, ``|T|`` times the ``A`` of ``curvature.kfac_factors(conv="expand")``)."""
    patches = _patches(patches)
    xp = xp_of(patches)
    return C.result(_outer_sum(patches) / patches.shape[0], "the factor A")


def mean_patch(patches):
    """``â = E_n[(1/|T|) Σ_t a_t(n)]`` ([Ren-thesis] (3.14); ``ā`` of §2.4 for ``|T| = 1``)."""
    return C.result(_patches(patches).mean(axis=(0, 2)), "the mean patch â")


def hessian_action(patches, s):
    """The minibatched Hessian action ``A s = (1/N) Σ_n Σ_t (a_t(n)ᵀ s) a_t(n)`` ([Ren-thesis]
    (3.15)) without forming ``A``: two contractions over the patches ``(N, d, |T|)``,
    ``O(N d |T|)`` instead of ``O(N d² |T|)`` for :func:`factor_A`."""
    patches = _patches(patches)
    s = C.vector(s, "s", patches.shape[1])
    xp = xp_of(patches, s)
    # two GEMVs on BLAS: c_{n,t} = a_{n,t}ᵀ s, then Σ_{n,t} c_{n,t} a_{n,t}
    c = s @ patches  # (N, T)
    return C.result(xp.swapaxes(patches, 0, 1).reshape(patches.shape[1], -1) @ c.reshape(-1) / patches.shape[0],
                    "the Hessian action A s")


def hessian_action_pair(H_a, abar, A, lambda_A):
    """The Hessian-action BFGS pair for ``H_a ≈ (A + λ_A I)⁻¹`` ([Ren-thesis] §2.4 / Algorithm 4
    line 22; (3.14)): ``s_a = H_a ā``, ``y_a = A s_a + λ_A s_a``. ``A`` is the matrix, or the
    patches ``(N, d, |T|)`` (3-d array), whose action is then :func:`hessian_action`."""
    H_a = C.square(H_a, "H_a")
    abar = C.vector(abar, "abar", H_a.shape[0])
    A = C.finite(A, "A")
    C.nonnegative(lambda_A, "lambda_A")
    if A.ndim not in (2, 3) or (A.ndim == 2 and A.shape != H_a.shape):
        raise ShapeError(f"A must be {H_a.shape} like H_a (or patches (N, {H_a.shape[0]}, |T|)), got {A.shape}")
    s = H_a @ abar
    As = hessian_action(A, s) if A.ndim == 3 else A @ s
    return C.result((s, As + lambda_A * s), "the Hessian-action pair (s_a, y_a)")

# ---------------------------------------------------------------- TNT / Shampoo (tntsh)
#
# Tensor-normal factors ([Ren-thesis] §4.2-4.3) and the damped Kronecker factors of TNT and
# Shampoo (Algorithms 15/16). A parameter tensor W ∈ R^{d_1×⋯×d_k} is vectorized row-major
# (vec̄, §4.2.1); its curvature block is ⊗_i F_i on vec̄(W) (Proposition 1, (4.9)).
# (imports kept in this section so that the per-family sections merge independently)


def _patches(P, name="patches"):
    return C.array(P, name, 3, what="patches (N, d, |T|)")


def _factor_list(S, name):
    """A non-empty list of finite square matrices (host or device)."""
    if not isinstance(S, (list, tuple)) or len(S) == 0:
        raise ArgumentTypeError(f"{name} must be a non-empty list of square matrices, got {type(S).__name__}"
                                + (" of length 0" if isinstance(S, (list, tuple)) else ""))
    return [C.square(F, f"{name}[{i}]") for i, F in enumerate(S)]


def _dims(S):
    return [int(s.shape[0]) for s in S]


def normalized_factors(S):
    """[Ren-thesis] (4.10), the ``c = 1`` representation with equal average eigenvalues:
    ``Ũ_i = S_i / (c_0^{k−1} Π_{j≠i} d_j)``, ``c_0 = (tr S_1 / Π_j d_j)^{1/k}``, from the
    mode statistics ``S = [E[G^{(1)}], …, E[G^{(k)}]]`` of one tensor.

    Then ``tr(Ũ_i)/d_i = c_0`` for every ``i`` and ``S_i = Ũ_i Π_{j≠i} tr Ũ_j`` ((4.2) holds
    with ``U = Ũ``). ``tr S_i = E‖G‖²`` is the same for every mode, so ``c_0`` is computed
    from mode 1 (errata TNT-4). If ``tr S_1 = 0`` (a tensor whose gradient is always zero)
    every ``Ũ_i = 0``, the limit of (4.10). (4.10) is positively homogeneous of degree
    ``1/k``: ``Ũ_i(sS) = s^{1/k} Ũ_i(S)`` (errata TNT-1)."""
    S = _factor_list(S, "S")
    k = len(S)
    dims = _dims(S)
    D = float(math.prod(dims))
    tr = float(xp_of(S[0]).trace(S[0]))
    if tr <= 0:
        return [0 * s for s in S]
    c0 = (tr / D) ** (1.0 / k)
    return C.result([s / (c0 ** (k - 1) * (D / d)) for s, d in zip(S, dims)], "the normalized factors")


def add_damping(factors, damping):
    """``[F_i + εI]``: ε added in full to each factor (TNT §4.3.3 / Algorithm 15 line 16 on
    ``Ũ_i``; Shampoo Algorithm 16 line 12 on ``Ĝ^{(i)}`` before the root)."""
    factors = _factor_list(factors, "factors")
    C.positive(damping, "damping")
    xp = xp_of(factors[0])
    return C.result([F + damping * xp.eye(F.shape[0], dtype=F.dtype) for F in factors], "the damped factors")


def damped_factors(S, damping):
    """TNT's factors ``[Ũ_i + εI]`` ([Ren-thesis] §4.3.3, (4.10), Algorithm 15 lines 15-16,
    Lemma 10): :func:`normalized_factors` then :func:`add_damping`."""
    return add_damping(normalized_factors(S), damping)


def f_tnt(factors):
    """Dense ``F_TNT = (Ũ_1+εI) ⊗ ⋯ ⊗ (Ũ_k+εI)`` in row-major ``vec̄`` order ([Ren-thesis]
    Lemma 10, Proposition 1 (4.9)). ``ε^k I ⪯ F_TNT`` (errata TNT-3)."""
    factors = _factor_list(factors, "factors")
    return C.result(reduce(xp_of(factors[0]).kron, factors), "F_TNT")


def mode_marginal(Sigma, dims, i):
    """The mode-``i`` statistic of a tensor's second moment, by definition ([Ren-thesis]
    §4.2.1, (4.2)): for ``Σ = E[vec̄(G) vec̄(G)ᵀ]`` (``n × n``, ``n = Π d_j``, row-major
    ``vec̄`` of ``G ∈ R^{d_1×⋯×d_k}``), ``E[G^{(i)}] = E[mat_i(G) mat_i(G)ᵀ]`` is the partial
    trace of ``Σ`` over every mode but ``i``:
    ``E[G^{(i)}]_{ab} = Σ_{j_{¬i}} Σ[(…a…), (…b…)]``. The dense forms of TNT and Shampoo
    compute their statistics this way, from the full block ``Σ`` (``refcurv.curvature``)."""
    Sigma = C.finite(Sigma, "Sigma")
    if not isinstance(dims, (list, tuple)) or not dims:
        raise ArgumentTypeError(f"dims must be a non-empty tuple of positive ints, got {type(dims).__name__}")
    dims = tuple(C.integer(d, "dims[j]", minimum=1) for d in dims)
    i = C.integer(i, "i", minimum=0)
    k = len(dims)
    if Sigma.shape != (int(math.prod(dims)),) * 2 or not 0 <= i < k:
        raise ShapeError(f"Sigma must be ({int(math.prod(dims))},)*2 and 0 <= i < {k}, got {Sigma.shape}, i = {i}")
    T = Sigma.reshape(dims + dims)
    # move the two copies of mode i first, then sum the matched diagonal of every other mode
    xp = xp_of(Sigma)
    T = xp.moveaxis(T, (i, k + i), (0, 1))
    rest = int(math.prod(dims)) // dims[i]
    T = T.reshape(dims[i], dims[i], rest, rest)
    return xp.trace(T, axis1=2, axis2=3)
