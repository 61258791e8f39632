"""The sandbox API server driven by the official ``kubernetes`` client, over real HTTP."""

from __future__ import annotations

import http.client
import json
import time
import uuid

import kubernetes.client as k8s
import pytest
from kubernetes import watch
from kubernetes.client.rest import ApiException

from tests.unit.apiserver.conftest import TOKEN, RunningServer


def _ns(server: RunningServer) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s.CoreV1Api(server.client()).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    return name


def _pod(name: str | None = None, *, labels: dict[str, str] | None = None,
         node: str | None = None, generate: str | None = None) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, generate_name=generate, labels=labels),
        spec=k8s.V1PodSpec(
            node_name=node,
            containers=[k8s.V1Container(
                name="main", image="kvpn-sandbox/echo",
                ports=[k8s.V1ContainerPort(container_port=8080, name="http")],
                env=[k8s.V1EnvVar(name="A", value="1")],
            )],
        ),
    )


def _deployment(name: str, replicas: int = 2) -> k8s.V1Deployment:
    return k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1DeploymentSpec(
            replicas=replicas,
            selector=k8s.V1LabelSelector(match_labels={"app": name}),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels={"app": name}),
                spec=k8s.V1PodSpec(containers=[
                    k8s.V1Container(name="app", image="kvpn-sandbox/echo:1"),
                    k8s.V1Container(name="side", image="busybox:1"),
                ]),
            ),
        ),
    )


def _raw(server: RunningServer, method: str, path: str, body: object = None,
         token: str | None = TOKEN, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(payload)
    except ValueError:
        return resp.status, {"text": payload.decode()}


# -- basics ---------------------------------------------------------------------------------------


def test_version_health_and_discovery(server: RunningServer) -> None:
    client = server.client()
    info = k8s.VersionApi(client).get_code()
    assert info.git_version.startswith("v1.") and info.major == "1"
    assert _raw(server, "GET", "/healthz", token=None) == (200, {"text": "ok"})
    core = k8s.CoreApi(client).get_api_versions()
    assert core.versions == ["v1"]
    groups = k8s.ApisApi(client).get_api_versions()
    assert [g.name for g in groups.groups] == ["apps", "authorization.k8s.io"]
    core_resources = {r.name: r for r in k8s.CoreV1Api(client).get_api_resources().resources}
    assert core_resources["pods"].namespaced and "watch" in core_resources["pods"].verbs
    assert core_resources["pods"].short_names == ["po"]
    assert {"pods/status", "pods/exec", "pods/portforward", "pods/log"} <= set(core_resources)
    assert not core_resources["namespaces"].namespaced
    apps = {r.name: r for r in k8s.AppsV1Api(client).get_api_resources().resources}
    assert apps["deployments/scale"].kind == "Scale"
    assert apps["deployments/scale"].group == "autoscaling"


def test_unauthorized_without_token(server: RunningServer) -> None:
    with pytest.raises(ApiException) as err:
        k8s.CoreV1Api(server.client(token=None)).list_namespace()
    assert err.value.status == 401
    assert json.loads(err.value.body)["reason"] == "Unauthorized"
    with pytest.raises(ApiException) as err:
        k8s.CoreV1Api(server.client(token="wrong")).list_namespace()
    assert err.value.status == 401


def test_unknown_paths_are_404_status(server: RunningServer) -> None:
    status, body = _raw(server, "GET", "/api/v1/widgets")
    assert status == 404 and body["kind"] == "Status" and body["reason"] == "NotFound"
    status, body = _raw(server, "GET", "/apis/batch/v1/jobs")
    assert status == 404 and body["kind"] == "Status"
    status, body = _raw(server, "GET", "/nothing/here")
    assert status == 404 and body["kind"] == "Status"
    status, body = _raw(server, "PUT", "/api/v1/namespaces/default/pods")
    assert status == 405 and body["reason"] == "MethodNotAllowed"


def test_streams_unavailable_without_pod_streams(server: RunningServer) -> None:
    ns = _ns(server)
    k8s.CoreV1Api(server.client()).create_namespaced_pod(ns, _pod("p"))
    status, body = _raw(server, "GET", f"/api/v1/namespaces/{ns}/pods/p/log")
    assert status == 503 and body["kind"] == "Status"
    status, body = _raw(server, "GET", f"/api/v1/namespaces/{ns}/pods/missing/log")
    assert status == 404


# -- pods -----------------------------------------------------------------------------------------


def test_pod_crud_defaults_and_errors(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    created = core.create_namespaced_pod(ns, _pod("web", labels={"app": "web"}))
    assert created.metadata.uid and created.metadata.resource_version
    assert created.spec.restart_policy == "Always"
    assert created.spec.dns_policy == "ClusterFirst"
    assert created.spec.termination_grace_period_seconds == 30
    assert created.status.phase == "Pending"
    assert created.spec.containers[0].ports[0].protocol == "TCP"
    assert core.read_namespaced_pod("web", ns).metadata.uid == created.metadata.uid

    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, _pod("web"))
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"

    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("nope", ns)
    body = json.loads(err.value.body)
    assert err.value.status == 404 and body["message"] == 'pods "nope" not found'

    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("no-such-ns", _pod("x"))
    body = json.loads(err.value.body)
    assert err.value.status == 404 and body["message"] == 'namespaces "no-such-ns" not found'

    bad = _pod("Bad_Name")
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, bad)
    body = json.loads(err.value.body)
    assert err.value.status == 422 and body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "metadata.name"

    wrong_ns = _pod("y")
    wrong_ns.metadata.namespace = "default"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, wrong_ns)
    assert err.value.status == 400 and json.loads(err.value.body)["reason"] == "BadRequest"


def test_generate_name_and_dry_run(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    pod = core.create_namespaced_pod(ns, _pod(generate="shadow-"))
    assert pod.metadata.name.startswith("shadow-") and len(pod.metadata.name) == len("shadow-") + 5
    dry = core.create_namespaced_pod(ns, _pod("ghost"), dry_run="All")
    assert dry.metadata.name == "ghost"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("ghost", ns)
    assert err.value.status == 404


def test_label_and_field_selectors(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    core.create_namespaced_pod(ns, _pod("a", labels={"app": "x", "tier": "fe"}))
    core.create_namespaced_pod(ns, _pod("b", labels={"app": "y"}, node="node-1"))
    core.create_namespaced_pod(ns, _pod("c"))

    def names(**kw: str) -> list[str]:
        return [p.metadata.name for p in core.list_namespaced_pod(ns, **kw).items]

    assert names() == ["a", "b", "c"]
    assert names(label_selector="app=x") == ["a"]
    assert names(label_selector="app==x,tier") == ["a"]
    assert names(label_selector="app!=x") == ["b", "c"]
    assert names(label_selector="app in (x,y)") == ["a", "b"]
    assert names(label_selector="app notin (x)") == ["b", "c"]
    assert names(label_selector="!app") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="spec.nodeName=node-1") == ["b"]
    assert names(field_selector="spec.nodeName!=node-1,status.phase=Pending") == ["a", "c"]
    everywhere = core.list_pod_for_all_namespaces(label_selector="app=x").items
    assert [p.metadata.name for p in everywhere if p.metadata.namespace == ns] == ["a"]
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod(ns, label_selector="app in (x")
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod(ns, field_selector="spec.unknown=1")
    assert err.value.status == 400


def test_stale_update_conflicts(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    cm = core.create_namespaced_config_map(
        ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="cfg"), data={"a": "1"})
    )
    cm.data = {"a": "2"}
    updated = core.replace_namespaced_config_map("cfg", ns, cm)
    assert updated.data == {"a": "2"}
    assert int(updated.metadata.resource_version) > int(cm.metadata.resource_version)
    cm.data = {"a": "3"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_config_map("cfg", ns, cm)
    body = json.loads(err.value.body)
    assert err.value.status == 409 and body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]


def test_status_subresource_only_touches_status(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    pod = core.create_namespaced_pod(ns, _pod("s"))
    pod.status = k8s.V1PodStatus(phase="Running", pod_ip="10.244.0.7")
    pod.spec.containers[0].image = "changed"
    written = core.replace_namespaced_pod_status("s", ns, pod)
    assert written.status.phase == "Running" and written.status.pod_ip == "10.244.0.7"
    assert written.spec.containers[0].image == "kvpn-sandbox/echo"
    again = core.read_namespaced_pod("s", ns)
    again.status.phase = "Failed"
    again.metadata.labels = {"x": "y"}
    kept = core.replace_namespaced_pod("s", ns, again)
    assert kept.status.phase == "Running" and kept.metadata.labels == {"x": "y"}


def test_pod_spec_is_mostly_immutable(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    core.create_namespaced_pod(ns, _pod("imm"))
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod("imm", ns, {"spec": {"restartPolicy": "Never"}})
    assert err.value.status == 422
    patched = core.patch_namespaced_pod(
        "imm", ns, {"spec": {"containers": [{"name": "main", "image": "new:2"}]}}
    )
    assert patched.spec.containers[0].image == "new:2"


def test_pod_graceful_deletion(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    # An unscheduled pod goes at once.
    core.create_namespaced_pod(ns, _pod("pending"))
    core.delete_namespaced_pod("pending", ns)
    with pytest.raises(ApiException):
        core.read_namespaced_pod("pending", ns)
    # A pod on a node is only marked; the kubelet finishes the job.
    core.create_namespaced_pod(ns, _pod("bound", node="node-1"))
    core.delete_namespaced_pod("bound", ns)
    marked = core.read_namespaced_pod("bound", ns)
    assert marked.metadata.deletion_timestamp is not None
    assert marked.metadata.deletion_grace_period_seconds == 30
    core.delete_namespaced_pod("bound", ns, grace_period_seconds=5)
    assert core.read_namespaced_pod("bound", ns).metadata.deletion_grace_period_seconds == 5
    core.delete_namespaced_pod("bound", ns, body=k8s.V1DeleteOptions(grace_period_seconds=0))
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("bound", ns)
    assert err.value.status == 404


def test_delete_collection_and_preconditions(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    for name in ("one", "two", "three"):
        core.create_namespaced_config_map(ns, k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name=name, labels={"drop": "yes" if name != "three" else "no"})))
    with pytest.raises(ApiException) as err:
        core.delete_namespaced_config_map("one", ns, body=k8s.V1DeleteOptions(
            preconditions=k8s.V1Preconditions(uid="not-the-uid")))
    assert err.value.status == 409
    core.delete_collection_namespaced_config_map(ns, label_selector="drop=yes")
    left = [c.metadata.name for c in core.list_namespaced_config_map(ns).items]
    assert left == ["three"]


def test_namespace_termination_forbids_creates(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    core.delete_namespace(ns)
    assert core.read_namespace(ns).status.phase == "Terminating"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, _pod("late"))
    body = json.loads(err.value.body)
    assert err.value.status == 403 and body["reason"] == "Forbidden"
    assert "is being terminated" in body["message"]
    with pytest.raises(ApiException) as err:
        core.delete_namespace("default")
    assert err.value.status == 403


# -- patches ----------------------------------------------------------------------------------------


def test_three_patch_types(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    core.create_namespaced_pod(ns, _pod("p", labels={"a": "1", "b": "2"}))
    # strategic (dict body): containers merged by name
    patched = core.patch_namespaced_pod("p", ns, {
        "metadata": {"labels": {"b": None, "c": "3"}},
        "spec": {"containers": [{"name": "main", "image": "img:2"}]},
    })
    assert patched.metadata.labels == {"a": "1", "c": "3"}
    main = patched.spec.containers[0]
    assert main.image == "img:2" and [e.name for e in main.env] == ["A"]
    assert main.ports[0].container_port == 8080
    # JSON patch (list body)
    patched = core.patch_namespaced_pod("p", ns, [
        {"op": "add", "path": "/metadata/annotations", "value": {"note": "x"}},
        {"op": "test", "path": "/metadata/labels/a", "value": "1"},
    ])
    assert patched.metadata.annotations == {"note": "x"}
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod("p", ns, [{"op": "test", "path": "/metadata/labels/a", "value": "9"}])
    assert err.value.status == 422
    # merge patch: null deletes
    patched = core.patch_namespaced_pod(
        "p", ns, {"metadata": {"labels": {"a": None}}},
        _content_type="application/merge-patch+json",
    )
    assert patched.metadata.labels == {"c": "3"}
    # merge patch: lists are replaced wholesale (strategic merges them)
    apps = k8s.AppsV1Api(server.client())
    apps.create_namespaced_deployment(ns, _deployment("mp"))
    env = [{"name": "B", "value": "2"}]
    strategic = apps.patch_namespaced_deployment("mp", ns, {"spec": {"template": {"spec": {
        "containers": [{"name": "app", "env": env}]}}}})
    assert [c.name for c in strategic.spec.template.spec.containers] == ["app", "side"]
    assert strategic.spec.template.spec.containers[0].env[0].name == "B"
    merged = apps.patch_namespaced_deployment("mp", ns, {"spec": {"template": {"spec": {
        "containers": [{"name": "only", "image": "x:1"}]}}}},
        _content_type="application/merge-patch+json")
    assert [c.name for c in merged.spec.template.spec.containers] == ["only"]
    status, body = _raw(server, "PATCH", f"/api/v1/namespaces/{ns}/pods/p", {"x": 1},
                        headers={"Content-Type": "application/xml"})
    assert status == 415 and body["reason"] == "UnsupportedMediaType"


def test_services_cluster_ip_and_port_patch(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    svc = core.create_namespaced_service(ns, k8s.V1Service(
        metadata=k8s.V1ObjectMeta(name="web"),
        spec=k8s.V1ServiceSpec(selector={"app": "web"}, ports=[
            k8s.V1ServicePort(name="http", port=80, target_port=8080),
            k8s.V1ServicePort(name="metrics", port=9090),
        ]),
    ))
    assert svc.spec.type == "ClusterIP" and svc.spec.cluster_ip.startswith("10.")
    assert svc.spec.cluster_ips == [svc.spec.cluster_ip]
    assert svc.spec.ports[1].target_port == 9090 and svc.spec.ports[0].protocol == "TCP"
    patched = core.patch_namespaced_service("web", ns, {
        "spec": {"ports": [{"port": 80, "targetPort": 9999}, {"name": "extra", "port": 81}]}
    })
    assert [(p.port, p.target_port) for p in patched.spec.ports] == [(80, 9999), (9090, 9090), (81, 81)]
    assert patched.spec.cluster_ip == svc.spec.cluster_ip
    headless = core.create_namespaced_service(ns, k8s.V1Service(
        metadata=k8s.V1ObjectMeta(name="hl"),
        spec=k8s.V1ServiceSpec(cluster_ip="None", selector={"app": "web"},
                               ports=[k8s.V1ServicePort(port=80)]),
    ))
    assert headless.spec.cluster_ip == "None"
    node_port = core.create_namespaced_service(ns, k8s.V1Service(
        metadata=k8s.V1ObjectMeta(name="np"),
        spec=k8s.V1ServiceSpec(type="NodePort", ports=[k8s.V1ServicePort(port=80)]),
    ))
    assert 30000 <= node_port.spec.ports[0].node_port <= 32767
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service(ns, k8s.V1Service(
            metadata=k8s.V1ObjectMeta(name="probe"),
            spec=k8s.V1ServiceSpec(cluster_ip="1.1.1.1", ports=[k8s.V1ServicePort(port=80)]),
        ))
    body = json.loads(err.value.body)
    assert err.value.status == 422 and body["reason"] == "Invalid"
    assert body["message"].endswith("The range of valid IPs is 10.96.0.0/12")
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service(ns, k8s.V1Service(
            metadata=k8s.V1ObjectMeta(name="dup"),
            spec=k8s.V1ServiceSpec(cluster_ip=svc.spec.cluster_ip, ports=[k8s.V1ServicePort(port=80)]),
        ))
    assert "already allocated" in json.loads(err.value.body)["message"]
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_service("web", ns, {"spec": {"clusterIP": "10.96.5.5"}})
    assert err.value.status == 422


# -- deployments --------------------------------------------------------------------------------------


def test_deployment_defaults_patch_and_scale(server: RunningServer) -> None:
    apps = k8s.AppsV1Api(server.client())
    ns = _ns(server)
    dep = apps.create_namespaced_deployment(ns, _deployment("api"))
    assert dep.spec.strategy.type == "RollingUpdate"
    assert dep.spec.strategy.rolling_update.max_surge == "25%"
    assert dep.spec.revision_history_limit == 10
    assert dep.spec.template.spec.restart_policy == "Always"
    patched = apps.patch_namespaced_deployment("api", ns, {
        "spec": {"template": {"spec": {"containers": [{"name": "side", "image": "busybox:2"}]}}}
    })
    images = [(c.name, c.image) for c in patched.spec.template.spec.containers]
    assert images == [("app", "kvpn-sandbox/echo:1"), ("side", "busybox:2")]
    assert patched.metadata.generation == dep.metadata.generation + 1
    removed = apps.patch_namespaced_deployment("api", ns, {
        "spec": {"template": {"spec": {"containers": [{"name": "side", "$patch": "delete"}]}}}
    })
    assert [c.name for c in removed.spec.template.spec.containers] == ["app"]

    scale = apps.read_namespaced_deployment_scale("api", ns)
    assert scale.spec.replicas == 2 and scale.status.selector == "app=api"
    scaled = apps.patch_namespaced_deployment_scale("api", ns, {"spec": {"replicas": 0}})
    assert scaled.spec.replicas == 0
    assert apps.read_namespaced_deployment("api", ns).spec.replicas == 0
    scale = apps.read_namespaced_deployment_scale("api", ns)
    scale.spec.replicas = 3
    assert apps.replace_namespaced_deployment_scale("api", ns, scale).spec.replicas == 3

    bad = _deployment("bad")
    bad.spec.template.metadata.labels = {"app": "other"}
    with pytest.raises(ApiException) as err:
        apps.create_namespaced_deployment(ns, bad)
    body = json.loads(err.value.body)
    assert err.value.status == 422
    assert "`selector` does not match template `labels`" in body["message"]
    assert body["message"].startswith('Deployment.apps "bad" is invalid')


def test_replicasets_and_scale(server: RunningServer) -> None:
    apps = k8s.AppsV1Api(server.client())
    ns = _ns(server)
    dep = _deployment("rs")
    rs = apps.create_namespaced_replica_set(ns, k8s.V1ReplicaSet(
        metadata=k8s.V1ObjectMeta(name="rs", labels={"app": "rs"}),
        spec=k8s.V1ReplicaSetSpec(replicas=1, selector=dep.spec.selector, template=dep.spec.template),
    ))
    assert rs.spec.replicas == 1
    assert apps.patch_namespaced_replica_set_scale("rs", ns, {"spec": {"replicas": 4}}).spec.replicas == 4
    listed = apps.list_namespaced_replica_set(ns, label_selector="app=rs")
    assert [r.metadata.name for r in listed.items] == ["rs"]


# -- lists and watches --------------------------------------------------------------------------------


def test_pagination(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    for i in range(5):
        core.create_namespaced_config_map(ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=f"cm{i}")))
    first = core.list_namespaced_config_map(ns, limit=2)
    assert [c.metadata.name for c in first.items] == ["cm0", "cm1"]
    assert first.metadata.remaining_item_count == 3 and first.metadata._continue
    core.create_namespaced_config_map(ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="cm9")))
    second = core.list_namespaced_config_map(ns, limit=2, _continue=first.metadata._continue)
    assert [c.metadata.name for c in second.items] == ["cm2", "cm3"]
    assert second.metadata.resource_version == first.metadata.resource_version
    third = core.list_namespaced_config_map(ns, limit=2, _continue=second.metadata._continue)
    assert [c.metadata.name for c in third.items] == ["cm4", "cm9"]
    assert not third.metadata._continue
    with pytest.raises(ApiException) as err:
        core.list_namespaced_config_map(ns, limit=2, _continue="garbage!")
    assert err.value.status == 400


def test_watch_from_resource_version(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    core.create_namespaced_pod(ns, _pod("before", labels={"w": "1"}))
    rv = core.list_namespaced_pod(ns).metadata.resource_version
    core.create_namespaced_pod(ns, _pod("after", labels={"w": "1"}))
    core.patch_namespaced_pod("after", ns, {"metadata": {"annotations": {"k": "v"}}})
    core.create_namespaced_pod(ns, _pod("unlabelled"))
    core.delete_namespaced_pod("after", ns)
    w = watch.Watch()
    events = [
        (e["type"], e["object"].metadata.name)
        for e in w.stream(core.list_namespaced_pod, ns, label_selector="w=1",
                          resource_version=rv, timeout_seconds=1)
    ]
    assert events == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "after")]


def test_watch_without_version_lists_then_follows(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    core.create_namespaced_config_map(ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="old")))
    w = watch.Watch()
    seen = []
    for event in w.stream(core.list_namespaced_config_map, ns, timeout_seconds=5):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 1:
            # Make a change from another client while the watch is open.
            other = k8s.CoreV1Api(server.client())
            other.create_namespaced_config_map(ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="new")))
        if len(seen) == 2:
            w.stop()
    assert seen == [("ADDED", "old"), ("ADDED", "new")]


def test_watch_too_old_version_is_410(small_history_server: RunningServer) -> None:
    server = small_history_server
    core = k8s.CoreV1Api(server.client())
    rv = core.list_namespaced_config_map("default").metadata.resource_version
    for i in range(8):
        core.create_namespaced_config_map("default", k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=f"c{i}")))
    with pytest.raises(ApiException) as err:
        list(watch.Watch().stream(core.list_namespaced_config_map, "default",
                                  resource_version=rv, timeout_seconds=1))
    assert err.value.status == 410
    # Raw: a 200 response carrying one ERROR event with an Expired Status.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", f"/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}",
                  headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    line = json.loads(resp.readline())
    conn.close()
    assert resp.status == 200 and line["type"] == "ERROR"
    assert line["object"]["code"] == 410 and line["object"]["reason"] == "Expired"
    # A stale continue token is 410 too.
    first = core.list_namespaced_config_map("default", limit=2)
    for i in range(8):
        core.delete_namespaced_config_map(f"c{i}", "default")
    with pytest.raises(ApiException) as err2:
        core.list_namespaced_config_map("default", limit=2, _continue=first.metadata._continue)
    assert err2.value.status == 410


def _open_watch(server: RunningServer, query: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", f"/api/v1/namespaces/default/configmaps?watch=1&{query}",
                 headers={"Authorization": f"Bearer {TOKEN}"})
    return conn, conn.getresponse()


def test_watch_bookmarks_and_initial_events(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    core.create_namespaced_config_map("default", k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="wl")))
    conn, resp = _open_watch(
        server, "sendInitialEvents=true&allowWatchBookmarks=true"
        "&resourceVersionMatch=NotOlderThan&timeoutSeconds=3&fieldSelector=metadata.name%3Dwl",
    )
    first = json.loads(resp.readline())
    marker = json.loads(resp.readline())
    periodic = json.loads(resp.readline())
    conn.close()
    assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "wl")
    assert marker["type"] == "BOOKMARK"
    assert marker["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert periodic["type"] == "BOOKMARK"
    assert int(periodic["object"]["metadata"]["resourceVersion"]) >= int(marker["object"]["metadata"]["resourceVersion"])


def test_watch_ends_when_client_disconnects(server: RunningServer) -> None:
    def subscribers() -> int:
        return int(server.call(lambda: len(server.api.store._subscribers)))

    before = subscribers()
    conn, resp = _open_watch(server, "timeoutSeconds=60")
    assert resp.status == 200
    deadline = time.monotonic() + 5
    while subscribers() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert subscribers() == before + 1
    conn.close()
    resp.close()
    deadline = time.monotonic() + 5
    while subscribers() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert subscribers() == before


def test_watch_timeout_ends_stream(server: RunningServer) -> None:
    conn, resp = _open_watch(server, "timeoutSeconds=1&resourceVersion=999999")
    started = time.monotonic()
    body = resp.read()
    conn.close()
    assert body == b"" and time.monotonic() - started < 4


# -- every other resource type ------------------------------------------------------------------------


def test_crud_on_remaining_core_types(server: RunningServer) -> None:
    core = k8s.CoreV1Api(server.client())
    ns = _ns(server)
    meta = k8s.V1ObjectMeta(name="thing", labels={"kind": "test"})
    cases = [
        ("secret", k8s.V1Secret(metadata=meta, string_data={"k": "v"}, data={"a": "YQ=="})),
        ("service_account", k8s.V1ServiceAccount(metadata=meta)),
        ("endpoints", k8s.V1Endpoints(metadata=meta, subsets=[k8s.V1EndpointSubset(
            addresses=[k8s.V1EndpointAddress(ip="10.244.0.9")], ports=[k8s.CoreV1EndpointPort(port=80)])])),
        ("event", k8s.CoreV1Event(metadata=meta, reason="Test", message="m", type="Normal",
                                  involved_object=k8s.V1ObjectReference(kind="Pod", name="p", namespace=ns))),
    ]
    for kind, body in cases:
        created = getattr(core, f"create_namespaced_{kind}")(ns, body)
        assert created.metadata.name == "thing", kind
        read = getattr(core, f"read_namespaced_{kind}")("thing", ns)
        assert read.metadata.uid == created.metadata.uid, kind
        listed = getattr(core, f"list_namespaced_{kind}")(ns, label_selector="kind=test")
        assert [i.metadata.name for i in listed.items] == ["thing"], kind
        patched = getattr(core, f"patch_namespaced_{kind}")("thing", ns, {"metadata": {"annotations": {"a": "b"}}})
        assert patched.metadata.annotations == {"a": "b"}, kind
        getattr(core, f"delete_namespaced_{kind}")("thing", ns)
        assert getattr(core, f"list_namespaced_{kind}")(ns).items == [], kind
    assert core.list_namespaced_endpoints(ns).kind == "EndpointsList"
    secret = core.create_namespaced_secret(ns, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="s"),
                                                            string_data={"key": "value"}))
    assert secret.type == "Opaque" and secret.data == {"key": "dmFsdWU="} and secret.string_data is None

    node = core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name="extra-node", labels={"n": "1"}),
                                       spec=k8s.V1NodeSpec(pod_cidrs=["10.244.1.0/24"])))
    assert node.metadata.namespace is None
    patched_node = core.patch_node("extra-node", {"spec": {"podCIDRs": ["10.244.2.0/24"]}})
    assert patched_node.spec.pod_cidrs == ["10.244.1.0/24", "10.244.2.0/24"]
    node_status = core.patch_node_status("extra-node", {"status": {"addresses": [
        {"type": "InternalIP", "address": "172.31.255.1"}]}})
    assert node_status.status.addresses[0].address == "172.31.255.1"
    assert [n.metadata.name for n in core.list_node(label_selector="n=1").items] == ["extra-node"]
    core.delete_node("extra-node")
    with pytest.raises(ApiException) as err:
        core.read_node("extra-node")
    assert err.value.status == 404 and json.loads(err.value.body)["message"] == 'nodes "extra-node" not found'


def test_watch_deployments_with_the_client(server: RunningServer) -> None:
    apps = k8s.AppsV1Api(server.client())
    ns = _ns(server)
    rv = apps.list_namespaced_deployment(ns).metadata.resource_version
    apps.create_namespaced_deployment(ns, _deployment("w"))
    apps.patch_namespaced_deployment_scale("w", ns, {"spec": {"replicas": 5}})
    events = [(e["type"], e["object"].spec.replicas)
              for e in watch.Watch().stream(apps.list_namespaced_deployment, ns,
                                            resource_version=rv, timeout_seconds=1)]
    assert events == [("ADDED", 2), ("MODIFIED", 5)]
