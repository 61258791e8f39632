"""The resolver core: routing, forwarding, caching and failure handling with a scripted clock."""

from __future__ import annotations

import pytest
from dnslib import QTYPE, RCODE, DNSLabel, DNSRecord

from kvpn.dns.actions import (
    ClientTransport,
    ForwardFinished,
    ForwardToCluster,
    ForwardUpstream,
    Reply,
)
from kvpn.dns.names import ClusterNames

from .messages import UP1, UP2, Harness, a_record, answer, one_forward, only_reply, query, replies

CLUSTER = "cluster"
UPSTREAM = "upstream"
LOCAL = "local"

ROUTES = [
    # asked name, type, where it goes, the question sent there
    ("echo.default.svc.cluster.local", "A", CLUSTER, "echo.default.svc.cluster.local"),
    ("echo.default.svc.cluster.local", "SRV", CLUSTER, "echo.default.svc.cluster.local"),
    ("echo.default.svc.cluster.local", "AAAA", LOCAL, None),
    ("echo", "A", CLUSTER, "echo.default.svc.cluster.local"),
    ("echo.kube-system", "A", CLUSTER, "echo.kube-system.svc.cluster.local"),
    ("echo.default.svc", "AAAA", CLUSTER, "echo.default.svc.cluster.local"),
    ("10.0.96.10.in-addr.arpa", "PTR", CLUSTER, "10.0.96.10.in-addr.arpa"),
    ("example.test", "A", UPSTREAM, "example.test"),
    ("example.test", "AAAA", UPSTREAM, "example.test"),
    ("1.0.0.127.in-addr.arpa", "PTR", UPSTREAM, "1.0.0.127.in-addr.arpa"),
]


@pytest.mark.parametrize(("name", "qtype", "where", "sent"), ROUTES)
def test_routes_by_name_without_trying_the_other_side(
    name: str, qtype: str, where: str, sent: str | None
) -> None:
    h = Harness()
    actions = h.ask(query(name, qtype))
    assert len(actions) == 1
    action = actions[0]
    if where == LOCAL:
        reply = only_reply(actions)
        assert reply.header.rcode == RCODE.NOERROR and not reply.rr
        assert reply.auth[0].rtype == QTYPE.SOA  # negative-cacheable by the client
        assert h.resolver.get_timer() is None
        return
    expected_type = ForwardToCluster if where == CLUSTER else ForwardUpstream
    assert isinstance(action, expected_type)
    forwarded = DNSRecord.parse(action.query)
    assert forwarded.q.qname == DNSLabel(sent)
    assert forwarded.q.qtype == getattr(QTYPE, qtype)
    assert forwarded.header.rd == 1
    if isinstance(action, ForwardUpstream):
        assert action.server == UP1 and not action.tcp


def test_cluster_answer_reaches_client_and_is_cached_with_aged_ttls() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("Echo.default.svc.cluster.local", qid=7)))
    assert isinstance(fwd, ForwardToCluster)
    actions = h.respond(
        fwd.forward_id, answer(fwd.query, a_record("echo.default.svc.cluster.local", "10.96.0.9"))
    )
    assert actions[-1] == ForwardFinished(fwd.forward_id)
    reply = only_reply(actions)
    assert reply.header.id == 7 and reply.header.qr == 1
    assert str(reply.q.qname) == "Echo.default.svc.cluster.local."
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.9"]
    assert not reply.ar  # the client sent no OPT, so gets none
    h.now += 12.4
    hit = only_reply(h.ask(query("echo.default.svc.cluster.local", qid=8), client="c2"))
    assert hit.header.id == 8 and hit.rr[0].ttl == 30 - 12
    assert h.resolver.counters.cache_hits == 1
    h.now += 18  # 30.4 s after storing: expired
    assert isinstance(h.ask(query("echo.default.svc.cluster.local"))[0], ForwardToCluster)


def test_mapped_name_is_renamed_back_to_what_the_client_asked() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("echo.default")))
    assert isinstance(fwd, ForwardToCluster)
    reply = only_reply(
        h.respond(
            fwd.forward_id,
            answer(fwd.query, a_record("echo.default.svc.cluster.local", "10.96.0.9")),
        )
    )
    assert str(reply.q.qname) == "echo.default."
    assert str(reply.rr[0].rname) == "echo.default."


def test_mapped_name_unknown_to_cluster_is_asked_upstream_by_its_own_name() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("www.example.kube-system")))
    nx = answer(fwd.query, rcode=RCODE.NXDOMAIN, soa_minimum=5)
    up = one_forward(h.respond(fwd.forward_id, nx))
    assert isinstance(up, ForwardUpstream) and up.forward_id == fwd.forward_id
    assert DNSRecord.parse(up.query).q.qname == DNSLabel("www.example.kube-system")
    reply = only_reply(
        h.respond(
            up.forward_id, answer(up.query, a_record("www.example.kube-system", "192.0.2.80"))
        )
    )
    assert str(reply.rr[0].rdata) == "192.0.2.80"
    assert h.resolver.counters.upstream_fallbacks == 1


def test_negative_answers_cached_for_soa_minimum() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("nope.default.svc.cluster.local")))
    reply = only_reply(
        h.respond(
            fwd.forward_id, answer(fwd.query, rcode=RCODE.NXDOMAIN, soa_minimum=5, soa_ttl=60)
        )
    )
    assert reply.header.rcode == RCODE.NXDOMAIN
    h.now += 4.9
    assert only_reply(h.ask(query("nope.default.svc.cluster.local"))).header.rcode == RCODE.NXDOMAIN
    h.now += 0.2
    assert isinstance(h.ask(query("nope.default.svc.cluster.local"))[0], ForwardToCluster)


@pytest.mark.parametrize(
    ("rcode", "soa", "cached"),
    [
        (RCODE.NXDOMAIN, None, False),  # no SOA: RFC 2308 says do not cache
        (RCODE.NOERROR, None, False),  # NODATA without SOA
        (RCODE.NOERROR, 30, True),  # NODATA with SOA
        (RCODE.SERVFAIL, 30, False),
    ],
)
def test_what_is_cached(rcode: int, soa: int | None, cached: bool) -> None:
    h = Harness(upstreams=[UP1])
    fwd = one_forward(h.ask(query("example.test")))
    h.respond(fwd.forward_id, answer(fwd.query, rcode=rcode, soa_minimum=soa))
    h.now += 1
    second = h.ask(query("example.test"))
    assert (len(replies(second)) == 1) is cached


def test_upstream_timeouts_rotate_servers_then_servfail_in_bounded_time() -> None:
    h = Harness()
    start = h.now
    first = one_forward(h.ask(query("example.test")))
    assert isinstance(first, ForwardUpstream) and first.server == UP1
    assert h.resolver.get_timer() == start + 1.5
    second = one_forward(h.advance_to_timer())
    assert isinstance(second, ForwardUpstream) and second.server == UP2
    assert h.resolver.get_timer() == start + 3.0
    third = one_forward(h.advance_to_timer())
    assert isinstance(third, ForwardUpstream) and third.server == UP1
    assert h.resolver.get_timer() == start + 4.0
    actions = h.advance_to_timer()
    reply = only_reply(actions)
    assert reply.header.rcode == RCODE.SERVFAIL and reply.header.id == 0x1234
    assert isinstance(actions[-1], ForwardFinished)
    assert h.resolver.get_timer() is None and h.resolver.pending_forwards == 0
    # a late answer from the first server is counted and ignored
    assert h.respond(first.forward_id, answer(first.query)) == []
    assert h.resolver.counters.late_responses == 1


def test_cluster_timeout_retries_then_servfails() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("echo.default.svc.cluster.local")))
    assert h.resolver.get_timer() == h.now + 2.0
    again = one_forward(h.advance_to_timer())
    assert isinstance(again, ForwardToCluster) and again.query == fwd.query
    assert only_reply(h.advance_to_timer()).header.rcode == RCODE.SERVFAIL


def test_late_answer_from_earlier_server_still_counts() -> None:
    h = Harness()
    first = one_forward(h.ask(query("example.test")))
    h.advance_to_timer()  # second server asked
    reply = only_reply(
        h.respond(first.forward_id, answer(first.query, a_record("example.test", "192.0.2.80")))
    )
    assert reply.rr


def test_servfail_from_one_upstream_tries_the_next() -> None:
    h = Harness()
    first = one_forward(h.ask(query("example.test")))
    second = one_forward(h.respond(first.forward_id, answer(first.query, rcode=RCODE.SERVFAIL)))
    assert isinstance(second, ForwardUpstream) and second.server == UP2
    # the last server's SERVFAIL is passed on
    reply = only_reply(h.respond(second.forward_id, answer(second.query, rcode=RCODE.SERVFAIL)))
    assert reply.header.rcode == RCODE.SERVFAIL


def test_truncated_udp_answer_is_repeated_over_tcp() -> None:
    h = Harness()
    udp = one_forward(h.ask(query("example.test")))
    tcp = one_forward(h.respond(udp.forward_id, answer(udp.query, tc=True)))
    assert isinstance(tcp, ForwardUpstream) and tcp.tcp and tcp.server == UP1
    reply = only_reply(
        h.respond(tcp.forward_id, answer(tcp.query, a_record("example.test", "192.0.2.80")))
    )
    assert reply.rr and not reply.header.tc


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: setattr(r.header, "id", r.header.id ^ 1),
        lambda r: setattr(r.q, "qname", DNSLabel("evil.test")),
        lambda r: setattr(r.q, "qtype", QTYPE.MX),
        lambda r: setattr(r.header, "qr", 0),
    ],
    ids=["id", "name", "type", "not-a-response"],
)
def test_mismatched_answers_are_ignored(mutate) -> None:  # type: ignore[no-untyped-def]
    h = Harness()
    fwd = one_forward(h.ask(query("example.test")))
    bad = DNSRecord.parse(answer(fwd.query, a_record("example.test", "6.6.6.6")))
    mutate(bad)
    assert h.respond(fwd.forward_id, bytes(bad.pack())) == []
    assert h.resolver.counters.mismatched_responses == 1
    assert h.resolver.pending_forwards == 1


def test_identical_queries_in_flight_share_one_forward() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("example.test", qid=1), client="a"))
    assert h.ask(query("EXAMPLE.test", qid=2), client="b") == []
    actions = h.respond(fwd.forward_id, answer(fwd.query, a_record("example.test", "192.0.2.80")))
    sent = [(a.client, DNSRecord.parse(a.response)) for a in actions if isinstance(a, Reply)]
    assert [(c, r.header.id, str(r.q.qname)) for c, r in sent] == [
        ("a", 1, "example.test."),
        ("b", 2, "EXAMPLE.test."),
    ]


MALFORMED = [
    # bytes, expected rcode of the reply (None: dropped)
    (b"", None),
    (b"\x12\x34", None),
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab", RCODE.FORMERR),  # cut name
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", RCODE.FORMERR),
    (b"\x12\x34\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00", RCODE.FORMERR),  # no question
    (b"\x12\x34\x81\x80\x00\x00\x00\x00\x00\x00\x00\x00", None),  # a response
    (b"\x12\x34\x29\x00\x00\x00\x00\x00\x00\x00\x00\x00", RCODE.NOTIMP),  # UPDATE opcode
]


@pytest.mark.parametrize(("data", "rcode"), MALFORMED)
def test_malformed_queries_get_formerr_or_are_dropped(data: bytes, rcode: int | None) -> None:
    h = Harness()
    actions = h.ask(data)
    if rcode is None:
        assert actions == []
    else:
        reply = only_reply(actions)
        assert reply.header.rcode == rcode and reply.header.id == 0x1234
    assert h.resolver.pending_forwards == 0


def test_zone_transfer_refused() -> None:
    assert only_reply(Harness().ask(query("cluster.local", "AXFR"))).header.rcode == RCODE.REFUSED


def test_large_answer_truncated_for_classic_udp_client_but_not_edns_or_tcp() -> None:
    h = Harness()
    records = [a_record("many.default.svc.cluster.local", f"10.244.0.{i}") for i in range(1, 60)]
    for edns, transport, truncated in [
        (None, ClientTransport.UDP, True),
        (4096, ClientTransport.UDP, False),
        (None, ClientTransport.TCP, False),
    ]:
        h.resolver.update_names(ClusterNames.build(namespace=f"n{edns}{transport.value}"))
        fwd = one_forward(
            h.ask(query("many.default.svc.cluster.local", edns=edns), transport=transport)
        )
        reply = only_reply(h.respond(fwd.forward_id, answer(fwd.query, *records)))
        assert bool(reply.header.tc) is truncated
        assert (len(reply.rr) == 0) is truncated


def test_edns_and_do_bit_follow_the_client() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("example.test", edns=1232, do=True)))
    opt = [rr for rr in DNSRecord.parse(fwd.query).ar if rr.rtype == QTYPE.OPT]
    assert opt and opt[0].rclass == 4096 and opt[0].ttl & 0x8000
    reply = only_reply(
        h.respond(fwd.forward_id, answer(fwd.query, a_record("example.test", "192.0.2.80")))
    )
    [reply_opt] = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    assert reply_opt.ttl & 0x8000


def test_cluster_path_failure_answers_servfail_at_once() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("echo.default.svc.cluster.local")))
    h.resolver.forward_failed(fwd.forward_id, now=h.now)
    assert only_reply(h.drain()).header.rcode == RCODE.SERVFAIL


def test_upstream_send_failure_moves_to_next_server_at_once() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("example.test")))
    h.resolver.forward_failed(fwd.forward_id, now=h.now)
    nxt = one_forward(h.drain())
    assert isinstance(nxt, ForwardUpstream) and nxt.server == UP2
    h.resolver.forward_failed(fwd.forward_id, now=h.now)
    assert only_reply(h.drain()).header.rcode == RCODE.SERVFAIL


def test_overload_answers_servfail() -> None:
    h = Harness(max_pending_forwards=1)
    h.ask(query("a.test"))
    assert only_reply(h.ask(query("b.test"))).header.rcode == RCODE.SERVFAIL
    assert h.resolver.counters.servfail_overload == 1


def test_no_upstreams_servfail_external_names_but_cluster_names_work() -> None:
    h = Harness(upstreams=[])
    assert only_reply(h.ask(query("example.test"))).header.rcode == RCODE.SERVFAIL
    assert isinstance(h.ask(query("echo.default.svc.cluster.local"))[0], ForwardToCluster)


def test_new_namespaces_reroute_and_flush_the_cache() -> None:
    h = Harness(upstreams=[UP1])
    fwd = one_forward(h.ask(query("echo.team")))
    assert isinstance(fwd, ForwardUpstream)
    h.respond(fwd.forward_id, answer(fwd.query, rcode=RCODE.NXDOMAIN, soa_minimum=60))
    h.resolver.update_names(ClusterNames.build(namespace="default", namespaces=["team"]))
    again = one_forward(h.ask(query("echo.team")))
    assert isinstance(again, ForwardToCluster)


def test_truncated_cluster_answer_is_asked_again_over_a_stream_then_passed_on() -> None:
    h = Harness()
    fwd = one_forward(h.ask(query("many.default.svc.cluster.local")))
    again = one_forward(h.respond(fwd.forward_id, answer(fwd.query, tc=True)))
    assert isinstance(again, ForwardToCluster) and again.tcp
    reply = only_reply(h.respond(again.forward_id, answer(again.query, tc=True)))
    assert reply.header.tc  # the client retries over TCP itself
