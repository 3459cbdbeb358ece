"""Each golden flag is exercised (issue 12, "What must be shown"): for every flag, an
implementation written here in NumPy with exactly that mistake fails exactly the shipped
vectors that carry the flag, and passes the other vectors of that quantity/method family.

The implementations take the recorded inputs (x, y, parameters, sampled labels) and use
refcurv only for what the mistake does not touch (Jacobians, patches, per-sample Hessians, the
exact Kronecker factor G); with no mistake they reproduce every vector of their family (the
first test of each family), so a failure under a mistake is that mistake's doing."""
import numpy as np
import pytest

from refcurv import curvature as cv
from refcurv.golden import DATA_DIR, load_manifest
from refcurv.golden.cases import MSE_FAMILY, REDUCTION_FAMILY, build_loss, build_net
from refcurv.golden.check import load_case_arrays, rel_err

MANIFEST = load_manifest(DATA_DIR)
CASES = {c["id"]: c for c in MANIFEST["cases"]}


def _arrays(case):
    return load_case_arrays(DATA_DIR, case)


def _layers(arrays, prefix):
    out, l = [], 0
    while f"{prefix}/{l}" in arrays:
        out.append(arrays[f"{prefix}/{l}"])
        l += 1
    return out


def _fails(case, arrays, got):
    """True iff some output of ``got`` is outside the manifest's tolerance."""
    assert got, "the implementation produced nothing to compare"
    return any(rel_err(a, arrays[name]) > case["arrays"][name]["tolerance"] for name, a in got.items())


# ------------------------------------------------------------------ quantities, in NumPy
def _softmax(f):
    e = np.exp(f - f.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _loss_grad(loss, f, y, mse_no_half):
    """∇_f ℓ per sample; the MSE mistake: ‖f − y‖² (no ½) has gradient 2(f − y)."""
    if loss == "MSE":
        return (2.0 if mse_no_half else 1.0) * (f - y)
    if loss == "BCE":
        return 1 / (1 + np.exp(-f)) - y
    return _softmax(f) - np.eye(f.shape[-1])[y]


def _loss_hessian(loss, f, mse_no_half):
    """Output Hessian per sample (= the output Fisher for these losses), ``(N, P·C, P·C)`` for
    outputs ``(N, P, C)`` (per-position outputs: block diagonal over the P positions)."""
    N, C = f.shape[0], f.shape[-1]
    f = f.reshape(N, -1, C)
    P = f.shape[1]
    if loss == "MSE":
        H = np.broadcast_to((2.0 if mse_no_half else 1.0) * np.eye(C), (N, P, C, C))
    elif loss == "BCE":
        s = 1 / (1 + np.exp(-f))
        H = np.einsum("npc,cd->npcd", s * (1 - s), np.eye(C))
    else:
        p = _softmax(f)
        H = np.einsum("npc,cd->npcd", p, np.eye(C)) - np.einsum("npc,npd->npcd", p, p)
    return np.einsum("npcd,pq->npcqd", H, np.eye(P)).reshape(N, P * C, P * C)


def numpy_quantity(case, arrays, mistake=None):
    """The case's quantity from its recorded inputs, optionally with one mistake."""
    net, loss = build_net(case["network"]), build_loss(case["loss"])
    params, x, y = _layers(arrays, "params"), arrays["x"], arrays["y"]
    fn, hp = case["function"].split(".")[-1].split("(")[0], case["hyper_parameters"]
    N = x.shape[0]
    red = (lambda a: a.sum(axis=0)) if mistake == "loss_reduction" else (lambda a: a.mean(axis=0))  # noqa: E731
    mse2 = mistake == "mse_scaling"
    f = net.forward(params, x)  # (N, C), or (N, T, C) with per-position outputs
    J = cv.jacobian(net, params, x).reshape(N, -1, net.n_params)  # (N, T·C, n)
    r = lambda yy: _loss_grad(case["loss"], f, yy, mse2).reshape(N, -1)  # noqa: E731
    U = np.einsum("ncp,nc->np", J, r(y))
    if fn == "per_sample_grads":
        return {"out": U}
    if fn == "grad":
        return {"out": red(U)}
    if fn in ("ggn",) or (fn == "fisher" and hp["kind"] == "exact"):
        return {"out": red(np.einsum("ncp,ncd,ndq->npq", J, _loss_hessian(case["loss"], f, mse2), J))}
    if fn == "empirical_fisher" or (fn == "fisher" and hp["kind"] == "empirical"):
        return {"out": red(np.einsum("np,nq->npq", U, U))}
    if fn == "fisher":  # mc, from the recorded labels
        L = arrays["labels"]
        S = L.shape[0]
        Us = np.stack([np.einsum("ncp,nc->np", J, r(L[s])) for s in range(S)])
        per_n = np.einsum("snp,snq->npq", Us, Us) / (1 if mistake == "mc_sample_scaling" else S)
        return {"out": red(per_n)}
    if fn == "hessian":
        H = cv.hessian(net, params, x, y, loss, per_sample=True)  # (N, n, n)
        return {"out": (2.0 if mse2 and case["loss"] == "MSE" else 1.0) * red(H)}
    if fn == "gfim":
        out = {}
        for l, (sl, shp) in enumerate(zip(__import__("refcurv").vec.layer_slices(net), net.param_shapes)):
            g = U[:, sl].reshape((N,) + tuple(shp))
            side = cv.gfim_side(tuple(shp))
            out[f"out/{l}"] = red(np.einsum("nij,nkj->nik", g, g) if side == "left" else np.einsum("nji,njk->nik", g, g))
        return out
    if fn == "kfac_factors":
        return numpy_kfac_factors(net, loss, params, x, y, hp, arrays.get("labels"), mistake)
    raise AssertionError(f"no NumPy implementation of {fn}")


def numpy_kfac_factors(net, loss, params, x, y, hp, labels, mistake):
    """``A`` from the patches in NumPy (expand: (1/(N T)) Σ a aᵀ, reduce: â = mean_t a), ``G``
    from the cotangents of the kind (mc: the mean over the S recorded label sets)."""
    patches, _ = net.factors(params, x, y, loss)
    if hp["kind"] == "mc":
        S = labels.shape[0]
        Gs = [[G for _, G in cv.kfac_factors(net, params, x, labels[s], loss, kind="empirical", conv=hp["conv"])]
              for s in range(S)]
        G_all = [sum(g[l] for g in Gs) / (1 if mistake == "mc_sample_scaling" else S) for l in range(len(params))]
    else:
        G_all = [G for _, G in cv.kfac_factors(net, params, x, y, loss, kind=hp["kind"], conv=hp["conv"])]
    out = {}
    for l, (P, G, W) in enumerate(zip(patches, G_all, params)):
        N, d, T = P.shape
        Tdiv = 1 if mistake == "conv_location_scaling" else T  # the mistake: no 1/T
        if hp["conv"] == "expand":
            A = np.einsum("ndt,net->de", P, P) / (N * Tdiv)
        else:
            a_hat = P.sum(axis=-1) / Tdiv
            A = a_hat.T @ a_hat / N
        if mistake == "bias_handling" and net.layers_trainable[l].bias:
            A = A.copy()
            A[-1, :-1] = A[:-1, -1] = 0.0  # weight and bias as separate blocks
        out[f"out/{l}/A"], out[f"out/{l}/G"] = A, G
    return out


QUANTITY_FAMILIES = {
    "loss_reduction": lambda c: c["kind"] == "quantity" and c["function"].split(".")[-1] in REDUCTION_FAMILY,
    "mse_scaling": lambda c: c["kind"] == "quantity" and c["function"].split(".")[-1] in MSE_FAMILY,
    "mc_sample_scaling": lambda c: c["kind"] == "quantity" and c["hyper_parameters"].get("kind") == "mc",
    "conv_location_scaling": lambda c: c["kind"] == "quantity" and c["quantity"].startswith("kfac_factors"),
    "bias_handling": lambda c: c["kind"] == "quantity" and c["quantity"].startswith("kfac_factors"),
}


def _family(flag, families):
    ids = [cid for cid, c in CASES.items() if families[flag](c)]
    assert ids, f"flag {flag}: empty family"
    return ids


@pytest.mark.parametrize("flag", sorted(QUANTITY_FAMILIES))
def test_quantity_flag_fails_exactly_the_flagged_vectors(flag):
    ids = _family(flag, QUANTITY_FAMILIES)
    flagged = {cid for cid in ids if flag in CASES[cid]["flags"]}
    assert flagged and flagged != set(ids), f"{flag}: the family must hold flagged and unflagged vectors"
    for cid in ids:
        case = CASES[cid]
        arrays = _arrays(case)
        assert not _fails(case, arrays, numpy_quantity(case, arrays)), f"{cid}: the correct NumPy version fails"
        assert _fails(case, arrays, numpy_quantity(case, arrays, flag)) == (cid in flagged), (
            f"{cid}: the {flag} mistake {'passes' if cid in flagged else 'fails'} a vector "
            f"{'flagged' if cid in flagged else 'not flagged'} {flag}")


# ------------------------------------------------------------------ KFAC, in NumPy
def numpy_kfac(case, arrays, mistake=None):
    """KFAC (thesis Alg. 7/12, refcurv's conventions: KFC factors Ω = Σ_t a aᵀ / N,
    Γ = (1/T) G, EMA from the first refresh, trace split, row-major G ⊗ A, refresh at
    k ≡ 0 (mod T), heavy-ball or EMA momentum), over the recorded steps, optionally with one
    mistake; returns every step's direction."""
    net, loss = build_net(case["network"]), build_loss(case["loss"])
    hp, x, y = case["hyper_parameters"], arrays["x"], arrays["y"]
    lam, beta, mu = hp["damping"], hp["beta"], hp["momentum"]
    heavy = (hp["momentum_form"] == "heavy_ball") != (mistake == "momentum_scaling")
    m = Om = Ga = damped = None
    out = {}
    for k in range(case["steps"]):
        params = _layers(arrays, f"step{k}/params")
        due = (lambda T: (k + 1) % T == 0) if mistake == "refresh_phase" else (lambda T: k % T == 0)  # noqa: E731
        stats_due, inv_due = due(hp["T_stats"]) or Om is None, due(hp["T_inv"]) or damped is None
        g = net.grad(params, x, y, loss)
        m = [(mu * mo if m is not None else 0.0) + (1.0 if heavy else 1.0 - mu) * gi
             for mo, gi in zip(m if m is not None else g, g)]
        if stats_due:
            labels = arrays.get(f"step{k}/draws/labels")
            qhp = {"kind": hp["fisher"], "conv": hp["conv"]}
            facs = numpy_kfac_factors(net, loss, params, x, y, qhp, labels,
                                      mistake if mistake in ("bias_handling", "mc_sample_scaling") else None)
            T = [P.shape[-1] for P in net.factors(params, x, y, loss)[0]]
            new_O = [T[l] * facs[f"out/{l}/A"] for l in range(len(T))]
            # Γ = G / T (the KFC mean over locations); the conv mistake drops the 1/T
            new_G = [facs[f"out/{l}/G"] / (1 if mistake == "conv_location_scaling" else T[l]) for l in range(len(T))]
            if Om is None:
                Om, Ga = new_O, new_G
            else:
                w = 1.0 if mistake == "ema_scaling" else 1.0 - beta
                Om = [beta * a + w * b for a, b in zip(Om, new_O)]
                Ga = [beta * a + w * b for a, b in zip(Ga, new_G)]
        if inv_due:
            damped = []
            for O, G in zip(Om, Ga):
                pi = 1.0
                if hp["split"] == "pi" and mistake != "damping_split":
                    pi = np.sqrt((np.trace(O) / O.shape[0]) / (np.trace(G) / G.shape[0]))
                damped.append((O + pi * np.sqrt(lam) * np.eye(len(O)), G + np.sqrt(lam) / pi * np.eye(len(G))))
        for l, (mi, (Od, Gd)) in enumerate(zip(m, damped)):
            Kr = np.kron(Od, Gd) if mistake == "kronecker_order" else np.kron(Gd, Od)
            out[f"step{k}/direction/{l}"] = -np.linalg.solve(Kr, mi.ravel()).reshape(mi.shape)
    return out


KFAC_FLAGS = ["kronecker_order", "bias_handling", "damping_split", "refresh_phase", "momentum_scaling",
              "ema_scaling", "conv_location_scaling", "mc_sample_scaling"]
KFAC_IDS = [cid for cid, c in CASES.items() if c.get("method") == "kfac"]


def test_numpy_kfac_reproduces_every_kfac_vector():
    assert len(KFAC_IDS) >= 5
    for cid in KFAC_IDS:
        case = CASES[cid]
        arrays = _arrays(case)
        assert not _fails(case, arrays, numpy_kfac(case, arrays)), cid


@pytest.mark.parametrize("flag", KFAC_FLAGS)
def test_kfac_flag_fails_exactly_the_flagged_vectors(flag):
    flagged = {cid for cid in KFAC_IDS if flag in CASES[cid]["flags"]}
    assert flagged and flagged != set(KFAC_IDS), f"{flag}: KFAC vectors must hold flagged and unflagged ones"
    for cid in KFAC_IDS:
        case = CASES[cid]
        arrays = _arrays(case)
        assert _fails(case, arrays, numpy_kfac(case, arrays, flag)) == (cid in flagged), (
            f"{cid}: the {flag} mistake {'passes' if cid in flagged else 'fails'} a vector "
            f"{'flagged' if cid in flagged else 'not flagged'} {flag}")


# ------------------------------------------------------------------ momentum, any method
MOMENTUM_IDS = [cid for cid, c in CASES.items() if c["kind"] == "method" and "momentum_form" in c["hyper_parameters"]]


def numpy_momentum_directions(case, arrays, mistake=None):
    """Every momentum method's direction is ``d_k = −C_k⁻¹ m_k`` (README, "Curvature
    operators"), and ``C_k`` does not depend on the momentum buffer: the buffer
    ``m_k = μ m_{k−1} + g_k`` (heavy ball) or ``μ m_{k−1} + (1 − μ) g_k`` (EMA) is computed here
    in NumPy from the recorded parameters' mini-batch gradients, optionally in the other form
    (the mistake), and ``C_k`` is taken from refcurv's operator replayed on the recorded draws."""
    from refcurv.golden.check import _layers as layers
    from refcurv.golden.export import draws_from_arrays, method_instance
    from refcurv.golden.format import from_json_value
    from refcurv.methods import REGISTRY, Batch

    net, loss = build_net(case["network"]), build_loss(case["loss"])
    defaults = REGISTRY[case["method"]].hyper_parameters()
    hp = {k: from_json_value(v, defaults.get(k)) for k, v in case["hyper_parameters"].items()}
    method = method_instance({"method": case["method"], "options": hp})
    batch = Batch(arrays["x"], arrays["y"], loss)
    mu = hp["momentum"]
    heavy = (hp["momentum_form"] == "heavy_ball") != (mistake == "momentum_scaling")
    state, m, out = method.init(net, layers(arrays, "step0/params")), None, {}
    for k in range(case["steps"]):
        params = layers(arrays, f"step{k}/params")
        draws = draws_from_arrays(case["method"], arrays, f"step{k}/draws")
        _, state = method.step(state, net, params, batch, draws=draws, dense=True)
        C = method.curvature(state, net, params, batch, draws).todense()
        g = np.concatenate([gi.ravel() for gi in net.grad(params, arrays["x"], arrays["y"], loss)])
        m = (mu * m if m is not None else 0.0) + (1.0 if heavy else 1.0 - mu) * g
        d = -np.linalg.solve(C, m)
        for l, sl in enumerate(__import__("refcurv").vec.layer_slices(net)):
            out[f"step{k}/direction/{l}"] = d[sl].reshape(params[l].shape)
    return out


def test_momentum_flag_fails_exactly_the_flagged_vectors_of_every_momentum_method():
    methods = {CASES[cid]["method"] for cid in MOMENTUM_IDS}
    assert {"kfac", "tnt", "shampoo", "kbfgs", "kbfgs-mlp"} <= methods
    flagged = {cid for cid in MOMENTUM_IDS if "momentum_scaling" in CASES[cid]["flags"]}
    assert flagged and flagged != set(MOMENTUM_IDS)
    for cid in MOMENTUM_IDS:
        case = CASES[cid]
        arrays = _arrays(case)
        assert not _fails(case, arrays, numpy_momentum_directions(case, arrays)), f"{cid}: correct version fails"
        assert _fails(case, arrays, numpy_momentum_directions(case, arrays, "momentum_scaling")) == (cid in flagged), cid


def test_every_flag_is_exercised_and_described():
    from refcurv.golden import FLAGS

    tested = set(QUANTITY_FAMILIES) | set(KFAC_FLAGS)
    used = {f for c in CASES.values() for f in c["flags"]}
    assert used == tested == set(FLAGS) == set(MANIFEST["flag_descriptions"])
