"""NAT table life cycle and in-place rewriting (full and partial checksums)."""

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from kvpn.net.checksum import checksum, ones_sum, pseudo_header_sum
from kvpn.net.nat import (
    FlowKey,
    NatConfig,
    NatExhausted,
    NatState,
    NatTable,
    apply_rewrite,
    plan_rewrite,
    rewrite_tcp_endpoints,
)
from kvpn.net.vnet import VNET_HEADER_LENGTH

from .packets import checksums_valid

A = IPv4Address("198.19.255.1").packed
B = IPv4Address("198.19.255.2").packed
D = IPv4Address("10.96.0.10").packed
CONFIG = NatConfig(
    port_low=20000,
    port_high=20002,
    accept_timeout=30,
    closing_linger=10,
    time_wait=60,
    idle_timeout=100,
)


def flow(sport: int) -> FlowKey:
    return FlowKey(A, sport, D, 80)


def test_alloc_and_lookup_both_ways() -> None:
    table = NatTable(CONFIG)
    entry = table.alloc(flow(1), now=0)
    assert entry.natport == 20000 and entry.state is NatState.ACCEPT_PENDING
    assert table.by_flow(flow(1)) is entry and table.by_natport(20000) is entry
    assert table.by_flow(flow(2)) is None and table.by_natport(20001) is None
    with pytest.raises(ValueError):
        table.alloc(flow(1), now=0)


def test_keyed_by_full_four_tuple() -> None:
    table = NatTable(CONFIG)
    e1 = table.alloc(FlowKey(A, 5000, D, 80), now=0)
    e2 = table.alloc(FlowKey(A, 5000, D, 443), now=0)
    assert e1.natport != e2.natport
    assert table.by_flow(FlowKey(A, 5000, D, 443)) is e2


def test_accept_then_close_then_quarantine_then_reuse() -> None:
    table = NatTable(CONFIG)
    entries = [table.alloc(flow(i), now=0) for i in range(3)]
    with pytest.raises(NatExhausted):
        table.alloc(flow(9), now=0)
    first = entries[0]
    assert table.accepted(first.natport, now=1) is first
    assert first.state is NatState.ESTABLISHED
    assert table.accepted(first.natport, now=1) is None  # accepted only once
    assert table.close(first, now=2) and not table.close(first, now=2)
    assert table.by_natport(first.natport) is first  # still translating while closing
    table.expire(now=11.9)
    assert table.by_natport(first.natport) is first
    table.expire(now=12)
    assert table.by_natport(first.natport) is None and table.by_flow(first.flow) is None
    assert table.quarantined_ports == 1
    with pytest.raises(NatExhausted):  # the natport may still be in TIME_WAIT
        table.alloc(flow(9), now=71.9)
    reused = table.alloc(flow(9), now=72)
    assert reused.natport == first.natport


def test_accept_timeout_closes_and_reports() -> None:
    table = NatTable(CONFIG)
    entry = table.alloc(flow(1), now=0)
    assert table.next_deadline() == 30
    assert table.expire(now=30) == [entry]
    assert entry.state is NatState.CLOSING
    assert table.next_deadline() == 40
    assert table.expire(now=40) == []
    assert len(table) == 0 and table.next_deadline() == 100


def test_idle_expiry_is_lazy_and_exact() -> None:
    table = NatTable(CONFIG)
    entry = table.alloc(flow(1), now=0)
    table.accepted(entry.natport, now=0)
    assert table.next_deadline() == 100
    entry.last_seen = 50
    assert table.expire(now=100) == []
    assert table.next_deadline() == 150
    assert table.expire(now=150) == [entry]
    assert entry.state is NatState.CLOSING


def test_illegal_transition_refused() -> None:
    table = NatTable(CONFIG)
    entry = table.alloc(flow(1), now=0)
    table.close(entry, now=0)
    with pytest.raises(ValueError):
        entry.set_state(NatState.ESTABLISHED)


# --- rewriting -------------------------------------------------------------------


def _tcp(payload: bytes = b"data", flags: str = "PA") -> bytearray:
    return bytearray(
        bytes(
            IP(src="198.19.255.1", dst="10.96.0.10", id=1)
            / TCP(sport=40000, dport=80, flags=flags, seq=7)
            / payload
        )
    )


def test_full_checksum_rewrite_outbound_and_back() -> None:
    pkt = _tcp()
    original = bytes(pkt)
    rewrite_tcp_endpoints(pkt, 0, B, 20000, A, 4444, partial_checksum=False)
    s = IP(bytes(pkt))
    assert (s.src, s[TCP].sport, s.dst, s[TCP].dport) == (
        "198.19.255.2",
        20000,
        "198.19.255.1",
        4444,
    )
    assert checksums_valid(bytes(pkt))
    rewrite_tcp_endpoints(pkt, 0, A, 40000, D, 80, partial_checksum=False)
    assert checksums_valid(bytes(pkt))
    assert bytes(pkt) == original


def test_rewrite_with_vnet_prefix_leaves_prefix_alone() -> None:
    prefix = b"\x01\x00\x36\x00\xa8\x05\x14\x00\x10\x00"
    pkt = bytearray(prefix) + _tcp(b"x" * 101)
    rewrite_tcp_endpoints(pkt, VNET_HEADER_LENGTH, B, 20001, A, 4444, partial_checksum=False)
    assert bytes(pkt[:10]) == prefix
    assert checksums_valid(bytes(pkt[10:]))


@pytest.mark.parametrize("payload", [b"", b"a", b"hello world" * 50])
def test_partial_checksum_rewrite(payload: bytes) -> None:
    """Emulate CHECKSUM_PARTIAL: the field holds the pseudo-header sum; finish like a NIC."""
    pkt = _tcp(payload)
    length = len(pkt) - 20
    pkt[36:38] = struct.pack("!H", ones_sum(bytes(pkt[12:20]), 6 + length))
    rewrite_tcp_endpoints(pkt, 0, B, 20000, A, 4444, partial_checksum=True)
    (field,) = struct.unpack_from("!H", pkt, 36)
    assert field % 0xFFFF == ones_sum(B + A, 6 + length) % 0xFFFF
    segment = bytearray(pkt[20:])
    struct.pack_into("!H", segment, 16, checksum(segment))  # the device's part
    assert ones_sum(segment, pseudo_header_sum(B, A, 6, length)) == 0xFFFF
    assert checksum(pkt[:20]) == 0  # the IPv4 header stays complete


addresses = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 0xFFFF)


@settings(max_examples=200, deadline=None)
@given(addresses, ports, addresses, ports, st.binary(max_size=64), st.booleans())
def test_precomputed_plan_equals_direct_rewrite(
    new_src: bytes, new_sport: int, new_dst: bytes, new_dport: int, payload: bytes, partial: bool
) -> None:
    """The per-flow RewritePlan (hot path) gives the same bytes as the reference rewrite."""
    pkt = _tcp(payload)
    if partial:
        pkt[36:38] = struct.pack("!H", ones_sum(bytes(pkt[12:20]), 6 + len(pkt) - 20))
    direct = bytearray(pkt)
    rewrite_tcp_endpoints(
        direct, 0, new_src, new_sport, new_dst, new_dport, partial_checksum=partial
    )
    planned = bytearray(pkt)
    plan = plan_rewrite(A, 40000, D, 80, new_src, new_sport, new_dst, new_dport)
    apply_rewrite(planned, 0, plan, partial_checksum=partial)
    assert (
        planned[:10] == direct[:10]
        and planned[12:36] == direct[12:36]
        and planned[38:] == direct[38:]
    )
    for at in (10, 36):  # checksums may differ only between the two zeros, 0x0000 and 0xFFFF
        assert (
            struct.unpack_from("!H", planned, at)[0] % 0xFFFF
            == struct.unpack_from("!H", direct, at)[0] % 0xFFFF
        )
    assert checksum(planned[:20]) in (0, 0xFFFF) or ones_sum(planned[:20]) == 0xFFFF
    if not partial:
        assert (
            ones_sum(planned[20:], pseudo_header_sum(new_src, new_dst, 6, len(pkt) - 20)) == 0xFFFF
        )
