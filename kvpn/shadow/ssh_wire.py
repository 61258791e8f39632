"""How both ends of the kvpn tunnel put their asyncssh connection on the wire, cheaply.

Three per-packet costs of asyncssh (2.14 and later) dominate a tunnel that carries many
small messages or bulk data, and all three are removed here without patching asyncssh:

1. **An IGNORE in front of every packet.** Once encryption is on, asyncssh sends an empty
   ``SSH_MSG_IGNORE`` before each packet (the old countermeasure against the CBC-mode
   chosen-plaintext attack). With an AEAD or CTR cipher it protects nothing, yet it costs an
   encryption, a ``getrandom``, a separate ``send()`` - i.e. a separate TCP segment that
   wakes the peer - and a decryption and dispatch at the peer, for every message.
   :func:`suppress_empty_ignores` makes one connection skip those packets unless its cipher
   is CBC (kvpn's client never offers CBC).
2. **One ``send()`` per packet, unbatched.** :class:`CoalescingTransport` holds a write
   shorter than ``hold_below`` bytes and sends it together with the next write (a lone small
   packet is written from ``loop.call_soon``, so it waits at most one loop iteration);
   ``close``/``abort``/``write_eof`` write what is held first, so nothing is reordered or
   lost.
3. **Quadratic input buffering.** asyncssh appends what the socket gives it to one bytes
   buffer and slices each packet off its front, copying the rest of the buffer every time:
   one 256 KiB read of 32 KiB packets costs ~20 copies of the data.
   :class:`CoalescingProtocol` hands it reads in pieces of ``feed_size`` (about one
   packet), which costs ~5 - and, on an AES-GCM connection, decrypts and delivers channel
   data itself with one copy (:mod:`kvpn.shadow.gcm_channel_data`, which also has the
   sending side), giving asyncssh only the other packets.

How it is plugged in: asyncssh accepts a *tunnel* object that makes its TCP connections.
:class:`SocketTunnel` (client: ``asyncssh.connect(..., tunnel=SocketTunnel(sock))`` over an
already-connected socket) and :class:`CoalescingListener` (server:
``asyncssh.listen(host, port, tunnel=CoalescingListener())``) create the asyncio connection
with :class:`CoalescingProtocol` in front of asyncssh's protocol, which gives asyncssh the
wrapped transport and applies :func:`suppress_empty_ignores` to it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from kvpn.shadow.gcm_channel_data import GcmChannelDataReader, feed_in_pieces

__all__ = [
    "FEED_SIZE",
    "HOLD_BELOW",
    "CoalescingListener",
    "CoalescingProtocol",
    "CoalescingTransport",
    "SocketTunnel",
    "WriteCounters",
    "suppress_empty_ignores",
    "watch_peer_eof",
]

#: Writes shorter than this are held for the next write. An encrypted empty IGNORE, EOF or
#: window adjust is 36 bytes with AES-GCM or ChaCha20-Poly1305, up to 52 with an
#: encrypt-then-MAC cipher.
HOLD_BELOW = 64

#: Incoming data is handed to asyncssh in pieces of at most this size (about one packet of
#: the 32 KiB of channel data asyncssh puts in a packet by default).
FEED_SIZE = 32 * 1024

MSG_IGNORE = 2  # RFC 4253
_EMPTY_STRING = b"\x00\x00\x00\x00"  # an SSH string of length 0


@dataclass(slots=True)
class WriteCounters:
    writes: int = 0  # calls to write() by the protocol
    sends: int = 0  # writes handed to the real transport
    deferred_flushes: int = 0  # held data written from call_soon (nothing followed it)
    ignores_suppressed: int = 0  # empty IGNORE packets not sent (suppress_empty_ignores)


def suppress_empty_ignores(conn: Any, counters: WriteCounters | None = None) -> None:
    """Make asyncssh connection *conn* skip the empty IGNORE it puts before every packet.

    An empty ``SSH_MSG_IGNORE`` carries nothing (the peer must ignore it), so skipping it
    cannot change what the peer sees except for the CBC countermeasure: with a ``-cbc``
    cipher it is still sent. Done per connection, by wrapping its ``send_packet`` (asyncssh
    sends the IGNORE through ``self.send_packet``); on an asyncssh without the IGNORE this
    changes nothing.
    """
    original = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if (
            pkttype == MSG_IGNORE
            and args == (_EMPTY_STRING,)
            and not str(conn.get_extra_info("send_cipher", "")).endswith("-cbc")
        ):
            if counters is not None:
                counters.ignores_suppressed += 1
            return
        original(pkttype, *args, **kwargs)

    setattr(conn, "send_packet", send_packet)  # noqa: B010 - mypy refuses a method assignment


def watch_peer_eof(chan: Any, on_eof: Callable[[], None]) -> None:
    """Call *on_eof* as soon as the peer's EOF reaches asyncssh channel *chan*, even while
    the session has paused reading.

    asyncssh holds a received EOF behind the data it holds for a paused session, and a CLOSE
    that arrives meanwhile replaces the pending EOF: the session then gets the data, but
    never ``eof_received``, and sees a close without EOF (which kvpn reads as a reset). The
    peer closes right after both EOFs, so a slow reader at either end would turn an orderly
    end into a reset and lose the data still buffered towards it. asyncssh records the EOF
    and then calls the channel's ``_flush_recv_buf``; that method is wrapped on this one
    channel (on an asyncssh without it, nothing is watched). *on_eof* may be called more
    than once.
    """
    original = getattr(chan, "_flush_recv_buf", None)
    if original is None or not hasattr(chan, "_recv_state"):
        return

    def flush_recv_buf(*args: Any, **kwargs: Any) -> Any:
        if chan._recv_state == "eof_pending":
            on_eof()
        return original(*args, **kwargs)

    setattr(chan, "_flush_recv_buf", flush_recv_buf)  # noqa: B010 - see suppress_empty_ignores


class CoalescingTransport(asyncio.Transport):
    """Wraps a stream transport; a write shorter than *hold_below* waits for the next one."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        *,
        hold_below: int = HOLD_BELOW,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._hold_below = hold_below
        self._held = b""
        self._flush_handle: asyncio.Handle | None = None
        self.counters = WriteCounters()

    # ---------------------------------------------------------------- writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.counters.writes += 1
        if self._held:
            data = self._held + bytes(data)
            self._held = b""
        if len(data) < self._hold_below:
            self._held = bytes(data)
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._deferred_flush)
            return
        self.counters.sends += 1
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        """Hand the pieces to the real transport together (uvloop sends them with one
        ``writev()``), after what is held."""
        pieces = list(list_of_data)
        if not pieces:
            return
        self.counters.writes += len(pieces)
        if self._held:
            pieces.insert(0, self._held)
            self._held = b""
        self.counters.sends += 1
        self._transport.writelines(pieces)

    def _deferred_flush(self) -> None:
        self._flush_handle = None
        if self._held:
            self.counters.deferred_flushes += 1
            self._flush()

    def _flush(self) -> None:
        held, self._held = self._held, b""
        if held and not self._transport.is_closing():
            self.counters.sends += 1
            self._transport.write(held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # ---------------------------------------------------------------- the rest: delegated

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._flush()  # as if it had been written: the real abort drops unsent data
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class CoalescingProtocol(asyncio.Protocol):
    """Sits in front of asyncssh's *protocol*: gives it a :class:`CoalescingTransport`,
    suppresses its empty IGNOREs, delivers channel data itself (``fast_receive``, see
    :mod:`kvpn.shadow.gcm_channel_data`) or feeds it reads in pieces, forwards everything
    else."""

    def __init__(
        self,
        protocol: asyncio.Protocol,
        *,
        hold_below: int = HOLD_BELOW,
        feed_size: int = FEED_SIZE,
        keep_ignores: bool = False,
        fast_receive: bool = True,
    ) -> None:
        self.protocol = protocol
        self._hold_below = hold_below
        self._feed_size = max(1, feed_size)
        self._keep_ignores = keep_ignores
        self.transport: CoalescingTransport | None = None
        self.reader: GcmChannelDataReader | None = None
        if fast_receive and hasattr(protocol, "_recv_pkthdr"):  # an asyncssh connection
            self.reader = GcmChannelDataReader(
                protocol, protocol.data_received, feed_size=self._feed_size
            )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        wrapped = CoalescingTransport(
            cast(asyncio.Transport, transport),
            asyncio.get_running_loop(),
            hold_below=self._hold_below,
        )
        self.transport = wrapped
        if not self._keep_ignores and hasattr(self.protocol, "send_packet"):
            suppress_empty_ignores(self.protocol, wrapped.counters)
        self.protocol.connection_made(wrapped)

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.data_received(data)
            return
        feed_in_pieces(self.protocol.data_received, data, self._feed_size)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


class SocketTunnel:
    """asyncssh ``tunnel=`` for the client: its connection runs over *sock* (connected)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        hold_below: int = HOLD_BELOW,
        feed_size: int = FEED_SIZE,
        keep_ignores: bool = False,
    ) -> None:
        self._sock = sock
        self._options: dict[str, Any] = {
            "hold_below": hold_below,
            "feed_size": feed_size,
            "keep_ignores": keep_ignores,
        }
        self.protocol: CoalescingProtocol | None = None

    async def create_connection(
        self, session_factory: Callable[[], Any], remote_host: str, remote_port: int
    ) -> tuple[asyncio.BaseTransport, Any]:
        loop = asyncio.get_running_loop()
        transport, shim = await loop.create_connection(
            lambda: CoalescingProtocol(session_factory(), **self._options), sock=self._sock
        )
        self.protocol = shim
        return transport, shim.protocol

    def close(self) -> None:
        """Part of asyncssh's tunnel protocol; the socket belongs to the connection."""

    async def wait_closed(self) -> None:
        """Part of asyncssh's tunnel protocol; nothing to wait for."""


class CoalescingListener:
    """asyncssh ``tunnel=`` for the server: a plain TCP listener whose connections coalesce."""

    def __init__(
        self,
        *,
        reuse_address: bool = True,
        hold_below: int = HOLD_BELOW,
        feed_size: int = FEED_SIZE,
        keep_ignores: bool = False,
    ) -> None:
        self._reuse_address = reuse_address
        self._options: dict[str, Any] = {
            "hold_below": hold_below,
            "feed_size": feed_size,
            "keep_ignores": keep_ignores,
        }

    async def create_server(
        self, session_factory: Callable[[str, int], Any], listen_host: str, listen_port: int
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: CoalescingProtocol(session_factory("", 0), **self._options),
            listen_host or None,
            listen_port,
            reuse_address=self._reuse_address,
        )

    def close(self) -> None:
        """Part of asyncssh's tunnel protocol; the server is closed through asyncssh."""

    async def wait_closed(self) -> None:
        """Part of asyncssh's tunnel protocol; nothing to wait for."""
