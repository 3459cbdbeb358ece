"""The golden-vector format: a directory holding ``manifest.json`` and one ``.npz`` per case.

* Arrays are plain little-endian numeric arrays (``<f8`` for floats, ``<i8`` for integers),
  C order; never object arrays. Every read uses ``np.load(..., allow_pickle=False)``.
* ``sha256`` of an array is ``hashlib.sha256(a.tobytes()).hexdigest()``
  (its raw C-order bytes; shape and dtype are recorded next to it).
* The ``.npz`` files are written byte-for-byte deterministically: fixed zip timestamps,
  sorted member order, deflate level 6 (so regeneration gives the same bytes twice).
* The manifest is JSON (sorted keys, two-space indent, no NaN/Inf: a non-finite
  hyper-parameter is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``).

:func:`validate_manifest` is a structural check written in code (``refcurv golden check``
does not need ``jsonschema``); ``manifest.schema.json`` (JSON Schema draft 2020-12, shipped
with the package) states the same structure for other tools.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zipfile

import numpy as np

from ..errors import GoldenError

#: bump when the layout of the manifest or the arrays changes (readers refuse other versions)
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "manifest.schema.json")
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")




def check_path(p, name):
    """A directory argument: a non-empty str or ``os.PathLike`` (ArgumentTypeError otherwise)."""
    from ..errors import ArgumentTypeError

    if isinstance(p, os.PathLike):
        p = os.fspath(p)
    if not isinstance(p, str) or not p:
        raise ArgumentTypeError(f"{name} must be a directory path (a non-empty str or os.PathLike), got {p!r}")
    return p


def check_names(v, name, known):
    """``None`` or a list/tuple/set of names from ``known`` (one line naming the first bad one)."""
    from ..errors import ArgumentTypeError

    if v is None:
        return None
    if isinstance(v, str) or not isinstance(v, (list, tuple, set, frozenset)) or not v:
        raise ArgumentTypeError(f"{name} must be None or a non-empty list of names, got {v!r}")
    for x in v:
        if not isinstance(x, str) or x not in known:
            raise ArgumentTypeError(f"{name}: unknown name {x!r}; known: {', '.join(sorted(known))}")
    return list(v)


def sha256(a):
    """sha256 of an array's raw C-order bytes (hex)."""
    return hashlib.sha256(np.asarray(a).tobytes(order="C")).hexdigest()


def canonical(a):
    """The array as it is written: float64 or int64, little-endian, C order; refuses object,
    complex, string and bool arrays (the format holds plain real numbers only)."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return np.array(a, dtype="<f8", order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if a.dtype.kind in "iu":
        return np.array(a, dtype="<i8", order="C")
    raise GoldenError(f"golden arrays are real numbers; got dtype {a.dtype}")


def write_npz(path, arrays):
    """Write ``{name: array}`` as an ``.npz`` readable by ``np.load(path, allow_pickle=False)``,
    deterministically (sorted names, fixed timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for name in sorted(arrays):
            if not _NAME.match(name):
                raise GoldenError(f"array name {name!r} is not a plain path of [A-Za-z0-9_.-] parts")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, canonical(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, buf.getvalue(), compresslevel=6)


def read_npz(path):
    """``{name: array}`` of an ``.npz`` (never unpickles; a file NumPy cannot read is a
    :class:`GoldenError`)."""
    if not os.path.isfile(path):
        raise GoldenError(f"missing file {os.path.basename(path)} (in {os.path.dirname(path) or '.'})")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise GoldenError(f"{os.path.basename(path)} is not a readable .npz of plain arrays "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def json_value(v):
    """A hyper-parameter value as JSON: non-finite floats as strings, tuples as lists."""
    if isinstance(v, (bool, type(None), str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else ("nan" if v != v else "inf" if v > 0 else "-inf")
    if isinstance(v, (tuple, list)):
        return [json_value(x) for x in v]
    raise GoldenError(f"hyper-parameter value {v!r} has no JSON form")


def from_json_value(v, default=None):
    """Inverse of :func:`json_value` (the default tells whether a string was a float)."""
    if isinstance(v, str) and v in ("inf", "-inf", "nan") and isinstance(default, float):
        return float(v)
    if isinstance(v, list):
        return tuple(from_json_value(x) for x in v)
    return v


def _pretty(obj, level=0):
    """JSON with sorted keys, two-space indent, and every object or list whose members are
    all scalars (an array's record, a shape, a layer) on one line: readable and compact."""
    flat = lambda v: not isinstance(v, (dict, list)) or (  # noqa: E731
        isinstance(v, list) and all(not isinstance(e, (dict, list)) for e in v))
    one = lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False, allow_nan=False)  # noqa: E731
    if isinstance(obj, dict) and all(flat(v) for v in obj.values()) or flat(obj):
        return one(obj)
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{one(k)}: {_pretty(obj[k], level + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [f"{inner}{_pretty(v, level + 1)}" for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


def dump_manifest(manifest, path):
    text = _pretty(manifest)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text + "\n")


def load_manifest(directory):
    """The manifest of a golden directory, structurally validated (:func:`validate_manifest`)."""
    directory = check_path(directory, "directory")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise GoldenError(f"{directory!r} is not a directory")
    if not os.path.isfile(path):
        raise GoldenError(f"missing file {MANIFEST} in {directory}")
    try:
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GoldenError(f"{MANIFEST} is not valid JSON ({str(e).splitlines()[0]})") from None
    validate_manifest(m)
    return m


# ------------------------------------------------------------------ structural validation
_ARRAY_KEYS = {"sha256": str, "shape": list, "dtype": str, "role": str}
_CASE_KEYS = {"id": str, "kind": str, "file": str, "network": dict, "loss": str, "seeds": dict,
              "dtype": str, "steps": int, "hyper_parameters": dict, "conventions": dict,
              "arrays": dict, "flags": list, "batch_size": int}


def _fail(where, msg):
    raise GoldenError(f"bad manifest: {where}: {msg}")


def _typed(obj, key, typ, where):
    if key not in obj:
        _fail(where, f"missing key {key!r}")
    v = obj[key]
    ok = isinstance(v, typ) and not (typ in (int, float) and isinstance(v, bool))
    if typ is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        _fail(where, f"{key!r} must be a {typ.__name__}, got {type(v).__name__}")
    return v


def validate_manifest(m):
    """Check the manifest's structure (what ``manifest.schema.json`` states) with one clear
    line per problem; the schema version first, so a newer format is named as such."""
    if not isinstance(m, dict):
        _fail("top level", f"must be a JSON object, got {type(m).__name__}")
    v = m.get("schema_version")
    if not isinstance(v, int) or isinstance(v, bool):
        _fail("top level", f"'schema_version' must be an integer, got {v!r}")
    if v != SCHEMA_VERSION:
        raise GoldenError(f"unknown schema version {v} (this refcurv reads schema version {SCHEMA_VERSION})")
    _typed(m, "refcurv_version", str, "top level")
    descr = _typed(m, "flag_descriptions", dict, "top level")
    cases = _typed(m, "cases", list, "top level")
    if not cases:
        _fail("top level", "'cases' is empty")
    seen = set()
    for i, c in enumerate(cases):
        where = f"cases[{i}]"
        if not isinstance(c, dict):
            _fail(where, "must be an object")
        for k, t in _CASE_KEYS.items():
            _typed(c, k, t, where)
        where = f"case {c['id']!r}"
        if c["id"] in seen:
            _fail(where, "duplicate id")
        seen.add(c["id"])
        if c["kind"] not in ("method", "quantity"):
            _fail(where, f"'kind' must be 'method' or 'quantity', got {c['kind']!r}")
        _typed(c, c["kind"], str, where)
        if not re.match(r"^[A-Za-z0-9_.\-]+\.npz$", c["file"]):
            _fail(where, f"'file' must be a plain .npz file name, got {c['file']!r}")
        if c["dtype"] != "float64":
            _fail(where, f"'dtype' must be 'float64', got {c['dtype']!r}")
        net = c["network"]
        _typed(net, "layers", list, where + " network")
        _typed(net, "input_shape", list, where + " network")
        for f in c["flags"]:
            if f not in descr:
                _fail(where, f"flag {f!r} has no entry in flag_descriptions")
        if not c["arrays"]:
            _fail(where, "'arrays' is empty")
        for name, a in c["arrays"].items():
            aw = f"{where} array {name!r}"
            if not isinstance(a, dict):
                _fail(aw, "must be an object")
            for k, t in _ARRAY_KEYS.items():
                _typed(a, k, t, aw)
            if not re.match(r"^[0-9a-f]{64}$", a["sha256"]):
                _fail(aw, "'sha256' must be 64 lowercase hex digits")
            if a["role"] not in ("input", "output"):
                _fail(aw, f"'role' must be 'input' or 'output', got {a['role']!r}")
            if a["dtype"] not in ("<f8", "<i8"):
                _fail(aw, f"'dtype' must be '<f8' or '<i8', got {a['dtype']!r}")
            if a["role"] == "output":
                tol = _typed(a, "tolerance", float, aw)
                if not (tol > 0 and math.isfinite(tol)):
                    _fail(aw, f"'tolerance' must be a finite number > 0, got {tol!r}")
                _typed(a, "n", int, aw)
                _typed(a, "cond", float, aw)
                if a.get("kind") not in ("forward", "residual"):
                    _fail(aw, f"'kind' must be 'forward' or 'residual', got {a.get('kind')!r}")
    return m
