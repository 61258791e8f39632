"""The answer cache: TTLs honoured, negative answers cached from the SOA (RFC 2308).

Theory of operation
-------------------
An entry is the packed response for one question key (lower-case name, type, class, DO bit)
and the time it was stored. Its lifetime is:

- a positive answer (NOERROR with answers): the smallest TTL of its answer and authority
  records (RFC 2181 §5.2: an RRset has one TTL; the smallest keeps every record valid);
- a negative answer (NXDOMAIN, or NOERROR without answers = NODATA): ``min(SOA TTL,
  SOA MINIMUM)`` of the SOA in the authority section (RFC 2308 §5); without an SOA it is not
  cached (RFC 2308 §5: "negative responses without SOA records SHOULD NOT be cached");
- SERVFAIL, REFUSED, truncated (TC) answers and TTL 0: not cached.

Lifetimes are capped (``max_ttl``, ``max_negative_ttl``). A hit returns the response with
every TTL lowered by the whole seconds it spent in the cache, so clients never keep a record
longer than its owner allowed. ``now`` is passed in (seconds, any monotonic origin); the cache
never reads a clock. Expired entries are dropped when met; the oldest entries are evicted
beyond ``max_entries``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

__all__ = ["AnswerCache", "CacheKey", "cache_lifetime"]

CacheKey = tuple[tuple[bytes, ...], int, int, bool]  # name labels, qtype, qclass, DO bit


def cache_lifetime(response: DNSRecord, *, max_ttl: int, max_negative_ttl: int) -> int:
    """Seconds *response* may be cached; 0 when it must not be."""
    header = response.header
    if header.tc:
        return 0
    rcode = header.rcode
    if rcode == RCODE.NOERROR and response.rr:
        ttls = [rr.ttl for rr in (*response.rr, *response.auth) if rr.rtype != QTYPE.OPT]
        return int(max(0, min(min(ttls), max_ttl)))
    if rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
        for rr in response.auth:
            if rr.rtype == QTYPE.SOA:
                minimum = int(rr.rdata.times[-1])
                return int(max(0, min(rr.ttl, minimum, max_negative_ttl)))
    return 0


@dataclass(slots=True)
class _Entry:
    response: bytes
    stored_at: float
    lifetime: int


class AnswerCache:
    def __init__(self, *, max_entries: int, max_ttl: int, max_negative_ttl: int) -> None:
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._max_entries = max_entries
        self._max_ttl = max_ttl
        self._max_negative_ttl = max_negative_ttl

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def put(self, key: CacheKey, response: DNSRecord, *, now: float) -> bool:
        """Store *response* if it may be cached; return whether it was."""
        lifetime = cache_lifetime(
            response, max_ttl=self._max_ttl, max_negative_ttl=self._max_negative_ttl
        )
        if lifetime <= 0 or self._max_entries <= 0:
            return False
        self._entries.pop(key, None)
        self._entries[key] = _Entry(response.pack(), now, lifetime)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return True

    def get(self, key: CacheKey, *, now: float) -> DNSRecord | None:
        """A fresh copy of the cached response with TTLs aged, or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = int(now - entry.stored_at) if now > entry.stored_at else 0
        if age >= entry.lifetime:
            del self._entries[key]
            return None
        response = DNSRecord.parse(entry.response)
        for rr in (*response.rr, *response.auth, *response.ar):
            if rr.rtype != QTYPE.OPT:
                rr.ttl = max(0, rr.ttl - age)
        return response
