from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from kvpn.routes.discovery import (
    DiscoveryError,
    covering_prefix,
    discover,
    exclude,
    list_all,
    service_cidr_from_error,
)

N = ipaddress.IPv4Network


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            'Service "x" is invalid: spec.clusterIPs[0]: Invalid value: "169.254.254.254": '
            "failed to allocate IP 169.254.254.254: the provided IP (169.254.254.254) is not "
            "in the valid range. The range of valid IPs is 10.96.0.0/12",
            N("10.96.0.0/12"),
        ),
        ("... The range of valid IPs is 172.20.0.0/16.", N("172.20.0.0/16")),
        ("the range of valid IPs is fd00::/108", None),  # IPv6 is not routed yet
        ("forbidden", None),
        ("The range of valid IPs is nonsense", None),
    ],
)
def test_service_cidr_from_error(message: str, expected: N | None) -> None:
    assert service_cidr_from_error(message) == expected


@pytest.mark.parametrize(
    ("ips", "expected"),
    [
        ([], None),
        (["10.244.0.5"], N("10.244.0.5/32")),
        (["10.244.0.5", "10.244.0.9"], N("10.244.0.0/28")),
        (["10.244.0.5", "10.244.1.9", "bad", "fd00::1"], N("10.244.0.0/23")),
    ],
)
def test_covering_prefix(ips: list[str], expected: N | None) -> None:
    assert covering_prefix(ips) == expected


def test_exclude_inside_a_routed_cidr() -> None:
    assert exclude([N("10.96.0.0/12")], [N("10.96.0.1/32")])[0] == N("10.96.0.0/32")
    assert exclude([N("10.0.0.0/30")], [N("10.0.0.1/32")]) == [N("10.0.0.0/32"), N("10.0.0.2/31")]
    assert exclude([N("10.0.0.0/24")], [N("10.0.0.0/16")]) == []
    assert exclude([N("10.0.0.0/24")], [N("10.1.0.0/16")]) == [N("10.0.0.0/24")]


@given(
    base=st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32)), min_size=1, max_size=3),
    cut=st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32)), max_size=3),
)
def test_exclude_matches_brute_force(
    base: list[tuple[int, int]], cut: list[tuple[int, int]]
) -> None:
    def net(t: tuple[int, int]) -> N:
        return N((0x0A000000 | t[0], t[1]), strict=False)

    nets = [net(t) for t in base]
    cuts = [net(t) for t in cut]
    result = exclude(nets, cuts)
    covered = {int(a) for n in result for a in n}
    expected = {int(a) for n in nets for a in n} - {int(a) for c in cuts for a in c}
    assert covered == expected
    # Minimal: no two results overlap.
    for i, a in enumerate(result):
        for b in result[i + 1 :]:
            assert not a.overlaps(b)


# -- discover() against a fake CoreV1Api: pagination, RBAC fallbacks, hostNetwork --------

RANGE_ERROR = (
    '{"kind":"Status","message":"Service \\"p\\" is invalid: ... The range of valid IPs is '
    '10.96.0.0/12","reason":"Invalid","code":422}'
)


def pod(ip: str | None, *, host_network: bool = False, namespace: str = "default") -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(namespace=namespace),
        spec=SimpleNamespace(host_network=host_network or None),
        status=SimpleNamespace(pod_ip=ip, pod_ips=[SimpleNamespace(ip=ip)] if ip else None),
    )


def node(pod_cidrs: list[str] | None, address: str = "172.31.255.1") -> Any:
    return SimpleNamespace(
        spec=SimpleNamespace(pod_cidrs=pod_cidrs, pod_cidr=None),
        status=SimpleNamespace(addresses=[SimpleNamespace(address=address, type="InternalIP")]),
    )


def service(ip: str, namespace: str = "default") -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(namespace=namespace),
        spec=SimpleNamespace(cluster_ip=ip, cluster_ips=[ip]),
    )


class FakeCore:
    """A CoreV1Api stand-in that pages with limit/continue and refuses what RBAC forbids."""

    def __init__(
        self,
        *,
        nodes: list[Any] = (),  # type: ignore[assignment]
        pods: list[Any] = (),  # type: ignore[assignment]
        services: list[Any] = (),  # type: ignore[assignment]
        forbidden: set[str] = frozenset(),  # type: ignore[assignment]
        probe_error: str | None = RANGE_ERROR,
        expire_first_continue: bool = False,
    ) -> None:
        self.nodes, self.pods, self.services = list(nodes), list(pods), list(services)
        self.forbidden = forbidden
        self.probe_error = probe_error
        self.expire_first_continue = expire_first_continue
        self.calls: list[tuple[str, int | None, str | None]] = []

    def _page(self, name: str, items: list[Any], limit: int | None, token: str | None) -> Any:
        self.calls.append((name, limit, token))
        if name in self.forbidden:
            raise ApiException(status=403, reason="Forbidden")
        if token is not None and self.expire_first_continue:
            self.expire_first_continue = False
            raise ApiException(status=410, reason="Gone")
        start = int(token) if token else 0
        end = len(items) if limit is None else start + limit
        more = end < len(items)
        return SimpleNamespace(
            items=items[start:end],
            metadata=SimpleNamespace(var_continue=str(end) if more else None),
        )

    def create_namespaced_service(self, namespace: str, body: Any, **kw: Any) -> Any:
        self.calls.append(("create_namespaced_service", None, None))
        if "create_namespaced_service" in self.forbidden:
            raise ApiException(status=403, reason="Forbidden")
        if self.probe_error is None:
            return body
        exc = ApiException(status=422, reason="Invalid")
        exc.body = self.probe_error
        raise exc

    def list_node(
        self, *, limit: int | None = None, _continue: str | None = None, **kw: Any
    ) -> Any:
        return self._page("list_node", self.nodes, limit, _continue)

    def list_pod_for_all_namespaces(
        self, *, limit: int | None = None, _continue: str | None = None, **kw: Any
    ) -> Any:
        return self._page("list_pod_for_all_namespaces", self.pods, limit, _continue)

    def list_namespaced_pod(
        self, namespace: str, *, limit: int | None = None, _continue: str | None = None, **kw: Any
    ) -> Any:
        items = [p for p in self.pods if p.metadata.namespace == namespace]
        return self._page("list_namespaced_pod", items, limit, _continue)

    def list_service_for_all_namespaces(
        self, *, limit: int | None = None, _continue: str | None = None, **kw: Any
    ) -> Any:
        return self._page("list_service_for_all_namespaces", self.services, limit, _continue)

    def list_namespaced_service(
        self, namespace: str, *, limit: int | None = None, _continue: str | None = None, **kw: Any
    ) -> Any:
        items = [s for s in self.services if s.metadata.namespace == namespace]
        return self._page("list_namespaced_service", items, limit, _continue)


def test_discover_uses_node_pod_cidrs_and_the_range_error() -> None:
    core = FakeCore(nodes=[node(["10.244.0.0/24"]), node(["10.244.1.0/24", "fd00::/64"])])
    found = discover(core, "default")
    assert found.pod_cidrs == (N("10.244.0.0/24"), N("10.244.1.0/24"))
    assert found.service_cidrs == (N("10.96.0.0/12"),)
    assert found.notes == ()
    assert found.pod_source == "node.spec.podCIDRs"


def test_discover_pages_through_more_than_a_thousand_pods() -> None:
    pods = [pod(f"10.{40 + i // 65536}.{i // 256 % 256}.{i % 256}") for i in range(2500)]
    core = FakeCore(nodes=[node(None)], pods=pods)
    found = discover(core, "default", page_size=400)
    assert found.pod_cidrs == (N("10.40.0.0/20"),)  # covers 10.40.0.0 .. 10.40.9.195
    pages = [c for c in core.calls if c[0] == "list_pod_for_all_namespaces"]
    assert len(pages) == 7 and all(limit == 400 for _, limit, _ in pages)


def test_hostnetwork_pods_and_node_addresses_do_not_leak_into_pod_cidrs() -> None:
    core = FakeCore(
        nodes=[node(None, address="192.168.5.5")],
        pods=[
            pod("10.244.0.5"),
            pod("10.244.0.9"),
            pod("172.31.255.1", host_network=True),
            pod("192.168.5.5"),  # a hostNetwork pod whose flag a proxy dropped
            pod(None),
        ],
    )
    found = discover(core, "default")
    assert found.pod_cidrs == (N("10.244.0.0/28"),)
    assert "nodes have no spec.podCIDRs" in found.notes[0]


def test_namespace_only_rbac_falls_back_and_says_what_it_could_not_see() -> None:
    core = FakeCore(
        pods=[pod("10.244.0.5", namespace="team"), pod("10.244.3.7", namespace="other")],
        services=[service("10.96.0.10", "team"), service("10.96.200.1", "other")],
        forbidden={
            "create_namespaced_service",
            "list_node",
            "list_pod_for_all_namespaces",
            "list_service_for_all_namespaces",
        },
    )
    found = discover(core, "team")
    assert found.pod_cidrs == (N("10.244.0.5/32"),)
    assert found.service_cidrs == (N("10.96.0.10/32"),)
    text = " | ".join(found.notes)
    assert "cannot probe the service range in namespace team (403 Forbidden)" in text
    assert "cannot list services cluster-wide (403 Forbidden)" in text
    assert "cannot list nodes (403 Forbidden)" in text
    assert "cannot list pods cluster-wide (403 Forbidden)" in text
    assert "namespace team" in text and "may be too narrow" in text


def test_nothing_visible_is_not_an_error() -> None:
    core = FakeCore(
        forbidden={
            "create_namespaced_service",
            "list_node",
            "list_pod_for_all_namespaces",
            "list_namespaced_pod",
            "list_service_for_all_namespaces",
            "list_namespaced_service",
        }
    )
    found = discover(core, "team")
    assert found.all == ()
    assert any("no pod CIDR" in n for n in found.notes)
    assert any("no service CIDR" in n for n in found.notes)


def test_accepted_probe_falls_back_to_covering_cluster_ips() -> None:
    core = FakeCore(
        nodes=[node(["10.244.0.0/24"])],
        services=[service("10.96.0.1"), service("10.96.3.4"), service("None")],
        probe_error=None,
    )
    found = discover(core, "default", page_size=1)
    assert found.service_cidrs == (N("10.96.0.0/22"),)
    assert "approximate" in found.service_source


def test_expired_continue_token_restarts_the_list_once() -> None:
    core = FakeCore(nodes=[node(None)], pods=[pod(f"10.244.0.{i}") for i in range(1, 6)])
    core.expire_first_continue = True
    found = discover(core, "default", page_size=2)
    assert found.pod_cidrs == (N("10.244.0.0/29"),)


def test_list_all_stops_on_a_repeated_continue_token() -> None:
    def stuck(**kw: Any) -> Any:
        return SimpleNamespace(items=[1], metadata=SimpleNamespace(var_continue="same"))

    assert list_all(stuck) == [1, 1]


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (ApiException(status=401, reason="Unauthorized"), "refused the credentials"),
        (
            urllib3.exceptions.MaxRetryError(None, "/", "refused"),  # type: ignore[arg-type]
            "cannot reach the API server",
        ),
        (ConnectionRefusedError(111, "refused"), "cannot reach the API server"),
    ],
)
def test_unreachable_or_unauthorized_is_a_discovery_error(exc: Exception, message: str) -> None:
    class Broken(FakeCore):
        def create_namespaced_service(self, namespace: str, body: Any, **kw: Any) -> Any:
            raise exc

    with pytest.raises(DiscoveryError, match=message):
        discover(Broken(), "default")
