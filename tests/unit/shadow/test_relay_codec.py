"""kvpn-datagrams codec: round trips from one case table, split points, garbage."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn.shadow.relay_codec import (
    AGENT_TO_CLIENT,
    CLIENT_TO_AGENT,
    MAX_PAYLOAD,
    CloseFlow,
    FlowExpired,
    IcmpUnreachableCode,
    Message,
    PingReply,
    PingSend,
    PingUnreachable,
    RelayDecoder,
    UdpReceived,
    UdpSend,
    UdpUnreachable,
    encode,
)

V4 = IPv4Address("10.96.0.10")
V6 = IPv6Address("fd00::1234")

# (message, exact encoding)
CASES: list[tuple[Message, bytes]] = [
    (
        UdpSend(7, V4, 53, b"q"),
        b"\x00\x0d" + b"\x01" + b"\x00\x00\x00\x07" + b"\x04\x0a\x60\x00\x0a" + b"\x00\x35" + b"q",
    ),
    (
        UdpSend(1, V6, 5353, b""),
        b"\x00\x18\x01\x00\x00\x00\x01\x06" + V6.packed + b"\x14\xe9",
    ),
    (
        PingSend(0xFFFFFFFF, V4, 0x1234, 9, b"abc"),
        b"\x00\x11\x02\xff\xff\xff\xff\x04\x0a\x60\x00\x0a\x12\x34\x00\x09abc",
    ),
    (CloseFlow(3), b"\x00\x05\x03\x00\x00\x00\x03"),
    (
        UdpReceived(7, V4, 53, b"answer"),
        b"\x00\x12\x81\x00\x00\x00\x07\x04\x0a\x60\x00\x0a\x00\x35answer",
    ),
    (UdpUnreachable(7), b"\x00\x06\x82\x00\x00\x00\x07\x03"),
    (UdpUnreachable(7, IcmpUnreachableCode.HOST), b"\x00\x06\x82\x00\x00\x00\x07\x01"),
    (
        PingReply(2, V6, 1, 65535, b"p"),
        b"\x00\x1b\x83\x00\x00\x00\x02\x06" + V6.packed + b"\x00\x01\xff\xffp",
    ),
    (PingUnreachable(2, 13), b"\x00\x06\x84\x00\x00\x00\x02\x0d"),
    (FlowExpired(9), b"\x00\x05\x85\x00\x00\x00\x09"),
]


def _direction(message: Message) -> frozenset:  # type: ignore[type-arg]
    return CLIENT_TO_AGENT if isinstance(message, UdpSend | PingSend | CloseFlow) else AGENT_TO_CLIENT


def _decode_all(decoder: RelayDecoder) -> list[Message]:
    out = []
    while (m := decoder.next_message()) is not None:
        out.append(m)
    return out


@pytest.mark.parametrize(("message", "wire"), CASES, ids=lambda v: type(v).__name__)
def test_encode_exact_bytes(message: Message, wire: bytes) -> None:
    assert encode(message) == wire


@pytest.mark.parametrize(("message", "wire"), CASES, ids=lambda v: type(v).__name__)
def test_decode_whole_and_byte_at_a_time(message: Message, wire: bytes) -> None:
    whole = RelayDecoder(_direction(message))
    whole.receive_data(wire)
    assert _decode_all(whole) == [message]

    split = RelayDecoder(_direction(message))
    got: list[Message] = []
    for i in range(len(wire)):
        split.receive_data(wire[i : i + 1])
        got += _decode_all(split)
        if i < len(wire) - 1:
            assert got == []
    assert got == [message]
    assert split.buffered == 0
    assert split.malformed == 0


def test_many_frames_in_one_chunk() -> None:
    messages = [m for m, _ in CASES if _direction(m) is AGENT_TO_CLIENT]
    decoder = RelayDecoder(AGENT_TO_CLIENT)
    decoder.receive_data(b"".join(encode(m) for m in messages))
    assert _decode_all(decoder) == messages


BAD_BODIES = {
    "empty": b"",
    "unknown type": b"\x7f\x00\x00\x00\x01",
    "wrong direction": b"\x81\x00\x00\x00\x07\x04\x0a\x60\x00\x0a\x00\x35",
    "short flow id": b"\x01\x00\x00",
    "bad family": b"\x01\x00\x00\x00\x01\x05\x01\x02\x03\x04\x00\x35",
    "short address": b"\x01\x00\x00\x00\x01\x04\x01\x02",
    "missing port": b"\x01\x00\x00\x00\x01\x04\x01\x02\x03\x04",
    "close trailing": b"\x03\x00\x00\x00\x01\x00",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_frame_dropped_and_stream_stays_in_sync(body: bytes) -> None:
    decoder = RelayDecoder(CLIENT_TO_AGENT)
    good = UdpSend(1, V4, 53, b"x")
    decoder.receive_data(struct.pack("!H", len(body)) + body + encode(good))
    assert _decode_all(decoder) == [good]
    assert decoder.malformed == 1
    assert decoder.last_error


@pytest.mark.parametrize(
    "message",
    [UdpSend(-1, V4, 1, b""), UdpSend(1, V4, 70000, b""), UdpSend(1, V4, 1, bytes(MAX_PAYLOAD + 1))],
)
def test_encode_rejects_values_that_do_not_fit(message: Message) -> None:
    with pytest.raises(ValueError):
        encode(message)


def test_largest_payload_fits() -> None:
    m = UdpReceived(1, V6, 1, bytes(MAX_PAYLOAD))
    decoder = RelayDecoder(AGENT_TO_CLIENT)
    decoder.receive_data(encode(m))
    assert _decode_all(decoder) == [m]


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**128 - 1).map(IPv6Address)
)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
payloads = st.binary(max_size=300)
client_messages = st.one_of(
    st.builds(UdpSend, u32, addresses, u16, payloads),
    st.builds(PingSend, u32, addresses, u16, u16, payloads),
    st.builds(CloseFlow, u32),
)
agent_messages = st.one_of(
    st.builds(UdpReceived, u32, addresses, u16, payloads),
    st.builds(UdpUnreachable, u32, st.integers(0, 255)),
    st.builds(PingReply, u32, addresses, u16, u16, payloads),
    st.builds(PingUnreachable, u32, st.integers(0, 255)),
    st.builds(FlowExpired, u32),
)


@given(st.lists(client_messages, max_size=8), st.data())
def test_round_trip_client_messages_any_split(messages: list[Message], data: st.DataObject) -> None:
    wire = b"".join(encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = RelayDecoder(CLIENT_TO_AGENT)
    prev = 0
    for cut in [*cuts, len(wire)]:
        decoder.receive_data(wire[prev:cut])
        prev = cut
    assert _decode_all(decoder) == messages
    assert decoder.malformed == 0


@given(st.lists(agent_messages, max_size=8))
def test_round_trip_agent_messages(messages: list[Message]) -> None:
    decoder = RelayDecoder(AGENT_TO_CLIENT)
    decoder.receive_data(b"".join(encode(m) for m in messages))
    assert _decode_all(decoder) == messages


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_garbage_never_raises(chunks: list[bytes]) -> None:
    for accepted in (CLIENT_TO_AGENT, AGENT_TO_CLIENT):
        decoder = RelayDecoder(accepted)
        for chunk in chunks:
            decoder.receive_data(chunk)
            _decode_all(decoder)
        assert decoder.malformed >= 0
        assert decoder.buffered <= sum(len(c) for c in chunks)


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=10))
def test_garbage_bodies_in_valid_frames_are_counted_exactly(bodies: list[bytes]) -> None:
    decoder = RelayDecoder(CLIENT_TO_AGENT)
    decoder.receive_data(b"".join(struct.pack("!H", len(b)) + b for b in bodies))
    decoded = _decode_all(decoder)
    assert len(decoded) + decoder.malformed == len(bodies)
    assert decoder.buffered == 0
