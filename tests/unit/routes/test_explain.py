"""explain(): one case table of targets, plans and local routes, with the paragraph's key words."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from kvpn.routes.discovery import ClusterCidrs
from kvpn.routes.explain import Verdict, explain, resolve_target
from kvpn.routes.plan import LocalRoute, plan_routes

N = IPv4Network
A = IPv4Address

DEFAULT = LocalRoute(N("0.0.0.0/0"), "eth0", A("192.168.1.1"), 100)
LAN = LocalRoute(N("192.168.1.0/24"), "eth0")
DOCKER = LocalRoute(N("10.96.128.0/17"), "docker0")
API_HOST_ROUTE = LocalRoute(N("10.244.0.50/32"), "eth0", A("192.168.1.1"))
LOCAL = [DEFAULT, LAN, DOCKER, API_HOST_ROUTE]
CLUSTER = ClusterCidrs(
    (N("10.244.0.0/16"),),
    (N("10.96.0.0/12"),),
    pod_source="node.spec.podCIDRs",
    service_source="the API server's range error",
)


CASES: list[tuple[str, str, Verdict, bool, list[str]]] = [
    (
        "keep",
        "10.96.0.10",
        Verdict.ROUTED,
        True,
        ["goes through kvpn", "service CIDR 10.96.0.0/12", "dev kvpn0"],
    ),
    (
        "keep",
        "10.244.0.50",
        Verdict.API_SERVER,
        False,
        [
            "does not go through kvpn",
            "pod CIDR 10.244.0.0/16",
            "the API server (https://k8s.example:6443)",
            "10.244.0.50/32 via 192.168.1.1 dev eth0",
        ],
    ),
    ("keep", "10.244.1.7", Verdict.TUNNEL_PEER, False, ["SSH peer of the direct transport"]),
    ("keep", "10.244.9.9", Verdict.USER_EXCLUDED, False, ["--exclude-cidr 10.244.9.0/24"]),
    (
        "keep",
        "10.96.200.1",
        Verdict.LOCAL_ROUTE,
        False,
        ["local route 10.96.128.0/17 dev docker0", "kept", "pick 10.96.128.0/17 dev docker0"],
    ),
    (
        "keep",
        "8.8.8.8",
        Verdict.OUTSIDE,
        False,
        ["outside every cluster CIDR", "pod 10.244.0.0/16", "default route"],
    ),
    ("keep", "192.168.1.20", Verdict.OUTSIDE, False, ["pick 192.168.1.0/24 dev eth0"]),
    ("override", "10.96.200.1", Verdict.ROUTED, True, ["goes through kvpn", "10.96.192.0/18"]),
    ("fail", "10.96.0.10", Verdict.REFUSED, False, ["refused", "nothing is installed"]),
]


@pytest.mark.parametrize(("policy", "target", "verdict", "via_kvpn", "words"), CASES)
def test_explain(
    policy: str, target: str, verdict: Verdict, via_kvpn: bool, words: list[str]
) -> None:
    plan = plan_routes(
        CLUSTER,
        exclude_cidrs=[N("10.244.9.0/24")],
        apiserver_addresses=[A("10.244.0.50")],
        tunnel_peer=A("10.244.1.7"),
        local_routes=LOCAL,
        on_conflict=policy,
        apiserver_name="https://k8s.example:6443",
    )
    explanation = explain(A(target), plan, LOCAL)
    assert explanation.verdict is verdict
    assert explanation.via_kvpn is via_kvpn
    for word in words:
        assert word in explanation.text, (word, explanation.text)
    assert "\n" not in explanation.text and len(explanation.text) < 400
    data = explanation.to_json()
    assert data["verdict"] == verdict.value and data["via_kvpn"] is via_kvpn


def test_api_server_outside_the_cluster_cidrs_says_both() -> None:
    plan = plan_routes(CLUSTER, apiserver_addresses=[A("192.168.1.5")], local_routes=LOCAL)
    explanation = explain(A("192.168.1.5"), plan, LOCAL)
    assert explanation.verdict is Verdict.OUTSIDE
    assert "It is also the API server" in explanation.text


def test_a_local_route_newer_than_the_plan_is_named() -> None:
    plan = plan_routes(CLUSTER)
    newer = [*LOCAL, LocalRoute(N("10.244.5.0/24"), "wg0")]
    explanation = explain(A("10.244.5.5"), plan, newer)
    assert explanation.verdict is Verdict.LOCAL_ROUTE
    assert "10.244.5.0/24 dev wg0 is more specific" in explanation.text


def test_no_route_at_all() -> None:
    plan = plan_routes(CLUSTER, exclude_cidrs=[N("10.244.0.0/16")])
    explanation = explain(A("10.244.0.1"), plan, [])
    assert explanation.choice is None
    assert "The kernel has no route for it" in explanation.text


def test_routes_on_the_tun_are_the_plans_own() -> None:
    plan = plan_routes(CLUSTER)
    stale = [LocalRoute(N("10.96.0.0/16"), "kvpn0")]
    assert explain(A("10.96.0.1"), plan, stale).via_kvpn


def test_name_is_shown_with_its_address() -> None:
    explanation = explain(A("10.96.0.10"), plan_routes(CLUSTER), LOCAL, name="web.default")
    assert explanation.text.startswith("web.default (10.96.0.10) goes through kvpn")
    assert explanation.to_json()["target"] == "web.default"


def fake_resolver(answers: dict[str, list[str]]) -> Any:
    def resolve(host: str, port: Any, family: int, kind: int) -> list[Any]:
        assert family == socket.AF_INET
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(family, kind, 6, "", (ip, 0)) for ip in answers[host]]

    return resolve


def test_resolve_target() -> None:
    resolver = fake_resolver({"web.default.svc.cluster.local": ["10.96.0.20"]})
    assert resolve_target(" 10.1.2.3 ", resolver=resolver) == (A("10.1.2.3"), None)
    assert resolve_target("web.default.svc.cluster.local", resolver=resolver) == (
        A("10.96.0.20"),
        "web.default.svc.cluster.local",
    )
    with pytest.raises(ValueError, match="cannot resolve nowhere.invalid: Name or service"):
        resolve_target("nowhere.invalid", resolver=resolver)
    with pytest.raises(ValueError, match="only IPv4"):
        resolve_target("fd00::1", resolver=resolver)
    with pytest.raises(ValueError, match="invalid target"):
        resolve_target("", resolver=resolver)
