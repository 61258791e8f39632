"""The state of a session's link to its shadow pod, and when to try reconnecting (sans-IO).

Theory of operation
-------------------
A ``kvpn connect`` session keeps its TUN device, routes and DNS for its whole life (an
``exchange``, ``preview`` or ``mesh`` session its Service changes); only the SSH tunnel under
them can die (the port-forward drops, the pod is deleted, the laptop slept).
:class:`LinkMachine` tracks that tunnel with no I/O and no clock of its own: the asyncio
adapter (:mod:`kvpn.link_supervisor`) feeds it :class:`LinkEvent` values with ``now`` and
asks :meth:`LinkMachine.get_timer` when to start the next reconnect attempt::

    CONNECTED  <--HEALTHY/PARTIAL-->  DEGRADED        (tunnel up; DEGRADED: something is
        |                                |              missing, e.g. the UDP relay, or
        +------------LOST----------------+              keepalives are late)
                      v
                RECONNECTING --ATTEMPT_FAILED--> RECONNECTING (next attempt after backoff)
                      |
                      +--HEALTHY--> CONNECTED,  --PARTIAL--> DEGRADED
    any state --STOP--> STOPPED

The first attempt after a loss starts at once; each failed one doubles the wait, from
``Backoff.initial`` up to ``Backoff.cap`` (no jitter: one client per shadow pod, so there is
no herd to spread). There is no give-up: a laptop that slept for hours reconnects when it
wakes, and ``kvpn status`` shows the last error meanwhile. Keepalive detection itself is the
SSH layer's (RFC 4254 section 4 global requests, ``keepalive@openssh.com``).

Pairs missing from :data:`LINK_TRANSITIONS` are bugs in the caller and raise
:class:`LinkStateError`; pairs in :data:`IGNORED` are races that are harmless to drop (a
late "tunnel lost" for a tunnel already given up, a health report during an attempt).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "IGNORED",
    "LINK_TRANSITIONS",
    "Backoff",
    "LinkChange",
    "LinkEvent",
    "LinkMachine",
    "LinkSnapshot",
    "LinkState",
    "LinkStateError",
]


class LinkState(enum.Enum):
    CONNECTED = "connected"
    DEGRADED = "degraded"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


class LinkEvent(enum.Enum):
    HEALTHY = "healthy"  # the tunnel is up and everything works
    PARTIAL = "partial"  # the tunnel is up but something is missing or slow
    LOST = "lost"  # the tunnel died
    ATTEMPT_FAILED = "attempt_failed"
    STOP = "stop"


class LinkStateError(Exception):
    """An event that cannot happen in the current state (a bug in the caller)."""


S, E = LinkState, LinkEvent

LINK_TRANSITIONS: dict[tuple[LinkState, LinkEvent], LinkState] = {
    (S.CONNECTED, E.HEALTHY): S.CONNECTED,
    (S.CONNECTED, E.PARTIAL): S.DEGRADED,
    (S.CONNECTED, E.LOST): S.RECONNECTING,
    (S.CONNECTED, E.STOP): S.STOPPED,
    (S.DEGRADED, E.HEALTHY): S.CONNECTED,
    (S.DEGRADED, E.PARTIAL): S.DEGRADED,
    (S.DEGRADED, E.LOST): S.RECONNECTING,
    (S.DEGRADED, E.STOP): S.STOPPED,
    (S.RECONNECTING, E.HEALTHY): S.CONNECTED,
    (S.RECONNECTING, E.PARTIAL): S.DEGRADED,
    (S.RECONNECTING, E.ATTEMPT_FAILED): S.RECONNECTING,
    (S.RECONNECTING, E.STOP): S.STOPPED,
}

IGNORED: frozenset[tuple[LinkState, LinkEvent]] = frozenset(
    {
        (S.RECONNECTING, E.LOST),
        (S.STOPPED, E.HEALTHY),
        (S.STOPPED, E.PARTIAL),
        (S.STOPPED, E.LOST),
        (S.STOPPED, E.ATTEMPT_FAILED),
        (S.STOPPED, E.STOP),
    }
)


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 1.0
    factor: float = 2.0
    cap: float = 10.0

    def delay(self, failures: int) -> float:
        """The wait before the next attempt after *failures* failed ones (0: none yet)."""
        if failures <= 0:
            return 0.0
        return min(self.cap, self.initial * self.factor ** (failures - 1))


@dataclass(frozen=True, slots=True)
class LinkChange:
    """A state change, for the user and the status file."""

    old: LinkState
    new: LinkState
    reason: str
    outage: float | None = None  # seconds, on the way out of RECONNECTING

    def describe(self) -> str:
        if self.new is LinkState.RECONNECTING:
            return f"reconnecting: {self.reason}"
        if self.old is LinkState.RECONNECTING and self.outage is not None:
            text = f"reconnected after {self.outage:.1f} s"
            return text + (f" (degraded: {self.reason})" if self.new is LinkState.DEGRADED else "")
        if self.new is LinkState.DEGRADED:
            return f"degraded: {self.reason}"
        if self.new is LinkState.CONNECTED:
            return "connected again" + (f": {self.reason}" if self.reason else "")
        return str(self.new.value)


@dataclass(frozen=True, slots=True)
class LinkSnapshot:
    state: LinkState
    since: float  # when the current state began (the caller's clock)
    reason: str  # why DEGRADED / RECONNECTING ("" when connected)
    last_error: str  # the last failed attempt's error ("" if none since the loss)
    attempts: int  # failed attempts since the loss
    reconnects: int  # successful reconnects since the start
    last_outage: float | None  # seconds the last outage lasted
    next_attempt: float | None


class LinkMachine:
    def __init__(self, *, now: float, backoff: Backoff | None = None) -> None:
        self._backoff = backoff or Backoff()
        self._state = LinkState.CONNECTED
        self._since = now
        self._reason = ""
        self._last_error = ""
        self._failures = 0
        self._reconnects = 0
        self._last_outage: float | None = None
        self._next_attempt: float | None = None
        self._attempting = False

    @property
    def state(self) -> LinkState:
        return self._state

    def snapshot(self) -> LinkSnapshot:
        return LinkSnapshot(
            state=self._state,
            since=self._since,
            reason=self._reason,
            last_error=self._last_error,
            attempts=self._failures,
            reconnects=self._reconnects,
            last_outage=self._last_outage,
            next_attempt=self.get_timer(),
        )

    def handle(self, event: LinkEvent, *, now: float, reason: str = "") -> LinkChange | None:
        """Apply *event*; the change it made (None: no change of state or reason)."""
        key = (self._state, event)
        if key in IGNORED:
            return None
        new = LINK_TRANSITIONS.get(key)
        if new is None:
            raise LinkStateError(f"{event.value} cannot happen while {self._state.value}")
        old, old_reason = self._state, self._reason
        outage = None
        if event is LinkEvent.ATTEMPT_FAILED:
            self._attempting = False
            self._failures += 1
            self._last_error = reason
            self._next_attempt = now + self._backoff.delay(self._failures)
            return None  # still reconnecting; the snapshot carries the error
        if new is LinkState.RECONNECTING:
            self._failures = 0
            self._last_error = ""
            self._attempting = False
            self._next_attempt = now  # the first attempt starts at once
        elif old is LinkState.RECONNECTING:
            outage = now - self._since
            self._last_outage = outage
            self._reconnects += 1
            self._attempting = False
            self._next_attempt = None
        if new is not LinkState.RECONNECTING:
            self._next_attempt = None
        self._reason = "" if new is LinkState.CONNECTED else reason
        if new is old and self._reason == old_reason:
            return None
        if new is not old:
            self._state = new
            self._since = now
        return LinkChange(old, new, self._reason, outage)

    def get_timer(self) -> float | None:
        """When the next reconnect attempt should start (None: none due)."""
        if self._state is not LinkState.RECONNECTING or self._attempting:
            return None
        return self._next_attempt

    def handle_timer(self, *, now: float) -> bool:
        """True when an attempt should start now (it is then in flight until an event)."""
        when = self.get_timer()
        if when is None or now < when:
            return False
        self._attempting = True
        return True
