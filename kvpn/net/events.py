"""Events the packet router asks its caller to act on (pulled with ``next_event()``)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from kvpn.net.nat import FlowKey

__all__ = ["Event", "PingOut", "TcpDialRequested", "TcpFlowEnded", "UdpOut"]


@dataclass(frozen=True, slots=True)
class TcpDialRequested:
    """Open a tunnel stream to dst:dport, then call ``dial_succeeded``/``dial_failed``."""

    flow_key: FlowKey
    dst: IPv4Address
    dport: int


@dataclass(frozen=True, slots=True)
class TcpFlowEnded:
    """The flow closed or was reset before (or without) the listener accepting it.

    A stream opened for it and not yet handed to an accepted socket must be closed.
    """

    flow_key: FlowKey


@dataclass(frozen=True, slots=True)
class UdpOut:
    flow_id: int
    dst: IPv4Address
    dport: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingOut:
    flow_id: int
    dst: IPv4Address
    ident: int
    seq: int
    payload: bytes


Event = TcpDialRequested | TcpFlowEnded | UdpOut | PingOut
