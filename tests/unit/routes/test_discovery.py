from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn.routes.discovery import covering_prefix, exclude, service_cidr_from_error

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
