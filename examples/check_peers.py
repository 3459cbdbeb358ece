"""Check the PyTorch curvature libraries curvlinops, BackPACK, ASDL and NNGeometry against
refcurv, in each library's own convention (refcurv converts; every factor is stated).

    python examples/check_peers.py            # every setting
    python examples/check_peers.py --quick    # CI: one network per family, < 2 minutes
    python examples/check_peers.py --only backpack --only harness   # also curvlinops, asdl,
                                              # asdl-methods, nngeometry

Needs: ``pip install "refcurv[peers]"`` (torch, hypothesis, curvlinops-for-pytorch,
backpack-for-pytorch, asdfghjkl, nngeometry; a missing library is reported and skipped).
Seeded; prints a table (library, quantity, setting, error, tolerance, the error without the
declared convention, verdict, classification) and exits 1 on an unexplained disagreement.
The last part runs ``refcurv.testing.check_implementation`` with each library as ``impl``. These libraries are not ground truth: a disagreement is classified from the
definition as a convention (with its factor), a bug in the library (file, line, and the
one-line fix, which this script applies by monkeypatching and re-checks), or a refcurv
problem. See ``docs/peers.md`` for the derivations.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import refcurv  # noqa: E402
from refcurv import curvature as cv  # noqa: E402
from refcurv.nn import BCE, MSE, CrossEntropy  # noqa: E402
from refcurv.testing import Conventions, compare as rc_compare  # noqa: E402
from refcurv.testing.peers import (kfac_dense, labels_from_sampled_grads,  # noqa: E402
                                   labels_from_torch_samples, peer_conventions, sampled_grads_from_labels)

torch = None  # imported in main(): the module must import with numpy only (tests read it)

ROWS = []
SEED = 0


# ----------------------------------------------------------------------------- plumbing

def compare(actual, expected, n):
    """Relative Frobenius error and tolerance from refcurv.testing.compare: a float64 result
    accumulated over ``n`` terms is judged at the residual bound C·n·u (tolerance model)."""
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    if actual.shape != expected.shape:
        return np.inf, 0.0
    v = rc_compare(actual, expected, dtype=np.float64, n=n, kind="residual")
    return float(v.error), float(v.tolerance)


REFCURV = Conventions(order="torch")  # refcurv's own scale and blocks, in parameters() order


def record(lib, quantity, setting, actual, expected, n, note="agrees", known=None, raw=None):
    """One table row. ``known``: a classification for a disagreement that is explained (a
    library bug whose fix is checked by a separate row); such rows do not fail the run.
    ``raw``: refcurv's value in its own convention (only re-ordered); its error shows whether
    the declared convention matters."""
    err, tol = compare(actual, expected, n)
    raw_err = compare(actual, raw, n)[0] if raw is not None else np.nan
    ok = err <= tol
    if ok and known is not None:
        verdict, note = "STALE", "a known bug did not reproduce: its classification is stale"
    elif ok:
        verdict = "ok"
    elif known is not None:
        verdict, note = "BUG", known
    else:
        verdict, note = "FAIL", "unexplained disagreement"
    ROWS.append(dict(lib=lib, quantity=quantity, setting=setting, error=err, tol=tol, verdict=verdict, raw=raw_err,
                     note=note, fail=(not ok and known is None) or (ok and known is not None)))
    return ok


def skip(lib, why):
    ROWS.append(dict(lib=lib, quantity="-", setting="-", error=np.nan, tol=np.nan, verdict="skip", note=why, fail=False,
                     raw=np.nan))


@contextlib.contextmanager
def patched(obj, name, new):
    old = getattr(obj, name)
    setattr(obj, name, new)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def source_patch(module, qualname, *edits):
    """Re-define ``module.qualname`` (a function or a method ``Class.meth``) from its source
    with the one-line edits ``(old, new), …`` (each ``old`` occurring exactly once): how a
    proposed library fix is verified without touching the installed files."""
    parts = qualname.split(".")
    owner = module
    for p in parts[:-1]:
        owner = getattr(owner, p)
    fn = getattr(owner, parts[-1])
    src = inspect.getsource(fn)
    import textwrap
    for old, new in edits:
        if src.count(old) != 1:
            raise RuntimeError(f"patch target {old!r} found {src.count(old)} times in {qualname}")
        src = src.replace(old, new)
    src = textwrap.dedent(src)
    ns = dict(vars(module))
    exec(compile(src, inspect.getsourcefile(fn), "exec"), ns)
    with patched(owner, parts[-1], ns[parts[-1]]):
        yield


class Recorder:
    """Wraps a callable and keeps its return values (the library's own random draws)."""

    def __init__(self, fn):
        self.fn, self.out = fn, []

    def __call__(self, *a, **k):
        r = self.fn(*a, **k)
        self.out.append(r)
        return r


# ----------------------------------------------------------------------------- problems

def from_torch(module, input_shape):
    """``(net, params)`` by the bridge (``W = [weight.reshape(out, -1), bias]``)."""
    from refcurv.torch import from_torch as bridge
    return bridge(module, input_shape)


def problems(quick, C=3):
    """(name, torch module, input shape) -- MLP and CNN with C outputs, with and without bias."""
    nn = torch.nn
    out = []
    for bias in (True, False):
        torch.manual_seed(SEED)
        mlp = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, C, bias=bias))
        torch.manual_seed(SEED + 1)
        cnn = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias), nn.ReLU(), nn.Flatten(),
                            nn.Linear(12, C, bias=bias))
        out.append((f"mlp{'' if bias else '-nobias'}", mlp.double(), (4,)))
        out.append((f"cnn{'' if bias else '-nobias'}", cnn.double(), (2, 4, 4)))
    return out[:2] if quick else out


LOSSES = {"cross_entropy": CrossEntropy, "mse": MSE, "bce": BCE}


def data(loss_name, input_shape, N=4, C=3):
    rng = np.random.default_rng(SEED + 7)
    x = rng.standard_normal((N,) + tuple(input_shape))
    if loss_name == "cross_entropy":
        y = np.array([0, 1, 2, 1][:N])
    elif loss_name == "mse":
        y = rng.standard_normal((N, C))
    else:
        y = rng.integers(0, 2, (N, C)).astype(float)
    return x, y


def torch_loss(loss_name, reduction="mean"):
    nn = torch.nn
    return {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss_name](
        reduction=reduction)


def ty(y, loss_name):
    return torch.as_tensor(y, dtype=torch.long if loss_name == "cross_entropy" else torch.float64)


def outputs(net, params, x):
    return np.asarray(net.forward(params, x))


def dense_of(op, P):
    """Dense matrix of a curvlinops operator (parameters() order)."""
    return (op @ torch.eye(P, dtype=torch.float64)).detach().numpy()


def kfac_T(net, x):
    """Output locations T per trainable layer (1 for Linear)."""
    T, shape = [], tuple(x.shape[1:])
    for m in net.layers:
        if getattr(m, "trainable", False):
            T.append(m.n_locations(shape))
        shape = m.out_shape(shape)
    return T


# ----------------------------------------------------------------------------- BackPACK

def kfac_pairs(conv, net, x, y, loss, kind, g_scale, **kw):
    """refcurv's KFAC factors converted by ``conv`` (expand and reduce both computed, the
    convention picks), ``G`` times ``g_scale``."""
    Fe = cv.kfac_factors(net, params_of(net), x, y, loss, kind=kind, conv="expand", **kw)
    Fr = cv.kfac_factors(net, params_of(net), x, y, loss, kind=kind, conv="reduce", **kw)
    return conv.kfac_factors(Fe, Fr, net, kfac_T(net, x), g_scale=g_scale)


_PARAMS = {}


def params_of(net):
    return _PARAMS[id(net)]


def setup(module, ishape, loss_name, C=3):
    x, y = data(loss_name, ishape, C=C)
    net, params = from_torch(module, ishape)
    _PARAMS[id(net)] = params
    return x, y, net, params, LOSSES[loss_name](), sum(p.numel() for p in module.parameters())


def check_backpack(quick):
    from backpack import backpack, extend
    from backpack import extensions as ext
    from backpack.core.derivatives.nll_base import NLLLossDerivatives

    for loss_name in ("cross_entropy", "mse", "bce"):
        # BackPACK's BCEWithLogitsLoss supports one output only (bcewithlogitsloss.py:79)
        C = 1 if loss_name == "bce" else 3
        for name, module, ishape in problems(quick, C):
            for reduction in (("mean",) if quick else ("mean", "sum")):
                setting = f"{name} {loss_name} {reduction}"
                x, y, net, params, loss, P = setup(module, ishape, loss_name, C)
                N = x.shape[0]
                lf = extend(torch_loss(loss_name, reduction))
                conv = peer_conventions("backpack", lf, C)
                s, _ = conv.scales(loss, C, N)
                model = extend(module)
                xt, yt = torch.as_tensor(x), ty(y, loss_name)

                model.zero_grad()
                with backpack(ext.BatchGrad(), ext.DiagGGNExact()):
                    lf(model(xt), yt).backward()
                bg = np.concatenate([p.grad_batch.detach().reshape(N, -1).numpy() for p in model.parameters()], 1)
                U = cv.per_sample_grads(net, params, x, y, loss)
                record("backpack", "BatchGrad", setting, bg, conv.vector(U, net, scale=s / N), P,
                       f"convention: (s/N)·u_n = {s / N:g}·u_n (sample n's term of the reduced loss)",
                       raw=REFCURV.vector(U, net))
                dg = np.concatenate([p.diag_ggn_exact.detach().reshape(-1).numpy() for p in model.parameters()])
                Gm = cv.ggn(net, params, x, y, loss)
                record("backpack", "DiagGGNExact", setting, dg, np.diag(conv.matrix(Gm, net, scale=s)), P,
                       f"convention: s·diag(GGN), s = {s:g}", raw=np.diag(REFCURV.matrix(Gm, net)))

                model.zero_grad()
                with backpack(ext.KFLR()):
                    lf(model(xt), yt).backward()
                got = _backpack_kron(model, "kflr")
                want = kfac_dense(conv, net, kfac_pairs(conv, net, x, y, loss, "exact", s))
                raw = kfac_dense(REFCURV, net, kfac_pairs(REFCURV, net, x, y, loss, "exact", 1.0))
                record("backpack", "KFLR", setting, got, want, P,
                       "convention: separate bias, conv T·G_reduce ⊗ A_expand (bias G_reduce), G·s", raw=raw)
                S = 2
                rec = Recorder(NLLLossDerivatives.compute_sampled_grads)
                model.zero_grad()
                with patched(NLLLossDerivatives, "compute_sampled_grads", lambda self, *a, **k: rec(self, *a, **k)):
                    torch.manual_seed(SEED)
                    with backpack(ext.KFAC(mc_samples=S)):
                        lf(model(xt), yt).backward()
                got = _backpack_kron(model, "kfac")
                g, f = rec.out[-1].detach().numpy(), outputs(net, params, x)
                labels = labels_from_sampled_grads(loss, f, g)
                want = kfac_dense(conv, net, kfac_pairs(conv, net, x, y, loss, "mc", s, labels=labels))
                # w/o conv: the library's own labels (MSE: N(f, ½I)) taken as refcurv's, scale and blocks kept
                unmapped = labels_from_sampled_grads(loss, f, g / np.sqrt(2) if loss_name == "mse" else g)
                raw = kfac_dense(conv, net, kfac_pairs(conv, net, x, y, loss, "mc", s, labels=unmapped))
                record("backpack", f"KFAC mc S={S} (draws replayed)", setting, got, want, P,
                       "convention: as KFLR; its MSE labels N(f,½I) mapped to refcurv's N(f,I)", raw=raw)


def _backpack_kron(model, attr):
    from scipy.linalg import block_diag
    blocks = []
    for p in model.parameters():
        fs = [f.detach().numpy() for f in getattr(p, attr)]
        B = fs[0]
        for f in fs[1:]:
            B = np.kron(B, f)
        blocks.append(B)
    return block_diag(*blocks)


# ----------------------------------------------------------------------------- curvlinops

def check_curvlinops(quick):
    import curvlinops as cl
    import curvlinops.fisher as clf

    for loss_name in ("cross_entropy", "mse", "bce"):
        for name, module, ishape in problems(quick):
            for reduction in (("mean",) if quick else ("mean", "sum")):
                setting = f"{name} {loss_name} {reduction}"
                x, y, net, params, loss, P = setup(module, ishape, loss_name)
                N, C = x.shape[0], 3
                lf = torch_loss(loss_name, reduction)
                conv = peer_conventions("curvlinops", lf, C)
                s, p = conv.scales(loss, C, N)
                ps = list(module.parameters())
                batch = [(torch.as_tensor(x), ty(y, loss_name))]
                kw = dict(check_deterministic=False)
                f = outputs(net, params, x)

                for qname, op, M, scale in (
                        ("Hessian", cl.HessianLinearOperator, cv.hessian(net, params, x, y, loss), s),
                        ("GGN", cl.GGNLinearOperator, cv.ggn(net, params, x, y, loss), s),
                        ("EF", cl.EFLinearOperator, cv.empirical_fisher(net, params, x, y, loss), s * p)):
                    record("curvlinops", qname, setting, dense_of(op(module, lf, ps, batch, **kw), P),
                           conv.matrix(M, net, scale=scale), P,
                           f"convention: {scale:g}·{qname}" + (" (s·p: c·Σ∇ℓ_n∇ℓ_nᵀ, ℓ_n summed over outputs)"
                                                                 if qname == "EF" else " (s)"),
                           raw=REFCURV.matrix(M, net))

                S = 2
                recs = []

                def sampler(lossf, _orig=clf.make_grad_output_sampler):
                    recs.append(Recorder(_orig(lossf)))
                    return recs[-1]

                with patched(clf, "make_grad_output_sampler", sampler):
                    got = dense_of(cl.FisherMCLinearOperator(module, lf, ps, batch, mc_samples=S, seed=SEED, **kw), P)
                g = recs[-1].out[-1].detach().numpy()
                Fmc = cv.fisher(net, params, x, loss=loss, kind="mc", labels=labels_from_sampled_grads(loss, f, g))
                # w/o conv: the library's own labels (MSE: y = f − g/2 ~ N(f, ½I)) taken as refcurv's
                unmapped = labels_from_sampled_grads(loss, f, g / np.sqrt(2) if loss_name == "mse" else g)
                raw = conv.matrix(cv.fisher(net, params, x, loss=loss, kind="mc", labels=unmapped), net, scale=s)
                record("curvlinops", f"FisherMC S={S} (draws replayed)", setting, got, conv.matrix(Fmc, net, scale=s),
                       P, "convention: s·F_mc; its MSE labels N(f,½I) mapped to refcurv's N(f,I)", raw=raw)

                kinds = (("type-2", "exact"), ("mc", "mc"), ("empirical", "empirical"))
                convs = ("expand",) if (quick or name.startswith("mlp")) else ("expand", "reduce")
                for ftype, kind in kinds:
                    for approx in convs:
                        for sep in ((True, False) if not quick or ftype == "type-2" else (True,)):
                            kf = cl.KFACLinearOperator(module, lf, ps, batch, fisher_type=ftype,
                                                       mc_samples=S if ftype == "mc" else 1, kfac_approx=approx,
                                                       separate_weight_and_bias=sep, seed=SEED, **kw)
                            rec = Recorder(kf.draw_label)
                            kf.draw_label = rec
                            got = dense_of(kf, P)
                            extra = {}
                            if kind == "mc":
                                ys = np.stack([r.detach().numpy() for r in rec.out])
                                extra = dict(labels=labels_from_torch_samples(loss, f, ys))
                            c = conv.replace(bias="separate" if sep else "joint", conv=approx)
                            g = s * p if kind == "empirical" else s
                            want = kfac_dense(c, net, kfac_pairs(c, net, x, y, loss, kind, g, **extra))
                            if kind == "mc":  # w/o conv: the library's labels taken as refcurv's
                                extra = dict(labels=labels_from_torch_samples(loss, f, ys, variance=1.0))
                            raw = kfac_dense(REFCURV, net, kfac_pairs(REFCURV, net, x, y, loss, kind, 1.0, **extra))
                            record("curvlinops", f"KFAC {ftype} {approx} {'separate' if sep else 'joint'}",
                                   setting, got, want, P, f"convention: bias {c.bias}, G·{g:g}", raw=raw)


# ----------------------------------------------------------------------------- ASDL

def _half_mse(o, t, reduction="sum"):
    """½‖f − y‖² (ASDL sets ``reduction='sum'`` itself and divides by data_size)."""
    import torch.nn.functional as Fn
    return 0.5 * Fn.mse_loss(o, t, reduction=reduction)


def check_asdl(quick):
    import asdl
    import torch.nn.functional as Fn

    for name, module, ishape in problems(quick):
        for loss_name in ("cross_entropy", "mse"):
            setting = f"{name} {loss_name}"
            x, y = data(loss_name, ishape)
            net, params = from_torch(module, ishape)
            loss = LOSSES[loss_name]()
            N = x.shape[0]
            P = sum(p.numel() for p in module.parameters())
            xt, yt = torch.as_tensor(x), ty(y, loss_name)
            f = outputs(net, params, x)
            ltype = asdl.LOSS_CROSS_ENTROPY if loss_name == "cross_entropy" else asdl.LOSS_MSE

            def run(ftype, shape, S=1, seed=None):
                cfg = asdl.FisherConfig(fisher_type=ftype, fisher_shapes=[shape], loss_type=ltype, data_size=N,
                                        n_mc_samples=S, seed=seed)
                fm = asdl.get_fisher_maker(module, cfg)
                dummy = fm.setup_model_call(module, xt)
                if loss_name == "cross_entropy":
                    fm.setup_loss_call(Fn.cross_entropy, dummy, yt)
                else:  # ASDL's MSE is ½‖f−y‖² summed (its fisher_mse var=1 convention)
                    fm.setup_loss_call(_half_mse, dummy, yt)
                fm.forward_and_backward()
                return fm

            def full(fm):
                return module.fisher.data.detach().numpy()

            conv = peer_conventions("asdl")
            _PARAMS[id(net)] = params
            Fx = conv.matrix(cv.fisher(net, params, x, loss=loss, kind="exact"), net)
            record("asdl", "fisher_exact full", setting, full(run(asdl.FISHER_EXACT, asdl.SHAPE_FULL)), Fx, P,
                   "agrees (ASDL: per-sample ½‖f−y‖², mean over N)")
            EF = conv.matrix(cv.empirical_fisher(net, params, x, y, loss), net)
            record("asdl", "fisher_emp full", setting, full(run(asdl.FISHER_EMP, asdl.SHAPE_FULL)), EF, P, "agrees")
            for S in ((1, 2) if True else (1,)):
                dist = torch.distributions.Categorical if loss_name == "cross_entropy" else torch.distributions.Normal
                rec = Recorder(dist.sample)
                with patched(dist, "sample", lambda self, *a, **k: rec(self, *a, **k)):
                    got = full(run(asdl.FISHER_MC, asdl.SHAPE_FULL, S=S, seed=SEED))
                ys = np.stack([r.detach().numpy() for r in rec.out])
                labels = ys.astype(np.int64) if loss_name == "cross_entropy" else ys  # N(f, I): refcurv's
                Fmc = conv.matrix(cv.fisher(net, params, x, loss=loss, kind="mc", labels=labels), net)
                known = None
                if S > 1:
                    known = ("bug: asdl/fisher.py:458/489 divide the loss by S, so the Fisher by S² (F_mc/S); "
                             "fix: / n_mc_samples ** 0.5")
                record("asdl", f"fisher_mc full (S={S}, replayed)", setting, got, Fmc, P, "agrees", known=known)
                if S > 1:
                    cls = "FisherMCCrossEntropy" if loss_name == "cross_entropy" else "FisherMCMSE"
                    old = "/ n_mc_samples,"
                    rec = Recorder(dist.sample)
                    with source_patch(asdl.fisher, f"{cls}._fisher_loop", (old, "/ n_mc_samples ** 0.5,")), \
                            patched(dist, "sample", lambda self, *a, **k: rec(self, *a, **k)):
                        got = full(run(asdl.FISHER_MC, asdl.SHAPE_FULL, S=S, seed=SEED))
                    ys = np.stack([r.detach().numpy() for r in rec.out])
                    labels = ys.astype(np.int64) if loss_name == "cross_entropy" else ys
                    Fmc = conv.matrix(cv.fisher(net, params, x, loss=loss, kind="mc", labels=labels), net)
                    record("asdl", f"fisher_mc full (S={S}) + fix", setting, got, Fmc, P,
                           "agrees with the one-line fix applied")
            # Kronecker (SHAPE_KRON): A of the weight only (conv.py/linear.py's extend_in_data, which
            # would append the ones row, is never called); the bias is preconditioned by B alone
            fm = run(asdl.FISHER_EXACT, asdl.SHAPE_KRON)
            blocks = []
            for m in module.children():
                fk = getattr(m, "fisher", None)
                if fk is not None and fk.kron is not None:
                    B, A = fk.kron.B.detach().numpy(), fk.kron.A.detach().numpy()
                    blocks.append(np.kron(B, A))
                    if m.bias is not None:
                        blocks.append(B)
            from scipy.linalg import block_diag
            got = block_diag(*blocks)
            want = kfac_dense(conv, net, kfac_pairs(conv, net, x, y, loss, "exact", 1.0))
            raw = kfac_dense(REFCURV, net, kfac_pairs(REFCURV, net, x, y, loss, "exact", 1.0))
            record("asdl", "fisher_exact kron", setting, got, want, P, raw=raw, note=
                   "convention: separate bias (weight G⊗A, bias G), KFC expand")


# ----------------------------------------------------------------------------- ASDL methods

SENG_N2_FIX = ("m.div_(data_size ** 2)", "m.div_(data_size)")
SENG_N2_BUG = ("bug: asdl/precondition/seng.py:118 divides U c by N² where SMW gives 1/N "
               "(gram_inv = N(UᵀU + NλI)⁻¹); fix: m.div_(data_size)")
# with a bias, the capacitance UᵀU and Uᵀg leave the bias out (sub_g = g[:, :-1]; the Gram of the
# inputs without the ones row) while U c puts it back: a Linear layer's ones row adds the Gram
# of the output gradients, gram_B = G Gᵀ, and the bias column of g to Uᵀg
SENG_BIAS_FIX = (
    ("sub_g = g[:, :-1] if bias else g", "sub_g = g"),
    ("sub_in_data = maybe_unsqueeze_to_3d(info.sub_in_data)  # n x d_in_sub x r",
     "sub_in_data = maybe_unsqueeze_to_3d(info.sub_in_data); sub_in_data = torch.cat([sub_in_data, "
     "sub_in_data.new_ones(sub_in_data.shape[0], 1, sub_in_data.shape[2])], 1) if bias else sub_in_data"),
)
SENG_BIAS_GRAM_FIX = (("gram_inv = cholesky_inv(gram.div_(config.data_size), config.damping)",
                       "gram_inv = cholesky_inv((gram + (data[1] @ data[1].T if module.bias is not None else 0))"
                       ".div_(config.data_size), config.damping)"),)
SENG_BIAS_BUG = ("bug: with a bias, asdl/precondition/seng.py:92,68 form Uᵀg and UᵀU without the bias (its ones row) "
                 "but U c with it (seng.py:110); fix: 3 lines (SENG_BIAS_FIX, Linear layers)")
KBFGS_POWELL_FIX = ("s.mul_(theta).sub_(Hy, alpha=1 - theta)", "s.mul_(theta).add_(Hy, alpha=1 - theta)")
KBFGS_POWELL_BUG = ("bug: asdl/precondition/kbfgs.py:189 Powell's damping subtracts (1−θ)Hy: s̃ = θs − (1−θ)Hy gives "
                    "s̃ᵀy = θsᵀy − (1−θ)yᵀHy < μ₁yᵀHy, the condition it exists to enforce (thesis Alg. 8: "
                    "s̃ = θs + (1−θ)Hy); fix: .add_(Hy, alpha=1 - theta)")
KBFGS_BUG = ("bug: asdl/precondition/kbfgs.py:199 `H = (H+H.T)/2` rebinds the local H, so the in-place BFGS "
             "update never reaches the stored inverse factor; fix: H.copy_((H + H.T) / 2)")


def check_asdl_methods(quick):
    """ASDL's SENG direction (MLPs: its C_U heuristic equals refcurv's uc='cu' (23)) and the
    K-BFGS kernels (Powell+LM damping, the inverse BFGS update) against refcurv."""
    import asdl
    import asdl.precondition.kbfgs as akb
    import asdl.precondition.seng as asg
    import torch.nn.functional as Fn
    from refcurv.linalg.damping import dp_dlm
    from refcurv.linalg.quasi_newton import bfgs_update_H
    from refcurv.methods import REGISTRY, Batch

    lam = 0.1
    for name, module, ishape in problems(quick):
        if not name.startswith("mlp"):
            continue  # conv: ASDL's C_U uses a rank-16 SVD of the error maps, a different approximation
        for loss_name in ("cross_entropy", "mse"):
            setting = f"{name} {loss_name} λ={lam}"
            x, y, net, params, loss, P = setup(module, ishape, loss_name)
            N = x.shape[0]
            conv = Conventions(order="torch", sign="preconditioned_gradient")
            d, _ = REGISTRY["seng"](damping=lam, uc="cu", threshold=1).step(
                REGISTRY["seng"](damping=lam, uc="cu", threshold=1).init(net, params), net, params,
                Batch(x, y, loss), rng=0)
            want = conv.vector(conv.signed(refcurv.flatten(d)), net)

            def asdl_seng(*edits_seng, gram_edits=()):
                for p in module.parameters():
                    p.grad = None
                ctx1 = source_patch(asg, "SengGradientMaker.precondition", *edits_seng) if edits_seng \
                    else contextlib.nullcontext()
                ctx2 = source_patch(asg, "SengGradientMaker.update_curvature", *gram_edits) if gram_edits \
                    else contextlib.nullcontext()
                with ctx1, ctx2:
                    gm = asdl.SengGradientMaker(module, asdl.PreconditioningConfig(data_size=N, damping=lam))
                    dummy = gm.setup_model_call(module, torch.as_tensor(x))
                    gm.setup_loss_call(Fn.cross_entropy if loss_name == "cross_entropy" else _half_mse, dummy,
                                       ty(y, loss_name))
                    gm.forward_and_backward()
                return np.concatenate([p.grad.detach().reshape(-1).numpy() for p in module.parameters()])

            bias = "nobias" not in name
            known = SENG_N2_BUG + ("; and " + SENG_BIAS_BUG if bias else "")
            record("asdl", "SENG precondition (1 step)", setting, asdl_seng(), want, P,
                   "agrees", known=known)
            record("asdl", "SENG + /N fix", setting, asdl_seng(SENG_N2_FIX), want, P,
                   "agrees with the one-line fix (sign: preconditioned gradient = −d)",
                   known=SENG_BIAS_BUG if bias else None)
            if bias:
                record("asdl", "SENG + /N fix + bias fix", setting,
                       asdl_seng(SENG_N2_FIX, *SENG_BIAS_FIX, gram_edits=SENG_BIAS_GRAM_FIX), want, P,
                       "agrees with both fixes (sign: preconditioned gradient = −d)")

    # K-BFGS kernels on a constructed SPD H and a pair (s, y)
    rng = np.random.default_rng(SEED)
    n = 6
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    H = Q @ np.diag(np.linspace(0.5, 2.0, n)) @ Q.T
    s0, yv = rng.standard_normal(n), rng.standard_normal(n)
    # the last pair has s = Hy: sᵀy = yᵀHy ≥ μ₁yᵀHy, Powell's θ = 1 (no damping), only LM acts
    for mu1, mu2, s in ((0.2, 0.3, s0), (0.9, 0.01, s0), (0.2, 0.3, H @ yv)):
        st, yt = torch.tensor(s), torch.tensor(yv)
        akb.powell_lm_damping_(torch.tensor(H), st, yt, mu1=mu1, mu2=mu2)
        s_t, y_t, _ = dp_dlm(s, yv, H, mu1, mu2)
        setting = f"n={n} μ1={mu1} μ2={mu2} θ={_:.2f}"
        record("asdl", "K-BFGS powell_lm_damping_", setting, np.concatenate([st.numpy(), yt.numpy()]),
               np.concatenate([s_t, y_t]), 2 * n, "agrees (refcurv dp_dlm, thesis Alg. 8)",
               known=KBFGS_POWELL_BUG if _ < 1 else None)
        st, yt = torch.tensor(s), torch.tensor(yv)
        with source_patch(akb, "powell_lm_damping_", KBFGS_POWELL_FIX):
            akb.powell_lm_damping_(torch.tensor(H), st, yt, mu1=mu1, mu2=mu2)
        record("asdl", "K-BFGS powell_lm_damping_ + fix", setting, np.concatenate([st.numpy(), yt.numpy()]),
               np.concatenate([s_t, y_t]), 2 * n, "agrees with the one-line fix")
        Ht = torch.tensor(H)
        akb.bfgs_inv_update_(Ht, torch.tensor(s_t), torch.tensor(y_t))
        want = bfgs_update_H(H, s_t, y_t)
        record("asdl", "K-BFGS bfgs_inv_update_", setting, Ht.numpy(), want, n * n, "agrees",
               known=KBFGS_BUG)
        Ht = torch.tensor(H)
        with source_patch(akb, "bfgs_inv_update_", ("H = (H+H.T)/2", "H.copy_((H + H.T) / 2)")):
            akb.bfgs_inv_update_(Ht, torch.tensor(s_t), torch.tensor(y_t))
        record("asdl", "K-BFGS bfgs_inv_update_ + fix", setting, Ht.numpy(), want, n * n,
               "agrees with the one-line fix")


# ----------------------------------------------------------------------------- NNGeometry

NNG_KFAC_FIX = ("M = torch.zeros((s, s), device=self.generator.get_device())",
                "M = torch.zeros((s, s), device=self.generator.get_device(), dtype=next(iter(self.data.values()))[0].dtype)")
NNG_KFAC_BUG = ("bug: nngeometry/object/pspace.py:562 PMatKFAC.to_torch allocates M in the default dtype (float32): "
                "a float64 KFAC is rounded (error ~1e-8); fix: dtype= the factors' dtype")
NNG_FIX = (("torch.ones(size=(n_out, n_out), device=device)", "torch.ones(size=(n_out, n_out), device=device, dtype=logits.dtype)"),
           ("torch.finfo().eps", "torch.finfo(logits.dtype).eps"))
NNG_BUG = ("bug: nngeometry/metrics.py:180 builds tri in the default dtype (float64 model: mm dtype error) and :188 "
           "adds float32's eps to q (error ~1e-7); fix: dtype=logits.dtype, torch.finfo(logits.dtype).eps")


def check_nngeometry(quick):
    from nngeometry import metrics
    from nngeometry.object import pspace
    from nngeometry.object import PMatDense, PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    for name, module, ishape in problems(quick):
        for loss_name, variant in (("cross_entropy", "classif_logits"), ("mse", "regression"),
                                   ("bce", "classif_binary_logits")):
            setting = f"{name} {loss_name}"
            x, y = data(loss_name, ishape)
            net, params = from_torch(module, ishape)
            loss = LOSSES[loss_name]()
            N = x.shape[0]
            P = sum(p.numel() for p in module.parameters())
            loader = DataLoader(TensorDataset(torch.as_tensor(x), ty(y, loss_name)), batch_size=N)
            conv = peer_conventions("nngeometry")
            _PARAMS[id(net)] = params
            Fx = conv.matrix(cv.fisher(net, params, x, loss=loss, kind="exact"), net)

            def fim(rep):
                return metrics.FIM(module, loader, rep, variant=variant).to_torch().detach().numpy()

            if variant == "classif_logits":
                try:
                    got = fim(PMatDense)
                except RuntimeError:  # the float32 tri: the float64 model cannot run at all
                    got = np.full_like(Fx, np.nan)
                record("nngeometry", "FIM PMatDense", setting, got, Fx, P, "agrees", known=NNG_BUG)
                with source_patch(metrics, "FIM", NNG_FIX[0]):  # dtype fix only: the float32 eps remains
                    got = fim(PMatDense)
                record("nngeometry", "FIM PMatDense + dtype fix only", setting, got, Fx, P, "agrees", known=NNG_BUG)
                ctx = source_patch(metrics, "FIM", *NNG_FIX)
                fixed = " + fix"
            else:
                ctx, fixed = contextlib.nullcontext(), ""
            with ctx:
                got = fim(PMatDense)
                record("nngeometry", "FIM PMatDense" + fixed, setting, got, Fx, P,
                       "agrees" + (" with the two one-line fixes applied" if fixed else ""))
                pm = metrics.FIM(module, loader, PMatKFAC, variant=variant)
            want = kfac_dense(conv, net, kfac_pairs(conv, net, x, y, loss, "exact", 1.0))
            tag = " (FIM fixed)" if fixed else ""
            record("nngeometry", "PMatKFAC.to_torch" + tag, setting, pm.to_torch().detach().numpy(), want, P,
                   "agrees", known=NNG_KFAC_BUG)
            with source_patch(pspace, "PMatKFAC.to_torch", NNG_KFAC_FIX):
                got = pm.to_torch().detach().numpy()
            raw = kfac_dense(REFCURV, net, kfac_pairs(REFCURV, net, x, y, loss, "exact", 1.0))
            record("nngeometry", "PMatKFAC.to_torch + fix" + tag, setting, got, want, P,
                   "convention: joint bias (ones row in A), KFC expand; agrees with the fix", raw=raw)
            if variant == "classif_logits":  # Monte-Carlo FIM, its multinomial draws replayed
                S = 2
                rec = Recorder(torch.multinomial)
                with patched(torch, "multinomial", rec):
                    got = metrics.FIM_MonteCarlo(module, loader, PMatDense, variant=variant, trials=S)
                    got = got.to_torch().detach().numpy()
                labels = rec.out[-1].detach().numpy().T  # (N, S) -> (S, N)
                Fmc = conv.matrix(cv.fisher(net, params, x, loss=loss, kind="mc", labels=labels), net)
                record("nngeometry", f"FIM_MonteCarlo S={S} (draws replayed)", setting, got, Fmc, P, "agrees")


# ----------------------------------------------------------------------------- the harness

def record_report(lib, target, setting, report, note, known=None):
    """One row for a ``check_implementation`` report: its worst case's error and tolerance."""
    case = report.worst
    q, v = case.worst
    ok = report.ok
    verdict = "ok" if ok else ("BUG" if known else "FAIL")
    ROWS.append(dict(lib=lib, quantity=f"harness {target}", setting=f"{setting} ({len(report.cases)} cases)",
                     error=v.error, tol=v.tolerance, verdict=verdict, raw=np.nan,
                     note=note if ok else (known or f"unexplained: {case.description}"),
                     fail=(not ok and known is None) or (ok and known is not None)))


def check_harness(quick):
    """refcurv.testing.check_implementation with each library as ``impl``: hypothesis draws
    the networks (MLPs and CNNs, with and without bias), batches and losses; the library
    computes in its convention (declared as Conventions), and for Monte-Carlo quantities it is
    fed refcurv's draws (sampled_grads_from_labels), so they compare exactly."""
    from refcurv.testing import check_implementation

    n_ex = 4 if quick else 12
    NETS = ("mlp", "cnn")  # the libraries take (N, C) outputs: no sequence nets
    have = {m: importlib.util.find_spec(m) is not None for m in ("backpack", "curvlinops", "asdl", "nngeometry")}
    torch_scale = dict(order="torch", loss_scale="torch")

    if have["backpack"]:
        from backpack import backpack, extend
        from backpack import extensions as ext

        def bp_per_sample(case):
            model, lf = extend(case.module), extend(case.torch_loss())
            x, y = case.tensors(case.x, case.y)
            with backpack(ext.BatchGrad()):
                lf(model(x), y).backward()
            return [p.grad_batch.detach().numpy() for p in model.parameters()]

        # BatchGrad is the per-sample term of the reduced loss, (s/N)·u_n: with reduction
        # "sum" that is Conventions' default per_sample_scale s/N; with "mean" it would need
        # p = s/N, which changes with the batch (a missing named option, see docs/peers.md)
        c = Conventions(reduction="sum", **torch_scale)
        record_report("backpack", "per_sample_grads", "BatchGrad, sum", check_implementation(
            "per_sample_grads", bp_per_sample, conventions=c, max_examples=n_ex, nets=NETS, losses=("cross_entropy", "mse")),
            "agrees (reduction sum: p = s/N)")

        def bp_kflr(case):
            from hypothesis import assume  # BackPACK's KFLR has no Softplus extension: skip such nets
            assume(not any(isinstance(m, torch.nn.Softplus) for m in case.module.modules()))
            model, lf = extend(case.module), extend(case.torch_loss())
            x, y = case.tensors(case.x, case.y)
            with backpack(ext.KFLR()):
                lf(model(x), y).backward()
            out = []
            for p in model.parameters():
                fs = [f.detach().numpy() for f in p.kflr]
                out.append((fs[1], fs[0]) if len(fs) == 2 else (np.ones((1, 1)), fs[0]))
            return out

        c = Conventions(bias="separate", conv="backpack", **torch_scale)
        record_report("backpack", "kfac_factors", "KFLR", check_implementation(
            "kfac_factors", bp_kflr, conventions=c, max_examples=n_ex, nets=NETS, losses=("cross_entropy", "mse")),
            "agrees (separate bias, conv='backpack')")

    if have["curvlinops"]:
        import curvlinops as cl
        import curvlinops.fisher as clf

        def cl_dense(op_cls, **kw):
            def impl(case):
                x, y = case.tensors(case.x, case.y)
                ps = list(case.module.parameters())
                op = op_cls(case.module, case.torch_loss(), ps, [(x, y)], check_deterministic=False, **kw)
                return dense_of(op, sum(p.numel() for p in ps))
            return impl

        for target, op in (("ggn", cl.GGNLinearOperator), ("hessian", cl.HessianLinearOperator)):
            record_report("curvlinops", target, op.__name__, check_implementation(
                target, cl_dense(op), conventions=Conventions(**torch_scale), max_examples=n_ex, nets=NETS), "agrees (s·M)")
        for lname, p in (("mse", 2.0), ("cross_entropy", 1.0), ("bce", 1.0)):
            record_report("curvlinops", "empirical_fisher", f"EFLinearOperator {lname}", check_implementation(
                "empirical_fisher", cl_dense(cl.EFLinearOperator), conventions=Conventions(per_sample_scale=p,
                                                                                           **torch_scale),
                max_examples=max(2, n_ex // 2), nets=NETS, losses=lname), f"agrees (s·p·EF, p = {p:g})")

        def cl_fisher_mc(case):
            """refcurv's draws fed into curvlinops: its grad-output sampler replaced by the
            gradients of refcurv's labels (sampled_grads_from_labels)."""
            f = case.net.forward([np.asarray(W, dtype=np.float64) for W in case.params], case.x)
            g = torch.as_tensor(sampled_grads_from_labels(case.loss, f, case.labels))

            def sampler(lossf):
                return lambda output, num_samples, y, generator: g.to(output.dtype)

            with patched(clf, "make_grad_output_sampler", sampler):
                return cl_dense(cl.FisherMCLinearOperator, mc_samples=case.labels.shape[0])(case)

        record_report("curvlinops", "fisher mc", "FisherMCLinearOperator, refcurv's draws", check_implementation(
            "fisher", cl_fisher_mc, conventions=Conventions(**torch_scale), hyper=dict(fisher="mc", n_samples=2),
            max_examples=n_ex, nets=NETS, losses=("cross_entropy", "mse")), "agrees (s·F_mc, labels fed in)")

        def cl_kfac(sep):
            def impl(case):
                x, y = case.tensors(case.x, case.y)
                ps = list(case.module.parameters())
                kf = cl.KFACLinearOperator(case.module, case.torch_loss(), ps, [(x, y)], fisher_type="type-2",
                                           separate_weight_and_bias=sep, check_deterministic=False)
                kf.compute_kronecker_factors()
                out = []  # curvlinops' own factors (private dicts of 3.0), per module in parameters() order
                for mod, pos in kf._mapping.items():
                    G = kf._gradient_covariances[mod].numpy()
                    A = kf._input_covariances.get(mod)
                    if sep or "bias" not in pos or "weight" not in pos:
                        if "weight" in pos:
                            out.append((A.numpy(), G))
                        if "bias" in pos:
                            out.append((np.ones((1, 1)), G))
                    else:
                        out.append((A.numpy(), G))
                return out
            return impl

        for sep in (True, False):
            c = Conventions(bias="separate" if sep else "joint", **torch_scale)
            record_report("curvlinops", "kfac_factors", f"KFACLinearOperator type-2 {c.bias}", check_implementation(
                "kfac_factors", cl_kfac(sep), conventions=c, max_examples=n_ex, nets=NETS), f"agrees (bias {c.bias})")

    if have["nngeometry"]:
        from nngeometry import metrics
        from nngeometry.object import PMatDense
        from torch.utils.data import DataLoader, TensorDataset

        def nng_fim(case):
            x, y = case.tensors(case.x, case.y)
            variant = {"mse": "regression", "bce": "classif_binary_logits"}[case.loss_name]
            loader = DataLoader(TensorDataset(x, y), batch_size=case.N)
            return metrics.FIM(case.module, loader, PMatDense, variant=variant).to_torch().detach().numpy()

        record_report("nngeometry", "fisher exact", "FIM PMatDense", check_implementation(
            "fisher", nng_fim, conventions=Conventions(order="torch"), hyper=dict(fisher="exact"),
            max_examples=n_ex, nets=NETS, losses=("mse", "bce")), "agrees (refcurv's scale)")

    if have["asdl"]:
        import asdl
        import torch.nn.functional as Fn

        def asdl_fisher(ftype):
            def impl(case):
                x, y = case.tensors(case.x, case.y)
                ce = case.loss_name == "cross_entropy"
                cfg = asdl.FisherConfig(fisher_type=ftype, fisher_shapes=[asdl.SHAPE_FULL],
                                        loss_type=asdl.LOSS_CROSS_ENTROPY if ce else asdl.LOSS_MSE, data_size=case.N)
                fm = asdl.get_fisher_maker(case.module, cfg)
                dummy = fm.setup_model_call(case.module, x)
                fm.setup_loss_call(Fn.cross_entropy if ce else _half_mse, dummy, y)
                fm.forward_and_backward()
                return case.module.fisher.data.detach().numpy()
            return impl

        for ftype, hyp in ((asdl.FISHER_EXACT, "exact"), (asdl.FISHER_EMP, "empirical")):
            record_report("asdl", f"fisher {hyp}", f"{ftype} full", check_implementation(
                "fisher", asdl_fisher(ftype), conventions=Conventions(order="torch"), hyper=dict(fisher=hyp),
                max_examples=n_ex, nets=NETS, losses=("cross_entropy", "mse")), "agrees (refcurv's scale)")


# ----------------------------------------------------------------------------- main

CHECKS = {"backpack": ("backpack", check_backpack), "curvlinops": ("curvlinops", check_curvlinops),
          "asdl": ("asdl", check_asdl), "asdl-methods": ("asdl", check_asdl_methods),
          "nngeometry": ("nngeometry", check_nngeometry), "harness": ("hypothesis", check_harness)}


def versions():
    out = {}
    for mod, dist in (("torch", "torch"), ("curvlinops", "curvlinops-for-pytorch"), ("backpack", "backpack-for-pytorch"),
                      ("asdl", "asdfghjkl"), ("nngeometry", "nngeometry"), ("numpy", "numpy")):
        try:
            from importlib.metadata import version
            out[dist] = version(dist)
        except Exception:
            out[dist] = "missing"
    return out


def print_table():
    head = (f"{'library':<11} {'quantity':<36} {'setting':<24} {'error':>8} {'tolerance':>9} {'w/o conv':>8}  "
            "verdict  classification")
    print(head)
    print("-" * len(head))
    for r in ROWS:
        e = "-" if np.isnan(r["error"]) else f"{r['error']:.1e}"
        t = "-" if np.isnan(r["tol"]) else f"{r['tol']:.1e}"
        w = "-" if np.isnan(r["raw"]) else f"{r['raw']:.1e}"
        print(f"{r['lib']:<11} {r['quantity']:<36} {r['setting']:<24} {e:>8} {t:>9} {w:>8}  {r['verdict']:<7}  {r['note']}")


def main(argv=None):
    global torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one MLP and one CNN, mean reduction (CI)")
    ap.add_argument("--only", choices=sorted(CHECKS), action="append", help="check only these libraries")
    args = ap.parse_args(argv)
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        print("check_peers: PyTorch is not installed (pip install \"refcurv[peers]\")", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ROWS.clear()
    for lib in args.only or CHECKS:
        mod, fn = CHECKS[lib]
        try:
            importlib.import_module(mod)
        except ImportError as e:
            skip(lib, f"not installed ({e})")
            continue
        with warnings.catch_warnings():  # the libraries' deprecation chatter (backward hooks)
            warnings.simplefilter("ignore")
            fn(args.quick)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print_table()
    n_fail = sum(r["fail"] for r in ROWS)
    n_bug = sum(r["verdict"] == "BUG" for r in ROWS)
    print(f"\n{len(ROWS)} rows, {n_bug} known library bugs (each with a fixed row), {n_fail} unexplained, "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
