"""The autodiff core as pure functions, one per equation; :class:`~refcurv.nn.Sequential`
is a thin shell that validates its input and calls them.

Notation (thesis = Ren's thesis, seed ``003``: Ch.2 Algorithm 1 and (2.1)-(2.2), Ch.3
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

Primal arrays are ``(N, ...)``; tangents and cotangents carry one more leading axis
``(K, N, ...)``. The only Python loops run over modules (and over the ``kh*kw`` kernel
offsets inside im2col), never over samples or parameters.

Second-order quantities come from Pearlmutter's R-operator applied to the backward pass
(forward-over-reverse, :func:`pull_cotangents` with ``rop=``): exact second-order
backprop, not finite differences.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import xp_of
from ..errors import ShapeError
from .layers import Flatten

__all__ = [
    "Trace", "trainable_index", "feature_shapes", "forward_trace", "push_tangents",
    "pull_cotangents", "weight_grads", "flatten_layers", "output_basis", "jvp", "vjp",
    "jacobian", "jacobian_gram", "hvp_per_sample", "preactivation_hessians",
]


@dataclass
class Trace:
    """What the forward pass keeps: each module's input and feature shape, and the
    patches ``A`` of each trainable module (keyed by module index)."""

    inputs: list
    in_shapes: list
    A: dict = field(default_factory=dict)
    out: object = None

    @property
    def patches(self):
        """The patches ``A_l`` of the trainable modules, in order (a list)."""
        return list(self.A.values())


# ------------------------------------------------------------------ structure
def trainable_index(layers):
    """Indices (into ``layers``) of the trainable modules, in order."""
    return [k for k, m in enumerate(layers) if m.trainable]


def feature_shapes(layers, input_shape):
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
def forward_trace(layers, params, x):
    """Forward pass (thesis Algorithm 1 line 2, Algorithm 17), batched over samples:

        a_0 = x,   A_l = A(a_{l-1}),   h_l = W_l A_l,   a_l = φ_l(h_l).

    Returns the :class:`Trace` (module inputs ``a``, feature shapes, patches ``A_l``,
    output ``f = a_L`` of shape ``(N, C)``) that the other passes read."""
    shapes = feature_shapes(layers, x.shape[1:])
    tr = Trace(inputs=[], in_shapes=shapes[:-1])
    z, j = x, 0
    for k, m in enumerate(layers):
        tr.inputs.append(z)
        s = shapes[k]
        if m.trainable:
            A = m.patches(z, s)
            tr.A[k] = A
            z = m.to_output(params[j] @ A, s)
            j += 1
        elif isinstance(m, Flatten):
            z = m.f(z, s)
        else:
            z = m.f(z)
    tr.out = z
    return tr


# -------------------------------------------------------- forward mode (R-op)
def push_tangents(layers, params, trace, dparams=None, inject=None):
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
            if dz is not None:
                dh = params[j] @ m.patches(dz, s, ones=False)
            if dparams is not None and dparams[j] is not None:
                t = dparams[j][:, None] @ trace.A[k]
                dh = t if dh is None else dh + t
            dz = None if dh is None else m.to_output(dh, s)
            j += 1
        elif dz is not None:
            dz = m.f(dz, s) if isinstance(m, Flatten) else m.d1(trace.inputs[k]) * dz
        if inject is not None and inject[0] == k:
            dz = inject[1]
    return tan_in, dz


# ------------------------------------------------------ reverse mode (+ R-op)
def pull_cotangents(layers, params, trace, dout, rop=None):
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
    dz = dout
    tan_in, dparams, ddz = rop if rop is not None else (None, None, None)
    j = n
    for k in reversed(range(len(layers))):
        m, s = layers[k], trace.in_shapes[k]
        if m.trainable:
            j -= 1
            W = params[j]
            G[j] = g = m.from_output(dz, s)
            if rop is not None:
                dG[j] = dg = m.from_output(ddz, s)
            if k == 0:
                break
            dz = m.patches_adjoint(W.T @ g, s)
            if rop is not None:
                t = W.T @ dg
                if dparams is not None and dparams[j] is not None:
                    t = t + dparams[j].swapaxes(-1, -2)[:, None] @ g
                ddz = m.patches_adjoint(t, s)
        elif isinstance(m, Flatten):
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
def weight_grads(A, G):
    """Per-sample weight gradients ``∇_{W_l} ψ_i = G_l A_lᵀ`` (thesis (2.1), Theorem 3 i:
    ``Σ_t g_t a_tᵀ`` over the ``T`` locations): ``A`` a list of ``(N, d, T)``, ``G`` a list
    of ``(…, N, out, T)`` → list of ``(…, N, out, d)``."""
    return [g @ a.swapaxes(-1, -2) for a, g in zip(A, G)]


def flatten_layers(grads):
    """Concatenate per-layer ``(…, out, d)`` into ``(…, n)`` (row-major per layer, the
    order of :func:`refcurv.flatten`)."""
    xp = xp_of(*grads)
    return xp.concatenate([g.reshape(g.shape[:-2] + (-1,)) for g in grads], axis=-1)


# ------------------------------------------------------------ Jacobian products
def jvp(layers, params, trace, V):
    """``J_i v`` for every sample (thesis Algorithm 19): ``V`` per trainable module
    ``(K, out, d)`` → ``(K, N, C)``."""
    return push_tangents(layers, params, trace, V)[1]


def vjp(layers, params, trace, w, per_sample=False):
    """``Jᵀ w = Σ_i J_iᵀ w_i`` (thesis Algorithms 20-21): the backward pass from ``w``
    followed by ``G_l A_lᵀ``. ``w`` ``(…, N, C)`` → list of ``(…, out, d)``;
    ``per_sample=True`` keeps the sample axis, ``J_iᵀ w_i`` as ``(…, N, out, d)``."""
    grads = weight_grads(trace.patches, pull_cotangents(layers, params, trace, w))
    return grads if per_sample else [g.sum(axis=-3) for g in grads]


def output_basis(out):
    """The ``C`` unit output cotangents for every sample: ``(C, N, C)``, entry
    ``[c, i, :] = e_c``, for an output ``out`` of shape ``(N, C)``."""
    xp = xp_of(out)
    N, C = out.shape
    return xp.broadcast_to(xp.eye(C, dtype=out.dtype)[:, None, :], (C, N, C))


def jacobian(layers, params, trace):
    """Per-sample output Jacobians ``J_i = ∂f_i/∂θ``: ``(N, C, n)``, θ flattened row-major
    per layer; row ``c`` of ``J_i`` is ``J_iᵀ e_c`` (Algorithm 20), so ``C`` batched
    backward passes from :func:`output_basis`."""
    grads = vjp(layers, params, trace, output_basis(trace.out), per_sample=True)
    return xp_of(trace.out).moveaxis(flatten_layers(grads), 0, 1)  # (C, N, n) → (N, C, n)


def jacobian_gram(layers, params, trace):
    """``(J_i J_jᵀ)_{i,j}`` as ``(N, C, N, C)`` from the Kronecker structure, without
    forming ``J`` (thesis Algorithm 22, extended to conv layers):

        J_i J_jᵀ[c, c'] = Σ_l Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'}) (g^c_{i,t}ᵀ g^{c'}_{j,t'}),

    with ``g^c`` the pre-activation cotangents of the output basis vector ``e_c``."""
    xp = xp_of(trace.out)
    G = pull_cotangents(layers, params, trace, output_basis(trace.out))
    out = 0
    for A, g in zip(trace.patches, G):
        KA = xp.einsum("idt,jds->ijts", A, A)
        out = out + xp.einsum("ijts,ciot,ejos->icje", KA, g, g, optimize=True)
    return out


# ------------------------------------------------------------------ second order
def hvp_per_sample(layers, params, trace, dout, V, output_hvp=None):
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
    tan_in, df = push_tangents(layers, params, trace, V)
    ddout = output_hvp(df) if output_hvp is not None else 0 * df
    G, dG = pull_cotangents(layers, params, trace, dout, rop=(tan_in, V, ddout))
    out = []
    for k, g, dg in zip(trainable_index(layers), G, dG):
        m, s, t = layers[k], trace.in_shapes[k], tan_in[k]
        r = dg @ trace.A[k].swapaxes(-1, -2)
        if t is not None:
            r = r + g @ m.patches(t, s, ones=False).swapaxes(-1, -2)
        out.append(r)
    return out


def preactivation_hessians(layers, params, trace, dout, output_hvp):
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
    for j, k in enumerate(trainable_index(layers)):
        m, s = layers[k], trace.in_shapes[k]
        hshape = tuple(m.out_shape(s))
        size = int(np.prod(hshape))
        E = xp.eye(size, dtype=dtype).reshape((size, 1) + hshape)
        E = xp.broadcast_to(E, (size, N) + hshape)
        tan_in, df = push_tangents(layers, params, trace, inject=(k, E))
        _, dG = pull_cotangents(layers, params, trace, dout, rop=(tan_in, None, output_hvp(df)))
        out.append(xp.moveaxis(dG[j].reshape(size, N, size), 0, 2))
    return out
