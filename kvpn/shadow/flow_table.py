"""Idle-expiring table of datagram flows (sans-IO).

Theory of operation: the agent keeps one connected socket per client flow id (UDP, or an
ICMP echo "ping" socket). UDP has no close, so a flow lives while datagrams move in either
direction and is expired after ``idle_timeout`` seconds of silence, like a NAT/conntrack
entry (RFC 4787 REQ-5 asks for at least two minutes for UDP mappings; kvpn defaults to
one minute for UDP and ten seconds for echo, which is enough for a request/response).
The table is bounded: adding past ``max_flows`` evicts the least recently active flow.
Time is passed in as ``now``; the caller owns the clock and the timer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    key: Hashable
    value: T
    idle_timeout: float
    last_active: float

    @property
    def deadline(self) -> float:
        return self.last_active + self.idle_timeout


class FlowTable(Generic[T]):
    """Flows keyed by client flow id; each remembers the key it was opened for."""

    def __init__(self, max_flows: int) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self._max_flows = max_flows
        # Least recently active first.
        self._entries: OrderedDict[int, _Entry[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, flow_id: int) -> bool:
        return flow_id in self._entries

    def lookup(self, flow_id: int, key: Hashable) -> T | None:
        """The flow's value if it exists *and* was opened for ``key``."""
        entry = self._entries.get(flow_id)
        if entry is None or entry.key != key:
            return None
        return entry.value

    def touch(self, flow_id: int, *, now: float) -> None:
        entry = self._entries.get(flow_id)
        if entry is not None:
            entry.last_active = now
            self._entries.move_to_end(flow_id)

    def add(
        self, flow_id: int, key: Hashable, value: T, *, idle_timeout: float, now: float
    ) -> list[tuple[int, T]]:
        """Add a flow, returning the flows it displaced (same id, or evicted for room)."""
        displaced: list[tuple[int, T]] = []
        old = self._entries.pop(flow_id, None)
        if old is not None:
            displaced.append((flow_id, old.value))
        while len(self._entries) >= self._max_flows:
            evicted_id, evicted = self._entries.popitem(last=False)
            displaced.append((evicted_id, evicted.value))
        self._entries[flow_id] = _Entry(key, value, idle_timeout, now)
        return displaced

    def pop(self, flow_id: int) -> T | None:
        entry = self._entries.pop(flow_id, None)
        return None if entry is None else entry.value

    def pop_expired(self, *, now: float) -> list[tuple[int, T]]:
        expired = [fid for fid, e in self._entries.items() if e.deadline <= now]
        return [(fid, self._entries.pop(fid).value) for fid in expired]

    def pop_all(self) -> list[tuple[int, T]]:
        items = [(fid, e.value) for fid, e in self._entries.items()]
        self._entries.clear()
        return items

    def next_deadline(self) -> float | None:
        if not self._entries:
            return None
        return min(e.deadline for e in self._entries.values())
