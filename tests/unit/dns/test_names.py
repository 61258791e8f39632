"""Routing decisions by name, from one case table."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
from dnslib import QTYPE

from kvpn.dns.names import ClusterNames, Route, classify, domain_labels, reverse_address

NAMES = ClusterNames.build(
    domain="cluster.local",
    namespace="default",
    namespaces=["default", "kube-system", "dev"],
    reverse_networks=[IPv4Network("10.96.0.0/12"), IPv4Network("10.244.0.0/16")],
)
WITH_SERVICES = ClusterNames.build(
    namespace="default", namespaces=["default"], services=["echo", "web"]
)

D = "cluster.local"
CASES = [
    # name, qtype, names, route, cluster name (mapped or as asked), fallback upstream
    (f"echo.default.svc.{D}", "A", NAMES, Route.CLUSTER, f"echo.default.svc.{D}", False),
    (f"ECHO.Default.svc.{D}", "A", NAMES, Route.CLUSTER, f"echo.default.svc.{D}", False),
    (f"echo.default.svc.{D}", "AAAA", NAMES, Route.LOCAL_NODATA, None, False),
    (
        f"_http._tcp.echo.default.svc.{D}",
        "SRV",
        NAMES,
        Route.CLUSTER,
        f"_http._tcp.echo.default.svc.{D}",
        False,
    ),
    (D, "SOA", NAMES, Route.CLUSTER, D, False),
    (
        f"10-244-0-5.default.pod.{D}",
        "A",
        NAMES,
        Route.CLUSTER,
        f"10-244-0-5.default.pod.{D}",
        False,
    ),
    ("echo.default", "A", NAMES, Route.CLUSTER, f"echo.default.svc.{D}", True),
    ("echo.default", "AAAA", NAMES, Route.CLUSTER, f"echo.default.svc.{D}", True),
    ("echo.kube-system", "A", NAMES, Route.CLUSTER, f"echo.kube-system.svc.{D}", True),
    ("echo.default.svc", "A", NAMES, Route.CLUSTER, f"echo.default.svc.{D}", True),
    ("10-244-0-5.default.pod", "A", NAMES, Route.CLUSTER, f"10-244-0-5.default.pod.{D}", True),
    (
        "_http._tcp.echo.default",
        "SRV",
        NAMES,
        Route.CLUSTER,
        f"_http._tcp.echo.default.svc.{D}",
        True,
    ),
    ("echo", "A", NAMES, Route.CLUSTER, f"echo.default.svc.{D}", True),
    ("echo", "AAAA", NAMES, Route.CLUSTER, f"echo.default.svc.{D}", True),
    ("echo", "NS", NAMES, Route.UPSTREAM, None, False),  # a TLD-style question
    ("localhost", "A", NAMES, Route.UPSTREAM, None, False),
    ("echo", "A", WITH_SERVICES, Route.CLUSTER, f"echo.default.svc.{D}", True),
    ("nope", "A", WITH_SERVICES, Route.UPSTREAM, None, False),
    ("example.test", "A", NAMES, Route.UPSTREAM, None, False),
    ("www.example.test", "AAAA", NAMES, Route.UPSTREAM, None, False),
    ("echo.other", "A", NAMES, Route.UPSTREAM, None, False),  # not a known namespace
    ("www.example.dev", "A", NAMES, Route.CLUSTER, f"www.example.dev.svc.{D}", True),  # ambiguous
    ("5.0.96.10.in-addr.arpa", "PTR", NAMES, Route.CLUSTER, "5.0.96.10.in-addr.arpa", False),
    ("7.0.244.10.in-addr.arpa", "PTR", NAMES, Route.CLUSTER, "7.0.244.10.in-addr.arpa", False),
    ("1.1.168.192.in-addr.arpa", "PTR", NAMES, Route.UPSTREAM, None, False),
    ("96.10.in-addr.arpa", "PTR", NAMES, Route.UPSTREAM, None, False),
    ("05.0.96.10.in-addr.arpa", "PTR", NAMES, Route.UPSTREAM, None, False),
    ("local", "A", NAMES, Route.UPSTREAM, None, False),
    (".", "NS", NAMES, Route.UPSTREAM, None, False),
    (f"x.{D}.evil.test", "A", NAMES, Route.UPSTREAM, None, False),
]


@pytest.mark.parametrize(("name", "qtype", "names", "route", "cluster_name", "fallback"), CASES)
def test_classify(
    name: str,
    qtype: str,
    names: ClusterNames,
    route: Route,
    cluster_name: str | None,
    fallback: bool,
) -> None:
    decision = classify(names, domain_labels(name), getattr(QTYPE, qtype))
    assert decision.route is route
    assert decision.fallback_upstream is fallback
    if cluster_name is not None:
        assert decision.cluster_name == domain_labels(cluster_name)


def test_ipv6_cluster_forwards_aaaa() -> None:
    names = ClusterNames.build(ipv6=True)
    decision = classify(names, domain_labels(f"echo.default.svc.{D}"), QTYPE.AAAA)
    assert decision.route is Route.CLUSTER


def test_other_cluster_domain() -> None:
    names = ClusterNames.build(domain="corp.internal", namespace="team", namespaces=["team"])
    assert (
        classify(names, domain_labels("a.team.svc.corp.internal"), QTYPE.A).route is Route.CLUSTER
    )
    assert classify(names, domain_labels(f"a.team.svc.{D}"), QTYPE.A).route is Route.UPSTREAM
    assert classify(names, domain_labels("a.team"), QTYPE.A).cluster_name == domain_labels(
        "a.team.svc.corp.internal"
    )


@pytest.mark.parametrize(
    ("labels", "address"),
    [
        ((b"5", b"0", b"96", b"10", b"in-addr", b"arpa"), "10.96.0.5"),
        ((b"256", b"0", b"96", b"10", b"in-addr", b"arpa"), None),
        ((b"x", b"0", b"96", b"10", b"in-addr", b"arpa"), None),
        ((b"0", b"96", b"10", b"in-addr", b"arpa"), None),
        ((b"1", b"2", b"3", b"4", b"ip6", b"arpa"), None),
    ],
)
def test_reverse_address(labels: tuple[bytes, ...], address: str | None) -> None:
    result = reverse_address(labels)
    assert (str(result) if result else None) == address
