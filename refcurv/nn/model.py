"""``Sequential``: batched forward, backward, forward-mode and second-order backprop.

Notation (thesis Ch.2 Algorithm 1, Ch.5 Algorithms 17-22; SENG (3)). For trainable
layer ``l`` with weight matrix ``W_l in R^{out x d}`` (bias = last column) and input
``a_{l-1}``:

    A_l = A(a_{l-1}) in R^{d x T}       patches with the ones row (T = 1 for Linear)
    h_l = W_l A_l in R^{out x T}        pre-activation
    G_l = ∂ψ/∂h_l in R^{out x T}        pre-activation gradient of the per-sample loss
    ∇_{W_l} ψ = G_l A_lᵀ                per-sample gradient (thesis (2.1), Theorem 3 i)

Every routine is vectorized over the batch and over batched tangents/cotangents:
primal arrays are ``(N, ...)``; tangents and cotangents carry one more leading axis
``(K, N, ...)``. The only Python loops run over layers (and over the ``kh*kw`` kernel
offsets inside im2col), never over samples or parameters.

Second-order quantities (Hessians, pre-activation Hessians) come from Pearlmutter's
R-operator applied to the backward pass (forward-over-reverse), i.e. exact
second-order backprop, not finite differences.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import rng_of, xp_of
from ..errors import (
    ArgumentTypeError,
    EmptyBatchError,
    NonFiniteError,
    ShapeError,
)
from .layers import Conv2d, Flatten, Linear, _Elementwise


def _check_finite(a, name):
    if not bool(xp_of(a).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")


@dataclass
class Trace:
    """What the forward pass keeps: each module's input and feature shape, and the
    patches ``A`` of each trainable module (keyed by module index)."""

    inputs: list
    in_shapes: list
    A: dict = field(default_factory=dict)
    out: object = None


class Sequential:
    """A chain of layers. ``init(seed)`` gives one ``(out, fan_in + 1)`` matrix per
    trainable layer (``(out, fan_in)`` with ``bias=False``)."""

    def __init__(self, layers, input_shape=None):
        if not isinstance(layers, (list, tuple)) or len(layers) == 0:
            raise ArgumentTypeError("layers must be a non-empty list of refcurv layers")
        for k, m in enumerate(layers):
            if not isinstance(m, (Linear, Conv2d, Flatten, _Elementwise)):
                raise ArgumentTypeError(f"layers[{k}] is not a refcurv layer: {m!r}")
        self.layers = list(layers)
        self.trainable_index = [k for k, m in enumerate(self.layers) if m.trainable]
        if not self.trainable_index:
            raise ArgumentTypeError("layers must contain at least one Linear or Conv2d")
        self._check_chain()
        self.input_shape = None
        if input_shape is not None:
            self.input_shape = tuple(int(s) for s in input_shape)
            self.feature_shapes(self.input_shape)

    def __repr__(self):
        return "Sequential([" + ", ".join(repr(m) for m in self.layers) + "])"

    # ------------------------------------------------------------------ shapes
    def _check_chain(self):
        """Check what can be checked without an input shape: widths/channels of
        consecutive trainable layers, and that Conv2d outputs are flattened before Linear."""
        width, channels = None, None  # known feature width (vector) / channel count (image)
        for k, m in enumerate(self.layers):
            if isinstance(m, Linear):
                if channels is not None:
                    raise ShapeError(f"layers[{k}] {m!r} follows an image-valued layer: insert Flatten()")
                if width is not None and width != m.in_features:
                    raise ShapeError(
                        f"layers[{k}] {m!r} expects {m.in_features} input features, previous layer gives {width}"
                    )
                width = m.out_features
            elif isinstance(m, Conv2d):
                if width is not None:
                    raise ShapeError(f"layers[{k}] {m!r} follows a vector-valued layer")
                if channels is not None and channels != m.c_in:
                    raise ShapeError(
                        f"layers[{k}] {m!r} expects {m.c_in} input channels, previous layer gives {channels}"
                    )
                channels = m.c_out
            elif isinstance(m, Flatten):
                width, channels = None, None

    def feature_shapes(self, input_shape):
        """Feature shapes entering each module, plus the output's: ``len(layers) + 1`` tuples."""
        shapes = [tuple(input_shape)]
        for k, m in enumerate(self.layers):
            try:
                shapes.append(tuple(m.out_shape(shapes[-1])))
            except ShapeError as e:
                raise ShapeError(f"layers[{k}]: {e}") from None
        return shapes

    @property
    def layers_trainable(self):
        return [self.layers[k] for k in self.trainable_index]

    @property
    def param_shapes(self):
        return [m.param_shape for m in self.layers_trainable]

    @property
    def n_params(self):
        return int(sum(o * d for o, d in self.param_shapes))

    # ------------------------------------------------------------ parameters
    def init(self, seed=0, dtype=np.float64):
        """Seeded init: every entry (weights and bias) ``~ U(−1/√fan_in, 1/√fan_in)``
        (PyTorch's default range for Linear/Conv2d), drawn on the host."""
        rng = rng_of(seed)
        out = []
        for m in self.layers_trainable:
            bound = 1.0 / np.sqrt(m.fan_in)
            out.append(rng.uniform(-bound, bound, size=m.param_shape).astype(dtype))
        return out

    def check_params(self, params):
        """Validate ``params`` (list of per-layer matrices): count, shapes, finiteness."""
        if not isinstance(params, (list, tuple)):
            raise ArgumentTypeError(f"params must be a list of arrays, got {type(params).__name__}")
        if len(params) != len(self.trainable_index):
            raise ShapeError(
                f"params has {len(params)} arrays, the network has {len(self.trainable_index)} trainable layers"
            )
        xp = xp_of(*params)
        out = []
        for j, (W, m) in enumerate(zip(params, self.layers_trainable)):
            W = xp.asarray(W)
            if W.dtype.kind not in "f":
                W = W.astype(np.float64)
            if W.shape != m.param_shape:
                raise ShapeError(f"params[{j}] has shape {W.shape}, {m!r} needs {m.param_shape}")
            _check_finite(W, f"params[{j}]")
            out.append(W)
        return out

    def check_input(self, x, xp=None):
        """Validate a batch ``x`` of shape ``(N, *input_shape)``: non-empty, finite, chaining."""
        xp = xp or xp_of(x)
        x = xp.asarray(x)
        if x.dtype.kind not in "f":
            x = x.astype(np.float64)
        first = self.layers[0]
        want = 2 if isinstance(first, Linear) else 4 if isinstance(first, Conv2d) else None
        if want is not None and x.ndim != want:
            raise ShapeError(f"x must have {want} dimensions (N, features...) for {first!r}, got shape {x.shape}")
        if x.ndim < 2:
            raise ShapeError(f"x must have a batch axis and feature axes, got shape {x.shape}")
        if x.shape[0] == 0:
            raise EmptyBatchError("x is an empty batch (N = 0)")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"x has feature shape {tuple(x.shape[1:])}, the network expects {self.input_shape}")
        self.feature_shapes(x.shape[1:])
        _check_finite(x, "x")
        return x

    def _prepare(self, params, x):
        params = self.check_params(params)
        x = self.check_input(x, xp=xp_of(x, params))
        dt = np.result_type(x.dtype, *(W.dtype for W in params))
        return [W.astype(dt, copy=False) for W in params], x.astype(dt, copy=False)

    # ------------------------------------------------------------ forward
    def _forward(self, params, x):
        shapes = self.feature_shapes(x.shape[1:])
        tr = Trace(inputs=[], in_shapes=shapes[:-1])
        z, j = x, 0
        for k, m in enumerate(self.layers):
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

    def forward(self, params, x):
        """Network output ``f(x)``, shape ``(N, C)`` (Algorithm 17)."""
        params, x = self._prepare(params, x)
        return self._forward(params, x).out

    # -------------------------------------------------- forward mode (JVP)
    def _push(self, params, tr, dparams=None, inject=None):
        """Forward-mode tangents (thesis Algorithm 19, (5.11)).

        ``dparams``: per-layer tangents ``(K, out, d)`` or ``None`` (zero). ``inject``:
        ``(k, t)`` replaces the tangent of module ``k``'s output by ``t``.
        Returns ``(tangent of each module's input, tangent of the output)``; ``None``
        stands for a zero tangent.
        """
        dz, j, tan_in = None, 0, []
        for k, m in enumerate(self.layers):
            tan_in.append(dz)
            s = tr.in_shapes[k]
            if m.trainable:
                dh = None
                if dz is not None:
                    # the ones row has zero tangent, hence ones=False
                    dh = params[j] @ m.patches(dz, s, ones=False)
                if dparams is not None and dparams[j] is not None:
                    t = dparams[j][:, None] @ tr.A[k]
                    dh = t if dh is None else dh + t
                dz = None if dh is None else m.to_output(dh, s)
                j += 1
            elif dz is not None:
                dz = m.f(dz, s) if isinstance(m, Flatten) else m.d1(tr.inputs[k]) * dz
            if inject is not None and inject[0] == k:
                dz = inject[1]
        return tan_in, dz

    # ------------------------------------------------ reverse mode (+ R-op)
    def _pull(self, params, tr, dout, rop=None):
        """Backprop the output cotangent ``dout`` (``(…, N, C)``) to every trainable
        layer's pre-activation: returns ``G`` (list of ``(…, N, out, T)``).

        With ``rop = (tan_in, dparams, ddout)`` it also returns ``dG``, the directional
        derivative of ``G`` along the tangents (R-operator of the backward pass), where
        ``ddout`` is the directional derivative of ``dout``.
        """
        n = len(self.trainable_index)
        G, dG = [None] * n, [None] * n
        dz = dout
        tan_in, dparams, ddz = rop if rop is not None else (None, None, None)
        j = n
        for k in reversed(range(len(self.layers))):
            m, s = self.layers[k], tr.in_shapes[k]
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
                a = tr.inputs[k]
                d1 = m.d1(a)
                if rop is not None:
                    new = ddz * d1
                    if tan_in[k] is not None:
                        new = new + dz * m.d2(a) * tan_in[k]
                    ddz = new
                dz = dz * d1
        return (G, dG) if rop is not None else G

    def _param_grads(self, tr, G):
        """Per-sample weight gradients ``G_l A_lᵀ``: list of ``(…, N, out, d)``."""
        return [g @ tr.A[k].swapaxes(-1, -2) for k, g in zip(self.trainable_index, G)]

    # ------------------------------------------------------------ public API
    def factors(self, params, x, y, loss):
        """``(A, G)``: per trainable layer the patches ``A_l`` ``(N, d, T)`` (ones row
        included) and pre-activation gradients ``G_l`` ``(N, out, T)`` of the
        per-sample (unscaled) losses, so that ``∇_{W_l} ψ_i = G_l[i] A_l[i]ᵀ``."""
        params, x = self._prepare(params, x)
        tr = self._forward(params, x)
        y = loss.check_targets(y, tr.out)
        G = self._pull(params, tr, loss.grad(tr.out, y))
        return [tr.A[k] for k in self.trainable_index], G

    def per_sample_grads(self, params, x, y, loss):
        """Per-sample gradients ``u_i = ∇ψ_i`` as a list of ``(N, out, d)`` arrays."""
        params, x = self._prepare(params, x)
        tr = self._forward(params, x)
        y = loss.check_targets(y, tr.out)
        return self._param_grads(tr, self._pull(params, tr, loss.grad(tr.out, y)))

    def loss(self, params, x, y, loss):
        """Mini-batch objective ``Ψ = (1/N) Σ ψ_i``."""
        params, x = self._prepare(params, x)
        f = self._forward(params, x).out
        return loss.value(f, loss.check_targets(y, f)).mean()

    def grad(self, params, x, y, loss):
        """Mini-batch gradient ``∇Ψ = (1/N) Σ u_i`` as a list of ``(out, d)`` arrays."""
        return [u.mean(axis=0) for u in self.per_sample_grads(params, x, y, loss)]

    def _check_tangents(self, v, params):
        if not isinstance(v, (list, tuple)) or len(v) != len(params):
            raise ShapeError(f"v must be a list of {len(params)} per-layer arrays")
        xp = xp_of(*params)
        out = []
        for j, (t, W) in enumerate(zip(v, params)):
            t = xp.asarray(t, dtype=W.dtype)
            if t.shape[-2:] != W.shape or t.ndim not in (2, 3):
                raise ShapeError(f"v[{j}] has shape {t.shape}, expected {W.shape} or (K, *{W.shape})")
            _check_finite(t, f"v[{j}]")
            out.append(t)
        batched = {t.ndim for t in out}
        if len(batched) != 1:
            raise ShapeError("v must be all unbatched (out, d) or all batched (K, out, d)")
        return out, batched.pop() == 3

    def jvp(self, params, x, v):
        """Forward-mode ``J v`` (Algorithm 19): ``v`` per-layer ``(out, d)`` → ``(N, C)``;
        batched ``(K, out, d)`` → ``(K, N, C)``."""
        params, x = self._prepare(params, x)
        v, batched = self._check_tangents(v, params)
        if not batched:
            v = [t[None] for t in v]
        _, df = self._push(params, self._forward(params, x), v)
        return df if batched else df[0]

    def vjp(self, params, x, w, per_sample=False):
        """Reverse-mode ``Jᵀ w = Σ_i J_iᵀ w_i`` (Algorithms 20-21): ``w`` ``(N, C)`` → list of
        ``(out, d)``; batched ``(K, N, C)`` → ``(K, out, d)``. ``per_sample=True`` keeps
        the sample axis: ``J_iᵀ w_i`` as ``(…, N, out, d)``."""
        params, x = self._prepare(params, x)
        tr = self._forward(params, x)
        xp = xp_of(x)
        w = xp.asarray(w, dtype=x.dtype)
        if w.shape[-2:] != tr.out.shape or w.ndim not in (2, 3):
            raise ShapeError(f"w has shape {w.shape}, expected {tr.out.shape} or (K, *{tr.out.shape})")
        _check_finite(w, "w")
        grads = self._param_grads(tr, self._pull(params, tr, w))
        return grads if per_sample else [g.sum(axis=-3) for g in grads]

    def _flat(self, grads):
        """Concatenate per-layer ``(…, out, d)`` into ``(…, n)`` (row-major per layer)."""
        xp = xp_of(*grads)
        return xp.concatenate([g.reshape(g.shape[:-2] + (-1,)) for g in grads], axis=-1)

    def jacobian(self, params, x):
        """Per-sample output Jacobians ``J_i = ∂f_i/∂θ``: ``(N, C, n)``, θ flattened
        row-major per layer. Computed by ``C`` batched backward passes."""
        params, x = self._prepare(params, x)
        tr = self._forward(params, x)
        J = self._flat(self._param_grads(tr, self._pull(params, tr, self._output_basis(tr))))  # (C, N, n)
        return xp_of(x).moveaxis(J, 0, 1)

    @staticmethod
    def _output_basis(tr):
        """The ``C`` unit output cotangents for every sample: ``(C, N, C)``."""
        xp = xp_of(tr.out)
        N, C = tr.out.shape
        return xp.broadcast_to(xp.eye(C, dtype=tr.out.dtype)[:, None, :], (C, N, C))

    def jacobian_gram(self, params, x):
        """``(J_i J_jᵀ)_{i,j}`` as ``(N, C, N, C)`` from the Kronecker structure, without
        forming ``J`` (thesis Algorithm 22, extended to conv layers):
        ``J_i J_jᵀ[c, c'] = Σ_l Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'}) (g^c_{i,t}ᵀ g^{c'}_{j,t'})``."""
        params, x = self._prepare(params, x)
        tr = self._forward(params, x)
        xp = xp_of(x)
        G = self._pull(params, tr, self._output_basis(tr))
        out = 0
        for k, g in zip(self.trainable_index, G):
            A = tr.A[k]
            KA = xp.einsum("idt,jds->ijts", A, A)
            out = out + xp.einsum("ijts,ciot,ejos->icje", KA, g, g, optimize=True)
        return out

    def hvp_per_sample(self, params, x, y, loss, v, output_hessian=True):
        """Per-sample Hessian-vector products ``∇²ψ_i v`` by the R-operator on the
        backward pass (Pearlmutter): ``v`` per-layer ``(K, out, d)`` → list of
        ``(K, N, out, d)``. ``output_hessian=False`` drops the loss-curvature term
        ``J_iᵀ H_i J_i v``, leaving the residual term of thesis (1.4)."""
        params, x = self._prepare(params, x)
        v, batched = self._check_tangents(v, params)
        if not batched:
            raise ShapeError("hvp_per_sample takes batched tangents (K, out, d)")
        tr = self._forward(params, x)
        y = loss.check_targets(y, tr.out)
        tan_in, df = self._push(params, tr, v)
        ddout = loss.hvp(tr.out, df) if output_hessian else 0 * df
        G, dG = self._pull(params, tr, loss.grad(tr.out, y), rop=(tan_in, v, ddout))
        out = []
        for k, g, dg in zip(self.trainable_index, G, dG):
            m, s, t = self.layers[k], tr.in_shapes[k], tan_in[k]
            r = dg @ tr.A[k].swapaxes(-1, -2)
            if t is not None:
                r = r + g @ m.patches(t, s, ones=False).swapaxes(-1, -2)
            out.append(r)
        return out

    def preactivation_hessians(self, params, x, y, loss):
        """Exact per-sample pre-activation Hessians ``∂²ψ_i/∂h_l²`` (thesis (2.2), ``G_l(i)``;
        Theorem 3 ii, ``G_{t,t'}``): list of ``(N, m_l, m_l)`` with ``m_l = out·T`` and
        ``h_l`` flattened row-major over ``(out, T)``."""
        params, x = self._prepare(params, x)
        tr = self._forward(params, x)
        y = loss.check_targets(y, tr.out)
        xp = xp_of(x)
        N = x.shape[0]
        grad_out = loss.grad(tr.out, y)
        out = []
        for j, k in enumerate(self.trainable_index):
            m, s = self.layers[k], tr.in_shapes[k]
            hshape = tuple(m.out_shape(s))
            size = int(np.prod(hshape))
            E = xp.eye(size, dtype=x.dtype).reshape((size, 1) + hshape)
            E = xp.broadcast_to(E, (size, N) + hshape)
            tan_in, df = self._push(params, tr, inject=(k, E))
            _, dG = self._pull(params, tr, grad_out, rop=(tan_in, None, loss.hvp(tr.out, df)))
            out.append(xp.moveaxis(dG[j].reshape(size, N, size), 0, 2))
        return out

