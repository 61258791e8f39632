"""kvpn clean / kvpn recover decisions, as a table of cluster states."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kvpn.cluster.cleanup import (
    CONNECT_STARTUP_GRACE,
    DeletePod,
    DeleteService,
    RecoverRefused,
    RestoreDeployment,
    RestoreService,
    plan_clean,
    plan_recover,
)
from kvpn.cluster.exchange_plan import (
    ORIGINAL_REPLICAS_ANNOTATION,
    ORIGINAL_SELECTOR_ANNOTATION,
    SCALED_BY_ANNOTATION,
    SCALED_DEPLOYMENT_ANNOTATION,
)
from kvpn.cluster.locks import LOCK_ANNOTATION, Identity, Lock, format_time
from kvpn.cluster.mesh_cleanup import ORPHAN_GRACE
from kvpn.cluster.mesh_plan import MESH_SERVICE_LABEL
from kvpn.shadow.mesh_names import MESH_ANNOTATION, ROUTER_LABEL

T0 = datetime(2026, 11, 25, 19, 30, 0, tzinfo=UTC)
LATER = T0 + timedelta(seconds=60)  # every lock written at T0 (ttl 30 s) has expired
ME = Identity("alice", "laptop")
BOB = Identity("bob", "desk")


def lock(who: Identity, session: str, *, kind: str = "exchange", at: datetime = T0) -> str:
    mode = "selector" if kind == "exchange" else ""
    return Lock.new(kind, mode=mode, identity=who, session=session, now=at).to_json()


def obj(
    name: str,
    *,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if annotations is not None:
        meta["annotations"] = annotations
    if labels is not None:
        meta["labels"] = labels
    meta.update(extra)
    return {"metadata": meta, "spec": {"selector": {"kvpn.dev/exchange": "x"}}}


def exchanged(name: str, who: Identity, session: str, *, at: datetime = T0) -> dict[str, Any]:
    return obj(
        name,
        annotations={
            LOCK_ANNOTATION: lock(who, session, at=at),
            ORIGINAL_SELECTOR_ANNOTATION: '{"app":"' + name + '"}',
        },
    )


def shadow_pod(
    session: str,
    who: Identity,
    *,
    kind: str | None = "exchange",
    service: str = "echo",
    started: datetime = T0,
) -> dict[str, Any]:
    annotations = {"kvpn.dev/user": who.user, "kvpn.dev/started-at": format_time(started)}
    if kind is not None:
        annotations.update({"kvpn.dev/kind": kind, "kvpn.dev/service": service})
    return obj(
        f"kvpn-shadow-{session}",
        annotations=annotations,
        labels={"app.kubernetes.io/managed-by": "kvpn", "kvpn.dev/session": session},
    )


def kinds(plan: Any) -> list[tuple[str, str]]:
    return [(type(a).__name__, a.name) for a in plan.actions]


CLEAN_CASES = [
    # services, pods, now, expected actions
    (
        "my dead exchange is restored and its pod deleted",
        [exchanged("echo", ME, "s1")],
        [shadow_pod("s1", ME)],
        LATER,
        [("RestoreService", "echo"), ("DeletePod", "kvpn-shadow-s1")],
    ),
    (
        "my live exchange is left alone",
        [exchanged("echo", ME, "s1")],
        [shadow_pod("s1", ME)],
        T0 + timedelta(seconds=5),
        [],
    ),
    (
        "another user's live exchange is left alone",
        [exchanged("echo", BOB, "s2")],
        [shadow_pod("s2", BOB)],
        T0,
        [],
    ),
    (
        "another user's dead exchange is only reported",
        [exchanged("echo", BOB, "s2")],
        [shadow_pod("s2", BOB)],
        LATER,
        [],
    ),
    (
        "my orphaned exchange pod (no lock left) is deleted",
        [obj("echo")],
        [shadow_pod("s1", ME)],
        T0,
        [("DeletePod", "kvpn-shadow-s1")],
    ),
    (
        "my dead preview service and pod go",
        [
            obj(
                "web",
                annotations={LOCK_ANNOTATION: lock(ME, "s3", kind="preview")},
                labels={"app.kubernetes.io/managed-by": "kvpn"},
            )
        ],
        [shadow_pod("s3", ME, kind="preview", service="web")],
        LATER,
        [("DeletePod", "kvpn-shadow-s3"), ("DeleteService", "web")],
    ),
    (
        "a preview-locked service not created by kvpn is never deleted",
        [obj("web", annotations={LOCK_ANNOTATION: lock(ME, "s3", kind="preview")})],
        [],
        LATER,
        [],
    ),
    (
        "my dead connect pod goes once past the start-up grace",
        [],
        [shadow_pod("c1", ME, kind=None)],
        T0 + CONNECT_STARTUP_GRACE + timedelta(seconds=1),
        [("DeletePod", "kvpn-shadow-c1")],
    ),
    (
        "a young connect pod may still be starting",
        [],
        [shadow_pod("c1", ME, kind=None)],
        T0 + timedelta(seconds=30),
        [],
    ),
    (
        "another user's connect pod is left alone",
        [],
        [shadow_pod("c2", BOB, kind=None)],
        LATER + CONNECT_STARTUP_GRACE,
        [],
    ),
    (
        "a pod of a live connect session on this machine is kept",
        [],
        [shadow_pod("live1", ME, kind=None)],
        LATER + CONNECT_STARTUP_GRACE,
        [],
    ),
]


@pytest.mark.parametrize(
    ("why", "services", "pods", "now", "expected"), CLEAN_CASES, ids=[c[0] for c in CLEAN_CASES]
)
def test_clean(
    why: str, services: list[Any], pods: list[Any], now: datetime, expected: list[tuple[str, str]]
) -> None:
    plan = plan_clean(services, pods, [], me=ME, now=now, live_connect_sessions={"live1"})
    assert kinds(plan) == expected


def test_clean_notes_say_how_to_recover_others() -> None:
    plan = plan_clean(
        [
            exchanged("echo", BOB, "s2"),
            obj("bad", annotations={LOCK_ANNOTATION: "garbage"}),
            obj("half", annotations={ORIGINAL_SELECTOR_ANNOTATION: '{"a":"b"}'}),
        ],
        [],
        [],
        me=ME,
        now=LATER,
    )
    assert plan.actions == ()
    text = "\n".join(plan.notes)
    assert "bob@desk" in text and "kvpn recover echo -n default" in text
    assert "unreadable kvpn lock; `kvpn recover bad" in text
    assert "annotations but no lock; `kvpn recover half" in text


def scaled_service(who: Identity, session: str) -> dict[str, Any]:
    return obj(
        "echo",
        annotations={
            LOCK_ANNOTATION: lock(who, session),
            SCALED_DEPLOYMENT_ANNOTATION: "echo-deploy",
        },
    )


def scaled_deployment(replicas: str = "2") -> dict[str, Any]:
    return obj(
        "echo-deploy",
        annotations={ORIGINAL_REPLICAS_ANNOTATION: replicas, SCALED_BY_ANNOTATION: "s1"},
    )


def test_clean_scales_back_first() -> None:
    plan = plan_clean(
        [scaled_service(ME, "s1")], [shadow_pod("s1", ME)], [scaled_deployment()], me=ME, now=LATER
    )
    assert kinds(plan) == [
        ("RestoreDeployment", "echo-deploy"),
        ("RestoreService", "echo"),
        ("DeletePod", "kvpn-shadow-s1"),
    ]
    restore = plan.actions[0]
    assert isinstance(restore, RestoreDeployment) and restore.replicas == 2
    assert "would" not in plan.describe()[0]
    assert plan.describe()[0] == "scale deployment default/echo-deploy back to 2"


def test_clean_without_a_replica_count_says_so() -> None:
    plan = plan_clean([scaled_service(ME, "s1")], [], [scaled_deployment("lots")], me=ME, now=LATER)
    assert kinds(plan) == [("RestoreService", "echo")]
    assert "scale it by hand" in plan.notes[0]


def test_connect_pods_are_kept_when_local_sessions_are_unknown() -> None:
    pod = shadow_pod("c1", ME, kind=None)
    plan = plan_clean(
        [], [pod], [], me=ME, now=LATER + CONNECT_STARTUP_GRACE, live_connect_sessions=None
    )
    assert plan.actions == () and "not readable" in plan.notes[0]


def test_pods_being_deleted_are_skipped() -> None:
    pod = shadow_pod("s1", ME)
    pod["metadata"]["deletionTimestamp"] = format_time(T0)
    assert plan_clean([], [pod], [], me=ME, now=LATER).actions == ()


def test_recover_refuses_live_sessions() -> None:
    for who in (ME, BOB):
        with pytest.raises(RecoverRefused, match="held by a live session.*in 2[0-9]s"):
            plan_recover(
                exchanged("echo", who, "s1"),
                [],
                [],
                namespace="default",
                name="echo",
                me=ME,
                now=T0 + timedelta(seconds=5),
            )
    with pytest.raises(RecoverRefused, match="not found"):
        plan_recover(None, [], [], namespace="default", name="echo", me=ME, now=T0)


def test_recover_restores_anyones_dead_session() -> None:
    plan = plan_recover(
        exchanged("echo", BOB, "s2"),
        [],
        [shadow_pod("s2", BOB), shadow_pod("s9", BOB, service="other")],
        namespace="default",
        name="echo",
        me=ME,
        now=LATER,
    )
    assert kinds(plan) == [("RestoreService", "echo"), ("DeletePod", "kvpn-shadow-s2")]
    service = plan.actions[0]
    assert isinstance(service, RestoreService) and service.selector == (("app", "echo"),)


def test_recover_of_a_dead_preview_deletes_it() -> None:
    preview = obj("web", annotations={LOCK_ANNOTATION: lock(ME, "s3", kind="preview")})
    plan = plan_recover(preview, [], [], namespace="default", name="web", me=ME, now=LATER)
    assert [type(a) for a in plan.actions] == [DeleteService]


def test_recover_of_an_untouched_service() -> None:
    plan = plan_recover(
        obj("echo", annotations={"x": "y"}), [], [], namespace="default", name="echo", me=ME, now=T0
    )
    assert plan.actions == () and "carries no kvpn changes" in plan.notes[0]


def test_recover_with_a_malformed_lock_restores() -> None:
    service = obj(
        "echo",
        annotations={LOCK_ANNOTATION: "garbage", ORIGINAL_SELECTOR_ANNOTATION: '{"app":"echo"}'},
    )
    plan = plan_recover(service, [], [], namespace="default", name="echo", me=ME, now=T0)
    assert kinds(plan) == [("RestoreService", "echo")]
    ops = plan.actions[0].ops  # type: ignore[union-attr]
    assert ops[0] == {
        "op": "test",
        "path": "/metadata/annotations/kvpn.dev~1lock",
        "value": "garbage",
    }
    assert isinstance(plan.actions[0], RestoreService)
    assert not any(isinstance(a, DeletePod) for a in plan.actions)


# --- kvpn mesh: router pods and stand-in Services of no mesh (orphans) ----------------------

KVPN = {"app.kubernetes.io/managed-by": "kvpn"}
MESH_STATE = json.dumps(
    {"router": "kvpn-router-echo", "standin": "echo-kvpn-standin", "header": "version",
     "originalSelector": {"app": "echo"}, "ports": ["8080/TCP"], "since": format_time(T0)}
)  # fmt: skip


def service(name: str = "echo", *, mesh: str | None = None) -> dict[str, Any]:
    """The Service; ``mesh``: its ``kvpn.dev/mesh``, with one of bob's members, alive."""
    if mesh is None:
        return obj(name, annotations={})
    member = json.loads(lock(BOB, "b1", kind="mesh", at=LATER + ORPHAN_GRACE))
    member.update(mode="auto", mark="bravo")
    return obj(
        name,
        annotations={MESH_ANNOTATION: mesh, "kvpn.dev/mesh-member.b1": json.dumps(member)},
    )


def router(service: str = "echo", *, labels: dict[str, str] = KVPN, **extra: Any) -> dict[str, Any]:
    return obj(
        f"kvpn-router-{service}",
        labels={**labels, ROUTER_LABEL: service},
        annotations={"kvpn.dev/service": service},
        creationTimestamp=format_time(T0),
        **extra,
    )


def standin(
    service: str = "echo", *, labels: dict[str, str] = KVPN, **extra: Any
) -> dict[str, Any]:
    meta = {"creationTimestamp": "2026-11-25T19:30:00+00:00", **extra}  # as the client says it
    return obj(f"{service}-kvpn-standin", labels={**labels, MESH_SERVICE_LABEL: service}, **meta)


ORPHAN_CASES = [
    # services (the meshed Service and the stand-in), router pods, now, expected actions
    (
        "a router pod and stand-in of an unmeshed service go",
        [service(), standin()],
        [router()],
        LATER + ORPHAN_GRACE,
        [("DeletePod", "kvpn-router-echo"), ("DeleteMeshService", "echo-kvpn-standin")],
    ),
    (
        "a router pod and stand-in of a service that is gone go",
        [standin()],
        [router()],
        LATER + ORPHAN_GRACE,
        [("DeletePod", "kvpn-router-echo"), ("DeleteMeshService", "echo-kvpn-standin")],
    ),
    (
        "a live mesh keeps its router and stand-in",
        [service(mesh=MESH_STATE), standin()],
        [router()],
        LATER + ORPHAN_GRACE,
        [],
    ),
    (
        "an unreadable mesh annotation still counts as a mesh",
        [service(mesh="garbage"), standin()],
        [router()],
        LATER + ORPHAN_GRACE,
        [],
    ),
    (
        "young ones may belong to a mesh being created",
        [service(), standin()],
        [router()],
        T0 + ORPHAN_GRACE - timedelta(seconds=1),
        [],
    ),
    (
        "objects kvpn did not create are never touched",
        [service(), standin(labels={})],
        [router(labels={"app.kubernetes.io/managed-by": "helm"})],
        LATER + ORPHAN_GRACE,
        [],
    ),
    (
        "a router pod already being deleted is skipped",
        [service()],
        [router(deletionTimestamp=format_time(T0))],
        LATER + ORPHAN_GRACE,
        [],
    ),
    (
        "without a creation time nothing is judged orphan",
        [service(), obj("echo-kvpn-standin", labels={**KVPN, MESH_SERVICE_LABEL: "echo"})],
        [obj("kvpn-router-echo", labels={**KVPN, ROUTER_LABEL: "echo"})],
        LATER + ORPHAN_GRACE,
        [],
    ),
    (
        "a member service (it has a session) is not a stand-in",
        [service(), standin(labels={**KVPN, "kvpn.dev/session": "s1"})],
        [],
        LATER + ORPHAN_GRACE,
        [],
    ),
    (
        "the same service name in another namespace does not count",
        [{**service(mesh=MESH_STATE),
          "metadata": {**service(mesh=MESH_STATE)["metadata"], "namespace": "other"}}],
        [router()],
        LATER + ORPHAN_GRACE,
        [("DeletePod", "kvpn-router-echo")],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("why", "services", "pods", "now", "expected"), ORPHAN_CASES, ids=[c[0] for c in ORPHAN_CASES]
)
def test_clean_orphan_mesh_objects(
    why: str, services: list[Any], pods: list[Any], now: datetime, expected: list[tuple[str, str]]
) -> None:
    plan = plan_clean(services, pods, [], me=ME, now=now, live_connect_sessions=set())
    assert kinds(plan) == expected
    text = "\n".join(plan.describe())
    if expected:
        assert "delete mesh router pod default/kvpn-router-echo: service default/echo" in text
    if ("DeleteMeshService", "echo-kvpn-standin") in expected:
        assert "delete stand-in service default/echo-kvpn-standin" in text


def test_recover_deletes_an_orphan_router_of_its_service_only() -> None:
    pods = [router(), router("other")]
    plan = plan_recover(
        service(), [], pods, namespace="default", name="echo", me=ME, now=LATER + ORPHAN_GRACE
    )
    assert kinds(plan) == [("DeletePod", "kvpn-router-echo")]
    assert plan.notes == ()
    later = LATER + ORPHAN_GRACE + timedelta(minutes=10)  # bob's member is dead by then
    meshed = plan_recover(
        service(mesh=MESH_STATE), [], pods, namespace="default", name="echo", me=ME, now=later
    )
    assert kinds(meshed) == [("RestoreMesh", "echo")]  # it deletes the router itself
