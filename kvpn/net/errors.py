"""Why a packet was dropped, and the one exception the parsers raise.

Parsers raise :class:`PacketError` deep inside; the router converts it once into a
dropped packet and a counter (STYLE: raise deep, convert once).
"""

from __future__ import annotations

import enum

__all__ = ["DropReason", "PacketError"]


class DropReason(enum.Enum):
    """Every reason the router drops a packet; the value is the counter name."""

    TRUNCATED = "truncated"
    BAD_VNET_HEADER = "bad_vnet_header"
    GSO_UNSUPPORTED = "gso_unsupported"
    IPV6_UNSUPPORTED = "ipv6_unsupported"
    NOT_IP = "not_ip"
    IPV4_OPTIONS = "ipv4_options"
    FRAGMENT = "fragment"
    BAD_LENGTH = "bad_length"
    BAD_IP_CHECKSUM = "bad_ip_checksum"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    TCP_BAD_HEADER = "tcp_bad_header"
    TCP_NO_FLOW = "tcp_no_flow"
    TCP_RST_NO_FLOW = "tcp_rst_no_flow"
    TCP_DUPLICATE_SYN = "tcp_duplicate_syn"
    TCP_DIAL_PENDING = "tcp_dial_pending"
    TCP_INBOUND_NO_NAT = "tcp_inbound_no_nat"
    TO_FAKE_PEER = "to_fake_peer"
    NAT_EXHAUSTED = "nat_exhausted"
    UDP_BAD_HEADER = "udp_bad_header"
    UDP_FLOW_UNKNOWN = "udp_flow_unknown"
    ICMP_BAD_HEADER = "icmp_bad_header"
    ICMP_UNSUPPORTED_TYPE = "icmp_unsupported_type"
    ICMP_FLOW_UNKNOWN = "icmp_flow_unknown"
    MALFORMED = "malformed"


class PacketError(Exception):
    """A packet that cannot or will not be handled; carries the drop reason."""

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.value)
        self.reason = reason
