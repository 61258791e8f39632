"""Parsing the original resolv.conf and rendering kvpn's."""

from __future__ import annotations

import pytest

from kvpn.dns.actions import UpstreamServer
from kvpn.dns.resolv_conf import cluster_search_list, parse_resolv_conf, render_resolv_conf

PARSE_CASES = [
    # text, nameservers, search, ndots, timeout, attempts
    ("", (), (), 1, 5, 2),
    ("nameserver 198.18.0.53\n", ("198.18.0.53",), (), 1, 5, 2),
    (
        "# comment\n; also\nnameserver 10.0.0.2 # trailing\nnameserver bogus\nnameserver ::1\n",
        ("10.0.0.2", "::1"),
        (),
        1,
        5,
        2,
    ),
    (
        "nameserver 1.1.1.1\nnameserver 1.0.0.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\n",
        ("1.1.1.1", "1.0.0.1", "8.8.8.8"),
        (),
        1,
        5,
        2,
    ),
    ("search a.example b.example\ndomain c.example\n", (), ("c.example",), 1, 5, 2),
    ("domain c.example\nsearch a.example b.example\n", (), ("a.example", "b.example"), 1, 5, 2),
    ("options ndots:3 timeout:2\noptions attempts:9 rotate\n", (), (), 3, 2, 5),
    ("options ndots:99 timeout:x\n", (), (), 15, 5, 2),
    ("nameserver fe80::1%eth0\n", ("fe80::1%eth0",), (), 1, 5, 2),
    ("  nameserver   10.1.1.1  \r\n", ("10.1.1.1",), (), 1, 5, 2),
    ("nameserver\nsearch\n", (), (), 1, 5, 2),
]


@pytest.mark.parametrize(("text", "servers", "search", "ndots", "timeout", "attempts"), PARSE_CASES)
def test_parse(
    text: str,
    servers: tuple[str, ...],
    search: tuple[str, ...],
    ndots: int,
    timeout: int,
    attempts: int,
) -> None:
    conf = parse_resolv_conf(text.encode())
    assert (conf.nameservers, conf.search, conf.ndots, conf.timeout, conf.attempts) == (
        servers,
        search,
        ndots,
        timeout,
        attempts,
    )


def test_upstreams_default_to_local_machine() -> None:
    assert parse_resolv_conf(b"").upstreams() == (UpstreamServer("127.0.0.1"),)
    assert parse_resolv_conf(b"nameserver 10.0.0.2\n").upstreams() == (UpstreamServer("10.0.0.2"),)


def test_parse_survives_binary_garbage() -> None:
    conf = parse_resolv_conf(b"\xff\xfe nameserver \x00\nnameserver 10.0.0.2\n")
    assert conf.nameservers == ("10.0.0.2",)


def test_render_puts_kvpn_first_and_keeps_the_rest() -> None:
    original = parse_resolv_conf(
        b"nameserver 198.18.0.53\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n"
        b"search corp.example\nsortlist 10.0.0.0/8\noptions ndots:2 rotate edns0\n"
    )
    text = render_resolv_conf(
        original, nameserver="198.19.255.1", search=cluster_search_list("team", "cluster.local")
    ).decode()
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == [
        "nameserver 198.19.255.1",
        "nameserver 198.18.0.53",
        "nameserver 10.0.0.2",
        "search team.svc.cluster.local svc.cluster.local cluster.local corp.example",
        "sortlist 10.0.0.0/8",
        "options ndots:2 edns0",
    ]
    reparsed = parse_resolv_conf(text.encode())
    assert reparsed.written_by_kvpn and reparsed.ndots == 2
    assert not parse_resolv_conf(b"nameserver 1.1.1.1\n").written_by_kvpn
