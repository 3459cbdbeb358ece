"""The PyTorch bridge: refcurv networks, parameters, gradients and losses from and to PyTorch.

Optional extra ``torch`` (``pip install "refcurv[torch]"``); PyTorch is imported inside the
functions, so ``import refcurv.torch`` works without it and only a call needs it.

* :func:`from_torch` builds a refcurv :class:`~refcurv.nn.Sequential` and its float64 weight
  matrices from a ``torch.nn.Sequential``; :func:`torch_module` is its inverse.
* :func:`to_torch` / :func:`from_torch_tensors` convert refcurv's per-layer matrices
  (parameters, gradients, directions, per-sample gradients with a leading axis) to and from
  PyTorch's per-parameter tensors (``module.parameters()`` order).
* :func:`permutation` is the index array between refcurv's flat θ and PyTorch's
  (``torch.nn.utils.parameters_to_vector``) order; a matrix converts with it, or with
  ``refcurv.to_order(M, net, "torch", matrix=True)`` / ``refcurv.from_order``.
* :func:`kronecker_to_torch` gives refcurv's Kronecker factors per PyTorch parameter tensor.
* :func:`loss_from_torch` maps a PyTorch loss module to a refcurv loss and the factor between
  the two (:class:`LossMap`).

Layout (README "Conventions"). A refcurv layer holds one matrix ``W ∈ R^{out × (fan_in+1)}``:
PyTorch's ``weight.reshape(out, -1)`` (Linear ``(out, in)``; Conv2d ``(out, c_in, kh, kw)``,
flattened row-major, which is refcurv's im2col row order ``(c_in, kh, kw)``) with the bias as
its LAST column (``bias=False``: no column). refcurv's θ stacks each ``W`` row-major, so a
row ``[w_o1, …, w_od, b_o]`` interleaves weight and bias; PyTorch's θ is ``[weight_1.ravel(),
bias_1, weight_2.ravel(), …]``. Hence ``θ_torch = θ_refcurv[p]`` with ``p = permutation(net)``
and ``M_torch = M[np.ix_(p, p)]`` for any curvature matrix ``M`` in refcurv order.

Kronecker factors. refcurv's KFAC block of a layer is ``G ⊗ A`` on its row-major ``vec(W)``,
with the joint ``A`` of the homogeneous input ``[a; 1]`` (ones row LAST, thesis (3.1)).
Splitting ``A = [[A_ww, a_wb], [a_wbᵀ, a_bb]]`` (``A_ww`` the first ``fan_in`` rows and
columns, ``a_bb = A[-1, -1]``, 1 in refcurv's factors: the mean of the ones row), the same block in
PyTorch's ``[weight.ravel(), bias]`` order is ``[[G ⊗ A_ww, G ⊗ a_wb], [G ⊗ a_wbᵀ, a_bb G]]``:
the weight's block is ``G ⊗ A_ww`` (``(G ⊗ A_ww) weight.ravel() = (G weight A_wwᵀ).ravel()``)
and the bias's is ``a_bb G``. A library that treats weight and bias as separate blocks
(curvlinops' ``separate_weight_and_bias=True``) keeps the two diagonal blocks and drops the
cross terms (:func:`kronecker_to_torch` gives those two blocks as factor pairs);
``permutation`` converts the dense joint form (``(G ⊗ A)[np.ix_(q, q)]`` with ``q`` the
layer's part of ``p``).
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from .backend import to_numpy
from .errors import (
    ArgumentTypeError,
    HyperParameterError,
    NonFiniteError,
    RefcurvError,
    ShapeError,
    UnsupportedLayerError,
)
from .nn import (
    BCE,
    MSE,
    Conv2d,
    CrossEntropy,
    Flatten,
    Linear,
    ReLU,
    Sequential,
    Sigmoid,
    Softplus,
    Tanh,
)
from .nn import (
    SequenceMean as _SequenceMean,  # not a public name here: rt.SequenceMean is the torch module
)
from .nn._checks import check_dtype, describe, real_array
from .nn.layers import _positive_int
from .vec import permutation as _vec_permutation
from .vec import unflatten

__all__ = [
    "SUPPORTED",
    "LossMap",
    "from_torch",
    "from_torch_tensors",
    "kronecker_to_torch",
    "loss_from_torch",
    "permutation",
    "to_torch",
    "torch_module",
]

#: The PyTorch modules :func:`from_torch` converts (nested ``Sequential`` is flattened,
#: ``Identity`` dropped).
SUPPORTED = ("Linear", "Conv2d", "ReLU", "Tanh", "Sigmoid", "Softplus", "Flatten")
_SUPPORTED_LINE = ("supported: " + ", ".join(SUPPORTED)
                   + " (and nested Sequential, Identity, refcurv.torch.SequenceMean)")


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("refcurv.torch needs PyTorch: pip install 'refcurv[torch]'") from None
    return torch


_CLASSES = {}


def _torch_sequence_mean(torch):
    """The PyTorch module of :class:`refcurv.nn.SequenceMean` (``(N, T, d) -> (N, d)``, the mean
    over positions), defined on first use so that this module imports without PyTorch."""
    cls = _CLASSES.get("SequenceMean")
    if cls is None:
        class SequenceMean(torch.nn.Module):
            """Mean over the positions of a sequence, ``(N, T, d) -> (N, d)``: PyTorch has no
            module for it; this one is :class:`refcurv.nn.SequenceMean` (the reduce setting of
            Eschenhagen et al. 2023, e.g. a transformer's mean pooling)."""

            def forward(self, x):
                return x.mean(dim=-2)

        SequenceMean.__module__ = __name__
        _CLASSES["SequenceMean"] = cls = SequenceMean
    return cls


def __getattr__(name):
    # refcurv.torch.SequenceMean: a torch.nn.Module class, so it needs PyTorch when asked for
    if name == "SequenceMean":
        return _torch_sequence_mean(_import_torch())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_net(net):
    if not isinstance(net, Sequential):
        raise ArgumentTypeError(f"net must be a refcurv.nn.Sequential, got {describe(net)}")
    return net


# --------------------------------------------------------------------------- modules
def _leaves(torch, module, prefix=""):
    """``(path, module)`` of every leaf of a (nested) ``Sequential`` in call order; ``path`` is
    the name ``named_modules()`` gives it (``"2"``, ``"1.0"``)."""
    out = []
    for name, child in module.named_children():
        path = prefix + name
        if type(child) is torch.nn.Sequential:
            out.extend(_leaves(torch, child, path + "."))
        elif type(child) is not torch.nn.Identity:  # no parameters, no effect
            out.append((path, child))
    return out


def _where(path, m):
    return f"module layer '{path}' ({type(m).__name__})"


def _refuse(path, m, what):
    raise UnsupportedLayerError(f"{_where(path, m)}: {what}")


def _square(value, path, m, name):
    """An int from PyTorch's ``(a, a)`` pair; an anisotropic pair is refused (refcurv's Conv2d
    has one stride and one padding for both spatial axes)."""
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        _refuse(path, m, f"{name}={tuple(value)} differs between the two axes; refcurv's Conv2d takes one {name}")
    return int(a)


def _layer(torch, path, m):
    """The refcurv layer equivalent to the PyTorch leaf ``m`` (exact type: a subclass may
    override ``forward``)."""
    nn = torch.nn
    t = type(m)
    if t is nn.Linear:
        return Linear(m.in_features, m.out_features, bias=m.bias is not None)
    if t is nn.Conv2d:
        if isinstance(m.padding, str):
            _refuse(path, m, f"string padding {m.padding!r} is not supported; give the padding as an int")
        if tuple(m.dilation) != (1, 1):
            _refuse(path, m, f"dilation={tuple(m.dilation)} is not supported (refcurv's Conv2d has dilation 1)")
        if m.groups != 1:
            _refuse(path, m, f"groups={m.groups} is not supported (refcurv's Conv2d has groups 1)")
        padding = _square(m.padding, path, m, "padding")
        if m.padding_mode != "zeros" and padding:
            # with padding 0 the mode pads nothing and changes nothing
            _refuse(path, m, f"padding_mode={m.padding_mode!r} is not supported (refcurv pads with zeros)")
        return Conv2d(m.in_channels, m.out_channels, tuple(m.kernel_size),
                      stride=_square(m.stride, path, m, "stride"), padding=padding, bias=m.bias is not None)
    if t is nn.ReLU:
        return ReLU()
    if t is nn.Tanh:
        return Tanh()
    if t is nn.Sigmoid:
        return Sigmoid()
    if t is nn.Softplus:
        if m.beta != 1:
            _refuse(path, m, f"beta={m.beta} is not supported (refcurv's Softplus is log(1 + e^h), beta 1)")
        # m.threshold: refcurv computes the exact log(1 + e^h) everywhere (see from_torch).
        return Softplus()
    if t is _CLASSES.get("SequenceMean"):
        return _SequenceMean()
    if t is nn.Flatten:
        if m.start_dim != 1 or m.end_dim != -1:
            _refuse(path, m, f"start_dim={m.start_dim}, end_dim={m.end_dim}: only Flatten(start_dim=1, end_dim=-1) "
                             "(all feature axes) is supported")
        return Flatten()
    sub = [s for s in SUPPORTED if isinstance(m, getattr(nn, s))]
    kind = f"a subclass of {sub[0]} (its forward may differ)" if sub else "not supported"
    raise UnsupportedLayerError(f"{_where(path, m)} is {kind}; {_SUPPORTED_LINE}")


def _tensor_to_numpy(torch, t, name, dtype):
    """A detached host copy of the tensor ``t`` as a NumPy array of ``dtype`` (``None``: the
    tensor's own floating dtype; half precisions widen to float32)."""
    if t is None:
        raise ArgumentTypeError(f"{name} is None (a parameter without a gradient?)")
    if not isinstance(t, torch.Tensor):
        return real_array(t, name) if dtype is None else real_array(t, name).astype(dtype)
    if t.is_complex() or t.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    t = t.detach().to("cpu")
    if dtype is None:
        wide = t.dtype if t.dtype in (torch.float64, torch.float32) else torch.float32 if t.is_floating_point() else torch.float64
        return t.to(wide).numpy().copy()
    # through float64: NumPy has no bfloat16, and float64 holds every narrower float exactly
    return t.to(torch.float64).numpy().astype(dtype)


def from_torch(module, input_shape, dtype=np.float64):
    """A refcurv network and its parameters from a PyTorch model: ``(net, params)``.

    ``module``: a ``torch.nn.Sequential`` of ``Linear``, ``Conv2d``, ``ReLU``, ``Tanh``,
    ``Sigmoid``, ``Softplus``, ``Flatten`` (nested ``Sequential`` flattened, ``Identity``
    dropped) and ``refcurv.torch.SequenceMean``. ``input_shape``: the per-sample input shape,
    e.g. ``(3, 8, 8)``, ``(d,)`` or a sequence ``(T, d)`` (``Linear`` then shares its weight
    over the T positions, as ``torch.nn.Linear`` on ``(N, T, d)``; the network's output is
    ``(N, T, C)`` unless a ``Flatten`` or ``SequenceMean`` removes the positions).
    ``params[l]`` is layer ``l``'s ``[weight.reshape(out, -1), bias]`` (bias last column, none
    with ``bias=False``), copied to ``dtype`` (float64 by default; no memory is shared).

    Refused, one line naming the layer and its position (:class:`~refcurv.UnsupportedLayerError`):
    any other module, subclasses of the supported ones (their ``forward`` may differ), Conv2d
    with dilation ≠ 1, groups ≠ 1, string padding, a stride or padding that differs between
    the two axes, a non-zeros ``padding_mode`` with non-zero padding; ``Softplus`` with
    ``beta ≠ 1``; ``Flatten`` other than ``start_dim=1, end_dim=-1``.

    ``Softplus(threshold=t)``: PyTorch returns ``h`` itself for ``h > t``; refcurv computes
    the exact ``log(1 + e^h)`` everywhere. They differ by ``log1p(e^{−h}) < e^{−t}`` in value
    and ``σ(−h) < e^{−t}`` in slope, only where a pre-activation exceeds ``t`` (2.1e-9 at the
    default ``t = 20``); below it they agree to rounding.
    """
    torch = _import_torch()
    if not isinstance(module, torch.nn.Module):
        raise ArgumentTypeError(f"module must be a torch.nn.Sequential, got {describe(module)}")
    if type(module) is not torch.nn.Sequential:
        raise UnsupportedLayerError(f"module must be a torch.nn.Sequential, got {type(module).__name__}; "
                                    f"wrap the layers in torch.nn.Sequential ({_SUPPORTED_LINE})")
    dtype = check_dtype(dtype, "dtype")
    leaves = _leaves(torch, module)
    if not leaves:
        raise ShapeError("module has no layers")
    layers = [_layer(torch, path, m) for path, m in leaves]
    try:
        net = Sequential(layers, input_shape=input_shape)
    except RefcurvError as e:
        msg = str(e)
        k = re.search(r"layers\[(\d+)\]", msg)
        where = f" (layers[{k.group(1)}] is {_where(*leaves[int(k.group(1))])})" if k else ""
        raise type(e)(f"module with input_shape {input_shape!r}: {msg}{where}") from None
    params = []
    for (path, m), layer in zip(leaves, layers):
        if not isinstance(layer, (Linear, Conv2d)):
            continue
        w = _tensor_to_numpy(torch, m.weight, f"{_where(path, m)} weight", dtype)
        b = None if m.bias is None else _tensor_to_numpy(torch, m.bias, f"{_where(path, m)} bias", dtype)
        for name, v in (("weight", w), ("bias", b)):
            if v is not None and not np.isfinite(v).all():
                raise NonFiniteError(f"{_where(path, m)} {name} contains NaN or Inf")
        params.append(layer.join(w, b))
    return net, params


def _torch_dtype(torch, dtype):
    if not isinstance(dtype, torch.dtype):
        # not describe(): a NumPy scalar type (np.float64) has class-level dtype/shape attributes
        raise ArgumentTypeError(f"dtype must be a torch floating dtype such as torch.float64, got {dtype!r}")
    if not dtype.is_floating_point:
        raise HyperParameterError(f"dtype must be a torch floating dtype such as torch.float64, got {dtype}")
    return dtype


def torch_module(net, params, dtype=None):
    """The ``torch.nn.Sequential`` with the layers of ``net`` and the weights ``params`` (the
    inverse of :func:`from_torch`), on the CPU in ``dtype`` (default ``torch.float64``).

    Layers are built with ``torch.nn.utils.skip_init`` (PyTorch's random initialization is
    not run, so torch's global random state is untouched). ``Softplus`` becomes
    ``torch.nn.Softplus()`` (threshold 20: see :func:`from_torch`)."""
    torch = _import_torch()
    dtype = _torch_dtype(torch, torch.float64 if dtype is None else dtype)
    net_params = _check_net(net).check_params(params)
    nn = torch.nn
    mods, it = [], iter(net_params)
    for m in net.layers:
        if isinstance(m, (Linear, Conv2d)):
            w, b = m.split(to_numpy(next(it)))
            if isinstance(m, Linear):
                t = nn.utils.skip_init(nn.Linear, m.in_features, m.out_features, bias=m.bias, dtype=dtype)
            else:
                t = nn.utils.skip_init(nn.Conv2d, m.c_in, m.c_out, m.kernel_size, stride=m.stride,
                                       padding=m.padding, bias=m.bias, dtype=dtype)
            with torch.no_grad():
                t.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)))
                if b is not None:
                    t.bias.copy_(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)))
            mods.append(t)
        elif isinstance(m, Flatten):
            mods.append(nn.Flatten())
        elif isinstance(m, _SequenceMean):
            mods.append(_torch_sequence_mean(torch)())
        else:
            mods.append({ReLU: nn.ReLU, Tanh: nn.Tanh, Sigmoid: nn.Sigmoid, Softplus: nn.Softplus}[type(m)]())
    return nn.Sequential(*mods)


# --------------------------------------------------------------------------- tensors
def _torch_shapes(net):
    """``[(layer, "weight"|"bias", torch shape)]`` in ``module.parameters()`` order."""
    out = []
    for layer in net.layers_trainable:
        ws = ((layer.out_features, layer.in_features) if isinstance(layer, Linear)
              else (layer.c_out, layer.c_in) + tuple(layer.kernel_size))
        out.append((layer, "weight", ws))
        if layer.bias:
            out.append((layer, "bias", (layer.out_features,)))
    return out


def to_torch(net, mats):
    """PyTorch tensors in ``module.parameters()`` order (weight, then bias, per layer) from
    refcurv per-layer matrices ``mats`` (parameters, gradients, directions): a list of
    ``(…, out, d)`` arrays, leading axes (e.g. the sample axis of per-sample gradients) kept
    and the same for every layer; or a flat θ ``(…, n)`` in refcurv order. The tensors keep
    the arrays' dtype and share no memory with them."""
    torch = _import_torch()
    _check_net(net)
    if not isinstance(mats, (list, tuple)):
        arr = real_array(mats, "mats", int_dtype=None)
        if arr.ndim == 0 or arr.shape[-1] != net.n_params:
            raise ShapeError(f"mats must be a list of {len(net.param_shapes)} per-layer arrays or a flat theta "
                             f"(…, {net.n_params}), got {describe(mats)}")
        mats = unflatten(arr, net)
    if len(mats) != len(net.param_shapes):
        raise ShapeError(f"mats has {len(mats)} arrays, the network has {len(net.param_shapes)} trainable layers")
    out, lead = [], None
    for j, (W, layer) in enumerate(zip(mats, net.layers_trainable)):
        W = to_numpy(real_array(W, f"mats[{j}]", int_dtype=None))
        if W.ndim < 2 or tuple(W.shape[-2:]) != layer.param_shape:
            raise ShapeError(f"mats[{j}] has shape {tuple(W.shape)}, {layer!r} needs (…, *{layer.param_shape})")
        if lead is None:
            lead = W.shape[:-2]
        elif W.shape[:-2] != lead:
            raise ShapeError(f"mats[{j}] has leading axes {W.shape[:-2]}, mats[0] has {lead}")
        if not np.isfinite(W).all():
            raise NonFiniteError(f"mats[{j}] contains NaN or Inf")
        fan_in = layer.fan_in
        wshape = ((layer.out_features, layer.in_features) if isinstance(layer, Linear)
                  else (layer.c_out, layer.c_in) + tuple(layer.kernel_size))
        out.append(torch.from_numpy(np.ascontiguousarray(W[..., :, :fan_in]).reshape(lead + wshape).copy()))
        if layer.bias:
            out.append(torch.from_numpy(np.ascontiguousarray(W[..., :, fan_in])))
    return out


def _entries(tensors):
    """``[(name or None, value)]`` from a list, a dict, or ``(name, tensor)`` pairs."""
    if isinstance(tensors, dict):
        return [(str(k), v) for k, v in tensors.items()]
    if isinstance(tensors, (str, bytes)) or hasattr(tensors, "shape") or not hasattr(tensors, "__iter__"):
        raise ArgumentTypeError(f"tensors must be a list of tensors, (name, tensor) pairs or a dict, "
                                f"got {describe(tensors)}")
    if hasattr(tensors, "named_parameters"):
        raise ArgumentTypeError("tensors must be a list of tensors, (name, tensor) pairs or a dict, got a "
                                "torch module: pass module.named_parameters() (or the gradients)")
    items = list(tensors)
    named = [isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in items]
    if items and all(named):
        return [(k, v) for k, v in items]
    if any(named):
        raise ArgumentTypeError("tensors mixes (name, tensor) pairs and bare tensors")
    return [(None, v) for v in items]


def from_torch_tensors(net, tensors, dtype=None):
    """refcurv per-layer matrices ``(…, out, d)`` from PyTorch per-parameter tensors: the
    inverse of :func:`to_torch`.

    ``tensors``: a list in ``module.parameters()`` order (weight, then bias, per layer), the
    ``(name, tensor)`` pairs of ``named_parameters()`` or a dict of them (e.g.
    ``{n: p.grad for n, p in module.named_parameters()}``); torch tensors or arrays. Leading
    axes (a per-sample axis) are kept and must agree. Names, when given, are checked: each
    must end in ``weight``/``bias`` where the network has one, and a bias must belong to the
    preceding weight's layer. ``dtype``: ``None`` keeps the tensors' precision (float64 or
    float32: so a float32 implementation is judged at float32 tolerance), or a NumPy floating
    dtype. A wrong count, name or shape is a ``ShapeError`` naming the parameter."""
    torch = _import_torch()
    _check_net(net)
    dtype = None if dtype is None else check_dtype(dtype, "dtype")
    entries = _entries(tensors)
    want = _torch_shapes(net)
    if len(entries) != len(want):
        listing = ", ".join(f"{k} of {layer!r}" for layer, k, _ in want)
        raise ShapeError(f"tensors has {len(entries)} entries, the network has {len(want)} parameter tensors ({listing})")
    arrays, lead, prefix = [], None, {}
    for i, ((name, value), (layer, kind, shape)) in enumerate(zip(entries, want)):
        label = f"tensors[{name!r}]" if name is not None else f"tensors[{i}]"
        if name is not None:
            head, _, last = name.rpartition(".")
            if last != kind:
                raise ShapeError(f"{label} is where the network expects the {kind} of {layer!r}")
            if kind == "bias" and prefix.get("weight") != head:
                raise ShapeError(f"{label} does not belong to the layer of {entries[i - 1][0]!r} ({layer!r})")
            prefix[kind] = head
        a = _tensor_to_numpy(torch, value, label, dtype)
        k = a.ndim - len(shape)
        if k < 0 or tuple(a.shape[k:]) != shape:
            raise ShapeError(f"{label} has shape {tuple(a.shape)}, the {kind} of {layer!r} needs (…, *{shape})")
        if lead is None:
            lead = a.shape[:k]
        elif a.shape[:k] != lead:
            raise ShapeError(f"{label} has leading axes {a.shape[:k]}, the first tensor has {lead}")
        if not np.isfinite(a).all():
            raise NonFiniteError(f"{label} contains NaN or Inf")
        arrays.append((layer, kind, a))
    out, j = [], 0
    while j < len(arrays):
        layer, _, w = arrays[j]
        W = w.reshape(lead + (layer.out_features, layer.fan_in))
        if layer.bias:
            b = arrays[j + 1][2]
            dt = np.result_type(W.dtype, b.dtype)
            W = np.concatenate([W.astype(dt, copy=False), b.astype(dt, copy=False)[..., None]], axis=-1)
            j += 1
        out.append(np.ascontiguousarray(W))
        j += 1
    return out


def permutation(net):
    """Index array ``p`` with ``θ_torch = θ_refcurv[p]`` for flat vectors
    (``torch.nn.utils.parameters_to_vector`` order); a matrix in refcurv order converts as
    ``M[np.ix_(p, p)]``, and back with ``np.argsort(p)``. (:func:`refcurv.vec.permutation`
    with ``order="torch"``.)"""
    return _vec_permutation(_check_net(net), "torch")


def kronecker_to_torch(net, factors):
    """refcurv's Kronecker factors as factor pairs per PyTorch parameter tensor.

    ``factors``: per trainable layer ``(A, G)`` as :func:`refcurv.curvature.kfac_factors`
    returns them (layer block ``G ⊗ A`` on refcurv's row-major ``vec(W)``, ``A`` the joint
    factor of ``[a; 1]`` with the ones row LAST; thesis (2.3), (3.6)), or a method's curvature
    operator that is a per-layer ``BlockDiagonal`` of ``Kronecker(G, A)`` blocks (KFAC's
    ``method.curvature(state)``, damping included). Returns, in ``module.parameters()`` order,
    one pair ``(G, A_p)`` of torch tensors per parameter with block ``G ⊗ A_p`` on that
    tensor's row-major ``ravel()``: the weight's ``A_p = A[:fan_in, :fan_in]`` (Conv2d: rows
    ``(c_in, kh, kw)``, the order of ``weight.ravel()``), the bias's ``A_p = A[-1:, -1:]`` (1×1:
    the bias block is ``A[-1, -1] · G``). The weight–bias cross blocks ``G ⊗ A[:fan_in, -1]``
    are not in this form (weight and bias as separate blocks, curvlinops'
    ``separate_weight_and_bias=True``); the full joint block in PyTorch's order is
    ``(G ⊗ A)[np.ix_(q, q)]`` with ``q`` the layer's part of :func:`permutation`."""
    from .operators import BlockDiagonal, Kronecker

    if isinstance(factors, BlockDiagonal):
        pairs = []
        for b, blk in enumerate(factors.blocks):
            if not isinstance(blk, Kronecker) or len(blk.factors) != 2:
                raise ShapeError(f"factors.blocks[{b}] must be a Kronecker(G, A) of two factors, got {blk!r}"
                                 .replace("\n", " "))
            pairs.append((blk.factors[1], blk.factors[0]))
        if not all(np.array_equal(i, np.arange(i[0], i[0] + len(i))) for i in factors.index if len(i)):
            raise ShapeError("factors must be a per-layer BlockDiagonal (consecutive blocks), got one with an index")
        factors = pairs
    torch = _import_torch()
    _check_net(net)
    layers = net.layers_trainable
    if not isinstance(factors, (list, tuple)) or len(factors) != len(layers):
        raise ShapeError(f"factors must be a list of {len(layers)} (A, G) pairs, got {describe(factors)}"
                         + (f" of length {len(factors)}" if isinstance(factors, (list, tuple)) else ""))
    out = []
    for j, (pair, layer) in enumerate(zip(factors, layers)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ShapeError(f"factors[{j}] must be a pair (A, G), got {describe(pair)}")
        A = to_numpy(real_array(pair[0], f"factors[{j}][0] (A)"))
        G = to_numpy(real_array(pair[1], f"factors[{j}][1] (G)"))
        d, o = layer.param_shape[1], layer.out_features
        if A.shape != (d, d):
            raise ShapeError(f"factors[{j}][0] (A) has shape {A.shape}, {layer!r} needs ({d}, {d})")
        if G.shape != (o, o):
            raise ShapeError(f"factors[{j}][1] (G) has shape {G.shape}, {layer!r} needs ({o}, {o})")
        for name, M in (("A", A), ("G", G)):
            if not np.isfinite(M).all():
                raise NonFiniteError(f"factors[{j}] ({name}) contains NaN or Inf")
        f = layer.fan_in
        # copies: the tensors share no memory with refcurv's factors
        out.append((torch.tensor(G), torch.tensor(A[:f, :f])))
        if layer.bias:
            out.append((torch.tensor(G), torch.tensor(A[f:, f:])))
    return out


# --------------------------------------------------------------------------- losses
class LossMap(NamedTuple):
    """A PyTorch loss module in refcurv's terms: ``torch_loss = scale · refcurv_loss`` where
    ``refcurv_loss = net.loss(params, x, y, loss)`` is the mean over the ``N`` samples of the
    per-sample loss ψ_n; so every derivative (gradient, Hessian, GGN) scales by ``scale`` too.

    ``loss``: the refcurv loss instance; ``scale``: the factor (``Conventions.loss_scale`` of
    :mod:`refcurv.testing`); ``formula``: its derivation in one line; ``reduction``: PyTorch's
    reduction over samples, ``"mean"`` | ``"sum"``; ``per_sample_scale``: ``p`` with PyTorch's
    per-sample term ``= p · ψ_n`` (``Conventions.per_sample_scale``), so that ``scale = p``
    for ``"mean"`` and ``p · N`` for ``"sum"``."""

    loss: object
    scale: float
    formula: str
    reduction: str
    per_sample_scale: float


def _output_shape(n_outputs):
    """``(T, C)`` from ``C`` (``T = 1``) or a sequence output's feature shape ``(T, C)``."""
    if isinstance(n_outputs, (tuple, list)):
        if len(n_outputs) != 2:
            raise ShapeError(f"n_outputs must be C or a sequence output's shape (T, C), got {tuple(n_outputs)}")
        return _positive_int(n_outputs[0], "n_outputs[0] (T)"), _positive_int(n_outputs[1], "n_outputs[1] (C)")
    return 1, _positive_int(n_outputs, "n_outputs")


def loss_from_torch(loss_module, n_outputs, batch_size=None):
    """The refcurv loss equivalent to a PyTorch loss module and the factor between them.

    ``n_outputs``: C, the network's outputs (classes for cross-entropy), or ``(T, C)`` for a
    sequence output ``(N, T, C)`` (refcurv's per-sample loss then sums over the T positions,
    ψ_n = Σ_t ℓ(f_{n,t}, y_{n,t}); PyTorch's loss is taken on the ``(N·T, C)`` reshaped
    outputs and targets, or for ``CrossEntropyLoss`` equally on ``(N, C, T)``). ``batch_size``:
    N, needed only for ``reduction="sum"``, whose factor grows with the batch. Derivation, with
    refcurv's loss the mean ``(1/N) Σ_n ψ_n`` (``T = 1`` without a sequence):

    * ``MSELoss``: PyTorch sums ``(f − y)²`` without the ½ of ψ_n = ½ Σ_t ‖f_{n,t} − y_{n,t}‖²,
      and its mean runs over all N·T·C entries: mean ``(1/(NTC)) Σ (f−y)² = (2/(TC)) · (1/N)
      Σ_n ψ_n`` → scale ``2/(TC)``; sum ``Σ (f−y)² = 2 Σ_n ψ_n`` → ``2N``.
    * ``CrossEntropyLoss``: ``−log softmax(f_{n,t})_{y_{n,t}}`` per position, mean over the
      N·T positions → ``1/T``; sum → ``N``.
    * ``BCEWithLogitsLoss``: per entry ``softplus(f) − y f`` (refcurv sums these over the
      outputs and positions), mean over the N·T·C entries → ``1/(TC)``; sum → ``N``.

    Refused, one line each: ``reduction="none"``, class ``weight``, ``pos_weight``,
    ``label_smoothing ≠ 0``, an ``ignore_index`` that is a class index (``0 ≤ i < C``: samples
    with that label would leave the loss and its mean); other loss modules
    (:class:`~refcurv.UnsupportedLayerError`). Targets: class indices ``(N,)`` / ``(N, T)`` for
    cross-entropy (PyTorch's int64 class indices, not probabilities), reals of the output's
    shape for MSE and ``[0, 1]`` targets for BCE — the same arrays in both libraries."""
    torch = _import_torch()
    nn = torch.nn
    T, C = _output_shape(n_outputs)
    if not isinstance(loss_module, nn.Module):
        raise ArgumentTypeError(f"loss_module must be a torch loss module such as torch.nn.MSELoss(), "
                                f"got {describe(loss_module)}")
    name = type(loss_module).__name__
    t = type(loss_module)
    if t not in (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss):
        raise UnsupportedLayerError(f"loss_module {name} is not supported; supported: CrossEntropyLoss, MSELoss, "
                                    "BCEWithLogitsLoss (mean or sum reduction)")
    red = loss_module.reduction
    if red not in ("mean", "sum"):
        raise HyperParameterError(f"loss_module {name} has reduction={red!r}; refcurv maps 'mean' and 'sum' "
                                  "(per-sample losses: refcurv's loss.value(f, y))")
    if getattr(loss_module, "weight", None) is not None:
        raise HyperParameterError(f"loss_module {name} has a weight; refcurv's losses are unweighted")
    if t is nn.BCEWithLogitsLoss and loss_module.pos_weight is not None:
        raise HyperParameterError(f"loss_module {name} has a pos_weight; refcurv's BCE is unweighted")
    if t is nn.CrossEntropyLoss:
        if loss_module.label_smoothing != 0:
            raise HyperParameterError(f"loss_module {name} has label_smoothing={loss_module.label_smoothing}; "
                                      "refcurv's CrossEntropy has none")
        if 0 <= loss_module.ignore_index < C:
            raise HyperParameterError(f"loss_module {name} has ignore_index={loss_module.ignore_index}, a class "
                                      f"index of the {C} outputs; samples with that label would leave the loss")
    if batch_size is not None:
        batch_size = _positive_int(batch_size, "batch_size")
    elif red == "sum":
        raise HyperParameterError(f"loss_module {name} has reduction='sum': the factor grows with the batch "
                                  "(scale = per_sample_scale · N); pass batch_size=N")
    # the number of terms PyTorch's mean divides by, per sample, beyond refcurv's 1/N
    entries = {nn.MSELoss: T * C, nn.CrossEntropyLoss: T, nn.BCEWithLogitsLoss: T * C}[t]
    half = 2.0 if t is nn.MSELoss else 1.0  # PyTorch's MSE has no ½
    per = half / entries if red == "mean" else half
    loss = {nn.MSELoss: MSE, nn.CrossEntropyLoss: CrossEntropy, nn.BCEWithLogitsLoss: BCE}[t]()
    term = {nn.MSELoss: "(f−y)²", nn.CrossEntropyLoss: "−log softmax(f)_y", nn.BCEWithLogitsLoss: "softplus(f)−y·f"}[t]
    den = {nn.MSELoss: "T·C", nn.CrossEntropyLoss: "T", nn.BCEWithLogitsLoss: "T·C"}[t]
    if T == 1:
        den = den.replace("T·", "").replace("T", "")
    over = f"(N·{den})" if den else "N"
    half_note = " (no ½ of ψ_n)" if t is nn.MSELoss else ""
    if red == "mean":
        sym = (f"{half:g}/({den})" if "·" in den else f"{half:g}/{den}") if den else f"{half:g}"
        formula = (f"{name}(mean) = (1/{over}) Σ {term}{half_note} = {sym} · (1/N) Σ_n ψ_n: "
                   f"scale {sym} = {per:g}")
    else:
        sym = "2·N" if half == 2 else "N"
        formula = f"{name}(sum) = Σ {term}{half_note} = {half:g} · Σ_n ψ_n = {sym} · (1/N) Σ_n ψ_n: scale {sym}"
    scale = per if red == "mean" else per * batch_size
    return LossMap(loss, float(scale), formula, red, float(per))
