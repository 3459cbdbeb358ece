"""Kronecker-factor kernels shared by the Kronecker methods and public for users: damping
splits between factors, factor statistics, the minibatched Hessian action. Each function
names its seed and equation; each has its own test.

Vectorization: refcurv's row-major ``vec`` of ``W ∈ R^{out×d}``, so a layer block is
``G ⊗ A`` (``G`` on the output side, ``A`` on the input side) with
``(G ⊗ A) vec(W) = vec(G W Aᵀ)``; the papers' column-major ``vec`` reads ``A ⊗ G``.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of

# ---------------------------------------------------------------- KFAC (kfac)

# ---------------------------------------------------------------- K-BFGS (kbfgs)
# Thesis 003 Ch.2 (MLP, §2.4, Algorithm 4) and Ch.3 (conv, (3.9), (3.14)-(3.15), Algorithm 9).
# Patches are the (N, d, |T|) arrays of :meth:`refcurv.nn.Sequential.factors` (ones row
# included; |T| = 1 for a Linear layer).


def damping_split(damping, n_locations=1):
    """K-BFGS's damping split ``(λ_A, λ_G) = (√|T| √λ, √λ / √|T|)`` (thesis 003 Algorithm 9
    line 2, §3.4.3: "rebalancing" A and G), so that ``λ_A λ_G = λ``. For a Linear layer
    (``|T| = 1``) it is Chapter 2's ``λ_A = λ_G = √λ`` (Algorithm 4 line 2)."""
    r, t = np.sqrt(damping), np.sqrt(n_locations)
    return float(t * r), float(r / t)


def factor_A(patches):
    """Dense ``A = (1/N) Σ_n Σ_t a_t(n) a_t(n)ᵀ`` (thesis 003 (3.9); (2.3) for ``|T| = 1``)
    from patches ``(N, d, |T|)``: a *sum* over locations and a *mean* over samples (KFAC's
    ``Ω``, ``|T|`` times the ``A`` of ``curvature.kfac_factors(conv="expand")``)."""
    xp = xp_of(patches)
    return xp.einsum("ndt,net->de", patches, patches) / patches.shape[0]


def mean_patch(patches):
    """``â = E_n[(1/|T|) Σ_t a_t(n)]`` (thesis 003 (3.14); ``ā`` of §2.4 for ``|T| = 1``)."""
    return patches.mean(axis=(0, 2))


def hessian_action(patches, s):
    """The minibatched Hessian action ``A s = (1/N) Σ_n Σ_t (a_t(n)ᵀ s) a_t(n)`` (thesis 003
    (3.15)) without forming ``A``: two contractions over the patches ``(N, d, |T|)``,
    ``O(N d |T|)`` instead of ``O(N d² |T|)`` for :func:`factor_A`."""
    xp = xp_of(patches, s)
    c = xp.einsum("ndt,d->nt", patches, s)
    return xp.einsum("ndt,nt->d", patches, c) / patches.shape[0]


def hessian_action_pair(H_a, abar, A, lambda_A):
    """The Hessian-action BFGS pair for ``H_a ≈ (A + λ_A I)⁻¹`` (thesis 003 §2.4 / Algorithm 4
    line 22; (3.14)): ``s_a = H_a ā``, ``y_a = A s_a + λ_A s_a``. ``A`` is the matrix, or the
    patches ``(N, d, |T|)`` (3-d array), whose action is then :func:`hessian_action`."""
    s = H_a @ abar
    As = hessian_action(A, s) if A.ndim == 3 else A @ s
    return s, As + lambda_A * s

# ---------------------------------------------------------------- TNT / Shampoo (tntsh)
