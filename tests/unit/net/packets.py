"""Helpers for the sans-IO packet tests: scapy only crafts and checks packets here."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Packet


def checksums_valid(raw: bytes) -> bool:
    """True when scapy, recomputing every checksum, gets the same bytes."""
    pkt = IP(raw)
    del pkt[IP].chksum
    for layer in (TCP, UDP, ICMP):
        if layer in pkt:
            del pkt[layer].chksum
    return bytes(pkt) == raw


def craft(pkt: Packet) -> bytes:
    return bytes(pkt)
