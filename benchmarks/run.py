"""refcurv benchmark suite (issue 15): refcurv against torch.func, BackPACK, curvlinops and a HIPS
autograd loop on the same CPU, every method's fast form against its dense form as the width
grows, and the fast forms' dominant kernels as a fraction of this machine's GEMM speed.

Discipline: one BLAS thread (set before NumPy/torch load; threadpoolctl and
``torch.set_num_threads`` as well), a warm-up call of every candidate, then paired
*interleaved* repeats (one call of each candidate per round, the order rotated each round),
medians of the times and of the per-round ratios. Peak memory: ``tracemalloc`` for refcurv
(NumPy code); torch's allocator is invisible to it, and the peers' memory is not measured. Peers that are not installed are skipped and
recorded as such. Writes ``benchmarks/results.json``, ``benchmarks/results.png`` and the
figures section of ``benchmarks/README.md`` (between its ``results`` markers).

    python benchmarks/run.py            # full run (< 10 minutes on the 2-core reference machine)
    python benchmarks/run.py --quick    # smoke run: tiny sizes, seconds
    python benchmarks/run.py --only psg,kernels --quick --out /tmp/r.json --no-readme
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's refcurv (it need not be installed)

import refcurv  # noqa: E402
from refcurv import curvature as cv  # noqa: E402
from refcurv.linalg import gemm  # noqa: E402
from refcurv.methods import REGISTRY, Batch  # noqa: E402
from refcurv.nn import MSE, Conv2d, CrossEntropy, Flatten, Linear, ReLU, Sequential, Tanh  # noqa: E402

try:
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(1)
except ImportError:  # pragma: no cover
    threadpool_info = None


def _optional(name):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


torch = _optional("torch")
if torch is not None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)


# ------------------------------------------------------------------------ timing
def paired(cands, repeats, warmup=1, budget=None):
    """Median seconds of each candidate (``{name: callable}``) and median ratio of each to the
    first one, from ``repeats`` interleaved rounds (order rotated per round) after ``warmup``
    calls each. ``budget``: stop adding rounds once this many seconds have passed (≥ 3 rounds)."""
    names = list(cands)
    for _ in range(warmup):
        for k in names:
            cands[k]()
    times = {k: [] for k in names}
    t_start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t = time.perf_counter()
            cands[k]()
            times[k].append(time.perf_counter() - t)
        if budget is not None and r >= 2 and time.perf_counter() - t_start > budget:
            break
    ref = names[0]
    out = {k: {"median_s": float(np.median(v)), "rounds": len(v)} for k, v in times.items()}
    for k in names[1:]:
        out[k]["ratio_to_" + ref] = float(np.median(np.array(times[k]) / np.array(times[ref])))
    return out


def np_peak(fn):
    """Peak bytes that ``fn`` allocates through Python/NumPy (tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def gflops_of(flops, seconds):
    return flops / seconds / 1e9


# ------------------------------------------------------------------- networks
def mlp(widths, act=ReLU):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [Linear(a, b), act()]
    return Sequential(layers[:-1])


def cnn(c=3, hw=16):
    return Sequential([Conv2d(c, 16, 3, padding=1), ReLU(), Conv2d(16, 32, 3, stride=2, padding=1), ReLU(), Flatten(),
                       Linear(32 * (hw // 2) ** 2, 10)])


def torch_twin(net, params):
    """The ``torch.nn.Sequential`` with the same weights (refcurv: bias = last column; conv rows
    ordered (c, i, j), as PyTorch's kernel flattened row-major)."""
    nn = torch.nn
    mods, j = [], 0
    for m in net.layers:
        if isinstance(m, Linear):
            t = nn.Linear(m.in_features, m.out_features)
        elif isinstance(m, Conv2d):
            t = nn.Conv2d(m.c_in, m.c_out, m.kernel_size, stride=m.stride, padding=m.padding)
        elif isinstance(m, Flatten):
            mods.append(nn.Flatten())
            continue
        else:
            mods.append({"ReLU": nn.ReLU, "Tanh": nn.Tanh}[type(m).__name__]())
            continue
        W = torch.as_tensor(params[j])
        with torch.no_grad():
            t.weight.copy_(W[:, :-1].reshape(t.weight.shape))
            t.bias.copy_(W[:, -1])
        mods.append(t)
        j += 1
    return nn.Sequential(*mods).double()


def data(net, N, shape, C, kind, seed=0):
    rng = np.random.default_rng(seed)
    params = net.init(seed)
    x = rng.standard_normal((N,) + tuple(shape))
    y = rng.integers(0, C, N) if kind == "ce" else rng.standard_normal((N, C))
    return params, x, y


# ------------------------------------------------------------ per-sample grads
def bench_psg(cfg, res):
    out = {}
    problems = {"mlp": (mlp(cfg["psg_mlp"]), (cfg["psg_mlp"][0],), cfg["psg_N"]),
                "cnn": (cnn(3, cfg["psg_hw"]), (3, cfg["psg_hw"], cfg["psg_hw"]), cfg["psg_N_cnn"])}
    autograd = _optional("autograd")
    backpack = _optional("backpack")
    for name, (net, shape, N) in problems.items():
        params, x, y = data(net, N, shape, 10, "ce")
        loss = CrossEntropy()
        cands = {"refcurv_flat": lambda: cv.per_sample_grads(net, params, x, y, loss),
                 "refcurv_layers": lambda: net.per_sample_grads(params, x, y, loss)}
        row = {"n": net.n_params, "N": N}
        if torch is not None:
            from torch.func import functional_call, grad, vmap

            model = torch_twin(net, params)
            tp = {k: v.detach() for k, v in model.named_parameters()}
            tx, ty = torch.as_tensor(x), torch.as_tensor(y)

            def one(p, xi, yi):
                return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

            psg = vmap(grad(one), in_dims=(None, 0, 0))
            cands["torch_func"] = lambda: psg(tp, tx, ty)
            # correctness of the comparison: the same per-sample gradients (first sample, weights)
            ref = psg(tp, tx, ty)
            U = net.per_sample_grads(params, x, y, loss)
            w0 = list(ref.values())[0][0].reshape(U[0].shape[1], -1).numpy()
            row["max_abs_diff_vs_torch"] = float(np.abs(U[0][0][:, :-1] - w0).max())
            if backpack is not None:
                from backpack import backpack as bp_ctx, extend
                from backpack.extensions import BatchGrad

                bmodel = extend(torch_twin(net, params))
                blf = extend(torch.nn.CrossEntropyLoss())

                def bpk():
                    bmodel.zero_grad()
                    with bp_ctx(BatchGrad()):
                        blf(bmodel(tx), ty).backward()
                    return [p.grad_batch for p in bmodel.parameters()]

                cands["backpack_batchgrad"] = bpk
        if autograd is not None:
            anp = importlib.import_module("autograd.numpy")
            layers_np = [(m, k) for k, m in enumerate(net.layers)]
            if all(isinstance(m, (Linear, ReLU)) for m, _ in layers_np):
                def f(ps, xi, yi):
                    z = xi
                    j = 0
                    for m, _ in layers_np:
                        if isinstance(m, Linear):
                            z = anp.dot(ps[j][:, :-1], z) + ps[j][:, -1]
                            j += 1
                        else:
                            z = anp.maximum(z, 0.0)
                    z = z - anp.max(z)
                    return anp.log(anp.sum(anp.exp(z))) - z[yi]

                g = autograd.grad(f)
                cands["autograd_loop"] = lambda: [g(params, x[i], y[i]) for i in range(N)]
        row.update(paired(cands, cfg["repeats"], budget=cfg["budget"]))
        out[name] = row
    res["per_sample_grads"] = out


# ------------------------------------------------------------------ curvature
def bench_curvature(cfg, res):
    out = []
    cl = _optional("curvlinops")
    for h in cfg["curv_widths"]:
        net = mlp([10, h, h, 3], act=Tanh)
        params, x, y = data(net, cfg["curv_N"], (10,), 3, "mse")
        loss = MSE()
        n = net.n_params
        row = {"n": n, "N": cfg["curv_N"], "width": h}
        quantities = {
            "hessian": lambda: cv.hessian(net, params, x, y, loss),
            "ggn": lambda: cv.ggn(net, params, x, y, loss),
            "kfac_factors": lambda: cv.kfac_factors(net, params, x, y, loss, kind="exact"),
        }
        for q, fn in quantities.items():
            cands = {"refcurv": fn}
            if torch is not None:
                from torch.func import functional_call, hessian, jacrev

                model = torch_twin(net, params)
                names = [k for k, _ in model.named_parameters()]
                flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                shapes = [p.shape for p in model.parameters()]
                tx, ty = torch.as_tensor(x), torch.as_tensor(y)

                def unflat(v):
                    out_, o = {}, 0
                    for k, s in zip(names, shapes):
                        m = int(np.prod(s))
                        out_[k] = v[o:o + m].reshape(s)
                        o += m
                    return out_

                def risk(v):  # refcurv's MSE: mean over samples of ½‖f − y‖²
                    return 0.5 * ((functional_call(model, unflat(v), (tx,)) - ty) ** 2).sum() / tx.shape[0]

                if q == "hessian":
                    cands["torch_func"] = lambda: hessian(risk)(flat0)
                elif q == "ggn":
                    def ggn_t():
                        J = jacrev(lambda v: functional_call(model, unflat(v), (tx,)))(flat0)  # (N, C, n)
                        return torch.einsum("ncp,ncq->pq", J, J) / tx.shape[0]
                    cands["torch_func"] = ggn_t
                if cl is not None:
                    tloss = torch.nn.MSELoss(reduction="mean")
                    plist = list(model.parameters())
                    dat = [(tx, ty)]
                    eye = torch.eye(n)
                    if q == "hessian":
                        cands["curvlinops"] = lambda: cl.HessianLinearOperator(model, tloss, plist, dat,
                                                                               check_deterministic=False) @ eye
                    elif q == "ggn":
                        cands["curvlinops"] = lambda: cl.GGNLinearOperator(model, tloss, plist, dat,
                                                                           check_deterministic=False) @ eye
                    else:
                        def kf():
                            op = cl.KFACLinearOperator(model, tloss, plist, dat, fisher_type="type-2",
                                                       separate_weight_and_bias=False, check_deterministic=False)
                            op.compute_kronecker_factors() if hasattr(op, "compute_kronecker_factors") else op @ eye[:, :1]
                            return op
                        cands["curvlinops"] = kf
            if q == "hessian" and n > cfg["hessian_peer_max_n"]:
                cands = {"refcurv": fn}  # the peers' dense Hessian is left out above this size (time box)
            # large n: one interleaved round, no warm-up (a call is seconds; the time box is 10 minutes)
            big = n >= cfg["curv_single_round_n"]
            r = paired(cands, 1 if big else cfg["repeats_curv"], warmup=0 if big else 1, budget=cfg["budget"])
            r["refcurv"]["tracemalloc_peak_bytes"] = np_peak(fn)
            row[q] = r
        out.append(row)
    res["curvature"] = out


# ---------------------------------------------------------------- KFAC step
def bench_kfac(cfg, res):
    cl = _optional("curvlinops")
    net = mlp(cfg["kfac_mlp"])
    params, x, y = data(net, cfg["kfac_N"], (cfg["kfac_mlp"][0],), 10, "ce")
    loss = CrossEntropy()
    lam = 1e-3
    method = REGISTRY["kfac"](damping=lam, fisher="mc")
    state0 = method.init(net, params)
    batch = Batch(x, y, loss)
    cands = {"refcurv_kfac_step": lambda: method.step(state0, net, params, batch, rng=np.random.default_rng(0))}
    if torch is not None and cl is not None:
        model = torch_twin(net, params)
        tloss = torch.nn.CrossEntropyLoss()
        tx, ty = torch.as_tensor(x), torch.as_tensor(y)
        plist = list(model.parameters())

        def cl_step():
            op = cl.KFACLinearOperator(model, tloss, plist, [(tx, ty)], fisher_type="mc", mc_samples=1,
                                       separate_weight_and_bias=False, check_deterministic=False)
            inv = cl.KFACInverseLinearOperator(op, damping=math.sqrt(lam))
            model.zero_grad()
            tloss(model(tx), ty).backward()
            g = torch.cat([p.grad.reshape(-1) for p in plist])
            return inv @ g

        cands["curvlinops_kfac_plus_inverse"] = cl_step
    r = paired(cands, cfg["repeats"], budget=cfg["budget"])
    r["n"], r["N"] = net.n_params, cfg["kfac_N"]
    res["kfac_step"] = r


# ------------------------------------------------------- fast vs dense, by width
def _method_problem(w, N, seed=0):
    net = Sequential([Linear(w, w), Tanh(), Linear(w, 10)])
    params, x, y = data(net, N, (w,), 10, "ce", seed)
    return net, params, Batch(x, y, CrossEntropy())


def bench_methods(cfg, res):
    out = {}
    for name in cfg["methods"]:
        rows, note = [], None
        for w in cfg["method_widths"]:
            net, params, batch = _method_problem(w, cfg["method_N"])
            n = net.n_params
            try:
                m = REGISTRY[name]()
                st = m.init(net, params)
                fast = lambda: m.step(st, net, params, batch, rng=np.random.default_rng(0))  # noqa: E731
                cands = {"fast": fast}
                if n <= cfg["dense_max_n"]:
                    cands["dense"] = lambda: m.step(st, net, params, batch, rng=np.random.default_rng(0), dense=True)  # noqa: E731
                r = paired(cands, cfg["repeats_methods"], budget=cfg["budget_methods"])
            except Exception as e:
                note = f"n={n}: {type(e).__name__}: {str(e)[:160]}"
                break
            row = {"n": n, "fast_s": r["fast"]["median_s"]}
            if "dense" in r:
                row["dense_s"] = r["dense"]["median_s"]
            rows.append(row)
            if r["fast"]["median_s"] > cfg["method_cap_s"]:
                note = f"stopped after n={n}: fast step {r['fast']['median_s']:.2f} s > cap {cfg['method_cap_s']} s"
                break
        out[name] = {"rows": rows, "note": note, **_fit(rows, cfg["fit_min_n"])}
    res["methods"] = out


def _fit(rows, min_n):
    """Log–log slope of the fast form's time in n (sizes ≥ ``min_n``, at least 3) and the
    crossover: the smallest n with the fast form faster than the dense one (log-interpolated)."""
    pts = [(r["n"], r["fast_s"]) for r in rows if r["n"] >= min_n]
    expo = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]) if len(pts) >= 3 else None
    both = [r for r in rows if "dense_s" in r]
    cross = None
    if both:
        if both[0]["fast_s"] <= both[0]["dense_s"]:
            cross = f"<= {both[0]['n']}"
        else:
            for a, b in zip(both[:-1], both[1:]):
                if b["fast_s"] <= b["dense_s"]:
                    la, lb = math.log(a["dense_s"] / a["fast_s"]), math.log(b["dense_s"] / b["fast_s"])
                    t = -la / (lb - la)
                    cross = int(round(math.exp(math.log(a["n"]) + t * (math.log(b["n"]) - math.log(a["n"])))))
                    break
            else:
                cross = f"> {both[-1]['n']}"
    return {"exponent": expo, "exponent_fit_sizes": len(pts), "crossover_n": cross}


# ---------------------------------------------------------- kernels vs GEMM
def bench_kernels(cfg, res):
    """Each fast form's dominant kernel at its shapes, in GFLOP/s, against a GEMM with the
    same (m, k, n) on this machine: fraction = kernel GFLOP/s / GEMM GFLOP/s."""
    rng = np.random.default_rng(0)
    N, d, o, T = cfg["k_N"], cfg["k_d"], cfg["k_o"], cfg["k_T"]
    a, g = rng.standard_normal((N, d, T)), rng.standard_normal((N, o, T))
    rho, za, zg, r = cfg["seng_shape"]
    XiA, XiG = rng.standard_normal((rho, za, r)), rng.standard_normal((rho, zg, r))
    from refcurv.methods import seng

    kernels = {
        # name: (callable, flops, equivalent GEMM shape)
        "grad_from_factors (factor_sum: Σ G_i A_iᵀ)": (lambda: gemm.factor_sum(g, a), 2 * o * d * N * T, (o, N * T, d)),
        "kfac factor A (outer_sum)": (lambda: gemm.outer_sum(a), 2 * d * d * N * T, (d, N * T, d)),
        "seng sketched UᵀU (kron_gram)": (lambda: seng.sketched_UtU(XiA, XiG), None, None),
    }
    out = {}
    for k, (fn, flops, shape) in kernels.items():
        if shape is None:  # SENG: the exact form kron_gram picks, its flops and its main GEMM's shape
            if r * r * (za + zg) <= za * zg * (r + rho):
                flops, shape = 2 * (rho * r) ** 2 * (za + zg) + 2 * rho * rho * r * r, (rho * r, za + zg, rho * r)
            else:
                flops, shape = 2 * rho * za * zg * r + 2 * rho * rho * za * zg, (rho, za * zg, rho)
        m_, k_, n_ = shape
        X, Y = rng.standard_normal((m_, k_)), rng.standard_normal((k_, n_))
        # paired and interleaved with the GEMM, so that load on the machine hits both alike
        p = paired({"gemm": lambda: X @ Y, "kernel": fn}, cfg["repeats"])
        gflops_gemm = gflops_of(2 * m_ * k_ * n_, p["gemm"]["median_s"])
        out[k] = {"seconds": p["kernel"]["median_s"], "gflops": gflops_of(flops, p["kernel"]["median_s"]),
                  "gemm_gflops_same_shape": gflops_gemm,
                  # median over rounds of (kernel flops / kernel time) / (GEMM flops / GEMM time)
                  "fraction_of_gemm": flops / (2 * m_ * k_ * n_) / p["kernel"]["ratio_to_gemm"],
                  "gemm_shape_mkn": list(shape)}
    res["kernels"] = out


# ---------------------------------------------------------------------- GPU
def bench_gpu(cfg, res):
    cp = _optional("cupy")
    if cp is None or not getattr(cp, "is_available", lambda: False)():
        res["gpu"] = {"ran": False, "why": "cupy not importable or no CUDA device: no GPU run has happened"}
        return
    out = {"ran": True, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cp.__version__}
    for w in cfg["gpu_widths"]:
        net, params, batch = _method_problem(w, cfg["method_N"])
        gp = [cp.asarray(W) for W in params]
        gb = Batch(cp.asarray(batch.x), cp.asarray(batch.y), batch.loss)
        row = {}
        for name in ("kfac", "shampoo", "seng", "tnt"):
            m = REGISTRY[name]()
            s_np, s_cp = m.init(net, params), m.init(net, gp)

            def on_gpu():
                m.step(s_cp, net, gp, gb, rng=np.random.default_rng(0))
                cp.cuda.Device().synchronize()

            r = paired({"numpy": lambda: m.step(s_np, net, params, batch, rng=np.random.default_rng(0)),
                        "cupy": on_gpu}, cfg["repeats"], budget=cfg["budget"])
            row[name] = {"numpy_s": r["numpy"]["median_s"], "cupy_s": r["cupy"]["median_s"],
                         "speedup": r["numpy"]["median_s"] / r["cupy"]["median_s"]}
        out[f"n={net.n_params}"] = row
    res["gpu"] = out


# ---------------------------------------------------------------------- configs
QUICK = dict(repeats=3, repeats_curv=3, repeats_methods=3, budget=2.0, budget_methods=1.0,
             psg_mlp=[20, 16, 16, 10], psg_N=8, psg_hw=6, psg_N_cnn=4,
             curv_widths=[4, 8], curv_N=8, hessian_peer_max_n=10_000, curv_single_round_n=150,
             kfac_mlp=[20, 16, 10], kfac_N=8,
             methods=["kfac", "shampoo", "seng", "tnt"], method_widths=[4, 8, 12], method_N=8, dense_max_n=300,
             method_cap_s=0.5, fit_min_n=1,
             k_N=16, k_d=32, k_o=16, k_T=1, seng_shape=(8, 16, 8, 1), gpu_widths=[8])
FULL = dict(repeats=7, repeats_curv=3, repeats_methods=3, budget=20.0, budget_methods=8.0,
            psg_mlp=[784, 256, 256, 10], psg_N=128, psg_hw=16, psg_N_cnn=64,
            curv_widths=[5, 28, 64, 96], curv_N=32, hessian_peer_max_n=10_000, curv_single_round_n=4_000,
            kfac_mlp=[784, 256, 256, 10], kfac_N=128,
            methods=[m for m in REGISTRY if m not in ("sgd",)],
            method_widths=[8, 16, 24, 32, 64, 128, 256, 512, 1000], method_N=32, dense_max_n=1_500,
            method_cap_s=2.0, fit_min_n=10_000,
            k_N=128, k_d=785, k_o=256, k_T=1, seng_shape=(32, 256, 128, 1), gpu_widths=[256, 1000])
SECTIONS = {"psg": bench_psg, "curvature": bench_curvature, "kfac": bench_kfac, "methods": bench_methods,
            "kernels": bench_kernels, "gpu": bench_gpu}


def machine():
    info = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "numpy": np.__version__,
            "refcurv": getattr(refcurv, "__version__", "checkout"),
            "blas_threads_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    import scipy
    info["scipy"] = scipy.__version__
    for name in ("torch", "curvlinops", "backpack", "autograd", "cupy"):
        mod = _optional(name)
        info[name] = getattr(mod, "__version__", "installed") if mod is not None else None
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    if threadpool_info is not None:
        info["threadpools"] = [{k: p.get(k) for k in ("internal_api", "num_threads", "version")} for p in threadpool_info()]
    return info


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------------- report
def plot(res, path):
    try:
        import matplotlib
    except ImportError:  # the plot is optional (extra `notebooks` has matplotlib); the JSON is written
        print(f"matplotlib is not installed: no plot written to {path}", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for name, m in res.get("methods", {}).items():
        rows = m["rows"]
        if rows:
            line, = ax.loglog([r["n"] for r in rows], [r["fast_s"] for r in rows], "-o", ms=3, label=name)
            d = [r for r in rows if "dense_s" in r]
            if d:
                ax.loglog([r["n"] for r in d], [r["dense_s"] for r in d], ":", color=line.get_color())
    ax.set(xlabel="n (parameters)", ylabel="seconds per step", title="fast (solid) vs dense (dotted)")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    curv = res.get("curvature", [])
    for q, mk in (("hessian", "o"), ("ggn", "s"), ("kfac_factors", "^")):
        for peer, ls in (("refcurv", "-"), ("torch_func", "--"), ("curvlinops", ":")):
            pts = [(r["n"], r[q][peer]["median_s"]) for r in curv if peer in r.get(q, {})]
            if pts:
                ax.loglog(*zip(*pts), ls, marker=mk, ms=3, label=f"{q} {peer}")
    ax.set(xlabel="n", ylabel="seconds", title="curvature matrices")
    ax.legend(fontsize=6)
    ax = axes[2]
    labels, vals = [], []
    for prob, row in res.get("per_sample_grads", {}).items():
        for k, v in row.items():
            if isinstance(v, dict) and "median_s" in v:
                labels.append(f"{prob}:{k}")
                vals.append(v["median_s"])
    ax.barh(labels, vals)
    ax.set_xscale("log")
    ax.set(xlabel="seconds", title="per-sample gradients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def goals(res):
    """The issue's goals, each judged from this run's figures: ``(goal, met, measurement)``."""
    G = []
    psg = res.get("per_sample_grads", {})
    for prob, row in psg.items():
        if "torch_func" in row:
            tf = row["torch_func"]["ratio_to_refcurv_flat"]  # torch time / refcurv flat time
            lay = tf / row["refcurv_layers"]["ratio_to_refcurv_flat"]
            G.append((f"per-sample grads ({prob}) ≤ 1.0× torch.func, flat and per-layer", 1 / tf <= 1.0 and 1 / lay <= 1.0,
                      f"flat {1 / tf:.2f}×, per-layer {1 / lay:.2f}× torch.func's time"))
        if "autograd_loop" in row:
            a = row["autograd_loop"]["ratio_to_refcurv_flat"]
            G.append((f"per-sample grads ({prob}) ≥ 30× faster than the autograd loop", a >= 30, f"{a:.0f}× faster"))
    curv = [r for r in res.get("curvature", [])]
    both = [r for r in curv if "torch_func" in r["hessian"]]
    if both:
        r = both[-1]
        ratio = 1 / r["hessian"]["torch_func"]["ratio_to_refcurv"]
        G.append(("Hessian within 1.5× of torch.func", ratio <= 1.5, f"{ratio:.2f}× torch.func's time at n = {r['n']}"))
    big = [r for r in curv if r["n"] >= 5000]
    if big:
        r = big[0]
        peak = r["hessian"]["refcurv"]["tracemalloc_peak_bytes"]
        bound = 8 * (3 * r["n"] ** 2 + 64 * r["N"] * r["n"])
        G.append(("Hessian memory O(n² + N·n), n = 5,000 runs", peak <= bound,
                  f"n = {r['n']}: {r['hessian']['refcurv']['median_s']:.2f} s, peak {peak / 1e6:.0f} MB "
                  f"(n² doubles = {8 * r['n'] ** 2 / 1e6:.0f} MB; N·n² would be {8 * r['N'] * r['n'] ** 2 / 1e6:.0f} MB)"))
    ggn = [(r["n"], 1 / r["ggn"][p]["ratio_to_refcurv"], p) for r in curv for p in ("torch_func", "curvlinops")
           if p in r["ggn"]]
    if ggn:
        worst = max(ggn, key=lambda t: t[1])
        G.append(("GGN ahead of both peers", worst[1] < 1.0,
                  f"worst: {worst[1]:.2f}× {worst[2]}'s time at n = {worst[0]}"))
    k = res.get("kfac_step", {})
    if "curvlinops_kfac_plus_inverse" in k:
        ratio = 1 / k["curvlinops_kfac_plus_inverse"]["ratio_to_refcurv_kfac_step"]
        G.append(("KFAC step no slower than curvlinops KFAC + inverse", ratio <= 1.0, f"{ratio:.2f}× curvlinops' time"))
    for name, m in res.get("methods", {}).items():
        if m["exponent"] is not None:
            G.append((f"{name}: log–log exponent ≤ 1.15", m["exponent"] <= 1.15,
                      f"{m['exponent']:.2f} over {m['exponent_fit_sizes']} sizes up to n = {m['rows'][-1]['n']}"))
    for kname, v in res.get("kernels", {}).items():
        if kname.startswith("seng"):
            G.append(("SENG's dominant kernel ≥ 70% of GEMM speed", v["fraction_of_gemm"] >= 0.7,
                      f"{100 * v['fraction_of_gemm']:.0f}% at GEMM shape {tuple(v['gemm_shape_mkn'])}"))
    return G


def report_md(res):
    """The figures section of benchmarks/README.md, from the results (never typed by hand)."""
    L = []
    mc = res["machine"]
    L.append(f"Run {res['date']} ({'quick' if res['quick'] else 'full'}, {res['wall_s']:.0f} s) on {mc['cpu']}, "
             f"{mc['cpu_count']} cores, one BLAS thread; Python {mc['python']}, NumPy {mc['numpy']}, "
             f"SciPy {mc['scipy']}, torch {mc['torch']}, curvlinops {mc['curvlinops']}, BackPACK {mc['backpack']}, "
             f"autograd {mc['autograd']}. Load average (1 min) at start / end: "
             f"{_fmt((mc.get('load_average_at_start') or [None])[0])} / {_fmt((res.get('load_average_at_end') or [None])[0])} "
             f"on {mc['cpu_count']} cores (other processes share the machine).")
    L.append("")
    if "per_sample_grads" in res:
        L.append("**Per-sample gradients** (median seconds; ratio = median of paired ratios to refcurv's flat routine)")
        L.append("")
        L.append("| problem | n | N | candidate | seconds | ratio to refcurv_flat |")
        L.append("|---|---|---|---|---|---|")
        for prob, row in res["per_sample_grads"].items():
            for k, v in row.items():
                if isinstance(v, dict):
                    L.append(f"| {prob} | {row['n']} | {row['N']} | {k} | {_fmt(v['median_s'])} | "
                             f"{_fmt(v.get('ratio_to_refcurv_flat', 1.0))} |")
        L.append("")
    if "curvature" in res:
        L.append("**Hessian, GGN, Kronecker factors** (median seconds; refcurv peak memory by tracemalloc)")
        L.append("")
        L.append("| n | quantity | refcurv s | torch.func s | curvlinops s | refcurv/torch.func | refcurv/curvlinops | refcurv peak MB |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in res["curvature"]:
            for q in ("hessian", "ggn", "kfac_factors"):
                c = r[q]
                rf = c["refcurv"]["median_s"]
                tf = c.get("torch_func", {}).get("median_s")
                cl = c.get("curvlinops", {}).get("median_s")
                L.append(f"| {r['n']} | {q} | {_fmt(rf)} | {_fmt(tf)} | {_fmt(cl)} | "
                         f"{_fmt(1 / c['torch_func']['ratio_to_refcurv']) if tf else '–'} | "
                         f"{_fmt(1 / c['curvlinops']['ratio_to_refcurv']) if cl else '–'} | "
                         f"{c['refcurv']['tracemalloc_peak_bytes'] / 1e6:.1f} |")
        L.append("")
    if "kfac_step" in res:
        k = res["kfac_step"]
        L.append(f"**One KFAC step** (n = {k['n']}, N = {k['N']}): refcurv {_fmt(k['refcurv_kfac_step']['median_s'])} s"
                 + (f", curvlinops KFAC + inverse {_fmt(k['curvlinops_kfac_plus_inverse']['median_s'])} s "
                    f"(refcurv / curvlinops = {_fmt(1 / k['curvlinops_kfac_plus_inverse']['ratio_to_refcurv_kfac_step'])})"
                    if "curvlinops_kfac_plus_inverse" in k else " (curvlinops not installed)"))
        L.append("")
    if "methods" in res:
        L.append(f"**Fast vs dense form by width** (MLP w–w–10, tanh, N = {res['config']['method_N']}; "
                 "exponent: log–log slope of the fast "
                 "step's time in n over sizes ≥ the fit threshold; crossover: smallest n where fast is faster)")
        L.append("")
        L.append("| method | largest n (fast) | fast s there | exponent | crossover n | note |")
        L.append("|---|---|---|---|---|---|")
        for name, m in res["methods"].items():
            last = m["rows"][-1] if m["rows"] else {}
            L.append(f"| {name} | {last.get('n', '–')} | {_fmt(last.get('fast_s'))} | {_fmt(m['exponent'])} | "
                     f"{_fmt(m['crossover_n'])} | {m['note'] or ''} |")
        L.append("")
    if "kernels" in res:
        L.append("**Dominant kernels vs GEMM at the same shapes**")
        L.append("")
        L.append("| kernel | GFLOP/s | GEMM GFLOP/s (m, k, n) | fraction |")
        L.append("|---|---|---|---|")
        for k, v in res["kernels"].items():
            L.append(f"| {k} | {_fmt(v['gflops'])} | {_fmt(v['gemm_gflops_same_shape'])} {tuple(v['gemm_shape_mkn'])} "
                     f"| {_fmt(v['fraction_of_gemm'], 2)} |")
        L.append("")
    gl = goals(res)
    if gl:
        L.append("**Goals of issue 15, judged from this run**")
        L.append("")
        L.append("| goal | met | measurement |")
        L.append("|---|---|---|")
        for g, ok, meas in gl:
            L.append(f"| {g} | {'yes' if ok else '**no**'} | {meas} |")
        L.append("")
    if "gpu" in res:
        L.append("**GPU**: " + ("ran on " + res["gpu"]["device"] if res["gpu"].get("ran")
                                else "not run — " + res["gpu"]["why"]) + ".")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--plot", default=None, help="plot path (default: next to --out, .png)")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md's figures")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    t0 = time.perf_counter()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": bool(args.quick),
           "machine": machine(), "config": cfg}
    for s in only:
        t = time.perf_counter()
        SECTIONS[s](cfg, res)
        print(f"[{s}] {time.perf_counter() - t:.1f} s", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    res["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["goals"] = [{"goal": g, "met": bool(ok), "measurement": m} for g, ok, m in goals(res)]
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1, default=str))
    plot(res, args.plot or out.with_suffix(".png"))
    md = report_md(res)
    print(md)
    if not args.no_readme:
        readme = HERE / "README.md"
        text = readme.read_text()
        a, b = "<!-- results:begin -->", "<!-- results:end -->"
        i, j = text.index(a) + len(a), text.index(b)
        readme.write_text(text[:i] + "\n" + md + "\n" + text[j:])
    return res


if __name__ == "__main__":
    main()
