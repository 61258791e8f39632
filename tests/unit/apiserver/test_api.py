"""The in-process ``Api``: admission, lifecycle and allocation rules without HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.apiserver import resources as R
from sandbox.apiserver.api import Api
from sandbox.apiserver.store import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Store,
)
from sandbox.config import SandboxConfig


@pytest.fixture
def api() -> Api:
    a = Api(Store(), SandboxConfig(name="t"))
    for ns in ("default", "kube-system", "work"):
        a.create(R.NAMESPACES, None, {"metadata": {"name": ns}})
    return a


def pod(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "img"}], **spec}}


def svc(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"ports": [{"port": 80}], **spec}}


def deployment(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}},
                     "spec": {"containers": [{"name": "c", "image": "img"}]}},
        **spec,
    }}


def test_namespace_defaults(api: Api) -> None:
    ns = api.get(R.NAMESPACES, None, "work")
    assert ns["status"] == {"phase": "Active"}
    assert ns["spec"]["finalizers"] == ["kubernetes"]
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "work"}
    with pytest.raises(Invalid):
        api.create(R.NAMESPACES, None, {"metadata": {"name": "has.dot"}})


def test_create_requires_existing_active_namespace(api: Api) -> None:
    with pytest.raises(NotFound, match='namespaces "nope" not found'):
        api.create(R.PODS, "nope", pod("p"))
    api.delete(R.NAMESPACES, None, "work")
    assert api.get(R.NAMESPACES, None, "work")["status"]["phase"] == "Terminating"
    with pytest.raises(Forbidden) as err:
        api.create(R.CONFIGMAPS, "work", {"metadata": {"name": "c"}})
    assert err.value.details["causes"][0]["reason"] == "NamespaceTerminating"
    with pytest.raises(Forbidden):
        api.delete(R.NAMESPACES, None, "kube-system")


def test_namespace_mismatch_and_kind_mismatch(api: Api) -> None:
    with pytest.raises(BadRequest):
        api.create(R.PODS, "default", {**pod("p"), "metadata": {"name": "p", "namespace": "work"}})
    with pytest.raises(BadRequest):
        api.create(R.PODS, "default", {**pod("p"), "kind": "Service"})
    # Namespace from the object when the caller passes none.
    created = api.create(R.PODS, None, {**pod("p"), "metadata": {"name": "p", "namespace": "work"}})
    assert created["metadata"]["namespace"] == "work"


@pytest.mark.parametrize(("obj", "field"), [
    ({"metadata": {"name": "p"}, "spec": {"containers": []}}, "spec.containers"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"image": "x"}]}}, "spec.containers[0].name"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}, "spec.containers[0].image"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}, {"name": "c", "image": "i"}]}},
     "spec.containers[1].name"),
    ({"metadata": {"name": "p"}, "spec": {"restartPolicy": "Sometimes", "containers": [{"name": "c", "image": "i"}]}},
     "spec.restartPolicy"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 0}]}]}},
     "spec.containers[0].ports[0].containerPort"),
    ({"metadata": {"name": "P"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, "metadata.name"),
    ({"metadata": {}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, "metadata.name"),
    ({"metadata": {"name": "p", "labels": {"bad key": "v"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
     "metadata.labels"),
])
def test_pod_validation(api: Api, obj: dict[str, Any], field: str) -> None:
    with pytest.raises(Invalid) as err:
        api.create(R.PODS, "default", obj)
    assert field in [c["field"] for c in err.value.details["causes"]]
    assert err.value.message.startswith(f'Pod "{obj["metadata"].get("name", "")}" is invalid: ')


def test_kubelet_may_bind_a_pod(api: Api) -> None:
    p = api.create(R.PODS, "default", pod("p"))
    p["spec"]["nodeName"] = "node-1"
    bound = api.update(R.PODS, "default", "p", p)
    assert bound["spec"]["nodeName"] == "node-1"
    bound["spec"]["nodeName"] = "node-2"
    with pytest.raises(Invalid):
        api.update(R.PODS, "default", "p", bound)


def test_pod_delete_grace_and_finalizers(api: Api) -> None:
    api.create(R.PODS, "default", pod("p", nodeName="n", terminationGracePeriodSeconds=7))
    marked = api.delete(R.PODS, "default", "p")
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 7
    # A client cannot undo the deletion.
    marked["metadata"].pop("deletionTimestamp")
    assert api.update(R.PODS, "default", "p", marked)["metadata"]["deletionTimestamp"]
    api.delete(R.PODS, "default", "p", grace_period_seconds=0)
    with pytest.raises(NotFound):
        api.get(R.PODS, "default", "p")
    # Terminal pods go at once.
    api.create(R.PODS, "default", pod("done", nodeName="n"))
    current = api.get(R.PODS, "default", "done")
    current["status"]["phase"] = "Succeeded"
    api.update(R.PODS, "default", "done", current, subresource="status")
    api.delete(R.PODS, "default", "done")
    with pytest.raises(NotFound):
        api.get(R.PODS, "default", "done")


def test_finalizers_hold_deletion(api: Api) -> None:
    api.create(R.CONFIGMAPS, "default", {"metadata": {"name": "c", "finalizers": ["x/y"]}})
    marked = api.delete(R.CONFIGMAPS, "default", "c")
    assert marked["metadata"]["deletionTimestamp"]
    with pytest.raises(Invalid):
        api.patch(R.CONFIGMAPS, "default", "c", {"metadata": {"finalizers": ["x/y", "z/w"]}},
                  "application/merge-patch+json")
    api.patch(R.CONFIGMAPS, "default", "c", {"metadata": {"finalizers": None}},
              "application/merge-patch+json")
    with pytest.raises(NotFound):
        api.get(R.CONFIGMAPS, "default", "c")


def test_orphan_propagation_strips_owner_refs(api: Api) -> None:
    owner = api.create(R.DEPLOYMENTS, "default", deployment("d"))
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d", "uid": owner["metadata"]["uid"]}
    api.create(R.CONFIGMAPS, "default", {"metadata": {"name": "dep", "ownerReferences": [ref]}})
    api.delete(R.DEPLOYMENTS, "default", "d", propagation_policy="Orphan")
    assert "ownerReferences" not in api.get(R.CONFIGMAPS, "default", "dep")["metadata"]
    with pytest.raises(BadRequest):
        api.delete(R.CONFIGMAPS, "default", "dep", propagation_policy="Sideways")


def test_service_cluster_ips(api: Api) -> None:
    kube = api.create(R.SERVICES, "default", svc("kubernetes", clusterIP="10.96.0.1"))
    assert kube["spec"]["clusterIPs"] == ["10.96.0.1"]
    a = api.create(R.SERVICES, "default", svc("a"))
    b = api.create(R.SERVICES, "default", svc("b"))
    assert a["spec"]["clusterIP"] != b["spec"]["clusterIP"]
    assert all(ip.startswith("10.9") for ip in (a["spec"]["clusterIP"], b["spec"]["clusterIP"]))
    with pytest.raises(Invalid) as err:
        api.create(R.SERVICES, "default", svc("c", clusterIP="10.96.0.1"))
    assert "provided IP is already allocated" in err.value.message
    with pytest.raises(Invalid) as err:
        api.create(R.SERVICES, "default", svc("c", clusterIP="10.0.0.1"))
    assert err.value.message == (
        'Service "c" is invalid: spec.clusterIPs: Invalid value: []string{"10.0.0.1"}: failed to '
        "allocate IP 10.0.0.1: the provided IP (10.0.0.1) is not in the valid range. The range of "
        "valid IPs is 10.96.0.0/12"
    )
    with pytest.raises(Invalid):
        api.create(R.SERVICES, "default", svc("c", clusterIP="not-an-ip"))
    with pytest.raises(Invalid):  # service names are DNS-1035 labels
        api.create(R.SERVICES, "default", svc("1abc"))
    # A dry run allocates nothing.
    api.create(R.SERVICES, "default", svc("dry", clusterIP="10.96.0.77"), dry_run=True)
    api.create(R.SERVICES, "default", svc("real", clusterIP="10.96.0.77"))
    # Deleting frees the address.
    api.delete(R.SERVICES, "default", "real")
    api.create(R.SERVICES, "default", svc("again", clusterIP="10.96.0.77"))


def test_service_update_keeps_allocations(api: Api) -> None:
    created = api.create(R.SERVICES, "default", svc("np", type="NodePort"))
    node_port = created["spec"]["ports"][0]["nodePort"]
    replacement = svc("np", type="NodePort")  # no clusterIP, no nodePort, like `kubectl replace`
    updated = api.update(R.SERVICES, "default", "np", replacement)
    assert updated["spec"]["clusterIP"] == created["spec"]["clusterIP"]
    assert updated["spec"]["ports"][0]["nodePort"] == node_port
    changed = dict(updated, spec={**updated["spec"], "clusterIP": "10.96.1.1", "clusterIPs": ["10.96.1.1"]})
    with pytest.raises(Invalid, match="may not change once set"):
        api.update(R.SERVICES, "default", "np", changed)
    with pytest.raises(Invalid, match="valid range"):
        api.create(R.SERVICES, "default", svc("np2", type="NodePort", ports=[{"port": 80, "nodePort": 80}]))
    with pytest.raises(Invalid, match="already allocated"):
        api.create(R.SERVICES, "default", svc("np3", type="NodePort", ports=[{"port": 80, "nodePort": node_port}]))


@pytest.mark.parametrize(("spec", "field"), [
    ({"ports": []}, "spec.ports"),
    ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
    ({"ports": [{"port": 80}, {"port": 81}]}, "spec.ports[0].name"),
    ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
    ({"type": "Mesh"}, "spec.type"),
    ({"type": "ExternalName"}, "spec.externalName"),
])
def test_service_validation(api: Api, spec: dict[str, Any], field: str) -> None:
    with pytest.raises(Invalid) as err:
        api.create(R.SERVICES, "default", svc("s", **spec))
    assert field in [c["field"] for c in err.value.details["causes"]]


def test_headless_service_without_ports(api: Api) -> None:
    s = api.create(R.SERVICES, "default", {"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}})
    assert s["spec"]["clusterIPs"] == ["None"]


def test_deployment_rules(api: Api) -> None:
    d = api.create(R.DEPLOYMENTS, "default", deployment("d"))
    assert d["spec"]["replicas"] == 1 and d["spec"]["progressDeadlineSeconds"] == 600
    assert d["status"] == {}
    d["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    d["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    with pytest.raises(Invalid, match="field is immutable"):
        api.update(R.DEPLOYMENTS, "default", "d", d)
    with pytest.raises(Invalid, match="spec.selector"):
        api.create(R.DEPLOYMENTS, "default", {**deployment("e"), "spec": {
            **deployment("e")["spec"], "selector": None}})
    with pytest.raises(Invalid, match="supported values"):
        bad = deployment("f")
        bad["spec"]["template"]["spec"]["restartPolicy"] = "Never"
        api.create(R.DEPLOYMENTS, "default", bad)
    rs = api.create(R.REPLICASETS, "default", deployment("r"))
    assert rs["status"] == {"replicas": 0}


def test_scale_subresource(api: Api) -> None:
    api.create(R.DEPLOYMENTS, "default", deployment("d", replicas=2))
    scale = api.get_scale(R.DEPLOYMENTS, "default", "d")
    assert scale["spec"] == {"replicas": 2} and scale["status"]["selector"] == "app=d"
    api.update_scale(R.DEPLOYMENTS, "default", "d", {"spec": {"replicas": 5}})
    assert api.get(R.DEPLOYMENTS, "default", "d")["spec"]["replicas"] == 5
    with pytest.raises(Conflict):
        api.update_scale(R.DEPLOYMENTS, "default", "d", scale)  # stale resourceVersion
    with pytest.raises(Invalid, match='Scale "d" is invalid'):
        api.update_scale(R.DEPLOYMENTS, "default", "d", {"spec": {"replicas": -1}})
    patched = api.patch_scale(R.DEPLOYMENTS, "default", "d", {"spec": {"replicas": 0}},
                              "application/merge-patch+json")
    assert patched["spec"]["replicas"] == 0
    with pytest.raises(NotFound):
        api.get_scale(R.PODS, "default", "d")


def test_status_update_leaves_spec_and_update_leaves_status(api: Api) -> None:
    d = api.create(R.DEPLOYMENTS, "default", deployment("d"))
    d["status"] = {"replicas": 1, "availableReplicas": 1}
    d["spec"]["replicas"] = 9
    written = api.update(R.DEPLOYMENTS, "default", "d", d, subresource="status")
    assert written["spec"]["replicas"] == 1 and written["status"]["availableReplicas"] == 1
    assert written["metadata"]["generation"] == 1
    written["status"] = {}
    written["spec"]["replicas"] = 3
    again = api.update(R.DEPLOYMENTS, "default", "d", written)
    assert again["status"]["availableReplicas"] == 1 and again["metadata"]["generation"] == 2


def test_dry_run_and_conflicts(api: Api) -> None:
    api.create(R.CONFIGMAPS, "default", {"metadata": {"name": "c"}, "data": {"a": "1"}})
    with pytest.raises(AlreadyExists):
        api.create(R.CONFIGMAPS, "default", {"metadata": {"name": "c"}}, dry_run=True)
    cm = api.get(R.CONFIGMAPS, "default", "c")
    api.update(R.CONFIGMAPS, "default", "c", {**cm, "data": {"a": "2"}}, dry_run=True)
    assert api.get(R.CONFIGMAPS, "default", "c")["data"] == {"a": "1"}
    api.update(R.CONFIGMAPS, "default", "c", {**cm, "data": {"a": "3"}})
    with pytest.raises(Conflict):
        api.update(R.CONFIGMAPS, "default", "c", {**cm, "data": {"a": "4"}})
    with pytest.raises(Conflict):  # a patch that carries a stale resourceVersion
        api.patch(R.CONFIGMAPS, "default", "c", {"metadata": {"resourceVersion": cm["metadata"]["resourceVersion"]}},
                  "application/merge-patch+json")
    with pytest.raises(BadRequest):
        api.update(R.CONFIGMAPS, "default", "c", {"metadata": {"name": "other"}})


def test_apply_patch_creates_then_merges(api: Api) -> None:
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}}
    api.patch(R.CONFIGMAPS, "default", "ssa", body, "application/apply-patch+yaml")
    api.patch(R.CONFIGMAPS, "default", "ssa", {**body, "data": {"b": "2"}}, "application/apply-patch+yaml")
    assert api.get(R.CONFIGMAPS, "default", "ssa")["data"] == {"a": "1", "b": "2"}


def test_list_with_selectors(api: Api) -> None:
    api.create(R.PODS, "default", {**pod("a"), "metadata": {"name": "a", "labels": {"x": "1"}}})
    api.create(R.PODS, "work", {**pod("b"), "metadata": {"name": "b", "labels": {"x": "2"}}})
    assert [p["metadata"]["name"] for p in api.list(R.PODS)] == ["a", "b"]
    assert [p["metadata"]["name"] for p in api.list(R.PODS, "work")] == ["b"]
    assert [p["metadata"]["name"] for p in api.list(R.PODS, label_selector="x=1")] == ["a"]
    assert [p["metadata"]["name"] for p in api.list(R.PODS, field_selector="metadata.namespace=work")] == ["b"]
    assert len(api.list(R.NAMESPACES, "ignored-for-cluster-scoped")) == 3


@pytest.mark.parametrize(("resources", "qos"), [
    ({}, "BestEffort"),
    ({"requests": {"cpu": "100m"}}, "Burstable"),
    ({"limits": {"cpu": "1", "memory": "1Gi"}}, "Guaranteed"),
    ({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}, "Burstable"),
])
def test_pod_qos_class(api: Api, resources: dict[str, Any], qos: str) -> None:
    p = pod("q")
    p["spec"]["containers"][0]["resources"] = resources
    created = api.create(R.PODS, "default", p)
    assert created["status"] == {"phase": "Pending", "qosClass": qos}
