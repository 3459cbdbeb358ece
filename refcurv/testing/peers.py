"""The conventions of the PyTorch curvature libraries (curvlinops, BackPACK, ASDL,
NNGeometry) as :class:`refcurv.testing.Conventions`, and the two adapters ``Conventions`` does
not cover: a library's Monte-Carlo draws as refcurv labels, and a dense block-diagonal KFAC
matrix from converted factor pairs. Used by ``examples/check_peers.py``; derivations and
measurements in ``docs/peers.md``.

refcurv's convention (README "Conventions"): per-sample loss ψ_n (MSE ``½‖f−y‖²``, CE, BCE
summed over outputs), objective ``Ψ = (1/N) Σ ψ_n``, ``W = [weight, bias]`` per layer, θ
row-major per layer, Kronecker block ``G ⊗ A`` with the bias as a ones row of ``A``.

What each library computes, in those terms (``s``: PyTorch's loss factor, ``L = s·Ψ``:
``MSELoss`` mean ``2/C``, sum ``2N``; ``CrossEntropyLoss`` mean 1, sum ``N``;
``BCEWithLogitsLoss`` mean ``1/C``, sum ``N``):

* **curvlinops** 3.0 -- ``parameters()`` order; Hessian, GGN, MC Fisher: ``s·M``; the
  empirical Fisher ``EFLinearOperator`` is ``c Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with ``ℓ_n`` the per-sample
  PyTorch loss summed over outputs (``p·ψ_n``: MSE ``p = 2``, CE and BCE ``p = 1``) and ``c`` the
  reduction's normalization, i.e. ``s·p·EF``; ``KFACLinearOperator`` defaults to
  ``separate_weight_and_bias=True`` (``bias="separate"``), ``kfac_approx`` expand/reduce as
  refcurv's, the same scale as the matching dense quantity.
* **BackPACK** 1.7 -- ``BatchGrad``: the per-sample terms of the reduced loss, ``(s/N)·u_n``;
  ``DiagGGNExact``: ``s·diag(GGN)``; ``KFLR``/``KFAC`` return ``[G, A]`` per weight and
  ``[G]`` per bias (``bias="separate"``), and for a conv layer with ``T`` output locations the
  weight block is ``T · G_reduce ⊗ A_expand`` (``conv="backpack"``), split as
  ``A = (1/N) Σ_{n,t} a aᵀ = T·A_expand`` and ``G = G_reduce``, while the bias block is
  ``G_reduce`` -- no ``T``: the conv bias gradient is ``Σ_t g_t``, whose exact GGN block is
  ``G_reduce`` itself.
* **ASDL** 0.1a5 -- ``fisher_exact``/``fisher_mc``/``fisher_emp`` with the loss summed and
  divided by ``data_size`` and ``½‖f−y‖²`` for MSE (``var = 1``): refcurv's scale;
  ``SHAPE_KRON`` keeps ``A`` of the weight only (its ``extend_in_data`` is never called) and
  preconditions the bias with ``B`` alone: ``bias="separate"``, expand.
* **NNGeometry** 0.4 -- ``FIM`` is the exact Fisher at refcurv's scale (``regression``:
  ``N(f, I)``); ``PMatKFAC`` has the bias joint (a ones row in ``A``), expand.

Every library draws MC labels from the likelihood of ITS loss: for PyTorch's ``MSELoss`` (no
½) that is ``N(f, ½ I)``, refcurv's ``½‖f−y‖²`` is ``N(f, I)``; ASDL and NNGeometry use
``N(f, var·I)`` with ``var = 1``. :func:`labels_from_torch_samples` and
:func:`labels_from_sampled_grads` turn a library's draw into the refcurv label with the same
standardized noise, so that MC quantities compare exactly.
"""
from __future__ import annotations

import numpy as np

from ..errors import ArgumentTypeError, HyperParameterError, NonFiniteError, ShapeError
from ..nn._checks import describe, real_array
from .conventions import Conventions

__all__ = ["PEERS", "peer_conventions", "labels_from_torch_samples", "labels_from_sampled_grads",
           "sampled_grads_from_labels", "kfac_dense"]

#: the libraries :func:`peer_conventions` knows
PEERS = ("curvlinops", "backpack", "asdl", "nngeometry")

# ℓ_n = p·ψ_n: the per-sample PyTorch loss summed over outputs (curvlinops' EF)
_SUMMED_PER_SAMPLE = {"mse": 2.0, "cross_entropy": 1.0, "bce": 1.0}


def peer_conventions(library, loss_module=None, n_outputs=None, **fields):
    """:class:`Conventions` of ``library`` (one of :data:`PEERS`) for a PyTorch loss module on
    ``n_outputs`` outputs (curvlinops and BackPACK differentiate the PyTorch loss; ASDL and
    NNGeometry take refcurv's scale and need no loss module). ``fields`` override (e.g.
    ``bias="joint"`` for curvlinops' ``separate_weight_and_bias=False``)."""
    if not isinstance(library, str) or library not in PEERS:
        raise HyperParameterError(f"library must be one of {PEERS}, got {describe(library)}")
    if library in ("asdl", "nngeometry"):
        base = dict(order="torch", bias="separate" if library == "asdl" else "joint")
        base.update(fields)
        return Conventions(**base)
    if loss_module is None or n_outputs is None:
        raise ArgumentTypeError(f"{library} differentiates the PyTorch loss: pass loss_module and n_outputs")
    names = {"MSELoss": "mse", "CrossEntropyLoss": "cross_entropy", "BCEWithLogitsLoss": "bce"}
    base = dict(bias="separate")
    if library == "curvlinops":
        lname = names.get(type(loss_module).__name__)
        if lname is None:
            raise ArgumentTypeError(f"loss_module must be torch.nn.MSELoss, CrossEntropyLoss or BCEWithLogitsLoss, "
                                    f"got {type(loss_module).__name__}")
        base["per_sample_scale"] = _SUMMED_PER_SAMPLE[lname]
    else:
        base["conv"] = "backpack"
    base.update(fields)
    return Conventions.for_torch_loss(loss_module, n_outputs, **base)


def _name(loss):
    name = getattr(loss, "name", loss)
    if not isinstance(name, str) or name not in ("mse", "cross_entropy", "bce"):
        raise ArgumentTypeError(f"loss must be a refcurv MSE, CrossEntropy or BCE (or its name), got {describe(loss)}")
    return name


def _array(a, name):
    a = np.asarray(real_array(a, name), dtype=float)
    if a.size == 0:
        raise ShapeError(f"{name} must not be empty, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return a


def _outputs(f):
    f = _array(f, "f")
    if f.ndim != 2:
        raise ShapeError(f"f must be the (N, C) network outputs, got shape {f.shape}")
    return f


def labels_from_torch_samples(loss, f, y_torch, variance=0.5):
    """refcurv labels ``(S, N, …)`` for a library's sampled labels ``y_torch`` at outputs ``f``
    ``(N, C)``. MSE: the library draws ``y ~ N(f, variance·I)`` (``½`` for PyTorch's
    ``MSELoss``, whose ``(f−y)²`` is the NLL of that Gaussian), refcurv ``N(f, I)``; the same
    standard-normal draw gives ``y_rc = f + (y_torch − f)/√variance``. CE class indices and BCE
    0/1 labels are the same in both conventions."""
    name, f = _name(loss), _outputs(f)
    y = _array(y_torch, "y_torch")
    if y.ndim < 2 or y.shape[1] != f.shape[0]:
        raise ShapeError(f"y_torch must be (S, {f.shape[0]}, …), got shape {y.shape}")
    if name != "cross_entropy" and y.shape[1:] != f.shape:
        raise ShapeError(f"y_torch must be (S, {f.shape[0]}, {f.shape[1]}) for {name}, got shape {y.shape}")
    if name == "cross_entropy" and y.ndim != 2:
        raise ShapeError(f"y_torch must be class indices (S, {f.shape[0]}) for cross_entropy, got shape {y.shape}")
    if name == "mse":
        if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance < np.inf:
            raise HyperParameterError(f"variance must be a positive number, got {describe(variance)}")
        return f[None] + (y - f[None]) / np.sqrt(variance)
    return y.astype(np.int64) if name == "cross_entropy" else y


def labels_from_sampled_grads(loss, f, grads):
    """refcurv labels from a library's sampled output gradients ``g̃`` ``(S, N, C)`` of the
    negative log-likelihood of PyTorch's loss (BackPACK's ``compute_sampled_grads``,
    curvlinops' ``make_grad_output_sampler``): CE and BCE ``g̃ = σ(f) − onehot(ỹ)``, so
    ``ỹ = σ(f) − g̃``; MSE ``g̃ = 2(f − ỹ)`` with ``ỹ ~ N(f, ½I)``, so ``y_rc = f − g̃/√2``
    (then ``f − y_rc ~ N(0, I)``, refcurv's likelihood)."""
    name, f = _name(loss), _outputs(f)
    g = _array(grads, "grads")
    if g.ndim != 3 or g.shape[1:] != f.shape:
        raise ShapeError(f"grads must be (S, {f.shape[0]}, {f.shape[1]}), got shape {g.shape}")
    if name == "mse":
        return f[None] - g / np.sqrt(2.0)
    if name == "cross_entropy":
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return np.argmax(np.rint(p[None] - g), axis=-1).astype(np.int64)
    return np.rint(1.0 / (1.0 + np.exp(-f))[None] - g)


def sampled_grads_from_labels(loss, f, labels):
    """The inverse of :func:`labels_from_sampled_grads`: the sampled output gradients a library
    would have drawn, ``(S, N, C)``, for refcurv's sampled ``labels`` ``(S, N, …)`` -- how
    refcurv's draws are fed INTO a library (CE and BCE ``σ(f) − onehot(y)``; MSE
    ``√2 (f − y_rc)``, the gradient of PyTorch's ``(f−y)²`` at the ``N(f, ½I)`` label with the
    same standard-normal draw)."""
    name, f = _name(loss), _outputs(f)
    y = _array(labels, "labels")
    if y.ndim < 2 or y.shape[1] != f.shape[0]:
        raise ShapeError(f"labels must be (S, {f.shape[0]}, …), got shape {y.shape}")
    if name == "mse":
        if y.shape[1:] != f.shape:
            raise ShapeError(f"MSE labels must be (S, {f.shape[0]}, {f.shape[1]}), got shape {y.shape}")
        return np.sqrt(2.0) * (f[None] - y)
    if name == "cross_entropy":
        if y.ndim != 2:
            raise ShapeError(f"cross-entropy labels must be class indices (S, {f.shape[0]}), got shape {y.shape}")
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return p[None] - np.eye(f.shape[1])[y.astype(np.int64)]
    if y.shape[1:] != f.shape:
        raise ShapeError(f"BCE labels must be (S, {f.shape[0]}, {f.shape[1]}), got shape {y.shape}")
    return 1.0 / (1.0 + np.exp(-f))[None] - y


def kfac_dense(conventions, net, pairs):
    """The dense block-diagonal KFAC matrix, in ``conventions``' order, from the factor pairs
    :meth:`Conventions.kfac_factors` returns (one per layer for ``bias="joint"``, weight then
    bias for ``"separate"``). Joint blocks act on refcurv's ``[W b]`` row-major vec and are
    re-ordered with the whole matrix; separate blocks already follow ``parameters()``
    order (the weight block ``G ⊗ A_ww`` on the row-major weight, then the bias)."""
    from scipy.linalg import block_diag

    from ..nn import Sequential

    if not isinstance(net, Sequential):
        raise ArgumentTypeError(f"net must be a refcurv.nn.Sequential, got {type(net).__name__}")
    if not isinstance(conventions, Conventions):
        raise ArgumentTypeError(f"conventions must be a refcurv.testing.Conventions, got {type(conventions).__name__}")
    if not isinstance(pairs, (list, tuple)) or len(pairs) == 0:
        raise ArgumentTypeError(f"pairs must be a non-empty list of (A, G) factor pairs, got {type(pairs).__name__}")
    kron = []
    for j, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ArgumentTypeError(f"pairs[{j}] must be an (A, G) pair")
        A, G = _array(pair[0], f"pairs[{j}][0] (A)"), _array(pair[1], f"pairs[{j}][1] (G)")
        for what, F in (("A", A), ("G", G)):
            if F.ndim != 2 or F.shape[0] != F.shape[1]:
                raise ShapeError(f"pairs[{j}] {what} must be a square matrix, got shape {F.shape}")
        kron.append(conventions.kron(A, G))
    M = block_diag(*kron)
    if M.shape[0] != net.n_params:
        raise ShapeError(f"the pairs' blocks hold {M.shape[0]} parameters, the network {net.n_params}")
    if conventions.bias == "joint":
        return conventions.matrix(M, net)
    if conventions.order != "torch":
        raise HyperParameterError("bias='separate' blocks are assembled in parameters() order: declare order='torch'")
    return M
