"""--expose parsing and REMOTE -> target port matching, from case tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn.cluster.service_ports import (
    Exposure,
    PortMatchError,
    ServicePort,
    container_ports_of,
    match_exposures,
    parse_expose,
    preview_forwards,
)

PARSE_CASES = [
    ("8080", (Exposure(8080, 8080),)),
    ("3000:8080", (Exposure(3000, 8080),)),
    ("3000:80,9000", (Exposure(3000, 80), Exposure(9000, 9000))),
    (" 3000 : 80 ", (Exposure(3000, 80),)),
]

PARSE_ERRORS = [
    ("", "empty entry"),
    ("8080,", "empty entry"),
    ("abc", "LOCAL 'abc' is not a port"),
    ("0", "is not a port"),
    ("70000", "is not a port"),
    ("3000:", "REMOTE '' is not a port"),
    ("3000:x", "REMOTE 'x'"),
    ("1:80,2:80", "REMOTE port 80 given twice"),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_expose(text: str, expected: tuple[Exposure, ...]) -> None:
    assert parse_expose(text) == expected


@pytest.mark.parametrize(("text", "message"), PARSE_ERRORS)
def test_parse_expose_errors(text: str, message: str) -> None:
    with pytest.raises(PortMatchError, match=message):
        parse_expose(text)


@given(
    st.lists(
        st.tuples(st.integers(1, 65535), st.integers(1, 65535)),
        min_size=1,
        max_size=5,
        unique_by=lambda t: t[1],
    )
)
def test_parse_expose_round_trip(pairs: list[tuple[int, int]]) -> None:
    text = ",".join(f"{local}:{remote}" for local, remote in pairs)
    assert parse_expose(text) == tuple(Exposure(a, b) for a, b in pairs)


# The sandbox's echo service: http 80 -> named port "http" (8080), and UDP 8080.
ECHO_PORTS = [
    ServicePort("http", 80, "TCP", "http"),
    ServicePort("udp-echo", 8080, "UDP", 8080),
]
ECHO_CONTAINER_PORTS = {("http", "TCP"): 8080, ("udp-echo", "UDP"): 8080}


@pytest.mark.parametrize(
    ("expose", "target", "local"),
    [
        ("8080:8080", 8080, 8080),  # REMOTE is the (named, resolved) targetPort
        ("3000:80", 8080, 3000),  # REMOTE is the service port
        ("8080", 8080, 8080),  # REMOTE defaults to LOCAL
    ],
)
def test_match_echo(expose: str, target: int, local: int) -> None:
    match = match_exposures("default/echo", ECHO_PORTS, parse_expose(expose), ECHO_CONTAINER_PORTS)
    (forward,) = match.forwards
    assert (forward.target_port, forward.local_port) == (target, local)
    assert forward.container_port_names == ("http",)
    assert any("8080/UDP" in note for note in match.notes)


def test_service_port_is_preferred_over_target_port() -> None:
    ports = [ServicePort("a", 80, "TCP", 8080), ServicePort("b", 8080, "TCP", 9090)]
    (forward,) = match_exposures("s", ports, parse_expose("1:8080"), {}).forwards
    assert forward.target_port == 9090


def test_ports_sharing_a_target_share_one_listener_and_others_are_noted() -> None:
    ports = [
        ServicePort("a", 80, "TCP", 8080),
        ServicePort("b", 81, "TCP", 8080),
        ServicePort("c", 443, "TCP", 8443),
    ]
    match = match_exposures("s", ports, parse_expose("1:80"), {})
    (forward,) = match.forwards
    assert forward.service_ports == ("80->8080/TCP (a)", "81->8080/TCP (b)")
    assert match.notes == (
        "service port 443->8443/TCP (c) is not exposed: its connections are refused while "
        "the service is exchanged",
    )


MATCH_ERRORS = [
    ("8080:1234", ECHO_PORTS, ECHO_CONTAINER_PORTS, "1234 is not a TCP port or targetPort"),
    ("8080:80", ECHO_PORTS, {}, "named port 'http', which no pod"),
    ("1:8080", [ServicePort("u", 53, "UDP", 53)], {}, "has no TCP port"),
    (
        "1:80,2:8080",
        [ServicePort("a", 80, "TCP", 8080)],
        {},
        "two entries expose target port 8080",
    ),
]


@pytest.mark.parametrize(("expose", "ports", "named", "message"), MATCH_ERRORS)
def test_match_errors(
    expose: str, ports: list[ServicePort], named: dict[tuple[str, str], int], message: str
) -> None:
    with pytest.raises(PortMatchError, match=message):
        match_exposures("default/echo", ports, parse_expose(expose), named)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"port": 80}, ServicePort(None, 80, "TCP", 80)),
        ({"port": 80, "targetPort": "8080"}, ServicePort(None, 80, "TCP", 8080)),
        ({"port": 80, "target_port": "http", "name": "h"}, ServicePort("h", 80, "TCP", "http")),
        ({"port": 53, "protocol": "UDP", "targetPort": 5353}, ServicePort(None, 53, "UDP", 5353)),
        ({"port": "80"}, None),
        ({}, None),
        ({"port": True}, None),
    ],
)
def test_service_port_from_spec(spec: dict[str, object], expected: ServicePort | None) -> None:
    assert ServicePort.from_spec(spec) == expected


def test_container_ports_of_a_pod_spec() -> None:
    spec = {
        "containers": [
            {"ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9}]},
            {"ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            {"name": "no-ports"},
        ]
    }
    assert container_ports_of(spec) == {("http", "TCP"): 8080, ("dns", "UDP"): 53}
    assert container_ports_of(None) == {}


def test_preview_forwards() -> None:
    (forward,) = preview_forwards(parse_expose("3000:80"))
    assert (forward.local_port, forward.target_port) == (3000, 80)
