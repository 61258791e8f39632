"""Root test: DataPlane with a real TUN in a "laptop" netns and a fake tunnel whose sockets
live in a "cluster" netns.  Covers HTTP, half-close, resets both ways, refused and
unreachable dials, UDP echo and closed UDP ports, ping, concurrency and clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import queue
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import asyncssh
import pytest

from kvpn.dataplane import DataPlane, DataPlaneConfig, RoutingLoopError
from kvpn.shadow.agent import AgentConfig, ShadowAgent
from kvpn.tunnel.client import ShadowTunnel
from kvpn.tunnel.transport import DirectTransport

from .fake_tunnel import FakeTunnel
from .netns import ip, netns, requires_root, run_in, socket_in

pytestmark = requires_root
log = logging.getLogger(__name__)

SERVER = "10.250.0.2"
NO_ROUTE = "10.250.0.3"
SILENT = "10.250.0.4"
CIDR = IPv4Network("10.250.0.0/24")
BODY = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)  # 20 MiB


@dataclass
class Topology:
    laptop: str
    cluster: str


AGENT = "10.251.0.2"


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    with make_topology() as topo:
        yield topo


@contextlib.contextmanager
def make_topology() -> Iterator[Topology]:
    with netns("lap") as laptop, netns("clu") as cluster:
        ip("addr", "add", f"{SERVER}/32", "dev", "lo", netns=cluster)
        # SILENT: routed into a veth whose peer ignores the frames (static neighbour with a
        # foreign MAC), so SYNs vanish and dials time out
        ip("link", "add", "sink0", "type", "veth", "peer", "name", "sink1", netns=cluster)
        ip("link", "set", "sink0", "up", netns=cluster)
        ip("link", "set", "sink1", "up", netns=cluster)
        ip("route", "add", f"{SILENT}/32", "dev", "sink0", netns=cluster)
        ip("neigh", "add", SILENT, "lladdr", "02:00:00:00:00:01", "dev", "sink0", netns=cluster)
        # the SSH path (real-tunnel test): a veth between laptop and cluster, not via the TUN
        ip(
            "link",
            "add",
            "kvl0",
            "netns",
            laptop,
            "type",
            "veth",
            "peer",
            "name",
            "kvc0",
            "netns",
            cluster,
        )
        ip("addr", "add", "10.251.0.1/24", "dev", "kvl0", netns=laptop)
        ip("addr", "add", f"{AGENT}/24", "dev", "kvc0", netns=cluster)
        ip("link", "set", "kvl0", "up", netns=laptop)
        ip("link", "set", "kvc0", "up", netns=cluster)
        for name in (laptop, cluster):
            subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ping_group_range=0 0"],
                check=True,
            )
        yield Topology(laptop, cluster)


@dataclass
class Servers:
    """TCP/UDP servers in the cluster netns, run on the test's event loop."""

    cluster: str
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    app_reset_seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        await self._tcp(8080, self._http)
        await self._tcp(8081, self._count_until_eof)
        await self._tcp(8082, self._reset_after_hello)
        await self._tcp(8083, self._wait_for_app_reset)
        await self._tcp(8084, self._banner)
        udp = socket_in(self.cluster, socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((SERVER, 7))
        udp.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(udp.fileno(), lambda: self._udp_echo(udp))
        self.sockets.append(udp)

    async def _tcp(self, port: int, handler: object) -> None:
        sock = socket_in(self.cluster, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((SERVER, port))
        self.servers.append(await asyncio.start_server(handler, sock=sock, backlog=1024))  # type: ignore[arg-type]

    @staticmethod
    def _udp_echo(sock: socket.socket) -> None:
        data, addr = sock.recvfrom(65535)
        sock.sendto(b"echo:" + data, addr)

    @staticmethod
    async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        size = int(request.split(b" ")[1].strip(b"/") or b"0")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % size + BODY[:size])
        await writer.drain()
        writer.close()

    @staticmethod
    async def _count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the app's FIN arrives as EOF
        writer.write(b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))
        await writer.drain()
        writer.close()

    @staticmethod
    async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A server-first protocol (SMTP, SSH, MySQL): it talks before the client does."""
        writer.write(b"220 banner\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    @staticmethod
    async def _reset_after_hello(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(2)
        writer.write(b"hello")
        await writer.drain()
        await reader.read(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _wait_for_app_reset(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(2)
        writer.write(b"ready")
        await writer.drain()
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.app_reset_seen.set()
        writer.close()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for server in self.servers:
            server.close()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()


async def _http_get(size: int) -> bytes:
    reader, writer = await asyncio.open_connection(SERVER, 8080)
    writer.write(b"GET /%d HTTP/1.0\r\n\r\n" % size)
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    return body


TunnelFactory = Callable[[], Awaitable[tuple[Any, Callable[[], Awaitable[None]]]]]


async def _scenario(topo: Topology, offload: bool, make_tunnel: TunnelFactory) -> dict[str, Any]:
    results: dict[str, Any] = {}
    servers = Servers(topo.cluster)
    await servers.start()
    tunnel, close_tunnel = await make_tunnel()
    plane = DataPlane(
        tunnel,
        DataPlaneConfig(
            routes=(CIDR,),
            tun_name="kvpnt0",
            offload=offload,
            dial_timeout=2.0,
            protected_addresses=(IPv4Address(AGENT),),
        ),
    )
    await plane.start()
    try:
        async with asyncio.timeout(100):
            assert plane.tun is not None
            results["vnet"] = plane.tun.vnet_header

            log.info("step: %s", "HTTP, small and 20 MiB")
            assert await _http_get(100) == BODY[:100]
            started = time.perf_counter()
            body = await _http_get(len(BODY))
            results["download_mb_s"] = len(BODY) / (time.perf_counter() - started) / 1e6
            assert hashlib.sha256(body).digest() == hashlib.sha256(BODY).digest()

            log.info(
                "step: %s", "upload 20 MiB then half-close: the reply still arrives after our FIN"
            )
            reader, writer = await asyncio.open_connection(SERVER, 8081)
            started = time.perf_counter()
            writer.write(BODY)
            await writer.drain()
            writer.write_eof()
            reply = await reader.read()
            results["upload_mb_s"] = len(BODY) / (time.perf_counter() - started) / 1e6
            writer.close()
            assert reply == b"%d %s" % (len(BODY), hashlib.sha256(BODY).hexdigest().encode())

            log.info("step: %s", "refused port: RST fast")
            started = time.perf_counter()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(SERVER, 9)
            results["refused_s"] = time.perf_counter() - started

            log.info("step: %s", "no route at the far end: ICMP host unreachable, fast")
            started = time.perf_counter()
            with pytest.raises(OSError) as info:
                await asyncio.open_connection(NO_ROUTE, 80)
            assert info.value.errno == errno.EHOSTUNREACH
            results["unreachable_s"] = time.perf_counter() - started

            log.info(
                "step: %s", "silent destination: the dial times out and the app hears about it"
            )
            started = time.perf_counter()
            with pytest.raises(OSError) as info:
                await asyncio.wait_for(asyncio.open_connection(SILENT, 80), 10)
            assert info.value.errno == errno.EHOSTUNREACH
            results["timeout_s"] = time.perf_counter() - started

            log.info("step: %s", "destination resets -> the app sees a reset")
            reader, writer = await asyncio.open_connection(SERVER, 8082)
            writer.write(b"hi")
            assert await reader.readexactly(5) == b"hello"
            writer.write(b"bye!!")
            with pytest.raises(ConnectionResetError):
                while await reader.read(100):
                    pass
            writer.close()

            log.info("step: %s", "the app resets -> the destination's stream ends")
            reader, writer = await asyncio.open_connection(SERVER, 8083)
            writer.write(b"hi")
            assert await reader.readexactly(5) == b"ready"
            writer.write(b"some data")
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await asyncio.wait_for(servers.app_reset_seen.wait(), 5)

            log.info("step: %s", "many concurrent connections")
            bodies = await asyncio.gather(*(_http_get(1000 + i) for i in range(100)))
            assert all(b == BODY[: 1000 + i] for i, b in enumerate(bodies))

            log.info("step: %s", "a local process dialling the listener directly is refused")
            port = plane.listener_port
            with pytest.raises(ConnectionError):
                r, w = await asyncio.open_connection("198.19.255.1", port)
                await r.read()
                raise ConnectionResetError("listener closed the connection")

            log.info("step: %s", "UDP echo and a closed UDP port")
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(udp, (SERVER, 7))
            await loop.sock_sendall(udp, b"ping-udp")
            assert await asyncio.wait_for(loop.sock_recv(udp, 100), 5) == b"echo:ping-udp"
            udp.close()
            closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            closed.setblocking(False)
            await loop.sock_connect(closed, (SERVER, 9999))
            await loop.sock_sendall(closed, b"anyone?")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(loop.sock_recv(closed, 100), 5)
            closed.close()

            log.info("step: %s", "ICMP echo")
            pinger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            pinger.setblocking(False)
            started = time.perf_counter()
            pinger.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 42) + b"kvpn-ping", (SERVER, 0))
            reply = await asyncio.wait_for(loop.sock_recv(pinger, 100), 5)
            results["ping_rtt_ms"] = (time.perf_counter() - started) * 1000
            assert (
                reply[0] == 0
                and struct.unpack_from("!H", reply, 6)[0] == 42
                and reply[8:] == b"kvpn-ping"
            )
            pinger.close()

            await asyncio.sleep(0.1)
            results["counters"] = plane.counters
    finally:
        await plane.stop()
        await close_tunnel()
        await servers.close()
    results["links_after"] = ip("link", "show")
    results["routes_after"] = ip("-4", "route", "show")
    return results


async def _banner_scenario(topo: Topology, make_tunnel: TunnelFactory) -> list[bytes]:
    """50 concurrent connections to a server-first service: what each hears first (b"" if
    nothing within 5 s)."""
    servers = Servers(topo.cluster)
    await servers.start()
    tunnel, close_tunnel = await make_tunnel()
    plane = DataPlane(tunnel, DataPlaneConfig(routes=(CIDR,), tun_name="kvpnt0", dial_timeout=2.0))
    await plane.start()

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection(SERVER, 8084)
        try:
            return await asyncio.wait_for(reader.readline(), 5)
        except TimeoutError:
            return b""
        finally:
            writer.close()

    try:
        return await asyncio.gather(*(one() for _ in range(50)))
    finally:
        await plane.stop()
        await close_tunnel()
        await servers.close()


def _check(results: dict[str, Any], offload: bool, label: str) -> None:
    assert results["vnet"] is offload
    assert results["refused_s"] < 0.5
    assert results["unreachable_s"] < 0.5
    assert results["timeout_s"] < 4.0
    counters = results["counters"]
    assert counters["tcp_dials_refused"] >= 1 and counters["tcp_dials_timed_out"] >= 1
    # a local process dialling the listener is refused by the kernel (the listener is bound
    # to the TUN device), so listener_refused (the accept loop's own check) may stay 0
    assert counters["tcp_resets_to_app"] >= 1
    assert counters["udp_datagrams_out"] >= 2 and counters["ping_replies_in"] == 1
    # flow-level drops are legitimate (a SYN retransmitted while its dial is pending, leftover
    # segments of an earlier test's sockets answered with RST); anything else is a bug
    legit = {"drop.tcp_duplicate_syn", "drop.tcp_no_flow", "drop.tcp_rst_no_flow"}
    assert not {k: v for k, v in counters.items() if k.startswith("drop.") and k not in legit}
    assert "kvpnt0" not in results["links_after"]
    assert "10.250.0.0" not in results["routes_after"]
    print(
        f"\n[{label}] download {results['download_mb_s']:.0f} MB/s, "
        f"upload {results['upload_mb_s']:.0f} MB/s, refused in {results['refused_s'] * 1000:.1f} ms, "
        f"unreachable in {results['unreachable_s'] * 1000:.1f} ms, "
        f"timeout answered in {results['timeout_s']:.2f} s, ping {results['ping_rtt_ms']:.2f} ms"
    )


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_dataplane_with_fake_tunnel(topology: Topology, offload: bool) -> None:
    async def make_tunnel() -> tuple[Any, Callable[[], Awaitable[None]]]:
        async def close() -> None:
            pass

        return FakeTunnel(topology.cluster), close

    results = run_in(
        topology.laptop, lambda: asyncio.run(_scenario(topology, offload, make_tunnel)), timeout=120
    )
    _check(results, offload, f"fake tunnel, {'offload' if offload else 'plain'}")


async def _fake_tunnel_factory(cluster: str) -> tuple[Any, Callable[[], Awaitable[None]]]:
    async def close() -> None:
        pass

    return FakeTunnel(cluster), close


def test_server_first_protocol_with_fake_tunnel(topology: Topology) -> None:
    banners = run_in(
        topology.laptop,
        lambda: asyncio.run(
            _banner_scenario(topology, lambda: _fake_tunnel_factory(topology.cluster))
        ),
    )
    assert banners == [b"220 banner\r\n"] * 50


@contextlib.contextmanager
def _agent_in(cluster: str, client_key: asyncssh.SSHKey) -> Iterator[tuple[int, asyncssh.SSHKey]]:
    """Run the real ShadowAgent on its own loop in a thread inside the cluster netns."""
    ready: queue.Queue[tuple[int, asyncssh.SSHKey] | BaseException] = queue.Queue()
    stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> None:
        config = AgentConfig(
            authorized_key=client_key.export_public_key().decode(),
            listen_host=AGENT,
            listen_port=0,
            dial_timeout=10.0,
        )
        agent = ShadowAgent(config)
        await agent.start()
        stopped = asyncio.Event()
        stop.append((asyncio.get_running_loop(), stopped))
        ready.put((agent.port, agent.host_public_key))
        await stopped.wait()
        await agent.close()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            ready.put(exc)

    thread = threading.Thread(target=lambda: run_in(cluster, target, timeout=600), daemon=True)
    thread.start()
    first = ready.get(timeout=20)
    if isinstance(first, BaseException):
        raise first
    try:
        yield first
    finally:
        loop, stopped = stop[0]
        loop.call_soon_threadsafe(stopped.set)
        thread.join(20)


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_dataplane_with_real_ssh_tunnel(topology: Topology, offload: bool) -> None:
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    with _agent_in(topology.cluster, client_key) as (port, host_key):

        async def make_tunnel() -> tuple[Any, Callable[[], Awaitable[None]]]:
            tunnel = await ShadowTunnel.connect(
                DirectTransport(AGENT, port), client_key=client_key, host_key=host_key
            )
            return tunnel, tunnel.close

        results = run_in(
            topology.laptop,
            lambda: asyncio.run(_scenario(topology, offload, make_tunnel)),
            timeout=150,
        )
    _check(results, offload, f"ssh tunnel, {'offload' if offload else 'plain'}")


def test_routing_loop_refused() -> None:
    config = DataPlaneConfig(
        routes=(IPv4Network("10.0.0.0/8"),), protected_addresses=(IPv4Network("10.1.2.3/32")[0],)
    )
    plane = DataPlane(FakeTunnel("unused"), config)
    with pytest.raises(RoutingLoopError):
        asyncio.run(plane.start())


def test_server_first_protocol_over_real_ssh_tunnel(topology: Topology) -> None:
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    with _agent_in(topology.cluster, client_key) as (port, host_key):

        async def make_tunnel() -> tuple[Any, Callable[[], Awaitable[None]]]:
            tunnel = await ShadowTunnel.connect(
                DirectTransport(AGENT, port), client_key=client_key, host_key=host_key
            )
            return tunnel, tunnel.close

        banners = run_in(
            topology.laptop, lambda: asyncio.run(_banner_scenario(topology, make_tunnel))
        )
    assert banners == [b"220 banner\r\n"] * 50
