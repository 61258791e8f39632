"""The reconnect of ``kvpn exchange``/``preview``/``mesh``: ShadowLink recreating their pod from
its own manifest and serving each new tunnel, supervise() keeping the link (refreshing the
lock first, ending on a lost lock), their status files, and the LockKeeper's refresh race."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest

from kvpn import shadow_link
from kvpn.cli.status_command import run_status
from kvpn.cluster.exchange_plan import EXCHANGE_LABEL, InterceptPodPlan
from kvpn.cluster.locks import LOCK_ANNOTATION, Identity, Lock
from kvpn.cluster.service_ports import PortForward
from kvpn.cluster.shadow_pod import ShadowPodPlan
from kvpn.intercept_session import (
    InterceptLink,
    LockKeeper,
    LockLost,
    SessionFacts,
    intercept_manifest,
    supervise,
)
from kvpn.link_state import Backoff, LinkState
from kvpn.link_supervisor import LinkConfig, LinkSupervisor, NoDataPlane
from kvpn.session_status import list_sessions, render_json, render_text, status_path
from kvpn.tunnel.errors import TunnelError
from kvpn.undo_stack import UndoStack
from tests.unit.cluster.test_exchange_session import FakeKube, service
from tests.unit.session.test_link_supervisor import FakeTunnel, _until
from tests.unit.session.test_shadow_link import NEW_HOST_KEY, FakeCore, _pod

FAST = LinkConfig(tick=0.02, backoff=Backoff(initial=0.01, cap=0.04), attempt_timeout=1.0)
CLIENT_KEY = asyncssh.generate_private_key("ssh-ed25519")
HOST_KEY = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
SHADOW = ShadowPodPlan.new(
    "default", CLIENT_KEY.export_public_key().decode(), user="dev", session_id="s1"
)
POD = InterceptPodPlan(
    SHADOW,
    "exchange",
    "echo",
    "laptop",
    ((EXCHANGE_LABEL, "s1"),),
    (PortForward(8080, 80), PortForward(9090, 9090)),
    (("app", "echo"),),
)
ME = Identity("alice", "laptop")


class ForwardingConnection:
    def __init__(self, refuse: int | None = None) -> None:
        self.forwards: list[tuple[str, int, str, int]] = []
        self.refuse = refuse

    async def forward_remote_port(
        self, host: str, port: int, dest_host: str, dest_port: int
    ) -> None:
        if port == self.refuse:
            raise asyncssh.ChannelListenError("address already in use")
        self.forwards.append((host, port, dest_host, dest_port))


class ServedTunnel(FakeTunnel):
    def __init__(self, name: str, refuse: int | None = None) -> None:
        super().__init__(name)
        self.connection = ForwardingConnection(refuse)


class PodKube:
    def __init__(self, core: Any) -> None:
        self.core = core
        self.pod_patches: list[dict[str, Any]] = []

    async def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.pod_patches.append(patch)


def _link(core: Any, kube: Any | None = None) -> InterceptLink:
    kube = kube or PodKube(core)
    return InterceptLink(
        kube, SimpleNamespace(host="http://api"), POD, CLIENT_KEY, HOST_KEY, print, FAST
    )


# -- ShadowLink with a manifest and after_connect ------------------------------------------


async def test_deleted_intercept_pod_is_recreated_and_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tunnel = ServedTunnel("second")

    async def fake_connect(transport: Any, **kw: Any) -> ServedTunnel:
        assert kw["host_key"] == NEW_HOST_KEY  # the recreated pod's key is pinned
        return tunnel

    monkeypatch.setattr(shadow_link.ShadowTunnel, "connect", fake_connect)
    core = FakeCore([None, _pod("10.244.0.40")])
    kube = PodKube(core)
    link = _link(core, kube)
    assert await link.link.connect() is tunnel
    assert core.created == [intercept_manifest(POD)]  # same labels: the Service selects it
    (env,) = [c["env"] for c in core.created[0]["spec"]["containers"]]
    assert {"name": "KVPN_KEEPALIVE_INTERVAL", "value": "5"} in env
    assert link.link.pods_recreated == 1
    assert tunnel.connection.forwards == [
        ("0.0.0.0", 80, "localhost", 8080),
        ("0.0.0.0", 9090, "localhost", 9090),
    ]
    assert kube.pod_patches == [POD.serving_patch()]  # after listening on every port


async def test_a_port_still_held_fails_the_attempt_and_closes_the_tunnel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tunnel = ServedTunnel("second", refuse=9090)

    async def fake_connect(transport: Any, **kw: Any) -> ServedTunnel:
        return tunnel

    monkeypatch.setattr(shadow_link.ShadowTunnel, "connect", fake_connect)
    kube = PodKube(FakeCore([_pod("10.244.0.9")]))
    link = _link(kube.core, kube)
    with pytest.raises(TunnelError, match="cannot listen on port 9090"):
        await link.link.connect()
    assert tunnel.close_calls == 1
    assert kube.pod_patches == []  # not labelled as serving


# -- the supervisor without a data plane -----------------------------------------------------


async def test_supervisor_with_no_data_plane_swaps_tunnels() -> None:
    first, second = FakeTunnel("first"), FakeTunnel("second")

    async def reconnect() -> Any:
        return second

    lines: list[str] = []
    supervisor = LinkSupervisor(NoDataPlane(), first, reconnect, out=lines.append, config=FAST)
    stop = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop))
    first.closed.set()
    await _until(lambda: supervisor.tunnel is second)
    await _until(lambda: supervisor.snapshot().state is LinkState.CONNECTED)
    assert lines[0].startswith("reconnecting: ") and lines[-1].startswith("reconnected after ")
    stop.set()
    await asyncio.wait_for(task, 1)


# -- supervise(): keeper, status files, end ----------------------------------------------------


class FakeKeeper:
    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.refreshes = 0
        self.take_over = False

    async def refresh(self) -> None:
        self.refreshes += 1
        if self.take_over:
            self.lost.set()
            raise LockLost("service default/echo is no longer locked by this session")


FACTS = SessionFacts(
    "exchange", "s1", "default", "echo", mode="selector", ports=("80 -> localhost:8080",)
)


def _supervised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[InterceptLink, Any]:
    link = _link(FakeCore([_pod("10.244.0.9")]))
    link.first = FakeTunnel("first")  # type: ignore[assignment]
    tunnels = [FakeTunnel("second")]

    async def connect() -> Any:
        return tunnels.pop(0)

    monkeypatch.setattr(link.link, "connect", connect)
    return link, tmp_path / "state"


async def test_supervise_reconnects_refreshing_the_lock_and_writes_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link, state = _supervised(tmp_path, monkeypatch)
    facts = replace(FACTS, state_dir=state)
    keeper, undo, stop, lines = FakeKeeper(), UndoStack(), asyncio.Event(), list[str]()
    task = asyncio.ensure_future(
        supervise(link, keeper, stop, lines.append, undo=undo, facts=facts)
    )
    sessions = state / "sessions"
    await _until(lambda: status_path(sessions, "s1").exists())
    assert stat.S_IMODE(sessions.stat().st_mode) == 0o700
    assert stat.S_IMODE(status_path(sessions, "s1").stat().st_mode) == 0o600
    link.first.closed.set()  # type: ignore[union-attr]
    await _until(lambda: link.supervisor is not None and link.supervisor.snapshot().reconnects)
    assert keeper.refreshes == 1  # the lock was refreshed before the new tunnel

    await _until(lambda: json.loads(status_path(sessions, "s1").read_text())["reconnects"] == 1)
    (view,) = list_sessions(sessions, now=datetime.now(UTC).timestamp(), alive=lambda p, s: True)
    data = json.loads(render_json([view]))["sessions"][0]
    assert data["state"] == "connected" and data["kind"] == "exchange"
    assert data["service"] == "default/echo" and data["mode"] == "selector"
    assert data["shadow_pod"] == "default/kvpn-shadow-s1" and data["transport"] == "portforward"
    assert data["ports"] == ["80 -> localhost:8080"] and data["routes"] == []
    text = render_text([view])
    assert "exchange     service default/echo (selector)" in text
    assert "routes" not in text and "dns" not in text

    stop.set()
    assert await asyncio.wait_for(task, 2) == 0
    assert await undo.run() == []
    assert list(sessions.iterdir()) == []  # the undo removed both files


async def test_supervise_ends_when_a_reconnect_finds_the_lock_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link, state = _supervised(tmp_path, monkeypatch)
    facts = replace(FACTS, state_dir=state)
    keeper, lines = FakeKeeper(), list[str]()
    keeper.take_over = True  # somebody recovered the Service while we were stopped
    task = asyncio.ensure_future(
        supervise(link, keeper, asyncio.Event(), lines.append, undo=UndoStack(), facts=facts)
    )
    await asyncio.sleep(0.05)
    link.first.closed.set()  # type: ignore[union-attr]
    assert await asyncio.wait_for(task, 2) == 1
    assert lines[-1] == "the lock was lost; restoring"
    assert keeper.refreshes == 1  # ...and no pod was dialled (or recreated) for it


async def test_status_lists_connect_and_user_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    link, state = _supervised(tmp_path, monkeypatch)
    facts = replace(FACTS, state_dir=state)
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        supervise(link, FakeKeeper(), stop, print, undo=UndoStack(), facts=facts)
    )
    await _until(lambda: status_path(state / "sessions", "s1").exists())
    root = tmp_path / "root"
    assert run_status(output="json", state_dir=root, user_dir=state) == 0
    (only,) = json.loads(capsys.readouterr().out)["sessions"]
    assert only["session"] == "s1" and only["state"] == "connected"
    stop.set()
    await asyncio.wait_for(task, 2)


# -- LockKeeper: a heartbeat and a reconnect refreshing at once ------------------------------


async def test_concurrent_refreshes_keep_the_lock() -> None:
    lock = Lock.new("exchange", mode="selector", identity=ME, session="s1", now=datetime.now(UTC))
    kube: Any = FakeKube([service("echo", {"app": "echo"}, {LOCK_ANNOTATION: lock.to_json()})], [])
    keeper = LockKeeper(kube, "default", "echo", lock, print)
    await asyncio.gather(keeper.refresh(), keeper.refresh(), keeper.refresh())
    assert not keeper.lost.is_set()
    annotations = kube.services["echo"]["metadata"]["annotations"]
    assert annotations[LOCK_ANNOTATION] == keeper.lock.to_json()


async def test_status_without_root_lists_the_users_sessions_and_says_what_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    link, state = _supervised(tmp_path, monkeypatch)
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        supervise(
            link, FakeKeeper(), stop, print, undo=UndoStack(), facts=replace(FACTS, state_dir=state)
        )
    )
    await _until(lambda: status_path(state / "sessions", "s1").exists())
    root = tmp_path / "root"
    (root / "sessions").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != root / "sessions" and real_access(path, mode)
    )
    capsys.readouterr()
    assert run_status(output="text", state_dir=root, user_dir=state) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("session s1: connected")
    assert f"cannot read {root / 'sessions'}" in printed.err
    stop.set()
    await asyncio.wait_for(task, 2)


async def test_a_heartbeat_cancelled_after_its_patch_landed_does_not_lose_the_lock() -> None:
    earlier = datetime.now(UTC) - timedelta(seconds=5)  # so the refresh changes the value
    lock = Lock.new("exchange", mode="selector", identity=ME, session="s1", now=earlier)
    kube: Any = FakeKube([service("echo", {"app": "echo"}, {LOCK_ANNOTATION: lock.to_json()})], [])
    landed = asyncio.Event()
    real_patch = kube.patch_service

    async def patch_then_hang(namespace: str, name: str, ops: list[Any]) -> Any:
        await real_patch(namespace, name, ops)  # the API server applied it...
        landed.set()
        await asyncio.Event().wait()  # ...but the answer never comes before the cancel

    kube.patch_service = patch_then_hang
    keeper = LockKeeper(kube, "default", "echo", lock, print)
    refresh = asyncio.ensure_future(keeper.refresh())
    await asyncio.wait_for(landed.wait(), 2)
    refresh.cancel()  # stop(), or a reconnect attempt cancelled by Ctrl-C
    await asyncio.gather(refresh, return_exceptions=True)
    kube.patch_service = real_patch
    await keeper.release()  # tests the lock value on the server, not the one before
    assert not keeper.lost.is_set()
    assert LOCK_ANNOTATION not in kube.services["echo"]["metadata"]["annotations"]


async def test_the_heartbeat_survives_an_unreachable_api_server() -> None:
    import urllib3.exceptions

    lock = Lock.new("exchange", mode="selector", identity=ME, session="s1", now=datetime.now(UTC))
    kube: Any = FakeKube([service("echo", {"app": "echo"}, {LOCK_ANNOTATION: lock.to_json()})], [])
    real_patch = kube.patch_service
    calls = 0

    async def flaky(namespace: str, name: str, ops: list[Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # what the kubernetes client raises when nothing answers
            raise urllib3.exceptions.MaxRetryError(None, "/", "Connection refused")  # type: ignore[arg-type]
        return await real_patch(namespace, name, ops)

    kube.patch_service = flaky
    lines: list[str] = []
    keeper = LockKeeper(kube, "default", "echo", lock, lines.append)
    keeper.start(0.01)
    await _until(lambda: calls >= 3)
    await keeper.stop()
    assert not keeper.lost.is_set()
    assert any("heartbeat failed" in line for line in lines)
