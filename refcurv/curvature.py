"""Dense curvature ground truth, always computed in float64.

Signature ``f(net, params, x, y, loss, ...)``. Matrices are ``(n, n)`` in refcurv's
row-major θ order (:mod:`refcurv.vec`), or, with ``blocks=True``, the list of the
per-layer diagonal blocks. With ``N`` samples, per-sample losses ``ψ_i`` and their
(unscaled) gradients ``u_i``, output Jacobians ``J_i = ∂f_i/∂θ`` and output Hessians
``H_i = ∂²ℓ/∂f²`` (thesis Ch.1 §1.2.2, SENG (2)-(4)):

===========================  ===================================================
``hessian``                  ``(1/N) Σ ∇²ψ_i`` (exact second-order backprop)
``ggn``                      ``(1/N) Σ J_iᵀ H_i J_i``                     (1.4)
``hessian_residual``         ``(1/N) Σ Σ_c [∂ℓ/∂f_i]_c ∇²f_{i,c}`` (so ``hessian = ggn + residual``)
``fisher(kind="exact")``     ``(1/N) Σ J_iᵀ E_{y~p(·|f_i)}[∇_f ℓ ∇_f ℓᵀ] J_i``   (1.7)
``fisher(kind="mc")``        ``(1/(N S)) Σ_i Σ_s u_i(ŷ_is) u_i(ŷ_is)ᵀ``, ``ŷ_is ~ p(·|f_i)``
``kfac_factors(kind=…)``     ``(A_l, G_l)`` per layer, block ``G_l ⊗ A_l`` (row-major)    (3.6), (3.9)
``empirical_fisher``         ``(1/N) Σ u_i u_iᵀ = U Uᵀ`` with ``U = N^{-1/2}[u_1 … u_N]``
===========================  ===================================================

Fisher kinds (:data:`FISHER_KINDS`, the same words as the methods' ``fisher=``):
``"exact"`` — the expectation over labels from the model's predictive distribution, in
closed form (for MSE, cross-entropy and BCE this equals the GGN, thesis (1.7));
``"mc"`` — that expectation estimated with ``S`` labels per input sampled from the model
(seeded, or given as ``labels`` of shape ``(S, N, …)``); ``"empirical"`` — the data labels.

Input policy (README): every argument is checked on entry — ``net`` a
:class:`refcurv.nn.Sequential`, ``loss`` a refcurv loss *instance*, ``params``/``x`` real
arrays (integer arrays are converted to float64; complex, boolean and non-numeric input is
refused), ``blocks``/``per_sample`` real booleans, ``kind``/``conv``/``side`` one of their
words, ``seed`` as :func:`refcurv.backend.rng_of` — and a non-finite result from finite
input (overflow, e.g. ``x = 1e200``) raises :class:`~refcurv.errors.NonFiniteError` naming
the quantity. Errors are :class:`~refcurv.errors.RefcurvError` subclasses.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import rng_of, xp_of
from .errors import ArgumentTypeError, HyperParameterError, ShapeError
from .nn.losses import _check_n_samples
from .operators import _describe, _finite_result, _real_array, _real_number
from .linalg.gemm import factor_sum as _factor_sum, kron_gram as _kron_gram
from .linalg.gemm import outer_sum as _outer_sum
from .vec import layer_slices

F64 = np.float64

#: what a refcurv loss offers (duck-typed: refcurv.nn.MSE, CrossEntropy, BCE)
_LOSS_API = ("grad", "hvp", "hessian", "check_targets", "sample", "fisher_output", "hessian_sqrt")


# ---------------------------------------------------------------- input checks
def _check_net(net):
    from .nn.model import Sequential

    if not isinstance(net, Sequential):
        raise ArgumentTypeError(f"net must be a refcurv.nn.Sequential, got {_describe(net)}")
    return net


def _check_loss(loss, required=True):
    if loss is None:
        if required:
            raise ArgumentTypeError("loss is required: a refcurv loss (MSE(), CrossEntropy(), BCE()), got None")
        return None
    if isinstance(loss, type):
        raise ArgumentTypeError(f"loss must be a refcurv loss instance such as {loss.__name__}(), got the class itself")
    if not all(hasattr(loss, a) for a in _LOSS_API):
        raise ArgumentTypeError(f"loss must be a refcurv loss (MSE(), CrossEntropy(), BCE()), got {_describe(loss)}")
    return loss


def _check_params(net, params):
    """Real finite arrays (ints converted, complex refused), then the network's own checks."""
    if not isinstance(params, (list, tuple)):
        raise ArgumentTypeError(f"params must be a list of per-layer arrays, got {_describe(params)}")
    return net.check_params([_real_array(W, f"params[{j}]") for j, W in enumerate(params)])


def _check_x(net, x, params):
    # Sequential.check_input refuses complex/bool/non-numeric x, an empty batch
    # (EmptyBatchError) and NaN/Inf; ints become float64
    return net.check_input(x, xp=xp_of(x, params))


def _flag(value, name):
    """A real boolean: truthy strings (``blocks='yes'``), numbers and arrays are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def _word(value, name, choices, hint="", expected=None):
    if not isinstance(value, str) or value not in choices:
        expected = expected or f"one of {tuple(choices)}"
        raise HyperParameterError(f"{name} must be {expected}, got {_describe(value)}{hint}")
    return value


def _seed_and_samples(seed, n_samples):
    """Type checks of ``seed`` (:func:`rng_of`) and ``n_samples`` even where they go unused."""
    if seed is not None:
        rng_of(seed)
    if n_samples is not None:
        _check_n_samples(n_samples)


def _result(out, what):
    """Refuse a non-finite result (overflow) from finite, checked input: ``out`` is an array or
    a (nested) list of arrays."""
    if isinstance(out, (list, tuple)):
        for o in out:
            _result(o, what)
        return out
    return _finite_result(out, what)


def _setup(net, params, x, y, loss, need_y=True):
    """Checked float64 ``(params, x, y, trace, loss)``. For a sequence output ``(T, C)`` the
    trace's output is ``(N, T·C)`` and the returned loss sums the per-position losses
    (:func:`refcurv.nn.losses._over_positions`), so every formula below reads the same."""
    _check_net(net)
    _check_loss(loss, required=need_y)
    params = [W.astype(F64) for W in _check_params(net, params)]
    x = _check_x(net, x, params).astype(F64)
    tr = net._forward(params, x)
    if loss is not None:
        loss = net._loss_for(loss, tr)
    if need_y or (loss is not None and y is not None):
        y = loss.check_targets(y, tr.out)
    return params, x, y, tr, loss


def _blocks(M, net):
    return [M[sl, sl] for sl in layer_slices(net)]


def _ret(M, net, blocks):
    return _blocks(M, net) if blocks else M


def per_sample_grads(net, params, x, y, loss):
    """``(N, n)``: row ``i`` is ``u_i = ∇ψ_i = G_i A_iᵀ`` per layer (unscaled, SENG (3)),
    written once into the flat array (:func:`refcurv.nn.autodiff.weight_grads`)."""
    U, finite = _per_sample_grads(net, params, x, y, loss, bound=True)
    return U if finite else _result(U, "per_sample_grads")


def _per_sample_grads(net, params, x, y, loss, bound=False):
    from .nn.autodiff import _certainly_finite

    params, x, y, tr, loss = _setup(net, params, x, y, loss)
    G = net._pull(params, tr, loss.grad(tr.out, y))
    U = net._param_grads_flat(tr, G)
    return (U, _certainly_finite(tr.patches, G)) if bound else U


def grad(net, params, x, y, loss):
    """``(n,)`` mini-batch gradient ``(1/N) Σ u_i``, as ``(1/N) Σ_i G_i A_iᵀ`` per layer: one
    GEMM over samples and locations (:func:`refcurv.nn.autodiff.mean_weight_grads`), without
    per-sample gradients."""
    from .nn import autodiff as ad

    params, x, y, tr, loss = _setup(net, params, x, y, loss)
    G = net._pull(params, tr, loss.grad(tr.out, y))
    return _result(net._flat(ad._mean_weight_grads(tr.patches, G)), "grad")


def _mean_layer_grads(net, params, x, y, loss):
    """The mini-batch gradient per layer, ``(1/N) Σ_i G_i A_iᵀ`` (thesis (2.1), Algorithm 18),
    as a list of ``(out, d)`` in the input dtype: one forward and one backward pass
    (:meth:`Sequential.factors`) and one GEMM per layer (``autodiff._mean_weight_grads``), never the
    per-sample gradients (``N·n`` numbers). Equals ``net.grad`` to rounding; the methods'
    fast forms use it."""
    from .nn import autodiff as ad

    A, G = net.factors(params, x, y, loss)
    # the same kernel as grad() (bit for bit: the dense forms' momentum is compared exactly)
    return ad._mean_weight_grads(A, G)


def jacobian(net, params, x, y=None, loss=None):
    """``(N, C, n)`` per-sample output Jacobians ``J_i``. ``y`` and ``loss`` are not used (a
    uniform signature); when both are given they are checked against each other."""
    params, x, _, _, _ = _setup(net, params, x, y, loss, need_y=False)
    return _result(net.jacobian(params, x), "jacobian")


#: working-memory target of one chunk of basis tangents in :func:`_summed_hessian`, in
#: doubles (the chunk is also never smaller than ``n²``, so memory stays O(n² + N·n))
_HESSIAN_CHUNK_DOUBLES = 1 << 21


def _summed_hessian(net, params, x, y, loss, output_hessian=True, blocks=False):
    """``(1/N) Σ_i ∇²ψ_i`` (or its residual term, ``output_hessian=False``) by the R-operator
    with the sum over samples inside the pass (:func:`refcurv.nn.autodiff._hvp_summed`),
    over the basis tangents ``e_k`` in chunks: one chunk of ``K`` tangents needs about
    ``K·N·S`` doubles (``S`` the per-sample activation and patch size), so ``K`` is chosen to
    keep that below ``max(n², 2²¹)`` — memory O(n² + N·n) instead of the ``N·n²`` of the
    per-sample Hessians. ``blocks=True``: per layer, only that layer's basis tangents and
    rows (the diagonal block ``∂²/∂W_l²``), never the full matrix."""
    from .nn import autodiff as ad

    params, x, y, tr, loss = _setup(net, params, x, y, loss)
    xp = xp_of(x)
    N = x.shape[0]
    layers = net.layers
    dout = loss.grad(tr.out, y)
    output_hvp = (lambda t: loss.hvp(tr.out, t)) if output_hessian else None
    shapes = [W.shape for W in params]
    sizes = [int(math.prod(s)) for s in shapes]
    n = sum(sizes)
    S = sum(int(math.prod(a.shape[1:])) for a in tr.inputs) + sum(int(math.prod(A.shape[1:])) for A in tr.A.values())
    chunk = max(1, min(n, max(n * n, _HESSIAN_CHUNK_DOUBLES) // max(1, N * S)))
    nl = len(params)

    def columns(j, lo, hi, rows):
        """``Σ_i ∇²ψ_i e_k`` for the basis vectors ``k = lo … hi-1`` of layer ``j``, rows of
        the layers ``rows``: list of ``(hi-lo, out, d)`` (``None`` off ``rows``)."""
        E = xp.zeros((hi - lo, sizes[j]), dtype=F64)
        E[xp.arange(hi - lo), xp.arange(lo, hi)] = 1.0
        V = [None] * nl
        V[j] = E.reshape((hi - lo,) + tuple(shapes[j]))
        return ad._hvp_summed(layers, params, tr, dout, V, output_hvp, rows=rows)

    from .nn._checks import quiet

    with quiet():
        if blocks:
            out = []
            for j in range(nl):
                B = xp.empty((sizes[j], sizes[j]), dtype=F64)
                for lo in range(0, sizes[j], chunk):
                    hi = min(sizes[j], lo + chunk)
                    B[lo:hi] = columns(j, lo, hi, {j})[j].reshape(hi - lo, -1)
                out.append(B / N)
            return out
        H = xp.empty((n, n), dtype=F64)
        off = 0
        for j in range(nl):
            for lo in range(0, sizes[j], chunk):
                hi = min(sizes[j], lo + chunk)
                R = columns(j, lo, hi, None)
                H[off + lo:off + hi] = xp.concatenate([r.reshape(hi - lo, -1) for r in R], axis=1)
            off += sizes[j]
        return H / N


def _per_sample_hessians(net, params, x, y, loss, output_hessian=True):
    params, x, y, _, loss = _setup(net, params, x, y, loss)
    xp = xp_of(x)
    n = net.n_params
    from .vec import unflatten

    V = unflatten(xp.eye(n, dtype=F64), net)  # n basis tangents, batched
    R = net._flat(net.hvp_per_sample(params, x, y, loss, V, output_hessian=output_hessian))
    return xp.moveaxis(R, 0, 1)  # (N, n, n): [i, k, :] = ∇²ψ_i e_k (symmetric)


def hessian(net, params, x, y, loss, blocks=False, per_sample=False):
    """Exact Hessian ``(1/N) Σ ∇²ψ_i`` by the R-operator on the backward pass (Pearlmutter;
    thesis (1.4)), the sum over samples taken inside the pass and the basis tangents in
    chunks (memory O(n² + N·n), :func:`_summed_hessian`); ``blocks=True`` computes only the
    layer blocks. ``per_sample=True`` returns ``(N, n, n)`` (one batched pass, ``N·n²``
    doubles)."""
    blocks, per_sample = _flag(blocks, "blocks"), _flag(per_sample, "per_sample")
    if blocks and per_sample:
        raise ArgumentTypeError("blocks=True and per_sample=True cannot be combined (per_sample returns (N, n, n))")
    if per_sample:
        return _result(_per_sample_hessians(net, params, x, y, loss), "hessian")
    return _result(_summed_hessian(net, params, x, y, loss, blocks=blocks), "hessian")


def hessian_residual(net, params, x, y, loss, blocks=False):
    """Second term of thesis (1.4): ``(1/N) Σ_i Σ_c [∂ℓ/∂f_i]_c ∂²f_{i,c}/∂θ²``: the R-op with
    the output Hessian switched off, so ``hessian = ggn + hessian_residual``."""
    blocks = _flag(blocks, "blocks")
    return _result(_summed_hessian(net, params, x, y, loss, output_hessian=False, blocks=blocks),
                   "hessian_residual")


def _sandwich(J, M):
    """``(1/N) Σ_i J_iᵀ M_i J_i`` for ``J (N, C, n)``, ``M (N, C, C)``."""
    xp = xp_of(J)
    return xp.einsum("ncp,ncd,ndq->pq", J, M, J, optimize=True) / J.shape[0]


def ggn(net, params, x, y, loss, blocks=False):
    """Generalized Gauss-Newton ``(1/N) Σ J_iᵀ H_i J_i`` (thesis §1.2.2)."""
    blocks = _flag(blocks, "blocks")
    params, x, y, tr, loss = _setup(net, params, x, y, loss)
    return _result(_ret(_sandwich(net.jacobian(params, x), loss.hessian(tr.out)), net, blocks), "ggn")


#: the Fisher-kind words (= refcurv.methods.vocabulary.FISHER_KINDS; tests/test_identities.py
#: checks that the two agree)
FISHER_KINDS = ("exact", "mc", "empirical")


def _sampled_cotangents(tr, loss, n_samples, seed, labels=None):
    """``∇_f ℓ(f, ŷ_s)`` for ``S`` labels per input from the model: ``(S, N, C)``. The labels
    are drawn with ``rng_of(seed)`` (``S = n_samples``, default 1), or given as ``labels`` of
    shape ``(S, N, …)`` (``(S, N)`` class indices for cross-entropy, ``(S, N, C)`` for MSE and
    BCE), e.g. drawn by another implementation, and then consumed exactly."""
    if labels is None:
        n_samples = 1 if n_samples is None else n_samples
        _check_n_samples(n_samples)
        ys = loss.sample(tr.out, n_samples=n_samples, seed=rng_of(seed))
        return loss.grad(tr.out[None], ys)
    if seed is not None:
        raise ArgumentTypeError("pass seed or labels, not both")
    xp = xp_of(tr.out)
    ys = xp.asarray(labels)
    N = tr.out.shape[0]
    if ys.ndim < 2 or ys.shape[1] != N:
        raise ShapeError(f"labels must have shape (n_samples, {N}, …), got {tuple(ys.shape)}")
    S = ys.shape[0]
    if n_samples is not None and n_samples != S:
        raise ShapeError(f"labels hold {S} samples per input, n_samples is {n_samples}")
    _check_n_samples(S)
    # the loss's own target checks (shape, dtype, range), on the S label sets stacked
    flat = xp.broadcast_to(tr.out[None], (S,) + tuple(tr.out.shape)).reshape((S * N,) + tuple(tr.out.shape[1:]))
    loss.check_targets(ys.reshape((S * N,) + tuple(ys.shape[2:])), flat)
    if ys.dtype.kind == "f":
        ys = ys.astype(tr.out.dtype)
    return loss.grad(tr.out[None], ys)


def _sampled_label_grads(net, params, tr, loss, n_samples, seed, labels=None):
    """Per-sample gradients for labels drawn from the model: ``(S, N, n)``."""
    D = _sampled_cotangents(tr, loss, n_samples, seed, labels)
    return net._param_grads_flat(tr, net._pull(params, tr, D))


def fisher(net, params, x, y=None, loss=None, kind="exact", n_samples=None, seed=None, blocks=False, labels=None):
    """Fisher matrices (thesis (1.7)), one function for the three kinds of the vocabulary.

    ``kind="exact"``: ``(1/N) Σ J_iᵀ F_i J_i`` with ``F_i = E_y[∇_f ℓ ∇_f ℓᵀ]`` from
    :meth:`fisher_output` (an expectation over labels, independent of the Hessian code).
    ``kind="mc"``: ``S`` labels per input drawn from the model — ``n_samples`` of them
    (default 1) with ``numpy.random.default_rng(seed)``, or the given ``labels`` of shape
    ``(S, N, …)`` (then ``seed`` must be ``None`` and ``n_samples``, if given, ``S``).
    ``kind="exact"`` and ``"mc"`` do not use ``y``. ``kind="empirical"``: the data labels
    ``y`` (required), i.e. :func:`empirical_fisher`.
    """
    _word(kind, "kind", FISHER_KINDS, "", expected="'exact', 'mc' or 'empirical'")
    if kind == "empirical":
        if labels is not None or seed is not None or n_samples is not None:
            raise ArgumentTypeError("labels, seed and n_samples are for kind='mc', not for kind='empirical'")
        if y is None:
            raise ArgumentTypeError("kind='empirical' needs the data labels y")
        return empirical_fisher(net, params, x, y, loss, blocks=blocks)
    blocks = _flag(blocks, "blocks")
    _seed_and_samples(seed, n_samples)
    if labels is not None and kind != "mc":
        raise ArgumentTypeError(f"labels are sampled labels for kind='mc', not for kind={kind!r}")
    _check_loss(loss)
    params, x, _, tr, loss = _setup(net, params, x, y, loss, need_y=False)
    if kind == "exact":
        return _result(_ret(_sandwich(net.jacobian(params, x), loss.fisher_output(tr.out)), net, blocks), "fisher")
    xp = xp_of(x)
    U = _sampled_label_grads(net, params, tr, loss, n_samples, seed, labels)
    S, N = U.shape[:2]
    U2 = U.reshape(S * N, -1)  # one GEMM over the S·N stacked gradients
    return _result(_ret(U2.T @ U2 / (S * N), net, blocks), "fisher")


def empirical_fisher(net, params, x, y, loss, blocks=False):
    """Empirical Fisher ``(1/N) Σ u_i u_iᵀ`` (SENG (2), EFIM; thesis §1.2.2)."""
    blocks = _flag(blocks, "blocks")
    U = _per_sample_grads(net, params, x, y, loss)
    return _result(_ret(U.T @ U / U.shape[0], net, blocks), "empirical_fisher")


def preactivation_hessians(net, params, x, y, loss):
    """Per-sample ``∂²ψ_i/∂h_l²`` per trainable layer: list of ``(N, out·T, out·T)``."""
    params, x, y, _, _ = _setup(net, params, x, y, loss)
    return _result(net.preactivation_hessians(params, x, y, loss), "preactivation_hessians")


KFAC_KINDS = FISHER_KINDS
KFAC_CONV = ("expand", "reduce")


def _backprop_cotangents(net, params, tr, y, loss, kind, n_samples, seed, labels=None):
    """Output cotangents ``(K, N, C)`` and the weight ``w`` such that the curvature is
    ``(1/N) Σ_i w Σ_k J_iᵀ d_{k,i} d_{k,i}ᵀ J_i`` for the chosen kind."""
    xp = xp_of(tr.out)
    if kind == "exact":  # columns of B_i, B_i B_iᵀ = H_i = F_i (thesis (1.7))
        return xp.moveaxis(loss.hessian_sqrt(tr.out), 2, 0), 1.0
    if kind == "mc":
        D = _sampled_cotangents(tr, loss, n_samples, seed, labels)
        return D, 1.0 / D.shape[0]
    return loss.grad(tr.out, y)[None], 1.0


def kfac_factors(net, params, x, y, loss, kind="exact", conv="expand", n_samples=None, seed=None, labels=None):
    """Kronecker factors ``(A_l, G_l)`` per trainable layer; the layer's curvature block
    is approximated by ``G_l ⊗ A_l`` in refcurv's row-major order (``A_l ⊗ G_l`` in the
    papers' column-major vec; thesis (2.3), (3.6), Algorithms 7/12).

    ``kind`` is a Fisher kind (:data:`FISHER_KINDS`; ``"ggn"`` before issue 9): it chooses
    the output cotangents. ``a_{n,t}``: column ``t`` of the patches ``A(a_n)`` (ones row
    included); ``g_{k,n,t}``: the pre-activation cotangent at location ``t`` from output
    cotangent ``d_{k,n}`` -- the columns of ``B_n`` (``B_n B_nᵀ = H_n``, the exact Fisher of
    the output = the GGN's ``H_n``) for ``kind="exact"``, ``S`` sampled-label gradients for
    ``"mc"`` (weight ``w = 1/S``; ``n_samples`` labels drawn with ``rng_of(seed)``, or the
    given ``labels`` of shape ``(S, N, …)``, consumed exactly: the ``"mc"`` factors are then
    the mean over ``s`` of the ``"empirical"`` factors at ``y = labels[s]``), the data-label
    gradient for ``"empirical"``. With ``T`` locations per sample (``T = 1`` for a Linear
    layer on vectors; ``T = H_out W_out`` for Conv2d; ``T`` positions for a Linear layer on a
    sequence ``(T, d)``, whose weight is shared over the positions):

    * ``conv="expand"`` (KFC, Grosse & Martens 2016, thesis (3.6); K-FAC-expand of
      Eschenhagen et al. 2023, §3): the ``N·T`` locations act as independent examples,
      ``A = (1/(N T)) Σ_{n,t} a_{n,t} a_{n,t}ᵀ``,  ``G = (w/N) Σ_{k,n,t} g_{k,n,t} g_{k,n,t}ᵀ``
      (the ``1/T`` sits in ``A``, so ``G ⊗ A`` carries the ``1/N`` of the objective).
    * ``conv="reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023, §3): the locations are
      aggregated before the outer products, inputs averaged and gradients summed,
      ``â_n = (1/T) Σ_t a_{n,t}``, ``ĝ_{k,n} = Σ_t g_{k,n,t}``;
      ``A = (1/N) Σ_n â_n â_nᵀ``,  ``G = (w/N) Σ_{k,n} ĝ_{k,n} ĝ_{k,n}ᵀ``.

    Both coincide when ``T = 1``. Exact for a batch of one (MLP) and for deep linear MLPs with
    MSE (``G`` is then the same for every sample). For weight sharing (Eschenhagen et al.
    2023, §3, tests/test_sequence.py): in a deep linear network with MSE, ``"expand"`` is
    exact in the *expand* setting (a loss per position, outputs ``(N, T, C)``) and
    ``"reduce"`` in the *reduce* setting (positions averaged inside the network,
    :class:`refcurv.nn.SequenceMean`, before the loss); neither is exact in the other's.
    Both are computed as GEMMs on the ``(N·T, d)`` and ``(K·N·T, out)`` rows.
    """
    _word(kind, "kind", KFAC_KINDS, " ('ggn' is now 'exact')" if isinstance(kind, str) and kind == "ggn" else "")
    _word(conv, "conv", KFAC_CONV)
    _seed_and_samples(seed, n_samples)
    _check_loss(loss)
    if labels is not None and kind != "mc":
        raise ArgumentTypeError(f"labels are sampled labels for kind='mc', not for kind={kind!r}")
    params, x, y, tr, loss = _setup(net, params, x, y, loss, need_y=(kind == "empirical"))
    D, w = _backprop_cotangents(net, params, tr, y, loss, kind, n_samples, seed, labels)
    G_all = net._pull(params, tr, D)  # list of (K, N, out, T)
    N = x.shape[0]
    out = []
    for k, g in zip(net.trainable_index, G_all):
        A = tr.A[k]  # (N, d, T)
        d, T = A.shape[-2:]
        o = g.shape[-2]
        if conv == "expand":  # Gram matrices of the rows a_{n,t} and g_{k,n,t}: one GEMM each
            R = A.swapaxes(-1, -2).reshape(-1, d)  # (N·T, d)
            D = g.swapaxes(-1, -2).reshape(-1, o)  # (K·N·T, out)
            Af = R.T @ R / (N * T)
            Gf = w * (D.T @ D) / N
        else:
            a_hat = A.mean(axis=-1)  # (N, d)
            g_hat = g.sum(axis=-1).reshape(-1, o)  # (K·N, out)
            Af = a_hat.T @ a_hat / N
            Gf = w * (g_hat.T @ g_hat) / N
        out.append((Af, Gf))
    return _result(out, "kfac_factors")


def gfim_side(shape):
    """NG+ (4)-(5): ``"left"`` (``L``, ``m × m``) if ``m <= n`` for an ``m × n`` weight, else ``"right"``."""
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d >= 1
                       for d in shape)):
        raise ShapeError(f"shape must be a weight shape (m, n) of two positive ints, got {_describe(shape)}")
    m, n = shape
    return "left" if m <= n else "right"


def gfim(net, params, x, y, loss, side="auto"):
    """NG+ generalized Fisher per layer (NG+ (2), (4)-(5)) from per-sample gradient
    matrices ``𝒢_i in R^{out x d}``: ``L = (1/N) Σ 𝒢_i 𝒢_iᵀ`` (``side="left"``),
    ``R = (1/N) Σ 𝒢_iᵀ 𝒢_i`` (``"right"``), or per layer by :func:`gfim_side` (``"auto"``)."""
    _word(side, "side", ("auto", "left", "right"))
    params, x, y, tr, loss = _setup(net, params, x, y, loss)
    xp = xp_of(x)
    grads = net._param_grads(tr, net._pull(params, tr, loss.grad(tr.out, y)))
    out = []
    for g in grads:
        s = gfim_side(g.shape[1:]) if side == "auto" else side
        # Σ_n 𝒢_n 𝒢_nᵀ is one GEMM with the sample axis folded into the inner dimension
        if s == "left":
            out.append(_outer_sum(g) / g.shape[0])
        else:
            out.append(_outer_sum(xp.swapaxes(g, -1, -2)) / g.shape[0])
    return _result(out, "gfim")


# ======================================================================================
# Per-layer Gram matrices and matrix-free products ([Ren-thesis] Ch.5 §5.3, Algorithms 17-22)
# ======================================================================================
#
# Kernels of the fast forms of SMW-GN / SMW-NG / SMW-NG-BD and Hessian-free, public so that a
# user can check them against the dense definitions above (tests/test_curvature_grams.py).
# Unlike the dense ground truth above they run in the input dtype and never form a
# per-sample gradient or Jacobian. They take the *factors* of :meth:`Sequential.factors`:
# per trainable layer ``l`` the patches ``A_l`` ``(N, d, T)`` (ones row included, ``T``
# locations; ``T = 1`` for Linear) and the pre-activation gradients ``G_l`` ``(N, out, T)``,
# so that the per-sample gradient of layer ``l`` is
#
#     ∇_{W_l} ψ_i = Σ_t g_{i,t} a_{i,t}ᵀ = G_l[i] A_l[i]ᵀ          (thesis (2.1), Algorithm 18)
#
# and ``u_i = ∇ψ_i`` stacks these over layers (row-major, :mod:`refcurv.vec`).

from .operators import Operator  # noqa: E402  (this section's; operators does not import curvature)
from .linalg.woodbury import spd_solve  # noqa: E402
from .vec import unflatten  # noqa: E402


def _check_factors(A, G):
    """``A``, ``G``: equally long non-empty lists of real finite ``(N, d_l, T_l)`` and
    ``(N, out_l, T_l)`` arrays (the same ``N ≥ 1`` throughout), as :meth:`Sequential.factors`
    returns them."""
    for name, F in (("A", A), ("G", G)):
        if not isinstance(F, (list, tuple)) or not F:
            raise ArgumentTypeError(f"{name} must be a non-empty list of per-layer arrays "
                                    f"(from Sequential.factors), got {_describe(F)}")
    if len(A) != len(G):
        raise ShapeError(f"A and G must have one array per trainable layer each, got {len(A)} and {len(G)}")
    A = [_real_array(a, f"A[{l}]") for l, a in enumerate(A)]
    G = [_real_array(g, f"G[{l}]") for l, g in enumerate(G)]
    N = A[0].shape[0] if A[0].ndim == 3 else None
    for l, (a, g) in enumerate(zip(A, G)):
        if a.ndim != 3 or g.ndim != 3 or a.shape[0] != N or g.shape[0] != N or a.shape[2] != g.shape[2] or N == 0:
            raise ShapeError(f"A[{l}] and G[{l}] must be (N, d, T) and (N, out, T) with the same N >= 1 "
                             f"for every layer, got shapes {tuple(a.shape)} and {tuple(g.shape)}")
    return A, G


def _check_layer_list(v, shapes, name):
    """Per-layer arrays of the given shapes (real, finite)."""
    if not isinstance(v, (list, tuple)) or len(v) != len(shapes):
        raise ArgumentTypeError(f"{name} must be a list of {len(shapes)} per-layer arrays, got {_describe(v)}"
                                + (f" of length {len(v)}" if isinstance(v, (list, tuple)) else ""))
    out = [_real_array(t, f"{name}[{l}]") for l, t in enumerate(v)]
    for l, (t, shp) in enumerate(zip(out, shapes)):
        if tuple(t.shape) != tuple(shp):
            raise ShapeError(f"{name}[{l}] must have shape {tuple(shp)}, got {tuple(t.shape)}")
    return out


def grad_from_factors(A, G):
    """Mini-batch gradient ``(1/N) Σ_i G_i A_iᵀ`` per layer (thesis (2.1), Algorithm 18), a
    list of ``(out, d)``, from the factors without forming per-sample gradients. Equals
    :func:`grad` (unflattened)."""
    A, G = _check_factors(A, G)
    xp = xp_of(*A)
    return _result([_factor_sum(g, a) / a.shape[0] for a, g in zip(A, G)], "grad_from_factors")


def ef_gram(A, G, blocks=False):
    """Gram matrix of the per-sample gradients, ``K_{ij} = u_iᵀ u_j`` ``(N, N)`` ([Ren-thesis]
    §5.3.3, the ``J Jᵀ`` of SMW-NG's ``D_t`` in (5.6) with ``H = I``; erratum SMW-1), from the
    factors by the Kronecker structure of each layer's gradient:

        u_iᵀ u_j = Σ_l Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'}) (g_{i,t}ᵀ g_{j,t'})

    — ``(g_iᵀg_j)(v_iᵀv_j)`` per layer for Linear (``T = 1``, bias in the ones row of ``a``).
    ``blocks=True``: the per-layer Grams ``K^l_{ij} = (∇_{W_l}ψ_i)ᵀ ∇_{W_l}ψ_j`` as a list (the
    ``D_l`` of SMW-NG-BD, §5.8); their sum is the full Gram. Dense definition:
    ``U Uᵀ`` with ``U =`` :func:`per_sample_grads`."""
    A, G = _check_factors(A, G)
    blocks = _flag(blocks, "blocks")
    xp = xp_of(*A)
    out = [_kron_gram(a, g) for a, g in zip(A, G)]
    return _result(out if blocks else sum(out), "ef_gram")



def ef_products(A, G, v):
    """``(∇_{W_l}ψ_iᵀ v_l)_i`` per layer: a list of ``(N,)`` with
    ``∇_{W_l}ψ_iᵀ v_l = Σ_t g_{i,t}ᵀ V_l a_{i,t}`` (``v`` per layer ``(out, d)``); their sum over
    layers is ``U v`` (``J g`` and ``J p`` of SMW-NG, thesis (5.6) with ``J = U``)."""
    A, G = _check_factors(A, G)
    v = _check_layer_list(v, [(g.shape[1], a.shape[1]) for a, g in zip(A, G)], "v")
    xp = xp_of(*A)
    # Σ_t g_{i,t}ᵀ V a_{i,t}: V a for all samples and locations as one GEMM, then a row-wise dot
    out = []
    for a, g, w in zip(A, G, v):
        Va = w @ xp.swapaxes(a, 0, 1).reshape(a.shape[1], -1)  # (out, N·T)
        gf = xp.swapaxes(g, 0, 1).reshape(g.shape[1], -1)
        out.append((Va * gf).reshape(g.shape[1], g.shape[0], -1).sum(axis=(0, 2)))
    return _result(out, "ef_products")


def ef_transpose(A, G, z):
    """``Σ_i z_i ∇_{W_l}ψ_i = Σ_i z_i G_l[i] A_l[i]ᵀ`` per layer (``Uᵀ z``; the ``Jᵀ D⁻¹ J g``
    correction of (5.6) for SMW-NG). ``z``: ``(N,)`` for every layer, or a per-layer list
    (SMW-NG-BD: one ``z_l`` per block)."""
    A, G = _check_factors(A, G)
    N = A[0].shape[0]
    if isinstance(z, (list, tuple)):
        zs = _check_layer_list(z, [(N,)] * len(A), "z")
    else:
        z = _real_array(z, "z")
        if z.shape != (N,):
            raise ShapeError(f"z must have shape ({N},) (one weight per sample) or be a per-layer list, "
                             f"got shape {tuple(z.shape)}")
        zs = [z] * len(A)
    xp = xp_of(*A)
    return _result([_factor_sum(g * zi[:, None, None], a) for a, g, zi in zip(A, G, zs)], "ef_transpose")


class OutputJacobian:
    """The output Jacobian ``J`` of one batch as products (thesis Algorithms 17, 19, 21):
    ``J v = (J_i v)_i`` ``(N, C)`` by one forward-mode pass and ``Jᵀ w = Σ_i J_iᵀ w_i`` (per
    layer ``(out, d)``) by one backward pass, sharing one forward pass; ``Jᵀ w`` contracts the
    back-propagated ``G_i(w)`` with the patches, without per-sample gradients. Input dtype.
    Dense definition: :func:`jacobian`."""

    def __init__(self, net, params, x):
        self.net = _check_net(net)
        params = _check_params(net, params)
        self.params, x = net._prepare(params, _check_x(net, x, params))
        self.tr = net._forward(self.params, x)
        self.f = _result(self.tr.out, "the network output f")

    def output_loss(self, loss):
        """``loss`` as a function of :attr:`f` ``(N, C)``: ``loss`` itself, or for a sequence
        output ``(T, C)`` (``f`` flattened to ``(N, T·C)``) the sum over positions, whose output
        Hessian and Fisher are block diagonal (README "Sequences")."""
        return self.net._loss_for(_check_loss(loss), self.tr)

    def jvp(self, v):
        """``v``: per-layer ``(out, d)`` → ``J v`` ``(N, C)``."""
        v = _check_layer_list(v, [W.shape for W in self.params], "v")
        _, df = self.net._push(self.params, self.tr, [t[None] for t in v])
        return _result(df[0], "OutputJacobian.jvp(v)")

    def vjp(self, w):
        """``w`` ``(N, C)`` → ``Σ_i J_iᵀ w_i`` per layer ``(out, d)``."""
        w = _real_array(w, "w")
        if w.shape != self.f.shape:
            raise ShapeError(f"w must have the output shape {tuple(self.f.shape)} (N, C), got {tuple(w.shape)}")
        xp = xp_of(w)
        G = self.net._pull(self.params, self.tr, w)
        return _result([_factor_sum(g, self.tr.A[k]) for k, g in zip(self.net.trainable_index, G)],
                       "OutputJacobian.vjp(w)")


class GGNOperator(Operator):
    """``C = B + λI`` with the mini-batch GGN ``B = (1/N) Σ_i J_iᵀ H_i J_i`` (thesis (5.2)) as a
    matrix-free :class:`refcurv.operators.Operator` on flat θ (refcurv order): ``B v`` is one
    forward-mode pass (``J v``, Algorithm 19), the output Hessian-vector product
    (``loss.hvp``) and one backward pass (``Jᵀ w``, Algorithm 21), all vectors of a block
    ``(n, k)`` at once; no matrix is formed and the input dtype is kept (Hessian-free's
    products). ``todense`` applies it to ``I``; ``solve`` factorizes that (for inspection;
    Hessian-free itself solves by CG). Dense definition: :func:`ggn` ``+ λI``."""

    def __init__(self, net, params, x, loss, damping=0.0):
        self.loss = _check_loss(loss)
        damping = _real_number(damping, "damping")
        if damping < 0:
            raise HyperParameterError(f"damping must be a finite number >= 0, got {damping!r}")
        self.net = _check_net(net)
        self.J = OutputJacobian(net, params, x)
        self.loss = self.J.output_loss(self.loss)
        self.N = self.J.f.shape[0]
        self.damping = float(damping)
        self.n, self.dtype = net.n_params, self.J.f.dtype

    def ggn(self, v):
        """``B v`` (no damping), ``v`` of shape ``(n,)`` or ``(n, k)``; checked like
        :meth:`matvec` (an O(n) check per product, negligible next to the passes)."""
        return _finite_result(self._ggn(self._rhs(v)), "GGNOperator.ggn(v)")

    def _ggn(self, v):
        J = self.J
        V = v[None] if v.ndim == 1 else v.T  # (K, n): the K tangents of one batched pass
        _, df = self.net._push(J.params, J.tr, unflatten(V, self.net))  # (K, N, C): J v
        w = self.loss.hvp(J.f, df)  # H_i J_i v
        G = self.net._pull(J.params, J.tr, w)  # list of (K, N, out, T)
        xp = xp_of(df)
        out = self.net._flat([_factor_sum(g, J.tr.A[k])
                              for k, g in zip(self.net.trainable_index, G)]) / self.N
        return out[0] if v.ndim == 1 else out.T

    def _matvec(self, v):
        return self._ggn(v) + self.damping * v

    def _solve(self, v):
        return spd_solve(self.todense(), v, "B + λI")

    def todense(self):
        M = self._matvec(xp_of(self.J.f).eye(self.n, dtype=self.dtype))
        return (M + M.T) / 2
