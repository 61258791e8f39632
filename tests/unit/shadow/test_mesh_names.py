"""Names and environment shared by the mesh router and the control side."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn.shadow.mesh_names import (
    DEFAULT_HEADER,
    ROUTER_LABEL,
    MeshNameError,
    RoutedPort,
    RouterSettings,
    member_host,
    mesh_service_name,
    parse_port_specs,
    router_env,
    router_pod_name,
    standin_service_name,
)


def test_mesh_service_name_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"echo\nalice").hexdigest()[:10]
    assert mesh_service_name("echo", "alice") == f"kvpn-mesh-{digest}"
    assert mesh_service_name("echo", "alice") != mesh_service_name("echo", "bob")
    assert mesh_service_name("echo", "alice") != mesh_service_name("echo2", "alice")


def test_short_names_are_plain() -> None:
    assert router_pod_name("echo") == "kvpn-router-echo"
    assert standin_service_name("echo") == "echo-kvpn-standin"
    assert ROUTER_LABEL == "kvpn.dev/mesh-router"
    assert member_host("echo", "a", "ns.svc") == mesh_service_name("echo", "a") + ".ns.svc"


@given(st.from_regex(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True))
def test_long_names_fit_and_stay_unique(service: str) -> None:
    for name in (router_pod_name(service), standin_service_name(service)):
        assert len(name) <= 63
        assert not name.endswith("-") and not name.startswith("-")
    assert standin_service_name(service).endswith("-kvpn-standin")
    assert router_pod_name(service).startswith("kvpn-router-")
    other = service[:-1] + ("x" if service[-1:] != "x" else "y")
    assert standin_service_name(other) != standin_service_name(service)
    assert router_pod_name(other) != router_pod_name(service)


def test_port_specs() -> None:
    assert parse_port_specs("8080/TCP, 8080/udp,8080/TCP,9000") == (
        RoutedPort(8080, "TCP"),
        RoutedPort(8080, "UDP"),
        RoutedPort(9000, "TCP"),
    )
    for bad in ("", " , ", "x/TCP", "8080/SCTP", "0/TCP", "70000/TCP", "-1"):
        with pytest.raises(MeshNameError):
            parse_port_specs(bad)


def test_router_env_round_trips() -> None:
    env = router_env("echo", "default", ["8080/TCP", RoutedPort(53, "UDP")], header="X-Dev")
    as_map = {item["name"]: item["value"] for item in env}
    assert as_map == {
        "KVPN_ROUTER_SERVICE": "echo",
        "KVPN_ROUTER_NAMESPACE": "default",
        "KVPN_ROUTER_HEADER": "X-Dev",
        "KVPN_ROUTER_STANDIN": "echo-kvpn-standin.default.svc",
        "KVPN_ROUTER_PORTS": "8080/TCP,53/UDP",
        "KVPN_ROUTER_MEMBER_DOMAIN": "default.svc",
    }
    settings = RouterSettings.from_env(as_map)
    assert settings.ports == (RoutedPort(8080), RoutedPort(53, "UDP"))
    assert settings.member_host("a") == mesh_service_name("echo", "a") + ".default.svc"


def test_settings_defaults_and_errors() -> None:
    settings = RouterSettings.from_env(
        {"KVPN_ROUTER_SERVICE": "s", "KVPN_ROUTER_NAMESPACE": "n", "KVPN_ROUTER_PORTS": "80"}
    )
    assert settings.header == DEFAULT_HEADER
    assert settings.standin == "s-kvpn-standin.n.svc"
    assert settings.member_domain == "n.svc"
    with pytest.raises(MeshNameError):
        RouterSettings.from_env({"KVPN_ROUTER_SERVICE": "s", "KVPN_ROUTER_PORTS": "80"})
    with pytest.raises(MeshNameError):
        router_env("s", "n", ["80/TCP"], header="bad header")
    with pytest.raises(MeshNameError):
        router_env("s", "n", [])
