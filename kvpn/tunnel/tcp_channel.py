"""The laptop end of one ``direct-tcpip`` channel as an asyncssh reader/writer pair that
tells a reset from an orderly end (see :mod:`kvpn.shadow.channel_ending`).

asyncssh's own stream session reports "the agent sent EOF" and "the agent closed the
channel without EOF" the same way: ``read()`` returns ``b""``. Here the second one, a
destination reset on the agent's side, raises :class:`StreamReset` (a
:class:`ConnectionResetError`) from ``read()`` after the data that came before it, and from
``drain()``, exactly like a reset asyncio socket stream. A close by the agent after its
EOF but before ours (the destination reset after its FIN) raises it from ``drain()``.

Closing our side follows the same rule: :meth:`TcpChannelWriter.close` after
:meth:`~TcpChannelWriter.write_eof` and the agent's EOF is an orderly end; closing earlier
(what the data plane does when the app resets) makes the agent reset the destination.
:meth:`TcpChannelWriter.abort` is the explicit reset (unsent data is discarded).

**Splicing.** A relay that forwards bytes between the channel and a socket does not need a
reader task: :meth:`TcpChannelWriter.splice` hands every later channel event to a
:class:`ChannelSink` as a callback (data, EOF, close with the same reset rule, and
"stop/go on writing" from the channel's write buffer), after delivering what the stream
had already buffered. It saves an event-loop hop, a wake-up and a copy per message; the
data plane uses it when the tunnel offers it (:mod:`kvpn.dataplane`).
"""

from __future__ import annotations

from typing import Protocol, cast

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.stream import SSHTCPStreamSession

from kvpn.shadow.channel_ending import ChannelEnding, EndingEvent, EndingState
from kvpn.shadow.gcm_channel_data import fast_flush, send_channel_data
from kvpn.shadow.ssh_wire import watch_peer_eof
from kvpn.tunnel.errors import StreamReset


class ChannelSink(Protocol):
    """What a spliced channel calls (:meth:`TcpChannelWriter.splice`)."""

    def channel_data(self, data: bytes) -> None: ...

    def channel_eof(self) -> None: ...

    def channel_closed(self, exc: Exception | None) -> None:
        """The channel is gone: *exc* is None for an orderly end or a close of our own,
        :class:`StreamReset` (or the connection's error) for a reset."""

    def channel_writable(self, writable: bool) -> None:
        """False: the channel's write buffer is over its high-water mark; True: below."""


class TcpChannelSession(SSHTCPStreamSession[bytes]):
    """asyncssh's TCP stream session plus the ending rule."""

    def __init__(self) -> None:
        super().__init__()
        self.ending = ChannelEnding()
        self._closed_locally = False
        self._sink: ChannelSink | None = None
        self._peer_eof = False  # an EOF really received (not the one a close implies)
        self._eof_queued = False  # asyncssh has the peer's EOF (maybe not delivered yet)
        self._close_when_flushed = False

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        super().connection_made(chan)
        watch_peer_eof(chan, self._note_eof_queued)
        fast_flush(chan)  # queued data leaves with few copies too

    def _note_eof_queued(self) -> None:
        self._eof_queued = True

    def note_eof_sent(self) -> None:
        self.ending.handle(EndingEvent.SEND_EOF)

    def note_local_close(self) -> None:
        self._closed_locally = True

    def close_when_flushed(self) -> None:
        """Close once what is buffered (and a pending EOF) is sent: asyncssh's close()
        would drop a pending EOF and send a bare CLOSE, which the agent takes for a reset."""
        chan = self._chan
        if chan is None:
            return
        self._closed_locally = True
        if chan.get_write_buffer_size() == 0:
            chan.close()
            return
        # resume_writing fires when the buffer is empty (low-water 0), just before the EOF
        self._close_when_flushed = True
        chan.set_write_buffer_limits(high=0, low=0)

    @property
    def accepts_bytearray_data(self) -> bool:
        """Spliced, data goes straight to the app socket: kvpn/shadow/gcm_channel_data.py may
        deliver its decrypted buffer (a bytearray) instead of a bytes copy."""
        return self._sink is not None

    def splice(self, sink: ChannelSink) -> None:
        """Hand the channel's events to *sink* from now on (see the module docstring)."""
        if self._sink is not None:
            raise RuntimeError("the channel is already spliced")
        self._sink = sink
        buffered, self._recv_buf[None] = self._recv_buf[None], []
        self._recv_buf_len = 0
        for item in buffered:
            if isinstance(item, bytes | bytearray):
                sink.channel_data(bytes(item))
        if self._read_paused and self._chan is not None:
            self._read_paused = False
            self._chan.resume_reading()
        if self._peer_eof:
            sink.channel_eof()
        if self._connection_lost:
            sink.channel_closed(self._exception)
        elif self._write_paused:
            sink.channel_writable(False)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        sink = self._sink
        if sink is None:
            super().data_received(data, datatype)
        elif datatype is None:
            sink.channel_data(data)

    def eof_received(self) -> bool:
        self.ending.handle(EndingEvent.RECEIVE_EOF)
        if not self._connection_lost:
            self._peer_eof = True
        sink = self._sink
        if sink is None:
            return super().eof_received()
        self._eof_received = True
        sink.channel_eof()
        return True  # keep our direction open

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._sink is not None:
            self._sink.channel_writable(False)

    def resume_writing(self) -> None:
        if self._close_when_flushed and self._chan is not None:
            # the EOF goes out right after this callback returns; close after it
            self._close_when_flushed = False
            self._chan.get_loop().call_soon(self._chan.close)
            return
        super().resume_writing()
        if self._sink is not None:
            self._sink.channel_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._eof_queued and not self._peer_eof and not self._connection_lost:
            self.eof_received()  # a CLOSE overtook the EOF while we were paused (ssh_wire)
        state = self.ending.handle(EndingEvent.CLOSE)
        if exc is None and state is EndingState.RESET and not self._closed_locally:
            exc = StreamReset("the destination reset the connection (channel closed without EOF)")
        sink = self._sink
        if sink is None:
            super().connection_lost(exc)
            return
        self._connection_lost = True
        self._exception = exc
        sink.channel_closed(exc)


class TcpChannelWriter(asyncssh.SSHWriter[bytes]):
    """An :class:`asyncssh.SSHWriter` that tells its session about EOF and local close."""

    def __init__(self, session: TcpChannelSession, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        super().__init__(session, chan)
        self._tcp_session = session

    @property
    def was_reset(self) -> bool:
        """Whether the channel has ended in a reset (either side); a public replacement for
        peeking at asyncssh's channel receive state."""
        return self._tcp_session.ending.was_reset

    def write(self, data: bytes) -> None:
        """Send *data* on the channel, with fewer copies on an AES-GCM connection
        (kvpn/shadow/gcm_channel_data.py)."""
        send_channel_data(self.channel, data)

    def write_eof(self) -> None:
        if not self.channel.is_closing():
            self._tcp_session.note_eof_sent()
        super().write_eof()

    def close(self) -> None:
        self._tcp_session.note_local_close()
        super().close()

    def abort(self) -> None:
        """Reset the connection: the destination gets a RST, unsent data is dropped."""
        self._tcp_session.note_local_close()
        self.channel.abort()

    def close_when_flushed(self) -> None:
        """The orderly close after both EOFs: the channel closes once the data and the EOF
        still buffered are sent (:meth:`close` may drop a pending EOF: a reset)."""
        self._tcp_session.close_when_flushed()

    def splice(self, sink: ChannelSink) -> None:
        """Deliver the channel's data, EOF, close and write pressure to *sink* as callbacks
        instead of through the reader (which must not be used afterwards); data the reader
        has buffered is delivered first. Write with :meth:`write`, pause the channel's
        delivery with :meth:`pause_reading`."""
        self._tcp_session.splice(sink)

    def pause_reading(self) -> None:
        """Stop delivering channel data to the sink (asyncssh buffers it and stops
        widening the peer's window)."""
        self.channel.pause_reading()

    def resume_reading(self) -> None:
        self.channel.resume_reading()


async def open_tcp_channel(
    conn: asyncssh.SSHClientConnection, host: str, port: int
) -> tuple[asyncssh.SSHReader[bytes], TcpChannelWriter]:
    """Open a ``direct-tcpip`` channel (raises asyncssh.ChannelOpenError on failure)."""
    chan, session = await conn.create_connection(TcpChannelSession, host, port, encoding=None)
    tcp_session = cast(TcpChannelSession, session)  # the factory's object
    return asyncssh.SSHReader[bytes](tcp_session, chan), TcpChannelWriter(tcp_session, chan)


__all__ = [
    "ChannelSink",
    "StreamReset",
    "TcpChannelSession",
    "TcpChannelWriter",
    "open_tcp_channel",
]
