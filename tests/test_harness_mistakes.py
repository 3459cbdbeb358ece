"""Proof of the conformance harness on deliberate mistakes (issue 10 item 6).

Correct implementations written here, independently of refcurv — one in plain NumPy (an MLP's
per-sample gradients, GGN, Fisher, KFAC factors and a KFAC step, from the chain rule) and one
in PyTorch (``torch.func`` per-sample gradients, a Monte-Carlo Fisher, a small KFAC from
``unfold`` and the pre-activation gradients) — pass; each mistake an implementer makes is
caught: the report fails and names the (shrunk) case.
"""
import re

import numpy as np
import pytest

from refcurv.testing import Conventions, check_implementation


def _sig(h):
    return 1.0 / (1.0 + np.exp(-h))


ACT = {"relu": (lambda h: np.maximum(h, 0.0), lambda h: (h > 0).astype(float)),
       "tanh": (np.tanh, lambda h: 1.0 - np.tanh(h) ** 2),
       "sigmoid": (_sig, lambda h: _sig(h) * (1.0 - _sig(h))),
       "softplus": (lambda h: np.logaddexp(0.0, h), _sig)}


# ---------------------------------------------------------------------- plain NumPy MLP
def np_forward(spec, params, x, drop_bias=False):
    """Layers as ``[a (with the ones column if bias), h, activation after h]``."""
    a, layers, j = np.asarray(x, float), [], 0
    for s in spec:
        if s[0] == "linear":
            W = np.asarray(params[j], float)
            j += 1
            ah = np.concatenate([a, np.ones((len(a), 1))], 1) if s[3] else a
            h = a @ W[:, :-1].T if (drop_bias and s[3]) else ah @ W.T
            layers.append([ah, h, None, W, s[3]])
            a = h
        elif s[0] == "act":
            layers[-1][2] = s[1]
            a = ACT[s[1]][0](a)
    return a, layers


def np_backward(layers, delta):
    """``delta`` ``(N, K, C)`` cotangents of the output -> per layer the pre-activation
    cotangents ``(N, K, out_l)``."""
    out = [None] * len(layers)
    for l in range(len(layers) - 1, -1, -1):
        out[l] = delta
        if l:
            ah, h, act, W, bias = layers[l]
            Ww = W[:, :-1] if bias else W
            prev = layers[l - 1]
            delta = (delta @ Ww) * ACT[prev[2]][1](prev[1])[:, None, :]
    return out


def loss_grad_hess(name, f, y):
    if name == "mse":
        return f - y, np.broadcast_to(np.eye(f.shape[1]), f.shape + f.shape[1:])
    if name == "cross_entropy":
        p = np.exp(f - f.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return p - np.eye(f.shape[1])[y], np.einsum("nc,cd->ncd", p, np.eye(f.shape[1])) - np.einsum("nc,nd->ncd", p, p)
    s = _sig(f)
    return s - y, np.einsum("nc,cd->ncd", s * (1 - s), np.eye(f.shape[1]))


def np_per_sample_grads(spec, params, x, y, loss, drop_bias=False):
    f, layers = np_forward(spec, params, x, drop_bias)
    g, _ = loss_grad_hess(loss, f, y)
    D = np_backward(layers, g[:, None, :])
    return np.concatenate([np.einsum("no,nd->nod", d[:, 0], L[0]).reshape(len(f), -1) for d, L in zip(D, layers)], 1)


def np_jacobian_and_H(spec, params, x, y, loss):
    f, layers = np_forward(spec, params, x)
    _, H = loss_grad_hess(loss, f, y)
    C = f.shape[1]
    D = np_backward(layers, np.broadcast_to(np.eye(C), (len(f), C, C)))
    J = np.concatenate([np.einsum("nco,nd->ncod", d, L[0]).reshape(len(f), C, -1) for d, L in zip(D, layers)], 2)
    return J, H, D, layers


def np_ggn(case, over_N=True):
    J, H, _, _ = np_jacobian_and_H(case.spec, case.params, case.x, case.y, case.loss_name)
    M = np.einsum("ncp,ncd,ndq->pq", J, H, J)
    return M / case.N if over_N else M


def np_mc_fisher(case, labels):
    U = np.stack([np_per_sample_grads(case.spec, case.params, case.x, ys, case.loss_name) for ys in labels])
    return np.einsum("snp,snq->pq", U, U) / (U.shape[0] * U.shape[1])


def np_kfac_factors(spec, params, x, y, loss):
    """Exact-Fisher KFAC factors of an MLP: A = (1/N) Σ a aᵀ, G = (1/N) Σ J_hᵀ H J_h."""
    J, H, D, layers = np_jacobian_and_H(spec, params, x, y, loss)
    N = len(x)
    return [(L[0].T @ L[0] / N, np.einsum("nco,ncd,ndp->op", d, H, d) / N) for d, L in zip(D, layers)]


def np_kfac(mistake=None):
    """KFAC (exact Fisher, momentum 0, EMA β, refresh at k ≡ 0 mod T) with the damping placed
    as ``Γ ⊗ Ω + λI`` (Conventions(damping="exact")), dense solve per layer."""
    def impl(case):
        h = case.hyper
        lam, beta, Ts, Ti = h["damping"], h["beta"], h["T_stats"], h["T_inv"]
        stats, Cs, out = None, None, []
        for st in case.steps:
            k = st.k
            refresh_stats = (k % Ts == 0) if mistake != "stale" else k == 0
            refresh_inv = (k % Ti == 0) if mistake != "stale" else k == 0
            if refresh_stats:
                new = np_kfac_factors(case.spec, st.params, st.x, st.y, case.loss_name)
                stats = new if stats is None else [(beta * A + (1 - beta) * An, beta * G + (1 - beta) * Gn)
                                                   for (A, G), (An, Gn) in zip(stats, new)]
            if refresh_inv:
                kron = (lambda A, G: np.kron(A, G)) if mistake == "transposed" else (lambda A, G: np.kron(G, A))
                Cs = [kron(A, G) + lam * np.eye(A.shape[0] * G.shape[0]) for A, G in stats]
            g = np_per_sample_grads(case.spec, st.params, st.x, st.y, case.loss_name).mean(0)
            d, start = [], 0
            for C in Cs:
                d.append(-np.linalg.solve(C, g[start:start + len(C)]))
                start += len(C)
            d = np.concatenate(d)
            out.append(-d if mistake == "sign" else d)
        return out
    return impl


KFAC_HYPER = dict(fisher="exact", beta=0.5, T_stats=2, T_inv=2, momentum=0.0)


# ---------------------------------------------------------------------- the NumPy implementations
def np_psg(mistake=None):
    return lambda case: np_per_sample_grads(case.spec, case.params, case.x, case.y, case.loss_name,
                                            drop_bias=mistake == "dropped_bias")


def np_fisher_mc(mistake=None):
    def impl(case):
        labels = case.labels
        if mistake == "own_labels":  # labels drawn by the implementation, not refcurv's draws
            f, _ = np_forward(case.spec, case.params, case.x)
            p = np.exp(f - f.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            rng = np.random.default_rng(12345)
            labels = np.stack([[rng.choice(p.shape[1], p=pi) for pi in p] for _ in range(labels.shape[0])])
        if mistake == "scaled_labels":  # labels ~ N(f, ½I) (a loss without the ½), not refcurv's N(f, I)
            f, _ = np_forward(case.spec, case.params, case.x)
            labels = f + (labels - f) / np.sqrt(2.0)
        return np_mc_fisher(case, labels)
    return impl


NUMPY_CHECKS = {
    # name: (target, impl, kwargs)
    "per_sample_grads": ("per_sample_grads", np_psg(), {}),
    "ggn": ("ggn", lambda case: np_ggn(case), {}),
    "fisher_mc": ("fisher", np_fisher_mc(), dict(hyper=dict(fisher="mc", n_samples=2))),
    "kfac_factors": ("kfac_factors", lambda case: np_kfac_factors(case.spec, case.params, case.x, case.y,
                                                                  case.loss_name), {}),
    "kfac_step": ("kfac", np_kfac(), dict(hyper=KFAC_HYPER, conventions=Conventions(damping="exact"))),
}

NUMPY_MISTAKES = {
    "missing_1/N": ("ggn", lambda case: np_ggn(case, over_N=False), {}),
    "dropped_bias": ("per_sample_grads", np_psg("dropped_bias"), {}),
    "transposed_kronecker_factor": ("kfac", np_kfac("transposed"), NUMPY_CHECKS["kfac_step"][2]),
    "sign_error": ("kfac", np_kfac("sign"), NUMPY_CHECKS["kfac_step"][2]),
    "stale_factors_after_refresh": ("kfac", np_kfac("stale"), NUMPY_CHECKS["kfac_step"][2]),
    "mc_labels_not_from_draws": ("fisher", np_fisher_mc("own_labels"),
                                 dict(hyper=dict(fisher="mc", n_samples=2), losses=("cross_entropy",))),
    "mc_labels_scaled": ("fisher", np_fisher_mc("scaled_labels"),
                         dict(hyper=dict(fisher="mc", n_samples=2), losses=("mse",))),
}


@pytest.mark.parametrize("name", list(NUMPY_CHECKS))
def test_numpy_implementation_passes(name):
    target, impl, kw = NUMPY_CHECKS[name]
    report = check_implementation(target, impl, nets=("mlp",), **kw)
    assert report.ok, str(report)
    assert len(report.cases) == 20 and report.failure is None
    # the correct implementation is accurate to the float64 tolerance, not merely close
    assert max(c.ratio for c in report.cases) <= 1.0


@pytest.mark.parametrize("name", list(NUMPY_MISTAKES))
def test_numpy_mistake_caught(name, tmp_path):
    target, impl, kw = NUMPY_MISTAKES[name]
    report = check_implementation(target, impl, nets=("mlp",), save_dir=tmp_path, **kw)
    assert not report.ok
    assert report.failure is not None and not report.failure.ok
    text = str(report)
    assert "FAIL" in text and "failing case: " + report.failure.description in text  # names the case
    q, v = report.failure.worst
    assert v.error > v.tolerance
    assert report.saved is not None and (tmp_path / f"{target}-failure.npz").exists()


# ---------------------------------------------------------------------- PyTorch implementations
TORCH = Conventions(order="torch", loss_scale="torch")  # PyTorch's loss with reduction="mean"


def torch_psg(case):
    """Per-sample gradients of the PyTorch loss on a batch of one, by torch.func."""
    from torch.func import functional_call, grad, vmap
    mod, lossf = case.module, case.torch_loss()
    params = {k: v.detach() for k, v in mod.named_parameters()}
    x, y = case.tensors(case.x, case.y)

    def f(p, xi, yi):
        return lossf(functional_call(mod, p, (xi[None],)), yi[None])

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
    return [g[k] for k in params]  # per parameter tensor (N, …), parameters() order


def torch_fisher_mc(case):
    """(1/(S N)) Σ g̃ g̃ᵀ with g̃ the per-sample gradients at refcurv's sampled labels (CE,
    mean reduction: the per-sample loss is ψ itself, s = p = 1)."""
    import torch
    Us = []
    for ys in case.labels:
        sub = type(case)(case.target, case.spec, case.input_shape, case.loss_name, case.params, case.x, ys, case.hyper,
                         case.conventions, case.dtype, case.seed)
        Us.append(torch.cat([g.reshape(case.N, -1) for g in torch_psg(sub)], 1))
    U = torch.stack(Us)
    return torch.einsum("snp,snq->pq", U, U) / (U.shape[0] * U.shape[1])


def torch_kfac_factors(mistake=None):
    """KFAC (expand) factors with sampled CE labels: A from unfolded inputs (ones row for the
    bias), G from the pre-activation gradients of Σ_n ψ_n(ỹ_s), averaged over the S samples."""
    def impl(case):
        import torch
        mod = case.module
        x = case.tensors(case.x)
        layers = [m for m in mod if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        ins, outs = {}, {}

        def hook(m, i, o):
            ins[m] = i[0].detach()
            o.retain_grad()
            outs[m] = o

        hs = [m.register_forward_hook(hook) for m in layers]
        Gs = [0.0] * len(layers)
        for ys in case.labels:
            f = mod(x)
            f = f.transpose(1, 2) if f.ndim == 3 else f  # a sequence output: PyTorch's class axis is 1
            torch.nn.functional.cross_entropy(f, torch.as_tensor(ys).long(), reduction="sum").backward()
            for j, m in enumerate(layers):
                g = outs[m].grad  # conv (N, out, H, W), sequence Linear (N, T, out), Linear (N, out)
                g = g.reshape(g.shape[0], g.shape[1], -1) if g.ndim == 4 else (
                    g.transpose(1, 2) if g.ndim == 3 else g[:, :, None])  # (N, out, T)
                Gs[j] = Gs[j] + torch.einsum("not,npt->op", g, g) / (case.N * len(case.labels))
        for h in hs:
            h.remove()
        out = []
        for j, m in enumerate(layers):
            a = ins[m]
            if isinstance(m, torch.nn.Conv2d):
                a = torch.nn.functional.unfold(a, m.kernel_size, padding=m.padding, stride=m.stride)  # (N, ckk, T)
            else:
                a = a.transpose(1, 2) if a.ndim == 3 else a[:, :, None]  # (N, d, T)
            if m.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            T = a.shape[-1]
            A = torch.einsum("ndt,net->de", a, a) / (case.N * (1 if mistake == "missing_1/T" else T))
            G = Gs[j] / T if mistake == "extra_1/T" else Gs[j]
            out.append((A, G))
        return out
    return impl


MC = dict(fisher="mc", n_samples=2)
TORCH_CHECKS = {
    "per_sample_grads": ("per_sample_grads", torch_psg, dict(conventions=TORCH)),
    # (MLPs and CNNs: with CE on T positions PyTorch's mean loss is ψ/T, and this impl's
    # (1/(SN)) Σ g̃ g̃ᵀ would be the Fisher of that loss times 1/T)
    "fisher_mc": ("fisher", torch_fisher_mc, dict(conventions=TORCH, hyper=MC, losses=("cross_entropy",),
                                                  nets=("mlp", "cnn"))),
    "kfac_factors": ("kfac_factors", torch_kfac_factors(), dict(hyper=MC, losses=("cross_entropy",))),
}
TORCH_MISTAKES = {
    "conv_missing_1/T": ("kfac_factors", torch_kfac_factors("missing_1/T"), dict(hyper=MC, losses=("cross_entropy",))),
    "conv_extra_1/T": ("kfac_factors", torch_kfac_factors("extra_1/T"), dict(hyper=MC, losses=("cross_entropy",))),
    "sequence_missing_1/T": ("kfac_factors", torch_kfac_factors("missing_1/T"),
                             dict(hyper=MC, losses=("cross_entropy",))),
    "sequence_extra_1/T": ("kfac_factors", torch_kfac_factors("extra_1/T"), dict(hyper=MC, losses=("cross_entropy",))),
    "per_sample_sum_reduction": ("per_sample_grads",  # declared mean, but per-sample losses of a sum
                                 lambda case: [g * case.n_outputs for g in torch_psg(case)],
                                 dict(conventions=TORCH, losses=("mse",))),
}


@pytest.mark.parametrize("name", list(TORCH_CHECKS))
def test_torch_implementation_passes(name):
    pytest.importorskip("torch")
    target, impl, kw = TORCH_CHECKS[name]
    report = check_implementation(target, impl, **kw)
    assert report.ok, str(report)
    assert max(c.ratio for c in report.cases) <= 1.0
    assert any("Conv2d" in c.description for c in report.cases)  # CNNs were among the cases
    if "nets" not in kw:  # and sequence nets: inputs (T, d)
        assert any(re.search(r"input \(\d+, \d+\) \|", c.description) for c in report.cases)


@pytest.mark.parametrize("name", list(TORCH_MISTAKES))
def test_torch_mistake_caught(name, tmp_path):
    pytest.importorskip("torch")
    target, impl, kw = TORCH_MISTAKES[name]
    nets = ("cnn",) if name.startswith("conv") else ("seq",) if name.startswith("sequence") else ("mlp", "cnn")
    report = check_implementation(target, impl, nets=nets, save_dir=tmp_path, **kw)
    assert not report.ok and report.failure is not None
    if name.startswith("sequence"):  # shrunk to a sequence net whose shared Linear has T > 1
        assert "Linear" in report.failure.description and "Conv2d" not in report.failure.description
    assert "failing case: " + report.failure.description in str(report)
    assert report.saved is not None


def test_torch_float32_judged_at_float32():
    """A float32 PyTorch implementation passes at float32 tolerance, and the float64
    tolerance would not have let its rounding through."""
    pytest.importorskip("torch")
    report = check_implementation("per_sample_grads", torch_psg, conventions=TORCH, dtype=np.float32, max_examples=10)
    assert report.ok, str(report)
    assert all(v.dtype == "float32" for c in report.cases for v in c.verdicts.values())
    from refcurv.testing.tolerance import tolerance
    worst = max((v for c in report.cases for v in c.verdicts.values()), key=lambda v: v.error)
    assert worst.error > tolerance(worst.n, 1.0, np.float64)
