"""TNT, Tensor-Normal Training ([Ren-thesis] Ch.4: (4.2), (4.8), (4.10), Proposition 1,
Algorithms 13-15, Lemma 10).

**Tensors.** Each layer matrix ``W`` is viewed as its parameter tensors with
:func:`refcurv.methods._tensors.to_tensors`: Linear weight ``(out, in)`` (order 2), bias
``(out,)`` (order 1), Conv2d kernel ``(out, c_in, kh, kw)`` (order 4, ``conv_modes=4``) or
``(out, c_in, kh·kw)`` (order 3, ``conv_modes=3``, the authors' layout; §4.7.2 lists the
modes as (filter, c_in, c_out) — the same Kronecker product up to a permutation of the
modes, hence the same direction). Each tensor ``W ∈ R^{d_1×⋯×d_k}`` is one block of the
block-diagonal Fisher (§4.3.1) with its own preconditioner; directions go back to the
layer layout with ``from_tensors``. Vectorization: the thesis' ``vec̄`` is row-major
``ravel`` (§4.2.1), which is refcurv's flattening restricted to the tensor's entries.

**Statistics** (4.2): the contractions ``G^{(i)} = mat_i(G) mat_i(G)ᵀ`` of the gradients
``G = DW`` of the loss at labels chosen by ``fisher``:

* ``"mc"`` (default, Algorithm 15 line 7): ``n_samples`` labels per input sampled from the
  model, ``Draws.labels`` of shape ``(n_samples, N, …)``; the statistic is computed FROM
  those labels (injected labels are consumed exactly);
* ``"empirical"``: the data labels (TNT-EF, §4.7.3);
* ``"exact"``: the expectation over the model's labels in closed form: the cotangents are
  the columns of ``B_n`` with ``B_n B_nᵀ = E_y[∇_f ℓ ∇_f ℓᵀ]`` (= the output Hessian for
  refcurv's losses), so ``E_y[G_n^{(i)}] = Σ_c mat_i(G_{n,c}) mat_i(G_{n,c})ᵀ``.

``statistics`` selects the estimator of ``E[G^{(i)}]``:

* ``"per_sample"`` (default; the definition (4.1)-(4.2), ``G`` = the gradient of ONE sample's
  loss at its label):  ``Ḡ^{(i)} = (1/(N S)) Σ_{s,n} mat_i(DW_{n,s}) mat_i(DW_{n,s})ᵀ`` —
  unbiased for ``E[G^{(i)}]``.
* ``"batch_mean"`` (Algorithm 13 line 4, Algorithm 15 line 7, the authors' code): per label
  draw ``s`` one gradient ``D̄W_s = (1/N) Σ_n DW_{n,s}`` of the mini-batch MEAN loss, and
  ``Ḡ^{(i)} = (1/S) Σ_s mat_i(D̄W_s) mat_i(D̄W_s)ᵀ`` (for ``"exact"``: its expectation,
  ``(1/N)·`` the per-sample statistic). The labels are drawn independently and
  ``E_y[DW_n | x_n] = 0``, so ``E[Ḡ^{(i)}] = E[G^{(i)}] / N``; since (4.10) is positively
  homogeneous of degree ``1/k``, in expectation this gives
  ``⊗_i(N^{-1/k} Ũ_i + εI) = N^{-1} ⊗_i(Ũ_i + N^{1/k} ε I)``: a direction ``N`` times
  longer, damped by ``N^{1/k} ε`` instead of ``ε`` (docs/errata.md TNT-1). For ``N = 1``
  the two coincide.

Moving averages ``Ĝ^{(i)} ← β Ĝ^{(i)} + (1−β) Ḡ^{(i)}`` (Algorithm 15 line 12); the first
statistics *set* ``Ĝ`` (a warm start on the first mini-batch; :meth:`TNT.warm_start` does
Algorithm 15 line 2 on any data).

**Refresh phase.** ``phase="k0"`` (default, refcurv's convention
:func:`~refcurv.methods.base.refresh_due`): statistics at 0-based ``k ≡ 0 (mod T_stats)``,
factors and inverses at ``k ≡ 0 (mod T_inv)`` — the thesis's ``t = 1, T + 1, 2T + 1, …``.
``phase="paper"``: the printed ``t ≡ 0 (mod T)`` with ``t = k + 1`` (lines 6, 11, 14). In
both, a quantity that does not exist yet (no statistics without :meth:`warm_start`, no
inverses before the first refresh) is computed at the first step that needs it: read
literally, line 14 leaves the inverses undefined for ``t < T_2`` (errata TNT-2).

**Normalization** (4.10), :func:`refcurv.linalg.kronecker.normalized_factors`:
``c_0 = (tr Ĝ^{(1)} / Π_j d_j)^{1/k}``, ``Ũ_i = Ĝ^{(i)} / (c_0^{k−1} Π_{j≠i} d_j)``;
``Ũ_i = 0`` if ``tr Ĝ = 0``, so ``F_TNT = ε^k I``.

**Curvature and direction** (Algorithm 15 lines 10, 18-20; §4.3.3, Lemma 10):
``rhs = m`` (the momentum buffer, ``m ← μ m + ∇̄L`` by default, ``momentum_form``), and per
parameter tensor

    C = F_TNT = ⊗_i (Ũ_i + εI)            (ε in full on each normalized factor)
    fast (4.8):  p = m ×_1 (Ũ_1+εI)^{-1} ×_2 ⋯ ×_k (Ũ_k+εI)^{-1}      (mode products)
    dense:       vec̄(p) = F_TNT^{-1} vec̄(m),  F_TNT formed, Cholesky solve

(equal by Proposition 1), then the decoupled weight decay ``p ← p + γ W`` (line 19, every
tensor, biases included) and ``d = −p``. :meth:`TNT.curvature` is
``BlockDiagonal([Kronecker(Ũ_1+εI, …, Ũ_k+εI) per tensor], index=…)`` over θ (weight and
bias of a layer are separate blocks), so ``d = −C⁻¹ m`` when ``weight_decay = 0`` (the
default; with ``γ > 0`` the direction is ``−C⁻¹ m − γ θ``).

**The two forms.** The fast form computes the statistics from per-sample gradients split
into tensors (:func:`sample_statistics`), inverts each ``Ũ_i + εI`` at refreshes and applies
the inverses by mode products. The dense form computes the statistics from the definition:
the full second moment ``Σ = E[vec̄(G) vec̄(G)ᵀ]`` of each tensor from
:mod:`refcurv.curvature` (``empirical_fisher`` at the labels, ``fisher(kind="exact")``, or
the outer product of ``curvature.grad`` for ``batch_mean``), reduced to ``E[G^{(i)}]`` by the
partial trace :func:`refcurv.linalg.kronecker.mode_marginal`; it forms ``F_TNT`` and solves
with it. The states agree to rounding, not bit for bit.
Shared by both forms: the label draws (:meth:`TNT.draw`); the schedule
(:meth:`~._tensors.TensorMethod.stats_due` / ``inv_due``, :func:`~._tensors.phase_due`);
:func:`~._tensors.momentum_update`; :func:`~._tensors.ema_update`;
:func:`refcurv.linalg.kronecker.damped_factors` ((4.10) + εI); the inverses kept in the state
(:func:`refcurv.linalg.woodbury.spd_solve`); :func:`~._tensors.precondition_layers` (tensor
views and weight decay). Each has its own test.

No deviation from the order of Algorithm 15: the statistics of step ``t`` are computed at
the current parameters on the current mini-batch, before the direction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import numpy as np

from .. import curvature as cv
from .. import curvature as _curv
from ..backend import xp_of
from ..errors import DrawsError, HyperParameterError, ShapeError
from ..linalg.kronecker import damped_factors, f_tnt, mode_marginal, normalized_factors  # noqa: F401 (re-exported)
from ..linalg.tensor import contraction, kron_apply
from ..linalg.woodbury import _spd_inverse, spd_solve
from ..operators import BlockDiagonal, Kronecker
from ..vec import unflatten
from ._tensors import (TensorMethod, TensorState, batched_tensors, ema_update, map_modes, precondition_layers,
                       tensor_index)
from .base import Draws, check_choice, check_int, state_field
from .registry import register
from .vocabulary import FISHER_KINDS

#: (4.10) under its former name (tests and notebooks); the public kernel is
#: :func:`refcurv.linalg.kronecker.normalized_factors`.
normalize = normalized_factors


def sample_statistics(Gs, statistics="per_sample", weight=None):
    """``[Ḡ^{(1)}, …, Ḡ^{(k)}]`` from stacked gradients ``Gs`` ``(S, N, d_1, …, d_k)`` — ``S``
    label draws (or cotangent columns) of ``N`` samples — ([Ren-thesis] (4.2)):

    * ``"per_sample"``: ``w Σ_{s,n} mat_i(G_{s,n}) mat_i(G_{s,n})ᵀ / N`` (the contraction of
      the stacked tensor along a mode sums over the stacked samples);
    * ``"batch_mean"``: ``w Σ_s mat_i(Ḡ_s) mat_i(Ḡ_s)ᵀ`` with ``Ḡ_s = (1/N) Σ_n G_{s,n}``
      (Algorithm 15 line 7).

    ``weight`` ``w`` is ``1/S`` by default (a mean over label draws); pass ``1`` for the
    columns of an output-Fisher square root (``fisher="exact"``)."""
    if Gs.ndim < 3:
        raise ShapeError(f"Gs must be (S, N, d_1, …, d_k), got shape {Gs.shape}")
    S, N = Gs.shape[:2]
    k = Gs.ndim - 2
    # divide by S·N (resp. S) for the default mean over draws; multiply by w otherwise
    if statistics == "per_sample":
        flat = Gs.reshape((S * N,) + Gs.shape[2:])
        den = S * N if weight is None else N / weight
        return [contraction(flat, i + 1) / den for i in range(k)]
    Gm = Gs.mean(axis=1)
    den = S if weight is None else 1 / weight
    return [contraction(Gm, i + 1) / den for i in range(k)]


def _inverses(factors):
    """``(Ũ_i + εI)^{-1}`` for every factor (Cholesky, Algorithm 15 line 16)."""
    return map_modes(lambda F: _spd_inverse(F, "Ũ_i + εI"), factors)  # potrf + potri


_DOC_INVERSES = ("per layer, per parameter tensor, per mode i: (Ũ_i + εI)^{-1} of the last refresh "
                 "(Algorithm 15 line 16), applied by mode products (4.8)")


@dataclass(frozen=True, kw_only=True)
class TNTState(TensorState):
    """TNT's state: ``k``, ``m`` (momentum ``\\widehat{∇_W L}``), ``G_hat`` (Ĝ^{(i)}),
    ``factors`` (Ũ_i + εI), ``inverses`` ((Ũ_i + εI)^{-1}), ``diagnostics``
    (``refreshed``, ``stats_refreshed``)."""

    inverses: Any = state_field(doc=_DOC_INVERSES)


@register
@dataclass(frozen=True)
class TNT(TensorMethod):
    """TNT ([Ren-thesis] Algorithm 15). Hyper-parameters: ``damping`` ε, EMA ``beta`` β,
    gradient ``momentum`` μ (Algorithm 15 line 1: μ = β = 0.9) with ``momentum_form``
    (``"heavy_ball"``: ``m ← μ m + g`` as line 10 prints; ``"ema"``: ``m ← μ m + (1−μ) g``),
    decoupled ``weight_decay`` γ, statistics / inverse intervals ``T_stats`` (T_1) /
    ``T_inv`` (T_2) with ``phase`` (``"k0"`` | ``"paper"``), ``conv_modes`` (4 | 3),
    ``statistics`` (``"per_sample"`` | ``"batch_mean"``), ``fisher`` (``"mc"`` sampled labels |
    ``"empirical"`` data labels, TNT-EF | ``"exact"`` closed-form expectation), ``n_samples``
    (labels per input for ``"mc"``).

    ``rhs`` is the momentum buffer ``state.m``; ``C`` is ``F_TNT = ⊗_i(Ũ_i + εI)`` per
    parameter tensor (Lemma 10, (4.8)); direction ``−C⁻¹ m − γ θ`` (the curvature contract
    holds for the default ``weight_decay = 0``: weight decay is added outside the solve).

    Draws: ``labels`` ``(n_samples, N, …)`` for ``fisher="mc"`` at steps that refresh the
    statistics (``None`` otherwise). Diagnostics: ``refreshed``, ``stats_refreshed``.

    Shared by both forms: label draws, refresh schedule, momentum, statistics EMA,
    :func:`~refcurv.linalg.kronecker.damped_factors`, the stored inverses, tensor views and
    weight decay (module docstring)."""

    statistics: str = "per_sample"
    fisher: str = "mc"
    n_samples: int = 1

    name = "tnt"
    seed_ref = "[Ren-thesis] Ch.4 Alg. 15; (4.2), (4.8), (4.10), Prop. 1"
    summary = "tensor-normal Fisher ⊗_i(Ũ_i + εI) per parameter tensor, applied by mode products"
    State = TNTState

    def __post_init__(self):
        self._check_shared()
        check_choice(self.statistics, "statistics", ("per_sample", "batch_mean"))
        check_choice(self.fisher, "fisher", FISHER_KINDS)
        check_int(self.n_samples, "n_samples")

    @property
    def draw_fields(self):
        return ("labels",) if self.fisher == "mc" else ()

    def init(self, net, params):
        return TNTState()

    # ------------------------------------------------------------------ draws
    def draw(self, rng, state, net, params, batch):
        """``Draws(labels=…)``: for ``fisher="mc"`` one seed per step (drawn every step, so
        the stream does not depend on the counter) and, when this step refreshes the
        statistics, labels ``y ~ p(·|x, θ)`` of shape ``(n_samples, N, …)`` drawn from it by
        ``loss.sample``."""
        labels = None
        if self.fisher == "mc":
            seed = int(rng.integers(2**63 - 1))
            if self.stats_due(state):
                labels = batch.loss.sample(net.forward(params, batch.x), n_samples=self.n_samples, seed=seed)
        return Draws(method=self.name, labels=labels)

    def check_draws(self, draws, state, net, params, batch):
        """Labels are required (shape ``(n_samples, N) + y.shape[1:]``) when ``fisher="mc"``
        and this step refreshes the statistics; otherwise they must be ``None``."""
        need = self.fisher == "mc" and self.stats_due(state)
        if need or not isinstance(draws, Draws) or draws.labels is not None:
            super().check_draws(draws, state, net, params, batch)
        else:
            return draws
        if not need:
            raise DrawsError(f"{self.name}: draws.labels must be None at a step that does not sample labels "
                             f"(fisher={self.fisher!r}, statistics refreshed: {self.stats_due(state)})")
        want = (self.n_samples,) + tuple(np.shape(batch.y))
        if tuple(np.shape(draws.labels)) != want:
            raise DrawsError(f"{self.name}: draws.labels must have shape (n_samples, N, …) = {want}, "
                             f"got {tuple(np.shape(draws.labels))}")
        return draws

    def _check_stat_labels(self, labels, batch, where):
        """``labels`` of the statistics: ``(S, N) + y.shape[1:]`` real targets, ``S ≥ 1``, or
        ``y.shape`` (one set, ``S = 1``); ignored for ``fisher="exact"``."""
        if self.fisher == "exact":
            return labels
        kind = getattr(getattr(labels, "dtype", None), "kind", None)
        want = tuple(np.shape(batch.y))
        shape = tuple(getattr(labels, "shape", ())) if kind is not None else ()
        if kind is None or kind not in "iuf" or (shape != want and (len(shape) < 1 or shape[0] < 1 or shape[1:] != want)):
            raise DrawsError(f"{self.name}.{where}: labels must be a real array of shape (S, N, …) = (S,) + {want} or {want}, "
                             f"got {type(labels).__name__ if kind is None else f'{labels.dtype} of shape {shape}'}")
        return labels

    def _labels(self, draws, batch):
        """``(S, N, …)`` labels of this step's statistics (``None`` for ``fisher="exact"``)."""
        if self.fisher == "mc":
            return draws.labels
        if self.fisher == "empirical":
            return batch.y[None]
        return None

    # ------------------------------------------------------------------ fast statistics
    def batch_statistics(self, net, params, batch, labels):
        """Per layer, per tensor, ``[Ḡ^{(i)}]`` at ``labels`` ``(S, N, …)`` (fast path):
        per-sample gradients for the cotangents ``∇_f ℓ(f, y_s)`` (or the columns of
        ``B_n``, ``B_n B_nᵀ = F_n``, for ``fisher="exact"``), split into tensors, contracted."""
        self._check_stat_labels(labels, batch, "batch_statistics")
        xp = xp_of(batch.x)
        f = net.forward(params, batch.x)
        if self.fisher == "exact":
            D, weight = xp.moveaxis(batch.loss.hessian_sqrt(f), 2, 0), 1.0
        else:
            D, weight = batch.loss.grad(f[None], labels), None
        U = net.vjp(params, batch.x, D, per_sample=True)  # (K, N, out, d) per layer
        N = batch.x.shape[0]
        out = []
        for layer, u in zip(net.layers_trainable, U):
            tensors = []
            for Gs in batched_tensors(layer, u, self.conv_modes):
                if self.fisher == "exact" and self.statistics == "batch_mean":
                    # E_y[mat_i(Ḡ)mat_i(Ḡ)ᵀ] = (1/N²) Σ_n E_y[G_n^{(i)}] (independent labels)
                    S = [s / N for s in sample_statistics(Gs, "per_sample", weight)]
                else:
                    S = sample_statistics(Gs, self.statistics, weight)
                tensors.append(S)
            out.append(tensors)
        return out

    def warm_start(self, state, net, params, batches, seed=0):
        """Algorithm 15 line 2: ``Ĝ^{(i)}`` = the mean of the statistics of ``batches`` (a
        :class:`Batch` or a list of them, e.g. the whole data set in mini-batches), labels
        drawn with ``seed``."""
        self.check_state(state)
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        if not batches:
            raise HyperParameterError("warm_start needs at least one batch")
        rng = np.random.default_rng(seed)
        acc = None
        for b in batches:
            labels = self._labels(Draws(method=self.name), b)
            if self.fisher == "mc":
                labels = b.loss.sample(net.forward(params, b.x), n_samples=self.n_samples, seed=rng)
            S = self.batch_statistics(net, params, b, labels)
            acc = S if acc is None else map_modes(lambda a, s: a + s, acc, S)
        return state.replace(G_hat=map_modes(lambda a: a / len(batches), acc))

    # ------------------------------------------------------------------ dense statistics
    def dense_statistics(self, net, params, batch, labels):
        """Per layer, per tensor, ``[E[G^{(i)}]]`` by the definition: the tensor's block of
        ``Σ = E[vec̄(G) vec̄(G)ᵀ]`` from :mod:`refcurv.curvature`, reduced by the partial trace
        :func:`~refcurv.linalg.kronecker.mode_marginal` (independent of the fast path)."""
        self._check_stat_labels(labels, batch, "dense_statistics")
        x, loss = batch.x, batch.loss
        N = x.shape[0]
        if self.fisher == "exact":
            Sigma = _curv.fisher(net, params, x, loss=loss, kind="exact")
            if self.statistics == "batch_mean":
                Sigma = Sigma / N  # E[vec̄Ḡ vec̄Ḡᵀ] = (1/N²) Σ_n E[vec̄G_n vec̄G_nᵀ]
        elif self.statistics == "per_sample":
            # (1/(S N)) Σ_{s,n} u_{n,s} u_{n,s}ᵀ: the empirical Fisher of the batch repeated
            # once per label draw, at the drawn labels
            S = labels.shape[0]
            xs = xp_of(x).concatenate([x] * S, axis=0)
            Sigma = _curv.empirical_fisher(net, params, xs, labels.reshape((S * N,) + labels.shape[2:]), loss)
        else:
            # (1/S) Σ_s vec̄(Ḡ_s) vec̄(Ḡ_s)ᵀ; a loop over the S label draws (not over samples)
            gs = [_curv.grad(net, params, x, y, loss) for y in labels]
            Sigma = sum(xp_of(gv).outer(gv, gv) for gv in gs) / len(gs)
        out, off = [], 0
        for layer in net.layers_trainable:
            n = int(math.prod(layer.param_shape))
            block = Sigma[off:off + n, off:off + n]
            off += n
            tensors = []
            for idx in tensor_index(layer, self.conv_modes):
                St = block[np.ix_(idx.ravel(), idx.ravel())]  # host: index arrays built on the host
                tensors.append([mode_marginal(St, idx.shape, i) for i in range(idx.ndim)])
            out.append(tensors)
        return out

    # ------------------------------------------------------------------ steps
    def _step(self, state, net, params, batch, draws, g, statistics):
        """The state update (Algorithm 15 lines 5-17) with the statistic given."""
        m = self._momentum(state, g)
        stats_ref, refreshed = self.stats_due(state), self.inv_due(state)
        G_hat = state.G_hat
        if stats_ref:
            G_hat = ema_update(G_hat, statistics(net, params, batch, self._labels(draws, batch)), self.beta)
        factors, inverses = state.factors, state.inverses
        if refreshed:
            factors = [[damped_factors(S, self.damping) for S in layer] for layer in G_hat]
            inverses = _inverses(factors)
        return state.replace(k=state.k + 1, m=m, G_hat=G_hat, factors=factors, inverses=inverses,
                             diagnostics={"refreshed": bool(refreshed), "stats_refreshed": bool(stats_ref)})

    def _fast(self, state, net, params, batch, draws):
        g = cv._mean_layer_grads(net, params, batch.x, batch.y, batch.loss)
        new = self._step(state, net, params, batch, draws, g, self.batch_statistics)
        inv = new.inverses
        # (4.8): m ×_1 (Ũ_1+εI)^{-1} ⋯ ×_k (Ũ_k+εI)^{-1}, tensor by tensor
        d = precondition_layers(net, new.m, params, self.conv_modes, lambda j, q, M: kron_apply(inv[j][q], M),
                                self.weight_decay)
        return d, new

    def _dense(self, state, net, params, batch, draws):
        g = unflatten(_curv.grad(net, params, batch.x, batch.y, batch.loss), net)
        new = self._step(state, net, params, batch, draws, g, self.dense_statistics)
        fac = new.factors

        def solve(j, q, M):  # vec̄(p) = F_TNT⁻¹ vec̄(m), F_TNT formed (Lemma 10)
            return spd_solve(f_tnt(fac[j][q]), M.ravel(), "F_TNT").reshape(M.shape)

        return precondition_layers(net, new.m, params, self.conv_modes, solve, self.weight_decay), new

    # ------------------------------------------------------------------ curvature
    def curvature(self, state, net=None, params=None, batch=None, draws=None):
        """``C = BlockDiagonal([⊗_i(Ũ_i + εI) per parameter tensor])`` over θ (weight and bias
        separate blocks, ``index=`` their positions in refcurv's flat θ), from the state alone."""
        self._check_curvature_state(state)
        blocks = [Kronecker(*fs) for layer in state.factors for fs in layer]
        return BlockDiagonal(blocks, index=self._layout(state))
