"""Reading the first request of an h2c prior-knowledge connection, and the SETTINGS ACK filter."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from hypothesis import given
from hypothesis import strategies as st

from kvpn.shadow.h2c_prelude import (
    EMPTY_SETTINGS,
    FirstSettingsAckDropper,
    H2Prelude,
    PreludeState,
    parse_frame_header,
)
from kvpn.shadow.http_routing import H2_PREFACE, mark_of

REQUEST = [
    (":method", "POST"),
    (":path", "/pkg.Service/Call"),
    (":scheme", "http"),
    (":authority", "echo:8080"),
    ("content-type", "application/grpc"),
    ("version", "alice"),
    ("x-long", "v" * 40000),  # forces CONTINUATION frames
]


def client_bytes(*, ack_first: bool) -> bytes:
    """What an h2 client sends: preface, SETTINGS, [ACK of ours], HEADERS (+CONTINUATION)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    out = conn.data_to_send()
    if ack_first:
        conn.receive_data(EMPTY_SETTINGS)
        out += conn.data_to_send()
    conn.send_headers(1, REQUEST)
    conn.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    return out + conn.data_to_send()


def test_prelude_finds_headers_at_every_split() -> None:
    data = client_bytes(ack_first=True)
    for split in (1, 9, 24, 25, 33, 100, 16000, len(data) - 1):
        prelude = H2Prelude()
        assert prelude.feed(data[:split]) in (PreludeState.NEED_MORE, PreludeState.HEADERS)
        assert prelude.feed(data[split:]) is PreludeState.HEADERS
        assert mark_of(prelude.headers, "Version") == "alice"
        assert prelude.data == data


def test_prelude_byte_at_a_time() -> None:
    data = client_bytes(ack_first=False)
    prelude = H2Prelude()
    states = [prelude.feed(data[i : i + 1]) for i in range(len(data))]
    assert states[-1] is PreludeState.HEADERS
    assert (b"version", b"alice") in prelude.headers


def test_prelude_failures() -> None:
    assert H2Prelude().feed(b"GET / HTTP/1.1\r\n\r\n\r\n\r\n") is PreludeState.FAILED
    assert H2Prelude().feed(b"PRX") is PreludeState.FAILED
    small = H2Prelude(limit=1024)
    assert small.feed(H2_PREFACE + b"\x00\x10\x00\x00\x00\x00\x00\x00\x00") is PreludeState.FAILED
    # CONTINUATION with no HEADERS before it
    assert H2Prelude().feed(H2_PREFACE + b"\x00\x00\x00\x09\x04\x00\x00\x00\x01") is (
        PreludeState.FAILED
    )
    # HEADERS whose block is not valid HPACK
    bad = H2_PREFACE + b"\x00\x00\x02\x01\x04\x00\x00\x00\x01\xff\xff"
    prelude = H2Prelude()
    assert prelude.feed(bad) is PreludeState.FAILED
    assert "undecodable" in prelude.failure


@given(st.binary(max_size=300))
def test_prelude_never_raises(garbage: bytes) -> None:
    prelude = H2Prelude(limit=4096)
    prelude.feed(H2_PREFACE)
    prelude.feed(garbage)
    assert prelude.state in set(PreludeState)


def frames(data: bytes) -> list[tuple[int, int]]:
    """(type, flags) of every frame after the preface."""
    out = []
    offset = len(H2_PREFACE)
    while offset < len(data):
        header = parse_frame_header(data[offset : offset + 9])
        out.append((header.type, header.flags))
        offset += 9 + header.length
    return out


def test_dropper_removes_exactly_the_first_ack_at_every_split() -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.receive_data(EMPTY_SETTINGS)
    conn.send_headers(1, REQUEST[:6], end_stream=True)
    conn.receive_data(EMPTY_SETTINGS)  # the backend's own SETTINGS: its ACK must stay
    data = conn.data_to_send()
    assert frames(data).count((4, 1)) == 2
    for split in range(0, len(data), 7):
        dropper = FirstSettingsAckDropper()
        out = dropper.feed(data[:split]) + dropper.feed(data[split:])
        assert dropper.dropped
        assert frames(out).count((4, 1)) == 1
        assert len(out) == len(data) - 9
        assert out.startswith(H2_PREFACE)


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=200))
def test_dropper_never_raises_and_only_drops_nine_bytes(garbage: bytes, split: int) -> None:
    data = H2_PREFACE + garbage
    dropper = FirstSettingsAckDropper()
    out = dropper.feed(data[:split]) + dropper.feed(data[split:])
    assert len(data) - len(out) in range(0, 10)
