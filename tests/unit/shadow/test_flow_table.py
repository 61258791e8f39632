"""FlowTable with a scripted clock."""

from __future__ import annotations

import pytest

from kvpn.shadow.flow_table import FlowTable


def test_lookup_matches_key_only() -> None:
    table: FlowTable[str] = FlowTable(max_flows=4)
    assert table.add(1, ("udp", "10.0.0.1", 53), "a", idle_timeout=60, now=0) == []
    assert table.lookup(1, ("udp", "10.0.0.1", 53)) == "a"
    assert table.lookup(1, ("udp", "10.0.0.1", 54)) is None
    assert table.lookup(2, ("udp", "10.0.0.1", 53)) is None


def test_expiry_follows_activity() -> None:
    table: FlowTable[str] = FlowTable(max_flows=4)
    now = 0.0
    table.add(1, "k1", "udp", idle_timeout=60, now=now)
    table.add(2, "k2", "ping", idle_timeout=10, now=now)
    assert table.next_deadline() == 10
    now = 9.0
    table.touch(2, now=now)
    assert table.next_deadline() == 19
    assert table.pop_expired(now=18.9) == []
    assert table.pop_expired(now=19.0) == [(2, "ping")]
    assert table.next_deadline() == 60
    table.touch(1, now=59.0)
    assert table.pop_expired(now=60.0) == []
    assert table.pop_expired(now=119.0) == [(1, "udp")]
    assert table.next_deadline() is None
    assert len(table) == 0


def test_same_id_replaces_and_returns_old() -> None:
    table: FlowTable[str] = FlowTable(max_flows=4)
    table.add(1, "k1", "old", idle_timeout=60, now=0)
    assert table.add(1, "k2", "new", idle_timeout=60, now=1) == [(1, "old")]
    assert table.lookup(1, "k2") == "new"
    assert len(table) == 1


def test_capacity_evicts_least_recently_active() -> None:
    table: FlowTable[str] = FlowTable(max_flows=2)
    table.add(1, "k1", "a", idle_timeout=60, now=0)
    table.add(2, "k2", "b", idle_timeout=60, now=1)
    table.touch(1, now=2)
    assert table.add(3, "k3", "c", idle_timeout=60, now=3) == [(2, "b")]
    assert 1 in table and 3 in table and 2 not in table


def test_pop_and_pop_all() -> None:
    table: FlowTable[int] = FlowTable(max_flows=8)
    for i in range(3):
        table.add(i, i, i * 10, idle_timeout=5, now=0)
    assert table.pop(1) == 10
    assert table.pop(1) is None
    assert sorted(table.pop_all()) == [(0, 0), (2, 20)]
    assert len(table) == 0


def test_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        FlowTable(max_flows=0)
