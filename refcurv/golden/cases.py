"""The catalogue of golden cases: networks (as plain specs), data, and which quantity or
method runs on them with which hyper-parameters and which flags (:mod:`.flags`).

Every case is a small dict (``id``, ``kind``, ``quantity``/``method``, ``net``, ``loss``,
``N``, ``options``/``hyper_parameters``, ``flags``); the method cases are made by iterating
:data:`refcurv.methods.REGISTRY`, so a newly registered method gets a vector when the set is
regenerated (``python scripts/make_golden.py``)."""
from __future__ import annotations

import numpy as np

#: per-sample input shape and layers of each network (all tiny: 30-70 parameters)
NETWORKS = {
    "mlp": {"input_shape": [3], "layers": [
        {"type": "Linear", "in_features": 3, "out_features": 4, "bias": True}, {"type": "Tanh"},
        {"type": "Linear", "in_features": 4, "out_features": 3, "bias": True}]},
    "mlp_nobias": {"input_shape": [3], "layers": [
        {"type": "Linear", "in_features": 3, "out_features": 4, "bias": False}, {"type": "Tanh"},
        {"type": "Linear", "in_features": 4, "out_features": 3, "bias": False}]},
    "cnn": {"input_shape": [2, 4, 4], "layers": [
        {"type": "Conv2d", "c_in": 2, "c_out": 2, "kernel_size": [3, 3], "stride": 2, "padding": 1, "bias": True},
        {"type": "Tanh"}, {"type": "Flatten"},
        {"type": "Linear", "in_features": 8, "out_features": 3, "bias": True}]},
    # Linear layers on sequences (T = 4 positions of d = 3 features, shared weights): "seq" pools
    # the positions (SequenceMean: the reduce setting of Eschenhagen et al. 2023) before the head,
    # "seq_tokens" keeps one output per position (the loss sums over positions: expand setting)
    "seq": {"input_shape": [4, 3], "layers": [
        {"type": "Linear", "in_features": 3, "out_features": 4, "bias": True}, {"type": "Tanh"},
        {"type": "SequenceMean"},
        {"type": "Linear", "in_features": 4, "out_features": 3, "bias": True}]},
    "seq_tokens": {"input_shape": [4, 3], "layers": [
        {"type": "Linear", "in_features": 3, "out_features": 4, "bias": True}, {"type": "Tanh"},
        {"type": "Linear", "in_features": 4, "out_features": 3, "bias": True}]},
    # one layer with one output: G is 1 × 1, so G ⊗ A = A ⊗ G (the Kronecker order cannot show)
    "logreg": {"input_shape": [4], "layers": [
        {"type": "Linear", "in_features": 4, "out_features": 1, "bias": True}]},
}

LOSSES = {"ce": "CrossEntropy", "mse": "MSE", "bce": "BCE"}
SEEDS = {"params": 0, "data": 1, "draws": 2}
#: the learning rate between recorded steps of a method case (θ_{k+1} = θ_k + lr·d_k)
LR = 0.1
STEPS = 3
N_DEFAULT = 6  # divisible by seng_distributed's 2 workers


def build_net(spec):
    """A refcurv ``Sequential`` from a network spec."""
    from .. import nn

    layers = []
    for L in spec["layers"]:
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in L.items() if k != "type"}
        cls = getattr(nn, L["type"], None)
        if cls is None or L["type"] not in ("Linear", "Conv2d", "Tanh", "ReLU", "Sigmoid", "Softplus", "Flatten",
                                                 "SequenceMean"):
            from .format import GoldenError

            raise GoldenError(f"unknown layer type {L['type']!r} in the network spec")
        layers.append(cls(**kw))
    return nn.Sequential(layers, input_shape=tuple(spec["input_shape"]))


def build_loss(name):
    from .. import nn

    if name not in LOSSES.values():
        from .format import GoldenError

        raise GoldenError(f"unknown loss {name!r} (expected one of {', '.join(LOSSES.values())})")
    return getattr(nn, name)()


def make_data(net, input_shape, loss_name, N, seed):
    """``(x, y)``: standard normal inputs; class indices (CrossEntropy), standard normal
    targets (MSE) or Bernoulli(½) targets as floats (BCE); one target per position for a
    network with per-position outputs ``(T, C)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N,) + tuple(input_shape))
    out = tuple(net.feature_shapes(tuple(input_shape))[-1])
    if loss_name == "CrossEntropy":
        y = rng.integers(0, out[-1], (N,) + out[:-1]).astype(np.int64)
    elif loss_name == "MSE":
        y = rng.standard_normal((N,) + out)
    else:
        y = (rng.random((N,) + out) < 0.5).astype(np.float64)
    return x, y


# ------------------------------------------------------------------ quantities
#: quantity -> options (the curvature function's keyword arguments; "n_samples" > 1 of
#: "mc" kinds is carried out with recorded labels)
QUANTITIES = {
    "per_sample_grads": {}, "grad": {}, "jacobian": {}, "hessian": {}, "ggn": {},
    "fisher_exact": {"kind": "exact"}, "fisher_mc": {"kind": "mc", "n_samples": 1},
    "fisher_mc_s3": {"kind": "mc", "n_samples": 3}, "fisher_empirical": {"kind": "empirical"},
    "empirical_fisher": {},
    "kfac_factors_expand": {"kind": "exact", "conv": "expand"},
    "kfac_factors_reduce": {"kind": "exact", "conv": "reduce"},
    "kfac_factors_mc": {"kind": "mc", "conv": "expand", "n_samples": 1},
    "kfac_factors_mc_s3": {"kind": "mc", "conv": "expand", "n_samples": 3},
    "kfac_factors_empirical": {"kind": "empirical", "conv": "reduce"},
    "gfim": {"side": "auto"}, "ef_gram": {}, "jacobian_gram": {},
}
#: the refcurv function each quantity calls
FUNCTION = {q: ("fisher" if q.startswith("fisher_") else "kfac_factors" if q.startswith("kfac_factors")
                else q) for q in QUANTITIES}

MATRIX_CASES = {("cnn", "ce"), ("seq", "ce"), ("seq_tokens", "mse")}
CNN_CE_ONLY = ("hessian", "ggn", "fisher_exact", "fisher_mc", "fisher_empirical", "empirical_fisher")

#: families of the quantity flags (the quantities whose numbers the mistake can move)
REDUCTION_FAMILY = ("grad", "hessian", "ggn", "fisher", "empirical_fisher", "gfim")
MSE_FAMILY = ("per_sample_grads", "grad", "hessian", "ggn", "fisher", "empirical_fisher")


def max_locations(net_name):
    """The largest number of locations ``T`` (conv output positions, sequence positions) a
    trainable layer of the network sees (1 for an MLP)."""
    spec = NETWORKS[net_name]
    net = build_net(spec)
    shapes = net.feature_shapes(tuple(spec["input_shape"]))
    return max(m.n_locations(shapes[k]) for k, m in zip(net.trainable_index, net.layers_trainable))


def quantity_flags(q, net_name, loss_name, N):
    f = FUNCTION[q]
    opts = QUANTITIES[q]
    flags = []
    if f in REDUCTION_FAMILY and N > 1:
        flags.append("loss_reduction")
    if f in MSE_FAMILY and loss_name == "MSE":
        flags.append("mse_scaling")
    if opts.get("kind") == "mc" and opts.get("n_samples", 1) > 1:
        flags.append("mc_sample_scaling")
    if f == "kfac_factors":
        if max_locations(net_name) > 1:
            flags.append("conv_location_scaling")
        if net_name != "mlp_nobias":
            flags.append("bias_handling")
    return sorted(flags)


def quantity_cases():
    cases = []
    for net_name, loss in (("mlp", "ce"), ("mlp", "mse"), ("mlp", "bce"), ("cnn", "ce"), ("cnn", "mse"),
                           ("cnn", "bce"), ("seq", "ce"), ("seq", "bce"), ("seq_tokens", "mse"),
                           ("seq_tokens", "ce")):
        for q in QUANTITIES:
            # the CNN's 65 × 65 (and the sequence nets') matrices once per quantity keep the set
            # small; their factors, gradients, Jacobians and Grams for every loss
            if net_name != "mlp" and (net_name, loss) not in MATRIX_CASES and q in CNN_CE_ONLY:
                continue
            cases.append(_qcase(q, net_name, loss, N_DEFAULT))
    # batch of one (the 1/N cannot show) and no bias (the ones row cannot show)
    for q in ("grad", "hessian", "ggn", "fisher_exact", "empirical_fisher", "gfim"):
        cases.append(_qcase(q, "mlp", "ce", 1))
    for q in ("kfac_factors_expand", "kfac_factors_reduce", "kfac_factors_mc_s3", "grad"):
        cases.append(_qcase(q, "mlp_nobias", "mse", N_DEFAULT))
    return cases


def _qcase(q, net_name, loss, N):
    lname = LOSSES[loss]
    cid = f"{q}.{net_name}-{loss}" + (f"-n{N}" if N != N_DEFAULT else "")
    return {"id": cid, "kind": "quantity", "quantity": q, "function": FUNCTION[q], "net": net_name,
            "loss": lname, "N": N, "options": dict(QUANTITIES[q]),
            "flags": quantity_flags(q, net_name, lname, N)}


# ------------------------------------------------------------------ methods
#: KFAC variants built so that each of its flags shows in some cases and not in others
#: (tests/test_golden_flags.py checks that each mistake moves exactly the flagged cases)
KFAC_CASES = [
    ("mlp", "ce", {}, ["bias_handling", "damping_split", "ema_scaling", "kronecker_order"]),
    ("mlp", "ce", {"split": "sqrt", "T_inv": 2, "momentum": 0.9},
     ["bias_handling", "ema_scaling", "kronecker_order", "momentum_scaling", "refresh_phase"]),
    ("mlp", "bce", {"n_samples": 3, "beta": 0.0, "T_stats": 2},
     ["bias_handling", "damping_split", "kronecker_order", "mc_sample_scaling", "refresh_phase"]),
    ("mlp_nobias", "mse", {"fisher": "exact", "momentum": 0.5, "momentum_form": "ema"},
     ["damping_split", "ema_scaling", "kronecker_order", "momentum_scaling"]),
    ("logreg", "bce", {"fisher": "empirical", "beta": 0.0},
     ["bias_handling", "damping_split"]),
    ("cnn", "mse", {"fisher": "exact"},
     ["bias_handling", "conv_location_scaling", "damping_split", "ema_scaling", "kronecker_order"]),
    ("cnn", "ce", {"conv": "reduce", "split": "sqrt"},
     ["bias_handling", "conv_location_scaling", "ema_scaling", "kronecker_order"]),
    ("seq_tokens", "ce", {}, ["bias_handling", "conv_location_scaling", "damping_split", "ema_scaling",
                              "kronecker_order"]),
    ("seq", "mse", {"conv": "reduce", "fisher": "exact"},
     ["bias_handling", "conv_location_scaling", "damping_split", "ema_scaling", "kronecker_order"]),
]


def method_flags(hp):
    """Flags of a method case with hyper-parameters ``hp`` beyond KFAC's hand-built variants:
    a gradient momentum ``μ > 0`` with a ``momentum_form`` shows the (1 − μ) mistake."""
    mu = hp.get("momentum")
    return ["momentum_scaling"] if "momentum_form" in hp and isinstance(mu, (int, float)) and mu > 0 else []


def _suffix(opts):
    return "".join(f"-{k.replace('_', '')}{v}" for k, v in sorted(opts.items()))


def method_cases(names=None):
    """One case per registered method on an MLP (cross-entropy) and, where the method
    supports conv layers, a CNN (MSE; BCE for every third method) and a sequence network
    (alternating pooled / per-position outputs and losses), plus KFAC's flag variants."""
    from ..methods import REGISTRY

    cases = []
    for i, (name, cls) in enumerate(sorted(REGISTRY.items())):
        if names is not None and name not in names:
            continue
        if name == "kfac":
            for net_name, loss, opts, flags in KFAC_CASES:
                cases.append(_mcase(name, net_name, loss, opts, flags))
            continue
        flags = method_flags(cls.hyper_parameters())
        cases.append(_mcase(name, "mlp", "ce", {}, flags))
        if getattr(cls, "supports_conv", True):
            cases.append(_mcase(name, "cnn", "bce" if i % 3 == 0 else "mse", {}, flags))
            cases.append(_mcase(name, *(("seq", "mse") if i % 2 else ("seq_tokens", "ce")), {}, flags))
        else:
            cases.append(_mcase(name, "mlp", "mse", {}, flags))
    return cases


def _mcase(name, net_name, loss, opts, flags):
    return {"id": f"{name}.{net_name}-{loss}{_suffix(opts)}", "kind": "method", "method": name,
            "net": net_name, "loss": LOSSES[loss], "N": N_DEFAULT, "options": dict(opts),
            "flags": sorted(flags)}


def all_cases(methods=None, quantities=None):
    """The catalogue, optionally restricted to some methods / quantities (None: all of that
    kind; an empty selection of one kind when only the other is asked for)."""
    if methods is None and quantities is None:
        return quantity_cases() + method_cases()
    out = []
    if quantities is not None:
        out += [c for c in quantity_cases() if c["quantity"] in quantities or c["function"] in quantities]
    if methods is not None:
        out += method_cases(methods)
    return out
