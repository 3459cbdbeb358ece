"""TNT, Tensor-Normal Training (thesis 003 Ch.4: (4.2), (4.8), (4.10), Proposition 1,
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

**Statistics** (4.2): the contractions ``G^{(i)} = mat_i(G) mat_i(G)ᵀ`` of sampling-based
gradients ``G = DW`` (labels drawn from the model, §4.2; ``fisher="empirical"`` uses the
data labels: TNT-EF, §4.7.3). ``statistics`` selects the estimator of ``E[G^{(i)}]``:

* ``"per_sample"`` (default; the definition (4.1)-(4.2), ``G`` = the gradient of ONE sample's
  loss at its sampled label):  ``Ḡ^{(i)} = (1/N) Σ_n mat_i(DW_n) mat_i(DW_n)ᵀ`` — unbiased
  for ``E[G^{(i)}]``.
* ``"batch_mean"`` (Algorithm 13 line 4, Algorithm 15 line 7, the authors' code): one
  gradient ``D̄W = (1/N) Σ_n DW_n`` of the mini-batch MEAN sampled loss, and
  ``Ḡ^{(i)} = mat_i(D̄W) mat_i(D̄W)ᵀ``. The labels are drawn independently and
  ``E_y[DW_n | x_n] = 0``, so ``E[Ḡ^{(i)}] = E[G^{(i)}] / N``; since (4.10) is positively
  homogeneous of degree ``1/k`` (``Ũ_i(sS) = s^{1/k} Ũ_i(S)``), in expectation this gives
  ``⊗_i(N^{-1/k} Ũ_i + εI) = N^{-1} ⊗_i(Ũ_i + N^{1/k} ε I)``: a direction ``N`` times
  longer, damped by ``N^{1/k} ε`` instead of ``ε`` (docs/errata.md TNT-1). For ``N = 1``
  the two coincide.

Moving averages ``Ĝ^{(i)} ← β Ĝ^{(i)} + (1−β) Ḡ^{(i)}`` (Algorithm 15 line 12) at steps
``k ≡ 0 (mod T_stats)`` (``T_1``), with ``k = 0, 1, …`` the 0-based step counter (the
convention of KFAC and Shampoo in refcurv: every method refreshes at its first step and
then every ``T`` steps, i.e. at the thesis's ``t = 1, T + 1, 2T + 1, …``); the first
statistics *set* ``Ĝ`` (a warm start on the first mini-batch; :meth:`TNT.warm_start` does
Algorithm 15 line 2 on any data).

**Normalization** (4.10), the ``c = 1`` representation with equal average eigenvalues:

    c_0 = (tr Ĝ^{(1)} / Π_j d_j)^{1/k},     Ũ_i = Ĝ^{(i)} / (c_0^{k−1} Π_{j≠i} d_j),

so that ``tr(Ũ_i)/d_i = c_0`` for every mode ``i`` and ``Ĝ^{(i)} = Ũ_i Π_{j≠i} tr Ũ_j``
((4.2) holds exactly with ``U = Ũ``). ``tr Ĝ^{(i)} = Σ ‖G‖²`` is the same for every ``i``;
``c_0`` is computed from mode 1. If ``tr Ĝ = 0`` (a tensor whose gradient is always zero)
``Ũ_i = 0`` (the limit of (4.10)), so ``F_TNT = ε^k I``.

**Preconditioner.** ``F_TNT = ⊗_i (Ũ_i + εI)`` (§4.3.3, Lemma 10): ``ε`` is added in full
to each normalized factor (so the overall damping of an order-``k`` tensor is not ``ε``
but ``⊗(Ũ_i+εI) ⪰ ε^k I``). Factors and their inverses ``(Ũ_i + εI)^{-1}`` (Cholesky,
:func:`refcurv.linalg.woodbury.spd_solve`) are refreshed at steps ``k ≡ 0 (mod T_inv)``
(``T_2``), so also at the first step (Algorithm 15 as printed, ``t ≡ 0 (mod T_2)`` with
``t = 1, 2, …``, leaves them undefined before ``t = T_2``, errata TNT-2).

**Direction** (Algorithm 15 lines 10, 18-20): momentum ``m ← μ m + ∇̄L`` (no ``1−μ``;
``m_0 = 0``), then per tensor

    fast (4.8):  p = m ×_1 (Ũ_1+εI)^{-1} ×_2 ⋯ ×_k (Ũ_k+εI)^{-1}      (mode products)
    dense:       vec̄(p) = F_TNT^{-1} vec̄(m),  F_TNT = ⊗_i(Ũ_i+εI) formed, Cholesky solve

(equal by Proposition 1), and the decoupled weight decay ``p ← p + γ W`` (line 19, on every
tensor, biases included). refcurv's direction is the update ``θ ← θ + lr·d``:
``d = −p``. Both forms compute and return the same state (the dense form also refreshes
the inverses, so that the two state streams stay identical); they differ only in how the
direction is obtained.

No deviation from the order of Algorithm 15: the statistics of step ``t`` are computed at
the current parameters on the current mini-batch, before the direction.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..backend import xp_of
from ..errors import HyperParameterError
from ..linalg.tensor import contraction, kron_apply
from ..linalg.woodbury import spd_solve
from ._tensors import from_tensors, map_modes, to_tensors
from .base import Method, check_choice, check_int, check_nonnegative, check_positive, check_unit
from .registry import register


def tensor_index(layer, conv_modes=4):
    """Index maps of ``to_tensors``: for each parameter tensor of ``layer``, an integer
    array of the tensor's shape holding the row-major position in ``W`` of each entry."""
    out, d = layer.param_shape
    return to_tensors(layer, np.arange(out * d).reshape(out, d), conv_modes)


def batched_tensors(layer, U, conv_modes=4):
    """Per-sample layer matrices ``U`` ``(N, out, d)`` → list of ``(N, *tensor shape)``,
    i.e. ``to_tensors`` applied to every sample (by gathering with :func:`tensor_index`)."""
    xp = xp_of(U)
    flat = U.reshape(U.shape[0], -1)
    return [flat[:, xp.asarray(idx)] for idx in tensor_index(layer, conv_modes)]


def sample_statistics(Gs, statistics="per_sample"):
    """``[Ḡ^{(1)}, …, Ḡ^{(k)}]`` from stacked gradients ``Gs`` ``(N, d_1, …, d_k)`` (4.2):
    ``(1/N) Σ_n mat_i(G_n) mat_i(G_n)ᵀ`` (``"per_sample"``; the contraction of the stacked
    tensor along mode ``i+1`` sums over samples) or ``mat_i(Ḡ) mat_i(Ḡ)ᵀ`` with
    ``Ḡ = (1/N) Σ_n G_n`` (``"batch_mean"``, Algorithm 15 line 7)."""
    if statistics == "per_sample":
        N = Gs.shape[0]
        return [contraction(Gs, i + 1) / N for i in range(Gs.ndim - 1)]
    Gm = Gs.mean(axis=0)
    return [contraction(Gm, i) for i in range(Gm.ndim)]


def normalize(S):
    """(4.10): ``Ũ_i = S_i / (c_0^{k−1} Π_{j≠i} d_j)``, ``c_0 = (tr S_1 / Π_j d_j)^{1/k}``;
    all ``Ũ_i = 0`` if ``tr S_1 = 0``."""
    k = len(S)
    dims = [s.shape[0] for s in S]
    D = float(np.prod(dims))
    tr = float(xp_of(S[0]).trace(S[0]))
    if tr <= 0:
        return [0 * s for s in S]
    c0 = (tr / D) ** (1.0 / k)
    return [s / (c0 ** (k - 1) * (D / d)) for s, d in zip(S, dims)]


def damped_factors(S, damping):
    """``[Ũ_i + εI]`` (§4.3.3; Algorithm 15 line 16)."""
    xp = xp_of(S[0])
    return [U + damping * xp.eye(U.shape[0], dtype=U.dtype) for U in normalize(S)]


def f_tnt(factors):
    """Dense ``F_TNT = (Ũ_1+εI) ⊗ ⋯ ⊗ (Ũ_k+εI)`` in row-major ``vec̄`` order (Lemma 10,
    Proposition 1)."""
    return reduce(xp_of(factors[0]).kron, factors)


@register
@dataclass(frozen=True)
class TNT(Method):
    """TNT (thesis 003 Algorithm 15). Hyper-parameters: ``damping`` ε, EMA ``beta`` β,
    gradient ``momentum`` μ (Algorithm 15 line 1: μ = β = 0.9), decoupled ``weight_decay``
    γ, statistics / inverse frequencies ``T_stats`` (T_1) / ``T_inv`` (T_2),
    ``statistics`` ("per_sample" | "batch_mean"), ``fisher`` ("mc" = sampled labels |
    "empirical" = data labels, TNT-EF), ``conv_modes`` (4 | 3)."""

    damping: float = 0.01
    beta: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 0.0
    T_stats: int = 1
    T_inv: int = 1
    statistics: str = "per_sample"
    fisher: str = "mc"
    conv_modes: int = 4

    name = "tnt"
    seed_ref = "003 Ch.4 Alg. 15; (4.2), (4.8), (4.10), Prop. 1"
    summary = "tensor-normal Fisher ⊗_i(Ũ_i + εI) per parameter tensor, applied by mode products"

    def __post_init__(self):
        check_positive(self.damping, "damping")
        check_unit(self.beta, "beta")
        check_unit(self.momentum, "momentum")
        check_nonnegative(self.weight_decay, "weight_decay")
        check_int(self.T_stats, "T_stats")
        check_int(self.T_inv, "T_inv")
        check_choice(self.statistics, "statistics", ("per_sample", "batch_mean"))
        check_choice(self.fisher, "fisher", ("mc", "empirical"))
        check_int(self.conv_modes, "conv_modes")
        check_choice(self.conv_modes, "conv_modes", (3, 4))

    def init(self, net, params):
        return {"k": 0, "m": None, "stats": None, "factors": None, "inverses": None}

    def _refresh_stats(self, state):
        return state["stats"] is None or state["k"] % self.T_stats == 0

    def draw(self, rng, state, net, params, batch):
        """``{"seed", "labels"}``: one seed per step (drawn every step, so the stream does not
        depend on the counter); when this step refreshes the statistics with
        ``fisher="mc"``, labels ``y ~ p(·|x, θ)`` drawn from it by ``loss.sample``."""
        seed = int(rng.integers(2**63 - 1))
        labels = None
        if self.fisher == "mc" and self._refresh_stats(state):
            labels = batch.loss.sample(net.forward(params, batch.x), n_samples=1, seed=seed)[0]
        return {"seed": seed, "labels": labels}

    def batch_statistics(self, net, params, batch, labels):
        """Per layer, per tensor, ``[Ḡ^{(i)}]`` at ``labels`` (data labels if ``None``)."""
        y = batch.y if labels is None else labels
        U = net.per_sample_grads(params, batch.x, y, batch.loss)
        return [[sample_statistics(Gs, self.statistics) for Gs in batched_tensors(layer, u, self.conv_modes)]
                for layer, u in zip(net.layers_trainable, U)]

    def warm_start(self, state, net, params, batches, seed=0):
        """Algorithm 15 line 2: ``Ĝ^{(i)}`` = the mean of the statistics of ``batches`` (a
        :class:`Batch` or a list of them, e.g. the whole data set in mini-batches), labels
        drawn with ``seed``."""
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        if not batches:
            raise HyperParameterError("warm_start needs at least one batch")
        rng = np.random.default_rng(seed)
        acc = None
        for b in batches:
            labels = None
            if self.fisher == "mc":
                labels = b.loss.sample(net.forward(params, b.x), n_samples=1, seed=rng)[0]
            S = self.batch_statistics(net, params, b, labels)
            acc = S if acc is None else map_modes(lambda a, s: a + s, acc, S)
        return {**state, "stats": map_modes(lambda a: a / len(batches), acc)}

    def _update(self, state, net, params, batch, draws):
        """Shared by both forms (Algorithm 15 lines 5-17): momentum, statistics EMA, and at
        refreshes the damped normalized factors and their inverses."""
        k = state["k"]
        g = net.grad(params, batch.x, batch.y, batch.loss)
        m = g if state["m"] is None else [self.momentum * a + b for a, b in zip(state["m"], g)]
        stats = state["stats"]
        if self._refresh_stats(state):
            new = self.batch_statistics(net, params, batch, draws["labels"])
            b = self.beta
            stats = new if stats is None else map_modes(lambda s, n: b * s + (1 - b) * n, stats, new)
        factors, inverses = state["factors"], state["inverses"]
        if inverses is None or k % self.T_inv == 0:
            factors = [[damped_factors(S, self.damping) for S in layer] for layer in stats]
            inverses = map_modes(lambda F: spd_solve(F, xp_of(F).eye(F.shape[0], dtype=F.dtype), "Ũ_i + εI"), factors)
        return m, {"k": k + 1, "m": m, "stats": stats, "factors": factors, "inverses": inverses}

    def _direction(self, net, params, m, precondition):
        """``d = −(P(m) + γW)`` per layer, ``P`` applied tensor by tensor (line 18-19)."""
        out = []
        for j, (layer, mj, W) in enumerate(zip(net.layers_trainable, m, params)):
            P = [precondition(j, q, M) for q, M in enumerate(to_tensors(layer, mj, self.conv_modes))]
            out.append(-(from_tensors(layer, P) + self.weight_decay * W))
        return out

    def _fast(self, state, net, params, batch, draws):
        m, new_state = self._update(state, net, params, batch, draws)
        inv = new_state["inverses"]
        return self._direction(net, params, m, lambda j, q, M: kron_apply(inv[j][q], M)), new_state

    def _dense(self, state, net, params, batch, draws):
        m, new_state = self._update(state, net, params, batch, draws)
        fac = new_state["factors"]

        def solve(j, q, M):
            return spd_solve(f_tnt(fac[j][q]), M.ravel(), "F_TNT").reshape(M.shape)

        return self._direction(net, params, m, solve), new_state
