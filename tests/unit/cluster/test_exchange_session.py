"""The exchange session's decisions against an in-memory API: target lookup, refusals,
plans, the lock keeper's heartbeat, and the local port check."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest

from kvpn.cli.errors import UserError
from kvpn.cluster.exchange_plan import EXCHANGE_LABEL, ExchangeMode
from kvpn.cluster.intercept_api import InterceptApiError, PatchRejected
from kvpn.cluster.locks import LOCK_ANNOTATION, Identity, Lock
from kvpn.cluster.service_ports import PortForward, parse_expose
from kvpn.exchange_session import ExchangeTarget, find_target, plan_exchange, refuse_if_held
from kvpn.intercept_session import (
    InterceptOptions,
    LockKeeper,
    LockLost,
    StoppedWhileStarting,
    check_local_ports,
    local_port_listening,
    until_stopped,
)
from tests.unit.tunnel.helpers import closed_port, echo_server

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
ME = Identity("alice", "laptop")
BOB = Identity("bob", "desk")


def service(
    name: str, selector: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "resourceVersion": "1",
            "annotations": annotations or {},
        },
        "spec": {"selector": selector, "ports": [{"port": 80, "targetPort": 8080}]},
    }


def deployment(name: str, labels: dict[str, str], replicas: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"labels": labels}, "spec": {"containers": []}},
        },
    }


class FakeKube:
    def __init__(self, services: list[dict[str, Any]], deployments: list[dict[str, Any]]) -> None:
        self.services = {s["metadata"]["name"]: s for s in services}
        self.deployments = deployments
        self.patches: list[list[dict[str, Any]]] = []

    async def list_deployments(self, namespace: str | None) -> list[dict[str, Any]]:
        return copy.deepcopy(self.deployments)

    async def list_services(self, namespace: str | None) -> list[dict[str, Any]]:
        return copy.deepcopy(list(self.services.values()))

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.services.get(name))

    async def patch_service(
        self, namespace: str, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self.patches.append(ops)
        try:
            self.services[name] = jsonpatch.apply_patch(self.services[name], ops)
        except jsonpatch.JsonPatchTestFailed:
            raise PatchRejected("422 test failed") from None
        return self.services[name]


ECHO = service("echo", {"app": "echo"})
ECHO_DEPLOYMENT = deployment("echo", {"app": "echo", "pod-template-hash": "h"})


async def test_find_target_by_service_and_by_deployment() -> None:
    kube: Any = FakeKube([ECHO, service("other", {"app": "other"})], [ECHO_DEPLOYMENT])
    by_service = await find_target(kube, "default", "echo", ExchangeMode.SELECTOR)
    by_deployment = await find_target(kube, "default", "deployment/echo", ExchangeMode.SCALE)
    for target in (by_service, by_deployment):
        assert target.name == "echo"
        assert target.deployment is not None and target.deployment["metadata"]["name"] == "echo"
    assert (await find_target(kube, "default", "svc/echo", ExchangeMode.SELECTOR)).name == "echo"


@pytest.mark.parametrize(
    ("services", "deployments", "target", "mode", "message"),
    [
        ([], [], "echo", ExchangeMode.SELECTOR, "service default/echo not found"),
        ([service("echo", {})], [], "echo", ExchangeMode.SELECTOR, "has no selector"),
        ([ECHO], [], "echo", ExchangeMode.SCALE, r"exactly one deployment .*found: none"),
        ([ECHO], [], "deployment/echo", ExchangeMode.SCALE, "deployment default/echo not found"),
        ([], [ECHO_DEPLOYMENT], "deploy/echo", ExchangeMode.SELECTOR, "no service in default"),
        (
            [ECHO, service("echo2", {"app": "echo"})],
            [ECHO_DEPLOYMENT],
            "deployment/echo",
            ExchangeMode.SELECTOR,
            "several services",
        ),
        ([ECHO], [], "pods/echo", ExchangeMode.SELECTOR, "name a service"),
    ],
)
async def test_find_target_errors(
    services: list[Any], deployments: list[Any], target: str, mode: ExchangeMode, message: str
) -> None:
    kube: Any = FakeKube(services, deployments)
    with pytest.raises(UserError, match=message):
        await find_target(kube, "default", target, mode)


def test_refusals_name_the_holder_or_the_way_out() -> None:
    now = datetime.now(UTC)
    live = Lock.new("exchange", mode="scale", identity=BOB, session="b1", now=now)
    with pytest.raises(UserError, match=r"already taken: exchange \(scale\) by bob@desk.*since"):
        refuse_if_held(service("echo", {}, {LOCK_ANNOTATION: live.to_json()}), ME)
    dead = Lock.new(
        "exchange", mode="selector", identity=ME, session="a1", now=now - timedelta(minutes=5)
    )
    with pytest.raises(UserError, match="dead kvpn session.*kvpn clean"):
        refuse_if_held(service("echo", {}, {LOCK_ANNOTATION: dead.to_json()}), ME)
    with pytest.raises(UserError, match="kvpn recover echo"):
        refuse_if_held(service("echo", {}, {"kvpn.dev/original-selector": '{"a":"b"}'}), ME)
    refuse_if_held(service("echo", {}, {"unrelated": "x"}), ME)  # free: no error


def test_plan_exchange_scale_mode_copies_workload_labels_once_serving() -> None:
    target = ExchangeTarget(ECHO, ECHO_DEPLOYMENT)
    plan = plan_exchange(
        target,
        (PortForward(8080, 2222),),
        namespace="default",
        mode=ExchangeMode.SCALE,
        me=ME,
        key_text=KEY,
        options=InterceptOptions(heartbeat_seconds=2),
        session="s1",
    )
    created = plan.pod.manifest()["metadata"]["labels"]
    assert created[EXCHANGE_LABEL] == "s1"
    assert "app" not in created  # not selected before the agent listens
    serving = plan.pod.serving_patch()["metadata"]["labels"]
    assert serving == {"app": "echo"}  # no pod-template-hash, or the ReplicaSet adopts it
    assert plan.scale is not None and plan.scale.original_replicas == 2
    assert plan.selector is None
    assert plan.pod.shadow.port == 2223  # 2222 is a target port: the agent moves aside
    assert plan.lock.ttl == 6
    assert any("once it serves, label it app=echo" in line for line in plan.describe())
    selector_plan = plan_exchange(
        target,
        (),
        namespace="default",
        mode=ExchangeMode.SELECTOR,
        me=ME,
        key_text=KEY,
        options=InterceptOptions(),
        session="s1",
    )
    assert selector_plan.selector is not None
    assert dict(selector_plan.selector.replacement) == {EXCHANGE_LABEL: "s1"}
    assert selector_plan.pod.serving_labels == ()


def test_scale_mode_refuses_a_selector_on_kvpns_own_labels() -> None:
    labels = {"app": "x", "app.kubernetes.io/managed-by": "Helm"}
    target = ExchangeTarget(service("x", labels), deployment("x", labels))
    with pytest.raises(UserError, match="uses a label kvpn sets"):
        plan_exchange(
            target,
            (),
            namespace="default",
            mode=ExchangeMode.SCALE,
            me=ME,
            key_text=KEY,
            options=InterceptOptions(),
        )


async def test_until_stopped() -> None:
    stop = asyncio.Event()
    assert await until_stopped(asyncio.sleep(0, result=7), stop) == 7
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    asyncio.get_running_loop().call_later(0.01, stop.set)
    with pytest.raises(StoppedWhileStarting):
        await until_stopped(forever(), stop)
    assert cancelled.is_set()


async def test_lock_keeper_refreshes_and_notices_a_takeover() -> None:
    now = datetime.now(UTC) - timedelta(seconds=5)
    lock = Lock.new("exchange", mode="selector", identity=ME, session="s1", now=now)
    kube: Any = FakeKube([service("echo", {"app": "echo"}, {LOCK_ANNOTATION: lock.to_json()})], [])
    lines: list[str] = []
    keeper = LockKeeper(kube, "default", "echo", lock, lines.append)
    await keeper.refresh()
    assert keeper.lock.heartbeat > lock.heartbeat
    assert (
        kube.services["echo"]["metadata"]["annotations"][LOCK_ANNOTATION] == keeper.lock.to_json()
    )
    # Someone recovers the service and takes it: the next write fails and marks the lock lost.
    kube.services["echo"]["metadata"]["annotations"][LOCK_ANNOTATION] = "someone else"
    keeper.start(0.01)
    await asyncio.wait_for(keeper.lost.wait(), 5)
    assert any("no longer locked by this session" in line for line in lines)
    with pytest.raises(LockLost):
        await keeper.patch(lambda held: [])
    await keeper.release()  # a lost lock is not released (it is not ours)
    assert kube.services["echo"]["metadata"]["annotations"][LOCK_ANNOTATION] == "someone else"


async def test_lock_keeper_release() -> None:
    lock = Lock.new("exchange", mode="selector", identity=ME, session="s1", now=datetime.now(UTC))
    kube: Any = FakeKube([service("echo", {"app": "echo"}, {LOCK_ANNOTATION: lock.to_json()})], [])
    keeper = LockKeeper(kube, "default", "echo", lock, print)
    keeper.start(10)
    await keeper.release()
    assert LOCK_ANNOTATION not in kube.services["echo"]["metadata"]["annotations"]


async def test_local_port_check() -> None:
    async with echo_server() as port:
        assert await local_port_listening(port)
        await check_local_ports(parse_expose(str(port)), InterceptOptions())
    closed = closed_port()
    assert not await local_port_listening(closed)
    with pytest.raises(UserError, match=f"nothing listens on localhost:{closed}"):
        await check_local_ports(parse_expose(str(closed)), InterceptOptions())
    # --skip-port-check: no probe at all.
    await check_local_ports(parse_expose(str(closed)), InterceptOptions(skip_port_check=True))


class NoDeploymentsKube(FakeKube):
    async def list_deployments(self, namespace: str | None) -> list[dict[str, Any]]:
        raise InterceptApiError("list deployments in default: 403 Forbidden")


async def test_selector_mode_works_without_permission_to_list_deployments() -> None:
    kube: Any = NoDeploymentsKube([ECHO], [])
    target = await find_target(kube, "default", "echo", ExchangeMode.SELECTOR)
    assert target.deployment is None
    with pytest.raises(InterceptApiError, match="403"):
        await find_target(kube, "default", "echo", ExchangeMode.SCALE)
