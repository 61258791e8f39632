"""How a ``direct-tcpip`` channel ends: an orderly end (TCP FIN) or a reset (TCP RST).

Theory of operation. An SSH channel (RFC 4254 section 5.3) has two ending messages:
``SSH_MSG_CHANNEL_EOF`` ("I will send no more data") and ``SSH_MSG_CHANNEL_CLOSE``
("this channel is gone"). TCP has FIN and RST. kvpn maps them like this, on both ends of
the tunnel (the agent in :mod:`kvpn.shadow.tcp_splice`, the laptop in
:mod:`kvpn.tunnel.tcp_channel`):

* a FIN becomes an EOF, an EOF becomes a FIN (``shutdown(SHUT_WR)``);
* an **orderly end** is EOF in both directions, then CLOSE;
* a CLOSE while either direction is still open (no EOF sent, or none received) is a
  **reset**: the agent answers it with ``SO_LINGER 0`` + close on the destination socket,
  the laptop with :class:`ConnectionResetError` on the stream, which the data plane turns
  into a RST to the app.

So a destination RST makes the agent close the channel without EOF, an app RST makes the
data plane close it without EOF, and losing the SSH connection (every channel closes at
once) is a reset too. No extra message is needed, so a plain SSH client still interoperates:
it just sees EOFs and closes.

:class:`ChannelEnding` is the per-channel state machine (sans-IO): feed it what happened,
read back whether the channel ended in order or was reset.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class EndingState(enum.Enum):
    OPEN = "open"
    EOF_SENT = "eof-sent"  # our direction is finished, the peer's is still open
    EOF_RECEIVED = "eof-received"  # the peer's direction is finished, ours is still open
    BOTH_EOF = "both-eof"  # both finished: a CLOSE now is the orderly end
    CLOSED = "closed"  # terminal: orderly end
    RESET = "reset"  # terminal: CLOSE came while a direction was still open


class EndingEvent(enum.Enum):
    SEND_EOF = "send-eof"
    RECEIVE_EOF = "receive-eof"
    CLOSE = "close"  # sent or received: either way the channel is gone


_TRANSITIONS: Mapping[tuple[EndingState, EndingEvent], EndingState] = {
    (EndingState.OPEN, EndingEvent.SEND_EOF): EndingState.EOF_SENT,
    (EndingState.OPEN, EndingEvent.RECEIVE_EOF): EndingState.EOF_RECEIVED,
    (EndingState.OPEN, EndingEvent.CLOSE): EndingState.RESET,
    (EndingState.EOF_SENT, EndingEvent.RECEIVE_EOF): EndingState.BOTH_EOF,
    (EndingState.EOF_SENT, EndingEvent.CLOSE): EndingState.RESET,
    (EndingState.EOF_RECEIVED, EndingEvent.SEND_EOF): EndingState.BOTH_EOF,
    (EndingState.EOF_RECEIVED, EndingEvent.CLOSE): EndingState.RESET,
    (EndingState.BOTH_EOF, EndingEvent.CLOSE): EndingState.CLOSED,
}

TERMINAL_STATES = frozenset({EndingState.CLOSED, EndingState.RESET})


class ChannelEnding:
    """Tracks one channel's EOFs and CLOSE.

    Events that do not move the state (a second EOF the same way, anything after the
    channel ended) are ignored and counted in :attr:`ignored`: the callers are asyncssh
    callbacks, which already refuse out-of-order messages from the peer.
    """

    __slots__ = ("ignored", "state")

    def __init__(self) -> None:
        self.state = EndingState.OPEN
        self.ignored = 0

    def handle(self, event: EndingEvent) -> EndingState:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            self.ignored += 1
        else:
            self.state = new
        return self.state

    @property
    def both_eof(self) -> bool:
        return self.state is EndingState.BOTH_EOF

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def was_reset(self) -> bool:
        return self.state is EndingState.RESET


__all__ = ["TERMINAL_STATES", "ChannelEnding", "EndingEvent", "EndingState"]
