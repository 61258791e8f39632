"""Garbage, truncated and mutated packets never raise out of the router; drops are counted."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from kvpn.net.router import PacketRouter, RouterConfig

SEEDS = [
    bytes(IP(src="198.19.255.1", dst="10.0.0.1") / TCP(sport=1000, dport=80, flags="S")),
    bytes(
        IP(src="198.19.255.1", dst="10.0.0.1") / TCP(sport=1000, dport=80, flags="PA") / (b"x" * 20)
    ),
    bytes(IP(src="198.19.255.1", dst="198.19.255.2") / TCP(sport=4444, dport=10000, flags="SA")),
    bytes(IP(src="198.19.255.1", dst="10.0.0.1") / UDP(sport=1, dport=53) / (b"q" * 9)),
    bytes(IP(src="198.19.255.1", dst="10.0.0.1") / ICMP(type=8) / (b"p" * 8)),
]


def _router(vnet: bool) -> PacketRouter:
    return PacketRouter(
        RouterConfig(
            IPv4Address("198.19.255.1"), IPv4Address("198.19.255.2"), 4444, vnet_header=vnet
        )
    )


def _feed(router: PacketRouter, packets: list[bytes]) -> None:
    for i, packet in enumerate(packets):
        router.receive_from_tun(packet, now=float(i))
    counters = router.counters
    handled = len(packets) - counters.dropped
    assert handled >= 0
    assert counters.packets_from_tun == len(packets)
    router.packets_to_tun()
    while router.next_event() is not None:
        pass
    router.handle_timer(1e9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=20), st.booleans())
def test_random_bytes(packets: list[bytes], vnet: bool) -> None:
    _feed(_router(vnet), packets)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, len(packet) - 1))
        packet[index] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(packet)))
    return bytes(packet[:cut])


@settings(max_examples=500, deadline=None)
@given(st.lists(mutated(), min_size=1, max_size=20))
def test_mutated_and_truncated(packets: list[bytes]) -> None:
    router = _router(False)
    _feed(router, packets)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=10, max_size=10), mutated()), min_size=1, max_size=10))
def test_mutated_with_random_vnet_headers(items: list[tuple[bytes, bytes]]) -> None:
    _feed(_router(True), [header + packet for header, packet in items])


def test_truncations_of_every_seed_are_counted() -> None:
    router = _router(False)
    total = 0
    for seed in SEEDS:
        for cut in range(len(seed)):
            router.receive_from_tun(seed[:cut], now=0)
            total += 1
    assert router.counters.dropped == total
