"""The schema of ``state.diagnostics``: one key per quantity, the same key in every method
that reports it (tests/test_vocabulary.py checks every method's diagnostics against it).

Values are Python scalars, or lists with one entry per layer (marked "per layer"), so that a
diagnostics dict can be written to JSON as it is.
"""

SCHEMA = {
    # key: (type, meaning)
    "refreshed": ("bool", "the preconditioner (inverse, roots or factorization) was recomputed this step"),
    "stats_refreshed": ("bool", "the curvature statistics were recomputed this step"),
    "damping": ("float", "damping λ used this step"),
    "rho": ("float", "reduction ratio ρ of the Levenberg–Marquardt rule for this step (NaN when not evaluated)"),
    "accepted": ("bool", "the step was accepted by the Levenberg–Marquardt acceptance test"),
    "cg_iters": ("int", "conjugate-gradient iterations this step"),
    "cg_residual": ("float", "relative CG residual ‖b − C x‖ / ‖b‖ at exit"),
    "cg_converged": ("bool", "CG reached its tolerance"),
    "pairs": ("list[int], per layer", "curvature pairs (s, y) seen so far"),
    "pairs_used": ("list[int], per layer", "curvature pairs (s, y) used in an update so far"),
    "pairs_skipped": ("list[int], per layer", "curvature pairs (s, y) skipped so far"),
    "ratio_le_2": ("list[int], per layer", "pairs so far with yᵀHy / sᵀy ≤ 2/μ₁ (thesis §2.4)"),
    "newton_fallbacks": ("int", "coupled-Newton roots replaced by eigh roots so far"),
    # ---- kfac

    # ---- tnt / shampoo

    # ---- kbfgs

    # ---- seng

    # ---- ngplus
    "projected": ("list[bool], per layer", "the projection onto the feasible set was active this step (NG+ (19))"),

    # ---- smw / hessian_free

    # ---- qng / ginger

}
