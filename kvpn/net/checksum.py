"""Internet checksum arithmetic (RFC 1071, RFC 1624) for IPv4, TCP, UDP and ICMP.

Theory of operation
-------------------
The Internet checksum is the ones' complement of the ones' complement sum of the
16-bit big-endian words of the data (RFC 1071).  Because 2**16 == 1 (mod 0xFFFF),
that sum equals the big-endian integer value of the data taken modulo 0xFFFF,
which Python computes in C: ``int.from_bytes(data, "big") % 0xFFFF``.  A non-zero
input never sums to +0 in ones' complement arithmetic, so a result of 0 for
non-zero data is reported as 0xFFFF (-0).

Rewriting a field (NAT) does not need a full recompute: RFC 1624 eqn. 3 gives
``HC' = ~(~HC + ~m + m')`` where ``m``/``m'`` are the sums of the old/new field.

With TUN offload (virtio-net ``NEEDS_CSUM``), a TCP/UDP checksum field is
*partial*: it holds the uncomplemented folded sum of the pseudo-header only, and
the kernel adds the segment bytes later.  Rewriting addresses changes the
pseudo-header, so the field is adjusted by ``field' = field + ~m + m'``
(:func:`partial_adjust`); rewriting ports needs nothing (the ports are segment
bytes that get summed later).
"""

from __future__ import annotations

__all__ = [
    "checksum",
    "checksum_adjust",
    "ones_add",
    "ones_sum",
    "partial_adjust",
    "pseudo_header_sum",
]

_MASK = 0xFFFF


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Folded 16-bit ones' complement sum of *data* plus *initial* (not complemented).

    Odd-length data is padded with one zero byte, as RFC 1071 specifies.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    total = value + initial
    if total == 0:
        return 0
    folded = total % _MASK
    return folded if folded else _MASK


def ones_add(a: int, b: int) -> int:
    """Ones' complement addition of two 16-bit values."""
    total = a + b
    total = (total & _MASK) + (total >> 16)
    return (total & _MASK) + (total >> 16)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of *data* (with an optional pseudo-header sum *initial*)."""
    return ~ones_sum(data, initial) & _MASK


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header (RFC 793 section 3.1, RFC 768)."""
    return ones_sum(src + dst, protocol + length)


def checksum_adjust(old_checksum: int, old_sum: int, new_sum: int) -> int:
    """RFC 1624 eqn. 3: a complete checksum after fields summing *old_sum* became *new_sum*."""
    total = ones_add(ones_add(~old_checksum & _MASK, ~old_sum & _MASK), new_sum)
    return ~total & _MASK


def partial_adjust(partial: int, old_sum: int, new_sum: int) -> int:
    """Adjust a *partial* (offload) checksum field, which holds an uncomplemented sum."""
    return ones_add(ones_add(partial, ~old_sum & _MASK), new_sum)
