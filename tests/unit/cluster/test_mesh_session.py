"""The mesh session's steps against an in-memory API: refusals, join (and its race), the
router (created once, Ready before the selector moves), the heartbeat, and leave (the last
one restores the Service exactly)."""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest

from kvpn.cli.errors import UserError
from kvpn.cluster.intercept_api import InterceptApiError, PatchRejected
from kvpn.cluster.locks import LOCK_ANNOTATION, Identity, Lock
from kvpn.cluster.mesh_objects import (
    member_service_manifest,
    routed_ports,
)
from kvpn.cluster.mesh_plan import (
    Member,
    MeshMode,
    leave,
    parse_mark,
    read_mesh,
)
from kvpn.cluster.service_ports import PortForward, ServicePort
from kvpn.exchange_session import refuse_if_held
from kvpn.intercept_session import InterceptOptions, LockLost
from kvpn.journal_replay import (
    EXECUTORS,
    ReplayContext,
    undo_delete_member_service,
    undo_leave_mesh,
)
from kvpn.mesh_session import mesh_permissions, plan_mesh
from kvpn.mesh_steps import (
    MemberKeeper,
    check_joinable,
    ensure_router,
    join,
    leave_dead_session,
    leave_mesh,
    wait_pod_ready,
)
from kvpn.shadow.mesh_names import MESH_ANNOTATION, mesh_service_name

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
ME = Identity("alice", "laptop")
BOB = Identity("bob", "desk")
PORTS = [
    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
    {"name": "udp-echo", "port": 8080, "protocol": "UDP", "targetPort": 8080},
]
CONTAINER_PORTS = {("http", "TCP"): 8080}


def echo() -> dict[str, Any]:
    return {
        "metadata": {"name": "echo", "namespace": "default", "resourceVersion": "1"},
        "spec": {"selector": {"app": "echo"}, "ports": copy.deepcopy(PORTS)},
    }


def _same_object(obj: dict[str, Any] | None, uid: str | None) -> bool:
    """A delete's uid precondition, as the API server checks it (the fake's objects may have
    no uid: then any uid matches)."""
    if obj is None or uid is None:
        return obj is not None
    return obj.get("metadata", {}).get("uid") in (None, uid)


class FakeKube:
    """Services and pods in memory; JSON patches move the resourceVersion like the API."""

    def __init__(self, *services: dict[str, Any], ready_after: int = 2) -> None:
        self.services = {s["metadata"]["name"]: copy.deepcopy(s) for s in services}
        self.pods: dict[str, dict[str, Any]] = {}
        self.ready_after = ready_after
        self.reads: dict[str, int] = {}
        self.log: list[str] = []
        self.interfere: list[dict[str, Any]] = []  # patches someone else lands first

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.services.get(name))

    async def patch_service(self, namespace: str, name: str, ops: list[Any]) -> dict[str, Any]:
        while self.interfere:
            self._apply(name, [self.interfere.pop(0)])
        self._apply(name, ops)
        self.log.append(f"patch {name}")
        return copy.deepcopy(self.services[name])

    def _apply(self, name: str, ops: list[Any]) -> None:
        try:
            result = jsonpatch.apply_patch(self.services[name], ops)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict):
            raise PatchRejected("422 test failed") from None
        result["metadata"]["resourceVersion"] = str(int(result["metadata"]["resourceVersion"]) + 1)
        self.services[name] = result

    async def create_service(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        name = manifest["metadata"]["name"]
        if name in self.services:
            raise InterceptApiError("409 Conflict")
        self.services[name] = {**copy.deepcopy(manifest), "metadata": {**manifest["metadata"]}}
        self.services[name]["metadata"]["resourceVersion"] = "1"
        self.log.append(f"create service {name}")
        return copy.deepcopy(self.services[name])

    async def delete_service(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        self.log.append(f"delete service {name}")
        if not _same_object(self.services.get(name), uid):
            return False
        return self.services.pop(name, None) is not None

    async def create_pod(self, namespace: str, manifest: dict[str, Any]) -> None:
        self.pods[manifest["metadata"]["name"]] = copy.deepcopy(manifest)
        self.log.append(f"create pod {manifest['metadata']['name']}")

    async def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        pod = self.pods.get(name)
        if pod is None:
            return None
        self.reads[name] = self.reads.get(name, 0) + 1
        ready = self.reads[name] > self.ready_after
        pod["status"] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        return copy.deepcopy(pod)

    async def read_pod_log(self, namespace: str, name: str, *, tail_lines: int = 20) -> str:
        return "Traceback: boom"

    async def delete_pod(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        self.log.append(f"delete pod {name}")
        if not _same_object(self.pods.get(name), uid):
            return False
        return self.pods.pop(name, None) is not None

    async def list_pods(self, namespace: str | None, label_selector: str) -> list[Any]:
        return []

    async def list_deployments(self, namespace: str | None) -> list[Any]:
        return []


def plan_for(
    service: dict[str, Any], who: Identity, mark: str, session: str, mode: MeshMode = MeshMode.AUTO
) -> Any:
    ports = [p for p in (ServicePort.from_spec(s) for s in PORTS) if p is not None]
    view = read_mesh("echo", service["metadata"].get("annotations"))
    parsed = check_joinable(service, view, mode, parse_mark(mark, mode), now=datetime.now(UTC))
    return plan_mesh(
        service,
        view,
        (PortForward(18081, 8080),),
        routed_ports(ports, CONTAINER_PORTS),
        mode=mode,
        mark=parsed,
        me=who,
        key_text=KEY,
        options=InterceptOptions(heartbeat_seconds=1),
        session=session,
    )


async def test_two_members_share_one_router_and_the_last_restores() -> None:
    kube: Any = FakeKube(echo())
    lines: list[str] = []
    first = await join(kube, plan_for(echo(), ME, "alpha", "a1"), lines.append)
    assert first.creates_mesh
    await ensure_router(kube, first, "img", lines.append, timeout=5, poll=0)
    svc = kube.services["echo"]
    assert svc["spec"]["selector"] == {"kvpn.dev/mesh-router": "echo"}
    assert kube.log.index("create pod kvpn-router-echo") < kube.log.index("patch echo", 1)
    assert "router pod: Running, Ready" in lines
    assert kube.services["echo-kvpn-standin"]["spec"]["selector"] == {"app": "echo"}

    second_plan = plan_for(kube.services["echo"], BOB, "bravo", "b1")
    assert not second_plan.creates_mesh
    second = await join(kube, second_plan, lines.append)
    await ensure_router(kube, second, "img", lines.append, timeout=5, poll=0)
    assert kube.log.count("create pod kvpn-router-echo") == 1
    kube.services[mesh_service_name("echo", "bravo")] = {"metadata": {"name": "m"}}

    assert not await leave_mesh(kube, "default", "echo", first.member, lines.append)
    assert kube.services["echo"]["spec"]["selector"] == {"kvpn.dev/mesh-router": "echo"}
    assert await leave_mesh(kube, "default", "echo", second.member, lines.append)
    restored = kube.services["echo"]
    assert restored["spec"] == echo()["spec"]
    assert restored["metadata"]["annotations"] == {}
    assert set(kube.services) == {"echo"}
    assert kube.pods == {}
    # Selector first, then the router: no request is sent to a router being deleted.
    restore_at = len(kube.log) - 1 - kube.log[::-1].index("delete pod kvpn-router-echo")
    assert kube.log[restore_at - 1] == "patch echo"


async def test_join_retries_when_the_service_changed_meanwhile() -> None:
    kube: Any = FakeKube(echo())
    kube.interfere = [
        {"op": "add", "path": "/metadata/labels", "value": {"touched": "yes"}},
    ]
    plan = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    assert MESH_ANNOTATION in kube.services["echo"]["metadata"]["annotations"]
    assert plan.creates_mesh


async def test_a_joiner_takes_the_header_of_the_router() -> None:
    kube: Any = FakeKube(echo())
    await join(kube, plan_for(echo(), ME, "x-dev:alpha", "a1"), print)
    meshed = kube.services["echo"]
    with pytest.raises(UserError, match="routes on header 'x-dev', not 'version'"):
        plan_for(meshed, BOB, "version:bravo", "b1")
    implicit = plan_for(meshed, BOB, "bravo", "b1")
    assert implicit.mark.key == "x-dev"
    with pytest.raises(UserError, match="mark 'alpha' .* already used by alice@laptop"):
        plan_for(meshed, BOB, "x-dev:alpha", "b1")
    with pytest.raises(UserError, match="meshed in auto mode"):
        plan_for(meshed, BOB, "bravo", "b1", MeshMode.MANUAL)
    # exchange refuses a meshed service in one line
    with pytest.raises(UserError, match="is meshed by mark 'alpha'") as info:
        refuse_if_held(meshed, BOB)
    assert "\n" not in str(info.value)


def test_mesh_refuses_an_exchanged_service() -> None:
    lock = Lock.new("exchange", mode="selector", identity=BOB, session="x", now=datetime.now(UTC))
    service = echo()
    service["metadata"]["annotations"] = {LOCK_ANNOTATION: lock.to_json()}
    with pytest.raises(UserError, match="held by kvpn exchange .*bob@desk") as info:
        plan_for(service, ME, "alpha", "a1")
    assert "\n" not in str(info.value)


def test_manual_plan_labels_the_pod_with_selector_and_mark() -> None:
    plan = plan_for(echo(), ME, "version:v2", "m1", MeshMode.MANUAL)
    assert dict(plan.pod.serving_labels) == {"app": "echo", "version": "v2"}
    assert plan.state is None
    manifest_labels = plan.pod.manifest()["metadata"]["labels"]
    assert "app" not in manifest_labels  # only once the agent serves
    service = echo()
    service["spec"]["selector"] = {"app.kubernetes.io/managed-by": "Helm"}
    with pytest.raises(UserError, match="which kvpn sets on its own pods"):
        plan_for(service, ME, "version:v2", "m1", MeshMode.MANUAL)


async def test_a_router_that_cannot_start_is_reported_with_its_log() -> None:
    kube: Any = FakeKube(echo())
    kube.pods["kvpn-router-echo"] = {"metadata": {"name": "kvpn-router-echo"}}

    async def crashing(namespace: str, name: str) -> dict[str, Any]:
        waiting = {"reason": "CrashLoopBackOff", "message": "back-off"}
        return {
            "status": {"phase": "Running", "containerStatuses": [{"state": {"waiting": waiting}}]}
        }

    kube.read_pod = crashing
    with pytest.raises(
        InterceptApiError, match="(?s)CrashLoopBackOff: back-off.*pod log.*Traceback: boom"
    ):
        await wait_pod_ready(kube, "default", "kvpn-router-echo", print, timeout=5, poll=0)


async def test_member_keeper_refreshes_and_notices_removal() -> None:
    kube: Any = FakeKube(echo())
    plan = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    old = plan.member.lock.heartbeat
    lines: list[str] = []
    keeper = MemberKeeper(kube, "default", "echo", plan.member, lines.append)
    await asyncio.sleep(1.01)
    await keeper.refresh()
    assert keeper.member.lock.heartbeat > old
    annotations = kube.services["echo"]["metadata"]["annotations"]
    assert annotations[plan.member.annotation] == keeper.member.to_json()
    annotations[plan.member.annotation] = "recovered by someone"
    keeper.start(0.01)
    await asyncio.wait_for(keeper.lost.wait(), 5)
    await keeper.stop()
    assert any("no longer lists this session" in line for line in lines)
    with pytest.raises(LockLost):
        await keeper.refresh()


async def test_leave_after_recover_does_nothing() -> None:
    kube: Any = FakeKube(echo())
    plan = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    kube.services["echo"] = echo()  # kvpn recover restored it meanwhile
    assert not await leave_mesh(kube, "default", "echo", plan.member, print)
    assert kube.services["echo"] == echo()


async def test_a_dead_mesh_is_joined_and_its_router_recreated() -> None:
    kube: Any = FakeKube(echo())
    dead = plan_for(echo(), BOB, "bravo", "b1")
    old = datetime.now(UTC) - timedelta(minutes=5)
    lock = Lock.new("mesh", mode="auto", identity=BOB, session="b1", now=old)
    await join(kube, replace(dead, member=Member(lock, "bravo")), print)
    mine = await join(kube, plan_for(kube.services["echo"], ME, "alpha", "a1"), print)
    assert not mine.creates_mesh
    await ensure_router(kube, mine, "img", print, timeout=5, poll=0)
    assert "create pod kvpn-router-echo" in kube.log
    assert await leave_mesh(kube, "default", "echo", mine.member, print)  # dead bob: last
    assert kube.services["echo"]["metadata"]["annotations"] == {}


def test_mesh_permissions() -> None:
    auto = {p.describe() for p in mesh_permissions("default", MeshMode.AUTO)}
    assert {"patch services", "create services", "delete services", "create pods"} <= auto
    manual = {p.describe() for p in mesh_permissions("default", MeshMode.MANUAL)}
    assert "patch pods" in manual and "create services" not in manual


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expose", "80", "--mode", "magic"], "--mode must be auto or manual"),
        (["--expose", "80", "--version-mark", "a b"], "visible ASCII"),
        (["--expose", "80", "--heartbeat", "0"], "--heartbeat must be"),
        (["--expose", "x"], "--expose LOCAL 'x' is not a port number"),
        (["--expose", "80"], "kubeconfig /nonexistent"),
    ],
)
def test_cli_bad_input_is_one_line(args: list[str], message: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [str(Path(sys.executable).parent / "kvpn"), "mesh", "echo", *args,
         "--kubeconfig", "/nonexistent"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("kvpn: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- the change journal: what a killed session left, undone by another process -------------

CLUSTER = {"kubeconfig": "/kc", "context": "sandbox"}


async def run_undo(kube: Any, undo: Any) -> str:
    """Carry out a journaled undo the way ``kvpn clean`` does (another process)."""
    ctx = ReplayContext(clients={("/kc", "sandbox"): kube})
    return await EXECUTORS[undo.kind](undo.args, ctx)


async def test_ensure_router_says_each_change_before_it_is_made() -> None:
    kube: Any = FakeKube(echo())
    said: list[str] = []

    def before(what: str) -> None:
        said.append(what)
        kube.log.append(f"journal {what}")

    first = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    await ensure_router(kube, first, "img", print, timeout=5, poll=0, before_change=before)
    assert said == [
        "create stand-in service default/echo-kvpn-standin",
        "create router pod default/kvpn-router-echo",
        "point the selector of service default/echo at its router",
    ]
    log = kube.log
    assert log.index(f"journal {said[0]}") + 1 == log.index("create service echo-kvpn-standin")
    assert log.index(f"journal {said[1]}") + 1 == log.index("create pod kvpn-router-echo")
    assert log[log.index(f"journal {said[2]}") + 1] == "patch echo"
    second = await join(kube, plan_for(kube.services["echo"], BOB, "bravo", "b1"), print)
    said.clear()
    await ensure_router(kube, second, "img", print, timeout=5, poll=0, before_change=before)
    assert said == []  # nothing to create or switch: nothing to journal


async def test_a_killed_members_journal_is_undone_at_once_and_the_last_restores() -> None:
    kube: Any = FakeKube(echo())
    first = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    await ensure_router(kube, first, "img", print, timeout=5, poll=0)
    second = await join(kube, plan_for(kube.services["echo"], BOB, "bravo", "b1"), print)
    for plan in (first, second):
        manifest = member_service_manifest("default", "echo", plan.member, plan.forwards)
        await kube.create_service("default", manifest)
    alpha, bravo = mesh_service_name("echo", "alpha"), mesh_service_name("echo", "bravo")

    # a1 was killed: its member is still fresh, but its journal says it is dead.
    assert await run_undo(kube, undo_delete_member_service(CLUSTER, "default", bravo, "a1")) == (
        f"skipped: service default/{bravo} is not session a1's mesh member"
    )
    assert await run_undo(kube, undo_delete_member_service(CLUSTER, "default", alpha, "a1")) == (
        "undone"
    )
    leave_a1 = undo_leave_mesh(CLUSTER, "default", "echo", "a1")
    assert await run_undo(kube, leave_a1) == "undone"
    annotations = kube.services["echo"]["metadata"]["annotations"]
    assert first.member.annotation not in annotations
    assert second.member.annotation in annotations  # b1 lives on, the mesh stays
    assert kube.services["echo"]["spec"]["selector"] == {"kvpn.dev/mesh-router": "echo"}
    assert "kvpn-router-echo" in kube.pods
    assert await run_undo(kube, leave_a1) == "already gone"  # replayed twice: harmless

    # b1 killed too: the last one out restores the Service exactly.
    assert await run_undo(kube, undo_leave_mesh(CLUSTER, "default", "echo", "b1")) == "undone"
    restored = kube.services["echo"]
    assert restored["spec"] == echo()["spec"]
    assert restored["metadata"]["annotations"] == {}
    assert set(kube.services) == {"echo"} and kube.pods == {}


async def test_a_journal_undo_never_touches_a_mesh_it_is_no_member_of() -> None:
    kube: Any = FakeKube(echo())
    bob = await join(kube, plan_for(echo(), BOB, "bravo", "b1"), print)
    await ensure_router(kube, bob, "img", print, timeout=5, poll=0)
    before = copy.deepcopy(kube.services)
    assert await run_undo(kube, undo_leave_mesh(CLUSTER, "default", "echo", "zz")) == (
        "already gone"
    )
    assert kube.services == before and "kvpn-router-echo" in kube.pods
    kube.services.pop("echo")
    assert await run_undo(kube, undo_leave_mesh(CLUSTER, "default", "echo", "b1")) == (
        "already gone"
    )


async def _half_closed_mesh() -> Any:
    """A mesh whose last member out patched the Service (selector back, closing) and was
    killed before it deleted the router: its member annotation is already gone."""
    kube: Any = FakeKube(echo())
    plan = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    await ensure_router(kube, plan, "img", print, timeout=5, poll=0)
    service = kube.services["echo"]
    view = read_mesh("echo", service["metadata"]["annotations"])
    decision = leave(
        view, service["metadata"]["resourceVersion"], plan.member, now=datetime.now(UTC)
    )
    assert decision is not None and decision.restore is not None
    await kube.patch_service("default", "echo", list(decision.ops))
    return kube


async def test_a_close_killed_half_way_is_finished_by_the_journal_undo() -> None:
    kube = await _half_closed_mesh()
    assert await run_undo(kube, undo_leave_mesh(CLUSTER, "default", "echo", "a1")) == "undone"
    assert kube.services["echo"]["spec"] == echo()["spec"]
    assert kube.services["echo"]["metadata"]["annotations"] == {}
    assert set(kube.services) == {"echo"} and kube.pods == {}


async def test_finishing_a_half_done_close_keeps_a_selector_changed_since() -> None:
    kube = await _half_closed_mesh()
    kube.services["echo"]["spec"]["selector"] = {"app": "echo-v2"}  # its owner moves on
    assert await run_undo(kube, undo_leave_mesh(CLUSTER, "default", "echo", "a1")) == "undone"
    assert kube.services["echo"]["spec"]["selector"] == {"app": "echo-v2"}
    assert kube.services["echo"]["metadata"]["annotations"] == {}
    assert set(kube.services) == {"echo"} and kube.pods == {}


async def test_leave_dead_session_drops_an_unreadable_member_of_its_own_only() -> None:
    kube: Any = FakeKube(echo())
    bob = await join(kube, plan_for(echo(), BOB, "bravo", "b1"), print)
    annotations = kube.services["echo"]["metadata"]["annotations"]
    annotations["kvpn.dev/mesh-member.a1"] = "torn"
    assert await leave_dead_session(kube, "default", "echo", "a1", print)
    assert "kvpn.dev/mesh-member.a1" not in kube.services["echo"]["metadata"]["annotations"]
    assert bob.member.annotation in kube.services["echo"]["metadata"]["annotations"]


async def test_join_records_the_selector_of_the_read_it_patches_not_the_plans() -> None:
    kube: Any = FakeKube(echo())
    plan = plan_for(echo(), ME, "alpha", "a1")  # planned while the selector was app=echo
    kube.services["echo"]["spec"]["selector"] = {"app": "echo-v2"}  # a deploy, meanwhile
    joined = await join(kube, plan, print)
    assert joined.state is not None and dict(joined.state.original_selector) == {"app": "echo-v2"}
    await ensure_router(kube, joined, "img", print, timeout=5, poll=0)
    assert kube.services["echo-kvpn-standin"]["spec"]["selector"] == {"app": "echo-v2"}
    assert await leave_mesh(kube, "default", "echo", joined.member, print)
    assert kube.services["echo"]["spec"]["selector"] == {"app": "echo-v2"}


async def test_a_mesh_annotation_naming_foreign_objects_never_deletes_them() -> None:
    kube: Any = FakeKube(echo())
    joined = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    await ensure_router(kube, joined, "img", print, timeout=5, poll=0)
    kube.services["database"] = {"metadata": {"name": "database", "resourceVersion": "1"}}
    kube.pods["payments-0"] = {"metadata": {"name": "payments-0"}}
    annotations = kube.services["echo"]["metadata"]["annotations"]
    tampered = json.loads(annotations[MESH_ANNOTATION])
    tampered.update(router="payments-0", standin="database")
    annotations[MESH_ANNOTATION] = json.dumps(tampered)
    await leave_mesh(kube, "default", "echo", joined.member, print)
    assert "database" in kube.services and "payments-0" in kube.pods


async def test_a_joiner_of_a_mesh_with_malformed_ports_gets_one_line() -> None:
    kube: Any = FakeKube(echo())
    await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    annotations = kube.services["echo"]["metadata"]["annotations"]
    bad = json.loads(annotations[MESH_ANNOTATION])
    bad["ports"] = ["http/TCP"]
    annotations[MESH_ANNOTATION] = json.dumps(bad)
    with pytest.raises(UserError, match="unreadable kvpn.dev/mesh"):
        await join(kube, plan_for(echo(), BOB, "bravo", "b1"), print)


def test_an_sctp_port_is_not_routed() -> None:
    ports = [
        p
        for p in (
            ServicePort.from_spec(s)
            for s in [*PORTS, {"name": "s", "port": 9, "protocol": "SCTP", "targetPort": 9}]
        )
        if p is not None
    ]
    routed = routed_ports(ports, CONTAINER_PORTS)
    assert [r.spec for r in routed] == ["8080/TCP", "8080/UDP"]


async def test_a_member_heartbeat_cancelled_after_its_patch_landed_keeps_the_membership() -> None:
    kube: Any = FakeKube(echo())
    plan = await join(kube, plan_for(echo(), ME, "alpha", "a1"), print)
    member = plan.member.refreshed(datetime.now(UTC) - timedelta(seconds=5))
    annotations = kube.services["echo"]["metadata"]["annotations"]
    annotations[member.annotation] = member.to_json()
    keeper = MemberKeeper(kube, "default", "echo", member, print)
    landed = asyncio.Event()
    real_patch = kube.patch_service

    async def patch_then_hang(namespace: str, name: str, ops: list[Any]) -> Any:
        await real_patch(namespace, name, ops)
        landed.set()
        await asyncio.Event().wait()

    kube.patch_service = patch_then_hang
    refresh = asyncio.ensure_future(keeper.refresh())
    await asyncio.wait_for(landed.wait(), 2)
    refresh.cancel()  # a reconnect attempt that timed out
    await asyncio.gather(refresh, return_exceptions=True)
    kube.patch_service = real_patch
    await keeper.refresh()  # the next heartbeat
    assert not keeper.lost.is_set()


def test_a_service_left_selecting_a_router_is_not_meshed_again() -> None:
    svc = echo()
    svc["spec"]["selector"] = {"kvpn.dev/mesh-router": "echo"}  # kvpn.dev/mesh removed by hand
    with pytest.raises(UserError, match="selects a kvpn mesh router"):
        plan_for(svc, ME, "alpha", "a1")
