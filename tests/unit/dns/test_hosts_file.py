"""The marked /etc/hosts block: added, replaced, removed back to the original bytes."""

from __future__ import annotations

import pytest

from kvpn.dns.hosts_file import (
    HostsEntry,
    ServiceAddress,
    hosts_with_block,
    hosts_without_block,
    service_host_entries,
)

ENTRIES = (HostsEntry("10.96.0.20", ("echo", "echo.default")),)
ORIGINALS = [
    b"",
    b"127.0.0.1 localhost\n",
    b"127.0.0.1 localhost",  # no final newline
    b"127.0.0.1 localhost\r\n::1 localhost\r\n",
    b"\n\n",
]


@pytest.mark.parametrize("original", ORIGINALS)
def test_block_round_trip_is_byte_exact(original: bytes) -> None:
    first = hosts_with_block(original, ENTRIES, session="s1")
    assert first.startswith(original)
    assert b"10.96.0.20\techo echo.default\n" in first
    updated = hosts_with_block(first, [HostsEntry("10.96.0.21", ("web",))], session="s1")
    assert b"10.96.0.20" not in updated and b"10.96.0.21\tweb" in updated
    assert hosts_without_block(updated) == (original, True)


def test_user_lines_after_the_block_survive() -> None:
    content = hosts_with_block(b"a\n", ENTRIES, session="s") + b"10.0.0.1 mine\n"
    assert hosts_without_block(content) == (b"a\n10.0.0.1 mine\n", True)


def test_no_block() -> None:
    assert hosts_without_block(b"x\n") == (b"x\n", False)


def test_service_entries() -> None:
    entries = service_host_entries(
        [
            ServiceAddress("web", "other", "10.96.0.30"),
            ServiceAddress("echo", "default", "10.96.0.20"),
            ServiceAddress("db", "default", "None"),  # headless
        ],
        connected_namespace="default",
        cluster_domain="cluster.local",
    )
    assert entries == (
        HostsEntry(
            "10.96.0.20",
            ("echo", "echo.default", "echo.default.svc", "echo.default.svc.cluster.local"),
        ),
        HostsEntry("10.96.0.30", ("web.other", "web.other.svc", "web.other.svc.cluster.local")),
    )
