"""Root test: swapping the tunnel under a running DataPlane (what reconnect does).

While the tunnel is down the TUN and routes stay; relayed flows are reset (never left
hanging), datagrams are dropped and counted, a new connection is held up to the dial timeout
and either goes through the new tunnel or gets "no route to host"."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from ipaddress import IPv4Address
from typing import Any

from kvpn.dataplane import DataPlane, DataPlaneConfig

from .fake_tunnel import FakeTunnel
from .netns import requires_root, run_in
from .test_dataplane_netns import AGENT, CIDR, SERVER, Servers, Topology, make_topology

pytestmark = requires_root

DIAL_TIMEOUT = 2.0


async def _udp_roundtrip(payload: bytes, timeout: float) -> bytes | None:
    loop = asyncio.get_running_loop()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    try:
        await loop.sock_connect(udp, (SERVER, 7))
        await loop.sock_sendall(udp, payload)
        return await asyncio.wait_for(loop.sock_recv(udp, 100), timeout)
    except TimeoutError:
        return None
    finally:
        udp.close()


async def _scenario(topo: Topology) -> dict[str, Any]:
    results: dict[str, Any] = {}
    servers = Servers(topo.cluster)
    await servers.start()
    first, second = FakeTunnel(topo.cluster), FakeTunnel(topo.cluster)
    plane = DataPlane(
        first,
        DataPlaneConfig(
            routes=(CIDR,),
            tun_name="kvpnt1",
            dial_timeout=DIAL_TIMEOUT,
            protected_addresses=(IPv4Address(AGENT),),
        ),
    )
    await plane.start()
    try:
        async with asyncio.timeout(60):
            assert await _udp_roundtrip(b"before", 5) == b"echo:before"

            # an open flow when the tunnel dies: the app sees a reset
            reader, writer = await asyncio.open_connection(SERVER, 8081)
            writer.write(b"some data")
            await writer.drain()
            await asyncio.sleep(0.2)
            plane.tunnel_lost()
            assert not plane.tunnel_is_up and not plane.datagrams_ok
            try:
                results["open_flow"] = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                results["open_flow"] = "reset"
            writer.close()

            # datagrams while down: dropped and counted
            results["udp_while_down"] = await _udp_roundtrip(b"lost", 1)

            # a connection while down and nothing comes back: "no route to host" at the
            # dial timeout, not a hang
            started = time.monotonic()
            try:
                await asyncio.open_connection(SERVER, 8080)
                results["down_connect"] = "connected"
            except OSError as exc:
                results["down_connect"] = exc.errno
            results["down_connect_s"] = time.monotonic() - started

            # a connection while down, and the tunnel is back within the dial timeout
            async def get() -> bytes:
                r, w = await asyncio.open_connection(SERVER, 8080)
                w.write(b"GET /10 HTTP/1.0\r\n\r\n")
                data = await r.read()
                w.close()
                return data

            held = asyncio.ensure_future(get())
            await asyncio.sleep(0.5)
            assert not held.done()
            await plane.replace_tunnel(second)
            results["held_response"] = await asyncio.wait_for(held, 5)
            results["udp_after"] = await _udp_roundtrip(b"after", 5)
            results["first_dials"] = list(first.dials)
            results["second_dials"] = list(second.dials)
            results["second_relays"] = len(second.relays)
            results["counters"] = plane.counters
    finally:
        await plane.stop()
        await servers.close()
    return results


def test_tunnel_swap_keeps_the_data_plane() -> None:
    with make_topology() as topo:
        results = run_in(topo.laptop, lambda: asyncio.run(_scenario(topo)), timeout=90)
    assert results["open_flow"] in ("reset", b"")
    assert results["udp_while_down"] is None
    assert results["down_connect"] == errno.EHOSTUNREACH
    assert DIAL_TIMEOUT - 0.5 < results["down_connect_s"] < DIAL_TIMEOUT + 2
    assert results["held_response"].startswith(b"HTTP/1.0 200")
    assert results["udp_after"] == b"echo:after"
    assert (SERVER, 8080) not in results["first_dials"]
    assert (SERVER, 8080) in results["second_dials"] and results["second_relays"] == 1
    counters = results["counters"]
    assert counters["tunnel_losses"] == 1
    assert counters["tcp_resets_on_tunnel_loss"] == 1
    assert counters["dials_held"] >= 2
    assert counters["datagrams_dropped_tunnel_down"] >= 1


def test_reopen_datagrams_before_start_does_nothing() -> None:
    plane = DataPlane(FakeTunnel("unused"), DataPlaneConfig(routes=(CIDR,)))
    asyncio.run(plane.reopen_datagrams())  # not started: nothing to do, no error
    assert plane.tunnel_is_up
