"""ShadowLink against a fake CoreV1Api: reconnect to a running pod with the pinned key,
recreate a deleted or terminating pod from the same plan and pin its new host key, and
leave --transport direct for the port-forward when the new pod has another IP."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest
from kubernetes.client.exceptions import ApiException

from kvpn import shadow_link
from kvpn.cluster.shadow_pod import ShadowPodPlan
from kvpn.shadow.agent import HOST_KEY_LOG_PREFIX
from kvpn.shadow_link import ShadowLink
from kvpn.tunnel.transport import DirectTransport, PortForwardTransport

CLIENT_KEY = asyncssh.generate_private_key("ssh-ed25519")
OLD_HOST_KEY = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
NEW_HOST_KEY = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
PLAN = ShadowPodPlan.new(
    "default", CLIENT_KEY.export_public_key().decode(), user="dev", session_id="abcd1234"
)


def _pod(ip: str, *, deleting: bool = False, running: bool = True) -> Any:
    state = SimpleNamespace(running=object() if running else None, waiting=None, terminated=None)
    return SimpleNamespace(
        metadata=SimpleNamespace(deletion_timestamp="now" if deleting else None),
        status=SimpleNamespace(
            phase="Running" if running else "Pending",
            reason=None,
            message=None,
            pod_ip=ip,
            conditions=[],
            container_statuses=[SimpleNamespace(name="shadow", state=state)],
        ),
    )


class FakeCore:
    def __init__(self, pods: list[Any | None]) -> None:
        self.pods = pods  # successive answers of read_namespaced_pod (None: 404)
        self.created: list[dict[str, Any]] = []
        self.deleted = 0
        self.log = f"{HOST_KEY_LOG_PREFIX} {NEW_HOST_KEY.export_public_key().decode().strip()}\n"

    def read_namespaced_pod(self, name: str, namespace: str, **_: Any) -> Any:
        pod = self.pods.pop(0) if len(self.pods) > 1 else self.pods[0]
        if pod is None:
            raise ApiException(status=404, reason="Not Found")
        return pod

    def read_namespaced_pod_log(self, name: str, namespace: str, **_: Any) -> str:
        return self.log

    def create_namespaced_pod(self, namespace: str, body: dict[str, Any]) -> None:
        self.created.append(body)

    def delete_namespaced_pod(self, name: str, namespace: str, **_: Any) -> None:
        self.deleted += 1


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    calls: list[tuple[Any, Any]] = []

    async def fake_connect(transport: Any, **kw: Any) -> str:
        calls.append((transport, kw["host_key"]))
        return "tunnel"

    monkeypatch.setattr(shadow_link.ShadowTunnel, "connect", fake_connect)
    return calls


def _link(core: FakeCore, transport: str = "portforward", peer: str | None = None) -> ShadowLink:
    lines: list[str] = []
    link = ShadowLink(
        core,
        SimpleNamespace(host="http://api"),
        PLAN,
        client_key=CLIENT_KEY,
        host_key=OLD_HOST_KEY,
        transport=transport,
        direct_peer=peer,
        out=lines.append,
    )
    link.lines = lines  # type: ignore[attr-defined]
    return link


async def test_running_pod_keeps_the_pinned_key(connects: list[tuple[Any, Any]]) -> None:
    core = FakeCore([_pod("10.244.0.9")])
    link = _link(core, "direct", "10.244.0.9")
    assert await link.connect() == "tunnel"
    ((transport, host_key),) = connects
    assert isinstance(transport, DirectTransport) and transport.host == "10.244.0.9"
    assert host_key is OLD_HOST_KEY
    assert core.created == [] and link.pods_recreated == 0


async def test_deleted_pod_is_recreated_from_the_same_plan(
    connects: list[tuple[Any, Any]],
) -> None:
    core = FakeCore([None, _pod("10.244.0.20")])
    link = _link(core, "direct", "10.244.0.9")
    await link.connect()
    assert core.created == [PLAN.manifest()]  # same name, labels and authorized key
    ((transport, host_key),) = connects
    assert host_key == NEW_HOST_KEY
    assert isinstance(transport, PortForwardTransport)  # the new IP is inside the routes
    assert link.pods_recreated == 1
    assert link.transport_name.startswith("portforward")
    assert any("port-forward" in line for line in link.lines)  # type: ignore[attr-defined]


async def test_terminating_pod_is_waited_for_then_recreated(
    connects: list[tuple[Any, Any]],
) -> None:
    deleting = _pod("10.244.0.9", deleting=True)
    core = FakeCore([deleting, deleting, None, _pod("10.244.0.21")])
    link = _link(core)
    await link.connect()
    assert core.deleted == 0  # already being deleted: not deleted again
    assert len(core.created) == 1
    assert isinstance(connects[0][0], PortForwardTransport)


async def test_a_pod_created_by_a_failed_attempt_is_waited_for(
    connects: list[tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    core = FakeCore([None, _pod("10.244.0.30")])
    link = _link(core)

    async def failing(transport: Any, **kw: Any) -> str:
        raise OSError("agent not listening yet")

    monkeypatch.setattr(shadow_link.ShadowTunnel, "connect", failing)
    with pytest.raises(OSError):
        await link.connect()
    # the next attempt finds the pod running; its new host key is already pinned
    monkeypatch.setattr(
        shadow_link.ShadowTunnel, "connect", lambda t, **kw: _record(connects, t, kw)
    )
    await link.connect()
    assert len(core.created) == 1
    assert connects[-1][1] == NEW_HOST_KEY


async def _record(calls: list[tuple[Any, Any]], transport: Any, kw: dict[str, Any]) -> str:
    calls.append((transport, kw["host_key"]))
    return "tunnel"
