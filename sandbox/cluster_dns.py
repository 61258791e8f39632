"""Cluster DNS (``python -m sandbox.cluster_dns``): the CoreDNS look-alike behind kube-dns.

Theory of operation
-------------------
Three threads list and watch services, endpoints and pods with the official ``kubernetes``
client (kubeconfig from ``KVPN_SANDBOX_KUBECONFIG``, else in-cluster config); each change
rebuilds an immutable :class:`~sandbox.cluster_dns_zone.Snapshot` on the asyncio loop. A UDP
and a TCP listener (``DNS_LISTEN``, default ``0.0.0.0:53``) hand every query to
:func:`plan_reply`, which is pure: it answers from the snapshot, or says to forward names the
cluster does not serve to ``UPSTREAM_DNS`` (default 198.18.0.53; SERVFAIL when it does not
answer within 1.8 s), or says to drop the packet. Malformed queries get FORMERR when they have a
header to answer to and are dropped otherwise; either way they are counted, never raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSRecord

from sandbox.cluster_dns_zone import Snapshot, answer, build_snapshot

log = logging.getLogger("sandbox.cluster_dns")

DEFAULT_UPSTREAM = "198.18.0.53"
FORWARD_TIMEOUT = 1.8  # so that the SERVFAIL arrives within 2 s
TCP_IDLE_TIMEOUT = 10.0
MAX_UDP_PAYLOAD = 4096
MAX_PENDING_FORWARDS = 256
INITIAL_SYNC_TIMEOUT = 5.0


# -- settings -----------------------------------------------------------------------------


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        return text.strip(), default_port
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class DnsSettings:
    domain: str = "cluster.local"
    upstream: tuple[str, int] = (DEFAULT_UPSTREAM, 53)
    listen: tuple[str, int] = ("0.0.0.0", 53)
    kubeconfig: str | None = None
    forward_timeout: float = FORWARD_TIMEOUT

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DnsSettings:
        return cls(
            domain=env.get("CLUSTER_DOMAIN", "cluster.local").strip(".").lower() or "cluster.local",
            upstream=_host_port(env.get("UPSTREAM_DNS", DEFAULT_UPSTREAM), 53),
            listen=_host_port(env.get("DNS_LISTEN", "0.0.0.0:53"), 53),
            kubeconfig=env.get("KVPN_SANDBOX_KUBECONFIG") or None,
        )


# -- the pure decision --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    record: DNSRecord
    max_udp: int = 512  # what the client can take over UDP (EDNS0 payload size)


@dataclass(frozen=True, slots=True)
class Forward:
    query: DNSRecord


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


Decision = Reply | Forward | Drop


def _error_reply(data: bytes, rcode: int) -> Reply | Drop:
    if len(data) < 12:
        return Drop("short packet")
    (ident, flags) = struct.unpack("!HH", data[:4])
    if flags & 0x8000:
        return Drop("not a query")
    header = DNSHeader(
        id=ident, qr=1, rd=(flags >> 8) & 1, ra=1, rcode=rcode, opcode=(flags >> 11) & 0xF
    )
    return Reply(DNSRecord(header))


def plan_reply(data: bytes, snap: Snapshot) -> Decision:
    """What to do with one query datagram (or TCP message)."""
    try:
        query = DNSRecord.parse(data)
    except Exception:  # DNSError, BufferError, ...: whatever garbage raises
        return _error_reply(data, RCODE.FORMERR)
    if query.header.qr:
        return Drop("not a query")
    if query.header.opcode != 0:
        return _error_reply(data, RCODE.NOTIMP)
    if len(query.questions) != 1:
        return _error_reply(data, RCODE.FORMERR)
    reply = answer(query, snap)
    if reply is None:
        return Forward(query)
    if any(rr.rtype == QTYPE.OPT for rr in query.ar):
        reply.add_ar(EDNS0(udp_len=1232))
    return Reply(reply, udp_limit(query))


def servfail(query: DNSRecord) -> DNSRecord:
    reply = query.reply()
    reply.header.rcode = RCODE.SERVFAIL
    reply.header.aa = 0
    return reply


def udp_limit(query: DNSRecord) -> int:
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, min(int(rr.rclass), MAX_UDP_PAYLOAD))
    return 512


def pack_for_udp(reply: DNSRecord, limit: int) -> bytes:
    data: bytes = reply.pack()
    if len(data) <= limit:
        return data
    truncated = DNSRecord(
        DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap, tc=1), q=reply.q
    )
    packed: bytes = truncated.pack()
    return packed


# -- the IO adapter -----------------------------------------------------------------------


@dataclass
class DnsStats:
    queries: int = 0
    answered: int = 0
    forwarded: int = 0
    upstream_failures: int = 0
    formerr: int = 0
    dropped: int = 0


async def forward_udp(data: bytes, upstream: tuple[str, int], timeout: float) -> bytes | None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes | None] = loop.create_future()

    class _Upstream(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, addr: Any) -> None:
            if not done.done() and reply[:2] == data[:2]:
                done.set_result(reply)

        def error_received(self, exc: Exception) -> None:
            if not done.done():
                done.set_result(None)

    try:
        transport, _ = await loop.create_datagram_endpoint(_Upstream, remote_addr=upstream)
    except OSError:
        return None
    try:
        transport.sendto(data)
        return await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return None
    finally:
        transport.close()


async def forward_tcp(data: bytes, upstream: tuple[str, int], timeout: float) -> bytes | None:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*upstream)
            try:
                writer.write(struct.pack("!H", len(data)) + data)
                await writer.drain()
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(size)
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None


class ClusterDnsServer:
    """UDP + TCP listeners answering from ``snapshot`` (replace it to publish changes)."""

    def __init__(self, settings: DnsSettings, snapshot: Snapshot | None = None) -> None:
        self.settings = settings
        self.snapshot = snapshot or Snapshot(domain=settings.domain)
        self.stats = DnsStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), shared by UDP and TCP."""
        if self._udp is None:
            raise RuntimeError("server not started")
        host, port = self._udp.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.settings.listen
        for _ in range(20):  # port 0: find a port free for both UDP and TCP
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port)
            )
            bound = self.address[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
                return
            except OSError:
                self._udp.close()
                if port != 0:
                    raise
        raise OSError(f"no port free for both UDP and TCP on {host}")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._connections):
                writer.close()
            await self._tcp.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _decide(self, data: bytes) -> Decision:
        self.stats.queries += 1
        decision = plan_reply(data, self.snapshot)
        if isinstance(decision, Drop):
            self.stats.dropped += 1
        elif isinstance(decision, Reply):
            if decision.record.header.rcode == RCODE.FORMERR:
                self.stats.formerr += 1
            self.stats.answered += 1
        return decision

    async def _forward(self, decision: Forward, data: bytes, tcp: bool) -> bytes:
        self.stats.forwarded += 1
        forward = forward_tcp if tcp else forward_udp
        reply = await forward(data, self.settings.upstream, self.settings.forward_timeout)
        if reply is None:
            self.stats.upstream_failures += 1
            packed: bytes = servfail(decision.query).pack()
            return packed
        return reply

    def handle_datagram(self, data: bytes, addr: Any) -> None:
        decision = self._decide(data)
        if isinstance(decision, Reply):
            self._send_udp(pack_for_udp(decision.record, decision.max_udp), addr)
        elif isinstance(decision, Forward):
            if len(self._tasks) >= MAX_PENDING_FORWARDS:
                self.stats.dropped += 1
                return
            self._spawn(self._forward_udp(decision, data, addr))

    def _send_udp(self, data: bytes, addr: Any) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(data, addr)

    async def _forward_udp(self, decision: Forward, data: bytes, addr: Any) -> None:
        self._send_udp(await self._forward(decision, data, tcp=False), addr)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(size)
                decision = self._decide(data)
                if isinstance(decision, Drop):
                    break  # nothing to answer to: hang up, as servers do
                if isinstance(decision, Reply):
                    out: bytes = decision.record.pack()
                else:
                    out = await self._forward(decision, data, tcp=True)
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Ending quietly: a cancelled client_connected_cb task makes asyncio's own done
            # callback raise (Python 3.11).
            pass
        finally:
            self._connections.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ClusterDnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.server.handle_datagram(data, addr)
        except Exception:  # a bug must not take the listener down
            self.server.stats.dropped += 1
            log.exception("query from %s failed", addr)


# -- watching the cluster -----------------------------------------------------------------


@dataclass
class KubeWatcher:
    """List + watch of services, endpoints and pods, one thread each; ``on_change()`` is
    called (from those threads) after every change, ``objects()`` gives the current lists."""

    api_client: Any  # kubernetes.client.ApiClient
    on_change: Callable[[], None]
    watch_timeout: int = 30
    # The client boundary, replaceable in tests: kind -> list function, and Watch().
    list_functions: Mapping[str, Callable[..., Any]] | None = None
    watch_factory: Callable[[], Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _objects: dict[str, dict[tuple[str, str], Any]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _listed: set[str] = field(default_factory=set)
    _warned: dict[str, str] = field(default_factory=dict)

    KINDS = ("services", "endpoints", "pods")

    @property
    def synced(self) -> bool:
        """Every kind has been listed at least once."""
        with self._lock:
            return self._listed >= set(self.KINDS)

    def objects(self, kind: str) -> list[Any]:
        with self._lock:
            return list(self._objects.get(kind, {}).values())

    def start(self) -> None:
        for kind in self.KINDS:
            thread = threading.Thread(
                target=self._run, args=(kind,), daemon=True, name=f"watch-{kind}"
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask the threads to end (each does after its current watch call, at most
        ``watch_timeout`` seconds)."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _list_function(self, kind: str) -> Callable[..., Any]:
        if self.list_functions is not None:
            return self.list_functions[kind]
        from kubernetes import client

        core = client.CoreV1Api(self.api_client)
        functions: dict[str, Callable[..., Any]] = {
            "services": core.list_service_for_all_namespaces,
            "endpoints": core.list_endpoints_for_all_namespaces,
            "pods": core.list_pod_for_all_namespaces,
        }
        return functions[kind]

    def _run(self, kind: str) -> None:
        import kubernetes.watch
        from kubernetes.client.exceptions import ApiException

        new_watch: Callable[[], Any] = self.watch_factory or kubernetes.watch.Watch
        list_fn = self._list_function(kind)
        while not self._stop.is_set():
            try:
                response = list_fn(_preload_content=False, _request_timeout=10)
                body = json.loads(response.data)
                items = {_object_key(o): o for o in body.get("items") or []}
                version = str(body.get("metadata", {}).get("resourceVersion") or "")
                self._replace(kind, items)
                while not self._stop.is_set():
                    w = new_watch()
                    for event in w.stream(
                        list_fn,
                        resource_version=version,
                        timeout_seconds=self.watch_timeout,
                        allow_watch_bookmarks=True,
                        deserialize=False,
                        _request_timeout=self.watch_timeout + 10,
                    ):
                        version = self._apply(kind, event) or version
                        if self._stop.is_set():
                            w.stop()
            except ApiException as exc:
                if exc.status != 410:
                    self._warn(kind, str(exc.reason))
                    self._stop.wait(1.0)
            except Exception as exc:  # connection trouble: re-list after a pause
                self._warn(kind, str(exc))
                self._stop.wait(1.0)

    def _warn(self, kind: str, problem: str) -> None:
        """Log a failing list/watch, but not every retry of the same trouble."""
        if self._warned.get(kind) != problem:
            self._warned[kind] = problem
            log.warning("watching %s: %s (retrying every second)", kind, problem)

    def _replace(self, kind: str, items: dict[tuple[str, str], Any]) -> None:
        with self._lock:
            self._objects[kind] = items
            self._listed.add(kind)
        self._warned.pop(kind, None)
        self.on_change()

    def _apply(self, kind: str, event: Any) -> str | None:
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            return None
        obj = event["object"]
        version = obj.get("metadata", {}).get("resourceVersion")
        kind_of_event = event.get("type")
        if kind_of_event == "BOOKMARK":
            return str(version) if version else None
        key = _object_key(obj)
        with self._lock:
            items = self._objects.setdefault(kind, {})
            if kind_of_event == "DELETED":
                items.pop(key, None)
            elif kind_of_event in ("ADDED", "MODIFIED"):
                items[key] = obj
        self.on_change()
        return str(version) if version else None


def _object_key(obj: Any) -> tuple[str, str]:
    m = obj.get("metadata", {}) if isinstance(obj, dict) else {}
    return str(m.get("namespace", "")), str(m.get("name", ""))


def _api_client(kubeconfig: str | None) -> Any:
    import kubernetes.client
    import kubernetes.config

    client: Any = kubernetes.client
    config: Any = kubernetes.config
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()


class ClusterDns:
    """The whole cluster DNS: watcher threads feeding snapshots to a :class:`ClusterDnsServer`."""

    def __init__(self, settings: DnsSettings, api_client: Any | None = None) -> None:
        self.settings = settings
        self.server = ClusterDnsServer(settings)
        self.watcher = KubeWatcher(
            api_client if api_client is not None else _api_client(settings.kubeconfig),
            self._changed,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = threading.Event()
        self._serial = 0

    def _changed(self) -> None:  # from watcher threads: coalesce bursts into one rebuild
        if self._loop is not None and not self._pending.is_set():
            self._pending.set()
            self._loop.call_soon_threadsafe(self.rebuild)

    def rebuild(self) -> None:
        self._pending.clear()
        self._serial += 1
        w = self.watcher
        self.server.snapshot = build_snapshot(
            self.settings.domain,
            w.objects("services"),
            w.objects("endpoints"),
            w.objects("pods"),
            serial=self._serial,
        )

    async def start(self, *, sync_timeout: float = INITIAL_SYNC_TIMEOUT) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.watcher.start()
        # Like CoreDNS, hold the listeners (and so readiness) back until the first lists are in.
        deadline = loop.time() + sync_timeout
        while not self.watcher.synced and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.rebuild()
        await self.server.start()
        log.info(
            "cluster DNS for %s on %s:%d, upstream %s:%d",
            self.settings.domain,
            *self.server.address,
            *self.settings.upstream,
        )

    async def stop(self) -> None:
        self.watcher.stop()
        await self.server.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retries repeat our warnings
    settings = DnsSettings.from_env(os.environ)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        dns = ClusterDns(settings)
        await dns.start()
        try:
            await stop.wait()
        finally:
            await dns.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
