"""The mesh router on loopback: connections that leave HTTP/1.1 after one routed request
(WebSocket, ``Upgrade: h2c``, ``CONNECT``) and HTTP/2 prior knowledge (h2c, routed by the
first HEADERS frame). The backends and the router come from :mod:`test_mesh_router`."""

from __future__ import annotations

import asyncio

import aiohttp
import h2.config
import h2.connection
import h2.events
import h11

from tests.unit.shadow.test_mesh_router import (
    ROUTER_IP,
    STEP,
    World,
    h11_request,
    read_response,
    world_fixture,  # noqa: F401  (the "world" fixture)
)


async def test_websocket_upgrade_is_spliced_both_ways(world: World) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"http://{ROUTER_IP}:{world.http}/ws", headers={"version": "bob"}
        ) as ws:
            assert await ws.receive_str(timeout=STEP) == "hello from bob"
            for text in ("one", "two" * 10000):
                await ws.send_str(text)
                assert await ws.receive_str(timeout=STEP) == f"bob:{text}"
        async with session.ws_connect(f"http://{ROUTER_IP}:{world.http}/ws") as ws:
            assert await ws.receive_str(timeout=STEP) == "hello from standin"
    assert world.router.stats.upgrades == 2


async def test_h2c_upgrade_refused_by_backend_keeps_http1(world: World) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.http)
    conn = h11.Connection(h11.CLIENT)
    upgrade = h11.Request(
        method="GET",
        target="/who",
        headers=[
            ("Host", "echo"),
            ("Version", "alice"),
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    writer.write(conn.send(upgrade) + conn.send(h11.EndOfMessage()))
    response, body = await read_response(conn, reader)
    assert (response.status_code, body) == (200, b"alice")
    conn.start_next_cycle()
    writer.write(conn.send(h11_request("/who", None)) + conn.send(h11.EndOfMessage()))
    _, body = await read_response(conn, reader)
    writer.close()
    assert body == b"standin"


async def h2c_upgrade(port: int, mark: str | None) -> str:
    """GET with ``Upgrade: h2c``; the answer to the upgraded request (stream 1)."""
    reader, writer = await asyncio.open_connection(ROUTER_IP, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    assert settings is not None
    http1 = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", "echo"),
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", settings.decode()),
    ]
    if mark is not None:
        headers.append(("Version", mark))
    request = h11.Request(method="GET", target="/", headers=headers)
    writer.write((http1.send(request) or b"") + (http1.send(h11.EndOfMessage()) or b""))
    while True:
        event = http1.next_event()
        if event is h11.NEED_DATA:
            http1.receive_data(await asyncio.wait_for(reader.read(65536), STEP))
        elif isinstance(event, h11.InformationalResponse):
            assert event.status_code == 101
            break
    writer.write(conn.data_to_send())
    data, body = http1.trailing_data[0], b""
    while True:
        ended = False
        for h2_event in conn.receive_data(data):
            if isinstance(h2_event, h2.events.DataReceived):
                body += h2_event.data
            ended = ended or isinstance(h2_event, h2.events.StreamEnded)
        writer.write(conn.data_to_send())
        if ended:
            break
        data = await asyncio.wait_for(reader.read(65536), STEP)
        assert data, "connection closed before the upgraded response"
    writer.close()
    return body.decode()


async def test_h2c_upgrade_is_routed_then_spliced(world: World) -> None:
    assert await h2c_upgrade(world.upgrade, "alice") == "alice upgraded alice"
    assert await h2c_upgrade(world.upgrade, None) == "standin upgraded -"
    assert world.router.stats.upgrades == 2


async def test_connect_becomes_a_splice(world: World) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.upgrade)
    writer.write(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\nversion: bob\r\n\r\nearly bytes|")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(reader.readline(), STEP) == b"bob tunnel\n"
    writer.write(b"later")
    expected = b"early bytes|later"
    assert await asyncio.wait_for(reader.readexactly(len(expected)), STEP) == expected
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), STEP) == b""
    writer.close()


async def h2_exchange(port: int, marks: list[str | None], *, wait_for_settings: bool) -> list[str]:
    """Requests on one h2c prior-knowledge connection; the response bodies in order."""
    reader, writer = await asyncio.open_connection(ROUTER_IP, port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())

    async def events() -> list[h2.events.Event]:
        data = await asyncio.wait_for(reader.read(65536), STEP)
        assert data, "router closed the connection"
        out = conn.receive_data(data)
        writer.write(conn.data_to_send())
        return out

    if wait_for_settings:  # like grpc-go: no request before the server's SETTINGS
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in await events()):
            pass
    bodies = []
    for mark in marks:
        stream_id = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "e")]
        if mark is not None:
            headers.append(("version", mark))
        conn.send_headers(stream_id, headers, end_stream=True)
        writer.write(conn.data_to_send())
        body = b""
        ended = False
        while not ended:
            for event in await events():
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    body += event.data
                    conn.acknowledge_received_data(len(event.data), stream_id)
                ended = ended or (
                    isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id
                )
        bodies.append(body.decode())
    # A PING answered means the backend has read everything before it (our SETTINGS ACKs).
    conn.ping(b"kvpntest")
    writer.write(conn.data_to_send())
    while not any(isinstance(e, h2.events.PingAckReceived) for e in await events()):
        pass
    conn.close_connection()
    writer.write(conn.data_to_send())
    writer.close()
    return bodies


async def test_h2c_prior_knowledge_is_routed_by_first_headers(world: World) -> None:
    # Connection-level routing: the second stream follows the first one's backend.
    assert await h2_exchange(world.h2, ["alice", None], wait_for_settings=True) == [
        "alice alice",
        "alice -",
    ]
    assert await h2_exchange(world.h2, ["bob"], wait_for_settings=False) == ["bob bob"]
    assert await h2_exchange(world.h2, [None], wait_for_settings=True) == ["standin -"]
    assert world.router.stats.h2c_connections == 3
    # Each backend saw only the acknowledgement of its own SETTINGS, never the router's.
    assert sorted(world.h2_acks) == ["alice", "bob", "standin"]
