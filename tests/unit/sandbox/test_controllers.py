"""Controllers: the pure planners from tables of cases, then the loop against a real Api."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from sandbox.apiserver import resources as R
from sandbox.controller_actions import CreateObject, DeleteMode, DeleteObject, UpdateObject
from sandbox.controllers import (
    ClusterState,
    endpoint_subsets,
    plan_endpoints,
    plan_garbage_collection,
    plan_namespaces,
)
from sandbox.workload_controllers import (
    POD_TEMPLATE_HASH,
    plan_deployment,
    plan_replicaset,
    pod_template_hash,
    rolling_limits,
)

Obj = dict[str, Any]
NOW = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
_uids = itertools.count(1)


def stamp(seconds_ago: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def template(image: str = "img:1", labels: dict[str, str] | None = None) -> Obj:
    return {
        "metadata": {"labels": labels or {"app": "web"}},
        "spec": {
            "containers": [
                {"name": "c", "image": image, "ports": [{"name": "http", "containerPort": 8080}]}
            ]
        },
    }


def deployment(replicas: int = 2, image: str = "img:1", **spec: Any) -> Obj:
    return {
        "metadata": {"name": "web", "namespace": "ns", "uid": "dep-uid", "generation": 3},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": template(image),
            **spec,
        },
    }


def replicaset(
    dep: Obj,
    image: str,
    replicas: int,
    available: int | None = None,
    age: float = 100,
    revision: int = 1,
) -> Obj:
    tpl = template(image)
    h = pod_template_hash(tpl)
    tpl["metadata"]["labels"][POD_TEMPLATE_HASH] = h
    available = replicas if available is None else available
    return {
        "metadata": {
            "name": f"web-{h}",
            "namespace": "ns",
            "uid": f"rs-{image}",
            "creationTimestamp": stamp(age),
            "labels": dict(tpl["metadata"]["labels"]),
            "annotations": {"deployment.kubernetes.io/revision": str(revision)},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": "web",
                    "uid": dep["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web", POD_TEMPLATE_HASH: h}},
            "template": tpl,
        },
        "status": {
            "replicas": replicas,
            "readyReplicas": available,
            "availableReplicas": available,
        },
    }


def pod(
    name: str,
    labels: dict[str, str] | None = None,
    *,
    owner: str | None = "rs-uid",
    ready: bool = True,
    ip: str | None = "10.244.0.5",
    age: float = 100,
    node: str = "n1",
    deleting: bool = False,
    phase: str = "Running",
    ports: list[Obj] | None = None,
    **spec: Any,
) -> Obj:
    m: Obj = {
        "name": name,
        "namespace": "ns",
        "uid": f"uid-{name}",
        "labels": labels if labels is not None else {"app": "web"},
        "creationTimestamp": stamp(age),
    }
    if owner:
        m["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "rs",
                "uid": owner,
                "controller": True,
            }
        ]
    if deleting:
        m["deletionTimestamp"] = stamp(0)
    status: Obj = {
        "phase": phase,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "lastTransitionTime": stamp(age),
            }
        ],
    }
    if ip:
        status["podIP"] = ip
    containers = [
        {
            "name": "c",
            "image": "img",
            "ports": ports or [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        }
    ]
    pod_spec: Obj = {"containers": containers, **spec}
    if node:
        pod_spec["nodeName"] = node
    return {"metadata": m, "spec": pod_spec, "status": status}


def rs_obj(replicas: int, **spec: Any) -> Obj:
    return {
        "metadata": {"name": "rs", "namespace": "ns", "uid": "rs-uid", "generation": 2},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": template(),
            **spec,
        },
        "status": {},
    }


def kinds(actions: list[Any]) -> list[str]:
    return [a.describe() for a in actions]


# -- pod-template-hash and rolling limits -----------------------------------------------


def test_pod_template_hash_is_stable_and_ignores_its_own_label() -> None:
    a, b = template("img:1"), template("img:2")
    assert pod_template_hash(a) == pod_template_hash(copy.deepcopy(a))
    assert pod_template_hash(a) != pod_template_hash(b)
    labelled = copy.deepcopy(a)
    labelled["metadata"]["labels"][POD_TEMPLATE_HASH] = "x"
    assert pod_template_hash(labelled) == pod_template_hash(a)
    assert set(pod_template_hash(a)) <= set("bcdfghjklmnpqrstvwxz2456789")
    assert pod_template_hash(a, 1) != pod_template_hash(a)


@pytest.mark.parametrize(
    ("replicas", "strategy", "expected"),
    [
        (4, None, (1, 1)),
        (2, None, (1, 0)),
        (1, {"type": "RollingUpdate"}, (1, 0)),
        (3, {"rollingUpdate": {"maxSurge": "50%", "maxUnavailable": "50%"}}, (2, 1)),
        (3, {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}, (0, 1)),
        (3, {"rollingUpdate": {"maxSurge": 2, "maxUnavailable": 5}}, (2, 3)),
        (4, {"rollingUpdate": {"maxSurge": "junk", "maxUnavailable": True}}, (1, 1)),
        (4, {"type": "Recreate"}, (0, 0)),
    ],
)
def test_rolling_limits(replicas: int, strategy: Obj | None, expected: tuple[int, int]) -> None:
    dep = deployment(replicas)
    if strategy:
        dep["spec"]["strategy"] = strategy
    assert rolling_limits(dep) == expected


# -- Deployment planner -------------------------------------------------------------------


def rs_updates(actions: list[Any]) -> dict[str, int]:
    return {
        a.name: a.obj["spec"]["replicas"]
        for a in actions
        if isinstance(a, UpdateObject) and a.resource is R.REPLICASETS and not a.subresource
    }


def test_new_deployment_creates_its_replicaset() -> None:
    dep = deployment(3)
    actions = plan_deployment(dep, [], NOW)
    created = [a for a in actions if isinstance(a, CreateObject)]
    assert len(created) == 1
    rs = created[0].obj
    h = pod_template_hash(dep["spec"]["template"])
    assert rs["metadata"]["name"] == f"web-{h}"
    assert rs["spec"]["replicas"] == 3
    assert rs["spec"]["selector"]["matchLabels"] == {"app": "web", POD_TEMPLATE_HASH: h}
    assert rs["spec"]["template"]["metadata"]["labels"][POD_TEMPLATE_HASH] == h
    assert rs["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "web",
            "uid": "dep-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
    status = [a for a in actions if isinstance(a, UpdateObject) and a.subresource == "status"]
    progressing = status[0].obj["status"]["conditions"][1]
    assert progressing["reason"] == "NewReplicaSetCreated"


@pytest.mark.parametrize(
    ("desired", "sets", "expected"),
    [
        # (image, replicas, available) per set; the deployment wants img:2
        (2, [("img:2", 2, 2)], {}),
        (3, [("img:2", 2, 2)], {"img:2": 3}),  # scale up
        (1, [("img:2", 3, 3)], {"img:2": 1}),  # scale down
        (0, [("img:2", 3, 3)], {"img:2": 0}),
        # rolling update, maxSurge 1 / maxUnavailable 0 for 2 replicas:
        (2, [("img:1", 2, 2), ("img:2", 1, 0)], {}),  # wait for the new pod
        (2, [("img:1", 2, 2), ("img:2", 1, 1)], {"img:1": 1}),  # then one old goes
        (2, [("img:1", 1, 1), ("img:2", 1, 1)], {"img:2": 2}),  # new scales up
        (2, [("img:1", 1, 1), ("img:2", 2, 2)], {"img:1": 0}),  # last old goes
        (2, [("img:1", 2, 1), ("img:2", 1, 1)], {"img:1": 1}),  # unhealthy old first
        # rollback: the old template is current again and its revision is bumped
        (2, [("img:2", 0, 0), ("img:1", 2, 2)], {"img:2": 1}),
    ],
)
def test_deployment_rollout_steps(
    desired: int, sets: list[tuple[str, int, int]], expected: dict[str, int]
) -> None:
    dep = deployment(desired, image="img:2")
    rss = [
        replicaset(dep, img, n, avail, age=100 - i, revision=i + 1)
        for i, (img, n, avail) in enumerate(sets)
    ]
    actions = plan_deployment(dep, rss, NOW)
    assert not [a for a in actions if isinstance(a, CreateObject | DeleteObject)]
    by_image = {rs["metadata"]["name"]: img for rs, (img, _, _) in zip(rss, sets, strict=True)}
    assert {
        by_image[name]: n
        for name, n in rs_updates(actions).items()
        if n != next(s[1] for s in sets if s[0] == by_image[name])
    } == expected


def test_template_change_creates_new_replicaset_within_surge() -> None:
    dep = deployment(4, image="img:2")
    old = replicaset(dep, "img:1", 4, revision=3)
    actions = plan_deployment(dep, [old], NOW)
    (create,) = [a for a in actions if isinstance(a, CreateObject)]
    assert create.obj["spec"]["replicas"] == 1  # 25% surge of 4
    assert create.obj["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "4"


def test_recreate_scales_old_down_before_creating() -> None:
    dep = deployment(2, image="img:2", strategy={"type": "Recreate"})
    old = replicaset(dep, "img:1", 2)
    actions = plan_deployment(dep, [old], NOW)
    assert not [a for a in actions if isinstance(a, CreateObject)]
    assert rs_updates(actions) == {old["metadata"]["name"]: 0}
    old["spec"]["replicas"] = 0
    old["status"] = {"replicas": 0}
    actions = plan_deployment(dep, [old], NOW)
    (create,) = [a for a in actions if isinstance(a, CreateObject)]
    assert create.obj["spec"]["replicas"] == 2


def test_deployment_status_when_complete() -> None:
    dep = deployment(2, image="img:2")
    rs = replicaset(dep, "img:2", 2)
    actions = plan_deployment(dep, [rs], NOW)
    (status,) = [a for a in actions if isinstance(a, UpdateObject) and a.subresource == "status"]
    s = status.obj["status"]
    assert {
        k: s.get(k)
        for k in (
            "observedGeneration",
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
        )
    } == {
        "observedGeneration": 3,
        "replicas": 2,
        "updatedReplicas": 2,
        "readyReplicas": 2,
        "availableReplicas": 2,
    }
    assert "unavailableReplicas" not in s
    assert [(c["type"], c["status"], c["reason"]) for c in s["conditions"]] == [
        ("Available", "True", "MinimumReplicasAvailable"),
        ("Progressing", "True", "NewReplicaSetAvailable"),
    ]
    # The same status again is no write at all.
    dep["status"] = s
    dep["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "1"}
    assert plan_deployment(dep, [rs], NOW) == []


def test_deployment_adopts_orphan_replicaset_and_cleans_history() -> None:
    dep = deployment(1, image="img:9", revisionHistoryLimit=1)
    orphan = replicaset(dep, "img:9", 1)
    del orphan["metadata"]["ownerReferences"]
    idle = [replicaset(dep, f"img:{i}", 0, age=200 - i, revision=i) for i in range(1, 4)]
    actions = plan_deployment(dep, [orphan, *idle], NOW)
    adopt = [
        a for a in actions if isinstance(a, UpdateObject) and a.name == orphan["metadata"]["name"]
    ]
    assert adopt[0].obj["metadata"]["ownerReferences"][0]["uid"] == "dep-uid"
    deleted = [a.name for a in actions if isinstance(a, DeleteObject)]
    assert deleted == [idle[0]["metadata"]["name"], idle[1]["metadata"]["name"]]


# -- ReplicaSet planner -------------------------------------------------------------------


def test_replicaset_creates_missing_pods_from_template() -> None:
    actions = plan_replicaset(rs_obj(2), [], NOW)
    created = [a for a in actions if isinstance(a, CreateObject)]
    assert len(created) == 2
    p = created[0].obj
    assert p["metadata"]["generateName"] == "rs-"
    assert p["metadata"]["labels"] == {"app": "web"}
    assert p["metadata"]["ownerReferences"][0]["uid"] == "rs-uid"
    assert p["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
    assert p["spec"]["containers"][0]["image"] == "img:1"


@pytest.mark.parametrize(
    ("replicas", "pods", "creates", "deletes"),
    [
        (2, [pod("a"), pod("b")], 0, []),
        (3, [pod("a"), pod("b", deleting=True)], 2, []),  # terminating pods do not count
        (2, [pod("a"), pod("b", phase="Failed")], 1, []),
        (1, [pod("old", age=500), pod("new", age=10)], 0, ["new"]),
        (1, [pod("ready", age=10), pod("notready", ready=False, age=500)], 0, ["notready"]),
        (1, [pod("bound"), pod("pending", node="", phase="Pending", ip=None)], 0, ["pending"]),
        (0, [pod("a"), pod("b")], 0, ["a", "b"]),
        # a pod of another owner is not ours, an orphan that matches is adopted
        (1, [pod("other", owner="x")], 1, []),
        (1, [pod("orphan", owner=None, age=10), pod("mine")], 0, ["orphan"]),
    ],
)
def test_replicaset_scaling(
    replicas: int, pods: list[Obj], creates: int, deletes: list[str]
) -> None:
    actions = plan_replicaset(rs_obj(replicas), pods, NOW)
    assert len([a for a in actions if isinstance(a, CreateObject)]) == creates
    assert sorted(a.name for a in actions if isinstance(a, DeleteObject)) == sorted(deletes)


def test_replicaset_adopts_and_releases() -> None:
    orphan = pod("orphan", owner=None)
    relabelled = pod("relabelled", labels={"app": "other"})
    actions = plan_replicaset(rs_obj(1), [orphan, relabelled], NOW)
    updates = {
        a.name: a.obj["metadata"]["ownerReferences"]
        for a in actions
        if isinstance(a, UpdateObject) and a.resource is R.PODS
    }
    assert updates["orphan"][0]["uid"] == "rs-uid"
    assert updates["relabelled"] == []


def test_replicaset_status() -> None:
    rs = rs_obj(3, minReadySeconds=30)
    pods = [
        pod("a", age=100),
        pod("b", age=5),
        pod("c", ready=False),
        pod("d", deleting=True),
        pod("e", labels={"app": "web", "x": "y"}),
    ]
    rs["spec"]["template"]["metadata"]["labels"] = {"app": "web", "x": "y"}
    actions = plan_replicaset(rs, pods, NOW)
    (status,) = [a for a in actions if isinstance(a, UpdateObject) and a.subresource == "status"]
    assert status.obj["status"] == {
        "replicas": 4,
        "fullyLabeledReplicas": 1,
        "readyReplicas": 3,
        "availableReplicas": 2,
        "observedGeneration": 2,
    }


# -- Endpoints ----------------------------------------------------------------------------


def service(
    selector: dict[str, str] | None = None, ports: list[Obj] | None = None, **spec: Any
) -> Obj:
    s: Obj = {
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]
        if ports is None
        else ports,
        "clusterIP": "10.96.0.20",
        **spec,
    }
    if selector is not None:
        s["selector"] = selector
    return {"metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid"}, "spec": s}


def addresses(subsets: list[Obj], key: str = "addresses") -> list[str]:
    return [a["ip"] for s in subsets for a in s.get(key, [])]


@pytest.mark.parametrize(
    ("pods", "ready", "not_ready"),
    [
        ([pod("a", ip="10.244.0.2"), pod("b", ip="10.244.0.1")], ["10.244.0.1", "10.244.0.2"], []),
        ([pod("a", ip="10.244.0.2", ready=False)], [], ["10.244.0.2"]),
        ([pod("a", ip=None)], [], []),  # no IP yet
        ([pod("a", deleting=True)], [], []),  # terminating
        ([pod("a", labels={"app": "other"})], [], []),  # selector does not match
        ([pod("a", phase="Failed", restartPolicy="Never")], [], []),
    ],
)
def test_endpoint_addresses(pods: list[Obj], ready: list[str], not_ready: list[str]) -> None:
    subsets = endpoint_subsets(service({"app": "web"}), pods)
    assert addresses(subsets) == ready
    assert addresses(subsets, "notReadyAddresses") == not_ready


def test_endpoint_address_fields_and_ports() -> None:
    p = pod("a", ip="10.244.0.7", hostname="a", subdomain="web")
    (subset,) = endpoint_subsets(service({"app": "web"}), [p])
    assert subset["addresses"] == [
        {
            "ip": "10.244.0.7",
            "nodeName": "n1",
            "hostname": "a",
            "targetRef": {"kind": "Pod", "namespace": "ns", "name": "a", "uid": "uid-a"},
        }
    ]
    assert subset["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]


def test_named_target_port_groups_pods_by_resolved_port() -> None:
    pods = [
        pod("a", ip="10.244.0.1", ports=[{"name": "http", "containerPort": 8080}]),
        pod("b", ip="10.244.0.2", ports=[{"name": "http", "containerPort": 9090}]),
        pod("c", ip="10.244.0.3", ports=[{"name": "other", "containerPort": 1}]),  # no match
    ]
    subsets = endpoint_subsets(service({"app": "web"}), pods)
    assert [(addresses([s]), s["ports"][0]["port"]) for s in subsets] == [
        (["10.244.0.1"], 8080),
        (["10.244.0.2"], 9090),
    ]


def test_headless_without_ports_and_publish_not_ready() -> None:
    svc = service({"app": "web"}, ports=[], clusterIP="None", publishNotReadyAddresses=True)
    (subset,) = endpoint_subsets(svc, [pod("a", ready=False)])
    assert addresses([subset]) == ["10.244.0.5"]
    assert "ports" not in subset


def test_plan_endpoints_create_update_leave_alone_and_delete() -> None:
    selectorless = service(None)
    selectorless["metadata"]["name"] = "kubernetes"
    manual = {
        "metadata": {"name": "kubernetes", "namespace": "ns"},
        "subsets": [{"addresses": [{"ip": "1.2.3.4"}], "ports": [{"port": 443}]}],
    }
    svc = service({"app": "web"}, ports=[{"port": 80, "targetPort": 8080}])
    pods = [pod("a")]
    actions = plan_endpoints([selectorless, svc], pods, [manual])
    (create,) = actions
    assert isinstance(create, CreateObject) and create.obj["metadata"]["name"] == "web"
    current = dict(create.obj, metadata=dict(create.obj["metadata"], resourceVersion="5"))
    assert plan_endpoints([selectorless, svc], pods, [manual, current]) == []
    (update,) = plan_endpoints([selectorless, svc], [pod("a", ready=False)], [manual, current])
    assert isinstance(update, UpdateObject)
    assert addresses(update.obj["subsets"], "notReadyAddresses") == ["10.244.0.5"]
    assert update.obj["metadata"]["resourceVersion"] == "5"
    (delete,) = plan_endpoints([selectorless], pods, [manual, current], [("ns", "web")])
    assert delete == DeleteObject(R.ENDPOINTS, "ns", "web")


# -- garbage collector ----------------------------------------------------------------------


def state(**by_plural: list[Obj]) -> ClusterState:
    return ClusterState.of_objects(
        {
            R.BY_KEY[
                {"deployments": "deployments.apps", "replicasets": "replicasets.apps"}.get(k, k)
            ]: v
            for k, v in by_plural.items()
        }
    )


def owned_by(name: str, *uids: str, **extra: Any) -> Obj:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            **extra,
            "ownerReferences": [
                {"uid": u, "kind": "ReplicaSet", "name": u, "apiVersion": "apps/v1"} for u in uids
            ],
        }
    }


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        ([owned_by("a", "rs-uid")], []),
        ([owned_by("a", "gone")], ["delete (graceful) pods ns/a"]),
        ([owned_by("a", "gone", deletionTimestamp="x")], []),
        ([owned_by("a", "gone", "rs-uid")], ["update pods ns/a"]),
        ([{"metadata": {"name": "a", "namespace": "ns", "uid": "u"}}], []),
    ],
)
def test_garbage_collection(pods: list[Obj], expected: list[str]) -> None:
    rs = {"metadata": {"name": "rs", "namespace": "ns", "uid": "rs-uid"}}
    actions = plan_garbage_collection(state(pods=pods, replicasets=[rs]))
    assert kinds(actions) == expected


def test_foreground_finalizer_deletes_dependents_then_lets_go() -> None:
    rs = {
        "metadata": {
            "name": "rs",
            "namespace": "ns",
            "uid": "rs-uid",
            "deletionTimestamp": "x",
            "finalizers": ["foregroundDeletion"],
        }
    }
    actions = plan_garbage_collection(state(pods=[owned_by("a", "rs-uid")], replicasets=[rs]))
    assert kinds(actions) == ["delete (graceful) pods ns/a"]
    (release,) = plan_garbage_collection(state(pods=[], replicasets=[rs]))
    assert isinstance(release, UpdateObject) and release.obj["metadata"]["finalizers"] == []


# -- namespaces ---------------------------------------------------------------------------


def ns(name: str, terminating: bool = False) -> Obj:
    return {
        "metadata": {"name": name, "uid": f"ns-{name}"},
        "status": {"phase": "Terminating" if terminating else "Active"},
    }


def named(name: str, namespace: str = "ns", **m: Any) -> Obj:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"u-{name}", **m}}


def test_namespace_controller() -> None:
    st = state(
        namespaces=[ns("ns"), ns("bye", terminating=True), ns("empty", terminating=True)],
        pods=[named("p", "bye"), named("going", "bye", deletionTimestamp="x")],
        configmaps=[named("kube-root-ca.crt"), named("c", "bye")],
        serviceaccounts=[],
    )
    assert sorted(kinds(plan_namespaces(st))) == [
        "create serviceaccounts ns/default",
        "delete (graceful) configmaps bye/c",
        "delete (graceful) pods bye/p",
        "delete (remove) namespaces /empty",
    ]
    removal = [
        a for a in plan_namespaces(st) if isinstance(a, DeleteObject) and a.resource is R.NAMESPACES
    ]
    assert removal[0].mode is DeleteMode.REMOVE


def test_new_namespace_gets_root_ca_configmap() -> None:
    st = state(namespaces=[ns("ns")], serviceaccounts=[named("default")], configmaps=[])
    (create,) = plan_namespaces(st)
    assert isinstance(create, CreateObject)
    assert create.obj["data"]["ca.crt"].startswith("-----BEGIN CERTIFICATE-----")


# -- the loop against a real Store + Api ------------------------------------------------------


class FakeKubelet:
    """Binds pods, gives them an IP and marks them Running/Ready (unless told not to), and
    removes pods being deleted, like the real kubelet does once containers stopped."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.ready: Callable[[Obj], bool] = lambda pod: True
        self.ips = (f"10.244.0.{i}" for i in itertools.count(2))

    def sync(self) -> None:
        for stored in list(self.store.iter_objects(R.PODS)):
            p = copy.deepcopy(stored)
            m = p["metadata"]
            if m.get("deletionTimestamp"):
                self.store.delete(R.PODS, m["namespace"], m["name"])
                continue
            status = p.setdefault("status", {})
            if not status.get("podIP"):
                p["spec"]["nodeName"] = "node-1"
                status.update(phase="Running", podIP=next(self.ips))
            ready = "True" if self.ready(p) else "False"
            status["conditions"] = [{"type": "Ready", "status": ready}]
            self.store.update(R.PODS, p, check_version=False)

    async def run(self) -> None:
        sub = self.store.subscribe()
        try:
            while True:
                self.sync()
                await sub.queue.get()
                while not sub.queue.empty():
                    sub.queue.get_nowait()
        finally:
            sub.close()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def cluster() -> Any:
    from sandbox.apiserver.api import Api
    from sandbox.apiserver.store import Store
    from sandbox.config import SandboxConfig
    from sandbox.controllers import Controllers

    config = SandboxConfig("unit")
    store = Store()
    api = Api(store, config)
    for name in ("default", "team"):
        api.create(R.NAMESPACES, None, {"metadata": {"name": name}})
    controllers = Controllers(api, config, debounce=0.01, resync=0.2)
    kubelet = FakeKubelet(store)
    tasks = [asyncio.create_task(controllers.run()), asyncio.create_task(kubelet.run())]
    try:
        yield api, kubelet, controllers
    finally:
        await controllers.stop()
        await asyncio.wait_for(tasks[0], 5)
        tasks[1].cancel()
        await asyncio.gather(tasks[1], return_exceptions=True)
        assert controllers.stats.errors == 0


def _pods(api: Any, ns: str = "team", live: bool = True) -> list[Obj]:
    pods = api.list(R.PODS, ns)
    return [p for p in pods if not (live and p["metadata"].get("deletionTimestamp"))]


def _endpoint_ips(api: Any, name: str, key: str = "addresses") -> list[str]:
    try:
        ep = api.get(R.ENDPOINTS, "team", name)
    except Exception:
        return []
    return sorted(addresses(ep.get("subsets") or [], key))


async def test_controllers_end_to_end(cluster: Any) -> None:
    api, kubelet, controllers = cluster
    dep = {
        "metadata": {"name": "web", "namespace": "team"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": template(),
        },
    }
    api.create(R.DEPLOYMENTS, "team", dep)
    api.create(
        R.SERVICES,
        "team",
        {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
    )

    def available(n: int) -> Callable[[], bool]:
        def check() -> bool:
            d = api.get(R.DEPLOYMENTS, "team", "web")
            s = d.get("status", {})
            return bool(
                len(_pods(api)) == n
                and s.get("availableReplicas", 0) == n
                and s.get("updatedReplicas", 0) == n
                and s.get("replicas", 0) == n
                and s.get("observedGeneration") == d["metadata"]["generation"]
            )

        return check

    def endpoint_count(n: int) -> Callable[[], bool]:
        return lambda: len(_endpoint_ips(api, "web")) == n

    await eventually(available(2), "2 replicas available")
    rs_name = api.list(R.REPLICASETS, "team")[0]["metadata"]["name"]
    assert all(p["metadata"]["name"].startswith(rs_name + "-") for p in _pods(api))
    await eventually(lambda: len(_endpoint_ips(api, "web")) == 2, "2 endpoints")
    assert api.get(R.CONFIGMAPS, "team", "kube-root-ca.crt")
    assert api.get(R.SERVICEACCOUNTS, "team", "default")

    for replicas in (3, 1):
        d = api.get(R.DEPLOYMENTS, "team", "web")
        d["spec"]["replicas"] = replicas
        api.update(R.DEPLOYMENTS, "team", "web", d)
        await eventually(available(replicas), f"scaled to {replicas}")
        await eventually(endpoint_count(replicas), f"{replicas} endpoints")

    # A template change rolls the pods onto a new ReplicaSet.
    before = {p["metadata"]["name"] for p in _pods(api)}
    d = api.get(R.DEPLOYMENTS, "team", "web")
    d["spec"]["replicas"] = 2
    d["spec"]["template"]["spec"]["containers"][0]["image"] = "img:2"
    api.update(R.DEPLOYMENTS, "team", "web", d)
    await eventually(
        lambda: (
            available(2)() and not before & {p["metadata"]["name"] for p in _pods(api, live=False)}
        ),
        "rolled out",
    )
    assert {p["spec"]["containers"][0]["image"] for p in _pods(api)} == {"img:2"}
    sets = {r["metadata"]["name"]: r["spec"]["replicas"] for r in api.list(R.REPLICASETS, "team")}
    assert sorted(sets.values()) == [0, 2] and sets[rs_name] == 0
    conditions = {
        c["type"]: c["reason"]
        for c in api.get(R.DEPLOYMENTS, "team", "web")["status"]["conditions"]
    }
    assert conditions == {
        "Available": "MinimumReplicasAvailable",
        "Progressing": "NewReplicaSetAvailable",
    }

    # A converged cluster is quiet: a pass plans nothing and writes nothing.
    await eventually(lambda: controllers.reconcile_once() == [], "converged")
    revision = api.store.revision
    assert controllers.reconcile_once() == [] and api.store.revision == revision

    # Endpoints follow readiness ...
    ips = _endpoint_ips(api, "web")
    kubelet.ready = lambda pod: pod["status"]["podIP"] != ips[0]
    kubelet.sync()
    await eventually(
        lambda: _endpoint_ips(api, "web", "notReadyAddresses") == [ips[0]], "not ready address"
    )
    assert _endpoint_ips(api, "web") == [ips[1]]
    kubelet.ready = lambda pod: True
    kubelet.sync()
    await eventually(lambda: _endpoint_ips(api, "web") == ips, "ready again")

    # ... and selector changes.
    svc = api.get(R.SERVICES, "team", "web")
    svc["spec"]["selector"] = {"app": "nothing"}
    api.update(R.SERVICES, "team", "web", svc)
    await eventually(
        lambda: api.get(R.ENDPOINTS, "team", "web").get("subsets") in (None, []),
        "endpoints emptied",
    )
    api.delete(R.SERVICES, "team", "web")
    await eventually(lambda: not api.list(R.ENDPOINTS, "team"), "endpoints deleted")

    # Deleting the deployment garbage-collects its ReplicaSets and pods.
    api.delete(R.DEPLOYMENTS, "team", "web")
    await eventually(
        lambda: not api.list(R.REPLICASETS, "team") and not _pods(api, live=False),
        "garbage collected",
    )

    # Deleting the namespace empties and then removes it.
    api.create(R.DEPLOYMENTS, "team", dep)
    await eventually(available(2), "available again")
    api.delete(R.NAMESPACES, None, "team")
    await eventually(
        lambda: not [n for n in api.list(R.NAMESPACES) if n["metadata"]["name"] == "team"],
        "namespace removed",
    )
    for rt in R.ALL:
        if rt.namespaced:
            assert api.list(rt, "team") == []
