"""kvpn mesh plans: marks, annotations, the JSON patches of join / leave / restore (applied
to a Service with jsonpatch), the objects' manifests, and clean / recover decisions."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest

from kvpn.cluster.cleanup import DeletePod, RecoverRefused, plan_clean, plan_recover
from kvpn.cluster.locks import Identity, Lock
from kvpn.cluster.mesh_cleanup import (
    DeleteMeshService,
    DropMeshMembers,
    RestoreMesh,
    orphan_member_services,
    plan_mesh_cleanup,
)
from kvpn.cluster.mesh_objects import (
    manual_example,
    member_service_manifest,
    new_mesh_state,
    routed_ports,
    router_manifest,
    standin_manifest,
)
from kvpn.cluster.mesh_plan import (
    MESH_KIND,
    MESH_SERVICE_LABEL,
    Mark,
    Member,
    MeshMode,
    MeshPlanError,
    MeshState,
    finish_close_ops,
    join_ops,
    leave,
    mesh_refusal,
    parse_mark,
    read_mesh,
    refresh_member_ops,
    restore_mesh,
    switch_selector_ops,
)
from kvpn.cluster.service_ports import PortForward, ServicePort
from kvpn.shadow.mesh_names import MESH_ANNOTATION, mesh_service_name

T0 = datetime(2026, 11, 25, 19, 30, 0, tzinfo=UTC)
LATER = T0 + timedelta(seconds=60)  # every member written at T0 (ttl 30 s) has expired
ME = Identity("alice", "laptop")
BOB = Identity("bob", "desk")
ECHO_PORTS = [
    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
    {"name": "udp-echo", "port": 8080, "protocol": "UDP", "targetPort": 8080},
]
CONTAINER_PORTS = {("http", "TCP"): 8080, ("udp-echo", "UDP"): 8080}


def echo(annotations: dict[str, str] | None = None, rv: str = "1") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "echo", "namespace": "default", "resourceVersion": rv}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"selector": {"app": "echo"}, "ports": ECHO_PORTS}}


def member(
    who: Identity, session: str, mark: str, *, at: datetime = T0, mode: str = "auto"
) -> Member:
    return Member(Lock.new(MESH_KIND, mode=mode, identity=who, session=session, now=at), mark)


def routed() -> tuple[Any, ...]:
    ports = [p for p in (ServicePort.from_spec(s) for s in ECHO_PORTS) if p is not None]
    return routed_ports(ports, CONTAINER_PORTS)


def state() -> MeshState:
    return new_mesh_state("echo", "version", {"app": "echo"}, routed(), now=T0)


def apply(service: dict[str, Any], ops: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """Apply like the API server: the resourceVersion moves on every write."""
    result: dict[str, Any] = jsonpatch.apply_patch(service, list(ops))
    result["metadata"]["resourceVersion"] = str(int(result["metadata"]["resourceVersion"]) + 1)
    return result


def rv(service: dict[str, Any]) -> str:
    return str(service["metadata"]["resourceVersion"])


def view(service: dict[str, Any]) -> Any:
    return read_mesh("echo", service["metadata"].get("annotations"))


@pytest.mark.parametrize(
    ("text", "mode", "key", "value", "explicit"),
    [
        ("abc12", MeshMode.AUTO, "version", "abc12", False),
        ("X-Dev:abc", MeshMode.AUTO, "X-Dev", "abc", True),
        ("version:a:b", MeshMode.AUTO, "version", "a:b", True),
        ("x~y:Q!", MeshMode.AUTO, "x~y", "Q!", True),
        ("x-team.dev:v1.2_x", MeshMode.MANUAL, "x-team.dev", "v1.2_x", True),
    ],
)
def test_parse_mark(text: str, mode: MeshMode, key: str, value: str, explicit: bool) -> None:
    assert parse_mark(text, mode) == Mark(key, value, explicit)


def test_random_mark() -> None:
    mark = parse_mark(None, MeshMode.AUTO)
    assert mark.key == "version" and not mark.explicit_key
    assert len(mark.value) == 5 and mark.value.isalnum() and mark.value == mark.value.lower()
    assert parse_mark(None, MeshMode.AUTO, random_value="zz9zz").value == "zz9zz"


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("bad key:x", MeshMode.AUTO, "not a valid HTTP header name"),
        (":x", MeshMode.AUTO, "not a valid HTTP header name"),
        ("version:", MeshMode.AUTO, "visible ASCII"),
        ("a b", MeshMode.AUTO, "visible ASCII"),
        ("version:caf\u00e9", MeshMode.AUTO, "visible ASCII"),
        ("x~y:v1", MeshMode.MANUAL, "not a valid Kubernetes label key"),
        ("v!1", MeshMode.MANUAL, "not a valid Kubernetes label value"),
        ("a" * 64, MeshMode.MANUAL, "not a valid Kubernetes label value"),
    ],
)
def test_bad_marks_are_one_line(text: str, mode: MeshMode, message: str) -> None:
    with pytest.raises(MeshPlanError, match=message) as info:
        parse_mark(text, mode)
    assert "\n" not in str(info.value)


def test_member_and_state_round_trip() -> None:
    m = member(ME, "s1", "abc")
    assert Member.from_json(m.to_json()) == m
    assert json.loads(m.to_json())["mark"] == "abc"
    assert m.refreshed(LATER).lock.heartbeat > m.lock.heartbeat
    exchange_lock = Lock.new("exchange", mode="selector", identity=ME, session="x", now=T0)
    assert Member.from_json(exchange_lock.to_json()) is None  # not a mesh member
    assert Member.from_json("{") is None
    s = state()
    assert MeshState.from_json(s.to_json()) == s
    assert s.ports == ("8080/TCP", "8080/UDP")
    assert json.loads(s.to_json())["originalSelector"] == {"app": "echo"}
    for bad in ("[]", "{}", '{"router":"r","standin":"s","header":"h","since":"t"}', "x"):
        assert MeshState.from_json(bad) is None


def test_join_leave_round_trip_restores_the_service_exactly() -> None:
    original = echo()
    a, b = member(ME, "a1", "alpha", at=LATER), member(BOB, "b1", "bravo", at=LATER)
    svc = apply(original, join_ops(rv(original), None, a, state()))
    assert svc["metadata"]["annotations"][MESH_ANNOTATION] == state().to_json()
    with pytest.raises(jsonpatch.JsonPatchTestFailed):  # a stale read loses the race
        apply(svc, join_ops(rv(original), svc["metadata"]["annotations"], b, None))
    svc = apply(svc, join_ops(rv(svc), svc["metadata"]["annotations"], b, None))
    svc = apply(svc, switch_selector_ops(rv(svc), view(svc).raw_state, "echo"))
    assert svc["spec"]["selector"] == {"kvpn.dev/mesh-router": "echo"}
    svc = apply(svc, refresh_member_ops(a, a.refreshed(LATER + timedelta(seconds=1))))
    a = a.refreshed(LATER + timedelta(seconds=1))

    first = leave(view(svc), rv(svc), a, now=LATER)
    assert first is not None and first.restore is None  # bob is still in
    svc = apply(svc, first.ops)
    assert view(svc).find("a1") is None
    assert leave(view(svc), rv(svc), a, now=LATER) is None  # already out

    last = leave(view(svc), rv(svc), b, now=LATER)
    assert last is not None and last.restore is not None
    restore = last.restore
    assert (restore.router, restore.standin) == ("kvpn-router-echo", "echo-kvpn-standin")
    assert restore.member_services == (mesh_service_name("echo", "bravo"),)
    svc = apply(svc, last.ops)
    assert svc["spec"]["selector"] == {"app": "echo"}
    closing = view(svc).state
    assert closing is not None and closing.closing  # joiners wait until it is gone
    assert restore.closing_state is not None
    # clean/recover finishing this close (the leaver was killed) leave the selector alone:
    # it is back already, and its owner may have changed it since
    moved = copy.deepcopy(svc)
    moved["spec"]["selector"] = {"app": "echo-v2"}
    finish = restore_mesh(view(moved), rv(moved), now=LATER, two_step=False)
    assert finish is not None and not finish.puts_selector_back
    moved = apply(moved, finish.ops)
    assert moved["spec"]["selector"] == {"app": "echo-v2"}
    assert moved["metadata"]["annotations"] == {}
    svc = apply(svc, finish_close_ops(restore.closing_state))
    assert svc["spec"] == original["spec"]
    assert svc["metadata"]["annotations"] == {}


def test_the_last_live_member_also_removes_dead_ones() -> None:
    dead = member(BOB, "b1", "bravo", at=T0)
    me = member(ME, "a1", "alpha", at=LATER)
    svc = apply(echo({}), join_ops("1", {}, dead, state()))
    svc = apply(svc, join_ops(rv(svc), {}, me, None))
    decision = leave(view(svc), rv(svc), me, now=LATER)
    assert decision is not None and decision.restore is not None
    assert set(decision.restore.member_services) == {
        mesh_service_name("echo", "bravo"),
        mesh_service_name("echo", "alpha"),
    }
    svc = apply(svc, decision.ops)
    assert [k for k in svc["metadata"]["annotations"]] == [MESH_ANNOTATION]


def test_a_manual_member_only_removes_itself() -> None:
    m = member(ME, "m1", "v1", at=LATER, mode="manual")
    svc = apply(echo(), join_ops("1", None, m, None))
    decision = leave(view(svc), rv(svc), m, now=LATER)
    assert decision is not None and decision.restore is None
    assert apply(svc, decision.ops)["metadata"]["annotations"] == {}


def test_manifests() -> None:
    ports = routed()
    assert [(p.port, p.protocol, p.names) for p in ports] == [
        (8080, "TCP", ("http",)),
        (8080, "UDP", ()),
    ]
    pod = router_manifest("default", "echo", state(), ports, "kvpn/shadow:0.1.0")
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["router"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KVPN_ROUTER_PORTS"] == "8080/TCP,8080/UDP"
    assert env["KVPN_ROUTER_STANDIN"] == "echo-kvpn-standin.default.svc"
    assert env["KVPN_ROUTER_HEADER"] == "version"
    assert {"containerPort": 8080, "protocol": "TCP", "name": "http"} in container["ports"]
    assert container["readinessProbe"]["tcpSocket"]["port"] == 8080
    assert pod["metadata"]["labels"]["kvpn.dev/mesh-router"] == "echo"
    assert "kvpn.dev/user" not in pod["metadata"]["annotations"]  # not a shadow pod to clean
    assert "sysctls" not in pod["spec"]["securityContext"]
    standin = standin_manifest("default", "echo", state())
    assert standin["spec"]["selector"] == {"app": "echo"}
    assert [(p["port"], p["targetPort"], p["protocol"]) for p in standin["spec"]["ports"]] == [
        (8080, 8080, "TCP"),
        (8080, 8080, "UDP"),
    ]
    m = member(ME, "a1", "alpha")
    svc = member_service_manifest("default", "echo", m, [PortForward(18081, 8080)])
    assert svc["metadata"]["name"] == mesh_service_name("echo", "alpha")
    assert svc["spec"]["selector"] == {"kvpn.dev/mesh-member": "a1"}
    assert svc["metadata"]["labels"][MESH_SERVICE_LABEL] == "echo"
    example = manual_example("default", "echo", Mark("version", "v1"), 8080)
    assert "kind: VirtualService" in example and 'exact: "v1"' in example


def test_router_on_a_low_port_gets_the_unprivileged_port_sysctl() -> None:
    ports = routed_ports([ServicePort("web", 80, "TCP", 80)], {})
    low = new_mesh_state("web", "version", {"app": "web"}, ports, now=T0)
    spec = router_manifest("default", "web", low, ports, "img")["spec"]
    assert spec["securityContext"]["sysctls"][0]["name"] == "net.ipv4.ip_unprivileged_port_start"


def test_mesh_refusal_for_exchange() -> None:
    assert mesh_refusal(echo({}), T0) is None
    live = member(BOB, "b1", "bravo", at=T0)
    text = mesh_refusal(echo({live.annotation: live.to_json()}), T0)
    assert text is not None and "meshed by mark 'bravo'" in text and "bob@desk" in text
    dead = mesh_refusal(echo({MESH_ANNOTATION: state().to_json()}), LATER)
    assert dead is not None and "stopped" in dead and "kvpn recover echo" in dead


# --- clean / recover ---------------------------------------------------------------------------


def meshed(*members: Member, with_state: bool = True) -> dict[str, Any]:
    annotations = {m.annotation: m.to_json() for m in members}
    if with_state:
        annotations[MESH_ANNOTATION] = state().to_json()
    svc = echo(annotations)
    svc["spec"]["selector"] = {"kvpn.dev/mesh-router": "echo"}
    return svc


def test_clean_restores_when_only_my_dead_members_remain() -> None:
    svc = meshed(member(ME, "a1", "alpha"), member(ME, "a2", "again"))
    result = plan_mesh_cleanup(svc, user="alice", now=LATER, on_request=False)
    (action,) = result.actions
    assert isinstance(action, RestoreMesh)
    assert "restore meshed service default/echo (selector app=echo)" in action.describe()
    assert result.dead_sessions == {"a1", "a2"}
    restored = apply(svc, action.ops)
    assert restored["spec"]["selector"] == {"app": "echo"}
    assert restored["metadata"]["annotations"] == {}


def test_clean_drops_my_dead_member_while_another_lives() -> None:
    svc = meshed(member(ME, "a1", "alpha"), member(BOB, "b1", "bravo", at=LATER))
    result = plan_mesh_cleanup(svc, user="alice", now=LATER, on_request=False)
    (action,) = result.actions
    assert isinstance(action, DropMeshMembers)
    assert action.sessions == ("a1",)
    assert action.member_services == (mesh_service_name("echo", "alpha"),)
    assert [m.session for m in result.live_members] == ["b1"]
    after = apply(svc, action.ops)
    assert sorted(after["metadata"]["annotations"]) == [
        MESH_ANNOTATION,
        "kvpn.dev/mesh-member.b1",
    ]


def test_clean_leaves_other_users_dead_members_to_recover() -> None:
    svc = meshed(member(BOB, "b1", "bravo"))
    result = plan_mesh_cleanup(svc, user="alice", now=LATER, on_request=False)
    assert result.actions == ()
    assert any("kvpn recover echo" in n for n in result.notes)
    recovered = plan_mesh_cleanup(svc, user="alice", now=LATER, on_request=True)
    assert isinstance(recovered.actions[0], RestoreMesh)
    refused = plan_mesh_cleanup(svc, user="alice", now=T0, on_request=True)
    assert refused.refusal is not None and "live sessions" in refused.refusal


def test_members_without_a_mesh_and_orphan_member_services() -> None:
    svc = meshed(member(ME, "m1", "v1", mode="manual"), with_state=False)
    result = plan_mesh_cleanup(svc, user="alice", now=LATER, on_request=False)
    assert isinstance(result.actions[0], DropMeshMembers)
    m = member(ME, "a1", "alpha")
    member_svc = member_service_manifest("default", "echo", m, [PortForward(1, 8080)])
    assert orphan_member_services([member_svc], set(), user="alice") == [
        DeleteMeshService(
            "default", member_svc["metadata"]["name"], "session a1 is no member of the mesh of echo"
        )
    ]
    assert orphan_member_services([member_svc], {("default", "a1")}, user="alice") == []
    assert orphan_member_services([member_svc], set(), user="bob") == []


def shadow(session: str, who: Identity) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"kvpn-shadow-{session}",
            "namespace": "default",
            "labels": {"app.kubernetes.io/managed-by": "kvpn", "kvpn.dev/session": session},
            "annotations": {
                "kvpn.dev/user": who.user,
                "kvpn.dev/kind": "mesh",
                "kvpn.dev/service": "echo",
            },
        }
    }


def test_plan_clean_and_recover_with_a_mesh() -> None:
    live_mine = member(ME, "a2", "again", at=LATER)
    svc = meshed(member(ME, "a1", "alpha"), live_mine)
    pods = [shadow("a1", ME), shadow("a2", ME)]
    plan = plan_clean([copy.deepcopy(svc)], pods, [], me=ME, now=LATER)
    kinds = [type(a).__name__ for a in plan.actions]
    assert kinds == ["DropMeshMembers", "DeletePod"]
    assert [a.name for a in plan.actions if isinstance(a, DeletePod)] == ["kvpn-shadow-a1"]
    with pytest.raises(RecoverRefused, match="live sessions"):
        plan_recover(svc, [], pods, namespace="default", name="echo", me=BOB, now=LATER)
    dead = meshed(member(ME, "a1", "alpha"))
    plan = plan_recover(dead, [], pods, namespace="default", name="echo", me=BOB, now=LATER)
    assert [type(a).__name__ for a in plan.actions] == ["RestoreMesh", "DeletePod"]
    assert "would" not in plan.describe()[0] and "router pod kvpn-router-echo" in plan.describe()[0]
