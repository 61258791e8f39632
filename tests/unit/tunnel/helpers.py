"""Test helpers: local TCP acceptors, an in-process shadow agent, a fake port-forward
API server and ICMP ping sockets created inside a throw-away network namespace."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import ssl
import struct
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from aiohttp import WSMsgType, web
from kubernetes.client import Configuration

from kvpn.shadow.agent import AgentConfig, ShadowAgent
from kvpn.shadow.datagram_relay import DatagramSockets, RelayLimits
from kvpn.tunnel.client import ShadowTunnel
from kvpn.tunnel.keys import new_session_key, public_key_text
from kvpn.tunnel.transport import DirectTransport

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class TcpAcceptor:
    """A listener on 127.0.0.1 whose accepted connections are handed out in order."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Stream] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TcpAcceptor:
        async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.accepted.put((reader, writer))

        self._server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def next(self) -> Stream:
        return await asyncio.wait_for(self.accepted.get(), 30)

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        while not self.accepted.empty():
            _, writer = self.accepted.get_nowait()
            writer.close()


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """TCP echo server that half-closes after echoing everything (so EOF round-trips)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handler: StreamHandler) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; handlers still running
    at exit are cancelled."""
    tasks: set[asyncio.Task[Any]] = set()

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0, backlog=512)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def reset_stream(writer: asyncio.StreamWriter) -> None:
    """Close a TCP stream with RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.asynccontextmanager
async def udp_echo_server() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]

    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def closed_port() -> int:
    """A TCP/UDP port on 127.0.0.1 with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AgentFixture:
    agent: ShadowAgent
    client_key: asyncssh.SSHKey
    tunnels: list[ShadowTunnel] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.agent.port

    async def connect(self, **kwargs: object) -> ShadowTunnel:
        tunnel = await ShadowTunnel.connect(
            DirectTransport("127.0.0.1", self.port),
            client_key=self.client_key,
            host_key=self.agent.host_public_key,
            **kwargs,  # type: ignore[arg-type]
        )
        self.tunnels.append(tunnel)
        return tunnel


@contextlib.asynccontextmanager
async def running_agent(
    *,
    dial_timeout: float = 5.0,
    limits: RelayLimits | None = None,
    sockets: DatagramSockets | None = None,
) -> AsyncIterator[AgentFixture]:
    client_key = new_session_key()
    config = AgentConfig(
        authorized_key=public_key_text(client_key),
        listen_host="127.0.0.1",
        listen_port=0,
        dial_timeout=dial_timeout,
        keepalive_interval=5.0,
        relay_limits=limits or RelayLimits(),
    )
    agent = ShadowAgent(config, sockets=sockets)
    await agent.start()
    fixture = AgentFixture(agent, client_key)
    try:
        yield fixture
    finally:
        for tunnel in fixture.tunnels:
            await tunnel.close()
        await agent.close()


# --- fake API server port-forward endpoint ----------------------------------------------


@dataclass
class FakePortForwardServer:
    """Implements GET /api/v1/namespaces/{ns}/pods/{pod}/portforward like an API server +
    kubelet: v4.channel.k8s.io, port prefix on channels 0 and 1, then dials the pod."""

    targets: dict[str, int]
    token: str = "test-token"
    split_prefix: bool = False
    announce_port: int | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakePortForwardServer:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}/portforward", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def client_config(self, token: str | None = None) -> Configuration:
        scheme = "https" if self.ssl_context else "http"
        config = Configuration(host=f"{scheme}://127.0.0.1:{self.port}")
        config.api_key = {"BearerToken": f"Bearer {token or self.token}"}
        return config

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "reason": reason, "code": code}  # fmt: skip
        return web.json_response(body, status=code)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers) | {"query": request.query_string})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        pod = request.match_info["pod"]
        if pod not in self.targets:
            return self._status(404, "NotFound", f'pods "{pod}" not found')
        port = int(request.query["ports"])
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        prefix = (self.announce_port or port).to_bytes(2, "little")
        if self.split_prefix:
            await ws.send_bytes(b"\x00" + prefix[:1])
            await ws.send_bytes(b"\x01" + prefix)
            await ws.send_bytes(b"\x00" + prefix[1:])
        else:
            await ws.send_bytes(b"\x00" + prefix)
            await ws.send_bytes(b"\x01" + prefix)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.targets[pod])
        except OSError:
            await ws.send_bytes(
                b"\x01" + f"error forwarding port {port} to pod {pod}, uid : dial tcp4 "
                f"127.0.0.1:{port}: connect: connection refused".encode()
            )
            await ws.close()
            return ws

        async def pod_to_ws() -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    await ws.send_bytes(b"\x00" + data)
            await ws.close()

        pump = asyncio.create_task(pod_to_ws())
        try:
            async for msg in ws:
                if msg.type is WSMsgType.BINARY and msg.data[:1] == b"\x00":
                    writer.write(msg.data[1:])
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        return ws


def self_signed_tls(directory: str) -> tuple[ssl.SSLContext, str]:
    """A server TLS context for 127.0.0.1 and the path of the CA file that trusts it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvpn-test-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "apiserver.crt")
    key_path = os.path.join(directory, "apiserver.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, cert_path


# --- ping sockets in a network namespace -------------------------------------------------

_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def ping_namespace() -> Iterator[Callable[[int], socket.socket]]:
    """A ``kvpnt-`` netns with lo up and ping_group_range open; yields a ping socket factory
    whose sockets live in that namespace (the host's own ping_group_range is untouched)."""
    name = f"kvpnt-ping-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"],
            check=True,
        )
        libc = ctypes.CDLL(None, use_errno=True)

        def factory(family: int) -> socket.socket:
            result: list[socket.socket | BaseException] = []

            def in_namespace() -> None:  # setns() only moves this short-lived thread
                try:
                    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
                    try:
                        if libc.setns(fd, _CLONE_NEWNET) != 0:
                            err = ctypes.get_errno()
                            raise OSError(err, os.strerror(err))
                    finally:
                        os.close(fd)
                    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
                    result.append(socket.socket(family, socket.SOCK_DGRAM, proto))
                except BaseException as exc:
                    result.append(exc)

            thread = threading.Thread(target=in_namespace)
            thread.start()
            thread.join()
            outcome = result[0]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        yield factory
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
