"""Reaching the mesh router's backends: name cache, dialling with fallback, byte splice.

Theory of operation.

* **Names.** Member Services are found by DNS only (``docs/mesh-design.md``: no route
  table). :class:`CachedResolver` keeps each answer, including "no such name", for
  ``dns_ttl`` seconds (2 s by default), so a burst of requests costs one lookup and a
  developer who joins or leaves is seen within that time. The resolve function is injected
  (tests map names to loopback addresses; production uses ``getaddrinfo`` through the pod's
  resolv.conf, i.e. cluster DNS).
* **Dialling.** :meth:`Upstreams.dial` tries each address of the target with a timeout;
  :meth:`Upstreams.dial_routed` falls back from an unreachable member (name gone, refused,
  timed out) to the stand-in, per :func:`kvpn.shadow.http_routing.fallback_of`.
* **Splice.** :func:`splice` copies both directions until each has ended; an end of stream
  one way becomes a half-close (``write_eof``) the other way, an error either way aborts both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields

from kvpn.shadow.http_routing import Target, fallback_of
from kvpn.shadow.mesh_names import RouterSettings

logger = logging.getLogger(__name__)

Resolve = Callable[[str], Awaitable[list[str]]]
Transform = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class RouterTuning:
    """Timeouts and sizes of the router (defaults are the production values)."""

    sniff_timeout: float = 1.0  # silence before a connection is spliced to the stand-in
    connect_timeout: float = 3.0
    dns_ttl: float = 2.0
    idle_timeout: float = 600.0  # between requests on a keep-alive connection
    udp_idle_timeout: float = 60.0
    max_udp_flows: int = 1024
    read_size: int = 64 * 1024
    max_header_bytes: int = 64 * 1024


@dataclass(slots=True)
class RouterStats:
    """Counters of one router (a plain object, owned by the router instance)."""

    connections: int = 0
    http1_connections: int = 0
    h2c_connections: int = 0
    other_connections: int = 0
    silent_connections: int = 0
    requests: int = 0
    to_member: int = 0
    to_standin: int = 0
    member_unreachable: int = 0
    standin_unreachable: int = 0
    upgrades: int = 0
    malformed: int = 0
    bad_gateway: int = 0
    udp_datagrams: int = 0
    udp_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


async def system_resolve(host: str) -> list[str]:
    """Addresses of ``host`` through the system resolver (the pod's cluster DNS)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class CachedResolver:
    """Caches ``resolve`` answers (positive and negative) for ``ttl`` seconds."""

    def __init__(
        self, resolve: Resolve, *, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._resolve = resolve
        self._ttl = ttl
        self._clock = clock
        self._answers: dict[str, tuple[float, list[str]]] = {}

    async def addresses(self, host: str) -> list[str]:
        now = self._clock()
        cached = self._answers.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            answer = list(await self._resolve(host))
        except Exception:  # an injected resolver failing is "no such name"
            logger.debug("resolving %s failed", host, exc_info=True)
            answer = []
        if len(self._answers) > 4096:
            self._answers = {h: a for h, a in self._answers.items() if a[0] > now}
        self._answers[host] = (now + self._ttl, answer)
        return answer


@dataclass(slots=True)
class Stream:
    """A connected TCP stream to a backend, and the target it was dialled for."""

    target: Target
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstreams:
    """Dials targets (members and the stand-in) for one router."""

    def __init__(
        self,
        settings: RouterSettings,
        resolver: CachedResolver,
        tuning: RouterTuning,
        stats: RouterStats,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.tuning = tuning
        self.stats = stats

    async def dial(self, target: Target) -> Stream | None:
        """A stream to ``target``, or None if no address of it answers."""
        for address in await self.resolver.addresses(target.host):
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, target.port, limit=self.tuning.read_size),
                    self.tuning.connect_timeout,
                )
            except (OSError, TimeoutError) as error:
                logger.debug("dial %s (%s:%d): %s", target.host, address, target.port, error)
                continue
            _set_nodelay(writer)
            return Stream(target, reader, writer)
        return None

    def count_route(self, target: Target) -> None:
        if target.mark is None:
            self.stats.to_standin += 1
        else:
            self.stats.to_member += 1

    async def dial_routed(self, target: Target) -> Stream | None:
        """A stream to ``target``, else to its fallback (the stand-in); counts the outcome."""
        stream = await self.dial(target)
        if stream is None:
            fallback = fallback_of(self.settings, target)
            if fallback is None:
                self.stats.standin_unreachable += 1
                return None
            self.stats.member_unreachable += 1
            stream = await self.dial(fallback)
            if stream is None:
                self.stats.standin_unreachable += 1
                return None
        self.count_route(stream.target)
        return stream


def close_writer(writer: asyncio.StreamWriter, *, abort: bool = False) -> None:
    with contextlib.suppress(Exception):
        if abort:
            writer.transport.abort()
        else:
            writer.close()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    read_size: int,
    transform: Transform | None,
) -> None:
    while True:
        data = await reader.read(read_size)
        if not data:
            break
        if transform is not None:
            data = transform(data)
        if data:
            writer.write(data)
            await writer.drain()
    if not writer.is_closing() and writer.can_write_eof():
        writer.write_eof()


async def splice(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    backend: Stream,
    *,
    to_backend: bytes = b"",
    to_client: bytes = b"",
    client_transform: Transform | None = None,
    read_size: int = 64 * 1024,
) -> None:
    """Copy bytes both ways (after the given first bytes) until both directions end.

    Both connections are closed on return (aborted after an error or a cancellation).
    """
    failed = True
    tasks: set[asyncio.Task[None]] = set()
    try:
        if to_backend:
            backend.writer.write(to_backend)
        if to_client:
            client_writer.write(to_client)
        tasks = {
            asyncio.create_task(_pump(client_reader, backend.writer, read_size, client_transform)),
            asyncio.create_task(_pump(backend.reader, client_writer, read_size, None)),
        }
        pending = set(tasks)
        failed = False
        while pending and not failed:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = any(task.exception() is not None for task in done)
    except (OSError, RuntimeError):
        failed = True
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        close_writer(client_writer, abort=failed)
        close_writer(backend.writer, abort=failed)
