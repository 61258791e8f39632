"""Fuzzed queries and answers never raise, and the resolver keeps answering afterwards."""

from __future__ import annotations

from dnslib import RCODE
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpn.dns.actions import ClientTransport, ForwardToCluster, ForwardUpstream, Reply

from .messages import Harness, a_record, answer, only_reply, query

VALID = [
    query("echo.default.svc.cluster.local"),
    query("example.test", "AAAA", edns=1232, do=True),
    query("echo", "SRV"),
    query("5.0.96.10.in-addr.arpa", "PTR"),
]


def _mutations() -> st.SearchStrategy[bytes]:
    def mutate(base: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
        data = bytearray(base)
        for position, value in edits:
            data[position % len(data)] = value
        return bytes(data[: max(cut, 0) or len(data)])

    return st.builds(
        mutate,
        st.sampled_from(VALID),
        st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
        st.integers(0, 80),
    )


MESSAGES = st.one_of(st.binary(max_size=300), _mutations())


def _still_answers(h: Harness) -> None:
    actions = h.ask(query("alive.example.test", qid=4242), client="probe")
    [fwd] = [a for a in actions if isinstance(a, ForwardUpstream)]
    reply = only_reply(
        h.respond(fwd.forward_id, answer(fwd.query, a_record("alive.example.test", "192.0.2.1")))
    )
    assert reply.header.id == 4242 and reply.header.rcode == RCODE.NOERROR


@settings(max_examples=300, deadline=None)
@given(st.lists(MESSAGES, min_size=1, max_size=20), st.sampled_from(list(ClientTransport)))
def test_fuzzed_queries_never_raise(messages: list[bytes], transport: ClientTransport) -> None:
    h = Harness()
    for data in messages:
        for action in h.ask(data, transport=transport):
            if isinstance(action, Reply):
                assert len(action.response) <= 65535
    _still_answers(h)


@settings(max_examples=200, deadline=None)
@given(st.lists(MESSAGES, min_size=1, max_size=10))
def test_fuzzed_answers_never_raise(messages: list[bytes]) -> None:
    h = Harness()
    forwards = [
        a
        for a in h.ask(VALID[0]) + h.ask(VALID[1])
        if isinstance(a, ForwardToCluster | ForwardUpstream)
    ]
    for i, data in enumerate(messages):
        h.respond(forwards[i % len(forwards)].forward_id, data)
    while h.resolver.get_timer() is not None:
        h.advance_to_timer()
    _still_answers(h)
