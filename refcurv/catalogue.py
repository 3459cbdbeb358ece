"""The method catalogue and the conventions, as data (read by the CLI and the README)."""

# (name, seed reference, what refcurv provides for it, status)
METHODS = [
    ("SENG", "[SENG] §2-§4 (7)-(28); [SENG-conf] §3.4 (24)-(25)", "EFIM SMW / sketched / implicit, distributed", "available"),
    ("NG+", "[NG+] (2)-(19)", "GFIM L/R, SMW, sketches, block-diagonal, online Newton", "available"),
    ("SMW-GN / SMW-NG / SMW-NG-BD", "[Ren-thesis] Ch.5 (5.2)-(5.7), Alg. 17-23", "SMW solves with Gram blocks, LM rule", "available"),
    ("Hessian-free", "[Ren-thesis] Ch.5", "CG on GGN-vector products", "available"),
    ("KFAC", "[Ren-thesis] Alg. 7, 12", "Kronecker factors (expand/reduce), damped inverse", "available"),
    ("K-BFGS / K-BFGS(L) (MLP)", "[Ren-thesis] Ch.2, Alg. 3-5", "DD-damped BFGS/L-BFGS H_g, Hessian-action H_a", "available"),
    ("K-BFGS / K-BFGS(L) (conv)", "[Ren-thesis] Ch.3, Alg. 8-10", "D_P D_LM, minibatched Hessian action (3.15)", "available"),
    ("TNT", "[Ren-thesis] Ch.4 (4.2)-(4.10), Alg. 13-15", "tensor-normal Fisher, mode products", "available"),
    ("Shampoo", "[Ren-thesis] Alg. 16", "inverse roots (coupled Newton), mode products", "available"),
    ("QNG", "[QNG-Ginger] §2.2 (9)-(13)", "product-form EMA, truncation", "available"),
    ("Ginger", "[QNG-Ginger] §2.3, Alg. 1", "low-rank inverse with Brand update", "available"),
]

CURVATURE = [
    ("hessian", "(1/N) Σ ∇²ψ_i, exact second-order backprop (R-operator)"),
    ("ggn", "(1/N) Σ J_iᵀ H_i J_i                      thesis (1.4)"),
    ("hessian_residual", "(1/N) Σ_i Σ_c [∂ℓ/∂f_i]_c ∇²f_ic = hessian − ggn"),
    ("fisher(kind='exact')", "(1/N) Σ J_iᵀ E_y[∇_f ℓ ∇_f ℓᵀ] J_i   thesis (1.7)"),
    ("fisher(kind='mc')", "(1/(N S)) Σ_i Σ_s u_i(ŷ) u_i(ŷ)ᵀ, ŷ ~ p(·|f_i), seeded or labels=(S, N, …)"),
    ("empirical_fisher", "(1/N) Σ u_i u_iᵀ = U Uᵀ, U = N^(-1/2)[u_1 … u_N]   SENG (2)-(4)"),
    ("kfac_factors", "G ⊗ A per layer (row-major); kind='exact' | 'mc' | 'empirical'; conv='expand' | 'reduce'"),
    ("gfim", "NG+ L = (1/N) Σ 𝒢_i 𝒢_iᵀ, R = (1/N) Σ 𝒢_iᵀ 𝒢_i"),
    ("per_sample_grads / jacobian / preactivation_hessians", "(N, n) / (N, C, n) / (N, m, m)"),
]

CONVENTIONS = [
    ("parameters", "W_l ∈ R^{out × (fan_in + 1)}, bias = last column (a = [x; 1]); bias=False drops it"),
    ("vectorization", "θ = [W_1.ravel(), …, W_L.ravel()] row-major: vec(g aᵀ) = g ⊗ a, block G ⊗ A; "
     "papers' column-major and PyTorch's weight/bias orders via refcurv.permutation"),
    ("loss scaling", "Ψ = (1/N) Σ ψ_i; u_i = ∇ψ_i unscaled; ∇Ψ = mean u_i; MSE ψ = ½‖f − y‖² (H = I)"),
    ("conv unfolding", "A_i ∈ R^{(C_in kh kw + 1) × T}, rows (c_in, kh, kw) then ones, columns row-major "
     "over (H_out, W_out); per-sample gradient G_i A_iᵀ with G_i ∈ R^{out × T}"),
    ("Fisher kinds", "exact: E over p(y|f) in closed form; mc: sampled labels (seeded); empirical: data labels"),
    ("precision", "curvature builders and methods' dense forms compute in float64; the nn module and "
     "methods' fast forms run in the input dtype"),
]


def render():
    from .methods import describe

    lines = ["refcurv — reference and verification suite for curvature-based optimizers", ""]
    lines.append("Methods of the seed papers (shared/seeds):")
    for name, ref, what, status in METHODS:
        lines.append(f"  {name:<28} {ref:<40} {status:<18} {what}")
    lines += ["", "Implemented (refcurv.methods.REGISTRY; dense and fast forms):"]
    for name, ref, summary, hps in describe():
        lines.append(f"  {name:<28} {ref:<40} {summary}")
        if hps:
            lines.append("  " + " " * 28 + " " + ", ".join(f"{k}={v!r}" for k, v in hps.items()))
    lines += ["", "Dense ground truth (refcurv.curvature, float64):"]
    for name, formula in CURVATURE:
        lines.append(f"  {name:<28} {formula}")
    lines += ["", "Conventions:"]
    for name, text in CONVENTIONS:
        lines.append(f"  {name:<16} {text}")
    lines += ["", "Guidance: learning rate and damping that worked on the digits MLP (notebooks/07_training.py;",
              "lr range at the best damping, damping range at the best lr; bounded by the sweep's grid):"]
    for name, g in sorted(GUIDANCE.items()):
        lr = "none worked" if g["lr"] is None else f"lr {g['lr'][0]:g}–{g['lr'][1]:g}"
        lam = "" if g["damping"] is None else f"   damping {g['damping'][0]:g}–{g['damping'][1]:g}"
        best = "" if g["best"] is None else f"   best lr {g['best'][0]:g}" + (
            "" if g["best"][1] is None else f", damping {g['best'][1]:g}") + f" → loss {g['best'][2]:g}"
        lines.append(f"  {name:<28} {lr}{lam}{best}   ({g['worked'][0]}/{g['worked'][1]} runs worked)")
    return "\n".join(lines)


# ------------------------------------------------------------------ guidance (notebook 7)
#: the notebook problem the guidance was measured on (notebooks/07_training.py)
GUIDANCE_PROBLEM = {
    "data": "scikit-learn digits (load_digits), x / 16, 512 samples (numpy.random.default_rng(0).permutation)",
    "net": "Linear(64, 10) – Tanh – Linear(10, 10), net.init(0)",
    "loss": "CrossEntropy (mean over samples)",
    "batch_size": 32,
    "steps": 30,
    "seed": 0,
    "lrs": (0.03, 0.1, 0.3, 1.0, 3.0),
    "dampings": (1e-3, 1e-2, 1e-1, 1.0),
    "worked": "no divergence or failed solve, and final full-data loss <= 0.5 x initial (2.30)",
    "other hyper-parameters": "the method's defaults",
}


#: learning-rate and damping ranges that worked on GUIDANCE_PROBLEM, measured by
#: measure_guidance() in notebooks/07_training.py (REFCURV_FULL_SWEEP=1; CI re-runs the best run and
#: the ends of the lr range). Per method: ``lr`` — (min, max) learning rate that worked at the best
#: run's damping; ``damping`` — (min, max) damping that worked at the best run's learning rate (None:
#: the method has no damping); ``best`` — (lr, damping, final loss) of the run with the lowest final
#: loss; ``worked`` — (runs that worked, runs). Ranges cannot reach past the grid (GUIDANCE_PROBLEM).
GUIDANCE = {
    'adam': {"lr": (0.03, 0.1), "damping": (0.001, 0.1), "best": (0.1, 0.001, 0.353), "worked": (8, 20)},
    'ginger': {"lr": (0.1, 0.1), "damping": (0.1, 0.1), "best": (0.1, 0.1, 0.854), "worked": (2, 20)},
    'hessian_free': {"lr": (0.1, 1.0), "damping": (0.1, 1.0), "best": (1.0, 0.1, 0.179), "worked": (10, 20)},
    'kbfgs': {"lr": (0.3, 3.0), "damping": (1.0, 1.0), "best": (1.0, 1.0, 0.14), "worked": (9, 20)},
    'kbfgs-l': {"lr": (0.3, 3.0), "damping": (1.0, 1.0), "best": (1.0, 1.0, 0.14), "worked": (9, 20)},
    'kbfgs-l-mlp': {"lr": (1.0, 3.0), "damping": (0.1, 1.0), "best": (3.0, 0.1, 0.252), "worked": (8, 20)},
    'kbfgs-mlp': {"lr": (1.0, 3.0), "damping": (0.1, 1.0), "best": (3.0, 0.1, 0.252), "worked": (8, 20)},
    'kfac': {"lr": (0.03, 0.3), "damping": (0.001, 0.1), "best": (0.3, 0.01, 0.133), "worked": (12, 20)},
    'natural_gradient': {"lr": (0.03, 0.3), "damping": (0.01, 0.1), "best": (0.3, 0.01, 0.177), "worked": (10, 20)},
    'ngplus': {"lr": (1.0, 3.0), "damping": (0.1, 1.0), "best": (3.0, 1.0, 0.55), "worked": (8, 20)},
    'ngplus_online_newton': {"lr": (0.1, 1.0), "damping": (0.001, 0.1), "best": (0.3, 0.01, 0.286), "worked": (11, 20)},
    'qng': {"lr": (1.0, 1.0), "damping": None, "best": (1.0, None, 0.868), "worked": (1, 5)},
    'seng': {"lr": (0.1, 3.0), "damping": (0.01, 1.0), "best": (1.0, 0.1, 0.298), "worked": (10, 20)},
    'seng_distributed': {"lr": (0.1, 1.0), "damping": (0.1, 0.1), "best": (0.3, 0.1, 0.294), "worked": (7, 20)},
    'sgd': {"lr": (1.0, 1.0), "damping": None, "best": (1.0, None, 0.695), "worked": (1, 5)},
    'shampoo': {"lr": (0.03, 0.3), "damping": (0.001, 1.0), "best": (0.1, 0.01, 0.247), "worked": (11, 20)},
    'smw_gn': {"lr": (0.1, 1.0), "damping": (0.1, 1.0), "best": (1.0, 0.1, 0.179), "worked": (10, 20)},
    'smw_ng': {"lr": (0.3, 3.0), "damping": (0.1, 1.0), "best": (1.0, 0.1, 0.341), "worked": (9, 20)},
    'smw_ng_bd': {"lr": (0.1, 3.0), "damping": (0.01, 0.1), "best": (0.3, 0.1, 0.358), "worked": (10, 20)},
    'tnt': {"lr": (0.03, 0.1), "damping": (0.001, 0.1), "best": (0.03, 0.1, 0.13), "worked": (7, 20)},
}


def digits_problem(hidden=(10,), n=512, seed=0):
    """``(net, params, x, y, loss)``: the notebooks' problem — scikit-learn's bundled digits
    (``load_digits``, 8×8 images, no download), pixels scaled to [0, 1], ``n`` samples drawn
    without replacement by ``numpy.random.default_rng(seed)``, an MLP ``64 – hidden… – 10``
    with Tanh, cross-entropy. Needs scikit-learn (the ``notebooks`` extra)."""
    import numpy as np

    from .errors import ArgumentTypeError, HyperParameterError

    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise ArgumentTypeError("digits_problem needs scikit-learn (pip install refcurv[notebooks])") from None
    if not isinstance(hidden, (tuple, list)) or not all(
            isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise HyperParameterError(f"hidden must be a tuple of positive ints (layer widths), got {hidden!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 1797:
        raise HyperParameterError(f"n must be an int in [1, 1797] (the digits set has 1797 samples), got {n!r}")
    from .nn import CrossEntropy, Linear, Sequential, Tanh

    from .backend import rng_of

    rng = rng_of(seed)
    X, y = load_digits(return_X_y=True)
    idx = rng.permutation(len(X))[:n]
    widths = (64,) + tuple(hidden) + (10,)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [Linear(a, b), Tanh()]
    net = Sequential(layers[:-1])
    return net, net.init(0), X[idx] / 16.0, y[idx], CrossEntropy()


def measure_guidance(names=None, fraction=0.5):
    """Run :func:`refcurv.train.sweep` on :data:`GUIDANCE_PROBLEM` for each registered method
    (or each name of the list ``names``) and summarize it as a :data:`GUIDANCE` entry:
    ``{name: (entry, records)}``. This is how :data:`GUIDANCE` was measured (notebook 7);
    ``fraction`` is :func:`refcurv.train.worked_ranges`'s criterion (0.5 for GUIDANCE)."""
    from .errors import ArgumentTypeError
    from .methods import REGISTRY
    from .train import sweep, worked_ranges

    if names is None:
        names = sorted(REGISTRY)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ArgumentTypeError(f"names must be None or a list of method names, got {names!r:.80}")
    for n in names:
        REGISTRY[n]  # an unknown name: UnknownMethodError listing the registered ones
    P = GUIDANCE_PROBLEM
    net, params, x, y, loss = digits_problem()
    out = {}
    for name in names:
        recs = sweep(name, net, params, x, y, loss, P["steps"], list(P["lrs"]), list(P["dampings"]),
                     batch_size=P["batch_size"], seed=P["seed"])
        out[name] = (_entry(worked_ranges(recs, fraction)), recs)
    return out


def _entry(summary):
    """The :data:`GUIDANCE` entry of a :func:`refcurv.train.worked_ranges` summary."""
    b = summary["best"]
    return {"lr": summary["lr"], "damping": summary["damping"],
            "best": None if b is None else (b["lr"], b["damping"], round(b["loss"], 3)),
            "worked": (summary["worked"], summary["runs"])}
