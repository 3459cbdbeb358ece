"""Tensor operations ([Ren-thesis] §4.2.1), 0-based modes in code (``i`` here is the
thesis's ``i + 1``).

* ``vec̄`` is row-major ``ravel``; ``mat_i(A) = moveaxis(A, i, 0).reshape(d_i, -1)``;
* mode-i product ``(A ×_i U)_{…j'…} = Σ_j A_{…j…} U_{j'j}``;
* contraction ``A^{(i)} = mat_i(A) mat_i(A)ᵀ``;
* Lemma 8: ``(A ⊗ Bᵀ) vec̄(X) = vec̄(A X B)``; Proposition 1:
  ``(⊗_i U_i) vec̄(G) = vec̄(G ×_1 U_1 ⋯ ×_k U_k)`` — Kronecker products applied without
  forming them.
"""
from __future__ import annotations

from ..backend import xp_of
from ..errors import ArgumentTypeError, ShapeError
from . import _checks as C


def _mode(A, i):
    i = C.integer(i, "i", minimum=-A.ndim)
    if not -A.ndim <= i < A.ndim:
        raise ShapeError(f"mode {i} out of range for a tensor of order {A.ndim}")
    return i % A.ndim


def mat(A, i):
    """Mode-``i`` matricization ``mat_i(A) ∈ R^{d_i × Π_{j≠i} d_j}``."""
    A = C.finite(A, "A")
    i = _mode(A, i)
    return xp_of(A).moveaxis(A, i, 0).reshape(A.shape[i], -1)


def mode_product(A, U, i):
    """``A ×_i U`` for ``U ∈ R^{d' × d_i}``."""
    A, U = C.finite(A, "A"), C.finite(U, "U")
    i = _mode(A, i)
    if U.ndim != 2 or U.shape[1] != A.shape[i]:
        raise ShapeError(f"U must be (d', {A.shape[i]}) for mode {i}, got {U.shape}")
    xp = xp_of(A, U)
    return C.result(xp.moveaxis(xp.tensordot(U, A, axes=(1, i)), 0, i), f"A ×_{i} U")


def contraction(A, i):
    """``A^{(i)} = mat_i(A) mat_i(A)ᵀ`` (thesis §4.2.1; TNT/Shampoo statistics)."""
    M = mat(A, i)
    return C.result(M @ M.T, f"the contraction A^({i})")


def kron_apply(Us, G):
    """``G ×_1 U_1 ⋯ ×_k U_k`` = ``(U_1 ⊗ ⋯ ⊗ U_k) vec̄(G)`` reshaped (Proposition 1)."""
    G = C.finite(G, "G")
    if not isinstance(Us, (list, tuple)):
        raise ArgumentTypeError(f"Us must be a list of matrices, got {type(Us).__name__}")
    if len(Us) != G.ndim:
        raise ShapeError(f"need one matrix per mode ({G.ndim}), got {len(Us)}")
    for i, U in enumerate(Us):
        G = mode_product(G, U, i)
    return G
