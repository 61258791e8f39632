"""The mesh router on loopback, with real sockets: two members and a stand-in on 127.0.0.x.

Member names are resolved through an injected table (no DNS). Each backend runs three
servers on the same port numbers as the router: an aiohttp app (HTTP/1.1 and WebSocket),
an h2 server (h2c prior knowledge) and a raw banner-then-echo server; the stand-in also
echoes UDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import h2.config
import h2.connection
import h2.events
import h11
import pytest
from aiohttp import web

from kvpn.shadow.mesh_names import RoutedPort, RouterSettings, member_host, standin_host
from kvpn.shadow.mesh_router import MeshRouter
from kvpn.shadow.mesh_upstream import RouterTuning

ROUTER_IP = "127.0.0.1"
BACKEND_IPS = {"alice": "127.0.0.2", "bob": "127.0.0.3", "standin": "127.0.0.4"}
DEAD_IP = "127.0.0.9"  # nothing listens there: connection refused
STEP = 5.0  # generous bound for one step; never an assertion of speed
SERVICE, NAMESPACE = "echo", "dev"


def common_port(
    ips: list[str], *, udp_ips: tuple[str, ...] = (), taken: tuple[int, ...] = ()
) -> int:
    """A port number free for TCP on every address in ``ips`` (and UDP on ``udp_ips``)."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind((ips[0], 0))
        port = int(probe.getsockname()[1])
        held = [probe]
        try:
            if port in taken:
                continue
            for ip in ips[1:]:
                sock = socket.socket()
                held.append(sock)
                sock.bind((ip, port))
            for ip in udp_ips:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(sock)
                sock.bind((ip, port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return port
    raise RuntimeError("no common free port")


# ---------------------------------------------------------------------- backends


def http_app(name: str) -> web.Application:
    async def who(request: web.Request) -> web.Response:
        return web.Response(text=name)

    async def sha(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return web.Response(text=f"{name} {digest.hexdigest()}")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(16):
            await response.write(bytes([i]) * 65536)
        await response.write_eof()
        return response

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        await socket_.send_str(f"hello from {name}")
        async for message in socket_:
            if message.type == aiohttp.WSMsgType.TEXT:
                await socket_.send_str(f"{name}:{message.data}")
        return socket_

    app = web.Application()
    app.router.add_get("/who", who)
    app.router.add_post("/sha", sha)
    app.router.add_get("/big", big)
    app.router.add_get("/ws", ws)
    return app


def h2_handler(
    name: str, acks: list[str]
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        with contextlib.suppress(Exception, asyncio.CancelledError):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        fields = {str(k): str(v) for k, v in event.headers or []}
                        mark = fields.get("version", "-")
                        body = f"{name} {mark}".encode()
                        conn.send_headers(
                            event.stream_id,
                            [(":status", "200"), ("content-length", str(len(body)))],
                        )
                        conn.send_data(event.stream_id, body, end_stream=True)
                    elif isinstance(event, h2.events.SettingsAcknowledged):
                        acks.append(name)
                writer.write(conn.data_to_send())
                await writer.drain()
        writer.close()

    return handle


def raw_handler(
    name: str,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{name}\n".encode())
        with contextlib.suppress(Exception, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    return handle


def h2c_upgrade_handler(
    name: str,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """HTTP/1.1 ``Upgrade: h2c`` (RFC 7540 section 3.2), then HTTP/2 answering stream 1;
    or ``CONNECT``, then a banner and an echo."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            http1 = h11.Connection(h11.SERVER)
            request: h11.Request | None = None
            while True:
                event = http1.next_event()
                if event is h11.NEED_DATA:
                    http1.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            fields = dict(request.headers)
            if request.method == b"CONNECT":  # a tunnel: banner, then echo
                writer.write(http1.send(h11.Response(status_code=200, headers=[])) or b"")
                writer.write(f"{name} tunnel\n".encode() + http1.trailing_data[0])
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()
                return
            writer.write(
                http1.send(
                    h11.InformationalResponse(
                        status_code=101, headers=[("Connection", "Upgrade"), ("Upgrade", "h2c")]
                    )
                )
                or b""
            )
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_upgrade_connection(fields[b"http2-settings"])
            body = f"{name} upgraded {fields.get(b'version', b'-').decode()}".encode()
            conn.send_headers(1, [(":status", "200"), ("content-length", str(len(body)))])
            conn.send_data(1, body, end_stream=True)
            writer.write(conn.data_to_send())
            data = http1.trailing_data[0]
            while True:
                conn.receive_data(data)
                writer.write(conn.data_to_send())
                await writer.drain()
                data = await reader.read(65536)
                if not data:
                    break
        writer.close()

    return handle


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"standin:" + data, addr)


@dataclass
class World:
    http: int
    h2: int
    raw: int
    upgrade: int
    router: MeshRouter
    resolve: Callable[[str], Awaitable[list[str]]]
    h2_acks: list[str] = field(default_factory=list)


def settings_for(world_ports: tuple[int, int, int, int]) -> RouterSettings:
    http, h2_port, raw, upgrade = world_ports
    ports = (
        RoutedPort(http),
        RoutedPort(http, "UDP"),
        RoutedPort(h2_port),
        RoutedPort(raw),
        RoutedPort(upgrade),
    )
    return RouterSettings(service=SERVICE, namespace=NAMESPACE, ports=ports)


def resolver_for(table: dict[str, list[str]]) -> Callable[[str], Awaitable[list[str]]]:
    async def resolve(host: str) -> list[str]:
        return table.get(host, [])

    return resolve


NAME_TABLE = {
    member_host(SERVICE, "alice", f"{NAMESPACE}.svc"): [BACKEND_IPS["alice"]],
    member_host(SERVICE, "bob", f"{NAMESPACE}.svc"): [BACKEND_IPS["bob"]],
    member_host(SERVICE, "gone", f"{NAMESPACE}.svc"): [DEAD_IP],
    standin_host(SERVICE, NAMESPACE): [BACKEND_IPS["standin"]],
}
TUNING = RouterTuning(sniff_timeout=0.3, connect_timeout=1.0, udp_idle_timeout=2.0)


@pytest.fixture(name="world")
async def world_fixture() -> AsyncIterator[World]:
    ips = [ROUTER_IP, *BACKEND_IPS.values()]
    http = common_port(ips, udp_ips=(ROUTER_IP, BACKEND_IPS["standin"]))
    h2_port = common_port(ips, taken=(http,))
    raw = common_port(ips, taken=(http, h2_port))
    upgrade = common_port(ips, taken=(http, h2_port, raw))
    acks: list[str] = []
    runners: list[web.AppRunner] = []
    servers: list[asyncio.Server] = []
    udp: list[asyncio.DatagramTransport] = []
    loop = asyncio.get_running_loop()
    for name, ip in BACKEND_IPS.items():
        runner = web.AppRunner(http_app(name))
        await runner.setup()
        await web.TCPSite(runner, ip, http).start()
        runners.append(runner)
        servers.append(await asyncio.start_server(h2_handler(name, acks), ip, h2_port))
        servers.append(await asyncio.start_server(raw_handler(name), ip, raw))
        servers.append(await asyncio.start_server(h2c_upgrade_handler(name), ip, upgrade))
    transport, _ = await loop.create_datagram_endpoint(
        UdpEcho, local_addr=(BACKEND_IPS["standin"], http)
    )
    udp.append(transport)
    resolve = resolver_for(NAME_TABLE)
    router = MeshRouter(
        settings_for((http, h2_port, raw, upgrade)),
        resolve=resolve,
        tuning=TUNING,
        listen_host=ROUTER_IP,
    )
    await router.start()
    try:
        yield World(http, h2_port, raw, upgrade, router, resolve, acks)
    finally:
        await router.close()
        for server in servers:
            server.close()
        for transport in udp:
            transport.close()
        for runner in runners:
            await runner.cleanup()


# ---------------------------------------------------------------------- HTTP/1.1


async def get_text(
    port: int, path: str, mark: str | None, header: str = "version", ip: str = ROUTER_IP
) -> str:
    headers = {header: mark} if mark is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{ip}:{port}{path}", headers=headers) as response:
            return await response.text()


async def test_mark_routes_to_member_and_no_mark_to_standin(world: World) -> None:
    assert await get_text(world.http, "/who", "alice") == "alice"
    assert await get_text(world.http, "/who", "bob", header="VeRsIoN") == "bob"
    assert await get_text(world.http, "/who", None) == "standin"
    assert await get_text(world.http, "/who", "Alice") == "standin"  # values are exact
    assert world.router.stats.to_member == 2
    assert world.router.stats.to_standin == 2


async def test_unreachable_members_fall_back_to_standin(world: World) -> None:
    assert await get_text(world.http, "/who", "carol") == "standin"  # name does not resolve
    assert await get_text(world.http, "/who", "gone") == "standin"  # refused
    assert world.router.stats.member_unreachable == 2


def h11_request(path: str, mark: str | None, method: str = "GET") -> h11.Request:
    headers = [("Host", "echo")]
    if mark is not None:
        headers.append(("Version", mark))
    return h11.Request(method=method, target=path, headers=headers)


async def read_response(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Response, bytes]:
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(reader.read(65536), STEP))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, body


async def test_keep_alive_requests_are_routed_one_by_one(world: World) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.http)
    conn = h11.Connection(h11.CLIENT)
    bodies = []
    for mark in ("alice", None, "bob", "alice"):
        writer.write(conn.send(h11_request("/who", mark)) + conn.send(h11.EndOfMessage()))
        _, body = await read_response(conn, reader)
        bodies.append(body)
        conn.start_next_cycle()
    writer.close()
    assert bodies == [b"alice", b"standin", b"bob", b"alice"]
    assert world.router.stats.http1_connections == 1
    assert world.router.stats.requests == 4


async def test_pipelined_requests_come_back_in_order(world: World) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.http)
    marks = ["bob", None, "alice", None, "bob"]
    pipelined = b"".join(
        h11.Connection(h11.CLIENT).send(h11_request("/who", mark)) or b"" for mark in marks
    )
    writer.write(pipelined)
    conn = h11.Connection(h11.CLIENT)
    bodies = []
    for mark in marks:
        conn.send(h11_request("/who", mark))  # bookkeeping only: the bytes went above
        conn.send(h11.EndOfMessage())
        _, body = await read_response(conn, reader)
        bodies.append(body.decode())
        conn.start_next_cycle()
    writer.close()
    assert bodies == ["bob", "standin", "alice", "standin", "bob"]


async def test_chunked_upload_and_streamed_download_arrive_intact(world: World) -> None:
    payload = os.urandom(1_000_003)

    async def chunks() -> AsyncIterator[bytes]:
        view = memoryview(payload)
        for size in (1, 100, 65536, 7, 300_000):
            yield bytes(view[:size])
            view = view[size:]
        yield bytes(view)

    url = f"http://{ROUTER_IP}:{world.http}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/sha", data=chunks(), headers={"version": "alice"}) as r:
            assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert await r.text() == f"alice {hashlib.sha256(payload).hexdigest()}"
        async with session.post(
            f"{url}/sha", data=payload, headers={"version": "bob"}, expect100=True
        ) as r:
            assert await r.text() == f"bob {hashlib.sha256(payload).hexdigest()}"
        async with session.get(f"{url}/big", headers={"version": "bob"}) as r:
            body = await r.read()
        expected = b"".join(bytes([i]) * 65536 for i in range(16))
        assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()


async def test_malformed_request_gets_400_and_close(world: World) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.http)
    writer.write(b"GET /who HTTP/1.1\r\nHost echo\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), STEP)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert world.router.stats.malformed == 1


async def test_unreachable_standin_means_502_for_http_and_close_for_others(world: World) -> None:
    table = {k: v for k, v in NAME_TABLE.items() if k != standin_host(SERVICE, NAMESPACE)}
    other_ip = "127.0.0.5"  # a second router on the same port numbers (members use them)
    router = MeshRouter(
        settings_for((world.http, world.h2, world.raw, world.upgrade)),
        resolve=resolver_for(table),
        tuning=TUNING,
        listen_host=other_ip,
    )
    await router.start()
    try:
        assert await get_text(world.http, "/who", "alice", ip=other_ip) == "alice"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{other_ip}:{world.http}/who") as response:
                assert response.status == 502
        reader, writer = await asyncio.open_connection(other_ip, world.raw)
        writer.write(b"\x16\x03\x01 not http")
        assert await asyncio.wait_for(reader.read(), STEP) == b""
        writer.close()
        assert router.stats.standin_unreachable == 2
    finally:
        await router.close()


# ---------------------------------------------------------------------- not HTTP, UDP


async def test_non_http_bytes_are_spliced_to_standin(world: World) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.raw)
    writer.write(b"\x16\x03\x01 hello")
    got = b""
    while len(got) < len(b"standin\n\x16\x03\x01 hello"):
        got += await asyncio.wait_for(reader.read(100), STEP)
    assert got == b"standin\n\x16\x03\x01 hello"
    writer.write_eof()  # half-close travels through; the echo server then closes
    assert await asyncio.wait_for(reader.read(), STEP) == b""
    writer.close()
    assert world.router.stats.other_connections == 1


async def test_silent_client_is_spliced_to_standin_after_timeout(world: World) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.raw)
    banner = await asyncio.wait_for(reader.readline(), STEP)
    writer.write(b"late")
    assert await asyncio.wait_for(reader.readexactly(4), STEP) == b"late"
    writer.close()
    assert banner == b"standin\n"
    assert world.router.stats.silent_connections == 1


async def test_udp_is_relayed_to_standin(world: World) -> None:
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            answers.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(ROUTER_IP, world.http))
    try:
        for text in (b"ping", b"pong"):
            transport.sendto(text)
            assert await asyncio.wait_for(answers.get(), STEP) == b"standin:" + text
    finally:
        transport.close()
    assert world.router.stats.udp_datagrams == 2


# ---------------------------------------------------------------------- hostile input

MALFORMED = [
    b"GET /who HTTP/1.1\r\nHost: echo\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /sha HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"GET /who HTTP/1.1\r\nHost: echo\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /who HTTP/7.1\r\nHost: echo\r\n\r\n",
    b"GET /who HTTP/1.1\r\n Host: echo\r\n\r\n",
    b"GET /who HTTP/1.1\r\nHost: echo\r\nBad\x00Name: x\r\n\r\n",
    b"GET /who HTTP/1.1\r\nHost: echo\r\nContent-Length: -1\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED)
async def test_malformed_variants_get_400(world: World, request_bytes: bytes) -> None:
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.http)
    writer.write(request_bytes)
    answer = await asyncio.wait_for(reader.read(), STEP)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert world.router.stats.malformed == 1


def mutations(seed: int, count: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    base = (
        b"POST /sha HTTP/1.1\r\nHost: echo\r\nVersion: alice\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"
        b"GET /who HTTP/1.1\r\nHost: echo\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    )
    out = []
    for _ in range(count):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            action = rng.randrange(3)
            if action == 0:
                data[position] = rng.randrange(256)
            elif action == 1:
                del data[position : position + rng.randint(1, 8)]
            else:
                data[position:position] = bytes(rng.randrange(256) for _ in range(3))
        out.append(bytes(data[: rng.randint(1, len(data))]))
    return out


async def test_mutated_input_never_breaks_the_router(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async def poke(data: bytes) -> None:
        reader, writer = await asyncio.open_connection(ROUTER_IP, world.http)
        writer.write(data)
        writer.write_eof()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), STEP)
        writer.close()

    await asyncio.gather(*(poke(data) for data in mutations(seed=7, count=60)))
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("kvpn")]
    assert await get_text(world.http, "/who", "bob") == "bob"


# ---------------------------------------------------------------------- process entry


def test_router_entry_point_refuses_incomplete_environment() -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPN_ROUTER_")}
    done = subprocess.run(
        [sys.executable, "-m", "kvpn.shadow", "router"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "KVPN_ROUTER_SERVICE is not set" in done.stderr


async def test_probe_and_truncated_request_are_not_errors(world: World) -> None:
    # A TCP readiness probe: connect, close. Nothing is dialled, nothing counted as bad.
    _, writer = await asyncio.open_connection(ROUTER_IP, world.http)
    writer.close()
    reader, writer = await asyncio.open_connection(ROUTER_IP, world.http)
    writer.write(b"GET /who HTTP/1.1\r\nHost: ec")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), STEP) == b""
    writer.close()
    assert await get_text(world.http, "/who", None) == "standin"
    stats = world.router.stats
    assert (stats.malformed, stats.to_standin, stats.other_connections) == (0, 1, 0)
