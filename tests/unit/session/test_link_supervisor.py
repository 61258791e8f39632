"""LinkSupervisor with a fake tunnel and data plane: loss -> attempts with backoff ->
replace_tunnel, degraded when the relay cannot be reopened, status published throughout."""

from __future__ import annotations

import asyncio
from typing import Any

from kvpn.link_state import Backoff, LinkState
from kvpn.link_supervisor import LinkConfig, LinkSupervisor, keepalives_unanswered

FAST = LinkConfig(tick=0.02, backoff=Backoff(initial=0.01, cap=0.04), attempt_timeout=1.0)


class FakeTunnel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = asyncio.Event()
        self.close_calls = 0

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.close_calls += 1
        self.closed.set()


class FakePlane:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.datagrams_ok = True
        self.reopen_fails = False

    def tunnel_lost(self) -> None:
        self.events.append("lost")
        self.datagrams_ok = False

    async def replace_tunnel(self, tunnel: Any) -> None:
        self.events.append(f"replace {tunnel.name}")
        await self.reopen_datagrams()

    async def reopen_datagrams(self) -> None:
        if self.reopen_fails:
            raise OSError("the agent refused the datagram relay")
        self.datagrams_ok = True


async def _until(predicate: Any, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_reconnects_after_failures_and_swaps_the_tunnel() -> None:
    plane = FakePlane()
    first = FakeTunnel("first")
    results: list[Any] = [OSError("pod not ready"), OSError("pod not ready"), FakeTunnel("second")]

    async def reconnect() -> Any:
        result = results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result

    lines: list[str] = []
    published: list[LinkState] = []
    supervisor: LinkSupervisor

    def publish() -> None:
        published.append(supervisor.snapshot().state)

    supervisor = LinkSupervisor(
        plane, first, reconnect, out=lines.append, publish=publish, config=FAST
    )
    stop = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop))
    await asyncio.sleep(0.05)
    assert supervisor.snapshot().state is LinkState.CONNECTED

    first.closed.set()  # the transport died
    await _until(lambda: plane.events[-1:] == ["replace second"])
    assert plane.events == ["lost", "replace second"]
    assert supervisor.tunnel.name == "second"  # type: ignore[attr-defined]
    snapshot = supervisor.snapshot()
    assert snapshot.state is LinkState.CONNECTED and snapshot.reconnects == 1
    assert lines[0] == "reconnecting: the SSH connection to the shadow pod closed"
    assert lines[1].startswith("kvpn: reconnect attempt 1 failed: pod not ready; next in")
    assert lines[2].startswith("kvpn: reconnect attempt 2 failed: pod not ready")
    assert lines[3].startswith("reconnected after ")
    assert LinkState.RECONNECTING in published and published[-1] is LinkState.CONNECTED
    assert first.close_calls == 1  # the dead tunnel was closed

    stop.set()
    await asyncio.wait_for(task, 1)
    assert supervisor.snapshot().state is LinkState.STOPPED
    await supervisor.close_tunnel()
    assert supervisor.tunnel.close_calls == 1  # type: ignore[attr-defined]


async def test_relay_that_cannot_reopen_means_degraded_then_healthy() -> None:
    plane = FakePlane()
    plane.reopen_fails = True
    first = FakeTunnel("first")

    async def reconnect() -> Any:
        return FakeTunnel("second")

    lines: list[str] = []
    supervisor = LinkSupervisor(plane, first, reconnect, out=lines.append, config=FAST)
    stop = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop))
    first.closed.set()
    await _until(lambda: supervisor.snapshot().state is LinkState.DEGRADED)
    assert "UDP and ping relay unavailable" in supervisor.snapshot().reason
    assert lines[-1].startswith("reconnected after ") and "degraded" in lines[-1]
    plane.reopen_fails = False  # the health check tries again every tick
    await _until(lambda: supervisor.snapshot().state is LinkState.CONNECTED)
    assert lines[-1] == "connected again"
    stop.set()
    await asyncio.wait_for(task, 1)


async def test_stop_during_an_attempt_cancels_it() -> None:
    plane = FakePlane()
    first = FakeTunnel("first")
    started = asyncio.Event()

    async def reconnect() -> Any:
        started.set()
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    supervisor = LinkSupervisor(plane, first, reconnect, out=lambda line: None, config=FAST)
    stop = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop))
    first.closed.set()
    await asyncio.wait_for(started.wait(), 1)
    stop.set()
    await asyncio.wait_for(task, 1)
    assert supervisor.snapshot().state is LinkState.STOPPED


def test_keepalives_unanswered_is_best_effort() -> None:
    class Conn:
        _keepalive_count = 2

    class Tunnel:
        connection = Conn()

    assert keepalives_unanswered(Tunnel()) == 2
    assert keepalives_unanswered(object()) == 0
