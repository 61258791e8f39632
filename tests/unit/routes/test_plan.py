"""plan_routes: splitting, exclusions, conflicts; checked per address against a brute-force model."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpn.routes.discovery import ClusterCidrs
from kvpn.routes.explain import Verdict, explain
from kvpn.routes.plan import (
    CidrKind,
    ConflictAction,
    ConflictPolicy,
    ExclusionReason,
    LocalRoute,
    RoutePlan,
    plan_routes,
)

N = IPv4Network
A = IPv4Address
TUN = "kvpn0"


def cluster(pods: list[str] = (), services: list[str] = ()) -> ClusterCidrs:  # type: ignore[assignment]
    return ClusterCidrs(
        tuple(N(p) for p in pods),
        tuple(N(s) for s in services),
        pod_source="node.spec.podCIDRs",
        service_source="the API server's range error",
    )


def covered(nets: tuple[IPv4Network, ...] | list[IPv4Network]) -> set[int]:
    return {int(a) for n in nets for a in n}


# -- worked examples ------------------------------------------------------------------------


def test_no_exclusion_installs_the_cluster_cidrs_as_they_are() -> None:
    plan = plan_routes(cluster(["10.244.0.0/16"], ["10.96.0.0/12"]))
    assert plan.installed == (N("10.96.0.0/12"), N("10.244.0.0/16"))
    assert plan.exclusions == () and plan.conflicts == ()
    assert [c.kind for c in plan.cluster_cidrs] == [CidrKind.POD, CidrKind.SERVICE]


def test_apiserver_inside_the_service_cidr_splits_it_minimally() -> None:
    plan = plan_routes(cluster(services=["10.96.0.0/12"]), apiserver_addresses=[A("10.96.0.50")])
    # /12 minus a /32: one prefix for every bit from /13 to /32, 20 in all.
    assert len(plan.installed) == 20
    assert list(plan.installed) == sorted(N("10.96.0.0/12").address_exclude(N("10.96.0.50/32")))
    (exclusion,) = plan.exclusions
    assert exclusion.reason is ExclusionReason.API_SERVER
    assert exclusion.network == N("10.96.0.50/32")
    assert exclusion.cuts == (N("10.96.0.0/12"),)


def test_apiserver_outside_every_cidr_is_listed_but_cuts_nothing() -> None:
    plan = plan_routes(cluster(["10.244.0.0/16"]), apiserver_addresses=[A("192.168.1.10")])
    assert plan.installed == (N("10.244.0.0/16"),)
    assert plan.exclusions[0].cuts == ()


def test_exclusion_order_apiserver_tunnel_peer_user() -> None:
    plan = plan_routes(
        cluster(["10.244.0.0/16"]),
        exclude_cidrs=[N("10.244.9.0/24")],
        apiserver_addresses=[A("10.244.1.1")],
        tunnel_peer=A("10.244.2.2"),
    )
    assert [e.reason for e in plan.exclusions] == [
        ExclusionReason.API_SERVER,
        ExclusionReason.TUNNEL_PEER,
        ExclusionReason.USER,
    ]


def test_include_cidr_is_routed_and_deduplicated() -> None:
    plan = plan_routes(
        cluster(["10.244.0.0/16"]), include_cidrs=[N("172.16.0.0/16"), N("10.244.0.0/16")]
    )
    assert [(c.network, c.kind) for c in plan.cluster_cidrs] == [
        (N("10.244.0.0/16"), CidrKind.POD),
        (N("172.16.0.0/16"), CidrKind.INCLUDE),
    ]
    assert plan.installed == (N("10.244.0.0/16"), N("172.16.0.0/16"))


DOCKER = LocalRoute(N("10.96.128.0/17"), "docker0")
CORP = LocalRoute(N("10.0.0.0/8"), "tun0", A("192.168.1.1"), 50)


def test_keep_excludes_a_more_specific_local_route_and_says_so() -> None:
    plan = plan_routes(cluster(services=["10.96.0.0/12"]), local_routes=[DOCKER])
    assert plan.installed == (N("10.96.0.0/17"), N("10.97.0.0/16"), N("10.98.0.0/15"),
                              N("10.100.0.0/14"), N("10.104.0.0/13"))  # fmt: skip
    (conflict,) = plan.conflicts
    assert conflict.action is ConflictAction.KEPT_LOCAL
    assert conflict.overlap == N("10.96.128.0/17")
    assert "kept the local route" in conflict.describe()
    assert plan.exclusions[-1].reason is ExclusionReason.LOCAL_ROUTE


def test_keep_with_a_less_specific_local_route_routes_nothing_of_it() -> None:
    plan = plan_routes(cluster(services=["10.96.0.0/12"]), local_routes=[CORP])
    assert plan.installed == ()
    assert plan.conflicts[0].overlap == N("10.96.0.0/12")


def test_override_splits_until_kvpn_is_more_specific() -> None:
    plan = plan_routes(
        cluster(services=["10.96.0.0/12"]), local_routes=[DOCKER, CORP], on_conflict="override"
    )
    assert {c.action for c in plan.conflicts} == {ConflictAction.OVERRIDDEN}
    assert list(ipaddress.collapse_addresses(plan.installed)) == [N("10.96.0.0/12")]
    assert N("10.96.128.0/18") in plan.installed and N("10.96.192.0/18") in plan.installed


def test_override_cannot_beat_a_host_route_and_keeps_it() -> None:
    host = LocalRoute(N("10.96.0.7/32"), "eth0", A("192.168.1.1"))
    plan = plan_routes(
        cluster(services=["10.96.0.0/12"]), local_routes=[host], on_conflict="override"
    )
    assert plan.conflicts[0].action is ConflictAction.HOST_ROUTE_KEPT
    assert not any(A("10.96.0.7") in n for n in plan.installed)


def test_skip_leaves_the_whole_cidr_out() -> None:
    plan = plan_routes(
        cluster(["10.244.0.0/16"], ["10.96.0.0/12"]), local_routes=[DOCKER], on_conflict="skip"
    )
    assert plan.installed == (N("10.244.0.0/16"),)
    assert plan.conflicts[0].action is ConflictAction.SKIPPED_CIDR


def test_fail_refuses_and_installs_nothing() -> None:
    plan = plan_routes(
        cluster(["10.244.0.0/16"], ["10.96.0.0/12"]), local_routes=[DOCKER], on_conflict="fail"
    )
    assert plan.refused and plan.installed == ()
    assert not plan_routes(cluster(["10.244.0.0/16"]), on_conflict="fail").refused


def test_default_routes_routes_on_the_tun_and_excluded_overlaps_are_not_conflicts() -> None:
    plan = plan_routes(
        cluster(services=["10.96.0.0/12"]),
        apiserver_addresses=[A("10.96.0.50")],
        local_routes=[
            LocalRoute(N("0.0.0.0/0"), "eth0", A("192.168.1.1")),
            LocalRoute(N("0.0.0.0/1"), "wg0"),
            LocalRoute(N("128.0.0.0/1"), "wg0"),
            LocalRoute(N("10.96.0.0/12"), TUN),
            # The sandbox laptop's own route to an API server inside the service CIDR.
            LocalRoute(N("10.96.0.50/32"), "eth0", A("172.31.255.1")),
        ],
    )
    assert plan.conflicts == ()


def test_unknown_policy_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        plan_routes(cluster(["10.244.0.0/16"]), on_conflict="maybe")


# -- JSON round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(ConflictPolicy))
def test_json_round_trip(policy: ConflictPolicy) -> None:
    plan = plan_routes(
        ClusterCidrs((N("10.244.0.0/16"),), (N("10.96.0.0/12"),), ("a note",), "x", "y"),
        include_cidrs=[N("172.16.0.0/12")],
        exclude_cidrs=[N("172.16.5.0/24")],
        apiserver_addresses=[A("10.96.0.50")],
        tunnel_peer=A("10.244.3.3"),
        local_routes=[DOCKER, CORP, LocalRoute(N("10.244.7.7/32"), None)],
        on_conflict=policy,
        apiserver_name="https://k8s:6443",
    )
    data = json.loads(json.dumps(plan.to_json()))
    assert RoutePlan.from_json(data) == plan
    assert data["refused"] is (policy is ConflictPolicy.FAIL)


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"installed": "10.0.0.0/8"},
        {"installed": ["10.0.0.1/8"]},
        {"installed": [42]},
        {"exclusions": [{"cidr": "10.0.0.0/8", "reason": "whim", "detail": ""}]},
        {"conflicts": [{"local_route": {"dst": "10.0.0.0/8"}}]},
        {"version": 99},
        {"on_conflict": "maybe"},
    ],
)
def test_from_json_rejects_malformed_input(data: object) -> None:
    with pytest.raises(ValueError):
        RoutePlan.from_json(data)


def test_from_json_reads_the_early_session_format() -> None:
    plan = RoutePlan.from_json(
        {"installed": ["10.96.0.0/12"], "pod_cidrs": ["10.244.0.0/24"], "service_cidrs": []}
    )
    assert plan.installed == (N("10.96.0.0/12"),)
    assert plan.cluster_cidrs[0].network == N("10.244.0.0/24")


# -- property tests against a brute-force model --------------------------------------------

UNIVERSE = N("10.0.0.0/24")
BASE = int(UNIVERSE.network_address)


def net_in_universe(offset: int, prefixlen: int) -> IPv4Network:
    return N((BASE + offset, prefixlen), strict=False)


# Half the prefixes come from a coarse grid so that cluster CIDRs, exclusions and local
# routes often coincide or nest exactly (the interesting cases); half are arbitrary.
nets = st.one_of(
    st.builds(
        net_in_universe,
        st.integers(0, 15).map(lambda i: i * 16),
        st.sampled_from([24, 25, 26, 28, 32]),
    ),
    st.builds(net_in_universe, st.integers(0, 255), st.integers(24, 32)),
)
addresses = st.builds(lambda o: A(BASE + o), st.integers(0, 255))
local_route = st.builds(
    LocalRoute,
    st.one_of(
        nets,
        st.sampled_from([N("10.0.0.0/8"), N("10.0.0.0/23"), N("0.0.0.0/0"), N("0.0.0.0/1")]),
    ),
    st.sampled_from(["eth0", "docker0", TUN]),
    st.none(),
    st.sampled_from([0, 100]),
)


def model(
    wanted: list[IPv4Network],
    api: list[IPv4Address],
    peer: IPv4Address | None,
    user: list[IPv4Network],
    local: list[LocalRoute],
    policy: ConflictPolicy,
) -> Callable[[IPv4Address], str]:
    """Where each address goes, from the rules stated in plain terms."""

    def mandatory(a: IPv4Address) -> str | None:
        if a in api:
            return "api-server"
        if a == peer:
            return "tunnel-peer"
        if any(a in n for n in user):
            return "user"
        return None

    def conflicts(route: LocalRoute, w: IPv4Network) -> bool:
        if route.dev == TUN or route.dst in (N("0.0.0.0/0"), N("0.0.0.0/1"), N("128.0.0.0/1")):
            return False
        return any(b in route.dst and mandatory(b) is None for b in w)

    pairs = [(r, w) for r in local for w in wanted if conflicts(r, w)]

    def where(address: IPv4Address) -> str:
        if not any(address in w for w in wanted):
            return "outside"
        reason = mandatory(address)
        if reason is not None:
            return reason
        if not pairs:
            return "routed"
        if policy is ConflictPolicy.FAIL:
            return "refused"
        if policy is ConflictPolicy.SKIP:
            clean = [w for w in wanted if all(pw != w for _, pw in pairs)]
            return "routed" if any(address in w for w in clean) else "local-route"
        for route, _ in pairs:
            kept = policy is ConflictPolicy.KEEP or route.dst.prefixlen == 32
            if address in route.dst and kept:
                return "local-route"
        return "routed"

    return where


def kernel_goes_to_kvpn(address: IPv4Address, plan: RoutePlan, local: list[LocalRoute]) -> bool:
    table = [(r.dst, r.metric, False) for r in local if r.dev != TUN]
    table += [(n, 0, True) for n in plan.installed]
    matching = [entry for entry in table if address in entry[0]]
    if not matching:
        return False
    longest = max(e[0].prefixlen for e in matching)
    best = [e for e in matching if e[0].prefixlen == longest]
    lowest = min(e[1] for e in best)
    best = [e for e in best if e[1] == lowest]
    return all(e[2] for e in best)  # a tie with a local route: the local route stays


VERDICT_OF_MODEL = {
    "routed": Verdict.ROUTED,
    "outside": Verdict.OUTSIDE,
    "api-server": Verdict.API_SERVER,
    "tunnel-peer": Verdict.TUNNEL_PEER,
    "user": Verdict.USER_EXCLUDED,
    "local-route": Verdict.LOCAL_ROUTE,
    "refused": Verdict.REFUSED,
}


@settings(max_examples=300, deadline=None)
@given(
    pods=st.lists(nets, max_size=2),
    services=st.lists(nets, max_size=2),
    include=st.lists(nets, max_size=1),
    user=st.lists(nets, max_size=2),
    api=st.lists(addresses, max_size=2),
    peer=st.none() | addresses,
    local=st.lists(local_route, max_size=3),
    policy=st.sampled_from(list(ConflictPolicy)),
    data=st.data(),
)
def test_plan_matches_brute_force_model(
    pods: list[IPv4Network],
    services: list[IPv4Network],
    include: list[IPv4Network],
    user: list[IPv4Network],
    api: list[IPv4Address],
    peer: IPv4Address | None,
    local: list[LocalRoute],
    policy: ConflictPolicy,
    data: st.DataObject,
) -> None:
    wanted = [*pods, *services, *include]
    if data.draw(st.booleans()) and wanted:
        # A local route equal to, or nested in, a cluster CIDR (host routes included).
        outer = data.draw(st.sampled_from(wanted))
        inner = N((int(outer.network_address), data.draw(st.integers(outer.prefixlen, 32))))
        shifted = data.draw(st.sampled_from(list(outer.subnets(new_prefix=inner.prefixlen))[:8]))
        local = [*local, LocalRoute(shifted, data.draw(st.sampled_from(["eth0", TUN])))]
    if data.draw(st.booleans()) and api:
        # The host route to the API server that a machine may have (the sandbox's laptop does).
        local = [*local, LocalRoute(N(api[0]), "eth0")]
    plan = plan_routes(
        ClusterCidrs(tuple(pods), tuple(services)),
        include_cidrs=include,
        exclude_cidrs=user,
        apiserver_addresses=api,
        tunnel_peer=peer,
        local_routes=local,
        on_conflict=policy,
    )
    # Installed prefixes never overlap each other; without override they are also minimal.
    for i, a in enumerate(plan.installed):
        assert all(not a.overlaps(b) for b in plan.installed[i + 1 :])
    if policy is not ConflictPolicy.OVERRIDE:
        assert list(plan.installed) == sorted(ipaddress.collapse_addresses(plan.installed))
    installed = covered(plan.installed)
    where = model(wanted, api, peer, user, local, policy)
    assert all(UNIVERSE.supernet_of(n) for n in plan.installed)

    for offset in range(UNIVERSE.num_addresses):
        address = A(BASE + offset)
        expected = where(address)
        routed = expected == "routed"
        assert (int(address) in installed) is routed, (address, expected)
        assert kernel_goes_to_kvpn(address, plan, local) is routed, (address, expected)
        explanation = explain(address, plan, local)
        assert explanation.via_kvpn is routed
        assert explanation.verdict is VERDICT_OF_MODEL[expected], (address, expected, explanation)
