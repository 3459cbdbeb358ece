"""The autodiff core as pure functions, one per equation; :class:`~refcurv.nn.Sequential`
is a thin shell that validates its input and calls them.

Notation (thesis = Ren's thesis, seed ``[Ren-thesis]``: Ch.2 Algorithm 1 and (2.1)-(2.2), Ch.3
Theorem 3, Ch.5 (5.10)-(5.11) and Algorithms 17-22; SENG (3)). For trainable module ``l``
with weight matrix ``W_l in R^{out x d}`` (bias = last column) and input ``a_{l-1}``:

    A_l = A(a_{l-1}) in R^{d x T}       patches with the ones row (T = 1 for Linear)
    h_l = W_l A_l in R^{out x T}        pre-activation
    G_l = ∂ψ/∂h_l in R^{out x T}        pre-activation gradient of the per-sample loss
    ∇_{W_l} ψ = G_l A_lᵀ                per-sample gradient (thesis (2.1), Theorem 3 i)

Arguments shared by every function:

* ``layers``: the full list of refcurv modules (Linear, Conv2d, activations, Flatten);
* ``params``: one weight matrix per *trainable* module, in order, already validated and
  of one floating dtype (:meth:`Sequential.check_params` and ``_prepare`` do that; these
  functions check nothing);
* ``trace``: the :class:`Trace` of :func:`forward_trace` for the same ``params`` and input.

The public functions validate their arguments (types, shapes, finiteness, that the trace
was made for these layers; :class:`~refcurv.errors.RefcurvError` subclasses naming the
argument) and refuse a non-finite result from finite input with
:class:`~refcurv.errors.NonFiniteError`; :class:`~refcurv.nn.Sequential`, which has
validated already, calls the unchecked underscored forms.

Primal arrays are ``(N, ...)``; tangents and cotangents carry one more leading axis
``(K, N, ...)``. The only Python loops run over modules (and over the ``kh*kw`` kernel
offsets inside im2col), never over samples or parameters.

Second-order quantities come from Pearlmutter's R-operator applied to the backward pass
(forward-over-reverse, :func:`pull_cotangents` with ``rop=``): exact second-order
backprop, not finite differences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..backend import xp_of
from ..errors import ArgumentTypeError, EmptyBatchError, ShapeError
from ._checks import (
    check_bool,
    check_callable,
    check_finite,
    describe,
    finite_array,
    finite_result,
    quiet,
    real_array,
)
from .layers import (
    LINEAR_MAPS,
    Conv2d,
    Flatten,
    Linear,
    SequenceMean,
    _Elementwise,
    _shape_arg,
)

__all__ = [
    "Trace", "trainable_index", "feature_shapes", "forward_trace", "push_tangents",
    "pull_cotangents", "weight_grads", "flatten_layers", "output_basis", "jvp", "vjp",
    "jacobian", "jacobian_gram", "hvp_per_sample", "preactivation_hessians",
]


@dataclass
class Trace:
    """What the forward pass keeps: each module's input and feature shape, the patches
    ``A`` of each trainable module (keyed by module index) and the output ``out`` ``(N, C)``.

    A sequence output ``(N, T, C)`` is kept flattened, ``out`` ``(N, T·C)``, so that every
    consumer of ``(N, C)`` outputs (Jacobians ``(N, T·C, n)``, output bases, GGN sandwiches)
    works unchanged; the loss then acts per position through
    :func:`refcurv.nn.losses._over_positions` (per-sample loss = sum over positions)."""

    inputs: list
    in_shapes: list
    A: dict = field(default_factory=dict)
    out: object = None
    #: the feature shape of the network output: ``(C,)``, or ``(T, C)`` for a sequence
    #: output, which ``out`` holds flattened to ``(N, T·C)`` (row-major over ``(T, C)``)
    out_shape: tuple = None

    def __post_init__(self):
        for name, kind in (("inputs", list), ("in_shapes", list), ("A", dict)):
            if not isinstance(getattr(self, name), kind):
                raise ArgumentTypeError(
                    f"Trace.{name} must be a {kind.__name__}, got {describe(getattr(self, name))}")

    @property
    def patches(self):
        """The patches ``A_l`` of the trainable modules, in order (a list)."""
        return list(self.A.values())


# ------------------------------------------------------------------ structure
def _trainable_index(layers):
    """Indices (into ``layers``) of the trainable modules, in order."""
    return [k for k, m in enumerate(layers) if m.trainable]


def _feature_shapes(layers, input_shape):
    """Feature shapes entering each module, plus the output's: ``len(layers) + 1`` tuples.
    Raises :class:`ShapeError` naming the first module that cannot take its input."""
    shapes = [tuple(input_shape)]
    for k, m in enumerate(layers):
        try:
            shapes.append(tuple(m.out_shape(shapes[-1])))
        except ShapeError as e:
            raise ShapeError(f"layers[{k}]: {e}") from None
    return shapes


# ------------------------------------------------------------------ forward
def _forward_trace(layers, params, x):
    """Forward pass (thesis Algorithm 1 line 2, Algorithm 17), batched over samples:

        a_0 = x,   A_l = A(a_{l-1}),   h_l = W_l A_l,   a_l = φ_l(h_l).

    ``h_l = W_l A_l`` is :meth:`_apply` of the layer: one GEMM over the batch and positions
    for Linear. Returns the :class:`Trace` (module inputs ``a``, feature shapes, patches
    ``A_l``, output ``f = a_L`` of shape ``(N, C)``, a sequence output flattened to
    ``(N, T·C)``) that the other passes read."""
    shapes = _feature_shapes(layers, x.shape[1:])
    tr = Trace(inputs=[], in_shapes=shapes[:-1], out_shape=shapes[-1])
    z, j = x, 0
    for k, m in enumerate(layers):
        tr.inputs.append(z)
        s = shapes[k]
        if m.trainable:
            A = m.patches(z, s)
            tr.A[k] = A
            z = m._apply(params[j], z, s, A=A)
            j += 1
        elif isinstance(m, LINEAR_MAPS):
            z = m.f(z, s)
        else:
            z = m.f(z)
    tr.out = _flat_output(z, shapes[-1])
    return tr


def _flat_output(z, out_shape):
    """A sequence output ``(…, N, T, C)`` as ``(…, N, T·C)`` (a view); others unchanged."""
    return z.reshape(z.shape[: z.ndim - 2] + (-1,)) if len(out_shape) == 2 else z


def _shaped_output(z, out_shape):
    """Inverse of :func:`_flat_output`: ``(…, N, T·C) -> (…, N, T, C)``."""
    return z.reshape(z.shape[:-1] + tuple(out_shape)) if len(out_shape) == 2 else z


# -------------------------------------------------------- forward mode (R-op)
def _push_tangents(layers, params, trace, dparams=None, inject=None):
    """Forward-mode tangents, the R-operator of the forward pass (thesis (5.11),
    Algorithm 19), batched over ``K`` tangents and the samples:

        R{h_l} = W_l A(R{a_{l-1}}) + R{W_l} A_l,    R{a_l} = φ_l'(h_l) ⊙ R{h_l},

    with ``R{a_0} = 0`` (the ones row of ``A`` has zero tangent, hence ``ones=False``).

    ``dparams``: per trainable module ``R{W_l}`` of shape ``(K, out, d)``, or ``None``
    (zero; an entry may also be ``None``). ``inject = (k, t)``: the tangent of module
    ``k``'s output is replaced by ``t`` (``(K, N, *out_shape)``), used to differentiate
    with respect to a pre-activation. Returns ``(tangent of each module's input, tangent
    of the output)``; ``None`` stands for a zero tangent.
    """
    dz, j, tan_in = None, 0, []
    for k, m in enumerate(layers):
        tan_in.append(dz)
        s = trace.in_shapes[k]
        if m.trainable:
            dh = None
            if dz is not None:  # W_l A(R{a}): one GEMM over tangents, samples and positions
                dh = m._apply(params[j], dz, s, ones=False)
            if dparams is not None and dparams[j] is not None:  # R{W_l} A_l
                t = m._apply_weights(dparams[j], trace.A[k], s)
                dh = t if dh is None else dh + t
            dz = dh
            j += 1
        elif dz is not None:
            dz = m.f(dz, s) if isinstance(m, LINEAR_MAPS) else m.d1(trace.inputs[k]) * dz
        if inject is not None and inject[0] == k:
            dz = inject[1]
    out_shape = trace.out_shape if trace.out_shape is not None else ()
    return tan_in, None if dz is None else _flat_output(dz, out_shape)


# ------------------------------------------------------ reverse mode (+ R-op)
def _pull_cotangents(layers, params, trace, dout, rop=None):
    """Backward pass (thesis Algorithm 1 line 4, Algorithms 18, 20-21): the output
    cotangent ``dout`` (``(…, N, C)``) pulled back to every trainable module's
    pre-activation,

        G_L = dout,   Da_{l-1} = A*(W_lᵀ G_l),   G_{l-1} = φ'(h_{l-1}) ⊙ Da_{l-1}

    (``A*`` the adjoint of the linear part of the patch operator: identity minus the bias
    row for Linear, col2im for Conv2d). Returns ``G``, a list of ``(…, N, out, T)``.

    With ``rop = (tan_in, dparams, ddout)`` (``tan_in`` from :func:`push_tangents` along
    ``dparams``, ``ddout = R{dout}``) it also returns ``R{G}``, the R-operator of this
    pass (Pearlmutter):

        R{Da_{l-1}} = A*(W_lᵀ R{G_l} + R{W_l}ᵀ G_l),
        R{G_{l-1}} = φ'(h) ⊙ R{Da_{l-1}} + φ''(h) ⊙ R{h} ⊙ Da_{l-1}.
    """
    n = sum(1 for m in layers if m.trainable)
    G, dG = [None] * n, [None] * n
    out_shape = trace.out_shape if trace.out_shape is not None else ()
    dz = _shaped_output(dout, out_shape)
    tan_in, dparams, ddz = rop if rop is not None else (None, None, None)
    if rop is not None:
        ddz = _shaped_output(ddz, out_shape)
    j = n
    for k in reversed(range(len(layers))):
        m, s = layers[k], trace.in_shapes[k]
        if m.trainable:
            j -= 1
            W = params[j]
            G[j] = m.from_output(dz, s)  # a view (…, N, out, T)
            if rop is not None:
                dG[j] = m.from_output(ddz, s)
            if k == 0:
                break
            new = m._apply_adjoint(W, dz, s)  # A*(W_lᵀ G_l): one GEMM for Linear
            if rop is not None:
                t = m._apply_adjoint(W, ddz, s)
                if dparams is not None and dparams[j] is not None:  # A*(R{W_l}ᵀ G_l)
                    batched = dz.ndim > 1 + len(m.out_shape(s))  # dout (K, N, C) or (N, C)
                    t = t + m._apply_adjoint(dparams[j], dz, s, batched=batched)
                ddz = t
            dz = new
        elif isinstance(m, LINEAR_MAPS):
            dz = m.adjoint(dz, s)
            if rop is not None:
                ddz = m.adjoint(ddz, s)
        else:
            a = trace.inputs[k]
            d1 = m.d1(a)
            if rop is not None:
                new = ddz * d1
                if tan_in[k] is not None:
                    new = new + dz * m.d2(a) * tan_in[k]
                ddz = new
            dz = dz * d1
    return (G, dG) if rop is not None else G


# ---------------------------------------------------------- per-sample gradients
def _weight_grads(A, G):
    """Per-sample weight gradients ``∇_{W_l} ψ_i = G_l A_lᵀ`` (thesis (2.1), Theorem 3 i:
    ``Σ_t g_t a_tᵀ`` over the ``T`` locations): ``A`` a list of ``(N, d, T)``, ``G`` a list
    of ``(…, N, out, T)`` → list of ``(…, N, out, d)``."""
    return [_outer_sum(g, a) for a, g in zip(A, G)]


def _outer_sum(g, a, out=None):
    """``g @ aᵀ`` on the last two axes (``Σ_t g_t a_tᵀ``), into ``out`` if given. With one
    location (``T = 1``: a Linear layer on vectors) the product is an outer product, written
    as a broadcast multiply: a batched GEMM with inner dimension 1 is slower, and the result
    is the size of the memory traffic either way."""
    xp = xp_of(g, a)
    if a.shape[-1] == 1:
        return xp.multiply(g, a.swapaxes(-1, -2), out=out)
    return xp.matmul(g, a.swapaxes(-1, -2), out=out)


def _certainly_finite(A, G):
    """``True`` if every ``G_i A_iᵀ`` is finite by a bound: each entry is a sum of ``T``
    products, so ``|entry| ≤ T · max|g| · max|a|``, required below half the largest number
    of the result's dtype (the half absorbs the rounding of the sum). An O(size of the
    factors) test that spares the O(N·n) finiteness scan of the per-sample gradients in the
    common case; when it fails (or a factor holds NaN/Inf) the caller scans the result."""
    xp = xp_of(*A)
    for a, g in zip(A, G):
        if a.size == 0 or g.size == 0:
            continue
        limit = 0.5 * float(np.finfo(np.result_type(a.dtype, g.dtype)).max)
        bound = float(xp.abs(a).max()) * float(xp.abs(g).max()) * a.shape[-1]
        if not bound < limit:
            return False
    return True


def _weight_grads_flat(A, G):
    """:func:`_weight_grads` written straight into the flat ``(…, N, n)`` array (row-major per
    layer, the order of :func:`_flatten_layers`): one batched ``matmul`` per layer,
    ``(…, N, out, T) @ (N, T, d)``, into its column block, so the ``N·n`` doubles are written
    once (forming the per-layer arrays and concatenating them writes and reads them twice
    more; for an MLP the array is the dominant memory traffic)."""
    xp = xp_of(*G)
    lead = tuple(G[0].shape[:-2])
    shapes = [(g.shape[-2], a.shape[-2]) for a, g in zip(A, G)]
    dtype = np.result_type(*(a.dtype for a in A), *(g.dtype for g in G))
    out = xp.empty(lead + (sum(o * d for o, d in shapes),), dtype=dtype)
    off = 0
    for a, g, (o, d) in zip(A, G, shapes):
        block = out[..., off : off + o * d].reshape(lead + (o, d))  # a view: the last axis is contiguous
        _outer_sum(g, a, out=block)
        off += o * d
    return out


def _mean_weight_grads(A, G):
    """Mini-batch gradient ``(1/N) Σ_i G_i A_iᵀ`` per layer as one GEMM per layer over the
    samples and locations, ``(1/N) G_rowsᵀ A_rows`` with ``(N·T, out)`` and ``(N·T, d)`` rows
    (thesis (2.1), Algorithm 18), never through per-sample gradients. ``G`` ``(N, out, T)``."""
    out = []
    for a, g in zip(A, G):
        N = a.shape[0]
        R = a.swapaxes(-1, -2).reshape(-1, a.shape[-2])  # (N·T, d); contiguous for Linear
        D = g.swapaxes(-1, -2).reshape(-1, g.shape[-2])  # (N·T, out)
        out.append((D.T @ R) / N)
    return out


def _flatten_layers(grads):
    """Concatenate per-layer ``(…, out, d)`` into ``(…, n)`` (row-major per layer, the
    order of :func:`refcurv.flatten`)."""
    xp = xp_of(*grads)
    return xp.concatenate([g.reshape(g.shape[:-2] + (-1,)) for g in grads], axis=-1)


# ------------------------------------------------------------ Jacobian products
def _jvp(layers, params, trace, V):
    """``J_i v`` for every sample (thesis Algorithm 19): ``V`` per trainable module
    ``(K, out, d)`` → ``(K, N, C)``."""
    return _push_tangents(layers, params, trace, V)[1]


def _vjp(layers, params, trace, w, per_sample=False):
    """``Jᵀ w = Σ_i J_iᵀ w_i`` (thesis Algorithms 20-21): the backward pass from ``w``
    followed by ``G_l A_lᵀ``. ``w`` ``(…, N, C)`` → list of ``(…, out, d)``;
    ``per_sample=True`` keeps the sample axis, ``J_iᵀ w_i`` as ``(…, N, out, d)``."""
    grads = _weight_grads(trace.patches, _pull_cotangents(layers, params, trace, w))
    return grads if per_sample else [g.sum(axis=-3) for g in grads]


def _output_basis(out):
    """The ``C`` unit output cotangents for every sample: ``(C, N, C)``, entry
    ``[c, i, :] = e_c``, for an output ``out`` of shape ``(N, C)``."""
    xp = xp_of(out)
    N, C = out.shape
    return xp.broadcast_to(xp.eye(C, dtype=out.dtype)[:, None, :], (C, N, C))


def _jacobian(layers, params, trace):
    """Per-sample output Jacobians ``J_i = ∂f_i/∂θ``: ``(N, C, n)``, θ flattened row-major
    per layer; row ``c`` of ``J_i`` is ``J_iᵀ e_c`` (Algorithm 20), so ``C`` batched
    backward passes from :func:`output_basis`."""
    grads = _vjp(layers, params, trace, _output_basis(trace.out), per_sample=True)
    return xp_of(trace.out).moveaxis(_flatten_layers(grads), 0, 1)  # (C, N, n) → (N, C, n)


def _jacobian_gram(layers, params, trace):
    """``(J_i J_jᵀ)_{i,j}`` as ``(N, C, N, C)`` from the Kronecker structure, without
    forming ``J`` (thesis Algorithm 22, extended to conv layers):

        J_i J_jᵀ[c, c'] = Σ_l Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'}) (g^c_{i,t}ᵀ g^{c'}_{j,t'}),

    with ``g^c`` the pre-activation cotangents of the output basis vector ``e_c``."""
    xp = xp_of(trace.out)
    G = _pull_cotangents(layers, params, trace, _output_basis(trace.out))
    out = 0
    for A, g in zip(trace.patches, G):
        KA = xp.einsum("idt,jds->ijts", A, A)
        out = out + xp.einsum("ijts,ciot,ejos->icje", KA, g, g, optimize=True)
    return out


# ------------------------------------------------------------------ second order
def _hvp_per_sample(layers, params, trace, dout, V, output_hvp=None):
    """Per-sample Hessian-vector products ``∇²ψ_i v`` by the R-operator on the backward
    pass (Pearlmutter; forward-over-reverse). Differentiating ``∇_{W_l} ψ = G_l A_lᵀ``
    along ``v``:

        R{∇_{W_l} ψ} = R{G_l} A_lᵀ + G_l R{A_l}ᵀ,   R{A_l} = A_lin(R{a_{l-1}}),

    with ``R{G}`` from :func:`pull_cotangents` seeded by ``R{dout} = H_i R{f}`` (thesis
    (1.4): the loss-curvature term ``J_iᵀ H_i J_i v``; ``R{f} = J_i v`` from
    :func:`push_tangents`).

    ``dout``: ``∂ℓ/∂f`` at the trace's output ``(N, C)``; ``V``: per trainable module
    ``(K, out, d)``; ``output_hvp``: ``R{f} ↦ H_i R{f}`` on ``(K, N, C)`` (for a refcurv
    loss, ``lambda t: loss.hvp(f, t)``), or ``None`` to drop that term and keep only the
    residual term ``Σ_c [∂ℓ/∂f_i]_c ∂²f_{i,c}/∂θ² v`` of (1.4). Returns a list of
    ``(K, N, out, d)``.
    """
    tan_in, df = _push_tangents(layers, params, trace, V)
    ddout = output_hvp(df) if output_hvp is not None else 0 * df
    G, dG = _pull_cotangents(layers, params, trace, dout, rop=(tan_in, V, ddout))
    out = []
    for k, g, dg in zip(_trainable_index(layers), G, dG):
        m, s, t = layers[k], trace.in_shapes[k], tan_in[k]
        r = dg @ trace.A[k].swapaxes(-1, -2)
        if t is not None:
            r = r + g @ m.patches(t, s, ones=False).swapaxes(-1, -2)
        out.append(r)
    return out


def _preactivation_hessians(layers, params, trace, dout, output_hvp):
    """Exact per-sample pre-activation Hessians ``∂²ψ_i/∂h_l²`` (thesis (2.2), ``G_l(i)``;
    Theorem 3 ii, ``G_{t,t'}``): for each trainable module, the identity basis of its
    pre-activation is injected as tangent (:func:`push_tangents` ``inject=``) and the
    backward pass differentiated (``R{G_l}``), one batched pass per module.

    ``dout``: ``∂ℓ/∂f`` ``(N, C)``; ``output_hvp``: ``R{f} ↦ H_i R{f}`` (as in
    :func:`hvp_per_sample`). Returns a list of ``(N, m_l, m_l)`` with ``m_l = out·T`` and
    ``h_l`` flattened row-major over ``(out, T)``.
    """
    xp = xp_of(trace.out)
    dtype = trace.out.dtype
    N = trace.out.shape[0]
    out = []
    for j, k in enumerate(_trainable_index(layers)):
        m, s = layers[k], trace.in_shapes[k]
        hshape = tuple(m.out_shape(s))
        size = math.prod(hshape)
        # the basis of h_l flattened row-major over (out, T), in the layer's output layout
        # ((T, out) for a sequence Linear)
        E = m.to_output(xp.eye(size, dtype=dtype).reshape((size, 1, m.out_features, -1)), s)
        E = xp.broadcast_to(E, (size, N) + hshape)
        tan_in, df = _push_tangents(layers, params, trace, inject=(k, E))
        _, dG = _pull_cotangents(layers, params, trace, dout, rop=(tan_in, None, output_hvp(df)))
        out.append(xp.moveaxis(dG[j].reshape(size, N, size), 0, 2))
    return out


# ------------------------------------------------------------------ checked public forms
def _check_layers(layers):
    if not isinstance(layers, (list, tuple)) or len(layers) == 0:
        raise ArgumentTypeError(f"layers must be a non-empty list of refcurv layers, got {describe(layers)}")
    for k, m in enumerate(layers):
        if not isinstance(m, (Linear, Conv2d, Flatten, SequenceMean, _Elementwise)):
            raise ArgumentTypeError(f"layers[{k}] is not a refcurv layer: {describe(m)}")
    if not _trainable_index(layers):
        raise ArgumentTypeError("layers must contain at least one Linear or Conv2d")
    return list(layers)


def _check_params(layers, params):
    idx = _trainable_index(layers)
    if not isinstance(params, (list, tuple)):
        raise ArgumentTypeError(f"params must be a list of arrays, got {describe(params)}")
    if len(params) != len(idx):
        raise ShapeError(f"params has {len(params)} arrays, the layers have {len(idx)} trainable layers")
    out = []
    for j, (W, k) in enumerate(zip(params, idx)):
        W = real_array(W, f"params[{j}]")
        if tuple(W.shape) != layers[k].param_shape:
            raise ShapeError(f"params[{j}] has shape {tuple(W.shape)}, {layers[k]!r} needs {layers[k].param_shape}")
        out.append(check_finite(W, f"params[{j}]"))
    return out


def _check_trace(layers, trace):
    if not isinstance(trace, Trace):
        raise ArgumentTypeError(f"trace must be a refcurv.nn.autodiff.Trace from forward_trace, got {describe(trace)}")
    idx = _trainable_index(layers)
    ok = (len(trace.inputs) == len(layers) == len(trace.in_shapes) and sorted(trace.A) == idx
          and hasattr(trace.out, "shape") and getattr(trace.out, "ndim", 0) == 2)
    if ok:
        try:
            out_shape = tuple(trace.out_shape) if trace.out_shape is not None else tuple(trace.out.shape[1:])
            ok = (_feature_shapes(layers, trace.in_shapes[0]) == [tuple(s) for s in trace.in_shapes] + [out_shape]
                  and math.prod(out_shape) == trace.out.shape[1])
        except (ShapeError, TypeError, ValueError, ArgumentTypeError):
            ok = False
    if not ok:
        raise ShapeError("trace was not made by forward_trace for these layers")
    finite_array(trace.out, "trace.out")
    return trace


def _check_cotangent(w, trace, name, ndims=(2, 3)):
    w = finite_array(w, name)
    if w.ndim not in ndims or tuple(w.shape[-2:]) != tuple(trace.out.shape):
        raise ShapeError(f"{name} must have shape (…, N, C) = (…, *{tuple(trace.out.shape)}) with "
                         f"{' or '.join(map(str, ndims))} dimensions, got {tuple(w.shape)}")
    return w


def _check_batched_tangents(V, params, name, allow_none=False):
    if not isinstance(V, (list, tuple)) or len(V) != len(params):
        raise ShapeError(f"{name} must be a list of {len(params)} per-layer arrays (K, out, d), got {describe(V)}")
    out, K = [], set()
    for j, (t, W) in enumerate(zip(V, params)):
        if t is None and allow_none:
            out.append(None)
            continue
        t = finite_array(t, f"{name}[{j}]")
        if t.ndim != 3 or tuple(t.shape[1:]) != tuple(W.shape):
            raise ShapeError(f"{name}[{j}] must have shape (K, *{tuple(W.shape)}), got {tuple(t.shape)}")
        K.add(t.shape[0])
        out.append(t)
    if len(K) > 1:
        raise ShapeError(f"{name} entries must share the batch size K, got {sorted(K)}")
    if K and 0 in K:
        raise EmptyBatchError(f"{name} holds no tangents (K = 0)")
    return out


def _run(what, fn, *args, **kwargs):
    with quiet():
        out = fn(*args, **kwargs)
    return finite_result(out, what)


def trainable_index(layers):
    """Indices (into ``layers``) of the trainable modules, in order."""
    return _trainable_index(_check_layers(layers))


def feature_shapes(layers, input_shape):
    """Feature shapes entering each module, plus the output's: ``len(layers) + 1`` tuples.
    Raises :class:`ShapeError` naming the first module that cannot take its input."""
    return _feature_shapes(_check_layers(layers), _shape_arg(input_shape, "input_shape"))


def forward_trace(layers, params, x):
    """Checked :func:`_forward_trace`: ``x`` a finite real batch ``(N, *input_shape)`` with
    ``N >= 1`` (ints → float64), ``params`` one finite matrix per trainable layer; computed
    in their common dtype."""
    layers = _check_layers(layers)
    params = _check_params(layers, params)
    x = finite_array(x, "x", min_ndim=2)
    if x.shape[0] == 0:
        raise EmptyBatchError("x is an empty batch (N = 0)")
    dt = np.result_type(x.dtype, *(W.dtype for W in params))
    params, x = [W.astype(dt, copy=False) for W in params], x.astype(dt, copy=False)
    tr = _run("forward_trace: the network output", _forward_trace, layers, params, x)
    finite_result(tr.out, "forward_trace: the network output f(x)")
    return tr


def push_tangents(layers, params, trace, dparams=None, inject=None):
    """Checked :func:`_push_tangents`; ``dparams`` ``None`` or per trainable layer ``None`` or
    ``(K, out, d)``; ``inject`` ``None`` or ``(k, t)`` with ``t`` ``(K, N, *out_shape of k)``."""
    layers = _check_layers(layers)
    params = _check_params(layers, params)
    trace = _check_trace(layers, trace)
    if dparams is not None:
        dparams = _check_batched_tangents(dparams, params, "dparams", allow_none=True)
    if inject is not None:
        if not isinstance(inject, (tuple, list)) or len(inject) != 2:
            raise ArgumentTypeError(f"inject must be None or a pair (k, t), got {describe(inject)}")
        k = inject[0]
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(layers):
            raise ArgumentTypeError(f"inject[0] must be a module index in [0, {len(layers)}), got {describe(k)}")
        t = finite_array(inject[1], "inject[1]")
        want = (trace.out.shape[0],) + _feature_shapes(layers, trace.in_shapes[0])[k + 1]
        if t.ndim < 1 or tuple(t.shape[1:]) != want or t.shape[0] == 0:
            raise ShapeError(f"inject[1] must have shape (K, *{want}) with K >= 1, got {tuple(t.shape)}")
        inject = (int(k), t)
    return _run("push_tangents: the tangents", _push_tangents, layers, params, trace, dparams, inject)


def pull_cotangents(layers, params, trace, dout, rop=None):
    """Checked :func:`_pull_cotangents`: ``dout`` ``(…, N, C)``; ``rop`` ``None`` or
    ``(tan_in, dparams, ddout)`` as returned/taken by :func:`push_tangents`."""
    layers = _check_layers(layers)
    params = _check_params(layers, params)
    trace = _check_trace(layers, trace)
    dout = _check_cotangent(dout, trace, "dout", ndims=(2, 3))
    if rop is not None:
        if not isinstance(rop, (tuple, list)) or len(rop) != 3:
            raise ArgumentTypeError(f"rop must be None or a triple (tan_in, dparams, ddout), got {describe(rop)}")
        tan_in, dparams, ddout = rop
        if not isinstance(tan_in, (list, tuple)) or len(tan_in) != len(layers):
            raise ShapeError(f"rop[0] (tan_in) must be a list of {len(layers)} module-input tangents, got {describe(tan_in)}")
        tan_in = [None if t is None else finite_array(t, f"rop[0][{k}]") for k, t in enumerate(tan_in)]
        for k, t in enumerate(tan_in):
            want = tuple(trace.inputs[k].shape)
            if t is not None and tuple(t.shape[1:]) != want:
                raise ShapeError(f"rop[0][{k}] must have shape (K, *{want}), got {tuple(t.shape)}")
        if dparams is not None:
            dparams = _check_batched_tangents(dparams, params, "rop[1]", allow_none=True)
        ddout = _check_cotangent(ddout, trace, "rop[2]", ndims=(3,))
        if dout.ndim == 3 and dout.shape[0] != ddout.shape[0]:
            raise ShapeError(f"rop[2] must have as many tangents as dout, got {ddout.shape[0]} and {dout.shape[0]}")
        rop = (tan_in, dparams, ddout)
    return _run("pull_cotangents: the pre-activation gradients", _pull_cotangents, layers, params, trace, dout, rop)


def _array_list(a, name, min_ndim):
    if not isinstance(a, (list, tuple)) or len(a) == 0:
        raise ArgumentTypeError(f"{name} must be a non-empty list of arrays, got {describe(a)}")
    return [finite_array(v, f"{name}[{j}]", min_ndim=min_ndim) for j, v in enumerate(a)]


def weight_grads(A, G):
    """Checked :func:`_weight_grads`: ``A`` a list of ``(N, d, T)``, ``G`` a list of
    ``(…, N, out, T)``."""
    A, G = _array_list(A, "A", 3), _array_list(G, "G", 3)
    if len(A) != len(G):
        raise ShapeError(f"A and G must have one array per layer each, got {len(A)} and {len(G)}")
    for j, (a, g) in enumerate(zip(A, G)):
        if a.ndim != 3 or g.shape[-3] != a.shape[0] or g.shape[-1] != a.shape[-1]:
            raise ShapeError(f"G[{j}] {tuple(g.shape)} does not match A[{j}] {tuple(a.shape)}: "
                             "expected A (N, d, T) and G (…, N, out, T)")
    return _run("weight_grads: the per-sample gradients", _weight_grads, A, G)


def flatten_layers(grads):
    """Checked :func:`_flatten_layers`: per-layer ``(…, out, d)`` with one leading shape."""
    grads = _array_list(grads, "grads", 2)
    if len({tuple(g.shape[:-2]) for g in grads}) != 1:
        raise ShapeError(f"grads must share their leading axes, got shapes {[tuple(g.shape) for g in grads]}")
    return _flatten_layers(grads)


def output_basis(out):
    """Checked :func:`_output_basis`: ``out`` a network output ``(N, C)``."""
    out = finite_array(out, "out", ndim=2)
    if 0 in out.shape:
        raise EmptyBatchError(f"out must have N >= 1 samples and C >= 1 outputs, got shape {tuple(out.shape)}")
    return _output_basis(out)


def _checked(layers, params, trace):
    layers = _check_layers(layers)
    params = _check_params(layers, params)
    return layers, params, _check_trace(layers, trace)


def jvp(layers, params, trace, V):
    """Checked :func:`_jvp`: ``V`` per trainable layer ``(K, out, d)``."""
    layers, params, trace = _checked(layers, params, trace)
    V = _check_batched_tangents(V, params, "V")
    return _run("jvp: J v", _jvp, layers, params, trace, V)


def vjp(layers, params, trace, w, per_sample=False):
    """Checked :func:`_vjp`: ``w`` ``(N, C)`` or ``(K, N, C)``; ``per_sample`` a bool."""
    per_sample = check_bool(per_sample, "per_sample")
    layers, params, trace = _checked(layers, params, trace)
    w = _check_cotangent(w, trace, "w")
    return _run("vjp: Jᵀ w", _vjp, layers, params, trace, w, per_sample=per_sample)


def jacobian(layers, params, trace):
    """Checked :func:`_jacobian`."""
    return _run("jacobian: J", _jacobian, *_checked(layers, params, trace))


def jacobian_gram(layers, params, trace):
    """Checked :func:`_jacobian_gram`."""
    return _run("jacobian_gram: J Jᵀ", _jacobian_gram, *_checked(layers, params, trace))


def _checked_output_hvp(output_hvp, name):
    def op(t):
        r = real_array(output_hvp(t), f"the result of {name}")
        if tuple(r.shape) != tuple(t.shape):
            raise ShapeError(f"{name} must map (K, N, C) tangents to the same shape {tuple(t.shape)}, "
                             f"got {tuple(r.shape)}")
        return r
    return op


def hvp_per_sample(layers, params, trace, dout, V, output_hvp=None):
    """Checked :func:`_hvp_per_sample`: ``dout`` ``(N, C)``, ``V`` per trainable layer
    ``(K, out, d)``, ``output_hvp`` ``None`` or a callable ``(K, N, C) -> (K, N, C)``."""
    layers, params, trace = _checked(layers, params, trace)
    dout = _check_cotangent(dout, trace, "dout", ndims=(2,))
    V = _check_batched_tangents(V, params, "V")
    check_callable(output_hvp, "output_hvp", allow_none=True)
    if output_hvp is not None:
        output_hvp = _checked_output_hvp(output_hvp, "output_hvp")
    return _run("hvp_per_sample: the Hessian-vector products", _hvp_per_sample,
                layers, params, trace, dout, V, output_hvp)


def preactivation_hessians(layers, params, trace, dout, output_hvp):
    """Checked :func:`_preactivation_hessians`: ``dout`` ``(N, C)``, ``output_hvp`` a callable
    ``(K, N, C) -> (K, N, C)``."""
    layers, params, trace = _checked(layers, params, trace)
    dout = _check_cotangent(dout, trace, "dout", ndims=(2,))
    output_hvp = _checked_output_hvp(check_callable(output_hvp, "output_hvp"), "output_hvp")
    return _run("preactivation_hessians: the pre-activation Hessians", _preactivation_hessians,
                layers, params, trace, dout, output_hvp)


# ------------------------------------------------- second order, summed over samples
# Appended by the perf engineer (issue 15): the Hessian's kernel. Kept separate from
# _hvp_per_sample so that the per-sample path (per_sample=True) is unchanged.
def _hvp_summed(layers, params, trace, dout, V, output_hvp=None, rows=None):
    """``Σ_i ∇²ψ_i v`` (the sum over samples of :func:`_hvp_per_sample`) with the sum taken
    inside the R-operator: ``Σ_i R{∇_{W_l} ψ_i} = Σ_i (R{G_l}_i A_{l,i}ᵀ + G_{l,i} R{A_l}_iᵀ)``
    is one GEMM over the folded ``(N·T)`` axis per layer (:func:`refcurv.linalg.gemm.factor_sum`), so memory is
    that of one pass with ``K`` tangents, not ``K·N·n``. ``V``: per trainable module
    ``(K, out, d)`` or ``None`` (zero tangent for that layer); ``rows``: the trainable-layer
    indices whose rows are wanted (default all; the others are ``None``). Returns a list of
    ``(K, out, d)`` (or ``None``)."""
    from ..linalg.gemm import factor_sum as _sum_outer

    tan_in, df = _push_tangents(layers, params, trace, V)
    ddout = output_hvp(df) if output_hvp is not None else 0 * df
    G, dG = _pull_cotangents(layers, params, trace, dout, rop=(tan_in, V, ddout))
    out = []
    for j, (k, g, dg) in enumerate(zip(_trainable_index(layers), G, dG)):
        if rows is not None and j not in rows:
            out.append(None)
            continue
        m, s, t = layers[k], trace.in_shapes[k], tan_in[k]
        r = _sum_outer(dg, trace.A[k])
        if t is not None:
            r = r + _sum_outer(g, m.patches(t, s, ones=False))
        out.append(r)
    return out
