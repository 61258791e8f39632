"""The established-flow fast path (kvpn/net/fastpath.py) against the full router path.

Two routers get the same history; one has its fast-path cache emptied before every
packet, so it always takes the full path.  Both must write byte-identical packets,
raise the same events and end with the same counters and NAT state.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpn.net.events import Event
from kvpn.net.nat import FlowKey, NatState
from kvpn.net.router import PacketRouter, RouterConfig
from kvpn.net.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_packet
from kvpn.net.vnet import NO_OFFLOAD_HEADER, VirtioNetHeader, build_vnet

A = IPv4Address("198.19.255.1").packed
B = IPv4Address("198.19.255.2").packed
P = 4444
APP = A
D = IPv4Address("10.96.0.10").packed
SPORT, DPORT = 40000, 80
FLOW = FlowKey(APP, SPORT, D, DPORT)


def _router(vnet: bool) -> PacketRouter:
    return PacketRouter(
        RouterConfig(IPv4Address(A), IPv4Address(B), P, vnet_header=vnet, dial_timeout=6.0)
    )


def _drain(router: PacketRouter) -> list[Event]:
    out: list[Event] = []
    while (event := router.next_event()) is not None:
        out.append(event)
    return out


def _established(vnet: bool) -> tuple[PacketRouter, int]:
    router = _router(vnet)
    prefix = NO_OFFLOAD_HEADER if vnet else b""
    syn = build_tcp_packet(APP, SPORT, D, DPORT, seq=1000, ack=0, flags=SYN, window=1000)
    router.receive_from_tun(prefix + syn, now=0.0)
    _drain(router)
    assert router.dial_succeeded(FLOW, now=0.0)
    router.packets_to_tun()
    entry = router.nat.by_flow(FLOW)
    assert entry is not None
    assert router.nat_lookup_accepted(entry.natport, now=0.0) == FLOW
    assert len(router.nat.fast_routes) == 2
    return router, entry.natport


_FLAGS = st.sampled_from(
    [ACK, ACK, PSH | ACK, ACK | 0xC0, ACK | 0x20, 0, ACK | FIN, RST, RST | ACK, SYN, SYN | ACK]
)
_VNET = st.tuples(
    st.sampled_from([0, 0, 1, 1, 2, 3, 4]),  # flags: NEEDS_CSUM, DATA_VALID, unknown
    st.sampled_from([0, 0, 1, 0x81, 3]),  # gso type
    st.integers(0, 65535),
    st.sampled_from([(20, 16), (20, 16), (14, 16), (20, 6)]),
)
_PACKET = st.tuples(
    st.booleans(),  # from the kernel listener (True) or from the application
    _FLAGS,
    st.binary(max_size=64),
    _VNET,
    st.one_of(st.none(), st.tuples(st.integers(0, 39), st.integers(1, 255))),  # corrupt a byte
    st.one_of(st.none(), st.integers(0, 120)),  # truncate
    st.booleans(),  # a port of another (unknown) flow
)


Spec = tuple[
    bool,
    int,
    bytes,
    tuple[int, int, int, tuple[int, int]],
    tuple[int, int] | None,
    int | None,
    bool,
]


def _packet(spec: Spec, vnet: bool, natport: int) -> bytes:
    inbound, flags, payload, vnet_fields, corrupt, cut, other = spec
    port = SPORT + 1 if other else SPORT
    if inbound:
        raw = build_tcp_packet(
            A, P, B, natport + int(bool(other)), seq=5, ack=9, flags=flags, payload=payload
        )
    else:
        raw = build_tcp_packet(APP, port, D, DPORT, seq=9, ack=5, flags=flags, payload=payload)
    buf = bytearray(raw)
    if corrupt is not None:
        index, xor = corrupt
        buf[index] ^= xor
    if cut is not None:
        del buf[cut:]
    if vnet:
        vflags, gso_type, gso_size, (start, offset) = vnet_fields
        header = VirtioNetHeader(vflags, gso_type, 0, gso_size, start, offset)
        buf[0:0] = build_vnet(header)
    return bytes(buf)


def _state(router: PacketRouter) -> tuple[object, ...]:
    entries = sorted(
        (e.natport, e.state.value, e.last_seen, e.fin_from_app, e.fin_from_listener)
        for e in router.nat.entries()
    )
    return router.counters.as_dict(), entries


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(_PACKET, min_size=1, max_size=12))
def test_fast_path_matches_full_path(vnet: bool, specs: list[Spec]) -> None:
    fast, natport = _established(vnet)
    full, natport_full = _established(vnet)
    assert natport == natport_full
    for step, spec in enumerate(specs, start=1):
        packet = _packet(spec, vnet, natport)
        full.nat.fast_routes.clear()
        fast.receive_from_tun(packet, now=float(step))
        full.receive_from_tun(packet, now=float(step))
        assert [bytes(p) for p in fast.packets_to_tun()] == [
            bytes(p) for p in full.packets_to_tun()
        ]
        assert _drain(fast) == _drain(full)
        assert _state(fast) == _state(full)


def test_fast_path_taken_and_invalidated_on_close() -> None:
    router, natport = _established(False)
    data = build_tcp_packet(APP, SPORT, D, DPORT, seq=9, ack=5, flags=ACK, payload=b"x" * 10)
    router.receive_from_tun(bytearray(data), now=1.0)
    [out] = router.packets_to_tun()
    assert bytes(out[12:24]) == B + A + struct.pack("!HH", natport, P)
    entry = router.nat.by_flow(FLOW)
    assert entry is not None and entry.last_seen == 1.0
    fin = build_tcp_packet(A, P, B, natport, seq=5, ack=9, flags=FIN | ACK)
    router.receive_from_tun(fin, now=2.0)
    fin = build_tcp_packet(APP, SPORT, D, DPORT, seq=9, ack=6, flags=FIN | ACK)
    router.receive_from_tun(fin, now=2.0)
    assert entry.state is NatState.CLOSING
    assert router.nat.fast_routes == {} and entry.fast_keys == []
    router.tcp_flow_closed(FLOW, now=3.0)
    router.handle_timer(100.0)
    assert router.nat.by_flow(FLOW) is None and router.nat.fast_routes == {}


def test_fast_path_dropped_when_idle_expiry_closes_the_flow() -> None:
    router, _ = _established(False)
    entry = router.nat.by_flow(FLOW)
    assert entry is not None
    timer = router.get_timer()
    assert timer is not None
    router.handle_timer(timer)
    assert entry.state is NatState.CLOSING and router.nat.fast_routes == {}
