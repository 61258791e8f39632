"""Which names the cluster answers: the routing decision of the resolver, pure and table-driven.

Theory of operation
-------------------
A query is routed by its name alone, never by trying the cluster first and the laptop's
upstream servers second (that makes every external lookup pay a tunnel round trip). Names are
handled as tuples of lower-case label bytes, so a label holding a dot or a non-ASCII byte is
just a label that matches no rule (it goes upstream).

``<domain>`` below is the cluster domain (``cluster.local`` by default) and ``<ns>`` any
namespace in the set the caller keeps current (``ClusterNames.namespaces``):

=================================  =======================================================
name (as it reaches the resolver)  route
=================================  =======================================================
``<domain>`` and ``*.<domain>``    cluster, as asked; AAAA on an IPv4-only cluster is
                                   answered NOERROR/empty at once (``LOCAL_NODATA``)
``d.c.b.a.in-addr.arpa``           cluster, when a.b.c.d is in a pod or service CIDR
``*.<ns>.svc``, ``*.<ns>.pod``     cluster as ``<name>.<domain>`` (mapped)
``*.<ns>``                         cluster as ``<name>.svc.<domain>`` (mapped)
``<label>`` (A/AAAA/SRV/...)       cluster as ``<label>.<connected ns>.svc.<domain>``
                                   (mapped), unless a service set is known and lacks it
anything else                      upstream, as asked
=================================  =======================================================

The OS search list (``<ns>.svc.<domain> svc.<domain> <domain>``) turns most short names into
full names before they reach us, so the mapped forms only matter for names that arrive
*without* search expansion: ``echo.default`` tried as absolute first by glibc (ndots:1),
``dig echo``, Go and musl programs, and systemd-resolved's routing domains for namespaces
(resolved applies search domains to single-label names only).

A mapped name is *ambiguous*: ``www.example.dev`` is a public name but also "``www.example``
in namespace ``dev``". So a mapped query whose cluster answer is NXDOMAIN is then asked
upstream under its original name (``Decision.fallback_upstream``). That second trip happens
only for ambiguous names that the cluster does not know, never for ordinary external names.
A mapped answer is renamed back to the name the client asked for (like CoreDNS's ``rewrite
... answer auto``), so the client sees an answer to its own question.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from dnslib import QTYPE

__all__ = [
    "ClusterNames",
    "Decision",
    "Labels",
    "Route",
    "classify",
    "domain_labels",
    "reverse_address",
]

Labels = tuple[bytes, ...]

REVERSE_SUFFIX: Labels = (b"in-addr", b"arpa")
SINGLE_LABEL_TYPES = frozenset(
    {QTYPE.A, QTYPE.AAAA, QTYPE.ANY, QTYPE.CNAME, QTYPE.TXT, QTYPE.SRV, QTYPE.HTTPS}
)
NEVER_MAPPED_SINGLE_LABELS = frozenset({b"localhost", b"local", b"localdomain"})


def domain_labels(name: str) -> Labels:
    """``"Cluster.Local."`` -> ``(b"cluster", b"local")``."""
    return tuple(part.lower().encode("ascii") for part in name.strip(".").split(".") if part)


@dataclass(frozen=True, slots=True)
class ClusterNames:
    """What the resolver knows about the cluster's name space; refreshed by the caller."""

    domain: Labels = (b"cluster", b"local")
    namespace: bytes = b"default"  # the connected namespace, first in the search list
    namespaces: frozenset[bytes] = frozenset()
    services: frozenset[bytes] | None = None  # services of the connected namespace, if known
    reverse_networks: tuple[IPv4Network, ...] = ()  # pod and service CIDRs
    ipv6: bool = False  # the cluster serves AAAA records

    @classmethod
    def build(
        cls,
        *,
        domain: str = "cluster.local",
        namespace: str = "default",
        namespaces: Iterable[str] = (),
        services: Iterable[str] | None = None,
        reverse_networks: Iterable[IPv4Network] = (),
        ipv6: bool = False,
    ) -> ClusterNames:
        return cls(
            domain=domain_labels(domain),
            namespace=namespace.lower().encode("ascii"),
            namespaces=frozenset(n.lower().encode("ascii") for n in (*namespaces, namespace)),
            services=None
            if services is None
            else frozenset(s.lower().encode("ascii") for s in services),
            reverse_networks=tuple(reverse_networks),
            ipv6=ipv6,
        )


class Route(enum.Enum):
    UPSTREAM = "upstream"
    CLUSTER = "cluster"
    LOCAL_NODATA = "local_nodata"


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    cluster_name: Labels = field(default=())  # the name to ask the cluster (CLUSTER only)
    fallback_upstream: bool = False  # mapped name: NXDOMAIN from the cluster -> ask upstream

    @property
    def mapped(self) -> bool:
        return self.fallback_upstream


UPSTREAM = Decision(Route.UPSTREAM)


def reverse_address(labels: Labels) -> IPv4Address | None:
    """``(b"5", b"0", b"96", b"10", b"in-addr", b"arpa")`` -> 10.96.0.5; else ``None``."""
    if len(labels) != 6 or labels[4:] != REVERSE_SUFFIX:
        return None
    octets: list[int] = []
    for label in reversed(labels[:4]):
        if not label.isdigit() or len(label) > 3 or (len(label) > 1 and label[:1] == b"0"):
            return None
        value = int(label)
        if value > 255:
            return None
        octets.append(value)
    return IPv4Address(bytes(octets))


def _in_domain(names: ClusterNames, labels: Labels, qtype: int) -> Decision | None:
    size = len(names.domain)
    if size == 0 or labels[-size:] != names.domain or len(labels) < size:
        return None
    if qtype == QTYPE.AAAA and not names.ipv6:
        return Decision(Route.LOCAL_NODATA)
    return Decision(Route.CLUSTER, labels)


def _reverse(names: ClusterNames, labels: Labels, qtype: int) -> Decision | None:
    address = reverse_address(labels)
    if address is None or not any(address in net for net in names.reverse_networks):
        return None
    return Decision(Route.CLUSTER, labels)


def _namespace_qualified(names: ClusterNames, labels: Labels, qtype: int) -> Decision | None:
    if len(labels) >= 2 and labels[-1] in names.namespaces:
        return Decision(Route.CLUSTER, (*labels, b"svc", *names.domain), fallback_upstream=True)
    if len(labels) >= 3 and labels[-1] in (b"svc", b"pod") and labels[-2] in names.namespaces:
        return Decision(Route.CLUSTER, (*labels, *names.domain), fallback_upstream=True)
    return None


def _single_label(names: ClusterNames, labels: Labels, qtype: int) -> Decision | None:
    if len(labels) != 1 or qtype not in SINGLE_LABEL_TYPES:
        return None
    label = labels[0]
    if label in NEVER_MAPPED_SINGLE_LABELS:
        return None
    if names.services is not None and label not in names.services:
        return None
    return Decision(
        Route.CLUSTER, (label, names.namespace, b"svc", *names.domain), fallback_upstream=True
    )


RULES = (_in_domain, _reverse, _namespace_qualified, _single_label)


def classify(names: ClusterNames, labels: Labels, qtype: int) -> Decision:
    """Route the (lower-case) name *labels* asked with *qtype*: the first rule that matches."""
    if not labels:
        return UPSTREAM
    for rule in RULES:
        decision = rule(names, labels, qtype)
        if decision is not None:
            return decision
    return UPSTREAM
