"""The flag catalogue of the golden vectors: the implementation mistakes a case is built to
expose (in the spirit of Project Wycheproof's flags). A case carries a flag iff an
implementation with exactly that mistake gets that case's numbers wrong (beyond the
tolerance); ``tests/test_golden_flags.py`` implements each mistake and checks this, case by
case, over the family the flag belongs to."""

#: flag name -> one-line description (written into every manifest as ``flag_descriptions``)
FLAGS = {
    "conv_location_scaling": (
        "KFAC conv factors: the 1/T over the T output locations of a conv layer. expand: "
        "A = (1/(N T)) Σ_{n,t} a aᵀ (KFC, thesis (3.6)); reduce: â = (1/T) Σ_t a. The mistake "
        "drops (or misplaces) the 1/T; invisible on Linear layers (T = 1)."),
    "kronecker_order": (
        "refcurv's row-major vec(W) of W (out × d) has the Kronecker block G ⊗ A "
        "((G ⊗ A) vec(W) = vec(G W Aᵀ)); the papers' column-major vec has A ⊗ G. The mistake "
        "mixes the two (A ⊗ G on a row-major vec); invisible when every layer has one output."),
    "bias_handling": (
        "the bias is the last column of W and the ones row of the patches, so A has the "
        "cross terms between inputs and the constant 1 (one Kronecker block per layer). The "
        "mistake treats weight and bias as separate blocks (drops those cross terms); "
        "invisible for layers without bias."),
    "mc_sample_scaling": (
        "Monte-Carlo Fisher with S sampled labels per input: (1/(S N)) Σ_{s,n} ∇ℓ ∇ℓᵀ. The "
        "mistake averages over N only (sums over the S samples); invisible for S = 1."),
    "loss_reduction": (
        "the objective is the mean of the per-sample losses over the N samples, so gradients "
        "and curvature matrices carry 1/N. The mistake sums over samples (a factor N); "
        "invisible for N = 1."),
    "mse_scaling": (
        "refcurv's MSE is ½‖f − y‖² per sample (output Hessian I). The mistake drops the ½ "
        "(PyTorch MSELoss: a factor 2 on gradients and Gauss-Newton matrices); only MSE cases."),
    "damping_split": (
        "KFAC's damping split (thesis Alg. 12 line 19): (Γ + (√λ/π) I) ⊗ (Ω + π√λ I) with "
        "π = √((tr Ω / dim Ω) / (tr Γ / dim Γ)). The mistake takes π = 1 (√λ on each factor); "
        "invisible when split='sqrt'."),
    "refresh_phase": (
        "a quantity refreshed every T steps is refreshed at 0-based step k iff k ≡ 0 (mod T) "
        "(the first step always refreshes). The mistake counts steps from 1 (refreshes at "
        "k + 1 ≡ 0 (mod T), and at the first step only because nothing exists yet); invisible "
        "for T = 1."),
    "momentum_scaling": (
        "the gradient momentum m ← μ m + g (heavy ball, thesis Alg. 12 line 7) versus the EMA "
        "m ← μ m + (1 − μ) g. The mistake uses the other form (adds or forgets the (1 − μ)); "
        "invisible for μ = 0."),
    "ema_scaling": (
        "curvature statistics as a moving average X ← β X + (1 − β) X_batch, the first refresh "
        "setting X = X_batch. The mistake forgets the (1 − β) (X ← β X + X_batch); invisible "
        "for β = 0 or a single refresh."),
}
