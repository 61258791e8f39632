"""DNS message builders and a resolver harness with a scripted clock, for the DNS tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from ipaddress import IPv4Network

from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

from kvpn.dns.actions import (
    Action,
    ClientTransport,
    ForwardToCluster,
    ForwardUpstream,
    Reply,
    UpstreamServer,
)
from kvpn.dns.names import ClusterNames
from kvpn.dns.resolver import DnsResolver, ResolverConfig

UP1 = UpstreamServer("192.0.2.1")
UP2 = UpstreamServer("192.0.2.2")
NAMES = ClusterNames.build(
    namespace="default",
    namespaces=["default", "kube-system"],
    reverse_networks=[IPv4Network("10.96.0.0/12"), IPv4Network("10.244.0.0/16")],
)


def query(
    name: str,
    qtype: str = "A",
    *,
    qid: int = 0x1234,
    edns: int | None = None,
    do: bool = False,
) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = qid
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return bytes(record.pack())


def answer(
    forwarded: bytes,
    *records: RR,
    rcode: int = RCODE.NOERROR,
    soa_minimum: int | None = None,
    soa_ttl: int = 60,
    tc: bool = False,
) -> bytes:
    """The response a server gives to *forwarded* (same ID and question)."""
    request = DNSRecord.parse(forwarded)
    response = DNSRecord(
        DNSHeader(id=request.header.id, qr=1, ra=1, rd=1, rcode=rcode, tc=int(tc)), q=request.q
    )
    for rr in records:
        response.add_answer(rr)
    if soa_minimum is not None:
        response.add_auth(
            RR(
                "cluster.local",
                QTYPE.SOA,
                ttl=soa_ttl,
                rdata=SOA("ns.dns.cluster.local", "host.cluster.local", (1, 2, 3, 4, soa_minimum)),
            )
        )
    return bytes(response.pack())


def a_record(name: str, address: str, ttl: int = 30) -> RR:
    return RR(name, QTYPE.A, ttl=ttl, rdata=A(address))


class Harness:
    """A resolver with deterministic IDs, a clock and a list of what it asked for."""

    def __init__(
        self,
        *,
        names: ClusterNames = NAMES,
        upstreams: Iterable[UpstreamServer] = (UP1, UP2),
        **config: object,
    ) -> None:
        ids = itertools.count(100)
        self.resolver = DnsResolver(
            ResolverConfig(upstreams=tuple(upstreams), **config),  # type: ignore[arg-type]
            names,
            random_id=lambda: next(ids),
        )
        self.now = 1000.0

    def ask(
        self, data: bytes, client: object = "c1", transport: ClientTransport = ClientTransport.UDP
    ) -> list[Action]:
        self.resolver.receive_query(data, client, transport=transport, now=self.now)
        return self.drain()

    def respond(self, forward_id: int, data: bytes) -> list[Action]:
        self.resolver.receive_response(forward_id, data, now=self.now)
        return self.drain()

    def advance_to_timer(self) -> list[Action]:
        timer = self.resolver.get_timer()
        assert timer is not None
        self.now = timer
        self.resolver.handle_timer(now=self.now)
        return self.drain()

    def drain(self) -> list[Action]:
        actions: list[Action] = []
        while (action := self.resolver.next_action()) is not None:
            actions.append(action)
        return actions


def replies(actions: Iterable[Action]) -> list[DNSRecord]:
    return [DNSRecord.parse(a.response) for a in actions if isinstance(a, Reply)]


def only_reply(actions: Iterable[Action]) -> DNSRecord:
    found = replies(actions)
    assert len(found) == 1, found
    return found[0]


def one_forward(actions: list[Action]) -> ForwardToCluster | ForwardUpstream:
    """The single action, which must be a forward."""
    assert len(actions) == 1, actions
    action = actions[0]
    assert isinstance(action, ForwardToCluster | ForwardUpstream), action
    return action
