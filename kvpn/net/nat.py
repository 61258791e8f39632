"""The TCP NAT table of the "system stack" trick, and in-place packet rewriting.

Theory of operation
-------------------
The TUN device has address A; B is a fake peer routed into the TUN; a kernel
listener is bound to A:P.  An application's segment ``app:sport -> D:dport`` read
from the TUN is rewritten to ``B:natport -> A:P`` and written back, so the kernel's
own TCP (window scaling, SACK, RTO, congestion control, TIME_WAIT; RFC 9293) talks to
the application on our behalf.  The listener's segments ``A:P -> B:natport`` are
rewritten back to ``D:dport -> app:sport``.  ``accept()`` yields peer (B, natport),
and the table gives the original 4-tuple.

Entries are keyed by the application's full 4-tuple (never by source port alone)
and by natport.  Their life cycle::

    ACCEPT_PENDING --accepted--> ESTABLISHED --FIN both ways / RST / relay end--> CLOSING
    ACCEPT_PENDING --RST / not accepted in time--------------------------------> CLOSING
    CLOSING --linger over--> removed; natport quarantined for ``time_wait`` seconds

The quarantine keeps a (B, natport) pair unused while the kernel may still hold the
old connection in TIME_WAIT (2*MSL = 60 s on Linux), so a new flow is never mistaken
for an old one.  Checksums are fixed up incrementally (RFC 1624); under TUN offload
the TCP checksum is partial and only the address change is applied (checksum.py).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from kvpn.net.checksum import checksum_adjust, ones_add, ones_sum, partial_adjust
from kvpn.net.deadlines import Deadlines
from kvpn.net.ipv4 import HEADER_LENGTH as IP_HEADER_LENGTH
from kvpn.net.tcp import CHECKSUM_OFFSET as TCP_CHECKSUM_OFFSET

__all__ = [
    "FastRoute",
    "FastRoutes",
    "FlowKey",
    "NatConfig",
    "NatEntry",
    "NatExhausted",
    "NatState",
    "NatTable",
    "RewritePlan",
    "apply_rewrite",
    "plan_rewrite",
    "rewrite_tcp_endpoints",
]

_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")


class FlowKey(NamedTuple):
    """An application's TCP/UDP 4-tuple as seen on the TUN (addresses are 4-byte bytes)."""

    src: bytes
    src_port: int
    dst: bytes
    dst_port: int


class NatState(enum.Enum):
    ACCEPT_PENDING = "accept_pending"
    ESTABLISHED = "established"
    CLOSING = "closing"


NAT_TRANSITIONS: dict[NatState, frozenset[NatState]] = {
    NatState.ACCEPT_PENDING: frozenset({NatState.ESTABLISHED, NatState.CLOSING}),
    NatState.ESTABLISHED: frozenset({NatState.CLOSING}),
    NatState.CLOSING: frozenset(),
}


class NatExhausted(Exception):
    """Every natport is in use or quarantined."""


@dataclass(frozen=True, slots=True)
class NatConfig:
    port_low: int = 10000
    port_high: int = 60999
    accept_timeout: float = 30.0
    closing_linger: float = 30.0
    time_wait: float = 65.0
    idle_timeout: float = 7200.0


class NatEntry:
    """One translated TCP flow (mutable: it is the table's state)."""

    __slots__ = (
        "fast_keys",
        "fin_from_app",
        "fin_from_listener",
        "flow",
        "inbound",
        "last_seen",
        "natport",
        "outbound",
        "state",
    )

    def __init__(self, flow: FlowKey, natport: int, now: float) -> None:
        self.flow = flow
        self.natport = natport
        self.state = NatState.ACCEPT_PENDING
        self.last_seen = now
        self.fin_from_app = False
        self.fin_from_listener = False
        #: set by the router: app -> listener and listener -> app rewrites of this flow
        self.outbound: RewritePlan | None = None
        self.inbound: RewritePlan | None = None
        #: the fast-path keys (fastpath.py) cached for this entry while ESTABLISHED
        self.fast_keys: list[bytes] = []

    def set_state(self, new: NatState) -> None:
        if new not in NAT_TRANSITIONS[self.state]:
            raise ValueError(f"illegal NAT transition {self.state.name} -> {new.name}")
        self.state = new

    def __repr__(self) -> str:
        return f"NatEntry({self.flow!r}, natport={self.natport}, {self.state.name})"


class FastRoute(NamedTuple):
    """A cached rewrite of an ESTABLISHED flow's segments in one direction (fastpath.py)."""

    entry: NatEntry
    #: the new source and destination addresses and ports, as the 12 header bytes
    endpoints: bytes
    address_delta: int
    full_delta: int


#: raw ``src addr + dst addr + src port + dst port`` header bytes -> route
FastRoutes = dict[bytes, FastRoute]


class NatTable:
    def __init__(self, config: NatConfig) -> None:
        self._config = config
        self._fast: FastRoutes = {}
        self._by_flow: dict[FlowKey, NatEntry] = {}
        self._by_natport: dict[int, NatEntry] = {}
        self._free: deque[int] = deque(range(config.port_low, config.port_high + 1))
        self._deadlines: Deadlines[int] = Deadlines()
        self._quarantine: Deadlines[int] = Deadlines()

    def __len__(self) -> int:
        return len(self._by_flow)

    @property
    def free_ports(self) -> int:
        return len(self._free)

    @property
    def quarantined_ports(self) -> int:
        return len(self._quarantine)

    def by_flow(self, flow: FlowKey) -> NatEntry | None:
        return self._by_flow.get(flow)

    def by_natport(self, natport: int) -> NatEntry | None:
        return self._by_natport.get(natport)

    @property
    def fast_routes(self) -> FastRoutes:
        """The fast-path cache (read by the router; only this table changes it)."""
        return self._fast

    def cache_route(self, key: bytes, entry: NatEntry, plan: RewritePlan) -> None:
        """Cache *plan* for segments whose 12 endpoint bytes are *key* (ESTABLISHED only).

        The key is dropped as soon as *entry* leaves ESTABLISHED or the table.
        """
        if (
            entry.state is not NatState.ESTABLISHED
            or self._by_natport.get(entry.natport) is not entry
        ):
            return
        if len(key) != 12:
            raise ValueError("a fast-path key is 12 bytes")
        self._fast[key] = FastRoute(
            entry, plan.addresses + plan.ports, plan.address_delta, plan.full_delta
        )
        entry.fast_keys.append(key)

    def _forget_routes(self, entry: NatEntry) -> None:
        fast = self._fast
        for key in entry.fast_keys:
            route = fast.get(key)
            if route is not None and route.entry is entry:
                del fast[key]
        entry.fast_keys.clear()

    def entries(self) -> list[NatEntry]:
        return list(self._by_flow.values())

    def alloc(self, flow: FlowKey, *, now: float) -> NatEntry:
        """A new ACCEPT_PENDING entry for *flow* (which must not have one)."""
        if flow in self._by_flow:
            raise ValueError(f"flow already translated: {flow!r}")
        self._release_quarantine(now)
        if not self._free:
            raise NatExhausted()
        natport = self._free.popleft()
        entry = NatEntry(flow, natport, now)
        self._by_flow[flow] = entry
        self._by_natport[natport] = entry
        self._deadlines.schedule(natport, now + self._config.accept_timeout)
        return entry

    def accepted(self, natport: int, *, now: float) -> NatEntry | None:
        """The kernel listener accepted (B, natport): the entry, now ESTABLISHED, or None."""
        entry = self._by_natport.get(natport)
        if entry is None or entry.state is not NatState.ACCEPT_PENDING:
            return None
        entry.set_state(NatState.ESTABLISHED)
        entry.last_seen = now
        self._deadlines.schedule(natport, now + self._config.idle_timeout)
        return entry

    def close(self, entry: NatEntry, *, now: float) -> bool:
        """Start the closing linger of *entry*; False if it was already closing."""
        if entry.state is NatState.CLOSING:
            return False
        entry.set_state(NatState.CLOSING)
        self._forget_routes(entry)
        self._deadlines.schedule(entry.natport, now + self._config.closing_linger)
        return True

    def remove(self, entry: NatEntry, *, now: float) -> None:
        """Forget *entry* at once; its natport is quarantined."""
        if self._by_natport.get(entry.natport) is not entry:
            return
        self._forget_routes(entry)
        del self._by_flow[entry.flow]
        del self._by_natport[entry.natport]
        self._deadlines.cancel(entry.natport)
        self._quarantine.schedule(entry.natport, now + self._config.time_wait)

    def next_deadline(self) -> float | None:
        candidates = [
            t for t in (self._deadlines.earliest(), self._quarantine.earliest()) if t is not None
        ]
        return min(candidates) if candidates else None

    def expire(self, *, now: float) -> list[NatEntry]:
        """Apply the deadlines due at *now*; return the entries that started closing.

        Entries whose closing linger is over are removed silently (natport quarantined).
        """
        changed: list[NatEntry] = []
        for natport in self._deadlines.pop_due(now):
            entry = self._by_natport.get(natport)
            if entry is None:
                continue
            if entry.state is NatState.ESTABLISHED:
                idle_until = entry.last_seen + self._config.idle_timeout
                if idle_until > now:
                    self._deadlines.schedule(natport, idle_until)
                    continue
                self.close(entry, now=now)
            elif entry.state is NatState.ACCEPT_PENDING:
                self.close(entry, now=now)
            else:
                self.remove(entry, now=now)
                continue
            changed.append(entry)
        self._release_quarantine(now)
        return changed

    def _release_quarantine(self, now: float) -> None:
        self._free.extend(self._quarantine.pop_due(now))


def rewrite_tcp_endpoints(
    packet: bytearray,
    ip_offset: int,
    src: bytes,
    src_port: int,
    dst: bytes,
    dst_port: int,
    *,
    partial_checksum: bool,
) -> None:
    """Rewrite an IPv4/TCP packet's addresses and ports in place, fixing both checksums.

    The IPv4 header (20 bytes, no options) starts at *ip_offset*.  With
    *partial_checksum* the TCP checksum field holds the pseudo-header sum only (TUN
    offload), so only the address change is folded into it.
    """
    tcp_offset = ip_offset + IP_HEADER_LENGTH
    old_addresses = bytes(packet[ip_offset + 12 : ip_offset + 20])
    old_ports = bytes(packet[tcp_offset : tcp_offset + 4])
    new_addresses = src + dst
    new_ports = _PORTS.pack(src_port, dst_port)
    old_address_sum = ones_sum(old_addresses)
    new_address_sum = ones_sum(new_addresses)

    (ip_checksum,) = _U16.unpack_from(packet, ip_offset + 10)
    _U16.pack_into(
        packet, ip_offset + 10, checksum_adjust(ip_checksum, old_address_sum, new_address_sum)
    )
    checksum_at = tcp_offset + TCP_CHECKSUM_OFFSET
    (tcp_checksum,) = _U16.unpack_from(packet, checksum_at)
    if partial_checksum:
        tcp_checksum = partial_adjust(tcp_checksum, old_address_sum, new_address_sum)
    else:
        tcp_checksum = checksum_adjust(
            tcp_checksum,
            ones_sum(old_ports, old_address_sum),
            ones_sum(new_ports, new_address_sum),
        )
    _U16.pack_into(packet, checksum_at, tcp_checksum)
    packet[ip_offset + 12 : ip_offset + 20] = new_addresses
    packet[tcp_offset : tcp_offset + 4] = new_ports


class RewritePlan(NamedTuple):
    """A precomputed endpoint rewrite: the new bytes and the checksum deltas (RFC 1624).

    A flow's rewrite is the same for every packet, so the sums of the old and new
    fields are folded once into ``address_delta`` (``~m + m'`` for the addresses; IPv4
    header and partial TCP checksum) and ``full_delta`` (addresses and ports; complete
    TCP checksum).
    """

    addresses: bytes
    ports: bytes
    address_delta: int
    full_delta: int


def plan_rewrite(
    old_src: bytes,
    old_src_port: int,
    old_dst: bytes,
    old_dst_port: int,
    new_src: bytes,
    new_src_port: int,
    new_dst: bytes,
    new_dst_port: int,
) -> RewritePlan:
    old_addresses = old_src + old_dst
    new_addresses = new_src + new_dst
    old_ports = _PORTS.pack(old_src_port, old_dst_port)
    new_ports = _PORTS.pack(new_src_port, new_dst_port)
    old_address_sum = ones_sum(old_addresses)
    new_address_sum = ones_sum(new_addresses)
    address_delta = ones_add(~old_address_sum & 0xFFFF, new_address_sum)
    full_delta = ones_add(
        ~ones_sum(old_ports, old_address_sum) & 0xFFFF, ones_sum(new_ports, new_address_sum)
    )
    return RewritePlan(new_addresses, new_ports, address_delta, full_delta)


def apply_rewrite(
    packet: bytearray, ip_offset: int, plan: RewritePlan, *, partial_checksum: bool
) -> None:
    """Apply *plan* to the IPv4/TCP packet at *ip_offset* in place (see rewrite_tcp_endpoints).

    The packet's old endpoints must be the ones the plan was made from.
    """
    tcp_offset = ip_offset + IP_HEADER_LENGTH
    at = ip_offset + 10
    (value,) = _U16.unpack_from(packet, at)
    _U16.pack_into(packet, at, ~ones_add(~value & 0xFFFF, plan.address_delta) & 0xFFFF)
    at = tcp_offset + TCP_CHECKSUM_OFFSET
    (value,) = _U16.unpack_from(packet, at)
    if partial_checksum:
        value = ones_add(value, plan.address_delta)
    else:
        value = ~ones_add(~value & 0xFFFF, plan.full_delta) & 0xFFFF
    _U16.pack_into(packet, at, value)
    packet[ip_offset + 12 : ip_offset + 20] = plan.addresses
    packet[tcp_offset : tcp_offset + 4] = plan.ports
