"""Label and field selector parsing and matching, from tables."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.apiserver import resources as R
from sandbox.apiserver.selectors import (
    format_label_selector,
    parse_field_selector,
    parse_label_selector,
    selector_from_object,
)
from sandbox.apiserver.store import BadRequest

LABELS = {"app": "web", "tier": "fe", "version": "3", "empty": ""}

LABEL_CASES: list[tuple[str, bool]] = [
    ("", True),
    ("app=web", True),
    ("app==web", True),
    ("app = web", True),
    ("app=db", False),
    ("app!=db", True),
    ("app!=web", False),
    ("missing!=x", True),
    ("app in (web,db)", True),
    ("app in (db)", False),
    ("app notin (db)", True),
    ("app notin (web, db)", False),
    ("missing notin (x)", True),
    ("tier", True),
    ("missing", False),
    ("!missing", True),
    ("!tier", False),
    ("app=web,tier=fe", True),
    ("app=web,tier=be", False),
    ("app in (web),!missing,tier", True),
    ("version>2", True),
    ("version<3", False),
    ("empty=", True),
    ("empty in ()", False),
    ("example.com/role=x", False),
]


@pytest.mark.parametrize(("text", "want"), LABEL_CASES)
def test_label_selector(text: str, want: bool) -> None:
    assert parse_label_selector(text).matches(LABELS) is want


@pytest.mark.parametrize(
    "text", ["app in (a", "app in a", "=x", "app=a=b", "app notin", "!", "app in (a b)", "bad key=x",
             "-app=x", "app=-x-", "version>x"]
)
def test_bad_label_selector(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_label_selector(text)


def test_selector_objects() -> None:
    sel = {"matchLabels": {"app": "web"},
           "matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe", "be"]},
                                {"key": "gone", "operator": "DoesNotExist"}]}
    assert selector_from_object(sel).matches(LABELS)
    assert not selector_from_object({"matchLabels": {"app": "db"}}).matches(LABELS)
    assert selector_from_object({}).matches(LABELS)  # empty selector: everything
    assert not selector_from_object(None).matches(LABELS)  # no selector: nothing
    assert selector_from_object({"matchExpressions": [{"key": "app", "operator": "Exists"}]}).matches(LABELS)
    with pytest.raises(BadRequest):
        selector_from_object({"matchExpressions": [{"key": "a", "operator": "Near"}]})
    with pytest.raises(BadRequest):
        selector_from_object({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]})
    assert format_label_selector({"matchLabels": {"b": "2", "a": "1"}}) == "a=1,b=2"
    text = format_label_selector(sel)
    assert parse_label_selector(text) == selector_from_object(sel)


POD: dict[str, Any] = {
    "metadata": {"name": "web-1", "namespace": "prod"},
    "spec": {"nodeName": "node-a", "hostNetwork": False},
    "status": {"phase": "Running", "podIP": "10.244.0.5"},
}

FIELD_CASES: list[tuple[str, bool]] = [
    ("", True),
    ("metadata.name=web-1", True),
    ("metadata.name==web-1", True),
    ("metadata.name!=web-1", False),
    ("metadata.namespace=prod,status.phase=Running", True),
    ("status.phase!=Running", False),
    ("spec.nodeName=node-a", True),
    ("spec.nodeName=", False),
    ("spec.hostNetwork=false", True),
    ("status.podIP=10.244.0.5", True),
]


@pytest.mark.parametrize(("text", "want"), FIELD_CASES)
def test_field_selector(text: str, want: bool) -> None:
    assert parse_field_selector(text, R.PODS).matches(POD) is want


def test_field_selector_unset_field_is_empty_string() -> None:
    unscheduled = {"metadata": {"name": "x"}, "spec": {}}
    assert parse_field_selector("spec.nodeName=", R.PODS).matches(unscheduled)
    assert parse_field_selector("spec.nodeName!=", R.PODS).matches(POD)


@pytest.mark.parametrize(("text", "rt"), [
    ("spec.nodeName=a", R.SERVICES),  # not a service field
    ("bogus=1", R.PODS),
    ("metadata.name", R.PODS),
])
def test_bad_field_selector(text: str, rt: R.ResourceType) -> None:
    with pytest.raises(BadRequest):
        parse_field_selector(text, rt)


def test_field_selector_escapes() -> None:
    obj = {"metadata": {"name": "a,b"}}
    assert parse_field_selector(r"metadata.name=a\,b", R.CONFIGMAPS).matches(obj)
