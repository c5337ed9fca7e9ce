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


# ------------------------------------------------------------------ split_list: a re-read by lines


def _listed(text: str) -> list[yamlstream.Item]:
    return [e for e in yamlstream.iter_objects(text) if isinstance(e, yamlstream.Item) and e.listed]


LIMITS = yamlstream.Limits()
BLOCK_LISTS = {
    "kubectl": ("apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: a\n"
                "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: b\n"
                "    labels: {x: \"é – ü\"}\n"
                "kind: List\nmetadata:\n  resourceVersion: \"\"\n"),
    "items last": "kind: List\nitems:\n- a: 1\n- b: [1, 2]\n- - 4\n  - 5\n",
    "comments and blank lines": ("# head\nkind: List\nitems:\n# before\n\n- a: 1\n  # inside\n\n# between\n"
                                 "- b: 2\n# after\n\nmetadata: {}\n"),
    "block scalar": "kind: List\nitems:\n- a: |\n    - not an item\n    text\n  b: 1\n- c: >-\n    folded\n",
    "multi-line quoted": "kind: List\nitems:\n- a: \"one\n    two\"\n- b: 'x\n\n    y'\n",
    "non-ASCII before": ("kind: List\nnote: \"ééé 漢字\"\nitems:\n"
                         "- name: ü\n- name: \"漢\"\n- name: c\n"),
}


def test_split_list_reads_an_item_begun_on_the_line_after_its_dash_right():
    # Not the style kubectl writes: such items are digested otherwise, so they are always "new".
    text = "kind: List\nitems:\n- a: 1\n-\n  c: 3\n- d: 4\n"
    cut = yamlstream.split_list(text, LIMITS, set(), max_new=100)
    assert cut is not None and [v for v, _ in cut] == [e.value for e in _listed(text)]
    known = {e.digest for e in _listed(text)}
    again = yamlstream.split_list(text, LIMITS, known, max_new=100)
    # The first item is followed by a line that is not "- …" and the second starts on the line after its
    # dash: both are digested by their span, so only the last is known to the cut by lines.
    assert again is not None and [v for v, _ in again] == [{"a": 1}, {"c": 3}, None]


@pytest.mark.parametrize("case", sorted(BLOCK_LISTS))
def test_split_list_cuts_what_the_parser_reads_with_the_same_digests(case):
    text = BLOCK_LISTS[case]
    full = _listed(text)
    cut = yamlstream.split_list(text, LIMITS, set(), max_new=100)
    assert cut is not None
    assert [v for v, _ in cut] == [e.value for e in full]
    assert [d for _, d in cut] == [e.digest for e in full]
    # Known items are not built; more new ones than allowed: not split at all.
    known = {cut[0][1]}
    again = yamlstream.split_list(text, LIMITS, known, max_new=100)
    assert again is not None and again[0] == (None, cut[0][1]) and again[1:] == cut[1:]
    assert yamlstream.split_list(text, LIMITS, known, max_new=len(cut) - 2) is None


TRICKS = {
    # A quoted scalar running on at column 0 with "- ": the real parser reads one item.
    "quote over a dash": "kind: List\nitems:\n- a: \"x\n- b\"\n- c: 1\n",
    "flow over a dash": "kind: List\nitems:\n- a: [1,\n- 2]\n",
    "unclosed quote before items": "kind: List\nx: \"a\nitems:\n- a: 1\ny: b\"\n",
    "not a List": "kind: Other\nitems:\n- a: 1\n",
    "two items keys": "kind: List\nitems:\n- a: 1\nitems2: 1\nitems:\n- b: 1\n",
    "items twice, one in flow": "kind: List\nitems:\n- a: 1\nmore: {items: [1]}\n",
    "document marker": "---\nkind: List\nitems:\n- a: 1\n",
    "directive": "%YAML 1.1\n---\nkind: List\nitems:\n- a: 1\n",
    "indented items": "kind: List\nitems:\n  - a: 1\n  - b: 2\n",
    "flow items": "kind: List\nitems: [{a: 1}, {b: 2}]\n",
    "carriage returns": "kind: List\r\nitems:\r\n- a: 1\r\n",
    "two documents": "kind: List\nitems:\n- a: 1\n...\nkind: List\nitems:\n- b: 1\n",
    "alias": "kind: List\nitems:\n- &x {a: 1}\n- *x\n",
    "a key at column 0 after items": "kind: List\nitems:\n- a: 1\n-x: 2\n",
    "empty": "",
    "garbage": "kind: List\nitems:\n- a: [\n",
}


NOT_SPLIT = {"quote over a dash", "flow over a dash", "unclosed quote before items", "not a List",
             "two items keys", "document marker", "directive", "indented items",
             "flow items", "carriage returns", "two documents", "alias", "empty", "garbage"}


@pytest.mark.parametrize("case", sorted(TRICKS))
def test_split_list_gives_up_where_lines_would_mislead(case):
    text = TRICKS[case]
    cut = yamlstream.split_list(text, LIMITS, set(), max_new=100)
    if case in NOT_SPLIT:
        assert cut is None
    try:
        entries = list(yamlstream.iter_objects(text))
    except (yamlstream.ParseError, yaml.YAMLError):
        assert cut is None
        return
    ends = [e for e in entries if isinstance(e, yamlstream.DocumentEnd)]
    if len(ends) != 1 or not ends[0].is_list:
        assert cut is None
    elif cut is not None:
        # Where it does cut, it reads what the parser reads.
        listed = [e.value for e in entries if isinstance(e, yamlstream.Item) and e.listed]
        assert [v for v, _ in cut] == listed
