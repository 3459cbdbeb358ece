"""The conformance harness: :func:`check_implementation` runs hypothesis-generated cases
through a user's function, converts refcurv's float64 ground truth into the user's declared
:class:`~refcurv.testing.conventions.Conventions`, judges each result with
:func:`~refcurv.testing.compare.compare` and returns a :class:`Report` (design §7, §9;
anchor: data-apis' array-api-tests).

``impl(case)`` receives a :class:`Case` — the refcurv network and parameters, a PyTorch
module with the same weights (``case.module``, when torch is installed), the batch, the loss,
the hyper-parameters and refcurv's random draws (sampled labels, sketches) so that
Monte-Carlo quantities compare exactly — and returns its result in its conventions (NumPy
arrays or torch tensors, in the declared ``dtype``):

=====================  =====================================================================
target                 ``impl(case)`` returns
=====================  =====================================================================
``per_sample_grads``   ``(N, n)``, or one ``(N, …)`` array per tensor/layer of the declared order
``grad``               ``(n,)``, or one array per tensor/layer
``ggn``, ``hessian``   ``(n, n)``
``fisher``             ``(n, n)``; kind ``hyper["fisher"]`` (``"exact"``, ``"mc"`` with
                       ``case.labels`` ``(n_samples, N, …)``, ``"empirical"``)
``empirical_fisher``   ``(n, n)``
``blocks``             the diagonal blocks of ``hyper["of"]`` (``"ggn"`` default, ``"hessian"``,
                       ``"fisher"``, ``"empirical_fisher"``), one per layer (``bias="joint"``) or
                       per parameter tensor (``"separate"``)
``kfac_factors``       one ``(A, G)`` pair per layer (or per tensor), kind ``hyper["fisher"]``
``gram``               ``(N, N)``: ``K_ij = g_iᵀ g_j`` of the user's per-sample gradients
a method name          a list of ``steps`` results, each the direction, or ``(direction,
                       curvature)`` with ``curvature`` the dense ``(n, n)`` matrix the step
                       preconditions with (``None`` to skip it); ``case.steps[k]`` holds step
                       ``k``'s parameters, batch and draws (state is the impl's to carry)
=====================  =====================================================================

**Tolerances** (:func:`refcurv.testing.tolerance.tolerance`, dtype = the declared one):
``n = N · P`` (samples × parameters: a bound on the length of every sum these quantities
accumulate; ``× T`` locations for conv Kronecker factors), ``cond = 1`` for products and sums,
and for directions ``cond = κ(C)`` of the step's curvature ``C`` (forward error of a solve).
A method's reference is its dense form (the definition, solved directly): an implementation
that stops an iteration early (Shampoo's coupled-Newton roots at ``newton_tol``, Hessian-free
CG) differs from it by that iteration's tolerance, not by rounding, and fails the check unless
run to convergence (``root_method="eigh"``; measured: refcurv's own Newton-root Shampoo differs
from its dense form by ~2e-11, its CG by ~4e-6).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .. import curvature as cv
from ..errors import ArgumentTypeError, HyperParameterError, ImplementationError, RefcurvError
from .compare import as_numpy, compare
from .conventions import Conventions, ConventionsError

QUANTITIES = ("per_sample_grads", "grad", "ggn", "hessian", "fisher", "empirical_fisher", "blocks",
              "kfac_factors", "gram")
NETS = ("mlp", "cnn", "seq")
LOSSES = ("mse", "cross_entropy", "bce")
LR = 0.1  # step size of the parameter trajectory of a method check (θ_{k+1} = θ_k + LR·d_k)




# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Step:
    """Step ``k`` of a method check: the parameters (refcurv's trajectory), the batch and the
    draws refcurv used (``labels``: ``draws.labels``, ``(n_samples, N, …)`` or ``None``)."""

    k: int
    params: list
    x: np.ndarray
    y: np.ndarray
    draws: Any
    case: Any = field(repr=False, compare=False, default=None)

    @property
    def labels(self):
        return None if self.draws is None else self.draws.labels

    def module(self):
        """A ``torch.nn.Sequential`` with this step's weights (needs torch)."""
        return self.case.torch_module(self.params)


@dataclass(frozen=True)
class Case:
    """One generated problem, as ``impl`` receives it (module docstring)."""

    target: str
    spec: tuple
    input_shape: tuple
    loss_name: str
    params: list
    x: np.ndarray
    y: np.ndarray
    hyper: dict
    conventions: Conventions
    dtype: Any
    seed: int
    labels: Any = None
    steps: tuple = ()

    @cached_property
    def net(self):
        return build(self.spec, self.input_shape)

    @property
    def loss(self):
        from ..nn import BCE, MSE, CrossEntropy
        return {"mse": MSE, "cross_entropy": CrossEntropy, "bce": BCE}[self.loss_name]()

    @property
    def N(self):
        return int(self.x.shape[0])

    @property
    def n_outputs(self):
        """C, or ``(T, C)`` for a sequence output (what :meth:`Conventions.scales` takes)."""
        out = self.net.feature_shapes(self.input_shape)[-1]
        return int(out[0]) if len(out) == 1 else tuple(int(d) for d in out)

    @property
    def draws(self):
        return self.steps[0].draws if self.steps else None

    def torch_module(self, params=None):
        """``torch.nn.Sequential`` with the same weights (``params``: default the case's), in
        the case's dtype. Uses ``refcurv.torch.torch_module`` when the bridge is installed."""
        import torch
        params = self.params if params is None else params
        tdt = torch.float32 if np.dtype(self.dtype) == np.float32 else torch.float64
        try:
            from ..torch import torch_module
        except ImportError:
            torch_module = None
        if torch_module is None:
            return _torch_module(self.spec, params, tdt)
        return torch_module(self.net, [np.asarray(W, dtype=np.float64) for W in params], dtype=tdt)

    @cached_property
    def module(self):
        return self.torch_module()

    def torch_loss(self):
        """The PyTorch loss module of the case's loss with the declared ``reduction``. For a
        sequence output ``(N, T, C)`` cross-entropy gets the logits as ``(N, C, T)`` (PyTorch's
        class axis), so that it is the loss :meth:`Conventions.scales` states."""
        import torch
        cls = {"mse": torch.nn.MSELoss, "cross_entropy": torch.nn.CrossEntropyLoss,
               "bce": torch.nn.BCEWithLogitsLoss}[self.loss_name]
        mod = cls(reduction=self.conventions.reduction)
        if self.loss_name == "cross_entropy" and isinstance(self.n_outputs, tuple):
            return lambda f, y: mod(f.transpose(-1, -2), y)
        return mod

    def tensors(self, *arrays):
        """torch tensors of the given arrays (integer class labels as int64, the rest in the
        case's dtype)."""
        import torch
        tdt = torch.float32 if np.dtype(self.dtype) == np.float32 else torch.float64
        out = [torch.as_tensor(np.asarray(a)).long() if np.asarray(a).dtype.kind in "iu"
               else torch.as_tensor(np.asarray(a)).to(tdt) for a in arrays]
        return out[0] if len(out) == 1 else out

    def describe(self):
        layers = " ".join(_spec_word(s) for s in self.spec)
        return (f"{layers} | input {self.input_shape} | loss {self.loss_name} | N = {self.N} | seed {self.seed}"
                + (f" | hyper {self.hyper}" if self.hyper else ""))


def _spec_word(s):
    if s[0] == "linear":
        return f"Linear({s[1]}→{s[2]}{'' if s[3] else ', no bias'})"
    if s[0] == "conv":
        return f"Conv2d({s[1]}→{s[2]}, k={s[3]}, s={s[4]}, p={s[5]}{'' if s[6] else ', no bias'})"
    if s[0] == "act":
        return s[1]
    return "mean over T" if s[0] == "mean" else "flatten"


def _torch_module(spec, params, tdt):
    """A torch.nn.Sequential from a spec and refcurv matrices (bias = last column; conv weight
    ``W[:, :-1].reshape(out, c_in, kh, kw)`` as the README's conv unfolding states)."""
    import torch
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "softplus": torch.nn.Softplus}
    mods, j = [], 0
    with torch.no_grad():
        for s in spec:
            if s[0] in ("linear", "conv"):
                W = np.asarray(params[j], dtype=np.float64)
                j += 1
                bias = s[3] if s[0] == "linear" else s[6]
                if s[0] == "linear":
                    m = torch.nn.Linear(s[1], s[2], bias=bias)
                else:
                    m = torch.nn.Conv2d(s[1], s[2], s[3], stride=s[4], padding=s[5], bias=bias)
                m = m.to(tdt)
                w = W[:, :-1] if bias else W
                m.weight.copy_(torch.as_tensor(w.reshape(m.weight.shape)))
                if bias:
                    m.bias.copy_(torch.as_tensor(W[:, -1]))
                mods.append(m)
            elif s[0] == "act":
                mods.append(acts[s[1]]())
            elif s[0] == "mean":
                mods.append(_SequenceMean())
            else:
                mods.append(torch.nn.Flatten())
    return torch.nn.Sequential(*mods)


def _SequenceMean():
    """torch module of refcurv's ``SequenceMean``: ``(N, T, d) -> (N, d)``, the mean over T."""
    import torch

    class SequenceMean(torch.nn.Module):
        def forward(self, a):
            return a.mean(dim=-2)
    return SequenceMean()


def build(spec, input_shape):
    """refcurv ``Sequential`` from a spec (:mod:`refcurv.testing.strategies`, plus
    ``("mean",)`` for :class:`~refcurv.nn.SequenceMean`)."""
    from ..nn import Conv2d, Flatten, Linear, ReLU, SequenceMean, Sequential, Sigmoid, Softplus, Tanh
    acts = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "softplus": Softplus}  # strategies.ACTIVATIONS
    layers = []
    for sp in spec:
        if sp[0] == "linear":
            layers.append(Linear(sp[1], sp[2], bias=sp[3]))
        elif sp[0] == "conv":
            layers.append(Conv2d(sp[1], sp[2], sp[3], stride=sp[4], padding=sp[5], bias=sp[6]))
        elif sp[0] == "act":
            layers.append(acts[sp[1]]())
        elif sp[0] == "mean":
            layers.append(SequenceMean())
        else:
            layers.append(Flatten())
    return Sequential(layers, input_shape=tuple(input_shape))


# ---------------------------------------------------------------------- report
@dataclass
class CaseResult:
    """Verdicts of one case: ``{quantity: Verdict}``; ``ok`` iff all hold."""

    index: int
    description: str
    verdicts: dict
    case: Any = field(repr=False, default=None)

    @property
    def ok(self):
        return all(v.ok for v in self.verdicts.values())

    @property
    def worst(self):
        """``(quantity, verdict)`` with the largest error / tolerance."""
        return max(self.verdicts.items(), key=lambda kv: kv[1].error / kv[1].tolerance)

    @property
    def ratio(self):
        q, v = self.worst
        return v.error / v.tolerance


@dataclass
class Report:
    """Outcome of :func:`check_implementation`. ``cases``: every case run (generated and
    shrinking); ``failure``: the shrunk failing case (``None`` if all passed); ``saved``: the
    ``.npz`` of the failure; ``reproducer``: a snippet that replays it."""

    target: str
    conventions: Conventions
    dtype: str
    cases: list
    failure: Any = None
    saved: Any = None
    reproducer: Any = None

    @property
    def ok(self):
        return self.failure is None and all(c.ok for c in self.cases)

    def __bool__(self):
        return self.ok

    @property
    def worst(self):
        """The case with the largest error / tolerance (the failure if there is one)."""
        if self.failure is not None:
            return self.failure
        return max(self.cases, key=lambda c: c.ratio) if self.cases else None

    def __str__(self):
        n_fail = sum(not c.ok for c in self.cases)
        head = (f"check_implementation({self.target!r}, dtype {self.dtype}): "
                f"{'PASS' if self.ok else 'FAIL'} — {len(self.cases)} cases, {n_fail} failing")
        lines = [head]
        w = self.worst
        if w is not None:
            q, v = w.worst
            lines.append(f"{'failing' if not w.ok else 'worst'} case: {w.description}")
            lines.append(f"  {q}: {v}")
            bad = [f"{k}: error {u.error:.3e} > tolerance {u.tolerance:.3e}" for k, u in w.verdicts.items()
                   if not u.ok and k != q]
            lines += ["  also " + b for b in bad[:8]]
        if self.saved:
            lines.append(f"saved: {self.saved}")
        if self.reproducer:
            lines.append("reproducer:\n" + self.reproducer)
        return "\n".join(lines)


# ---------------------------------------------------------------------- references
def _f64(params):
    return [np.asarray(W, dtype=np.float64) for W in params]


def _locations(net, x):
    shapes = net.feature_shapes(tuple(x.shape[1:]))
    return [m.n_locations(shapes[k]) if hasattr(m, "n_locations") else 1
            for k, m in zip(net.trainable_index, net.layers_trainable)]


def _matrix(which, net, params, x, y, loss, hyper, labels):
    """``(M, kind)`` of one of the dense curvature matrices; ``kind`` the Fisher kind that
    decides its loss scaling (``"empirical"`` scales with ``s·p``, the others with ``s``)."""
    if which == "ggn":
        return cv.ggn(net, params, x, y, loss), "exact"
    if which == "hessian":
        return cv.hessian(net, params, x, y, loss), "exact"
    if which == "empirical_fisher":
        return cv.empirical_fisher(net, params, x, y, loss), "empirical"
    kind = hyper.get("fisher", "exact")
    if kind == "mc":
        return cv.fisher(net, params, x, loss=loss, kind="mc", labels=labels), "mc"
    if kind == "empirical":
        return cv.fisher(net, params, x, y, loss, kind="empirical"), "empirical"
    return cv.fisher(net, params, x, loss=loss, kind="exact"), "exact"


def reference(case):
    """refcurv's float64 result for a quantity case, in the case's conventions: a list of
    ``(name, array, n, cond)`` (one entry per compared array)."""
    conv, net, loss = case.conventions, case.net, case.loss
    params, x, y = _f64(case.params), np.asarray(case.x, dtype=np.float64), case.y
    N, P = case.N, net.n_params
    s, p = conv.scales(loss, case.n_outputs, N)
    n = N * P * max(_locations(net, x))  # the longest sum: samples × parameters × locations
    t = case.target
    if t == "per_sample_grads":
        return [("per_sample_grads", conv.vector(cv.per_sample_grads(net, params, x, y, loss), net, p), n, 1.0)]
    if t == "grad":
        return [("grad", conv.vector(cv.grad(net, params, x, y, loss), net, s), n, 1.0)]
    if t == "gram":
        U = p * cv.per_sample_grads(net, params, x, y, loss)
        return [("gram", U @ U.T, n, 1.0)]
    if t in ("ggn", "hessian", "fisher", "empirical_fisher"):
        M, kind = _matrix(t, net, params, x, y, loss, case.hyper, case.labels)
        return [(t, conv.matrix(M, net, s * p if kind == "empirical" else s), n, 1.0)]
    if t == "blocks":
        M, kind = _matrix(case.hyper.get("of", "ggn"), net, params, x, y, loss, case.hyper, case.labels)
        blocks = conv.blocks(M, net, s * p if kind == "empirical" else s)
        return [(f"block {j}", B, n, 1.0) for j, B in enumerate(blocks)]
    if t == "kfac_factors":
        kind = case.hyper.get("fisher", "exact")
        kw = dict(kind=kind, labels=case.labels if kind == "mc" else None)
        Fe = cv.kfac_factors(net, params, x, y, loss, conv="expand", **kw)
        Fr = cv.kfac_factors(net, params, x, y, loss, conv="reduce", **kw)
        T = _locations(net, x)
        pairs = conv.kfac_factors(Fe, Fr, net, T, g_scale=s * p if kind == "empirical" else s)
        out = []
        for j, (A, G) in enumerate(pairs):
            out += [(f"A {j}", A, n, 1.0), (f"G {j}", G, n, 1.0)]
        return out
    raise HyperParameterError(f"unknown target {t!r}")  # pragma: no cover - checked on entry


# ---------------------------------------------------------------------- methods
def _method_run(case, method_name):
    """Run refcurv's dense form over the case's steps; per step the user's reference
    ``(direction, curvature, cond)`` in the declared conventions, and the Step objects."""
    from ..methods import REGISTRY, Batch
    conv, net, loss = case.conventions, case.net, case.loss
    hyper = dict(case.hyper)
    s, _ = conv.scales(loss, case.n_outputs, case.N)
    cls = REGISTRY[method_name]
    _check_method_conventions(method_name, conv, hyper)  # (checked on entry; load_case too)
    lam = hyper.get("damping")
    if method_name == "kfac" and conv.damping == "method" and s != 1.0:
        # (sΓ + √λ/π' I) ⊗ (Ω + π'√λ I) = s·[(Γ + √(λ/s)/π I) ⊗ (Ω + π√(λ/s) I)], π' = π/√s:
        # the user's direction is refcurv's at damping λ/s, the curvature s times it
        hyper["damping"] = lam / s
    method = cls(**hyper)
    rng = np.random.default_rng(case.seed)
    state = method.init(net, case.params)
    params = _f64(case.params)
    refs, steps = [], []
    refresh_factors = None
    for k, (xk, yk) in enumerate(case.batches):
        x64 = np.asarray(xk, dtype=np.float64)
        batch = Batch(x64, yk, loss)
        draws = method.draw(rng, state, net, params, batch)
        d, new = method.step(state, net, params, batch, draws=draws, dense=True)
        try:
            C = method.curvature(new, net, params, batch, draws).todense()
        except RefcurvError:
            C = None
        if method_name == "kfac" and new.diagnostics.get("refreshed"):
            refresh_factors = (new.Gamma, new.Omega)
        if method_name == "kfac" and conv.damping != "method":
            # the user's damping placement, from the undamped factors of the last inverse refresh
            blocks = []
            for Gm, Om in zip(*refresh_factors):
                Gu = s * np.asarray(Gm, dtype=np.float64)
                Om = np.asarray(Om, dtype=np.float64)
                if conv.damping == "sqrt":
                    r = np.sqrt(lam)
                    blocks.append(np.kron(Gu + r * np.eye(len(Gu)), Om + r * np.eye(len(Om))))
                else:
                    blocks.append(np.kron(Gu, Om) + lam * np.eye(len(Gu) * len(Om)))
            C = _block_diag(blocks)
            m = np.concatenate([np.ravel(mi) for mi in new.m])
            d_flat = -np.linalg.solve(C, s * m)
        else:
            d_flat = np.concatenate([np.ravel(di) for di in d])
            if C is not None:
                C = s * C
            if method_name == "sgd":
                d_flat = s * d_flat
        cond = 1.0
        if C is not None:
            w = np.linalg.eigvalsh((C + C.T) / 2)
            cond = float(w.max() / w.min()) if w.min() > 0 else float("inf")
        refs.append((conv.signed(conv.vector(d_flat, net)), None if C is None else conv.matrix(C, net), cond))
        cast = np.dtype(case.dtype)
        steps.append(Step(k, [W.astype(cast) for W in params], xk, yk, draws, case))
        # the next step's parameters, rounded to the implementation's dtype (it receives
        # them rounded, so the reference is computed from exactly what it sees)
        params = [(W + LR * np.asarray(Di, dtype=np.float64)).astype(cast).astype(np.float64)
                  for W, Di in zip(params, d)]
        state = new
    return refs, tuple(steps)


def _check_method_conventions(method_name, conv, hyper):
    """Conventions a method check cannot convert, refused in one line before any case."""
    from ..methods import REGISTRY
    if conv.bias == "separate":
        raise ConventionsError(f"Conventions.bias='separate' is not available for method {method_name!r} (its blocks are joint)")
    if conv.conv == "backpack":
        raise ConventionsError(f"Conventions.conv='backpack' is a factor convention; method {method_name!r} has conv "
                               "'expand' or 'reduce'")
    if conv.damping != "method" and method_name != "kfac":
        raise ConventionsError(f"Conventions.damping={conv.damping!r} is for the Kronecker-factored KFAC, not {method_name!r}")
    fisher = hyper.get("fisher", REGISTRY[method_name].hyper_parameters().get("fisher"))
    if conv.loss_scale != 1.0 and (method_name not in ("kfac", "sgd") or fisher == "empirical"):
        # a scaled loss scales the curvature of these by s (so the damping by 1/s); other
        # methods' statistics (sketches, Gram matrices, BFGS pairs) scale differently
        raise ConventionsError(
            f"Conventions.loss_scale={conv.loss_scale!r} with method {method_name!r}: only kfac (fisher 'exact'/'mc') "
            "and sgd convert a scaled loss; declare loss_scale=1 and give refcurv's loss")


def _block_diag(blocks):
    from scipy.linalg import block_diag
    return block_diag(*blocks)


# ---------------------------------------------------------------------- normalizing impl results
def _arr(r, what, dtype):
    if r is None:
        raise ImplementationError(f"impl returned None for {what}; expected an array of dtype {np.dtype(dtype)}")
    try:
        a = as_numpy(r, what)
    except RefcurvError as e:
        raise ImplementationError(f"impl returned an invalid {what}: {e}") from None
    if a.dtype != np.dtype(dtype):
        raise ImplementationError(f"impl returned {what} of dtype {a.dtype}; the check declared dtype {np.dtype(dtype)}")
    return a


def _vectors(r, what, lead, n, dtype, column_major):
    """``(…lead, n)`` from an array or a list of per-tensor/per-layer arrays ``(…lead, …)``."""
    if isinstance(r, (list, tuple)):
        parts = []
        for j, a in enumerate(r):
            a = _arr(a, f"{what}[{j}]", dtype)
            if a.shape[:len(lead)] != lead:
                raise ImplementationError(f"impl returned {what}[{j}] of shape {a.shape}; expected leading axes {lead}")
            if column_major and a.ndim == len(lead) + 2:
                a = np.swapaxes(a, -1, -2)
            parts.append(a.reshape(lead + (-1,)))
        a = np.concatenate(parts, axis=-1) if parts else np.zeros(lead + (0,))
    else:
        a = _arr(r, what, dtype)
    if a.shape != lead + (n,):
        raise ImplementationError(f"impl returned {what} with {a.shape} entries; expected shape {lead + (n,)}")
    return a


def _normalize(case, res, refs):
    """The user's result as a list of arrays parallel to ``refs``."""
    t, dt, conv = case.target, case.dtype, case.conventions
    P = case.net.n_params
    cm = conv.order == "column_major"
    if t == "per_sample_grads":
        return [_vectors(res, t, (case.N,), P, dt, cm)]
    if t == "grad":
        return [_vectors(res, t, (), P, dt, cm)]
    if t in ("ggn", "hessian", "fisher", "empirical_fisher", "gram"):
        a = _arr(res, t, dt)
        if a.shape != refs[0][1].shape:
            raise ImplementationError(f"impl returned {t} of shape {a.shape}; expected {refs[0][1].shape}")
        return [a]
    if t == "blocks":
        if not isinstance(res, (list, tuple)) or len(res) != len(refs):
            raise ImplementationError(
                f"impl must return a list of {len(refs)} blocks (one per {'parameter tensor' if conv.bias == 'separate' else 'layer'}), "
                f"got {type(res).__name__}{' of length ' + str(len(res)) if isinstance(res, (list, tuple)) else ''}")
        out = []
        for j, (r, (_, e, _, _)) in enumerate(zip(res, refs)):
            a = _arr(r, f"blocks[{j}]", dt)
            if a.shape != e.shape:
                raise ImplementationError(f"impl returned blocks[{j}] of shape {a.shape}; expected {e.shape}")
            out.append(a)
        return out
    # kfac_factors
    n_pairs = len(refs) // 2
    if not isinstance(res, (list, tuple)) or len(res) != n_pairs:
        raise ImplementationError(
            f"impl must return a list of {n_pairs} (A, G) pairs (one per {'parameter tensor' if conv.bias == 'separate' else 'layer'}), "
            f"got {type(res).__name__}{' of length ' + str(len(res)) if isinstance(res, (list, tuple)) else ''}")
    out = []
    for j, pair in enumerate(res):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ImplementationError(f"impl returned kfac_factors[{j}] = {type(pair).__name__}; expected a pair (A, G)")
        for name, r, (_, e, _, _) in zip("AG", pair, refs[2 * j:2 * j + 2]):
            a = _arr(r, f"kfac_factors[{j}] {name}", dt)
            if a.shape != e.shape:
                raise ImplementationError(f"impl returned kfac_factors[{j}] {name} of shape {a.shape}; expected {e.shape}")
            out.append(a)
    return out


def run_case(case, impl):
    """Run one case through ``impl`` and judge it: a :class:`CaseResult` (index 0)."""
    conv, dt = case.conventions, case.dtype
    if case.target in QUANTITIES:
        refs = reference(case)
        got = _normalize(case, impl(case), refs)
        verdicts = {name: compare(a, e, dtype=dt, n=n, cond=c) for a, (name, e, n, c) in zip(got, refs)}
        return CaseResult(0, case.describe(), verdicts, case)
    refs = case._method_refs
    res = impl(case)
    if not isinstance(res, (list, tuple)) or len(res) != len(refs):
        raise ImplementationError(
            f"impl must return a list of {len(refs)} per-step results (direction or (direction, curvature)), "
            f"got {type(res).__name__}{' of length ' + str(len(res)) if isinstance(res, (list, tuple)) else ''}")
    P, N = case.net.n_params, case.N
    verdicts = {}
    for k, (r, (d_ref, C_ref, cond)) in enumerate(zip(res, refs)):
        C_got = None
        if isinstance(r, dict):
            d_got, C_got = r.get("direction"), r.get("curvature")
        elif isinstance(r, tuple) and len(r) == 2 and (r[1] is None or _shape(r[1]) == (P, P)):
            d_got, C_got = r
        else:
            d_got = r
        d_got = _vectors(d_got, f"step {k} direction", (), P, dt, conv.order == "column_major")
        verdicts[f"step {k} direction"] = compare(d_got, d_ref, dtype=dt, n=N * P, cond=max(cond, 1.0) if np.isfinite(cond) else 1e300)
        if C_got is not None and C_ref is not None:
            C_got = _arr(C_got, f"step {k} curvature", dt)
            if C_got.shape != C_ref.shape:
                raise ImplementationError(f"impl returned step {k} curvature of shape {C_got.shape}; expected {C_ref.shape}")
            verdicts[f"step {k} curvature"] = compare(C_got, C_ref, dtype=dt, n=N * P)
    return CaseResult(0, case.describe(), verdicts, case)


def _is_array(a):
    return hasattr(a, "shape") and not isinstance(a, (list, tuple))


def _shape(a):
    return tuple(getattr(a, "shape", ()))


# ---------------------------------------------------------------------- case generation
def _problem_strategy(nets, losses, max_batch):
    from hypothesis import strategies as st

    from .strategies import cnn_specs, mlp_specs

    @st.composite
    def problem(draw):
        kind = draw(st.sampled_from(nets))
        lname = draw(st.sampled_from(losses))
        n_out = draw(st.integers(2, 4)) if lname == "cross_entropy" else None
        if kind == "seq":
            spec, shape, out = draw(_seq_specs(n_out))
        else:
            spec, shape, out = draw(mlp_specs(n_out=n_out) if kind == "mlp" else cnn_specs(n_out=n_out))
        N = draw(st.integers(2, max_batch))  # N ≥ 2: a missing 1/N must show
        seed = draw(st.integers(0, 2**31 - 1))
        return spec, shape, out, lname, N, seed
    return problem()


def _seq_specs(n_out):
    """Linear layers on sequences ``(T, d)`` (weight sharing over T positions): the expand
    setting (outputs ``(T, C)``, the loss summed over positions) or the reduce setting (a
    ``SequenceMean`` before the last layer)."""
    from hypothesis import strategies as st

    from .strategies import ACTIVATIONS

    @st.composite
    def seq(draw):
        T, d = draw(st.integers(2, 3)), draw(st.integers(1, 3))
        n_layers = draw(st.integers(1, 2))
        widths = [d] + [draw(st.integers(1, 3)) for _ in range(n_layers)]
        if n_out is not None:
            widths[-1] = n_out
        reduce_at = draw(st.sampled_from([None] + list(range(n_layers))))
        spec = []
        for i in range(n_layers):
            if reduce_at == i:
                spec.append(("mean",))
            spec.append(("linear", widths[i], widths[i + 1], draw(st.booleans())))
            if i < n_layers - 1:
                spec.append(("act", draw(st.sampled_from(tuple(ACTIVATIONS)))))
        return tuple(spec), (T, d), widths[-1]
    return seq()


def _data(spec, shape, n_out, lname, N, rng, dtype):
    net = build(spec, shape)
    out_shape = net.feature_shapes(tuple(shape))[-1]
    lead = (N,) + tuple(out_shape[:-1])  # (N,) or (N, T) for a sequence output
    params = [(2.0 * W).astype(dtype) for W in net.init(rng)]
    x = rng.standard_normal((N,) + tuple(shape)).astype(dtype)
    if lname == "mse":
        y = rng.standard_normal(lead + (n_out,)).astype(dtype)
    elif lname == "cross_entropy":
        y = rng.integers(0, n_out, size=lead)
    else:
        y = rng.random(lead + (n_out,)).astype(dtype)
    return net, params, x, y


def make_case(target, spec, shape, n_out, lname, N, seed, hyper, conventions, dtype, steps=3):
    """The :class:`Case` of one drawn problem (deterministic in its arguments)."""
    rng = np.random.default_rng(seed)
    net, params, x, y = _data(spec, shape, n_out, lname, N, rng, dtype)
    loss = {"mse": 0, "cross_entropy": 1, "bce": 2}[lname]
    from ..nn import BCE, MSE, CrossEntropy
    loss = (MSE, CrossEntropy, BCE)[loss]()
    labels = None
    if target in ("fisher", "kfac_factors", "blocks") and hyper.get("fisher") == "mc":
        f = net.forward(_f64(params), np.asarray(x, dtype=np.float64))
        labels = np.asarray(loss.sample(f, n_samples=hyper.get("n_samples", 2), seed=rng))
    case = Case(target, spec, tuple(shape), lname, params, x, y, dict(hyper), conventions, np.dtype(dtype), seed, labels)
    if target not in QUANTITIES:
        batches = [(x, y)] + [_data(spec, shape, n_out, lname, N, rng, dtype)[2:] for _ in range(steps - 1)]
        object.__setattr__(case, "batches", batches)
        refs, st = _method_run(case, target)
        object.__setattr__(case, "steps", st)
        object.__setattr__(case, "_method_refs", refs)
    return case


def _hyper_strategy(target, hyper):
    """Drawn hyper-parameters: a method's ``damping`` in ``[1e-2, 1]`` unless given; the rest
    from ``hyper``."""
    from hypothesis import strategies as st

    from ..methods import REGISTRY
    if target in QUANTITIES or "damping" in hyper or "damping" not in REGISTRY[target].hyper_parameters():
        return st.just(dict(hyper))
    return st.floats(-2, 0).map(lambda e: {**hyper, "damping": float(10.0**e)})


# ---------------------------------------------------------------------- save / load
def save_case(case, path):
    """Write a case as a plain ``.npz`` (no pickles): arrays plus JSON strings."""
    arrays = {"x": np.asarray(case.x), "y": np.asarray(case.y)}
    for j, W in enumerate(case.params):
        arrays[f"params_{j}"] = np.asarray(W)
    if case.labels is not None:
        arrays["labels"] = np.asarray(case.labels)
    meta = dict(target=case.target, spec=case.spec, input_shape=case.input_shape, loss=case.loss_name,
                n_outputs=case.n_outputs, N=case.N, seed=case.seed, hyper=case.hyper,
                conventions=case.conventions.asdict(), dtype=str(np.dtype(case.dtype)), steps=len(case.steps),
                n_params=len(case.params))
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    return path


def load_case(path):
    """The :class:`Case` saved by a failing check (regenerated from its seed and checked
    against the stored arrays)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        stored = {k: z[k] for k in z.files if k != "meta"}
    spec = tuple(tuple(s) for s in meta["spec"])
    case = make_case(meta["target"], spec, tuple(meta["input_shape"]), meta["n_outputs"], meta["loss"], meta["N"],
                     meta["seed"], meta["hyper"], Conventions.from_dict(meta["conventions"]), np.dtype(meta["dtype"]),
                     steps=max(meta["steps"], 1))
    if not np.array_equal(stored["x"], case.x) or any(
            not np.array_equal(stored[f"params_{j}"], W) for j, W in enumerate(case.params)):
        raise ImplementationError(f"{path}: the stored arrays differ from the regenerated case (another refcurv version?)")
    return case


def _reproducer(path, target):
    return (f"from refcurv.testing.harness import load_case, run_case\n"
            f"case = load_case({str(path)!r})   # target {target!r}\n"
            f"print(run_case(case, impl).verdicts)   # impl: your function")


# ---------------------------------------------------------------------- entry point
def check_implementation(target, impl, conventions=None, dtype=np.float64, max_examples=20, steps=3, hyper=None,
                         nets=None, losses=LOSSES, seed=0, save_dir=None, max_batch=4):
    """Check ``impl`` against refcurv on hypothesis-generated cases (module docstring).

    ``target``: a quantity of :data:`QUANTITIES` or a registered method name; ``conventions``:
    the impl's :class:`Conventions` (default refcurv's); ``dtype``: the impl's precision
    (inputs are rounded to it, the reference is float64 from the rounded inputs, and results
    are judged at its unit roundoff); ``steps``: steps of a method check (state carried by
    the impl); ``hyper``: fixed hyper-parameters (a method's, or ``fisher``/``n_samples``/
    ``of`` for quantities; a method's ``damping`` is drawn in ``[1e-2, 1]`` unless given);
    ``nets``: of ``"mlp"``, ``"cnn"``, ``"seq"`` (Linear layers on sequences ``(T, d)``, with
    or without a ``SequenceMean``; default all three for quantities and KFAC, MLPs and CNNs
    for the other methods); ``losses``: of ``"mse"``, ``"cross_entropy"``,
    ``"bce"``; ``seed``: hypothesis' seed; ``save_dir``: where a failing case is saved as
    ``<target>-failure.npz``. Returns a :class:`Report`; an ``impl`` result of the wrong
    form raises :class:`ImplementationError` (one line)."""
    from ..methods import REGISTRY
    from ..nn._checks import check_callable

    if not isinstance(target, str) or (target not in QUANTITIES and target not in REGISTRY):
        raise HyperParameterError(f"target must be one of {QUANTITIES} or a registered method "
                                  f"({sorted(REGISTRY)}), got {target!r}")
    check_callable(impl, "impl")
    if isinstance(impl, type):  # numpy.float64 and the like are callable, but not an implementation
        raise ArgumentTypeError(f"impl must be a function of the case, got the class {impl.__qualname__}")
    conventions = Conventions() if conventions is None else conventions
    if not isinstance(conventions, Conventions):
        raise ConventionsError(f"conventions must be a refcurv.testing.Conventions, got {type(conventions).__name__}")
    conventions.check_quantity(target)
    if hyper is not None and (not isinstance(hyper, dict) or not all(isinstance(k, str) for k in hyper)):
        raise HyperParameterError(f"hyper must be None or a dict {{name: value}}, got {type(hyper).__name__}")
    hyper = {} if hyper is None else dict(hyper)
    _check_hyper(target, hyper)
    if target not in QUANTITIES:
        _check_method_conventions(target, conventions, hyper)
    if target == "kfac":
        if "conv" in hyper and hyper["conv"] != conventions.conv:
            raise ConventionsError(f"hyper conv={hyper['conv']!r} contradicts Conventions.conv={conventions.conv!r}")
        hyper["conv"] = conventions.conv
    try:
        with warnings.catch_warnings():  # NumPy's deprecation notes on odd aliases: refused below anyway
            warnings.simplefilter("ignore", DeprecationWarning)
            dt = np.dtype(dtype)
    except TypeError:
        raise HyperParameterError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise HyperParameterError(f"dtype must be float32 or float64, got {dt}")
    for name, v, lo in (("max_examples", max_examples, 1), ("steps", steps, 1), ("max_batch", max_batch, 2)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < lo:
            raise HyperParameterError(f"{name} must be an int >= {lo}, got {v!r}")
    if nets is None:  # sequences for the quantities and KFAC (the methods tested on them)
        nets = NETS if target in QUANTITIES or target in ("kfac", "sgd") else ("mlp", "cnn")
    nets, losses = _words(nets, "nets", NETS), _words(losses, "losses", LOSSES)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HyperParameterError(f"seed must be a non-negative int, got {seed!r}")
    if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
        raise HyperParameterError(f"save_dir must be None or a path, got {type(save_dir).__name__}")
    if target in ("kbfgs-mlp", "kbfgs-l-mlp") and "cnn" in nets:
        nets = tuple(k for k in nets if k == "mlp") or ("mlp",)  # these methods are for Linear layers only

    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed
    except ImportError:
        raise ImportError("refcurv.testing.check_implementation needs hypothesis: pip install 'refcurv[test]'") from None

    cases, state = [], {"last_failure": None, "impl_error": None}

    @hseed(seed)
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=False, print_blob=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink))
    @given(_problem_strategy(nets, losses, max_batch), _hyper_strategy(target, hyper))
    def run(problem, hyp):
        spec, shape, n_out, lname, N, s = problem
        case = make_case(target, spec, shape, n_out, lname, N, s, hyp, conventions, dt, steps)
        try:
            result = run_case(case, impl)
        except ImplementationError as e:
            state["impl_error"] = e
            raise
        result.index = len(cases)
        cases.append(result)
        if not result.ok:
            state["last_failure"] = result
            raise AssertionError(str(result.worst))

    try:
        run()
    except ImplementationError:
        raise state["impl_error"] from None
    except AssertionError:
        pass
    report = Report(target, conventions, str(dt), cases, failure=state["last_failure"])
    if report.failure is not None:
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, f"{target}-failure.npz")
            report.saved = save_case(report.failure.case, path)
            report.reproducer = _reproducer(path, target)
        else:
            report.reproducer = ("check_implementation(..., save_dir=DIR) saves the failing case; then\n"
                                 + _reproducer(os.path.join("DIR", f"{target}-failure.npz"), target))
    return report


QUANTITY_HYPER = {"fisher": ("exact", "mc", "empirical"), "n_samples": None,
                  "of": ("ggn", "hessian", "fisher", "empirical_fisher")}


def _check_hyper(target, hyper):
    """Refuse hyper-parameters the target does not take, before any case runs."""
    from ..methods import REGISTRY
    if target not in QUANTITIES:
        probe = dict(hyper)
        if "damping" in REGISTRY[target].hyper_parameters():
            probe.setdefault("damping", 0.1)  # drawn per case; any valid value to probe the rest
        REGISTRY[target](**probe)  # the method's own one-line refusal
        return
    for k, v in hyper.items():
        if k not in QUANTITY_HYPER:
            raise HyperParameterError(f"hyper for target {target!r} takes {sorted(QUANTITY_HYPER)}, got {k!r}")
        if k == "n_samples":
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
                raise HyperParameterError(f"hyper n_samples must be a positive int, got {v!r}")
        elif not isinstance(v, str) or v not in QUANTITY_HYPER[k]:
            raise HyperParameterError(f"hyper {k} must be one of {QUANTITY_HYPER[k]}, got {v!r}")


def _words(value, name, choices):
    value = (value,) if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not value or any(not isinstance(k, str) or k not in choices
                                                                  for k in value):
        raise HyperParameterError(f"{name} must be a non-empty subset of {choices}, got {value!r}")
    return tuple(value)


def assert_conforms(target, impl, **kwargs):
    """:func:`check_implementation` as a test: raises ``AssertionError`` with the report when
    a case fails; returns the report otherwise."""
    report = check_implementation(target, impl, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report
