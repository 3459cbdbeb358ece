"""Declared conventions of a foreign implementation, and the conversion of refcurv's float64
results INTO them (refcurv converts; the user never writes a permutation or a factor).

refcurv's own convention (README "Conventions") is ``Conventions()``: per-layer matrices
``W_l = [weight, bias]`` flattened row-major, the bias joint with the weight (a ones row in
the Kronecker factor ``A``), the objective ``Ψ = (1/N) Σ_n ψ_n`` with ``ψ_n`` the per-sample
loss (MSE ``½‖f−y‖²``), update directions ``d`` (``θ ← θ + lr·d``), layer blocks ``G ⊗ A``
on the row-major ``vec W``, KFAC conv factors ``"expand"``, and each method's own damping.

Each field names one place where implementations differ; the formula of every option is in
the field's entry below. With ``s`` the resolved ``loss_scale`` and ``p`` the resolved
``per_sample_scale`` (:meth:`Conventions.scales`), a refcurv quantity converts as

==========================  ====================================================
quantity                    the user's value
==========================  ====================================================
per-sample gradients        ``p · u_n``            (``u_n = ∇ψ_n``)
gradient                    ``s · ∇Ψ``
Hessian, GGN, Fisher exact  ``s · M``              (curvature of ``L = s·Ψ``)
Fisher mc                   ``s · F_mc``           (same labels; same expectation as ``s·GGN``)
empirical Fisher            ``s · p · EF``         (``c Σ_n g_n g_nᵀ`` with ``L = c Σ_n ℓ_n``)
KFAC factors ``(A, G)``     ``(A, s·G)`` (``s·p·G`` for the empirical kind)
==========================  ====================================================

then re-ordered by ``order`` (vectors ``θ[P]``, matrices ``M[P][:, P]``) and, for layer
blocks and Kronecker factors, split by ``bias``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConventionsError

ORDERS = ("refcurv", "torch", "column_major")
BIASES = ("joint", "separate")
REDUCTIONS = ("mean", "sum")
SIGNS = ("direction", "preconditioned_gradient")
KRONECKERS = ("G_A", "A_G")
CONVS = ("expand", "reduce", "backpack")
DAMPINGS = ("method", "sqrt", "exact")

# refcurv.vec's names of the same orders
_VEC_ORDER = {"refcurv": "row", "torch": "torch", "column_major": "col"}

# PyTorch's losses against refcurv's per-sample ψ and mean over N (design §9): the factor
# s with torch_loss = s · Ψ, by (loss, reduction); C = number of outputs, T = positions of a
# sequence output (ψ_n sums over them; PyTorch's mean runs over them too), N = batch size.
#   MSELoss: Σ (f−y)² = 2 Σ_n ψ_n, mean over N·T·C: 2/(TC), sum: 2N
#   CrossEntropyLoss: Σ_t −log softmax(f_t)_y = ψ_n, mean over N·T: 1/T, sum: N
#   BCEWithLogitsLoss: Σ softplus(f)−y f = Σ_n ψ_n, mean over N·T·C: 1/(TC), sum: N
_TORCH_SCALES = {
    ("mse", "mean"): lambda T, C, N: 2.0 / (T * C), ("mse", "sum"): lambda T, C, N: 2.0 * N,
    ("cross_entropy", "mean"): lambda T, C, N: 1.0 / T, ("cross_entropy", "sum"): lambda T, C, N: float(N),
    ("bce", "mean"): lambda T, C, N: 1.0 / (T * C), ("bce", "sum"): lambda T, C, N: float(N),
}


def _TC(n_outputs):
    """``(T, C)`` from C or a sequence output's ``(T, C)``."""
    if isinstance(n_outputs, (tuple, list)) and len(n_outputs) == 2:
        T, C = n_outputs
    else:
        T, C = 1, n_outputs
    for v in (T, C):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConventionsError(f"n_outputs must be a positive int C or a pair (T, C), got {n_outputs!r}")
    return int(T), int(C)


# quantities that are vectors or full matrices: their layout is `order` alone
VECTOR_QUANTITIES = ("per_sample_grads", "grad", "direction")
MATRIX_QUANTITIES = ("hessian", "ggn", "fisher", "empirical_fisher", "curvature")
SPLIT_QUANTITIES = ("blocks", "kfac_factors")




def _choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ConventionsError(f"Conventions.{name} must be one of {choices}, got {value!r}")


def loss_name(loss):
    """``"mse"``, ``"cross_entropy"`` or ``"bce"`` of a refcurv loss instance or a name."""
    if isinstance(loss, str):
        if loss not in ("mse", "cross_entropy", "bce"):
            raise ConventionsError(f"loss must be 'mse', 'cross_entropy' or 'bce', got {loss!r}")
        return loss
    names = {"MSE": "mse", "CrossEntropy": "cross_entropy", "BCE": "bce"}
    name = names.get(type(loss).__name__)
    if name is None:
        raise ConventionsError(f"loss must be a refcurv loss (MSE, CrossEntropy, BCE), got {type(loss).__name__}")
    return name


@dataclass(frozen=True)
class Conventions:
    """How a foreign implementation lays out and scales its results (module docstring).

    * ``order`` -- the vec of θ. ``"refcurv"``: per layer ``W = [weight, bias]`` row-major,
      layers concatenated; ``"torch"``: per parameter tensor, weight flattened row-major then
      bias (``torch.nn.utils.parameters_to_vector``); ``"column_major"``: per layer the
      columns of ``W`` stacked (the papers' ``vec``, ``vec(g aᵀ) = a ⊗ g``). Vectors convert
      as ``θ[P]``, matrices as ``M[P][:, P]`` with ``P = refcurv.vec.permutation(net, ·)``.
    * ``bias`` -- ``"joint"``: one Kronecker block per layer, the bias a ones row of the
      inputs (``A`` is ``(d+1) × (d+1)``); ``"separate"``: weight and bias are separate
      blocks, as curvlinops' ``separate_weight_and_bias=True``: from the joint factors
      ``A = [[A_ww, A_wb], [A_bwᵀ, A_bb]]``, the weight block is ``G ⊗ A_ww`` and the bias
      block ``G · A_bb`` (``A_bb = 1`` for expand and reduce; the cross block ``G ⊗ A_wb`` is
      dropped). Only layer blocks and Kronecker factors have a bias split.
    * ``reduction`` -- ``"mean"``: ``L = (1/N) Σ_n ℓ_n``; ``"sum"``: ``L = Σ_n ℓ_n``; it fixes
      the default per-sample loss ``ℓ_n`` below.
    * ``loss_scale`` -- ``s`` with ``L_user = s · Ψ`` (``Ψ`` refcurv's mean loss), a positive
      number, or ``"torch"``: PyTorch's factor for the case's loss with this ``reduction``
      (``MSELoss`` mean ``2/(TC)``, sum ``2N``; ``CrossEntropyLoss`` mean ``1/T``, sum ``N``;
      ``BCEWithLogitsLoss`` mean ``1/(TC)``, sum ``N``; C outputs, T positions of a sequence
      output (1 otherwise), N samples).
    * ``per_sample_scale`` -- ``p`` with ``ℓ_n = p · ψ_n``; ``None``: ``s`` for mean, ``s/N``
      for sum (the loss applied to a batch of one, as ``torch.func`` per-sample gradients
      compute it). curvlinops' MSE per-sample loss ``‖f−y‖²`` is ``p = 2``.
    * ``sign`` -- ``"direction"``: the update ``d`` (``θ ← θ + lr·d``, refcurv);
      ``"preconditioned_gradient"``: ``C⁻¹ rhs = −d``.
    * ``kronecker`` -- the Kronecker order of a layer block: ``"G_A"`` (``G ⊗ A``, acts on the
      row-major vec, orders ``"refcurv"`` and ``"torch"``) or ``"A_G"`` (``A ⊗ G``, acts on the
      column-major vec); ``None`` (default): the one ``order`` implies. A Kronecker order that
      does not act on the declared vec contradicts it (``ConventionsError``).
    * ``conv`` -- the conv factors of KFAC (``refcurv.curvature.kfac_factors``; ``T`` output
      locations): ``"expand"`` ``A = (1/(NT)) Σ_{n,t} a aᵀ``, ``G = (1/N) Σ_{n,t} g gᵀ``;
      ``"reduce"`` ``A = (1/N) Σ_n â âᵀ`` (``â = mean_t a``), ``G = (1/N) Σ_n ĝ ĝᵀ``
      (``ĝ = Σ_t g``); ``"backpack"`` (BackPACK's KFLR, design §9: the block
      ``T·G_reduce ⊗ A_expand``, measured against backpack-for-pytorch 1.7.1 in
      tests/test_conventions.py): ``A = T·A_expand = (1/N) Σ_{n,t} a aᵀ``, ``G = G_reduce``,
      and with ``bias="separate"`` the bias factor ``G_reduce`` alone (``A_bb = 1``, the exact
      bias block). All three coincide for Linear layers (``T = 1``).
    * ``damping`` -- where the damping ``λ`` sits in a Kronecker-factored curvature (KFAC,
      with the undamped factors ``Γ, Ω`` of the last inverse refresh, KFC scaling):
      ``"method"``: the method's own (KFAC: ``(Γ + √λ/π I) ⊗ (Ω + π√λ I)``, ``π`` by its
      ``split``); ``"sqrt"``: ``(Γ + √λ I) ⊗ (Ω + √λ I)``; ``"exact"``: ``Γ ⊗ Ω + λ I``. The
      direction is then ``−C⁻¹ m`` with that ``C``.
    """

    order: str = "refcurv"
    bias: str = "joint"
    reduction: str = "mean"
    loss_scale: Any = 1.0
    per_sample_scale: Any = None
    sign: str = "direction"
    kronecker: Any = None
    conv: str = "expand"
    damping: str = "method"

    def __post_init__(self):
        _choice(self.order, "order", ORDERS)
        _choice(self.bias, "bias", BIASES)
        _choice(self.reduction, "reduction", REDUCTIONS)
        _choice(self.sign, "sign", SIGNS)
        _choice(self.conv, "conv", CONVS)
        _choice(self.damping, "damping", DAMPINGS)
        for name in ("loss_scale", "per_sample_scale"):
            v = getattr(self, name)
            if name == "loss_scale" and isinstance(v, str):
                if v != "torch":
                    raise ConventionsError(f"Conventions.loss_scale must be a positive number or 'torch', got {v!r}")
                continue
            if v is None and name == "per_sample_scale":
                continue
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(v) or v <= 0:
                raise ConventionsError(f"Conventions.{name} must be a finite positive number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.kronecker is not None:
            _choice(self.kronecker, "kronecker", KRONECKERS)
            if self.kronecker != self.implied_kronecker:
                raise ConventionsError(
                    f"Conventions.kronecker={self.kronecker!r} contradicts order={self.order!r}: "
                    f"{'A ⊗ G acts on the column-major vec' if self.kronecker == 'A_G' else 'G ⊗ A acts on a row-major vec'}"
                    f" (declare order={'column_major' if self.kronecker == 'A_G' else 'refcurv'!r} or kronecker=None)")

    # ------------------------------------------------------------------ (de)serialization
    @property
    def implied_kronecker(self):
        return "A_G" if self.order == "column_major" else "G_A"

    def asdict(self):
        """Plain JSON-able dict of every field (what golden manifests record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`asdict`; an unknown key is a ``ConventionsError``."""
        if not isinstance(d, dict):
            raise ConventionsError(f"Conventions.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConventionsError(f"Conventions.from_dict: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_torch_loss(cls, loss_module, n_outputs, **fields):
        """Conventions with ``reduction`` and ``loss_scale`` of a PyTorch loss module
        (``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss``) on ``n_outputs`` outputs;
        the ``"sum"`` factors depend on N, so they are given as ``loss_scale="torch"``
        (resolved per case by :meth:`scales`). ``fields``: the other fields
        (``order="torch"`` by default)."""
        names = {"MSELoss": "mse", "CrossEntropyLoss": "cross_entropy", "BCEWithLogitsLoss": "bce"}
        name = names.get(type(loss_module).__name__)
        if name is None:
            raise ConventionsError(
                f"loss_module must be torch.nn.MSELoss, CrossEntropyLoss or BCEWithLogitsLoss, got {type(loss_module).__name__}")
        reduction = getattr(loss_module, "reduction", None)
        if reduction not in REDUCTIONS:
            raise ConventionsError(f"loss_module.reduction must be 'mean' or 'sum', got {reduction!r}")
        T, C = _TC(n_outputs)
        try:
            from ..torch import loss_from_torch  # noqa: PLC0415 - optional extra
        except ImportError:  # pragma: no cover - the bridge module is part of refcurv
            loss_from_torch = None
        if loss_from_torch is not None:
            # the bridge refuses what refcurv cannot represent (weights, label smoothing, …),
            # and its factors must agree with the table above (per sample: batch_size=1)
            lm = loss_from_torch(loss_module, n_outputs if T == 1 else (T, C), batch_size=1)
            want = _TORCH_SCALES[(name, reduction)](T, C, 1)
            if not np.isclose(lm.scale, want, rtol=1e-15):  # pragma: no cover - a disagreement is a bug
                raise ConventionsError(f"refcurv.torch.loss_from_torch gives scale {lm.scale}, the table {want}")
        # the sum's factor grows with N: resolved per case by scales()
        scale = _TORCH_SCALES[(name, "mean")](T, C, None) if reduction == "mean" else "torch"
        fields.setdefault("order", "torch")
        return cls(reduction=reduction, loss_scale=scale, **fields)

    # ------------------------------------------------------------------ scales
    def scales(self, loss, n_outputs, N):
        """``(s, p)``: ``L_user = s·Ψ`` and ``ℓ_n = p·ψ_n`` for a case with this loss (a refcurv
        loss or its name), ``n_outputs`` outputs (C, or ``(T, C)`` for a sequence output) and
        ``N`` samples."""
        name = loss_name(loss)
        T, C = _TC(n_outputs)
        if self.loss_scale == "torch":
            s = _TORCH_SCALES[(name, self.reduction)](T, C, N)
        else:
            s = self.loss_scale
        if self.per_sample_scale is not None:
            p = self.per_sample_scale
        else:
            p = s if self.reduction == "mean" else s / N
        return float(s), float(p)

    # ------------------------------------------------------------------ layout
    def permutation(self, net):
        """``P`` with ``θ_user = θ_refcurv[P]`` (computed from the layer shapes in NumPy;
        equals ``refcurv.torch.permutation(net)`` for ``order="torch"``)."""
        from ..vec import permutation
        return permutation(net, _VEC_ORDER[self.order])

    def tensor_indices(self, net):
        """Index arrays into refcurv's θ, one per block of the user's block layout: per layer
        (``bias="joint"``), or per parameter tensor, weight then bias (``"separate"``); the
        entries of each block in the declared ``order``."""
        from ..vec import layer_slices
        out = []
        for sl, (o, d), m in zip(layer_slices(net), net.param_shapes, net.layers_trainable):
            idx = np.arange(sl.start, sl.stop).reshape(o, d)
            F = self.order == "column_major"
            if self.bias == "separate" and m.bias:
                out.append(idx[:, :-1].ravel(order="F" if F else "C"))
                out.append(idx[:, -1])
            elif self.order == "torch" and m.bias:
                out.append(np.concatenate([idx[:, :-1].ravel(), idx[:, -1]]))
            else:
                out.append(idx.ravel(order="F" if F else "C"))
        return out

    def check_quantity(self, quantity):
        """Refuse conventions that do not apply to ``quantity``."""
        if self.bias == "separate" and quantity not in SPLIT_QUANTITIES:
            raise ConventionsError(
                f"Conventions.bias='separate' splits layer blocks and Kronecker factors; {quantity} has no bias split "
                "(order='torch' gives the weight-then-bias vector order)")
        if self.conv != "expand" and quantity in MATRIX_QUANTITIES + VECTOR_QUANTITIES + ("blocks",):
            raise ConventionsError(f"Conventions.conv={self.conv!r} is a KFAC factor convention; {quantity} has no conv factors")

    def vector(self, v, net, scale=1.0):
        """A refcurv vector ``(…, n)`` (or per-layer list) in the user's order, times ``scale``."""
        from ..vec import flatten
        if isinstance(v, (list, tuple)):
            v = flatten(v) if np.ndim(v[0]) == 2 else np.concatenate([np.reshape(a, np.shape(a)[:1] + (-1,)) for a in v], -1)
        return scale * np.asarray(v, dtype=np.float64)[..., self.permutation(net)]

    def matrix(self, M, net, scale=1.0):
        """A refcurv ``(n, n)`` matrix in the user's order, times ``scale``."""
        P = self.permutation(net)
        return scale * np.asarray(M, dtype=np.float64)[np.ix_(P, P)]

    def blocks(self, M, net, scale=1.0):
        """The diagonal blocks of a refcurv ``(n, n)`` matrix in the user's block layout
        (:meth:`tensor_indices`)."""
        M = np.asarray(M, dtype=np.float64)
        return [scale * M[np.ix_(i, i)] for i in self.tensor_indices(net)]

    def kfac_factors(self, expand, reduce, net, locations, g_scale=1.0):
        """KFAC factor pairs ``(A, G)`` in the user's conventions from refcurv's ``expand`` and
        ``reduce`` factors (lists of ``(A, G)`` of :func:`refcurv.curvature.kfac_factors`) and
        each layer's number of locations ``T``: conv choice, ``G`` scaled by ``g_scale``, then
        the bias split (``bias="separate"``: ``(A_ww, G)`` and ``(A_bb, G)`` as a ``1 × 1`` ``A``).
        The factors are symmetric, so ``order`` does not touch them; ``kronecker`` only says
        how the user's block is formed from them."""
        out = []
        for (Ae, Ge), (Ar, Gr), T, m in zip(expand, reduce, locations, net.layers_trainable):
            if self.conv == "expand":
                A, G = Ae, Ge
            elif self.conv == "reduce":
                A, G = Ar, Gr
            else:  # BackPACK's KFLR: T·A_expand (a sum over positions) and G_reduce
                A, G = T * np.asarray(Ae, dtype=np.float64), Gr
            G = g_scale * np.asarray(G, dtype=np.float64)
            A = np.asarray(A, dtype=np.float64)
            if self.bias == "separate" and m.bias:
                # BackPACK's bias factor is G_reduce alone, the exact bias block (ĝ = Σ_t g is
                # the bias gradient's cotangent), not G_reduce·T of the joint split
                A_b = np.ones((1, 1)) if self.conv == "backpack" else A[-1:, -1:]
                out += [(A[:-1, :-1], G), (A_b, G)]
            else:
                out.append((A, G))
        return out

    def kron(self, A, G):
        """The user's dense block from a factor pair: ``G ⊗ A`` or ``A ⊗ G``."""
        return np.kron(G, A) if (self.kronecker or self.implied_kronecker) == "G_A" else np.kron(A, G)

    def signed(self, d):
        """An update direction in the user's ``sign``."""
        return d if self.sign == "direction" else -d
