"""The reconnect state machine, driven by a scripted clock (aioquic style)."""

from __future__ import annotations

import pytest

from kvpn.link_state import (
    IGNORED,
    LINK_TRANSITIONS,
    Backoff,
    LinkEvent,
    LinkMachine,
    LinkState,
    LinkStateError,
)


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=10.0)
    assert [backoff.delay(n) for n in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_loss_then_attempts_with_backoff_then_reconnected() -> None:
    now = 100.0
    machine = LinkMachine(now=now)
    assert machine.state is LinkState.CONNECTED and machine.get_timer() is None

    now += 5
    change = machine.handle(LinkEvent.LOST, now=now, reason="the port-forward closed")
    assert change is not None
    assert change.describe() == "reconnecting: the port-forward closed"
    assert machine.get_timer() == now  # first attempt at once

    expected_waits = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    for wait in expected_waits:
        assert machine.handle_timer(now=now)
        assert machine.get_timer() is None  # attempt in flight: no second one
        now += 0.5
        assert machine.handle(LinkEvent.ATTEMPT_FAILED, now=now, reason="pod not ready") is None
        assert machine.get_timer() == now + wait
        assert not machine.handle_timer(now=now + wait - 0.01)
        now += wait
    snapshot = machine.snapshot()
    assert snapshot.state is LinkState.RECONNECTING
    assert snapshot.attempts == len(expected_waits)
    assert snapshot.last_error == "pod not ready"
    assert snapshot.since == 105.0

    assert machine.handle_timer(now=now)
    now += 0.25
    change = machine.handle(LinkEvent.HEALTHY, now=now)
    assert change is not None and change.new is LinkState.CONNECTED
    assert change.outage == pytest.approx(now - 105.0)
    assert change.describe() == f"reconnected after {now - 105.0:.1f} s"
    snapshot = machine.snapshot()
    assert snapshot.reconnects == 1 and snapshot.reason == "" and snapshot.next_attempt is None


def test_a_new_loss_restarts_the_backoff() -> None:
    machine = LinkMachine(now=0.0, backoff=Backoff(initial=1, cap=4))
    machine.handle(LinkEvent.LOST, now=0.0, reason="x")
    for t in (0.0, 1.0, 3.0):
        assert machine.handle_timer(now=t + 0.0)
        machine.handle(LinkEvent.ATTEMPT_FAILED, now=t, reason="e")
    machine.handle_timer(now=10.0)
    machine.handle(LinkEvent.HEALTHY, now=10.0)
    machine.handle(LinkEvent.LOST, now=20.0, reason="again")
    assert machine.get_timer() == 20.0
    assert machine.snapshot().attempts == 0 and machine.snapshot().last_error == ""


def test_degraded_and_back_reports_each_change_once() -> None:
    machine = LinkMachine(now=0.0)
    change = machine.handle(LinkEvent.PARTIAL, now=1.0, reason="UDP relay unavailable")
    assert change is not None and change.describe() == "degraded: UDP relay unavailable"
    assert machine.handle(LinkEvent.PARTIAL, now=2.0, reason="UDP relay unavailable") is None
    change = machine.handle(LinkEvent.PARTIAL, now=3.0, reason="keepalives late")
    assert change is not None and change.new is LinkState.DEGRADED
    assert machine.snapshot().since == 1.0  # same state, new reason
    assert machine.handle(LinkEvent.HEALTHY, now=4.0) is not None
    assert machine.handle(LinkEvent.HEALTHY, now=5.0) is None
    assert machine.state is LinkState.CONNECTED


def test_reconnected_but_partial_is_degraded() -> None:
    machine = LinkMachine(now=0.0)
    machine.handle(LinkEvent.LOST, now=0.0, reason="gone")
    machine.handle_timer(now=0.0)
    change = machine.handle(LinkEvent.PARTIAL, now=2.0, reason="UDP relay unavailable")
    assert change is not None
    assert change.describe() == "reconnected after 2.0 s (degraded: UDP relay unavailable)"
    assert machine.state is LinkState.DEGRADED


def test_ignored_races_and_stop() -> None:
    machine = LinkMachine(now=0.0)
    machine.handle(LinkEvent.LOST, now=0.0, reason="a")
    assert machine.handle(LinkEvent.LOST, now=1.0, reason="b") is None  # late duplicate
    assert machine.snapshot().reason == "a"
    assert machine.handle(LinkEvent.STOP, now=2.0) is not None
    assert machine.state is LinkState.STOPPED and machine.get_timer() is None
    for event in LinkEvent:
        assert machine.handle(event, now=3.0) is None


def test_illegal_events_raise() -> None:
    machine = LinkMachine(now=0.0)
    with pytest.raises(LinkStateError):
        machine.handle(LinkEvent.ATTEMPT_FAILED, now=1.0, reason="no attempt was running")


def test_table_is_complete_and_disjoint() -> None:
    pairs = {(s, e) for s in LinkState for e in LinkEvent}
    assert not set(LINK_TRANSITIONS) & IGNORED
    missing = pairs - set(LINK_TRANSITIONS) - IGNORED
    # only "an attempt failed" outside RECONNECTING is illegal
    assert missing == {
        (LinkState.CONNECTED, LinkEvent.ATTEMPT_FAILED),
        (LinkState.DEGRADED, LinkEvent.ATTEMPT_FAILED),
    }
