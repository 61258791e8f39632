"""Sans-IO routing decisions of the mesh router: first bytes, marks, targets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn.shadow.http_routing import (
    H2_PREFACE,
    FirstBytes,
    TargetKind,
    fallback_of,
    mark_of,
    route_headers,
    sniff_first_bytes,
)
from kvpn.shadow.mesh_names import RoutedPort, RouterSettings, mesh_service_name

SETTINGS = RouterSettings(service="echo", namespace="dev", ports=(RoutedPort(8080),))

SNIFF_CASES = [
    (b"", FirstBytes.NEED_MORE),
    (b"G", FirstBytes.NEED_MORE),
    (b"GET", FirstBytes.NEED_MORE),
    (b"GET ", FirstBytes.HTTP1),
    (b"GET / HTTP/1.1\r\n", FirstBytes.HTTP1),
    (b"\r\nPOST /x HTTP/1.1\r\n", FirstBytes.HTTP1),
    (b"\r\n", FirstBytes.NEED_MORE),
    (b"\r", FirstBytes.NEED_MORE),
    (b"M-SEARCH * HTTP/1.1", FirstBytes.HTTP1),
    (b"PRI", FirstBytes.NEED_MORE),
    (H2_PREFACE[:20], FirstBytes.NEED_MORE),
    (H2_PREFACE, FirstBytes.H2_PRIOR_KNOWLEDGE),
    (H2_PREFACE + b"\x00\x00\x00\x04", FirstBytes.H2_PRIOR_KNOWLEDGE),
    (b"PRI * HTTP/1.1\r\n", FirstBytes.HTTP1),  # a method called PRI, not the preface
    (b"\x16\x03\x01\x02\x00", FirstBytes.OTHER),  # TLS ClientHello
    (b"SSH-2.0-OpenSSH_9.6\r\n", FirstBytes.OTHER),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", FirstBytes.OTHER),  # PostgreSQL SSLRequest
    (b"A" * 25, FirstBytes.OTHER),
    (b"\r\n" * 20 + b"GET ", FirstBytes.OTHER),
]


@pytest.mark.parametrize(("data", "expected"), SNIFF_CASES)
def test_sniff(data: bytes, expected: FirstBytes) -> None:
    assert sniff_first_bytes(data) is expected


def test_sniff_is_stable_once_decided() -> None:
    """Feeding more bytes never changes a decision (every split point)."""
    for data, _ in SNIFF_CASES:
        decided = None
        for end in range(len(data) + 1):
            kind = sniff_first_bytes(data[:end])
            if decided is not None:
                assert kind is decided, (data, end)
            elif kind is not FirstBytes.NEED_MORE:
                decided = kind


@given(st.binary(max_size=64))
def test_sniff_never_raises(data: bytes) -> None:
    assert isinstance(sniff_first_bytes(data), FirstBytes)


def test_mark_is_case_insensitive_on_name_exact_on_value() -> None:
    assert mark_of([(b"Host", b"x"), (b"VERSION", b"alice")], "version") == "alice"
    assert mark_of([(b"version", b" alice\t")], "Version") == "alice"
    assert mark_of([(b"version", b"Alice")], "version") == "Alice"
    assert mark_of([(b"x-version", b"alice")], "version") is None
    assert mark_of([(b"version", b"")], "version") is None
    assert mark_of([(b"version", b"a"), (b"version", b"b")], "version") == "a"
    assert mark_of([(b"version", b"\xff")], "version") is None
    assert mark_of([], "version") is None


@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), max_size=6))
def test_mark_never_raises(headers: list[tuple[bytes, bytes]]) -> None:
    mark = mark_of(headers, "version")
    assert mark is None or isinstance(mark, str)


def test_route_to_member_or_standin_with_fallback() -> None:
    member = route_headers(SETTINGS, 8080, [(b"version", b"alice")])
    assert member.kind is TargetKind.MEMBER
    assert member.host == mesh_service_name("echo", "alice") + ".dev.svc"
    assert member.port == 8080 and member.mark == "alice"
    standin = route_headers(SETTINGS, 8080, [(b"other", b"alice")])
    assert standin.kind is TargetKind.STANDIN
    assert standin.host == "echo-kvpn-standin.dev.svc"
    assert fallback_of(SETTINGS, member) == standin
    assert fallback_of(SETTINGS, standin) is None


def test_custom_header() -> None:
    settings = RouterSettings(
        service="echo", namespace="dev", ports=(RoutedPort(80),), header="X-Dev"
    )
    assert route_headers(settings, 80, [(b"x-dev", b"bob")]).mark == "bob"
    assert route_headers(settings, 80, [(b"version", b"bob")]).mark is None
