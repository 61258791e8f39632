"""The ending rule shared by the agent and the tunnel client: EOF both ways then CLOSE is an
orderly end, a CLOSE any earlier is a reset."""

from __future__ import annotations

import pytest

from kvpn.shadow.channel_ending import ChannelEnding, EndingEvent, EndingState

SEND, RECV, CLOSE = EndingEvent.SEND_EOF, EndingEvent.RECEIVE_EOF, EndingEvent.CLOSE

CASES = [
    # events, final state, events ignored
    ([CLOSE], EndingState.RESET, 0),
    ([SEND, CLOSE], EndingState.RESET, 0),
    ([RECV, CLOSE], EndingState.RESET, 0),
    ([SEND, RECV], EndingState.BOTH_EOF, 0),
    ([RECV, SEND], EndingState.BOTH_EOF, 0),
    ([SEND, RECV, CLOSE], EndingState.CLOSED, 0),
    ([RECV, SEND, CLOSE], EndingState.CLOSED, 0),
    ([SEND, SEND, RECV, CLOSE], EndingState.CLOSED, 1),
    ([CLOSE, RECV, SEND], EndingState.RESET, 2),  # nothing moves a terminal state
    ([SEND, RECV, CLOSE, CLOSE], EndingState.CLOSED, 1),
]


@pytest.mark.parametrize(("events", "final", "ignored"), CASES)
def test_transitions(events: list[EndingEvent], final: EndingState, ignored: int) -> None:
    ending = ChannelEnding()
    for event in events:
        ending.handle(event)
    assert ending.state is final
    assert ending.ignored == ignored
    assert ending.ended == (final in (EndingState.CLOSED, EndingState.RESET))
    assert ending.was_reset == (final is EndingState.RESET)


def test_handle_returns_the_new_state() -> None:
    ending = ChannelEnding()
    assert ending.handle(SEND) is EndingState.EOF_SENT
    assert not ending.both_eof
    assert ending.handle(RECV) is EndingState.BOTH_EOF
    assert ending.both_eof
