"""Endpoint values: conditions held once and shared, equal and hashed by value (issue 19's memory)."""

from __future__ import annotations

import pickle

import pytest

from proxyd import model
from proxyd.model import Conditions, Endpoint, SliceEndpoint, conditions


def test_equal_conditions_are_one_object_shared_by_slice_and_merged_endpoints() -> None:
    a = SliceEndpoint("10.0.0.1", ready=False, node_name="n1")
    b = SliceEndpoint("10.0.0.2", ready=False, node_name="n1")
    assert a.conditions is b.conditions
    merged = a.at_port(8080)
    assert merged.conditions is a.conditions
    assert merged == Endpoint("10.0.0.1", 8080, ready=False, node_name="n1")
    assert Endpoint("10.0.0.1", 8080, ready=False, node_name="n1").conditions is a.conditions


def test_conditions_read_as_attributes_with_kubernetes_defaults() -> None:
    ep = Endpoint("10.0.0.1", 80)
    assert (ep.ready, ep.serving, ep.terminating, ep.node_name, ep.zone, ep.zone_hints) == (
        True, True, False, None, None, ())
    ep = Endpoint("10.0.0.1", 80, ready=False, serving=True, terminating=True, node_name="n", zone="z",
                  zone_hints=("z", "y"))
    assert (ep.ready, ep.serving, ep.terminating, ep.node_name, ep.zone, ep.zone_hints) == (
        False, True, True, "n", "z", ("z", "y"))
    assert ep.is_local("n") and not ep.is_local("m")
    assert not Endpoint("10.0.0.1", 80).is_local("")


@pytest.mark.parametrize("change", [
    {"ready": False}, {"serving": False}, {"terminating": True}, {"node_name": "n2"}, {"zone": "b"},
    {"zone_hints": ("b",)},
])
def test_any_condition_makes_endpoints_differ(change: dict[str, object]) -> None:
    base = {"ready": True, "serving": True, "terminating": False, "node_name": "n1", "zone": "a",
            "zone_hints": ("a",)}
    one = Endpoint("10.0.0.1", 80, **base)  # type: ignore[arg-type]
    other = Endpoint("10.0.0.1", 80, **{**base, **change})  # type: ignore[arg-type]
    assert one != other
    assert one == Endpoint("10.0.0.1", 80, **base)  # type: ignore[arg-type]
    assert hash(one) == hash(Endpoint("10.0.0.1", 80, **base))  # type: ignore[arg-type]
    assert one != Endpoint("10.0.0.1", 81, **base)  # type: ignore[arg-type]
    assert SliceEndpoint("10.0.0.1", **base) != SliceEndpoint("10.0.0.1", **{**base, **change})  # type: ignore[arg-type]


def test_endpoints_stay_frozen_and_survive_pickling() -> None:
    ep = Endpoint("10.0.0.1", 80, node_name="n1")
    with pytest.raises(AttributeError):
        ep.ip = "10.0.0.2"  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):  # a property without setter (dataclass: TypeError)
        ep.ready = False  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(ep)) == ep
    sep = SliceEndpoint("10.0.0.1", zone_hints=["a"])  # type: ignore[arg-type]
    assert sep.zone_hints == ("a",) and hash(sep) == hash(SliceEndpoint("10.0.0.1", zone_hints=("a",)))


def test_hostile_variety_of_conditions_does_not_grow_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A distinct node name per endpoint (hostile or huge input): the table stops at its bound, and
    endpoints past it still carry their own, equal conditions."""
    monkeypatch.setattr(model, "_CONDITIONS", {})
    monkeypatch.setattr(model, "_CONDITIONS_MAX", 100)
    eps = [SliceEndpoint("10.0.0.1", node_name=f"node-{i}") for i in range(1000)]
    assert len(model._CONDITIONS) == 100
    assert [e.node_name for e in eps] == [f"node-{i}" for i in range(1000)]
    late = conditions(node_name="node-999")
    assert late == eps[999].conditions and late is not eps[999].conditions
    assert conditions(node_name="node-5") is eps[5].conditions
    assert isinstance(late, Conditions)
