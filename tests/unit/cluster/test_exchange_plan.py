"""Exchange and preview plans: manifests, apply/undo patches that round-trip, restores."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import jsonpatch
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn.cluster.exchange_plan import (
    EXCHANGE_LABEL,
    ORIGINAL_SELECTOR_ANNOTATION,
    SCALED_DEPLOYMENT_ANNOTATION,
    UNPRIVILEGED_PORT_SYSCTL,
    InterceptPodPlan,
    PreviewPlan,
    ScaleChange,
    SelectorChange,
    restore_deployment_ops,
    restore_service_ops,
    selector_of,
    selects,
    workload_labels,
)
from kvpn.cluster.locks import LOCK_ANNOTATION, Identity, Lock, acquire_ops
from kvpn.cluster.service_ports import PortForward
from kvpn.cluster.shadow_pod import MANAGED_BY_LABEL, SESSION_LABEL, ShadowPodPlan

T0 = datetime(2026, 11, 25, 19, 30, 0, tzinfo=UTC)
ME = Identity("alice", "laptop")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
LOCK = Lock.new("exchange", mode="selector", identity=ME, session="s1", now=T0)


def shadow(port: int = 2222) -> ShadowPodPlan:
    return ShadowPodPlan.new("default", KEY, user="alice", session_id="s1", now=T0, port=port)


def test_intercept_pod_manifest() -> None:
    forwards = (
        PortForward(3000, 8080, ("http",), ("80->http/TCP (http)",)),
        PortForward(3001, 9090),
    )
    extra = (("app", "echo"), (SESSION_LABEL, "forged"), (EXCHANGE_LABEL, "s1"))
    pod = InterceptPodPlan(shadow(), "exchange", "echo", "laptop", extra, forwards)
    manifest = pod.manifest()
    labels = manifest["metadata"]["labels"]
    assert labels["app"] == "echo" and labels[EXCHANGE_LABEL] == "s1"
    assert labels[SESSION_LABEL] == "s1" and labels[MANAGED_BY_LABEL] == "kvpn"  # kvpn's win
    annotations = manifest["metadata"]["annotations"]
    assert annotations["kvpn.dev/kind"] == "exchange"
    assert annotations["kvpn.dev/service"] == "echo"
    assert annotations["kvpn.dev/host"] == "laptop"
    assert annotations["kvpn.dev/user"] == "alice"
    ports = manifest["spec"]["containers"][0]["ports"]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in ports
    assert {"containerPort": 9090, "protocol": "TCP"} in ports
    sysctls = manifest["spec"]["securityContext"]["sysctls"]
    assert UNPRIVILEGED_PORT_SYSCTL not in {s["name"] for s in sysctls}
    # The restricted profile of the connect shadow pod is kept.
    assert manifest["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True


def test_privileged_target_ports_ask_for_the_sysctl() -> None:
    pod = InterceptPodPlan(shadow(), "exchange", "web", "h", (), (PortForward(3000, 80),))
    sysctls = pod.manifest()["spec"]["securityContext"]["sysctls"]
    assert {"name": UNPRIVILEGED_PORT_SYSCTL, "value": "0"} in sysctls


def test_workload_labels_drop_controller_hashes() -> None:
    labels = {"app": "echo", "pod-template-hash": "abc", "tier": "web"}
    assert workload_labels(labels) == (("app", "echo"), ("tier", "web"))


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"app": "echo"}, {"app": "echo", "x": "y"}, True),
        ({"app": "echo"}, {"app": "other"}, False),
        ({}, {"app": "echo"}, False),
        ({"app": "echo"}, None, False),
    ],
)
def test_selects(selector: dict[str, str], labels: dict[str, str] | None, expected: bool) -> None:
    assert selects(selector, labels) is expected


def locked_service(selector: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    doc = {
        "metadata": {"name": "svc", "resourceVersion": "5", "annotations": dict(annotations)},
        "spec": {"selector": dict(selector), "ports": [{"port": 80}]},
    }
    return jsonpatch.apply_patch(doc, acquire_ops(doc["metadata"]["annotations"], "5", LOCK))


label_keys = st.text("abcdefghijklmnopqrstuvwxyz-./", min_size=1, max_size=12)
label_maps = st.dictionaries(label_keys, st.text(max_size=8), min_size=1, max_size=4)


@given(
    label_maps,
    st.dictionaries(
        label_keys.filter(lambda k: not k.startswith("kvpn")), st.text(max_size=8), max_size=3
    ),
)
def test_selector_change_replaces_and_undo_restores_exactly(
    selector: dict[str, str], others: dict[str, str]
) -> None:
    before = locked_service(selector, others)
    change = SelectorChange(selector_of(selector), ((EXCHANGE_LABEL, "s1"),))
    during = jsonpatch.apply_patch(before, change.apply_ops(LOCK))
    assert during["spec"]["selector"] == {EXCHANGE_LABEL: "s1"}  # replaced, never merged
    assert jsonpatch.apply_patch(during, change.undo_ops(LOCK)) == before
    # What clean/recover compute from the annotations alone gives the same selector back
    # and removes every kvpn annotation.
    restore = restore_service_ops(during["metadata"]["annotations"])
    restored = jsonpatch.apply_patch(during, list(restore.ops))
    assert restored["spec"] == before["spec"]
    assert restored["metadata"]["annotations"] == others
    assert restore.selector == selector


def test_undo_refuses_when_someone_else_holds_the_lock() -> None:
    change = SelectorChange((("app", "echo"),), ((EXCHANGE_LABEL, "s1"),))
    during = jsonpatch.apply_patch(locked_service({"app": "echo"}, {}), change.apply_ops(LOCK))
    during["metadata"]["annotations"][LOCK_ANNOTATION] = "someone else's"
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(during, change.undo_ops(LOCK))


@pytest.mark.parametrize("annotations", [None, {"deployment.kubernetes.io/revision": "1"}])
def test_scale_change_round_trip(annotations: dict[str, str] | None) -> None:
    meta: dict[str, Any] = {"name": "echo", "resourceVersion": "9"}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    deployment = {"metadata": meta, "spec": {"replicas": 3}}
    change = ScaleChange("echo", 3, "s1")
    scaled = jsonpatch.apply_patch(deployment, change.deployment_apply_ops("9", annotations))
    assert scaled["spec"]["replicas"] == 0
    assert scaled["metadata"]["annotations"]["kvpn.dev/original-replicas"] == "3"
    back = jsonpatch.apply_patch(scaled, change.deployment_undo_ops())
    assert back["spec"]["replicas"] == 3
    assert back["metadata"].get("annotations", {}) == (annotations or {})
    by_hand = jsonpatch.apply_patch(
        scaled, restore_deployment_ops(scaled["metadata"]["annotations"])
    )
    assert by_hand == back


def test_scale_change_on_the_service_records_the_deployment() -> None:
    before = locked_service({"app": "echo"}, {})
    change = ScaleChange("echo", 2, "s1")
    during = jsonpatch.apply_patch(before, change.service_apply_ops(LOCK))
    assert during["spec"] == before["spec"]
    assert during["metadata"]["annotations"][SCALED_DEPLOYMENT_ANNOTATION] == "echo"
    restore = restore_service_ops(during["metadata"]["annotations"])
    assert restore.deployment == "echo"
    assert jsonpatch.apply_patch(during, list(restore.ops))["metadata"]["annotations"] == {}


@pytest.mark.parametrize(
    ("annotations", "problem"),
    [
        ({ORIGINAL_SELECTOR_ANNOTATION: "not json"}, "not a JSON label map"),
        ({ORIGINAL_SELECTOR_ANNOTATION: "{}"}, "not a JSON label map"),
        ({ORIGINAL_SELECTOR_ANNOTATION: '{"a": 1}'}, "not a JSON label map"),
    ],
)
def test_unreadable_original_selector_is_left_alone(
    annotations: dict[str, str], problem: str
) -> None:
    restore = restore_service_ops({LOCK_ANNOTATION: LOCK.to_json(), **annotations})
    assert any(problem in p for p in restore.problems)
    assert all(op["path"] != "/spec/selector" for op in restore.ops)


@pytest.mark.parametrize("value", [None, "x", "-1", ""])
def test_unreadable_replica_count(value: str | None) -> None:
    annotations = {} if value is None else {"kvpn.dev/original-replicas": value}
    assert restore_deployment_ops(annotations) is None


def test_preview_service_manifest() -> None:
    lock = Lock.new("preview", mode="", identity=ME, session="s1", now=T0)
    pod = InterceptPodPlan(
        shadow(),
        "preview",
        "web",
        "laptop",
        (("kvpn.dev/preview", "s1"),),
        (PortForward(3000, 8080),),
    )
    for external, kind in ((False, "ClusterIP"), (True, "LoadBalancer")):
        manifest = PreviewPlan("default", "web", lock, pod, external).service_manifest()
        assert manifest["spec"]["type"] == kind
        assert manifest["spec"]["selector"] == {"kvpn.dev/preview": "s1"}
        assert selects(manifest["spec"]["selector"], pod.manifest()["metadata"]["labels"])
        assert manifest["spec"]["ports"] == [
            {"name": "tcp-8080", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
        ]
        assert manifest["metadata"]["annotations"][LOCK_ANNOTATION] == lock.to_json()


def test_plans_are_frozen() -> None:
    change = SelectorChange((("a", "b"),), (("c", "d"),))
    with pytest.raises(AttributeError):
        change.original = ()  # type: ignore[misc]
    assert copy.deepcopy(change) == change
