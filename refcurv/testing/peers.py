"""Adapters from refcurv's conventions to those of the PyTorch curvature libraries
(curvlinops, BackPACK, ASDL, NNGeometry), used by ``examples/check_peers.py``.

Each adapter states its formula. refcurv's convention (README "Conventions"): per-sample
loss ψ_i (MSE ``½‖f−y‖²``, CE, BCE summed over outputs), objective ``(1/N) Σ ψ_i``, one
matrix ``W = [weight, bias]`` per layer, θ row-major per layer, Kronecker block ``G ⊗ A``
on that order with the bias as a ones row of ``A`` ("joint").

The peers' conventions, with the factor each introduces (derivations in ``docs/peers.md``):

* **order** -- every library orders θ as ``module.parameters()`` (weight flattened
  row-major, then bias): ``theta_torch = theta[p]``, ``p = refcurv.permutation(net, "torch")``
  (:func:`torch_order`).
* **loss scale** -- a library that differentiates the PyTorch loss with reduction ``r`` on
  ``C`` outputs sees ``scale · ψ`` (:func:`loss_scale`): CE mean 1 / sum N; MSE mean
  ``2/C`` / sum ``2N``; BCE mean ``1/C`` / sum ``N``. Curvature (GGN, Hessian, exact and MC
  Fisher) scales by ``scale``; the empirical Fisher (an outer product of gradients) by
  ``scale²``; BackPACK's per-sample gradients are those of the reduced loss:
  ``scale · u_i / N`` (mean) or ``scale · u_i`` (sum)... where ``scale`` already holds N for sum.
* **sampled labels** -- every library draws MC labels from the likelihood of ITS loss: for
  PyTorch's ``MSELoss`` (no ½) that is ``N(f, ½ I)``, refcurv's ``½‖f−y‖²`` is ``N(f, I)``.
  :func:`labels_from_torch_samples` maps a library's draw to the refcurv label with the
  same standardized noise: ``y_rc = f + √2 (y_torch − f)``; CE and BCE labels are equal.
* **bias** -- ``"separate"`` (curvlinops' default ``separate_weight_and_bias=True``,
  BackPACK's KFAC/KFLR): weight block ``G ⊗ A[:-1, :-1]`` and bias block ``G ⊗ A[-1, -1]``
  (``A[-1, -1] = 1``); ``"joint"``: refcurv's single block (:func:`kfac_matrix`).
* **conv** -- ``"backpack"``: BackPACK's KFAC/KFLR conv weight block is
  ``T · G_reduce ⊗ A_expand`` (its ``hbp/convnd.py`` docstring says so: a factor ``T`` over
  KFC), the bias block ``G_reduce`` ⊗ 1 (no T). curvlinops ``expand``/``reduce`` are
  refcurv's.
"""
from __future__ import annotations

import numpy as np

from ..errors import ArgumentTypeError, HyperParameterError, ShapeError

__all__ = ["loss_scale", "torch_order", "labels_from_torch_samples", "labels_from_sampled_grads",
           "kfac_matrix", "ef_scale", "PEER_CONVENTIONS"]

#: Conventions of each library, as the values of ``refcurv.testing.Conventions`` fields
#: (``conv="backpack"`` is BackPACK's ``T · G_reduce ⊗ A_expand``). Keys not listed are
#: refcurv's own. ``label_noise``: variance of the sampled MSE labels (refcurv: 1).
PEER_CONVENTIONS = {
    "curvlinops": dict(order="torch", bias="separate", kronecker="G_A", label_noise=0.5,
                       note="KFACLinearOperator(separate_weight_and_bias=True) by default"),
    "backpack": dict(order="torch", bias="separate", kronecker="G_A", conv="backpack", label_noise=0.5,
                     note="KFAC/KFLR return [G, A] per weight, [G] per bias"),
    "asdl": dict(order="torch", bias="joint", kronecker="G_A", reduction="sum", label_noise=1.0,
                 note="fisher_mse: ½‖f−y‖² per sample (var=1); ASDL divides by data_size itself"),
    "nngeometry": dict(order="torch", bias="joint", kronecker="G_A", label_noise=1.0,
                       note="regression variant: N(f, I); PMatKFAC joint bias"),
}

_REDUCTIONS = ("mean", "sum")


def loss_scale(loss, reduction, n_outputs, n):
    """Factor ``s`` with ``torch_loss = s · (1/N) Σ ψ_i`` for the PyTorch loss of refcurv's
    ``loss`` ("mse", "cross_entropy", "bce" or a refcurv loss) under ``reduction``:
    MSE mean ``2/C`` (no ½, mean over N·C), sum ``2N``; CE mean 1, sum ``N``; BCE mean
    ``1/C``, sum ``N``."""
    name = getattr(loss, "name", loss)
    if reduction not in _REDUCTIONS:
        raise HyperParameterError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    table = {"mse": (2.0 / n_outputs, 2.0 * n), "cross_entropy": (1.0, float(n)), "bce": (1.0 / n_outputs, float(n))}
    if name not in table:
        raise ArgumentTypeError(f"loss must be mse, cross_entropy or bce, got {name!r}")
    return table[name][0 if reduction == "mean" else 1]


def ef_scale(loss, reduction, n_outputs, n):
    """Factor ``e`` with ``EF_lib = e · EF_refcurv`` for a library whose empirical Fisher is
    ``c Σ_n ∇ℓ_n ∇ℓ_nᵀ`` -- ``ℓ_n`` the per-sample PyTorch loss summed over its outputs, ``c``
    the reduction's normalization (curvlinops ``EFLinearOperator``, KFAC ``empirical``):
    MSE (``ℓ_n = 2ψ_n``) mean ``4/C`` (``c = 1/(N C)``), sum ``4N``; CE mean 1, sum ``N``; BCE
    (``ℓ_n = ψ_n``) mean ``1/C``, sum ``N``. The normalization enters once, not squared as it
    would for the outer product of the reduced loss's per-sample gradients."""
    name = getattr(loss, "name", loss)
    if reduction not in _REDUCTIONS:
        raise HyperParameterError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    table = {"mse": (4.0 / n_outputs, 4.0 * n), "cross_entropy": (1.0, float(n)), "bce": (1.0 / n_outputs, float(n))}
    if name not in table:
        raise ArgumentTypeError(f"loss must be mse, cross_entropy or bce, got {name!r}")
    return table[name][0 if reduction == "mean" else 1]


def torch_order(net, a, matrix=None):
    """``a`` (a vector ``(…, n)`` or, with ``matrix=True`` (default for 2-d square), an
    ``(n, n)`` matrix in refcurv's order) in PyTorch's ``parameters()`` order."""
    from ..vec import permutation

    p = permutation(net, "torch")
    a = np.asarray(a)
    if matrix is None:
        matrix = a.ndim == 2 and a.shape == (len(p), len(p))
    if matrix:
        if a.shape != (len(p), len(p)):
            raise ShapeError(f"a must be ({len(p)}, {len(p)}), got {a.shape}")
        return a[np.ix_(p, p)]
    if a.shape[-1] != len(p):
        raise ShapeError(f"a must have {len(p)} entries along its last axis, got {a.shape}")
    return a[..., p]


def labels_from_torch_samples(loss, f, y_torch):
    """refcurv labels ``(S, N, …)`` equivalent to a library's sampled labels ``y_torch``
    for the same outputs ``f`` ``(N, C)``: for MSE the library draws ``y ~ N(f, ½ I)`` (the
    likelihood of PyTorch's ``(f−y)²``), refcurv ``N(f, I)`` (of ``½‖f−y‖²``); the same
    standard-normal draw ``z`` gives ``y_rc = f + √2 (y_torch − f)``. CE (class indices) and
    BCE (0/1) labels are the same in both conventions."""
    name = getattr(loss, "name", loss)
    y = np.asarray(y_torch, dtype=float)
    if name == "mse":
        return f[None] + np.sqrt(2.0) * (y - f[None])
    if name == "cross_entropy":
        return y.astype(np.int64)
    if name == "bce":
        return y
    raise ArgumentTypeError(f"loss must be mse, cross_entropy or bce, got {name!r}")


def labels_from_sampled_grads(loss, f, grads):
    """refcurv labels from a library's sampled output gradients ``g̃`` ``(S, N, C)`` of the
    negative log-likelihood of ITS loss (BackPACK ``sqrt_hessian_sampled`` before the
    ``1/√S`` and reduction factors, curvlinops ``make_grad_output_sampler``): CE and BCE
    ``g̃ = σ(f) − onehot(ỹ)`` (``ỹ = σ(f) − g̃``); MSE ``g̃ = 2 (f − ỹ)``, ``ỹ ~ N(f, ½I)``, so
    ``y_rc = f − g̃ / √2`` (then ``f − y_rc ~ N(0, I)``, refcurv's likelihood)."""
    name = getattr(loss, "name", loss)
    g = np.asarray(grads, dtype=float)
    if g.ndim != 3 or g.shape[1:] != f.shape:
        raise ShapeError(f"grads must be (S, {f.shape[0]}, {f.shape[1]}), got {g.shape}")
    if name == "mse":
        return f[None] - g / np.sqrt(2.0)
    if name == "cross_entropy":
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return np.argmax(np.rint(p[None] - g), axis=-1).astype(np.int64)
    if name == "bce":
        return np.rint(1.0 / (1.0 + np.exp(-f))[None] - g)
    raise ArgumentTypeError(f"loss must be mse, cross_entropy or bce, got {name!r}")


def kfac_matrix(net, factors, bias="joint", order="torch", conv_scale=None):
    """Dense block-diagonal KFAC matrix from refcurv factors ``[(A_l, G_l)]``
    (:func:`refcurv.curvature.kfac_factors`), in a library's convention.

    ``bias="joint"``: one block ``G ⊗ A`` per layer (refcurv). ``bias="separate"``: weight
    block ``G ⊗ A[:-1, :-1]`` and bias block ``G · A[-1, -1]`` (= ``G``: the ones row's mean
    square), no cross terms -- curvlinops' ``separate_weight_and_bias=True``.
    ``conv_scale``: optional per-layer factors multiplying the weight block (BackPACK: ``T``
    for conv layers). ``order="torch"`` permutes to ``parameters()`` order, ``"refcurv"``
    keeps refcurv's."""
    from scipy.linalg import block_diag

    if bias not in ("joint", "separate"):
        raise HyperParameterError(f"bias must be 'joint' or 'separate', got {bias!r}")
    if order not in ("torch", "refcurv"):
        raise HyperParameterError(f"order must be 'torch' or 'refcurv', got {order!r}")
    layers = net.layers_trainable
    if len(factors) != len(layers):
        raise ShapeError(f"factors must hold {len(layers)} (A, G) pairs, got {len(factors)}")
    blocks = []
    for j, ((A, G), layer) in enumerate(zip(factors, layers)):
        c = 1.0 if conv_scale is None else float(conv_scale[j])
        if not layer.bias or bias == "joint":
            if bias == "separate" or c == 1.0:
                blocks.append(c * np.kron(G, A))
                continue
        # separate (or joint with a weight-only scale): weight block and bias block
        d = A.shape[0] - 1
        out = G.shape[0]
        Bw = c * np.kron(G, A[:d, :d])
        if bias == "separate":
            Bb = G * A[d, d]
            B = block_diag(Bw, Bb)
        else:  # joint in refcurv order, weight entries scaled: not used by any peer
            raise HyperParameterError("conv_scale with bias='joint' is not a peer convention")
        # B is in torch order within the layer; express it in refcurv's row-major order
        idx = np.arange(out * (d + 1)).reshape(out, d + 1)
        p = np.concatenate([idx[:, :d].ravel(), idx[:, d]])
        q = np.argsort(p)
        blocks.append(B[np.ix_(q, q)])
    M = block_diag(*blocks)
    return torch_order(net, M, matrix=True) if order == "torch" else M
