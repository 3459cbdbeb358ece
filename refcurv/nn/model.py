"""``Sequential``: a thin shell over :mod:`refcurv.nn.autodiff`.

The class holds the layer list, validates parameters, inputs, tangents and cotangents
(shapes, dtypes, finiteness), casts them to one dtype and calls the pure functions of
:mod:`refcurv.nn.autodiff` (forward pass, backward pass, per-sample gradients ``G_l A_lᵀ``,
R-op / JVP, VJP, Jacobian, Gram blocks, per-sample Hessian-vector products,
pre-activation Hessians), where the equations and thesis references are written.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import rng_of, xp_of
from ..errors import (
    ArgumentTypeError,
    EmptyBatchError,
    NonFiniteError,
    ShapeError,
)
from . import autodiff as ad
from ._checks import check_bool, check_dtype, finite_result, quiet, real_array
from .autodiff import Trace  # noqa: F401  (re-exported: refcurv.nn.model.Trace)
from .layers import Conv2d, Flatten, Linear, SequenceMean, _Elementwise, _shape_arg
from .losses import _over_positions, check_loss


def _check_finite(a, name):
    if not bool(xp_of(a).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")


def _chain_io(m):
    """What trainable layer ``m`` takes and gives, for the chain check: (feature kind,
    input count, output count, the unit the count is in)."""
    if isinstance(m, Linear):
        return "vector", m.in_features, m.out_features, "input features"
    return "image", m.c_in, m.c_out, "input channels"


# The error when a trainable layer of this kind follows one of the other kind.
_WRONG_KIND = {
    "vector": "follows an image-valued layer: insert Flatten()",
    "image": "follows a vector-valued layer",
}


class Sequential:
    """A chain of layers. ``init(seed)`` gives one ``(out, fan_in + 1)`` matrix per
    trainable layer (``(out, fan_in)`` with ``bias=False``)."""

    def __init__(self, layers, input_shape=None):
        if not isinstance(layers, (list, tuple)) or len(layers) == 0:
            raise ArgumentTypeError("layers must be a non-empty list of refcurv layers")
        for k, m in enumerate(layers):
            if not isinstance(m, (Linear, Conv2d, Flatten, SequenceMean, _Elementwise)):
                raise ArgumentTypeError(f"layers[{k}] is not a refcurv layer: {m!r}")
        self.layers = list(layers)
        self.trainable_index = ad._trainable_index(self.layers)
        if not self.trainable_index:
            raise ArgumentTypeError("layers must contain at least one Linear or Conv2d")
        self._check_chain()
        self.input_shape = None
        if input_shape is not None:
            self.input_shape = _shape_arg(input_shape, "input_shape")
            self.feature_shapes(self.input_shape)

    def __repr__(self):
        return "Sequential([" + ", ".join(repr(m) for m in self.layers) + "])"

    # ------------------------------------------------------------------ shapes
    def _check_chain(self):
        """Check what can be checked without an input shape: widths/channels of
        consecutive trainable layers, and that Conv2d outputs are flattened before Linear."""
        prev = None  # (kind, count) the last trainable layer gives; None at the start and after Flatten
        for k, m in enumerate(self.layers):
            if isinstance(m, Flatten):
                prev = None
            elif m.trainable:
                kind, n_in, n_out, unit = _chain_io(m)
                if prev is not None and prev[0] != kind:
                    raise ShapeError(f"layers[{k}] {m!r} {_WRONG_KIND[kind]}")
                if prev is not None and prev[1] != n_in:
                    raise ShapeError(f"layers[{k}] {m!r} expects {n_in} {unit}, previous layer gives {prev[1]}")
                prev = (kind, n_out)

    def feature_shapes(self, input_shape):
        """Feature shapes entering each module, plus the output's: ``len(layers) + 1`` tuples."""
        return ad._feature_shapes(self.layers, _shape_arg(input_shape, "input_shape"))

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
        (PyTorch's default range for Linear/Conv2d), drawn on the host. ``seed``: ``None``, a
        non-negative int, a ``SeedSequence`` or a ``Generator``; ``dtype``: a floating dtype
        (an integer dtype would round every weight to zero and is refused)."""
        dtype = check_dtype(dtype, "dtype")
        rng = rng_of(seed)
        out = []
        for m in self.layers_trainable:
            bound = 1.0 / math.sqrt(m.fan_in)  # fan_in is a host int
            out.append(rng.uniform(-bound, bound, size=m.param_shape).astype(dtype))
        return out

    def check_params(self, params):
        """Validate ``params`` (list of per-layer matrices): count, shapes, finiteness. Integer
        arrays are converted to float64; bool, complex and non-numeric entries are refused."""
        if not isinstance(params, (list, tuple)):
            raise ArgumentTypeError(f"params must be a list of arrays, got {type(params).__name__}")
        if len(params) != len(self.trainable_index):
            raise ShapeError(
                f"params has {len(params)} arrays, the network has {len(self.trainable_index)} trainable layers"
            )
        xp = xp_of(*params)
        out = []
        for j, (W, m) in enumerate(zip(params, self.layers_trainable)):
            W = real_array(W, f"params[{j}]", xp=xp)
            if W.shape != m.param_shape:
                raise ShapeError(f"params[{j}] has shape {W.shape}, {m!r} needs {m.param_shape}")
            _check_finite(W, f"params[{j}]")
            out.append(W)
        return out

    def check_input(self, x, xp=None):
        """Validate a batch ``x`` of shape ``(N, *input_shape)``: non-empty, finite, chaining.
        Integer arrays are converted to float64; bool, complex and non-numeric ``x`` are refused."""
        if xp is not None and xp is not np and xp is not xp_of(x) and getattr(xp, "__name__", "") != "cupy":
            raise ArgumentTypeError(f"xp must be None, numpy or cupy, got {type(xp).__name__}")
        xp = xp or xp_of(x)
        x = real_array(x, "x", xp=xp)
        first = self.layers[0]
        want = (2, 3) if isinstance(first, Linear) else (4,) if isinstance(first, Conv2d) else None
        if want is not None and x.ndim not in want:
            dims = "2 dimensions (N, in) or 3 (N, T, in)" if len(want) == 2 else "4 dimensions (N, C, H, W)"
            raise ShapeError(f"x must have {dims} for {first!r}, got shape {x.shape}")
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

    # ------------------------------------------------------------ passes
    # Thin wrappers over the pure functions of refcurv.nn.autodiff, kept because
    # refcurv.curvature and some method modules call them on a prepared (params, trace).
    def _forward(self, params, x):
        return ad._forward_trace(self.layers, params, x)

    def _push(self, params, tr, dparams=None, inject=None):
        return ad._push_tangents(self.layers, params, tr, dparams, inject)

    def _pull(self, params, tr, dout, rop=None):
        return ad._pull_cotangents(self.layers, params, tr, dout, rop)

    def _param_grads(self, tr, G):
        return ad._weight_grads(tr.patches, G)

    def _param_grads_flat(self, tr, G):
        return ad._weight_grads_flat(tr.patches, G)

    @staticmethod
    def _flat(grads):
        return ad._flatten_layers(grads)

    @staticmethod
    def _output_basis(tr):
        return ad._output_basis(tr.out)

    # ------------------------------------------------------------ public API
    def _traced(self, params, x, what):
        """Validated ``(params, x)`` and their forward trace, the output checked finite."""
        params, x = self._prepare(params, x)
        with quiet():
            tr = ad._forward_trace(self.layers, params, x)
        finite_result(tr.out, f"Sequential.{what}: the network output f(x)")
        return params, x, tr

    def forward(self, params, x):
        """Network output ``f(x)``, shape ``(N, C)``, or ``(N, T, C)`` for a sequence output
        (Algorithm 17; :func:`autodiff.forward_trace`). A non-finite output from finite input
        (overflow) raises :class:`NonFiniteError`."""
        tr = self._traced(params, x, "forward")[2]
        return ad._shaped_output(tr.out, tr.out_shape)

    @staticmethod
    def _loss_for(loss, tr):
        """The loss on the trace's (flattened) output: ``loss`` itself, or for a sequence
        output ``(T, C)`` the sum over positions (:func:`refcurv.nn.losses._over_positions`)."""
        return _over_positions(loss, tr.out_shape)

    def _trace_and_targets(self, params, x, y, loss, what="factors"):
        params, x, tr, y, _ = self._trace_targets_loss(params, x, y, loss, what)
        return params, x, tr, y

    def _trace_targets_loss(self, params, x, y, loss, what="factors"):
        loss = check_loss(loss)
        params, x, tr = self._traced(params, x, what)
        loss = self._loss_for(loss, tr)
        return params, x, tr, loss.check_targets(y, tr.out), loss

    @staticmethod
    def _result(out, what):
        return finite_result(out, f"Sequential.{what}")

    def factors(self, params, x, y, loss):
        """``(A, G)``: per trainable layer the patches ``A_l`` ``(N, d, T)`` (ones row
        included) and pre-activation gradients ``G_l`` ``(N, out, T)`` of the
        per-sample (unscaled) losses, so that ``∇_{W_l} ψ_i = G_l[i] A_l[i]ᵀ``
        (:func:`autodiff.forward_trace`, :func:`autodiff.pull_cotangents`)."""
        params, x, tr, y, loss = self._trace_targets_loss(params, x, y, loss)
        with quiet():
            G = ad._pull_cotangents(self.layers, params, tr, loss.grad(tr.out, y))
        return tr.patches, self._result(G, "factors: the pre-activation gradients G")

    def per_sample_grads(self, params, x, y, loss):
        """Per-sample gradients ``u_i = ∇ψ_i`` as a list of ``(N, out, d)`` arrays
        (:func:`autodiff.weight_grads` of :meth:`factors`)."""
        A, G = self.factors(params, x, y, loss)
        with quiet():
            U = ad._weight_grads(A, G)
        if ad._certainly_finite(A, G):  # a bound on the factors instead of an O(N·n) scan
            return U
        return self._result(U, "per_sample_grads: the per-sample gradients")

    def loss(self, params, x, y, loss):
        """Mini-batch objective ``Ψ = (1/N) Σ ψ_i`` (for a sequence output ``ψ_i`` sums the
        per-position losses, :func:`refcurv.nn.losses._over_positions`)."""
        loss = check_loss(loss)
        tr = self._traced(params, x, "loss")[2]
        loss, f = self._loss_for(loss, tr), tr.out
        value = loss.value(f, loss.check_targets(y, f))
        with quiet():
            return self._result(value.mean(), "loss: the mini-batch loss")

    def grad(self, params, x, y, loss):
        """Mini-batch gradient ``∇Ψ = (1/N) Σ u_i`` as a list of ``(out, d)`` arrays, from the
        factors as one GEMM per layer (:func:`autodiff._mean_weight_grads`; the same kernel as
        :func:`refcurv.curvature.grad`), never through per-sample gradients."""
        A, G = self.factors(params, x, y, loss)
        with quiet():
            return self._result(ad._mean_weight_grads(A, G), "grad: the gradient")

    def _check_tangents(self, v, params):
        if not isinstance(v, (list, tuple)) or len(v) != len(params):
            raise ShapeError(f"v must be a list of {len(params)} per-layer arrays, got {type(v).__name__}"
                             + (f" of length {len(v)}" if isinstance(v, (list, tuple)) else ""))
        xp = xp_of(*params)
        out = []
        for j, (t, W) in enumerate(zip(v, params)):
            t = real_array(t, f"v[{j}]", xp=xp).astype(W.dtype, copy=False)
            if t.shape[-2:] != W.shape or t.ndim not in (2, 3):
                raise ShapeError(f"v[{j}] has shape {t.shape}, expected {W.shape} or (K, *{W.shape})")
            _check_finite(t, f"v[{j}]")
            out.append(t)
        batched = {t.ndim for t in out}
        if len(batched) != 1:
            raise ShapeError("v must be all unbatched (out, d) or all batched (K, out, d)")
        return out, batched.pop() == 3

    def jvp(self, params, x, v):
        """Forward-mode ``J v`` (Algorithm 19; :func:`autodiff.jvp`): ``v`` per-layer
        ``(out, d)`` → ``(N, C)``; batched ``(K, out, d)`` → ``(K, N, C)`` (``C`` → ``T, C``
        for a sequence output)."""
        params, x, tr = self._traced(params, x, "jvp")
        v, batched = self._check_tangents(v, params)
        if not batched:
            v = [t[None] for t in v]
        with quiet():
            df = ad._shaped_output(ad._jvp(self.layers, params, tr, v), tr.out_shape)
        return self._result(df if batched else df[0], "jvp: J v")

    def vjp(self, params, x, w, per_sample=False):
        """Reverse-mode ``Jᵀ w = Σ_i J_iᵀ w_i`` (Algorithms 20-21; :func:`autodiff.vjp`):
        ``w`` ``(N, C)`` → list of ``(out, d)``; batched ``(K, N, C)`` → ``(K, out, d)``.
        ``per_sample=True`` keeps the sample axis: ``J_iᵀ w_i`` as ``(…, N, out, d)``. For a
        sequence output ``w`` is ``(…, N, T, C)``."""
        per_sample = check_bool(per_sample, "per_sample")
        params, x, tr = self._traced(params, x, "vjp")
        w = real_array(w, "w", xp=xp_of(x)).astype(x.dtype, copy=False)
        shaped = (tr.out.shape[0],) + tuple(tr.out_shape)
        if tuple(w.shape[w.ndim - len(shaped):]) != shaped or w.ndim not in (len(shaped), len(shaped) + 1):
            raise ShapeError(f"w has shape {w.shape}, expected {shaped} or (K, *{shaped})")
        _check_finite(w, "w")
        w = ad._flat_output(w, tr.out_shape)
        with quiet():
            return self._result(ad._vjp(self.layers, params, tr, w, per_sample=per_sample), "vjp: Jᵀ w")

    def jacobian(self, params, x):
        """Per-sample output Jacobians ``J_i = ∂f_i/∂θ``: ``(N, C, n)`` (``(N, T·C, n)`` for a
        sequence output, rows row-major over ``(T, C)``), θ flattened row-major per layer. Computed by ``C`` batched backward passes
        (:func:`autodiff.jacobian`)."""
        params, x, tr = self._traced(params, x, "jacobian")
        with quiet():
            return self._result(ad._jacobian(self.layers, params, tr), "jacobian: J")

    def jacobian_gram(self, params, x):
        """``(J_i J_jᵀ)_{i,j}`` as ``(N, C, N, C)`` from the Kronecker structure, without
        forming ``J`` (thesis Algorithm 22, extended to conv layers;
        :func:`autodiff.jacobian_gram`):
        ``J_i J_jᵀ[c, c'] = Σ_l Σ_{t,t'} (a_{i,t}ᵀ a_{j,t'}) (g^c_{i,t}ᵀ g^{c'}_{j,t'})``."""
        params, x, tr = self._traced(params, x, "jacobian_gram")
        with quiet():
            return self._result(ad._jacobian_gram(self.layers, params, tr), "jacobian_gram: J Jᵀ")

    def hvp_per_sample(self, params, x, y, loss, v, output_hessian=True):
        """Per-sample Hessian-vector products ``∇²ψ_i v`` by the R-operator on the
        backward pass (Pearlmutter; :func:`autodiff.hvp_per_sample`): ``v`` per-layer
        ``(K, out, d)`` → list of ``(K, N, out, d)``. ``output_hessian=False`` drops the
        loss-curvature term ``J_iᵀ H_i J_i v``, leaving the residual term of thesis (1.4)."""
        output_hessian = check_bool(output_hessian, "output_hessian")
        params, x, tr, y, loss = self._trace_targets_loss(params, x, y, loss, "hvp_per_sample")
        v, batched = self._check_tangents(v, params)
        if not batched:
            raise ShapeError("hvp_per_sample takes batched tangents (K, out, d)")
        output_hvp = (lambda t: loss.hvp(tr.out, t)) if output_hessian else None
        dout = loss.grad(tr.out, y)
        with quiet():
            H = ad._hvp_per_sample(self.layers, params, tr, dout, v, output_hvp)
        return self._result(H, "hvp_per_sample: the Hessian-vector products")

    def preactivation_hessians(self, params, x, y, loss):
        """Exact per-sample pre-activation Hessians ``∂²ψ_i/∂h_l²`` (thesis (2.2), ``G_l(i)``;
        Theorem 3 ii, ``G_{t,t'}``; :func:`autodiff.preactivation_hessians`): list of
        ``(N, m_l, m_l)`` with ``m_l = out·T`` and ``h_l`` flattened row-major over ``(out, T)``."""
        params, x, tr, y, loss = self._trace_targets_loss(params, x, y, loss, "preactivation_hessians")
        dout = loss.grad(tr.out, y)
        with quiet():
            H = ad._preactivation_hessians(self.layers, params, tr, dout, lambda t: loss.hvp(tr.out, t))
        return self._result(H, "preactivation_hessians: the pre-activation Hessians")
