import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from kvpn.net.checksum import (
    checksum,
    checksum_adjust,
    ones_add,
    ones_sum,
    partial_adjust,
    pseudo_header_sum,
)


def brute_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 reference: add 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = initial
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def equivalent(a: int, b: int) -> bool:
    """0x0000 and 0xFFFF are the two zeros of ones' complement arithmetic."""
    return a % 0xFFFF == b % 0xFFFF


@given(st.binary(max_size=300))
def test_ones_sum_matches_rfc1071_loop(data: bytes) -> None:
    assert ones_sum(data) == brute_sum(data)


@given(st.binary(max_size=64), st.integers(0, 0x2FFFF))
def test_ones_sum_with_initial(data: bytes, initial: int) -> None:
    assert equivalent(ones_sum(data, initial), brute_sum(data, initial))


def test_known_vector_rfc1071() -> None:
    # RFC 1071 section 3 example: 0001 f203 f4f5 f6f7 sums to ddf2
    assert ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_zero_and_all_ones() -> None:
    assert ones_sum(b"") == 0
    assert ones_sum(b"\0\0\0\0") == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF
    assert ones_sum(b"\xff\xff\x00\x01") == 1


def test_tcp_checksum_matches_scapy() -> None:
    pkt = IP(src="10.1.2.3", dst="10.9.8.7") / TCP(sport=4242, dport=80, flags="PA") / b"hello!"
    raw = bytes(pkt)
    segment = bytearray(raw[20:])
    expected = struct.unpack_from("!H", segment, 16)[0]
    segment[16:18] = b"\0\0"
    src, dst = raw[12:16], raw[16:20]
    assert checksum(segment, pseudo_header_sum(src, dst, 6, len(segment))) == expected


def test_udp_checksum_matches_scapy_odd_length() -> None:
    pkt = IP(src="10.1.2.3", dst="10.9.8.7") / UDP(sport=53, dport=5353) / b"odd"
    raw = bytes(pkt)
    segment = bytearray(raw[20:])
    expected = struct.unpack_from("!H", segment, 6)[0]
    segment[6:8] = b"\0\0"
    assert (
        checksum(segment, pseudo_header_sum(raw[12:16], raw[16:20], 17, len(segment))) == expected
    )


# --- RFC 1624 incremental update, checked against a full recompute ----------------


@given(
    st.binary(min_size=2, max_size=80).filter(lambda b: len(b) % 2 == 0),
    st.data(),
)
def test_incremental_update_equals_recompute(data: bytes, draw: st.DataObject) -> None:
    buf = bytearray(data)
    # choose an even-aligned field and a replacement of the same length
    words = len(buf) // 2
    start = draw.draw(st.integers(0, words - 1)) * 2
    length = draw.draw(st.integers(1, words - start // 2)) * 2
    new_field = draw.draw(st.binary(min_size=length, max_size=length))
    old_checksum = checksum(buf)
    old_field = bytes(buf[start : start + length])
    buf[start : start + length] = new_field
    adjusted = checksum_adjust(old_checksum, ones_sum(old_field), ones_sum(new_field))
    assert equivalent(adjusted, checksum(buf))
    # and the result verifies: data + checksum sums to -0
    assert ones_sum(bytes(buf) + struct.pack("!H", adjusted)) == 0xFFFF or not any(buf)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_ones_add_matches_reference(a: int, b: int) -> None:
    assert ones_add(a, b) == brute_sum(struct.pack("!HH", a, b))


# --- partial (offload) checksum: the field holds the pseudo-header sum -------------


def device_finish(segment: bytearray, csum_offset: int) -> None:
    """What the kernel/NIC does for CHECKSUM_PARTIAL: sum from csum_start, store ~sum."""
    struct.pack_into("!H", segment, csum_offset, checksum(segment))


@given(
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=100),
)
def test_partial_checksum_address_rewrite(
    src: bytes, dst: bytes, new_src: bytes, new_dst: bytes, payload: bytes
) -> None:
    tcp = bytearray(bytes(TCP(sport=1234, dport=80, flags="A"))[:20]) + payload
    tcp[16:18] = b"\0\0"
    length = len(tcp)
    partial = ones_sum(src + dst, 6 + length)
    struct.pack_into("!H", tcp, 16, partial)
    new_partial = partial_adjust(partial, ones_sum(src + dst), ones_sum(new_src + new_dst))
    assert equivalent(new_partial, ones_sum(new_src + new_dst, 6 + length))
    struct.pack_into("!H", tcp, 16, new_partial)
    device_finish(tcp, 16)
    # the finished segment verifies against the new pseudo-header
    assert ones_sum(tcp, pseudo_header_sum(new_src, new_dst, 6, length)) == 0xFFFF
