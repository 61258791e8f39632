"""The agent's half of a forwarded TCP connection: a ``direct-tcpip`` channel spliced to
the socket the agent dialled.

Theory of operation.

* **Nothing the destination sends is lost.** Server-first protocols (SMTP, SSH and MySQL
  banners) talk as soon as the connection is accepted, which is before the client has the
  channel-open confirmation. The dialled socket is therefore paused from its
  ``connection_made`` until asyncssh calls the channel session's ``session_started`` (right
  after it sends the confirmation); anything that still reaches us earlier (data, EOF, an
  error) is queued and replayed in order. The kernel buffers the banner meanwhile.
* **Endings** follow :mod:`kvpn.shadow.channel_ending`: a FIN from the destination becomes a
  channel EOF and a channel EOF a ``shutdown(SHUT_WR)``; once both ways have ended the
  destination socket is closed and the channel closed after our EOF is on the wire. A
  destination reset (``ECONNRESET`` or any socket error) closes the channel *without* EOF,
  after the data already read; a channel closed by the client before both EOFs (an app RST,
  an abandoned dial, a lost SSH connection) resets the destination with ``SO_LINGER 0``.
* **Flow control** both ways: a full channel window pauses reading the destination, a full
  destination socket pauses reading the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

import asyncssh

from kvpn.shadow.channel_ending import ChannelEnding, EndingEvent, EndingState
from kvpn.shadow.dial_errors import DialFailure, classify_dial_error, format_reason
from kvpn.shadow.gcm_channel_data import fast_flush, send_channel_data
from kvpn.shadow.ssh_wire import watch_peer_eof

logger = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_transport(transport: asyncio.Transport) -> None:
    """Close a TCP transport with RST rather than FIN (``SO_LINGER`` 0, then close)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: uvloop, closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class TcpSplice(asyncssh.SSHTCPSession[bytes]):
    """The channel's session; owns the destination transport (fed by :class:`_Destination`)."""

    #: data goes straight to the destination socket: kvpn/shadow/gcm_channel_data.py may
    #: deliver its decrypted buffer (a bytearray) instead of a bytes copy
    accepts_bytearray_data = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._dest: asyncio.Transport | None = None
        self._started = False
        self._backlog: list[Callable[[], None]] = []  # destination events before the start
        self._channel_full = False
        self._close_when_flushed = False
        self._eof_queued = False  # asyncssh has the client's EOF (maybe not delivered yet)
        self._eof_delivered = False
        self.ending = ChannelEnding()

    # ---------------------------------------------------------------- destination side

    def destination_made(self, transport: asyncio.Transport) -> None:
        self._dest = transport
        transport.pause_reading()  # until the channel is open: see the module docstring
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def destination_data(self, data: bytes) -> None:
        if not self._started:
            self._backlog.append(lambda: self.destination_data(data))
            return
        chan = self._chan
        if chan is not None and not chan.is_closing():
            send_channel_data(chan, data)

    def destination_eof(self) -> None:
        if not self._started:
            self._backlog.append(self.destination_eof)
            return
        chan = self._chan
        if chan is not None and not chan.is_closing():
            chan.write_eof()
        self._advance(EndingEvent.SEND_EOF)

    def destination_lost(self, exc: Exception | None) -> None:
        if not self._started:
            self._backlog.append(lambda: self.destination_lost(exc))
            return
        self._dest = None
        if exc is None:
            return  # we closed or reset it ourselves
        logger.debug("destination socket failed (%s): closing the channel without EOF", exc)
        chan = self._chan
        if chan is not None and not self.ending.ended:
            # flushes what was already read, then CLOSE without EOF: the client sees a reset
            chan.close()

    def destination_full(self, full: bool) -> None:
        chan = self._chan
        if chan is None:
            return
        if full:
            chan.pause_reading()
        else:
            chan.resume_reading()

    def abandon(self) -> None:
        """The channel will never open: reset the destination."""
        self._backlog.clear()
        if self._dest is not None:
            reset_transport(self._dest)
            self._dest = None

    # ---------------------------------------------------------------- channel side

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        watch_peer_eof(chan, self._note_eof_queued)
        fast_flush(chan)  # queued data leaves with few copies too

    def _note_eof_queued(self) -> None:
        self._eof_queued = True

    def session_started(self) -> None:
        self._started = True
        backlog, self._backlog = self._backlog, []
        for event in backlog:
            event()
        self._update_destination_reading()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._dest is not None and not self._dest.is_closing():
            self._dest.write(data)

    def eof_received(self) -> bool:
        self._eof_delivered = True
        dest = self._dest
        if dest is not None and not dest.is_closing():
            dest.write_eof()
        self._advance(EndingEvent.RECEIVE_EOF)
        return True  # keep our direction open: the destination may still be talking

    def pause_writing(self) -> None:
        self._channel_full = True
        self._update_destination_reading()

    def resume_writing(self) -> None:
        if self._close_when_flushed:
            # the EOF goes out right after this callback returns; close after it
            self._close_when_flushed = False
            self._loop.call_soon(self._close_channel)
            return
        self._channel_full = False
        self._update_destination_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._eof_queued and not self._eof_delivered:
            # the client's CLOSE overtook its EOF while we were paused (see ssh_wire)
            self.eof_received()
        state = self.ending.handle(EndingEvent.CLOSE)
        self._chan = None
        self._backlog.clear()
        dest, self._dest = self._dest, None
        if dest is None:
            return
        if state is EndingState.RESET:
            logger.debug("channel closed before both EOFs: resetting the destination")
            reset_transport(dest)
        else:
            dest.close()

    # ---------------------------------------------------------------- helpers

    def _advance(self, event: EndingEvent) -> None:
        if self.ending.handle(event) is EndingState.BOTH_EOF:
            self._finish()

    def _finish(self) -> None:
        """Both directions ended in order: close the socket, then the channel after our EOF."""
        if self._dest is not None:
            self._dest.close()
        chan = self._chan
        if chan is None:
            return
        if chan.get_write_buffer_size() == 0:
            chan.close()  # the EOF has been sent
        else:
            # close() now would replace the pending EOF with a bare CLOSE (a reset): wait
            # for the buffer to drain (resume_writing fires at low-water mark 0)
            self._close_when_flushed = True
            chan.set_write_buffer_limits(high=0, low=0)

    def _close_channel(self) -> None:
        if self._chan is not None:
            self._chan.close()

    def _update_destination_reading(self) -> None:
        dest = self._dest
        if dest is None or dest.is_closing():
            return
        if self._started and not self._channel_full:
            dest.resume_reading()
        else:
            dest.pause_reading()


class _Destination(asyncio.Protocol):
    """The dialled socket's protocol: hands every callback to its splice."""

    def __init__(self, splice: TcpSplice) -> None:
        self._splice = splice

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._splice.destination_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._splice.destination_data(data)

    def eof_received(self) -> bool:
        self._splice.destination_eof()
        return True  # half-closed: we may still write what the client sends

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.destination_lost(exc)

    def pause_writing(self) -> None:
        self._splice.destination_full(True)

    def resume_writing(self) -> None:
        self._splice.destination_full(False)


async def dial_destination(
    host: str, port: int, timeout: float, *, connection_closed: Callable[[], bool]
) -> TcpSplice:
    """Connect to host:port for a direct-tcpip channel, classifying failures.

    ``connection_closed`` tells whether the SSH connection went away while we dialled
    (asyncssh then drops the session without a callback, so the socket is reset here).
    """
    loop = asyncio.get_running_loop()
    splice = TcpSplice(loop)
    if not 0 < port < 65536:  # the wire carries a uint32; connect() would raise OverflowError
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED,
            format_reason(DialFailure.OTHER, f"port {port} is out of range"),
        )
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: _Destination(splice), host, port), timeout
        )
    except (ValueError, OverflowError) as exc:
        # a host no resolver accepts (NUL, a label over 63 bytes, a lone surrogate: raised
        # as ValueError/UnicodeError by getaddrinfo): refuse the channel, never the
        # connection (asyncssh treats any other exception as an internal error and
        # disconnects)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED,
            format_reason(DialFailure.NAME_NOT_FOUND, f"invalid destination: {exc}"),
        ) from None
    except (OSError, TimeoutError) as exc:
        failure = classify_dial_error(exc)
        detail = str(exc) or f"no answer within {timeout:g}s"
        logger.debug("dial %s:%d failed: %s (%s)", host, port, failure.value, detail)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED, format_reason(failure, detail)
        ) from None
    if connection_closed():
        splice.abandon()
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
    return splice


__all__ = ["TcpSplice", "dial_destination", "reset_transport"]
