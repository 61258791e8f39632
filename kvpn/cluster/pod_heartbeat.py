"""The heartbeat of a ``kvpn connect`` shadow pod: proof that its session still runs.

A connect session's shadow pod carries two annotations, rewritten every
:data:`~kvpn.cluster.locks.DEFAULT_HEARTBEAT_SECONDS` seconds by the live session (a JSON
merge patch; the pod is the session's own, so no lock test is needed)::

    kvpn.dev/heartbeat: "2026-11-25T19:30:10Z"     (kvpn.cluster.locks.TIME_FORMAT)
    kvpn.dev/heartbeat-ttl: "30"                   (3 missed heartbeats, like a lock)

``kvpn clean`` (:mod:`kvpn.cluster.cleanup`) deletes a connect pod whose heartbeat expired,
whichever machine ran it, and keeps one whose heartbeat is alive, even when no session on
*this* machine owns it (the same user connected from another laptop). A pod without the
annotations (made by an older kvpn, or a session still starting) falls back to this
machine's session files.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kvpn.cluster.locks import DEFAULT_HEARTBEAT_SECONDS, TTL_HEARTBEATS, format_time, parse_time

__all__ = [
    "HEARTBEAT_ANNOTATION",
    "HEARTBEAT_TTL_ANNOTATION",
    "HeartbeatState",
    "PodHeartbeat",
    "heartbeat_patch",
    "heartbeat_state",
]

log = logging.getLogger("kvpn.cluster.pod_heartbeat")

HEARTBEAT_ANNOTATION = "kvpn.dev/heartbeat"
HEARTBEAT_TTL_ANNOTATION = "kvpn.dev/heartbeat-ttl"
API_TIMEOUT = 10


class HeartbeatState(enum.Enum):
    NONE = "no heartbeat"
    ALIVE = "alive"
    EXPIRED = "expired"
    MALFORMED = "unreadable"


def heartbeat_patch(
    now: datetime, *, interval: float = DEFAULT_HEARTBEAT_SECONDS
) -> dict[str, Any]:
    ttl = max(1, round(interval * TTL_HEARTBEATS))
    return {
        "metadata": {
            "annotations": {
                HEARTBEAT_ANNOTATION: format_time(now),
                HEARTBEAT_TTL_ANNOTATION: str(ttl),
            }
        }
    }


def heartbeat_state(annotations: Mapping[str, str], now: datetime) -> HeartbeatState:
    raw = annotations.get(HEARTBEAT_ANNOTATION)
    if raw is None:
        return HeartbeatState.NONE
    beat = parse_time(raw)
    ttl_text = annotations.get(HEARTBEAT_TTL_ANNOTATION, "")
    if beat is None or not ttl_text.isdigit() or int(ttl_text) <= 0:
        return HeartbeatState.MALFORMED
    if now > beat + timedelta(seconds=int(ttl_text)):
        return HeartbeatState.EXPIRED
    return HeartbeatState.ALIVE


class PodHeartbeat:
    """Rewrites the heartbeat of one pod until stopped; a missing pod is not an error (the
    session's reconnect recreates it, and the next beat marks it)."""

    def __init__(
        self,
        core: Any,
        namespace: str,
        name: str,
        *,
        interval: float = DEFAULT_HEARTBEAT_SECONDS,
    ) -> None:
        self._core = core
        self._namespace = namespace
        self._name = name
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.beats = 0
        self.failures = 0

    async def beat(self) -> bool:
        patch = heartbeat_patch(datetime.now(UTC), interval=self._interval)
        try:
            await asyncio.to_thread(
                self._core.patch_namespaced_pod,
                self._name,
                self._namespace,
                patch,
                _content_type="application/merge-patch+json",
                _request_timeout=API_TIMEOUT,
            )
        except Exception as exc:  # 404 while recreated, the API server away: next time
            self.failures += 1
            log.debug("heartbeat of pod %s/%s failed: %r", self._namespace, self._name, exc)
            return False
        self.beats += 1
        return True

    async def start(self) -> None:
        """Beat once now, then every interval in the background."""
        await self.beat()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.beat()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
