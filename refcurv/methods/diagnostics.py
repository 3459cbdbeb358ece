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
    "pairs_degenerate": ("list[int], per layer", "K-BFGS: H_g pairs with s̃ᵀỹ ≤ 0 (only s_g = y_g = 0), not used, so far"),
    "ratio_le_1": ("list[int], per layer", "K-BFGS: pairs so far with ỹᵀHỹ / s̃ᵀỹ ≤ 1/μ₁ (Algorithm 5 line 17's threshold)"),
    "ha_skipped": ("list[int], per layer", "K-BFGS: Hessian-action pairs (s_a, y_a) of H_a not used so far"),

    # ---- seng
    "storage": ("list[str], per layer", "SENG: 'explicit' (U of (4)-(5) stored, n^l < 𝒯) or 'implicit' "
                                        "(low-rank factors (15)-(16), n^l ≥ 𝒯) — Algorithm 1's test"),
    "b_hat": ("list[list[float] | None], per layer",
              "SENG: the capacitance solution b̂ of (9)/(12)/(24)/(26) (None where the dense form solves the "
              "n × n system instead)"),

    # ---- ngplus
    "projected": ("list[bool], per layer", "the projection onto the feasible set was active this step (NG+ (19))"),

    # ---- smw / hessian_free
    "smw_form": ("str", "SMW-GN: the SMW form of the step, 'symmetric' ((5.6)), 'general' ((5.7)) or 'dense' (dense form)"),

    # ---- qng / ginger

}
