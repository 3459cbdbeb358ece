"""Contractions of the fast forms as GEMMs (issue 15): sums over samples and locations are
folded into the inner dimension of one matrix product, so that NumPy (and CuPy) dispatch
them to BLAS ``gemm``/``syrk`` instead of an ``einsum`` loop. Backend-neutral: only array
methods and ``@`` (:func:`refcurv.backend.xp_of` for the module)."""
from __future__ import annotations

import numpy as np

from ..backend import xp_of


def factor_sum(g, a):
    """``Σ_{i,t} g[…, i, :, t] a[…, i, :, t]ᵀ`` for ``g`` ``(…, N, out, T)`` and ``a``
    ``(…, N, d, T)`` (leading axes broadcast) → ``(…, out, d)``: the sum of the per-sample
    gradients ``G_i A_iᵀ`` ([Ren-thesis] (2.1), Algorithm 18) as one GEMM with the sample and
    location axes folded into its inner dimension ``N·T``; the ``N·out·d`` per-sample array
    is never formed."""
    xp = xp_of(g, a)
    lead = tuple(np.broadcast_shapes(g.shape[:-3], a.shape[:-3]))
    N, o, T = g.shape[-3:]
    d = a.shape[-2]
    gf = xp.moveaxis(g, -2, -3).reshape(g.shape[:-3] + (o, N * T))  # (…, out, N·T)
    af = xp.moveaxis(a, -1, -2).reshape(a.shape[:-3] + (N * T, d))  # (…, N·T, d)
    out = gf @ af
    return xp.broadcast_to(out, lead + (o, d)) if tuple(out.shape[:-2]) != lead else out


def gram_of_rows(X):
    """``X Xᵀ`` for a 2-D ``X`` (one product; NumPy dispatches ``X @ X.T`` to ``syrk``)."""
    return X @ X.T


def outer_sum(a, b=None):
    """``Σ_{…,t} a[…, :, t] b[…, :, t]ᵀ`` for stacks ``(…, d, T)`` with equal leading axes
    (``b = a`` by default): every axis but the feature axis folded into the inner dimension,
    one GEMM — the Kronecker factors ``A = (1/(N T)) Σ a aᵀ`` (thesis (3.6), (3.9)) and
    ``G``, and the NG+ Grams ``Σ_n 𝒢_n 𝒢_nᵀ`` (NG+ (4)-(5))."""
    xp = xp_of(a)
    af = xp.moveaxis(a, -2, 0).reshape(a.shape[-2], -1)
    if b is None:
        return gram_of_rows(af)
    return af @ xp.moveaxis(b, -2, 0).reshape(b.shape[-2], -1).T


def kron_gram(a, g):
    """``K_{ij} = Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'}) (g_{i,t}ᵀ g_{j,t'})`` for ``a`` ``(N, d, T)``,
    ``g`` ``(N, o, T)`` — the Gram ``u_iᵀ u_j`` of the per-sample gradients ``u_i = vec(G_i
    A_iᵀ)`` ([Ren-thesis] §5.3.3, Algorithm 22; SENG (21)) — on BLAS by whichever of two exact
    forms needs fewer flops:

    * the location Grams: ``(a_{i,t}ᵀ a_{j,t'})`` is one GEMM of the ``(N·T, d)`` stacked
      patches with themselves (likewise for ``g``), then a Hadamard product summed over
      ``(t, t')`` — ``N²T²(d + o)`` flops (for Linear, ``T = 1``: ``(A Aᵀ) ⊙ (G Gᵀ)``);
    * the per-sample gradients by one batched GEMM, then ``U Uᵀ`` (``syrk``) —
      ``N·o·d·(T + N)`` flops, cheaper when ``T`` is large and ``o·d`` small."""
    xp = xp_of(a, g)
    N, d, T = a.shape
    o = g.shape[1]
    if N * T * T * (d + o) <= N * o * d * (T + N):
        KA = gram_of_rows(xp.swapaxes(a, 1, 2).reshape(N * T, d)).reshape(N, T, N, T)
        KG = gram_of_rows(xp.swapaxes(g, 1, 2).reshape(N * T, o)).reshape(N, T, N, T)
        if T == 1:
            return KA[:, 0, :, 0] * KG[:, 0, :, 0]
        return (KA * KG).sum(axis=(1, 3))
    return gram_of_rows((g @ xp.swapaxes(a, 1, 2)).reshape(N, o * d))
