"""The cluster DNS zone, sans-IO: an immutable snapshot of the cluster and ``answer()``.

Theory of operation
-------------------
The records follow the Kubernetes DNS specification
(https://github.com/kubernetes/dns/blob/master/docs/specification.md) as CoreDNS's
``kubernetes`` plugin serves it with the kubeadm Corefile (``pods insecure``, reverse zones
with fallthrough):

- ``<svc>.<ns>.svc.<domain>`` A: the ClusterIP; for a headless service the IPs of its ready
  endpoints (NXDOMAIN while it has none); an ExternalName service is a CNAME.
- ``<host>.<svc>.<ns>.svc.<domain>`` A: one endpoint, ``host`` being the endpoint's
  ``hostname`` or its dashed IP (``10-244-0-5``).
- ``_<port>._<proto>.<svc>.<ns>.svc.<domain>`` SRV (and a plain ``<svc>...`` SRV for every
  port): target ``<svc>.<ns>.svc.<domain>`` or, headless, one target per endpoint; the targets'
  A records go in the additional section.
- ``a-b-c-d.<ns>.pod.<domain>`` A: ``a.b.c.d`` for any well-formed address.
- PTR ``d.c.b.a.in-addr.arpa`` for service ClusterIPs, endpoint IPs and pod IPs.
- Existing names asked for another type (AAAA: the cluster is IPv4-only) get NOERROR with no
  answer; unknown names in the domain get NXDOMAIN; both carry the zone's SOA in the authority
  section (negative TTL 5). Answers have TTL 5.

:func:`answer` returns ``None`` for names the cluster does not serve (outside the domain, and
reverse names of unknown addresses): the IO adapter forwards those upstream.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dnslib import CNAME, NS, PTR, QTYPE, RCODE, RR, SOA, SRV, TXT, A, DNSRecord

Obj = dict[str, Any]
TTL = 5
NEGATIVE_TTL = 5
SCHEMA_VERSION = "1.1.0"
REVERSE_SUFFIX = ("in-addr", "arpa")


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    port: int
    protocol: str  # upper case, as in the API


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for headless and ExternalName services
    headless: bool
    external_name: str | None
    ports: tuple[Port, ...]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready endpoint address with the ports of its subset."""

    ip: str
    hostname: str  # the endpoint's hostname, or its dashed IP
    ports: tuple[Port, ...]


def _empty_map() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """What the DNS knows of the cluster at one moment. Build it with :func:`build_snapshot`."""

    domain: str = "cluster.local"
    services: Mapping[tuple[str, str], Service] = field(default_factory=_empty_map)
    endpoints: Mapping[tuple[str, str], tuple[Endpoint, ...]] = field(default_factory=_empty_map)
    namespaces: frozenset[str] = frozenset()
    reverse: Mapping[str, str] = field(default_factory=_empty_map)  # IP -> name (no dot)
    dns_ips: tuple[str, ...] = ()
    serial: int = 1

    @property
    def domain_labels(self) -> tuple[str, ...]:
        return tuple(self.domain.lower().strip(".").split("."))


# -- building a snapshot from API objects -------------------------------------------------


def _meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def _key(obj: Obj) -> tuple[str, str] | None:
    m = _meta(obj)
    ns, name = m.get("namespace"), m.get("name")
    if isinstance(ns, str) and isinstance(name, str) and ns and name:
        return ns, name
    return None


def _ports(items: object) -> tuple[Port, ...]:
    out = []
    for p in items if isinstance(items, list) else []:
        if isinstance(p, dict) and isinstance(p.get("port"), int):
            out.append(Port(str(p.get("name") or ""), p["port"], str(p.get("protocol") or "TCP")))
    return tuple(out)


def _ipv4(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def _dashed(ip: str) -> str:
    return ip.replace(".", "-")


def _service(obj: Obj) -> Service | None:
    key = _key(obj)
    spec = obj.get("spec")
    if key is None or not isinstance(spec, dict):
        return None
    external = spec.get("externalName") if spec.get("type") == "ExternalName" else None
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    cluster_ips = tuple(ip for raw in ips if (ip := _ipv4(raw)))
    headless = spec.get("clusterIP") == "None" and external is None
    return Service(
        key[0],
        key[1],
        () if external else cluster_ips,
        headless,
        str(external).strip(".").lower() if external else None,
        _ports(spec.get("ports")),
    )


def _endpoints(obj: Obj) -> tuple[Endpoint, ...]:
    out = []
    for subset in obj.get("subsets") or []:
        if not isinstance(subset, dict):
            continue
        ports = _ports(subset.get("ports"))
        for address in subset.get("addresses") or []:
            ip = _ipv4(address.get("ip")) if isinstance(address, dict) else None
            if ip is None:
                continue
            hostname = address.get("hostname")
            host = hostname.lower() if isinstance(hostname, str) and hostname else _dashed(ip)
            out.append(Endpoint(ip, host, ports))
    return tuple(out)


def build_snapshot(
    domain: str,
    services: Iterable[Obj],
    endpoints: Iterable[Obj],
    pods: Iterable[Obj],
    *,
    serial: int = 1,
) -> Snapshot:
    """A snapshot from API objects (JSON dicts as served); malformed objects are skipped."""
    domain = domain.lower().strip(".")
    svc_map: dict[tuple[str, str], Service] = {}
    for obj in services:
        svc = _service(obj) if isinstance(obj, dict) else None
        if svc is not None:
            svc_map[(svc.namespace, svc.name)] = svc
    ep_map: dict[tuple[str, str], tuple[Endpoint, ...]] = {}
    for obj in endpoints:
        key = _key(obj) if isinstance(obj, dict) else None
        if key is not None:
            ep_map[key] = _endpoints(obj)
    namespaces = {ns for ns, _ in svc_map} | {ns for ns, _ in ep_map}
    reverse: dict[str, str] = {}
    for obj in pods:  # lowest priority first; later writes win
        key = _key(obj) if isinstance(obj, dict) else None
        if key is None:
            continue
        namespaces.add(key[0])
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        ip = _ipv4(status.get("podIP")) if isinstance(status, dict) else None
        if ip and isinstance(spec, dict) and not spec.get("hostNetwork"):
            reverse[ip] = f"{_dashed(ip)}.{key[0]}.pod.{domain}"
    for (ns, name), eps in sorted(ep_map.items(), reverse=True):
        if (ns, name) in svc_map:
            for ep in eps:
                reverse[ep.ip] = f"{ep.hostname}.{name}.{ns}.svc.{domain}"
    for (ns, name), svc in sorted(svc_map.items(), reverse=True):
        for ip in svc.cluster_ips:
            reverse[ip] = f"{name}.{ns}.svc.{domain}"
    dns = svc_map.get(("kube-system", "kube-dns"))
    return Snapshot(
        domain=domain,
        services=MappingProxyType(svc_map),
        endpoints=MappingProxyType(ep_map),
        namespaces=frozenset(namespaces),
        reverse=MappingProxyType(reverse),
        dns_ips=dns.cluster_ips if dns else (),
        serial=serial,
    )


# -- resolution ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """What a name has: addresses, SRV targets (port, target name, target IPs), a CNAME..."""

    addresses: tuple[str, ...] = ()
    srv: tuple[tuple[int, str, tuple[str, ...]], ...] = ()
    cname: str | None = None
    txt: str | None = None
    ptr: str | None = None
    soa: bool = False
    ns: bool = False


NXDOMAIN = None  # a lookup that finds nothing


def _matches(label: str, want: str) -> bool:
    return label in ("", "*", "any") or label == want.lower()


def _service_name(svc: Service, domain: str) -> str:
    return f"{svc.name}.{svc.namespace}.svc.{domain}"


def _lookup_service(
    snap: Snapshot, svc: Service, port: str | None, proto: str | None, endpoint: str | None
) -> Found | None:
    """CoreDNS ``findServices``: records of one service, filtered by port/protocol/endpoint."""
    if svc.external_name is not None:
        return Found(cname=svc.external_name) if endpoint is None and port is None else NXDOMAIN
    own_name = _service_name(svc, snap.domain)
    if svc.headless or endpoint is not None:
        addresses: list[str] = []
        srv: list[tuple[int, str, tuple[str, ...]]] = []
        for ep in snap.endpoints.get((svc.namespace, svc.name), ()):
            if endpoint is not None and ep.hostname != endpoint:
                continue
            ports = ep.ports or (Port("", -1, ""),)
            for p in ports:
                if p.port >= 0 and not (
                    _matches(port or "", p.name) and _matches(proto or "", p.protocol)
                ):
                    continue
                if p.port < 0 and port is not None:
                    continue
                if ep.ip not in addresses:
                    addresses.append(ep.ip)
                if p.port >= 0:
                    srv.append((p.port, f"{ep.hostname}.{own_name}", (ep.ip,)))
        return Found(tuple(addresses), tuple(srv)) if addresses else NXDOMAIN
    matching = [
        p for p in svc.ports if _matches(port or "", p.name) and _matches(proto or "", p.protocol)
    ]
    if not matching:
        return NXDOMAIN
    return Found(svc.cluster_ips, tuple((p.port, own_name, svc.cluster_ips) for p in matching))


def _lookup_svc_zone(snap: Snapshot, labels: tuple[str, ...]) -> Found | None:
    """``labels`` are the name's labels before ``svc.<domain>``."""
    if not labels:
        return Found()
    namespace = labels[-1]
    if len(labels) == 1:
        return Found() if namespace in snap.namespaces else NXDOMAIN
    svc = snap.services.get((namespace, labels[-2]))
    if svc is None:
        return NXDOMAIN
    rest = labels[:-2]
    if not rest:
        return _lookup_service(snap, svc, None, None, None)
    if len(rest) == 1:
        return _lookup_service(snap, svc, None, None, rest[0])
    if len(rest) == 2 and rest[0].startswith("_") and rest[1].startswith("_"):
        return _lookup_service(snap, svc, rest[0][1:], rest[1][1:], None)
    return NXDOMAIN


def _lookup_pod_zone(snap: Snapshot, labels: tuple[str, ...]) -> Found | None:
    if not labels:
        return Found()
    if len(labels) == 1:
        return Found() if labels[0] in snap.namespaces else NXDOMAIN
    if len(labels) != 2:
        return NXDOMAIN
    ip = _ipv4(labels[0].replace("-", ".")) if labels[0].count("-") == 3 else None
    return Found((ip,)) if ip else NXDOMAIN


def lookup(snap: Snapshot, labels: tuple[str, ...]) -> Found | None:
    """Records of a name given as lower-case labels *without* the cluster domain."""
    if not labels:
        return Found(soa=True, ns=True)
    zone, rest = labels[-1], labels[:-1]
    if zone == "svc":
        return _lookup_svc_zone(snap, rest)
    if zone == "pod":
        return _lookup_pod_zone(snap, rest)
    if labels == ("dns-version",):
        return Found(txt=SCHEMA_VERSION)
    if labels == ("ns", "dns"):
        return Found(snap.dns_ips)
    if labels == ("dns",):
        return Found()
    return NXDOMAIN


def _reverse_ip(labels: tuple[str, ...]) -> str | None:
    if len(labels) != 6 or labels[4:] != REVERSE_SUFFIX:
        return None
    return _ipv4(".".join(reversed(labels[:4])))


def _soa(snap: Snapshot) -> RR:
    d = snap.domain
    return RR(
        f"{d}.",
        QTYPE.SOA,
        ttl=NEGATIVE_TTL,
        rdata=SOA(
            f"ns.dns.{d}.", f"hostmaster.{d}.", (snap.serial, 7200, 1800, 86400, NEGATIVE_TTL)
        ),
    )


def _records(qname: Any, qtype: int, found: Found, snap: Snapshot) -> tuple[list[RR], list[RR]]:
    """(answer, additional) records of ``found`` for one query type."""
    answer: list[RR] = []
    extra: list[RR] = []
    if found.cname is not None and qtype != QTYPE.SRV:
        return [RR(qname, QTYPE.CNAME, ttl=TTL, rdata=CNAME(found.cname + "."))], []
    if qtype in (QTYPE.A, QTYPE.ANY):
        answer += [RR(qname, QTYPE.A, ttl=TTL, rdata=A(ip)) for ip in found.addresses]
    if qtype == QTYPE.SRV:
        weight = max(1, 100 // len(found.srv)) if found.srv else 0
        seen: set[str] = set()
        for port, target, ips in found.srv:
            answer.append(RR(qname, QTYPE.SRV, ttl=TTL, rdata=SRV(0, weight, port, target + ".")))
            if target not in seen:
                seen.add(target)
                extra += [RR(target + ".", QTYPE.A, ttl=TTL, rdata=A(ip)) for ip in ips]
    if qtype == QTYPE.TXT and found.txt is not None:
        answer.append(RR(qname, QTYPE.TXT, ttl=TTL, rdata=TXT(found.txt)))
    if qtype == QTYPE.PTR and found.ptr is not None:
        answer.append(RR(qname, QTYPE.PTR, ttl=TTL, rdata=PTR(found.ptr + ".")))
    if qtype == QTYPE.SOA and found.soa:
        answer.append(_soa(snap))
    if qtype == QTYPE.NS and found.ns:
        answer.append(RR(qname, QTYPE.NS, ttl=TTL, rdata=NS(f"ns.dns.{snap.domain}.")))
        extra += [
            RR(f"ns.dns.{snap.domain}.", QTYPE.A, ttl=TTL, rdata=A(ip)) for ip in snap.dns_ips
        ]
    return answer, extra


def query_labels(query: DNSRecord) -> tuple[str, ...]:
    """The question's name as lower-case text labels."""
    return tuple(label.decode("latin-1").lower() for label in query.q.qname.label)


def answer(query: DNSRecord | bytes, snap: Snapshot) -> DNSRecord | None:
    """The response to a one-question query, or ``None`` if the name is not the cluster's.

    Raises ``dnslib.DNSError`` for bytes that do not parse (the caller answers FORMERR).
    """
    if isinstance(query, bytes | bytearray):
        query = DNSRecord.parse(bytes(query))
    labels = query_labels(query)
    qtype = query.q.qtype
    domain = snap.domain_labels
    if _reverse_ip(labels) is not None:
        name = snap.reverse.get(_reverse_ip(labels) or "")
        if name is None:
            return None
        found: Found | None = Found(ptr=name)
    elif labels[len(labels) - len(domain) :] == domain and len(labels) >= len(domain):
        found = lookup(snap, labels[: len(labels) - len(domain)])
    else:
        return None
    reply = query.reply()
    reply.header.aa = 1
    reply.header.ra = 0  # as CoreDNS: dig warns "recursion requested but not available"
    if found is None:
        reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(_soa(snap))
        return reply
    records, extra = _records(query.q.qname, qtype, found, snap)
    for rr in records:
        reply.add_answer(rr)
    for rr in extra:
        reply.add_ar(rr)
    if not records and found.ptr is None:
        reply.add_auth(_soa(snap))
    return reply
