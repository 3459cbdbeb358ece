"""Measure (do not assert) how often K-BFGS's damped pairs satisfy ``yᵀHy / sᵀy ≤ 2/μ₁``.

[Ren-thesis] §2.3 / §3.5 report that on their problems at least 90% of the pairs do (the bound
(2.8)-(2.10) on ``H_g`` needs it, and DD does not guarantee it). This script trains a few
small synthetic problems with every K-BFGS variant and prints, per layer, the fraction of
``H_g``/``H_G`` pairs with the ratio ≤ 2/μ₁ (and ≤ 1/μ₁ for Chapter 2, Algorithm 5's skip
threshold), read from each method's ``state.diagnostics`` (the same keys in all four
methods; degenerate pairs, ``s̃ᵀỹ ≤ 0``, have no ratio and are left out of the fraction).

    python benchmarks/kbfgs_pair_ratios.py [--steps 200] [--seed 0]
"""
from __future__ import annotations

import argparse

import numpy as np

from refcurv.methods import REGISTRY, Batch
from refcurv.nn import BCE, Conv2d, CrossEntropy, Flatten, Linear, ReLU, Sequential, Sigmoid, Tanh


def problems(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 8))
    yield "MLP 8-16-3 tanh, CE", Sequential([Linear(8, 16), Tanh(), Linear(16, 3)]), x, rng.integers(0, 3, 256), CrossEntropy()
    xa = (rng.random((256, 12)) < 0.3).astype(float)
    yield ("autoencoder 12-8-3-8-12 ReLU, BCE",
           Sequential([Linear(12, 8), ReLU(), Linear(8, 3), ReLU(), Linear(3, 8), ReLU(), Linear(8, 12)]), xa, xa, BCE())
    xc = rng.standard_normal((128, 2, 6, 6))
    yield ("CNN conv(2→4,3)-tanh-conv(4→4,3,s2)-linear, CE",
           Sequential([Conv2d(2, 4, 3, padding=1), Tanh(), Conv2d(4, 4, 3, stride=2, padding=1), Sigmoid(), Flatten(),
                       Linear(36, 3)]), xc, rng.integers(0, 3, 128), CrossEntropy())


def run(name, net, x, y, loss, steps, lr, batch_size, seed):
    method = REGISTRY[name]()
    rng = np.random.default_rng(seed)
    params = net.init(seed)
    state = method.init(net, params)
    start = float(net.loss(params, x, y, loss))
    for _ in range(steps):
        idx = rng.choice(len(x), size=batch_size, replace=False)
        d, state = method.step(state, net, params, Batch(x[idx], y[idx], loss), rng)
        params = [W + lr * D for W, D in zip(params, d)]
    return state.diagnostics, start, float(net.loss(params, x, y, loss))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    print(f"{'problem':<48} {'method':<12} {'loss: start → end':>18}  per-layer fraction ≤ 2/μ₁ (pairs)")
    for title, net, x, y, loss in problems(args.seed):
        has_conv = any(isinstance(m, Conv2d) for m in net.layers_trainable)
        for name in ("kbfgs-mlp", "kbfgs-l-mlp", "kbfgs", "kbfgs-l"):
            if has_conv and not REGISTRY[name].supports_conv:
                continue
            diag, start, final = run(name, net, x, y, loss, args.steps, args.lr, args.batch_size, args.seed)
            frac = [f"{w / (n - z):.3f} ({n - z})" if n - z else "– (0)"
                    for n, z, w in zip(diag["pairs"], diag["pairs_degenerate"], diag["ratio_le_2"])]
            print(f"{title:<48} {name:<12} {start:>8.4f} → {final:<7.4f}  " + ", ".join(frac))


if __name__ == "__main__":
    main()
