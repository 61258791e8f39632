"""Who holds a Service: the ``kvpn.dev/lock`` annotation and its heartbeat.

A session that exchanges (or, later, meshes) a Service, or that owns a preview Service,
writes one annotation on it::

    kvpn.dev/lock: {"heartbeat": "2026-11-25T19:30:10Z", "host": "laptop", "kind": "exchange",
                    "mode": "selector", "session": "ab12cd34", "since": "2026-11-25T19:30:00Z",
                    "ttl": 30, "user": "alice"}

The live session rewrites ``heartbeat`` every ``ttl / 3`` seconds. A lock whose heartbeat is
older than ``ttl`` belongs to a dead session (``kill -9``, a laptop that went to sleep) and
may be taken over by ``kvpn clean`` (same user) or ``kvpn recover``. Every write is a JSON
patch whose first operation *tests* the current value, so two sessions racing for the same
Service cannot both win, and a session never overwrites a lock that someone else has since
taken.

Lock values come from the cluster, i.e. from other people: a malformed one is reported as
such (:attr:`LockVerdict.MALFORMED`), never trusted and never a crash.
"""

from __future__ import annotations

import enum
import getpass
import json
import socket
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

LOCK_ANNOTATION = "kvpn.dev/lock"
DEFAULT_HEARTBEAT_SECONDS = 10.0
TTL_HEARTBEATS = 3  # a lock expires after this many missed heartbeats

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return None


def json_pointer(*parts: str) -> str:
    """An RFC 6901 pointer: ``kvpn.dev/lock`` becomes ``kvpn.dev~1lock``."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def annotation_path(key: str) -> str:
    return json_pointer("metadata", "annotations", key)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is running kvpn: the local user name and host name."""

    user: str
    host: str

    @classmethod
    def of_this_process(cls) -> Identity:
        return cls(user=getpass.getuser(), host=socket.gethostname())

    def describe(self) -> str:
        return f"{self.user}@{self.host}"


@dataclass(frozen=True, slots=True)
class Lock:
    kind: str  # "exchange", "preview" (and "mesh" for issue 7)
    mode: str  # "selector" or "scale" for an exchange; "" otherwise
    user: str
    host: str
    session: str
    since: str
    heartbeat: str
    ttl: int  # seconds

    @classmethod
    def new(
        cls,
        kind: str,
        *,
        mode: str,
        identity: Identity,
        session: str,
        now: datetime,
        heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
    ) -> Lock:
        stamp = format_time(now)
        ttl = max(1, round(heartbeat_seconds * TTL_HEARTBEATS))
        return cls(kind, mode, identity.user, identity.host, session, stamp, stamp, ttl)

    def to_json(self) -> str:
        """Compact, sorted: the exact text is what JSON patch ``test`` compares."""
        return json.dumps(
            {
                "kind": self.kind,
                "mode": self.mode,
                "user": self.user,
                "host": self.host,
                "session": self.session,
                "since": self.since,
                "heartbeat": self.heartbeat,
                "ttl": self.ttl,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Lock | None:
        """The lock in an annotation value, or None if it is not a well-formed lock."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        strings = ("kind", "mode", "user", "host", "session", "since", "heartbeat")
        if not all(isinstance(data.get(k), str) for k in strings):
            return None
        ttl = data.get("ttl")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            return None
        if parse_time(data["heartbeat"]) is None:
            return None
        return cls(**{k: data[k] for k in strings}, ttl=ttl)

    @property
    def holder(self) -> str:
        return f"{self.user}@{self.host}"

    def expires_at(self) -> datetime:
        beat = parse_time(self.heartbeat)
        if beat is None:  # from_json refuses these; a hand-built lock is treated as expired
            return datetime.min.replace(tzinfo=UTC)
        return beat + timedelta(seconds=self.ttl)

    def expired(self, now: datetime) -> bool:
        return now > self.expires_at()

    def refreshed(self, now: datetime) -> Lock:
        return replace(self, heartbeat=format_time(now))

    def describe(self, now: datetime) -> str:
        what = f"{self.kind} ({self.mode})" if self.mode else self.kind
        age = max(0, int((now - (parse_time(self.heartbeat) or now)).total_seconds()))
        state = "expired" if self.expired(now) else "alive"
        return (
            f"{what} by {self.holder}, session {self.session}, since {self.since} "
            f"(last heartbeat {age}s ago, {state})"
        )


class LockVerdict(enum.Enum):
    FREE = "free"
    OURS_LIVE = "ours, alive"  # this very session
    MINE_EXPIRED = "a dead session of this user"
    MINE_LIVE = "another live session of this user"
    OTHERS_LIVE = "another user's live session"
    OTHERS_EXPIRED = "another user's dead session"
    MALFORMED = "an unreadable lock"


def read_lock(annotations: dict[str, str] | None) -> tuple[str | None, Lock | None]:
    """The raw annotation value (None if absent) and the parsed lock (None if malformed)."""
    raw = (annotations or {}).get(LOCK_ANNOTATION)
    if raw is None:
        return None, None
    return raw, Lock.from_json(raw)


def judge_lock(
    raw: str | None, lock: Lock | None, *, me: Identity, now: datetime, session: str = ""
) -> LockVerdict:
    if raw is None:
        return LockVerdict.FREE
    if lock is None:
        return LockVerdict.MALFORMED
    if session and lock.session == session:
        return LockVerdict.OURS_LIVE
    mine = lock.user == me.user
    if lock.expired(now):
        return LockVerdict.MINE_EXPIRED if mine else LockVerdict.OTHERS_EXPIRED
    return LockVerdict.MINE_LIVE if mine else LockVerdict.OTHERS_LIVE


# --- JSON patch operations (RFC 6902) -----------------------------------------------------


def acquire_ops(
    annotations: dict[str, str] | None, resource_version: str, lock: Lock
) -> list[dict[str, Any]]:
    """Take a free Service; fails (422) if it changed since it was read (a lock appeared)."""
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}
    ]
    if annotations is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append({"op": "add", "path": annotation_path(LOCK_ANNOTATION), "value": lock.to_json()})
    return ops


def takeover_ops(old_raw: str, lock: Lock) -> list[dict[str, Any]]:
    """Replace an expired lock (tested by exact value) with ``lock``."""
    path = annotation_path(LOCK_ANNOTATION)
    return [
        {"op": "test", "path": path, "value": old_raw},
        {"op": "replace", "path": path, "value": lock.to_json()},
    ]


def refresh_ops(old: Lock, new: Lock) -> list[dict[str, Any]]:
    return takeover_ops(old.to_json(), new)


def release_ops(held: Lock) -> list[dict[str, Any]]:
    path = annotation_path(LOCK_ANNOTATION)
    return [{"op": "test", "path": path, "value": held.to_json()}, {"op": "remove", "path": path}]
