"""A set of keyed deadlines: the earliest is found in O(log n), re-arming is cheap.

A heap of ``(when, sequence, key)`` with lazy deletion: the dict holds the live
deadline of each key, heap entries that disagree with it are stale and skipped.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    def __init__(self) -> None:
        self._live: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: K) -> bool:
        return key in self._live

    def schedule(self, key: K, when: float) -> None:
        """Set (or move) the deadline of *key*."""
        self._live[key] = when
        heapq.heappush(self._heap, (when, next(self._sequence), key))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._live):
            self._compact()

    def cancel(self, key: K) -> None:
        self._live.pop(key, None)

    def earliest(self) -> float | None:
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._live.get(key) == when:
                return when
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[K]:
        """Remove and return the keys whose deadline is at or before *now*, earliest first."""
        due: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if self._live.get(key) == when:
                del self._live[key]
                due.append(key)
        return due

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if self._live.get(entry[2]) == entry[0]]
        heapq.heapify(self._heap)
