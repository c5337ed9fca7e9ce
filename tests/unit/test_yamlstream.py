"""The streaming YAML reader builds what PyYAML's safe loader builds, within its bounds."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd.sources import yamlstream
from proxyd.sources.manifests import parse_documents


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


_scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20)
            | st.floats(allow_nan=False) | st.text(max_size=12)
            | st.sampled_from(["yes", "no", "on", "off", "0x1F", "0o17", "1_000", "1:20", "~", "null", "=",
                               "2001-12-14", "2001-12-14t21:59:43.10-05:00", ".inf", "-.Inf", "1e3", "TCP",
                               "10.0.0.1", "08", "+12", "-0", "True", "NULL", ""]))
_keys = st.text(max_size=6) | st.integers(0, 9)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(_keys, c, max_size=4),
                       max_leaves=20)
_lists = st.fixed_dictionaries({"kind": st.just("List"), "items": st.lists(_values, max_size=4)},
                               optional={"apiVersion": st.just("v1")})


def _reference(text: str) -> list:
    return list(yaml.load_all(text, Loader=yaml.CSafeLoader))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_values | _lists, min_size=1, max_size=3), st.booleans())
def test_same_values_as_the_safe_loader(docs, flow):
    text = yaml.dump_all(docs, Dumper=_NoAliases, default_flow_style=flow, sort_keys=False)
    assert parse_documents(text.encode(), is_json=False) == _reference(text)


@pytest.mark.parametrize("text", [
    "a: !!str 80\nb: !!int '7'\nc: !!float '1.5'\nd: !!binary aGk=\n",
    "- 'quoted: yes'\n- \"tab\\tthere\"\n- |\n  block\n  text\n- >\n  folded\n  text\n",
    "? complex key\n: value\n'1': one\n1: number one\n",
    "%YAML 1.1\n---\na: 1\n...\n---\nb: 2\n",
    "a: 1\na: 2\n",
    "{a: [1, {b: c}], d: e}\n",
    "",
    "---\n---\n",
])
def test_edge_cases_match(text):
    assert parse_documents(text.encode(), is_json=False) == _reference(text)


@pytest.mark.parametrize(("text", "reason"), [
    ("a: &x 1\nb: *x\n", "aliases"),
    ("a: &x [1]\n", "aliases"),
    ("<<: {a: 1}\nb: 2\n", "merge keys"),
    ("a: !!set {x}\n", "tag"),
    ("a: !!python/object:os.system x\n", "tag"),
    ("a: !custom 1\n", "tag"),
    ("? [1, 2]\n: x\n", "not hashable"),
    ("[" * 150 + "]" * 150, "deeper than"),
])
def test_refused(text, reason):
    with pytest.raises(yamlstream.ParseError, match=reason):
        list(yamlstream.iter_objects(text))


def test_limits_stop_early():
    limits = yamlstream.Limits(max_nodes=1000, max_items=10)
    with pytest.raises(yamlstream.ParseError, match="more than 1000 nodes"):
        list(yamlstream.iter_objects("[" + "{}," * 5000 + "{}]", limits))
    with pytest.raises(yamlstream.ParseError, match="more than 10 objects"):
        list(yamlstream.iter_objects("kind: List\nitems:\n" + "- {}\n" * 50, limits))
    # Nodes count per object: many small items are fine.
    items = [e for e in yamlstream.iter_objects("kind: List\nitems:\n" + "- {a: 1}\n" * 10, limits)
             if isinstance(e, yamlstream.Item) and e.listed]
    assert len(items) == 10


def test_digest_follows_an_items_text():
    def digests(text: str) -> list[bytes]:
        entries = yamlstream.iter_objects(text)
        return [e.digest for e in entries if isinstance(e, yamlstream.Item) and e.listed]

    a = digests("kind: List\nitems:\n- {name: a}\n- {name: b}\n- {name: c}\n")
    b = digests("items:\n- {name: a}\n- {name: B}\n- {name: c}\nkind: List\n")
    assert a[0] == b[0] and a[2] == b[2] and a[1] != b[1]
    # Indented differently: not the same text, so not the same digest.
    c = digests("kind: List\nitems:\n  - {name: a}\n")
    assert c[0] != a[0]


def test_known_items_are_not_built():
    text = "kind: List\nitems:\n- {name: a, x: [1, 2]}\n- {name: b}\n- name: c\n  y: {z: 1}\n"
    first = [e for e in yamlstream.iter_objects(text) if isinstance(e, yamlstream.Item) and e.listed]
    known = {first[0].digest, first[2].digest}
    again = [e for e in yamlstream.iter_objects(text, known=known)
             if isinstance(e, yamlstream.Item) and e.listed]
    assert [e.digest for e in again] == [e.digest for e in first]
    assert [e.value for e in again] == [None, {"name": "b"}, None]
    with pytest.raises(yamlstream.ParseError, match="deeper than"):
        list(yamlstream.iter_objects("kind: List\nitems:\n- " + "[" * 120 + "]" * 120 + "\n", known=set()))
