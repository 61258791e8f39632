"""What the resolver core asks its adapter to do (pulled with ``DnsResolver.next_action()``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

__all__ = [
    "Action",
    "ClientTransport",
    "DnsCounters",
    "ForwardFinished",
    "ForwardToCluster",
    "ForwardUpstream",
    "Reply",
    "UpstreamServer",
]


class ClientTransport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    """One of the laptop's original name servers."""

    host: str
    port: int = 53


@dataclass(frozen=True, slots=True)
class ForwardToCluster:
    """Send *query* to the cluster DNS (through the tunnel); feed the answer back with
    ``receive_response(forward_id, ...)`` or report ``forward_failed(forward_id, ...)``.

    *tcp* is set after a truncated answer: use a stream if the path has one.
    """

    forward_id: int
    query: bytes
    tcp: bool = False


@dataclass(frozen=True, slots=True)
class ForwardUpstream:
    """Send *query* to *server* directly (over TCP when *tcp*, after a truncated UDP answer).

    Every datagram that comes back goes to ``receive_response``: the core checks the ID and
    question, so a spoofed or late datagram is ignored there, not in the adapter.
    """

    forward_id: int
    server: UpstreamServer
    query: bytes
    tcp: bool = False


@dataclass(frozen=True, slots=True)
class ForwardFinished:
    """The forward is answered or abandoned: stop its exchanges, close their sockets."""

    forward_id: int


@dataclass(frozen=True, slots=True)
class Reply:
    """Send *response* to *client* (the opaque token given to ``receive_query``)."""

    client: object
    transport: ClientTransport
    response: bytes


Action = ForwardToCluster | ForwardUpstream | ForwardFinished | Reply


@dataclass(slots=True)
class DnsCounters:
    """Resolver counters for ``kvpn status``; malformed input lands here, never in a crash."""

    queries: int = 0
    cache_hits: int = 0
    answered_locally: int = 0
    forwarded_cluster: int = 0
    forwarded_upstream: int = 0
    coalesced: int = 0
    upstream_fallbacks: int = 0
    upstream_retries: int = 0
    tcp_retries: int = 0
    servfail_timeouts: int = 0
    servfail_failures: int = 0
    servfail_overload: int = 0
    formerr_sent: int = 0
    notimp_sent: int = 0
    refused_sent: int = 0
    malformed_queries: int = 0
    dropped_responses_as_queries: int = 0
    malformed_responses: int = 0
    mismatched_responses: int = 0
    late_responses: int = 0
    truncated_replies: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        snapshot = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        snapshot.update(self.extra)
        return snapshot
