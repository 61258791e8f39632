"""The laptop's half of a relayed TCP flow as callbacks: the app's socket (accepted by the
data plane's NAT listener) spliced to its ``direct-tcpip`` channel, with no task per
direction (the agent's half is :mod:`kvpn.shadow.tcp_splice`).

Theory of operation. :class:`SocketSplice` is the asyncio protocol of the app's socket and,
through :meth:`kvpn.tunnel.tcp_channel.TcpChannelWriter.splice`, the channel's
:class:`~kvpn.tunnel.tcp_channel.ChannelSink`. Each message costs one callback and one write
on the other side (a reader task costs a wake-up, an event-loop hop and a copy more). The
rules are those of the stream relay it replaces (:mod:`kvpn.dataplane`):

* **Flow control** both ways: the channel's write buffer over its high-water mark pauses
  reading the app socket; the app socket's write buffer over its high-water mark pauses the
  channel's delivery (asyncssh then buffers and stops widening the agent's window).
* **Half-close**: app FIN -> channel EOF; channel EOF -> ``shutdown(SHUT_WR)`` once the data
  before it is written. When both are done the flow ends in order: the app socket closes
  after its buffer drains, then the channel closes.
* **Resets**: an error on the app socket (its RST) closes the channel before both EOFs, so the
  agent resets the destination; a channel closed with an error (a destination RST, the SSH
  connection lost) or refusing our data resets the app socket (``SO_LINGER 0``).

:attr:`SocketSplice.ended` resolves to how the flow ended; :meth:`SocketSplice.reset` is
the outside stop (the tunnel died): RST to the app, channel closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from typing import Protocol, cast

__all__ = ["ByteCounters", "FlowEnd", "SocketSplice", "SpliceableChannel"]

_LINGER_RESET = struct.pack("ii", 1, 0)


class FlowEnd(enum.Enum):
    ORDERLY = "orderly"  # EOF both ways
    APP_RESET = "app-reset"  # the app socket failed: the channel was closed (reset)
    CHANNEL_RESET = "channel-reset"  # the channel was reset: the app socket got a RST


class SpliceableChannel(Protocol):
    """What :class:`SocketSplice` needs from the channel (a ``TcpChannelWriter``)."""

    def splice(self, sink: SocketSplice) -> None: ...
    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def close_when_flushed(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class ByteCounters(Protocol):
    tcp_bytes_up: int
    tcp_bytes_down: int


class SocketSplice(asyncio.Protocol):
    """The app socket's protocol and its channel's sink (see the module docstring)."""

    def __init__(
        self, channel: SpliceableChannel, counters: ByteCounters, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._channel = channel
        self._counters = counters
        self._transport: asyncio.Transport | None = None
        self._app_eof = False  # the app's FIN went out as the channel's EOF
        self._channel_eof = False  # the channel's EOF went out as a FIN to the app
        self.ended: asyncio.Future[FlowEnd] = loop.create_future()

    # ---------------------------------------------------------------- app socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._channel.splice(self)  # what the channel already holds is written now

    def data_received(self, data: bytes) -> None:
        self._counters.tcp_bytes_up += len(data)
        try:
            self._channel.write(data)
        except OSError:  # the channel is closing: it will not carry this
            self._end(FlowEnd.CHANNEL_RESET)

    def eof_received(self) -> bool:
        self._app_eof = True
        try:
            self._channel.write_eof()  # app FIN -> channel EOF
        except OSError:
            self._end(FlowEnd.CHANNEL_RESET)
            return True
        if self._channel_eof:
            self._end(FlowEnd.ORDERLY)
        return True  # half-closed: the channel may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        # only an error gets here before the end (we keep the socket open after its EOF)
        self._end(FlowEnd.APP_RESET)

    def pause_writing(self) -> None:
        self._channel.pause_reading()

    def resume_writing(self) -> None:
        self._channel.resume_reading()

    # ---------------------------------------------------------------- channel (sink)

    def channel_data(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._counters.tcp_bytes_down += len(data)
            transport.write(data)

    def channel_eof(self) -> None:
        self._channel_eof = True
        transport = self._transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()  # shutdown(SHUT_WR) once the buffer is written
        if self._app_eof:
            self._end(FlowEnd.ORDERLY)

    def channel_closed(self, exc: Exception | None) -> None:
        if exc is not None:
            self._end(FlowEnd.CHANNEL_RESET)
        elif self._app_eof and self._channel_eof:
            self._end(FlowEnd.ORDERLY)
        else:  # closed by us (the flow has ended already) or without EOF: a reset
            self._end(FlowEnd.CHANNEL_RESET)

    def channel_writable(self, writable: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        if writable:
            transport.resume_reading()
        else:
            transport.pause_reading()

    # ---------------------------------------------------------------- ending

    def reset(self) -> None:
        """Stop from outside: RST to the app, the channel closed (the destination reset)."""
        self._reset_app()
        _close_quietly(self._channel)
        if not self.ended.done():
            self.ended.set_result(FlowEnd.CHANNEL_RESET)

    def _end(self, how: FlowEnd) -> None:
        if self.ended.done():
            return
        self.ended.set_result(how)
        if how is FlowEnd.ORDERLY:
            if self._transport is not None:
                self._transport.close()  # after what is still buffered
            with contextlib.suppress(Exception):
                self._channel.close_when_flushed()  # after our data and EOF
            return
        if how is FlowEnd.CHANNEL_RESET:
            self._reset_app()
        elif self._transport is not None:
            self._transport.abort()
        _close_quietly(self._channel)  # before both EOFs: the agent resets the destination

    def _reset_app(self) -> None:
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: uvloop, closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


def _close_quietly(channel: SpliceableChannel) -> None:
    with contextlib.suppress(Exception):
        channel.close()
