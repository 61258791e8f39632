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
"""

from __future__ import annotations

from typing import cast

import asyncssh
from asyncssh.stream import SSHTCPStreamSession

from kvpn.shadow.channel_ending import ChannelEnding, EndingEvent, EndingState
from kvpn.tunnel.errors import StreamReset


class TcpChannelSession(SSHTCPStreamSession[bytes]):
    """asyncssh's TCP stream session plus the ending rule."""

    def __init__(self) -> None:
        super().__init__()
        self.ending = ChannelEnding()
        self._closed_locally = False

    def note_eof_sent(self) -> None:
        self.ending.handle(EndingEvent.SEND_EOF)

    def note_local_close(self) -> None:
        self._closed_locally = True

    def eof_received(self) -> bool:
        self.ending.handle(EndingEvent.RECEIVE_EOF)
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.ending.handle(EndingEvent.CLOSE)
        if exc is None and state is EndingState.RESET and not self._closed_locally:
            exc = StreamReset("the destination reset the connection (channel closed without EOF)")
        super().connection_lost(exc)


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


async def open_tcp_channel(
    conn: asyncssh.SSHClientConnection, host: str, port: int
) -> tuple[asyncssh.SSHReader[bytes], TcpChannelWriter]:
    """Open a ``direct-tcpip`` channel (raises asyncssh.ChannelOpenError on failure)."""
    chan, session = await conn.create_connection(TcpChannelSession, host, port, encoding=None)
    tcp_session = cast(TcpChannelSession, session)  # the factory's object
    return asyncssh.SSHReader[bytes](tcp_session, chan), TcpChannelWriter(tcp_session, chan)


__all__ = ["StreamReset", "TcpChannelSession", "TcpChannelWriter", "open_tcp_channel"]
