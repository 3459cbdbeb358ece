"""One name per concept: every hyper-parameter of every registered method, with the paper's
symbol and its meaning. The README's vocabulary table is this dictionary; tests/test_vocabulary.py
checks that every method's hyper-parameters are listed here, that no retired alias is used,
and that a state field name means one thing across methods.
"""

#: name → (paper symbol, meaning). Shared concepts first.
HYPER_PARAMETERS = {
    # shared concepts
    "damping": ("λ (KFAC, K-BFGS, SENG, NG+, SMW), ε (TNT, Shampoo, NG+ (19) L₀ = εI), γ (Ginger)",
                "damping added to the curvature (for LM methods: the initial λ_LM)"),
    "damping_floor": ("τ (thesis (5.4))", "floor added to the LM damping: λ = λ_LM + τ"),
    "rank": ("τ (QNG, Ginger), r (SENG)", "rank of a low-rank approximation"),
    "beta": ("β (KFAC, TNT, Shampoo, K-BFGS, NG+ (11)/(12)), α (QNG, Ginger (7)), ζ ([SENG-conf] (24))",
             "decay of the moving average (or geometric weighting) of curvature statistics"),
    "momentum": ("μ", "decay of the gradient momentum buffer m"),
    "momentum_form": ("", "'heavy_ball': m ← μ m + g;  'ema': m ← μ m + (1−μ) g"),
    "T_stats": ("T₁ / T_stats", "refresh interval of the curvature statistics (steps)"),
    "T_inv": ("T₂ / T_inv / 𝒯 (NG+) / T (SENG, K-BFGS)",
              "refresh interval of the preconditioner: inverses, roots, factorizations, BFGS updates (steps)"),
    "phase": ("", "refresh phase: 'k0' refreshes at 0-based k ≡ 0 (mod T); 'paper' the schedule the paper prints"),
    "fisher": ("", "Fisher kind: 'exact' (closed-form expectation = GGN), 'mc' (sampled labels), 'empirical' (data labels)"),
    "n_samples": ("S", "sampled labels per input for fisher='mc'"),
    "weight_decay": ("γ (thesis Alg. 15/16)", "decoupled weight decay: γW added to the direction, outside the preconditioner"),
    "l2": ("τ (K-BFGS authors' code)", "L2 regularization: τW added to the gradient before the momentum and "
                                       "the preconditioner (coupled; variant='authors'; None: the authors' 1e-5)"),
    "memory": ("p (L-BFGS, SENG history)", "number of past pairs / vectors kept"),
    "sketch_size": ("q (SENG, NG+)", "number of sampled rows of a sketch"),
    "blocks": ("", "block structure: 'full' (one block), 'layer', 'tensor'"),
    "conv_modes": ("k", "a conv kernel as a 4-mode (out, c_in, kh, kw) or 3-mode (out, c_in, kh·kw) tensor"),
    "variant": ("", "'paper' (the seed's definition) or 'authors' (the authors' published code, design §8)"),
    "algorithm": ("", "which printed algorithm of the seed"),
    "seed": ("", "seed of the method's own initialization (not of the per-step draws)"),
    # KFAC
    "split": ("π", "damping split between the Kronecker factors: 'pi' (Alg. 12 line 19) or 'sqrt' (π = 1)"),
    "conv": ("", "KFAC conv factors: 'expand' (KFC) or 'reduce' (Eschenhagen et al. 2023)"),
    # K-BFGS
    "mu1": ("μ₁", "Powell damping parameter"),
    "skip_factor": ("", "multiplier of the pair-skip threshold 1/μ₁ of Alg. 5 (2 gives the prose's 2/μ₁)"),
    # TNT / Shampoo
    "statistics": ("", "how the curvature statistics are estimated (TNT: 'per_sample' | 'batch_mean'; "
                       "NG+: 'batch' | 'momentum' (11) | 'minibatch' (12))"),
    "root_method": ("", "inverse roots by 'newton' (coupled Newton) or 'eigh'"),
    "newton_tol": ("", "stopping tolerance of the coupled Newton iteration"),
    "newton_max_iter": ("", "iteration cap of the coupled Newton iteration"),
    "on_newton_failure": ("", "'eigh' (fall back, warn, count) or 'raise'"),
    # SENG
    "sketch": ("", "explicit row sketch: 'uniform' or 'leverage'"),
    "replace": ("", "sample sketch rows with replacement"),
    "threshold": ("𝒯 (SENG)", "layer size n^l from which SENG uses the implicit path"),
    "svd": ("", "'exact' or 'randomized' SVD for the implicit low-rank factors"),
    "svd_of": ("", "factor whose SVD is taken: 'auto', 'G' or 'A'"),
    "oversample": ("", "oversampling of the randomized SVD"),
    "power_iter": ("", "power iterations of the randomized SVD"),
    "sketch_size_A": ("ζ_A", "sampled rows of A_i (implicit path)"),
    "sketch_size_G": ("ζ_G", "sampled rows of G_i (implicit path)"),
    "uc": ("", "U c by 'cu' (23) or 'exact' (22)"),
    "history": ("", "'none', 'decay' ([SENG-conf] (24)) or 'hybrid' ([SENG-conf] (25)) gradient history"),
    "hybrid_v": ("v", "recent gradients always kept by the hybrid history"),
    "workers": ("𝓜", "simulated workers (distributed SENG §4)"),
    "normalization": ("", "distributed SENG: 'worker' or 'global' normalization of U"),
    "block_capacitance": ("(26)", "distributed SENG: block-diagonal capacitance across workers"),
    "delayed": ("(27)", "distributed SENG: delayed gradient"),
    "sync_cu": ("(28)", "distributed SENG: synchronized C_U"),
    # NG+
    "side": ("", "GFIM side: 'left' (L), 'right' (R) or 'auto' (the smaller)"),
    "stats_weight": ("γ ([NG+] (12))", "weight of the new statistic in the mini-batch accumulation (12)"),
    "stats_init": ("λ₀ ([NG+] (12))", "initial statistic L̃₀ = λ₀ I of (12)"),
    "gram": ("", "'exact' Gram products or 'sketch' ([NG+] (17))"),
    "block_size": ("([NG+] (18))", "size of the diagonal blocks of the block-diagonal approximation (18)"),
    "solver": ("", "'cholesky', 'smw' (14), 'ls' (15) or 'sketch_ls' (16)"),
    "alpha": ("α ([NG+] (19))", "exp-concavity α of the online-Newton iteration (step 1/α)"),
    "radius": ("𝒟/2", "radius of the Frobenius ball K of the online-Newton projection"),
    "projection": ("", "online-Newton projection: 'L' (in the L_t norm) or 'euclidean'"),
    # SMW / Hessian-free (thesis Ch.5 LM rule)
    "boost": ("ω_boost", "LM damping growth factor (> 1)"),
    "drop": ("ω_drop", "LM damping shrink factor (in (0, 1))"),
    "lm_threshold": ("ε (thesis §5.2.3)", "ρ thresholds ε and 1 − ε of the LM rule"),
    "n2": ("N₂", "size of the subset S₂ the curvature is built from (None: S₂ = S₁)"),
    "accept_threshold": ("η (Theorem 6)", "a step with ρ < η is rejected (None: every step taken)"),
    "form": ("", "SMW-GN: 'symmetric' (5.6, SPD H), 'general' (5.7, singular H) or 'auto'"),
    "cg_max_iter": ("", "iteration cap of conjugate gradients"),
    "cg_tol": ("", "relative residual tolerance of conjugate gradients"),
    # QNG / Ginger
    "u0": ("U₀", "initial basis: 'random' (semi-orthogonal, from seed) or 'eye'"),
    # ---- additions: kfac

    # ---- additions: tnt / shampoo

    # ---- additions: kbfgs

    # ---- additions: seng

    # ---- additions: ngplus

    # ---- additions: smw / hessian_free

    # ---- additions: qng / ginger

    # ---- additions: baselines (sgd, adam, natural_gradient)
    "nesterov": ("", "SGD: Nesterov momentum, d = −(g + μ m) instead of the heavy ball's d = −m (PyTorch's form)"),

}

#: retired names → the name that replaced them (CHANGELOG.md); none may be a hyper-parameter.
RETIRED = {
    "gamma": "damping (Ginger)",
    "lam": "damping",
    "lam_init": "damping (SMW, Hessian-free)",
    "tau": "rank (QNG, Ginger) / damping_floor (SMW, Hessian-free)",
    "epsilon": "damping (NG+ online Newton)",
    "eps": "lm_threshold (SMW, Hessian-free)",
    "T_update": "T_inv (K-BFGS)",
    "update_freq": "T_inv (SENG, NG+)",
    "decay": "beta (SENG)",
    "mb_beta": "beta (NG+)",
    "mb_gamma": "stats_weight (NG+)",
    "mb_lambda0": "stats_init (NG+)",
    "curvature": "gram (NG+); 'curvature' is the method Method.curvature(state)",
    "max_iter": "cg_max_iter (Hessian-free)",
    "tol": "cg_tol (Hessian-free)",
    "n_iter": "power_iter (SENG)",
    "block": "block_capacitance (SENG)",
}

#: state fields that several methods share: one concept, the generic meaning here (each
#: method's field doc adds its paper's detail). A field name used by two methods must be
#: here or in refcurv.methods.base.COMMON_FIELDS (tests/test_vocabulary.py).
STATE_FIELDS = {
    "U": "the n × r factor of the low-rank part of the curvature: U Uᵀ (SENG (4)-(5), NG+ (14)) "
         "or U diag(σ) Uᵀ (Ginger (14))",
    "H_a": "K-BFGS: the inverse of the damped input-side factor, per layer",
    "H_a_used": "K-BFGS: the H_a the last direction used (H_a is updated after the direction)",
    "H_g": "K-BFGS: the dense BFGS approximation of the inverse output-side factor, per layer",
    "S": "L-BFGS: the stored steps s, per layer, oldest first",
    "Y": "L-BFGS: the stored gradient differences y, per layer, oldest first",
    "A": "K-BFGS (Ch.2): the moving average of the input-side factor A, per layer",
    "L": "NG+: the left GFIM statistic (m × m) per 'left' layer",
    "R": "NG+: the right GFIM statistic (n × n) per 'right' layer",
    "sides": "NG+: per layer, 'left' or 'right' (which GFIM side the layer uses)",
    "shapes": "NG+: per layer, the (m, n) shape of Θ",
    "G_hat": "TNT / Shampoo: per layer, per parameter tensor, per mode, the moving average of the mode statistics",
    "factors": "TNT / Shampoo: per layer, per parameter tensor, per mode, the damped Kronecker factor",
    "lowrank_factors": "SENG: per layer the low-rank factors (G̃, Ã) of the implicit path (15)-(16)",
    "buffer": "SENG: per layer the gradient history of [SENG-conf] (24)/(25)",
    "lambda_A": "K-BFGS: the damping of the input side, per layer",
    "lambda_G": "K-BFGS: the damping of the output side, per layer",
    "s_g": "K-BFGS: the last (damped) pair's s for H_g, per layer",
    "y_g": "K-BFGS: the moving average y for H_g, per layer",
    "pending": "K-BFGS: the batch and first-pass quantities kept for the deferred second pass",
    "last_pairs": "K-BFGS: the (s, y) pairs of the last update, per layer",
    "damping_lm": "LM methods: λ_LM of the Levenberg–Marquardt rule (the damping is λ_LM + τ)",
}

#: the Fisher-kind words, the same in refcurv.curvature and every method
FISHER_KINDS = ("exact", "mc", "empirical")


def markdown_table():
    """The README's vocabulary table: name | paper symbol | meaning | methods."""
    from .registry import REGISTRY

    users = {}
    for name, cls in sorted(REGISTRY.items()):
        for hp in cls.hyper_parameters():
            users.setdefault(hp, []).append(name)
    lines = ["| name | paper symbol | meaning | methods |", "|---|---|---|---|"]
    for name, (symbol, meaning) in HYPER_PARAMETERS.items():
        methods = ", ".join(f"`{m}`" for m in users.get(name, []))
        lines.append(f"| `{name}` | {symbol or '—'} | {meaning.replace('|', chr(92) + '|')} | {methods} |")
    return "\n".join(lines)
