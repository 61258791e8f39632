"""The dial-first SYN gate as a table of (events -> decisions)."""

from ipaddress import IPv4Address

import pytest

from kvpn.net.nat import FlowKey
from kvpn.net.tcp_gate import GATE_TRANSITIONS, DialOutcome, GateAction, GateState, SynGate

F = FlowKey(IPv4Address("198.19.255.1").packed, 40000, IPv4Address("10.0.0.5").packed, 80)


@pytest.mark.parametrize(
    ("outcome", "action"),
    [
        (DialOutcome.SUCCEEDED, GateAction.RELEASE_SYN),
        (DialOutcome.REFUSED, GateAction.ANSWER_RST),
        (DialOutcome.UNREACHABLE, GateAction.ANSWER_UNREACHABLE),
        (DialOutcome.TIMED_OUT, GateAction.ANSWER_UNREACHABLE),
    ],
)
def test_outcomes(outcome: DialOutcome, action: GateAction) -> None:
    gate = SynGate(dial_timeout=5)
    assert gate.on_syn(F, b"syn1", now=0).action is GateAction.REQUEST_DIAL
    decision = gate.on_outcome(F, outcome)
    assert decision.action is action and decision.syn == b"syn1" and decision.flow == F
    assert not gate.is_pending(F) and gate.next_deadline() is None
    assert gate.on_outcome(F, outcome).action is GateAction.IGNORE  # late duplicate result


def test_duplicate_syn_dropped_and_newest_kept() -> None:
    gate = SynGate(dial_timeout=5)
    gate.on_syn(F, b"syn1", now=0)
    assert gate.on_syn(F, b"syn2", now=1).action is GateAction.DROP_DUPLICATE
    assert gate.next_deadline() == 5  # a duplicate does not extend the dial
    assert gate.on_outcome(F, DialOutcome.SUCCEEDED).syn == b"syn2"


def test_timeout_with_scripted_clock() -> None:
    gate = SynGate(dial_timeout=5)
    gate.on_syn(F, b"syn", now=10)
    other = F._replace(src_port=40001)
    gate.on_syn(other, b"syn-b", now=11)
    assert gate.expire(now=14.999) == []
    [first] = gate.expire(now=15)
    assert first.flow == F and first.action is GateAction.ANSWER_UNREACHABLE
    assert gate.next_deadline() == 16
    assert [d.flow for d in gate.expire(now=100)] == [other]
    assert len(gate) == 0


def test_transition_table_only_leaves_dialing() -> None:
    assert {state for state, _ in GATE_TRANSITIONS} == {GateState.DIALING}
    assert {outcome for _, outcome in GATE_TRANSITIONS} == set(DialOutcome)
