"""``refcurv golden check DIR``: verify a golden directory — every array's sha256 against the
manifest, then every output recomputed by refcurv from the recorded inputs and compared with
the manifest's tolerance (relative Frobenius error, :func:`refcurv.testing.tolerance.tolerance`).

A missing file, an array whose bytes do not match its sha256, an array the manifest does not
list (or one it lists that is absent), a malformed manifest or an unknown schema version is a
:class:`~refcurv.golden.format.GoldenError` (one line); a recomputed output outside its
tolerance is a failed case in the returned report (the CLI exits 1 on either)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import cases as K
from .export import compute_quantity, draws_from_arrays, method_instance, run_method_step
from .format import GoldenError, from_json_value, load_manifest, read_npz, sha256


@dataclass(frozen=True)
class CaseResult:
    id: str
    kind: str
    name: str
    n_outputs: int
    max_ratio: float  # max over outputs of error / tolerance (<= 1 passes)
    worst: str  # the output with the largest ratio
    passed: bool


def rel_err(a, b):
    """‖a − b‖_F / ‖b‖_F (the reference's norm floored at 1e-300)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-300))


def load_case_arrays(directory, entry):
    """The arrays of one case, each checked against the manifest (names, shape, dtype, sha256)."""
    arrays = read_npz(os.path.join(directory, entry["file"]))
    listed, present = set(entry["arrays"]), set(arrays)
    if listed - present:
        raise GoldenError(f"{entry['file']}: array {sorted(listed - present)[0]!r} listed in the manifest is missing")
    if present - listed:
        raise GoldenError(f"{entry['file']}: array {sorted(present - listed)[0]!r} is not listed in the manifest")
    for name, rec in entry["arrays"].items():
        a = arrays[name]
        if a.dtype.str != rec["dtype"] or list(a.shape) != rec["shape"]:
            raise GoldenError(f"{entry['file']}: array {name!r} is {a.dtype.str} {list(a.shape)}, the manifest "
                              f"says {rec['dtype']} {rec['shape']}")
        if sha256(a) != rec["sha256"]:
            raise GoldenError(f"{entry['file']}: array {name!r} does not match its sha256 (tampered or corrupted)")
    return arrays


def _layers(arrays, prefix):
    out, l = [], 0
    while f"{prefix}/{l}" in arrays:
        out.append(arrays[f"{prefix}/{l}"])
        l += 1
    return out


def _case_setup(entry):
    from ..methods import REGISTRY

    try:
        net = K.build_net(entry["network"])
        loss = K.build_loss(entry["loss"])
    except GoldenError:
        raise
    except Exception as e:  # noqa: BLE001 - a spec refcurv cannot build is a bad manifest
        raise GoldenError(f"bad manifest: case {entry['id']!r}: network cannot be built ({e})") from None
    if entry["kind"] == "method" and entry["method"] not in REGISTRY:
        raise GoldenError(f"case {entry['id']!r}: method {entry['method']!r} is not registered in this refcurv")
    return net, loss


def recompute(entry, arrays):
    """``{output name: recomputed array}`` from the case's recorded inputs."""
    from ..methods import REGISTRY, Batch

    net, loss = _case_setup(entry)
    x, y = arrays["x"], arrays["y"]
    if entry["kind"] == "quantity":
        q = entry["quantity"]
        if q not in K.QUANTITIES:
            raise GoldenError(f"case {entry['id']!r}: unknown quantity {q!r}")
        case = {"quantity": q, "options": dict(K.QUANTITIES[q])}
        case["options"].update({k: v for k, v in entry["hyper_parameters"].items()})
        return compute_quantity(case, net, _layers(arrays, "params"), x, y, loss, arrays.get("labels"))
    cls = REGISTRY[entry["method"]]
    defaults = cls.hyper_parameters()
    hp = {k: from_json_value(v, defaults.get(k)) for k, v in entry["hyper_parameters"].items()}
    method = method_instance({"method": entry["method"], "options": hp})
    batch = Batch(x, y, loss)
    state = method.init(net, _layers(arrays, "step0/params"))
    out = {}
    for k in range(entry["steps"]):
        params = _layers(arrays, f"step{k}/params")
        draws = draws_from_arrays(entry["method"], arrays, f"step{k}/draws")
        outs, state, _ = run_method_step(method, state, net, params, batch, draws)
        out.update({f"step{k}/{n}": a for n, a in outs.items()})
    return out


def check_case(directory, entry):
    arrays = load_case_arrays(directory, entry)
    got = recompute(entry, arrays)
    outputs = {n: r for n, r in entry["arrays"].items() if r["role"] == "output"}
    worst, ratio = "", 0.0
    for name, rec in outputs.items():
        if name not in got:
            r = float("inf")
        elif np.shape(got[name]) != arrays[name].shape:
            r = float("inf")
        else:
            r = rel_err(got[name], arrays[name]) / rec["tolerance"]
        if r >= ratio:
            worst, ratio = name, r
    name = entry.get("method") or entry.get("quantity")
    return CaseResult(entry["id"], entry["kind"], name, len(outputs), ratio, worst, ratio <= 1.0)


def check(directory, ids=None):
    """Verify every case of ``directory`` (or those whose id is in ``ids``): a list of
    :class:`CaseResult`. Raises :class:`GoldenError` on a file or manifest that cannot be
    trusted."""
    from .format import check_path

    directory = check_path(directory, "directory")
    if ids is not None:
        if isinstance(ids, str) or not isinstance(ids, (list, tuple, set, frozenset)):
            from ..errors import ArgumentTypeError

            raise ArgumentTypeError(f"ids must be None or a collection of case ids, got {ids!r}")
        ids = set(ids)
    manifest = load_manifest(directory)
    results = []
    for entry in manifest["cases"]:
        if ids is None or entry["id"] in ids:
            results.append(check_case(directory, entry))
    return results
