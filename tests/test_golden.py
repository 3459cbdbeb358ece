"""Golden vectors (issue 12): the shipped set verifies; export → check round-trips for every
registered method; regeneration is byte-for-byte deterministic; the manifest follows its JSON
Schema; a tampered array, a missing file, an edited manifest, an unknown schema version and a
pickled array are each refused with one clear line (GoldenError; the CLI: exit 1)."""
import io
import json
import os
import zipfile

import numpy as np
import pytest

from refcurv.cli import main
from refcurv.golden import DATA_DIR, SCHEMA_FILE, SCHEMA_VERSION, GoldenError, check, export, load_manifest
from refcurv.golden.check import load_case_arrays
from refcurv.golden.format import validate_manifest, write_npz
from refcurv.methods import REGISTRY


def test_shipped_set_verifies():
    results = check(DATA_DIR)
    bad = [r for r in results if not r.passed]
    assert not bad, bad[:3]
    m = load_manifest(DATA_DIR)
    assert m["schema_version"] == SCHEMA_VERSION and len(results) == len(m["cases"])


def test_shipped_set_covers_every_method_quantity_network_and_loss():
    from refcurv.golden.cases import QUANTITIES

    m = load_manifest(DATA_DIR)
    methods = {c["method"] for c in m["cases"] if c["kind"] == "method"}
    assert methods == set(REGISTRY), "regenerate: python scripts/make_golden.py (and add a CHANGELOG line)"
    assert {c["quantity"] for c in m["cases"] if c["kind"] == "quantity"} == set(QUANTITIES)
    assert all(c["steps"] == 3 for c in m["cases"] if c["kind"] == "method")
    for kind in ("method", "quantity"):
        assert {c["network"]["name"] for c in m["cases"] if c["kind"] == kind} >= {"mlp", "cnn", "seq", "seq_tokens"}
        assert {c["loss"] for c in m["cases"] if c["kind"] == kind} == {"CrossEntropy", "MSE", "BCE"}
    size = sum(os.path.getsize(os.path.join(DATA_DIR, f)) for f in os.listdir(DATA_DIR))
    assert size < 5e6, f"shipped set is {size / 1e6:.2f} MB"


def test_shipped_arrays_are_plain_numbers():
    m = load_manifest(DATA_DIR)
    for c in m["cases"][::7]:
        for name, a in load_case_arrays(DATA_DIR, c).items():
            assert a.dtype.str in ("<f8", "<i8"), (c["id"], name, a.dtype)


def test_manifest_follows_the_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    with open(SCHEMA_FILE) as fh:
        schema = json.load(fh)
    jsonschema.Draft202012Validator.check_schema(schema)
    with open(os.path.join(DATA_DIR, "manifest.json")) as fh:
        manifest = json.load(fh)
    jsonschema.Draft202012Validator(schema).validate(manifest)
    bad = json.loads(json.dumps(manifest))
    bad["cases"][0]["arrays"]["x"]["sha256"] = "xyz"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(bad)
    with pytest.raises(GoldenError, match="sha256"):  # the in-code check agrees
        validate_manifest(bad)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_export_check_round_trip(name, tmp_path):
    m = export(str(tmp_path), methods=[name])
    assert {c["method"] for c in m["cases"]} == {name} and len(m["cases"]) >= 2
    results = check(str(tmp_path))
    assert results and all(r.passed for r in results), results


def test_export_quantity_round_trip(tmp_path):
    from refcurv.golden.cases import QUANTITIES

    m = export(str(tmp_path), quantities=sorted(QUANTITIES))
    assert {c["quantity"] for c in m["cases"]} == set(QUANTITIES)
    assert all(r.passed for r in check(str(tmp_path)))
    m = export(str(tmp_path / "k"), quantities=["kfac_factors"])  # a function name selects its variants
    assert {c["quantity"] for c in m["cases"]} == {q for q in QUANTITIES if q.startswith("kfac_factors")}


def test_regeneration_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    export(str(a), methods=["kfac", "seng"], quantities=["fisher"])
    export(str(b), methods=["kfac", "seng"], quantities=["fisher"])
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b)) and "manifest.json" in files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_shipped_set_is_what_the_script_writes(tmp_path):
    """Every shipped sha256 is what this code computes (on this machine): a change that moves a
    shipped number shows here and needs a regeneration and a CHANGELOG line. (Bits can differ
    across BLAS builds; the tolerance check above is the portable one, so this compares the
    inputs bit for bit and the outputs within their tolerance.)"""
    export(str(tmp_path), quantities=["grad", "kfac_factors"], methods=["kfac"])
    new = {c["id"]: c for c in load_manifest(str(tmp_path))["cases"]}
    old = {c["id"]: c for c in load_manifest(DATA_DIR)["cases"] if c["id"] in new}
    assert set(old) == set(new)
    for cid, c in new.items():
        assert {k: v for k, v in c.items() if k != "arrays"} == {k: v for k, v in old[cid].items() if k != "arrays"}
        for name, rec in c["arrays"].items():
            if rec["role"] == "input":
                assert rec["sha256"] == old[cid]["arrays"][name]["sha256"], (cid, name)


# ------------------------------------------------------------------ refusals
@pytest.fixture
def small(tmp_path):
    d = tmp_path / "g"
    export(str(d), methods=["kfac"], quantities=["grad"])
    return d


def _case(d, prefix):
    return next(c for c in load_manifest(str(d))["cases"] if c["id"].startswith(prefix))


def _rewrite(path, change):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    write_npz(path, arrays)


def test_every_tampered_array_is_refused(small):
    case = _case(small, "kfac.mlp-ce")
    path = small / case["file"]
    original = path.read_bytes()
    assert len(case["arrays"]) > 30
    for name in case["arrays"]:
        def bump(arrays, name=name):
            a = arrays[name].copy()
            a.flat[0] = a.flat[0] + (1 if a.dtype.kind == "i" else 1e-12 * max(1.0, abs(a.flat[0])))
            arrays[name] = a
        _rewrite(path, bump)
        with pytest.raises(GoldenError, match=f"array '{name}' does not match its sha256"):
            check(str(small), ids={case["id"]})
        path.write_bytes(original)
    assert all(r.passed for r in check(str(small)))


def test_missing_and_extra_arrays_and_files(small):
    case = _case(small, "grad.mlp-ce")
    path = small / case["file"]
    _rewrite(path, lambda a: a.pop("y"))
    with pytest.raises(GoldenError, match="'y' listed in the manifest is missing"):
        check(str(small))
    _rewrite(path, lambda a: a.update(y=np.zeros(6, dtype=np.int64), extra=np.zeros(2)))
    with pytest.raises(GoldenError, match="'extra' is not listed"):
        check(str(small))
    path.unlink()
    with pytest.raises(GoldenError, match=f"missing file {case['file']}"):
        check(str(small))
    (small / "manifest.json").unlink()
    with pytest.raises(GoldenError, match="missing file manifest.json"):
        check(str(small))


def test_a_pickled_array_is_never_loaded(small):
    case = _case(small, "grad.mlp-ce")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(small / case["file"], "w") as z:
        z.writestr("x.npy", buf.getvalue())
    with pytest.raises(GoldenError, match="not a readable .npz of plain arrays"):
        check(str(small))


def _edit(d, change):
    p = d / "manifest.json"
    m = json.loads(p.read_text())
    change(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(schema_version=99), "unknown schema version 99"),
    (lambda m: m.update(schema_version="1"), "'schema_version' must be an integer"),
    (lambda m: m.pop("cases"), "missing key 'cases'"),
    (lambda m: m["cases"][0].pop("network"), "missing key 'network'"),
    (lambda m: m["cases"][0]["arrays"]["x"].update(sha256="0" * 64), "does not match its sha256"),
    (lambda m: m["cases"][0]["arrays"]["x"].update(shape=[1]), "the manifest says"),
    (lambda m: m["cases"][0]["arrays"]["out"].update(tolerance="tiny"), "'tolerance' must be a float"),
    (lambda m: m["cases"][0]["arrays"]["out"].update(tolerance=-1.0), "'tolerance' must be a finite number > 0"),
    (lambda m: m["cases"][0]["flags"].append("made_up"), "flag 'made_up' has no entry"),
    (lambda m: m["cases"][0].update(file="../x.npz"), "plain .npz file name"),
    (lambda m: m["cases"][0]["network"]["layers"].append({"type": "Dropout"}), "unknown layer type"),
    (lambda m: m["cases"][1].update(id=m["cases"][0]["id"]), "duplicate id"),
])
def test_edited_manifest_is_refused(small, change, message):
    _edit(small, change)
    with pytest.raises(GoldenError, match=message):
        check(str(small))


def test_invalid_json(small):
    (small / "manifest.json").write_text("{not json")
    with pytest.raises(GoldenError, match="not valid JSON"):
        check(str(small))


def test_consistently_tampered_output_fails_the_recomputation(small):
    """An output changed together with its sha256: the hashes pass, the recomputation does not."""
    case = _case(small, "grad.mlp-ce")
    from refcurv.golden.format import sha256

    def change(arrays):
        arrays["out"] = arrays["out"] * (1 + 1e-6)
    _rewrite(small / case["file"], change)
    with np.load(small / case["file"], allow_pickle=False) as f:
        h = sha256(f["out"])
    _edit(small, lambda m: next(c for c in m["cases"] if c["id"] == case["id"])["arrays"]["out"].update(sha256=h))
    r = {x.id: x for x in check(str(small))}
    assert not r[case["id"]].passed and r[case["id"]].worst == "out"
    assert sum(not x.passed for x in r.values()) == 1


# ------------------------------------------------------------------ CLI
def test_cli_export_check_list(small, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["golden", "export", "--method", "sgd", "--quantity", "gfim", "--out", str(out)]) == 0
    assert main(["golden", "check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sgd.mlp-ce" in text and "gfim.cnn-ce" in text and "0 failed" in text
    assert main(["golden", "list"]) == 0
    text = capsys.readouterr().out
    assert "kfac.mlp-ce" in text and "conv_location_scaling:" in text


def test_cli_refusals_are_one_line(small, capsys):
    _edit(small, lambda m: m.update(schema_version=2))
    assert main(["golden", "check", str(small)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown schema version 2" in err
    assert main(["golden", "check", str(small / "nope")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["golden", "export", "--quantity", "nope", "--out", str(small)]) == 2
    assert "unknown quantity 'nope'" in capsys.readouterr().err


def test_cli_failing_case_exits_1(small, capsys):
    test_consistently_tampered_output_fails_the_recomputation(small)
    assert main(["golden", "check", str(small)]) == 1
    assert "FAIL (out)" in capsys.readouterr().out


@pytest.mark.parametrize("call, message", [
    (lambda: export(None), "out must be a directory path"),
    (lambda: export("", methods=["kfac"]), "out must be a directory path"),
    (lambda: export("/tmp/never", methods="kfac"), "methods must be None or a non-empty list"),
    (lambda: export("/tmp/never", methods=["adamw"]), "methods: unknown name 'adamw'"),
    (lambda: export("/tmp/never", quantities=[3]), "quantities: unknown name 3"),
    (lambda: check(42), "directory must be a directory path"),
    (lambda: check(DATA_DIR, ids="grad.mlp-ce"), "ids must be None or a collection"),
    (lambda: load_manifest(None), "directory must be a directory path"),
])
def test_bad_arguments_are_one_line_refcurv_errors(call, message):
    from refcurv import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match=message):
        call()
