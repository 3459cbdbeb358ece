"""One name per concept (issue 9): every method's hyper-parameters are in the vocabulary table,
no retired alias survives, a state field name means one thing across methods, diagnostics keys
follow the schema, and the README's vocabulary table is the table in the code."""
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from refcurv.methods import REGISTRY, Batch, Method
from refcurv.methods.base import COMMON_FIELDS
from refcurv.methods.diagnostics import SCHEMA
from refcurv.methods.vocabulary import FISHER_KINDS, HYPER_PARAMETERS, RETIRED, STATE_FIELDS
from refcurv.nn import CrossEntropy, Linear, Sequential, Tanh

README = Path(__file__).resolve().parents[1] / "README.md"
METHOD_ATTRS = {n for n in dir(Method) if not n.startswith("_")}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_hyper_parameters_are_in_the_vocabulary(name):
    for hp in REGISTRY[name].hyper_parameters():
        assert hp in HYPER_PARAMETERS, f"{name}.{hp} is not in refcurv.methods.vocabulary"
        assert hp not in RETIRED, f"{name}.{hp} is a retired name ({RETIRED.get(hp)})"
        assert hp not in METHOD_ATTRS, f"{name}.{hp} shadows Method.{hp}"


def test_retired_names_are_not_in_the_vocabulary():
    assert not set(RETIRED) & set(HYPER_PARAMETERS)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fisher_words(name):
    cls = REGISTRY[name]
    if "fisher" in cls.hyper_parameters():
        for kind in FISHER_KINDS:
            try:
                cls(fisher=kind)
            except Exception as e:  # a method may support a subset, but only of these words
                assert "fisher" in str(e)
        with pytest.raises(ValueError, match="fisher"):
            cls(fisher="ggn")


def _state_docs():
    """{field: {doc: [methods]}} over every registered method's State."""
    out = {}
    for name, cls in REGISTRY.items():
        for f in dataclasses.fields(cls.State):
            out.setdefault(f.name, {}).setdefault(f.metadata.get("doc", ""), []).append(name)
    return out


def test_a_state_field_name_means_one_thing():
    """A field name used by several methods is one concept: either its doc is the common one
    (COMMON_FIELDS, identical text) or the name is in vocabulary.STATE_FIELDS, which states
    the shared meaning (each method's doc then adds its paper's detail)."""
    for field, docs in _state_docs().items():
        methods = {m for ms in docs.values() for m in ms}
        if field in COMMON_FIELDS:
            assert list(docs) == [COMMON_FIELDS[field]], f"{field!r}: {docs}"
        elif len(methods) > 1 and len(docs) > 1:
            assert field in STATE_FIELDS, f"state field {field!r} has different meanings: {docs}"
        assert field not in RETIRED, f"state field {field!r} is a retired name"
        assert field not in HYPER_PARAMETERS or field in COMMON_FIELDS, (
            f"state field {field!r} is also a hyper-parameter name with another meaning")


def test_shared_state_fields_are_used_by_several_methods():
    docs = _state_docs()
    for field in STATE_FIELDS:
        assert field in docs, f"STATE_FIELDS lists {field!r}, which no method's state has"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_diagnostics_follow_the_schema(name):
    method = REGISTRY[name]()
    net = Sequential([Linear(3, 4), Tanh(), Linear(4, 3)])
    params = net.init(0)
    rng = np.random.default_rng(0)
    state = method.init(net, params)
    for k in range(3):
        batch = Batch(rng.standard_normal((6, 3)), rng.integers(0, 3, 6), CrossEntropy())
        d, state = method.step(state, net, params, batch, rng=k)
        params = [W + 0.1 * D for W, D in zip(params, d)]
        unknown = set(state.diagnostics) - set(SCHEMA)
        assert not unknown, f"{name}: diagnostics keys {unknown} are not in refcurv.methods.diagnostics.SCHEMA"


def test_readme_vocabulary_table_is_the_code_table():
    text = README.read_text()
    rows = dict(re.findall(r"^\| `([A-Za-z0-9_]+)` \| .*? \| (.*?) \| .*\|$", text, flags=re.M))
    for name, (symbol, meaning) in HYPER_PARAMETERS.items():
        assert name in rows, f"README vocabulary table lacks {name!r}"
        assert rows[name] == meaning.replace("|", "\\|"), name


def test_every_name_in_the_vocabulary_is_used():
    used = {hp for cls in REGISTRY.values() for hp in cls.hyper_parameters()}
    assert set(HYPER_PARAMETERS) <= used, f"unused vocabulary entries: {set(HYPER_PARAMETERS) - used}"
