"""The dial-first SYN gate: hold an application's SYN until the remote dial is decided.

Theory of operation
-------------------
A TUN-based VPN that answered SYN|ACK before knowing whether the destination exists
("accept first", as gVisor-based tools do) makes every port look open.  kvpn dials
first, like Tailscale: the application's initial SYN (RFC 9293 section 3.5) is held
and a dial is requested through the tunnel.  The outcome decides what the application
sees::

    DIALING --succeeded-------> RELEASED     the held SYN goes into the NAT
    DIALING --refused---------> REFUSED      RST|ACK, ack = ISN + 1 (RFC 9293 3.10.7.1)
    DIALING --unreachable-----> UNREACHABLE  ICMP host unreachable quoting the SYN
    DIALING --timed out-------> TIMED_OUT    ICMP host unreachable quoting the SYN

Every state but DIALING is final and leaves the gate.  The kernel aborts a connect in
SYN-SENT on both answers (RST -> ECONNREFUSED, ICMP -> EHOSTUNREACH), so the
application fails fast instead of retransmitting into silence.  Retransmitted SYNs
for a flow that is DIALING are dropped (the newest one is kept, in case the ISN
changed).  An outcome for a flow that is no longer DIALING (late, after the gate's own
timeout) is ignored, and the caller must discard whatever it opened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvpn.net.deadlines import Deadlines
from kvpn.net.nat import FlowKey

__all__ = [
    "GATE_ANSWERS",
    "GATE_TRANSITIONS",
    "DialOutcome",
    "GateAction",
    "GateDecision",
    "GateState",
    "SynGate",
]


class GateState(enum.Enum):
    DIALING = "dialing"
    RELEASED = "released"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMED_OUT = "timed_out"


class DialOutcome(enum.Enum):
    SUCCEEDED = "succeeded"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMED_OUT = "timed_out"


class GateAction(enum.Enum):
    REQUEST_DIAL = "request_dial"
    DROP_DUPLICATE = "drop_duplicate"
    RELEASE_SYN = "release_syn"
    ANSWER_RST = "answer_rst"
    ANSWER_UNREACHABLE = "answer_unreachable"
    IGNORE = "ignore"


GATE_TRANSITIONS: dict[tuple[GateState, DialOutcome], GateState] = {
    (GateState.DIALING, DialOutcome.SUCCEEDED): GateState.RELEASED,
    (GateState.DIALING, DialOutcome.REFUSED): GateState.REFUSED,
    (GateState.DIALING, DialOutcome.UNREACHABLE): GateState.UNREACHABLE,
    (GateState.DIALING, DialOutcome.TIMED_OUT): GateState.TIMED_OUT,
}

GATE_ANSWERS: dict[GateState, GateAction] = {
    GateState.RELEASED: GateAction.RELEASE_SYN,
    GateState.REFUSED: GateAction.ANSWER_RST,
    GateState.UNREACHABLE: GateAction.ANSWER_UNREACHABLE,
    GateState.TIMED_OUT: GateAction.ANSWER_UNREACHABLE,
}


@dataclass(frozen=True, slots=True)
class GateDecision:
    """What to do; *syn* is the held SYN packet (as read from the TUN) when relevant."""

    action: GateAction
    flow: FlowKey
    syn: bytes = b""


class _PendingDial:
    __slots__ = ("state", "syn")

    def __init__(self, syn: bytes) -> None:
        self.state = GateState.DIALING
        self.syn = syn


class SynGate:
    def __init__(self, dial_timeout: float) -> None:
        self._dial_timeout = dial_timeout
        self._pending: dict[FlowKey, _PendingDial] = {}
        self._deadlines: Deadlines[FlowKey] = Deadlines()

    def __len__(self) -> int:
        return len(self._pending)

    def is_pending(self, flow: FlowKey) -> bool:
        return flow in self._pending

    def on_syn(self, flow: FlowKey, syn: bytes, *, now: float) -> GateDecision:
        """An initial SYN for a flow with no NAT entry."""
        pending = self._pending.get(flow)
        if pending is not None:
            pending.syn = syn
            return GateDecision(GateAction.DROP_DUPLICATE, flow)
        self._pending[flow] = _PendingDial(syn)
        self._deadlines.schedule(flow, now + self._dial_timeout)
        return GateDecision(GateAction.REQUEST_DIAL, flow)

    def on_outcome(self, flow: FlowKey, outcome: DialOutcome) -> GateDecision:
        """The dial for *flow* ended with *outcome*."""
        pending = self._pending.get(flow)
        if pending is None:
            return GateDecision(GateAction.IGNORE, flow)
        new_state = GATE_TRANSITIONS.get((pending.state, outcome))
        if new_state is None:
            return GateDecision(GateAction.IGNORE, flow)
        pending.state = new_state
        del self._pending[flow]
        self._deadlines.cancel(flow)
        return GateDecision(GATE_ANSWERS[new_state], flow, pending.syn)

    def next_deadline(self) -> float | None:
        return self._deadlines.earliest()

    def expire(self, *, now: float) -> list[GateDecision]:
        """Time out the dials whose deadline passed."""
        return [
            self.on_outcome(flow, DialOutcome.TIMED_OUT) for flow in self._deadlines.pop_due(now)
        ]
