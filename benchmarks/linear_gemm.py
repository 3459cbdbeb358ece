"""Per-sample gradients and Linear passes on the MLP of issue 15, against ``torch.func``.

One BLAS thread (``threadpoolctl.threadpool_limits(1)``, ``torch.set_num_threads(1)``),
float64, warm-up, then ``--repeats`` rounds in which every candidate runs once, in an order
rotated each round (paired, interleaved); reported: each candidate's median time and the
median over rounds of its time / ``torch.func``'s time in the same round.

Candidates: ``refcurv.curvature.per_sample_grads`` (flat ``(N, n)``, float64 ground truth),
``Sequential.per_sample_grads`` (the per-layer routine, list of ``(N, out, d)``),
``Sequential.grad`` and ``curvature.grad`` (mean gradient), ``Sequential.forward``, against ``torch.func``'s
``vmap(grad(·))`` (per-sample gradients) and, for the forward pass, the bare NumPy GEMM chain.
``--before DIR`` also times an older refcurv tree importable as ``refcurv_before`` from ``DIR``
(``git archive <commit> refcurv | tar -x -C DIR && mv DIR/refcurv DIR/refcurv_before``).

    PYTHONPATH=. python benchmarks/linear_gemm.py [--N 128] [--T 0] [--repeats 15] [--before DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import platform
import sys
import time

import numpy as np


def mlp(rc_nn, widths):
    layers = []
    for k, (i, o) in enumerate(itertools.pairwise(widths)):
        layers.append(rc_nn.Linear(i, o))
        if k < len(widths) - 2:
            layers.append(rc_nn.ReLU())
    return rc_nn.Sequential(layers)


def candidates(pkg, tag, widths, x, y):
    nn, cv = importlib.import_module(f"{pkg}.nn"), importlib.import_module(f"{pkg}.curvature")
    net = mlp(nn, widths)
    params, loss = net.init(0), nn.CrossEntropy()
    return {
        f"{tag} curvature.per_sample_grads": lambda: cv.per_sample_grads(net, params, x, y, loss),
        f"{tag} Sequential.per_sample_grads": lambda: net.per_sample_grads(params, x, y, loss),
        f"{tag} Sequential.grad": lambda: net.grad(params, x, y, loss),
        f"{tag} curvature.grad": lambda: cv.grad(net, params, x, y, loss),
        f"{tag} Sequential.forward": lambda: net.forward(params, x),
    }, params


def torch_candidates(widths, params, x, y, check=None):
    import torch
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(1)
    mods = []
    for k, (i, o) in enumerate(itertools.pairwise(widths)):
        mods.append(torch.nn.Linear(i, o))
        if k < len(widths) - 2:
            mods.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*mods).double()
    names = [n for n, _ in model.named_parameters()]
    tensors = []
    for W in params:
        tensors += [torch.tensor(W[:, :-1]), torch.tensor(W[:, -1])]
    p = dict(zip(names, tensors))
    xt, yt = torch.tensor(x), torch.tensor(y)

    def one(pp, xi, yi):
        # refcurv's per-sample loss: summed over the positions of a sequence (README "Sequences")
        out = functional_call(model, pp, (xi[None],))
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yi.reshape(-1), reduction="sum")

    psg = vmap(grad(one), in_dims=(None, 0, 0))
    if check is not None:  # the two agree before they are timed
        g = psg(p, xt, yt)
        ref = [np.concatenate([g[f"{k}.weight"].numpy(), g[f"{k}.bias"].numpy()[..., None]], axis=-1)
               for k in (str(2 * j) for j in range(len(params)))]
        err = max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(check(), ref))
        assert err < 1e-10, f"refcurv and torch.func per-sample gradients differ: {err:.2e}"
    return {"torch.func vmap(grad)": lambda: psg(p, xt, yt)}


def gemm_chain(params, x):
    def run():
        z = x
        for k, W in enumerate(params):
            z = (z.reshape(-1, z.shape[-1]) @ W[:, :-1].T + W[:, -1]).reshape(z.shape[:-1] + (W.shape[0],))
            if k < len(params) - 1:
                z = np.maximum(z, 0)
        return z
    return {"NumPy GEMM chain (forward)": run}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=128)
    ap.add_argument("--widths", default="784,300,100,10")
    ap.add_argument("--T", type=int, default=0, help="sequence length (0: vector inputs)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--before", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_info, threadpool_limits

    widths = [int(w) for w in args.widths.split(",")]
    rng = np.random.default_rng(0)
    seq = (args.T,) if args.T else ()
    x = rng.standard_normal((args.N, *seq, widths[0]))
    y = rng.integers(0, widths[-1], (args.N, *seq))
    with threadpool_limits(1):
        cands, params = candidates("refcurv", "now", widths, x, y)
        if args.before:
            sys.path.insert(0, args.before)
            cands.update(candidates("refcurv_before", "before", widths, x, y)[0])
        cands.update(torch_candidates(widths, params, x, y, check=cands["now Sequential.per_sample_grads"]))
        cands.update(gemm_chain(params, x))
        names = list(cands)
        for name in names:  # warm-up
            cands[name]()
            cands[name]()
        times = {n: [] for n in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                t0 = time.perf_counter()
                cands[n]()
                times[n].append(time.perf_counter() - t0)
        ref = np.array(times["torch.func vmap(grad)"])
        n_params = sum(W.size for W in params)
        report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                  "numpy": np.__version__, "blas_threads": [i["num_threads"] for i in threadpool_info()],
                  "N": args.N, "T": args.T, "widths": widths, "n_params": n_params, "repeats": args.repeats,
                  "results": {}}
        for n in names:
            t = np.array(times[n])
            report["results"][n] = {"median_s": float(np.median(t)), "ratio_to_torch_func": float(np.median(t / ref))}
    where = f", sequences T = {args.T}" if args.T else ""
    print(f"MLP {widths}{where}, n = {n_params}, N = {args.N}, float64, 1 BLAS thread, {args.repeats} paired rounds")
    for n, v in report["results"].items():
        print(f"  {n:40s} {1e3 * v['median_s']:9.2f} ms   {v['ratio_to_torch_func']:6.2f} × torch.func")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
