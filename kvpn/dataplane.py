"""The asyncio data plane: TUN device + PacketRouter + kernel listener + tunnel relays.

This is the thin adapter around the sans-IO :class:`kvpn.net.router.PacketRouter`:

* the TUN descriptor is watched with ``loop.add_reader``; packets go into the router,
  the router's packets go back out with ``os.write``;
* router events become tunnel calls: ``TcpDialRequested`` -> ``tunnel.open_tcp`` (dial
  first; the outcome goes back as ``dial_succeeded``/``dial_failed``), ``UdpOut`` /
  ``PingOut`` -> the datagram relay, whose events come back into the router;
* a kernel TCP listener bound to A only accepts the connections the NAT trick hands it;
  each accepted socket is relayed to the stream pre-opened by its dial, with half-close
  both ways (app FIN -> channel EOF, channel EOF -> ``shutdown(SHUT_WR)``) and resets
  (app RST -> channel closed; channel lost -> ``SO_LINGER 0`` reset of the app socket);
  an SSH channel is spliced to its socket with callbacks, no task per direction
  (:mod:`kvpn.tunnel.socket_splice`); any other stream pair gets a task per direction;
* one asyncio timer follows ``router.get_timer()``.

The tunnel can be swapped while the TUN, routes and listener stay up (reconnect, driven by
:mod:`kvpn.link_supervisor`): :meth:`DataPlane.tunnel_lost` resets every relayed TCP flow
(their SSH channels died with the connection: the app sees a RST, never a hang), closes the
datagram relay and drops UDP/ping until the tunnel is back (counted; they are lossy anyway);
:meth:`DataPlane.replace_tunnel` installs the new tunnel and reopens the relay.  A new
connection during the outage is *held*: its SYN waits in the router's gate while the dial
waits for the tunnel, and is dialled as soon as the tunnel is back if that happens within the
dial timeout (5 s); otherwise the app gets ICMP host unreachable at the timeout, as for any
dial that times out.  So a short blip costs a connect a little latency, a long outage a
prompt "No route to host", and nothing waits longer than the dial timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from kvpn.net.events import Event, PingOut, TcpDialRequested, TcpFlowEnded, UdpOut
from kvpn.net.nat import FlowKey
from kvpn.net.router import PacketRouter, RouterConfig
from kvpn.net.tcp_gate import DialOutcome
from kvpn.shadow.relay_codec import (
    FlowExpired,
    PingReply,
    PingUnreachable,
    UdpReceived,
    UdpUnreachable,
)
from kvpn.tun.device import TunDevice
from kvpn.tun.netlink import TunLinkConfig
from kvpn.tunnel.client import DialError, DialRefused, DialTimeout, DialUnreachable
from kvpn.tunnel.socket_splice import FlowEnd, SocketSplice

__all__ = ["DataPlane", "DataPlaneConfig", "DataPlaneCounters", "RoutingLoopError"]

log = logging.getLogger(__name__)

_RELAY_CHUNK = 256 * 1024
_TUN_BATCH = 256
_LINGER_RESET = struct.pack("ii", 1, 0)

_DIAL_OUTCOMES: dict[type[BaseException], DialOutcome] = {
    DialRefused: DialOutcome.REFUSED,
    DialUnreachable: DialOutcome.UNREACHABLE,
    DialTimeout: DialOutcome.TIMED_OUT,
    TimeoutError: DialOutcome.TIMED_OUT,
    ConnectionRefusedError: DialOutcome.REFUSED,
}


class StreamReaderLike(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class StreamWriterLike(Protocol):
    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


class DatagramRelayLike(Protocol):
    def send_udp(self, flow_id: int, dst: Any, dport: int, payload: bytes) -> bool: ...
    def send_ping(self, flow_id: int, dst: Any, ident: int, seq: int, payload: bytes) -> bool: ...
    async def close(self) -> None: ...


class TunnelLike(Protocol):
    """What the data plane needs from :class:`kvpn.tunnel.client.ShadowTunnel`."""

    async def open_tcp(self, host: str, port: int, *, timeout: float = 5.0) -> tuple[Any, Any]: ...

    async def open_datagrams(self, on_event: Callable[[Any], None]) -> Any: ...


class RoutingLoopError(ValueError):
    """A route would send the tunnel's own traffic (SSH peer, API server) into the TUN."""


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    routes: tuple[IPv4Network, ...]
    tun_name: str = "kvpn0"
    tun_address: IPv4Address = IPv4Address("198.19.255.1")
    fake_peer: IPv4Address = IPv4Address("198.19.255.2")
    offload: bool = True
    #: None: 1500 with offload (TSO makes 64 KiB super-packets anyway), 65000 without.
    mtu: int | None = None
    txqueuelen: int = 1000
    dial_timeout: float = 5.0
    #: Addresses that must never be routed into the TUN (SSH peer, API server).
    protected_addresses: tuple[IPv4Address, ...] = ()
    datagrams: bool = True


@dataclass(slots=True)
class DataPlaneCounters:
    tcp_relays_active: int = 0
    tcp_relays_total: int = 0
    tcp_bytes_up: int = 0
    tcp_bytes_down: int = 0
    tcp_resets_to_app: int = 0
    listener_refused: int = 0
    tun_write_dropped: int = 0
    dials_held: int = 0  # dials that waited for the tunnel to come back
    tunnel_losses: int = 0
    tcp_resets_on_tunnel_loss: int = 0
    datagrams_dropped_tunnel_down: int = 0
    dial_errors: dict[str, int] = field(default_factory=dict)


class DataPlane:
    def __init__(self, tunnel: TunnelLike, config: DataPlaneConfig) -> None:
        self._tunnel = tunnel
        self._config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tun: TunDevice | None = None
        self._link: TunLinkConfig | None = None
        self._listener: socket.socket | None = None
        self._router: PacketRouter | None = None
        self._relay: DatagramRelayLike | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_relays: set[asyncio.Task[None]] = set()
        self._tunnel_up = asyncio.Event()
        self._tunnel_up.set()
        self._pending_streams: dict[FlowKey, tuple[Any, Any]] = {}
        self._stats = DataPlaneCounters()
        self._event_handlers: dict[type[Any], Callable[[Any], None]] = {
            TcpDialRequested: self._on_dial_requested,
            TcpFlowEnded: self._on_flow_ended,
            UdpOut: self._on_udp_out,
            PingOut: self._on_ping_out,
        }
        self._relay_handlers: dict[type[Any], Callable[[Any], None]] = {
            UdpReceived: self._on_udp_received,
            UdpUnreachable: self._on_udp_unreachable,
            PingReply: self._on_ping_reply,
            PingUnreachable: self._on_ping_unreachable,
            FlowExpired: lambda event: None,
        }

    # ------------------------------------------------------------------ life cycle

    @property
    def tun(self) -> TunDevice | None:
        return self._tun

    @property
    def tunnel(self) -> TunnelLike:
        return self._tunnel

    @property
    def tunnel_is_up(self) -> bool:
        return self._tunnel_up.is_set()

    @property
    def datagrams_ok(self) -> bool:
        """Whether UDP and ping can pass (the relay is open, or datagrams are disabled)."""
        if not self._config.datagrams:
            return True
        relay = self._relay
        return relay is not None and not getattr(relay, "is_closed", False)

    @property
    def listener_port(self) -> int | None:
        return self._listener.getsockname()[1] if self._listener is not None else None

    async def start(self) -> None:
        config = self._config
        _check_no_routing_loop(config)
        self._loop = loop = asyncio.get_running_loop()
        try:
            self._tun = tun = TunDevice.open(config.tun_name, offload=config.offload)
            self._link = link = await TunLinkConfig.open(tun.name)
            _disable_ipv6(tun.name)
            mtu = config.mtu or (1500 if tun.vnet_header else 65000)
            await link.set_up(mtu=mtu, txqueuelen=config.txqueuelen)
            await link.add_address(config.tun_address, 32)
            await link.add_route(IPv4Network(f"{config.fake_peer}/32"))
            for network in config.routes:
                await link.add_route(network)
            self._listener = listener = _listen_on(config.tun_address, tun.name)
            self._router = PacketRouter(
                RouterConfig(
                    tun_address=config.tun_address,
                    fake_peer=config.fake_peer,
                    listener_port=listener.getsockname()[1],
                    vnet_header=tun.vnet_header,
                    dial_timeout=config.dial_timeout + 1.0,
                )
            )
            if config.datagrams:
                self._relay = await self._tunnel.open_datagrams(self._on_relay_event)
            loop.add_reader(tun.fileno(), self._on_tun_readable)
            self._spawn(self._accept_loop())
        except BaseException:
            await self.stop()
            raise
        log.info(
            "data plane up: %s (%s), listener %s:%d, routes %s",
            tun.name,
            "offload" if tun.vnet_header else "plain",
            config.tun_address,
            self.listener_port,
            ", ".join(map(str, config.routes)),
        )

    def tunnel_lost(self) -> None:
        """The tunnel died: reset its TCP flows, drop datagrams, hold new dials.

        Keeps the TUN, routes, NAT and listener. Relayed TCP flows cannot survive (their SSH
        channels are gone): each app socket is reset. Call :meth:`replace_tunnel` when a new
        tunnel is up.
        """
        if not self._tunnel_up.is_set():
            return
        self._tunnel_up.clear()
        self._stats.tunnel_losses += 1
        relays = list(self._tcp_relays)
        self._stats.tcp_resets_on_tunnel_loss += len(relays)
        self._stats.tcp_resets_to_app += len(relays)
        for task in relays:
            task.cancel()  # _relay_tcp resets the app socket and closes the channel
        for _reader, writer in self._pending_streams.values():
            _close_quietly(writer)  # its SYN was released: accept() will find no stream, RST
        self._pending_streams.clear()
        relay, self._relay = self._relay, None
        if relay is not None:
            self._spawn(_close_relay(relay))

    async def replace_tunnel(self, tunnel: TunnelLike) -> None:
        """Carry traffic over *tunnel* from now on; held dials go through it at once.

        The datagram relay is reopened; if that fails the error is raised after the tunnel
        is installed (TCP works; the caller reports the session as degraded and may call
        :meth:`reopen_datagrams` later).
        """
        old_relay, self._relay = self._relay, None
        if old_relay is not None:
            self._spawn(_close_relay(old_relay))
        self._tunnel = tunnel
        self._tunnel_up.set()
        await self.reopen_datagrams()

    async def reopen_datagrams(self) -> None:
        """Open the UDP/ping relay on the current tunnel if it is not open."""
        if not self._config.datagrams or self.datagrams_ok or self._router is None:
            return
        tunnel = self._tunnel
        relay = await tunnel.open_datagrams(self._on_relay_event)
        if tunnel is not self._tunnel or not self._tunnel_up.is_set():
            await _close_relay(relay)  # the tunnel changed meanwhile
            return
        self._relay = relay

    async def stop(self) -> None:
        """Tear everything down; safe to call twice or after a failed start."""
        if self._loop is not None and self._tun is not None and not self._tun.closed:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._tun.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for _reader, writer in self._pending_streams.values():
            _close_quietly(writer)
        self._pending_streams.clear()
        if self._relay is not None:
            with contextlib.suppress(Exception):
                await self._relay.close()
            self._relay = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._link is not None:
            await self._link.close()
            self._link = None
        if self._tun is not None:
            self._tun.close()

    # ------------------------------------------------------------------ counters

    @property
    def counters(self) -> dict[str, int]:
        """Router counters (traffic, flows, drops by reason) plus the relays' counters."""
        snapshot: dict[str, int] = {}
        if self._router is not None:
            snapshot.update(self._router.counters.as_dict())
        stats = self._stats
        snapshot.update(
            {
                "tcp_relays_active": stats.tcp_relays_active,
                "tcp_relays_total": stats.tcp_relays_total,
                "tcp_bytes_up": stats.tcp_bytes_up,
                "tcp_bytes_down": stats.tcp_bytes_down,
                "tcp_resets_to_app": stats.tcp_resets_to_app,
                "listener_refused": stats.listener_refused,
                "tun_write_dropped": stats.tun_write_dropped,
                "dials_held": stats.dials_held,
                "tunnel_losses": stats.tunnel_losses,
                "tcp_resets_on_tunnel_loss": stats.tcp_resets_on_tunnel_loss,
                "datagrams_dropped_tunnel_down": stats.datagrams_dropped_tunnel_down,
            }
        )
        snapshot.update({f"dial_error.{k}": v for k, v in sorted(stats.dial_errors.items())})
        return snapshot

    # ------------------------------------------------------------------ TUN and router

    def _on_tun_readable(self) -> None:
        tun, router, loop = self._tun, self._router, self._loop
        if tun is None or router is None or loop is None:
            return
        now = loop.time()
        for _ in range(_TUN_BATCH):
            try:
                packet = tun.read()
            except OSError as exc:
                log.warning("TUN read failed: %s", exc)
                break
            if packet is None:
                break
            router.receive_from_tun(packet, now=now)
            # write as we go: keeps GSO super-packets from piling up in memory
            self._write_packets(router)
        self._pump()

    def _write_packets(self, router: PacketRouter) -> None:
        tun = self._tun
        if tun is None:
            return
        for packet in router.packets_to_tun():
            try:
                written = tun.write(packet)
            except OSError as exc:
                log.debug("TUN write failed: %s", exc)
                written = False
            if not written:
                self._stats.tun_write_dropped += 1

    def _pump(self) -> None:
        """Flush the router: packets to the TUN, events to their handlers, re-arm the timer."""
        router, loop = self._router, self._loop
        if router is None or loop is None:
            return
        while True:
            self._write_packets(router)
            event: Event | None = router.next_event()
            if event is None:
                break
            self._event_handlers[type(event)](event)
        when = router.get_timer()
        if when != self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(when, self._on_timer) if when is not None else None
            self._timer_when = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        if self._router is not None and self._loop is not None:
            self._router.handle_timer(self._loop.time())
            self._pump()

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    # ------------------------------------------------------------------ TCP

    def _on_dial_requested(self, event: TcpDialRequested) -> None:
        self._spawn(self._dial(event))

    async def _open_through_tunnel(self, event: TcpDialRequested) -> tuple[Any, Any]:
        """Dial through the current tunnel, waiting for it (within the dial timeout) when it
        is down, and trying again on the new one when it dies mid-dial."""
        deadline = time.monotonic() + self._config.dial_timeout
        while True:
            if not self._tunnel_up.is_set():
                self._stats.dials_held += 1
                try:
                    await asyncio.wait_for(
                        self._tunnel_up.wait(), max(0.0, deadline - time.monotonic())
                    )
                except TimeoutError:
                    raise DialTimeout("the tunnel is down (reconnecting)") from None
            tunnel = self._tunnel
            try:
                return await tunnel.open_tcp(
                    str(event.dst),
                    event.dport,
                    timeout=max(0.1, deadline - time.monotonic()),
                )
            except (DialRefused, DialUnreachable, DialTimeout):
                raise
            except (DialError, OSError):
                # the tunnel itself failed; a replacement within the deadline gets a go
                replaced = tunnel is not self._tunnel or not self._tunnel_up.is_set()
                if not replaced or time.monotonic() >= deadline:
                    raise

    async def _dial(self, event: TcpDialRequested) -> None:
        router = self._router
        if router is None:
            return
        try:
            reader, writer = await self._open_through_tunnel(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = _dial_outcome(exc)
            key = type(exc).__name__
            self._stats.dial_errors[key] = self._stats.dial_errors.get(key, 0) + 1
            log.debug("dial %s:%d failed: %s (%s)", event.dst, event.dport, exc, outcome.value)
            router.dial_failed(event.flow_key, outcome, now=self._now())
            self._pump()
            return
        if router.dial_succeeded(event.flow_key, now=self._now()):
            # stored before the released SYN reaches the TUN (in _pump), so before accept()
            self._pending_streams[event.flow_key] = (reader, writer)
        else:
            _close_quietly(writer)
        self._pump()

    def _on_flow_ended(self, event: TcpFlowEnded) -> None:
        stream = self._pending_streams.pop(event.flow_key, None)
        if stream is not None:
            _close_quietly(stream[1])

    async def _accept_loop(self) -> None:
        listener, loop = self._listener, self._loop
        if listener is None or loop is None:
            return
        fake_peer = str(self._config.fake_peer)
        while True:
            try:
                sock, (peer_ip, peer_port) = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                # EMFILE, ENOBUFS, ECONNABORTED...: keep serving the other flows
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            flow_key = None
            if peer_ip == fake_peer and self._router is not None:
                flow_key = self._router.nat_lookup_accepted(peer_port, now=self._now())
            stream = self._pending_streams.pop(flow_key, None) if flow_key is not None else None
            if flow_key is None or stream is None:
                # a local process dialling A:P directly, or a flow we no longer know
                self._stats.listener_refused += 1
                log.debug("refusing listener connection from %s:%d", peer_ip, peer_port)
                _reset_socket(sock)
                continue
            with contextlib.suppress(OSError):  # a relay forwards segments as they come
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader, writer = stream
            if callable(getattr(writer, "splice", None)):  # an SSH channel: callbacks
                relay = self._splice_tcp(flow_key, sock, writer)
            else:  # any other stream pair: a task per direction
                relay = self._relay_tcp(flow_key, sock, reader, writer)
            self._spawn(relay, group=self._tcp_relays)

    async def _splice_tcp(self, flow_key: FlowKey, sock: socket.socket, writer: Any) -> None:
        """Relay one flow with :class:`SocketSplice` (same rules as :meth:`_relay_tcp`)."""
        stats, loop = self._stats, asyncio.get_running_loop()
        splice = SocketSplice(writer, stats, loop)
        stats.tcp_relays_active += 1
        stats.tcp_relays_total += 1
        try:
            await loop.connect_accepted_socket(lambda: splice, sock)
            if await splice.ended is FlowEnd.CHANNEL_RESET:
                stats.tcp_resets_to_app += 1
        except BaseException:
            if splice.ended.cancelled() or not splice.ended.done():
                splice.reset()  # cancelled (the tunnel died) or the socket was unusable
                _reset_socket(sock)
            raise
        finally:
            stats.tcp_relays_active -= 1
            if self._router is not None:
                self._router.tcp_flow_closed(flow_key, now=self._now())
                self._pump()

    async def _relay_tcp(
        self, flow_key: FlowKey, sock: socket.socket, reader: Any, writer: Any
    ) -> None:
        stats = self._stats
        try:
            app_reader, app_writer = await asyncio.open_connection(sock=sock, limit=_RELAY_CHUNK)
        except BaseException:
            _reset_socket(sock)
            _close_quietly(writer)
            if self._router is not None:
                self._router.tcp_flow_closed(flow_key, now=self._now())
            raise
        stats.tcp_relays_active += 1
        stats.tcp_relays_total += 1
        up_done = asyncio.Event()
        up = asyncio.ensure_future(self._app_to_channel(app_reader, writer, up_done))
        down = asyncio.ensure_future(self._channel_to_app(reader, writer, app_writer, up_done))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                exc = failed[0].exception()
                if isinstance(exc, _AppReset):
                    _close_quietly(writer)  # app RST -> close the channel
                else:
                    _abort_app(app_writer, sock)  # channel died -> RST to the app
                    stats.tcp_resets_to_app += 1
                for task in (up, down):
                    task.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
            else:
                await asyncio.gather(up, down)
                app_writer.close()
                _close_quietly(writer)
        except asyncio.CancelledError:
            up.cancel()
            down.cancel()
            _abort_app(app_writer, sock)
            _close_quietly(writer)
            raise
        finally:
            stats.tcp_relays_active -= 1
            if self._router is not None:
                self._router.tcp_flow_closed(flow_key, now=self._now())
                self._pump()

    async def _app_to_channel(
        self, app_reader: asyncio.StreamReader, writer: Any, up_done: asyncio.Event
    ) -> None:
        try:
            while True:
                try:
                    data = await app_reader.read(_RELAY_CHUNK)
                except (ConnectionResetError, BrokenPipeError) as exc:
                    raise _AppReset() from exc
                if not data:
                    writer.write_eof()  # app FIN -> channel EOF
                    return
                self._stats.tcp_bytes_up += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            up_done.set()

    async def _channel_to_app(
        self, reader: Any, writer: Any, app_writer: asyncio.StreamWriter, up_done: asyncio.Event
    ) -> None:
        while True:
            data = await reader.read(_RELAY_CHUNK)
            if not data:
                if _closed_without_eof(writer, up_done):
                    raise _ChannelLost()
                if app_writer.can_write_eof():
                    app_writer.write_eof()  # channel EOF -> shutdown(SHUT_WR)
                with contextlib.suppress(ConnectionError):
                    await app_writer.drain()
                return
            self._stats.tcp_bytes_down += len(data)
            app_writer.write(data)
            try:
                await app_writer.drain()
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise _AppReset() from exc

    # ------------------------------------------------------------------ datagrams

    def _on_udp_out(self, event: UdpOut) -> None:
        if self._relay is not None:
            self._relay.send_udp(event.flow_id, event.dst, event.dport, event.payload)
        else:
            self._stats.datagrams_dropped_tunnel_down += 1

    def _on_ping_out(self, event: PingOut) -> None:
        if self._relay is not None:
            self._relay.send_ping(event.flow_id, event.dst, event.ident, event.seq, event.payload)
        else:
            self._stats.datagrams_dropped_tunnel_down += 1

    def _on_relay_event(self, event: Any) -> None:
        handler = self._relay_handlers.get(type(event))
        if handler is None or self._router is None:
            return
        handler(event)
        self._pump()

    def _on_udp_received(self, event: UdpReceived) -> None:
        if self._router is not None and isinstance(event.src, IPv4Address):
            self._router.udp_received(
                event.flow_id, event.src, event.sport, event.payload, now=self._now()
            )

    def _on_udp_unreachable(self, event: UdpUnreachable) -> None:
        if self._router is not None:
            self._router.udp_unreachable(event.flow_id, event.icmp_code)

    def _on_ping_reply(self, event: PingReply) -> None:
        if self._router is not None and isinstance(event.src, IPv4Address):
            self._router.ping_reply(
                event.flow_id, event.src, event.ident, event.seq, event.payload, now=self._now()
            )

    def _on_ping_unreachable(self, event: PingUnreachable) -> None:
        if self._router is not None:
            self._router.ping_unreachable(event.flow_id, event.icmp_code)

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Awaitable[None], group: set[asyncio.Task[None]] | None = None) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        if group is not None:
            group.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._tcp_relays.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("data plane task failed", exc_info=task.exception())


class _AppReset(Exception):
    """The application's socket was reset."""


class _ChannelLost(Exception):
    """The tunnel stream closed without EOF (the destination reset, or the tunnel died)."""


async def _close_relay(relay: DatagramRelayLike) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(relay.close(), 5.0)


def _dial_outcome(exc: BaseException) -> DialOutcome:
    for cls in type(exc).__mro__:
        outcome = _DIAL_OUTCOMES.get(cls)
        if outcome is not None:
            return outcome
    # an unclassified DialError, tunnel trouble, OSError: the host is not reachable for us
    return DialOutcome.UNREACHABLE


def _closed_without_eof(writer: Any, up_done: asyncio.Event) -> bool:
    """Whether an SSH channel was closed by the peer without sending EOF first.

    asyncssh reports both as end of data; the channel's receive state tells them
    apart as long as our own direction is still open (an orderly close only follows
    EOFs in both directions).  Other stream types (asyncio) signal resets by raising.
    """
    channel = getattr(writer, "channel", None)
    state = getattr(channel, "_recv_state", None)
    return state in ("close_pending", "closed") and not up_done.is_set()


def _listen_on(address: IPv4Address, device: str) -> socket.socket:
    """The NAT listener: bound to A and to the TUN device.

    Linux accepts packets for a local address on any interface (weak host model), so
    without the device binding a host on the LAN could reach A:P through the laptop's
    Ethernet. Bound to the TUN, only segments kvpn itself wrote into the TUN (the NAT's
    rewritten SYNs) match; everything else - other interfaces, local processes dialling A:P
    over loopback - gets the kernel's RST. The accept loop also checks the peer is B with a
    NAT entry.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_BINDTODEVICE"):  # Linux; macOS has no equivalent here
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        listener.bind((str(address), 0))
        listener.listen(4096)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _reset_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _abort_app(app_writer: asyncio.StreamWriter, sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    app_writer.transport.abort()


def _close_quietly(writer: Any) -> None:
    with contextlib.suppress(Exception):
        writer.close()


def _disable_ipv6(ifname: str) -> None:
    """Keep IPv6 router solicitations off the TUN (IPv6 is not routed yet); best effort."""
    with (
        contextlib.suppress(OSError),
        open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as knob,
    ):
        knob.write("1")


def _check_no_routing_loop(config: DataPlaneConfig) -> None:
    for address in (*config.protected_addresses, config.tun_address):
        for network in config.routes:
            if address in network:
                raise RoutingLoopError(
                    f"route {network} would send {address} (the tunnel's own peer) into "
                    f"{config.tun_name}; exclude it"
                )
