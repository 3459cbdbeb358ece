"""Kronecker-factor kernels shared by the Kronecker methods and public for users: damping
splits between factors, factor statistics, the minibatched Hessian action. Each function
names its seed and equation; each has its own test.

Vectorization: refcurv's row-major ``vec`` of ``W ∈ R^{out×d}``, so a layer block is
``G ⊗ A`` (``G`` on the output side, ``A`` on the input side) with
``(G ⊗ A) vec(W) = vec(G W Aᵀ)``; the papers' column-major ``vec`` reads ``A ⊗ G``.
"""
from __future__ import annotations

# ---------------------------------------------------------------- KFAC (kfac)

# ---------------------------------------------------------------- K-BFGS (kbfgs)

# ---------------------------------------------------------------- TNT / Shampoo (tntsh)
