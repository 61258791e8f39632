"""The laptop's resolver core, sans-IO: DNS messages in, replies and forwards out.

Theory of operation
-------------------
The adapter feeds client queries with ``receive_query(data, client, transport=, now=)``,
answers to forwards with ``receive_response(forward_id, data, now=)`` (or
``forward_failed``), and the clock with ``handle_timer(now=)`` when ``get_timer()`` is due.
It pulls :mod:`~kvpn.dns.actions` with ``next_action()`` and carries them out. The core never
touches a socket or a clock.

A query is

1. dropped if it is a response (QR set: answering would let two resolvers loop), answered
   FORMERR if it does not parse or does not hold exactly one question (RFC 1035 §4.1.1),
   NOTIMP for opcodes other than QUERY, REFUSED for zone transfers;
2. answered from the :class:`~kvpn.dns.cache.AnswerCache` when fresh (TTLs aged);
3. routed by name (:func:`kvpn.dns.names.classify`): answered locally (AAAA on an IPv4-only
   cluster: NOERROR, no answer, the cluster domain's SOA so the client may cache it), sent to
   the cluster DNS, or sent to the laptop's original upstream servers - never both in turn,
   except that a *mapped* short name the cluster says does not exist is then asked upstream;
4. joined to an identical forward already in flight (same name, type, class and DO bit).

A forward is one fresh query (random 16-bit ID, recursion desired, EDNS0 with a 4096-byte
UDP size and the client's DO bit) sent with a per-attempt timeout. An answer counts only if
its ID and question match (RFC 5452 §9.1); anything else is counted and ignored. Upstream
forwards move to the next server when an attempt times out or a server answers SERVFAIL,
REFUSED or NOTIMP. A truncated answer, from either side, is asked again over TCP (RFC 7766
§5); a truncated answer that still comes back truncated is passed on with TC set. Every
forward ends by ``servfail_after`` seconds: answered, or SERVFAIL to its clients. Each client
gets the answer with its own ID and question, an OPT record only if it sent one, and, over
UDP, a truncated (TC) reply when the answer exceeds its size limit (RFC 1035 §4.2.1, RFC 6891
§6.2.5).
"""

from __future__ import annotations

import enum
import itertools
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dnslib import (
    CLASS,
    EDNS0,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    SOA,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from kvpn.dns.actions import (
    Action,
    ClientTransport,
    DnsCounters,
    ForwardFinished,
    ForwardToCluster,
    ForwardUpstream,
    Reply,
    UpstreamServer,
)
from kvpn.dns.cache import AnswerCache, CacheKey
from kvpn.dns.names import ClusterNames, Decision, Labels, Route, classify
from kvpn.net.deadlines import Deadlines

__all__ = ["DnsResolver", "ResolverConfig"]

DNS_HEADER_SIZE = 12
CLASSIC_UDP_SIZE = 512
OUR_UDP_SIZE = 4096
RETRY_RCODES = frozenset({RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP})
ZONE_TRANSFER_TYPES = frozenset({QTYPE.AXFR, QTYPE.IXFR})
DO_BIT = 1 << 15


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    upstreams: tuple[UpstreamServer, ...]
    cluster_attempt_timeout: float = 2.0
    upstream_attempt_timeout: float = 1.5
    servfail_after: float = 4.0  # every query is answered by then (glibc gives up after 5 s)
    max_pending_forwards: int = 1024
    max_waiters_per_forward: int = 64
    cache_entries: int = 4096
    max_cache_ttl: int = 3600
    max_negative_ttl: int = 300
    forward_udp_size: int = OUR_UDP_SIZE
    local_nodata_ttl: int = 5


class Destination(enum.Enum):
    CLUSTER = "cluster"
    UPSTREAM = "upstream"


@dataclass(frozen=True, slots=True)
class _Waiter:
    """One client waiting for an answer, and how it wants it."""

    client: object
    transport: ClientTransport
    query_id: int
    question: DNSQuestion
    rd: int
    cd: int
    edns: bool
    dnssec_ok: bool
    max_size: int


@dataclass(slots=True)
class _Forward:
    forward_id: int
    key: CacheKey
    client_name: DNSLabel  # the name as the first client asked it
    ask_name: DNSLabel  # the name sent to the destination
    qtype: int
    qclass: int
    dnssec_ok: bool
    cd: int
    destination: Destination
    fallback_upstream: bool
    give_up_at: float
    waiters: list[_Waiter] = field(default_factory=list)
    wire_id: int = 0
    server_index: int = 0
    failures: int = 0
    tcp: bool = False


def _lower_labels(label: DNSLabel) -> Labels:
    return tuple(part.lower() for part in label.label)


def _edns(record: DNSRecord) -> RR | None:
    for rr in record.ar:
        if rr.rtype == QTYPE.OPT:
            return rr
    return None


class DnsResolver:
    def __init__(
        self,
        config: ResolverConfig,
        names: ClusterNames,
        *,
        random_id: Callable[[], int] | None = None,
    ) -> None:
        self._config = config
        self._names = names
        self._random_id = random_id or (lambda: random.SystemRandom().getrandbits(16))
        self._cache = AnswerCache(
            max_entries=config.cache_entries,
            max_ttl=config.max_cache_ttl,
            max_negative_ttl=config.max_negative_ttl,
        )
        self._forwards: dict[int, _Forward] = {}
        self._forward_by_key: dict[CacheKey, int] = {}
        self._wire_ids: set[int] = set()
        self._deadlines: Deadlines[int] = Deadlines()
        self._actions: deque[Action] = deque()
        self._forward_ids = itertools.count(1)
        self.counters = DnsCounters()
        self._route_handlers: dict[Route, Callable[[_Waiter, Decision, CacheKey, float], None]] = {
            Route.LOCAL_NODATA: self._answer_nodata,
            Route.CLUSTER: self._start_forward,
            Route.UPSTREAM: self._start_forward,
        }

    # -- configuration ------------------------------------------------------------------

    @property
    def config(self) -> ResolverConfig:
        return self._config

    @property
    def names(self) -> ClusterNames:
        return self._names

    def update_names(self, names: ClusterNames) -> None:
        """New namespaces/services/CIDRs: routing may change, so the cache starts afresh."""
        if names != self._names:
            self._names = names
            self._cache.clear()

    @property
    def pending_forwards(self) -> int:
        return len(self._forwards)

    # -- outputs ------------------------------------------------------------------------

    def next_action(self) -> Action | None:
        return self._actions.popleft() if self._actions else None

    def get_timer(self) -> float | None:
        return self._deadlines.earliest()

    # -- inputs -------------------------------------------------------------------------

    def receive_query(
        self, data: bytes, client: object, *, transport: ClientTransport, now: float
    ) -> None:
        self.counters.queries += 1
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError, struct.error, UnicodeError, IndexError...
            self._answer_unparsable(data, client, transport)
            return
        header = query.header
        if header.qr:
            self.counters.dropped_responses_as_queries += 1
            return
        if header.opcode != OPCODE.QUERY:
            self.counters.notimp_sent += 1
            self._emit(client, transport, self._error_reply(query, RCODE.NOTIMP))
            return
        if len(query.questions) != 1:
            self.counters.formerr_sent += 1
            self._emit(client, transport, self._error_reply(query, RCODE.FORMERR))
            return
        waiter = self._waiter(query, client, transport)
        question = waiter.question
        if question.qtype in ZONE_TRANSFER_TYPES:
            self.counters.refused_sent += 1
            self._reply_rcode(waiter, RCODE.REFUSED)
            return
        labels = _lower_labels(question.qname)
        key: CacheKey = (labels, question.qtype, question.qclass, waiter.dnssec_ok)
        cached = self._cache.get(key, now=now)
        if cached is not None:
            self.counters.cache_hits += 1
            self._reply_with(waiter, cached)
            return
        if question.qclass == CLASS.IN:
            decision = classify(self._names, labels, question.qtype)
        else:
            decision = Decision(Route.UPSTREAM)
        self._route_handlers[decision.route](waiter, decision, key, now)

    def receive_response(self, forward_id: int, data: bytes, *, now: float) -> None:
        forward = self._forwards.get(forward_id)
        if forward is None:
            self.counters.late_responses += 1
            return
        try:
            response = DNSRecord.parse(data)
        except Exception:
            self.counters.malformed_responses += 1
            return
        header = response.header
        if not header.qr or header.id != forward.wire_id:
            self.counters.mismatched_responses += 1
            return
        if not response.questions:
            # Error answers may come without a question (e.g. FORMERR): a failed attempt.
            if header.rcode == RCODE.NOERROR:
                self.counters.mismatched_responses += 1
            else:
                self._attempt_failed(forward, now)
            return
        q = response.q
        if (
            len(response.questions) != 1
            or q.qname != forward.ask_name
            or q.qtype != forward.qtype
            or q.qclass != forward.qclass
        ):
            self.counters.mismatched_responses += 1
            return
        if header.tc and not forward.tcp:
            self.counters.tcp_retries += 1
            forward.tcp = True
            self._send_attempt(forward, now)
            return
        if forward.destination == Destination.UPSTREAM:
            if header.rcode in RETRY_RCODES and forward.failures + 1 < len(self._config.upstreams):
                self._attempt_failed(forward, now)
                return
        elif forward.fallback_upstream and header.rcode == RCODE.NXDOMAIN:
            self._fall_back_upstream(forward, now)
            return
        self._complete(forward, response, now)

    def forward_failed(self, forward_id: int, *, now: float) -> None:
        """The adapter could not carry out a forward (send error, refused, tunnel down)."""
        forward = self._forwards.get(forward_id)
        if forward is not None:
            self._attempt_failed(forward, now)

    def handle_timer(self, *, now: float) -> None:
        for forward_id in self._deadlines.pop_due(now):
            forward = self._forwards.get(forward_id)
            if forward is None:
                continue
            if now >= forward.give_up_at:
                self.counters.servfail_timeouts += 1
                self._fail(forward)
                continue
            if forward.destination == Destination.UPSTREAM:
                self.counters.upstream_retries += 1
                forward.server_index += 1
                forward.tcp = False
            self._send_attempt(forward, now)

    # -- routing ------------------------------------------------------------------------

    def _answer_nodata(
        self, waiter: _Waiter, decision: Decision, key: CacheKey, now: float
    ) -> None:
        self.counters.answered_locally += 1
        domain = DNSLabel(self._names.domain)
        ttl = self._config.local_nodata_ttl
        soa = SOA(
            mname=DNSLabel((b"ns", b"dns", *self._names.domain)),
            rname=DNSLabel((b"hostmaster", *self._names.domain)),
            times=(1, 7200, 1800, 86400, ttl),
        )
        response = DNSRecord(
            DNSHeader(qr=1, rcode=RCODE.NOERROR),
            q=waiter.question,
            auth=[RR(domain, QTYPE.SOA, ttl=ttl, rdata=soa)],
        )
        self._reply_with(waiter, response)

    def _start_forward(
        self, waiter: _Waiter, decision: Decision, key: CacheKey, now: float
    ) -> None:
        existing = self._forward_by_key.get(key)
        if existing is not None:
            forward = self._forwards[existing]
            if len(forward.waiters) < self._config.max_waiters_per_forward:
                self.counters.coalesced += 1
                forward.waiters.append(waiter)
            else:
                self.counters.servfail_overload += 1
                self._reply_rcode(waiter, RCODE.SERVFAIL)
            return
        to_cluster = decision.route == Route.CLUSTER
        if len(self._forwards) >= self._config.max_pending_forwards or (
            not to_cluster and not self._config.upstreams
        ):
            self.counters.servfail_overload += 1
            self._reply_rcode(waiter, RCODE.SERVFAIL)
            return
        question = waiter.question
        forward = _Forward(
            forward_id=next(self._forward_ids),
            key=key,
            client_name=question.qname,
            ask_name=DNSLabel(decision.cluster_name) if to_cluster else question.qname,
            qtype=question.qtype,
            qclass=question.qclass,
            dnssec_ok=waiter.dnssec_ok,
            cd=waiter.cd,
            destination=Destination.CLUSTER if to_cluster else Destination.UPSTREAM,
            fallback_upstream=decision.fallback_upstream,
            give_up_at=now + self._config.servfail_after,
            waiters=[waiter],
            wire_id=self._new_wire_id(),
        )
        self._forwards[forward.forward_id] = forward
        self._forward_by_key[key] = forward.forward_id
        self._send_attempt(forward, now)

    def _fall_back_upstream(self, forward: _Forward, now: float) -> None:
        self.counters.upstream_fallbacks += 1
        if not self._config.upstreams:
            self._fail(forward)
            return
        forward.destination = Destination.UPSTREAM
        forward.ask_name = forward.client_name
        forward.fallback_upstream = False
        forward.failures = 0
        forward.server_index = 0
        self._send_attempt(forward, now)

    def _send_attempt(self, forward: _Forward, now: float) -> None:
        query = DNSRecord(
            DNSHeader(id=forward.wire_id, qr=0, opcode=OPCODE.QUERY, rd=1, cd=forward.cd),
            q=DNSQuestion(forward.ask_name, forward.qtype, forward.qclass),
        )
        query.add_ar(
            EDNS0(udp_len=self._config.forward_udp_size, flags="do" if forward.dnssec_ok else "")
        )
        data = query.pack()
        if forward.destination == Destination.CLUSTER:
            self.counters.forwarded_cluster += 1
            self._actions.append(ForwardToCluster(forward.forward_id, data, forward.tcp))
            timeout = self._config.cluster_attempt_timeout
        else:
            self.counters.forwarded_upstream += 1
            upstreams = self._config.upstreams
            server = upstreams[forward.server_index % len(upstreams)]
            self._actions.append(ForwardUpstream(forward.forward_id, server, data, forward.tcp))
            timeout = self._config.upstream_attempt_timeout
        self._deadlines.schedule(forward.forward_id, min(now + timeout, forward.give_up_at))

    def _attempt_failed(self, forward: _Forward, now: float) -> None:
        forward.failures += 1
        if forward.destination == Destination.UPSTREAM and forward.failures < len(
            self._config.upstreams
        ):
            self.counters.upstream_retries += 1
            forward.server_index += 1
            forward.tcp = False
            self._send_attempt(forward, now)
            return
        self.counters.servfail_failures += 1
        self._fail(forward)

    def _complete(self, forward: _Forward, response: DNSRecord, now: float) -> None:
        if forward.ask_name != forward.client_name:
            for rr in (*response.rr, *response.auth, *response.ar):
                if rr.rname == forward.ask_name:
                    rr.rname = forward.client_name
        response.questions = [DNSQuestion(forward.client_name, forward.qtype, forward.qclass)]
        self._cache.put(forward.key, response, now=now)
        for waiter in forward.waiters:
            self._reply_with(waiter, response)
        self._finish(forward)

    def _fail(self, forward: _Forward) -> None:
        for waiter in forward.waiters:
            self._reply_rcode(waiter, RCODE.SERVFAIL)
        self._finish(forward)

    def _finish(self, forward: _Forward) -> None:
        self._forwards.pop(forward.forward_id, None)
        if self._forward_by_key.get(forward.key) == forward.forward_id:
            del self._forward_by_key[forward.key]
        self._wire_ids.discard(forward.wire_id)
        self._deadlines.cancel(forward.forward_id)
        self._actions.append(ForwardFinished(forward.forward_id))

    def _new_wire_id(self) -> int:
        while True:  # at most max_pending_forwards of 65536 IDs are taken
            wire_id = self._random_id() & 0xFFFF
            if wire_id not in self._wire_ids:
                self._wire_ids.add(wire_id)
                return wire_id

    # -- replies ------------------------------------------------------------------------

    def _waiter(self, query: DNSRecord, client: object, transport: ClientTransport) -> _Waiter:
        opt = _edns(query)
        if transport == ClientTransport.TCP:
            max_size = 65535
        elif opt is None:
            max_size = CLASSIC_UDP_SIZE
        else:
            max_size = min(max(int(opt.rclass), CLASSIC_UDP_SIZE), OUR_UDP_SIZE)
        header = query.header
        return _Waiter(
            client=client,
            transport=transport,
            query_id=header.id,
            question=query.q,
            rd=header.rd,
            cd=header.cd,
            edns=opt is not None,
            dnssec_ok=bool(opt is not None and int(opt.ttl) & DO_BIT),
            max_size=max_size,
        )

    def _reply_with(self, waiter: _Waiter, response: DNSRecord) -> None:
        source = response.header
        header = DNSHeader(
            id=waiter.query_id,
            qr=1,
            opcode=OPCODE.QUERY,
            rd=waiter.rd,
            ra=1,
            cd=waiter.cd,
            ad=source.ad if waiter.dnssec_ok else 0,
            tc=source.tc,
            rcode=source.rcode & 0xF,
        )
        extra = [rr for rr in response.ar if rr.rtype != QTYPE.OPT]
        reply = DNSRecord(header, q=waiter.question, rr=response.rr, auth=response.auth, ar=extra)
        if waiter.edns:
            reply.add_ar(EDNS0(udp_len=OUR_UDP_SIZE, flags="do" if waiter.dnssec_ok else ""))
        data = reply.pack()
        if len(data) > waiter.max_size:
            self.counters.truncated_replies += 1
            header.tc = 1
            short = DNSRecord(header, q=waiter.question)
            if waiter.edns:
                short.add_ar(EDNS0(udp_len=OUR_UDP_SIZE))
            data = short.pack()
        self._emit(waiter.client, waiter.transport, data)

    def _reply_rcode(self, waiter: _Waiter, rcode: int) -> None:
        self._reply_with(waiter, DNSRecord(DNSHeader(qr=1, rcode=rcode)))

    def _error_reply(self, query: DNSRecord, rcode: int) -> bytes:
        header = query.header
        reply = DNSRecord(
            DNSHeader(id=header.id, qr=1, opcode=header.opcode, rd=header.rd, ra=1, rcode=rcode)
        )
        return bytes(reply.pack())

    def _answer_unparsable(self, data: bytes, client: object, transport: ClientTransport) -> None:
        self.counters.malformed_queries += 1
        if len(data) < DNS_HEADER_SIZE:
            return
        query_id, flags = struct.unpack_from("!HH", data)
        if flags & 0x8000:  # a response: never answer one
            return
        self.counters.formerr_sent += 1
        header = DNSHeader(
            id=query_id,
            qr=1,
            opcode=(flags >> 11) & 0xF,
            rd=(flags >> 8) & 1,
            ra=1,
            rcode=RCODE.FORMERR,
        )
        self._emit(client, transport, bytes(DNSRecord(header).pack()))

    def _emit(self, client: object, transport: ClientTransport, data: bytes) -> None:
        self._actions.append(Reply(client, transport, bytes(data)))
