"""``refcurv golden export``: compute the cases of :mod:`.cases` and write the directory.

For each case the inputs (``x``, ``y``, the parameters — at every step for a method — and
the draws: sampled labels, sketches, seeds) and the outputs are written to ``<id>.npz``, and
the case to ``manifest.json`` with the sha256, shape, dtype and the tolerance of every array.

Outputs of a method at step ``k`` (0-based): the direction (per layer), ``curvature``
(``method.curvature(state, …).todense()``, for networks of at most :data:`MAX_DENSE`
parameters) and the state arrays that define the method (``state/<field>/…``: moving
averages, damped factors, momentum, inverse factors, …; fields that are only defined up to
a rotation or sign — eigenvector bases — and bookkeeping are left out, their product is in
``curvature``). They come from the dense form (``step(…, dense=True)``: the definition,
in float64) with the recorded draws, on one mini-batch, with ``θ_{k+1} = θ_k + lr·d_k``.

Tolerances (:func:`refcurv.testing.tolerance.tolerance`, forward kind, float64): a quantity
``C · n · u`` with ``n`` = parameters + samples (the terms a product or a mean accumulates)
and ``κ = 1`` (no solve); a method's output at step ``k``: ``n`` = parameters × (k + 1) (the
error of every earlier step is carried in the state) and ``κ`` the largest condition number of
the curvature operators of steps ``0…k`` (``numpy.linalg.cond`` of ``todense()``; 1 for a
method that exposes none).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from . import cases as K
from .flags import FLAGS
from .format import SCHEMA_VERSION, GoldenError, canonical, dump_manifest, json_value, sha256, write_npz

#: curvature matrices are stored for networks with at most this many parameters
MAX_DENSE = 40
#: state fields not written: bookkeeping, objects, and bases defined only up to rotation/sign
STATE_SKIP = {"k", "diagnostics", "param_shapes", "pending", "newton", "newton_fallbacks", "last_pairs",
              "U", "lowrank_factors", "sigma", "Omega_sketch", "factorization", "sides", "shapes", "buffer",
              "H_Omega", "H_Gamma"}


def conventions(case=None):
    """``refcurv.testing.Conventions().asdict()`` (the harness's; its field list written out
    while that module is not there), with the case's KFAC conv variant."""
    try:
        from ..testing.conventions import Conventions

        d = dict(Conventions().asdict())
    except ImportError:
        d = {"order": "refcurv", "bias": "joint", "reduction": "mean", "loss_scale": 1.0,
             "sign": "direction", "kronecker": "G_A", "conv": "expand", "damping": "method"}
    conv = (case or {}).get("options", {}).get("conv")
    if conv is not None:
        d["conv"] = conv
    return {k: json_value(v) for k, v in d.items()}


def _layer_arrays(prefix, arrays):
    return {f"{prefix}/{l}": a for l, a in enumerate(arrays)}


def compute_quantity(case, net, params, x, y, loss, labels=None):
    """``{name: array}`` of the quantity's outputs (shared by export and check)."""
    from .. import curvature as cv

    q, opts = case["quantity"], case["options"]
    f = K.FUNCTION[q]
    if f == "fisher":
        kind = opts["kind"]
        if kind == "mc":
            return {"out": cv.fisher(net, params, x, None, loss, kind="mc", labels=labels)}
        return {"out": cv.fisher(net, params, x, y if kind == "empirical" else None, loss, kind=kind)}
    if f == "kfac_factors":
        facs = cv.kfac_factors(net, params, x, y, loss, kind=opts["kind"], conv=opts["conv"],
                               labels=labels if opts["kind"] == "mc" else None)
        out = {}
        for l, (A, G) in enumerate(facs):
            out[f"out/{l}/A"], out[f"out/{l}/G"] = A, G
        return out
    if f == "gfim":
        return _layer_arrays("out", cv.gfim(net, params, x, y, loss, side=opts["side"]))
    if f == "ef_gram":
        A, G = net.factors(params, x, y, loss)
        return {"out": cv.ef_gram(A, G)}
    if f == "jacobian_gram":
        return {"out": net.jacobian_gram(params, x)}
    return {"out": getattr(cv, f)(net, params, x, y, loss)}


def sample_labels(net, params, x, loss, n_samples, seed):
    """Labels drawn from the model (``loss.sample``), ``(n_samples, N, …)``."""
    return np.asarray(loss.sample(net.forward(params, x), n_samples=n_samples, seed=np.random.default_rng(seed)))


def _state_arrays(state, prefix):
    out = {}

    def walk(v, name):
        if v is None or isinstance(v, (bool, str, np.bool_)):
            return
        if isinstance(v, (int, float, np.integer, np.floating)):
            out[name] = np.asarray(v, dtype=np.float64)
        elif isinstance(v, np.ndarray):
            if v.dtype.kind in "fiu":
                out[name] = v
        elif isinstance(v, (list, tuple)):
            for i, e in enumerate(v):
                walk(e, f"{name}/{i}")
        elif isinstance(v, dict):
            for k2 in sorted(v):
                walk(v[k2], f"{name}/{k2}")

    for f in dataclasses.fields(state):
        if f.name not in STATE_SKIP:
            walk(getattr(state, f.name), f"{prefix}/{f.name}")
    return out


def draws_arrays(draws, prefix):
    out = {}
    if draws.labels is not None:
        out[f"{prefix}/labels"] = np.asarray(draws.labels)
    for k2, v in draws.sketches.items():
        out[f"{prefix}/sketches/{k2}"] = np.asarray(v)
    for k2, v in draws.seeds.items():
        out[f"{prefix}/seeds/{k2}"] = np.asarray(int(v), dtype=np.int64)
    return out


def draws_from_arrays(method, arrays, prefix):
    """A :class:`~refcurv.methods.Draws` from the recorded arrays of one step."""
    from ..methods import Draws

    labels, sketches, seeds = None, {}, {}
    for name, a in arrays.items():
        if not name.startswith(prefix + "/"):
            continue
        rest = name[len(prefix) + 1:]
        if rest == "labels":
            labels = a
        elif rest.startswith("sketches/"):
            sketches[rest[len("sketches/"):]] = a
        elif rest.startswith("seeds/"):
            seeds[rest[len("seeds/"):]] = int(a)
    return Draws(method=method, labels=labels, sketches=sketches, seeds=seeds)


def method_instance(case):
    from ..methods import REGISTRY

    return REGISTRY[case["method"]](**case["options"])


def run_method_step(method, state, net, params, batch, draws):
    """One recorded step: ``(outputs, new_state, κ)`` — the dense form's direction, the
    curvature matrix (small networks) and the state arrays."""
    d, new = method.step(state, net, params, batch, draws=draws, dense=True)
    out = {}
    kappa = 1.0
    try:
        C = method.curvature(new, net, params, batch, draws).todense()
    except (NotImplementedError, AttributeError):  # a method that exposes no curvature
        C = None
    if C is not None:
        C = np.asarray(C, dtype=np.float64)
        kappa = float(np.linalg.cond(C))
        if not np.isfinite(kappa):  # a singular operator: the largest κ float64 can resolve
            kappa = 1.0 / np.finfo(np.float64).eps
        if net.n_params <= MAX_DENSE:
            out["curvature"] = C
    out.update(_layer_arrays("direction", d))
    out.update(_state_arrays(new, "state"))
    return out, new, kappa


def compute_case(case):
    """``(arrays, meta)``: every array of the case (inputs and outputs) and, per output, its
    ``(n, κ)`` for the tolerance."""
    from ..methods import Batch

    spec = K.NETWORKS[case["net"]]
    net = K.build_net(spec)
    loss = K.build_loss(case["loss"])
    params = net.init(seed=K.SEEDS["params"])
    x, y = K.make_data(net, spec["input_shape"], case["loss"], case["N"], K.SEEDS["data"])
    arrays = {"x": x, "y": y}
    sizes = {}
    if case["kind"] == "quantity":
        arrays.update(_layer_arrays("params", params))
        labels = None
        if case["options"].get("kind") == "mc":
            labels = sample_labels(net, params, x, loss, case["options"]["n_samples"], K.SEEDS["draws"])
            arrays["labels"] = labels
        outs = compute_quantity(case, net, params, x, y, loss, labels)
        n = net.n_params + case["N"]
        sizes = {k: (n, 1.0) for k in outs}
        arrays.update(outs)
        return arrays, sizes
    method = method_instance(case)
    batch = Batch(x, y, loss)
    state = method.init(net, params)
    kappa = 1.0
    for k in range(K.STEPS):
        arrays.update(_layer_arrays(f"step{k}/params", params))
        draws = method.draw(np.random.default_rng([K.SEEDS["draws"], k]), state, net, params, batch)
        arrays.update(draws_arrays(draws, f"step{k}/draws"))
        outs, state, kap = run_method_step(method, state, net, params, batch, draws)
        kappa = max(kappa, kap)
        for name, a in outs.items():
            arrays[f"step{k}/{name}"] = a
            sizes[f"step{k}/{name}"] = (net.n_params * (k + 1), kappa)
        d = [outs[f"direction/{l}"] for l in range(len(params))]
        params = [W + K.LR * D for W, D in zip(params, d)]
    return arrays, sizes


def case_entry(case, arrays, sizes):
    """The manifest entry of a case."""
    from ..testing.tolerance import tolerance

    spec = K.NETWORKS[case["net"]]
    entry = {"id": case["id"], "kind": case["kind"], "file": case["id"] + ".npz",
             "network": {"name": case["net"], "layers": spec["layers"], "input_shape": spec["input_shape"]},
             "loss": case["loss"], "batch_size": case["N"], "seeds": dict(K.SEEDS), "dtype": "float64",
             "flags": list(case["flags"]), "conventions": conventions(case)}
    if case["kind"] == "quantity":
        entry["quantity"] = case["quantity"]
        entry["function"] = "refcurv.curvature." + case["function"] if case["function"] not in (
            "ef_gram", "jacobian_gram") else {"ef_gram": "refcurv.curvature.ef_gram(*net.factors(...))",
                                              "jacobian_gram": "Sequential.jacobian_gram"}[case["function"]]
        entry["hyper_parameters"] = {k: json_value(v) for k, v in case["options"].items()}
        entry["steps"] = 0
    else:
        cls = type(method_instance(case))
        hp = dict(cls.hyper_parameters())
        hp.update(case["options"])
        entry["method"] = case["method"]
        entry["hyper_parameters"] = {k: json_value(v) for k, v in sorted(hp.items())}
        entry["steps"] = K.STEPS
        entry["lr"] = K.LR
    entry["arrays"] = {}
    for name in sorted(arrays):
        a = canonical(arrays[name])
        rec = {"sha256": sha256(a), "shape": list(a.shape), "dtype": a.dtype.str,
               "role": "output" if name in sizes else "input"}
        if name in sizes:
            n, kap = sizes[name]
            rec.update(n=int(n), cond=float(kap), kind="forward",
                       tolerance=float(tolerance(n, kap, np.float64, "forward")))
        entry["arrays"][name] = rec
    return entry


def export(out, methods=None, quantities=None):
    """Compute the selected cases (all by default) and write ``out/manifest.json`` and one
    ``.npz`` per case; returns the manifest."""
    from .. import __version__
    from ..methods import REGISTRY
    from .format import check_names, check_path

    out = check_path(out, "out")
    methods = check_names(methods, "methods", set(REGISTRY))
    quantities = check_names(quantities, "quantities", set(K.FUNCTION) | set(K.FUNCTION.values()))
    selected = K.all_cases(methods, quantities)
    if not selected:
        raise GoldenError("no case matches the selection")
    os.makedirs(out, exist_ok=True)
    entries = []
    for case in selected:
        arrays, sizes = compute_case(case)
        arrays = {k: canonical(v) for k, v in arrays.items()}
        write_npz(os.path.join(out, case["id"] + ".npz"), arrays)
        entries.append(case_entry(case, arrays, sizes))
    used = sorted({f for e in entries for f in e["flags"]})
    manifest = {"schema_version": SCHEMA_VERSION, "refcurv_version": __version__,
                "description": "refcurv golden vectors: inputs and float64 reference outputs; compare each "
                               "output with relative Frobenius error <= its tolerance",
                "flag_descriptions": {f: FLAGS[f] for f in sorted(FLAGS)} if used or True else {},
                "cases": entries}
    dump_manifest(manifest, os.path.join(out, "manifest.json"))
    return manifest
