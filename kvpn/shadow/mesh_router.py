"""The mesh router: ``python -m kvpn.shadow router`` (``docs/mesh-design.md``, issue 7).

Theory of operation.

* It listens on every ``KVPN_ROUTER_PORTS`` entry. A TCP connection is classified by its
  first bytes (:func:`kvpn.shadow.http_routing.sniff_first_bytes`, waiting at most
  ``sniff_timeout`` = 1 s):

  - HTTP/1.x: :class:`kvpn.shadow.mesh_http1_relay.Http1Relay` routes each request by its
    mark header, to ``mesh_service_name(S, VALUE).<member domain>`` or the stand-in;
  - HTTP/2 prior knowledge: the router answers the preface with empty SETTINGS, reads up to
    the first HEADERS block (:mod:`kvpn.shadow.h2c_prelude`), routes the whole connection by
    it and splices (every later stream of that connection goes to the same backend);
  - anything else, or silence: spliced to the stand-in with the bytes already read.

* A UDP port is relayed to the stand-in, one connected socket per client address, closed
  after ``udp_idle_timeout`` without traffic.
* Members are found by DNS only (cached 2 s, :class:`kvpn.shadow.mesh_upstream.CachedResolver`);
  an unreachable member falls back to the stand-in; an unreachable stand-in means 502 for
  HTTP/1.x and a close for the rest. Nothing a client sends can raise out of a connection
  handler: failures are counted in :class:`kvpn.shadow.mesh_upstream.RouterStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpn.shadow.h2c_prelude import EMPTY_SETTINGS, FirstSettingsAckDropper, H2Prelude, PreludeState
from kvpn.shadow.http_routing import FirstBytes, route_headers, sniff_first_bytes, standin_target
from kvpn.shadow.mesh_http1_relay import Http1Relay
from kvpn.shadow.mesh_names import MeshNameError, RoutedPort, RouterSettings
from kvpn.shadow.mesh_upstream import (
    CachedResolver,
    Resolve,
    RouterStats,
    RouterTuning,
    Upstreams,
    close_writer,
    splice,
    system_resolve,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _ConnectionLog:
    """What one connection did, logged as one debug line when it ends."""

    peer: str
    port: int
    kind: str = "?"
    target: str = ""
    requests: int = 0


class MeshRouter:
    """Listens on the configured ports and routes each connection (see the module docstring)."""

    def __init__(
        self,
        settings: RouterSettings,
        *,
        resolve: Resolve = system_resolve,
        tuning: RouterTuning | None = None,
        listen_host: str | None = None,
    ) -> None:
        self.settings = settings
        self.tuning = tuning or RouterTuning()
        self.stats = RouterStats()
        self._listen_host = listen_host
        resolver = CachedResolver(resolve, ttl=self.tuning.dns_ttl)
        self.upstreams = Upstreams(settings, resolver, self.tuning, self.stats)
        self._servers: list[asyncio.Server] = []
        self._udp: list[_UdpRelay] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind every port (raises OSError when one cannot be bound)."""
        try:
            for routed in self.settings.ports:
                if routed.protocol == "TCP":
                    await self._listen_tcp(routed)
                else:
                    await self._listen_udp(routed)
        except BaseException:
            await self.close()
            raise

    async def _listen_tcp(self, routed: RoutedPort) -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._handlers.add(task)
            try:
                await self.handle_tcp(reader, writer, routed.port)
            except asyncio.CancelledError:
                pass  # the router is closing; asyncio's stream callback logs a re-raise
            finally:
                if task is not None:
                    self._handlers.discard(task)

        server = await asyncio.start_server(
            accepted,
            host=self._listen_host,
            port=routed.port,
            reuse_address=True,
            limit=self.tuning.read_size,
        )
        self._servers.append(server)

    async def _listen_udp(self, routed: RoutedPort) -> None:
        loop = asyncio.get_running_loop()
        relay = _UdpRelay(self, routed.port)
        await loop.create_datagram_endpoint(
            lambda: relay, local_addr=(self._listen_host or "0.0.0.0", routed.port)
        )
        self._udp.append(relay)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for relay in self._udp:
            relay.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(BaseException):
                await task
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self._udp.clear()

    # ------------------------------------------------------------------ TCP

    async def handle_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
    ) -> None:
        """Route one accepted connection; never raises (except cancellation)."""
        self.stats.connections += 1
        peer = writer.get_extra_info("peername")
        record = _ConnectionLog(peer=str(peer), port=port)
        try:
            await self._route_connection(reader, writer, port, record)
        except asyncio.CancelledError:
            close_writer(writer, abort=True)
            raise
        except Exception:  # a bug, never the client's input: keep serving others
            logger.exception("connection from %s on port %d failed", peer, port)
            close_writer(writer, abort=True)
        finally:
            logger.debug(
                "connection %s port %d: %s to %s, %d requests",
                record.peer,
                record.port,
                record.kind,
                record.target or "-",
                record.requests,
            )

    async def _first_bytes(self, reader: asyncio.StreamReader) -> tuple[FirstBytes, bytes, bool]:
        """(classification, bytes read, silent) after at most ``sniff_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.tuning.sniff_timeout
        data = b""
        while True:
            kind = sniff_first_bytes(data)
            if kind is not FirstBytes.NEED_MORE:
                return kind, data, False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return FirstBytes.OTHER, data, True
            try:
                chunk = await asyncio.wait_for(reader.read(self.tuning.read_size), remaining)
            except TimeoutError:
                return FirstBytes.OTHER, data, True
            if not chunk:
                return FirstBytes.OTHER, data, False
            data += chunk

    async def _route_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
        record: _ConnectionLog,
    ) -> None:
        try:
            kind, data, silent = await self._first_bytes(reader)
        except OSError:
            close_writer(writer, abort=True)
            return
        record.kind = "silent" if silent else kind.value
        if not data and not silent:  # closed without a byte: a TCP readiness probe
            record.kind = "empty"
            close_writer(writer)
            return
        if kind is FirstBytes.HTTP1:
            self.stats.http1_connections += 1
            relay = Http1Relay(self.upstreams, port, reader, writer, data)
            try:
                await relay.run()
            finally:
                record.requests = relay.requests
                record.target = ",".join(relay.targets)
        elif kind is FirstBytes.H2_PRIOR_KNOWLEDGE:
            self.stats.h2c_connections += 1
            await self._route_h2c(reader, writer, port, data, record)
        else:
            if silent:
                self.stats.silent_connections += 1
            else:
                self.stats.other_connections += 1
            await self._splice_to_standin(reader, writer, port, data, record)

    async def _splice_to_standin(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
        data: bytes,
        record: _ConnectionLog,
    ) -> None:
        stream = await self.upstreams.dial_routed(standin_target(self.settings, port))
        if stream is None:
            close_writer(writer)
            return
        record.target = stream.target.host
        await splice(reader, writer, stream, to_backend=data, read_size=self.tuning.read_size)

    async def _route_h2c(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
        data: bytes,
        record: _ConnectionLog,
    ) -> None:
        writer.write(EMPTY_SETTINGS)  # the server preface some clients wait for
        prelude = H2Prelude(limit=max(self.tuning.max_header_bytes, 16 * 1024 + 64))
        state = prelude.feed(data)
        while state is PreludeState.NEED_MORE:
            try:
                chunk = await asyncio.wait_for(
                    reader.read(self.tuning.read_size), self.tuning.idle_timeout
                )
            except (OSError, TimeoutError):
                close_writer(writer, abort=True)
                return
            if not chunk:
                close_writer(writer)
                return
            state = prelude.feed(chunk)
        if state is PreludeState.HEADERS:
            target = route_headers(self.settings, port, prelude.headers)
        else:
            logger.debug("h2c prelude not routable (%s): stand-in", prelude.failure)
            target = standin_target(self.settings, port)
        stream = await self.upstreams.dial_routed(target)
        if stream is None:
            close_writer(writer)
            return
        record.target = stream.target.host
        record.requests = 1
        dropper = FirstSettingsAckDropper()
        await splice(
            reader,
            writer,
            stream,
            to_backend=dropper.feed(prelude.data),
            client_transform=dropper.feed,
            read_size=self.tuning.read_size,
        )


# ---------------------------------------------------------------------- UDP


class _UdpFlow(asyncio.DatagramProtocol):
    """One client address's connected socket towards the stand-in."""

    def __init__(self, relay: _UdpRelay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []
        self.last_seen = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.last_seen = time.monotonic()
        self.relay.to_client(data, self.client)

    def error_received(self, exc: Exception) -> None:
        logger.debug("udp flow %s: %s", self.client, exc)

    def send(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        if self.transport is None:
            self.pending.append(data)
        elif not self.transport.is_closing():
            self.transport.sendto(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(eq=False)
class _UdpRelay(asyncio.DatagramProtocol):
    """The listening UDP socket of one port; relays each client to the stand-in."""

    router: MeshRouter
    port: int
    transport: asyncio.DatagramTransport | None = None
    flows: dict[tuple[str, int], _UdpFlow] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._spawn(self._sweep())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        stats = self.router.stats
        client = (addr[0], addr[1])
        flow = self.flows.get(client)
        if flow is None:
            if len(self.flows) >= self.router.tuning.max_udp_flows:
                stats.udp_dropped += 1
                return
            flow = _UdpFlow(self, client)
            self.flows[client] = flow
            self._spawn(self._open(flow))
        stats.udp_datagrams += 1
        flow.send(data)

    async def _open(self, flow: _UdpFlow) -> None:
        loop = asyncio.get_running_loop()
        target = standin_target(self.router.settings, self.port)
        addresses = await self.router.upstreams.resolver.addresses(target.host)
        for address in addresses:
            try:
                await loop.create_datagram_endpoint(lambda: flow, remote_addr=(address, self.port))
            except OSError as error:
                logger.debug("udp to %s:%d: %s", address, self.port, error)
                continue
            break
        if flow.transport is None:
            self.router.stats.standin_unreachable += 1
            self.router.stats.udp_dropped += len(flow.pending)
            self.flows.pop(flow.client, None)
            return
        pending, flow.pending = flow.pending, []
        for data in pending:
            flow.send(data)

    def to_client(self, data: bytes, client: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, client)

    async def _sweep(self) -> None:
        idle = self.router.tuning.udp_idle_timeout
        while True:
            await asyncio.sleep(max(idle / 4, 0.05))
            now = time.monotonic()
            for client, flow in list(self.flows.items()):
                if now - flow.last_seen > idle:
                    flow.close()
                    del self.flows[client]

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for flow in self.flows.values():
            flow.close()
        self.flows.clear()
        if self.transport is not None:
            self.transport.close()


# ---------------------------------------------------------------------- process


async def run_router(settings: RouterSettings) -> None:
    """Serve until SIGTERM/SIGINT (the router is PID 1 in its container)."""
    router = MeshRouter(settings)
    await router.start()
    logger.info(
        "routing %s/%s on %s by header %r (stand-in %s, members *.%s)",
        settings.namespace,
        settings.service,
        ",".join(p.spec for p in settings.ports),
        settings.header,
        settings.standin,
        settings.member_domain,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await router.close()
        logger.info("stopped; stats %s", router.stats.as_dict())


def main(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    logging.basicConfig(
        level=env.get("KVPN_LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = RouterSettings.from_env(env)
    except MeshNameError as exc:
        print(f"kvpn mesh router: {exc}", file=sys.stderr, flush=True)
        return 2
    from kvpn.event_loop import EventLoopChoiceError
    from kvpn.event_loop import run as run_event_loop  # uvloop when installed

    try:
        run_event_loop(run_router(settings), env=env)
    except EventLoopChoiceError as exc:
        print(f"kvpn mesh router: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"kvpn mesh router: cannot listen: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


__all__ = ["MeshRouter", "RouterStats", "RouterTuning", "main", "run_router"]
