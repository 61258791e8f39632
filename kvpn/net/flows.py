"""Datagram flows: UDP 4-tuples and ICMP echo identifiers mapped to relay flow ids.

UDP and ICMP echo are relayed in userspace through the shadow agent.  Each distinct
application 4-tuple (UDP) or (source, destination, echo identifier) triple (ICMP) is
a *flow* with a small integer id that the relay protocol carries, so replies find
their way back.  A flow remembers the IP header + 8 bytes of the last datagram it sent,
which an ICMP unreachable quotes (RFC 1122 section 3.2.2).  Flows that stay idle for
``idle_timeout`` seconds are forgotten (checked lazily at their deadline).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

from kvpn.net.deadlines import Deadlines

__all__ = ["DatagramFlow", "DatagramFlowTable", "EchoKey"]

K = TypeVar("K", bound=Hashable)
_FLOW_ID_LIMIT = 1 << 32


class EchoKey(NamedTuple):
    src: bytes
    dst: bytes
    ident: int


class DatagramFlow(Generic[K]):
    __slots__ = ("flow_id", "key", "last_seen", "quote")

    def __init__(self, flow_id: int, key: K, now: float) -> None:
        self.flow_id = flow_id
        self.key = key
        self.last_seen = now
        self.quote = b""

    def __repr__(self) -> str:
        return f"DatagramFlow({self.flow_id}, {self.key!r})"


class DatagramFlowTable(Generic[K]):
    def __init__(self, idle_timeout: float) -> None:
        self._idle_timeout = idle_timeout
        self._by_key: dict[K, DatagramFlow[K]] = {}
        self._by_id: dict[int, DatagramFlow[K]] = {}
        self._deadlines: Deadlines[int] = Deadlines()
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._by_key)

    def by_id(self, flow_id: int) -> DatagramFlow[K] | None:
        return self._by_id.get(flow_id)

    def by_key(self, key: K) -> DatagramFlow[K] | None:
        return self._by_key.get(key)

    def open(self, key: K, *, now: float) -> tuple[DatagramFlow[K], bool]:
        """The flow for *key*, created if needed (second item: whether it is new)."""
        flow = self._by_key.get(key)
        if flow is not None:
            flow.last_seen = now
            return flow, False
        flow = DatagramFlow(self._allocate_id(), key, now)
        self._by_key[key] = flow
        self._by_id[flow.flow_id] = flow
        self._deadlines.schedule(flow.flow_id, now + self._idle_timeout)
        return flow, True

    def remove(self, flow: DatagramFlow[K]) -> None:
        if self._by_id.get(flow.flow_id) is flow:
            del self._by_id[flow.flow_id]
            del self._by_key[flow.key]
            self._deadlines.cancel(flow.flow_id)

    def next_deadline(self) -> float | None:
        return self._deadlines.earliest()

    def expire(self, *, now: float) -> list[DatagramFlow[K]]:
        expired: list[DatagramFlow[K]] = []
        for flow_id in self._deadlines.pop_due(now):
            flow = self._by_id[flow_id]
            idle_until = flow.last_seen + self._idle_timeout
            if idle_until > now:
                self._deadlines.schedule(flow_id, idle_until)
            else:
                self.remove(flow)
                expired.append(flow)
        return expired

    def _allocate_id(self) -> int:
        while True:
            flow_id = self._next_id
            self._next_id = flow_id + 1 if flow_id + 1 < _FLOW_ID_LIMIT else 1
            if flow_id not in self._by_id:
                return flow_id
